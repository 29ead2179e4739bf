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
use http::{header, Method, StatusCode};
use pingora_cache::key::HashBinary;
use pingora_cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, ForcedFreshness, HitHandler, RespCacheable,
};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tracing::{debug, info};

use crate::cache::CacheParts;
use crate::cache_status::{CacheStatus, Outcome};
use crate::conn;
use crate::json;
use crate::key;
use crate::lock::Refresh;
use crate::metrics;
use crate::policy::{self, Effective, RequestDirectives};
use crate::purge::{self, Verdict};
use crate::storage::memory::{self, CompleteHit};
use crate::transport::Cluster;

mod answer;
mod fast_hit;
mod headers;
mod purge_endpoint;
mod upstream;

pub use fast_hit::FrontHits;

use answer::{cache_status_value, respond_json};
use headers::{
    client_ip, forwarding_headers, hop_by_hop, normalize_accept_encoding, single_content_length,
    strip_forwarding, RequestFields,
};
use upstream::{UpstreamSlot, UpstreamSlots};

/// RFC 9211's response header.
const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// The proxy.
pub struct Corral {
    /// The running config ([`crate::live`]): each request reads it once, into its `Ctx`.
    live: &'static crate::live::Reloader,
    parts: &'static CacheParts,
    /// Where accepted purges go (applied here, published to the peers), and peers' arrive.
    cluster: &'static Cluster,
    /// `upstream.max_connections` slots and the queue in front of them.
    upstream: Arc<UpstreamSlots>,
    /// `server.keepalive_timeout` in whole seconds, as Pingora takes it.
    keepalive_secs: u64,
    /// The hosts of responses this corral stored (at most [`MAX_SITES`]): a purge for any
    /// other host matched nothing because its Host is not the site's (`purge.host_map`).
    sites: dashmap::DashSet<String>,
    /// Repeated purge log lines (refusals, purges for unknown sites), once a minute each.
    purge_logs: crate::throttle::Throttle,
}

/// Hosts remembered in [`Corral::sites`]; past it, no new one is added (a hint may then be
/// logged for a site that is cached: it is only a hint).
const MAX_SITES: usize = 10_000;

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
    /// When the request arrived (its head read): a response validated after it satisfies
    /// `no-cache`, and the fast hit path judges freshness, the purge fence and `Age` at it.
    arrived: SystemTime,
    host: String,
    path: String,
    policy: Effective,
    /// The config this request runs on, read once at its start.
    live: Arc<crate::live::Live>,
    /// The matching rule's `key_headers`: request headers every variant is keyed by.
    key_headers: Option<Arc<[http::HeaderName]>>,
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
    /// When the request went to the origin (its last attempt): what the answer is validated
    /// as of. The origin made it after this, perhaps before a purge that arrives here ahead
    /// of it, so a later time (the answer's arrival) could escape that purge.
    upstream_sent: Option<SystemTime>,
    /// While the answer may still be stored: registered as awaited, so that the purge
    /// records older than `upstream_sent` stay until it lands ([`memory::Awaited`]).
    awaited: Option<memory::Awaited>,
    /// The L1 generation when the answer's header arrived: if a clear moves it before the
    /// answer is stored, the answer is from before the clear, and is not stored.
    l1_generation: Option<u64>,
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
    /// The upstream's response carries an older generation than the current one: not stored.
    superseded: bool,
    /// When the copy the lookup found was last validated, and by which corral: what a purge
    /// answered while this request is at the origin is checked against, before stale-if-error
    /// serves that copy.
    hit_validated: Option<(SystemTime, u64)>,
    /// While the copy the lookup found may still be served on an upstream error: registered
    /// as awaited at the copy's validation, so that the purge records that could cover it
    /// stay until this request ends, however long it waits for an upstream slot, a
    /// connection or retries ([`memory::Awaited`]).
    stale_hold: Option<memory::Awaited>,
}

impl Ctx {
    /// The matching rule's `key_headers` (empty without one).
    fn key_headers(&self) -> &[http::HeaderName] {
        self.key_headers.as_deref().unwrap_or(&[])
    }
}

