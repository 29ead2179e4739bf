//! The workload of `benches/workload.rs` (issue 16): object sizes and the request sequence,
//! drawn from seeds, shared with `benches/replay.rs`, which replays the same sequence through
//! the eviction policies offline.

// each bench uses part of it
#![allow(dead_code)]

use anyhow::{anyhow, Context};
use rand::distributions::Distribution;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{LogNormal, Pareto, Zipf};

/// The largest object, and the length of the origin's static body buffer.
pub const MAX_SIZE: usize = 4 << 20;
/// The smallest object.
pub const MIN_SIZE: f64 = 64.0;
/// Median of the log-normal body of the size distribution.
pub const MEDIAN_SIZE: f64 = 3072.0;
/// σ of the logarithm of the size, in the log-normal body.
pub const SIZE_SIGMA: f64 = 1.3;
/// Share of the objects whose size comes from the Pareto tail.
pub const TAIL_SHARE: f64 = 0.005;
/// Where the Pareto tail starts, and its shape.
pub const TAIL_SCALE: f64 = 65536.0;
pub const TAIL_SHAPE: f64 = 1.0;
/// Seeds of the popularity permutation and of the request sequence, derived from `--seed`.
const PERMUTATION_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
const SEQUENCE_SALT: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// `size(id)` for every id: a log-normal body and a Pareto tail (see `benches/workload.rs`'s
/// module doc).
pub fn object_sizes(objects: u32, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let body = LogNormal::new(MEDIAN_SIZE.ln(), SIZE_SIGMA).expect("log-normal parameters");
    let tail = Pareto::new(TAIL_SCALE, TAIL_SHAPE).expect("Pareto parameters");
    (0..objects)
        .map(|_| {
            let size: f64 = if rng.gen_bool(TAIL_SHARE) {
                tail.sample(&mut rng)
            } else {
                body.sample(&mut rng)
            };
            // `as` saturates; the clamp keeps every size within 64 B..=4 MiB
            size.clamp(MIN_SIZE, MAX_SIZE as f64) as u32
        })
        .collect()
}

/// The request sequence: ids, and where its middle and last thirds begin.
pub struct Plan {
    pub seq: Vec<u32>,
    /// Index of the first request of the middle third (the first Zipf request of that third).
    pub middle: usize,
    /// Index of the first request of the last third (the scan is over by then).
    pub last: usize,
    pub zipf_requests: u64,
    pub scan_requests: usize,
}

impl Plan {
    pub fn new(objects: u32, seed: u64, alpha: f64, requests: u64, scan: bool) -> anyhow::Result<Plan> {
        let n = u64::from(objects);
        let zipf = Zipf::new(n, alpha).map_err(|e| anyhow!("Zipf over {n} ids, alpha {alpha}: {e:?}"))?;
        // popularity rank r (1 = most popular) is id by_rank[r - 1]
        let mut by_rank: Vec<u32> = (0..objects).collect();
        by_rank.shuffle(&mut StdRng::seed_from_u64(seed ^ PERMUTATION_SALT));
        let mut rng = StdRng::seed_from_u64(seed ^ SEQUENCE_SALT);
        let mut draw = || {
            let rank: f64 = zipf.sample(&mut rng);
            let rank = (rank as u64).clamp(1, n);
            by_rank[usize::try_from(rank - 1).expect("a rank fits usize")]
        };
        let total = usize::try_from(requests).context("--requests is too large")?;
        let third = total / 3;
        let scan_requests = if scan { by_rank.len() } else { 0 };
        let mut seq = Vec::with_capacity(total + scan_requests);
        for _ in 0..third {
            seq.push(draw());
        }
        let middle = seq.len();
        let mut scanned = 0usize;
        for k in 0..third {
            seq.push(draw());
            // the scan requests due once k + 1 of the third's Zipf requests have been sent
            let due = (k + 1) * scan_requests / third;
            while scanned < due {
                seq.push(u32::try_from(scanned).expect("ids are u32"));
                scanned += 1;
            }
        }
        // (a run too short for thirds: the whole scan here)
        while scanned < scan_requests {
            seq.push(u32::try_from(scanned).expect("ids are u32"));
            scanned += 1;
        }
        let last = seq.len();
        for _ in 2 * third..total {
            seq.push(draw());
        }
        Ok(Plan {
            seq,
            middle,
            last,
            zipf_requests: requests,
            scan_requests,
        })
    }

    /// Which third of the run (0, 1, 2) the request at `index` belongs to.
    pub fn third_of(&self, index: usize) -> usize {
        if index >= self.last {
            2
        } else if index >= self.middle {
            1
        } else {
            0
        }
    }
}
