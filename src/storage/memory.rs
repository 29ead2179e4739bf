//! L1: the in-memory tier, a pingora-cache [`Storage`] bounded by bytes.
//!
//! # Layout
//! One [`DashMap`] from the primary hash of a URL to its [`Slot`]s, one slot per Vary variant.
//! Grouping variants under their URL makes "purge every variant of this URL" one map removal,
//! and a lookup is one sharded-map read plus a scan of (usually one) variant.
//!
//! A slot holds the committed entry and, while a miss is being filled, the in-progress
//! [`Fill`]. A lookup prefers the fill: lock waiters and requests that arrive during a refresh
//! stream the new body as it arrives ([`Storage::support_streaming_partial_write`]) instead of
//! waiting for the whole body or getting the old one.
//!
//! # Hits never copy
//! A committed body is one [`Bytes`] (the chunks of the fill, joined once at commit); a hit
//! hands out clones of it, which share the buffer. Metadata is kept as parts and a hit builds its
//! [`CacheMeta`] by cloning the header map, with no serialisation and no compression.
//!
//! # Memory bound
//! Each entry weighs its body + its headers + a fixed overhead ([`ENTRY_OVERHEAD`]); the weight
//! is reported to Pingora's eviction manager (a sharded LRU with `memory_bytes` as its limit),
//! which asks this storage to purge the least recently used entries when the total goes over.
//! [`MemoryStorage::stats`] reports what is actually held.
//!
//! # Emptying in O(1)
//! [`MemoryStorage::clear`] bumps a generation: entries of older generations are invisible at
//! once and are freed by a background sweep.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use parking_lot::Mutex;
use pingora_cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
    Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::sync::watch;

use crate::purge::{millis, Validity, Verdict};

/// Bookkeeping bytes charged to every entry on top of body and headers: the entry itself
/// (metadata, two header structs), its map row and slot, its URL, the eviction manager's
/// node and index, and the allocator's share of each. Measured with benches/memory.sh (1 KB
/// objects, no eviction: RSS growth per entry beyond body and header fields).
pub const ENTRY_OVERHEAD: usize = 1536;

/// Bytes charged per header field on top of its name and value: the header map's bucket and
/// index, the value's own allocation.
const FIELD_OVERHEAD: usize = 96;

/// [`CacheMeta`] kept as parts, so a hit rebuilds it without deserialising anything.
#[derive(Debug, Clone)]
pub struct MetaParts {
    pub fresh_until: SystemTime,
    /// When the response was last fetched or revalidated (pingora's `updated`).
    pub updated: SystemTime,
    /// When this entry's lineage began (Pingora's `provenance`): its first admission, kept
    /// across refreshes. For the variant in a URL's primary slot it is the tombstone of the
    /// other variants: Pingora serves only those created after it.
    pub lineage: SystemTime,
    pub epoch_override: Option<SystemTime>,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    pub variance: Option<HashBinary>,
    pub header: ResponseHeader,
}

impl MetaParts {
    pub fn from_meta(meta: &CacheMeta) -> Self {
        MetaParts {
            fresh_until: meta.fresh_until(),
            updated: meta.updated(),
            lineage: meta.provenance(),
            epoch_override: meta.epoch_override(),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            header: owned_header(meta.response_header()),
        }
    }

    /// Rebuild a [`CacheMeta`]. Its `created` (hence `provenance`) is the entry's lineage, so
    /// refreshing the variant in a URL's primary slot does not turn the other variants into
    /// misses. `CacheMeta::new` makes `updated` that same time, so the epoch that `Age` is
    /// measured from is set explicitly, and purge and `no-cache` checks take the last
    /// validation from the hit handler ([`validated`]), not from `updated`.
    pub fn to_meta(&self) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            self.lineage,
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            self.header.clone(),
        );
        meta.set_epoch_override(self.epoch_override.unwrap_or(self.updated));
        if let Some(v) = self.variance {
            meta.set_variance_key(v);
        }
        meta
    }

    /// Approximate bytes held by the header.
    pub fn header_bytes(&self) -> usize {
        self.header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + FIELD_OVERHEAD)
            .sum::<usize>()
    }
}

/// A copy of `h` that owns its bytes, with lower-case names (as a fast hit sends them, and as
/// HTTP/2 does). Pingora parses a response head in one read buffer of 4 KiB or more, and the
/// header values (and the case-preserving names) it hands over are slices of that buffer: a
/// stored header would keep the whole buffer alive, 4 to 8 KiB per entry that `memory_bytes`
/// does not count (issue 8: 1 KB objects took 5x their budget in RSS).
fn owned_header(h: &ResponseHeader) -> ResponseHeader {
    let Ok(mut out) = ResponseHeader::build_no_case(h.status, Some(h.headers.len())) else {
        return h.clone();
    };
    for (name, value) in &h.headers {
        let value = http::HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        let _ = out.append_header(name.clone(), value);
    }
    out.set_version(h.version);
    let _ = out.set_reason_phrase(h.get_reason_phrase());
    out
}

/// A committed response.
#[derive(Debug)]
struct Stored {
    meta: MetaParts,
    body: Bytes,
    /// The primary key text (`http://host/path?q`): what bans match against.
    url: Arc<str>,
    /// Weight reported to the eviction manager.
    weight: usize,
    generation: u64,
    /// Ban and tag records up to this sequence number were checked against this entry
    /// ([`crate::purge::Validity`]).
    checked: AtomicU64,
    /// The header as the fast hit path sends it, built on its first hit (charged in `weight`).
    wire: std::sync::OnceLock<Box<ResponseHeader>>,
}

