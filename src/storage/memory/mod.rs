//! L1: the in-memory tier, a pingora-cache [`pingora_cache::storage::Storage`] bounded by bytes.
//!
//! # Layout
//! One [`DashMap`] from the primary hash of a URL to its [`Slots`], one slot per Vary variant
//! (the primary slot inline while it is the only one).
//! Grouping variants under their URL makes "purge every variant of this URL" one map removal,
//! and a lookup is one sharded-map read plus a scan of (usually one) variant.
//!
//! A slot holds the committed entry and, while a miss is being filled, the in-progress
//! [`Fill`]. A lookup prefers the fill: lock waiters and requests that arrive during a refresh
//! stream the new body as it arrives ([`pingora_cache::storage::Storage::support_streaming_partial_write`]) instead of
//! waiting for the whole body or getting the old one.
//!
//! # Hits never copy
//! A committed body is in one buffer (the chunks of the fill, joined once at commit, with
//! the entry's head and URL: [`StoredHeader::pack`]), an `Arc<[u8]>`; a hit hands out
//! [`Bytes`] that share it (one allocation per hit, the owner's box:
//! [`StoredHeader::shared`]). Metadata is kept as parts, the header as a compact
//! [`StoredHeader`], and a hit builds its [`CacheMeta`] from them, with no serialisation and
//! no compression.
//!
//! # Memory bound
//! Each entry weighs its body + its header + a fixed overhead ([`ENTRY_OVERHEAD`]); the weight
//! is reported to the eviction manager ([`crate::storage::eviction`], `memory_bytes` its limit),
//! which asks this storage to purge the entries it chose when the total goes over.
//! [`MemoryStorage::stats`] reports what is actually held.
//!
//! # Emptying in O(1)
//! [`MemoryStorage::clear`] bumps a generation: entries of older generations are invisible at
//! once and are freed by a background sweep.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use pingora_cache::eviction::EvictionManager;
use pingora_cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora_cache::{CacheKey, CacheMeta};
use pingora_http::RequestHeader;
use tokio::sync::watch;

use crate::purge::millis;
use crate::storage::eviction::Eviction;

/// Bookkeeping bytes charged to every entry on top of body and header with its URL
/// ([`StoredHeader::bytes`]): the entry itself, its map row and slot, the eviction manager's
/// node and index, and the allocator's share of each. benches/memory.sh measured 263 bytes
/// (2026-12-02, each URL's origin kept once, `origins.rs`; 295 when it varies), 374 bytes
/// beyond body and header under S3-FIFO with nothing evicted (200,000 objects of 100 bytes
/// and four known fields, 2026-12-01; 402 on the same machine before the head's buffer
/// became an `Arc<[u8]>`, 404 and 428 when it varies on 2026-11-30; on the same machine 464
/// before the body became a slice of the head's buffer and a row's slots lost their
/// variance, 511 before the stored head kept known names as numbers, 533 before an entry
/// lost its kept weight and its inline variance; 555 before a row held its one slot inline;
/// LRU 591, TinyUFO 664 before). The rest is for the allocator's fragmentation once entries
/// are evicted and replaced: with it, RSS grew by 1.03 to 1.16 times the budget (objects of
/// 1 KB to 100 KB, 3x the budget).
pub const ENTRY_OVERHEAD: usize = 1536;

/// How long an invalidation by an unsafe request is kept ([`MemoryStorage::invalidate`]): what
/// was sent for or read before it (a fill, a copy from memcached, a lock waiter's) and lands
/// later than this after it may still be stored.
pub const INVALIDATION_GRACE: Duration = Duration::from_secs(10);

/// Invalidations by unsafe requests kept at most (about 64 bytes each).
pub const MAX_INVALIDATIONS: usize = 100_000;

/// A time as nanoseconds since the Unix epoch, in 8 bytes (a `SystemTime` takes 16, and 16
/// again as an `Option`): L1 keeps four per entry. Exact for every time from 1970 (its first
/// nanosecond excluded) to 2554; an earlier one is that first nanosecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Nanos(std::num::NonZeroU64);

impl Nanos {
    pub fn of(t: SystemTime) -> Nanos {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let n = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        Nanos(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MIN))
    }

    pub fn get(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.0.get())
    }

    /// The nanoseconds since the Unix epoch (never 0).
    pub fn get_nanos(self) -> u64 {
        self.0.get()
    }

    /// [`Self::get_nanos`]'s inverse: `None` for 0, which no `Nanos` is.
    pub fn from_nanos(n: u64) -> Option<Nanos> {
        std::num::NonZeroU64::new(n).map(Nanos)
    }
}

/// [`CacheMeta`] kept as parts, so a hit rebuilds it without deserialising anything.
#[derive(Debug, Clone)]
pub struct MetaParts {
    pub fresh_until: Nanos,
    /// When the response was last fetched or revalidated (pingora's `updated`).
    pub updated: Nanos,
    /// The corral whose clock `updated` is ([`crate::purge::corral_id`]): this one for its
    /// own fills and refreshes, the filling corral for a copy from memcached.
    pub validated_by: u64,
    /// When this entry's lineage began (Pingora's `provenance`): its first admission, kept
    /// across refreshes. For the variant in a URL's primary slot it is the tombstone of the
    /// other variants: Pingora serves only those created after it.
    pub lineage: Nanos,
    pub stale_while_revalidate_sec: u32,
    pub stale_if_error_sec: u32,
    /// How long after `updated` (when its request left) the answer arrived, in ms (0 for a
    /// copy from memcached): a client's `no-cache` is satisfied by an answer that arrived
    /// after the request ([`Arrival`]).
    pub received_ms: u32,
    /// With the entry's URL and its variance ([`Self::variance`]).
    pub header: StoredHeader,
}

