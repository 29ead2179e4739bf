//! memcached's purge log: the record of a purge as kept there, and the [`Follower`] that
//! applies other corrals' records (and the namespace generation) to this corral.
//!
//! A purge accepted anywhere (but purge-all) is appended to the log ([`LogRecord`], JSON) under
//! a sequence number from a memcached counter; purge-all bumps the namespace generation
//! instead. Every corral follows both in the background, every [`WATCH_INTERVAL`]
//! ([`Follower::spawn_watch`]), and uses a value from memcached only while it does (the
//! fence, below).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::header::HeaderName;
use tracing::warn;

use super::validity::{from_millis, millis};
use super::{now_stamp, regex, Ban, Purge, Target, Validity, MAX_RECORDS};
use crate::metrics;
use crate::storage::memcached::{next_log_epoch, L2};
use crate::storage::memory::MemoryStorage;

mod checkpoint;
pub use checkpoint::{Checkpoint, Kept, KeptWhat, CHECKPOINT_EVERY};

/// A purge as kept in memcached's purge log, so that every corral sharing the namespace
/// applies it to its L1 and to what it reads from L2 (JSON: small, versionable, readable).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LogRecord {
    pub at_ms: u64,
    pub soft: bool,
    pub what: LogWhat,
    /// The corral that accepted the purge ([`super::corral_id`]; 0 from older corrals): it
    /// applied the purge when it accepted it, and skips the record when it reads it back.
    #[serde(default)]
    pub origin: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LogWhat {
    Ban(Ban),
    Tags {
        tags: Vec<String>,
    },
    TagPattern {
        header: String,
        pattern: String,
    },
    /// More than one pattern (a corral that does not know this kind covers it by its floor).
    TagPatterns {
        patterns: Vec<(String, String)>,
    },
    Url {
        host: String,
        path: String,
    },
    /// Everything (peer messages only: memcached's log carries it as the generation).
    All,
}

impl LogWhat {
    /// The wire form of a purge's target.
    pub fn of(target: &Target) -> LogWhat {
        match target {
            Target::Ban(b) => LogWhat::Ban(b.clone()),
            Target::Tags(tags) => LogWhat::Tags { tags: tags.clone() },
            Target::TagPattern { patterns } => match patterns.as_slice() {
                [(header, pattern)] => LogWhat::TagPattern {
                    header: header.as_str().to_string(),
                    pattern: pattern.as_str().to_string(),
                },
                many => LogWhat::TagPatterns {
                    patterns: many
                        .iter()
                        .map(|(h, p)| (h.as_str().to_string(), p.as_str().to_string()))
                        .collect(),
                },
            },
            Target::Url { host, path } => LogWhat::Url {
                host: host.clone(),
                path: path.clone(),
            },
            Target::All => LogWhat::All,
        }
    }

    /// The target again; `None` if a header name or pattern does not compile.
    pub fn into_target(self) -> Option<Target> {
        Some(match self {
            LogWhat::Ban(ban) => Target::Ban(ban),
            LogWhat::Tags { tags } => Target::Tags(tags),
            LogWhat::TagPattern { header, pattern } => Target::TagPattern {
                patterns: vec![(
                    HeaderName::from_bytes(header.as_bytes()).ok()?,
                    regex("pattern", &pattern).ok()?,
                )],
            },
            LogWhat::TagPatterns { patterns } => Target::TagPattern {
                patterns: patterns
                    .iter()
                    .map(|(h, p)| {
                        Some((
                            HeaderName::from_bytes(h.as_bytes()).ok()?,
                            regex("pattern", p).ok()?,
                        ))
                    })
                    .collect::<Option<Vec<_>>>()?,
            },
            LogWhat::Url { host, path } => Target::Url { host, path },
            LogWhat::All => Target::All,
        })
    }
}

