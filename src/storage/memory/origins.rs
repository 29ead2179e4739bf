//! The origins (`http://host`) that L1's URLs start with, each kept once for the process.
//!
//! Every entry keeps its URL (what bans match, what the admin API lists), and the origin is
//! most of it for a short path: `http://www.example.org` is 22 bytes, the same in every entry
//! of a site. A stored head keeps its origin's number here instead, in 2 bytes
//! ([`super::StoredHeader::url_parts`]), when the origin has one: at most [`MAX_ORIGINS`]
//! origins of up to [`MAX_ORIGIN_LEN`] bytes get one, first come first served, and they are
//! kept for the life of the process (a number in a head is never reused). A head whose origin
//! has none keeps its URL whole, as before: a client that sends a thousand made-up `Host`s
//! whose answers are stored costs the origins of later sites their 20 bytes an entry, and
//! this table at most [`MAX_ORIGINS`] × [`MAX_ORIGIN_LEN`] bytes.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

use parking_lot::Mutex;

/// Origins that get a number, at most.
pub const MAX_ORIGINS: usize = 1024;

/// The longest origin that gets a number, in bytes.
pub const MAX_ORIGIN_LEN: usize = 64;

/// The process's origins: every stored head's number is one of these.
pub(super) static ORIGINS: LazyLock<Origins<MAX_ORIGINS>> = LazyLock::new(Origins::new);

/// Up to `N` origins, each with its number (its place).
pub(super) struct Origins<const N: usize> {
    /// The number of each origin kept; taken when a head is stored (a fill, a copy from
    /// memcached), never on a hit.
    numbers: Mutex<HashMap<&'static str, u16>>,
    /// Each number's origin, read without a lock (a sweep reads one per entry).
    texts: [OnceLock<&'static str>; N],
}

impl<const N: usize> Origins<N> {
    const FITS: () = assert!(N <= 1 << 16, "a number is kept in 2 bytes");

    pub(super) fn new() -> Self {
        let () = Self::FITS;
        Origins {
            numbers: Mutex::new(HashMap::new()),
            texts: [const { OnceLock::new() }; N],
        }
    }

    /// The number of `origin`, given one if it has none yet and there is room for it; `None`
    /// if it is empty, longer than [`MAX_ORIGIN_LEN`], or `N` origins have one already.
    pub(super) fn number(&self, origin: &str) -> Option<u16> {
        if origin.is_empty() || origin.len() > MAX_ORIGIN_LEN {
            return None;
        }
        let mut numbers = self.numbers.lock();
        if let Some(&n) = numbers.get(origin) {
            return Some(n);
        }
        let n = numbers.len();
        let slot = self.texts.get(n)?;
        // kept for the life of the process, as its number is: at most N of them
        let text: &'static str = Box::leak(origin.into());
        slot.set(text).ok()?;
        let n = u16::try_from(n).ok()?;
        numbers.insert(text, n);
        Some(n)
    }

    /// The origin numbered `n` (`""` for a number never given, which no head holds).
    pub(super) fn text(&self, n: u16) -> &'static str {
        self.texts
            .get(usize::from(n))
            .and_then(OnceLock::get)
            .copied()
            .unwrap_or_default()
    }
}

/// `url` as its origin (`scheme://host`) and the rest (from the path's first `/`); `None` if
/// it has no `://` or no path.
pub fn split_origin(url: &str) -> Option<(&str, &str)> {
    let host_at = url.find("://")? + 3;
    let path_at = host_at + url.get(host_at..)?.find('/')?;
    Some(url.split_at(path_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_keeps_its_number_and_the_first_n_get_one() {
        let o = Origins::<3>::new();
        assert_eq!(o.number("http://a"), Some(0));
        assert_eq!(o.number("http://b"), Some(1));
        assert_eq!(o.number("http://a"), Some(0), "the same origin, the same number");
        assert_eq!(o.number("http://c"), Some(2));
        assert_eq!(o.number("http://d"), None, "no room: kept whole");
        assert_eq!(o.number("http://b"), Some(1), "those numbered keep theirs");
        assert_eq!(
            (o.text(0), o.text(1), o.text(2)),
            ("http://a", "http://b", "http://c")
        );
        assert_eq!(o.text(3), "", "a number never given");
        assert_eq!(o.text(u16::MAX), "");
    }

    #[test]
    fn an_empty_or_long_origin_gets_no_number() {
        let o = Origins::<4>::new();
        assert_eq!(o.number(""), None);
        let long = format!("http://{}", "h".repeat(MAX_ORIGIN_LEN - 7));
        assert_eq!(long.len(), MAX_ORIGIN_LEN);
        assert_eq!(o.number(&long), Some(0));
        assert_eq!(o.number(&format!("{long}h")), None);
        assert_eq!(o.number("http://next"), Some(1), "a refused one takes no number");
    }

    #[test]
    fn a_url_splits_at_its_path() {
        assert_eq!(split_origin("http://h:8/p?q"), Some(("http://h:8", "/p?q")));
        assert_eq!(split_origin("http://h/"), Some(("http://h", "/")));
        assert_eq!(split_origin("http://h/a/b"), Some(("http://h", "/a/b")));
        assert_eq!(split_origin("http://h"), None, "no path");
        assert_eq!(split_origin("http://h?q"), None, "no path");
        assert_eq!(split_origin("/p"), None, "no origin");
        assert_eq!(split_origin(""), None);
    }
}
