//! Read access to a response's header fields, whether they sit in an `http::HeaderMap` or in
//! an L1 entry's compact [`crate::storage::memory::StoredHeader`]: the purge checks, the Vary
//! variance and the admin listing read either one through [`Fields`].

use http::HeaderMap;

/// A field's value as it is held, read alike from a header map or a stored head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value<'a>(pub &'a [u8]);

impl<'a> Value<'a> {
    /// The value as text if it is visible ASCII (and tabs), as `HeaderValue::to_str` reads it.
    pub fn text(self) -> Option<&'a str> {
        self.0
            .iter()
            .all(|&b| b == b'\t' || (32..127).contains(&b))
            .then(|| std::str::from_utf8(self.0).ok())
            .flatten()
    }

    pub fn as_bytes(self) -> &'a [u8] {
        self.0
    }
}

impl PartialEq<&str> for Value<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// Header fields looked up by name. Names compare case-insensitively, as in a `HeaderMap`.
pub trait Fields {
    /// Every value of the field `name`, in order.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Value<'a>> + 'a;

    /// Every field name (lower case), once per value.
    fn names(&self) -> impl Iterator<Item = &str>;

    /// The first value of the field `name`.
    fn first<'a>(&'a self, name: &'a str) -> Option<Value<'a>> {
        self.all(name).next()
    }

    fn has(&self, name: &str) -> bool {
        self.first(name).is_some()
    }
}

impl Fields for HeaderMap {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Value<'a>> + 'a {
        self.get_all(name).into_iter().map(|v| Value(v.as_bytes()))
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_text_as_a_header_value_reads_it() {
        assert_eq!(Value(b"max-age=60, public").text(), Some("max-age=60, public"));
        assert_eq!(Value(b"a\tb").text(), Some("a\tb"));
        // obs-text and control bytes are not text, as for HeaderValue::to_str
        for bytes in [&b"caf\xc3\xa9"[..], b"a\x7fb", b"a\x01b"] {
            assert_eq!(Value(bytes).text(), None, "{bytes:?}");
            let v = http::HeaderValue::from_bytes(bytes);
            assert!(v.map_or(true, |v| v.to_str().is_err()));
        }
    }
}
