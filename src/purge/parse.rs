//! Every request shape real clients send (see the table in the module above), parsed into one [`Purge`].

use http::header::HeaderName;
use http::Method;
use pingora_http::RequestHeader;

use super::{Ban, Pattern, Purge, PurgeError, Target, MAX_PATTERN_BYTES};

/// Is this a purge method corral answers itself?
pub fn is_purge_method(method: &Method) -> bool {
    matches!(
        method.as_str(),
        "PURGE" | "BAN" | "PURGEKEYS" | "PURGETAGS" | "URIBAN"
    )
}

pub(super) fn header<'a>(req: &'a RequestHeader, name: &str) -> Result<Option<&'a str>, PurgeError> {
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

pub(super) fn regex(name: &str, pattern: &str) -> Result<Pattern, PurgeError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(PurgeError::TooLong(name.to_string()));
    }
    Pattern::new(pattern).map_err(|e| PurgeError::BadPattern {
        header: name.to_string(),
        reason: e.to_string().lines().last().unwrap_or("").trim().to_string(),
    })
}

pub(crate) fn split_tags(value: &str, sep: char) -> Vec<String> {
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

pub(super) fn soft_flag(req: &RequestHeader) -> bool {
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