/// An answer from the origin as it arrived, kept in its [`CacheMeta`]'s extensions until it
/// is stored: when ([`MetaParts::received_ms`]), and the L1 generation then (a
/// [`MemoryStorage::clear`] since voids its fill).
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: SystemTime,
    pub generation: u64,
}

impl MetaParts {
    /// `url`: the primary key text of the entry ([`url_of`]), kept in its header's buffer.
    pub fn from_meta(meta: &CacheMeta, url: &str) -> Self {
        MetaParts {
            fresh_until: Nanos::of(meta.fresh_until()),
            updated: Nanos::of(meta.updated()),
            validated_by: crate::purge::corral_id(),
            lineage: Nanos::of(meta.provenance()),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            received_ms: meta.extensions().get::<Arrival>().map_or(0, |r| {
                let after = r.at.duration_since(meta.updated()).unwrap_or_default();
                u32::try_from(after.as_millis()).unwrap_or(u32::MAX)
            }),
            header: StoredHeader::for_entry(
                meta.response_header(),
                url,
                meta.variance(),
                meta.epoch_override().map(Nanos::of),
            ),
        }
    }

    /// Rebuild a [`CacheMeta`]. Its `created` (hence `provenance`) is the entry's lineage, so
    /// refreshing the variant in a URL's primary slot does not turn the other variants into
    /// misses. `CacheMeta::new` makes `updated` that same time, so the epoch that `Age` is
    /// measured from is set explicitly, and purge and `no-cache` checks take the last
    /// validation from the hit handler ([`validated`]), not from `updated`.
    pub fn to_meta(&self) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until.get(),
            self.lineage.get(),
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            self.header.to_response(),
        );
        meta.set_epoch_override(self.epoch().get());
        if let Some(v) = self.variance() {
            meta.set_variance_key(v);
        }
        meta
    }

    /// What `Age` counts from: the origin's own age folded into `updated`
    /// ([`StoredHeader::epoch_override`]).
    pub fn epoch(&self) -> Nanos {
        self.header.epoch_override().unwrap_or(self.updated)
    }

    /// The variance of the response (Pingora keeps a URL's first variant in its primary slot,
    /// with its variance).
    pub fn variance(&self) -> Option<HashBinary> {
        self.header.variance()
    }
}

/// A committed response.
#[derive(Debug)]
struct Stored {
    /// Its head, whose buffer holds the body too ([`StoredHeader::pack`]) unless `apart`
    /// says otherwise.
    meta: MetaParts,
    /// The body, when it is not in the head's buffer: a 304 gave the entry a head of its own
    /// (or the body was too large to pack). Boxed: most entries have none, and 8 bytes here
    /// instead of 24 keep the entry's `Arc` in the allocator's 144-byte size class. A fast hit
    /// on such an entry shares two buffers (two allocations), the head's and the body's.
    apart: Option<Box<Apart>>,
    /// The L1 generation it was stored under, its low 32 bits ([`Self::of_generation`]): with
    /// the epoch in the head's buffer ([`StoredHeader::epoch_override`]), 4 bytes less keep
    /// the entry's `Arc` in the allocator's 128-byte size class instead of 144.
    generation: u32,
    /// Ban and tag records up to this sequence number were checked against this entry
    /// ([`crate::purge::Validity`]).
    checked: AtomicU64,
    /// Lookups that found this entry (its lineage's, across refreshes): admin `/keys`.
    hits: std::sync::atomic::AtomicU32,
}

/// A body kept apart from its entry's head ([`Stored::apart`]): `buf[..len]`.
#[derive(Debug, Clone)]
struct Apart {
    buf: Arc<[u8]>,
    len: usize,
    /// Bytes of the body's buffer, after the body, that the head does not account for: the
    /// head the body was stored with ([`StoredHeader::pack`]), which a 304 replaced.
    tail: u32,
}

impl Stored {
    /// A new entry, its body given as chunks: the body and the head are copied into one
    /// buffer ([`StoredHeader::pack`]).
    fn new(meta: MetaParts, body: &[Bytes], generation: u64) -> Arc<Stored> {
        Self::new_and_head(meta, body, generation).0
    }

    /// [`Self::new`], and the head it was given (not packed with the body), for the caller to
    /// free where it should be ([`build`]).
    fn new_and_head(mut meta: MetaParts, body: &[Bytes], generation: u64) -> (Arc<Stored>, StoredHeader) {
        let (header, apart) = meta.header.pack(body);
        let given = std::mem::replace(&mut meta.header, header);
        let stored = Arc::new(Stored {
            meta,
            apart: apart.map(|buf| {
                Box::new(Apart {
                    len: buf.len(),
                    buf,
                    tail: 0,
                })
            }),
            generation: generation as u32,
            checked: AtomicU64::new(0),
            hits: std::sync::atomic::AtomicU32::new(0),
        });
        (stored, given)
    }

    /// Whether it was stored under L1 generation `g`. Only the low 32 bits are kept: an entry
    /// 2^32 clears old would pass, but every clear sweeps the entries of before it
    /// ([`MemoryStorage::clear`]).
    fn of_generation(&self, g: u64) -> bool {
        self.generation == g as u32
    }

