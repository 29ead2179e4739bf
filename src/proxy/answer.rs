//! What corral writes into responses itself: `Cache-Status` (RFC 9211), the last touches of
//! every header, its own error answers and JSON bodies.

use std::sync::LazyLock;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use pingora_cache::{CacheMeta, CachePhase, NoCacheReason};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::headers::strip_tags;
use super::{Corral, Ctx, CACHE_STATUS};
use crate::cache_status::{CacheStatus, Outcome};

impl Corral {
    /// An error answer of corral's own (Pingora's `respond_error` with `Cache-Status`, and
    /// `Retry-After` when the upstream is busy).
    pub(super) async fn respond_error(&self, session: &mut Session, ctx: &mut Ctx, code: u16) -> Result<()> {
        let mut resp = ResponseHeader::build(code, Some(4))?;
        resp.insert_header(header::CONTENT_LENGTH, "0")?;
        resp.insert_header(header::CACHE_CONTROL, "private, no-store")?;
        if ctx.upstream_busy {
            resp.insert_header(header::RETRY_AFTER, "1")?;
            ctx.refused = true;
        }
        let status = CacheStatus::new(if ctx.bypass.is_some() {
            Outcome::Bypass
        } else {
            Outcome::Miss
        });
        resp.insert_header(CACHE_STATUS, cache_status_value(&status)?)?;
        ctx.status.get_or_insert(status);
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), true).await
    }

    /// The last touches of every response header: `Cache-Status`, tag headers stripped.
    pub(super) fn finish_header(
        &self,
        resp: &mut ResponseHeader,
        status: CacheStatus,
        ctx: &Ctx,
    ) -> Result<()> {
        resp.insert_header(CACHE_STATUS, cache_status_value(&status)?)?;
        if ctx.live.cfg.purge.strip_tag_headers {
            strip_tags(resp);
        }
        if ctx.live.cfg.cache.strip_targeted {
            super::headers::strip_targeted_fields(resp);
        }
        Ok(())
    }

    pub(super) fn cache_status(&self, session: &Session, ctx: &Ctx) -> CacheStatus {
        let cache = &session.cache;
        if ctx.bypass.is_some() {
            return CacheStatus::new(Outcome::Bypass);
        }
        let outcome = match cache.phase() {
            CachePhase::Hit if cache.lock_duration().is_some() => Outcome::Collapsed,
            CachePhase::Hit => Outcome::Hit,
            CachePhase::Stale | CachePhase::StaleUpdating => Outcome::Stale,
            CachePhase::Miss => Outcome::Miss,
            CachePhase::Expired => Outcome::Expired,
            CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => Outcome::Revalidated,
            CachePhase::Bypass => Outcome::HitForMiss,
            CachePhase::Disabled(NoCacheReason::CacheLockTimeout) => Outcome::LockTimeout,
            CachePhase::Disabled(NoCacheReason::NeverEnabled) => Outcome::Bypass,
            CachePhase::Disabled(_) if cache.predicted_uncacheable_reason().is_some() => Outcome::HitForMiss,
            CachePhase::Disabled(_) | CachePhase::Uninit | CachePhase::CacheKey => Outcome::Miss,
        };
        let mut status = CacheStatus::new(outcome);
        status.by_request = ctx.by_request;
        if let Some(meta) = cache.maybe_cache_meta() {
            if matches!(
                outcome,
                Outcome::Hit | Outcome::Stale | Outcome::Collapsed | Outcome::Revalidated
            ) || ctx.storing
            {
                status.ttl = Some(ttl_secs(meta, SystemTime::now()));
            }
        }
        match outcome {
            Outcome::Miss | Outcome::Expired => status.stored = ctx.storing,
            Outcome::Hit | Outcome::Stale | Outcome::Collapsed if ctx.from_l2 => status.detail = Some("l2"),
            _ => {}
        }
        if matches!(outcome, Outcome::Revalidated) {
            status.fwd_status = Some(304);
        } else if matches!(outcome, Outcome::Expired) {
            status.fwd_status = ctx.upstream_status;
        }
        status
    }
}

pub(super) fn cache_status_value(status: &CacheStatus) -> Result<HeaderValue> {
    status
        .field_value()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "invalid cache-status"))
}

/// Every number below 10,000 written out one after the other (`0123…99989999`, 38,890
/// bytes, made once): an `Age` below that is a slice of it.
static NUMBERS: LazyLock<&'static str> = LazyLock::new(|| {
    let mut all = String::with_capacity(38_890);
    let mut number = itoa::Buffer::new();
    for n in 0..10_000u32 {
        all.push_str(number.format(n));
    }
    Box::leak(all.into_boxed_str())
});

/// The value of an `Age` field: below 10,000 seconds a static slice of [`NUMBERS`], with no
/// allocation (the fast hit path writes one per hit); above, a value of its own.
pub(super) fn age_value(age: u64) -> HeaderValue {
    let (start, len) = match age {
        0..=9 => (age, 1),
        10..=99 => (10 + (age - 10) * 2, 2),
        100..=999 => (190 + (age - 100) * 3, 3),
        1000..=9999 => (2890 + (age - 1000) * 4, 4),
        _ => return age.into(),
    };
    let numbers: &'static str = &NUMBERS;
    match numbers.get(start as usize..(start + len) as usize) {
        Some(digits) => HeaderValue::from_static(digits),
        None => age.into(),
    }
}

/// Remaining freshness in whole seconds, negative when stale.
pub(super) fn ttl_secs(meta: &CacheMeta, now: SystemTime) -> i64 {
    match meta.fresh_until().duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

pub(super) async fn respond_json(session: &mut Session, status: StatusCode, body: String) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::from(body)), true).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_age_value_is_its_number_written_out() {
        for age in (0..=10_001).chain([59_999, u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(
                age_value(age).to_str().ok(),
                Some(age.to_string().as_str()),
                "{age}"
            );
        }
        assert_eq!(NUMBERS.len(), 38_890);
    }

    #[test]
    fn ttl_is_negative_when_stale() {
        let now = SystemTime::now();
        let h = ResponseHeader::build(200, None).unwrap();
        let fresh = CacheMeta::new(now + Duration::from_secs(42), now, 0, 0, h.clone());
        assert_eq!(ttl_secs(&fresh, now), 42);
        let stale = CacheMeta::new(now - Duration::from_millis(2500), now, 0, 0, h);
        assert_eq!(ttl_secs(&stale, now), -3);
    }
}
