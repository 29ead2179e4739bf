//! A stored response head, kept compact: L1 holds one per entry, and most entries are small.
//!
//! An `http::HeaderMap` costs about 112 bytes per field in its bucket vector plus an index,
//! and each value owning its bytes is one allocation (two once it is cloned: `Bytes` promotes
//! itself to a shared buffer). [`StoredHeader`] keeps the fields as one boxed slice of
//! (name, value) pairs, 72 bytes each, whose values are slices of one buffer: two allocations
//! per head, whatever its field count (plus one per non-standard name). A hit builds the map
//! it hands to Pingora from them: the same two allocations as cloning a map, and the values
//! are shared, never copied.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use pingora_http::ResponseHeader;

use crate::fields::Fields;
use crate::policy::is_targeted;
use crate::purge::is_tag;

/// Bytes charged per field on top of its name and value: its (name, value) pair.
const FIELD_OVERHEAD: usize = std::mem::size_of::<(HeaderName, HeaderValue)>();

/// Bytes charged on top for a name that may be the `http` crate's own allocation: a name it
/// does not know is a heap copy, and a shared block once it has been cloned (every hit).
const NAME_ALLOCATION: usize = 64;

/// Response field names that cost nothing beyond the pair: the `http` crate knows them (a tag
/// in the pair, no allocation). Other standard names are charged as if allocated: an
/// over-count, never an under-count.
const KNOWN: [HeaderName; 24] = {
    use http::header::*;
    [
        ACCEPT_RANGES,
        AGE,
        CACHE_CONTROL,
        CONNECTION,
        CONTENT_DISPOSITION,
        CONTENT_ENCODING,
        CONTENT_LANGUAGE,
        CONTENT_LENGTH,
        CONTENT_LOCATION,
        CONTENT_RANGE,
        CONTENT_TYPE,
        DATE,
        ETAG,
        EXPIRES,
        LAST_MODIFIED,
        LINK,
        LOCATION,
        PRAGMA,
        SERVER,
        SET_COOKIE,
        STRICT_TRANSPORT_SECURITY,
        TRANSFER_ENCODING,
        VARY,
        X_CONTENT_TYPE_OPTIONS,
    ]
};

/// A response's status line and fields, with lower-case names (as a fast hit sends them, and
/// as HTTP/2 does), owning their bytes.
#[derive(Debug, Clone)]
pub struct StoredHeader {
    status: StatusCode,
    version: Version,
    /// Carries a tag header or a targeted cache-control field (RFC 9213): the only fields a
    /// hit may strip, so a hit filters the others only if this is set.
    strippable: bool,
    /// Only when it is not the status's canonical one.
    reason: Option<Box<str>>,
    fields: Box<[(HeaderName, HeaderValue)]>,
}

impl StoredHeader {
    /// A copy of `h` that owns its bytes. Pingora parses a response head in one read buffer of
    /// 4 KiB or more, and the values it hands over are slices of that buffer: a stored header
    /// must not keep the whole buffer alive (issue 8: 1 KB objects took 5x their budget in
    /// RSS), so the values are copied, once, into one buffer of their own.
    pub fn new(h: &ResponseHeader) -> Self {
        let mut buf = BytesMut::with_capacity(h.headers.values().map(HeaderValue::len).sum());
        for value in h.headers.values() {
            buf.extend_from_slice(value.as_bytes());
        }
        let buf: Bytes = buf.freeze();
        let mut at = 0;
        let fields = h
            .headers
            .iter()
            .map(|(name, value)| {
                let len = value.len();
                let mut own =
                    HeaderValue::from_maybe_shared(buf.slice(at..at + len)).unwrap_or_else(|_| value.clone());
                own.set_sensitive(value.is_sensitive());
                at += len;
                (name.clone(), own)
            })
            .collect();
        let reason = h.get_reason_phrase();
        StoredHeader {
            status: h.status,
            version: h.version,
            strippable: h.headers.keys().any(|n| is_tag(n) || is_targeted(n)),
            reason: (reason != h.status.canonical_reason()).then(|| reason.unwrap_or("").into()),
            fields,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether a tag header or a targeted cache-control field is among the fields.
    pub fn strippable(&self) -> bool {
        self.strippable
    }

    /// Approximate bytes held: names, values and the pairs, and an allocation for each name
    /// that may have one.
    pub fn bytes(&self) -> usize {
        self.fields
            .iter()
            .map(|(k, v)| {
                let allocated = if KNOWN.contains(k) { 0 } else { NAME_ALLOCATION };
                k.as_str().len() + v.len() + FIELD_OVERHEAD + allocated
            })
            .sum::<usize>()
            + self.reason.as_ref().map_or(0, |r| r.len())
    }

    /// The head as Pingora's header, every field in order.
    pub fn to_response(&self) -> ResponseHeader {
        // room for what a hit adds: Age, Cache-Status, Date, Connection
        let mut h = self.response(self.map(4, |_| true));
        h.set_version(self.version);
        h
    }

    /// The fields `keep` accepts, as a header map with room for `extra` more (so that adding
    /// them does not grow it). The values are shared with the stored ones.
    pub fn map(&self, extra: usize, keep: impl Fn(&HeaderName) -> bool) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len() + extra);
        for (name, value) in self.fields.iter().filter(|(n, _)| keep(n)) {
            // far below the map's limit: the head was parsed into one
            let _ = map.try_append(name.clone(), value.clone());
        }
        map
    }

