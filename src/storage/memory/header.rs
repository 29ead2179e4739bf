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

/// Bytes charged per field on top of its name and value: its (name, value) pair.
const FIELD_OVERHEAD: usize = std::mem::size_of::<(HeaderName, HeaderValue)>();

/// A response's status line and fields, with lower-case names (as a fast hit sends them, and
/// as HTTP/2 does), owning their bytes.
#[derive(Debug, Clone)]
pub struct StoredHeader {
    status: StatusCode,
    version: Version,
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
            reason: (reason != h.status.canonical_reason()).then(|| reason.unwrap_or("").into()),
            fields,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Approximate bytes held: names, values and the pairs.
    pub fn bytes(&self) -> usize {
        self.fields
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + FIELD_OVERHEAD)
            .sum::<usize>()
            + self.reason.as_ref().map_or(0, |r| r.len())
    }

    /// The head as Pingora's header, every field in order.
    pub fn to_response(&self) -> ResponseHeader {
        let mut h = self.response(self.map(0, |_| true));
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
    }

    #[test]
    fn values_share_one_buffer_not_the_parsed_one() {
        let h = origin_head();
        let s = StoredHeader::new(&h);
        let ptrs: Vec<*const u8> = s.fields.iter().map(|(_, v)| v.as_bytes().as_ptr()).collect();
        // consecutive in one buffer, and none in the source header's values
        for (i, (_, v)) in s.fields.iter().enumerate().skip(1) {
            let before = &s.fields[i - 1].1;
            assert_eq!(
                before.as_bytes().as_ptr().wrapping_add(before.len()),
                v.as_bytes().as_ptr()
            );
        }
        for (_, v) in &h.headers {
            assert!(!ptrs.contains(&v.as_bytes().as_ptr()));
        }
    }

    #[test]
    fn build_filters_and_leaves_room() {
        let s = StoredHeader::new(&origin_head());
        let map = s.map(2, |n| n != http::header::SET_COOKIE);
        assert!(!map.contains_key("set-cookie"));
        assert_eq!(map.len(), 3);
        assert!(map.capacity() >= 5 + 2);
        let h = s.response(map);
        assert_eq!((h.status.as_u16(), h.get_reason_phrase()), (203, Some("Partly")));
        let canonical = StoredHeader::new(&ResponseHeader::build(200, None).unwrap());
        assert!(canonical.reason.is_none());
        assert_eq!(canonical.to_response().get_reason_phrase(), Some("OK"));
    }
}
