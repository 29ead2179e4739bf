//! Purge transports: how a purge accepted by one corral reaches the other corrals of the site
//! directly, beside memcached's purge log.
//!
//! # The message
//! A purge on the wire is one [`Message`]: versioned, self-describing JSON carrying the
//! origin corral's id ([`crate::purge::corral_id`], random per process), a sequence number
//! per origin (from 1, no holes: the receiver notices what it missed), the time the origin
//! accepted the purge (its clock), and the purge itself. Peers (HTTP) send them in an
//! [`Envelope`] that says which sequence numbers it accounts for, so that coalesced messages
//! are not gaps.
//!
//! # The interface
//! [`Transport`] is what a message-queue library would define: `publish` hands a message over
//! (never blocking; delivery is asynchronous and ordered per destination) and returns one
//! [`Receipt`] per destination, which `?wait=peers` awaits; the receiving side hands what
//! arrives to the [`Inbox`]. [`peers::Peers`] (HTTP to each peer, with back-off and a
//! coalescing backlog) is the first implementation; a broker can be the next.
//!
//! # Applying what arrives ([`Inbox::receive`])
//! - through [`CacheParts::apply_remote`]: the same records and L1 changes as a local purge,
//!   without memcached's side (the origin logged it and deleted from L2 already);
//! - never forwarded (only purges accepted from clients are published): no loops, no storms;
//! - once per (origin, sequence number), whichever way it arrives; the same purge read back
//!   from memcached's log is idempotent (same record, same time);
//! - a sequence number that jumps (a message lost, a backlog the sender could not keep)
//!   makes everything validated before it count as purged (a floor): missed purges cost a
//!   refetch, never a stale copy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::cache::CacheParts;
use crate::metrics;
use crate::purge::{self, LogWhat, Purge};

pub mod backlog;
pub mod bus;
pub mod peers;

/// The version of [`Message`] and [`Envelope`] this corral writes and reads.
pub const VERSION: u32 = 1;

/// Origins remembered for deduplication (each start of a corral is a new origin).
const MAX_ORIGINS: usize = 4096;

/// One purge (or "drop your cache") on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub v: u32,
    /// The corral that accepted the purge.
    pub origin: u64,
    /// Per origin, from 1, without holes.
    pub seq: u64,
    /// When the origin accepted it (ms since the epoch, its clock).
    pub at_ms: u64,
    pub body: Body,
    /// The origin's host name and port (stable across its restarts, unlike `origin`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The epoch of the purge log the origin wrote the purge to ([`crate::purge`]), if it
    /// has memcached: a receiver of another log (another site's memcached) writes the purge
    /// to its own ([`crate::cache::CacheParts::relay_remote`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Body {
    Purge {
        soft: bool,
        target: LogWhat,
    },
    /// The sender could not keep this corral's backlog: it empties its L1.
    DropCache {
        reason: String,
    },
    /// The sender saw the upstream's generation change ([`crate::generation`]): the receiver
    /// drops its L1 unless it already holds `new` as current.
    Generation {
        old: String,
        new: String,
    },
}

impl Message {
    /// About how many bytes it takes in an envelope (its target's text, and the rest).
    pub fn wire_size(&self) -> usize {
        let target = match &self.body {
            Body::Purge { target, .. } => match target {
                LogWhat::Ban(b) => [&b.host, &b.url, &b.content_type]
                    .into_iter()
                    .flatten()
                    .map(|p| p.as_str().len())
                    .sum(),
                LogWhat::Tags { tags } => tags.iter().map(|t| t.len() + 3).sum(),
                LogWhat::TagPattern { header, pattern } => header.len() + pattern.len(),
                LogWhat::TagPatterns { patterns } => {
                    patterns.iter().map(|(h, p)| h.len() + p.len() + 8).sum()
                }
                LogWhat::Url { host, path } => host.len() + path.len(),
                LogWhat::All => 0,
            },
            Body::DropCache { reason } => reason.len(),
            Body::Generation { old, new } => old.len() + new.len(),
        };
        // JSON escapes at most double a pattern's bytes (backslashes)
        2 * target + 160
    }

