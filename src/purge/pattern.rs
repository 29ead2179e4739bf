//! The patterns of bans and tag bans: regular expressions, matched without a regex engine when
//! they are plain text.
//!
//! A compiled [`Regex`] costs kilobytes (its program, and a matching cache per thread that
//! uses it): kept for every ban until it expires (a day with memcached), that was ~30 KB a
//! record (issue 8). Most patterns real clients send are plain text with anchors (`^/news/`,
//! `^www\.example\.org$`, a path `regex::escape`d by a CMS): those are matched as a prefix, a
//! suffix, a substring or an equality, for the bytes of the text. The rest are compiled once
//! per distinct text and shared by every record that carries it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;
use regex::{Regex, RegexBuilder};

/// A purge pattern: what was sent (`as_str`), and how it is matched.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: Arc<str>,
    how: How,
}

#[derive(Debug, Clone)]
enum How {
    /// Plain text: the literal, and whether it is anchored at the start (`^`) and end (`$`).
    Literal {
        literal: Box<str>,
        start: bool,
        end: bool,
    },
    Regex(Arc<Regex>),
}

/// Compiled regexes by their text, so that records of the same pattern share one.
static COMPILED: LazyLock<Mutex<HashMap<Box<str>, Weak<Regex>>>> = LazyLock::new(Default::default);

/// Regex memory limits: a purge pattern is short, and a larger program is refused.
const SIZE_LIMIT: usize = 1 << 20;
/// The lazy DFA's cache per thread; small patterns need little, and it is kept per regex.
const DFA_SIZE_LIMIT: usize = 64 << 10;

impl Pattern {
    /// Parse `pattern` (a regular expression, `regex` crate syntax). Errors are the regex
    /// crate's, for the 400 answer.
    pub fn new(pattern: &str) -> Result<Pattern, regex::Error> {
        let how = match literal(pattern) {
            Some((literal, start, end)) => How::Literal {
                literal: literal.into_boxed_str(),
                start,
                end,
            },
            None => How::Regex(compiled(pattern)?),
        };
        Ok(Pattern {
            text: Arc::from(pattern),
            how,
        })
    }

    /// The pattern as sent.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_match(&self, haystack: &str) -> bool {
        match &self.how {
            How::Literal { literal, start, end } => match (start, end) {
                (true, true) => haystack == &**literal,
                (true, false) => haystack.starts_with(&**literal),
                (false, true) => haystack.ends_with(&**literal),
                (false, false) => haystack.contains(&**literal),
            },
            How::Regex(re) => re.is_match(haystack),
        }
    }

    /// Heap bytes this pattern holds of its own (a shared regex is counted by each holder: an
    /// upper bound, for `corral_purge_record_bytes`).
    pub fn heap_bytes(&self) -> usize {
        let own = self.text.len() + 16;
        match &self.how {
            How::Literal { literal, .. } => own + literal.len(),
            // the program and one matching cache per worker thread, as measured for short
            // patterns (benches/purge_soak.sh)
            How::Regex(_) => own + REGEX_BYTES,
        }
    }

    /// Is it matched without the regex engine?
    pub fn is_literal(&self) -> bool {
        matches!(self.how, How::Literal { .. })
    }
}

/// What a compiled short pattern costs, program and caches (measured: see `heap_bytes`).
const REGEX_BYTES: usize = 8 << 10;

/// The plain text `pattern` matches, with its anchors, if it is plain text: no metacharacter
/// but a leading `^` and a trailing `$`, and no escape but of ASCII punctuation (`\.`, `\/`).
fn literal(pattern: &str) -> Option<(String, bool, bool)> {
    let (start, rest) = match pattern.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let mut out = String::with_capacity(rest.len());
    let mut end = false;
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if e.is_ascii_punctuation() => out.push(e),
                // \d, \b, \n...: a class or an assertion
                _ => return None,
            },
            '$' if chars.peek().is_none() => end = true,
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' | '#' => return None,
            c if c.is_whitespace() => return None,
            c => out.push(c),
        }
    }
    Some((out, start, end))
}

/// The compiled regex of `pattern`, shared with every live record that has the same text.
fn compiled(pattern: &str) -> Result<Arc<Regex>, regex::Error> {
    let mut table = COMPILED.lock();
    if let Some(re) = table.get(pattern).and_then(Weak::upgrade) {
        return Ok(re);
    }
    let re = Arc::new(
        RegexBuilder::new(pattern)
            .size_limit(SIZE_LIMIT)
            .dfa_size_limit(DFA_SIZE_LIMIT)
            .build()?,
    );
    if table.len() >= 1024 && table.len().is_power_of_two() {
        // forget the regexes no record holds any more (amortised: at each doubling)
        table.retain(|_, weak| weak.strong_count() > 0);
    }
    table.insert(pattern.into(), Arc::downgrade(&re));
    Ok(re)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The literal fast path agrees with the regex engine on every case it takes.
    #[test]
    fn literal_patterns_match_as_the_regex_would() {
        let haystacks = [
            "/news/a",
            "/news",
            "/a/news/",
            "www.example.org",
            "wwwxexample.org",
            "",
            "/x$",
            "a.b",
        ];
        for p in [
            "^/news/",
            "^/news$",
            "/news/",
            "news/$",
            "^www\\.example\\.org$",
            "^/x\\$",
            "^$",
            "",
            "^/a/news/$",
            "a\\.b",
        ] {
            let pattern = Pattern::new(p).unwrap();
            assert!(pattern.is_literal(), "{p}");
            let re = Regex::new(p).unwrap();
            for h in haystacks {
                assert_eq!(pattern.is_match(h), re.is_match(h), "{p} on {h:?}");
            }
        }
    }

    #[test]
    fn regex_patterns_use_the_engine_and_share_it() {
        for p in [
            "^/news/.*",
            "(^|,)tag(,|$)",
            "a|b",
            "\\d+",
            "^/x(",
            "[abc]",
            "a b",
        ] {
            match Pattern::new(p) {
                Ok(pattern) => assert!(!pattern.is_literal(), "{p}"),
                Err(_) => assert_eq!(p, "^/x(", "only the broken one fails"),
            }
        }
        let a = Pattern::new("(^|,)shared(,|$)").unwrap();
        let b = Pattern::new("(^|,)shared(,|$)").unwrap();
        match (&a.how, &b.how) {
            (How::Regex(x), How::Regex(y)) => assert!(Arc::ptr_eq(x, y)),
            _ => panic!("regexes expected"),
        }
        assert!(a.is_match("x,shared") && !a.is_match("unshared"));
    }
}
