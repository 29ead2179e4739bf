//! Header handling on the way through: the request fields the filter decides on,
//! `Accept-Encoding` normalisation, hop-by-hop fields, `Content-Length`, tag headers, and the
//! header a fast hit sends.

use http::{header, HeaderValue};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::key;
use crate::purge;
use crate::storage::memory::StoredHeader;

/// The request header fields the request filter decides on, found in one pass over the names
/// (a handful per request) rather than a map lookup each.
pub(super) struct RequestFields {
    /// `Range`, `If-Range` or an `If-*` precondition.
    pub(super) conditional: bool,
    /// `Cache-Control` or `Pragma`.
    pub(super) directives: bool,
    pub(super) authorization: bool,
    pub(super) accept_encoding: bool,
    /// `Upgrade` (a WebSocket handshake, h2c): never answered from or stored in the cache.
    pub(super) upgrade: bool,
}

/// Rewrite the request's `Accept-Encoding` to one of the few values cached variants are kept
/// for ([`key::normalize_accept_encoding`]).
pub(super) fn normalize_accept_encoding(req: &mut RequestHeader) {
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
            // neither: say so. Without the field any coding is acceptable (RFC 9110 §12.5.3),
            // and the origin could answer gzip to a client that cannot read it
            let _ = req.insert_header(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
    }
}