    pub fn new(origin: u64, seq: u64, body: Body) -> Self {
        Message {
            v: VERSION,
            origin,
            seq,
            at_ms: purge::millis(purge::now_stamp()),
            body,
            node: String::new(),
            log: None,
        }
    }
}

/// Messages of one origin, in order, as a peer sends them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub origin: u64,
    /// The sender's host name and port: stable across its restarts, unlike `origin`.
    #[serde(default)]
    pub node: String,
    /// The origin's sequence numbers this envelope accounts for, first and last (messages in
    /// the range that are not in it were coalesced into later ones).
    pub covers: (u64, u64),
    pub messages: Vec<Arc<Message>>,
}

/// How a delivery to one destination ended, for `?wait=peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Outcome {
    Delivered,
    Failed(String),
    /// The destination is failed and not retried before its delay is over.
    BackingOff {
        failed_ms_ago: u64,
        retry_in_ms: u64,
    },
    TimedOut,
}

impl From<Outcome> for String {
    fn from(o: Outcome) -> String {
        match o {
            Outcome::Delivered => "delivered".into(),
            Outcome::Failed(why) => format!("failed: {why}"),
            Outcome::BackingOff {
                failed_ms_ago,
                retry_in_ms,
            } => format!("backing off: failed {failed_ms_ago} ms ago, retry in {retry_in_ms} ms"),
            Outcome::TimedOut => "timeout".into(),
        }
    }
}

/// The delivery of one message to one destination.
pub struct Receipt {
    pub to: String,
    pub outcome: BoxFuture<'static, Outcome>,
    /// A purge is acknowledged only once this delivery is (the broker's confirm); peers'
    /// deliveries are awaited only with `?wait=peers`.
    pub required: bool,
}

/// A way to carry purges to the other corrals.
pub trait Transport: Send + Sync {
    /// `peers`, `bus`.
    fn name(&self) -> &'static str;
    /// Hand `msg` over for delivery, in publication order per destination. Never blocks.
    fn publish(&self, msg: Arc<Message>) -> Vec<Receipt>;
    /// Start delivering (and, for a transport that pulls, receiving into `inbox`).
    fn start(&'static self, inbox: &'static Inbox);
    /// What `GET /peers` (or the transport's own admin page) shows.
    fn status(&self) -> serde_json::Value;
}

/// What [`Inbox::receive`] did with an envelope.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Received {
    pub corral: u64,
    pub applied: usize,
    pub duplicates: usize,
    pub gap: bool,
    /// Purges applied here that the sender may have written to another purge log than this
    /// corral's (another site's memcached): for the receiver to write to its own unless the
    /// logs are one ([`Inbox::relay`]). Filled only when the sender may not share this
    /// corral's memcached (the bus) and this corral has memcached.
    #[serde(skip)]
    pub relay: Vec<Relay>,
}

/// A purge to write to this corral's memcached ([`Received::relay`]).
#[derive(Debug, Clone)]
pub struct Relay {
    pub purge: Purge,
    pub at: SystemTime,
    pub origin: u64,
    pub seq: u64,
    /// The epoch of the sender's purge log ([`Message::log`]).
    pub log: Option<u64>,
}

/// One message of one origin: (origin, sequence number) name it.
impl PartialEq for Relay {
    fn eq(&self, other: &Self) -> bool {
        (self.origin, self.seq) == (other.origin, other.seq)
    }
}

impl Eq for Relay {}

/// The receiving side: deduplicates by (origin, sequence number), notices gaps, applies.
pub struct Inbox {
    parts: &'static CacheParts,
    /// `purge.clock_skew`: an accept time further ahead of this corral's clock is capped.
    skew: Duration,
    /// Origin → (last sequence number accounted for, when last heard of).
    origins: parking_lot::Mutex<HashMap<u64, (u64, Instant)>>,
    /// Sender node (host name and port) → its origin id: a new id for a known node is a
    /// corral that restarted, and whatever it had not delivered is lost.
    nodes: parking_lot::Mutex<HashMap<String, u64>>,
}

