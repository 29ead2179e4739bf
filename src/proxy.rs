//! `impl ProxyHttp`: the glue between Pingora's request phases and corral's modules.
//!
//! | phase | module |
//! |---|---|
//! | `request_filter` | classify the request: rule, bypass, client directives; purges; the fast hit path (`Corral::fast_hit`) |
//! | `request_cache_filter` | enable the cache: L1 storage, eviction, cache lock, predictor |
//! | `cache_key_callback` | [`crate::key`] |
//! | `cache_hit_filter` | purge records ([`crate::purge::Validity`]); client `no-cache`/`max-age` → revalidate ([`crate::policy`]) |
//! | `proxy_upstream_filter` | `only-if-cached` → 504 |
//! | `upstream_peer` | the configured upstream |
//! | `upstream_request_filter` | hop-by-hop headers out, `X-Forwarded-For` in |
//! | `upstream_response_filter` | hop-by-hop headers out; RFC 9111 §4.4 invalidation |
//! | `response_cache_filter` | [`crate::policy::response_cacheable`] |
//! | `cache_vary_filter` | [`crate::key::variance`] |
//! | `should_serve_stale` | grace / stale-while-revalidate and stale-if-error |
//! | `response_filter` | `Cache-Status` ([`crate::cache_status`]), tag headers out |
//! | `logging` | access line + metrics |

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use pingora_cache::eviction::{lru, EvictionManager};
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::Predictor;
use pingora_cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, ForcedFreshness, HitHandler, NoCacheReason,
    RespCacheable,
};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tracing::{debug, info};

use crate::cache_status::{CacheStatus, Outcome};
use crate::config::Config;
use crate::conn;
use crate::json;
use crate::key;
use crate::metrics;
use crate::policy::{self, Effective, RequestDirectives};
use crate::purge::{self, Purge, Target, Validity, Verdict};
use crate::storage::memcached::L2;
use crate::storage::memory::{self, CompleteHit, FreshEntry, MemoryStorage};
use crate::storage::{Refresh, Tiered};

/// RFC 9211's response header.
const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// Shards of the eviction LRU and of the predictor.
const SHARDS: usize = 16;

/// The cache machinery shared by every request, built once per process (Pingora wants
/// `&'static` for all of it).
pub struct CacheParts {
    pub storage: &'static Tiered,
    /// Bans and tag purges, checked on every hit.
    pub validity: &'static Validity,
    pub eviction: &'static lru::Manager<SHARDS>,
    pub lock: &'static CacheKeyLockImpl,
    pub predictor: &'static Predictor<SHARDS>,
}