impl RequestFields {
    pub(super) fn of(req: &RequestHeader) -> Self {
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

/// The header a fast hit sends, built per hit from the stored one: without the
/// case-preserving name map Pingora keeps beside the header map (names go out lower-case, as
/// in HTTP/2), tags stripped if configured, and room for the four fields a hit adds, so that
/// the map never grows: `Age` and `Cache-Status` here, `Date` and `Connection` by Pingora's
/// writer, which sets both on every response (HTTP/2 drops `Connection`).
/// The values are sliced from `shared`, the stored head's buffer ([`StoredHeader::shared`]).
pub(super) fn wire_fields(
    stored: &StoredHeader,
    shared: &bytes::Bytes,
    strip: bool,
    strip_targeted: bool,
) -> http::HeaderMap {
    use crate::{policy::is_targeted, purge::is_tag};
    // most heads carry nothing to strip: no test per field for them
    if (strip || strip_targeted) && stored.strippable() {
        stored.map_in(shared, 4, |n| {
            !(strip && is_tag(n) || strip_targeted && is_targeted(n))
        })
    } else {
        stored.map_in(shared, 4, |_| true)
    }
}

/// Remove the targeted cache-control fields (RFC 9213: meant for this cache) from a client
/// response.
pub(super) fn strip_targeted_fields(resp: &mut ResponseHeader) {
    for name in crate::policy::targeted_headers() {
        resp.remove_header(*name);
    }
}

/// Remove the tag headers (xkey, Surrogate-Key, ...) from a client response.
pub(super) fn strip_tags(resp: &mut ResponseHeader) {
    if purge::has_tag_header(&resp.headers) {
        for (name, _) in purge::TAG_HEADERS {
            resp.remove_header(name);
        }
    }
}

/// RFC 9112 §6.3: a `Content-Length` sent as several identical values (`5, 5` or two lines)
/// is forwarded as one; different values make the message invalid (400).
pub(super) fn single_content_length(req: &mut RequestHeader) -> Result<()> {
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) other than the framing ones Pingora manages itself.
const HOP_BY_HOP: [&str; 4] = ["keep-alive", "proxy-connection", "te", "trailer"];

/// The headers to remove before forwarding: those named in `Connection` and the standard
/// hop-by-hop ones. `Connection` and `Upgrade` themselves stay (Pingora uses them for keep-alive
/// and protocol upgrades), and so do the framing headers and `Host`, whatever `Connection` says.
pub(super) fn hop_by_hop(headers: &http::HeaderMap) -> Vec<String> {
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

/// Request headers that tell an origin about the request as some proxy saw it. The key does
/// not contain them: from a client they could make the origin answer differently (a redirect
/// to `http://`, another host's links, another path or method) and have that stored for
/// everyone. They are believed only from `server.trusted_proxies`.
pub(super) const FORWARDING: [&str; 13] = [
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "front-end-https",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-original-host",
    "x-forwarded-server",
];

/// Request headers no proxy in front of corral sets (a terminator passes them from the
/// client): they rewrite the path or the method at the origin. Removed from everyone.
pub(super) const NEVER_FORWARDED: [&str; 4] = [
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
];

/// Whether `name` is one of `list`, also spelled with underscores (a CGI origin maps
/// `X_Forwarded_Host` to the same variable as `X-Forwarded-Host`).
fn listed(name: &str, list: &[&str]) -> bool {
    list.iter().any(|l| {
        l.len() == name.len()
            && l.bytes()
                .zip(name.bytes())
                .all(|(a, b)| a == b.to_ascii_lowercase() || (a == b'-' && b == b'_'))
    })
}

/// Remove from a client's request the forwarding headers it may not set: all of them from a
/// peer that is not a trusted proxy, the path and method overrides from anyone. Done on the
/// request as received, so that a response varying on one of them is keyed by what the
/// origin was sent.
pub(super) fn strip_forwarding(req: &mut RequestHeader, trusted: bool) {
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| listed(n.as_str(), &NEVER_FORWARDED) || (!trusted && listed(n.as_str(), &FORWARDING)))
        .cloned()
        .collect();
    for name in names {
        req.remove_header(&name);
    }
}

/// The forwarding headers for the upstream (the client's were stripped by
/// [`strip_forwarding`]): from a trusted proxy, its own plus this hop's address in
/// `X-Forwarded-For`; from anyone else, corral's own `X-Forwarded-For` (the peer),
/// `X-Forwarded-Proto` (`http`) and `X-Forwarded-Host`.
pub(super) fn forwarding_headers(
    req: &mut RequestHeader,
    peer: Option<std::net::IpAddr>,
    trusted: bool,
    host: &str,
) -> Result<()> {
    strip_forwarding(req, trusted);
    if !trusted {
        req.insert_header("x-forwarded-proto", "http")?;
        if !host.is_empty() {
            req.insert_header("x-forwarded-host", host)?;
        }
    }
    if let Some(ip) = peer {
        append_forwarded_for(req, ip)?;
    }
    Ok(())
}

/// One `X-Forwarded-For` entry: an address, maybe with a port, IPv6 maybe in brackets.
fn forwarded_addr(entry: &str) -> Option<std::net::IpAddr> {
    let e = entry.trim().trim_matches('"');
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    // a.b.c.d:port
    let (host, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(std::net::IpAddr::V4)
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last address in
/// `X-Forwarded-For` that is not one (walking from the right: every hop appends). `None` when
/// that list has an entry that is not an address (`unknown`, garbage): the client is unknown,
/// and no allow-list admits it.
pub(super) fn client_ip(
    req: &RequestHeader,
    peer: Option<std::net::IpAddr>,
    trusts: impl Fn(std::net::IpAddr) -> bool,
) -> Option<std::net::IpAddr> {
    let lines = req.headers.get_all("x-forwarded-for");
    client_ip_of(lines.iter().map(HeaderValue::as_bytes), peer, trusts)
}

/// [`client_ip`] from the `X-Forwarded-For` lines' values, in order.
pub(super) fn client_ip_of<'a>(
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    peer: Option<std::net::IpAddr>,
    trusts: impl Fn(std::net::IpAddr) -> bool,
) -> Option<std::net::IpAddr> {
    let peer = peer?;
    if !trusts(peer) {
        return Some(peer);
    }
    let entries: Vec<&str> = forwarded_for
        // what `HeaderValue::to_str` takes: visible ASCII and tabs
        .filter(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter(|e| !e.trim().is_empty())
        .collect();
    for entry in entries.iter().rev() {
        let ip = forwarded_addr(entry)?;
        if !trusts(ip) {
            return Some(ip);
        }
    }
    Some(peer)
}

/// Append the client's address to `X-Forwarded-For` (the list the client sent, if any, is
/// kept in front: the origin decides how many hops it trusts).
pub(super) fn append_forwarded_for(req: &mut RequestHeader, ip: std::net::IpAddr) -> Result<()> {
    let ip = ip.to_string();
    // every line, in order (a proxy may have added its own line instead of appending)
    let prev: Vec<&str> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = if prev.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prev.join(", "))
    };
    req.insert_header("x-forwarded-for", xff)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fields: &[(&str, &str)]) -> StoredHeader {
        let mut h = ResponseHeader::build(200, None).unwrap();
        for (k, v) in fields {
            h.append_header(k.to_string(), *v).unwrap();
        }
        StoredHeader::new(&h)
    }

    /// Add the four fields a hit adds (Age and Cache-Status here, Date and Connection by
    /// Pingora's writer) and assert that the map did not grow for them.
    fn add_what_a_hit_adds(h: &mut http::HeaderMap, what: &str) {
        let capacity = h.capacity();
        h.insert(header::AGE, HeaderValue::from_static("1"));
        h.insert("cache-status", HeaderValue::from_static("corral; hit"));
        h.insert(
            header::DATE,
            HeaderValue::from_static("Mon, 30 Nov 2026 00:00:00 GMT"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert_eq!(h.capacity(), capacity, "{what}");
    }

    #[test]
    fn a_fast_hit_header_never_grows_for_the_four_fields_a_hit_adds() {
        for n in [0, 1, 2, 3, 5, 8, 12, 13, 24, 25, 40] {
            let names: Vec<String> = (0..n).map(|i| format!("x-f{i}")).collect();
            let fields: Vec<(&str, &str)> = names.iter().map(|k| (k.as_str(), "v")).collect();
            let s = stored(&fields);
            let mut h = wire_fields(&s, &s.shared(), false, false);
            add_what_a_hit_adds(&mut h, &format!("{n} fields"));
        }
    }

    #[test]
    fn a_fast_hit_header_strips_what_is_configured_and_has_room_for_what_a_hit_adds() {
        let s = stored(&[
            ("content-length", "3"),
            ("xkey", "a b"),
            ("Surrogate-Control", "max-age=60"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        let h = wire_fields(&s, &s.shared(), true, true);
        assert!(!h.contains_key("xkey") && !h.contains_key("surrogate-control"));
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
        // room for Age and Cache-Status, and for Pingora's Date and Connection
        add_what_a_hit_adds(&mut h.clone(), "stripped");

        let kept = wire_fields(&s, &s.shared(), false, false);
        assert_eq!(kept["xkey"], "a b");
        assert_eq!(kept["surrogate-control"], "max-age=60");
    }

    #[test]
    fn the_client_behind_a_trusted_proxy_is_the_last_untrusted_address_or_unknown() {
        let trusts = |ip: std::net::IpAddr| ip.is_loopback();
        let peer = Some("127.0.0.1".parse().unwrap());
        let with = |xff: &[&str]| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            for line in xff {
                req.append_header("x-forwarded-for", *line).unwrap();
            }
            client_ip(&req, peer, trusts).map(|ip| ip.to_string())
        };
        assert_eq!(with(&["203.0.113.9"]).as_deref(), Some("203.0.113.9"));
        assert_eq!(with(&["127.0.0.1, 203.0.113.9"]).as_deref(), Some("203.0.113.9"));
        assert_eq!(with(&["203.0.113.9:5678"]).as_deref(), Some("203.0.113.9"));
        assert_eq!(with(&["[2001:db8::1]:443"]).as_deref(), Some("2001:db8::1"));
        assert_eq!(with(&["10.0.0.5", "203.0.113.9"]).as_deref(), Some("203.0.113.9"));
        // garbage anywhere on the walk: unknown, never the proxy's own address
        assert_eq!(with(&["x, 203.0.113.9"]).as_deref(), Some("203.0.113.9"));
        assert_eq!(with(&["203.0.113.9, x"]), None);
        assert_eq!(with(&["unknown"]), None);
        // nothing listed: the proxy itself made the request
        assert_eq!(with(&[]).as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn forwarding_headers_are_stripped_in_every_spelling() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for name in [
            "X-Forwarded-Host",
            "x_forwarded_host",
            "X-Original-URL",
            "x-real-ip",
            "accept",
        ] {
            // (X-Host stays: FOSHttpCache's BAN sends it, and purges are not forwarded)
            req.append_header(name, "v").unwrap();
        }
        let mut trusted = req.clone();
        strip_forwarding(&mut req, false);
        assert_eq!(
            req.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["accept"]
        );
        strip_forwarding(&mut trusted, true);
        assert!(
            trusted.headers.get("x-original-url").is_none(),
            "never from anyone"
        );
        assert!(
            trusted.headers.get("x-forwarded-host").is_some(),
            "believed from a trusted proxy"
        );
    }

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
}
