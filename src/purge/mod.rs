//! Purges: every request shape real clients send, parsed into one [`Purge`] value.
//!
//! | client | request | parsed as |
//! |---|---|---|
//! | Varnish style, Plone, WordPress, Drupal (URLs), FOSHttpCache | `PURGE /path?q` | [`Target::Url`]: every Vary variant of that URL |
//! | WordPress Proxy Cache Purge (full purge) | `PURGE /.*` + `X-Purge-Method: regex` | [`Target::Ban`] on the path |
//! | FOSHttpCache (Varnish) | `BAN /` + `X-Host`, `X-Url`, `X-Content-Type` regexes | [`Target::Ban`] |
//! | FOSHttpCache (Varnish tags) | `BAN /` + `X-Cache-Tags: (^|,)(a|b)(,|$)` | [`Target::TagPattern`] on `X-Cache-Tags` |
//! | FOSHttpCache xkey | `PURGEKEYS /` + `xkey-softpurge: a b` (soft) or `xkey-purge: a b` | [`Target::Tags`] |
//! | FOSHttpCache Symfony | `PURGETAGS /` + `X-Cache-Tags: a,b` | [`Target::Tags`] |
//! | Fastly style | `PURGE /` + `Surrogate-Key: a b` | [`Target::Tags`] |
//! | Drupal varnish_purger | `BAN /` + `Cache-Tags: a\|b` | [`Target::TagPattern`] on `Cache-Tags` |
//! | Drupal (image styles) | `URIBAN /path-regex` | [`Target::Ban`] on the path |
//! | Magento 2 | `PURGE /` + `X-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))` | [`Target::TagPattern`] on `X-Magento-Tags` |
//! | Magento 2 deploys (capistrano-magento2) | `PURGE /` + `X-Pool: regex` | [`Target::TagPattern`] on `X-Pool` |
//! | Plone collective.purgebyid | `PURGE /@@purgebyid/<uuid>` | [`Target::Tags`], matched against `X-Ids-Involved: #uuid#` |
//!
//! `Soft-Purge: 1` or `Fastly-Soft-Purge: 1` on any of them (and `xkey-softpurge`) makes it
//! soft: matching entries become stale instead of gone, so the next request is served the stale
//! copy (within grace) while one request revalidates.
//!
//! # Validity by timestamps, not scans
//! A purge of one URL removes it from L1 and L2 at once. Every purge (but purge-all) is also a
//! record with the time it was accepted ([`Validity`]); a hit is checked against the records
//! newer than the entry's last validation, so accepting a ban is O(1) whatever the cache holds.
//!
//! # Bounded state
//! - Each entry remembers up to which record it was checked (by a hit or by the sweeper), so
//!   a hit pays for a ban at most once.
//! - The sweeper ([`sweep::Sweeper`], Varnish's "ban lurker") checks every
//!   L1 entry against new records in the background: hard matches are removed (memory freed
//!   without waiting for a request), soft matches marked stale.
//! - A record is dropped ([`Validity::expire`]) once no entry it could match can turn up
//!   unchecked: the sweeper checked every L1 entry past it, no fill older than it is in
//!   progress, and (for records that concern memcached) it is older than
//!   `memcached.max_ttl`, the longest any value lives there.
//! - Tag data is only the purged tags (in records); the tags an entry carries stay in its
//!   stored headers, so they are bounded by what is cached.
//! - If purges arrive faster than they expire, [`MAX_RECORDS`] of a kind is a hard cap: the
//!   oldest half folds into one "everything validated before T" record, which
//!   over-invalidates a little and never grows.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::HeaderName;

/// The longest regex a purge may carry (FOSHttpCache splits its tag bans at 7,500 bytes).
pub const MAX_PATTERN_BYTES: usize = 16 * 1024;

/// Bans, tag patterns or purged tags kept before the oldest are folded into one record.
pub const MAX_RECORDS: usize = 10_000;

/// This process's id among the corrals of a namespace: random, chosen at start.
pub fn corral_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(random)
}

/// A random non-zero number (the standard library's per-process random hash keys).
pub fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish().max(1)
}

/// What a purge invalidates.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every Vary variant of one URL.
    Url { host: String, path: String },
    /// Every entry whose host, path and content type match (absent = any).
    Ban(Ban),
    /// Every entry carrying one of these tags (surrogate keys).
    Tags(Vec<String>),
    /// Every entry with a named response header whose value matches that header's pattern
    /// (Varnish-style tag bans; Magento may send two at once: `X-Magento-Tags` and `X-Pool`).
    TagPattern { patterns: Vec<(HeaderName, Pattern)> },
    /// Everything.
    All,
}