impl Stored {
    fn new(meta: MetaParts, body: Bytes, url: Arc<str>, generation: u64) -> Arc<Stored> {
        // the header twice: the stored one and the fast path's wire copy
        let weight = body.len() + 2 * meta.header_bytes() + url.len() + ENTRY_OVERHEAD;
        Arc::new(Stored {
            meta,
            body,
            url,
            weight,
            generation,
            checked: AtomicU64::new(0),
            wire: std::sync::OnceLock::new(),
        })
    }

    /// The same body under new metadata. The weight stays what the eviction manager was told:
    /// a 304 or a soft purge changes headers only. New headers mean new checks.
    fn with_meta(&self, meta: MetaParts) -> Arc<Stored> {
        Arc::new(Stored {
            meta,
            body: self.body.clone(),
            url: self.url.clone(),
            weight: self.weight,
            generation: self.generation,
            checked: AtomicU64::new(0),
            wire: std::sync::OnceLock::new(),
        })
    }

    /// This entry, stale from `at` on (the serve-stale windows then run from this moment).
    fn expired(&self, at: SystemTime) -> Arc<Stored> {
        let mut meta = self.meta.clone();
        meta.fresh_until = meta.fresh_until.min(at - Duration::from_millis(1));
        let stale = self.with_meta(meta);
        stale
            .checked
            .store(self.checked.load(Ordering::Acquire), Ordering::Release);
        stale
    }
}

/// A fresh, complete, variant-free L1 entry, served by the proxy's fast hit path without
/// Pingora's cache state machine ([`MemoryStorage::fresh_plain`]).
pub struct FreshEntry(Arc<Stored>);

impl FreshEntry {
    pub fn header(&self) -> &ResponseHeader {
        &self.0.meta.header
    }

    /// The header prepared for sending, built by `build` from the stored one on first use
    /// and kept with the entry: each hit clones it and only replaces values in it.
    pub fn wire(&self, build: impl FnOnce(&ResponseHeader) -> ResponseHeader) -> &ResponseHeader {
        self.0.wire.get_or_init(|| Box::new(build(&self.0.meta.header)))
    }

    pub fn body(&self) -> Bytes {
        self.0.body.clone()
    }

    pub fn weight(&self) -> usize {
        self.0.weight
    }

    pub fn fresh_until(&self) -> SystemTime {
        self.0.meta.fresh_until
    }

    /// When the response was last validated (what bans compare with).
    pub fn updated(&self) -> SystemTime {
        self.0.meta.updated
    }

    /// What `Age` counts from: the origin's own age is folded into the epoch.
    pub fn epoch(&self) -> SystemTime {
        self.0.meta.epoch_override.unwrap_or(self.0.meta.updated)
    }

    /// Up to which purge record this entry was checked ([`Validity::check_marked`]).
    pub fn check_mark(&self) -> &AtomicU64 {
        &self.0.checked
    }
}

/// State of an in-progress fill, broadcast to the readers streaming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillState {
    /// This many chunks are readable.
    Partial(usize),
    /// All chunks are written.
    Done(usize),
    /// The writer gave up (upstream error, response too large): readers fail.
    Aborted,
}

/// A body being written by the one request that fetches it.
#[derive(Debug)]
struct Fill {
    id: u64,
    meta: MetaParts,
    url: Arc<str>,
    chunks: Mutex<Vec<Bytes>>,
    state: watch::Sender<FillState>,
}

/// One Vary variant of a URL.
#[derive(Debug, Default)]
struct Slot {
    variance: Option<HashBinary>,
    entry: Option<Arc<Stored>>,
    fill: Option<Arc<Fill>>,
}

/// What [`MemoryStorage::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    pub entries: usize,
    pub bytes: usize,
}

