//! [`Tiered`]: L1 in front of an optional L2, behind Pingora's `Storage` trait (see [`super`]).

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
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

use super::eviction::Eviction;
use super::memcached::{Stored, L2};
use super::memory::{self, CompleteHit, MemoryStorage, MetaParts};
use super::record;
use crate::lock::{Gates, Held};
use crate::metrics;
use crate::purge::log::Follower;
use crate::purge::{Validity, Verdict};

/// L1 in front of an optional L2.
pub struct Tiered {
    pub l1: &'static MemoryStorage,
    /// L1's eviction manager: promotions from L2 are admitted (and evict) like fills.
    pub(crate) eviction: &'static Eviction,
    /// Ban and tag records, where records pulled from memcached's purge log go.
    pub(crate) validity: &'static Validity,
    /// Follows memcached's purge log and namespace generation into `validity` and L1.
    pub(crate) log: Follower,
    pub l2: Option<L2>,
    /// How long a lookup waits for another corral's fill (the cross-proxy lock).
    pub(crate) lock_timeout: Duration,
    /// L2 keys whose fill lease this corral won and has not yet filled. memcached lets a
    /// lease go after `lock_timeout` even if the fill never came, and so does this set.
    pub(crate) leases: Held,
    /// L2 keys whose refresh lock (see [`Self::refresh_once`]) this corral holds; forgotten
    /// after `lock_timeout` like the leases.
    pub(crate) refreshing: Held,
    /// One L2 read per key at a time in this corral: concurrent lookups of a key wait here
    /// and then find the result in L1, so memcached sees one read per key, not one per client.
    pub(crate) inflight: Gates,
    /// Values on their way to memcached (write id → validation time, ms).
    writes: &'static DashMap<u64, u64>,
    next_write: AtomicU64,
    started: Once,
}

impl Tiered {
    pub fn new(
        l1: &'static MemoryStorage,
        eviction: &'static Eviction,
        validity: &'static Validity,
        l2: Option<L2>,
        lock_timeout: Duration,
        purge: &crate::config::PurgeConfig,
    ) -> Self {
        Tiered {
            l1,
            eviction,
            validity,
            log: Follower::new(l1, validity, purge, l2.is_some()),
            l2,
            lock_timeout,
            // memcached counts a lease in whole seconds (at least one), on a clock that ticks
            // once a second: what it may still hold, give or take that tick
            leases: Held::new(Duration::from_secs(lock_timeout.as_secs().max(1) + 1)),
            refreshing: Held::new(Duration::from_secs(lock_timeout.as_secs().max(1) + 1)),
            inflight: Gates::default(),
            writes: Box::leak(Box::default()),
            next_write: AtomicU64::new(0),
            started: Once::new(),
        }
    }

    /// Follow memcached's purge log from now on (once; without memcached, nothing): the first
    /// lookup that reaches L2 starts it, and a corral on the bus at its start.
    pub(crate) fn follow_log(&'static self) {
        if let Some(l2) = &self.l2 {
            self.started.call_once(|| self.log.spawn_watch(l2.clone()));
        }
    }

    /// Put an L2 record into L1 and answer the lookup from there.
    /// `generation`: the L1 generation when the lookup began; `None` (a miss) if a clear has
    /// moved it since: the copy was read from before the clear.
    pub(crate) async fn promote(
        &'static self,
        key: &CacheKey,
        rec: record::Record,
        generation: u64,
    ) -> Option<(CacheMeta, HitHandler)> {
        let mut parts = MetaParts::from_meta(&rec.meta, memory::url_of(key));
        parts.validated_by = rec.filler;
        let (hit, weight) = self.l1.insert(key, parts, rec.body, generation).await?;
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

/// A value on its way to memcached (a fill, or the copy a 304 refreshed).
struct L2Write {
    /// The L1 generation of the answer: a clear since (checked again just before the write)
    /// means it is from before, and it is not written.
    generation: u64,
    key: String,
    value: Bytes,
    ttl: Duration,
    /// The fill lease this corral won: the write replaces the placeholder only if it is
    /// still there ([`L2::set_if`]): a purge that deleted it meanwhile wins.
    lease: Option<Lease>,
    /// The refresh lock this corral holds for the key, given back once the copy has landed.
    refresh_lock: Option<(String, Option<u64>)>,
    url: String,
    validated: SystemTime,
    headers: http::HeaderMap,
    _pending: PendingWrite,
}

/// A write to memcached in progress, in [`Tiered::writes`] until it ends (a drop guard): the
/// sweeper keeps the purge records older than it, which the write is checked against.
pub(crate) struct PendingWrite {
    writes: &'static DashMap<u64, u64>,
    id: u64,
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        self.writes.remove(&self.id);
    }
}

impl Tiered {
    fn pending_write(&'static self, validated: SystemTime) -> PendingWrite {
        let id = self.next_write.fetch_add(1, Ordering::Relaxed);
        self.writes.insert(id, crate::purge::millis(validated));
        PendingWrite {
            writes: self.writes,
            id,
        }
    }