    /// Whether it was stored under a generation before `g` (up to 2^31 clears before).
    fn before_generation(&self, g: u64) -> bool {
        ((g as u32).wrapping_sub(self.generation) as i32) > 0
    }

    /// The body (shared, not copied).
    fn body(&self) -> Bytes {
        self.body_slice(0..usize::MAX)
    }

    /// [`Self::body`], sliced from `shared` if the body is in the head's buffer and `shared`
    /// is that buffer ([`StoredHeader::shared`]): a hit's one share of it.
    fn body_in(&self, shared: &Bytes) -> Bytes {
        match &self.apart {
            Some(_) => self.body(),
            None => self.meta.header.body_in(shared),
        }
    }

    /// `body()[range]`, clamped to the body (shared, not copied), wherever the body is.
    fn body_slice(&self, range: std::ops::Range<usize>) -> Bytes {
        match &self.apart {
            Some(apart) => header::body_slice(&apart.buf, range, apart.len),
            None => self.meta.header.body_slice(range),
        }
    }

    fn body_len(&self) -> usize {
        match &self.apart {
            Some(apart) => apart.len,
            None => self.meta.header.body_len(),
        }
    }

    /// Bytes of the body's buffer that its head does not account for ([`Apart::tail`]).
    fn tail(&self) -> u32 {
        self.apart.as_ref().map_or(0, |a| a.tail)
    }

    /// What this entry is charged against `memory_bytes`, and reported to the eviction
    /// manager with. Computed, not kept: every input is fixed for the entry's life, and 8
    /// bytes less keep its `Arc` in a smaller size class of the allocator.
    fn weight(&self) -> usize {
        Self::weigh(&self.meta, self.body_len(), self.tail())
    }

    /// What an entry of this header (with its URL) and a body of `body` bytes is charged
    /// against `memory_bytes`, with `tail` bytes of an older head kept in the body's buffer.
    /// The box of a body kept apart ([`Apart`], 48 bytes after a 304) is part of
    /// [`ENTRY_OVERHEAD`]'s margin.
    fn weigh(meta: &MetaParts, body: usize, tail: u32) -> usize {
        body + tail as usize + meta.header.bytes() + ENTRY_OVERHEAD
    }

    /// [`Self::tail`] once `header` replaces this entry's (in a buffer of its own).
    fn tail_with(&self, header: &StoredHeader) -> u32 {
        debug_assert!(!header.same(&self.meta.header), "the same head keeps its tail");
        if self.apart.is_some() {
            self.tail()
        } else if self.body_len() == 0 {
            // no body keeps the buffer: the head being replaced goes with it
            0
        } else {
            // the head being replaced is the one stored with the body: its bytes, and the
            // buffer's counts, stay with the body
            u32::try_from(self.meta.header.bytes()).unwrap_or(u32::MAX)
        }
    }

    /// The primary key text (`http://host/path?q`): what bans match against.
    fn url(&self) -> Cow<'_, str> {
        self.meta.header.url()
    }

    /// Count a lookup that found this entry.
    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// The same body under new metadata. New headers mean new checks.
    fn with_meta(&self, meta: MetaParts) -> Arc<Stored> {
        // the same head (in the same buffer) keeps the body where it is; another one is a
        // buffer of its own, and the body goes apart
        let apart = if meta.header.same(&self.meta.header) {
            self.apart.clone()
        } else if self.body_len() == 0 {
            // no body, and no buffer kept for one: nothing apart (`tail_with` is 0)
            None
        } else {
            let buf = match &self.apart {
                Some(apart) => Arc::clone(&apart.buf),
                None => Arc::clone(self.meta.header.buffer()),
            };
            Some(Box::new(Apart {
                tail: self.tail_with(&meta.header),
                len: self.body_len(),
                buf,
            }))
        };
        Arc::new(Stored {
            apart,
            meta,
            generation: self.generation,
            checked: AtomicU64::new(0),
            hits: std::sync::atomic::AtomicU32::new(self.hits.load(Ordering::Relaxed)),
        })
    }

    /// This entry, stale from `at` on (the serve-stale windows then run from this moment).
    fn expired(&self, at: SystemTime) -> Arc<Stored> {
        let mut meta = self.meta.clone();
        meta.fresh_until = meta.fresh_until.min(Nanos::of(at - Duration::from_millis(1)));
        // the same header: the weight the eviction manager was told
        let stale = self.with_meta(meta);
        debug_assert_eq!(stale.weight(), self.weight());
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
    pub fn header(&self) -> &StoredHeader {
        &self.0.meta.header
    }

    pub fn body(&self) -> Bytes {
        self.0.body()
    }

    /// [`Self::body`], from `shared` when it is the head's buffer ([`StoredHeader::shared`]),
    /// which the body is in: a hit shares the buffer once for its fields and its body.
    pub fn body_in(&self, shared: &Bytes) -> Bytes {
        self.0.body_in(shared)
    }

    pub fn weight(&self) -> usize {
        self.0.weight()
    }

    pub fn fresh_until(&self) -> SystemTime {
        self.0.meta.fresh_until.get()
    }

    /// When the response was last validated (what bans compare with).
    pub fn updated(&self) -> SystemTime {
        self.0.meta.updated.get()
    }

    /// The corral whose clock [`Self::updated`] is.
    pub fn validated_by(&self) -> u64 {
        self.0.meta.validated_by
    }

    /// What `Age` counts from: the origin's own age is folded into the epoch.
    pub fn epoch(&self) -> SystemTime {
        self.0.meta.epoch().get()
    }

    /// Up to which purge record this entry was checked ([`crate::purge::Validity::check_marked`]).
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
    /// The L1 generation it began under: a [`MemoryStorage::clear`] since voids it (it is
    /// not served, and not stored).
    generation: u64,
    meta: MetaParts,
    chunks: Mutex<Vec<Bytes>>,
    state: watch::Sender<FillState>,
}

