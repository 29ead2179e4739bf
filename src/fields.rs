//! Read access to a response's header fields, whether they sit in an `http::HeaderMap` or in
//! an L1 entry's compact [`crate::storage::memory::StoredHeader`]: the purge checks, the Vary
//! variance and the admin listing read either one through [`Fields`].

use http::{HeaderMap, HeaderName, HeaderValue};

/// Header fields looked up by name. Names compare case-insensitively, as in a `HeaderMap`.
pub trait Fields {
    /// Every value of the field `name`, in order.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a;

    /// Every field name, once per value.
    fn names(&self) -> impl Iterator<Item = &HeaderName>;

    /// The first value of the field `name`.
    fn first<'a>(&'a self, name: &'a str) -> Option<&'a HeaderValue> {
        self.all(name).next()
    }

    fn has(&self, name: &str) -> bool {
        self.first(name).is_some()
    }
}

impl Fields for HeaderMap {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.get_all(name).into_iter()
    }

    fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.iter().map(|(k, _)| k)
    }
}
