//! Cache key: scheme + host + path + query, plus the Vary variance.
//!
//! The primary key is the text `http://host/path?query`. The host is lower-cased and a default
//! port (`:80`) is dropped, so `Example.org:80` and `example.org` share entries. The path and
//! query are kept byte for byte: `/a?x=1&y=2` and `/a?y=2&x=1` are different resources to an
//! origin, so they are different keys here. Vary variance is added by Pingora on top of the
//! primary key (see [`variance`]); every variant of a URL shares the primary hash, which is how a
//! purge reaches all of them.

use http::header::HeaderName;
use http::HeaderValue;
use pingora_cache::key::HashBinary;
use pingora_cache::{CacheKey, CacheMeta, VarianceBuilder};
use pingora_http::RequestHeader;

use crate::fields::Fields;

/// The scheme part of every key: corral's listener speaks plain HTTP to clients.
const SCHEME: &str = "http";

/// Why a request's authority (its `Host`, `:authority` or absolute-form target) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHost {
    /// Not a valid RFC 3986 authority: `/`, `?`, `#`, `@`, whitespace, control or non-ASCII
    /// bytes, a bad port, or empty.
    Invalid,
    /// More than one `Host` field (RFC 9112 §3.2).
    Repeated,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    Missing,
    /// HTTP/2 `:authority` and `Host` name different hosts (RFC 9113 §8.3.1).
    Conflicting,
}

impl BadHost {
    pub fn as_str(self) -> &'static str {
        match self {
            BadHost::Invalid => "invalid Host",
            BadHost::Repeated => "more than one Host",
            BadHost::Missing => "missing Host",
            BadHost::Conflicting => "Host differs from :authority",
        }
    }
}

/// The normalised host of a request: from the absolute-form URI, else the HTTP/2
/// `:authority`, else the Host header; lower-cased, without a default port or a trailing dot.
/// Empty when an HTTP/1.0 request names no host. Every authority the request carries must be
/// valid ([`valid_authority`]): a request with a bad one is refused, never keyed, because the
/// host is part of the key every other client shares.
pub fn request_host(req: &RequestHeader) -> Result<String, BadHost> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(BadHost::Repeated);
    }
    let host = match host {
        Some(h) => Some(host_field(h.as_bytes()).ok_or(BadHost::Invalid)?),
        None => None,
    };
    // RFC 9112 §3.2.2: an absolute-form target's authority wins over Host (Pingora answers
    // 400 when they differ). Pingora keeps only the path in `uri` for that form, and the
    // whole target in `raw_path()`.
    let authority = match absolute_authority(req.raw_path()) {
        Some(a) => Some(a),
        None => req.uri.authority().map(|a| a.as_str()),
    };
    if let Some(a) = authority {
        if !valid_authority(a) {
            return Err(BadHost::Invalid);
        }
        if let Some(h) = host {
            if normalize_host(h) != normalize_host(a) {
                return Err(BadHost::Conflicting);
            }
        }
    }
    match authority.or(host) {
        Some(raw) => Ok(normalize_host(raw)),
        None if req.version == http::Version::HTTP_11 => Err(BadHost::Missing),
        // empty: no valid Host is empty, so such requests share no key with a named site
        None => Ok(String::new()),
    }
}

/// A `Host` field's value if it is a valid authority ([`valid_authority`]), not yet
/// normalised: the one check of [`request_host`] and of the connection's fast hits
/// ([`crate::conn`]), which read the field before Pingora does.
pub fn host_field(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok().filter(|h| valid_authority(h))
}