/// One Vary variant of a URL: its committed entry, and the fill in progress that will
/// replace it. Its variance is kept by its row ([`Slots`]).
#[derive(Debug, Default)]
struct Slot {
    entry: Option<Arc<Stored>>,
    fill: Option<Arc<Fill>>,
}

impl Slot {
    /// Whether it holds nothing (its row lets it go).
    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.fill.is_none()
    }
}

/// The variants of a URL, its row in the table: its primary slot (variance `None`, where
/// Pingora keeps the URL's first variant) inline when it is the only one, as for most URLs
/// (no allocation of its own, and the row is 24 bytes: 40 with its key), or a list of slots
/// and their variances.
#[derive(Debug)]
enum Slots {
    Primary(Slot),
    Many(Vec<(Option<HashBinary>, Slot)>),
}

impl Default for Slots {
    /// No slot (no allocation).
    fn default() -> Slots {
        Slots::Many(Vec::new())
    }
}

impl IntoIterator for Slots {
    type Item = (Option<HashBinary>, Slot);
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<(Option<HashBinary>, Slot)>,
        std::vec::IntoIter<(Option<HashBinary>, Slot)>,
    >;
    fn into_iter(self) -> Self::IntoIter {
        let (one, many) = match self {
            Slots::Primary(slot) => (Some((None, slot)), Vec::new()),
            Slots::Many(slots) => (None, slots),
        };
        one.into_iter().chain(many)
    }
}

impl Slots {
    /// Whether it holds no slot.
    fn is_empty(&self) -> bool {
        matches!(self, Slots::Many(slots) if slots.is_empty())
    }

    /// The slot of `variance` (`None`: the primary one).
    fn find(&self, variance: Option<HashBinary>) -> Option<&Slot> {
        match self {
            Slots::Primary(slot) => variance.is_none().then_some(slot),
            Slots::Many(slots) => slots.iter().find(|(v, _)| *v == variance).map(|(_, s)| s),
        }
    }

    /// [`Self::find`], to change it.
    fn find_mut(&mut self, variance: Option<HashBinary>) -> Option<&mut Slot> {
        match self {
            Slots::Primary(slot) => variance.is_none().then_some(slot),
            Slots::Many(slots) => slots.iter_mut().find(|(v, _)| *v == variance).map(|(_, s)| s),
        }
    }

    /// The primary slot, if it is the row's only one.
    fn only_primary(&self) -> Option<&Slot> {
        match self {
            Slots::Primary(slot) => Some(slot),
            Slots::Many(_) => None,
        }
    }

    /// Every slot with its variance, in the order they came.
    fn iter(&self) -> impl Iterator<Item = (Option<HashBinary>, &Slot)> {
        let (one, many) = match self {
            Slots::Primary(slot) => (Some(slot), &[][..]),
            Slots::Many(slots) => (None, &slots[..]),
        };
        one.map(|s| (None, s))
            .into_iter()
            .chain(many.iter().map(|(v, s)| (*v, s)))
    }

    /// [`Self::iter`], to change them.
    fn iter_mut(&mut self) -> impl Iterator<Item = (Option<HashBinary>, &mut Slot)> {
        let (one, many) = match self {
            Slots::Primary(slot) => (Some(slot), &mut [][..]),
            Slots::Many(slots) => (None, &mut slots[..]),
        };
        one.map(|s| (None, s))
            .into_iter()
            .chain(many.iter_mut().map(|(v, s)| (*v, s)))
    }

    /// The slot of `variance`, added empty if the row has none (a row holds a few slots at
    /// most: short scans).
    fn get_or_add(&mut self, variance: Option<HashBinary>) -> &mut Slot {
        if self.find(variance).is_none() {
            self.push(variance, Slot::default());
        }
        self.find_mut(variance).expect("there or just added")
    }

    /// Add the slot of `variance`, which the row does not have; returns it. A list starts at
    /// the room it needs (a secondary variant alone: one element, not `Vec`'s four).
    fn push(&mut self, variance: Option<HashBinary>, slot: Slot) -> &mut Slot {
        debug_assert!(self.find(variance).is_none(), "one slot per variance");
        *self = match (std::mem::take(self), variance) {
            (Slots::Many(slots), None) if slots.is_empty() => Slots::Primary(slot),
            (Slots::Many(slots), _) if slots.is_empty() => Slots::Many(vec![(variance, slot)]),
            (Slots::Primary(first), _) => Slots::Many(vec![(None, first), (variance, slot)]),
            (Slots::Many(mut slots), _) => {
                slots.push((variance, slot));
                Slots::Many(slots)
            }
        };
        self.find_mut(variance).expect("just pushed")
    }

