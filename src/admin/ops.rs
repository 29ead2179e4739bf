//! The operator's endpoints: `/stats`, `/keys`, `/stats/memcached`, `/config`, `/readyz`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use http::{Response, StatusCode};
use serde::Serialize;

use super::{reply, Admin};
use crate::json;
use crate::metrics;
use crate::storage::memory::{split_url, Cursor};

/// `/keys` pages: the default and the largest `limit`.
const KEYS_DEFAULT: usize = 100;
const KEYS_MAX: usize = 1000;

/// How long an upstream check of `/readyz` is reused (a load balancer polls often).
const READY_CACHE: Duration = Duration::from_secs(1);

/// How long `/stats/memcached` waits for one server's `stats`.
const STATS_TIMEOUT: Duration = Duration::from_secs(1);

fn ok_json<T: Serialize>(value: &T) -> Response<Vec<u8>> {
    reply(StatusCode::OK, "application/json", json::body(value))
}

fn bad_request(message: &str) -> Response<Vec<u8>> {
    reply(StatusCode::BAD_REQUEST, "application/json", json::error(message))
}

#[derive(Serialize)]
struct Stats<'a> {
    version: &'static str,
    uptime_s: u64,
    config_hash: &'a str,
    l1_entries: usize,
    l1_bytes: usize,
    memory_bytes: usize,
    l1_evicted: u64,
    /// `corral_requests_total` by cache outcome.
    requests: BTreeMap<String, u64>,
    /// `corral_upstream_requests_total` by result.
    upstream: BTreeMap<String, u64>,
    /// `corral_purges_total` by result.
    purges: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct KeyRow<'a> {
    url: &'a str,
    host: std::borrow::Cow<'a, str>,
    path: &'a str,
    variant: Option<&'a str>,
    bytes: usize,
    age_s: u64,
    ttl_s: i64,
    stale: bool,
    hits: u32,
    tags: &'a [String],
}

#[derive(Serialize)]
struct KeysPage<'a> {
    keys: Vec<KeyRow<'a>>,
    next: Option<String>,
}

#[derive(Serialize)]
struct ServerStats {
    server: String,
    reachable: bool,
    /// corral's view: `closed` (used) or `open` (skipped until a probe answers).
    circuit: &'static str,
    /// corral's operations on this server, by result (`ok`, `error`, `skipped`).
    corral: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, Default)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// `key=value` pairs of a query string, percent-decoded.
fn query_pairs(query: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_decode(&s).ok_or_else(|| format!("bad percent-encoding in {pair:?}"))
        };
        out.insert(decode(k)?, decode(v)?);
    }
    Ok(out)
}

