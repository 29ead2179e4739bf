//! What corral writes into responses itself: `Cache-Status` (RFC 9211), the last touches of
//! every header, its own error answers and JSON bodies.

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
    HeaderValue::from_maybe_shared(Bytes::from(status.header_value()))
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid cache-status"))
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
    fn ttl_is_negative_when_stale() {
        let now = SystemTime::now();
        let h = ResponseHeader::build(200, None).unwrap();
        let fresh = CacheMeta::new(now + Duration::from_secs(42), now, 0, 0, h.clone());
        assert_eq!(ttl_secs(&fresh, now), 42);
        let stale = CacheMeta::new(now - Duration::from_millis(2500), now, 0, 0, h);
        assert_eq!(ttl_secs(&stale, now), -3);
    }
}