    /// Keep the slots for which `keep` is true: a primary slot left alone goes back inline,
    /// no slot left frees the list, and a list of more than four places that kept half of them
    /// or less gives the rest back (not a small one: a URL whose variants come and go would
    /// reallocate its list each time).
    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        match self {
            Slots::Primary(slot) if !keep(slot) => *self = Slots::default(),
            Slots::Primary(_) => {}
            Slots::Many(slots) => {
                slots.retain(|(_, s)| keep(s));
                let roomy = slots.capacity() > 4 && slots.len() <= slots.capacity() / 2;
                match &mut slots[..] {
                    [] => *self = Slots::default(),
                    [(None, _)] => {
                        let (_, slot) = slots.pop().expect("one slot");
                        *self = Slots::Primary(slot);
                    }
                    _ if roomy => slots.shrink_to_fit(),
                    _ => {}
                }
            }
        }
    }

    /// Let the slots that hold nothing go.
    fn prune(&mut self) {
        self.retain(|s| !s.is_empty());
    }
}

/// What [`MemoryStorage::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    pub entries: usize,
    pub bytes: usize,
}

/// The L1 tier. Build it once and leak it: Pingora's [`pingora_cache::storage::Storage`] takes `&'static self`.
#[derive(Debug)]
pub struct MemoryStorage {
    table: DashMap<HashBinary, Slots>,
    bytes: AtomicUsize,
    entries: AtomicUsize,
    /// Bytes of the entries removed since start, in all ([`Self::released`]).
    released: AtomicU64,
    next_fill: AtomicU64,
    generation: AtomicU64,
    /// The oldest validation time (ms) of an entry or fill inserted since the sweeper last
    /// began a pass: such entries may have escaped that pass ([`MemoryStorage::sweep`]).
    inserted_min_ms: AtomicU64,
    /// Every fill in progress, by id, whether or not its slot is still in the table: a purge
    /// removes the URL's row, but the fill goes on and commits, so the records older than it
    /// must stay until the sweeper has seen what it committed, and its writer must still find
    /// it ([`pingora_cache::storage::Storage::lookup_streaming_write`]). Entered when the fill starts, left when it
    /// commits or aborts (a drop guard).
    fills: DashMap<u64, Arc<Fill>>,
    /// Requests gone to the origin whose answers may be stored here, by id, with the time each
    /// left (ms): such an answer is validated as of then, and may arrive after a purge newer
    /// than that. Until it becomes a fill, it counts as one for the records the sweeper keeps
    /// and for the purge log's first read ([`MemoryStorage::awaiting`]).
    awaited: DashMap<u64, u64>,
    next_awaited: AtomicU64,
    /// URLs a successful unsafe request invalidated, and when ([`MemoryStorage::invalidate`]).
    invalidated: DashMap<HashBinary, SystemTime>,
    /// How many `invalidated` holds: read by every commit, without a lock.
    invalidated_len: AtomicUsize,
    /// When [`MemoryStorage::invalidate`] last expired them itself (ms).
    invalidations_expired_ms: AtomicU64,
    /// The eviction manager, told of the entries [`MemoryStorage::clear`] removes (the other
    /// removals return their keys to a caller that tells it).
    eviction: std::sync::OnceLock<&'static crate::storage::eviction::Eviction>,
}

/// A request gone to the origin whose answer may be stored: in [`MemoryStorage`]'s registry
/// from when it leaves until the request ends (a drop guard).
#[derive(Debug)]
pub struct Awaited {
    l1: &'static MemoryStorage,
    id: u64,
}

impl Drop for Awaited {
    fn drop(&mut self) {
        self.l1.awaited.remove(&self.id);
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        MemoryStorage {
            table: DashMap::new(),
            bytes: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            released: AtomicU64::new(0),
            next_fill: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            inserted_min_ms: AtomicU64::new(u64::MAX),
            fills: DashMap::new(),
            awaited: DashMap::new(),
            next_awaited: AtomicU64::new(0),
            invalidated: DashMap::new(),
            invalidated_len: AtomicUsize::new(0),
            invalidations_expired_ms: AtomicU64::new(0),
            eviction: std::sync::OnceLock::new(),
        }
    }
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Weights of the entries removed from L1 since start (evicted, purged, replaced): the rough
    /// measure of freed memory that [`crate::trim`] watches. Not all of it is freed at once (a
    /// reader may hold a body a while longer), and a fill's own buffers are not in it.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Relaxed)
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
        self.released.fetch_add(weight as u64, Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }

    /// The entry for the URL whose primary key hashes to `primary` if a hit needs nothing of
    /// Pingora's cache machinery: committed (no fill in progress), of the current generation,
    /// fresh at `now`, and the URL's only variant with no `Vary`. Anything else is `None`, and
    /// the request takes the full path.
    pub fn fresh_plain(&self, primary: &HashBinary, now: SystemTime) -> Option<FreshEntry> {
        let slots = self.table.get(primary)?;
        let slot = slots.only_primary()?;
        if slot.fill.is_some() {
            return None;
        }
        let entry = slot.entry.as_ref()?;
        let usable = self.current(entry)
            && now < entry.meta.fresh_until.get()
            && entry.meta.variance().is_none()
            && !entry.meta.header.has_vary();
        usable.then(|| {
            entry.hit();
            FreshEntry(entry.clone())
        })
    }

    /// Store a complete entry directly (promotion from L2). Returns its hit handler and weight.
    /// `generation`: the L1 generation when the copy was looked up; `None`, storing nothing, if
    /// a clear has moved it since (the copy is from before the clear).
    ///
    /// The body is copied (with the head, [`StoredHeader::pack`]): from memcached it is a
    /// slice of the whole record (Pingora's serialised meta and header before it), which it
    /// would keep alive unseen by `memory_bytes`, as a fill's chunk would keep the
    /// connection's read buffer. Built on the builder thread, as a fill's entry
    /// ([`build::build`]).
    pub async fn insert(
        &self,
        key: &CacheKey,
        meta: MetaParts,
        body: Bytes,
        generation: u64,
    ) -> Option<(CompleteHit, usize)> {
        let stored = build::build(meta, vec![body], generation).await?;
        let hit = CompleteHit::of(&stored, true);
        let weight = self.commit(key.primary_bin(), key.variance_bin(), stored, None)?;
        Some((hit, weight))
    }