/// An interim response (`103 Early Hints`, `102 Processing`) from the upstream goes to an
/// HTTP/1 client at once, written here. Pingora's own writer would drop it when the final
/// header arrives in the same read and starts a cache fill: it discards the whole batch of
/// upstream events once the response is served from the cache's miss handler (about half of
/// the 103s were lost). Its copy of the event is then ignored (`set_ignore_info_resp`: for
/// interim responses only, and for this request only, since a keep-alive connection's next
/// request gets a new session). `100 Continue` and `101` stay Pingora's: they belong to its
/// `Expect` and upgrade handling. Interim responses are never stored.
async fn forward_interim(session: &mut Session, interim: &ResponseHeader) -> Result<()> {
    let code = interim.status.as_u16();
    let http10 = session.req_header().version == http::Version::HTTP_10;
    if code == 100 || code == 101 || session.as_downstream().is_http2() {
        return Ok(());
    }
    let downstream = session.as_downstream_mut();
    if !http10 {
        // RFC 9110 §15.2: never to an HTTP/1.0 client. A client that is gone fails its own
        // write later; the fetch (and a cache fill) goes on, as Pingora lets it
        downstream.set_ignore_info_resp(false);
        let _ = downstream.write_response_header(Box::new(interim.clone())).await;
    }
    downstream.set_ignore_info_resp(true);
    Ok(())
}

/// Why a response that varies on a header the client had removed (`Connection`) is not stored.
pub const STRIPPED_VARY: &str = "varies on a header the client named in Connection";

/// Why an answer whose header arrived before L1 was cleared is not stored.
pub const CLEARED: &str = "arrived before the cache was cleared";

/// The header names the client's `Connection` lists: removed before the request goes upstream
/// (by corral or by Pingora), so a response that varies on one is not what the variant's key
/// says.
fn connection_tokens(req: &RequestHeader) -> Vec<String> {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// Whether `resp` (or the rule's `key_headers`) varies on one of `names` (lower case).
fn varies_on_any(resp: &ResponseHeader, key_headers: &[http::HeaderName], names: &[String]) -> bool {
    !names.is_empty()
        && (resp
            .headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| names.iter().any(|n| v.trim().eq_ignore_ascii_case(n)))
            || key_headers.iter().any(|h| names.iter().any(|n| n == h.as_str())))
}

/// The primary hash of the URL this request is for: its cache key's, or (no key made) its
/// host's and path's, which is what the key is made of ([`key::for_url`]).
fn primary_of(session: &Session, ctx: &Ctx) -> HashBinary {
    use pingora_cache::key::CacheHashKey;
    match session.cache.maybe_cache_key() {
        Some(k) => k.primary_bin(),
        None => key::for_url(&ctx.host, &ctx.path).primary_bin(),
    }
}

impl Corral {
    /// Whether a purge now covers the copy this request's lookup found (validated then,
    /// [`Ctx::hit_validated`]): every purge is a validity record, a purge of everything
    /// too, kept while this request awaits its answer ([`memory::Awaited`]); so is an
    /// unsafe request's invalidation of the URL, in L1.
    fn purged_since_lookup(&self, session: &Session, ctx: &Ctx) -> bool {
        let (Some((validated, by)), Some(meta)) = (ctx.hit_validated, session.cache.maybe_cache_meta())
        else {
            return false;
        };
        let verdict = self
            .parts
            .validity
            .check(&ctx.host, &ctx.path, validated, by, meta.headers(), 0);
        let invalidated = || {
            let primary = primary_of(session, ctx);
            self.parts.storage.l1.invalidated_since(&primary, validated)
        };
        if verdict == Verdict::Invalid || invalidated() {
            metrics::STALE_REFUSED_PURGED.inc();
            tracing::info!(host = %ctx.host, path = %ctx.path, "stale-if-error: the copy was purged meanwhile, not served");
            return true;
        }
        false
    }

    /// Whether a copy that no purge removed is revalidated rather than served as it is (the
    /// fence, a soft purge, the client's `no-cache`): `cache_hit_filter`'s answer.
    fn revalidation(
        &self,
        meta: &CacheMeta,
        hit_handler: &HitHandler,
        validated: SystemTime,
        by: u64,
        verdict: Verdict,
        ctx: &mut Ctx,
    ) -> Option<ForcedFreshness> {
        if self.parts.storage.log.fenced(validated, by, SystemTime::now()) {
            // this corral cannot confirm memcached's purge log: a copy from before it lost
            // track may have been purged elsewhere (hard, even where a soft purge here would
            // serve it stale), so the origin decides (a 304 is cheap)
            metrics::FENCED_HITS.inc();
            return Some(ForcedFreshness::ForceExpired);
        }
        if verdict != Verdict::Valid {
            return verdict.forced();
        }
        // an answer that arrived after this request did satisfies its `no-cache`
        let received = memory::received(hit_handler).unwrap_or(validated);
        if ctx.live.cfg.cache.honor_client_no_cache
            && ctx
                .directives
                .requires_validation(received, meta.age(), ctx.arrived)
        {
            // revalidate; concurrent such requests wait on the lock and are satisfied by the
            // one revalidation (it is newer than their arrival)
            ctx.by_request = true;
            return Some(ForcedFreshness::ForceExpired);
        }
        None
    }

