//! New entries are built on a thread of their own: their buffer allocated and the body copied
//! into it, and their `Arc` ([`Stored::new`]).
//!
//! glibc's malloc gives each thread an arena of its own. Built on the worker thread that
//! served the fill, an entry's two allocations land among that request's short-lived ones
//! (Pingora's session, the fill's chunks and head, the client's header map), and when those are
//! freed they leave holes between entries that later requests do not fill: about 55 bytes an
//! entry of free chunks of 32 to 256 bytes (`benches/memory.sh`, 200,000 small objects). On a
//! thread of its own, entries lie next to entries. What the worker allocated for a job is
//! freed on the worker ([`Job`], [`Built`]): glibc's per-thread cache of freed chunks would
//! hand such a chunk freed on the builder to the next entry. (Not when the fill gave up
//! waiting, or a job failed: then the builder frees what it was sent.) Entries made on the
//! workers still: a 304's and a soft purge's new `Arc` around the same buffer.
//!
//! A fill, and a copy promoted from memcached (an L2 hit), waits for its entry: a round trip
//! between threads, microseconds when a core is free; the fills of a busy machine queue
//! behind each other there. L1 hits are not concerned. Bodies over [`OFF_THREAD_MAX`] are
//! built where they arrive: one thread copying them would hold up the fills behind it, and a
//! buffer that large is placed apart from small chunks by the allocator anyway (from 128 KiB,
//! a mapping of its own). If the thread cannot be started or is gone, entries are built where
//! they arrive, as before. With more threads than glibc has arenas (8 per core), the builder
//! may share one with a worker.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;

use super::{Fill, MetaParts, Stored, StoredHeader};

/// The largest body built on the builder thread ([`build`]).
pub const OFF_THREAD_MAX: usize = 64 * 1024;

/// An entry to build: what it is made of, and where it goes once built. Sent by value (in
/// the channel's blocks of 4 KiB and more), not boxed: a box the size of an entry's `Arc`,
/// freed on the builder thread, would be where glibc put the next entry (its per-thread cache
/// of freed chunks does not look at which arena a chunk came from), among the worker's chunks
/// again.
struct Job {
    source: Source,
    generation: u64,
    done: tokio::sync::oneshot::Sender<Built>,
}

/// What an entry is built from.
enum Source {
    /// A fill: its head and chunks are read where they are, on the builder (the list of its
    /// chunks cloned there under the fill's lock, the body copied outside it; the head stays
    /// the fill's, freed with it).
    Fill(Arc<Fill>),
    /// A head and a body given (a copy promoted from memcached).
    Parts(MetaParts, Vec<Bytes>),
}

/// A built entry, and what the worker had allocated for a copy (its body, a slice of the
/// record read from memcached, and its head before it was packed with the body): freed back
/// on the worker, for the same reason. The leftovers are boxed on the builder (freed on the
/// worker: the harmless way), so that the reply is small: the channel's shared block, which
/// the builder may be the last to drop, is then far from an entry's size classes.
struct Built {
    stored: Arc<Stored>,
    _leftovers: Option<Box<(Vec<Bytes>, StoredHeader)>>,
}

const _: () = assert!(std::mem::size_of::<Built>() <= 16, "the reply stays small");

impl Job {
    fn run(self) {
        let Job {
            source,
            generation,
            done,
        } = self;
        #[cfg(test)]
        assert_ne!(generation, tests::PANIC_GENERATION, "a job made to panic");
        let (stored, leftovers) = match source {
            Source::Fill(fill) => {
                // the list of its chunks copied under the fill's lock (allocated and freed
                // here), the body outside it: its readers are not held up by the copy
                let chunks = fill.chunks.lock().clone();
                // (the head given is the fill's, shared: dropping it frees nothing)
                let (stored, _) = Stored::new_and_head(fill.meta.clone(), &chunks, generation);
                (stored, None)
            }
            Source::Parts(meta, body) => {
                let (stored, head) = Stored::new_and_head(meta, &body, generation);
                (stored, Some(Box::new((body, head))))
            }
        };
        #[cfg(test)]
        tests::built_on(&stored);
        // (if the fill gave up waiting, all of it is freed here)
        let _ = done.send(Built {
            stored,
            _leftovers: leftovers,
        });
    }
}

/// The builder thread's queue; `None` if the thread could not be started.
static BUILDER: LazyLock<Option<Sender<Job>>> = LazyLock::new(|| {
    let (tx, rx) = channel::<Job>();
    let started = std::thread::Builder::new()
        .name("corral-l1-build".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                // a job that panics fails its own fill (its answer is dropped), not the
                // thread: the fills after it are still built here
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())).is_err() {
                    tracing::error!("building an L1 entry panicked: that fill is not stored");
                }
            }
        });
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "the thread that builds L1 entries could not be started: entries are built on the worker threads (more memory per entry)");
            None
        }
    }
});

