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
//! - The sweeper ([`crate::storage::Tiered::sweep_once`], Varnish's "ban lurker") checks every
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

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use http::header::HeaderName;
use http::Method;
use ipnet::IpNet;
use parking_lot::RwLock;
use pingora_cache::{CacheMeta, ForcedFreshness};
use pingora_http::RequestHeader;
use subtle::ConstantTimeEq;

/// The longest regex a purge may carry (FOSHttpCache splits its tag bans at 7,500 bytes).
pub const MAX_PATTERN_BYTES: usize = 16 * 1024;

/// Bans, tag patterns or purged tags kept before the oldest are folded into one record.
pub const MAX_RECORDS: usize = 10_000;

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

/// Patterns of a ban; `None` matches anything.
#[derive(Debug, Clone)]
pub struct Ban {
    pub host: Option<Pattern>,
    pub url: Option<Pattern>,
    pub content_type: Option<Pattern>,
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

/// Is this a purge method corral answers itself?
pub fn is_purge_method(method: &Method) -> bool {
    matches!(
        method.as_str(),
        "PURGE" | "BAN" | "PURGEKEYS" | "PURGETAGS" | "URIBAN"
    )
}

fn header<'a>(req: &'a RequestHeader, name: &str) -> Result<Option<&'a str>, PurgeError> {
    match req.headers.get(name) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| PurgeError::NotText(name.to_string()))?
                .trim();
            if s.len() > MAX_PATTERN_BYTES {
                return Err(PurgeError::TooLong(name.to_string()));
            }
            Ok(Some(s))
        }
    }
}

fn regex(name: &str, pattern: &str) -> Result<Pattern, PurgeError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(PurgeError::TooLong(name.to_string()));
    }
    Pattern::new(pattern).map_err(|e| PurgeError::BadPattern {
        header: name.to_string(),
        reason: e.to_string().lines().last().unwrap_or("").trim().to_string(),
    })
}

fn split_tags(value: &str, sep: char) -> Vec<String> {
    let mut tags: Vec<String> = value
        .split(|c: char| c == sep || (sep == ' ' && c.is_whitespace()))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    tags
}

fn soft_flag(req: &RequestHeader) -> bool {
    ["soft-purge", "fastly-soft-purge"]
        .iter()
        .any(|h| req.headers.get(*h).is_some_and(|v| v.as_bytes() == b"1"))
}