/// The L1 tier. Build it once and leak it: Pingora's [`Storage`] takes `&'static self`.
#[derive(Debug)]
pub struct MemoryStorage {
    table: DashMap<HashBinary, Vec<Slot>>,
    bytes: AtomicUsize,
    entries: AtomicUsize,
    next_fill: AtomicU64,
    generation: AtomicU64,
    /// The oldest validation time (ms) of an entry or fill inserted since the sweeper last
    /// began a pass: such entries may have escaped that pass ([`MemoryStorage::sweep`]).
    inserted_min_ms: AtomicU64,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        MemoryStorage {
            table: DashMap::new(),
            bytes: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            next_fill: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            inserted_min_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries and bytes currently held (committed entries only).
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    fn account_add(&self, weight: usize) {
        self.bytes.fetch_add(weight, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
    }

    fn account_remove(&self, weight: usize) {
        self.bytes.fetch_sub(weight, Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }

    /// The entry for `key` if a hit needs nothing of Pingora's cache machinery: committed (no
    /// fill in progress), of the current generation, fresh at `now`, and the URL's only
    /// variant with no `Vary`. Anything else is `None`, and the request takes the full path.
    pub fn fresh_plain(&self, key: &CacheKey, now: SystemTime) -> Option<FreshEntry> {
        let slots = self.table.get(&key.primary_bin())?;
        let [slot] = slots.as_slice() else {
            return None;
        };
        if slot.variance.is_some() || slot.fill.is_some() {
            return None;
        }
        let entry = slot.entry.as_ref()?;
        let usable = self.current(entry)
            && now < entry.meta.fresh_until
            && !entry.meta.header.headers.contains_key(http::header::VARY);
        usable.then(|| FreshEntry(entry.clone()))
    }

    /// Store a complete entry directly (promotion from L2). Returns its hit handler and weight.
    pub fn insert(&self, key: &CacheKey, meta: MetaParts, body: Bytes) -> (CompleteHit, usize) {
        let stored = Stored::new(meta, body, url_of(key), self.generation.load(Ordering::Acquire));
        let hit = CompleteHit::of(&stored, true);
        (
            hit,
            self.commit(key.primary_bin(), key.variance_bin(), stored, None),
        )
    }

    /// The oldest validation time (ms) of an entry or fill inserted since the last sweep pass
    /// began (`u64::MAX`: none).
    pub fn inserted_min_ms(&self) -> u64 {
        self.inserted_min_ms.load(Ordering::Acquire)
    }

    /// Note that an entry validated at `validated` was inserted (after it is in the table).
    fn note_insert(&self, validated: SystemTime) {
        self.inserted_min_ms
            .fetch_min(millis(validated), Ordering::AcqRel);
    }

    /// Put a committed entry in its variant's slot, replacing (and un-counting) the old one;
    /// `fill` is the fill it completes, cleared from the slot if still there. Returns the weight.
    fn commit(
        &self,
        primary: HashBinary,
        variance: Option<HashBinary>,
        stored: Arc<Stored>,
        fill: Option<u64>,
    ) -> usize {
        let weight = stored.weight;
        let mut slots = self.table.entry(primary).or_default();
        let slot = match slots.iter().position(|s| s.variance == variance) {
            Some(i) => &mut slots[i],
            None => {
                slots.push(Slot {
                    variance,
                    ..Default::default()
                });
                slots.last_mut().expect("just pushed")
            }
        };
        let validated = stored.meta.updated;
        if let Some(old) = slot.entry.replace(stored) {
            self.account_remove(old.weight);
        }
        self.account_add(weight);
        if fill.is_some() && slot.fill.as_ref().map(|f| f.id) == fill {
            slot.fill = None;
        }
        drop(slots);
        self.note_insert(validated);
        weight
    }

    /// The body of the committed entry for `key`, if any (to re-store it after a 304).
    pub fn body_of(&self, key: &CacheKey) -> Option<Bytes> {
        let slots = self.table.get(&key.primary_bin())?;
        let variance = key.variance_bin();
        slots
            .iter()
            .find(|s| s.variance == variance)
            .and_then(|s| s.entry.as_ref())
            .map(|e| e.body.clone())
    }

    /// The stored entry `req` would be answered with, for the primary `key`, if it is
    /// complete and stale at `now`: when it was last validated, and the variance of its slot
    /// (`None`: the primary slot, where Pingora keeps the first variant). `None` if there is no
    /// such entry, a fill is under way, or it is fresh.
    pub fn stale_validated(
        &self,
        key: &CacheKey,
        req: &RequestHeader,
        now: SystemTime,
    ) -> Option<(SystemTime, Option<HashBinary>)> {
        let slots = self.table.get(&key.primary_bin())?;
        let primary = slots.iter().find(|s| s.variance.is_none())?;
        let mut slot = primary;
        if let Some(entry) = &primary.entry {
            let wanted = crate::key::variance_for(&entry.meta.header.headers, req);
            if wanted != entry.meta.variance {
                // another variant: its own (secondary) slot
                slot = slots
                    .iter()
                    .find(|s| s.variance.is_some() && s.variance == wanted)?;
            }
        }
        if slot.fill.is_some() {
            return None;
        }
        let entry = slot.entry.as_ref().filter(|e| self.current(e))?;
        (entry.meta.fresh_until <= now).then_some((entry.meta.updated, slot.variance))
    }

    /// Remove every variant of the URL whose primary hash is `primary`. Returns the compact
    /// keys removed (for the eviction manager) .
    pub fn remove_primary(&self, primary: &HashBinary) -> Vec<CompactCacheKey> {
        let Some((_, slots)) = self.table.remove(primary) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for slot in slots {
            // a fill in progress is left to finish: it started before this call returns,
            // and the proxy's validity checks decide whether it may be served
            if let Some(entry) = slot.entry {
                self.account_remove(entry.weight);
                removed.push(compact(*primary, slot.variance));
            }
        }
        removed
    }

    /// Mark every variant of the URL with this primary hash stale (a soft purge): it stays
    /// stored, is served stale within its grace, and revalidates. Returns how many.
    pub fn expire_primary(&self, primary: &HashBinary) -> usize {
        let Some(mut slots) = self.table.get_mut(primary) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut n = 0;
        for entry in slots.iter_mut().filter_map(|s| s.entry.as_mut()) {
            *entry = entry.expired(now);
            n += 1;
        }
        n
    }

    /// Make every entry invisible at once (O(1)); a background task frees them.
    pub fn clear(&'static self) {
        let old = self.generation.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move { self.sweep_before(old + 1) });
    }

    fn sweep_before(&self, generation: u64) {
        self.table.retain(|_, slots| {
            for slot in slots.iter_mut() {
                if slot.entry.as_ref().is_some_and(|e| e.generation < generation) {
                    let e = slot.entry.take().expect("checked above");
                    self.account_remove(e.weight);
                }
            }
            slots.retain(|s| s.entry.is_some() || s.fill.is_some());
            !slots.is_empty()
        });
    }

    fn current(&self, entry: &Arc<Stored>) -> bool {
        entry.generation == self.generation.load(Ordering::Acquire)
    }

    /// Remove one variant; returns whether something was removed.
    pub fn remove_variant(&self, primary: HashBinary, variance: Option<HashBinary>) -> bool {
        let mut removed = false;
        if let Some(mut slots) = self.table.get_mut(&primary) {
            if let Some(slot) = slots.iter_mut().find(|s| s.variance == variance) {
                if let Some(e) = slot.entry.take() {
                    self.account_remove(e.weight);
                    removed = true;
                }
            }
            slots.retain(|s| s.entry.is_some() || s.fill.is_some());
        }
        // drop the URL's row if that was its last variant; the re-check under the write lock
        // keeps a concurrent insert
        self.table.remove_if(&primary, |_, slots| slots.is_empty());
        removed
    }
}

/// The primary key text of `key`: what bans match, kept with the entry.
fn url_of(key: &CacheKey) -> Arc<str> {
    Arc::from(key.primary_key_str().unwrap_or(""))
}

/// What one pass of [`MemoryStorage::sweep`] did.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Entries checked against records they had not seen.
    pub checked: usize,
    /// Entries a hard purge matched, removed (tell the eviction manager).
    pub removed: Vec<CompactCacheKey>,
    /// Entries a soft purge matched, now stale.
    pub stale: usize,
    /// The oldest validation time (ms since the epoch) of a fill in progress during the pass
    /// (`u64::MAX`: none): such an entry is committed unchecked.
    pub fills_min: u64,
}

/// `http://host/path?q` → (`host`, `/path?q`).
/// Host and path of a primary key's URL (`http://host/path?q`).
pub fn split_url(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    }
}

