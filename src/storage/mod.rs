//! Cache storage tiers behind Pingora's `Storage` trait.
//!
//! - [`memory`]: L1, in-process, bounded by bytes.
//! - [`memcached`]: L2, shared by every corral of a site.
//! - [`record`]: the binary value stored in memcached.
//! - [`Tiered`] (`tiered.rs`) joins them: a lookup tries L1, then L2 (an L2 hit is promoted
//!   into L1 with its remaining lifetime), then reports a miss. A fill writes L1 as the body
//!   streams, and L2 once the body is complete, on a spawned task, so the L2 write never
//!   delays the client. The L2 expiry is the remaining freshness plus the longer of the
//!   serve-stale windows (capped at `memcached.max_ttl`), so grace and stale-if-error also
//!   work from L2.
//!
//! How one corral of the cluster fills or refreshes a key while the others wait for its copy
//! (fill leases, refresh locks, the L2 read gate) is [`crate::lock`]. How purges recorded in
//! memcached's log reach L1 is [`crate::purge::log`] and [`crate::purge::sweep`].

pub mod eviction;
pub mod memcached;
pub mod memory;
pub mod record;
mod tiered;

pub use tiered::Tiered;