    /// Register a request that left for the origin at `sent` and whose answer may be stored:
    /// until the guard drops, it counts as a fill in progress validated at `sent`.
    pub fn awaiting(&'static self, sent: SystemTime) -> Awaited {
        let id = self.next_awaited.fetch_add(1, Ordering::Relaxed);
        self.awaited.insert(id, millis(sent));
        Awaited { l1: self, id }
    }

    /// A successful unsafe request invalidated the URL of `primary` at `at` (RFC 9111 §4.4):
    /// its variants are removed, and what was validated before `at` and arrives after it (a
    /// fill the origin composed before the unsafe request, a copy read from memcached before
    /// it) is not stored ([`Self::commit`]), nor served on an error
    /// ([`Self::invalidated_since`]). Returns the keys removed.
    ///
    /// Clients make these, so they are not purge records: no sequence number, nothing the
    /// sweeper walks L1 for, nothing a hit checks. Kept [`INVALIDATION_GRACE`], at most
    /// [`MAX_INVALIDATIONS`]; past that the URL's variants are removed and nothing is
    /// recorded (false).
    pub fn invalidate(&self, primary: HashBinary, at: SystemTime) -> (Vec<CompactCacheKey>, bool) {
        let full = || {
            self.invalidated_len.load(Ordering::Relaxed) >= MAX_INVALIDATIONS
                && !self.invalidated.contains_key(&primary)
        };
        if full() {
            // the sweeper may not have passed for a while (`purge.sweep_interval`); at most
            // once a second, or a flood of POSTs would walk the whole map each
            let now = SystemTime::now();
            let last = self.invalidations_expired_ms.load(Ordering::Relaxed);
            let due = millis(now) >= last + 1000;
            if due
                && self
                    .invalidations_expired_ms
                    .compare_exchange(last, millis(now), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.expire_invalidations(now);
            }
        }
        let recorded = !full();
        if recorded {
            // recorded (and counted) before the removal: a commit, under the row's lock,
            // either sees it or comes before the removal
            let mut when = self.invalidated.entry(primary).or_insert_with(|| {
                self.invalidated_len.fetch_add(1, Ordering::Relaxed);
                at
            });
            *when = (*when).max(at);
        }
        (self.remove_primary(&primary), recorded)
    }

    /// Whether the URL of `primary` was invalidated by an unsafe request after `validated`.
    /// One atomic load while none is kept (every commit asks).
    pub fn invalidated_since(&self, primary: &HashBinary, validated: SystemTime) -> bool {
        self.invalidated_len.load(Ordering::Relaxed) > 0
            && self.invalidated.get(primary).is_some_and(|at| validated < *at)
    }

