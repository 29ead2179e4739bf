//! Validity records: bans, tag purges and URL purges, checked against each hit and by the
//! sweeper; how they fold and expire.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::header::HeaderName;
use parking_lot::RwLock;
use pingora_cache::{CacheMeta, ForcedFreshness};

use super::parse::split_tags;
use crate::fields::{Fields, Value};

mod checkpoint;
use super::{Ban, Pattern, Purge, Target, MAX_RECORDS};

/// Milliseconds since the epoch (0 before it).
pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// How long a hard URL purge's record is kept at least, for the L2 delete that follows its
/// log record (a purge whose delete does not land within `memcached.op_timeout` is answered
/// 503, and promises nothing).
const L2_DELETE_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Stamp {
    at: SystemTime,
    soft: bool,
    /// Local arrival order: an entry checked up to `seq` needs only records after it.
    seq: u64,
    /// Whether memcached may still hold an entry it covers (a hard URL purge deletes the L2
    /// copy: its record is needed only until L1 is swept).
    l2: bool,
    /// The corral that accepted the purge ([`super::corral_id`]): `at` is its clock.
    by: u64,
}

/// Put a record under `key` (a tag, a URL) where one may be already: the two become one that
/// covers what either covers. A record read late from the log can be older than the one
/// kept; it must not shorten what is covered.
fn merge(map: &DashMap<String, Stamp>, key: String, new: Stamp) {
    map.entry(key)
        .and_modify(|old| {
            *old = Stamp {
                at: old.at.max(new.at),
                // hard wins; a soft one only where both are
                soft: old.soft && new.soft,
                // checked again by every entry, as a new record
                seq: new.seq,
                l2: old.l2 || new.l2,
                // one clock if both are on it; otherwise none, so the margin always applies
                by: if old.by == new.by { old.by } else { 0 },
            }
        })
        .or_insert(new);
}

/// A ban or tag record's effect on one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No record newer than the entry matches it.
    Valid,
    /// A soft record matches: stale from this moment on.
    Stale(SystemTime),
    /// A hard record matches: the entry is gone.
    Invalid,
}

impl Verdict {
    /// The forced freshness a hit gets for this verdict (`None`: serve it).
    pub fn forced(self) -> Option<ForcedFreshness> {
        match self {
            Verdict::Valid => None,
            // another corral's clock may be ahead: never stale from the future
            Verdict::Stale(at) => Some(ForcedFreshness::ForceExpiredServeStale {
                expired_at: Some(at.min(SystemTime::now())),
            }),
            Verdict::Invalid => Some(ForcedFreshness::ForceMiss),
        }
    }
}

/// Bans and tag purges, checked lazily against each hit, and by the sweeper
/// ([`super::sweep::Sweeper`]) against every entry.
///
/// Every record carries the time it was accepted (it covers entries validated before that)
/// and a local sequence number. An entry that was checked against every record up to some
/// sequence number keeps that number ("checked"), so the next check looks only at records
/// that arrived since: a hit on an entry pays for a ban once, not on every hit. Once every
/// entry has been checked past a record, and no entry older than it can still arrive (from a
/// fill in progress or from L2), the record is dropped ([`Validity::expire`]): that is how
/// bans expire. [`MAX_RECORDS`] remains a hard bound if purges come faster than that.
#[derive(Debug)]
pub struct Validity {
    /// Records of each kind kept before the oldest half is folded ([`MAX_RECORDS`]).
    limit: usize,
    /// Bans, sorted by `at`.
    bans: RwLock<Vec<(Ban, Stamp)>>,
    /// Tag patterns, sorted by `at`.
    patterns: RwLock<Vec<(HeaderName, Pattern, Stamp)>>,
    tags: DashMap<String, Stamp>,
    /// Purged URLs (primary key text), for entries this corral did not remove itself: fills
    /// in progress during the purge, and other corrals' purges read from the purge log.
    urls: DashMap<String, Stamp>,
    /// Entries validated before this (ms since the epoch) are invalid: where old records fold.
    floor_ms: AtomicU64,
    /// The record sequence number when the floor last moved.
    floor_seq: AtomicU64,
    /// Writers take this, so that sequence numbers are published in order.
    writer: parking_lot::Mutex<u64>,
    /// Every record with a sequence number up to this one is in the lists.
    published: AtomicU64,
    /// Fast path: false while there is nothing to check.
    any: AtomicBool,
    /// `purge.clock_skew` ([`Self::with_skew`]).
    skew: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Self::with_limit(MAX_RECORDS)
    }
}

