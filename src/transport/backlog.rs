//! One peer's queue of messages not yet delivered: ordered, coalesced, bounded.
//!
//! - **Ordered**: messages leave in the order they were published, in batches that say which
//!   range of the origin's sequence numbers they account for ([`Batch::covers`]), so that a
//!   message coalesced away is not taken for a gap by the receiver.
//! - **Coalesced**: a target purged again while an earlier purge of it waits replaces it (a
//!   hard purge also replaces a soft one; a soft one never replaces a hard one); a purge of
//!   everything, or a "drop your cache", replaces everything queued before it.
//! - **Bounded**: past `limit` messages, the queue becomes one "drop your cache" message
//!   accounting for everything it held: the peer can never serve what it missed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{Body, Message};
use crate::purge::LogWhat;

/// Messages sent in one request at most.
pub const MAX_BATCH: usize = 256;

/// Bytes of purge targets sent in one request at most (the receiver takes up to 8 MiB): a
/// batch of long ban patterns is cut short rather than refused.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// What [`Backlog::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// It replaced an earlier message of the same target.
    Coalesced,
    /// The queue was over its limit: it is now one "drop your cache" message.
    Overflowed,
}

/// Messages to send in one request.
#[derive(Debug)]
pub struct Batch {
    /// The origin's sequence numbers this batch accounts for, first and last.
    pub covers: (u64, u64),
    pub messages: Vec<Arc<Message>>,
}

#[derive(Debug)]
pub struct Backlog {
    /// By sequence number; `None` where a later message replaced it.
    slots: VecDeque<(u64, Option<Arc<Message>>)>,
    /// The first sequence number not delivered yet (0: nothing was ever queued).
    pending_from: u64,
    /// Messages in `slots` that are still to be sent.
    live: usize,
    /// Coalescing key → (sequence number, soft) of the queued message for that target.
    index: HashMap<String, (u64, bool)>,
    limit: usize,
}

