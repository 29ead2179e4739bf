//! The purge verbs on the proxy listener (PURGE, BAN, PURGEKEYS, PURGETAGS, URIBAN): access
//! check, parse into a [`crate::purge::Purge`], apply through [`crate::cache::CacheParts::apply`],
//! answer in JSON.

use http::{header, StatusCode};
use pingora_error::Result;
use pingora_proxy::Session;
use tracing::info;

use super::{respond_json, Corral, Ctx};
use crate::json;
use crate::metrics;
use crate::purge;

impl Corral {
    /// Answer a purge request (any verb of [`purge::is_purge_method`]).
    pub(super) async fn handle_purge(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let req = session.req_header();
        let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let auth = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let method = req.method.to_string();
        ctx.purge = true;
        if !self.cfg.purge.access.permits(ip, auth) {
            metrics::PURGES.with_label_values(&["-", "refused"]).inc();
            tracing::warn!(source = ?ip, %method, host = %ctx.host, path = %ctx.path, "purge refused: source or token not allowed");
            return respond_json(
                session,
                StatusCode::METHOD_NOT_ALLOWED,
                json::error("not allowed"),
            )
            .await;
        }
        let site = self.cfg.purge.site_for(&ctx.host);
        let purge = match purge::parse(session.req_header(), &site, &ctx.path) {
            Ok(p) => p,
            Err(e) => {
                metrics::PURGES.with_label_values(&["-", "invalid"]).inc();
                tracing::warn!(source = ?ip, %method, path = %ctx.path, error = %e, "purge refused: malformed");
                let body = json::error(&e.to_string());
                return respond_json(session, StatusCode::BAD_REQUEST, body).await;
            }
        };
        let (purged, l2_ok) = self.parts.apply(&purge).await;
        if !l2_ok {
            // never acknowledge a purge that other corrals may not see: the client retries
            metrics::PURGES
                .with_label_values(&[purge.kind(), "l2-failed"])
                .inc();
            tracing::error!(kind = purge.kind(), site = %site, path = %ctx.path, purged, "purge applied locally but memcached could not be reached: answered 503");
            let body = json::body(&json::Error {
                error: "memcached unavailable: purged locally only, retry",
                purged: Some(purged),
            });
            return respond_json(session, StatusCode::SERVICE_UNAVAILABLE, body).await;
        }
        self.parts.acknowledged().await;
        metrics::PURGES.with_label_values(&[purge.kind(), "ok"]).inc();
        info!(kind = purge.kind(), target = %purge.target_text(), soft = purge.soft, %method, site = %site, purged, source = ?ip, "purge accepted");
        let body = json::body(&json::Purged {
            purged,
            kind: purge.kind(),
            soft: purge.soft,
        });
        respond_json(session, StatusCode::OK, body).await
    }
}