impl CacheParts {
    /// Build and leak the cache parts for `cfg`, with the L2 client if one is configured.
    pub fn leak(cfg: &Config, l2: Option<L2>) -> &'static CacheParts {
        let l1: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new()));
        // capacity hint: entries of ~8 KiB on average, per shard
        let per_shard = (cfg.cache.memory_bytes / 8192 / SHARDS).clamp(64, 1 << 16);
        let eviction: &'static lru::Manager<SHARDS> = Box::leak(Box::new(
            lru::Manager::<SHARDS>::with_capacity(cfg.cache.memory_bytes, per_shard),
        ));
        let validity: &'static Validity = Box::leak(Box::new(Validity::default()));
        let storage: &'static Tiered = Box::leak(Box::new(Tiered::new(
            l1,
            eviction,
            validity,
            l2,
            cfg.cache.lock_timeout,
        )));
        // age timeout: a writer that holds the lock this long lets the waiters compete again
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(cfg.cache.lock_timeout));
        let predictor = Box::leak(Box::new(Predictor::<SHARDS>::new(
            cfg.cache.hit_for_miss_keys.div_ceil(SHARDS),
            None,
        )));
        Box::leak(Box::new(CacheParts {
            storage,
            validity,
            eviction,
            lock,
            predictor,
        }))
    }

    /// Remove every stored variant of the URL of `key` from L1 and the eviction manager, and
    /// its primary entry from L2. Returns how many L1 entries were removed, and whether L2
    /// (if any) confirmed the removal.
    ///
    /// L2 holds Vary variants under keys derived from their variance, which a URL alone does not
    /// give. They need no deletion: a variant is reached only through the URL's primary entry,
    /// and Pingora accepts only variants created after that primary (its `created` is their
    /// tombstone), so once the primary is gone, older variants can never be served again.
    pub async fn remove_url(&self, key: &CacheKey) -> (usize, bool) {
        let removed = self.storage.l1.remove_primary(&key.primary_bin());
        for compact in &removed {
            self.eviction
                .remove(pingora_cache::CacheEntryKeyRef::from_entry_id(compact, None));
        }
        let l2_ok = match &self.storage.l2 {
            Some(l2) => l2.delete(&l2.key(&key.combined())).await,
            None => true,
        };
        (removed.len(), l2_ok)
    }

    /// Apply a purge to this corral's L1, its validity records, and L2. Returns how many L1
    /// entries it removed or marked stale right away (bans and tag purges act lazily: 0), and
    /// whether L2 took it (false: memcached could not be reached, the purge must be retried).
    pub async fn apply(&self, purge: &Purge) -> (usize, bool) {
        if let Target::All = purge.target {
            let n = self.storage.l1.stats().entries;
            self.validity.invalidate_all_before(purge::now_stamp());
            self.storage.l1.clear();
            let l2_ok = match &self.storage.l2 {
                Some(l2) => l2.bump_generation().await.is_some(),
                None => true,
            };
            return (n, l2_ok);
        }
        // every other purge is a record, here and (through the purge log) at every corral of
        // the namespace: for a URL it also covers a fill that began before the purge and ends
        // after it, and other corrals' L1 copies
        let at = purge::now_stamp();
        self.validity.record(purge, at);
        let logged = self.log(purge, at);
        let Target::Url { host, path } = &purge.target else {
            return (0, logged.await);
        };
        let key = key::for_url(host, path);
        if purge.soft {
            // the L2 copy stays: the record makes it stale for every corral, served stale
            // while one request revalidates
            let n = self.storage.l1.expire_primary(&key.primary_bin());
            (n, logged.await)
        } else {
            let ((n, deleted), logged) = tokio::join!(self.remove_url(&key), logged);
            (n, deleted && logged)
        }
    }

    /// Append `purge` to memcached's purge log, which every corral of the namespace applies to
    /// its L1 and to what it reads from L2. True if it took (or there is no L2).
    async fn log(&self, purge: &Purge, at: std::time::SystemTime) -> bool {
        match (&self.storage.l2, purge::LogRecord::of(purge, at)) {
            (Some(l2), Some(record)) => l2.append_log(&record.encode()).await.is_some(),
            _ => true,
        }
    }

    /// Refresh the L1 gauges from storage and the eviction manager.
    pub fn publish_gauges(&self) {
        let stats = self.storage.l1.stats();
        metrics::L1_BYTES.set(stats.bytes as i64);
        metrics::L1_ENTRIES.set(stats.entries as i64);
        metrics::L1_EVICTIONS.set(self.eviction.evicted_items() as i64);
        metrics::PURGE_RECORDS.set(self.validity.len() as i64);
        metrics::PURGE_RECORD_BYTES.set(self.validity.heap_bytes() as i64);
        metrics::PURGE_LOG_APPLIED.set(self.storage.log_seen() as i64);
    }
}

/// The proxy.
pub struct Corral {
    cfg: Arc<Config>,
    parts: &'static CacheParts,
    /// Connection settings for the upstream, cloned per request.
    peer: HttpPeer,
    /// `upstream.max_connections` slots and the queue in front of them.
    upstream: Arc<UpstreamSlots>,
    /// `server.keepalive_timeout` in whole seconds, as Pingora takes it.
    keepalive_secs: u64,
}

/// Requests to the upstream at once: a sick origin gets at most `max_connections` of them,
/// the next `max_queue` wait (at most `queue_timeout`), the rest get 503 at once.
pub struct UpstreamSlots {
    slots: Arc<tokio::sync::Semaphore>,
    queued: std::sync::atomic::AtomicUsize,
    max_queue: usize,
    queue_timeout: Duration,
}

/// One request's hold on an upstream slot, given back when the request ends (drop).
pub struct UpstreamSlot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        metrics::UPSTREAM_ACTIVE.dec();
    }
}

impl UpstreamSlots {
    fn new(up: &crate::config::UpstreamConfig) -> Self {
        UpstreamSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(up.max_connections)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            max_queue: up.max_queue,
            queue_timeout: up.queue_timeout,
        }
    }

    /// A slot, at once or after waiting in the queue; `None` if the queue is full or the wait
    /// ran out.
    async fn take(&self) -> Option<UpstreamSlot> {
        use std::sync::atomic::Ordering;
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                /// Leaves the queue on every exit (timeout, a client that went away).
                struct InQueue<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for InQueue<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let ahead = self.queued.fetch_add(1, Ordering::AcqRel);
                let _in_queue = InQueue(&self.queued);
                if ahead >= self.max_queue {
                    return None;
                }
                tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        metrics::UPSTREAM_ACTIVE.inc();
        Some(UpstreamSlot(permit))
    }
}