    /// Forget the invalidations older than [`INVALIDATION_GRACE`]. By time alone: nothing a
    /// client holds open (a slow revalidation, a stale copy read slowly) keeps them. The
    /// sweeper calls it, and [`Self::invalidate`] when the bound is reached.
    pub fn expire_invalidations(&self, now: SystemTime) {
        if self.invalidated_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let horizon = now - INVALIDATION_GRACE;
        self.invalidated.retain(|_, at| {
            let keep = *at >= horizon;
            if !keep {
                self.invalidated_len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    /// Invalidations kept ([`Self::invalidate`]).
    pub fn invalidations(&self) -> usize {
        self.invalidated_len.load(Ordering::Relaxed)
    }

    /// The oldest validation time (ms) of a fill in progress now, or of an answer awaited
    /// from the origin (`u64::MAX`: none).
    pub fn fills_min_ms(&self) -> u64 {
        let fills = self.fills.iter().map(|f| millis(f.value().meta.updated.get()));
        let awaited = self.awaited.iter().map(|a| *a.value());
        fills.chain(awaited).min().unwrap_or(u64::MAX)
    }

    /// Fills in progress now, and answers awaited from the origin that may become fills.
    pub fn fills_in_progress(&self) -> usize {
        self.fills.len() + self.awaited.len()
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
    /// `None`, storing nothing, if a clear moved the generation since the entry began (its
    /// sweep would not find an entry stored now: checked under the row's lock, which the
    /// sweep takes after the move), or if an unsafe request invalidated the URL after the
    /// entry was validated ([`Self::invalidate`]).
    fn commit(
        &self,
        primary: HashBinary,
        variance: Option<HashBinary>,
        stored: Arc<Stored>,
        fill: Option<u64>,
    ) -> Option<usize> {
        let weight = stored.weight();
        let mut slots = self.table.entry(primary).or_default();
        // (checked under the row's lock: an invalidation records before it removes the row)
        let invalidated = self.invalidated_since(&primary, stored.meta.updated.get());
        if !stored.of_generation(self.generation()) || invalidated {
            drop(slots);
            match fill {
                Some(id) => self.take_fill(primary, variance, id),
                None => {
                    self.table.remove_if(&primary, |_, s| s.is_empty());
                }
            }
            return None;
        }
        let slot = slots.get_or_add(variance);
        let validated = stored.meta.updated.get();
        if let Some(old) = slot.entry.replace(stored) {
            self.account_remove(old.weight());
        }
        self.account_add(weight);
        if fill.is_some() && slot.fill.as_ref().map(|f| f.id) == fill {
            slot.fill = None;
        }
        drop(slots);
        self.note_insert(validated);
        Some(weight)
    }

    /// Take `key`, whose entry a sweep or a clear removed, out of the eviction manager; if the
    /// variant holds an entry of the current generation after that (filled again meanwhile,
    /// and perhaps admitted before this removal), track it again through the manager's
    /// `access`, as its next hit would (a use, and S3-FIFO puts it in its small queue).
    /// Checked first and removed after, a refill admitted in between was untracked: L1 held
    /// it, uncounted by the manager, never evicted unless hit again. No lock of L1 is held
    /// while the manager is called (its admissions may hold its own for a long eviction).
    pub fn untrack(&self, key: &CompactCacheKey, eviction: &Eviction) {
        self.untrack_with(key, eviction, || eviction.remove_tracked(key));
    }

    /// [`Self::untrack`] with `remove` as the removal, which says whether the manager tracked
    /// the key: if it did not (it evicted the entry meanwhile, its removal from L1 on its way),
    /// nothing is tracked again.
    fn untrack_with(&self, key: &CompactCacheKey, eviction: &Eviction, remove: impl FnOnce() -> bool) {
        if !remove() {
            return;
        }
        let variance = key.variance.as_deref().copied();
        let current = self.table.get(&key.primary).and_then(|slots| {
            let entry = slots.find(variance)?.entry.as_ref()?;
            self.current(entry)
                .then(|| (entry.weight(), entry.meta.fresh_until.get()))
        });
        if let Some((weight, fresh_until)) = current {
            let item = pingora_cache::CacheEntryKey::from_entry_id(key.clone(), None);
            eviction.access(&item, weight, fresh_until);
        }
    }

    /// Take a fill out of its slot (if still there), storing nothing: one a clear voided, or
    /// one that was given up.
    fn take_fill(&self, primary: HashBinary, variance: Option<HashBinary>, fill: u64) {
        if let Some(mut slots) = self.table.get_mut(&primary) {
            if let Some(slot) = slots.find_mut(variance) {
                if slot.fill.as_ref().is_some_and(|f| f.id == fill) {
                    slot.fill = None;
                }
            }
            slots.prune();
        }
        self.table.remove_if(&primary, |_, s| s.is_empty());
    }

    /// Put the header of a 304 that revalidated the committed entry for `key` in place
    /// (RFC 9111 §4.3.4), and weigh the entry again: a 304 may bring fields the stored
    /// response did not have, and they are charged like any others. Returns the entry's
    /// weights before and after, and its body; `None` if there is no such entry.
    ///
    /// Not an entry a clear made invisible, nor by a 304 that arrived before a clear: that
    /// copy is from before the clear, and must not be refreshed (in memcached either). Nor
    /// another copy than the one validated (its lineage, which Pingora carries over).
    pub fn revalidate(&self, key: &CacheKey, meta: &CacheMeta) -> Option<(usize, usize, Bytes)> {
        let mut slots = self.table.get_mut(&key.primary_bin())?;
        let variance = key.variance_bin();
        let entry = slots
            .find_mut(variance)
            .and_then(|s| s.entry.as_mut())
            .filter(|e| self.current(e) && self.fill_generation(meta) == self.generation())?;
        let parts = MetaParts::from_meta(meta, &entry.url());
        if parts.lineage != entry.meta.lineage {
            // the slot holds another copy than the one this 304 validated (refilled from
            // memcached or the origin meanwhile): it says nothing about this one
            return None;
        }
        let old = entry.weight();
        let updated = entry.with_meta(parts);
        let new = updated.weight();
        let (validated, body) = (updated.meta.updated.get(), updated.body());
        *entry = updated;
        // under the row's lock, as every other change of the count
        self.bytes.fetch_add(new, Ordering::Relaxed);
        self.bytes.fetch_sub(old, Ordering::Relaxed);
        drop(slots);
        self.note_insert(validated);
        Some((old, new, body))
    }

    /// The stored entry `req` would be answered with, for the primary `key`, if it is
    /// complete and stale at `now`: when it was last validated, and the variance of its slot
    /// (`None`: the primary slot, where Pingora keeps the first variant). `None` if there is no
    /// such entry, a fill is under way, or it is fresh.
    pub fn stale_validated(
        &self,
        key: &CacheKey,
        req: &RequestHeader,
        key_headers: &[http::HeaderName],
        now: SystemTime,
    ) -> Option<(SystemTime, Option<HashBinary>)> {
        let slots = self.table.get(&key.primary_bin())?;
        let primary = slots.find(None)?;
        let (mut slot, mut variance) = (primary, None);
        if let Some(entry) = &primary.entry {
            let wanted = crate::key::variance_for(&entry.meta.header, req, key_headers);
            if wanted != entry.meta.variance() {
                // another variant: its own (secondary) slot
                variance = Some(wanted?);
                slot = slots.find(variance)?;
            }
        }
        if slot.fill.is_some() {
            return None;
        }
        let entry = slot.entry.as_ref().filter(|e| self.current(e))?;
        (entry.meta.fresh_until.get() <= now).then_some((entry.meta.updated.get(), variance))
    }

    /// Remove every variant of the URL whose primary hash is `primary`. Returns the compact
    /// keys removed (for the eviction manager) .
    pub fn remove_primary(&self, primary: &HashBinary) -> Vec<CompactCacheKey> {
        let Some((_, slots)) = self.table.remove(primary) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for (variance, slot) in slots {
            // a fill in progress is left to finish: it started before this call returns,
            // and the proxy's validity checks decide whether it may be served
            if let Some(entry) = &slot.entry {
                self.account_remove(entry.weight());
                removed.push(compact(*primary, variance));
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
        for entry in slots.iter_mut().filter_map(|(_, s)| s.entry.as_mut()) {
            *entry = entry.expired(now);
            n += 1;
        }
        n
    }

    /// The eviction manager that [`MemoryStorage::clear`] tells of what it removes, and that
    /// weighs an admission by what this storage holds for its key ([`Eviction::weigh_by`]).
    pub fn set_eviction(&'static self, eviction: &'static crate::storage::eviction::Eviction) {
        let _ = self.eviction.set(eviction);
        eviction.weigh_by(self);
    }

    /// The weight of the entry of `key` this storage holds (of the current generation), if
    /// any. Takes a read lock of the key's shard of the table: never called with one held.
    pub fn held_weight(&self, key: &CompactCacheKey) -> Option<usize> {
        let variance = key.variance.as_deref().copied();
        let slots = self.table.get(&key.primary)?;
        let entry = slots.find(variance)?.entry.as_ref()?;
        self.current(entry).then(|| entry.weight())
    }

    /// The current L1 generation (moved by each [`MemoryStorage::clear`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The L1 generation a fill of `meta` belongs to: the one its answer arrived under
    /// ([`Arrival`]), else the current one.
    pub fn fill_generation(&self, meta: &CacheMeta) -> u64 {
        meta.extensions()
            .get::<Arrival>()
            .map_or_else(|| self.generation(), |a| a.generation)
    }

    /// Make every entry invisible at once (O(1)), and void the fills in progress (what they
    /// bring began before this); a background task frees the entries, and tells the eviction
    /// manager.
    pub fn clear(&'static self) {
        let old = self.generation.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            self.sweep_before(old + 1).await;
        });
    }

    /// Free the entries of generations before `generation` (lookups no longer see them);
    /// how many. The row keys are collected in one pass (each shard read-locked in turn), then
    /// the rows are swept a batch at a time, each row under its own lock, the entries dropped
    /// outside the table's locks, with a yield between batches: a clear of a million entries
    /// does not hold a shard's lock (and every request for a key in it) for all of its rows.
    ///
    /// The eviction manager is told after each batch, outside the locks, or the entries of
    /// before keep their weight there: they would hold the budget (in TinyUFO's or S3-FIFO's
    /// main queue), and every new entry be evicted at once. A key refilled since the sweep
    /// passed it is tracked again after ([`Self::untrack`]).
    async fn sweep_before(&self, generation: u64) -> usize {
        // every row there now; a row made after the clear holds no entry from before it
        // (`commit` checks the generation under the row's lock)
        let rows: Vec<HashBinary> = self.table.iter().map(|r| *r.key()).collect();
        let mut count = 0;
        for batch in rows.chunks(sweep::SWEEP_BATCH) {
            let mut freed = Vec::with_capacity(batch.len());
            let mut removed = Vec::with_capacity(batch.len());
            for primary in batch {
                if let Some(mut slots) = self.table.get_mut(primary) {
                    for (variance, slot) in slots.iter_mut() {
                        if slot
                            .entry
                            .as_ref()
                            .is_some_and(|e| e.before_generation(generation))
                        {
                            let e = slot.entry.take().expect("checked above");
                            self.account_remove(e.weight());
                            removed.push(compact(*primary, variance));
                            freed.push(e);
                        }
                    }
                    slots.prune();
                }
                self.table.remove_if(primary, |_, slots| slots.is_empty());
            }
            drop(freed);
            count += removed.len();
            if let Some(eviction) = self.eviction.get() {
                for key in &removed {
                    self.untrack(key, eviction);
                }
            }
            tokio::task::yield_now().await;
        }
        count
    }

    fn current(&self, entry: &Arc<Stored>) -> bool {
        entry.of_generation(self.generation.load(Ordering::Acquire))
    }

    /// Remove one variant; returns whether something was removed.
    pub fn remove_variant(&self, primary: HashBinary, variance: Option<HashBinary>) -> bool {
        let mut removed = false;
        if let Some(mut slots) = self.table.get_mut(&primary) {
            if let Some(slot) = slots.find_mut(variance) {
                if let Some(e) = slot.entry.take() {
                    self.account_remove(e.weight());
                    removed = true;
                }
            }
            slots.prune();
        }
        // drop the URL's row if that was its last variant; the re-check under the write lock
        // keeps a concurrent insert
        self.table.remove_if(&primary, |_, slots| slots.is_empty());
        removed
    }
}

/// The primary key text of `key`: what bans match, kept with the entry.
pub fn url_of(key: &CacheKey) -> &str {
    key.primary_key_str().unwrap_or("")
}

fn compact(primary: HashBinary, variance: Option<HashBinary>) -> CompactCacheKey {
    CompactCacheKey {
        primary,
        variance: variance.map(Box::new),
        user_tag: "".into(),
    }
}

mod backend;
mod build;
mod fill;
mod header;
mod hit;
mod listing;
mod origins;
pub use origins::numbered as numbered_origins;
mod sweep;
pub use listing::{Cursor, KeyInfo, Listed};

pub use header::StoredHeader;
pub use hit::{received, validated, CompleteHit};
pub use sweep::{split_url, SweepReport};

#[cfg(test)]
mod tests;
