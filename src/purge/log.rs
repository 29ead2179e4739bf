//! A purge as kept in memcached's purge log, and back.

#[allow(unused_imports)]
use super::*;

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
