//! The fast hit path: plain requests for fresh, variant-free L1 entries answered without
//! Pingora's cache state machine. Two doors lead to it:
//! - [`FrontHits`], before Pingora's session exists: the HTTP/1 connection's loop
//!   ([`crate::conn`]) reads the head and shows it here. A hit is answered without Pingora's
//!   per-request session and future; anything else goes on to Pingora, as read.
//! - [`Corral::fast_hit`], in the request filter, for what reaches Pingora (HTTP/2, and
//!   heads the connection's loop leaves to it).
//!
//! Both serve the same entries ([`fast_entry`]) with the same header ([`hit_response`]).

use std::time::{Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Method};
use pingora_cache::eviction::EvictionManager;
use pingora_cache::key::{CompactCacheKey, HashBinary};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::answer::age_value;
use super::headers::{client_ip_of, wire_fields};
use super::{cache_status_value, Corral, Ctx, CACHE_STATUS};
use crate::cache::CacheParts;
use crate::cache_status::{CacheStatus, Outcome};
use crate::config::Config;
use crate::conn::{Front, Head};
use crate::key;
use crate::metrics;
use crate::purge::Verdict;
use crate::storage::memory::FreshEntry;

/// Request fields that keep a request from [`FrontHits`]: conditionals and ranges, the
/// client's cache directives, credentials. The full path decides these (and [`Corral::fast_hit`]
/// refuses them too).
const NOT_PLAIN: [&str; 9] = [
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "cache-control",
    "pragma",
    "authorization",
];

/// The fast hits of HTTP/1 requests, answered before Pingora's session ([`Front`]).
pub struct FrontHits {
    live: &'static crate::live::Reloader,
    parts: &'static CacheParts,
}

impl FrontHits {
    pub fn new(live: &'static crate::live::Reloader, parts: &'static CacheParts) -> Self {
        FrontHits { live, parts }
    }
}

/// A hit [`FrontHits`] answered: counted and logged once written.
pub struct FrontHit {
    started: Instant,
    /// The access log's line, if it is kept.
    line: Option<Box<AccessLine>>,
}

struct AccessLine {
    head: bool,
    host: String,
    path: String,
    status: u16,
    client: Option<std::net::IpAddr>,
}

impl Front for FrontHits {
    type Answer = FrontHit;

    fn answer(&self, req: &Head<'_>, out: &mut BytesMut) -> Option<(FrontHit, Option<Bytes>)> {
        let started = Instant::now();
        let mut host = None;
        for f in req.headers {
            if f.name.eq_ignore_ascii_case("host") {
                if host.replace(f.value).is_some() {
                    // two: Pingora's (400)
                    return None;
                }
            } else if NOT_PLAIN.iter().any(|n| f.name.eq_ignore_ascii_case(n)) {
                return None;
            }
        }
        // without a Host (HTTP/1.0) the full path keys by an empty one
        let host = key::normalize_host(key::host_field(host?)?);
        let path = req.target;
        let live = self.live.load();
        let (_, rule) = live.cfg.effective(&host, path);
        if rule.is_some_and(|r| r.bypass || !r.key_headers.is_empty()) {
            return None;
        }
        let hash = key::primary_hash(&host, path);
        // the head was read a moment ago: freshness, the fence and `Age` are judged now
        let now = SystemTime::now();
        let entry = fast_entry(self.parts, &hash, &host, path, now)?;
        let stored = entry.header();
        let shared = stored.shared();
        let body = entry.body_in(&shared);
        let (age, status) = hit_status(&entry, now);
        let mut age_text = itoa::Buffer::new();
        let mut cache_status = crate::onstack::OnStack::<128>::default();
        status.write_value(|piece| cache_status.push(piece));
        // a value that could end the field is never written (the full path's `HeaderValue`
        // refuses it the same way)
        let cache_status = cache_status
            .bytes()
            .filter(|v| !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)))?;
        // what Pingora's HTTP/1 writer adds to every response, in its order
        let date = pingora_core::protocols::http::date::get_cached_date();
        let connection: &[u8] = if req.keep_alive { b"keep-alive" } else { b"close" };
        let (strip, targeted) = (live.cfg.purge.strip_tag_headers, live.cfg.cache.strip_targeted);
        let strip_any = (strip || targeted) && stored.strippable();
        let keep = |n: &str| {
            !strip_any || !(strip && crate::purge::is_tag(n) || targeted && crate::policy::is_targeted(n))
        };
        let set: [(&str, &[u8]); 4] = [
            ("Age", age_text.format(age).as_bytes()),
            ("cache-status", cache_status),
            ("Date", date.as_bytes()),
            ("Connection", connection),
        ];
        // Pingora's writer frames the body by the field: a body of another length is its to
        // cut or to close on
        let length = write_head(out, stored, keep, set)?;
        if length.and_then(|l| std::str::from_utf8(l).ok()?.parse::<usize>().ok()) != Some(body.len()) {
            out.clear();
            return None;
        }
        note_use(self.parts, &hash, &entry);
        metrics::FAST_HITS.inc();
        metrics::FRONT_HITS.inc();
        let line = live.cfg.log.access_log.then(|| {
            let peer = req
                .stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
            let forwarded = req
                .headers
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case("x-forwarded-for"))
                .map(|f| f.value);
            Box::new(AccessLine {
                head: req.head,
                host,
                path: path.to_string(),
                status: stored.status().as_u16(),
                client: client_ip_of(forwarded, peer, |ip| live.cfg.server.trusts(ip)),
            })
        });
        Some((FrontHit { started, line }, (!req.head).then_some(body)))
    }

    fn done(&self, hit: FrontHit, written: bool) {
        let elapsed = hit.started.elapsed();
        let m = metrics::for_outcome(Outcome::Hit.as_str());
        m.requests.inc();
        m.seconds.observe(elapsed.as_secs_f64());
        if let Some(line) = hit.line {
            tracing::info!(
                target: "corral::access",
                method = if line.head { "HEAD" } else { "GET" },
                host = %line.host,
                path = %line.path,
                // as the full path logs a response whose header was not written
                status = if written { line.status } else { 0 },
                cache = Outcome::Hit.as_str(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                upstream_ms = Option::<f64>::None,
                client = line.client.map(|ip| ip.to_string()),
                subrequest = false,
                error = (!written).then_some("the client went away during the response"),
            );
        }
    }
}