/// The response headers that carry tags, and how they separate them.
pub const TAG_HEADERS: [(&str, char); 8] = [
    ("xkey", ' '),
    ("surrogate-key", ' '),
    ("cache-tags", ' '),
    ("cache-tag", ','),
    ("purge-cache-tags", ' '),
    ("x-cache-tags", ','),
    ("x-magento-tags", ','),
    ("x-ids-involved", '#'),
];

impl Validity {
    pub fn with_limit(limit: usize) -> Self {
        Validity {
            limit: limit.max(2),
            bans: RwLock::default(),
            patterns: RwLock::default(),
            tags: DashMap::new(),
            urls: DashMap::new(),
            floor_ms: AtomicU64::new(0),
            floor_seq: AtomicU64::new(0),
            writer: parking_lot::Mutex::new(0),
            published: AtomicU64::new(0),
            any: AtomicBool::new(false),
            skew: Duration::ZERO,
        }
    }

    /// `purge.clock_skew`: a purge accepted at T by another corral covers what was validated
    /// before T + `skew` by another clock than its own.
    pub fn with_skew(mut self, skew: Duration) -> Self {
        self.skew = skew;
        self
    }

    /// How much later than `s.at` an entry validated `by` a corral may be and still be
    /// covered: nothing on the same clock, `skew` across two clocks.
    fn margin(&self, s: &Stamp, by: u64) -> Duration {
        if s.by == by {
            Duration::ZERO
        } else {
            self.skew
        }
    }

    /// The margin for comparing a time of this corral's clock (the floor) with one `by`.
    fn skew_for(&self, by: u64) -> Duration {
        if by == super::corral_id() {
            Duration::ZERO
        } else {
            self.skew
        }
    }

    /// The newest record's sequence number: an entry checked now is checked up to this.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Record a ban, a tag purge or a tag pattern accepted `at` (one pulled late from the
    /// purge log still applies by its own time).
    pub fn record(&self, purge: &Purge, at: SystemTime) {
        self.record_by(purge, at, super::corral_id());
    }

    /// [`Self::record`] for a purge the corral `by` accepted at `at` by its clock.
    pub fn record_by(&self, purge: &Purge, at: SystemTime, by: u64) {
        if matches!(purge.target, Target::All) {
            return;
        }
        let mut last = self.writer.lock();
        let seq = *last + 1;
        let stamp = Stamp {
            at,
            soft: purge.soft,
            seq,
            l2: purge.soft || !matches!(purge.target, Target::Url { .. }),
            by,
        };
        match &purge.target {
            Target::Ban(ban) => {
                let mut bans = self.bans.write();
                let i = bans.partition_point(|(_, s)| s.at <= at);
                // this corral's own purge, read back from memcached's log: kept once
                let known = bans[..i]
                    .iter()
                    .rev()
                    .take_while(|(_, s)| s.at == at)
                    .any(|(b, s)| s.soft == stamp.soft && b.same(ban));
                if known {
                    return;
                }
                bans.insert(i, (ban.clone(), stamp));
                self.fold(&mut bans, seq, |(_, s)| s.at);
            }
            Target::TagPattern { patterns } => {
                let mut p = self.patterns.write();
                let i = p.partition_point(|(_, _, s)| s.at <= at);
                let known = |(h, pattern): &(HeaderName, Pattern)| {
                    p[..i]
                        .iter()
                        .rev()
                        .take_while(|(_, _, s)| s.at == at)
                        .any(|(kh, kp, s)| s.soft == stamp.soft && kh == h && kp.as_str() == pattern.as_str())
                };
                if patterns.iter().all(known) {
                    // this corral's own purge, read back from memcached's log: kept once
                    return;
                }
                for (header, pattern) in patterns {
                    let i = p.partition_point(|(_, _, s)| s.at <= at);
                    p.insert(i, (header.clone(), pattern.clone(), stamp));
                }
                self.fold(&mut p, seq, |(_, _, s)| s.at);
            }
            Target::Tags(tags) => {
                for t in tags {
                    merge(&self.tags, t.clone(), stamp);
                }
                self.fold_map(&self.tags, seq);
            }
            Target::Url { host, path } => {
                merge(&self.urls, crate::key::primary(host, path), stamp);
                self.fold_map(&self.urls, seq);
            }
            Target::All => unreachable!("returned above"),
        }
        *last = seq;
        self.any.store(true, Ordering::Release);
        self.published.store(seq, Ordering::Release);
    }

