//! Hit handlers: a complete entry (shared body, seekable for ranges) and a fill in progress
//! (streamed as it arrives).

use std::any::Any;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_cache::storage::{HandleHit, HitHandler, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::{Error, ErrorType, Result};
use tokio::sync::watch;

use super::{Fill, FillState, MetaParts, Stored};

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
    pub(super) fn of(entry: &Arc<Stored>, from_l2: bool) -> Self {
        CompleteHit {
            done: false,
            range: (0, entry.body_len()),
            entry: entry.clone(),
            from_l2,
            refresh_lock: None,
        }
    }

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

    /// Was this hit answered from L2?
    pub fn is_from_l2(hit: &HitHandler) -> bool {
        hit.as_any()
            .downcast_ref::<CompleteHit>()
            .is_some_and(|h| h.from_l2)
    }

    /// Up to which purge record the served entry was checked ([`crate::purge::Validity::check_marked`]);
    /// `None` for a body still streaming.
    pub fn check_mark(hit: &HitHandler) -> Option<&AtomicU64> {
        hit.as_any()
            .downcast_ref::<CompleteHit>()
            .map(|h| &h.entry.checked)
    }
}

/// When the entry behind a hit from this storage was last fetched or revalidated, as of when
/// that request left for the origin (what bans and purges compare with), and by which corral;
/// `None` for a hit of another storage.
pub fn validated(hit: &HitHandler) -> Option<(SystemTime, u64)> {
    meta_of(hit).map(|meta| (meta.updated.get(), meta.validated_by))
}

/// The stored meta behind a hit from this storage (a committed entry or a fill).
fn meta_of(hit: &HitHandler) -> Option<&MetaParts> {
    let any = hit.as_any();
    any.downcast_ref::<CompleteHit>()
        .map(|h| &h.entry.meta)
        .or_else(|| any.downcast_ref::<PartialHit>().map(|h| &h.fill.meta))
}

/// When the answer behind a hit from this storage arrived from the origin (what a client's
/// `no-cache` compares with: a request that waited for it is satisfied by it); `None` for a
/// hit of another storage.
pub fn received(hit: &HitHandler) -> Option<SystemTime> {
    meta_of(hit).map(|meta| meta.updated.get() + Duration::from_millis(u64::from(meta.received_ms)))
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
    /// A copy just promoted from memcached was admitted by this very request: its hit is not
    /// a second use. Counted, it would mark the entry as used at once, and S3-FIFO promotes
    /// a used entry to its main queue: a crawler's scan over what memcached holds would push
    /// the popular set out of L1.
    fn should_count_access(&self) -> bool {
        !self.from_l2
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.entry.body_slice(self.range.0..self.range.1)))
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
        let len = self.entry.body_len();
        if start >= len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start out of range {start} >= {len}"),
            );
        }
        // (an end before the start reads nothing, whichever buffer holds the body)
        self.range = (start, end.map_or(len, |e| e.clamp(start, len)));
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.entry.weight()
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

pub(super) fn partial_hit(fill: &Arc<Fill>) -> (CacheMeta, HitHandler) {
    let hit = PartialHit {
        fill: fill.clone(),
        state: fill.state.subscribe(),
        next: 0,
        pos: 0,
        range: None,
    };
    (fill.meta.to_meta(), Box::new(hit))
}
