//! The purge verbs on the proxy listener (PURGE, BAN, PURGEKEYS, PURGETAGS, URIBAN): access
//! check, parse into a [`crate::purge::Purge`], accept through
//! [`crate::transport::Cluster::accept`] (applied here, published to the peers), answer in
//! JSON. And the peers' own endpoint (`POST /_corral/peers`), where their messages arrive.

use http::{header, StatusCode};
use pingora_error::Result;
use pingora_proxy::Session;
use tracing::info;

use super::{respond_json, Corral, Ctx};
use crate::json;
use crate::metrics;
use crate::purge;
use crate::transport::{Envelope, Inbox, VERSION};

/// Repeated purge log lines are written once a minute per source or site.
const THROTTLE: std::time::Duration = std::time::Duration::from_secs(60);

impl Corral {
    /// Answer a purge request (any verb of [`purge::is_purge_method`]).
    pub(super) async fn handle_purge(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // behind a TLS terminator on the same host every peer is 127.0.0.1: the allow-list
        // looks at the client the trusted proxy saw
        let ip = self.client_ip(session, ctx);
        let req = session.req_header();
        let auth = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let method = req.method.to_string();
        ctx.purge = true;
        if !ctx.live.cfg.purge.access.permits(ip, auth) {
            metrics::PURGES.with_label_values(&["-", "refused"]).inc();
            // a CMS retries (Plone five times) and then gives up silently: one line per
            // source a minute, with the count of those left out
            let source = ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
            if let Some(left_out) = self.purge_logs.check(&format!("refused {source}"), THROTTLE) {
                tracing::warn!(%source, %method, host = %ctx.host, path = %ctx.path, left_out, "purge refused (405): source or token not allowed (purge.allow, purge.token)");
            }
            return respond_json(
                session,
                StatusCode::METHOD_NOT_ALLOWED,
                json::error("not allowed"),
            )
            .await;
        }
        let site = ctx.live.cfg.purge.site_for(&ctx.host);
        let (path, wait) = take_wait_peers(&ctx.path);
        let purge = match purge::parse(session.req_header(), &site, &path) {
            Ok(p) => p,
            Err(e) => {
                metrics::PURGES.with_label_values(&["-", "invalid"]).inc();
                tracing::warn!(source = ?ip, %method, path = %ctx.path, error = %e, "purge refused: malformed");
                let body = json::error(&e.to_string());
                return respond_json(session, StatusCode::BAD_REQUEST, body).await;
            }
        };
        let accepted = self.cluster.accept(&purge).await;
        let (purged, l2_ok) = (accepted.purged, accepted.l2_ok);
        // the broker's confirm is needed unless memcached's log took the purge too
        let carried = accepted.confirmed || (self.parts.storage.l2.is_some() && l2_ok);
        let peers = if wait {
            Some(self.cluster.outcomes(accepted.receipts).await)
        } else {
            None
        };
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
        if !carried {
            metrics::PURGES
                .with_label_values(&[purge.kind(), "bus-failed"])
                .inc();
            tracing::error!(kind = purge.kind(), site = %site, path = %ctx.path, purged, "purge applied locally but the message bus did not confirm it: answered 503 (it stays in the outbox)");
            let body = json::body(&json::Error {
                error: "message bus unavailable: purged locally only, retry",
                purged: Some(purged),
            });
            return respond_json(session, StatusCode::SERVICE_UNAVAILABLE, body).await;
        }
        self.parts.acknowledged().await;
        // a single corral only: in a fleet the site may be cached in memcached or at a peer
        // that this corral, which only passes the purge on, never served
        let alone = self.parts.storage.l2.is_none() && self.cluster.alone();
        let unknown_site = match &purge.target {
            purge::Target::Url { host, .. } => alone && purged == 0 && !self.sites.contains(host.as_str()),
            _ => false,
        };
        if unknown_site {
            // 200 all the same (the purge is recorded: a later fill is covered), but say why
            // nothing went: the CMS purges through an address that is not the site's
            metrics::PURGES
                .with_label_values(&[purge.kind(), "no_match"])
                .inc();
            if let Some(left_out) = self.purge_logs.check(&format!("site {site}"), THROTTLE) {
                info!(host = %ctx.host, site = %site, path = %ctx.path, left_out, "purge matched no cached site: nothing was ever stored for {site}; if the CMS purges through another address than the site's, map it in [purge] host_map: \"{}\" = \"<the site's host>\"", ctx.host);
            }
        } else {
            metrics::PURGES.with_label_values(&[purge.kind(), "ok"]).inc();
        }
        info!(kind = purge.kind(), target = %purge.target_text(), soft = purge.soft, %method, site = %site, purged, source = ?ip, "purge accepted");
        let body = json::body(&json::Purged {
            purged,
            kind: purge.kind(),
            soft: purge.soft,
            peers,
        });
        respond_json(session, StatusCode::OK, body).await
    }

