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

use http::HeaderValue;

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
        let mut s = Vec::with_capacity(48);
        self.write_value(|piece| s.extend_from_slice(piece));
        String::from_utf8(s).expect("pieces of str")
    }

    /// The header value as a field value, put together on the stack: one allocation (the
    /// value's) and no formatting machinery, as the fast hit path writes one per hit.
    pub fn field_value(&self) -> Option<HeaderValue> {
        let mut value = crate::onstack::OnStack::<128>::default();
        self.write_value(|piece| value.push(piece));
        match value.bytes() {
            Some(value) => HeaderValue::from_bytes(value).ok(),
            None => HeaderValue::from_str(&self.header_value()).ok(),
        }
    }

    /// The bytes of the header value, in pieces.
    pub(crate) fn write_value(&self, mut out: impl FnMut(&[u8])) {
        let mut number = itoa::Buffer::new();
        out(b"corral; ");
        let fwd = |out: &mut dyn FnMut(&[u8]), reason: &str| {
            out(b"fwd=");
            out(if self.by_request {
                b"request".as_slice()
            } else {
                reason.as_bytes()
            });
        };
        match self.outcome {
            Outcome::Hit | Outcome::Stale => out(b"hit"),
            Outcome::Collapsed => {
                fwd(&mut out, "miss");
                out(b"; collapsed");
            }
            Outcome::Miss => fwd(&mut out, "miss"),
            Outcome::LockTimeout => fwd(&mut out, "miss"),
            Outcome::Revalidated | Outcome::Expired => {
                fwd(&mut out, "stale");
                if let Some(code) = self.fwd_status {
                    out(b"; fwd-status=");
                    out(number.format(code).as_bytes());
                }
            }
            Outcome::Bypass => out(b"fwd=bypass"),
            Outcome::HitForMiss => out(b"fwd=uri-miss"),
        }
        if self.stored {
            out(b"; stored");
        }
        if let Some(ttl) = self.ttl {
            out(b"; ttl=");
            out(number.format(ttl).as_bytes());
        }
        let detail = match self.outcome {
            Outcome::HitForMiss => Some("hit-for-miss"),
            Outcome::LockTimeout => Some("lock-timeout"),
            _ => self.detail,
        };
        if let Some(d) = detail {
            out(b"; detail=");
            out(d.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(outcome: Outcome, f: impl FnOnce(&mut CacheStatus)) -> String {
        let mut s = CacheStatus::new(outcome);
        f(&mut s);
        // the field value written on the stack is the same text
        let field = s.field_value().expect("a valid field value");
        assert_eq!(field.to_str().ok(), Some(s.header_value().as_str()));
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
        let longest = "corral; fwd=request; fwd-status=65535; stored; ttl=-9223372036854775808";
        let full = with(Outcome::Expired, |s| {
            s.by_request = true;
            s.fwd_status = Some(u16::MAX);
            s.stored = true;
            s.ttl = Some(i64::MIN);
        });
        assert_eq!(full, longest);
        // up to the stack's 128 bytes written there, longer on the heap: the same text
        for len in [108, 109, 200] {
            let detail: &'static str = "d".repeat(len).leak();
            let value = with(Outcome::Hit, |s| s.detail = Some(detail));
            assert_eq!(value, format!("corral; hit; detail={detail}"));
            assert_eq!(value.len(), 20 + len);
        }
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
