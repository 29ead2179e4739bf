//! The admin listener.
//!
//! Open to whoever reaches it (it binds to loopback by default, `server.admin`): `/` (the
//! status page, [`status`]), `/metrics` (Prometheus text), `/healthz`, `/readyz`, `/stats`.
//! Checked against the `[purge]` allow-list and token like purges on the proxy listener
//! (403 otherwise): `/keys`, `/stats/memcached`, `/config`, `/peers`, `/bus`, `/recent`,
//! `/events` (server-sent events: each cache drop), `POST /reload`, and the purge endpoints
//! `POST /purge` (a batch) and `POST /purge/all` (both take `?wait=peers`; refused with 405,
//! as on the proxy listener).

mod ops;
mod status;

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;

use crate::cache::CacheParts;
use crate::json;
use crate::metrics;
use crate::purge::{Batch, Purge, Target};

pub struct Admin {
    parts: &'static CacheParts,
    cluster: &'static crate::transport::Cluster,
    live: &'static crate::live::Reloader,
    /// `cache.memory_bytes` as corral started (it needs a restart to change).
    memory_bytes: usize,
    started: std::time::Instant,
    /// The last upstream check of `/readyz`: when, and its outcome.
    upstream_check: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// The last `/stats/memcached` answer: when, and its body.
    memcached_stats: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Admin {
    pub fn new(
        parts: &'static CacheParts,
        cluster: &'static crate::transport::Cluster,
        live: &'static crate::live::Reloader,
    ) -> Admin {
        Admin {
            parts,
            cluster,
            memory_bytes: live.load().cfg.cache.memory_bytes,
            live,
            started: std::time::Instant::now(),
            upstream_check: tokio::sync::Mutex::new(None),
            memcached_stats: tokio::sync::Mutex::new(None),
        }
    }

    /// The DNS rebinding and cross-site guard: the `Host` must be an address, `localhost` or
    /// one of `server.admin_hosts` (a page that rebinds its own name to this listener sends
    /// that name), and a request a browser marks with `Origin` must come from this listener
    /// itself (a form on another site cannot post to `/reload` or `/purge/all`).
    fn host_ok(&self, session: &ServerSession) -> bool {
        let headers = &session.req_header().headers;
        let host = headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(|h| h.trim().to_ascii_lowercase());
        let Some(host) = host else {
            // HTTP/1.0 without Host: a script, not a browser
            return true;
        };
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or("").to_string(),
            None => host
                .rsplit_once(':')
                .map_or(host.as_str(), |(n, _)| n)
                .to_string(),
        };
        let named_ok = name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.live.load().cfg.server.admin_hosts.contains(&name);
        let origin_ok = headers
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|o| {
                o.split_once("://")
                    .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&host))
            });
        named_ok && origin_ok
    }

    /// Whether the request's source and token pass `[purge]`'s allow-list (the config now).
    fn permitted(&self, session: &ServerSession) -> bool {
        let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let auth = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.live.load().cfg.purge.access.permits(ip, auth)
    }
}

/// The endpoints anyone who reaches the listener may read.
const OPEN: [&str; 5] = ["/", "/metrics", "/healthz", "/readyz", "/stats"];

/// The largest batch body accepted.
const MAX_BATCH_BYTES: usize = 1 << 20;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !session.read_request().await.ok()? {
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(60));
        }
        if session.req_header().uri.path() == "/events"
            && session.req_header().method == http::Method::GET
            && self.permitted(&session)
            && self.host_ok(&session)
        {
            self.events(session, shutdown.clone()).await;
            return None;
        }
        let (parts, body) = self.response(&mut session).await.into_parts();
        let head: ResponseHeader = parts.into();
        session.write_response_header(Box::new(head)).await.ok()?;
        session.write_response_body(body.into(), true).await.ok()?;
        let settings = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|s| ReusedHttpStream::from_reusable_stream(s, settings))
    }
}

