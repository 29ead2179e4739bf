//! The upstream's generation (`[generation]`): when the application behind corral changes
//! underneath (a deploy, a restored database), corral empties its cache instead of serving
//! what the old one generated, and says so loudly.
//!
//! The generation is any text the upstream puts in a response header (`generation.header`,
//! e.g. a deploy id), on any response, or the answer to a poll of `generation.url` every
//! `generation.interval` (so a change is seen even when no request passes).
//!
//! # What counts as a change
//! - The first value seen is adopted, not a change. With memcached, the namespace's current
//!   value is read at start, so a restarted corral that sees it does not drop.
//! - A missing header, or the current value again, is no change.
//! - A value never seen before in this namespace (the last [`HISTORY`] are remembered) is a
//!   change: L1 is emptied at once (the response that carried it is stored normally), one
//!   corral of the namespace moves memcached's namespace generation (old L2 entries become
//!   unreachable; several corrals seeing the change at once make one move: `claim`), and the
//!   other corrals follow that move within 250 ms, each dropping its own L1 once.
//! - A value seen before that is not the current one (`g1` after `g2`: two application
//!   servers mid-deploy) is **not** a change: such a response is served but not stored
//!   (`corral_generation_superseded_total`), so the cache fills with the new generation only
//!   and does not flap. If the older value is the only one seen for `generation.settle` (the
//!   current one not at all meanwhile), it is a rollback: a change back to it.
//!
//! Each drop goes through [`crate::events::dropped`]: one ERROR line
//! (`dropping stale cache: <reason>`), `corral_cache_drops_total{reason}`, and an event to the
//! webhooks and `GET /events`.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderName;
use tracing::info;

use crate::cache::CacheParts;
use crate::config::Config;
use crate::metrics;

/// Values remembered per namespace: one of these seen again is not a new generation.
pub const HISTORY: usize = 32;

/// Why a response of an older generation is not stored (Pingora's custom no-cache reason).
pub const SUPERSEDED: &str = "older upstream generation";

/// The longest value taken (a header or a poll's body).
const MAX_VALUE: usize = 256;

/// What one observed value means.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Same,
    /// The first one: adopted quietly.
    Adopted,
    Changed {
        old: String,
        new: String,
    },
    /// Seen before and not current: served, not stored.
    Superseded,
    /// Never seen, but within [`MIN_CHANGE_INTERVAL`] of the last change: served, not stored.
    TooFast,
}

/// The shortest time between two changes: a header that changes on every response is not a
/// generation, and must not empty the cache (and move the namespace) on every response.
pub const MIN_CHANGE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait between two tries of moving memcached's namespace for a new upstream
/// generation (from 250 ms, doubled each time: about two minutes of tries in all).
const MOVE_RETRY_MAX: Duration = Duration::from_secs(64);

/// The generations this corral knows of.
#[derive(Debug)]
struct History {
    current: Option<String>,
    /// Oldest first, the current one last.
    seen: VecDeque<String>,
    /// When the current value was last seen.
    current_at: Instant,
    /// The latest older value seen since the current one was last seen, and since when an
    /// older value (any) is all there is.
    older: Option<(String, Instant)>,
    /// When the last change was made here.
    changed_at: Option<Instant>,
}

impl History {
    /// The history `seen` (oldest first, the current value last), as memcached keeps it for
    /// the namespace.
    fn new(seen: Vec<String>, now: Instant) -> Self {
        let mut seen: VecDeque<String> = seen
            .into_iter()
            .filter(|v| value_of(v.as_bytes()) == Some(v.as_str()))
            .collect();
        while seen.len() > HISTORY {
            seen.pop_front();
        }
        History {
            current: seen.back().cloned(),
            seen,
            current_at: now,
            older: None,
            changed_at: None,
        }
    }

    fn remember(&mut self, value: &str, now: Instant) {
        self.seen.retain(|v| v != value);
        self.seen.push_back(value.to_string());
        while self.seen.len() > HISTORY {
            self.seen.pop_front();
        }
        self.current = Some(value.to_string());
        self.current_at = now;
        self.older = None;
        self.changed_at = Some(now);
    }

    fn see(&mut self, value: &str, now: Instant, settle: Duration) -> Seen {
        let Some(current) = self.current.clone() else {
            self.remember(value, now);
            // adopting is no change: the next one may come at once
            self.changed_at = None;
            return Seen::Adopted;
        };
        if value == current {
            self.current_at = now;
            self.older = None;
            return Seen::Same;
        }
        if !self.seen.iter().any(|v| v == value) {
            if self
                .changed_at
                .is_some_and(|at| now.duration_since(at) < MIN_CHANGE_INTERVAL)
            {
                // a new value on every response (a timestamp, a request id): not a generation.
                // Served, not stored, not remembered; at most one drop per interval
                return Seen::TooFast;
            }
            self.remember(value, now);
            return Seen::Changed {
                old: current,
                new: value.to_string(),
            };
        }
        // an older value: a server still on it, or a rollback once older values are all
        // there is (the latest of them wins)
        let since = match &self.older {
            Some((_, since)) if *since >= self.current_at => *since,
            _ => now,
        };
        self.older = Some((value.to_string(), since));
        if now.duration_since(since) >= settle {
            self.remember(value, now);
            return Seen::Changed {
                old: current,
                new: value.to_string(),
            };
        }
        Seen::Superseded
    }
}

