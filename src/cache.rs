//! The cache as one object: the tiers, the purge records, the eviction manager, Pingora's
//! cache lock and predictor, and the one entry point every purge goes through
//! ([`CacheParts::apply`]). Built once per process and held by the proxy and the admin
//! listener.

use http::header;
use pingora_cache::eviction::EvictionManager;
use pingora_cache::key::CacheHashKey;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::Predictor;
use pingora_http::ResponseHeader;
use std::time::SystemTime;

use crate::config::Config;
use crate::key;
use crate::metrics;
use crate::purge::{self, Purge, Target, Validity};
use crate::storage::eviction::Eviction;
use crate::storage::memcached::{RelayClaim, L2};
use crate::storage::memory::MemoryStorage;
use crate::storage::Tiered;

/// Shards of the LRU (`cache.eviction = "lru"`) and of the predictor.
pub const SHARDS: usize = 16;

/// The cache machinery shared by every request, built once per process (Pingora wants
/// `&'static` for all of it).
pub struct CacheParts {
    pub storage: &'static Tiered,
    /// Bans and tag purges, checked on every hit.
    pub validity: &'static Validity,
    pub eviction: &'static Eviction,
    pub lock: &'static CacheKeyLockImpl,
    pub predictor: &'static Predictor<SHARDS>,
    /// With `purge.acknowledge = "cluster"` and memcached: how long an accepted purge waits
    /// before it is answered ([`Self::acknowledged`]).
    ack_wait: Option<std::time::Duration>,
    /// Log lines of relays that are written once a minute ([`Self::watch_relay`]).
    relay_logs: crate::throttle::Throttle,
}

/// The waits between the tries of a claimed relay ([`CacheParts::relay_remote`]): three
/// tries within about 1.5 s.
const RELAY_RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_millis(1000),
    std::time::Duration::ZERO,
];

/// Relays held by another corral of the site that this one watches at once at most
/// ([`CacheParts::relay_remote`]): one task each, most of them done at their first look.
const MAX_RELAY_WATCHES: usize = 1024;

