//! The admin listener's batch of purges (`POST /purge`), validated whole.

use super::{Ban, BanText, Purge, Target};

/// `POST /purge` on the admin listener: a batch, validated whole before anything is applied.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub bans: Vec<BanText>,
    #[serde(default)]
    pub soft: bool,
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
        for (i, text) in batch.bans.into_iter().enumerate() {
            let ban = Ban::try_from(text).map_err(|e| format!("bans[{i}].{e}"))?;
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