/// The L1 entry the fast hit path may serve for the URL whose primary key hashes to
/// `primary`: fresh, plain (see
/// [`crate::storage::memory::MemoryStorage::fresh_plain`]), framed by `Content-Length`
/// (Pingora frames the others) with a status that has a body, and valid against every purge
/// record. Otherwise `None`: the full path then decides, and applies a purge verdict (a
/// miss, or stale while one request revalidates).
fn fast_entry(
    parts: &CacheParts,
    primary: &HashBinary,
    host: &str,
    path: &str,
    now: SystemTime,
) -> Option<FreshEntry> {
    let entry = parts.storage.l1.fresh_plain(primary, now)?;
    let headers = entry.header();
    // 204 and 304 have no body; Pingora's writer decides what goes out for them
    if !headers.has_length() || matches!(headers.status().as_u16(), 204 | 304 | 100..=199) {
        return None;
    }
    if parts
        .storage
        .log
        .fenced(entry.updated(), entry.validated_by(), now)
    {
        // fenced: the full path revalidates it
        return None;
    }
    let verdict = parts.validity.check_marked(
        host,
        path,
        entry.updated(),
        entry.validated_by(),
        headers,
        Some(entry.check_mark()),
    );
    (verdict == Verdict::Valid).then_some(entry)
}

/// The response header of a fast hit on `entry` at `now` (the entry kept in the LRU, as
/// Pingora's hit path keeps it): the stored fields (tags and targeted fields stripped as
/// configured), `Age` and `Cache-Status`; Pingora's writer, or [`FrontHits`], adds `Date`
/// and `Connection`.
fn hit_response(
    parts: &CacheParts,
    primary: &HashBinary,
    entry: &FreshEntry,
    shared: &Bytes,
    cfg: &Config,
    now: SystemTime,
) -> Result<(ResponseHeader, CacheStatus)> {
    note_use(parts, primary, entry);
    let (age, status) = hit_status(entry, now);
    let (strip, targeted) = (cfg.purge.strip_tag_headers, cfg.cache.strip_targeted);
    let mut fields = wire_fields(entry.header(), shared, strip, targeted);
    fields.insert(header::AGE, age_value(age));
    fields.insert(CACHE_STATUS, cache_status_value(&status)?);
    let mut resp = entry.header().response(fields);
    resp.set_version(http::Version::HTTP_11);
    Ok((resp, status))
}

/// A hit's use of `entry`, told to the eviction manager.
fn note_use(parts: &CacheParts, primary: &HashBinary, entry: &FreshEntry) {
    let compact = CompactCacheKey {
        primary: *primary,
        variance: None,
        user_tag: Box::default(),
    };
    let lru_key = pingora_cache::eviction::CacheEntryKey::from_entry_id(compact, None);
    parts
        .eviction
        .access(&lru_key, entry.weight(), entry.fresh_until());
}

/// A hit's `Age` and `Cache-Status` at `now`.
fn hit_status(entry: &FreshEntry, now: SystemTime) -> (u64, CacheStatus) {
    let age = now.duration_since(entry.epoch()).unwrap_or_default().as_secs();
    let mut status = CacheStatus::new(Outcome::Hit);
    status.ttl = Some(
        entry
            .fresh_until()
            .duration_since(now)
            .map_or(0, |d| d.as_secs() as i64),
    );
    (age, status)
}

