//! Cache storage tiers behind Pingora's `Storage` trait.
//!
//! - [`memory`]: L1, in-process, bounded by bytes.
pub mod memory;