    /// This head's status line around `fields`, as Pingora's header. Without Pingora's
    /// case-preserving name map: names go out lower-case.
    pub fn response(&self, fields: HeaderMap) -> ResponseHeader {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        parts.headers = fields;
        let mut h = ResponseHeader::from(parts);
        if let Some(reason) = &self.reason {
            let _ = h.set_reason_phrase(Some(reason));
        }
        h
    }
}

impl Fields for StoredHeader {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.fields.iter().map(|(n, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_head() -> ResponseHeader {
        let mut h = ResponseHeader::build(203, None).unwrap();
        h.append_header("Content-Type", "text/html").unwrap();
        h.append_header("X-Custom", "a").unwrap();
        h.append_header("Set-Cookie", "b=1").unwrap();
        h.append_header("Set-Cookie", "c=2").unwrap();
        h.append_header("Cache-Control", "max-age=60").unwrap();
        h.set_reason_phrase(Some("Partly")).unwrap();
        h
    }

    #[test]
    fn a_stored_head_rebuilds_the_same_fields_in_order() {
        let h = origin_head();
        let s = StoredHeader::new(&h);
        let back = s.to_response();
        assert_eq!(back.status, h.status);
        assert_eq!(back.get_reason_phrase(), Some("Partly"));
        let fields = |h: &ResponseHeader| {
            h.headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&back), fields(&h));
        assert_eq!(s.all("set-cookie").count(), 2);
        assert_eq!(s.first("SET-COOKIE").unwrap(), "b=1");
        assert!(s.has("x-custom") && !s.has("vary"));
        assert!(!s.strippable());
        let mut tagged = h.clone();
        tagged.append_header("xkey", "a").unwrap();
        assert!(StoredHeader::new(&tagged).strippable());
        let mut targeted = h;
        targeted.append_header("CDN-Cache-Control", "max-age=5").unwrap();
        assert!(StoredHeader::new(&targeted).strippable());
    }

    #[test]
    fn values_share_one_buffer_not_the_parsed_one() {
        // as Pingora hands them over: slices of the connection's read buffer
        let read = Bytes::from(vec![b'v'; 4096]);
        let mut h = ResponseHeader::build(200, None).unwrap();
        for (i, name) in ["content-type", "x-one", "x-two", "etag"].into_iter().enumerate() {
            let value = HeaderValue::from_maybe_shared(read.slice(i * 100..i * 100 + 10 + i)).unwrap();
            h.append_header(name, value).unwrap();
        }
        let inside = |p: *const u8| read.as_ptr_range().contains(&p);
        assert!(h.headers.values().all(|v| inside(v.as_bytes().as_ptr())));
        let s = StoredHeader::new(&h);
        drop(h);
        // none in the read buffer, and consecutive in one buffer of their own
        assert!(s.fields.iter().all(|(_, v)| !inside(v.as_bytes().as_ptr())));
        for (i, (_, v)) in s.fields.iter().enumerate().skip(1) {
            let before = &s.fields[i - 1].1;
            assert_eq!(
                before.as_bytes().as_ptr().wrapping_add(before.len()),
                v.as_bytes().as_ptr()
            );
        }
        assert_eq!(s.first("x-two").unwrap().len(), 12);
    }

    #[test]
    fn sensitive_values_stay_sensitive_and_an_empty_head_is_empty() {
        let mut h = ResponseHeader::build(204, None).unwrap();
        let mut secret = HeaderValue::from_static("token");
        secret.set_sensitive(true);
        h.append_header("x-secret", secret).unwrap();
        let s = StoredHeader::new(&h);
        assert!(s.first("x-secret").unwrap().is_sensitive());
        assert!(s.to_response().headers["x-secret"].is_sensitive());
        let empty = StoredHeader::new(&ResponseHeader::build(304, None).unwrap());
        assert_eq!((empty.names().count(), empty.bytes()), (0, 0));
        assert_eq!(empty.to_response().status, 304);
    }

    #[test]
    fn a_name_the_http_crate_allocates_is_charged_for_it() {
        let mut known = ResponseHeader::build(200, None).unwrap();
        known.append_header("etag", "\"abcd\"").unwrap();
        let mut custom = ResponseHeader::build(200, None).unwrap();
        custom.append_header("x-et", "\"abcd\"").unwrap();
        let (k, c) = (
            StoredHeader::new(&known).bytes(),
            StoredHeader::new(&custom).bytes(),
        );
        assert_eq!(c, k + NAME_ALLOCATION);
        assert!(k >= FIELD_OVERHEAD + 4 + 6);
    }

    #[test]
    fn build_filters_and_leaves_room() {
        let s = StoredHeader::new(&origin_head());
        let map = s.map(2, |n| n != http::header::SET_COOKIE);
        assert!(!map.contains_key("set-cookie"));
        assert_eq!(map.len(), 3);
        let h = s.response(map);
        assert_eq!((h.status.as_u16(), h.get_reason_phrase()), (203, Some("Partly")));
        let canonical = StoredHeader::new(&ResponseHeader::build(200, None).unwrap());
        assert!(canonical.reason.is_none());
        assert_eq!(canonical.to_response().get_reason_phrase(), Some("OK"));
    }
}