impl Admin {
    /// `GET /events`: every cache drop from now on, as server-sent events (`data: <json>`),
    /// until the client goes or corral stops. A comment line first, and every 15 s.
    async fn events(&self, mut session: ServerSession, mut shutdown: ShutdownWatch) {
        let Some(mut events) = crate::events::subscribe() else {
            let busy = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "too many event streams\n".into(),
            );
            let (parts, body) = busy.into_parts();
            let head: ResponseHeader = parts.into();
            if session.write_response_header(Box::new(head)).await.is_ok() {
                let _ = session.write_response_body(body.into(), true).await;
            }
            return;
        };
        let mut head = match ResponseHeader::build(StatusCode::OK, Some(3)) {
            Ok(h) => h,
            Err(_) => return,
        };
        let _ = head.insert_header(http::header::CONTENT_TYPE, "text/event-stream");
        let _ = head.insert_header(http::header::CACHE_CONTROL, "no-store");
        session.set_keepalive(None);
        if session.write_response_header(Box::new(head)).await.is_err() {
            return;
        }
        let mut line = bytes::Bytes::from_static(b": connected\n\n");
        loop {
            // a client that stops reading is let go, not waited for
            let written = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                session.write_response_body(line, false),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
            line = tokio::select! {
                got = events.recv() => match got {
                    Ok(event) => bytes::Bytes::from(format!("data: {event}\n\n")),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        bytes::Bytes::from(format!(": {n} events missed\n\n"))
                    }
                    Err(_) => return,
                },
                _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                    bytes::Bytes::from_static(b": keep-alive\n\n")
                }
                _ = shutdown.changed() => return,
            };
        }
    }

    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let post = session.req_header().method == http::Method::POST;
        if !self.host_ok(session) {
            let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
            tracing::warn!(source = ?ip, path, "admin request refused: Host or Origin not this listener's (server.admin_hosts)");
            return reply(
                StatusCode::FORBIDDEN,
                "application/json",
                json::error("Host or Origin not allowed: list the admin's host name in server.admin_hosts"),
            );
        }
        self.parts.publish_gauges();
        if post && (path == "/purge" || path == "/purge/all") {
            return self.purge(session, &path).await;
        }
        if !OPEN.contains(&path.as_str()) && !self.permitted(session) {
            let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
            tracing::warn!(source = ?ip, path, "admin request refused: source or token not allowed");
            return reply(
                StatusCode::FORBIDDEN,
                "application/json",
                json::error("not allowed"),
            );
        }
        if post && path == "/reload" {
            let done = self.live.reload("admin").await;
            let status = if done.result == "invalid" {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            return reply(status, "application/json", json::body(&done));
        }
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        match path.as_str() {
            "/" => status::page(),
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render()),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => self.readyz().await,
            "/keys" => self.keys(&query),
            "/stats/memcached" => self.stats_memcached().await,
            "/config" => self.config(),
            "/recent" => reply(
                StatusCode::OK,
                "application/json",
                json::body(&serde_json::json!({ "events": crate::events::recent() })),
            ),
            "/peers" => reply(
                StatusCode::OK,
                "application/json",
                json::body(&self.cluster.status()),
            ),
            "/bus" => match self.cluster.bus_status() {
                Some(status) => reply(StatusCode::OK, "application/json", json::body(&status)),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    json::error("no [bus] configured"),
                ),
            },
            "/stats" => self.stats(),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    async fn purge(&self, session: &mut ServerSession, path: &str) -> Response<Vec<u8>> {
        let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        if !self.permitted(session) {
            metrics::PURGES.with_label_values(&["-", "refused"]).inc();
            tracing::warn!(source = ?ip, path, "admin purge refused: source or token not allowed");
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                json::error("not allowed"),
            );
        }
        let purges = if path == "/purge/all" {
            vec![Purge {
                target: Target::All,
                soft: false,
            }]
        } else {
            let mut body = Vec::new();
            loop {
                match session.read_request_body().await {
                    Ok(Some(chunk)) => {
                        body.extend_from_slice(&chunk);
                        if body.len() > MAX_BATCH_BYTES {
                            return reply(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "application/json",
                                json::error("batch over 1 MiB"),
                            );
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            "application/json",
                            json::error(&e.to_string()),
                        );
                    }
                }
            }
            match Batch::parse(&body) {
                Ok(p) => p,
                Err(e) => {
                    metrics::PURGES.with_label_values(&["-", "invalid"]).inc();
                    tracing::warn!(source = ?ip, error = %e, "admin purge batch refused: nothing purged");
                    return reply(StatusCode::BAD_REQUEST, "application/json", json::error(&e));
                }
            }
        };
        let wait = session
            .req_header()
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "wait=peers"));
        let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
        let mut l2_failed = 0;
        let mut receipts = Vec::new();
        for p in &purges {
            let accepted = self.cluster.accept(p).await;
            receipts.extend(accepted.receipts);
            // the broker's confirm counts as memcached's log would
            let carried = accepted.confirmed || (self.parts.storage.l2.is_some() && accepted.l2_ok);
            let (n, l2_ok) = (accepted.purged, accepted.l2_ok && carried);
            if !l2_ok {
                l2_failed += 1;
                metrics::PURGES.with_label_values(&[p.kind(), "l2-failed"]).inc();
                tracing::error!(
                    kind = p.kind(),
                    "purge applied locally but memcached could not be reached"
                );
                continue;
            }
            *counts.entry(p.kind()).or_default() += n;
            metrics::PURGES.with_label_values(&[p.kind(), "ok"]).inc();
            tracing::info!(kind = p.kind(), target = %p.target_text(), soft = p.soft, purged = n, source = ?ip, "purge accepted (admin)");
        }
        if l2_failed > 0 {
            let error = format!(
                "memcached or the message bus unavailable: {l2_failed} purges applied locally only, retry"
            );
            let body = json::body(&json::Error {
                error: &error,
                purged: Some(&counts),
            });
            return reply(StatusCode::SERVICE_UNAVAILABLE, "application/json", body);
        }
        let peers = if wait {
            Some(self.cluster.outcomes(receipts).await)
        } else {
            None
        };
        self.parts.acknowledged().await;
        let body = json::body(&json::BatchPurged {
            purged: &counts,
            accepted: purges.len(),
            peers,
        });
        reply(StatusCode::OK, "application/json", body)
    }
}