/// Why a request does not use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bypass {
    /// A `[[rule]]` with `bypass = true`.
    Rule,
    /// Not GET or HEAD.
    Method,
    /// `Upgrade` (a WebSocket handshake).
    Upgrade,
    /// `Authorization`, without a rule's `cache_private`.
    Authorization,
}

/// Per-request state.
pub struct Ctx {
    started: Instant,
    /// When the request arrived: a response validated after it satisfies `no-cache`.
    arrived: SystemTime,
    host: String,
    path: String,
    policy: Effective,
    directives: RequestDirectives,
    /// Why the cache is not used for this request, if it is not.
    bypass: Option<Bypass>,
    /// The cache entry was forced stale by the client's directives.
    by_request: bool,
    /// The hit came from L2 (memcached).
    from_l2: bool,
    /// This request was a purge (answered by corral itself).
    purge: bool,
    /// `response_cache_filter` decided to store the response.
    storing: bool,
    upstream_started: Option<Instant>,
    upstream_header_time: Option<Duration>,
    upstream_status: Option<u16>,
    /// Header fields of a 304 that revalidated the stored entry, merged in full into it.
    not_modified: Option<http::HeaderMap>,
    status: Option<CacheStatus>,
    /// The cache key, when the fast hit path built it and then left the request to Pingora.
    key: Option<CacheKey>,
    /// The request has a range or a conditional header field.
    conditional: bool,
    /// This request revalidates its entry for the cluster and holds the refresh lock.
    refresh_lock: Option<String>,
    /// corral answered the request itself with an error (bad Host, upstream queue full).
    refused: bool,
    /// This request's upstream slot, held until the upstream response has ended.
    upstream_slot: Option<UpstreamSlot>,
    /// Every upstream slot was taken: answered 503 (or stale).
    upstream_busy: bool,
}

/// The request header fields the request filter decides on, found in one pass over the names
/// (a handful per request) rather than a map lookup each.
struct RequestFields {
    /// `Range`, `If-Range` or an `If-*` precondition.
    conditional: bool,
    /// `Cache-Control` or `Pragma`.
    directives: bool,
    authorization: bool,
    accept_encoding: bool,
    /// `Upgrade` (a WebSocket handshake, h2c): never answered from or stored in the cache.
    upgrade: bool,
}

/// Rewrite the request's `Accept-Encoding` to one of the few values cached variants are kept
/// for ([`key::normalize_accept_encoding`]).
fn normalize_accept_encoding(req: &mut RequestHeader) {
    let values = req.headers.get_all(header::ACCEPT_ENCODING);
    let normal = key::normalize_accept_encoding(values.iter().map(HeaderValue::as_bytes));
    let mut sent = values.iter();
    if let (Some(n), Some(only), None) = (normal, sent.next(), sent.next()) {
        if only.as_bytes() == n.as_bytes() {
            return;
        }
    }
    match normal {
        Some(n) => {
            let _ = req.insert_header(header::ACCEPT_ENCODING, HeaderValue::from_static(n));
        }
        None => {
            req.remove_header(&header::ACCEPT_ENCODING);
        }
    }
}

impl RequestFields {
    fn of(req: &RequestHeader) -> Self {
        let mut f = RequestFields {
            conditional: false,
            directives: false,
            authorization: false,
            accept_encoding: false,
            upgrade: false,
        };
        for name in req.headers.keys() {
            if name == header::RANGE
                || name == header::IF_RANGE
                || name == header::IF_NONE_MATCH
                || name == header::IF_MODIFIED_SINCE
                || name == header::IF_MATCH
                || name == header::IF_UNMODIFIED_SINCE
            {
                f.conditional = true;
            } else if name == header::CACHE_CONTROL || name == header::PRAGMA {
                f.directives = true;
            } else if name == header::AUTHORIZATION {
                f.authorization = true;
            } else if name == header::ACCEPT_ENCODING {
                f.accept_encoding = true;
            } else if name == header::UPGRADE {
                // h2c (curl --http2 on http://) is ignored by Pingora: a plain request
                f.upgrade = req
                    .headers
                    .get_all(header::UPGRADE)
                    .iter()
                    .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"));
            }
        }
        f
    }
}

