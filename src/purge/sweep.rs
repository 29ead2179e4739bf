//! The ban sweeper (Varnish's "ban lurker"): in the background, check every L1 entry against
//! the purge records that arrived since the last pass, free what hard records match, mark
//! stale what soft ones match, and drop the records no entry can need any more. The check
//! itself walks L1 ([`crate::storage::memory::MemoryStorage::sweep`]); this module decides
//! when to run it and which records it lets go.

use std::time::{Duration, SystemTime};

use pingora_cache::key::CacheHashKey;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::metrics;
use crate::storage::Tiered;

/// Margin for clocks of corrals sharing memcached: an L2 entry is taken to be at most
/// `memcached.max_ttl` plus this old.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Runs [`Sweeper::pass`] every `purge.sweep_interval`, on its own runtime: never on a
/// request's path.
pub struct Sweeper {
    storage: &'static Tiered,
    interval: Duration,
    /// The last pass checked the records up to this one.
    swept: parking_lot::Mutex<u64>,
}

impl Sweeper {
    pub fn new(storage: &'static Tiered, interval: Duration) -> Self {
        Sweeper {
            storage,
            interval,
            swept: parking_lot::Mutex::new(0),
        }
    }

    /// One run of the ban sweeper: if ban or tag records arrived since the last pass, check
    /// every L1 entry against them ([`crate::storage::memory::MemoryStorage::sweep`]: matched entries are removed or
    /// marked stale, the rest marked checked), then drop the records no entry can need any
    /// more. A record is needed while an entry validated before it may still be looked up
    /// unchecked: a fill that was in progress, an entry inserted during the pass, or (with L2)
    /// a memcached value, which lives at most `memcached.max_ttl`.
    pub async fn pass(&self) {
        // unsafe requests' invalidations are not records: kept by time alone
        self.storage.l1.expire_invalidations(SystemTime::now());
        // what the eviction manager pushed out outside an admission (a hit that tracked an
        // entry again) leaves L1 now, not with the next fill
        for evicted in self.storage.eviction.flush_deferred() {
            let k = evicted.key();
            self.storage.l1.remove_variant(k.primary, k.variance_bin());
        }
        if !self.storage.validity.active() {
            return;
        }
        let upto = self.storage.validity.published();
        let last = *self.swept.lock();
        // no value older than this can be in memcached
        let l2_bound = self
            .storage
            .l2
            .as_ref()
            .map(|l2| SystemTime::now() - l2.max_ttl() - CLOCK_SKEW);
        // entries that escaped the last pass (inserted since, fills and memcached writes in
        // progress) hold back the records older than them; a pass checks them and lifts that
        let escaped = self.escaped() != u64::MAX;
        let held_back = escaped
            && self
                .storage
                .validity
                .oldest()
                .is_some_and(|t| l2_bound.is_none_or(|bound| t <= bound));
        if upto > last || self.storage.validity.floor_ms() > 0 || held_back {
            let report = self.storage.l1.sweep(self.storage.validity, upto).await;
            // a key filled again during the pass is tracked again (`MemoryStorage::untrack`)
            for compact in &report.removed {
                self.storage.l1.untrack(compact, self.storage.eviction);
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
            *self.swept.lock() = upto;
            metrics::SWEEPS.inc();
        }
        let escaped = self.escaped();
        let l1_horizon = if escaped == u64::MAX {
            SystemTime::now() + Duration::from_secs(3600)
        } else {
            SystemTime::UNIX_EPOCH + Duration::from_millis(escaped)
        };
        let l2_horizon = l2_bound.unwrap_or(l1_horizon);
        let checked = *self.swept.lock();
        let expired = self.storage.validity.expire(checked, l1_horizon, l2_horizon);
        metrics::PURGE_RECORDS_EXPIRED.inc_by(expired as u64);
    }
}

impl Sweeper {
    /// The oldest validation time (ms) of what the sweeper has not checked and may yet be
    /// looked up: entries inserted since the last pass began, fills in progress (also those a
    /// purge took out of the table: they still commit), values on their way to memcached.
    /// `u64::MAX`: none.
    fn escaped(&self) -> u64 {
        let l1 = self.storage.l1;
        l1.inserted_min_ms()
            .min(l1.fills_min_ms())
            .min(self.storage.writes_min_ms())
    }
}

#[async_trait::async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.pass().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheParts;
    use crate::config::Config;
    use crate::storage::eviction::Policy;
    use crate::storage::memory::MetaParts;
    use bytes::Bytes;
    use pingora_cache::eviction::EvictionManager;
    use pingora_cache::{CacheEntryKey, CacheKey, CacheMeta};
    use pingora_http::ResponseHeader;

    /// What the eviction manager pushed out outside an admission (a hit that tracked an
    /// untracked entry again) leaves L1 with the sweeper's next pass, with no fill after it:
    /// before the pass L1 still holds it, after it L1 does not, and the entry that pushed it
    /// out stays.
    #[tokio::test]
    async fn a_pass_takes_out_of_l1_what_a_hit_pushed_out() {
        let mut cfg = Config::embedded_default();
        cfg.cache.eviction = Policy::S3fifo;
        cfg.cache.memory_bytes = 64 * 1024;
        cfg.cache.max_object_bytes = 40 * 1024;
        let parts = CacheParts::leak(&cfg, None);
        let (l1, eviction) = (parts.storage.l1, parts.eviction);
        let now = SystemTime::now();
        let store = |url: &'static str, size: usize| async move {
            let key = CacheKey::new(url, "");
            let h = ResponseHeader::build(200, None).unwrap();
            let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h);
            let parts = MetaParts::from_meta(&meta, url);
            let (_, weight) = l1
                .insert(&key, parts, Bytes::from(vec![b'x'; size]), l1.generation())
                .await
                .expect("stored");
            let item = CacheEntryKey::from_entry_id(key.to_compact(), None);
            (key, item, weight)
        };
        let (pushed, pushed_item, weight) = store("http://h/pushed", 30 * 1024).await;
        assert!(eviction.admit(pushed_item.clone(), weight, now).is_empty());
        // held by L1 and not tracked (as after a purge's late removal): its hit tracks it,
        // and the two do not fit
        let (hit, hit_item, weight) = store("http://h/hit", 40 * 1024).await;
        assert!(!eviction.access(&hit_item, weight, now));
        assert!(!eviction.peek(&pushed_item), "pushed out of the manager");
        assert!(
            l1.fresh_plain(&pushed.primary_bin(), now).is_some(),
            "still in L1 before the pass"
        );

        Sweeper::new(parts.storage, Duration::from_secs(1)).pass().await;
        assert!(
            l1.fresh_plain(&pushed.primary_bin(), now).is_none(),
            "taken out of L1 by the pass"
        );
        assert!(l1.fresh_plain(&hit.primary_bin(), now).is_some());
        assert!(eviction.peek(&hit_item));
        assert_eq!(l1.stats().entries, 1);
    }
}