    /// Everything validated before `at` is invalid (hard).
    pub fn invalidate_all_before(&self, at: SystemTime) {
        let mut last = self.writer.lock();
        *last += 1;
        self.raise_floor(at, *last);
        self.any.store(true, Ordering::Release);
        self.published.store(*last, Ordering::Release);
    }

    fn raise_floor(&self, at: SystemTime, seq: u64) {
        self.floor_ms.fetch_max(millis(at), Ordering::AcqRel);
        self.floor_seq.store(seq, Ordering::Release);
    }

    fn fold_map(&self, map: &DashMap<String, Stamp>, seq: u64) {
        if map.len() <= self.limit {
            return;
        }
        let mut all: Vec<(String, SystemTime)> =
            map.iter().map(|e| (e.key().clone(), e.value().at)).collect();
        all.sort_by_key(|(_, at)| *at);
        let cut = &all[..all.len() / 2];
        if let Some((_, newest)) = cut.last() {
            // the folded records may be on other clocks
            self.raise_floor(*newest + self.skew, seq);
        }
        for (k, _) in cut {
            map.remove(k);
        }
    }

    fn fold<T>(&self, list: &mut Vec<T>, seq: u64, at: impl Fn(&T) -> SystemTime) {
        if list.len() <= self.limit {
            return;
        }
        // the list is sorted by time: fold the oldest half into the floor
        let half = list.len() / 2;
        if let Some(newest) = list.get(half - 1).map(&at) {
            // the folded records may be on other clocks
            self.raise_floor(newest + self.skew, seq);
        }
        list.drain(..half);
    }

    /// Drop the records every entry has been checked past: those with a sequence number up to
    /// `checked` (the sweeper checked every L1 entry up to it) accepted at or before the
    /// horizon (no entry validated before it can still arrive): `l1_horizon` for records
    /// that cannot concern L2, `l2_horizon` (older: memcached values live longer) for the
    /// others. The floor goes the same way. Returns how many records were dropped.
    pub fn expire(&self, checked: u64, l1_horizon: SystemTime, l2_horizon: SystemTime) -> usize {
        let _writer = self.writer.lock();
        let l2_horizon = l2_horizon.min(l1_horizon);
        // a record covers what was validated up to `skew` after it (another corral's clock).
        // A hard URL purge deletes the L2 copy right after it logs the record, so until that
        // delete has surely landed its record is needed for what L2 may still hand out
        let l1_horizon = l1_horizon.min(SystemTime::now() - L2_DELETE_GRACE);
        let gone =
            |s: &Stamp| s.seq <= checked && s.at + self.skew <= if s.l2 { l2_horizon } else { l1_horizon };
        let mut dropped = 0;
        {
            let mut bans = self.bans.write();
            let before = bans.len();
            bans.retain(|(_, s)| !gone(s));
            dropped += before - bans.len();
        }
        {
            let mut p = self.patterns.write();
            let before = p.len();
            p.retain(|(_, _, s)| !gone(s));
            dropped += before - p.len();
        }
        for map in [&self.tags, &self.urls] {
            let before = map.len();
            map.retain(|_, s| !gone(s));
            dropped += before - map.len();
        }
        let floor = self.floor_ms.load(Ordering::Acquire);
        // the floor covers L2 values too
        if floor > 0 && self.floor_seq.load(Ordering::Acquire) <= checked && floor <= millis(l2_horizon) {
            self.floor_ms.store(0, Ordering::Release);
        }
        if self.is_empty() && self.floor_ms.load(Ordering::Acquire) == 0 {
            self.any.store(false, Ordering::Release);
        }
        dropped
    }

