//! corral: a caching HTTP reverse proxy on Pingora.
pub mod config;
pub mod key;
pub mod policy;
pub mod storage;
