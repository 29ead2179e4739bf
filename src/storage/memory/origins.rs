//! The origins (`http://host`) that L1's URLs start with, each kept once for the process.
//!
//! Every entry keeps its URL (what bans match, what the admin API lists), and the origin is
//! most of it for a short path: `http://www.example.org` is 22 bytes, the same in every entry
//! of a site. A stored head keeps its origin's number here instead, in 2 bytes
//! ([`super::StoredHeader::url_parts`]), when the origin has one: at most [`MAX_ORIGINS`]
//! origins of up to [`MAX_ORIGIN_LEN`] bytes get one, first come first served, and they are
//! kept for the life of the process (a number in a head is never reused). A head whose origin
//! has none keeps its URL whole, as before. An origin is numbered when a fill of it begins
//! (whether or not the entry is kept), so a client that sends a thousand made-up `Host`s
//! (or ports) with cacheable answers costs the origins of later sites their 20 bytes an entry
//! until a restart; it is logged once, as a warning, when the table is full. The table takes
//! at most about 150 KiB: its texts (64 KiB), their slots (24 KiB) and the map to numbers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, OnceLock};

use parking_lot::RwLock;

/// Origins that get a number, at most.
pub const MAX_ORIGINS: usize = 1024;

/// The longest origin that gets a number, in bytes.
pub const MAX_ORIGIN_LEN: usize = 64;

/// The process's origins: every stored head's number is one of these.
pub(super) static ORIGINS: LazyLock<Origins<MAX_ORIGINS>> = LazyLock::new(Origins::new);

/// Up to `N` origins, each with its number (its place).
pub(super) struct Origins<const N: usize> {
    /// The number of each origin kept; read when a head is stored (a fill, a copy from
    /// memcached, a 304), never on a hit, and written when an origin gets its number.
    numbers: RwLock<HashMap<&'static str, u16>>,
    /// Whether the `N` numbers are taken: an origin without one then costs no write lock.
    full: AtomicBool,
    /// Each number's origin, read without a lock (a sweep reads one per entry).
    texts: [OnceLock<&'static str>; N],
}

impl<const N: usize> Origins<N> {
    /// (`u16::MAX` is no number: [`Self::text`] of it is `""`.)
    const FITS: () = assert!(N < 1 << 16, "a number is kept in 2 bytes");

    pub(super) fn new() -> Self {
        let () = Self::FITS;
        Origins {
            numbers: RwLock::new(HashMap::new()),
            full: AtomicBool::new(false),
            texts: [const { OnceLock::new() }; N],
        }
    }

    /// The number of `origin`, given one if it has none yet and there is room for it; `None`
    /// if it is empty, longer than [`MAX_ORIGIN_LEN`], or `N` origins have one already.
    pub(super) fn number(&self, origin: &str) -> Option<u16> {
        if origin.is_empty() || origin.len() > MAX_ORIGIN_LEN {
            return None;
        }
        if let Some(&n) = self.numbers.read().get(origin) {
            return Some(n);
        }
        if self.full.load(Ordering::Relaxed) {
            return None;
        }
        let mut numbers = self.numbers.write();
        if let Some(&n) = numbers.get(origin) {
            return Some(n);
        }
        let n = numbers.len();
        let Some(slot) = self.texts.get(n) else {
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    origins = N,
                    refused = origin,
                    "the table of URL origins is full: entries of origins not in it keep their \
                     URL whole (about 20 bytes more each) until a restart"
                );
            }
            return None;
        };
        // kept for the life of the process, as its number is: at most N of them
        let text: &'static str = Box::leak(origin.into());
        slot.set(text).ok()?;
        let n = u16::try_from(n).ok()?;
        numbers.insert(text, n);
        Some(n)
    }

    /// How many origins have a number (`N` once the table is full).
    pub(super) fn len(&self) -> usize {
        self.numbers.read().len()
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

/// How many origins have a number in the process's table (at most [`MAX_ORIGINS`]; once they
/// all do, entries of any other origin keep their URL whole): `corral_l1_origins`.
pub fn numbered() -> usize {
    ORIGINS.len()
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
        assert!(
            o.full.load(Ordering::Relaxed),
            "refused once: no write lock after"
        );
    }

    /// Origins numbered from several threads at once: each gets one number, the same in every
    /// thread, and no two get the same.
    #[test]
    fn origins_numbered_at_once_get_one_number_each() {
        let o = Origins::<64>::new();
        let seen: Vec<Vec<u16>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let o = &o;
                    s.spawn(move || {
                        (0..48)
                            .map(|i| {
                                // each thread in its own order
                                let i = (i * 7 + t * 13) % 48;
                                (i, o.number(&format!("http://h{i}")).expect("room"))
                            })
                            .fold(vec![0; 48], |mut v, (i, n)| {
                                v[i] = n;
                                v
                            })
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("no panic")).collect()
        });
        assert!(seen.iter().all(|v| v == &seen[0]), "one number per origin");
        let mut numbers = seen[0].clone();
        numbers.sort_unstable();
        assert_eq!(numbers, (0..48).collect::<Vec<u16>>(), "no number given twice");
        for (i, &n) in seen[0].iter().enumerate() {
            assert_eq!(o.text(n), format!("http://h{i}"));
        }
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