    /// Heap bytes the records hold (estimated from their sizes), for
    /// `corral_purge_record_bytes`. Walks every record: called at scrape time only.
    pub fn heap_bytes(&self) -> usize {
        // a DashMap entry: key, value, and the table's per-entry overhead
        let entry = std::mem::size_of::<(String, Stamp)>() + 16;
        let bans: usize = self
            .bans
            .read()
            .iter()
            .map(|(b, _)| std::mem::size_of::<(Ban, Stamp)>() + b.heap_bytes())
            .sum();
        let patterns: usize = self
            .patterns
            .read()
            .iter()
            .map(|(_, p, _)| std::mem::size_of::<(HeaderName, Pattern, Stamp)>() + p.heap_bytes())
            .sum();
        let maps: usize = [&self.tags, &self.urls]
            .into_iter()
            .map(|m| m.iter().map(|e| e.key().capacity() + entry).sum::<usize>())
            .sum();
        bans + patterns + maps
    }

    /// How many records are kept (bans + patterns + tags + URLs).
    pub fn len(&self) -> usize {
        self.bans.read().len() + self.patterns.read().len() + self.tags.len() + self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the oldest record kept was accepted.
    pub fn oldest(&self) -> Option<SystemTime> {
        let bans = self.bans.read().first().map(|(_, s)| s.at);
        let patterns = self.patterns.read().first().map(|(_, _, s)| s.at);
        let maps = [&self.tags, &self.urls]
            .into_iter()
            .filter_map(|m| m.iter().map(|e| e.value().at).min());
        bans.into_iter().chain(patterns).chain(maps).min()
    }

    /// Entries validated before this (ms since the epoch) are invalid; 0 if none.
    pub fn floor_ms(&self) -> u64 {
        self.floor_ms.load(Ordering::Acquire)
    }

    /// Is there anything to check at all?
    pub fn active(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Is the entry `meta` for `host` + `path` still valid? `None` if it is; otherwise how
    /// to treat it (a miss for hard purges, stale for soft ones).
    pub fn verdict(&self, host: &str, path: &str, meta: &CacheMeta) -> Option<ForcedFreshness> {
        self.check(host, path, meta.updated(), super::corral_id(), meta.headers(), 0)
            .forced()
    }

    /// [`Validity::check`] for a stored entry that keeps its check mark in `mark` (`None`: it
    /// has none, e.g. a body still streaming): only the records after the mark are checked,
    /// and if none matches, the mark moves to the newest record, so a hit pays for a record
    /// once.
    pub fn check_marked(
        &self,
        host: &str,
        path: &str,
        validated: SystemTime,
        by: u64,
        headers: &impl Fields,
        mark: Option<&AtomicU64>,
    ) -> Verdict {
        if !self.active() {
            return Verdict::Valid;
        }
        // read before checking: a record published meanwhile stays above the mark
        let upto = self.published();
        let checked = mark.map_or(0, |m| m.load(Ordering::Acquire));
        let verdict = self.check(host, path, validated, by, headers, checked);
        match mark {
            // no write when the mark is current: hot entries are read by every worker
            Some(m) if verdict == Verdict::Valid && checked < upto => {
                m.fetch_max(upto, Ordering::AcqRel);
            }
            _ => {}
        }
        verdict
    }

    /// The verdict on an entry validated at `validated` by the corral `by` (its clock), with
    /// these response headers, already checked against every record up to sequence number
    /// `checked`.
    pub fn check(
        &self,
        host: &str,
        path: &str,
        validated: SystemTime,
        by: u64,
        headers: &impl Fields,
        checked: u64,
    ) -> Verdict {
        if !self.any.load(Ordering::Acquire) {
            return Verdict::Valid;
        }
        // the floor is on this corral's clock
        let floor = self.floor_ms.load(Ordering::Acquire);
        if floor > 0 && validated < from_millis(floor) + self.skew_for(by) {
            return Verdict::Invalid;
        }
        if checked >= self.published() {
            return Verdict::Valid;
        }
        let applies = |s: &Stamp| s.seq > checked && s.at + self.margin(s, by) > validated;
        // records sorted by time: those older than this cannot apply, whatever their clock
        let oldest = validated.checked_sub(self.skew).unwrap_or(UNIX_EPOCH);
        let mut soft_at: Option<SystemTime> = None;
        let mut hit = |s: Stamp| -> bool {
            if !s.soft {
                return true;
            }
            soft_at = Some(soft_at.map_or(s.at, |t: SystemTime| t.max(s.at)));
            false
        };
        let content_type = headers.first("content-type").and_then(Value::text).unwrap_or("");
        {
            let bans = self.bans.read();
            // sorted by time: only the tail is newer than the entry
            let newer = bans.partition_point(|(_, s)| s.at <= oldest);
            for (ban, stamp) in &bans[newer..] {
                if applies(stamp) && ban.matches(host, path, content_type) && hit(*stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        {
            let patterns = self.patterns.read();
            let newer = patterns.partition_point(|(_, _, s)| s.at <= oldest);
            for (name, pattern, stamp) in &patterns[newer..] {
                if !applies(stamp) {
                    continue;
                }
                let matched = headers
                    .all(name.as_str())
                    .filter_map(Value::text)
                    .any(|v| pattern.is_match(v));
                if matched && hit(*stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        if !self.urls.is_empty() {
            if let Some(stamp) = self.urls.get(&crate::key::primary(host, path)).map(|s| *s) {
                if applies(&stamp) && hit(stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        if !self.tags.is_empty() {
            for (name, sep) in TAG_HEADERS {
                for value in headers.all(name).filter_map(Value::text) {
                    for tag in split_tags(value, sep) {
                        if let Some(stamp) = self.tags.get(&tag).map(|s| *s) {
                            if applies(&stamp) && hit(stamp) {
                                return Verdict::Invalid;
                            }
                        }
                    }
                }
            }
        }
        soft_at.map_or(Verdict::Valid, Verdict::Stale)
    }
}

/// Does this header map carry any tag header? One pass over its names (most carry none).
pub fn has_tag_header(headers: &impl Fields) -> bool {
    headers.names().any(is_tag)
}

/// A purge tag header (`xkey`, `Surrogate-Key`, ...).
pub fn is_tag(name: &str) -> bool {
    TAG_HEADERS.iter().any(|(t, _)| name == *t)
}

/// The timestamp a purge accepted now is recorded with: a millisecond past any entry validated
/// before it, so an entry refreshed in the same millisecond is not mistaken for a newer one.
pub fn now_stamp() -> SystemTime {
    let offset = CLOCK_OFFSET_MS.load(Ordering::Relaxed);
    from_millis(millis(SystemTime::now()).saturating_add_signed(offset) + 1)
}

/// `purge.clock_offset_ms`: a purge clock that runs off, for tests of clock skew.
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Make this process's purge clock run `ms` milliseconds off (tests only).
pub fn set_clock_offset(ms: i64) {
    CLOCK_OFFSET_MS.store(ms, Ordering::Relaxed);
}
