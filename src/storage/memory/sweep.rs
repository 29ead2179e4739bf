//! The sweeper's pass over L1: entries checked against new purge records (hard matches
//! removed, soft ones marked stale), in batches.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pingora_cache::key::{CompactCacheKey, HashBinary};

use super::{compact, MemoryStorage, Stored};
use crate::purge::{millis, Validity, Verdict};

/// What one pass of [`MemoryStorage::sweep`] did.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Entries checked against records they had not seen.
    pub checked: usize,
    /// Entries a hard purge matched, removed (tell the eviction manager).
    pub removed: Vec<CompactCacheKey>,
    /// Entries a soft purge matched, now stale.
    pub stale: usize,
}

/// Host and path of a primary key's URL: `http://host/path?q` → (`host`, `/path?q`), the host
/// as the request gave it (normalised), not as the URL escapes it ([`crate::key::unescape_host`]):
/// bans and purges are matched against the host that hits match them against.
pub fn split_url(url: &str) -> (Cow<'_, str>, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    (crate::key::unescape_host(host), path)
}

/// Entries checked (rows, for a clear) between two yields of the sweeper, so that it never
/// holds a worker long.
pub(super) const SWEEP_BATCH: usize = 512;

impl MemoryStorage {
    /// One pass of the ban sweeper (Varnish's "ban lurker"): check every entry against the
    /// ban and tag records it has not been checked against (up to sequence number `upto`),
    /// remove what hard records match, mark stale what soft ones match, and move the check
    /// mark of the rest to `upto`. Hits then skip those records, and the records can be
    /// dropped once nothing older can arrive ([`MemoryStorage::fills_min_ms`],
    /// [`MemoryStorage::inserted_min_ms`]).
    ///
    /// The table is only read-locked while references to the entries to check are collected;
    /// regexes run outside the locks, a batch at a time.
    pub async fn sweep(&self, validity: &Validity, upto: u64) -> SweepReport {
        self.inserted_min_ms.store(u64::MAX, Ordering::Release);
        let floor = validity.floor_ms();
        let generation = self.generation.load(Ordering::Acquire);
        let mut todo: Vec<(HashBinary, Option<HashBinary>, Arc<Stored>)> = Vec::new();
        for row in self.table.iter() {
            for (variance, slot) in row.value().iter() {
                let Some(e) = &slot.entry else { continue };
                if e.of_generation(generation)
                    && (e.checked.load(Ordering::Acquire) < upto || millis(e.meta.updated.get()) < floor)
                {
                    todo.push((*row.key(), variance, e.clone()));
                }
            }
        }
        let mut report = SweepReport::default();
        for batch in todo.chunks(SWEEP_BATCH) {
            for (primary, variance, e) in batch {
                let (host, path) = e.meta.header.host_and_path();
                let checked = e.checked.load(Ordering::Acquire);
                report.checked += 1;
                // the check covers every record published when it starts, which may be more
                // than `upto` (a purge accepted during the pass): mark what was covered, or the
                // next pass applies that record again (a soft purge marked stale twice)
                let covered = validity.published().max(upto);
                let (validated, by) = (e.meta.updated.get(), e.meta.validated_by);
                match validity.check(&host, path, validated, by, &e.meta.header, checked) {
                    Verdict::Valid => {
                        e.checked.fetch_max(covered, Ordering::AcqRel);
                    }
                    Verdict::Stale(at) => {
                        let stale = e.expired(at);
                        stale.checked.fetch_max(covered, Ordering::AcqRel);
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
            .find_mut(variance)
            .filter(|s| s.entry.as_ref().is_some_and(|e| Arc::ptr_eq(e, current)))
        else {
            return false;
        };
        match with {
            Some(e) => slot.entry = Some(e),
            None => {
                slot.entry = None;
                self.account_remove(current.weight());
                slots.prune();
            }
        }
        drop(slots);
        self.table.remove_if(&primary, |_, slots| slots.is_empty());
        true
    }
}