/// Entries checked between two yields of the sweeper, so that it never holds a worker long.
const SWEEP_BATCH: usize = 512;

impl MemoryStorage {
    /// One pass of the ban sweeper (Varnish's "ban lurker"): check every entry against the
    /// ban and tag records it has not been checked against (up to sequence number `upto`),
    /// remove what hard records match, mark stale what soft ones match, and move the check
    /// mark of the rest to `upto`. Hits then skip those records, and the records can be
    /// dropped once nothing older can arrive ([`SweepReport::fills_min`], [`MemoryStorage::inserted_min_ms`]).
    ///
    /// The table is only read-locked while references to the entries to check are collected;
    /// regexes run outside the locks, a batch at a time.
    pub async fn sweep(&self, validity: &Validity, upto: u64) -> SweepReport {
        self.inserted_min_ms.store(u64::MAX, Ordering::Release);
        let floor = validity.floor_ms();
        let generation = self.generation.load(Ordering::Acquire);
        let mut fills_min = u64::MAX;
        let mut todo: Vec<(HashBinary, Option<HashBinary>, Arc<Stored>)> = Vec::new();
        for row in self.table.iter() {
            for slot in row.value() {
                if let Some(fill) = &slot.fill {
                    fills_min = fills_min.min(millis(fill.meta.updated));
                }
                let Some(e) = &slot.entry else { continue };
                if e.generation == generation
                    && (e.checked.load(Ordering::Acquire) < upto || millis(e.meta.updated) < floor)
                {
                    todo.push((*row.key(), slot.variance, e.clone()));
                }
            }
        }
        let mut report = SweepReport {
            fills_min,
            ..Default::default()
        };
        for batch in todo.chunks(SWEEP_BATCH) {
            for (primary, variance, e) in batch {
                let (host, path) = split_url(&e.url);
                let checked = e.checked.load(Ordering::Acquire);
                report.checked += 1;
                match validity.check(host, path, e.meta.updated, &e.meta.header.headers, checked) {
                    Verdict::Valid => {
                        e.checked.fetch_max(upto, Ordering::AcqRel);
                    }
                    Verdict::Stale(at) => {
                        let stale = e.expired(at);
                        stale.checked.fetch_max(upto, Ordering::AcqRel);
                        if self.replace_if_same(*primary, *variance, e, Some(stale)) {
                            report.stale += 1;
                        }
                    }
                    Verdict::Invalid => {
                        if self.replace_if_same(*primary, *variance, e, None) {
                            report.removed.push(compact(*primary, *variance));
                        }
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        report
    }

    /// Replace (`Some`) or remove (`None`) the committed entry of a variant, if it is still
    /// `current` (not replaced by a refresh meanwhile). Returns whether it was.
    fn replace_if_same(
        &self,
        primary: HashBinary,
        variance: Option<HashBinary>,
        current: &Arc<Stored>,
        with: Option<Arc<Stored>>,
    ) -> bool {
        let Some(mut slots) = self.table.get_mut(&primary) else {
            return false;
        };
        let Some(slot) = slots
            .iter_mut()
            .find(|s| s.variance == variance && s.entry.as_ref().is_some_and(|e| Arc::ptr_eq(e, current)))
        else {
            return false;
        };
        match with {
            Some(e) => slot.entry = Some(e),
            None => {
                slot.entry = None;
                self.account_remove(current.weight);
                slots.retain(|s| s.entry.is_some() || s.fill.is_some());
            }
        }
        drop(slots);
        self.table.remove_if(&primary, |_, slots| slots.is_empty());
        true
    }
}

fn compact(primary: HashBinary, variance: Option<HashBinary>) -> CompactCacheKey {
    CompactCacheKey {
        primary,
        variance: variance.map(Box::new),
        user_tag: "".into(),
    }
}

// === hit handlers ===

/// Reads a committed body: one chunk, shared with the stored [`Bytes`].
pub struct CompleteHit {
    done: bool,
    range: (usize, usize),
    /// The entry served: its ban check mark is read and moved by the proxy.
    entry: Arc<Stored>,
    /// Answered from L2 (and promoted into L1): reported as `detail=l2`.
    from_l2: bool,
    /// The cluster's refresh lock this request took to revalidate the (stale) entry, given
    /// back when the request ends ([`crate::storage::Tiered::refresh_done`]).
    refresh_lock: Option<String>,
}

impl CompleteHit {
    fn of(entry: &Arc<Stored>, from_l2: bool) -> Self {
        CompleteHit {
            done: false,
            range: (0, entry.body.len()),
            entry: entry.clone(),
            from_l2,
            refresh_lock: None,
        }
    }

    /// Was this hit answered from L2?
    /// Attach the cluster's refresh lock to this hit: the request that revalidates the entry
    /// gives it back when it ends.
    pub fn set_refresh_lock(hit: &mut HitHandler, lock: String) {
        if let Some(h) = hit.as_any_mut().downcast_mut::<CompleteHit>() {
            h.refresh_lock = Some(lock);
        }
    }

    /// The refresh lock attached with [`Self::set_refresh_lock`], if any.
    pub fn take_refresh_lock(hit: &mut HitHandler) -> Option<String> {
        hit.as_any_mut()
            .downcast_mut::<CompleteHit>()
            .and_then(|h| h.refresh_lock.take())
    }

    pub fn is_from_l2(hit: &HitHandler) -> bool {
        hit.as_any()
            .downcast_ref::<CompleteHit>()
            .is_some_and(|h| h.from_l2)
    }

    /// Up to which purge record the served entry was checked ([`Validity::check_marked`]);
    /// `None` for a body still streaming.
    pub fn check_mark(hit: &HitHandler) -> Option<&AtomicU64> {
        hit.as_any()
            .downcast_ref::<CompleteHit>()
            .map(|h| &h.entry.checked)
    }
}

/// When the entry behind a hit from this storage was last fetched or revalidated (what bans,
/// purges and a client's `no-cache` compare with); `None` for a hit of another storage.
pub fn validated(hit: &HitHandler) -> Option<SystemTime> {
    let any = hit.as_any();
    any.downcast_ref::<CompleteHit>()
        .map(|h| h.entry.meta.updated)
        .or_else(|| any.downcast_ref::<PartialHit>().map(|h| h.fill.meta.updated))
}

/// Streams a body that is still being written.
struct PartialHit {
    fill: Arc<Fill>,
    state: watch::Receiver<FillState>,
    /// The next chunk to read.
    next: usize,
    /// Body offset of that chunk.
    pos: usize,
    /// The byte range asked for (`end` exclusive): a Range request served while the body is
    /// still arriving is cut as it streams.
    range: Option<(usize, Option<usize>)>,
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.entry.body.slice(self.range.0..self.range.1)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.entry.body.len() {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start out of range {start} >= {}", self.entry.body.len()),
            );
        }
        self.range = (
            start,
            end.map_or(self.entry.body.len(), |e| e.min(self.entry.body.len())),
        );
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.entry.weight
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let state = *self.state.borrow_and_update();
            let readable = match state {
                FillState::Partial(n) | FillState::Done(n) => n,
                FillState::Aborted => {
                    return Error::e_explain(ErrorType::InternalError, "cache fill aborted by its writer")
                }
            };
            if let Some((_, Some(end))) = self.range {
                if self.pos >= end {
                    return Ok(None);
                }
            }
            if self.next < readable {
                let chunk = self.fill.chunks.lock()[self.next].clone();
                self.next += 1;
                let at = self.pos;
                self.pos += chunk.len();
                let Some((start, end)) = self.range else {
                    return Ok(Some(chunk));
                };
                let from = start.saturating_sub(at).min(chunk.len());
                let to = end.map_or(chunk.len(), |e| e.saturating_sub(at).min(chunk.len()));
                if from < to {
                    return Ok(Some(chunk.slice(from..to)));
                }
                // wholly before the range
                continue;
            }
            if matches!(state, FillState::Done(_)) {
                return Ok(None);
            }
            if self.state.changed().await.is_err() {
                // the sender lives in the Fill, which we hold: this cannot happen, but a reader
                // must never hang or claim a truncated body is whole
                return Error::e_explain(ErrorType::InternalError, "cache fill vanished");
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if let FillState::Done(_) = *self.state.borrow() {
            let len: usize = self.fill.chunks.lock().iter().map(Bytes::len).sum();
            if start >= len {
                return Error::e_explain(
                    ErrorType::InternalError,
                    format!("seek start out of range {start} >= {len}"),
                );
            }
        }
        // read again from the first chunk, keeping only the range
        self.range = Some((start, end));
        self.next = 0;
        self.pos = 0;
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

fn partial_hit(fill: &Arc<Fill>) -> (CacheMeta, HitHandler) {
    let hit = PartialHit {
        fill: fill.clone(),
        state: fill.state.subscribe(),
        next: 0,
        pos: 0,
        range: None,
    };
    (fill.meta.to_meta(), Box::new(hit))
}

// === miss handler ===

struct MemoryMiss {
    storage: &'static MemoryStorage,
    primary: HashBinary,
    variance: Option<HashBinary>,
    fill: Arc<Fill>,
    tag: [u8; 8],
    written: usize,
    finished: bool,
}

#[async_trait]
impl HandleMiss for MemoryMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        let n = {
            let mut chunks = self.fill.chunks.lock();
            if !data.is_empty() {
                self.written += data.len();
                chunks.push(data);
            }
            chunks.len()
        };
        self.fill.state.send_replace(if eof {
            FillState::Done(n)
        } else {
            FillState::Partial(n)
        });
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        // readers still streaming this fill keep indexing its chunks, so they stay; the stored
        // body is joined once here (a copy per fill, never per hit)
        let chunks = self.fill.chunks.lock().clone();
        let body = join(chunks, self.written);
        let generation = self.storage.generation.load(Ordering::Acquire);
        let stored = Stored::new(self.fill.meta.clone(), body, self.fill.url.clone(), generation);
        let weight = self
            .storage
            .commit(self.primary, self.variance, stored, Some(self.fill.id));
        self.finished = true;
        // Pingora may finish without a last `write_body(.., eof = true)` (a chunked body
        // whose end arrives on its own): readers streaming the fill must learn it is whole
        let n = self.fill.chunks.lock().len();
        self.fill.state.send_replace(FillState::Done(n));
        Ok(MissFinishType::Created(weight))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.tag)
    }
}

fn join(chunks: Vec<Bytes>, len: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().expect("one chunk"),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            buf.freeze()
        }
    }
}