    /// The oldest validation time (ms) of a value on its way to memcached (`u64::MAX`: none).
    pub fn writes_min_ms(&self) -> u64 {
        self.writes.iter().map(|w| *w.value()).min().unwrap_or(u64::MAX)
    }

    /// Write a value to memcached, unless a purge covers it: one accepted while it was being
    /// fetched must not let it reach the other corrals through L2 (the purging corral's delete
    /// may have come before this write).
    ///
    /// - Checked first against this corral's records: covered, it is not written.
    /// - A fill that won the lease writes only over its own placeholder (CAS): a purge deletes
    ///   the placeholder, so a write that comes after the purge's delete fails.
    /// - Any other write (no lease: memcached was busy, or a refresh of a stored copy) is
    ///   checked again after it landed, against the purge log read anew, and deleted (on its
    ///   own CAS) if a purge now covers it. The purging corral appends to the log before it
    ///   deletes, so either its delete comes after this write, or its record is in the log
    ///   this check reads.
    async fn write_l2(&self, l2: &L2, mut w: L2Write) {
        let (host, path) = memory::split_url(&w.url);
        let by = crate::purge::corral_id();
        let covered = |v: &Validity| v.check(&host, path, w.validated, by, &w.headers, 0) != Verdict::Valid;
        // an unsafe request invalidated the URL since (not a purge record: L1 keeps it)
        let invalidated = || {
            self.l1.invalidations() > 0
                && self
                    .l1
                    .invalidated_since(&pingora_cache::key::hash_key(&w.url), w.validated)
        };
        if covered(self.validity) || self.l1.generation() != w.generation || invalidated() {
            metrics::L2_WRITES_SKIPPED.inc();
        } else {
            let cas = w.lease.as_ref().map(|l| l.cas);
            let stored = l2.set_if(&w.key, w.value.clone(), w.ttl, cas.flatten()).await;
            // a read of the purge log that begins after this moment sees every purge whose
            // delete could have come before the write
            let landed = SystemTime::now();
            if let Some(lease) = &mut w.lease {
                // written, or the placeholder is gone: nothing to give back
                lease.armed = stored == Stored::Unavailable;
            }
            // a write that was not conditional on this corral's lease (none, or memcached gave
            // no CAS with it) is checked after it landed
            let unconditional = cas.flatten().is_none();
            if let (Stored::Stored(new_cas), true) = (stored, unconditional) {
                let complete = self.log.sync_since(l2, landed).await;
                if !complete || covered(self.validity) || invalidated() {
                    // covered, or it cannot be told: it must not stay
                    metrics::L2_WRITES_SKIPPED.inc();
                    delete_until_done(l2.clone(), w.key.clone(), new_cas).await;
                }
            }
        }
        if let Some((lock, cas)) = w.refresh_lock.take() {
            l2.delete_if(&lock, cas).await;
        }
    }
}

/// Delete `key` (on its CAS), and if memcached cannot be told now, keep trying in the
/// background, every second for five minutes: a copy a purge covers must not stay in L2 once
/// the corrals have let the purge's record go.
async fn delete_until_done(l2: L2, key: String, cas: Option<u64>) {
    if l2.delete_if(&key, cas).await {
        return;
    }
    tokio::spawn(async move {
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if l2.delete_if(&key, cas).await {
                return;
            }
        }
        tracing::warn!(key = %key, "a copy that a purge covers could not be deleted from memcached");
    });
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
    /// The L1 generation of the fill: a clear since voids it, in memcached too.
    generation: u64,
}

