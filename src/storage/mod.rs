//! Cache storage tiers behind Pingora's `Storage` trait.
//!
//! - [`memory`]: L1, in-process, bounded by bytes.
//! - [`memcached`]: L2, shared by every corral of a site.
//! - [`record`]: the binary value stored in memcached.
//!
//! [`Tiered`] joins them: a lookup tries L1, then L2 (an L2 hit is promoted into L1 with its
//! remaining lifetime), then reports a miss. A fill writes L1 as the body streams, and L2 once the
//! body is complete, on a spawned task, so the L2 write never delays the client. The L2 expiry is
//! the remaining freshness plus the longer of the serve-stale windows (capped at
//! `memcached.max_ttl`), so grace and stale-if-error also work from L2.
//!
//! On an L1+L2 miss the L2 lookup is a lease read: one corral in the cluster wins the right to
//! fill, the others poll L1 and L2 (10 ms, doubling to 100 ms) until the value appears or
//! `lock_timeout` passes, and then look up as usual. Within one corral, Pingora's cache lock
//! still coalesces the requests of the winner, so N proxies × M clients make one upstream fetch.
//!
//! A stale entry is refreshed once per cluster, too: the revalidation of the first corral
//! takes a refresh lock in memcached; the others take its fresher copy from memcached instead
//! of going upstream, serving stale meanwhile within grace ([`Tiered::refresh_once`], in the
//! background) or making their clients wait for it past grace (`Tiered::revalidate_once`, in
//! the lookup).

pub mod memcached;
pub mod memory;
pub mod record;

use std::any::Any;
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use pingora_cache::eviction::{CacheEntryKey, EvictionManager};
use pingora_cache::key::CacheHashKey;
use pingora_cache::storage::{
    HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType, Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::Result;
use pingora_http::RequestHeader;
use tracing::warn;

use crate::metrics;
use crate::purge::{LogRecord, Validity, Verdict, MAX_RECORDS};
use memcached::{Read, L2};
use memory::{CompleteHit, MemoryStorage, MetaParts};
use std::sync::atomic::{AtomicU64, Ordering};

/// L1 in front of an optional L2.
pub struct Tiered {
    pub l1: &'static MemoryStorage,
    /// L1's eviction manager: promotions from L2 are admitted (and evict) like fills.
    eviction: &'static (dyn EvictionManager + Sync),
    /// Ban and tag records, where records pulled from memcached's purge log go.
    validity: &'static Validity,
    /// The last purge log record applied here.
    log_seen: AtomicU64,
    /// One purge log reader at a time.
    log_lock: tokio::sync::Mutex<()>,
    pub l2: Option<L2>,
    /// How long a lookup waits for another corral's fill (the cross-proxy lock).
    lock_timeout: Duration,
    /// L2 keys whose fill lease this corral won and has not yet filled.
    leases: DashMap<String, ()>,
    /// L2 keys whose refresh lock (see [`Self::refresh_once`]) this corral holds, and since
    /// when: memcached lets the lock go after `lock_timeout` even if a request never gave it
    /// back, and so does this map.
    refreshing: DashMap<String, std::time::Instant>,
    /// One L2 read per key at a time in this corral: concurrent lookups of a key wait here
    /// and then find the result in L1, so memcached sees one read per key, not one per client.
    inflight: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    started: Once,
    /// The sweeper's last pass: records checked up to, and fills in progress then (ms).
    swept: parking_lot::Mutex<(u64, u64)>,
}

/// Who revalidates a stale entry ([`Tiered::refresh_once`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// This corral, holding the cluster's refresh lock (give it back with
    /// [`Tiered::refresh_done`]).
    Mine(String),
    /// Another corral did: its fresher copy is in L1 now.
    Peer,
    /// Another corral holds the lock but no fresher copy came within `lock_timeout`: this
    /// corral goes upstream itself.
    TimedOut,
    /// No memcached, no stale complete entry, or memcached unavailable: Pingora's local
    /// revalidation, as without L2.
    Local,
}