/// Parse a purge request. `host` is the site it applies to (after `host_map`), `path` the
/// request target's path and query. Fails with a reason on a malformed request; nothing is
/// purged then.
pub fn parse(req: &RequestHeader, host: &str, path: &str) -> Result<Purge, PurgeError> {
    let soft = soft_flag(req);
    let method = req.method.as_str();
    let exact_host = format!("^{}$", regex::escape(host));
    let tags = |v: &str, sep: char, soft: bool| -> Result<Purge, PurgeError> {
        let tags = split_tags(v, sep);
        if tags.is_empty() {
            return Err(PurgeError::Missing("no tag given"));
        }
        Ok(Purge {
            target: Target::Tags(tags),
            soft,
        })
    };
    let pattern = |header_name: &str, against: &'static str, v: &str| -> Result<Purge, PurgeError> {
        Ok(Purge {
            target: Target::TagPattern {
                patterns: vec![(HeaderName::from_static(against), regex(header_name, v)?)],
            },
            soft,
        })
    };
    match method {
        "PURGEKEYS" | "PURGE"
            if header(req, "xkey-softpurge")?.is_some() || header(req, "xkey-purge")?.is_some() =>
        {
            if let Some(v) = header(req, "xkey-softpurge")? {
                return tags(v, ' ', true);
            }
            tags(header(req, "xkey-purge")?.unwrap_or(""), ' ', soft)
        }
        "PURGEKEYS" => Err(PurgeError::Missing(
            "PURGEKEYS needs xkey-purge or xkey-softpurge",
        )),
        "PURGETAGS" => match header(req, "x-cache-tags")? {
            Some(v) => tags(v, ',', soft),
            None => Err(PurgeError::Missing("PURGETAGS needs X-Cache-Tags")),
        },
        "PURGE" => {
            if let Some(v) = header(req, "surrogate-key")? {
                return tags(v, ' ', soft);
            }
            // Magento's VCL bans on either header, or on both at once
            let mut magento = Vec::new();
            if let Some(v) = header(req, "x-magento-tags-pattern")? {
                magento.push((
                    HeaderName::from_static("x-magento-tags"),
                    regex("X-Magento-Tags-Pattern", v)?,
                ));
            }
            if let Some(v) = header(req, "x-pool")? {
                magento.push((HeaderName::from_static("x-pool"), regex("X-Pool", v)?));
            }
            if !magento.is_empty() {
                return Ok(Purge {
                    target: Target::TagPattern { patterns: magento },
                    soft,
                });
            }
            // collective.purgebyid (Plone): PURGE /@@purgebyid/<uuid>, against X-Ids-Involved
            if let Some((_, id)) = path.split('?').next().unwrap_or("").rsplit_once("/@@purgebyid/") {
                return tags(id, '#', soft);
            }
            if header(req, "x-purge-method")?.is_some_and(|m| m.eq_ignore_ascii_case("regex")) {
                let path_only = path.split('?').next().unwrap_or(path);
                return Ok(Purge {
                    target: Target::Ban(Ban {
                        host: Some(regex("Host", &exact_host)?),
                        url: Some(regex("path", path_only)?),
                        content_type: None,
                    }),
                    soft,
                });
            }
            Ok(Purge {
                target: Target::Url {
                    host: host.to_string(),
                    path: path.to_string(),
                },
                soft,
            })
        }
        "BAN" => {
            if let Some(v) = header(req, "cache-tags")? {
                return pattern("Cache-Tags", "cache-tags", v);
            }
            if let Some(v) = header(req, "x-cache-tags")? {
                return pattern("X-Cache-Tags", "x-cache-tags", v);
            }
            let opt = |name: &str| -> Result<Option<Pattern>, PurgeError> {
                header(req, name)?.map(|v| regex(name, v)).transpose()
            };
            let ban = Ban {
                host: opt("x-host")?,
                url: opt("x-url")?,
                content_type: opt("x-content-type")?,
            };
            if ban.host.is_none() && ban.url.is_none() && ban.content_type.is_none() {
                return Err(PurgeError::Missing(
                    "BAN needs X-Host, X-Url, X-Content-Type or a tag header",
                ));
            }
            Ok(Purge {
                target: Target::Ban(ban),
                soft,
            })
        }
        "URIBAN" => {
            let path_only = path.split('?').next().unwrap_or(path);
            Ok(Purge {
                target: Target::Ban(Ban {
                    host: Some(regex("Host", &exact_host)?),
                    url: Some(regex("path", path_only)?),
                    content_type: None,
                }),
                soft,
            })
        }
        _ => Err(PurgeError::Missing("not a purge method")),
    }
}

/// `POST /purge` on the admin listener: a batch, validated whole before anything is applied.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub bans: Vec<BatchBan>,
    #[serde(default)]
    pub soft: bool,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBan {
    pub url: Option<String>,
    pub host: Option<String>,
    pub content_type: Option<String>,
}

