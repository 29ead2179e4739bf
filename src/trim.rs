//! Free pages back to the kernel once L1 has released memory (glibc's malloc).
//!
//! glibc hands memory back to the kernel from the top of a heap (above its trim threshold)
//! and when a block it mapped on its own is freed (`src/main.rs` sets both thresholds). What
//! eviction frees in the middle of a heap stays resident until a later allocation reuses it:
//! at the end of the heavy-tailed workload (benches/workload.sh, α 1.0 with the scan, 64 MiB)
//! about 11 MB of glibc's 75 MB of heap was free, and RSS was 1.30 times `memory_bytes`.
//! `malloc_trim(0)` walks every arena and gives the whole free pages of each free block back
//! (`madvise`); the blocks stay free, and a page comes back, zeroed, with one fault when it is
//! reused.
//!
//! `Trimmer` calls it on its own runtime, but not without cost to requests: it holds each
//! arena's lock while it walks that arena, and a worker that allocates from it then waits.
//! So it trims at most every [`MIN_GAP`]: when the releases stop (a second with none, after
//! at least an eighth of the step released since the last trim), so that what a burst of
//! evictions or a ban left free is given back once the cache is at rest; and while they go
//! on, once a step was released. The step is a 32nd of `memory_bytes`, at least 1 MiB. Under
//! a load that keeps evicting, the pages freed are soon reused, and trimming them more often
//! would only cost faults. `cache.trim_allocator = false` turns it off (HAProxy's
//! `no-memory-trimming`).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub use glibc::Trimmer;

/// How often `Trimmer` looks at what L1 released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The least time between two trims.
pub const MIN_GAP: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether to trim now, from what L1 had released (in all, in bytes) at the last trim, at the
/// last check and now, the step `every`, and whether [`MIN_GAP`] has passed since the last
/// trim (or none was made yet).
pub fn due(at_trim: u64, at_check: u64, now: u64, every: u64, gap_passed: bool) -> bool {
    let since = now.saturating_sub(at_trim);
    let at_rest = now == at_check;
    // (`since > 0` matters only for a step under 8 bytes: a test's)
    gap_passed && since > 0 && (since >= every || (at_rest && since >= every / 8))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::time::{Duration, Instant};

    use pingora_core::server::ShutdownWatch;
    use pingora_core::services::background::BackgroundService;

    use super::{due, CHECK, MIN_GAP};
    use crate::metrics;
    use crate::storage::memory::MemoryStorage;

    /// Gives the allocator's free pages back after L1 released memory ([`super`]).
    pub struct Trimmer {
        l1: &'static MemoryStorage,
        /// A 32nd of `memory_bytes`, at least 1 MiB.
        every: u64,
    }

    impl Trimmer {
        pub fn new(l1: &'static MemoryStorage, memory_bytes: usize) -> Self {
            Trimmer {
                l1,
                every: (memory_bytes as u64 / 32).max(1 << 20),
            }
        }
    }

    /// Give the free pages of every arena back; how long it took.
    #[allow(unsafe_code)]
    fn trim() -> Duration {
        let start = Instant::now();
        // SAFETY: malloc_trim takes an integer and only walks and advises malloc's own free
        // blocks, under each arena's lock (glibc documents it MT-Safe): callable from any
        // thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        start.elapsed()
    }

    #[async_trait::async_trait]
    impl BackgroundService for Trimmer {
        async fn start(&self, mut shutdown: ShutdownWatch) {
            // exported from the start, empty
            let _ = &*metrics::ALLOCATOR_TRIM_SECONDS;
            tracing::info!(
                every = self.every,
                min_gap_s = MIN_GAP.as_secs(),
                "allocator trim on: malloc's free pages go back to the kernel after L1 releases memory"
            );
            let mut tick = tokio::time::interval(CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut at_trim, mut at_check) = (self.l1.released(), self.l1.released());
            let mut last: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let now = self.l1.released();
                let gap_passed = last.is_none_or(|t| t.elapsed() >= MIN_GAP);
                if due(at_trim, at_check, now, self.every, gap_passed) {
                    let took = trim();
                    metrics::ALLOCATOR_TRIM_SECONDS.observe(took.as_secs_f64());
                    tracing::debug!(
                        released = now - at_trim,
                        took_us = took.as_micros() as u64,
                        "gave the allocator's free pages back"
                    );
                    at_trim = now;
                    last = Some(Instant::now());
                }
                at_check = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn a_trim_comes_when_the_releases_stop_or_after_a_step_and_never_within_the_gap() {
        let every = 800;
        // at start, nothing released: none
        assert!(!due(0, 0, 0, every, true));
        // nothing released since the last trim: none, gap or not
        assert!(!due(500, 500, 500, every, true));
        // releasing, under the step: none yet
        assert!(!due(500, 520, 560, every, true));
        // past the step while releasing: only once the gap has passed
        assert!(!due(500, 1000, 1400, every, false));
        assert!(due(500, 1000, 1400, every, true));
        // exactly the step
        assert!(due(500, 1000, 1300, every, true));
        // the releases stopped with at least an eighth of the step since the last trim: one
        // trim once the gap has passed
        assert!(due(500, 600, 600, every, true));
        assert!(!due(500, 600, 600, every, false));
        // stopped after less than that (a miss evicting a little now and then): none
        assert!(!due(500, 520, 520, every, true));
    }

    #[test]
    fn bursts_of_releases_with_quiet_seconds_between_are_trimmed_once_a_gap() {
        // a busy cache that evicts in bursts: a second of releases, a second without, ...;
        // a trim needs the gap each time, however many quiet seconds come
        let (every, mut at_trim, mut at_check, mut now) = (800, 0, 0, 0);
        let mut trims = Vec::new();
        for second in 0..60u64 {
            if second % 2 == 0 {
                now += 200;
            }
            // the gap: 10 checks since the last trim
            let gap_passed = trims.last().is_none_or(|&t| second - t >= 10);
            if due(at_trim, at_check, now, every, gap_passed) {
                trims.push(second);
                at_trim = now;
            }
            at_check = now;
        }
        assert_eq!(trims, [1, 11, 21, 31, 41, 51]);
        assert!(trims.windows(2).all(|w| w[1] - w[0] >= 10), "{trims:?}");
    }
}