/// How many relay watches run ([`MAX_RELAY_WATCHES`]).
static RELAY_WATCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One running relay watch, counted in [`RELAY_WATCHES`] until it is dropped (however the
/// watch ends).
struct RelayWatch;

impl RelayWatch {
    fn enter() -> Option<RelayWatch> {
        use std::sync::atomic::Ordering;
        let before = RELAY_WATCHES.fetch_add(1, Ordering::AcqRel);
        if before >= MAX_RELAY_WATCHES {
            RELAY_WATCHES.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RelayWatch)
    }
}

impl Drop for RelayWatch {
    fn drop(&mut self) {
        RELAY_WATCHES.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl CacheParts {
    /// Build and leak the cache parts for `cfg`, with the L2 client if one is configured.
    pub fn leak(cfg: &Config, l2: Option<L2>) -> &'static CacheParts {
        let l1: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new()));
        // sized for entries of ~8 KiB on average
        let eviction: &'static Eviction = Box::leak(Box::new(Eviction::with_max_object(
            cfg.cache.eviction,
            cfg.cache.memory_bytes,
            8192,
            cfg.cache.max_object_bytes,
        )));
        l1.set_eviction(eviction);
        let validity: &'static Validity =
            Box::leak(Box::new(Validity::default().with_skew(cfg.purge.clock_skew)));
        let storage: &'static Tiered = Box::leak(Box::new(Tiered::new(
            l1,
            eviction,
            validity,
            l2,
            cfg.cache.lock_timeout,
            &cfg.purge,
        )));
        purge::set_clock_offset(cfg.purge.clock_offset_ms);
        crate::policy::set_targeted_header(cfg.cache.targeted_header.as_ref().map(|h| h.as_str()));
        // age timeout: a writer that holds the lock this long lets the waiters compete again
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(cfg.cache.lock_timeout));
        let predictor = Box::leak(Box::new(Predictor::<SHARDS>::new(
            cfg.cache.hit_for_miss_keys.div_ceil(SHARDS),
            // a response of an older upstream generation (mid-deploy) says nothing about the
            // URL: it is not remembered as uncacheable (hit-for-miss)
            // ... nor does one that varies on a header a client named in Connection, or one that
            // arrived before a clear
            Some(|reason: &'static str| {
                reason == crate::generation::SUPERSEDED
                    || reason == crate::proxy::STRIPPED_VARY
                    || reason == crate::proxy::CLEARED
            }),
        )));
        Box::leak(Box::new(CacheParts {
            storage,
            validity,
            eviction,
            lock,
            predictor,
            ack_wait: (cfg.purge.acknowledge_cluster && storage.l2.is_some())
                .then(|| cfg.purge.max_unconfirmed + std::time::Duration::from_millis(50)),
            relay_logs: Default::default(),
        }))
    }

    /// Apply a purge to this corral's L1, its validity records, and L2. Returns how many L1
    /// entries it removed or marked stale right away (bans and tag purges act lazily: 0),
    /// whether L2 took it (false: memcached could not be reached, the purge must be retried),
    /// and the time it was accepted at (what other corrals compare their copies with).
    pub async fn apply(&self, purge: &Purge) -> (usize, bool, SystemTime) {
        let at = purge::now_stamp();
        if let Target::All = purge.target {
            let n = self.clear_all(at);
            let l2_ok = match &self.storage.l2 {
                Some(l2) => l2.bump_generation().await.is_some(),
                None => true,
            };
            return (n, l2_ok, at);
        }
        // every other purge is a record, here and (through the purge log) at every corral of
        // the namespace: for a URL it also covers a fill that began before the purge and ends
        // after it, and other corrals' L1 copies
        let n = self.apply_here(purge, at, purge::corral_id());
        let logged = self.log(purge, at).await;
        match (&purge.target, &self.storage.l2) {
            // the L2 copy of a soft-purged URL stays: the record makes it stale for every
            // corral, served stale while one request revalidates.
            // A hard one is deleted after it is logged: a corral whose fill writes to
            // memcached without a lease checks the log after its write, so either it sees
            // this record or this delete comes after its write (see Tiered::write_l2)
            (Target::Url { host, path }, Some(l2)) if !purge.soft => {
                let deleted = l2.delete(&l2.key(&key::for_url(host, path).combined())).await;
                (n, deleted && logged, at)
            }
            _ => (n, logged, at),
        }
    }

    /// Apply a purge another corral (`origin`) accepted at `at` (its clock) and sent this one
    /// directly: what [`Self::apply`] does here, without memcached's side, which the origin
    /// took care of in its own memcached (a corral of another purge log writes it to this
    /// one's too: [`Self::relay_remote`]). Returns how many L1 entries it removed or marked
    /// stale.
    pub fn apply_remote(&self, purge: &Purge, at: SystemTime, origin: u64) -> usize {
        match purge.target {
            // this corral's clock, at least as late as the origin's accept give or take the
            // skew (the caller caps `at`): everything validated before goes
            Target::All => self.clear_all(purge::now_stamp().max(at)),
            _ => self.apply_here(purge, at, origin),
        }
    }

    /// Write a purge that another corral (`origin`, its message `seq`) accepted at `at` and
    /// wrote to another purge log (another site's memcached, or none) to this corral's
    /// memcached, as [`Self::apply`] would have: a record in the log (the copies of this
    /// site's memcached are checked against it by every corral of the site, including one
    /// that starts later), and for a hard URL purge the L2 copy deleted; for a purge of
    /// everything, the namespace's generation bumped. One corral of the site writes it
    /// ([`L2::claim_relay`]); if memcached cannot take it, that is logged and counted
    /// (`corral_purge_relays_total{result="failed"}`): this corral's own records still cover
    /// its L1 and what it reads from L2 while it runs.
    ///
    /// A corral that finds the relay claimed by another and not yet written watches the
    /// claim in a task of its own, not holding up the bus: if the claim lapses unwritten
    /// ([`L2::relay_lease`]: that corral stopped, or could not write it), this one claims it
    /// and writes the purge. Before, the claim was kept a week, and a corral that stopped
    /// between its claim and its write left the purge out of its site's memcached for that
    /// long. Each relay is counted once per corral: `relayed` (written here), `other` (seen
    /// written, or still held by a live claim when the watch ends), `failed`, or `unwatched`
    /// (held, and too many watches run).
    pub async fn relay_remote(&'static self, purge: &Purge, at: SystemTime, origin: u64, seq: u64) {
        let Some(l2) = &self.storage.l2 else {
            return;
        };
        match l2.claim_relay(origin, seq, None).await {
            RelayClaim::Mine { server } => self.write_relay(l2, purge, at, origin, seq, server).await,
            RelayClaim::Written => metrics::PURGE_RELAYS.with_label_values(&["other"]).inc(),
            RelayClaim::Held {
                server,
                holder,
                lease,
            } => self.watch_relay(purge.clone(), at, origin, seq, (server, holder, lease)),
            RelayClaim::Unreachable => self.relay_failed(purge, origin, seq),
        }
    }

    /// Watch a relay another corral claimed ([`Self::relay_remote`]), on the server it holds
    /// the claim on, until it is written, or its claim lapses and this corral writes it.
    /// Looks after 0.1, 0.3, 0.7, 1.5 s, then every second, until the claim's lease and 5 s
    /// have passed since it was first seen (a new claim, another watcher's, starts that over).
    /// Up to [`MAX_RELAY_WATCHES`] at once; beyond, one is not watched (counted `unwatched`,
    /// and logged once a minute).
    fn watch_relay(
        &'static self,
        purge: Purge,
        at: SystemTime,
        origin: u64,
        seq: u64,
        (server, mut holder, lease): (usize, bytes::Bytes, std::time::Duration),
    ) {
        let Some(watch) = RelayWatch::enter() else {
            metrics::PURGE_RELAYS.with_label_values(&["unwatched"]).inc();
            if let Some(left_out) = self
                .relay_logs
                .check("unwatched", std::time::Duration::from_secs(60))
            {
                tracing::warn!(kind = purge.kind(), target = %purge.target_text(), origin, seq, left_out, "too many relays held by other corrals are watched: this one is not, and is not written if the corral that claimed it stops before writing it");
            }
            return;
        };
        tokio::spawn(async move {
            let _watch = watch;
            let Some(l2) = &self.storage.l2 else {
                return;
            };
            let margin = std::time::Duration::from_secs(5);
            let mut until = tokio::time::Instant::now() + lease + margin;
            let mut wait = std::time::Duration::from_millis(100);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
                let seen = l2.claim_relay(origin, seq, Some(server)).await;
                match &seen {
                    RelayClaim::Written => {
                        metrics::PURGE_RELAYS.with_label_values(&["other"]).inc();
                        return;
                    }
                    RelayClaim::Mine { server } => {
                        tracing::warn!(kind = purge.kind(), target = %purge.target_text(), origin, seq, "the corral that claimed the relay of a purge from another purge log let its claim lapse unwritten: this corral writes it");
                        self.write_relay(l2, &purge, at, origin, seq, *server).await;
                        return;
                    }
                    RelayClaim::Held {
                        holder: now_held,
                        lease,
                        ..
                    } if *now_held != holder => {
                        // another claim (a watcher of another corral took it over): its lease
                        holder = now_held.clone();
                        until = tokio::time::Instant::now() + *lease + margin;
                    }
                    RelayClaim::Held { .. } | RelayClaim::Unreachable => {}
                }
                if tokio::time::Instant::now() >= until {
                    match seen {
                        RelayClaim::Unreachable => self.relay_failed(&purge, origin, seq),
                        _ => {
                            metrics::PURGE_RELAYS.with_label_values(&["other"]).inc();
                            tracing::warn!(kind = purge.kind(), target = %purge.target_text(), origin, seq, "a relay of a purge from another purge log is still claimed after its lease: this corral stops watching it");
                        }
                    }
                    return;
                }
            }
        });
    }

    /// Write a relay this corral claimed on the `server`-th server ([`Self::relay_remote`])
    /// and mark it written there; after its tries, the claim is left to lapse (another corral
    /// that watches it then tries).
    async fn write_relay(
        &self,
        l2: &L2,
        purge: &Purge,
        at: SystemTime,
        origin: u64,
        seq: u64,
        server: usize,
    ) {
        // claimed: the others of the site count on this corral, so it tries again before it
        // lets the claim lapse
        for wait in RELAY_RETRIES {
            let done = match &purge.target {
                Target::All => l2.bump_generation().await.is_some(),
                Target::Url { host, path } if !purge.soft => {
                    let logged = self.log(purge, at).await;
                    l2.delete(&l2.key(&key::for_url(host, path).combined())).await && logged
                }
                _ => self.log(purge, at).await,
            };
            if done {
                l2.relay_written(origin, seq, server).await;
                metrics::PURGE_RELAYS.with_label_values(&["relayed"]).inc();
                return;
            }
            tokio::time::sleep(wait).await;
        }
        self.relay_failed(purge, origin, seq);
    }

    fn relay_failed(&self, purge: &Purge, origin: u64, seq: u64) {
        metrics::PURGE_RELAYS.with_label_values(&["failed"]).inc();
        tracing::warn!(kind = purge.kind(), target = %purge.target_text(), origin, seq, "a purge from a corral of another purge log could not be written to this corral's memcached: its copies there may be served again once the corrals that applied it restart");
    }

    /// The part of a purge (but purge-all) that is this corral's alone: the record, and for a
    /// URL its L1 copies removed (hard) or made stale (soft).
    fn apply_here(&self, purge: &Purge, at: SystemTime, by: u64) -> usize {
        self.validity.record_by(purge, at, by);
        let Target::Url { host, path } = &purge.target else {
            return 0;
        };
        let primary = key::for_url(host, path).primary_bin();
        if purge.soft {
            return self.storage.l1.expire_primary(&primary);
        }
        let removed = self.storage.l1.remove_primary(&primary);
        // untracked, not only removed from the manager: a refill committed and admitted
        // since the removal stays tracked (`MemoryStorage::untrack`)
        for compact in &removed {
            self.storage.l1.untrack(compact, self.eviction);
        }
        removed.len()
    }

    /// Everything validated before `at` is invalid, and L1 is emptied: how many entries it held.
    fn clear_all(&self, at: SystemTime) -> usize {
        let n = self.storage.l1.stats().entries;
        self.validity.invalidate_all_before(at);
        self.storage.l1.clear();
        n
    }

    /// Empty L1 because this corral can no longer vouch for it, loudly: everything validated
    /// before now counts as purged (also fills in progress and what L2 holds from before).
    pub fn drop_cache(&self, reason: &'static str, detail: &str) {
        self.drop_cache_at(reason, None, None, purge::now_stamp(), detail);
    }

    /// [`Self::drop_cache`] for a change of generation `old` → `new`, with everything validated
    /// before `floor` counting as purged. Returns how many entries L1 held.
    pub fn drop_cache_at(
        &self,
        reason: &'static str,
        old: Option<&str>,
        new: Option<&str>,
        floor: SystemTime,
        detail: &str,
    ) -> usize {
        let dropped = self.clear_all(floor);
        crate::events::dropped(reason, old, new, dropped, detail);
        dropped
    }

    /// Append `purge` to memcached's purge log, which every corral of the namespace applies to
    /// its L1 and to what it reads from L2. True if it took (or there is no L2).
    async fn log(&self, purge: &Purge, at: std::time::SystemTime) -> bool {
        match (&self.storage.l2, purge::LogRecord::of(purge, at)) {
            (Some(l2), Some(record)) => l2.append_log(&record.encode()).await.is_some(),
            _ => true,
        }
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates its target URI and the URIs in
    /// `Location` / `Content-Location` of the same host. L1 keeps each invalidation for a
    /// while ([`crate::storage::memory::MemoryStorage::invalidate`]: not a purge record, which
    /// clients could not be allowed to make), so that it also covers what was looked up or
    /// sent for before it and arrives after it: a fill the origin composed before the unsafe
    /// request, a copy read from memcached before it, a stale copy that stale-if-error would
    /// fall back on. L2's copy is deleted; another corral's fill from before the request may
    /// write one back, which this corral does not store while it keeps the invalidation.
    /// RFC 9111 asks this of the cache that saw the request only, and the other corrals did
    /// not.
    pub async fn invalidate_after_unsafe(&self, host: &str, path: &str, resp: &ResponseHeader) {
        let mut removed = self.invalidate_url(host, path).await;
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = target.parse::<http::Uri>() else {
                continue;
            };
            let same_host = uri
                .authority()
                .is_none_or(|a| key::normalize_host(a.as_str()) == host);
            if let (true, Some(pq)) = (same_host, uri.path_and_query()) {
                if pq.as_str().starts_with('/') {
                    removed += self.invalidate_url(host, pq.as_str()).await;
                }
            }
        }
        if removed > 0 {
            metrics::INVALIDATIONS.inc_by(removed as u64);
            tracing::debug!(host, path, removed, "invalidated by unsafe method");
        }
    }

    /// One URL of [`Self::invalidate_after_unsafe`]: how many L1 entries it removed. Its
    /// primary entry in L2 is deleted.
    ///
    /// L2 holds Vary variants under keys derived from their variance, which a URL alone does not
    /// give. They need no deletion: a variant is reached only through the URL's primary entry,
    /// and Pingora accepts only variants created after that primary (its `created` is their
    /// tombstone), so once the primary is gone, older variants can never be served again.
    async fn invalidate_url(&self, host: &str, path: &str) -> usize {
        let key = key::for_url(host, path);
        let (removed, recorded) = self.storage.l1.invalidate(key.primary_bin(), purge::now_stamp());
        if !recorded {
            metrics::INVALIDATIONS_UNRECORDED.inc();
        }
        for compact in &removed {
            self.storage.l1.untrack(compact, self.eviction);
        }
        if let Some(l2) = &self.storage.l2 {
            l2.delete(&l2.key(&key.combined())).await;
        }
        removed.len()
    }

    /// Return once a purge applied and logged now may be answered 2xx. At once by default; with
    /// `purge.acknowledge = "cluster"`, after `purge.max_unconfirmed`: by then every corral of
    /// the namespace has either read the record from memcached's log or gone that long without
    /// a complete read, and is fenced (it serves only copies validated since the purge).
    pub async fn acknowledged(&self) {
        if let Some(wait) = self.ack_wait {
            tokio::time::sleep(wait).await;
        }
    }

    /// Refresh the L1 gauges from storage and the eviction manager.
    pub fn publish_gauges(&self) {
        if let Some(l2) = &self.storage.l2 {
            metrics::L2_GENERATION.set(i64::try_from(l2.generation()).unwrap_or(i64::MAX));
            for (server, up) in l2.server_states() {
                metrics::L2_SERVER_UP
                    .with_label_values(&[&server])
                    .set(i64::from(up));
            }
        }
        let stats = self.storage.l1.stats();
        metrics::L1_BYTES.set(stats.bytes as i64);
        metrics::L1_ENTRIES.set(stats.entries as i64);
        metrics::L1_EVICTIONS.set(self.eviction.evicted_items() as i64);
        metrics::L1_ORIGINS.set(crate::storage::memory::numbered_origins() as i64);
        metrics::PURGE_RECORDS.set(self.validity.len() as i64);
        metrics::PURGE_RECORD_BYTES.set(self.validity.heap_bytes() as i64);
        metrics::PURGE_LOG_APPLIED.set(self.storage.log.seen() as i64);
        let fenced = self.storage.log.fence(std::time::SystemTime::now()).is_some();
        metrics::FENCED.set(fenced as i64);
        for (map, n) in [
            ("leases", self.storage.leases.live()),
            ("refreshing", self.storage.refreshing.live()),
            ("gates", self.storage.inflight.len()),
        ] {
            metrics::LOCK_ENTRIES.with_label_values(&[map]).set(n as i64);
        }
    }
}