impl Batch {
    /// Parse and validate a batch body into purges, duplicates removed. The error names the
    /// offending entry (`urls[2]: ...`); nothing is applied then.
    pub fn parse(body: &[u8]) -> Result<Vec<Purge>, String> {
        let batch: Batch = serde_json::from_slice(body).map_err(|e| format!("invalid batch: {e}"))?;
        let soft = batch.soft;
        let mut out = Vec::new();
        let mut seen_urls = std::collections::BTreeSet::new();
        for (i, url) in batch.urls.iter().enumerate() {
            let uri: http::Uri = url.parse().map_err(|e| format!("urls[{i}]: {url:?}: {e}"))?;
            let (Some(host), Some(pq)) = (uri.authority(), uri.path_and_query()) else {
                return Err(format!(
                    "urls[{i}]: {url:?}: needs a scheme and host, like http://www.example.org/path"
                ));
            };
            let host = crate::key::normalize_host(host.as_str());
            if seen_urls.insert((host.clone(), pq.as_str().to_string())) {
                out.push(Purge {
                    target: Target::Url {
                        host,
                        path: pq.as_str().to_string(),
                    },
                    soft,
                });
            }
        }
        let mut tags: Vec<String> = Vec::new();
        for (i, t) in batch.tags.iter().enumerate() {
            let t = t.trim();
            if t.is_empty() || t.contains(char::is_whitespace) || t.contains(',') {
                return Err(format!("tags[{i}]: {t:?} is not a single tag"));
            }
            tags.push(t.to_string());
        }
        tags.sort_unstable();
        tags.dedup();
        if !tags.is_empty() {
            out.push(Purge {
                target: Target::Tags(tags),
                soft,
            });
        }
        for (i, b) in batch.bans.iter().enumerate() {
            let field = |name: &str, v: &Option<String>| -> Result<Option<Pattern>, String> {
                v.as_deref()
                    .map(|p| regex(name, p))
                    .transpose()
                    .map_err(|e| format!("bans[{i}].{e}"))
            };
            let ban = Ban {
                url: field("url", &b.url)?,
                host: field("host", &b.host)?,
                content_type: field("content_type", &b.content_type)?,
            };
            if ban.url.is_none() && ban.host.is_none() && ban.content_type.is_none() {
                return Err(format!("bans[{i}]: needs url, host or content_type"));
            }
            out.push(Purge {
                target: Target::Ban(ban),
                soft,
            });
        }
        Ok(out)
    }
}

/// A ban or tag purge as kept in memcached's purge log, so that every corral sharing the
/// namespace applies it to what it reads from L2 (JSON: small, versionable, readable).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LogRecord {
    pub at_ms: u64,
    pub soft: bool,
    pub what: LogWhat,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LogWhat {
    Ban {
        host: Option<String>,
        url: Option<String>,
        content_type: Option<String>,
    },
    Tags {
        tags: Vec<String>,
    },
    TagPattern {
        header: String,
        pattern: String,
    },
    /// More than one pattern (a corral that does not know this kind covers it by its floor).
    TagPatterns {
        patterns: Vec<(String, String)>,
    },
    Url {
        host: String,
        path: String,
    },
}

impl LogRecord {
    /// The log record of a purge accepted `at`; `None` for purge-all, which reaches every
    /// corral through the namespace generation.
    pub fn of(purge: &Purge, at: SystemTime) -> Option<LogRecord> {
        let s = |r: &Option<Pattern>| r.as_ref().map(|r| r.as_str().to_string());
        let what = match &purge.target {
            Target::Ban(b) => LogWhat::Ban {
                host: s(&b.host),
                url: s(&b.url),
                content_type: s(&b.content_type),
            },
            Target::Tags(tags) => LogWhat::Tags { tags: tags.clone() },
            Target::TagPattern { patterns } => match patterns.as_slice() {
                [(header, pattern)] => LogWhat::TagPattern {
                    header: header.as_str().to_string(),
                    pattern: pattern.as_str().to_string(),
                },
                many => LogWhat::TagPatterns {
                    patterns: many
                        .iter()
                        .map(|(h, p)| (h.as_str().to_string(), p.as_str().to_string()))
                        .collect(),
                },
            },
            Target::Url { host, path } => LogWhat::Url {
                host: host.clone(),
                path: path.clone(),
            },
            Target::All => return None,
        };
        Some(LogRecord {
            at_ms: millis(at),
            soft: purge.soft,
            what,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode a record and rebuild its purge; `None` if it does not decode.
    pub fn decode(bytes: &[u8]) -> Option<(Purge, SystemTime)> {
        let rec: LogRecord = serde_json::from_slice(bytes).ok()?;
        let re = |name: &str, p: &Option<String>| -> Option<Option<Pattern>> {
            match p {
                None => Some(None),
                Some(p) => regex(name, p).ok().map(Some),
            }
        };
        let target = match rec.what {
            LogWhat::Ban {
                host,
                url,
                content_type,
            } => Target::Ban(Ban {
                host: re("host", &host)?,
                url: re("url", &url)?,
                content_type: re("content_type", &content_type)?,
            }),
            LogWhat::Tags { tags } => Target::Tags(tags),
            LogWhat::TagPattern { header, pattern } => Target::TagPattern {
                patterns: vec![(
                    HeaderName::from_bytes(header.as_bytes()).ok()?,
                    regex("pattern", &pattern).ok()?,
                )],
            },
            LogWhat::TagPatterns { patterns } => Target::TagPattern {
                patterns: patterns
                    .iter()
                    .map(|(h, p)| {
                        Some((
                            HeaderName::from_bytes(h.as_bytes()).ok()?,
                            regex("pattern", p).ok()?,
                        ))
                    })
                    .collect::<Option<Vec<_>>>()?,
            },
            LogWhat::Url { host, path } => Target::Url { host, path },
        };
        Some((
            Purge {
                target,
                soft: rec.soft,
            },
            from_millis(rec.at_ms),
        ))
    }
}

/// Who may purge: source networks and, optionally, a bearer token.
#[derive(Debug, Clone)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub token: Option<String>,
}

impl Access {
    /// May a request from `ip` with this `Authorization` header purge?
    pub fn permits(&self, ip: Option<IpAddr>, authorization: Option<&str>) -> bool {
        let from_allowed = ip.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            self.allow.iter().any(|net| net.contains(&ip))
        });
        let token_ok = match &self.token {
            None => true,
            Some(t) => authorization
                // RFC 9110 §11.1: the scheme is case-insensitive, one or more spaces follow it
                .and_then(|a| a.trim_start().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, given)| given)
                .is_some_and(|given| bool::from(given.trim().as_bytes().ct_eq(t.as_bytes()))),
        };
        from_allowed && token_ok
    }
}

