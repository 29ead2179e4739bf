//! How many requests go to the upstream at once (`upstream.max_connections`), and the
//! bounded queue in front of them.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics;

/// Requests to the upstream at once: a sick origin gets at most `max_connections` of them,
/// the next `max_queue` wait (at most `queue_timeout`), the rest get 503 at once.
pub struct UpstreamSlots {
    slots: Arc<tokio::sync::Semaphore>,
    queued: std::sync::atomic::AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
}

/// One request's hold on an upstream slot, given back when the request ends (drop).
pub struct UpstreamSlot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        metrics::UPSTREAM_ACTIVE.dec();
    }
}

impl UpstreamSlots {
    pub(super) fn new(up: &crate::config::UpstreamConfig) -> Self {
        UpstreamSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(up.max_connections)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            max_queue: up.max_queue,
            queue_timeout: up.queue_timeout,
        }
    }

    /// A slot, at once or after waiting in the queue; `None` if the queue is full or the wait
    /// ran out.
    pub(super) async fn take(&self) -> Option<UpstreamSlot> {
        use std::sync::atomic::Ordering;
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                /// Leaves the queue on every exit (timeout, a client that went away).
                struct InQueue<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for InQueue<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let ahead = self.queued.fetch_add(1, Ordering::AcqRel);
                let _in_queue = InQueue(&self.queued);
                if ahead >= self.max_queue {
                    return None;
                }
                tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        metrics::UPSTREAM_ACTIVE.inc();
        Some(UpstreamSlot(permit))
    }
}
