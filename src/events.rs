//! Events for operators: each cache drop is announced as one JSON object, POSTed to every
//! `generation.webhooks` URL (in order, bounded retries with back-off, never on a request's
//! path) and streamed on the admin listener's `GET /events` (server-sent events).
//!
//! ```json
//! {"event":"cache_dropped","reason":"upstream-generation","old":"g1","new":"g2",
//!  "at":"2026-11-29T16:00:00.123Z","at_ms":1764432000123,"corral":4730181534411511685,"dropped":1234}
//! ```

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::config::Webhook;
use crate::metrics;

/// Events waiting for a webhook before new ones are dropped (and counted).
const QUEUE: usize = 256;

/// Attempts per event and webhook, and the waits between them.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// One attempt at a webhook.
const HOOK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct CacheDropped<'a> {
    event: &'static str,
    reason: &'a str,
    old: Option<&'a str>,
    new: Option<&'a str>,
    at: String,
    at_ms: u64,
    corral: u64,
    dropped: usize,
}

/// Subscribers of `GET /events`.
static STREAM: LazyLock<broadcast::Sender<Arc<str>>> = LazyLock::new(|| broadcast::channel(QUEUE).0);

/// One queue per webhook, fed by [`cache_dropped`], drained by [`start_webhooks`]' tasks.
static HOOKS: OnceLock<Vec<mpsc::Sender<Arc<str>>>> = OnceLock::new();

/// This corral emptied its L1 (`dropped` entries) for `reason`: one ERROR line with a fixed
/// text (`dropping stale cache: <reason>`), `corral_cache_drops_total{reason}`, and the event.
pub fn dropped(reason: &'static str, old: Option<&str>, new: Option<&str>, dropped: usize, detail: &str) {
    metrics::CACHE_DROPS.with_label_values(&[reason]).inc();
    tracing::error!(
        reason,
        old = old.unwrap_or("-"),
        new = new.unwrap_or("-"),
        dropped,
        "dropping stale cache: {reason}: {detail}"
    );
    cache_dropped(reason, old, new, dropped);
}

/// Announce that this corral emptied its L1 (`dropped` entries) for `reason`.
fn cache_dropped(reason: &str, old: Option<&str>, new: Option<&str>, dropped: usize) {
    let now = SystemTime::now();
    let event = CacheDropped {
        event: "cache_dropped",
        reason,
        old,
        new,
        at: humantime::format_rfc3339_millis(now).to_string(),
        at_ms: crate::purge::millis(now),
        corral: crate::purge::corral_id(),
        dropped,
    };
    let text: Arc<str> = serde_json::to_string(&event).unwrap_or_default().into();
    remember(text.clone());
    let _ = STREAM.send(text.clone());
    for hook in HOOKS.get().into_iter().flatten() {
        if hook.try_send(text.clone()).is_err() {
            metrics::WEBHOOKS.with_label_values(&["dropped"]).inc();
        }
    }
}

/// Events kept for `GET /recent` (the status page).
const RECENT: usize = 100;

/// The last [`RECENT`] events (cache drops and accepted purges), oldest first.
static RECENT_EVENTS: LazyLock<parking_lot::Mutex<std::collections::VecDeque<Arc<str>>>> =
    LazyLock::new(Default::default);

fn remember(text: Arc<str>) {
    let mut recent = RECENT_EVENTS.lock();
    if recent.len() == RECENT {
        recent.pop_front();
    }
    recent.push_back(text);
}

#[derive(Serialize)]
struct PurgeAccepted<'a> {
    event: &'static str,
    at_ms: u64,
    kind: &'a str,
    target: &'a str,
    soft: bool,
    purged: usize,
    source: &'a str,
}

/// A purge was applied here (`source`: `local` when this corral accepted it, `remote` when
/// another corral's came in), for `GET /recent`. Not streamed, not sent to webhooks.
pub fn purge_applied(purge: &crate::purge::Purge, purged: usize, source: &str) {
    let event = PurgeAccepted {
        event: "purge",
        at_ms: crate::purge::millis(SystemTime::now()),
        kind: purge.kind(),
        target: &purge.target_text(),
        soft: purge.soft,
        purged,
        source,
    };
    remember(serde_json::to_string(&event).unwrap_or_default().into());
}

/// The last events (cache drops, purges), newest first.
pub fn recent() -> Vec<serde_json::Value> {
    RECENT_EVENTS
        .lock()
        .iter()
        .rev()
        .filter_map(|t| serde_json::from_str(t).ok())
        .collect()
}

/// `GET /events` streams open at once, at most.
const MAX_STREAMS: usize = 64;

/// A receiver of every event from now on (`GET /events`); `None` past [`MAX_STREAMS`].
pub fn subscribe() -> Option<broadcast::Receiver<Arc<str>>> {
    (STREAM.receiver_count() < MAX_STREAMS).then(|| STREAM.subscribe())
}

/// Start one delivery task per webhook (on the caller's runtime).
pub fn start_webhooks(hooks: &[Webhook]) {
    let mut senders = Vec::with_capacity(hooks.len());
    for hook in hooks {
        let (tx, rx) = mpsc::channel(QUEUE);
        senders.push(tx);
        tokio::spawn(deliver(hook.clone(), rx));
    }
    let _ = HOOKS.set(senders);
}

async fn deliver(hook: Webhook, mut rx: mpsc::Receiver<Arc<str>>) {
    let connector = pingora_core::connectors::http::Connector::new(None);
    let to = crate::client::Target {
        addr: hook.addr,
        tls: hook.tls,
        host: &hook.host,
    };
    let headers = [(http::header::CONTENT_TYPE, "application/json".to_string())];
    while let Some(event) = rx.recv().await {
        let body = Bytes::copy_from_slice(event.as_bytes());
        let mut waits = BACKOFF.iter();
        loop {
            let result = crate::client::request(
                &connector,
                &to,
                "POST",
                &hook.path,
                &headers,
                body.clone(),
                HOOK_TIMEOUT,
            )
            .await;
            let why = match result {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    metrics::WEBHOOKS.with_label_values(&["ok"]).inc();
                    break;
                }
                Ok(answer) => format!("HTTP {}", answer.status),
                Err(e) => e,
            };
            match waits.next() {
                Some(wait) => tokio::time::sleep(*wait).await,
                None => {
                    metrics::WEBHOOKS.with_label_values(&["failed"]).inc();
                    // the URL without its query (tokens go there)
                    let url = hook.url.split('?').next().unwrap_or_default();
                    tracing::warn!(webhook = %url, error = %why, "webhook failed after 4 attempts: event not delivered there");
                    break;
                }
            }
        }
    }
}