// === validity records ===

/// Milliseconds since the epoch (0 before it).
pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[derive(Debug, Clone, Copy)]
struct Stamp {
    at: SystemTime,
    soft: bool,
    /// Local arrival order: an entry checked up to `seq` needs only records after it.
    seq: u64,
    /// Whether memcached may still hold an entry it covers (a hard URL purge deletes the L2
    /// copy: its record is needed only until L1 is swept).
    l2: bool,
}

/// A ban or tag record's effect on one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No record newer than the entry matches it.
    Valid,
    /// A soft record matches: stale from this moment on.
    Stale(SystemTime),
    /// A hard record matches: the entry is gone.
    Invalid,
}

impl Verdict {
    /// The forced freshness a hit gets for this verdict (`None`: serve it).
    pub fn forced(self) -> Option<ForcedFreshness> {
        match self {
            Verdict::Valid => None,
            Verdict::Stale(at) => Some(ForcedFreshness::ForceExpiredServeStale { expired_at: Some(at) }),
            Verdict::Invalid => Some(ForcedFreshness::ForceMiss),
        }
    }
}

/// Bans and tag purges, checked lazily against each hit, and by the sweeper
/// ([`crate::storage::Tiered::sweep_once`]) against every entry.
///
/// Every record carries the time it was accepted (it covers entries validated before that)
/// and a local sequence number. An entry that was checked against every record up to some
/// sequence number keeps that number ("checked"), so the next check looks only at records
/// that arrived since: a hit on an entry pays for a ban once, not on every hit. Once every
/// entry has been checked past a record, and no entry older than it can still arrive (from a
/// fill in progress or from L2), the record is dropped ([`Validity::expire`]): that is how
/// bans expire. [`MAX_RECORDS`] remains a hard bound if purges come faster than that.
#[derive(Debug)]
pub struct Validity {
    /// Records of each kind kept before the oldest half is folded ([`MAX_RECORDS`]).
    limit: usize,
    /// Bans, sorted by `at`.
    bans: RwLock<Vec<(Ban, Stamp)>>,
    /// Tag patterns, sorted by `at`.
    patterns: RwLock<Vec<(HeaderName, Pattern, Stamp)>>,
    tags: DashMap<String, Stamp>,
    /// Purged URLs (primary key text), for entries this corral did not remove itself: fills
    /// in progress during the purge, and other corrals' purges read from the purge log.
    urls: DashMap<String, Stamp>,
    /// Entries validated before this (ms since the epoch) are invalid: where old records fold.
    floor_ms: AtomicU64,
    /// The record sequence number when the floor last moved.
    floor_seq: AtomicU64,
    /// Writers take this, so that sequence numbers are published in order.
    writer: parking_lot::Mutex<u64>,
    /// Every record with a sequence number up to this one is in the lists.
    published: AtomicU64,
    /// Fast path: false while there is nothing to check.
    any: AtomicBool,
}