/// The upstream generation of this corral's namespace.
pub struct Generations {
    header: Option<HeaderName>,
    settle: Duration,
    history: parking_lot::Mutex<History>,
    parts: &'static CacheParts,
    /// The peers, told of each change.
    cluster: &'static crate::transport::Cluster,
}

static GLOBAL: OnceLock<&'static Generations> = OnceLock::new();

/// The process's generations, once built.
pub fn get() -> Option<&'static Generations> {
    GLOBAL.get().copied()
}

/// A value as taken from a header or a body: trimmed text, at most [`MAX_VALUE`] bytes;
/// `None` if empty or not text.
pub fn value_of(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(&bytes[..bytes.len().min(MAX_VALUE)])
        .ok()?
        .trim();
    (!text.is_empty()).then_some(text)
}

impl Generations {
    /// Build them for `cfg`, starting from the namespace's current value (`shared`, read from
    /// memcached at start), and make them the process's.
    pub fn leak(
        cfg: &Config,
        cluster: &'static crate::transport::Cluster,
        shared: Vec<String>,
    ) -> &'static Generations {
        let parts = cluster.parts;
        if let Some(g) = shared.last() {
            metrics::UPSTREAM_GENERATION.with_label_values(&[g]).set(1);
        }
        let g: &'static Generations = Box::leak(Box::new(Generations {
            header: cfg.generation.header.clone(),
            settle: cfg.generation.settle,
            history: parking_lot::Mutex::new(History::new(shared, Instant::now())),
            parts,
            cluster,
        }));
        let _ = GLOBAL.set(g);
        g
    }

    /// The response header that carries it, if configured.
    pub fn header(&self) -> Option<&HeaderName> {
        self.header.as_ref()
    }

    /// The upstream answered a request sent at `sent` with generation `value`. Returns
    /// whether that response may be stored (false: an older generation).
    pub fn observe(&'static self, value: &str, sent: SystemTime) -> bool {
        let seen = self.history.lock().see(value, Instant::now(), self.settle);
        match seen {
            Seen::Same => true,
            Seen::Adopted => {
                info!(generation = value, "upstream generation adopted");
                metrics::UPSTREAM_GENERATION.with_label_values(&[value]).set(1);
                if let Some(l2) = self.parts.storage.l2.clone() {
                    let seen = vec![value.to_string()];
                    tokio::spawn(async move {
                        if l2.upstream_generation().await.is_empty() {
                            l2.set_upstream_generation(&seen).await;
                        }
                    });
                }
                true
            }
            Seen::TooFast => {
                metrics::GENERATION_SUPERSEDED.inc();
                static WARNED: parking_lot::Mutex<Option<Instant>> = parking_lot::Mutex::new(None);
                let mut warned = WARNED.lock();
                if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    *warned = Some(Instant::now());
                    tracing::warn!(generation = value, header = ?self.header, "the upstream's generation changes faster than once a second: is this header really a generation? Such responses are not stored");
                }
                false
            }
            Seen::Superseded => {
                metrics::GENERATION_SUPERSEDED.inc();
                tracing::debug!(
                    generation = value,
                    "response of an older upstream generation: served, not stored"
                );
                false
            }
            Seen::Changed { old, new } => {
                self.changed(&old, &new, sent);
                true
            }
        }
    }

    /// The upstream moved from `old` to `new`: drop L1 (what was validated before the request
    /// that brought `new` was sent counts as purged; that response itself is stored), and move
    /// memcached's namespace once for the cluster.
    fn changed(&'static self, old: &str, new: &str, sent: SystemTime) {
        let _ = metrics::UPSTREAM_GENERATION.remove_label_values(&[old]);
        metrics::UPSTREAM_GENERATION.with_label_values(&[new]).set(1);
        // what was validated before the request that brought `new` left goes, also fills of
        // the old generation that finish after this. That response is validated as of its
        // sending (response_cache_filter), so it is stored; answers to requests sent after it
        // that still carry `old` are superseded, and not stored
        let floor = sent;
        let detail = format!("the upstream's generation changed from {old:?} to {new:?}");
        self.parts
            .drop_cache_at("upstream-generation", Some(old), Some(new), floor, &detail);
        self.cluster.publish_generation(old, new);
        let Some(l2) = self.parts.storage.l2.clone() else {
            return;
        };
        let before = l2.generation();
        let change = format!("{before}:{old}->{new}");
        let new = new.to_string();
        let seen: Vec<String> = self.history.lock().seen.iter().cloned().collect();
        // the follower must not drop L1 a second time for the move this change causes
        self.parts.storage.log.expect_move(before);
        tokio::spawn(async move {
            // one corral moves the namespace; if the claim cannot be made (its server down),
            // this one moves it anyway: two moves cost a refetch, none would cost stale copies
            if l2.claim(&change).await != Some(false) {
                // the history first: a corral that sees the namespace move reads what it was for
                l2.set_upstream_generation(&seen).await;
                // this corral holds the claim: no other moves it, so it tries until memcached
                // takes it (a purge's bump: refused while too few servers that hold the purge
                // log answer), for as long as this change is the newest
                let mut wait = Duration::from_millis(250);
                loop {
                    if let Some(moved) = l2.bump_generation().await {
                        info!(generation = %new, namespace_generation = moved, "memcached namespace moved for the new upstream generation");
                        break;
                    }
                    if wait > MOVE_RETRY_MAX {
                        tracing::error!(generation = %new, "memcached namespace could not be moved for the new upstream generation: other corrals keep its old entries until their own drop");
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    // (checked after the wait: a refused try whose bump reached some servers is
                    // the move, once the corrals adopt it; bumping again would be a second)
                    if l2.generation() != before {
                        info!(generation = %new, "memcached namespace moved meanwhile: taken as the move for the new upstream generation");
                        break;
                    }
                }
            }
        });
    }

    /// Another corral saw `value` and moved the namespace for it: it is current here too.
    pub fn adopt(&self, value: &str) {
        let Some(value) = value_of(value.as_bytes()) else {
            return;
        };
        let mut h = self.history.lock();
        if h.current.as_deref() == Some(value) {
            return;
        }
        if let Some(old) = &h.current {
            let _ = metrics::UPSTREAM_GENERATION.remove_label_values(&[old]);
        }
        metrics::UPSTREAM_GENERATION.with_label_values(&[value]).set(1);
        h.remember(value, Instant::now());
    }

    /// The current value.
    pub fn current(&self) -> Option<String> {
        self.history.lock().current.clone()
    }

    /// Poll `generation.url` on the upstream every `generation.interval`, forever. The
    /// upstream (address, TLS, timeouts) is the running config's: a reload that moves it moves
    /// the poll too.
    pub async fn poll(&'static self, cfg: std::sync::Arc<Config>, live: &'static crate::live::Reloader) {
        let Some((path, host)) = cfg.generation.poll.clone() else {
            return;
        };
        let connector = pingora_core::connectors::http::Connector::new(None);
        let mut failing = false;
        loop {
            let sent = SystemTime::now();
            let now = live.load();
            let up = &now.cfg.upstream;
            let host = if host.is_empty() {
                up.address
                    .rsplit_once(':')
                    .map_or(up.address.as_str(), |(h, _)| h)
                    .to_string()
            } else {
                host.clone()
            };
            let to = crate::client::Target {
                addr: now.upstream,
                tls: up.tls,
                host: &host,
            };
            let result = crate::client::request(
                &connector,
                &to,
                "GET",
                &path,
                &[],
                bytes::Bytes::new(),
                up.connect_timeout + up.first_byte_timeout.min(Duration::from_secs(5)),
            )
            .await;
            match result {
                Ok(answer) if answer.status == 200 => {
                    if failing {
                        info!(path = %path, "generation poll answers again");
                        failing = false;
                    }
                    let from_header = self
                        .header
                        .as_ref()
                        .and_then(|h| answer.head.headers.get(h))
                        .and_then(|v| value_of(v.as_bytes()));
                    if let Some(value) = from_header.or_else(|| value_of(&answer.body)) {
                        self.observe(value, sent);
                    }
                }
                other => {
                    if !failing {
                        let why = match other {
                            Ok(a) => format!("HTTP {}", a.status),
                            Err(e) => e,
                        };
                        tracing::warn!(path = %path, error = %why, "generation poll failed: no change is assumed until it answers");
                        failing = true;
                    }
                }
            }
            tokio::time::sleep(cfg.generation.interval).await;
        }
    }
}

