//! L2: memcached, shared by every corral of a site.
//!
//! # Client
//! The `memcache` crate's async meta-protocol client (`memcache::exp::AsyncMetaClient`, pinned
//! exactly because it is marked experimental), one client (with its own connection pool) per
//! server. Keys are spread over servers by the crate's rendezvous hashing, so adding a server
//! moves about 1/N of the keys. Everything corral needs goes through [`L2`]; nothing else
//! touches the crate.
//!
//! # Keys
//! `md5_hex(namespace "/" generation "/" cache key)`: 32 characters, no spaces, far under
//! memcached's 250-byte limit. The generation is a counter kept in memcached under
//! `corral/<namespace>/generation`; bumping it makes every L2 entry of the namespace unreachable
//! at once (they expire on their own). It and the purge log are control keys, kept on every
//! server (the highest value any live server reports wins), so one server down hides no purge.
//!
//! # Outages
//! Every operation is bounded by `op_timeout`. A transport failure (connect refused, timeout)
//! opens that server's circuit: its keys are skipped (a miss, no write) until a background
//! probe (`mn`, every [`PROBE_INTERVAL`]) gets an answer, so a dead server costs one
//! `op_timeout` per outage, not per request, and a server that comes back is used again within
//! a second. Each state change is logged once and counted.
//!
//! # Cross-proxy lock
//! A lookup is a lease read (`mg <key> v N<ttl>`): on a miss exactly one client in the cluster
//! is told it won (memcached creates a placeholder), the others see the placeholder
//! ([`Read::Busy`]) and poll until the winner stores the value or the lease ends.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};
use memcache::exp::{AsyncMetaClient, MetaClientBuilder, Rendezvous, Router, Ttl};
use tracing::{debug, info, warn};

use crate::metrics;

mod control;
pub use control::{next_log_epoch, ControlState, RelayClaim};

/// How often a server whose circuit is open is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Consecutive timeouts that open a server's circuit. A refused or reset connection opens it
/// at once; a timeout may be a burst on this side (every pooled connection busy), so it takes
/// a few in a row. Each request still waits `op_timeout` at most.
pub const TIMEOUTS_TO_OPEN: u32 = 3;

/// The longest relative TTL memcached accepts (longer ones are read as Unix times).
const MAX_TTL: u32 = 30 * 24 * 3600;

/// `[memcached]` settings the tier needs.
#[derive(Debug, Clone)]
pub struct L2Config {
    pub servers: Vec<String>,
    pub namespace: String,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub max_object_bytes: usize,
    pub pool_size: usize,
    /// The longest a value is kept (also how long bans are kept for L2's sake).
    pub max_ttl: Duration,
}

struct Server {
    id: String,
    client: AsyncMetaClient,
    /// The circuit: false while the server is considered down.
    up: AtomicBool,
    /// Timeouts in a row, reset by any answer.
    timeouts: AtomicU32,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Read {
    Hit(Bytes),
    /// Not there, and this client now holds the cluster-wide lease to fill it: the lease
    /// placeholder's CAS, which makes the lease this client's alone ([`L2::set_if`],
    /// [`L2::delete_if`]: a purge that deleted the placeholder, or memcached letting it expire
    /// and another client winning it, makes them fail).
    Won(Option<u64>),
    /// Not there; another client holds the lease and is filling it.
    Busy,
    /// Not there (lease not requested).
    Miss,
    /// The server is down or failed: behave as without L2.
    Unavailable,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored; the new item's CAS.
    Stored(Option<u64>),
    /// Refused: the CAS did not match (the lease was deleted by a purge, or expired), or the
    /// value is over `max_object_bytes`.
    NotStored,
    /// memcached could not be reached.
    Unavailable,
}

/// The L2 tier client. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct L2 {
    inner: Arc<Inner>,
}

struct Inner {
    servers: Vec<Server>,
    ids: Vec<String>,
    router: Rendezvous,
    namespace: String,
    generation: AtomicU64,
    op_timeout: Duration,
    max_object_bytes: usize,
    max_ttl: Duration,
}

/// How a failed exchange bears on the server's health.
enum Failure {
    /// The server refused or dropped the connection: it is down.
    Down,
    /// No answer in time: down, or just busy.
    Slow,
    /// The server answered (e.g. item too large): it is up.
    Refused,
}

fn classify(e: &memcache::exp::Error) -> Failure {
    use memcache::exp::Error;
    match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Failure::Slow,
        Error::Io(_) => Failure::Down,
        Error::Timeout { .. } => Failure::Slow,
        Error::Ambiguous { source, .. } => classify(source),
        // a broken exchange (connection closed mid-answer, garbage): the server is gone
        Error::Protocol(_) => Failure::Down,
        // the server answered, or the command never left: the server is fine
        _ => Failure::Refused,
    }
}