impl Backlog {
    pub fn new(limit: usize) -> Self {
        Backlog {
            slots: VecDeque::new(),
            pending_from: 0,
            live: 0,
            index: HashMap::new(),
            limit: limit.max(1),
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Queue `msg` (sequence numbers increase from one push to the next), with the limit
    /// for a healthy peer raised to `limit` (a failed peer keeps `self.limit`).
    pub fn push(&mut self, msg: Arc<Message>) -> Pushed {
        let limit = self.limit;
        self.push_within(msg, limit)
    }

    /// [`Self::push`], overflowing past `limit` messages.
    pub fn push_within(&mut self, mut msg: Arc<Message>, limit: usize) -> Pushed {
        if self.slots.is_empty() && self.live == 0 {
            self.pending_from = msg.seq;
        }
        let supersedes = match &msg.body {
            Body::DropCache { .. } => true,
            Body::Purge { target, .. } => matches!(target, LogWhat::All),
            // dropped at the receiver only if it does not hold that generation already
            Body::Generation { .. } => false,
        };
        if supersedes {
            self.slots.clear();
            self.index.clear();
            self.live = 0;
        }
        let mut pushed = Pushed::Queued;
        let purge_key = match &msg.body {
            Body::Purge { soft, target } if !supersedes => {
                Some((serde_json::to_string(target).unwrap_or_default(), *soft))
            }
            _ => None,
        };
        if let Some((key, soft)) = purge_key {
            if let Some((old_seq, old_soft)) = self.index.get(&key).copied() {
                // a soft purge leaves an earlier hard one of the same target in place
                if !soft || old_soft {
                    if let Some(old_at) = self.forget(old_seq) {
                        // numbered after it but accepted before it (two purges racing
                        // through memcached): the one sent keeps the later time
                        if old_at > msg.at_ms {
                            Arc::make_mut(&mut msg).at_ms = old_at;
                        }
                    }
                    pushed = Pushed::Coalesced;
                }
            }
            self.index.insert(key, (msg.seq, soft));
        }
        let seq = msg.seq;
        self.slots.push_back((seq, Some(msg)));
        self.live += 1;
        if self.live > limit.max(1) {
            self.overflow(seq);
            return Pushed::Overflowed;
        }
        if self.slots.len() > 2 * self.live + 64 {
            // replaced messages leave holes; a hot tag purged all day while the peer is down
            // must not grow the queue
            self.slots.retain(|(_, m)| m.is_some());
        }
        pushed
    }

    /// Drop the message with sequence number `seq`; its accept time.
    fn forget(&mut self, seq: u64) -> Option<u64> {
        let i = self.slots.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        let old = self.slots[i].1.take()?;
        self.live -= 1;
        Some(old.at_ms)
    }

    /// Replace everything queued (up to `seq`) by one "drop your cache" message.
    fn overflow(&mut self, seq: u64) {
        let dropped = self.live;
        let origin = self
            .slots
            .iter()
            .find_map(|(_, m)| m.as_ref().map(|m| m.origin))
            .unwrap_or_default();
        self.slots.clear();
        self.index.clear();
        let drop = Message::new(
            origin,
            seq,
            Body::DropCache {
                reason: format!("peer backlog overflow: {dropped} purges could not be kept for this corral"),
            },
        );
        self.slots.push_back((seq, Some(Arc::new(drop))));
        self.live = 1;
    }

    /// The next messages to send, at most `max` (and about [`MAX_BATCH_BYTES`]), or `None` if
    /// nothing waits. The batch covers up to its last message: holes after it belong to a
    /// message still queued, and are covered when it is sent.
    pub fn batch(&self, max: usize) -> Option<Batch> {
        if self.live == 0 {
            return None;
        }
        let mut messages = Vec::new();
        let mut last = self.pending_from;
        let mut bytes = 0;
        for (seq, msg) in &self.slots {
            let Some(m) = msg else {
                continue;
            };
            let size = m.wire_size();
            if !messages.is_empty() && bytes + size > MAX_BATCH_BYTES {
                break;
            }
            bytes += size;
            last = *seq;
            messages.push(m.clone());
            if messages.len() >= max.max(1) {
                break;
            }
        }
        Some(Batch {
            covers: (self.pending_from, last),
            messages,
        })
    }

    /// The peer took everything up to `upto`.
    pub fn delivered(&mut self, upto: u64) {
        while let Some((seq, msg)) = self.slots.front() {
            if *seq > upto {
                break;
            }
            if let Some(m) = msg {
                if let Body::Purge { target, .. } = &m.body {
                    let key = serde_json::to_string(target).unwrap_or_default();
                    if self.index.get(&key).is_some_and(|(s, _)| s == seq) {
                        self.index.remove(&key);
                    }
                }
                self.live -= 1;
            }
            self.slots.pop_front();
        }
        self.pending_from = self.pending_from.max(upto + 1);
    }

    /// Forget everything (the peer turned out to be this corral).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.live = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(seq: u64, path: &str, soft: bool) -> Arc<Message> {
        Arc::new(Message::new(
            7,
            seq,
            Body::Purge {
                soft,
                target: LogWhat::Url {
                    host: "h".into(),
                    path: path.into(),
                },
            },
        ))
    }

    fn paths(b: &Batch) -> Vec<(u64, String)> {
        b.messages
            .iter()
            .map(|m| match &m.body {
                Body::Purge {
                    target: LogWhat::Url { path, .. },
                    ..
                } => (m.seq, path.clone()),
                Body::Purge { target, .. } => (m.seq, format!("{target:?}")),
                Body::DropCache { .. } => (m.seq, "drop".into()),
                Body::Generation { new, .. } => (m.seq, new.clone()),
            })
            .collect()
    }

    #[test]
    fn a_url_purged_twice_is_sent_once_and_the_batch_still_covers_both() {
        let mut b = Backlog::new(100);
        assert_eq!(b.push(url(1, "/a", false)), Pushed::Queued);
        assert_eq!(b.push(url(2, "/b", false)), Pushed::Queued);
        assert_eq!(b.push(url(3, "/a", false)), Pushed::Coalesced);
        assert_eq!(b.len(), 2);
        let batch = b.batch(MAX_BATCH).unwrap();
        assert_eq!(batch.covers, (1, 3));
        assert_eq!(paths(&batch), vec![(2, "/b".into()), (3, "/a".into())]);
    }

    #[test]
    fn a_soft_purge_never_replaces_a_hard_one_but_a_hard_one_replaces_a_soft_one() {
        let mut b = Backlog::new(100);
        b.push(url(1, "/a", false));
        assert_eq!(b.push(url(2, "/a", true)), Pushed::Queued);
        assert_eq!(b.len(), 2);
        assert_eq!(b.push(url(3, "/a", false)), Pushed::Coalesced);
        // the soft one went; the first hard one stays (sent twice: harmless)
        assert_eq!(
            paths(&b.batch(MAX_BATCH).unwrap()),
            vec![(1, "/a".into()), (3, "/a".into())]
        );
    }

    #[test]
    fn a_purge_of_everything_supersedes_what_was_queued_before_it() {
        let mut b = Backlog::new(100);
        b.push(url(1, "/a", false));
        b.push(url(2, "/b", false));
        let all = Arc::new(Message::new(
            7,
            3,
            Body::Purge {
                soft: false,
                target: LogWhat::All,
            },
        ));
        b.push(all);
        b.push(url(4, "/a", false));
        let batch = b.batch(MAX_BATCH).unwrap();
        assert_eq!(batch.covers, (1, 4));
        assert_eq!(batch.messages.len(), 2);
        assert_eq!(batch.messages[0].seq, 3);
        // a probe carries the oldest message, and covers only up to it
        assert_eq!(b.batch(1).unwrap().covers, (1, 3));
    }

    #[test]
    fn overflow_leaves_one_drop_your_cache_covering_everything() {
        let mut b = Backlog::new(5);
        for i in 1..=5 {
            assert_ne!(b.push(url(i, &format!("/{i}"), false)), Pushed::Overflowed);
        }
        assert_eq!(b.push(url(6, "/6", false)), Pushed::Overflowed);
        let batch = b.batch(MAX_BATCH).unwrap();
        assert_eq!(batch.covers, (1, 6));
        assert_eq!(paths(&batch), vec![(6, "drop".into())]);
        // later purges queue after it
        b.push(url(7, "/7", false));
        assert_eq!(b.len(), 2);
        assert_eq!(b.batch(MAX_BATCH).unwrap().covers, (1, 7));
    }

    #[test]
    fn delivery_pops_in_order_and_batches_are_bounded() {
        let mut b = Backlog::new(1000);
        for i in 1..=10 {
            b.push(url(i, &format!("/{i}"), false));
        }
        let first = b.batch(1).unwrap();
        assert_eq!(first.covers, (1, 1));
        b.delivered(first.covers.1);
        let next = b.batch(4).unwrap();
        assert_eq!(next.covers, (2, 5));
        b.delivered(next.covers.1);
        assert_eq!(b.len(), 5);
        let rest = b.batch(MAX_BATCH).unwrap();
        assert_eq!(rest.covers, (6, 10));
        b.delivered(10);
        assert!(b.is_empty());
        assert!(b.batch(MAX_BATCH).is_none());
        // a purge of a URL delivered before is queued again, not coalesced into nothing
        assert_eq!(b.push(url(11, "/3", false)), Pushed::Queued);
        assert_eq!(b.batch(MAX_BATCH).unwrap().covers, (11, 11));
    }

    #[test]
    fn a_batch_never_covers_a_replaced_message_whose_replacement_it_does_not_carry() {
        let mut b = Backlog::new(100);
        b.push(url(1, "/a", false));
        b.push(url(2, "/b", false));
        b.push(url(3, "/a", false));
        // the probe carries /b (2) only: seq 1 (/a) is replaced by 3, which is not in it
        let probe = b.batch(1).unwrap();
        assert_eq!(probe.covers, (1, 2));
        b.delivered(probe.covers.1);
        assert_eq!(b.batch(MAX_BATCH).unwrap().covers, (3, 3));
    }

    #[test]
    fn the_message_kept_by_coalescing_keeps_the_later_accept_time() {
        let mut b = Backlog::new(100);
        let mut first = Message::new(7, 1, url(1, "/a", false).body.clone());
        first.at_ms = 2_000;
        let mut second = Message::new(7, 2, url(2, "/a", false).body.clone());
        second.at_ms = 1_000;
        b.push(Arc::new(first));
        assert_eq!(b.push(Arc::new(second)), Pushed::Coalesced);
        let batch = b.batch(MAX_BATCH).unwrap();
        assert_eq!((batch.messages[0].seq, batch.messages[0].at_ms), (2, 2_000));
    }

    #[test]
    fn replaced_messages_do_not_grow_the_queue() {
        let mut b = Backlog::new(100);
        for i in 1..=100_000 {
            b.push(url(i, "/hot", false));
        }
        assert_eq!(b.len(), 1);
        assert!(b.slots.len() < 200, "{} slots", b.slots.len());
        assert_eq!(b.batch(MAX_BATCH).unwrap().covers, (1, 100_000));
    }

    #[test]
    fn batches_are_bounded_in_bytes() {
        let mut b = Backlog::new(1000);
        let long = "x".repeat(16 * 1024);
        for i in 1..=200 {
            b.push(url(i, &format!("/{i}/{long}"), false));
        }
        let batch = b.batch(MAX_BATCH).unwrap();
        let bytes: usize = batch
            .messages
            .iter()
            .map(|m| serde_json::to_vec(&**m).unwrap().len())
            .sum();
        assert!(
            batch.messages.len() < 200 && bytes <= MAX_BATCH_BYTES,
            "{} messages, {bytes} bytes",
            batch.messages.len()
        );
        assert_eq!(batch.covers, (1, batch.messages.len() as u64));
    }

    #[test]
    fn a_message_pushed_during_delivery_stays_queued() {
        let mut b = Backlog::new(100);
        b.push(url(1, "/a", false));
        let batch = b.batch(MAX_BATCH).unwrap();
        // the same URL again while the first is on the wire: it must be sent too
        b.push(url(2, "/a", false));
        b.delivered(batch.covers.1);
        assert_eq!(b.len(), 1);
        assert_eq!(b.batch(MAX_BATCH).unwrap().covers, (2, 2));
    }
}