/// The background service: webhook deliveries, and the poll of `generation.url`.
pub struct Background {
    pub generations: Option<&'static Generations>,
    pub cfg: std::sync::Arc<Config>,
    pub live: &'static crate::live::Reloader,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Background {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        crate::events::start_webhooks(&self.cfg.generation.webhooks);
        if let (Some(g), true) = (self.generations, self.cfg.generation.poll.is_some()) {
            tokio::spawn(g.poll(self.cfg.clone(), self.live));
        }
        let _ = shutdown.changed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(10);

    #[test]
    fn the_first_value_is_adopted_the_same_again_is_nothing_a_new_one_is_a_change() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        assert_eq!(h.see("g1", t, SETTLE), Seen::Adopted);
        assert_eq!(h.see("g1", t, SETTLE), Seen::Same);
        assert_eq!(
            h.see("g2", t, SETTLE),
            Seen::Changed {
                old: "g1".into(),
                new: "g2".into()
            }
        );
        assert_eq!(h.current.as_deref(), Some("g2"));
    }

    #[test]
    fn a_restarted_corral_starts_from_the_namespace_value() {
        let t = Instant::now();
        let mut h = History::new(vec!["g1".into(), "g2".into()], t);
        assert_eq!(h.see("g2", t, SETTLE), Seen::Same);
        // mid-deploy: a server still on g1 is known as older, not a change back
        assert_eq!(h.see("g1", t, SETTLE), Seen::Superseded);
    }

    #[test]
    fn a_value_that_changes_on_every_response_is_not_a_generation() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        h.see("1", t, SETTLE);
        assert!(matches!(h.see("2", t, SETTLE), Seen::Changed { .. }));
        for i in 3..100 {
            let now = t + Duration::from_millis(i);
            assert_eq!(h.see(&i.to_string(), now, SETTLE), Seen::TooFast);
        }
        assert_eq!(h.seen.len(), 2, "not remembered");
        assert!(matches!(
            h.see("x", t + Duration::from_secs(2), SETTLE),
            Seen::Changed { .. }
        ));
    }

    #[test]
    fn several_older_values_alternating_still_make_a_rollback() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        h.see("g1", t, SETTLE);
        h.see("g2", t + Duration::from_secs(2), SETTLE);
        h.see("g3", t + Duration::from_secs(4), SETTLE);
        let mut last = Seen::Same;
        for i in 0..30 {
            let v = if i % 2 == 0 { "g1" } else { "g2" };
            last = h.see(
                v,
                t + Duration::from_secs(5) + Duration::from_millis(500 * i),
                SETTLE,
            );
            if last != Seen::Superseded {
                break;
            }
        }
        assert!(
            matches!(last, Seen::Changed { ref old, .. } if old == "g3"),
            "{last:?}"
        );
    }

    #[test]
    fn flapping_between_two_servers_mid_deploy_is_one_change() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        h.see("g1", t, SETTLE);
        assert!(matches!(h.see("g2", t, SETTLE), Seen::Changed { .. }));
        let t = t + Duration::from_secs(2);
        for i in 0..20 {
            let now = t + Duration::from_millis(100 * i);
            assert_eq!(h.see("g1", now, SETTLE), Seen::Superseded);
            assert_eq!(h.see("g2", now, SETTLE), Seen::Same);
        }
        // g1 alone, but g2 was seen meanwhile: still superseded
        assert_eq!(h.see("g1", t + Duration::from_secs(5), SETTLE), Seen::Superseded);
    }

    #[test]
    fn an_older_value_alone_for_settle_is_a_rollback() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        h.see("g1", t, SETTLE);
        h.see("g2", t + Duration::from_secs(2), SETTLE);
        assert_eq!(h.see("g1", t + Duration::from_secs(2), SETTLE), Seen::Superseded);
        assert_eq!(h.see("g1", t + Duration::from_secs(5), SETTLE), Seen::Superseded);
        assert_eq!(
            h.see("g1", t + Duration::from_secs(13), SETTLE),
            Seen::Changed {
                old: "g2".into(),
                new: "g1".into()
            }
        );
        // and g2 after that is an older value in its turn
        assert_eq!(h.see("g2", t + Duration::from_secs(14), SETTLE), Seen::Superseded);
    }

    #[test]
    fn the_history_is_bounded() {
        let t = Instant::now();
        let mut h = History::new(vec![], t);
        for i in 0..1000 {
            h.see(&format!("g{i}"), t + Duration::from_secs(2 * i), SETTLE);
        }
        assert_eq!(h.seen.len(), HISTORY);
        // forgotten long ago: new again
        assert!(matches!(
            h.see("g0", t + Duration::from_secs(5000), SETTLE),
            Seen::Changed { .. }
        ));
    }

    #[test]
    fn values_are_trimmed_bounded_text() {
        assert_eq!(value_of(b"  g7\n"), Some("g7"));
        assert_eq!(value_of(b"   "), None);
        assert_eq!(value_of(b"\xff\xfe"), None);
        assert_eq!(value_of(&[b'a'; 1000]).map(str::len), Some(MAX_VALUE));
    }
}
