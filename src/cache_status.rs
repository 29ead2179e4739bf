//! The `Cache-Status` response header (RFC 9211), cache name `corral`.
//!
//! | value | meaning |
//! |---|---|
//! | `corral; hit; ttl=42` | served from cache, fresh for 42 more seconds |
//! | `corral; hit; ttl=-3` | served stale (grace / stale-while-revalidate, or stale-if-error) |
//! | `corral; fwd=miss; stored` | not in cache, fetched, stored |
//! | `corral; fwd=miss` | not in cache, fetched, not storable |
//! | `corral; fwd=miss; collapsed` | waited for another request's fetch and got its response |
//! | `corral; fwd=stale; fwd-status=304; ttl=60` | stale entry revalidated by a 304 |
//! | `corral; fwd=stale; fwd-status=200; stored` | stale entry replaced by a new response |
//! | `corral; fwd=request; ...` | the client asked for validation (no-cache, max-age) |
//! | `corral; fwd=bypass` | a rule, the method or `Authorization` keeps it away from the cache |
//! | `corral; fwd=uri-miss; detail=hit-for-miss` | this URL was recently uncacheable: no lookup, no lock |
//! | `corral; fwd=miss; detail=lock-timeout` | waited `lock_timeout` for another fetch, then fetched alone |
//!
//! The same [`Outcome`] gives the access log and the metric label (`as_str`).

use std::fmt::Write;

/// What the cache did for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh hit.
    Hit,
    /// Stale copy served (within grace / SWR while one request revalidates, or on error).
    Stale,
    /// Waited on the cache lock and was served the lock holder's response.
    Collapsed,
    /// Looked up, not found (or not usable), fetched.
    Miss,
    /// Stale entry validated upstream: 304, entry refreshed.
    Revalidated,
    /// Stale entry, upstream sent a new response.
    Expired,
    /// Cache not used for this request (rule, method, credentials).
    Bypass,
    /// Cache lookup skipped because this URL was recently uncacheable.
    HitForMiss,
    /// Waited for another request's fetch too long, then fetched alone.
    LockTimeout,
}

impl Outcome {
    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Collapsed => "collapsed",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Expired => "expired",
            Outcome::Bypass => "bypass",
            Outcome::HitForMiss => "hit-for-miss",
            Outcome::LockTimeout => "lock-timeout",
        }
    }

    /// Every outcome, for metric registration.
    pub const ALL: [Outcome; 9] = [
        Outcome::Hit,
        Outcome::Stale,
        Outcome::Collapsed,
        Outcome::Miss,
        Outcome::Revalidated,
        Outcome::Expired,
        Outcome::Bypass,
        Outcome::HitForMiss,
        Outcome::LockTimeout,
    ];
}

/// Everything the header says about one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatus {
    pub outcome: Outcome,
    /// Remaining freshness in seconds, negative when stale; `None` when nothing is stored.
    pub ttl: Option<i64>,
    /// The response is being stored.
    pub stored: bool,
    /// The forward happened because the request demanded validation (no-cache, max-age).
    pub by_request: bool,
    /// Upstream status of the forward, for `fwd=stale`.
    pub fwd_status: Option<u16>,
    /// Which tier answered a hit (`l2` later); `None` for L1.
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    pub fn new(outcome: Outcome) -> Self {
        CacheStatus {
            outcome,
            ttl: None,
            stored: false,
            by_request: false,
            fwd_status: None,
            detail: None,
        }
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        let mut s = String::with_capacity(48);
        s.push_str("corral; ");
        let fwd = |s: &mut String, reason: &str| {
            s.push_str("fwd=");
            s.push_str(if self.by_request { "request" } else { reason });
        };
        match self.outcome {
            Outcome::Hit | Outcome::Stale => s.push_str("hit"),
            Outcome::Collapsed => {
                fwd(&mut s, "miss");
                s.push_str("; collapsed");
            }
            Outcome::Miss => fwd(&mut s, "miss"),
            Outcome::LockTimeout => fwd(&mut s, "miss"),
            Outcome::Revalidated | Outcome::Expired => {
                fwd(&mut s, "stale");
                if let Some(code) = self.fwd_status {
                    let _ = write!(s, "; fwd-status={code}");
                }
            }
            Outcome::Bypass => s.push_str("fwd=bypass"),
            Outcome::HitForMiss => s.push_str("fwd=uri-miss"),
        }
        if self.stored {
            s.push_str("; stored");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(s, "; ttl={ttl}");
        }
        let detail = match self.outcome {
            Outcome::HitForMiss => Some("hit-for-miss"),
            Outcome::LockTimeout => Some("lock-timeout"),
            _ => self.detail,
        };
        if let Some(d) = detail {
            let _ = write!(s, "; detail={d}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(outcome: Outcome, f: impl FnOnce(&mut CacheStatus)) -> String {
        let mut s = CacheStatus::new(outcome);
        f(&mut s);
        s.header_value()
    }

    #[test]
    fn header_values() {
        assert_eq!(with(Outcome::Hit, |s| s.ttl = Some(42)), "corral; hit; ttl=42");
        assert_eq!(with(Outcome::Stale, |s| s.ttl = Some(-3)), "corral; hit; ttl=-3");
        assert_eq!(
            with(Outcome::Miss, |s| s.stored = true),
            "corral; fwd=miss; stored"
        );
        assert_eq!(with(Outcome::Miss, |_| ()), "corral; fwd=miss");
        assert_eq!(with(Outcome::Collapsed, |_| ()), "corral; fwd=miss; collapsed");
        assert_eq!(
            with(Outcome::Revalidated, |s| {
                s.fwd_status = Some(304);
                s.ttl = Some(60)
            }),
            "corral; fwd=stale; fwd-status=304; ttl=60"
        );
        assert_eq!(
            with(Outcome::Revalidated, |s| {
                s.fwd_status = Some(304);
                s.by_request = true
            }),
            "corral; fwd=request; fwd-status=304"
        );
        assert_eq!(with(Outcome::Bypass, |_| ()), "corral; fwd=bypass");
        assert_eq!(
            with(Outcome::HitForMiss, |_| ()),
            "corral; fwd=uri-miss; detail=hit-for-miss"
        );
        assert_eq!(
            with(Outcome::LockTimeout, |_| ()),
            "corral; fwd=miss; detail=lock-timeout"
        );
        assert_eq!(
            with(Outcome::Hit, |s| s.detail = Some("l2")),
            "corral; hit; detail=l2"
        );
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