/// `%XX` sequences decoded; `None` for a broken one or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Admin {
    pub(super) fn stats(&self) -> Response<Vec<u8>> {
        let s = self.parts.storage.l1.stats();
        let live = self.live.load();
        ok_json(&Stats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            config_hash: &live.cfg.hash,
            l1_entries: s.entries,
            l1_bytes: s.bytes,
            memory_bytes: self.memory_bytes,
            l1_evicted: pingora_cache::eviction::EvictionManager::evicted_items(self.parts.eviction) as u64,
            requests: metrics::counts(&metrics::REQUESTS, &[0]),
            upstream: metrics::counts(&metrics::UPSTREAM_REQUESTS, &[0]),
            purges: metrics::counts(&metrics::PURGES, &[1]),
        })
    }

    /// `GET /keys?host=&prefix=&limit=&cursor=`: a page of what L1 holds, in key order.
    pub(super) fn keys(&self, query: &str) -> Response<Vec<u8>> {
        let q = match query_pairs(query) {
            Ok(q) => q,
            Err(e) => return bad_request(&e),
        };
        if let Some(unknown) = q
            .keys()
            .find(|k| !matches!(k.as_str(), "host" | "prefix" | "limit" | "cursor" | "tier"))
        {
            return bad_request(&format!("unknown parameter {unknown:?}"));
        }
        match q.get("tier").map(String::as_str) {
            None | Some("l1") => {}
            Some("l2") => {
                return bad_request(
                    "tier=l2 is not available: corral does not track the keys it writes to memcached (memcached cannot list them)",
                )
            }
            Some(other) => return bad_request(&format!("tier {other:?}: l1 or l2")),
        }
        let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
            None => KEYS_DEFAULT,
            Some(Ok(n)) if (1..=KEYS_MAX).contains(&n) => n,
            Some(_) => return bad_request(&format!("limit: a number from 1 to {KEYS_MAX}")),
        };
        let after = match q.get("cursor").filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => match Cursor::parse(c) {
                Some(c) => Some(c),
                None => return bad_request("cursor: not one this endpoint gave"),
            },
        };
        // `host=www.example.org` also matches the Host sent with a port (`:8080`)
        let host = q.get("host").map(|h| h.to_ascii_lowercase());
        let host_matches = |h: &str, want: &str| {
            h.eq_ignore_ascii_case(want)
                || (!want.contains(':')
                    && h.rsplit_once(':').is_some_and(|(name, port)| {
                        name.eq_ignore_ascii_case(want) && port.parse::<u16>().is_ok()
                    }))
        };
        let prefix = q.get("prefix").cloned().unwrap_or_default();
        let page = self.parts.storage.l1.list(after, limit, |h, p| {
            host.as_deref().is_none_or(|want| host_matches(h, want)) && p.starts_with(&prefix)
        });
        let now = SystemTime::now();
        let keys = page
            .keys
            .iter()
            .map(|k| {
                let (host, path) = split_url(&k.url);
                let ttl = match k.fresh_until.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                KeyRow {
                    url: &k.url,
                    host,
                    path,
                    variant: k.variant.as_deref(),
                    bytes: k.bytes,
                    age_s: now.duration_since(k.epoch).map_or(0, |d| d.as_secs()),
                    ttl_s: ttl,
                    stale: now >= k.fresh_until,
                    hits: k.hits,
                    tags: &k.tags,
                }
            })
            .collect();
        ok_json(&KeysPage {
            keys,
            next: page.next.map(|c| c.text()),
        })
    }

    /// `GET /stats/memcached`: each server's own `stats`, and corral's view of it. A server
    /// that does not answer is marked, not an error.
    pub(super) async fn stats_memcached(&self) -> Response<Vec<u8>> {
        let corral = serde_json::json!({
            "requests": metrics::counts(&metrics::L2_REQUESTS, &[0, 1]),
            "errors": metrics::counts(&metrics::L2_ERRORS, &[0]),
        });
        let Some(l2) = &self.parts.storage.l2 else {
            return ok_json(&serde_json::json!({ "configured": false, "servers": [], "corral": corral }));
        };
        // one at a time, and a second's answer reused: each asks every server on a thread of
        // its own (the memcache crate's client blocks), and pages poll it
        let mut last = self.memcached_stats.lock().await;
        if let Some((at, body)) = &*last {
            if at.elapsed() < READY_CACHE {
                return reply(StatusCode::OK, "application/json", body.clone());
            }
        }
        let per_server = metrics::counts(&metrics::L2_SERVER_REQUESTS, &[0, 1]);
        let per_server = &per_server;
        let asks = l2.server_states().into_iter().map(|(server, up)| async move {
            let addr = server.clone();
            // the crate's connect has no timeout: a server that drops packets would hold a
            // thread for minutes, so a connection is tried here first, bounded
            let reachable =
                tokio::time::timeout(STATS_TIMEOUT, tokio::net::TcpStream::connect(server.as_str())).await;
            let got = match reachable {
                Ok(Ok(_)) => tokio::time::timeout(
                    STATS_TIMEOUT * 2,
                    tokio::task::spawn_blocking(move || server_stats(&addr)),
                )
                .await
                .map_err(|_| "no answer in time".to_string())
                .and_then(|joined| joined.map_err(|e| e.to_string()))
                .and_then(|r| r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no connection within {STATS_TIMEOUT:?}")),
            };
            let (stats, error) = match got {
                Ok(stats) => (Some(stats), None),
                Err(e) => (None, Some(e)),
            };
            // corral's own counts for this server, by result
            let prefix = format!("{server}:");
            let requests: BTreeMap<&str, u64> = per_server
                .iter()
                .filter_map(|(k, n)| k.strip_prefix(prefix.as_str()).map(|result| (result, *n)))
                .collect();
            ServerStats {
                reachable: stats.is_some(),
                corral: serde_json::json!({ "requests": requests }),
                server,
                circuit: if up { "closed" } else { "open" },
                stats,
                error,
            }
        });
        let servers = futures::future::join_all(asks).await;
        let body =
            json::body(&serde_json::json!({ "configured": true, "servers": servers, "corral": corral }));
        *last = Some((Instant::now(), body.clone()));
        reply(StatusCode::OK, "application/json", body)
    }

    /// `GET /config`: the effective config (every default filled in), secrets redacted.
    pub(super) fn config(&self) -> Response<Vec<u8>> {
        let live = self.live.load();
        let mut v = live.cfg.redacted();
        if let Some(o) = v.as_object_mut() {
            o.insert("source".into(), live.cfg.source.clone().into());
            o.insert("hash".into(), live.cfg.hash.clone().into());
            o.insert("needs_restart".into(), self.live.pending_restart().into());
        }
        ok_json(&v)
    }

    /// `GET /readyz`: 200 when corral can serve, 503 with the reason when not. The upstream
    /// must accept a connection (checked at most once a second); with memcached, at least one
    /// server must be in use; with a bus, it must be connected. Peers are reported, never a
    /// reason: a failed peer is degraded service, and its purges wait in a backlog.
    pub(super) async fn readyz(&self) -> Response<Vec<u8>> {
        let mut checks: BTreeMap<&str, Check> = BTreeMap::new();
        let mut reasons: Vec<String> = Vec::new();
        let upstream = self.upstream_ready().await;
        if let Err(e) = &upstream {
            reasons.push(format!("upstream: {e}"));
        }
        checks.insert(
            "upstream",
            Check {
                ok: upstream.is_ok(),
                detail: upstream.err(),
            },
        );
        if let Some(l2) = &self.parts.storage.l2 {
            let states = l2.server_states();
            let up = states.iter().filter(|(_, up)| *up).count();
            let detail = format!("{up} of {} servers up", states.len());
            if up == 0 {
                reasons.push(format!("memcached: {detail}"));
            }
            checks.insert(
                "memcached",
                Check {
                    ok: up > 0,
                    detail: Some(detail),
                },
            );
        }
        // a corral that cannot confirm memcached's purge log serves, but revalidates its L1
        // copies first (the fence): degraded, reported, not a reason to take it out
        let mut degraded: Vec<String> = Vec::new();
        if self.parts.storage.l2.is_some() {
            let fenced = self.parts.storage.log.fence(SystemTime::now()).is_some();
            let detail = if fenced {
                "unconfirmed: L1 copies are revalidated before use (the fence)"
            } else {
                "confirmed"
            };
            if fenced {
                degraded.push(format!("purge_log: {detail}"));
            }
            checks.insert(
                "purge_log",
                Check {
                    ok: !fenced,
                    detail: Some(detail.into()),
                },
            );
        }
        let peers = self.cluster.status();
        if let Some(list) = peers
            .get("peers")
            .and_then(|p| p.as_array())
            .filter(|l| !l.is_empty())
        {
            let failed = list.iter().filter(|p| p["state"] == "failed").count();
            checks.insert(
                "peers",
                Check {
                    ok: true,
                    detail: Some(format!("{} peers, {failed} failed", list.len())),
                },
            );
        }
        if let Some(bus) = self.cluster.bus_status() {
            let connected = bus["connected"].as_bool().unwrap_or(false);
            if !connected {
                reasons.push("bus: not connected".into());
            }
            checks.insert(
                "bus",
                Check {
                    ok: connected,
                    detail: Some(if connected { "connected" } else { "not connected" }.into()),
                },
            );
        }
        let ready = reasons.is_empty();
        let mut body = serde_json::json!({ "ready": ready, "checks": checks });
        if !ready {
            body["reason"] = reasons.join("; ").into();
        }
        if !degraded.is_empty() {
            body["degraded"] = degraded.into();
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        reply(status, "application/json", json::body(&body))
    }

    /// Can a connection to the upstream be made (within its connect timeout)? Reused for
    /// [`READY_CACHE`].
    async fn upstream_ready(&self) -> Result<(), String> {
        let mut last = self.upstream_check.lock().await;
        if let Some((at, outcome)) = &*last {
            if at.elapsed() < READY_CACHE {
                return outcome.clone();
            }
        }
        let cfg = self.live.load().cfg.clone();
        let address = cfg.upstream.address.clone();
        let outcome = match tokio::time::timeout(
            cfg.upstream.connect_timeout,
            tokio::net::TcpStream::connect(address.as_str()),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{address}: {e}")),
            Err(_) => Err(format!(
                "{address}: no connection within {:?}",
                cfg.upstream.connect_timeout
            )),
        };
        *last = Some((Instant::now(), outcome.clone()));
        outcome
    }
}

/// One server's `stats` (memcached's own), through the `memcache` crate's client (blocking:
/// run it off the runtime), the numbers as numbers, and its hit ratio.
fn server_stats(addr: &str) -> Result<serde_json::Value, String> {
    let client = memcache::Client::builder()
        .add_server(format!("memcache://{addr}"))
        .and_then(|b| {
            b.with_max_pool_size(1)
                .with_connection_timeout(STATS_TIMEOUT)
                .with_read_timeout(STATS_TIMEOUT)
                .with_write_timeout(STATS_TIMEOUT)
                .build()
        })
        .map_err(|e| e.to_string())?;
    let all = client.stats().map_err(|e| e.to_string())?;
    let (_, stats) = all.into_iter().next().ok_or("no answer")?;
    let mut out = serde_json::Map::new();
    for (k, v) in &stats {
        let value = match v.parse::<u64>() {
            Ok(n) => n.into(),
            Err(_) => match v.parse::<f64>() {
                Ok(f) => f.into(),
                Err(_) => v.clone().into(),
            },
        };
        out.insert(k.clone(), value);
    }
    let n = |k: &str| stats.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let lookups = n("get_hits") + n("get_misses");
    out.insert(
        "hit_ratio".into(),
        if lookups > 0.0 {
            (n("get_hits") / lookups).into()
        } else {
            serde_json::Value::Null
        },
    );
    Ok(out.into())
}