impl Corral {
    pub fn new(cfg: Arc<Config>, parts: &'static CacheParts) -> Self {
        let up = &cfg.upstream;
        let mut peer = HttpPeer::new(up.address.as_str(), up.tls, up.sni.clone());
        peer.options.connection_timeout = Some(up.connect_timeout);
        // Pingora 0.9.1 times every read of an upstream response with one value, the head's
        // and the body's alike: the smaller of the two settings, so that a hung origin is
        // given up on after first_byte_timeout (README: Limits and timeouts)
        peer.options.read_timeout = Some(up.first_byte_timeout.min(up.read_timeout));
        peer.options.write_timeout = Some(up.write_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        let upstream = Arc::new(UpstreamSlots::new(up));
        let keepalive_secs = cfg.server.limits.keepalive_timeout.as_secs_f64().ceil().max(1.0) as u64;
        Corral {
            cfg,
            parts,
            peer,
            upstream,
            keepalive_secs,
        }
    }

    fn effective(&self, host: &str, path: &str) -> (Effective, Option<&crate::config::Rule>) {
        let c = &self.cfg.cache;
        let rule = self.cfg.rule_for(host, path);
        let eff = Effective {
            default_ttl: rule.and_then(|r| r.ttl).unwrap_or(c.default_ttl),
            grace: rule.and_then(|r| r.grace).unwrap_or(c.grace),
            stale_if_error: rule.and_then(|r| r.stale_if_error).unwrap_or(c.stale_if_error),
            cache_private: rule.is_some_and(|r| r.cache_private),
            cache_set_cookie: rule.is_some_and(|r| r.cache_set_cookie),
        };
        (eff, rule)
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates its target URI and the URIs in
    /// `Location` / `Content-Location` of the same host.
    async fn invalidate_after_unsafe(&self, ctx: &Ctx, resp: &ResponseHeader) {
        let mut removed = self.parts.remove_url(&key::for_url(&ctx.host, &ctx.path)).await.0;
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = target.parse::<http::Uri>() else {
                continue;
            };
            let same_host = uri
                .authority()
                .is_none_or(|a| key::normalize_host(a.as_str()) == ctx.host);
            if let (true, Some(pq)) = (same_host, uri.path_and_query()) {
                if pq.as_str().starts_with('/') {
                    removed += self
                        .parts
                        .remove_url(&key::for_url(&ctx.host, pq.as_str()))
                        .await
                        .0;
                }
            }
        }
        if removed > 0 {
            metrics::INVALIDATIONS.inc_by(removed as u64);
            debug!(host = %ctx.host, path = %ctx.path, removed, "invalidated by unsafe method");
        }
    }

    /// Answer a purge request (any verb of [`purge::is_purge_method`]).
    async fn handle_purge(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
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
        metrics::PURGES.with_label_values(&[purge.kind(), "ok"]).inc();
        info!(kind = purge.kind(), target = %purge.target_text(), soft = purge.soft, %method, site = %site, purged, source = ?ip, "purge accepted");
        let body = json::body(&json::Purged {
            purged,
            kind: purge.kind(),
            soft: purge.soft,
        });
        respond_json(session, StatusCode::OK, body).await
    }

    /// The fast hit path: a plain GET/HEAD (no conditionals, no range, no request directives)
    /// for a fresh, complete, variant-free L1 entry that no ban or tag purge touches is answered
    /// here, from the stored header and body, without Pingora's cache state machine (lookup
    /// boxing, a second header copy, range and conditional filters). Everything else, and
    /// every doubt, returns `false` and takes the full path, which decides the same way.
    /// Returns whether the response was sent.
    async fn fast_hit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.conditional || !ctx.directives.is_plain() {
            return Ok(false);
        }
        let head = session.req_header().method == Method::HEAD;
        let key = key::for_parts(&ctx.host, &ctx.path);
        let now = SystemTime::now();
        let Some(entry) = self.fast_entry(&key, ctx, now) else {
            ctx.key = Some(key);
            return Ok(false);
        };
        // a hit keeps the entry in the LRU, as Pingora's hit path does
        let lru_key = pingora_cache::eviction::CacheEntryKey::from_entry_id(key.to_compact(), None);
        self.parts
            .eviction
            .access(&lru_key, entry.weight(), entry.fresh_until());

        let strip = self.cfg.purge.strip_tag_headers;
        let mut resp = entry.wire(|stored| wire_header(stored, strip)).clone();
        let age = now.duration_since(entry.epoch()).unwrap_or_default().as_secs();
        resp.insert_header(header::AGE, age)?;
        let mut status = CacheStatus::new(Outcome::Hit);
        status.ttl = Some(
            entry
                .fresh_until()
                .duration_since(now)
                .map_or(0, |d| d.as_secs() as i64),
        );
        resp.insert_header(CACHE_STATUS, cache_status_value(&status)?)?;
        ctx.status = Some(status);
        metrics::FAST_HITS.inc();
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(entry.body()), true).await?;
        }
        Ok(true)
    }

    /// The L1 entry the fast hit path may serve for `key`: fresh, plain (see
    /// [`MemoryStorage::fresh_plain`]), framed by `Content-Length` (Pingora frames the others),
    /// and valid against every purge record. Otherwise `None`: the full path then decides,
    /// and applies a purge verdict (a miss, or stale while one request revalidates).
    fn fast_entry(&self, key: &CacheKey, ctx: &Ctx, now: SystemTime) -> Option<FreshEntry> {
        let entry = self.parts.storage.l1.fresh_plain(key, now)?;
        if !entry.header().headers.contains_key(header::CONTENT_LENGTH) {
            return None;
        }
        let headers = &entry.header().headers;
        let verdict = self.parts.validity.check_marked(
            &ctx.host,
            &ctx.path,
            entry.updated(),
            headers,
            Some(entry.check_mark()),
        );
        (verdict == Verdict::Valid).then_some(entry)
    }

    /// An error answer of corral's own (Pingora's `respond_error` with `Cache-Status`, and
    /// `Retry-After` when the upstream is busy).
    async fn respond_error(&self, session: &mut Session, ctx: &mut Ctx, code: u16) -> Result<()> {
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
    fn finish_header(&self, resp: &mut ResponseHeader, status: CacheStatus) -> Result<()> {
        resp.insert_header(CACHE_STATUS, cache_status_value(&status)?)?;
        if self.cfg.purge.strip_tag_headers {
            strip_tags(resp);
        }
        Ok(())
    }

    fn cache_status(&self, session: &Session, ctx: &Ctx) -> CacheStatus {
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

fn cache_status_value(status: &CacheStatus) -> Result<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(status.header_value()))
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid cache-status"))
}