/// A copy's entry ([`Stored::new`]), on the builder thread for a body up to
/// [`OFF_THREAD_MAX`] bytes. `None` if building it panicked (it is then not stored).
pub(super) async fn build(meta: MetaParts, body: Vec<Bytes>, generation: u64) -> Option<Arc<Stored>> {
    let len: usize = body.iter().map(Bytes::len).sum();
    let Some(builder) = BUILDER.as_ref().filter(|_| len <= OFF_THREAD_MAX) else {
        return Some(Stored::new(meta, &body, generation));
    };
    off_thread(builder, Source::Parts(meta, body), generation).await
}

/// A fill's entry, from its head and its chunks as they are now ([`build`]).
pub(super) async fn build_fill(fill: &Arc<Fill>, generation: u64) -> Option<Arc<Stored>> {
    let len: usize = fill.chunks.lock().iter().map(Bytes::len).sum();
    let Some(builder) = BUILDER.as_ref().filter(|_| len <= OFF_THREAD_MAX) else {
        // the list copied under the lock, the body (up to `max_object_bytes`) outside it
        let chunks = fill.chunks.lock().clone();
        return Some(Stored::new(fill.meta.clone(), &chunks, generation));
    };
    off_thread(builder, Source::Fill(Arc::clone(fill)), generation).await
}

/// Build on the builder thread (here if it is gone) and wait for the entry.
async fn off_thread(builder: &Sender<Job>, source: Source, generation: u64) -> Option<Arc<Stored>> {
    let (done, built) = tokio::sync::oneshot::channel();
    let job = Job {
        source,
        generation,
        done,
    };
    if let Err(std::sync::mpsc::SendError(job)) = builder.send(job) {
        // the thread is gone: built here
        job.run();
    }
    // (a copy's leftovers are dropped here, on the worker)
    built.await.ok().map(|b| b.stored)
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::{Duration, SystemTime};

    use pingora_cache::CacheMeta;
    use pingora_http::ResponseHeader;

    use super::*;

    /// The thread each entry was built on off the worker's, by URL.
    static BUILT_ON: LazyLock<parking_lot::Mutex<std::collections::HashMap<String, String>>> =
        LazyLock::new(Default::default);

    pub(super) fn built_on(stored: &Stored) {
        let thread = std::thread::current().name().unwrap_or_default().to_string();
        BUILT_ON.lock().insert(stored.url().to_string(), thread);
    }

    /// Whether the entry of `url` was built on the builder thread.
    pub(in crate::storage::memory) fn built_off_thread(url: &str) -> bool {
        BUILT_ON.lock().get(url).map(String::as_str) == Some("corral-l1-build")
    }

    fn parts(url: &str) -> MetaParts {
        let now = SystemTime::now();
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("etag", "\"e\"").unwrap();
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, h);
        MetaParts::from_meta(&meta, url)
    }

    /// A small body's entry is built on the builder thread, a body over [`OFF_THREAD_MAX`]
    /// where it arrives; either way the entry holds the body and the head it was given.
    #[tokio::test]
    async fn a_small_entry_is_built_on_the_builder_thread_and_a_large_one_here() {
        for (size, off_thread) in [(100, true), (OFF_THREAD_MAX, true), (OFF_THREAD_MAX + 1, false)] {
            let url = format!("http://h/built/{size}");
            let chunks = vec![
                Bytes::from(vec![b'a'; size / 2]),
                Bytes::from(vec![b'b'; size - size / 2]),
            ];
            let stored = build(parts(&url), chunks.clone(), 7).await.expect("built");
            assert_eq!(stored.body(), Bytes::from(chunks.concat()), "{size}");
            assert_eq!(stored.url(), url);
            assert!(stored.of_generation(7));
            let on = BUILT_ON.lock().get(&url).cloned();
            assert_eq!(
                on.as_deref() == Some("corral-l1-build"),
                off_thread,
                "{size}: {on:?}"
            );
        }
    }

    /// A generation that makes a job panic ([`Job::run`]).
    pub(super) const PANIC_GENERATION: u64 = u64::MAX;

    /// A job that panics on the builder thread fails alone: the thread goes on building.
    #[tokio::test]
    async fn a_panic_while_building_fails_that_entry_only() {
        let builder = BUILDER.as_ref().expect("the builder thread");
        let (done, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            source: Source::Parts(parts("http://h/panics"), vec![Bytes::from_static(b"x")]),
            generation: PANIC_GENERATION,
            done,
        };
        builder
            .send(job)
            .unwrap_or_else(|_| panic!("the builder is there"));
        assert!(answer.await.is_err(), "its answer is dropped");
        let stored = build(parts("http://h/after-panic"), vec![Bytes::from_static(b"x")], 1).await;
        assert_eq!(
            stored.expect("built after the panic").body(),
            Bytes::from_static(b"x")
        );
    }
}