impl LogRecord {
    /// The log record of a purge accepted `at`; `None` for purge-all, which reaches every
    /// corral through the namespace generation.
    pub fn of(purge: &Purge, at: SystemTime) -> Option<LogRecord> {
        if let Target::All = purge.target {
            return None;
        }
        Some(LogRecord {
            at_ms: millis(at),
            soft: purge.soft,
            what: LogWhat::of(&purge.target),
            origin: super::corral_id(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode a record and rebuild its purge; `None` if it does not decode.
    pub fn decode(bytes: &[u8]) -> Option<(Purge, SystemTime)> {
        Self::decode_with_origin(bytes).map(|(purge, at, _)| (purge, at))
    }

    /// [`Self::decode`], with the id of the corral that accepted the purge.
    pub fn decode_with_origin(bytes: &[u8]) -> Option<(Purge, SystemTime, u64)> {
        let rec: LogRecord = serde_json::from_slice(bytes).ok()?;
        if let LogWhat::All = rec.what {
            // never written there (purge-all moves the generation): not a record to trust
            return None;
        }
        let target = rec.what.into_target()?;
        Some((
            Purge {
                target,
                soft: rec.soft,
            },
            from_millis(rec.at_ms),
            rec.origin,
        ))
    }
}

/// How often the control keys are read ([`Follower::spawn_watch`]): how long, at most, before
/// a purge another corral accepted reaches this one through memcached.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// How long a lookup waits for a corral's first read of the purge log before it does without
/// L2.
const FIRST_READ_WAIT: Duration = Duration::from_millis(500);

/// How long a record found missing may be one a purge is still writing (it bumps the log's
/// counter, then writes the record) before it is taken for gone.
const RECORD_WAIT: Duration = Duration::from_secs(1);

/// Purge log records read in one pipelined request.
const LOG_BATCH: u64 = 200;

/// Follows memcached's purge log and namespace generation into this corral's validity records
/// and L1, and keeps the fence.
///
/// # The fence
/// A corral that cannot read the log cannot know which purges other corrals accepted. Once it
/// has gone `purge.max_unconfirmed` without a complete read, it is fenced: it serves only the
/// copies it validated within `max_unconfirmed` and revalidates the others upstream before use
/// ([`Self::fence`]), whatever their freshness; the moment is logged and counted. So no copy
/// older than a purge answered more than `max_unconfirmed` ago is served, partition or not.
/// When a read succeeds again, the records it missed are applied (or, past [`MAX_RECORDS`] or
/// with one gone, everything validated before now is treated as purged) and the fence comes
/// down.
pub struct Follower {
    l1: &'static MemoryStorage,
    validity: &'static Validity,
    /// The last purge log record applied here.
    seen: AtomicU64,
    /// One purge log reader at a time.
    reader: tokio::sync::Mutex<()>,
    /// `purge.max_unconfirmed`, in ms.
    max_unconfirmed_ms: u64,
    /// `purge.clock_skew`: copies validated on another corral's clock are fenced that much
    /// later.
    skew: Duration,
    /// When the last complete read of the log began (ms, this corral's clock); the start of
    /// the process until the first one (so a corral that never reads it is fenced too); 0
    /// without memcached (nothing to follow).
    confirmed_ms: AtomicU64,
    /// Whether the log was ever read completely.
    synced: std::sync::atomic::AtomicBool,
    /// When a lookup's attempt at the first read last failed (ms; 0: never).
    first_failed_ms: AtomicU64,
    /// Whether the fence is up (for the log line and the gauge, once per change).
    fenced: std::sync::atomic::AtomicBool,
    /// The epoch of the log that `seen` counts in ([`L2::control_state`]).
    epoch: parking_lot::Mutex<Option<u64>>,
    /// The last record a checkpoint was written (or due) for.
    checkpointed: AtomicU64,
    /// A record found missing, and since when ([`Self::given_up_on`]).
    missing: parking_lot::Mutex<Option<(u64, std::time::Instant)>>,
    /// This corral dropped its L1 for a new upstream generation while the namespace
    /// generation was this; a move from it to the next, until then, is that change's (one
    /// corral moves it for all), and is adopted without a second drop.
    expected_move: parking_lot::Mutex<Option<(u64, std::time::Instant)>>,
    /// The generation this corral's last reset bumped the namespace to, and the epoch it
    /// wrote, until a read finds every server that answers holding the epoch (the reset
    /// done): a reset tried again meanwhile (its epoch did not land everywhere) is not bumped
    /// again, as one bump hides the copies from before it.
    reset_bump: parking_lot::Mutex<Option<(u64, u64)>>,
    /// The highest generation this corral has seen or used: a reset's bump goes above it,
    /// so that a server that was down holding a higher one cannot bring the copies from
    /// before the reset back into reach when it returns.
    top_generation: AtomicU64,
}

impl Follower {
    /// A follower for a corral with memcached (`with_l2`), or one with nothing to follow.
    pub fn new(
        l1: &'static MemoryStorage,
        validity: &'static Validity,
        purge: &crate::config::PurgeConfig,
        with_l2: bool,
    ) -> Self {
        let start = if with_l2 { millis(SystemTime::now()) } else { 0 };
        Follower {
            l1,
            validity,
            seen: AtomicU64::new(0),
            reader: tokio::sync::Mutex::new(()),
            max_unconfirmed_ms: purge.max_unconfirmed.as_millis() as u64,
            skew: purge.clock_skew,
            confirmed_ms: AtomicU64::new(start),
            synced: std::sync::atomic::AtomicBool::new(false),
            first_failed_ms: AtomicU64::new(0),
            fenced: std::sync::atomic::AtomicBool::new(false),
            epoch: parking_lot::Mutex::new(None),
            checkpointed: AtomicU64::new(0),
            missing: parking_lot::Mutex::new(None),
            expected_move: parking_lot::Mutex::new(None),
            reset_bump: parking_lot::Mutex::new(None),
            top_generation: AtomicU64::new(0),
        }
    }

    /// The epoch of the purge log this corral follows, once read: it names the log (each
    /// memcached namespace's log draws its own), so that a corral told of a purge can tell
    /// whether its sender wrote it to the same log ([`crate::transport::Message::log`]).
    pub fn epoch(&self) -> Option<u64> {
        *self.epoch.lock()
    }

    /// This corral dropped its L1 for a new upstream generation while the namespace generation
    /// was `from`: the move to `from + 1` in the next few seconds is that change's (or another
    /// corral's purge of everything: a quiet floor is set for it).
    pub fn expect_move(&self, from: u64) {
        *self.expected_move.lock() = Some((from, std::time::Instant::now() + Duration::from_secs(5)));
    }

    /// Every [`WATCH_INTERVAL`], read the namespace's control keys ([`Self::sync`]): the
    /// generation (when it moved, another corral purged everything: drop L1 too) and the purge
    /// log (records of the purges other corrals accepted), so L1 and what is read from L2
    /// follow them within that interval, without a memcached read on any request's path.
    pub fn spawn_watch(&'static self, l2: L2) {
        tokio::spawn(async move {
            loop {
                self.sync(&l2).await;
                self.update_fence();
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
        });
    }

    /// Whether values read from L2 can be checked against the purge log now: it was read
    /// completely and the fence is down. Never read yet, it is read right now (or the read
    /// under way is waited for), at most [`FIRST_READ_WAIT`]; past that, or while memcached
    /// does not answer, lookups do without L2 rather than queue up behind it.
    pub async fn usable(&self, l2: &L2) -> bool {
        if !self.synced.load(Ordering::Acquire) {
            let failed = self.first_failed_ms.load(Ordering::Acquire);
            if failed > 0 && millis(SystemTime::now()) < failed + WATCH_INTERVAL.as_millis() as u64 {
                // memcached did not answer just now: the watch retries, lookups do not queue
                return false;
            }
            let Ok(_one_reader) = tokio::time::timeout(FIRST_READ_WAIT, self.reader.lock()).await else {
                return false;
            };
            // the read we waited for may have done it
            if !self.synced.load(Ordering::Acquire) && !self.sync_locked(l2).await {
                self.first_failed_ms
                    .store(millis(SystemTime::now()), Ordering::Release);
                return false;
            }
        }
        self.fence(SystemTime::now()).is_none()
    }

    /// Whether a copy validated at `validated` by the corral `by` must be revalidated before
    /// use because the fence is up ([`Self::fence`]; another corral's clock gets
    /// `purge.clock_skew` more).
    #[inline]
    pub fn fenced(&self, validated: SystemTime, by: u64, now: SystemTime) -> bool {
        let Some(fence) = self.fence(now) else {
            return false;
        };
        let margin = if by == super::corral_id() {
            Duration::ZERO
        } else {
            self.skew
        };
        validated < fence + margin
    }

    /// The sequence number of the last purge log record applied here.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// If the fence is up: copies validated before this time must be revalidated before use.
    /// `None` while the log is confirmed (or was never read: no memcached, or nothing looked
    /// up in it yet, so L1 holds nothing of the cluster's).
    ///
    /// The promise is a bound: a purge answered more than `max_unconfirmed` ago is known here.
    /// A corral that read the log within `max_unconfirmed` knows every such purge. One that
    /// has not cannot know them, so it serves only copies validated within `max_unconfirmed`
    /// (no purge answered before the bound can cover them), and revalidates the others.
    #[inline]
    pub fn fence(&self, now: SystemTime) -> Option<SystemTime> {
        let confirmed = self.confirmed_ms.load(Ordering::Acquire);
        if confirmed == 0 {
            return None;
        }
        let bound = millis(now).saturating_sub(self.max_unconfirmed_ms);
        (confirmed < bound).then(|| from_millis(bound))
    }

    /// Log and count the fence going up or down (called by the watch, every interval).
    fn update_fence(&self) {
        let fenced = self.fence(SystemTime::now()).is_some();
        if self.fenced.swap(fenced, Ordering::AcqRel) == fenced {
            return;
        }
        if fenced {
            metrics::FENCES.inc();
            warn!(
                max_unconfirmed_ms = self.max_unconfirmed_ms,
                "cannot read memcached's purge log: fenced, L1 copies are revalidated upstream before use until it can"
            );
        } else {
            tracing::info!(seen = self.seen(), "memcached's purge log read again: fence down");
        }
    }

    /// Read the control keys and follow them: adopt the generation, apply the purge log
    /// records this corral has not seen. Returns false if they could not be read completely
    /// (memcached trouble): the fence then counts from the last complete read.
    ///
    /// Records that cannot be applied one by one are covered conservatively, by treating
    /// everything validated before now as purged (a floor): a record gone (expired, evicted),
    /// more than [`MAX_RECORDS`] to catch up on (a corral started long after, or one cut off
    /// for long), or a log that was reset ([`Self::resync`]).
    pub async fn sync(&self, l2: &L2) -> bool {
        let _one_reader = self.reader.lock().await;
        self.sync_locked(l2).await
    }

    /// [`Self::sync`], with the reader lock held.
    async fn sync_locked(&self, l2: &L2) -> bool {
        // a complete read covers every record appended before it began
        let began = millis(SystemTime::now());
        let generation = l2.generation();
        let Some(state) = l2.control_state().await else {
            return false;
        };
        self.top_generation
            .fetch_max(state.generation.max(generation), Ordering::AcqRel);
        if state.lacking == 0 && state.complete {
            // every server that answered holds the epoch: any reset in progress is done
            *self.reset_bump.lock() = None;
        }
        if state.lacking > 0 {
            // some servers lost the log (restarted empty, flushed), or hold another epoch or
            // an unreadable one. A purge is acknowledged once a write quorum took it: as many
            // lost, and one may be gone for good
            if state.lacking >= l2.write_quorum() || !l2.can_put_back() {
                let known = *self.epoch.lock();
                let Some(now) = self
                    .new_epoch(l2, state.epoch.or(known), state.epoch, state.log_seq)
                    .await
                else {
                    return false;
                };
                self.resync(
                    now,
                    state.log_seq,
                    "memcached servers lost it (restarted or flushed)",
                );
                return false;
            }
            if state.epoch.is_some() {
                if !state.complete {
                    // a server that kept the epoch is down as well: what the lacking ones
                    // lost may be on it alone. Nothing is put back until it answers (fenced
                    // meanwhile)
                    return false;
                }
                // every record is still on a server that kept it, and those answered: put the
                // log back, and follow it on this read (complete: the servers that hold the
                // epoch are a read quorum, which overlaps every purge's write quorum)
                l2.restore_log(&state).await;
            }
            // no readable epoch anywhere, and a few servers hold an unreadable value: as with
            // none (`follow`); once an epoch is added, they are lacking it and set over
        }
        if !state.complete {
            // a record may be on the servers that did not answer only: not confirmed, and
            // nothing decided on a minority of the servers (no reset)
            return false;
        }
        let first = !self.synced.load(Ordering::Acquire);
        let upstream = if state.generation != generation && !first {
            // what the move was for, if an upstream generation change (crate::generation)
            l2.upstream_generation().await.pop()
        } else {
            None
        };
        // a move seen with a new epoch is a reset's bump (`new_epoch`): `follow` drops L1 and
        // says why, once
        let reset_ahead = {
            let known = *self.epoch.lock();
            known.is_some() && state.epoch != known
        };
        if reset_ahead && state.generation != generation {
            if !l2.adopt_generation_from(generation, state.generation) {
                return false;
            }
            // (an upstream generation read now is not adopted: the servers that kept the
            // current one may be those the reset lost, and an older one would be taken back;
            // a change seen later in a response moves the namespace once more)
        } else if !self.adopt_generation(l2, generation, state.generation, first, upstream) {
            // this corral moved it meanwhile (a purge-all of its own): read again next time
            return false;
        }
        if !self.follow(l2, state.epoch, state.log_seq).await {
            return false;
        }
        if first {
            self.synced.store(true, Ordering::Release);
            if self.l1.stats().entries > 0 || self.l1.fills_in_progress() > 0 {
                // filled before this corral could read the log (memcached down at start):
                // purges of everything made meanwhile are nowhere in the log
                self.validity.invalidate_all_before(now_stamp());
            }
        }
        self.confirmed_ms.fetch_max(began, Ordering::AcqRel);
        true
    }

    /// [`Self::sync`], unless one that began after `since` has completed meanwhile (so that
    /// the checks of many writes share one read).
    pub async fn sync_since(&self, l2: &L2, since: SystemTime) -> bool {
        let covered = || {
            self.synced.load(Ordering::Acquire) && self.confirmed_ms.load(Ordering::Acquire) > millis(since)
        };
        if covered() {
            return true;
        }
        let _one_reader = self.reader.lock().await;
        // the reader before may have done it
        covered() || self.sync_locked(l2).await
    }

    /// Follow the log to `epoch` / `seq` (under the reader lock): adopt its epoch, resync after
    /// a reset, or apply the new records.
    async fn follow(&self, l2: &L2, epoch: Option<u64>, seq: u64) -> bool {
        let seen = self.seen.load(Ordering::Acquire);
        let known = *self.epoch.lock();
        match (known, epoch) {
            (None, None) if seen == 0 && seq == 0 => {
                // a new namespace: give its log an epoch (room above it for those after)
                *self.epoch.lock() = l2.set_log_epoch(super::random() >> 2, None).await;
                true
            }
            (k, None) => {
                // higher than the epoch this corral knew, as a replace's: a server that was
                // down with the old one then counts as lacking the new one, and is set over
                let Some(now) = self.new_epoch(l2, k, None, seq).await else {
                    return false;
                };
                self.resync(now, seq, "its epoch is gone (memcached restarted or flushed)");
                true
            }
            (Some(k), Some(e)) if k != e => {
                self.resync(Some(e), seq, "its epoch changed (another corral found it reset)");
                true
            }
            (Some(_), Some(e)) if seq < seen => {
                // the counter alone vanished: say so to every corral with a new epoch (the
                // numbers it hands out again may hold old records, which `L2::append_log`
                // does not write over: purges are refused until it passes them)
                let Some(now) = self.new_epoch(l2, Some(e), Some(e), seq).await else {
                    return false;
                };
                self.resync(now, seq, "its sequence number went backwards");
                true
            }
            (_, Some(e)) => {
                *self.epoch.lock() = Some(e);
                seq <= seen || self.apply(l2, seen, seq).await
            }
        }
    }

    /// A new epoch for a log found reset, above `known` (the epoch before, if any; without
    /// one, in the upper half, above a new namespace's), written over every lower one. The
    /// namespace's generation is bumped first: the reset treats what was validated before as
    /// purged in the corrals running now, and a corral that starts later would otherwise take
    /// the L2 copies from before it, which the records lost with the reset may have purged.
    /// Once per reset: not again while the reset is tried again (the generation is still
    /// the bump's, and the servers still show its epoch or a later one, `shown`: it did not
    /// land everywhere). The corrals follow the log from `seq` on after it, and each server's
    /// counter is raised to it, and its generation to the bump's, before it gets the epoch
    /// ([`L2::set_log_epoch`]). `None`
    /// (nothing written) if the generation could not be bumped.
    async fn new_epoch(
        &self,
        l2: &L2,
        known: Option<u64>,
        shown: Option<u64>,
        seq: u64,
    ) -> Option<Option<u64>> {
        let again = matches!(*self.reset_bump.lock(),
            Some((g, written)) if g == l2.generation() && shown.is_some_and(|e| e >= written));
        // (new namespaces start below 2^62, resets without a known epoch between 2^62 and
        // 2^63: 2^31 resets of room before an epoch could wrap)
        let base = known.unwrap_or((1 << 62) | (super::random() >> 2));
        let next = next_log_epoch(base, super::random());
        if !again {
            // above any generation seen (taken before the bump moves this corral's): servers
            // restarted empty count from 0 again
            let floor = self
                .top_generation
                .load(Ordering::Acquire)
                .max(l2.generation())
                .saturating_add(1);
            let mut g = l2.bump_generation_for_reset().await?;
            if g < floor {
                g = l2.raise_generation(floor).await?;
            }
            self.top_generation.fetch_max(g, Ordering::AcqRel);
            // (a retry writes above `next`, which stays the lowest this reset wrote)
            *self.reset_bump.lock() = Some((g, next));
        }
        Some(l2.set_log_epoch(next, Some((seq, l2.generation()))).await)
    }

    /// Purges were missed and cannot be told apart: everything validated before now counts as
    /// purged, and L1 is emptied, loudly ([`crate::events::dropped`], `purge-log-gap`).
    fn drop_l1(&self, detail: &str) {
        self.validity.invalidate_all_before(now_stamp());
        let dropped = self.l1.stats().entries;
        self.l1.clear();
        crate::events::dropped("purge-log-gap", None, None, dropped, detail);
    }

    /// memcached's purge log was reset: records may have been lost, and nobody can tell
    /// which. Treat everything validated before now as purged (L1 and what L2 still holds
    /// are fetched anew, once each) and follow the log from `seq` on.
    fn resync(&self, epoch: Option<u64>, seq: u64, why: &str) {
        self.validity.invalidate_all_before(now_stamp());
        let dropped = self.l1.stats().entries;
        self.l1.clear();
        *self.epoch.lock() = epoch;
        self.seen.store(seq, Ordering::Release);
        metrics::PURGE_LOG_RESETS.inc();
        let detail = format!("memcached's purge log was reset ({why}) at {seq}: purges may have been lost, every copy validated before now is treated as purged");
        crate::events::dropped("purge-log-reset", None, None, dropped, &detail);
    }

    /// Apply records `seen + 1 ..= seq`, read [`LOG_BATCH`] at a time; false if they could
    /// not be read. Records that cannot be read one by one (more than [`MAX_RECORDS`], a
    /// corral that starts on a long log, one gone) come from the newest checkpoint when it
    /// covers them, and are covered by a floor otherwise.
    async fn apply(&self, l2: &L2, seen: u64, seq: u64) -> bool {
        let mut from = seen + 1;
        // a corral that starts on a long log (nothing of its own to cover), or one too far
        // behind to read the records one by one
        let fresh = seen == 0 && self.l1.stats().entries == 0 && self.l1.fills_in_progress() == 0;
        let mut checkpoint_missed = false;
        if (fresh && seq > CHECKPOINT_EVERY) || seq - seen > MAX_RECORDS as u64 {
            match self.catch_up_from_checkpoint(l2, seen + 1, seq).await {
                Some(upto) => from = upto + 1,
                None => checkpoint_missed = true,
            }
        }
        if seq + 1 - from > MAX_RECORDS as u64 {
            // too many to read one by one: the floor covers every one of them
            self.drop_l1(&format!(
                "{} purge log records to catch up on, more than {MAX_RECORDS} and no checkpoint covers them",
                seq + 1 - from
            ));
            self.seen.store(seq, Ordering::Release);
            return true;
        }
        while from <= seq {
            let to = seq.min(from + LOG_BATCH - 1);
            let Some(records) = l2.log_records(from, to).await else {
                return false;
            };
            let mut next = to + 1;
            for (n, found) in (from..=to).zip(records) {
                // every distinct record the servers hold under `n` (two purges handed one
                // number may each have been kept by some servers: `L2::append_log`)
                for record in &found {
                    match LogRecord::decode_with_origin(record) {
                        // applied when this corral accepted it
                        Some((_, _, origin)) if origin == super::corral_id() => {}
                        // another corral's clock: compared with a margin where clocks differ;
                        // a record dated further ahead than that (planted in memcached, or a
                        // clock far off) counts from now + the margin, not from its date
                        Some((purge, at, origin)) => {
                            let latest = now_stamp() + self.skew;
                            if at > latest {
                                metrics::PURGE_RECORDS_AHEAD.inc();
                            }
                            self.validity.record_by(&purge, at.min(latest), origin)
                        }
                        // undecodable: cover it
                        None => self.validity.invalidate_all_before(now_stamp()),
                    }
                }
                match found.first() {
                    Some(_) => {}
                    // not there: a purge that took its sequence number may still be writing
                    // it (the counter is bumped first); wait for it a little before taking it
                    // for gone
                    None if !self.given_up_on(n) => {
                        self.seen.store(n - 1, Ordering::Release);
                        return false;
                    }
                    // gone (expired, evicted): a checkpoint past it covers it, or a floor
                    None => {
                        let caught_up = if checkpoint_missed {
                            None
                        } else {
                            self.catch_up_from_checkpoint(l2, n, seq).await
                        };
                        match caught_up {
                            Some(upto) => {
                                next = upto + 1;
                                break;
                            }
                            None => {
                                // read once per catch-up, not once per gone record
                                checkpoint_missed = true;
                                self.drop_l1(&format!(
                                    "purge log record {n} is gone (expired or evicted) and no checkpoint covers it"
                                ));
                            }
                        }
                    }
                }
            }
            self.seen.store(next - 1, Ordering::Release);
            from = next;
        }
        self.checkpoint(l2, seq).await;
        true
    }

    /// Whether record `n`, found missing, has been missing for [`RECORD_WAIT`]: until then it
    /// may be one a purge is still writing, and the read is left incomplete.
    fn given_up_on(&self, n: u64) -> bool {
        let mut missing = self.missing.lock();
        match *missing {
            Some((m, since)) if m == n => {
                if since.elapsed() >= RECORD_WAIT {
                    *missing = None;
                    true
                } else {
                    false
                }
            }
            _ => {
                *missing = Some((n, std::time::Instant::now()));
                false
            }
        }
    }

    /// Adopt the namespace generation read from memcached (`new`; this corral used `before`
    /// when the read began); if it moved, drop L1 (loudly). A purge of everything elsewhere
    /// also covers fills in progress here: everything validated before now counts as purged.
    /// The first one read is adopted quietly (L1 holds nothing of the cluster's yet).
    fn adopt_generation(
        &self,
        l2: &L2,
        before: u64,
        new: u64,
        first: bool,
        upstream: Option<String>,
    ) -> bool {
        if new == before {
            return true;
        }
        // a purge-all of this corral's own may have moved it during the read: keep that
        if !l2.adopt_generation_from(before, new) {
            return false;
        }
        if first {
            return true;
        }
        let expected = self.expected_move.lock().take();
        if expected.is_some_and(|(from, until)| {
            from == before && new == before + 1 && std::time::Instant::now() < until
        }) {
            // the move this corral's own upstream generation change made (here or at another
            // corral that saw it too): L1 was dropped for it already, and is not dropped
            // again, loudly. But it may be another corral's purge of everything, made in the
            // same seconds, which the two cannot be told apart from: what was validated
            // since counts as purged (a floor, quietly; the entries fetched since the drop,
            // seconds ago, are fetched again)
            self.validity.invalidate_all_before(now_stamp());
            return true;
        }
        let old = before;
        self.validity.invalidate_all_before(now_stamp());
        let dropped = self.l1.stats().entries;
        self.l1.clear();
        if new < old {
            // the counter never expires: it vanished with memcached's contents (a restart, a
            // flush) or was evicted. What it stood for may come back under reused keys
            metrics::PURGE_LOG_RESETS.inc();
            let detail = format!("memcached namespace generation went backwards ({old} -> {new}: memcached restarted or flushed); every copy validated before now is treated as purged");
            crate::events::dropped("namespace-generation", None, None, dropped, &detail);
            return true;
        }
        let generations = crate::generation::get();
        let known = generations.and_then(|g| g.current());
        match upstream.filter(|u| known.as_ref() != Some(u)) {
            Some(u) => {
                // another corral saw a new upstream generation and moved the namespace for it
                if let Some(g) = generations {
                    g.adopt(&u);
                }
                let detail = format!("another corral saw the upstream's generation change to {u:?} and moved memcached's namespace ({old} -> {new})");
                crate::events::dropped(
                    "namespace-generation",
                    known.as_deref(),
                    Some(&u),
                    dropped,
                    &detail,
                );
            }
            None => {
                let detail =
                    format!("memcached namespace generation changed ({old} -> {new}): a purge of everything");
                crate::events::dropped("namespace-generation", None, None, dropped, &detail);
            }
        }
        true
    }
}
