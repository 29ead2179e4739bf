//! The JSON answers corral writes itself (purges, admin), built with serde.

use std::collections::BTreeMap;

use serde::Serialize;

/// `value` as a JSON body, with a final newline (for `curl` users).
pub fn body<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string());
    s.push('\n');
    s
}

/// `{"error": ...}`, and what was purged anyway when some of it was.
#[derive(Serialize)]
pub struct Error<'a, P: Serialize = ()> {
    pub error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged: Option<P>,
}

/// An error answer without anything purged.
pub fn error(message: &str) -> String {
    body(&Error::<()> {
        error: message,
        purged: None,
    })
}

/// The answer to one accepted purge.
#[derive(Serialize)]
pub struct Purged<'a> {
    pub purged: usize,
    pub kind: &'a str,
    pub soft: bool,
    /// With `?wait=peers`: each peer's outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<BTreeMap<String, crate::transport::Outcome>>,
}

/// The answer to an accepted admin batch: entries purged by kind, and how many purges.
#[derive(Serialize)]
pub struct BatchPurged<'a> {
    pub purged: &'a BTreeMap<&'static str, usize>,
    pub accepted: usize,
    /// With `?wait=peers`: each peer's outcome (the worst over the batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<BTreeMap<String, crate::transport::Outcome>>,
}

/// The admin `/stats` answer.
#[derive(Serialize)]
pub struct Stats {
    pub l1_entries: usize,
    pub l1_bytes: usize,
    pub memory_bytes: usize,
    pub l1_evicted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_their_field_order_and_escape_what_they_must() {
        assert_eq!(
            body(&Purged {
                purged: 2,
                kind: "url",
                soft: false,
                peers: None,
            }),
            "{\"purged\":2,\"kind\":\"url\",\"soft\":false}\n"
        );
        assert_eq!(error("bad \"x\"\n"), "{\"error\":\"bad \\\"x\\\"\\n\"}\n");
        assert_eq!(
            body(&Error {
                error: "memcached unavailable",
                purged: Some(3)
            }),
            "{\"error\":\"memcached unavailable\",\"purged\":3}\n"
        );
    }
}