struct PendingL2 {
    l2: L2,
    key: String,
    /// What the validity check before and after the write needs: the URL, when the response
    /// was validated, its header fields (tags).
    url: String,
    validated: SystemTime,
    headers: http::HeaderMap,
    /// Holds back the purge records older than this value until it has landed.
    pending: PendingWrite,
    /// The fill lease this corral won for `key`, if it did: given back if the value never
    /// gets written (the fill aborted, or the body outgrew `memcached.max_object_bytes`).
    lease: Option<Lease>,
    internal: Vec<u8>,
    header: Vec<u8>,
    ttl: Duration,
    chunks: Vec<Bytes>,
    size: usize,
}

/// A fill lease held in memcached: dropped unwritten, it is deleted, so other corrals stop
/// waiting for a value that will not come (instead of waiting out `lock_timeout`).
struct Lease {
    l2: L2,
    key: String,
    cas: Option<u64>,
    /// Still to give back (false once the value is written).
    armed: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (l2, key, cas) = (self.l2.clone(), std::mem::take(&mut self.key), self.cas);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                l2.delete_if(&key, cas).await;
            });
        }
    }
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
        if this.tiered.l1.generation() != this.generation {
            // L1 was cleared since the answer arrived: it is from before, not written to
            // memcached either (a lease won for it is given back as `l2` drops)
            return Ok(done);
        }
        if let Some(p) = this.l2 {
            let tiered = this.tiered;
            let refresh_lock = tiered.refresh_lock_for_write(&p.key);
            tokio::spawn(async move {
                let mut body = BytesMut::with_capacity(p.size);
                for c in &p.chunks {
                    body.extend_from_slice(c);
                }
                let value = record::encode_parts(&p.internal, &p.header, crate::purge::corral_id(), &body);
                let write = L2Write {
                    generation: this.generation,
                    key: p.key,
                    value,
                    ttl: p.ttl,
                    lease: p.lease,
                    refresh_lock,
                    validated: p.validated,
                    headers: p.headers,
                    url: p.url,
                    _pending: p.pending,
                };
                tiered.write_l2(&p.l2, write).await;
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
        self.follow_log();
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
                if key.variance_bin().is_some() {
                    // the lease was won by the lookup of the URL's primary key; the response
                    // turned out to vary and is written under its variant's key: give the
                    // primary's back, so that other corrals stop waiting on it
                    let mut primary = key.clone();
                    primary.remove_variance_key();
                    let pk = l2.key(&primary.combined());
                    if let Some(cas) = self.leases.give_back(&pk) {
                        drop(Lease {
                            l2: l2.clone(),
                            key: pk,
                            cas,
                            armed: true,
                        });
                    }
                }
                let lease = self.leases.give_back(&mk).map(|cas| Lease {
                    l2: l2.clone(),
                    key: mk.clone(),
                    cas,
                    armed: true,
                });
                let (internal, header) = meta.serialize()?;
                Some(PendingL2 {
                    l2: l2.clone(),
                    lease,
                    url: key.primary_key_str().unwrap_or("").to_string(),
                    validated: meta.updated(),
                    headers: meta.headers().clone(),
                    pending: self.pending_write(meta.updated()),
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
        Ok(Box::new(TieredMiss {
            l1,
            l2,
            tiered: self,
            generation: self.l1.fill_generation(meta),
        }))
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
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let Some((old, weight, body)) = self.l1.revalidate(key, meta) else {
            return Ok(false);
        };
        if weight != old {
            // a 304 that changed the header's size: the eviction manager weighs it again, and
            // may evict for it (this entry too, if it no longer fits)
            let entry = CacheEntryKey::from_entry_id(key.to_compact(), None);
            for evicted in self.eviction.reweigh(entry, weight, meta.fresh_until()) {
                let k = evicted.key();
                self.l1.remove_variant(k.primary, k.variance_bin());
            }
        }
        // the body the 304 validated, even if L1 just let it go
        if let Some(l2) = &self.l2 {
            // a 304 refreshed the entry: refresh the shared copy too
            let mk = l2.key(&key.combined());
            let write = L2Write {
                generation: self.l1.fill_generation(meta),
                value: record::encode(meta, crate::purge::corral_id(), &body)?,
                ttl: Self::l2_ttl(meta),
                lease: None,
                refresh_lock: self.refresh_lock_for_write(&mk),
                key: mk,
                validated: meta.updated(),
                headers: meta.headers().clone(),
                url: key.primary_key_str().unwrap_or("").to_string(),
                _pending: self.pending_write(meta.updated()),
            };
            let l2 = l2.clone();
            tokio::spawn(async move { self.write_l2(&l2, write).await });
        }
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}