impl Drop for MemoryMiss {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // the writer gave up: readers of this fill fail rather than see a truncated body
        self.fill.state.send_replace(FillState::Aborted);
        if let Some(mut slots) = self.storage.table.get_mut(&self.primary) {
            if let Some(slot) = slots.iter_mut().find(|s| s.variance == self.variance) {
                if slot.fill.as_ref().is_some_and(|f| f.id == self.fill.id) {
                    slot.fill = None;
                }
            }
            slots.retain(|s| s.entry.is_some() || s.fill.is_some());
        }
        self.storage.table.remove_if(&self.primary, |_, s| s.is_empty());
    }
}

// === Storage ===

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(slots) = self.table.get(&key.primary_bin()) else {
            return Ok(None);
        };
        let variance = key.variance_bin();
        let Some(slot) = slots.iter().find(|s| s.variance == variance) else {
            return Ok(None);
        };
        // prefer a fill in progress: it is newer than the committed entry
        if let Some(fill) = &slot.fill {
            return Ok(Some(partial_hit(fill)));
        }
        let Some(entry) = slot.entry.as_ref().filter(|e| self.current(e)) else {
            return Ok(None);
        };
        let hit = CompleteHit::of(entry, false);
        Ok(Some((entry.meta.to_meta(), Box::new(hit))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(id) = tag
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_be_bytes)
        else {
            return self.lookup(key, trace).await;
        };
        let Some(slots) = self.table.get(&key.primary_bin()) else {
            return Ok(None);
        };
        let variance = key.variance_bin();
        Ok(slots
            .iter()
            .find(|s| s.variance == variance)
            .and_then(|s| s.fill.as_ref())
            .filter(|f| f.id == id)
            .map(partial_hit))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let id = self.next_fill.fetch_add(1, Ordering::Relaxed);
        let (state, _) = watch::channel(FillState::Partial(0));
        let fill = Arc::new(Fill {
            id,
            meta: MetaParts::from_meta(meta),
            url: url_of(key),
            chunks: Mutex::new(Vec::new()),
            state,
        });
        let primary = key.primary_bin();
        let variance = key.variance_bin();
        {
            let mut slots = self.table.entry(primary).or_default();
            match slots.iter_mut().find(|s| s.variance == variance) {
                Some(slot) => slot.fill = Some(fill.clone()),
                None => slots.push(Slot {
                    variance,
                    entry: None,
                    fill: Some(fill.clone()),
                }),
            }
        }
        self.note_insert(fill.meta.updated);
        Ok(Box::new(MemoryMiss {
            storage: self,
            primary,
            variance,
            fill,
            tag: id.to_be_bytes(),
            written: 0,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key();
        if self.remove_variant(key.primary, key.variance_bin()) {
            Ok(PurgeOutcome::Purged(None))
        } else {
            Ok(PurgeOutcome::NotFound)
        }
    }

    async fn expire(&'static self, target: PurgeTarget<'_>, _trace: &SpanHandle) -> Result<PurgeOutcome> {
        let key = target.key();
        let Some(mut slots) = self.table.get_mut(&key.primary) else {
            return Ok(PurgeOutcome::NotFound);
        };
        let variance = key.variance_bin();
        let Some(slot) = slots.iter_mut().find(|s| s.variance == variance) else {
            return Ok(PurgeOutcome::NotFound);
        };
        let Some(entry) = slot.entry.as_mut() else {
            return Ok(PurgeOutcome::NotFound);
        };
        *entry = entry.expired(SystemTime::now());
        Ok(PurgeOutcome::Expired)
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let Some(mut slots) = self.table.get_mut(&key.primary_bin()) else {
            return Ok(false);
        };
        let variance = key.variance_bin();
        let Some(entry) = slots
            .iter_mut()
            .find(|s| s.variance == variance)
            .and_then(|s| s.entry.as_mut())
        else {
            return Ok(false);
        };
        let updated = entry.with_meta(MetaParts::from_meta(meta));
        let validated = updated.meta.updated;
        *entry = updated;
        drop(slots);
        self.note_insert(validated);
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::Purge;
    use once_cell::sync::Lazy;

    fn meta(max_age: u64) -> CacheMeta {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("content-type", "text/plain").unwrap();
        let now = SystemTime::now();
        CacheMeta::new(now + Duration::from_secs(max_age), now, 0, 0, h)
    }

    async fn fill(s: &'static MemoryStorage, key: &CacheKey, chunks: &[&'static str]) -> usize {
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = s.get_miss_handler(key, &meta(60), &trace).await.unwrap();
        for (i, c) in chunks.iter().enumerate() {
            miss.write_body(Bytes::from_static(c.as_bytes()), i + 1 == chunks.len())
                .await
                .unwrap();
        }
        match miss.finish().await.unwrap() {
            MissFinishType::Created(w) => w,
            MissFinishType::Appended(..) => unreachable!(),
        }
    }

    async fn read_all(h: &mut HitHandler) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = h.read_body().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn miss_then_hit_shares_the_body() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/a", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        assert!(S.lookup(&key, &trace).await.unwrap().is_none());
        let weight = fill(&S, &key, &["hel", "lo"]).await;
        assert_eq!(
            S.stats(),
            MemoryStats {
                entries: 1,
                bytes: weight
            }
        );
        let (m, mut h) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert!(m.is_fresh(SystemTime::now()));
        let body = h.read_body().await.unwrap().unwrap();
        assert_eq!(&body[..], b"hello");
        assert!(h.read_body().await.unwrap().is_none());
        let (_, mut h2) = S.lookup(&key, &trace).await.unwrap().unwrap();
        let body2 = h2.read_body().await.unwrap().unwrap();
        assert_eq!(body.as_ptr(), body2.as_ptr(), "two hits share one buffer");
    }

    #[tokio::test]
    async fn readers_stream_a_fill_in_progress() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/stream", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
        miss.write_body(Bytes::from_static(b"one "), false).await.unwrap();
        let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"one ");
        let writer = tokio::spawn(async move {
            miss.write_body(Bytes::from_static(b"two"), true).await.unwrap();
            miss.finish().await.unwrap();
        });
        assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"two");
        assert!(reader.read_body().await.unwrap().is_none());
        writer.await.unwrap();
        let (_, mut h) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert_eq!(read_all(&mut h).await.unwrap(), b"one two");
    }

    #[tokio::test]
    async fn a_range_is_cut_from_a_fill_in_progress() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/ranged", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
        miss.write_body(Bytes::from_static(b"abc"), false).await.unwrap();
        let (_, mut middle) = S.lookup(&key, &trace).await.unwrap().unwrap();
        let (_, mut tail) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert!(middle.can_seek());
        middle.seek(2, Some(6)).unwrap(); // bytes 2..6: "cdef"
        tail.seek(5, None).unwrap(); // from byte 5: "fgh"
        assert_eq!(&middle.read_body().await.unwrap().unwrap()[..], b"c");
        miss.write_body(Bytes::from_static(b"defg"), false).await.unwrap();
        assert_eq!(&middle.read_body().await.unwrap().unwrap()[..], b"def");
        assert!(middle.read_body().await.unwrap().is_none(), "ends with the range");
        assert_eq!(&tail.read_body().await.unwrap().unwrap()[..], b"fg");
        miss.write_body(Bytes::from_static(b"h"), true).await.unwrap();
        assert_eq!(&tail.read_body().await.unwrap().unwrap()[..], b"h");
        assert!(tail.read_body().await.unwrap().is_none());
        let (_, mut late) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert!(late.seek(8, None).is_err(), "past the end of a finished body");
        miss.finish().await.unwrap();
    }

    #[tokio::test]
    async fn readers_learn_the_end_from_finish_alone() {
        // a chunked body whose last chunk arrives on its own: Pingora finishes the miss
        // without a write_body(.., eof = true)
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/chunked", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
        miss.write_body(Bytes::from_static(b"body"), false).await.unwrap();
        let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"body");
        miss.finish().await.unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), reader.read_body());
        assert!(end.await.expect("the reader learns the end").unwrap().is_none());
    }

    #[tokio::test]
    async fn an_abandoned_fill_fails_its_readers_and_stores_nothing() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/abandoned", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = S.get_miss_handler(&key, &meta(60), &trace).await.unwrap();
        miss.write_body(Bytes::from_static(b"part"), false).await.unwrap();
        let (_, mut reader) = S.lookup(&key, &trace).await.unwrap().unwrap();
        drop(miss);
        assert!(read_all(&mut reader).await.is_err());
        assert!(S.lookup(&key, &trace).await.unwrap().is_none());
        assert_eq!(S.stats(), MemoryStats::default());
    }

    #[tokio::test]
    async fn variants_are_separate_and_purged_together() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut gz = CacheKey::new("http://h/v", "");
        gz.set_variance_key([1; 16]);
        let mut br = CacheKey::new("http://h/v", "");
        br.set_variance_key([2; 16]);
        fill(&S, &gz, &["gz"]).await;
        fill(&S, &br, &["br"]).await;
        let (_, mut h) = S.lookup(&br, &trace).await.unwrap().unwrap();
        assert_eq!(read_all(&mut h).await.unwrap(), b"br");
        let removed = S.remove_primary(&gz.primary_bin());
        assert_eq!(removed.len(), 2);
        assert!(S.lookup(&gz, &trace).await.unwrap().is_none());
        assert!(S.lookup(&br, &trace).await.unwrap().is_none());
        assert_eq!(S.stats(), MemoryStats::default());
    }

    #[tokio::test]
    async fn purge_expire_and_update_meta() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let trace = pingora_cache::trace::Span::inactive().handle();
        let key = CacheKey::new("http://h/p", "");
        fill(&S, &key, &["x"]).await;
        let compact = key.to_compact();
        assert_eq!(
            S.expire(PurgeTarget::Active(&compact), &trace).await.unwrap(),
            PurgeOutcome::Expired
        );
        let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert!(!m.is_fresh(SystemTime::now()), "expired entries stay, stale");
        assert!(S.update_meta(&key, &meta(60), &trace).await.unwrap());
        let (m, _) = S.lookup(&key, &trace).await.unwrap().unwrap();
        assert!(m.is_fresh(SystemTime::now()), "a revalidation freshens it");
        let outcome = S
            .purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, &trace)
            .await
            .unwrap();
        assert_eq!(outcome, PurgeOutcome::Purged(None));
        let outcome = S
            .purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, &trace)
            .await
            .unwrap();
        assert_eq!(outcome, PurgeOutcome::NotFound);
        assert!(!S.update_meta(&key, &meta(60), &trace).await.unwrap());
    }

    #[tokio::test]
    async fn overwrite_keeps_the_accounting_exact() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let key = CacheKey::new("http://h/o", "");
        fill(&S, &key, &["short"]).await;
        let w = fill(&S, &key, &["a longer body"]).await;
        assert_eq!(S.stats(), MemoryStats { entries: 1, bytes: w });
    }

    #[tokio::test]
    async fn clear_hides_everything_at_once_then_frees_it() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let trace = pingora_cache::trace::Span::inactive().handle();
        let a = CacheKey::new("http://h/c1", "");
        fill(&S, &a, &["x"]).await;
        S.clear();
        assert!(S.lookup(&a, &trace).await.unwrap().is_none());
        let b = CacheKey::new("http://h/c2", "");
        let w = fill(&S, &b, &["y"]).await;
        // the sweep runs on the runtime; wait for its effect, bounded
        for _ in 0..1000 {
            if S.stats().entries == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(S.stats(), MemoryStats { entries: 1, bytes: w });
        assert!(S.lookup(&b, &trace).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn sweep_removes_banned_marks_soft_and_tracks_what_escaped() {
        static S: Lazy<MemoryStorage> = Lazy::new(MemoryStorage::new);
        let v = Validity::default();
        let trace = pingora_cache::trace::Span::inactive().handle();
        let keys: Vec<CacheKey> = [
            "http://h/news/1",
            "http://h/news/2",
            "http://h/about",
            "http://h/soft",
        ]
        .iter()
        .map(|u| CacheKey::new(*u, ""))
        .collect();
        for k in &keys {
            fill(&S, k, &["body"]).await;
        }
        // a fill in progress when the pass runs is reported, and so is a later insert
        let pending = CacheKey::new("http://h/pending", "");
        let _miss = S.get_miss_handler(&pending, &meta(60), &trace).await.unwrap();
        std::thread::sleep(Duration::from_millis(3));
        let ban = |url: &str, soft: bool| Purge {
            target: crate::purge::Target::Ban(crate::purge::Ban {
                host: None,
                url: Some(crate::purge::Pattern::new(url).unwrap()),
                content_type: None,
            }),
            soft,
        };
        v.record(&ban("^/news/", false), crate::purge::now_stamp());
        v.record(&ban("^/soft$", true), crate::purge::now_stamp());
        let upto = v.published();

        let report = S.sweep(&v, upto).await;
        assert_eq!((report.checked, report.removed.len(), report.stale), (4, 2, 1));
        assert!(
            report.fills_min < u64::MAX,
            "the fill in progress escaped the pass"
        );
        assert!(S.lookup(&keys[0], &trace).await.unwrap().is_none());
        assert!(S.lookup(&keys[1], &trace).await.unwrap().is_none());
        let (about, hit) = S.lookup(&keys[2], &trace).await.unwrap().unwrap();
        assert_eq!(
            CompleteHit::check_mark(&hit).unwrap().load(Ordering::Acquire),
            upto,
            "checked up to the newest record"
        );
        assert!(about.is_fresh(SystemTime::now()));
        let (soft, _) = S.lookup(&keys[3], &trace).await.unwrap().unwrap();
        assert!(
            !soft.is_fresh(SystemTime::now()),
            "soft-banned: stale, still stored"
        );
        assert_eq!(S.stats().entries, 2);

        // a second pass with nothing new checks nothing
        let again = S.sweep(&v, upto).await;
        assert_eq!((again.checked, again.removed.len()), (0, 0));
        assert_eq!(S.inserted_min_ms(), u64::MAX);
        fill(&S, &CacheKey::new("http://h/late", ""), &["x"]).await;
        assert!(
            S.inserted_min_ms() < u64::MAX,
            "an insert after the pass began is noted"
        );
    }
}
