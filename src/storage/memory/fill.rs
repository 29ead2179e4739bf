//! The miss handler: the one request that fetches a body writes it here, readers stream it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_cache::key::HashBinary;
use pingora_cache::storage::{HandleMiss, MissFinishType};
use pingora_error::Result;

use super::{Fill, FillState, MemoryStorage};

pub(super) struct MemoryMiss {
    pub(super) storage: &'static MemoryStorage,
    pub(super) primary: HashBinary,
    pub(super) variance: Option<HashBinary>,
    pub(super) fill: Arc<Fill>,
    pub(super) tag: [u8; 8],
    pub(super) finished: bool,
}

#[async_trait]
impl HandleMiss for MemoryMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        let n = {
            let mut chunks = self.fill.chunks.lock();
            if !data.is_empty() {
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
        // body is joined once here, with the head (a copy per fill, never per hit). Always a
        // copy, of one chunk too: a chunk is a slice of the connection's read buffer, and
        // keeping it would keep the whole buffer (and whatever else was read into it) alive,
        // unseen by `memory_bytes`
        let committed = if self.fill.generation == self.storage.generation() {
            // built on a thread of its own (`build`), away from the requests' short-lived
            // allocations
            match super::build::build_fill(&self.fill, self.fill.generation).await {
                Some(stored) => self
                    .storage
                    .commit(self.primary, self.variance, stored, Some(self.fill.id)),
                None => {
                    self.storage.take_fill(self.primary, self.variance, self.fill.id);
                    None
                }
            }
        } else {
            self.storage.take_fill(self.primary, self.variance, self.fill.id);
            None
        };
        // None: L1 was cleared (a purge of everything, a new upstream generation, a purge log
        // reset) after this answer arrived; what it brings is from before, and is not stored.
        // Pingora admits the key with the weight returned: 0 leaves the manager as it is
        // (Eviction::admit), and an entry a later fill stored meanwhile keeps its weight there
        let weight = committed.unwrap_or(0);
        // committed (and noted as inserted) before it leaves the fills in progress, so the
        // sweeper sees it in one place or the other
        self.storage.fills.remove(&self.fill.id);
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

impl Drop for MemoryMiss {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.storage.fills.remove(&self.fill.id);
        // the writer gave up: readers of this fill fail rather than see a truncated body. A
        // body written to its end (its `finish` dropped while the entry was being built, the
        // request gone) is whole: its readers read it to the end
        if !matches!(*self.fill.state.borrow(), FillState::Done(_)) {
            self.fill.state.send_replace(FillState::Aborted);
        }
        self.storage.take_fill(self.primary, self.variance, self.fill.id);
    }
}
