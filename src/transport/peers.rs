//! The HTTP transport: every accepted purge is POSTed to every peer corral
//! (`POST /_corral/peers` on its proxy listener, `Authorization: Bearer <peers.token>`).
//!
//! One task per peer, with its own ordered [`Backlog`]:
//! - **Delivery**: the task sends what is queued in batches ([`MAX_BATCH`]), one request at a
//!   time, each bounded by `peers.timeout`; a 2xx answer takes them off the queue.
//! - **Failed-host back-off** (the Zope purge utility's): a connect error, a timeout or a
//!   non-2xx answer marks the peer failed, with the time; no connection goes to it until
//!   `peers.retry_delay` has passed; then one probe carries the oldest queued message, and on
//!   success the peer is back and its backlog drains in order. One log line per state change.
//! - **No purge lost**: while a peer is failed its purges wait, coalesced, up to
//!   `peers.backlog`; past that the backlog becomes one "drop your cache" message, so a peer
//!   that comes back can never serve what it missed.
//! - A peer that answers with this corral's own id is this corral (an address `urls` did not
//!   let it recognise): it is skipped from then on.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::backlog::{Backlog, Pushed, MAX_BATCH};
use super::{Envelope, Inbox, Message, Outcome, Receipt, Received, Transport, VERSION};
use crate::client;
use crate::config::{PeerUrl, PeersConfig};
use crate::metrics;
use crate::purge;

/// The path peers send their messages to, on the proxy listener.
pub const PATH: &str = "/_corral/peers";

/// The largest envelope accepted (a batch of [`MAX_BATCH`] bans at the longest pattern).
pub const MAX_ENVELOPE_BYTES: usize = 8 << 20;

/// Every peer of this corral.
pub struct Peers {
    /// The peers now: replaced whole by [`Peers::reconfigure`] (a config reload).
    peers: arc_swap::ArcSwap<Vec<Arc<Peer>>>,
    connector: Connector,
    token: arc_swap::ArcSwap<String>,
    /// The runtime the delivery tasks run on (the background service's), for peers added
    /// by a reload.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
    timeout: Duration,
    retry_delay: Duration,
    /// `peers.backlog`: the bound of a failed peer's queue (a healthy one's in-flight queue
    /// may hold [`HEALTHY_BACKLOG_FACTOR`] times that, e.g. one large admin batch).
    backlog: usize,
    /// This corral's host name and port ([`Envelope::node`]).
    node: String,
}

/// How much more a healthy peer's queue may hold than a failed one's.
const HEALTHY_BACKLOG_FACTOR: usize = 4;

/// One peer: its queue and what `GET /peers` shows, and its task's wake-up.
struct Peer {
    url: PeerUrl,
    state: parking_lot::Mutex<State>,
    wake: Notify,
    /// (last sequence number delivered, failed attempts so far): what receipts wait on.
    progress: watch::Sender<(u64, u64)>,
    /// Taken out of `[peers] urls` by a reload: its task ends, its backlog goes.
    removed: std::sync::atomic::AtomicBool,
}