impl Refresh {
    pub fn label(&self) -> &'static str {
        match self {
            Refresh::Mine(_) => "mine",
            Refresh::Peer => "peer",
            Refresh::TimedOut => "timeout",
            Refresh::Local => "local",
        }
    }
}

const REFRESH_SUFFIX: &str = ":refresh";

/// The memcached key of the refresh lock of the memcached key `mk`.
fn refresh_lock_key(mk: &str) -> String {
    format!("{mk}{REFRESH_SUFFIX}")
}

/// Margin for clocks of corrals sharing memcached: an L2 entry is taken to be at most
/// `memcached.max_ttl` plus this old.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

impl Tiered {
    pub fn new(
        l1: &'static MemoryStorage,
        eviction: &'static (dyn EvictionManager + Sync),
        validity: &'static Validity,
        l2: Option<L2>,
        lock_timeout: Duration,
    ) -> Self {
        Tiered {
            l1,
            eviction,
            validity,
            log_seen: AtomicU64::new(0),
            log_lock: tokio::sync::Mutex::new(()),
            l2,
            lock_timeout,
            leases: DashMap::new(),
            refreshing: DashMap::new(),
            inflight: DashMap::new(),
            started: Once::new(),
            swept: parking_lot::Mutex::new((0, u64::MAX)),
        }
    }

    /// Give back the fill lease for `key` (the response turned out uncacheable), so other
    /// corrals stop waiting for a value that will never come.
    pub fn release_lease(&self, key: &CacheKey) {
        let Some(l2) = self.l2.clone() else { return };
        let mk = l2.key(&key.combined());
        if self.leases.remove(&mk).is_some() {
            tokio::spawn(async move {
                l2.delete(&mk).await;
            });
        }
    }

    /// Pingora is about to revalidate the stale L1 entry of `key` in the background (grace).
    /// Every corral holding that copy sees it go stale at the same moment; only one of them
    /// should go upstream. The first takes a refresh lock in memcached (a lease on
    /// `<key>:refresh`) and goes ([`Refresh::Mine`]; it gives the lock back with
    /// [`Self::refresh_done`]). Another waits, bounded by `lock_timeout`, for the fresher copy
    /// to land in memcached and puts it in L1: its revalidation then finds a fresh entry and
    /// makes no upstream request ([`Refresh::Peer`]). Clients are never delayed: they are
    /// served the stale copy meanwhile.
    pub async fn refresh_once(&'static self, primary: &CacheKey, req: &RequestHeader) -> Refresh {
        let local = || {
            metrics::STALE_REFRESHES.with_label_values(&["local"]).inc();
            Refresh::Local
        };
        let Some(l2) = &self.l2 else {
            return local();
        };
        let Some((validated, variance)) = self.l1.stale_validated(primary, req, SystemTime::now()) else {
            return local();
        };
        // the variant's own slot, in L1 and in L2, as Pingora stored it
        let mut key = primary.clone();
        if let Some(v) = variance {
            key.set_variance_key(v);
        }
        if self.refreshes(&l2.key(&key.combined())) {
            // a request of this corral revalidates it already (past grace)
            return local();
        }
        match self.refresh_or_wait(l2, &key, validated).await {
            Ok(_) => Refresh::Peer,
            Err(r) => r,
        }
    }

    /// An L1 hit that Pingora must revalidate before use (stale, past its serve-stale
    /// window: the clients wait): as [`Self::refresh_once`] does in the background, one
    /// corral of the cluster revalidates, the others wait for its copy in memcached and answer
    /// with that. Within this corral one request decides; the others wait for it, then find
    /// the fresh copy in L1 or leave the revalidation to Pingora's cache lock.
    async fn revalidate_once(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        stale: (CacheMeta, HitHandler),
        trace: &SpanHandle,
    ) -> Result<(CacheMeta, HitHandler)> {
        let mk = l2.key(&key.combined());
        if self.refreshes(&mk) {
            return Ok(stale);
        }
        let gate = self.inflight.entry(mk.clone()).or_default().clone();
        let guard = gate.clone().lock_owned().await;
        let result = async {
            if self.refreshes(&mk) {
                return Ok(stale);
            }
            // the request before this one may have brought a fresh copy
            if let Some(hit) = self.l1.lookup(key, trace).await? {
                if hit.0.is_fresh(SystemTime::now()) {
                    return Ok(hit);
                }
            }
            let validated = memory::validated(&stale.1).unwrap_or_else(|| stale.0.updated());
            let mut stale = stale;
            match self.refresh_or_wait(l2, key, validated).await {
                Ok(fresh) => return Ok(fresh),
                Err(Refresh::Mine(lock)) => CompleteHit::set_refresh_lock(&mut stale.1, lock),
                Err(_) => {}
            }
            Ok(stale)
        }
        .await;
        drop(guard);
        drop(gate);
        self.inflight.remove_if(&mk, |_, g| Arc::strong_count(g) == 1);
        result
    }