impl Default for Validity {
    fn default() -> Self {
        Self::with_limit(MAX_RECORDS)
    }
}

/// The response headers that carry tags, and how they separate them.
pub const TAG_HEADERS: [(&str, char); 8] = [
    ("xkey", ' '),
    ("surrogate-key", ' '),
    ("cache-tags", ' '),
    ("cache-tag", ','),
    ("purge-cache-tags", ' '),
    ("x-cache-tags", ','),
    ("x-magento-tags", ','),
    ("x-ids-involved", '#'),
];

impl Validity {
    pub fn with_limit(limit: usize) -> Self {
        Validity {
            limit: limit.max(2),
            bans: RwLock::default(),
            patterns: RwLock::default(),
            tags: DashMap::new(),
            urls: DashMap::new(),
            floor_ms: AtomicU64::new(0),
            floor_seq: AtomicU64::new(0),
            writer: parking_lot::Mutex::new(0),
            published: AtomicU64::new(0),
            any: AtomicBool::new(false),
        }
    }

    /// The newest record's sequence number: an entry checked now is checked up to this.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Record a ban, a tag purge or a tag pattern accepted `at` (one pulled late from the
    /// purge log still applies by its own time).
    pub fn record(&self, purge: &Purge, at: SystemTime) {
        if matches!(purge.target, Target::All) {
            return;
        }
        let mut last = self.writer.lock();
        let seq = *last + 1;
        let stamp = Stamp {
            at,
            soft: purge.soft,
            seq,
            l2: purge.soft || !matches!(purge.target, Target::Url { .. }),
        };
        match &purge.target {
            Target::Ban(ban) => {
                let mut bans = self.bans.write();
                let i = bans.partition_point(|(_, s)| s.at <= at);
                // this corral's own purge, read back from memcached's log: kept once
                let known = bans[..i]
                    .iter()
                    .rev()
                    .take_while(|(_, s)| s.at == at)
                    .any(|(b, s)| s.soft == stamp.soft && b.same(ban));
                if known {
                    return;
                }
                bans.insert(i, (ban.clone(), stamp));
                self.fold(&mut bans, seq, |(_, s)| s.at);
            }
            Target::TagPattern { patterns } => {
                let mut p = self.patterns.write();
                let i = p.partition_point(|(_, _, s)| s.at <= at);
                let known = |(h, pattern): &(HeaderName, Pattern)| {
                    p[..i]
                        .iter()
                        .rev()
                        .take_while(|(_, _, s)| s.at == at)
                        .any(|(kh, kp, s)| s.soft == stamp.soft && kh == h && kp.as_str() == pattern.as_str())
                };
                if patterns.iter().all(known) {
                    // this corral's own purge, read back from memcached's log: kept once
                    return;
                }
                for (header, pattern) in patterns {
                    let i = p.partition_point(|(_, _, s)| s.at <= at);
                    p.insert(i, (header.clone(), pattern.clone(), stamp));
                }
                self.fold(&mut p, seq, |(_, _, s)| s.at);
            }
            Target::Tags(tags) => {
                for t in tags {
                    self.tags.insert(t.clone(), stamp);
                }
                self.fold_map(&self.tags, seq);
            }
            Target::Url { host, path } => {
                self.urls.insert(crate::key::primary(host, path), stamp);
                self.fold_map(&self.urls, seq);
            }
            Target::All => unreachable!("returned above"),
        }
        *last = seq;
        self.any.store(true, Ordering::Release);
        self.published.store(seq, Ordering::Release);
    }

    /// Everything validated before `at` is invalid (hard).
    pub fn invalidate_all_before(&self, at: SystemTime) {
        let mut last = self.writer.lock();
        *last += 1;
        self.raise_floor(at, *last);
        self.any.store(true, Ordering::Release);
        self.published.store(*last, Ordering::Release);
    }

    fn raise_floor(&self, at: SystemTime, seq: u64) {
        self.floor_ms.fetch_max(millis(at), Ordering::AcqRel);
        self.floor_seq.store(seq, Ordering::Release);
    }