/// Is `s` an RFC 3986 authority without userinfo (`host[:port]`), as `Host` must be
/// (RFC 9110 §7.2)? The host is a reg-name (unreserved, sub-delims, percent-encoded bytes)
/// or an IP literal in brackets; the port is up to five digits.
pub fn valid_authority(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        let literal_ok = !literal.is_empty()
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'));
        if !literal_ok {
            return false;
        }
        match after {
            "" => return true,
            a => ("x", a.strip_prefix(':').unwrap_or("!")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (s, ""),
        }
    };
    let reg_name = |b: u8| unreserved_or_sub_delim(b) || b == b'%';
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(reg_name)
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 3986 `unreserved` / `sub-delims`: what a reg-name holds besides percent-encodings.
pub(crate) fn unreserved_or_sub_delim(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// The authority of an absolute-form request target (`http://host:port/path`), if it is one.
fn absolute_authority(target: &[u8]) -> Option<&str> {
    // origin-form (`/path`), every request but a proxy's: no authority, and no UTF-8 check
    // and substring search (about 330 instructions of every hit) to learn it
    if target.first() == Some(&b'/') {
        return None;
    }
    let target = std::str::from_utf8(target).ok()?;
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// Lower-case `host`, drop userinfo, a default `:80` and a trailing dot (`site.test.` is the
/// fully qualified spelling of `site.test`: one site, one set of keys, one purge).
pub fn normalize_host(raw: &str) -> String {
    // the common case, taken without building anything: already lower case, no port 80, no
    // trailing dot, no userinfo, no spaces, no dot before the port (a byte pair compared in
    // place: `str::contains` builds a substring searcher first, about 300 instructions of
    // every hit)
    let bytes = raw.as_bytes();
    let plain = bytes
        .iter()
        .all(|&b| !b.is_ascii_uppercase() && b != b'@' && !b.is_ascii_whitespace())
        && !raw.ends_with(":80")
        && !raw.ends_with('.')
        && !bytes.windows(2).any(|w| w == b".:");
    if plain {
        return raw.to_string();
    }
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h).trim();
    let raw = raw.strip_suffix(":80").unwrap_or(raw);
    // the port follows the last ':' unless that one is inside an IPv6 literal
    let (name, port) = match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') && (!raw.starts_with('[') || raw[..i].ends_with(']')) => {
            (&raw[..i], Some(&raw[i + 1..]))
        }
        _ => (raw, None),
    };
    let name = Some(name.trim_end_matches('.'))
        .filter(|n| !n.is_empty())
        .unwrap_or(name);
    let mut out = String::with_capacity(raw.len());
    out.push_str(name);
    if let Some(p) = port {
        out.push(':');
        out.push_str(p);
    }
    out.make_ascii_lowercase();
    out
}

/// Path and query of the request, `/` when empty.
pub fn request_path_and_query(req: &RequestHeader) -> &str {
    req.uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// The primary key text for `host` (already normalised) and `path_and_query`:
/// `http://host/path?query`. Unambiguous by construction, whatever `host` holds: every byte
/// of it that could end a host (`/`, `*`, `?`, `#`, whitespace...) or start an escape (`%`)
/// is percent-encoded, and a path starts with `/` or is `*`, so no two (host, path) pairs
/// make the same text. Requests with such hosts are refused earlier ([`request_host`]);
/// this holds for every other caller too (purges, config).
pub fn primary(host: &str, path_and_query: &str) -> String {
    let mut s = Vec::with_capacity(SCHEME.len() + 3 + host.len() + path_and_query.len());
    primary_pieces(host, path_and_query, |piece| s.extend_from_slice(piece));
    String::from_utf8(s).expect("pieces of str and ASCII escapes")
}

/// The hash of [`primary`]`(host, path_and_query)`, as [`for_parts`] sets it: the text put
/// together on the stack when it fits 512 bytes (the fast hit path's lookup needs the hash
/// alone, not a key's heap copy of the text).
pub fn primary_hash(host: &str, path_and_query: &str) -> HashBinary {
    let mut text = crate::onstack::OnStack::<512>::default();
    primary_pieces(host, path_and_query, |piece| text.push(piece));
    match text.bytes() {
        Some(text) => pingora_cache::key::hash_key(text),
        None => pingora_cache::key::hash_key(primary(host, path_and_query)),
    }
}

/// The bytes of [`primary`], in pieces: each a slice of the `str`s given or an ASCII escape.
fn primary_pieces(host: &str, path_and_query: &str, mut out: impl FnMut(&[u8])) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out(SCHEME.as_bytes());
    out(b"://");
    let bytes = host.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let plain = (unreserved_or_sub_delim(b) && b != b'*') || matches!(b, b':' | b'[' | b']');
        if !plain {
            out(&bytes[plain_from..i]);
            out(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            plain_from = i + 1;
        }
    }
    out(&bytes[plain_from..]);
    out(path_and_query.as_bytes());
}