/// The header a fast hit sends, built once per entry from the stored one: without the
/// case-preserving name map Pingora keeps beside the header map (half the copying per hit;
/// names go out lower-case, as in HTTP/2), tags stripped if configured, and every field a hit
/// (or Pingora's writer: `Date`, `Connection`) sets already present, so that a hit replaces
/// values and never grows the map.
fn wire_header(stored: &ResponseHeader, strip: bool) -> ResponseHeader {
    let mut h = match ResponseHeader::build_no_case(stored.status, Some(stored.headers.len() + 4)) {
        Ok(mut h) => {
            for (name, value) in &stored.headers {
                let _ = h.append_header(name.clone(), value.clone());
            }
            let _ = h.set_reason_phrase(stored.get_reason_phrase());
            h
        }
        Err(_) => stored.clone(),
    };
    h.set_version(http::Version::HTTP_11);
    if strip {
        strip_tags(&mut h);
    }
    for (name, placeholder) in [
        (header::AGE, http::HeaderValue::from_static("0")),
        (CACHE_STATUS, http::HeaderValue::from_static("corral")),
        (
            header::DATE,
            pingora_core::protocols::http::date::get_cached_date(),
        ),
        (header::CONNECTION, http::HeaderValue::from_static("keep-alive")),
    ] {
        if !h.headers.contains_key(&name) {
            let _ = h.insert_header(name, placeholder);
        }
    }
    h
}

/// Remove the tag headers (xkey, Surrogate-Key, ...) from a client response.
fn strip_tags(resp: &mut ResponseHeader) {
    if purge::has_tag_header(&resp.headers) {
        for (name, _) in purge::TAG_HEADERS {
            resp.remove_header(name);
        }
    }
}

/// RFC 9112 §6.3: a `Content-Length` sent as several identical values (`5, 5` or two lines)
/// is forwarded as one; different values make the message invalid (400).
fn single_content_length(req: &mut RequestHeader) -> Result<()> {
    let mut parts = req
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|p| {
            std::str::from_utf8(p.trim_ascii())
                .ok()
                .and_then(|p| p.parse::<u64>().ok())
        });
    let Some(first) = parts.next() else {
        return Ok(());
    };
    let mut repeated = false;
    for part in parts {
        if part.is_none() || part != first {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "different Content-Length values")
                .map_err(|e| e.into_down());
        }
        repeated = true;
    }
    if let (true, Some(length)) = (repeated, first) {
        req.insert_header(header::CONTENT_LENGTH, length)?;
    }
    Ok(())
}

/// Remaining freshness in whole seconds, negative when stale.
fn ttl_secs(meta: &CacheMeta, now: SystemTime) -> i64 {
    match meta.fresh_until().duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) other than the framing ones Pingora manages itself.
const HOP_BY_HOP: [&str; 4] = ["keep-alive", "proxy-connection", "te", "trailer"];