    fn fold_map(&self, map: &DashMap<String, Stamp>, seq: u64) {
        if map.len() <= self.limit {
            return;
        }
        let mut all: Vec<(String, SystemTime)> =
            map.iter().map(|e| (e.key().clone(), e.value().at)).collect();
        all.sort_by_key(|(_, at)| *at);
        let cut = &all[..all.len() / 2];
        if let Some((_, newest)) = cut.last() {
            self.raise_floor(*newest, seq);
        }
        for (k, _) in cut {
            map.remove(k);
        }
    }

    fn fold<T>(&self, list: &mut Vec<T>, seq: u64, at: impl Fn(&T) -> SystemTime) {
        if list.len() <= self.limit {
            return;
        }
        // the list is sorted by time: fold the oldest half into the floor
        let half = list.len() / 2;
        if let Some(newest) = list.get(half - 1).map(&at) {
            self.raise_floor(newest, seq);
        }
        list.drain(..half);
    }

    /// Drop the records every entry has been checked past: those with a sequence number up to
    /// `checked` (the sweeper checked every L1 entry up to it) accepted at or before the
    /// horizon (no entry validated before it can still arrive): `l1_horizon` for records
    /// that cannot concern L2, `l2_horizon` (older: memcached values live longer) for the
    /// others. The floor goes the same way. Returns how many records were dropped.
    pub fn expire(&self, checked: u64, l1_horizon: SystemTime, l2_horizon: SystemTime) -> usize {
        let _writer = self.writer.lock();
        let l2_horizon = l2_horizon.min(l1_horizon);
        let gone = |s: &Stamp| s.seq <= checked && s.at <= if s.l2 { l2_horizon } else { l1_horizon };
        let mut dropped = 0;
        {
            let mut bans = self.bans.write();
            let before = bans.len();
            bans.retain(|(_, s)| !gone(s));
            dropped += before - bans.len();
        }
        {
            let mut p = self.patterns.write();
            let before = p.len();
            p.retain(|(_, _, s)| !gone(s));
            dropped += before - p.len();
        }
        for map in [&self.tags, &self.urls] {
            let before = map.len();
            map.retain(|_, s| !gone(s));
            dropped += before - map.len();
        }
        let floor = self.floor_ms.load(Ordering::Acquire);
        // the floor covers L2 values too
        if floor > 0 && self.floor_seq.load(Ordering::Acquire) <= checked && floor <= millis(l2_horizon) {
            self.floor_ms.store(0, Ordering::Release);
        }
        if self.is_empty() && self.floor_ms.load(Ordering::Acquire) == 0 {
            self.any.store(false, Ordering::Release);
        }
        dropped
    }

    /// Heap bytes the records hold (estimated from their sizes), for
    /// `corral_purge_record_bytes`. Walks every record: called at scrape time only.
    pub fn heap_bytes(&self) -> usize {
        // a DashMap entry: key, value, and the table's per-entry overhead
        let entry = std::mem::size_of::<(String, Stamp)>() + 16;
        let bans: usize = self
            .bans
            .read()
            .iter()
            .map(|(b, _)| std::mem::size_of::<(Ban, Stamp)>() + b.heap_bytes())
            .sum();
        let patterns: usize = self
            .patterns
            .read()
            .iter()
            .map(|(_, p, _)| std::mem::size_of::<(HeaderName, Pattern, Stamp)>() + p.heap_bytes())
            .sum();
        let maps: usize = [&self.tags, &self.urls]
            .into_iter()
            .map(|m| m.iter().map(|e| e.key().capacity() + entry).sum::<usize>())
            .sum();
        bans + patterns + maps
    }

