//! Checkpoints of memcached's purge log: what a late joiner, or a corral that finds records
//! gone, reads instead of thousands of records ([`Checkpoint`]).

use std::sync::atomic::Ordering;

use tracing::warn;

use super::super::validity::millis;
use super::super::{now_stamp, Ban};
use super::{from_millis, Follower};
use crate::storage::memcached::L2;

/// A summary of the purge log up to a record, so that a corral that joins late, or finds
/// records gone, reads one value instead of thousands, and only a real gap costs it a floor.
/// Written by any corral that has just applied the log past a multiple of
/// [`CHECKPOINT_EVERY`]: its records (everything it still keeps, which is everything an entry
/// in L1 or L2 can still need) and its floor.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The log's epoch ([`L2::control_state`]): a checkpoint of another epoch is not used.
    pub epoch: u64,
    /// It covers records `1..=upto`.
    pub upto: u64,
    /// The writer's floor (ms, its clock), 0 if none.
    pub floor_ms: u64,
    /// The corral that wrote it.
    pub by: u64,
    /// Hard URL records older than this (ms, the writer's clock) are not in it: the writer
    /// let them go once the L2 copies they cover were deleted. A corral with copies of its
    /// own from before then covers them with a floor.
    #[serde(default)]
    pub hard_urls_since_ms: u64,
    pub records: Vec<Kept>,
}

/// One record of a [`Checkpoint`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Kept {
    pub at_ms: u64,
    /// The corral whose clock `at_ms` is (0: records of several clocks merged).
    pub by: u64,
    pub soft: bool,
    /// Whether memcached may still hold a copy it covers.
    #[serde(default)]
    pub l2: bool,
    pub what: KeptWhat,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KeptWhat {
    Ban(Ban),
    TagPattern {
        header: String,
        pattern: String,
    },
    Tag {
        tag: String,
    },
    /// The URL's primary key text ([`crate::key::primary`]).
    Url {
        primary: String,
    },
}

/// A checkpoint is written each time the log passes a multiple of this many records.
pub const CHECKPOINT_EVERY: u64 = 500;

/// Checkpoints larger than this are not written (memcached's default item limit is 1 MiB): a
/// late joiner then covers what it cannot read with a floor, as without checkpoints.
const CHECKPOINT_MAX_BYTES: usize = 900 * 1024;

impl Follower {
    /// Take the newest checkpoint if it covers record `at_least` and no more than `seq`, of
    /// this epoch. Returns the last record it covers.
    pub(super) async fn catch_up_from_checkpoint(&self, l2: &L2, at_least: u64, seq: u64) -> Option<u64> {
        let epoch = *self.epoch.lock();
        let cp = l2
            .log_checkpoints()
            .await
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<Checkpoint>(bytes).ok())
            .filter(|cp| cp.version == 1 && Some(cp.epoch) == epoch && cp.upto <= seq)
            .max_by_key(|cp| cp.upto)?;
        if cp.upto < at_least {
            return None;
        }
        let upto = cp.upto;
        let n = cp.records.len();
        if self.l1.stats().entries > 0 || self.l1.fills_in_progress() > 0 {
            // copies of this corral's own may be older than the hard URL purges the
            // checkpoint no longer lists
            let since = from_millis(cp.hard_urls_since_ms) + self.skew;
            self.validity.invalidate_all_before(since.min(now_stamp()));
        }
        self.validity.restore(cp.records, cp.floor_ms);
        self.seen.store(upto, Ordering::Release);
        tracing::info!(upto, records = n, "purge log caught up from a checkpoint");
        Some(upto)
    }

    /// Having applied the log up to `seq`: if that passed a multiple of
    /// [`CHECKPOINT_EVERY`], write a checkpoint of what this corral keeps now.
    pub(super) async fn checkpoint(&self, l2: &L2, seq: u64) {
        let Some(epoch) = *self.epoch.lock() else { return };
        // since the last one this corral wrote or passed (a read that stopped short of `seq`
        // is resumed by the next one, which must still write it)
        if seq / CHECKPOINT_EVERY <= self.checkpointed.load(Ordering::Acquire) / CHECKPOINT_EVERY {
            return;
        }
        self.checkpointed.fetch_max(seq, Ordering::AcqRel);
        let (records, floor_ms, hard_urls_since) = self.validity.snapshot();
        let cp = Checkpoint {
            version: 1,
            epoch,
            upto: seq,
            floor_ms,
            by: crate::purge::corral_id(),
            hard_urls_since_ms: millis(hard_urls_since),
            records,
        };
        let Ok(bytes) = serde_json::to_vec(&cp) else {
            return;
        };
        if bytes.len() > CHECKPOINT_MAX_BYTES {
            warn!(
                bytes = bytes.len(),
                records = cp.records.len(),
                "purge log checkpoint too large for memcached: not written (late joiners fall back to a floor)"
            );
            return;
        }
        l2.set_log_checkpoint(&bytes).await;
    }
}