    /// `POST /_corral/peers`: purge messages from a peer corral ([`crate::transport`]),
    /// authenticated with `peers.token`, applied through the inbox, never forwarded.
    pub(super) async fn handle_peer_message(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        ctx.purge = true;
        let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let given = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !ctx.live.peer_access.permits(ip, given.as_deref()) {
            metrics::PEER_RECEIVED.with_label_values(&["refused"]).inc();
            tracing::warn!(source = ?ip, token = given.is_some(), "peer message refused: missing or wrong peers.token, or a source neither a peer nor in purge.allow; nothing applied");
            session.set_keepalive(None);
            let status = if given.is_some() {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            return respond_json(session, status, json::error("peer token missing or wrong")).await;
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            body.extend_from_slice(&chunk);
            if body.len() > crate::transport::peers::MAX_ENVELOPE_BYTES {
                metrics::PEER_RECEIVED.with_label_values(&["invalid"]).inc();
                session.set_keepalive(None);
                let e = json::error("envelope too large");
                return respond_json(session, StatusCode::PAYLOAD_TOO_LARGE, e).await;
            }
        }
        let env: Envelope = match serde_json::from_slice(&body) {
            Ok(env) => env,
            Err(e) => {
                metrics::PEER_RECEIVED.with_label_values(&["invalid"]).inc();
                tracing::warn!(source = ?ip, error = %e, "peer message refused: malformed, nothing applied");
                return respond_json(
                    session,
                    StatusCode::BAD_REQUEST,
                    json::error(&format!("invalid envelope: {e}")),
                )
                .await;
            }
        };
        let checked = if env.v == VERSION {
            Inbox::check(&env)
        } else {
            Err(format!(
                "envelope version {} (this corral reads {VERSION})",
                env.v
            ))
        };
        if let Err(why) = checked {
            metrics::PEER_RECEIVED.with_label_values(&["invalid"]).inc();
            tracing::warn!(source = ?ip, error = %why, "peer message refused: malformed, nothing applied");
            return respond_json(session, StatusCode::BAD_REQUEST, json::error(&why)).await;
        }
        let received = self.cluster.inbox.receive(&env);
        respond_json(session, StatusCode::OK, json::body(&received)).await
    }
}

/// Split `?wait=peers` off a purge's path and query: (what is purged, whether to wait).
fn take_wait_peers(path: &str) -> (std::borrow::Cow<'_, str>, bool) {
    let Some((p, query)) = path.split_once('?') else {
        return (path.into(), false);
    };
    if !query.split('&').any(|kv| kv == "wait=peers") {
        return (path.into(), false);
    }
    let rest: Vec<&str> = query.split('&').filter(|kv| *kv != "wait=peers").collect();
    if rest.is_empty() {
        (p.to_string().into(), true)
    } else {
        (format!("{p}?{}", rest.join("&")).into(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::take_wait_peers;

    #[test]
    fn wait_peers_is_taken_off_the_purged_url_and_nothing_else() {
        assert_eq!(take_wait_peers("/a?wait=peers"), ("/a".into(), true));
        assert_eq!(
            take_wait_peers("/a?x=1&wait=peers&y=2"),
            ("/a?x=1&y=2".into(), true)
        );
        assert_eq!(take_wait_peers("/a?x=1"), ("/a?x=1".into(), false));
        assert_eq!(
            take_wait_peers("/a?wait=peersx"),
            ("/a?wait=peersx".into(), false)
        );
        assert_eq!(take_wait_peers("/a"), ("/a".into(), false));
    }
}
