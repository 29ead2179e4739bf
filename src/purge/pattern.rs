//! The patterns of bans and tag bans: regular expressions, matched without a regex engine when
//! they are plain text.
//!
//! A compiled [`Regex`] costs kilobytes (its program, and a matching cache per thread that
//! uses it: 26 KB for `(^|,)node-1(,|$)` matched on three threads): kept for every ban until
//! it expires (a day with memcached), that was ~30 KB a record (issue 8). Most patterns real
//! clients send have one of a few shapes, matched here without a regex engine, for the same
//! result:
//!
//! | shape | sent by | matched as |
//! |---|---|---|
//! | plain text with `^` / `$` anchors (`^/news/`, `^www\.example\.org$`, an escaped path) | FOSHttpCache, Varnish users, URIBAN | a prefix, suffix, substring or equality |
//! | `a\|b\|c` of plain texts | Drupal's varnish purger (`Cache-Tags`) | a substring, any of them |
//! | `(^\|,)(a\|b)(,\|$)`, `(^\|,)a(,\|$)` | FOSHttpCache tag bans | one of the `,`-separated items equals one of them |
//! | `((^\|,)a(,\|$))\|((^\|,)b(,\|$))` | Magento 2 | the same |
//!
//! Any other pattern is compiled once per distinct text and shared by every record that
//! carries it.

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
    /// Several plain texts, any of which may occur anywhere (`a|b`).
    AnyOf(Box<[Box<str>]>),
    /// One of the `,`-separated items of the value equals one of these.
    ListItem(Box<[Box<str>]>),
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
        let how = if let Some((literal, start, end)) = literal(pattern) {
            How::Literal {
                literal: literal.into_boxed_str(),
                start,
                end,
            }
        } else if let Some(items) = list_items(pattern) {
            How::ListItem(items)
        } else if let Some(texts) = any_of(pattern) {
            How::AnyOf(texts)
        } else {
            How::Regex(compiled(pattern)?)
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
            How::AnyOf(texts) => texts.iter().any(|t| haystack.contains(&**t)),
            How::ListItem(items) => haystack.split(',').any(|item| items.iter().any(|i| **i == *item)),
            How::Regex(re) => re.is_match(haystack),
        }
    }

    /// Heap bytes this pattern holds of its own (a shared regex is counted by each holder: an
    /// upper bound, for `corral_purge_record_bytes`).
    pub fn heap_bytes(&self) -> usize {
        let own = self.text.len() + 16;
        match &self.how {
            How::Literal { literal, .. } => own + literal.len(),
            How::AnyOf(texts) | How::ListItem(texts) => {
                own + texts.iter().map(|t| t.len() + 16).sum::<usize>()
            }
            How::Regex(_) => own + REGEX_BYTES,
        }
    }

    /// Is it matched without the regex engine?
    pub fn is_literal(&self) -> bool {
        !matches!(self.how, How::Regex(_))
    }
}

/// What a compiled short pattern costs, program and matching caches (measured: 26 KB for
/// `(^|,)node-1(,|$)` after matching on three threads).
const REGEX_BYTES: usize = 26 << 10;

