//! The workload of `benches/workload.sh` replayed offline through L1's eviction managers
//! (issue 16): hit ratios of `cache.eviction` = lru, tinyufo and s3fifo on the same request
//! sequence, in seconds, without an origin, a proxy or a network.
//!
//! ```text
//! cargo bench --bench replay                        # 200,000 objects, 400,000 requests, 64 MiB
//! cargo bench --bench replay -- --alpha 0.8 --scan --mem-mib 256 --size-divisor 4
//! ```
//!
//! The objects and the sequence are `benches/workload.rs`'s (`shared/workload_plan.rs`: the
//! same seed gives the same requests). Each manager is built as corral builds it
//! ([`Eviction::with_max_object`], 8 KiB typical entries, `max_object_bytes` 8 MiB), and L1 is
//! modelled as the set of objects it holds: a request for a held object is a hit (the manager
//! is told of the use, as the hit path does); any other is a miss, whose object is admitted
//! with the weight L1 charges (body, about 200 bytes of header and URL, and
//! [`ENTRY_OVERHEAD`]), and what the manager hands back leaves the set. What this leaves out:
//! concurrency (the real runs have 32 connections and requests collapsed on a miss), expiry,
//! and the header's exact size. On that workload the replay's byte hit ratios came within 0.1
//! point of `benches/workload.sh`'s for all three policies (hit ratios within 0.2). Keys are
//! hashed with a seed drawn per process, so a ratio moves by about 0.1 point between runs.
//!
//! `--shards N` replays S3-FIFO with N shards instead of corral's choice
//! ([`s3fifo_shards`]), to see what a shard's own budget costs.

use std::collections::HashMap;
use std::time::SystemTime;

use clap::Parser;
use corral::storage::eviction::{s3fifo_shards, Eviction, Policy};
use corral::storage::memory::ENTRY_OVERHEAD;
use pingora_cache::eviction::{CacheEntryKey, EvictionManager};

#[path = "shared/workload_plan.rs"]
mod workload_plan;
use workload_plan::{object_sizes, Plan};

/// What an entry weighs in L1 besides its body and [`ENTRY_OVERHEAD`]: its header and URL
/// (the workload's origin sends about 150 bytes of header).
const HEADER_BYTES: usize = 200;

#[derive(Parser)]
#[command(about = "Replay of the workload benchmark through L1's eviction managers (issue 16)")]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    objects: u32,
    #[arg(long, default_value_t = 400_000)]
    requests: u64,
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// A crawler asks for every object once over the middle third
    #[arg(long)]
    scan: bool,
    #[arg(long, default_value_t = 64)]
    mem_mib: usize,
    #[arg(long, default_value_t = 16)]
    seed: u64,
    /// Divide every object's size by this (at least 64 bytes): smaller objects, same sequence
    #[arg(long, default_value_t = 1)]
    size_divisor: u32,
    /// S3-FIFO's shards (a power of two), instead of corral's choice
    #[arg(long)]
    shards: Option<usize>,
    /// Added by `cargo bench`; ignored
    #[arg(long = "bench", hide = true)]
    _bench: bool,
}

/// Hits and bytes, over the whole run and its last third.
#[derive(Default)]
struct Tally {
    hits: [u64; 2],
    requests: [u64; 2],
    hit_bytes: [u64; 2],
    bytes: [u64; 2],
}

impl Tally {
    fn count(&mut self, last_third: bool, size: u64, hit: bool) {
        for part in [0, 1] {
            if part == 1 && !last_third {
                continue;
            }
            self.requests[part] += 1;
            self.bytes[part] += size;
            if hit {
                self.hits[part] += 1;
                self.hit_bytes[part] += size;
            }
        }
    }

    fn ratios(&self, part: usize) -> (f64, f64) {
        let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
        (
            pct(self.hits[part], self.requests[part]),
            pct(self.hit_bytes[part], self.bytes[part]),
        )
    }
}

fn key(id: u32) -> CacheEntryKey {
    let k = corral::key::for_parts("replay.test", &format!("/o/{id}"));
    CacheEntryKey::key_only(k.to_compact())
}

fn replay(manager: &Eviction, sizes: &[u32], plan: &Plan) -> Tally {
    let keys: Vec<CacheEntryKey> = (0..sizes.len() as u32).map(key).collect();
    let ids: HashMap<&CacheEntryKey, u32> = keys.iter().zip(0..).collect();
    let mut held = vec![false; sizes.len()];
    let mut tally = Tally::default();
    let now = SystemTime::now();
    for (index, &id) in plan.seq.iter().enumerate() {
        let i = id as usize;
        let size = u64::from(sizes[i]);
        let hit = held[i];
        let weight = sizes[i] as usize + HEADER_BYTES + ENTRY_OVERHEAD;
        if hit {
            manager.access(&keys[i], weight, now);
        } else {
            held[i] = true;
            for gone in manager.admit(keys[i].clone(), weight, now) {
                held[ids[&gone] as usize] = false;
            }
        }
        tally.count(plan.third_of(index) == 2, size, hit);
    }
    tally
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mem = args.mem_mib << 20;
    let max_object = 8 << 20;
    let sizes: Vec<u32> = object_sizes(args.objects, args.seed)
        .into_iter()
        .map(|s| (s / args.size_divisor.max(1)).max(64))
        .collect();
    let plan = Plan::new(args.objects, args.seed, args.alpha, args.requests, args.scan)?;
    let shards = args.shards.unwrap_or_else(|| s3fifo_shards(mem, max_object));
    println!(
        "replay: {} objects (sizes / {}), {} requests, alpha {}, scan {}, {} MiB; s3fifo shards {}",
        args.objects,
        args.size_divisor,
        plan.seq.len(),
        args.alpha,
        if args.scan { "yes" } else { "no" },
        args.mem_mib,
        shards
    );
    let mut lru_bytes = 0.0;
    for (name, policy) in [
        ("lru", Policy::Lru),
        ("tinyufo", Policy::Tinyufo),
        ("s3fifo", Policy::S3fifo),
    ] {
        let manager = match args.shards {
            Some(n) if policy == Policy::S3fifo => Eviction::with_shards(mem, 8192, n),
            _ => Eviction::with_max_object(policy, mem, 8192, max_object),
        };
        let tally = replay(&manager, &sizes, &plan);
        let (hit, bytes) = tally.ratios(0);
        let (last_hit, last_bytes) = tally.ratios(1);
        if policy == Policy::Lru {
            lru_bytes = bytes;
        }
        println!(
            "{name:8} hit {hit:.1}%  byte-hit {bytes:.1}% ({:.3}x LRU's)  | last third: hit {last_hit:.1}%  byte-hit {last_bytes:.1}%",
            bytes / lru_bytes
        );
    }
    Ok(())
}