    /// The client's address ([`headers::client_ip`]): behind a trusted proxy, the one it saw.
    pub(super) fn client_ip(&self, session: &Session, ctx: &Ctx) -> Option<std::net::IpAddr> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        client_ip(session.req_header(), peer, |ip| ctx.live.cfg.server.trusts(ip))
    }

    pub fn new(live: &'static crate::live::Reloader, cluster: &'static Cluster) -> Self {
        let parts = cluster.parts;
        let cfg = live.load().cfg.clone();
        // these need a restart to change
        let upstream = Arc::new(UpstreamSlots::new(&cfg.upstream));
        let keepalive_secs = cfg.server.limits.keepalive_timeout.as_secs_f64().ceil().max(1.0) as u64;
        Corral {
            live,
            parts,
            cluster,
            upstream,
            keepalive_secs,
            sites: Default::default(),
            purge_logs: Default::default(),
        }
    }
}

#[async_trait]
impl ProxyHttp for Corral {
    /// Boxed: Pingora keeps the context in its per-request future, which it moves into a box
    /// of its own per request (about 15 KB, copied whole), in three places. A box of the
    /// context is about 1.6 KB less to copy per request than the context itself.
    type CTX = Box<Ctx>;

    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {
        // Pingora's default adds a response compression module, disabled; corral does not
        // compress, and the module costs a context and three filter calls per request
    }

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx {
            live: self.live.load(),
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
            key_headers: None,
            directives: RequestDirectives::default(),
            bypass: None,
            by_request: false,
            from_l2: false,
            purge: false,
            storing: false,
            upstream_started: None,
            upstream_sent: None,
            awaited: None,
            l1_generation: None,
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
            superseded: false,
            hit_validated: None,
            stale_hold: None,
        })
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
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

        let (policy, rule) = ctx.live.cfg.effective(&ctx.host, &ctx.path);
        ctx.policy = policy;
        ctx.key_headers = rule
            .filter(|r| !r.key_headers.is_empty())
            .map(|r| r.key_headers.clone());
        let fields = RequestFields::of(req);
        ctx.conditional = fields.conditional;
        if fields.directives {
            ctx.directives = RequestDirectives::parse(req);
        }
        if purge::is_purge_method(&req.method) {
            self.handle_purge(session, ctx).await?;
            return Ok(true);
        }
        // forwarding headers a client may not set go before anything is keyed by them (Vary);
        // purges read theirs above and are never forwarded
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let trusted = peer.is_some_and(|ip| ctx.live.cfg.server.trusts(ip));
        strip_forwarding(session.req_header_mut(), trusted);
        let req = session.req_header();
        if req.method == Method::POST
            && req.uri.path() == crate::transport::peers::PATH
            && ctx.live.cfg.peers.token.is_some()
        {
            self.handle_peer_message(session, ctx).await?;
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
        // a background revalidation is of a stale entry: never a fast hit. Nothing awaits
        // between `new_ctx` and here: the fast hit judges freshness and the purge fence at
        // `ctx.arrived`, which is then a moment ago
        if session.subrequest_ctx.is_none() && self.fast_hit(session, ctx).await? {
            return Ok(true);
        }
        // only what goes on to Pingora's cache needs it (a fast hit has no Vary)
        if fields.accept_encoding && ctx.live.cfg.cache.normalize_accept_encoding {
            normalize_accept_encoding(session.req_header_mut());
        }
        if session.subrequest_ctx.is_some() {
            // Pingora's background revalidation of a stale entry (grace): one corral of the
            // cluster goes upstream, the others take its copy from memcached
            let key = key::for_parts(&ctx.host, &ctx.path);
            match self
                .parts
                .storage
                .refresh_once(&key, session.req_header(), ctx.key_headers())
                .await
            {
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

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        if ctx.bypass.is_some() {
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(ctx.live.cfg.cache.lock_timeout);
        session.cache.enable(
            self.parts.storage,
            Some(self.parts.eviction),
            Some(self.parts.predictor),
            Some(self.parts.lock),
            Some(overrides),
        );
        session
            .cache
            .set_max_file_size_bytes(ctx.live.cfg.cache.max_object_bytes);
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Self::CTX) -> Result<CacheKey> {
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
        is_fresh: bool,
        ctx: &mut Self::CTX,
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
        let (validated, by) =
            memory::validated(hit_handler).unwrap_or_else(|| (meta.updated(), purge::corral_id()));
        ctx.hit_validated = Some((validated, by));
        // bans and tag purges newer than this entry, that it was not checked against yet
        let mark = CompleteHit::check_mark(hit_handler);
        let verdict =
            self.parts
                .validity
                .check_marked(&ctx.host, &ctx.path, validated, by, meta.headers(), mark);
        if verdict == Verdict::Invalid {
            // purged: a miss (never a revalidation, which a 304 could answer)
            return Ok(verdict.forced());
        }
        let forced = self.revalidation(meta, hit_handler, validated, by, verdict, ctx);
        if forced.is_some() || !is_fresh {
            // not served as it is: the copy may yet be served on an upstream error
            ctx.stale_hold = Some(self.parts.storage.l1.awaiting(validated));
        }
        Ok(forced)
    }

    async fn proxy_upstream_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
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

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        let mut peer = Box::new(ctx.live.peer.clone());
        if matches!(ctx.bypass, Some(Bypass::Upgrade | Bypass::Rule)) {
            // WebSockets, and server-sent events and long polls behind a bypass rule, go
            // quiet for longer than first_byte_timeout: read_timeout between reads
            peer.options.read_timeout = Some(ctx.live.cfg.upstream.read_timeout);
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
        ctx: &mut Self::CTX,
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
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let trusted = peer.is_some_and(|ip| ctx.live.cfg.server.trusts(ip));
        forwarding_headers(upstream_request, peer, trusted, &ctx.host)?;
        if session.cache.enabled() || session.cache.bypassing() {
            // a bypassed (hit-for-miss) answer may still be stored if it turns out cacheable.
            // Registered before its time is taken, so a record accepted after that time is
            // held back by it; the last attempt's registration replaces an earlier one's
            ctx.awaited = Some(self.parts.storage.l1.awaiting(SystemTime::now()));
        }
        ctx.upstream_sent = Some(SystemTime::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if upstream_response.status.is_informational() {
            return forward_interim(session, upstream_response).await;
        }
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        ctx.upstream_header_time = ctx.upstream_started.map(|t| t.elapsed());
        if let Some(g) = crate::generation::get() {
            let value = g
                .header()
                .and_then(|h| upstream_response.headers.get(h))
                .and_then(|v| crate::generation::value_of(v.as_bytes()));
            if let Some(value) = value {
                // a new generation drops the cache (this response is stored after the drop);
                // an older one (mid-deploy) is served and not stored
                let sent = ctx.upstream_sent.unwrap_or(ctx.arrived);
                ctx.superseded = !g.observe(value, sent);
            }
        }
        // after a drop this answer made itself: it survives that one, not a later one
        ctx.l1_generation = Some(self.parts.storage.l1.generation());
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
        if !policy::is_safe(method) && (status.is_success() || status.is_redirection()) {
            self.parts
                .invalidate_after_unsafe(&ctx.host, &ctx.path, upstream_response)
                .await;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
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
        ctx: &mut Self::CTX,
    ) -> Result<RespCacheable> {
        let mut resp = resp.clone();
        if let Some(fields) = ctx.not_modified.take() {
            // Pingora merges only a few fields of a 304; RFC 9111 §3.2 wants all of them
            policy::merge_not_modified(&mut resp, &fields);
        }
        let cleared = ctx
            .l1_generation
            .is_some_and(|g| g != self.parts.storage.l1.generation());
        let mut decision = if ctx.superseded {
            RespCacheable::Uncacheable(pingora_cache::NoCacheReason::Custom(
                crate::generation::SUPERSEDED,
            ))
        } else if cleared {
            // L1 was emptied since this answer's header arrived (a purge of everything, a new
            // upstream generation another answer brought): the answer is from before
            RespCacheable::Uncacheable(pingora_cache::NoCacheReason::Custom(CLEARED))
        } else if varies_on_any(&resp, ctx.key_headers(), &connection_tokens(session.req_header())) {
            // the upstream never saw the header this variant is keyed by: storing it would give
            // every client that sends it the answer to a request without it
            RespCacheable::Uncacheable(pingora_cache::NoCacheReason::Custom(STRIPPED_VARY))
        } else {
            // validated as of when the request left (RFC 9111 §4.2.3's request_time): an
            // answer made before a purge must not count as newer than the purge because it
            // arrived after it
            let validated = ctx.upstream_sent.unwrap_or(ctx.arrived);
            policy::response_cacheable(session.req_header(), resp, &ctx.policy, validated)
        };
        if let RespCacheable::Cacheable(meta) = &mut decision {
            // when it arrived (what a client's `no-cache` compares with: requests that waited
            // for this answer are satisfied by it), and under which L1 generation (a clear
            // before its fill begins voids the fill)
            meta.extensions_mut().insert(memory::Arrival {
                at: SystemTime::now(),
                generation: ctx
                    .l1_generation
                    .unwrap_or_else(|| self.parts.storage.l1.generation()),
            });
        }
        ctx.storing = decision.is_cacheable();
        if !ctx.storing {
            // nothing of this answer will be stored: it holds no purge record back
            ctx.awaited = None;
        }
        if ctx.storing && !self.sites.contains(&ctx.host) && self.sites.len() < MAX_SITES {
            self.sites.insert(ctx.host.clone());
        }
        if !ctx.storing {
            if let Some(key) = session.cache.maybe_cache_key() {
                // other corrals may be waiting for this fill: tell them now that it will not
                // come, not when the body has gone to the client
                self.parts.storage.release_lease(key);
            }
        }
        Ok(decision)
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        ctx: &mut Self::CTX,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        key::variance_for(meta.headers(), req, ctx.key_headers())
    }

    fn should_serve_stale(&self, session: &mut Session, ctx: &mut Self::CTX, error: Option<&Error>) -> bool {
        match error {
            // stale-while-revalidate / grace: the entry's own window already decided
            None => true,
            // stale-if-error: upstream trouble, including a 5xx answer; never a copy that a
            // purge answered while this request was at the origin covers (the purge removed
            // it from the cache, not from this request's hands)
            Some(e) => {
                (e.esource() == &ErrorSource::Upstream
                    || matches!(e.etype(), ErrorType::HTTPStatus(code) if *code >= 500))
                    && !self.purged_since_lookup(session, ctx)
            }
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if resp.status.is_informational() && resp.status != StatusCode::SWITCHING_PROTOCOLS {
            // interim: the final response follows (a 101 is final for HTTP, then the
            // connection carries another protocol)
            return Ok(());
        }
        // the answer's fill, if any, is registered by now (Pingora creates it before this
        // filter runs), and holds the purge records back itself
        ctx.awaited = None;
        let status = self.cache_status(session, ctx);
        self.finish_header(resp, status, ctx)?;
        ctx.status = Some(status);
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Self::CTX) -> FailToProxy {
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

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        conn::request_done(session);
        if let Some(sub) = session.subrequest_ctx.as_mut() {
            // a background revalidation that ended as a hit (a peer's fresh copy found in
            // memcached) still holds the cache lock Pingora handed it: Pingora releases it on
            // its miss and error paths only, and a dropped permit is a dangling lock
            sub.release_write_lock();
        }
        if let Some(lock) = ctx.refresh_lock.take() {
            self.parts.storage.refresh_done(lock);
        }
        if !ctx.storing {
            if let Some(key) = session.cache.maybe_cache_key() {
                // whatever ended this request (an error, a timeout, a client gone), a lease it
                // won goes back now instead of making other corrals wait out lock_timeout
                self.parts.storage.release_lease(key);
            }
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
        if let Some(ttfb) = ctx.upstream_header_time {
            metrics::UPSTREAM_FIRST_BYTE_SECONDS.observe(ttfb.as_secs_f64());
        }
        if let Some(waited) = session.cache.lock_duration() {
            // Pingora's cache lock (the waits in corral's own gates are counted there)
            metrics::lock_waited(waited, outcome != "lock-timeout");
        }
        if !ctx.live.cfg.log.access_log {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let client = self.client_ip(session, ctx);
        let req = session.req_header();
        info!(
            target: "corral::access",
            method = %req.method,
            host = %ctx.host,
            path = %ctx.path,
            status,
            cache = outcome,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_ms = ctx.upstream_header_time.map(|d| d.as_secs_f64() * 1000.0),
            client = client.map(|ip| ip.to_string()),
            subrequest = session.subrequest_ctx.is_some(),
            error = error.map(|e| e.to_string()),
        );
    }
}