/// Patterns of a ban; `None` matches anything. On the wire (a batch, memcached's log) it is
/// [`BanText`], compiled on the way in.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "BanText", into = "BanText")]
pub struct Ban {
    pub host: Option<Pattern>,
    pub url: Option<Pattern>,
    pub content_type: Option<Pattern>,
}

/// A ban as clients and memcached's log carry it: the patterns as text.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanText {
    pub host: Option<String>,
    pub url: Option<String>,
    pub content_type: Option<String>,
}

impl TryFrom<BanText> for Ban {
    type Error = PurgeError;

    /// Compile each pattern; the error names the field.
    fn try_from(text: BanText) -> Result<Ban, PurgeError> {
        let field = |name: &str, v: Option<String>| v.as_deref().map(|p| regex(name, p)).transpose();
        let url = field("url", text.url)?;
        let host = field("host", text.host)?;
        let content_type = field("content_type", text.content_type)?;
        Ok(Ban {
            host,
            url,
            content_type,
        })
    }
}

impl From<Ban> for BanText {
    fn from(ban: Ban) -> BanText {
        let text = |p: Option<Pattern>| p.map(|p| p.as_str().to_string());
        BanText {
            host: text(ban.host),
            url: text(ban.url),
            content_type: text(ban.content_type),
        }
    }
}

impl Ban {
    /// The same patterns?
    fn same(&self, other: &Ban) -> bool {
        let text = |p: &Option<Pattern>| p.as_ref().map(Pattern::as_str).map(str::to_owned);
        let text = |b: &Ban| (text(&b.host), text(&b.url), text(&b.content_type));
        text(self) == text(other)
    }

    fn heap_bytes(&self) -> usize {
        [&self.host, &self.url, &self.content_type]
            .into_iter()
            .flatten()
            .map(Pattern::heap_bytes)
            .sum()
    }

    pub fn matches(&self, host: &str, path: &str, content_type: &str) -> bool {
        self.host.as_ref().is_none_or(|r| r.is_match(host))
            && self.url.as_ref().is_none_or(|r| r.is_match(path))
            && self
                .content_type
                .as_ref()
                .is_none_or(|r| r.is_match(content_type))
    }
}

/// One purge, from any client shape. It is plain data, so it can be logged, counted, and later
/// sent to peers.
#[derive(Debug, Clone)]
pub struct Purge {
    pub target: Target,
    pub soft: bool,
}

impl Purge {
    /// What it targets, for the log: `www.example.org/path`, `url~^/news/ host~...`, the tags,
    /// `x-magento-tags~pattern`, `*`; at most 200 characters.
    pub fn target_text(&self) -> String {
        let mut s = match &self.target {
            Target::Url { host, path } => format!("{host}{path}"),
            Target::Ban(b) => [
                ("host", &b.host),
                ("url", &b.url),
                ("content-type", &b.content_type),
            ]
            .iter()
            .filter_map(|(name, re)| re.as_ref().map(|re| format!("{name}~{}", re.as_str())))
            .collect::<Vec<_>>()
            .join(" "),
            Target::Tags(tags) => tags.join(" "),
            Target::TagPattern { patterns } => patterns
                .iter()
                .map(|(header, pattern)| format!("{header}~{}", pattern.as_str()))
                .collect::<Vec<_>>()
                .join(" "),
            Target::All => "*".to_string(),
        };
        if s.len() > 200 {
            let mut cut = 200;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push('…');
        }
        s
    }

    /// Label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Url { .. } => "url",
            Target::Ban(_) => "ban",
            Target::Tags(_) => "tags",
            Target::TagPattern { .. } => "tag-pattern",
            Target::All => "all",
        }
    }
}

/// Why a purge request was refused (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PurgeError {
    #[error("{header}: invalid regex: {reason}")]
    BadPattern { header: String, reason: String },
    #[error("{0}: longer than {MAX_PATTERN_BYTES} bytes")]
    TooLong(String),
    #[error("{0}")]
    Missing(&'static str),
    #[error("{0}: not valid UTF-8")]
    NotText(String),
}

mod access;
mod batch;
pub mod log;
mod parse;
mod pattern;
pub mod sweep;
mod validity;

pub use access::{in_networks, Access};
pub use batch::Batch;
pub use log::{LogRecord, LogWhat};
use parse::regex;
pub(crate) use parse::split_tags;
pub use parse::{is_purge_method, parse};
pub use pattern::Pattern;
pub(crate) use validity::{from_millis, millis};
pub use validity::{has_tag_header, is_tag, now_stamp, set_clock_offset, Validity, Verdict, TAG_HEADERS};

#[cfg(test)]
mod tests;
