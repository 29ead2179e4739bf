//! pingora-cache's `Storage` for L1: lookup, miss handlers, purge, expire, meta updates.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_cache::key::CacheHashKey;
use pingora_cache::storage::{HitHandler, MissHandler, PurgeOutcome, PurgeTarget, PurgeType, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::Result;
use tokio::sync::watch;

use super::fill::MemoryMiss;
use super::hit::{partial_hit, CompleteHit};
use super::{url_of, Fill, FillState, MemoryStorage, MetaParts};

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let primary = key.primary_bin();
        let Some(slots) = self.table.get(&primary) else {
            return Ok(None);
        };
        let variance = key.variance_bin();
        let Some(slot) = slots.find(variance) else {
            return Ok(None);
        };
        // prefer a fill in progress: it is newer than the committed entry, unless a clear
        // voided it, or an unsafe request invalidated the URL after its request left (its
        // answer began after the invalidation: it may be what that request changed, and its
        // commit stores nothing; only its own writer reads it, by its tag)
        let usable = |f: &&Arc<Fill>| {
            f.generation == self.generation() && !self.invalidated_since(&primary, f.meta.updated.get())
        };
        if let Some(fill) = slot.fill.as_ref().filter(usable) {
            return Ok(Some(partial_hit(fill)));
        }
        let Some(entry) = slot.entry.as_ref().filter(|e| self.current(e)) else {
            return Ok(None);
        };
        entry.hit();
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
        // by id, not through the table: a purge may have removed the URL's row (and the
        // fill's slot with it) since the fill began, and Pingora's writer must still read it
        Ok(self.fills.get(&id).map(|f| partial_hit(f.value())))
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
            generation: self.fill_generation(meta),
            meta: MetaParts::from_meta(meta, url_of(key)),
            chunks: Mutex::new(Vec::new()),
            state,
        });
        let primary = key.primary_bin();
        let variance = key.variance_bin();
        {
            let mut slots = self.table.entry(primary).or_default();
            slots.get_or_add(variance).fill = Some(fill.clone());
        }
        self.fills.insert(id, fill.clone());
        self.note_insert(fill.meta.updated.get());
        Ok(Box::new(MemoryMiss {
            storage: self,
            primary,
            variance,
            fill,
            tag: id.to_be_bytes(),
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
        let Some(slot) = slots.find_mut(variance) else {
            return Ok(PurgeOutcome::NotFound);
        };
        let Some(entry) = slot.entry.as_mut() else {
            return Ok(PurgeOutcome::NotFound);
        };
        *entry = entry.expired(SystemTime::now());
        Ok(PurgeOutcome::Expired)
    }

    /// The 304's header in place ([`MemoryStorage::revalidate`]). The eviction manager is not
    /// told of a new weight here: [`crate::storage::Tiered`] does it.
    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        Ok(self.revalidate(key, meta).is_some())
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}