/// The headers to remove before forwarding: those named in `Connection` and the standard
/// hop-by-hop ones. `Connection` and `Upgrade` themselves stay (Pingora uses them for keep-alive
/// and protocol upgrades), and so do the framing headers and `Host`, whatever `Connection` says.
fn hop_by_hop(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .chain(HOP_BY_HOP.iter().map(|h| h.to_string()))
        .filter(|t| {
            !t.is_empty()
                && !matches!(
                    t.as_str(),
                    "close" | "upgrade" | "connection" | "content-length" | "transfer-encoding" | "host"
                )
                && headers.contains_key(t.as_str())
        })
        .collect()
}

async fn respond_json(session: &mut Session, status: StatusCode, body: String) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::from(body)), true).await
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

#[async_trait]
impl ProxyHttp for Corral {
    type CTX = Ctx;

    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {
        // Pingora's default adds a response compression module, disabled; corral does not
        // compress, and the module costs a context and three filter calls per request
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            arrived: SystemTime::now(),
            host: String::new(),
            path: String::new(),
            policy: Effective {
                default_ttl: Duration::ZERO,
                grace: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                cache_private: false,
                cache_set_cookie: false,
            },
            directives: RequestDirectives::default(),
            bypass: None,
            by_request: false,
            from_l2: false,
            purge: false,
            storing: false,
            upstream_started: None,
            upstream_header_time: None,
            upstream_status: None,
            not_modified: None,
            status: None,
            key: None,
            conditional: false,
            refresh_lock: None,
            refused: false,
            upstream_slot: None,
            upstream_busy: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2), as nginx and Varnish answer it: requests sent
        // ahead on a keep-alive connection are answered in order, one after another, instead
        // of Pingora's default of closing the connection after the first and dropping the rest
        session.set_pipelining_enabled(true);
        // the head is in: its deadline is met ([`conn`]); Pingora's own wait for the next
        // request on this connection is the idle timeout
        conn::head_received(session);
        if session.get_keepalive().is_some() {
            // never turns keep-alive on where Pingora turned it off (HTTP/1.0, `close`)
            session.set_keepalive(Some(self.keepalive_secs));
        }
        let req = session.req_header();
        ctx.host = match key::request_host(req) {
            Ok(host) => host,
            Err(bad) => {
                // the host is part of the key every client shares: never guess at a bad one
                ctx.refused = true;
                let host = req
                    .headers
                    .get(header::HOST)
                    .map(|h| String::from_utf8_lossy(&h.as_bytes()[..h.len().min(100)]).into_owned());
                tracing::warn!(client = ?session.client_addr(), reason = bad.as_str(), host = ?host, "request refused: 400");
                let body = json::error(bad.as_str());
                session.set_keepalive(None);
                respond_json(session, StatusCode::BAD_REQUEST, body).await?;
                return Ok(true);
            }
        };
        ctx.path = key::request_path_and_query(req).to_string();
        let (policy, rule) = self.effective(&ctx.host, &ctx.path);
        ctx.policy = policy;
        let fields = RequestFields::of(req);
        ctx.conditional = fields.conditional;
        if fields.directives {
            ctx.directives = RequestDirectives::parse(req);
        }
        if purge::is_purge_method(&req.method) {
            self.handle_purge(session, ctx).await?;
            return Ok(true);
        }
        let req = session.req_header();
        ctx.bypass = if rule.is_some_and(|r| r.bypass) {
            Some(Bypass::Rule)
        } else if !matches!(req.method, Method::GET | Method::HEAD) {
            Some(Bypass::Method)
        } else if fields.upgrade {
            // a WebSocket handshake is a GET that must reach the origin (Varnish pipes it)
            Some(Bypass::Upgrade)
        } else if fields.authorization && !policy.cache_private {
            // a stored public page must not answer an authenticated user (Varnish passes
            // these too); a rule with cache_private opts in
            Some(Bypass::Authorization)
        } else {
            None
        };
        if ctx.bypass.is_some() {
            return Ok(false);
        }
        // a background revalidation is of a stale entry: never a fast hit
        if session.subrequest_ctx.is_none() && self.fast_hit(session, ctx).await? {
            return Ok(true);
        }
        // only what goes on to Pingora's cache needs it (a fast hit has no Vary)
        if fields.accept_encoding && self.cfg.cache.normalize_accept_encoding {
            normalize_accept_encoding(session.req_header_mut());
        }
        if session.subrequest_ctx.is_some() {
            // Pingora's background revalidation of a stale entry (grace): one corral of the
            // cluster goes upstream, the others take its copy from memcached
            let key = key::for_parts(&ctx.host, &ctx.path);
            match self.parts.storage.refresh_once(&key, session.req_header()).await {
                Refresh::Mine(lock) => ctx.refresh_lock = Some(lock),
                Refresh::Peer => {
                    // the lookup now finds the fresh copy; the cache lock handed to this
                    // revalidation is not needed (and Pingora does not release it after a hit)
                    if let Some(sub) = session.subrequest_ctx.as_mut() {
                        sub.release_write_lock();
                    }
                }
                Refresh::TimedOut | Refresh::Local => {}
            }
            ctx.key = Some(key);
        }
        Ok(false)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        if ctx.bypass.is_some() {
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.cfg.cache.lock_timeout);
        session.cache.enable(
            self.parts.storage,
            Some(self.parts.eviction),
            Some(self.parts.predictor),
            Some(self.parts.lock),
            Some(overrides),
        );
        session
            .cache
            .set_max_file_size_bytes(self.cfg.cache.max_object_bytes);
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        // the fast hit path may have built it already
        // the request filter worked out host and path (and the fast hit path maybe the key)
        Ok(ctx
            .key
            .take()
            .unwrap_or_else(|| key::for_parts(&ctx.host, &ctx.path)))
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        hit_handler: &mut HitHandler,
        _is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        ctx.from_l2 = CompleteHit::is_from_l2(hit_handler);
        if let Some(lock) = CompleteHit::take_refresh_lock(hit_handler) {
            // this request revalidates the entry for the cluster: the lock goes when it ends
            match ctx.refresh_lock {
                None => ctx.refresh_lock = Some(lock),
                Some(_) => self.parts.storage.refresh_done(lock),
            }
        }
        // the last validation: the meta's `updated` is its lineage (see MetaParts::to_meta)
        let validated = memory::validated(hit_handler).unwrap_or_else(|| meta.updated());
        // bans and tag purges newer than this entry, that it was not checked against yet
        let mark = CompleteHit::check_mark(hit_handler);
        let verdict = self
            .parts
            .validity
            .check_marked(&ctx.host, &ctx.path, validated, meta.headers(), mark);
        if verdict != Verdict::Valid {
            return Ok(verdict.forced());
        }
        if self.cfg.cache.honor_client_no_cache
            && ctx
                .directives
                .requires_validation(validated, meta.age(), ctx.arrived)
        {
            // revalidate; concurrent such requests wait on the lock and are satisfied by the
            // one revalidation (it is newer than their arrival)
            ctx.by_request = true;
            return Ok(Some(ForcedFreshness::ForceExpired));
        }
        Ok(None)
    }

    async fn proxy_upstream_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.directives.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable stored → 504
            let mut resp = ResponseHeader::build(StatusCode::GATEWAY_TIMEOUT, Some(2))?;
            resp.insert_header(header::CONTENT_LENGTH, "0")?;
            resp.insert_header("cache-status", "corral; fwd=miss; detail=only-if-cached")?;
            session.write_response_header(Box::new(resp), true).await?;
            ctx.status = Some(CacheStatus::new(Outcome::Miss));
            return Ok(false);
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let mut peer = Box::new(self.peer.clone());
        if matches!(ctx.bypass, Some(Bypass::Upgrade | Bypass::Rule)) {
            // WebSockets, and server-sent events and long polls behind a bypass rule, go
            // quiet for longer than first_byte_timeout: read_timeout between reads
            peer.options.read_timeout = Some(self.cfg.upstream.read_timeout);
        }
        if ctx.upstream_slot.is_none() {
            // a retry keeps the slot it has
            match self.upstream.take().await {
                Some(slot) => ctx.upstream_slot = Some(slot),
                None => {
                    metrics::UPSTREAM_BUSY.inc();
                    ctx.upstream_busy = true;
                    // a 5xx: a stale copy within stale-if-error is served instead
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "upstream busy: every slot taken, queue full or timed out",
                    );
                }
            }
        }
        ctx.upstream_started = Some(Instant::now());
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        for name in hop_by_hop(&upstream_request.headers) {
            upstream_request.remove_header(&name);
        }
        single_content_length(upstream_request)?;
        let sent = upstream_request.headers.get(header::HOST);
        if !ctx.host.is_empty() && sent.is_none_or(|h| h.as_bytes() != ctx.host.as_bytes()) {
            // the host the key was made of (lower case, no `:80`, no trailing dot): the origin
            // answers for the site the entry is stored under, never for a spelling of it
            upstream_request.insert_header(header::HOST, ctx.host.as_str())?;
        }
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
        {
            let xff = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if upstream_response.status.is_informational() {
            return Ok(());
        }
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        ctx.upstream_header_time = ctx.upstream_started.map(|t| t.elapsed());
        let no_body = matches!(upstream_response.status.as_u16(), 101 | 204 | 304)
            || session.req_header().method == Method::HEAD
            || upstream_response
                .headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if no_body {
            // no body will follow (a 101's tunnel is no request to the origin): the slot goes
            // now, not when a slow client is done
            ctx.upstream_slot = None;
        }
        for name in hop_by_hop(&upstream_response.headers) {
            upstream_response.remove_header(&name);
        }
        let status = upstream_response.status;
        if status == StatusCode::NOT_MODIFIED && session.cache.phase() == CachePhase::Stale {
            ctx.not_modified = Some(upstream_response.headers.clone());
        }
        let method = &session.req_header().method;
        if !is_safe(method) && (status.is_success() || status.is_redirection()) {
            self.invalidate_after_unsafe(ctx, upstream_response).await;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if end_of_stream {
            // the origin is done with this request: a slow client does not hold its slot
            ctx.upstream_slot = None;
        }
        Ok(None)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let mut resp = resp.clone();
        if let Some(fields) = ctx.not_modified.take() {
            // Pingora merges only a few fields of a 304; RFC 9111 §3.2 wants all of them
            policy::merge_not_modified(&mut resp, &fields);
        }
        let decision = policy::response_cacheable(session.req_header(), resp, &ctx.policy, SystemTime::now());
        ctx.storing = decision.is_cacheable();
        if !ctx.storing {
            if let Some(key) = session.cache.maybe_cache_key() {
                // other corrals may be waiting for this fill: tell them it will not come
                self.parts.storage.release_lease(key);
            }
        }
        Ok(decision)
    }

    fn cache_vary_filter(&self, meta: &CacheMeta, _ctx: &mut Ctx, req: &RequestHeader) -> Option<HashBinary> {
        key::variance(meta, req)
    }

    fn should_serve_stale(&self, _session: &mut Session, _ctx: &mut Ctx, error: Option<&Error>) -> bool {
        match error {
            // stale-while-revalidate / grace: the entry's own window already decided
            None => true,
            // stale-if-error: upstream trouble, including a 5xx answer
            Some(e) => {
                e.esource() == &ErrorSource::Upstream
                    || matches!(e.etype(), ErrorType::HTTPStatus(code) if *code >= 500)
            }
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.is_informational() && resp.status != StatusCode::SWITCHING_PROTOCOLS {
            // interim: the final response follows (a 101 is final for HTTP, then the
            // connection carries another protocol)
            return Ok(());
        }
        let status = self.cache_status(session, ctx);
        self.finish_header(resp, status)?;
        ctx.status = Some(status);
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            // RFC 9110 §15.6.5: the upstream did not answer in time
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    // the client is gone: nothing to answer
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            if let Err(e) = self.respond_error(session, ctx, code).await {
                debug!(error = %e, "cannot send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        conn::request_done(session);
        if let Some(lock) = ctx.refresh_lock.take() {
            self.parts.storage.refresh_done(lock);
        }
        let outcome = if ctx.purge {
            "purge"
        } else if ctx.refused {
            "refused"
        } else {
            ctx.status.map_or("error", |s| s.outcome.as_str())
        };
        let elapsed = ctx.started.elapsed();
        let m = metrics::for_outcome(outcome);
        m.requests.inc();
        m.seconds.observe(elapsed.as_secs_f64());
        if ctx.upstream_started.is_some() {
            let result = if error.is_some() && ctx.upstream_status.is_none() {
                "error"
            } else {
                "ok"
            };
            metrics::UPSTREAM_REQUESTS.with_label_values(&[result]).inc();
        }
        if !self.cfg.log.access_log {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        info!(
            target: "corral::access",
            method = %req.method,
            host = %ctx.host,
            path = %ctx.path,
            status,
            cache = outcome,
            upstream_ms = ctx.upstream_header_time.map(|d| d.as_secs_f64() * 1000.0),
            total_ms = elapsed.as_secs_f64() * 1000.0,
            subrequest = session.subrequest_ctx.is_some(),
            error = error.map(|e| e.to_string()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert("content-length", "3".parse().unwrap());
        for n in hop_by_hop(&h) {
            h.remove(n.as_str());
        }
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("x-kept").is_some());
        assert!(h.get("content-length").is_some());
        assert!(h.get("connection").is_some(), "pingora manages Connection itself");
    }

    #[test]
    fn framing_headers_survive_a_hostile_connection_header() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "connection",
            "content-length, transfer-encoding, host".parse().unwrap(),
        );
        h.insert("content-length", "3".parse().unwrap());
        h.insert("host", "a".parse().unwrap());
        assert!(hop_by_hop(&h).is_empty());
        assert!(h.get("content-length").is_some());
        assert!(h.get("host").is_some());
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