/// What is to be done with one message of an envelope, worked out before the inbox is locked
/// (patterns compiled, times capped).
enum Prepared {
    Purge(Purge, SystemTime),
    Drop(String),
    Generation(String, String),
    /// It cannot be applied here (a newer version, a pattern that does not compile): covered
    /// by treating everything validated before as purged.
    Cover(&'static str),
}

impl Inbox {
    pub fn new(parts: &'static CacheParts, skew: Duration) -> Self {
        Inbox {
            parts,
            skew,
            origins: parking_lot::Mutex::new(HashMap::new()),
            nodes: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Write a purge from another purge log to this corral's memcached ([`Received::relay`]):
    /// unless the sender named this corral's log (its epoch, read from memcached if this
    /// corral has not read it yet). A sender that named none (no memcached, an older corral,
    /// or one that had not read its log yet) is written again: a second record of one purge
    /// costs a read, a missing one a stale copy.
    pub async fn relay(&self, r: &Relay) {
        let Some(l2) = &self.parts.storage.l2 else {
            return;
        };
        if r.log.is_some() {
            let ours = match self.parts.storage.log.epoch() {
                Some(e) => Some(e),
                None => l2.control_state().await.and_then(|s| s.epoch),
            };
            if ours == r.log {
                return;
            }
        }
        self.parts.relay_remote(&r.purge, r.at, r.origin, r.seq).await;
    }

    /// Start following memcached's purge log now, not at the first lookup: a corral on the
    /// bus names its log in what it publishes ([`Message::log`]).
    pub fn follow_log(&self) {
        self.parts.storage.follow_log();
    }

    /// A message arrived that cannot be read: what it purged is unknown, so everything
    /// validated before counts as purged.
    pub fn unreadable(&self, why: &str) {
        self.parts.drop_cache("peer-message-unreadable", why);
    }

    /// Check an envelope: its messages are the origin's, in increasing order, and `covers`
    /// ends with the last of them (so a range can never swallow messages it does not carry).
    pub fn check(env: &Envelope) -> Result<(), String> {
        let (Some(first), Some(last)) = (env.messages.first(), env.messages.last()) else {
            return Err("no messages".into());
        };
        if env.messages.iter().any(|m| m.origin != env.origin) {
            return Err("a message of another origin".into());
        }
        if env.messages.windows(2).any(|w| w[0].seq >= w[1].seq) {
            return Err("messages out of order".into());
        }
        if env.covers.0 > first.seq || env.covers.1 != last.seq || env.covers.0 == 0 {
            return Err(format!(
                "covers [{}, {}] does not end with its last message ({}) or starts after its first ({})",
                env.covers.0, env.covers.1, last.seq, first.seq
            ));
        }
        Ok(())
    }

    fn prepare(&self, msg: &Message) -> Prepared {
        if msg.v != VERSION {
            return Prepared::Cover("a message of a newer version");
        }
        match &msg.body {
            Body::Purge { soft, target } => match target.clone().into_target() {
                Some(target) => {
                    // an accept time ahead of this clock by more than the skew would keep
                    // copies validated until then invalid: capped
                    let latest = purge::now_stamp() + self.skew;
                    let at = purge::from_millis(msg.at_ms).min(latest);
                    Prepared::Purge(Purge { target, soft: *soft }, at)
                }
                None => Prepared::Cover("a pattern this corral cannot compile"),
            },
            Body::DropCache { reason } => Prepared::Drop(line(reason)),
            Body::Generation { old, new } => match crate::generation::value_of(new.as_bytes()) {
                Some(new) if new == new.trim() => Prepared::Generation(line(old), new.to_string()),
                _ => Prepared::Cover("a generation that is not one"),
            },
        }
    }

    /// Apply an envelope's messages that were not applied before, in order. The envelope must
    /// have passed [`Self::check`].
    pub fn receive(&self, env: &Envelope) -> Received {
        self.receive_from(env, true)
    }

    /// [`Self::receive`]; `shared_log`: the sender shares this corral's memcached (if any), so
    /// what a restarted sender lost is in its purge log (peers within a site: yes; a bus that
    /// may join sites: no).
    pub fn receive_from(&self, env: &Envelope, shared_log: bool) -> Received {
        let me = purge::corral_id();
        let mut got = Received {
            corral: me,
            ..Received::default()
        };
        if env.origin == me {
            // this corral's own purge, sent back to it by a peer list that names it twice
            metrics::PEER_RECEIVED
                .with_label_values(&["own"])
                .inc_by(env.messages.len() as u64);
            return got;
        }
        // a sender that may not share this corral's memcached: what it purged may have to be
        // written to this corral's purge log too ([`Self::relay`] decides)
        let relays = !shared_log && self.parts.storage.l2.is_some();
        let prepared: Vec<(u64, Option<u64>, Prepared)> = env
            .messages
            .iter()
            .map(|m| (m.seq, m.log, self.prepare(m)))
            .collect();
        // one envelope at a time: the order of an origin's messages is kept across transports
        let mut origins = self.origins.lock();
        let last = origins.get(&env.origin).map(|(last, _)| *last);
        match last {
            Some(last) if env.covers.0 > last.saturating_add(1) => {
                got.gap = true;
                metrics::PEER_GAPS.inc();
                let detail = format!(
                    "purge messages {}..{} from corral {} never arrived (lost, or a backlog it could not keep)",
                    last.saturating_add(1),
                    env.covers.0 - 1,
                    env.origin
                );
                self.parts.drop_cache("peer-gap", &detail);
            }
            Some(_) => {}
            None => self.new_origin(env, shared_log),
        }
        let mut upto = last.unwrap_or(0);
        for (seq, log, what) in prepared {
            if seq <= upto {
                got.duplicates += 1;
                continue;
            }
            upto = seq;
            got.applied += 1;
            match what {
                Prepared::Purge(purge, at) => {
                    let n = self.parts.apply_remote(&purge, at, env.origin);
                    crate::events::purge_applied(&purge, n, "remote");
                    tracing::debug!(kind = purge.kind(), target = %purge.target_text(), origin = env.origin, seq, purged = n, "purge from a peer applied");
                    if relays {
                        got.relay.push(Relay {
                            purge,
                            at,
                            origin: env.origin,
                            seq,
                            log,
                        });
                    }
                }
                Prepared::Drop(reason) => self.parts.drop_cache("peer-backlog-overflow", &reason),
                Prepared::Generation(old, new) => {
                    let known = crate::generation::get().and_then(|g| g.current());
                    // a change from what this corral holds (or it holds none): an old message
                    // replayed from a queue (g1 -> g2 to a corral at g3) is not a step back
                    if known.as_deref() != Some(new.as_str()) && known.as_ref().is_none_or(|k| *k == old) {
                        if let Some(g) = crate::generation::get() {
                            g.adopt(&new);
                        }
                        if let Some(l2) = &self.parts.storage.l2 {
                            // the sender moves memcached's namespace for it: not a second drop
                            self.parts.storage.log.expect_move(l2.generation());
                        }
                        let detail = format!(
                            "corral {} saw the upstream's generation change from {old:?} to {new:?}",
                            env.origin
                        );
                        self.parts.drop_cache_at(
                            "peer-generation",
                            Some(&old),
                            Some(&new),
                            purge::now_stamp(),
                            &detail,
                        );
                    }
                }
                Prepared::Cover(why) => {
                    let detail = format!("{why} from corral {}", env.origin);
                    self.parts.drop_cache("peer-message-unreadable", &detail);
                }
            }
        }
        if origins.len() >= MAX_ORIGINS && !origins.contains_key(&env.origin) {
            // forget the origin heard of longest ago (a corral long gone)
            if let Some(oldest) = origins.iter().min_by_key(|(_, (_, at))| *at).map(|(o, _)| *o) {
                origins.remove(&oldest);
            }
        }
        origins.insert(env.origin, (upto, Instant::now()));
        drop(origins);
        metrics::PEER_RECEIVED
            .with_label_values(&["applied"])
            .inc_by(got.applied as u64);
        metrics::PEER_RECEIVED
            .with_label_values(&["duplicate"])
            .inc_by(got.duplicates as u64);
        got
    }

    /// The first envelope of an origin (under the origins lock). If its node was heard of
    /// under another id, that corral restarted: purges it accepted and had not delivered were
    /// lost with it. Without memcached, nothing else carries them: everything validated
    /// before counts as purged. With memcached, its purge log has them.
    fn new_origin(&self, env: &Envelope, shared_log: bool) {
        if env.node.is_empty() {
            return;
        }
        let mut nodes = self.nodes.lock();
        let before = nodes.insert(env.node.clone(), env.origin);
        if nodes.len() > MAX_ORIGINS {
            nodes.clear();
        }
        drop(nodes);
        match before {
            Some(old) if old != env.origin && (self.parts.storage.l2.is_none() || !shared_log) => {
                let detail = format!(
                    "peer {} restarted (corral {old} is now {}): purges it had not delivered are lost",
                    env.node, env.origin
                );
                self.parts.drop_cache("peer-restart", &detail);
            }
            Some(old) if old != env.origin => {
                tracing::info!(node = %env.node, old, new = env.origin, "peer restarted: purges it had not delivered are in memcached's purge log");
            }
            _ => {}
        }
    }
}

/// A peer's text, logged at ERROR: one line, bounded.
fn line(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// This machine's name (for [`Envelope::node`]); `localhost` if it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The background service that runs the transports' tasks.
pub struct Starter(pub &'static Cluster);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Starter {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        self.0.start();
        let _ = shutdown.changed().await;
    }
}

/// Every accepted purge goes through here: applied locally, then published on every transport.
pub struct Cluster {
    pub parts: &'static CacheParts,
    pub inbox: &'static Inbox,
    transports: Vec<&'static dyn Transport>,
    /// The HTTP peers transport (one of `transports`, with or without peers: a config reload
    /// may add some).
    peers: &'static peers::Peers,
    /// This origin's last sequence number, and the lock that keeps publication in its order.
    seq: parking_lot::Mutex<u64>,
    /// The longest `?wait=peers` waits.
    pub wait_limit: Duration,
    /// How long a purge waits for the deliveries it needs (the broker's confirm).
    confirm_limit: Duration,
    /// This corral's host name and port ([`Message::node`]).
    node: String,
    published: AtomicU64,
}

/// A purge applied here and handed to the transports.
pub struct Accepted {
    /// L1 entries removed or marked stale here.
    pub purged: usize,
    /// Whether memcached took it (or there is none).
    pub l2_ok: bool,
    /// Whether every delivery a purge needs before it is acknowledged (the broker's confirm)
    /// came, within its timeout; true when there is none.
    pub confirmed: bool,
    /// The other deliveries, for `?wait=peers`.
    pub receipts: Vec<Receipt>,
}

impl Cluster {
    /// The cluster of `cfg` (its peers, if any), started.
    pub fn leak(parts: &'static CacheParts, cfg: &crate::config::Config) -> &'static Cluster {
        let inbox: &'static Inbox = Box::leak(Box::new(Inbox::new(parts, cfg.purge.clock_skew)));
        let mut transports: Vec<&'static dyn Transport> = Vec::new();
        let node = format!("{}:{}", host_name(), cfg.server.listen.port());
        // always there, so that a reload can add peers; without any it publishes nothing
        let p: &'static peers::Peers = Box::leak(Box::new(peers::Peers::new(&cfg.peers, node.clone())));
        transports.push(p);
        if let Some(bus) = &cfg.bus {
            let namespace = cfg.memcached.as_ref().map_or("corral", |m| m.namespace.as_str());
            let b: &'static bus::Bus = Box::leak(Box::new(bus::Bus::new(bus, namespace, &node)));
            transports.push(b);
        }
        Box::leak(Box::new(Cluster {
            parts,
            inbox,
            transports,
            peers: p,
            seq: parking_lot::Mutex::new(0),
            wait_limit: cfg.peers.timeout,
            confirm_limit: cfg.bus.as_ref().map_or(Duration::ZERO, |b| b.confirm_timeout),
            node,
            published: AtomicU64::new(0),
        }))
    }

    /// Start the transports (on the runtime of the caller: a background service's).
    pub fn start(&'static self) {
        for t in &self.transports {
            t.start(self.inbox);
        }
    }

    /// Apply `purge` here and hand it to every transport.
    pub async fn accept(&self, purge: &Purge) -> Accepted {
        let (purged, l2_ok, at) = self.parts.apply(purge).await;
        crate::events::purge_applied(purge, purged, "local");
        let all = self.publish(
            Body::Purge {
                soft: purge.soft,
                target: LogWhat::of(&purge.target),
            },
            at,
        );
        let (required, receipts): (Vec<Receipt>, Vec<Receipt>) = all.into_iter().partition(|r| r.required);
        let mut confirmed = true;
        if !required.is_empty() {
            let limit = self.confirm_limit;
            let outcomes = futures::future::join_all(
                required
                    .into_iter()
                    .map(|r| tokio::time::timeout(limit, r.outcome)),
            )
            .await;
            confirmed = outcomes.iter().all(|o| matches!(o, Ok(Outcome::Delivered)));
        }
        Accepted {
            purged,
            l2_ok,
            confirmed,
            receipts,
        }
    }

    /// Tell the other corrals that the upstream's generation changed (they drop their L1).
    pub fn publish_generation(&self, old: &str, new: &str) {
        self.publish(
            Body::Generation {
                old: old.to_string(),
                new: new.to_string(),
            },
            purge::now_stamp(),
        );
    }

    /// A config reload changed `[peers] urls` or `token` ([`peers::Peers::reconfigure`]).
    pub fn reconfigure_peers(&'static self, cfg: &crate::config::PeersConfig) {
        self.peers.reconfigure(cfg);
    }

    fn publish(&self, body: Body, at: SystemTime) -> Vec<Receipt> {
        if self.alone() {
            // nobody to tell (yet)
            return Vec::new();
        }
        // numbered and queued under one lock: every destination gets them in order
        let mut seq = self.seq.lock();
        *seq += 1;
        let mut msg = Message::new(purge::corral_id(), *seq, body);
        msg.at_ms = purge::millis(at);
        msg.node = self.node.clone();
        msg.log = self
            .parts
            .storage
            .l2
            .as_ref()
            .and_then(|_| self.parts.storage.log.epoch());
        let msg = Arc::new(msg);
        let receipts = self
            .transports
            .iter()
            .flat_map(|t| t.publish(msg.clone()))
            .collect();
        drop(seq);
        self.published.fetch_add(1, Ordering::Relaxed);
        receipts
    }

    /// Await `receipts` (`?wait=peers`), at most [`Self::wait_limit`]: each destination's
    /// outcome, the worst of its receipts (a batch is delivered when all of it is).
    pub async fn outcomes(&self, receipts: Vec<Receipt>) -> std::collections::BTreeMap<String, Outcome> {
        let limit = self.wait_limit;
        let waits = receipts.into_iter().map(|r| async move {
            let outcome = tokio::time::timeout(limit, r.outcome)
                .await
                .unwrap_or(Outcome::TimedOut);
            (r.to, outcome)
        });
        let mut worst: std::collections::BTreeMap<String, Outcome> = Default::default();
        for (to, outcome) in futures::future::join_all(waits).await {
            let e = worst.entry(to).or_insert(Outcome::Delivered);
            if *e == Outcome::Delivered {
                *e = outcome;
            }
        }
        worst
    }

    /// Whether any transport is configured.
    pub fn has_transports(&self) -> bool {
        !self.transports.is_empty()
    }

    /// No peer and no bus: purges stay in this corral.
    pub fn alone(&self) -> bool {
        self.transports.len() == 1 && self.peers.is_empty()
    }

    /// `GET /bus`: the message bus's state; `None` without `[bus]`.
    pub fn bus_status(&self) -> Option<serde_json::Value> {
        self.transports
            .iter()
            .find(|t| t.name() == "bus")
            .map(|t| t.status())
    }

    /// `GET /peers`.
    pub fn status(&self) -> serde_json::Value {
        let peers = self
            .transports
            .iter()
            .find(|t| t.name() == "peers")
            .and_then(|t| t.status().get("peers").cloned())
            .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
        serde_json::json!({
            "corral": purge::corral_id(),
            "published": self.published.load(Ordering::Relaxed),
            "peers": peers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn url_msg(origin: u64, seq: u64, path: &str) -> Arc<Message> {
        Arc::new(Message::new(
            origin,
            seq,
            Body::Purge {
                soft: false,
                target: LogWhat::Url {
                    host: "h".into(),
                    path: path.into(),
                },
            },
        ))
    }

    fn env(origin: u64, covers: (u64, u64), messages: Vec<Arc<Message>>) -> Envelope {
        let env = Envelope {
            v: VERSION,
            origin,
            node: String::new(),
            covers,
            messages,
        };
        Inbox::check(&env).expect("a valid envelope");
        env
    }

    fn inbox() -> Inbox {
        Inbox::new(
            CacheParts::leak(&Config::embedded_default(), None),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn a_message_is_applied_once_per_origin_and_sequence_number() {
        let inbox = inbox();
        let first = inbox.receive(&env(9, (1, 2), vec![url_msg(9, 1, "/a"), url_msg(9, 2, "/b")]));
        assert_eq!((first.applied, first.duplicates, first.gap), (2, 0, false));
        // sent again (the answer was lost), plus one new
        let again = inbox.receive(&env(
            9,
            (1, 3),
            vec![url_msg(9, 1, "/a"), url_msg(9, 2, "/b"), url_msg(9, 3, "/c")],
        ));
        assert_eq!((again.applied, again.duplicates, again.gap), (1, 2, false));
        // another origin counts on its own
        let other = inbox.receive(&env(10, (1, 1), vec![url_msg(10, 1, "/a")]));
        assert_eq!(other.applied, 1);
    }

    #[tokio::test]
    async fn a_jump_in_sequence_numbers_is_a_gap_that_floors_everything_validated_before() {
        let inbox = inbox();
        inbox.receive(&env(9, (1, 1), vec![url_msg(9, 1, "/a")]));
        let floor_before = inbox.parts.validity.floor_ms();
        let got = inbox.receive(&env(9, (5, 5), vec![url_msg(9, 5, "/b")]));
        assert!(got.gap);
        assert_eq!(got.applied, 1);
        assert!(inbox.parts.validity.floor_ms() > floor_before);
        // coalesced messages inside a range are not gaps
        let got = inbox.receive(&env(9, (6, 9), vec![url_msg(9, 9, "/c")]));
        assert!(!got.gap);
        // and a message whose seq fell in a range accounted for is a duplicate
        let got = inbox.receive(&env(9, (8, 8), vec![url_msg(9, 8, "/d")]));
        assert_eq!((got.applied, got.duplicates), (0, 1));
    }

    #[test]
    fn this_corrals_own_messages_are_skipped() {
        let inbox = inbox();
        let me = purge::corral_id();
        let got = inbox.receive(&env(me, (1, 1), vec![url_msg(me, 1, "/a")]));
        assert_eq!(got.applied, 0);
    }

    #[test]
    fn an_envelope_whose_range_could_swallow_messages_is_refused() {
        let raw = |origin, covers, messages| Envelope {
            v: VERSION,
            origin,
            node: String::new(),
            covers,
            messages,
        };
        // a range past its last message would make later messages duplicates
        assert!(Inbox::check(&raw(9, (1, u64::MAX), vec![url_msg(9, 1, "/a")])).is_err());
        assert!(Inbox::check(&raw(9, (2, 1), vec![url_msg(9, 1, "/a")])).is_err());
        assert!(Inbox::check(&raw(9, (0, 1), vec![url_msg(9, 1, "/a")])).is_err());
        assert!(Inbox::check(&raw(9, (1, 1), vec![])).is_err());
        assert!(Inbox::check(&raw(9, (1, 2), vec![url_msg(9, 1, "/a"), url_msg(11, 2, "/b")])).is_err());
        assert!(Inbox::check(&raw(9, (1, 2), vec![url_msg(9, 2, "/a"), url_msg(9, 1, "/b")])).is_err());
        assert!(Inbox::check(&raw(9, (1, 3), vec![url_msg(9, 2, "/a"), url_msg(9, 3, "/b")])).is_ok());
    }

    #[tokio::test]
    async fn an_accept_time_far_ahead_of_this_clock_is_capped() {
        let inbox = inbox();
        let mut m = Message::new(
            9,
            1,
            Body::Purge {
                soft: false,
                target: LogWhat::All,
            },
        );
        m.at_ms = purge::millis(SystemTime::now()) + 3_600_000;
        inbox.receive(&env(9, (1, 1), vec![Arc::new(m)]));
        let floor = inbox.parts.validity.floor_ms();
        assert!(
            floor <= purge::millis(SystemTime::now()) + 1_500,
            "floor an hour ahead: {floor}"
        );
    }

    #[tokio::test]
    async fn a_known_node_under_a_new_id_restarted_and_its_lost_purges_are_covered() {
        let inbox = inbox();
        let with_node = |origin, seq| {
            let mut e = env(origin, (seq, seq), vec![url_msg(origin, seq, "/a")]);
            e.node = "web1:6081".into();
            e
        };
        inbox.receive(&with_node(20, 1));
        let floor = inbox.parts.validity.floor_ms();
        std::thread::sleep(Duration::from_millis(5));
        // the same node, a new process: its first message, seq 1 again
        let got = inbox.receive(&with_node(21, 1));
        assert_eq!(got.applied, 1);
        assert!(
            inbox.parts.validity.floor_ms() > floor,
            "a restart without memcached floors"
        );
    }

    #[test]
    fn the_message_is_versioned_self_describing_json() {
        let m = url_msg(9, 3, "/p?q=1");
        let text = serde_json::to_string(&*m).unwrap();
        assert!(
            text.starts_with("{\"v\":1,\"origin\":9,\"seq\":3,\"at_ms\":"),
            "{text}"
        );
        assert!(text.contains("\"body\":{\"type\":\"purge\",\"soft\":false,\"target\":{\"kind\":\"url\",\"host\":\"h\",\"path\":\"/p?q=1\"}}"), "{text}");
        let back: Message = serde_json::from_str(&text).unwrap();
        assert_eq!(back.seq, 3);
        let all = Message::new(
            9,
            4,
            Body::Purge {
                soft: false,
                target: LogWhat::All,
            },
        );
        assert!(serde_json::to_string(&all)
            .unwrap()
            .contains("{\"kind\":\"all\"}"));
        let drop = Message::new(9, 5, Body::DropCache { reason: "x".into() });
        assert!(serde_json::to_string(&drop)
            .unwrap()
            .contains("\"body\":{\"type\":\"drop-cache\",\"reason\":\"x\"}"));
    }
}