impl L2 {
    /// Build the clients. Connections are dialled lazily, so a server that is down at start
    /// only opens its circuit at the first use.
    pub async fn connect(cfg: &L2Config) -> Result<L2, String> {
        let mut servers = Vec::with_capacity(cfg.servers.len());
        for id in &cfg.servers {
            let client = MetaClientBuilder::new()
                .connect_timeout(Some(cfg.connect_timeout))
                .io_timeout(Some(cfg.op_timeout))
                .max_idle(cfg.pool_size)
                // a burst queues on the pool instead of dialling one connection per request
                .max_connections(Some(cfg.pool_size))
                .connect_async(id.as_str())
                .await
                .map_err(|e| format!("memcached server {id}: {e}"))?;
            servers.push(Server {
                id: id.clone(),
                client,
                up: AtomicBool::new(true),
                timeouts: AtomicU32::new(0),
            });
        }
        let l2 = L2 {
            inner: Arc::new(Inner {
                ids: servers.iter().map(|s| s.id.clone()).collect(),
                servers,
                router: Rendezvous::new(),
                namespace: cfg.namespace.clone(),
                generation: AtomicU64::new(0),
                op_timeout: cfg.op_timeout,
                max_object_bytes: cfg.max_object_bytes,
                max_ttl: cfg.max_ttl,
            }),
        };
        Ok(l2)
    }

    /// Each server (as configured) and whether its circuit is closed (it is used).
    pub fn server_states(&self) -> Vec<(String, bool)> {
        self.inner
            .servers
            .iter()
            .map(|s| (s.id.clone(), s.up.load(Ordering::Acquire)))
            .collect()
    }

    /// The namespace generation this corral currently uses.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The longest a value lives in memcached: no value is older than this.
    pub fn max_ttl(&self) -> Duration {
        self.inner.max_ttl
    }

    pub fn max_object_bytes(&self) -> usize {
        self.inner.max_object_bytes
    }

    /// The memcached key of a cache key (its `combined()` hex form), current generation.
    pub fn key(&self, combined: &str) -> String {
        self.key_at(self.generation(), combined)
    }

    /// The memcached key of a cache key under `generation`.
    pub fn key_at(&self, generation: u64, combined: &str) -> String {
        key_for(&self.inner.namespace, generation, combined)
    }

    fn server(&self, key: &[u8]) -> &Server {
        let i = self.inner.router.route(key, &self.inner.ids);
        &self.inner.servers[i]
    }

    fn failed(&self, server: &Server, op: &'static str, failure: Failure, e: &dyn std::fmt::Display) {
        metrics::L2_ERRORS.with_label_values(&[op]).inc();
        let open = match failure {
            Failure::Down => true,
            Failure::Slow => server.timeouts.fetch_add(1, Ordering::AcqRel) + 1 >= TIMEOUTS_TO_OPEN,
            Failure::Refused => {
                server.timeouts.store(0, Ordering::Release);
                debug!(server = %server.id, op, error = %e, "memcached refused");
                false
            }
        };
        if open && server.up.swap(false, Ordering::AcqRel) {
            warn!(server = %server.id, op, error = %e, "memcached server down: skipping it until it answers again");
            metrics::L2_SERVERS_DOWN.inc();
            self.spawn_probe(server.id.clone());
        }
    }