    /// How many records are kept (bans + patterns + tags + URLs).
    pub fn len(&self) -> usize {
        self.bans.read().len() + self.patterns.read().len() + self.tags.len() + self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the oldest record kept was accepted.
    pub fn oldest(&self) -> Option<SystemTime> {
        let bans = self.bans.read().first().map(|(_, s)| s.at);
        let patterns = self.patterns.read().first().map(|(_, _, s)| s.at);
        let maps = [&self.tags, &self.urls]
            .into_iter()
            .filter_map(|m| m.iter().map(|e| e.value().at).min());
        bans.into_iter().chain(patterns).chain(maps).min()
    }

    /// Entries validated before this (ms since the epoch) are invalid; 0 if none.
    pub fn floor_ms(&self) -> u64 {
        self.floor_ms.load(Ordering::Acquire)
    }

    /// Is there anything to check at all?
    pub fn active(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Is the entry `meta` for `host` + `path` still valid? `None` if it is; otherwise how
    /// to treat it (a miss for hard purges, stale for soft ones).
    pub fn verdict(&self, host: &str, path: &str, meta: &CacheMeta) -> Option<ForcedFreshness> {
        self.check(host, path, meta.updated(), meta.headers(), 0).forced()
    }

    /// [`Validity::check`] for a stored entry that keeps its check mark in `mark` (`None`: it
    /// has none, e.g. a body still streaming): only the records after the mark are checked,
    /// and if none matches, the mark moves to the newest record, so a hit pays for a record
    /// once.
    pub fn check_marked(
        &self,
        host: &str,
        path: &str,
        validated: SystemTime,
        headers: &http::HeaderMap,
        mark: Option<&AtomicU64>,
    ) -> Verdict {
        if !self.active() {
            return Verdict::Valid;
        }
        // read before checking: a record published meanwhile stays above the mark
        let upto = self.published();
        let checked = mark.map_or(0, |m| m.load(Ordering::Acquire));
        let verdict = self.check(host, path, validated, headers, checked);
        match mark {
            // no write when the mark is current: hot entries are read by every worker
            Some(m) if verdict == Verdict::Valid && checked < upto => {
                m.fetch_max(upto, Ordering::AcqRel);
            }
            _ => {}
        }
        verdict
    }

    /// The verdict on an entry validated at `validated`, with these response headers, already
    /// checked against every record up to sequence number `checked`.
    pub fn check(
        &self,
        host: &str,
        path: &str,
        validated: SystemTime,
        headers: &http::HeaderMap,
        checked: u64,
    ) -> Verdict {
        if !self.any.load(Ordering::Acquire) {
            return Verdict::Valid;
        }
        if millis(validated) < self.floor_ms.load(Ordering::Acquire) {
            return Verdict::Invalid;
        }
        if checked >= self.published() {
            return Verdict::Valid;
        }
        let applies = |s: &Stamp| s.at > validated && s.seq > checked;
        let mut soft_at: Option<SystemTime> = None;
        let mut hit = |s: Stamp| -> bool {
            if !s.soft {
                return true;
            }
            soft_at = Some(soft_at.map_or(s.at, |t: SystemTime| t.max(s.at)));
            false
        };
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        {
            let bans = self.bans.read();
            // sorted by time: only the tail is newer than the entry
            let newer = bans.partition_point(|(_, s)| s.at <= validated);
            for (ban, stamp) in &bans[newer..] {
                if applies(stamp) && ban.matches(host, path, content_type) && hit(*stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        {
            let patterns = self.patterns.read();
            let newer = patterns.partition_point(|(_, _, s)| s.at <= validated);
            for (name, pattern, stamp) in &patterns[newer..] {
                if !applies(stamp) {
                    continue;
                }
                let matched = headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| pattern.is_match(v));
                if matched && hit(*stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        if !self.urls.is_empty() {
            if let Some(stamp) = self.urls.get(&crate::key::primary(host, path)).map(|s| *s) {
                if applies(&stamp) && hit(stamp) {
                    return Verdict::Invalid;
                }
            }
        }
        if !self.tags.is_empty() {
            for (name, sep) in TAG_HEADERS {
                for value in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                    for tag in split_tags(value, sep) {
                        if let Some(stamp) = self.tags.get(&tag).map(|s| *s) {
                            if applies(&stamp) && hit(stamp) {
                                return Verdict::Invalid;
                            }
                        }
                    }
                }
            }
        }
        soft_at.map_or(Verdict::Valid, Verdict::Stale)
    }
}

/// Does this header map carry any tag header? One pass over its names (most carry none).
pub fn has_tag_header(headers: &http::HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| TAG_HEADERS.iter().any(|(name, _)| k.as_str() == *name))
}

/// The timestamp a purge accepted now is recorded with: a millisecond past any entry validated
/// before it, so an entry refreshed in the same millisecond is not mistaken for a newer one.
pub fn now_stamp() -> SystemTime {
    from_millis(millis(SystemTime::now()) + 1)
}

mod pattern;
pub use pattern::Pattern;

#[cfg(test)]
mod tests;