    /// Take the cluster's refresh lock of `key` (`Err(Mine)`: this corral refreshes), or,
    /// if another corral holds it, wait for its copy ([`Self::await_peer_copy`]). Counted in
    /// `corral_stale_refreshes_total`.
    async fn refresh_or_wait(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<(CacheMeta, HitHandler), Refresh> {
        let mk = l2.key(&key.combined());
        let outcome = match self.take_refresh_lock(l2, &mk).await {
            Read::Won => Err(Refresh::Mine(refresh_lock_key(&mk))),
            Read::Busy => self.await_peer_copy(l2, key, validated).await,
            _ => Err(Refresh::Local),
        };
        let how = outcome
            .as_ref()
            .map_or_else(Refresh::label, |_| Refresh::Peer.label());
        metrics::STALE_REFRESHES.with_label_values(&[how]).inc();
        outcome
    }

    /// Whether this corral holds the refresh lock of the memcached key `mk`.
    fn refreshes(&self, mk: &str) -> bool {
        let held = self.refreshing.get(mk).map(|since| since.elapsed());
        match held {
            Some(for_) if for_ < self.lock_timeout => true,
            Some(_) => {
                // never given back (the request vanished): memcached has dropped it too
                self.refreshing.remove(mk);
                false
            }
            None => false,
        }
    }

    /// Try to take the cluster's refresh lock of the memcached key `mk` (noted in
    /// `refreshing` when won).
    async fn take_refresh_lock(&self, l2: &L2, mk: &str) -> Read {
        let read = l2.get(&refresh_lock_key(mk), Some(self.lock_timeout)).await;
        if matches!(read, Read::Won) {
            self.refreshing.insert(mk.to_string(), std::time::Instant::now());
        }
        read
    }

    /// Wait, bounded by `lock_timeout`, for a copy of `key` validated after `validated` to land
    /// in memcached (fresh, and covered by no purge), put it in L1 and answer with it.
    /// `Err(Mine)` if the corral that held the refresh lock gave it up without a copy (its
    /// refresh failed or was uncacheable): this corral took the lock over and refreshes.
    /// `Err(TimedOut)` if nothing came; `Err(Local)` if memcached cannot be trusted now.
    async fn await_peer_copy(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<(CacheMeta, HitHandler), Refresh> {
        let mk = l2.key(&key.combined());
        let deadline = tokio::time::Instant::now() + self.lock_timeout;
        let mut pause = Duration::from_millis(10);
        while tokio::time::Instant::now() + pause <= deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            if let Some(fresh) = self.peer_copy(l2, key, validated).await? {
                return Ok(fresh);
            }
            if let Read::Won = self.take_refresh_lock(l2, &mk).await {
                // the lock was given back: a copy that landed just before counts
                if let Some(fresh) = self.peer_copy(l2, key, validated).await? {
                    self.refresh_done(refresh_lock_key(&mk));
                    return Ok(fresh);
                }
                return Err(Refresh::Mine(refresh_lock_key(&mk)));
            }
        }
        Err(Refresh::TimedOut)
    }

    /// One look for a peer's copy of `key` validated after `validated`: fresh and covered by
    /// no purge, it goes into L1 and answers. `Err(Local)` if memcached cannot be trusted now.
    async fn peer_copy(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<Option<(CacheMeta, HitHandler)>, Refresh> {
        let current = l2.key_at(l2.generation(), &key.combined());
        let (read, moved, log_complete) = tokio::join!(
            l2.get(&current, None),
            self.adopt_generation(l2),
            self.pull_log(l2)
        );
        if moved || !log_complete {
            // a purge of everything dropped the entry, or bans elsewhere are unknown
            return Err(Refresh::Local);
        }
        let Read::Hit(bytes) = read else { return Ok(None) };
        let Ok(rec) = record::decode(bytes) else {
            return Ok(None);
        };
        let (host, path) = memory::split_url(key.primary_key_str().unwrap_or(""));
        let purged = || {
            self.validity
                .check(host, path, rec.meta.updated(), rec.meta.headers(), 0)
                != Verdict::Valid
        };
        // a copy refreshed before a purge that covers it (a soft one keeps it in memcached) is
        // no better than ours: wait for the refresh under way
        if rec.meta.updated() > validated && rec.meta.is_fresh(SystemTime::now()) && !purged() {
            return Ok(self.promote(key, rec));
        }
        Ok(None)
    }

    /// This corral's refresh is over (stored, or failed): free the refresh lock at once, so
    /// the next time the entry goes stale a corral can take it without waiting for it to
    /// expire.
    ///
    /// When the refresh stored a copy, the L2 write already gave the lock back, right after
    /// the copy landed (so a corral that sees the lock gone finds the copy): nothing to do.
    pub fn refresh_done(&self, lock: String) {
        let held = lock
            .strip_suffix(REFRESH_SUFFIX)
            .is_some_and(|mk| self.refreshing.remove(mk).is_some());
        if let (true, Some(l2)) = (held, self.l2.clone()) {
            tokio::spawn(async move {
                l2.delete(&lock).await;
            });
        }
    }

    /// The refresh lock of `mk` if this corral holds it, handed to the L2 write of the
    /// refreshed copy, which gives it back once the copy has landed.
    fn refresh_lock_for_write(&self, mk: &str) -> Option<String> {
        self.refreshing.remove(mk).map(|_| refresh_lock_key(mk))
    }

    /// One run of the ban sweeper: if ban or tag records arrived since the last pass, check
    /// every L1 entry against them ([`MemoryStorage::sweep`]: matched entries are removed or
    /// marked stale, the rest marked checked), then drop the records no entry can need any
    /// more. A record is needed while an entry validated before it may still be looked up
    /// unchecked: a fill that was in progress, an entry inserted during the pass, or (with L2)
    /// a memcached value, which lives at most `memcached.max_ttl`.
    pub async fn sweep_once(&self) {
        if !self.validity.active() {
            return;
        }
        let upto = self.validity.published();
        let (last, mut fills_min) = *self.swept.lock();
        // no value older than this can be in memcached
        let l2_bound = self
            .l2
            .as_ref()
            .map(|l2| SystemTime::now() - l2.max_ttl() - CLOCK_SKEW);
        // entries that escaped the last pass (inserted since, or fills in progress then) hold
        // back the records older than them; a pass checks them and lifts that
        let escaped = fills_min.min(self.l1.inserted_min_ms()) != u64::MAX;
        let held_back = escaped
            && self
                .validity
                .oldest()
                .is_some_and(|t| l2_bound.is_none_or(|bound| t <= bound));
        if upto > last || self.validity.floor_ms() > 0 || held_back {
            let report = self.l1.sweep(self.validity, upto).await;
            for compact in &report.removed {
                self.eviction
                    .remove(pingora_cache::CacheEntryKeyRef::from_entry_id(compact, None));
            }
            metrics::SWEPT
                .with_label_values(&["checked"])
                .inc_by(report.checked as u64);
            metrics::SWEPT
                .with_label_values(&["removed"])
                .inc_by(report.removed.len() as u64);
            metrics::SWEPT
                .with_label_values(&["stale"])
                .inc_by(report.stale as u64);
            fills_min = report.fills_min;
            *self.swept.lock() = (upto, fills_min);
            metrics::SWEEPS.inc();
        }
        let escaped = fills_min.min(self.l1.inserted_min_ms());
        let l1_horizon = if escaped == u64::MAX {
            SystemTime::now() + Duration::from_secs(3600)
        } else {
            SystemTime::UNIX_EPOCH + Duration::from_millis(escaped)
        };
        let l2_horizon = l2_bound.unwrap_or(l1_horizon);
        let checked = self.swept.lock().0;
        let expired = self.validity.expire(checked, l1_horizon, l2_horizon);
        metrics::PURGE_RECORDS_EXPIRED.inc_by(expired as u64);
    }

    /// Every second, adopt memcached's namespace generation (when it moved, another corral
    /// purged everything: drop L1 too) and pull new purge log records (bans and tag purges
    /// other corrals accepted), so L1 follows them within a second.
    fn spawn_generation_watch(&'static self, l2: L2) {
        tokio::spawn(async move {
            loop {
                tokio::join!(self.adopt_generation(&l2), self.pull_log(&l2));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// The sequence number of the last purge log record applied here.
    pub fn log_seen(&self) -> u64 {
        self.log_seen.load(Ordering::Acquire)
    }

    /// Apply the purge log records this corral has not seen. Returns false if the log could
    /// not be read completely (memcached trouble): an L2 value must not be trusted then.
    ///
    /// A record that is gone (expired, evicted), or more records than [`MAX_RECORDS`] to catch
    /// up on (a corral started long after), is covered conservatively: everything validated
    /// before now is treated as purged.
    pub async fn pull_log(&'static self, l2: &L2) -> bool {
        let Some(seq) = l2.log_seq().await else {
            return false;
        };
        if seq <= self.log_seen.load(Ordering::Acquire) {
            return true;
        }
        let _one_reader = self.log_lock.lock().await;
        let seen = self.log_seen.load(Ordering::Acquire);
        if seq <= seen {
            return true;
        }
        let mut from = seen + 1;
        if seq - seen > MAX_RECORDS as u64 {
            self.validity.invalidate_all_before(crate::purge::now_stamp());
            from = seq + 1 - MAX_RECORDS as u64;
        }
        for n in from..=seq {
            match l2.log_record(n).await {
                None => return false,
                Some(Some(bytes)) => match LogRecord::decode(&bytes) {
                    Some((purge, at)) => self.validity.record(&purge, at),
                    None => self.validity.invalidate_all_before(crate::purge::now_stamp()),
                },
                Some(None) => self.validity.invalidate_all_before(crate::purge::now_stamp()),
            }
            self.log_seen.store(n, Ordering::Release);
        }
        true
    }

    /// Read the generation; if it moved, drop L1 (loudly). Returns whether it moved.
    async fn adopt_generation(&'static self, l2: &L2) -> bool {
        let (old, new) = l2.refresh_generation().await;
        if old == new {
            return false;
        }
        let dropped = self.l1.stats().entries;
        self.l1.clear();
        warn!(
            from = old,
            to = new,
            dropped,
            "memcached namespace generation changed (purge of everything): local cache dropped"
        );
        true
    }

    /// L1 missed: read L2, one read per key at a time in this corral.
    async fn l2_lookup_coalesced(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mk = l2.key(&key.combined());
        let deadline = tokio::time::Instant::now() + self.lock_timeout;
        let gate = self.inflight.entry(mk.clone()).or_default().clone();
        let result = match tokio::time::timeout_at(deadline, gate.clone().lock_owned()).await {
            // waited as long as a lock waiter may: look up as if there were no L2
            Err(_) => Ok(None),
            Ok(_guard) => match self.l1.lookup(key, trace).await? {
                // the read we waited for found it (or a fill started here meanwhile)
                Some(hit) => Ok(Some(hit)),
                None => self.l2_lookup(l2, key, deadline).await,
            },
        };
        drop(gate);
        // forget the gate once nobody holds or awaits it (the check runs under the map's lock,
        // so a lookup that is cloning it right now keeps it)
        self.inflight.remove_if(&mk, |_, g| Arc::strong_count(g) == 1);
        result
    }

    async fn l2_lookup(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mut pause = Duration::from_millis(10);
        let mut waited = false;
        // the key is built from one reading of the generation, so the two cannot disagree
        let mut generation = l2.generation();
        let mut mk = l2.key_at(generation, &key.combined());
        loop {
            // the generation is read alongside the value (in parallel, one round trip): a value
            // found under an older generation was purged by a purge-all elsewhere. Compare with
            // the generation the key was built from: the watcher may have adopted it first.
            let (read, _, log_complete) = tokio::join!(
                l2.get(&mk, Some(self.lock_timeout)),
                self.adopt_generation(l2),
                self.pull_log(l2)
            );
            if !log_complete {
                // a ban elsewhere may cover this value and we cannot tell: do without L2
                metrics::L2_LOOKUPS.with_label_values(&["unavailable"]).inc();
                return Ok(None);
            }
            if l2.generation() != generation {
                generation = l2.generation();
                mk = l2.key_at(generation, &key.combined());
                continue;
            }
            match read {
                Read::Hit(bytes) => match record::decode(bytes) {
                    Ok(rec) => {
                        metrics::L2_LOOKUPS.with_label_values(&["hit"]).inc();
                        return Ok(self.promote(key, rec));
                    }
                    Err(e) => {
                        metrics::L2_LOOKUPS.with_label_values(&["corrupt"]).inc();
                        warn!(key = %mk, error = %e, "undecodable value in memcached: treated as a miss");
                        return Ok(None);
                    }
                },
                Read::Won => {
                    self.leases.insert(mk, ());
                    metrics::L2_LOOKUPS
                        .with_label_values(&[if waited { "waited" } else { "miss" }])
                        .inc();
                    return Ok(None);
                }
                Read::Busy => {
                    // another corral is fetching it: wait for its value, bounded
                    waited = true;
                    if tokio::time::Instant::now() + pause > deadline {
                        metrics::L2_LOOKUPS.with_label_values(&["waited"]).inc();
                        return Ok(None);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                    // this corral may be filling it too (a request that arrived first)
                    if let Some(hit) = self
                        .l1
                        .lookup(key, &pingora_cache::trace::Span::inactive().handle())
                        .await?
                    {
                        return Ok(Some(hit));
                    }
                }
                Read::Miss => {
                    metrics::L2_LOOKUPS.with_label_values(&["miss"]).inc();
                    return Ok(None);
                }
                Read::Unavailable => {
                    metrics::L2_LOOKUPS.with_label_values(&["unavailable"]).inc();
                    return Ok(None);
                }
            }
        }
    }

    /// Put an L2 record into L1 and answer the lookup from there.
    fn promote(&'static self, key: &CacheKey, rec: record::Record) -> Option<(CacheMeta, HitHandler)> {
        let parts = MetaParts::from_meta(&rec.meta);
        let (hit, weight) = self.l1.insert(key, parts, rec.body);
        // admitted like a fill, so the memory bound holds for promoted entries too
        let entry = CacheEntryKey::from_entry_id(key.to_compact(), None);
        for evicted in self.eviction.admit(entry, weight, rec.meta.fresh_until()) {
            let k = evicted.key();
            self.l1.remove_variant(k.primary, k.variance_bin());
        }
        Some((rec.meta, Box::new(hit)))
    }

    fn l2_ttl(meta: &CacheMeta) -> Duration {
        let now = SystemTime::now();
        let fresh = meta.fresh_until().duration_since(now).unwrap_or(Duration::ZERO);
        let stale = meta.stale_while_revalidate_sec().max(meta.stale_if_error_sec());
        (fresh + Duration::from_secs(stale.into())).max(Duration::from_secs(1))
    }
}

/// Whether Pingora will make the clients of this L1 hit wait for a revalidation: a complete
/// entry, stale and past its serve-stale window. A Vary variant only when looked up under its
/// own variance (the primary slot may hold another variant than the request wants).
fn awaits_revalidation(hit: &(CacheMeta, HitHandler), key: &CacheKey) -> bool {
    let (meta, handler) = hit;
    let now = SystemTime::now();
    !meta.is_fresh(now)
        && !meta.serve_stale_while_revalidate(now)
        && (key.variance_bin().is_some() || meta.variance().is_none())
        && handler.as_any().is::<CompleteHit>()
}

/// Writes L1 as the body arrives, and L2 once it is complete.
struct TieredMiss {
    l1: MissHandler,
    l2: Option<PendingL2>,
    tiered: &'static Tiered,
}

struct PendingL2 {
    l2: L2,
    key: String,
    internal: Vec<u8>,
    header: Vec<u8>,
    ttl: Duration,
    chunks: Vec<Bytes>,
    size: usize,
}

#[async_trait]
impl HandleMiss for TieredMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if let Some(p) = &mut self.l2 {
            p.size += data.len();
            if p.size > p.l2.max_object_bytes() {
                // too big for memcached: this object stays L1-only
                self.l2 = None;
            } else {
                p.chunks.push(data.clone());
            }
        }
        self.l1.write_body(data, eof).await
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let this = *self;
        let done = this.l1.finish().await?;
        if let Some(p) = this.l2 {
            let lock = this.tiered.refresh_lock_for_write(&p.key);
            tokio::spawn(async move {
                let mut body = BytesMut::with_capacity(p.size);
                for c in &p.chunks {
                    body.extend_from_slice(c);
                }
                let value = record::encode_parts(&p.internal, &p.header, &[], &body);
                p.l2.set(&p.key, value, p.ttl).await;
                if let Some(lock) = lock {
                    p.l2.delete(&lock).await;
                }
            });
        }
        Ok(done)
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        self.l1.streaming_write_tag()
    }
}

#[async_trait]
impl Storage for Tiered {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(hit) = self.l1.lookup(key, trace).await? {
            if let Some(l2) = &self.l2 {
                if awaits_revalidation(&hit, key) {
                    return Ok(Some(self.revalidate_once(l2, key, hit, trace).await?));
                }
            }
            return Ok(Some(hit));
        }
        let Some(l2) = &self.l2 else {
            return Ok(None);
        };
        self.started.call_once(|| self.spawn_generation_watch(l2.clone()));
        self.l2_lookup_coalesced(l2, key, trace).await
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        self.l1.lookup_streaming_write(key, tag, trace).await
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let l1 = self.l1.get_miss_handler(key, meta, trace).await?;
        let l2 = match &self.l2 {
            Some(l2) => {
                let mk = l2.key(&key.combined());
                self.leases.remove(&mk);
                let (internal, header) = meta.serialize()?;
                Some(PendingL2 {
                    l2: l2.clone(),
                    key: mk,
                    internal,
                    header,
                    ttl: Self::l2_ttl(meta),
                    chunks: Vec::new(),
                    size: 0,
                })
            }
            None => None,
        };
        Ok(Box::new(TieredMiss { l1, l2, tiered: self }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let outcome = self.l1.purge(target, purge_type, trace).await?;
        // an eviction only frees local memory; an invalidation reaches every corral through L2
        if let (PurgeType::Invalidation, Some(l2)) = (purge_type, &self.l2) {
            l2.delete(&l2.key(&target.key().combined())).await;
        }
        Ok(outcome)
    }

    async fn expire(&'static self, target: PurgeTarget<'_>, trace: &SpanHandle) -> Result<PurgeOutcome> {
        self.l1.expire(target, trace).await
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        trace: &SpanHandle,
    ) -> Result<bool> {
        let updated = self.l1.update_meta(key, meta, trace).await?;
        if let (Some(l2), Some(body)) = (&self.l2, self.l1.body_of(key)) {
            // a 304 refreshed the entry: refresh the shared copy too
            let value = record::encode(meta, &[], &body)?;
            let (l2, mk, ttl) = (l2.clone(), l2.key(&key.combined()), Self::l2_ttl(meta));
            let lock = self.refresh_lock_for_write(&mk);
            tokio::spawn(async move {
                l2.set(&mk, value, ttl).await;
                if let Some(lock) = lock {
                    l2.delete(&lock).await;
                }
            });
        }
        Ok(updated)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}