/// The texts of `a|b|c` where each is plain text without anchors.
fn any_of(pattern: &str) -> Option<Box<[Box<str>]>> {
    let texts = split_top(pattern, '|')?
        .into_iter()
        .map(|branch| match literal(branch) {
            Some((text, false, false)) if !text.is_empty() => Some(text.into_boxed_str()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    (texts.len() > 1).then(|| texts.into_boxed_slice())
}

/// The items of FOSHttpCache's `(^|,)(a|b)(,|$)` / `(^|,)a(,|$)` and of Magento's
/// `((^|,)a(,|$))|((^|,)b(,|$))`: plain texts without `,`.
fn list_items(pattern: &str) -> Option<Box<[Box<str>]>> {
    const OPEN: &str = "(^|,)";
    const CLOSE: &str = "(,|$)";
    let one = |p: &str| -> Option<Vec<Box<str>>> {
        let inner = p.strip_prefix(OPEN)?.strip_suffix(CLOSE)?;
        // alternatives only inside one group: `(^|,)a|b(,|$)` is `(^|,)a` or `b(,|$)`
        let alternatives = match inner.strip_prefix('(').and_then(|i| i.strip_suffix(')')) {
            Some(group) if split_top(inner, '|')?.len() == 1 => split_top(group, '|')?,
            _ => vec![inner],
        };
        alternatives
            .into_iter()
            .map(|t| match literal(t) {
                Some((text, false, false)) if !text.is_empty() && !text.contains(',') => {
                    Some(text.into_boxed_str())
                }
                _ => None,
            })
            .collect()
    };
    let items = match one(pattern) {
        Some(items) => items,
        // Magento: each branch in parentheses
        None => split_top(pattern, '|')?
            .into_iter()
            .map(|b| one(b.strip_prefix('(')?.strip_suffix(')')?))
            .collect::<Option<Vec<_>>>()?
            .concat(),
    };
    (!items.is_empty()).then(|| items.into_boxed_slice())
}

/// `pattern` split at `sep` outside parentheses and escapes; `None` if the parentheses do not
/// balance.
fn split_top(pattern: &str, sep: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut depth, mut from, mut escaped) = (0usize, 0, false);
    for (i, c) in pattern.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1)?,
            c if c == sep && depth == 0 => {
                parts.push(&pattern[from..i]);
                from = i + c.len_utf8();
            }
            _ => {}
        }
    }
    (depth == 0 && !escaped).then(|| {
        parts.push(&pattern[from..]);
        parts
    })
}

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
                // `\<` and `\>` are word boundaries
                Some(e) if e.is_ascii_punctuation() && e != '<' && e != '>' => out.push(e),
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

    /// The tag-ban shapes of FOSHttpCache, Magento and Drupal agree with the regex engine.
    #[test]
    fn tag_ban_shapes_match_as_the_regex_would() {
        let haystacks = [
            "a",
            "b",
            "a,b",
            "x,a",
            "x, a",
            "ab",
            "xb",
            "b,y",
            "x",
            "xa,y",
            "node-1",
            "node-12",
            "node-1,node-2",
            "",
            ",",
            "cat_p_1,cat_p_22",
            "cat_p_2",
            "node:1 node:2",
            "node:12",
        ];
        for p in [
            "(^|,)(a|b)(,|$)",
            "(^|,)a(,|$)",
            "(^|,)node-1(,|$)",
            "((^|,)cat_p_1(,|$))|((^|,)cat_p_2(,|$))",
            "node:1|node:2",
            "a|b",
            "(^|,)(node\\-1|a)(,|$)",
        ] {
            let pattern = Pattern::new(p).unwrap();
            assert!(pattern.is_literal(), "{p} takes the engine");
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
            "\\<word\\>",
            "(^|,)a|b(,|$)",
            "((^|,)a|b(,|$))|((^|,)x(,|$))",
            "(^|\\s)tag(\\s|$)",
            "a|b.c",
            "\\d+",
            "^/x(",
            "[abc]",
            "a b",
            "(^|,)a,b(,|$)",
            "(a|b)",
        ] {
            match Pattern::new(p) {
                Ok(pattern) => assert!(!pattern.is_literal(), "{p}"),
                Err(_) => assert_eq!(p, "^/x(", "only the broken one fails"),
            }
        }
        let a = Pattern::new("(^|\\s)shared(\\s|$)").unwrap();
        let b = Pattern::new("(^|\\s)shared(\\s|$)").unwrap();
        match (&a.how, &b.how) {
            (How::Regex(x), How::Regex(y)) => assert!(Arc::ptr_eq(x, y)),
            _ => panic!("regexes expected"),
        }
        assert!(a.is_match("x shared") && !a.is_match("unshared"));
    }
}