/// The host of a primary key text as it was given to [`primary`], which escapes the host's
/// bytes that a URL's authority cannot hold (`%XX`, `%` itself among them): bans and purges
/// match a host as requests give it. Borrowed when nothing is escaped (almost every host).
pub fn unescape_host(escaped: &str) -> std::borrow::Cow<'_, str> {
    if !escaped.contains('%') {
        return std::borrow::Cow::Borrowed(escaped);
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let pair = (bytes[i] == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
            .flatten();
        match pair {
            Some((hi, lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // (what `primary` escaped was a `str`: the bytes are its own again)
    String::from_utf8(out).map_or(std::borrow::Cow::Borrowed(escaped), std::borrow::Cow::Owned)
}

/// The cache key of a request (no variance yet: Pingora adds it after the first lookup).
pub fn for_request(req: &RequestHeader) -> Result<CacheKey, BadHost> {
    Ok(for_parts(&request_host(req)?, request_path_and_query(req)))
}

/// The cache key of a request whose host is already normalised ([`request_host`]) and whose
/// path and query are [`request_path_and_query`]: what [`for_request`] builds, without
/// working the host out again.
pub fn for_parts(host: &str, path_and_query: &str) -> CacheKey {
    with_hash(primary(host, path_and_query))
}

/// [`for_parts`] when its hash is known ([`primary_hash`]).
pub fn for_parts_hashed(host: &str, path_and_query: &str, hash: HashBinary) -> CacheKey {
    let text = primary(host, path_and_query);
    // a hash of other text would store entries that purges and memcached cannot find
    debug_assert_eq!(hash, pingora_cache::key::hash_key(&text), "{text}");
    let mut key = CacheKey::new(text, "");
    key.set_primary_bin_override(hash);
    key
}

/// The cache key of a URL given as host and path (purges, RFC 9111 §4.4 invalidation).
pub fn for_url(host: &str, path_and_query: &str) -> CacheKey {
    with_hash(primary(&normalize_host(host), path_and_query))
}

/// Hash the primary key once: Pingora asks for it several times per request (lookup, lock,
/// predictor, eviction), and would otherwise run blake2 each time.
fn with_hash(primary: String) -> CacheKey {
    let hash = pingora_cache::key::hash_key(&primary);
    let mut key = CacheKey::new(primary, "");
    key.set_primary_bin_override(hash);
    key
}

/// Does the stored response say `Vary: *`? Such a response never matches a later request
/// (RFC 9111 §4.1), so it is not stored at all.
pub fn vary_star(headers: &http::HeaderMap) -> bool {
    vary_names(headers).any(|n| n == "*")
}

/// The header names listed in every `Vary` field, trimmed, lower-cased.
fn vary_names(headers: &impl Fields) -> impl Iterator<Item = String> + '_ {
    headers
        .all("vary")
        .filter_map(crate::fields::Value::text)
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// The variance of `req` against the stored response's `Vary` (RFC 9111 §4.1): a hash of the
/// request's values of each listed header, `None` when the response does not vary.
///
/// Values are compared after trimming and collapsing each comma-separated list, so
/// `gzip,br` and `gzip, br` select the same variant (§4.1 allows such normalisation).
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    variance_for(meta.headers(), req, &[])
}

/// [`variance`] against a stored response's header fields, plus `extra` request headers (a
/// rule's `key_headers`) as if the response listed them in `Vary`.
pub fn variance_for(resp: &impl Fields, req: &RequestHeader, extra: &[HeaderName]) -> Option<HashBinary> {
    let mut names: Vec<String> = vary_names(resp)
        .chain(extra.iter().map(|h| h.as_str().to_string()))
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort_unstable();
    names.dedup();
    let mut builder = VarianceBuilder::new();
    for name in names {
        let value = HeaderName::from_bytes(name.as_bytes())
            .ok()
            .map(|h| normalized_values(req.headers.get_all(h).iter()))
            .unwrap_or_default();
        builder.add_owned_name_value(name, value.into_bytes());
    }
    builder.finalize()
}

fn normalized_values<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> String {
    let mut out = String::new();
    for v in values {
        for part in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(part);
        }
    }
    out
}

/// The `Accept-Encoding` a cacheable request is forwarded with, so that `Vary:
/// Accept-Encoding` makes at most three variants instead of one per browser's spelling
/// (`gzip, deflate, br, zstd`, `gzip, deflate, br`, `br, gzip`...), as Varnish and Fastly
/// normalise it: `br, gzip` if the client takes Brotli and gzip, `br` or `gzip` if only one,
/// `None` if neither (the caller then sends `identity`: an absent field would mean any coding). Other codings (deflate, zstd, compress) are dropped: few
/// origins send them and a client that lists them also takes gzip. A `q=0` refuses a coding;
/// `*` stands for the codings not named.
pub fn normalize_accept_encoding<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<&'static str> {
    #[derive(Clone, Copy, PartialEq)]
    enum Said {
        Nothing,
        Yes,
        No,
    }
    let (mut gzip, mut br, mut star) = (Said::Nothing, Said::Nothing, Said::Nothing);
    for value in values {
        for item in String::from_utf8_lossy(value).split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                let q = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="));
                q.is_some_and(|q| q.trim().parse::<f32>().map_or(true, |q| q <= 0.0))
            });
            let said = if refused { Said::No } else { Said::Yes };
            let is = |name: &str| coding.eq_ignore_ascii_case(name);
            if is("gzip") || is("x-gzip") {
                gzip = said;
            } else if is("br") {
                br = said;
            } else if coding == "*" {
                star = said;
            }
        }
    }
    let takes = |s: Said| s == Said::Yes || (s == Said::Nothing && star == Said::Yes);
    match (takes(br), takes(gzip)) {
        (true, true) => Some("br, gzip"),
        (true, false) => Some("br"),
        (false, true) => Some("gzip"),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_cache::key::CacheHashKey;
    use pingora_http::ResponseHeader;
    use std::time::SystemTime;

    #[test]
    fn accept_encoding_is_normalised_like_varnish_and_fastly() {
        let n = |v: &str| normalize_accept_encoding([v.as_bytes()]);
        for browser in [
            "gzip, deflate, br, zstd",
            "gzip, deflate, br",
            "br,gzip",
            "BR, GZip;q=0.8",
        ] {
            assert_eq!(n(browser), Some("br, gzip"), "{browser}");
        }
        assert_eq!(n("gzip, deflate"), Some("gzip"));
        assert_eq!(n("x-gzip"), Some("gzip"));
        assert_eq!(n("br"), Some("br"));
        assert_eq!(n("gzip;q=0, br"), Some("br"));
        assert_eq!(n("br;q=0.0, gzip;q=1"), Some("gzip"));
        assert_eq!(n("*"), Some("br, gzip"));
        assert_eq!(n("*, br;q=0"), Some("gzip"));
        assert_eq!(n("*;q=0, gzip"), Some("gzip"));
        assert_eq!(n("gzip;q=junk"), None, "an unreadable weight refuses");
        for none in ["", "identity", "deflate", "zstd", "compress", ",,;", "gzip;q=0"] {
            assert_eq!(n(none), None, "{none}");
        }
        // several fields are one list (RFC 9110 §5.3)
        let two: [&[u8]; 2] = [b"gzip", b"br"];
        assert_eq!(normalize_accept_encoding(two), Some("br, gzip"));
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn meta(vary: &[&str]) -> CacheMeta {
        let mut h = ResponseHeader::build(200, None).unwrap();
        for v in vary {
            h.append_header("vary", *v).unwrap();
        }
        let now = SystemTime::now();
        CacheMeta::new(now, now, 0, 0, h)
    }

    #[test]
    fn host_is_normalised() {
        let a = for_request(&req("/p?q=1", &[("host", "Example.ORG:80")])).unwrap();
        let b = for_request(&req("http://example.org/p?q=1", &[])).unwrap();
        assert_eq!(a.primary_key(), b"http://example.org/p?q=1");
        assert_eq!(
            String::from_utf8_lossy(b.primary_key()),
            "http://example.org/p?q=1"
        );
        assert_eq!(a.primary_bin(), b.primary_bin());
        let c = for_request(&req("/p?q=1", &[("host", "example.org:8080")])).unwrap();
        assert_ne!(a.primary_bin(), c.primary_bin());
    }

    #[test]
    fn a_key_from_the_request_parts_is_the_request_key() {
        for r in [
            req("/p?q=1", &[("host", "Example.ORG:80")]),
            req("http://example.org/p", &[("host", "example.org")]),
            req("/", &[("host", "site.test.")]),
        ] {
            let parts = for_parts(&request_host(&r).unwrap(), request_path_and_query(&r));
            let whole = for_request(&r).unwrap();
            assert_eq!(parts.primary_key(), whole.primary_key());
            assert_eq!(parts.primary_bin(), whole.primary_bin());
        }
    }

    #[test]
    fn the_cached_hash_is_the_hash_of_the_primary_key() {
        let k = for_url("h", "/x");
        assert_eq!(k.primary_bin(), CacheKey::new("http://h/x", "").primary_bin());
    }

    #[test]
    fn a_host_that_is_not_an_authority_is_refused() {
        // See: issue 8 (a `/` in Host poisoned any URL of the named site)
        for bad in [
            "victim.test/evil",
            "victim.test?x",
            "victim.test#x",
            "user@victim.test",
            "victim test",
            "victim.test\t",
            "",
            "victim.test:8o",
            "victim.test:123456",
            "[::1",
            "[::1]x",
            "[zz]",
            "vïctim.test",
        ] {
            assert!(!valid_authority(bad), "{bad:?} accepted");
        }
        for good in [
            "victim.test",
            "Victim.Test:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:6081",
            "a-b_c.~d",
            "xn--bcher-kva.test.",
        ] {
            assert!(valid_authority(good), "{good:?} refused");
        }
        let refused = |headers: &[(&str, &str)]| request_host(&req("/x", headers)).err();
        assert_eq!(refused(&[("host", "victim.test/evil")]), Some(BadHost::Invalid));
        assert_eq!(refused(&[("host", "a"), ("host", "a")]), Some(BadHost::Repeated));
        assert_eq!(refused(&[]), Some(BadHost::Missing));
        let mut http10 = req("/x", &[]);
        http10.set_version(http::Version::HTTP_10);
        assert_eq!(request_host(&http10), Ok(String::new()));
        // `Host: -` is a valid name, and another site than no host at all
        assert_ne!(for_url("-", "/x").primary_bin(), for_url("", "/x").primary_bin());
        assert_eq!(
            request_host(&req("http://victim.test/x", &[("host", "other.test")])),
            Err(BadHost::Conflicting)
        );
    }

    #[test]
    fn a_trailing_dot_names_the_same_site() {
        assert_eq!(normalize_host("Site.Test."), "site.test");
        assert_eq!(normalize_host("site.test.:8080"), "site.test:8080");
        assert_eq!(normalize_host("site.test.:80"), "site.test");
        assert_eq!(normalize_host("site.test.."), "site.test");
        assert_eq!(
            normalize_host(&normalize_host("Site.Test..")),
            normalize_host("Site.Test..")
        );
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]:8080");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(
            for_url("site.test.", "/x").primary_bin(),
            for_url("site.test", "/x").primary_bin()
        );
    }

    #[test]
    fn the_key_text_is_unambiguous_whatever_the_host_holds() {
        // a host that swallowed part of a path must not make another URL's key
        assert_ne!(
            primary("victim.test/evil", "/x"),
            primary("victim.test", "/evil/x")
        );
        assert_ne!(primary("a*", "/"), primary("a", "*/"));
        assert_ne!(primary("a%2F", "/x"), primary("a/", "/x"));
        assert_eq!(primary("victim.test", "/evil/x"), "http://victim.test/evil/x");
        assert_eq!(primary("a/b*c%é:80", "/x?y"), "http://a%2Fb%2Ac%25%C3%A9:80/x?y");
    }

    #[test]
    fn the_primary_hash_is_that_of_the_key_text_whatever_its_length() {
        let long = format!("/{}", "p".repeat(600));
        for (host, path) in [
            ("site.test", "/x?y=1"),
            ("a/b*c%é", "/"),
            ("site.test", long.as_str()),
            ("h".repeat(504).as_str(), "/"), // 512 bytes: on the stack
            ("h".repeat(505).as_str(), "/"), // 513: on the heap
        ] {
            let key = for_parts(host, path);
            assert_eq!(primary_hash(host, path), key.primary_bin(), "{host} {path}");
            assert_eq!(
                pingora_cache::key::hash_key(primary(host, path)),
                key.primary_bin()
            );
            let hashed = for_parts_hashed(host, path, primary_hash(host, path));
            assert_eq!(hashed.primary_bin(), key.primary_bin());
            assert_eq!(hashed.primary_key_str(), key.primary_key_str());
        }
    }

    #[test]
    fn an_escaped_host_is_given_back_and_a_stray_percent_is_kept() {
        assert_eq!(unescape_host("a%2Ab%25c"), "a*b%c");
        assert_eq!(unescape_host("caf%C3%A9"), "caf\u{e9}");
        assert!(matches!(
            unescape_host("plain.example:8080"),
            std::borrow::Cow::Borrowed(_)
        ));
        for kept in ["a%", "a%2", "a%zz", "%G0"] {
            assert_eq!(unescape_host(kept), kept, "not an escape: kept as it is");
        }
        // bytes that are no UTF-8 (no `primary` makes them): the text as it is
        assert_eq!(unescape_host("%FF"), "%FF");
    }

    proptest::proptest! {
        #[test]
        fn distinct_host_and_path_pairs_make_distinct_keys(
            h1 in "[a-z/%*?# .]{0,6}", p1 in "/[a-z/]{0,6}",
            h2 in "[a-z/%*?# .]{0,6}", p2 in "/[a-z/]{0,6}",
        ) {
            if (&h1, &p1) != (&h2, &p2) {
                proptest::prop_assert_ne!(primary(&h1, &p1), primary(&h2, &p2));
            }
        }

        /// A primary key text split again gives the host and the path it was made of: bans
        /// match what hits match (a host with `*`, `%`, `/` or `é` among them).
        #[test]
        fn a_primary_text_splits_back_into_its_host_and_path(
            host in "[a-zA-Z0-9/%*?#@ .:é\\[\\]-]{0,24}",
            path in "/[a-z/?=&%*]{0,12}",
        ) {
            let text = primary(&host, &path);
            let (h, p) = crate::storage::memory::split_url(&text);
            proptest::prop_assert_eq!((&*h, p), (host.as_str(), path.as_str()));
        }

        #[test]
        fn the_primary_hash_is_that_of_the_primary_text(
            host in "[a-zA-Z0-9/%*?#@ .:é\\[\\]-]{0,40}",
            path in "/[a-z/?=&]{0,8}",
            pad in 440usize..520,
        ) {
            // around the stack buffer's 512 bytes, and short
            let long = format!("{path}{}", "x".repeat(pad));
            for path in [path.as_str(), long.as_str()] {
                proptest::prop_assert_eq!(
                    primary_hash(&host, path),
                    pingora_cache::key::hash_key(primary(&host, path))
                );
            }
        }
    }

    #[test]
    fn query_is_part_of_the_key() {
        let a = for_request(&req("/p?a=1&b=2", &[("host", "h")])).unwrap();
        let b = for_request(&req("/p?b=2&a=1", &[("host", "h")])).unwrap();
        assert_ne!(a.primary_bin(), b.primary_bin());
        assert_eq!(for_url("H", "/p?a=1&b=2").primary_bin(), a.primary_bin());
    }

    #[test]
    fn no_vary_no_variance() {
        assert!(variance(&meta(&[]), &req("/", &[("accept-encoding", "gzip")])).is_none());
    }

    #[test]
    fn variance_follows_the_listed_headers_only() {
        let m = meta(&["Accept-Encoding", "accept-language"]);
        let gz = variance(&m, &req("/", &[("accept-encoding", "gzip"), ("cookie", "a")]));
        let gz2 = variance(&m, &req("/", &[("accept-encoding", "gzip"), ("cookie", "b")]));
        let br = variance(&m, &req("/", &[("accept-encoding", "br")]));
        assert!(gz.is_some());
        assert_eq!(gz, gz2);
        assert_ne!(gz, br);
    }

    #[test]
    fn variance_ignores_list_whitespace_and_field_order() {
        let m1 = meta(&["accept-encoding, accept-language"]);
        let m2 = meta(&["Accept-Language", "Accept-Encoding"]);
        let a = variance(&m1, &req("/", &[("accept-encoding", "gzip,br")]));
        let b = variance(&m2, &req("/", &[("accept-encoding", "gzip, br")]));
        assert_eq!(a, b);
    }

    #[test]
    fn absent_header_is_its_own_variant() {
        let m = meta(&["accept-encoding"]);
        let none = variance(&m, &req("/", &[]));
        let empty = variance(&m, &req("/", &[("accept-encoding", "gzip")]));
        assert_ne!(none, empty);
    }

    #[test]
    fn vary_star_is_detected() {
        let mut h = http::HeaderMap::new();
        h.append("vary", HeaderValue::from_static("accept, *"));
        assert!(vary_star(&h));
        h.clear();
        h.append("vary", HeaderValue::from_static("accept"));
        assert!(!vary_star(&h));
    }
}
