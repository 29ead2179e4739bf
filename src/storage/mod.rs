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

mod lock;
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
pub use lock::Refresh;
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

    async fn l2_lookup(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mut backoff = lock::Backoff::until(deadline);
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
                    if !backoff.wait().await {
                        metrics::L2_LOOKUPS.with_label_values(&["waited"]).inc();
                        return Ok(None);
                    }
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