impl Peer {
    fn new(url: &PeerUrl, backlog: usize) -> Arc<Peer> {
        let labels = [url.url.as_str()];
        metrics::PEER_UP.with_label_values(&labels).set(1);
        metrics::PEER_BACKLOG.with_label_values(&labels).set(0);
        Arc::new(Peer {
            url: url.clone(),
            state: parking_lot::Mutex::new(State {
                backlog: Backlog::new(backlog),
                is_self: false,
                failed_since: None,
                retry_at: None,
                last_error: String::new(),
                delivered: 0,
                failures: 0,
                dropped: 0,
                last_latency: None,
            }),
            wake: Notify::new(),
            progress: watch::channel((0, 0)).0,
            removed: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

struct State {
    backlog: Backlog,
    /// Found to be this corral: never sent to.
    is_self: bool,
    /// Since when it is failed (`None`: up), and when it may be tried again.
    failed_since: Option<SystemTime>,
    retry_at: Option<Instant>,
    last_error: String,
    delivered: u64,
    failures: u64,
    dropped: u64,
    last_latency: Option<Duration>,
}

/// One peer in `GET /peers`.
#[derive(Serialize)]
struct PeerStatus<'a> {
    url: &'a str,
    state: &'static str,
    failed_since_ms: Option<u64>,
    next_retry_ms: Option<u64>,
    last_error: Option<&'a str>,
    backlog: usize,
    delivered: u64,
    failures: u64,
    dropped: u64,
    last_latency_ms: Option<f64>,
}

impl Peers {
    pub fn new(cfg: &PeersConfig, node: String) -> Self {
        let peers = cfg
            .peers
            .iter()
            .filter(|p| !p.is_self)
            .map(|url| Peer::new(url, cfg.backlog))
            .collect();
        Peers {
            peers: arc_swap::ArcSwap::from_pointee(peers),
            connector: Connector::new(None),
            token: arc_swap::ArcSwap::from_pointee(cfg.token.clone().unwrap_or_default()),
            runtime: std::sync::OnceLock::new(),
            timeout: cfg.timeout,
            retry_delay: cfg.retry_delay,
            backlog: cfg.backlog,
            node,
        }
    }

    /// No peer is listed.
    pub fn is_empty(&self) -> bool {
        self.peers.load().is_empty()
    }

    /// A config reload changed `[peers] urls` or `token`: peers still listed keep their
    /// state and backlog, new ones start (empty: they get what is accepted from now on; the
    /// receiver sees this corral as a new origin), removed ones stop and lose their backlog.
    pub fn reconfigure(&'static self, cfg: &PeersConfig) {
        self.token.store(Arc::new(cfg.token.clone().unwrap_or_default()));
        let old = self.peers.load_full();
        let mut next = Vec::new();
        for url in cfg.peers.iter().filter(|p| !p.is_self) {
            match old.iter().find(|p| p.url.url == url.url) {
                Some(kept) => next.push(kept.clone()),
                None => {
                    let peer = Peer::new(url, self.backlog);
                    info!(peer = %url.url, "peer added by a config reload");
                    if let Some(rt) = self.runtime.get() {
                        rt.spawn(self.run(peer.clone()));
                    }
                    next.push(peer);
                }
            }
        }
        for gone in old.iter().filter(|p| !next.iter().any(|n| Arc::ptr_eq(n, p))) {
            gone.removed.store(true, std::sync::atomic::Ordering::Release);
            gone.wake.notify_one();
            let labels = [gone.url.url.as_str()];
            for gauge in [&metrics::PEER_UP, &metrics::PEER_BACKLOG] {
                let _ = gauge.remove_label_values(&labels);
            }
            info!(peer = %gone.url.url, backlog = gone.state.lock().backlog.len(), "peer removed by a config reload: its backlog is dropped");
        }
        self.peers.store(Arc::new(next));
    }

    /// Deliver to `peer` until it is removed: wait for work, respect the back-off, send,
    /// record.
    async fn run(&'static self, peer: Arc<Peer>) {
        let labels = [peer.url.url.as_str()];
        loop {
            let batch = loop {
                let woken = peer.wake.notified();
                let wait_until = {
                    let st = peer.state.lock();
                    if st.is_self || peer.removed.load(std::sync::atomic::Ordering::Acquire) {
                        peer.progress.send_modify(|p| p.1 += 1);
                        return;
                    }
                    match st.retry_at {
                        Some(at) if at > Instant::now() => Some(at),
                        // a failed peer is probed with the oldest message alone
                        _ => match st
                            .backlog
                            .batch(if st.failed_since.is_some() { 1 } else { MAX_BATCH })
                        {
                            Some(b) => break b,
                            None => None,
                        },
                    }
                };
                match wait_until {
                    // no attempt before retry_delay is over, whatever is queued meanwhile
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => woken.await,
                }
            };
            let started = Instant::now();
            let result = self.deliver(&peer, &batch.covers, &batch.messages).await;
            let mut st = peer.state.lock();
            match result {
                Ok(received) if received.corral == purge::corral_id() => {
                    info!(peer = %peer.url.url, "peer is this corral: not sent to");
                    st.is_self = true;
                    st.backlog.clear();
                    metrics::PEER_BACKLOG.with_label_values(&labels).set(0);
                    peer.progress.send_modify(|p| p.0 = u64::MAX);
                    return;
                }
                Ok(_) => {
                    let latency = started.elapsed();
                    st.backlog.delivered(batch.covers.1);
                    st.delivered += batch.messages.len() as u64;
                    st.last_latency = Some(latency);
                    metrics::PEER_DELIVERED
                        .with_label_values(&labels)
                        .inc_by(batch.messages.len() as u64);
                    metrics::PEER_LAST_DELIVERY
                        .with_label_values(&labels)
                        .set(latency.as_secs_f64());
                    metrics::PEER_BACKLOG
                        .with_label_values(&labels)
                        .set(st.backlog.len() as i64);
                    if let Some(since) = st.failed_since.take() {
                        st.retry_at = None;
                        metrics::PEER_UP.with_label_values(&labels).set(1);
                        let down_ms = since.elapsed().unwrap_or_default().as_millis() as u64;
                        info!(peer = %peer.url.url, down_ms, backlog = st.backlog.len(), "peer back: delivering its backlog in order");
                    }
                    peer.progress.send_modify(|p| p.0 = p.0.max(batch.covers.1));
                }
                Err(why) => {
                    st.failures += 1;
                    st.retry_at = Some(Instant::now() + self.retry_delay);
                    metrics::PEER_FAILURES.with_label_values(&labels).inc();
                    if st.failed_since.is_none() {
                        st.failed_since = Some(SystemTime::now());
                        metrics::PEER_UP.with_label_values(&labels).set(0);
                        warn!(peer = %peer.url.url, error = %why, backlog = st.backlog.len(), retry_in_ms = self.retry_delay.as_millis() as u64, "peer failed: its purges are kept in its backlog; no attempt until retry_delay has passed");
                    }
                    st.last_error = why;
                    peer.progress.send_modify(|p| p.1 += 1);
                }
            }
        }
    }

    /// One delivery attempt, bounded by `peers.timeout`: the peer's answer, or why it failed.
    async fn deliver(
        &self,
        peer: &Peer,
        covers: &(u64, u64),
        messages: &[Arc<Message>],
    ) -> Result<Received, String> {
        let env = Envelope {
            v: VERSION,
            origin: purge::corral_id(),
            node: self.node.clone(),
            covers: *covers,
            messages: messages.to_vec(),
        };
        let body = Bytes::from(serde_json::to_vec(&env).map_err(|e| e.to_string())?);
        let to = client::Target {
            addr: peer.url.addr,
            tls: peer.url.tls,
            host: &peer.url.host,
        };
        let headers = [
            (
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.load()),
            ),
            (http::header::CONTENT_TYPE, "application/json".to_string()),
        ];
        let answer =
            client::request(&self.connector, &to, "POST", PATH, &headers, body, self.timeout).await?;
        if !(200..300).contains(&answer.status) {
            let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
                .trim()
                .to_string();
            return Err(format!("HTTP {}: {text}", answer.status));
        }
        serde_json::from_slice::<Received>(&answer.body).map_err(|e| format!("answer: {e}"))
    }

    /// The receipt of `seq` at `peer`: delivered once the peer took it, failed if an attempt
    /// fails meanwhile, backing off at once if the peer is failed and not due for a retry.
    fn receipt(&self, peer: &Arc<Peer>, seq: u64) -> Receipt {
        let mut rx = peer.progress.subscribe();
        // read before the state: a failure in between is then this receipt's "failed"
        let failures_before = rx.borrow().1;
        let backing_off = {
            let st = peer.state.lock();
            match (st.failed_since, st.retry_at) {
                (Some(since), Some(at)) if at > Instant::now() => Some(Outcome::BackingOff {
                    failed_ms_ago: since.elapsed().unwrap_or_default().as_millis() as u64,
                    retry_in_ms: at.saturating_duration_since(Instant::now()).as_millis() as u64,
                }),
                _ => None,
            }
        };
        let to = peer_url(peer);
        let peer = peer.clone();
        let outcome = async move {
            if let Some(b) = backing_off {
                return b;
            }
            loop {
                let (delivered, failures) = *rx.borrow_and_update();
                if delivered >= seq {
                    return Outcome::Delivered;
                }
                if failures > failures_before {
                    return Outcome::Failed(peer.state.lock().last_error.clone());
                }
                if rx.changed().await.is_err() {
                    return Outcome::Failed("stopped".into());
                }
            }
        };
        Receipt {
            to,
            outcome: Box::pin(outcome),
            required: false,
        }
    }
}

fn peer_url(peer: &Peer) -> String {
    peer.url.url.clone()
}

impl Transport for Peers {
    fn name(&self) -> &'static str {
        "peers"
    }

    fn publish(&self, msg: Arc<Message>) -> Vec<Receipt> {
        let seq = msg.seq;
        let peers = self.peers.load();
        let mut receipts = Vec::with_capacity(peers.len());
        for peer in peers.iter() {
            {
                let mut st = peer.state.lock();
                if st.is_self {
                    continue;
                }
                let labels = [peer.url.url.as_str()];
                let limit = if st.failed_since.is_some() {
                    self.backlog
                } else {
                    self.backlog.saturating_mul(HEALTHY_BACKLOG_FACTOR)
                };
                if st.backlog.push_within(msg.clone(), limit) == Pushed::Overflowed {
                    st.dropped += 1;
                    metrics::PEER_DROPPED.with_label_values(&labels).inc();
                    warn!(peer = %peer.url.url, "peer backlog overflow: its purges are replaced by one 'drop your cache' message");
                }
                metrics::PEER_BACKLOG
                    .with_label_values(&labels)
                    .set(st.backlog.len() as i64);
            }
            peer.wake.notify_one();
            receipts.push(self.receipt(peer, seq));
        }
        receipts
    }

    fn start(&'static self, _inbox: &'static Inbox) {
        // peers push to this corral's listener (`POST /_corral/peers`): nothing to pull
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        for peer in self.peers.load().iter() {
            tokio::spawn(self.run(peer.clone()));
        }
    }

    fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let peers: Vec<serde_json::Value> = self
            .peers
            .load()
            .iter()
            .map(|peer| {
                let st = peer.state.lock();
                let status = PeerStatus {
                    url: &peer.url.url,
                    state: if st.is_self {
                        "self"
                    } else if st.failed_since.is_some() {
                        "failed"
                    } else {
                        "up"
                    },
                    failed_since_ms: st.failed_since.map(purge::millis),
                    next_retry_ms: st
                        .retry_at
                        .filter(|_| st.failed_since.is_some())
                        .map(|at| at.saturating_duration_since(now).as_millis() as u64),
                    last_error: Some(st.last_error.as_str()).filter(|e| !e.is_empty()),
                    backlog: st.backlog.len(),
                    delivered: st.delivered,
                    failures: st.failures,
                    dropped: st.dropped,
                    last_latency_ms: st.last_latency.map(|d| d.as_secs_f64() * 1000.0),
                };
                serde_json::to_value(status).unwrap_or_default()
            })
            .collect();
        serde_json::json!({ "peers": peers })
    }
}