/// The names Pingora 0.9.1's HTTP/1 writer writes in title case (`titled_header_name_str`,
/// private to pingora-http); every other name goes out lower-case, as `HeaderName` keeps it.
/// `a_hit_answered_before_pingora_is_the_one_pingora_sends` (tests/hardening.rs) compares
/// the two writers byte for byte.
const TITLED: [&str; 12] = [
    "Accept-Ranges",
    "Age",
    "Cache-Control",
    "Connection",
    "Content-Type",
    "Content-Encoding",
    "Content-Length",
    "Date",
    "Transfer-Encoding",
    "Host",
    "Server",
    "Set-Cookie",
];

/// One field as Pingora writes it (`header_to_h1_wire`).
fn put_field(out: &mut BytesMut, name: &str, value: &[u8]) {
    match TITLED.iter().find(|t| t.eq_ignore_ascii_case(name)) {
        Some(titled) => out.put_slice(titled.as_bytes()),
        None if !name.bytes().any(|b| b.is_ascii_uppercase()) => out.put_slice(name.as_bytes()),
        None => out.extend(name.bytes().map(|b| b.to_ascii_lowercase())),
    }
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// A front hit's response head, as Pingora's HTTP/1 writer writes the header
/// [`hit_response`] builds once it has added `Date` and `Connection`
/// (`http_resp_header_to_buf`), without building the map: the status line; the stored
/// fields `keep` keeps, in a `HeaderMap`'s order (each name where it first appears, with all
/// its values); each of `set` (`Age`, `Cache-Status`, `Date`, `Connection`, as the map's
/// `insert` leaves them) in the place of a stored field of its name, or after the rest, in
/// order. Returns the first `Content-Length` value, or `None` (nothing to answer) if a
/// head has more fields than a hit's.
fn write_head<'a>(
    out: &mut BytesMut,
    stored: &'a crate::storage::memory::StoredHeader,
    keep: impl Fn(&str) -> bool,
    set: [(&str, &[u8]); 4],
) -> Option<Option<&'a [u8]>> {
    let mut fields: smallvec::SmallVec<[(&str, &[u8]); 32]> = smallvec::SmallVec::new();
    stored.each_field(keep, |name, value| fields.push((name, value)));
    if fields.spilled() {
        return None;
    }
    let status = stored.status();
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    if let Some(reason) = stored.reason_phrase().or_else(|| status.canonical_reason()) {
        out.put_slice(reason.as_bytes());
    }
    out.put_slice(b"\r\n");
    let mut written = [false; 4];
    let mut length = None;
    for (i, &(name, value)) in fields.iter().enumerate() {
        if fields[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            // written with the first of its name
            continue;
        }
        if let Some(s) = set.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)) {
            put_field(out, set[s].0, set[s].1);
            written[s] = true;
            continue;
        }
        if length.is_none() && name.eq_ignore_ascii_case("content-length") {
            length = Some(value);
        }
        put_field(out, name, value);
        for &(n, v) in &fields[i + 1..] {
            if n.eq_ignore_ascii_case(name) {
                put_field(out, name, v);
            }
        }
    }
    for (&(name, value), written) in set.iter().zip(written) {
        if !written {
            put_field(out, name, value);
        }
    }
    out.put_slice(b"\r\n");
    Some(length)
}

impl Corral {
    /// The fast hit path: a plain GET/HEAD (no conditionals, no range, no request directives)
    /// for a fresh, complete, variant-free L1 entry that no ban or tag purge touches is answered
    /// here, from the stored header and body, without Pingora's cache state machine (lookup
    /// boxing, a second header copy, range and conditional filters). Everything else, and
    /// every doubt, returns `false` and takes the full path, which decides the same way.
    /// Returns whether the response was sent.
    pub(super) async fn fast_hit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if ctx.conditional || !ctx.directives.is_plain() || ctx.key_headers.is_some() {
            return Ok(false);
        }
        let head = session.req_header().method == Method::HEAD;
        // the hash alone: the key's own copy of its text is built only for the full path
        let hash = key::primary_hash(&ctx.host, &ctx.path);
        // the request's arrival, read a moment ago (`new_ctx`, after its head was read): the
        // time a response is judged fresh at (RFC 9111 §4.2), one clock read fewer per hit
        let now = ctx.arrived;
        let Some(entry) = fast_entry(self.parts, &hash, &ctx.host, &ctx.path, now) else {
            ctx.key = Some(key::for_parts_hashed(&ctx.host, &ctx.path, hash));
            return Ok(false);
        };
        // one share of the entry's buffer (one allocation) for the values and the body
        let shared = entry.header().shared();
        let (resp, status) = hit_response(self.parts, &hash, &entry, &shared, &ctx.live.cfg, now)?;
        ctx.status = Some(status);
        metrics::FAST_HITS.inc();
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session
                .write_response_body(Some(entry.body_in(&shared)), true)
                .await?;
        }
        Ok(true)
    }
}
