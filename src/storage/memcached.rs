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
use futures::future::join_all;
use md5::{Digest, Md5};
use memcache::exp::{AsyncMetaClient, Get, MetaClientBuilder, Rendezvous, Router, Ttl};
use tracing::{debug, info, warn};

use crate::metrics;

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

/// The namespace's control keys, as [`L2::control_state`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlState {
    pub epoch: Option<u64>,
    pub log_seq: u64,
    pub generation: u64,
    /// A read quorum of servers holding the epoch answered: every record a purge was
    /// acknowledged for is counted.
    pub complete: bool,
    /// Servers that answered without the epoch (or with another one): restarted, flushed.
    pub lacking: usize,
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

    fn generation_key(&self) -> String {
        format!("corral/{}/generation", self.inner.namespace)
    }

    // === control keys: the generation and the purge log, kept on every server ===
    //
    // A cache entry lives on one server; the keys that say which entries are still valid are
    // written to every live server and read from all of them (the highest counter wins). A
    // purge is acknowledged once a write quorum took it, and a read counts as complete once a
    // read quorum answered: the two overlap, so a partition that splits the servers between
    // corrals cannot hide a purge from a corral that believes it has read everything. With
    // three servers or more, one down stops nothing; with two, a corral that reaches only one
    // is fenced (README: The purge invariant).

    /// `key` from every server at once: per server `None` if it could not be read, otherwise
    /// its value (`None` when it has none).
    async fn get_everywhere(&self, key: &[u8]) -> Vec<Option<Option<Vec<u8>>>> {
        join_all(self.inner.servers.iter().map(|server| async move {
            let r = self
                .with_server_at(server, "get", |c| async move { c.get(key).send().await })
                .await?;
            let hit = r.hit();
            Some(r.value.filter(|v| hit && !v.is_empty()))
        }))
        .await
    }

    /// `keys` from every server at once, pipelined (one round trip per server, the servers in
    /// parallel): per server `None` if it could not be read, otherwise each key's value
    /// (`None` when it has none).
    async fn get_many_everywhere(&self, keys: &[String]) -> Vec<Option<Vec<Option<Vec<u8>>>>> {
        join_all(self.inner.servers.iter().map(|server| async move {
            let results = self
                .with_server_at(server, "get", |c| async move {
                    c.run_many(keys.iter().map(Get::new)).await
                })
                .await?;
            // a key that could not be read makes the server's answer unknown, not "absent"
            results
                .into_iter()
                .map(|r| {
                    r.ok().map(|r| {
                        let hit = r.hit();
                        r.value.filter(|v| hit && !v.is_empty())
                    })
                })
                .collect::<Option<Vec<_>>>()
        }))
        .await
    }

    /// The control keys of the namespace in one pipelined read per server: the purge log's
    /// epoch (`None` when no server has it) and last sequence number, and the generation
    /// (counters: the highest any server has, absent = 0). `None` if no server answered.
    pub async fn control_state(&self) -> Option<ControlState> {
        let keys = [self.log_epoch_key(), self.log_seq_key(), self.generation_key()];
        let answers: Vec<Vec<Option<Vec<u8>>>> = self
            .get_many_everywhere(&keys)
            .await
            .into_iter()
            .flatten()
            .collect();
        if answers.is_empty() {
            return None;
        }
        let number = |v: &Option<Vec<u8>>| {
            v.as_deref()
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        };
        let top = |i: usize| {
            answers
                .iter()
                .map(|a| number(&a[i]).unwrap_or(0))
                .max()
                .unwrap_or(0)
        };
        let epoch = answers.iter().filter_map(|a| number(&a[0])).max();
        // a server counts toward the quorum only if it holds the log's epoch: one restarted
        // empty has lost the records it took, and must not stand in for them
        let agreeing = answers.iter().filter(|a| number(&a[0]) == epoch).count();
        Some(ControlState {
            epoch,
            log_seq: top(1),
            generation: top(2),
            complete: agreeing >= self.read_quorum(),
            lacking: answers.len() - agreeing,
        })
    }

    /// Purge log records `from..=to` (at most a few hundred), in one pipelined read per
    /// server: each from any server that has it (`None`: none has it, expired or evicted).
    /// `None` if no server answered.
    pub async fn log_records(&self, from: u64, to: u64) -> Option<Vec<Option<Bytes>>> {
        let keys: Vec<String> = (from..=to).map(|n| self.log_key(n)).collect();
        let answers: Vec<Vec<Option<Vec<u8>>>> = self
            .get_many_everywhere(&keys)
            .await
            .into_iter()
            .flatten()
            .collect();
        if answers.is_empty() {
            return None;
        }
        Some(
            (0..keys.len())
                .map(|i| answers.iter().find_map(|a| a[i].clone()).map(Bytes::from))
                .collect(),
        )
    }

    /// Adopt `generation` as the namespace generation this corral uses, if it still uses
    /// `before` (a purge-all here may have bumped it since). Returns whether it did.
    pub fn adopt_generation_from(&self, before: u64, generation: u64) -> bool {
        self.inner
            .generation
            .compare_exchange(before, generation, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Store `value` under `key` on every server at once. Returns whether any took it.
    async fn set_everywhere(&self, key: &[u8], value: &[u8]) -> bool {
        let stored = join_all(self.inner.servers.iter().map(|server| {
            self.with_server_at(server, "set", |c| async move {
                c.set(key, value).ttl(Ttl::secs(MAX_TTL)).send().await
            })
        }))
        .await;
        stored.iter().filter(|s| s.is_some()).count() >= self.write_quorum()
    }

    /// Servers that must answer a read of the control keys for it to count as complete: a
    /// majority. With [`Self::write_quorum`] the two always share a server, so a complete read
    /// sees every record a purge was acknowledged for, whichever servers either side reached
    /// (1 of 1, 2 of 2, 2 of 3, 3 of 5).
    fn read_quorum(&self) -> usize {
        self.inner.servers.len() / 2 + 1
    }

    /// Servers that must take a purge log record or a counter bump for the purge to be
    /// acknowledged (1 of 1, 1 of 2, 2 of 3, 3 of 5).
    pub fn write_quorum(&self) -> usize {
        self.inner.servers.len() + 1 - self.read_quorum()
    }

    /// A counter's value: the highest any live server reports (absent = 0); `None` if no server
    /// answered.
    async fn read_counter(&self, key: &str) -> Option<u64> {
        self.get_everywhere(key.as_bytes())
            .await
            .into_iter()
            .flatten()
            .map(|v| {
                v.and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .max()
    }

    /// Increment a counter on every live server and bring laggards (a server that was down) up
    /// to the highest value, so it never goes backwards. Returns that value, `None` if no server
    /// took it.
    async fn bump_counter(&self, key: &str) -> Option<u64> {
        let k = key.as_bytes();
        let results: Vec<Option<u64>> = join_all(self.inner.servers.iter().map(|server| async move {
            self.with_server_at(server, "incr", |c| async move {
                // created, and kept, without an expiry: a counter that vanished would read as 0
                c.increment(k)
                    .delta(1)
                    .initial(1, MAX_TTL)
                    .ttl(Ttl::NEVER)
                    .send()
                    .await
            })
            .await
            .and_then(|r| r.value)
        }))
        .await;
        if results.iter().filter(|r| r.is_some()).count() < self.write_quorum() {
            return None;
        }
        let top = results.iter().flatten().copied().max()?;
        let v = top.to_string();
        let v = v.as_bytes();
        join_all(
            self.inner
                .servers
                .iter()
                .zip(&results)
                .filter(|(_, value)| value.is_some_and(|v| v < top))
                .map(|(server, _)| {
                    self.with_server_at(server, "set", |c| async move {
                        c.set(k, v).ttl(Ttl::NEVER).send().await
                    })
                }),
        )
        .await;
        Some(top)
    }

    /// Read the namespace generation from memcached and adopt it. Returns `(old, new)`; equal
    /// when nothing changed or memcached could not be read.
    pub async fn refresh_generation(&self) -> (u64, u64) {
        let current = self.generation();
        if let Some(g) = self
            .read_counter(&self.generation_key())
            .await
            .filter(|g| *g != current)
        {
            let swapped =
                self.inner
                    .generation
                    .compare_exchange(current, g, Ordering::AcqRel, Ordering::Acquire);
            if swapped.is_ok() {
                return (current, g);
            }
        }
        (current, current)
    }

    fn log_epoch_key(&self) -> String {
        format!("corral/{}/purgelog/epoch", self.inner.namespace)
    }

    /// The purge log's epoch and last sequence number, read together: the epoch (a random
    /// number kept without expiry, on every server) is `None` when no server has it (a new
    /// namespace, or every server restarted or flushed); the sequence number is 0 when none
    /// has it. `None` if no server answered.
    pub async fn log_state(&self) -> Option<(Option<u64>, u64)> {
        let (epoch_key, seq_key) = (self.log_epoch_key(), self.log_seq_key());
        let (epoch, seq) = tokio::join!(
            self.get_everywhere(epoch_key.as_bytes()),
            self.read_counter(&seq_key)
        );
        let epoch = epoch
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
            .max();
        Some((epoch, seq?))
    }

    /// Make `candidate` the purge log's epoch where no server has one (`add`), so that one of
    /// the corrals that start or resync at once wins; `replace` also overwrites (a corral that
    /// found the log gone backwards tells every other one). Returns the epoch now in place.
    pub async fn set_log_epoch(&self, candidate: u64, replace: bool) -> Option<u64> {
        let key = self.log_epoch_key();
        let k = key.as_bytes();
        let v = candidate.to_string();
        let v = v.as_bytes();
        join_all(self.inner.servers.iter().map(|server| {
            self.with_server_at(server, "set", |c| async move {
                let set = c.set(k, v).ttl(Ttl::NEVER);
                if replace {
                    set.send().await
                } else {
                    set.add().send().await
                }
            })
        }))
        .await;
        self.log_state().await.and_then(|(epoch, _)| epoch)
    }

    fn log_checkpoint_key(&self) -> String {
        format!("corral/{}/purgelog/checkpoint", self.inner.namespace)
    }

    /// The purge log's checkpoint as each server that has one holds it.
    pub async fn log_checkpoints(&self) -> Vec<Bytes> {
        let key = self.log_checkpoint_key();
        self.get_everywhere(key.as_bytes())
            .await
            .into_iter()
            .flatten()
            .flatten()
            .map(Bytes::from)
            .collect()
    }

    /// Store the purge log's checkpoint on every server.
    pub async fn set_log_checkpoint(&self, bytes: &[u8]) {
        let key = self.log_checkpoint_key();
        self.set_everywhere(key.as_bytes(), bytes).await;
    }

    fn log_seq_key(&self) -> String {
        format!("corral/{}/purgelog/seq", self.inner.namespace)
    }

    fn log_key(&self, seq: u64) -> String {
        format!("corral/{}/purgelog/{seq}", self.inner.namespace)
    }

    /// Append a record to the namespace's purge log (on every live server). Returns its
    /// sequence number, or `None` if memcached could not take it.
    pub async fn append_log(&self, record: &[u8]) -> Option<u64> {
        let seq = self.bump_counter(&self.log_seq_key()).await?;
        let key = self.log_key(seq);
        self.set_everywhere(key.as_bytes(), record).await.then_some(seq)
    }

    /// The last sequence number of the purge log: `Some(0)` when it is empty, `None` when
    /// memcached could not be read.
    pub async fn log_seq(&self) -> Option<u64> {
        self.read_counter(&self.log_seq_key()).await
    }

    /// One purge log record, from any live server that has it: `Some(None)` if none has it
    /// (expired, evicted), `None` if no server could be read.
    pub async fn log_record(&self, seq: u64) -> Option<Option<Bytes>> {
        let answers = self.get_everywhere(self.log_key(seq).as_bytes()).await;
        let answered = answers.iter().any(Option::is_some);
        let found = answers.into_iter().flatten().flatten().next().map(Bytes::from);
        answered.then_some(found)
    }

    /// Bump the namespace generation (purge everything): every L2 entry of the namespace
    /// becomes unreachable at once. Returns the new generation, or `None` if memcached failed.
    pub async fn bump_generation(&self) -> Option<u64> {
        let g = self.bump_counter(&self.generation_key()).await?;
        let old = self.inner.generation.swap(g, Ordering::AcqRel);
        info!(namespace = %self.inner.namespace, from = old, to = g, "memcached namespace generation bumped");
        Some(g)
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
            return None;
        }
        match tokio::time::timeout(self.inner.op_timeout, f(server.client.clone())).await {
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
