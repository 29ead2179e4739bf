//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/stats` (JSON).
//!
//! It binds to loopback by default (`server.admin`). Purge and cache-control endpoints, with
//! their allow-list, come with the purge API.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::metrics;
use crate::proxy::CacheParts;

pub struct Admin {
    pub parts: &'static CacheParts,
    pub memory_bytes: usize,
}

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
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        self.parts.publish_gauges();
        match path.as_str() {
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render()),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/stats" => {
                let s = self.parts.storage.l1.stats();
                let body = format!(
                    "{{\"l1_entries\":{},\"l1_bytes\":{},\"memory_bytes\":{},\"l1_evicted\":{}}}\n",
                    s.entries,
                    s.bytes,
                    self.memory_bytes,
                    pingora_cache::eviction::EvictionManager::evicted_items(self.parts.eviction)
                );
                reply(StatusCode::OK, "application/json", body)
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}