    fn spawn_probe(&self, id: String) {
        let l2 = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(server) = l2.inner.servers.iter().find(|s| s.id == id) else {
                    return;
                };
                let answered = tokio::time::timeout(l2.inner.op_timeout, server.client.noop())
                    .await
                    .is_ok_and(|r| r.is_ok());
                if answered {
                    server.timeouts.store(0, Ordering::Release);
                    server.up.store(true, Ordering::Release);
                    metrics::L2_SERVERS_DOWN.dec();
                    info!(server = %id, "memcached server is back");
                    return;
                }
            }
        });
    }

    /// Run `f` against the server of `key`, bounded by `op_timeout`; a transport failure opens
    /// the circuit. `None` when the server is down or failed.
    async fn with_server<T, F, Fut>(&self, key: &[u8], op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(AsyncMetaClient) -> Fut,
        Fut: std::future::Future<Output = memcache::exp::Result<T>>,
    {
        self.with_server_at(self.server(key), op, f).await
    }

    /// [`Self::with_server`] against one given server.
    async fn with_server_at<T, F, Fut>(&self, server: &Server, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(AsyncMetaClient) -> Fut,
        Fut: std::future::Future<Output = memcache::exp::Result<T>>,
    {
        if !server.up.load(Ordering::Acquire) {
            metrics::L2_REQUESTS.with_label_values(&[op, "skipped"]).inc();
            metrics::L2_SERVER_REQUESTS
                .with_label_values(&[&server.id, "skipped"])
                .inc();
            return None;
        }
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.inner.op_timeout, f(server.client.clone())).await;
        metrics::L2_OP_SECONDS
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let result = if matches!(outcome, Ok(Ok(_))) {
            "ok"
        } else {
            "error"
        };
        metrics::L2_SERVER_REQUESTS
            .with_label_values(&[&server.id, result])
            .inc();
        match outcome {
            Ok(Ok(v)) => {
                server.timeouts.store(0, Ordering::Release);
                metrics::L2_REQUESTS.with_label_values(&[op, "ok"]).inc();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(server, op, classify(&e), &e);
                None
            }
            Err(_) => {
                self.failed(server, op, Failure::Slow, &"timed out");
                None
            }
        }
    }

    async fn get_plain(&self, key: &[u8]) -> Option<Read> {
        let r = self
            .with_server(key, "get", |c| async move { c.get(key).send().await })
            .await?;
        Some(match r.value {
            Some(v) if r.hit() && !v.is_empty() => Read::Hit(Bytes::from(v)),
            _ => Read::Miss,
        })
    }

    /// Look `key` up; with `lease`, a miss also competes for the cluster-wide fill lease
    /// (held for `lease` at most).
    pub async fn get(&self, key: &str, lease: Option<Duration>) -> Read {
        let k = key.as_bytes();
        let Some(lease) = lease else {
            return self.get_plain(k).await.unwrap_or(Read::Unavailable);
        };
        let ttl = (lease.as_secs() as u32).clamp(1, MAX_TTL);
        let Some(r) = self
            .with_server(k, "get", |c| async move { c.get(k).lease_ttl(ttl).send().await })
            .await
        else {
            return Read::Unavailable;
        };
        match (&r.value, r.hit(), r.won_lease(), r.lease_busy()) {
            (Some(v), true, _, _) if !v.is_empty() => Read::Hit(Bytes::from(v.clone())),
            (_, _, true, _) => Read::Won(r.item.cas),
            (_, _, _, true) => Read::Busy,
            _ => Read::Miss,
        }
    }

    /// Store `value` under `key` for `ttl`. Errors are logged and counted, never returned.
    pub async fn set(&self, key: &str, value: Bytes, ttl: Duration) {
        self.set_if(key, value, ttl, None).await;
    }

    /// Store `value` under `key` for `ttl`; with `cas`, only if the item (the fill lease's
    /// placeholder) still has it. Returns what happened; errors are logged and counted.
    pub async fn set_if(&self, key: &str, value: Bytes, ttl: Duration, cas: Option<u64>) -> Stored {
        if value.len() > self.inner.max_object_bytes {
            return Stored::NotStored;
        }
        let k = key.as_bytes();
        let ttl = ttl.min(self.inner.max_ttl);
        let ttl = Ttl::secs((ttl.as_secs() as u32).clamp(1, MAX_TTL));
        let r = self
            .with_server(k, "set", |c| async move {
                let set = c.set(k, &value[..]).ttl(ttl).return_cas();
                match cas {
                    Some(cas) => set.compare_cas(cas).send().await,
                    None => set.send().await,
                }
            })
            .await;
        match r {
            Some(r) if r.applied() => Stored::Stored(r.cas),
            Some(_) => Stored::NotStored,
            None => Stored::Unavailable,
        }
    }

    /// Delete `key`. Returns false if memcached could not be told (down, timed out): the key
    /// may still be there.
    pub async fn delete(&self, key: &str) -> bool {
        self.delete_if(key, None).await
    }

    /// Delete `key` if its CAS is still `cas` (a lease or lock this client won, not one that
    /// expired and was won by another since); without a CAS, unconditionally. Returns false
    /// if memcached could not be told.
    pub async fn delete_if(&self, key: &str, cas: Option<u64>) -> bool {
        let k = key.as_bytes();
        self.with_server(k, "delete", |c| async move {
            match cas {
                Some(cas) => c.delete(k).compare_cas(cas).send().await,
                None => c.delete(k).send().await,
            }
        })
        .await
        .is_some()
    }
}

/// `md5_hex(namespace "/" generation "/" combined)`: the memcached key of a cache key.
pub fn key_for(namespace: &str, generation: u64, combined: &str) -> String {
    let mut h = Md5::new();
    h.update(namespace.as_bytes());
    h.update(b"/");
    h.update(generation.to_string().as_bytes());
    h.update(b"/");
    h.update(combined.as_bytes());
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_md5_hex_and_depend_on_namespace_and_generation() {
        let cfg = |ns: &str| L2Config {
            servers: vec!["127.0.0.1:1".into()],
            namespace: ns.into(),
            connect_timeout: Duration::from_millis(10),
            op_timeout: Duration::from_millis(10),
            max_object_bytes: 1000,
            pool_size: 1,
            max_ttl: Duration::from_secs(60),
        };
        let a = L2::connect(&cfg("site")).await.unwrap();
        let b = L2::connect(&cfg("other")).await.unwrap();
        let k = a.key("abc");
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(k, b.key("abc"));
        a.inner.generation.store(1, Ordering::Release);
        assert_ne!(k, a.key("abc"), "a generation bump changes every key");
    }

    #[test]
    fn keys_are_lower_case_md5_hex() {
        assert_eq!(
            key_for("ns", 0, "abc"),
            format!("{:x}", md5::Md5::digest(b"ns/0/abc"))
        );
        assert!(key_for("ns", 0, "abc")
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
    }
}
