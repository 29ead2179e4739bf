//! One request works for many: the locks of the tiered cache.
//!
//! | what | where | held by | given back |
//! |---|---|---|---|
//! | Pingora's cache lock | in process, per key | the request that fills | when its response ends; waiters time out after `lock_timeout` |
//! | the L2 read gate (`Tiered::inflight`, [`Gates`]) | in process, per memcached key | one L2 read, or one decision on a stale entry | a drop guard (the gate is forgotten once nobody holds or awaits it, also when the waiting future is cancelled) |
//! | the fill lease (`Tiered::leases`, [`Held`]) | memcached, `mg <key> N<ttl>` | the corral whose read won it | the L2 write of the value, or [`Tiered::release_lease`] for an uncacheable answer; memcached forgets it after `lock_timeout`, and so does [`Held`] |
//! | the refresh lock (`Tiered::refreshing`, [`Held`]) | memcached, `<key>:refresh` | the corral that revalidates a stale copy | [`Tiered::refresh_done`], after the refreshed copy landed (or the refresh failed); forgotten after `lock_timeout` like a lease |
//!
//! A cold miss across two corrals A and B sharing memcached:
//! 1. Clients ask A and B for the same URL. Within each corral Pingora's cache lock lets one
//!    request per corral on; the others wait for it.
//! 2. A's and B's lookups miss L1 and read L2 through the gate (one read per key per corral).
//!    The read is a lease read: A's wins (`Read::Won`, the lease is A's), B's finds the
//!    placeholder (`Read::Busy`).
//! 3. A goes upstream and fills; its clients stream the body as it arrives. B polls L1 and
//!    L2 ([`Backoff`]: 10 ms doubling to 100 ms) until the value lands or `lock_timeout` passes.
//! 4. A writes the value to memcached (the lease goes with it); B finds it, promotes it into
//!    its L1 and answers its clients. One upstream request for the cluster.
//!
//! A stale copy is refreshed the same way, with the refresh lock in place of the lease
//! ([`Tiered::refresh_once`]).
//!
//! The first half of this module is the primitives ([`Backoff`], [`Gates`], [`Held`]); the
//! second is how the tiered cache uses them, as `impl Tiered` blocks.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use pingora_cache::key::CacheHashKey;
use pingora_cache::storage::{HitHandler, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use pingora_error::Result;
use pingora_http::RequestHeader;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::warn;

use crate::metrics;
use crate::purge::Verdict;
use crate::storage::memcached::{Read, L2};
use crate::storage::memory::{self, CompleteHit};
use crate::storage::{record, Tiered};

/// The bounded wait for another request's work: 10 ms, doubling to 100 ms, until a deadline.
pub struct Backoff {
    pause: Duration,
    deadline: tokio::time::Instant,
}

impl Backoff {
    pub fn until(deadline: tokio::time::Instant) -> Self {
        Backoff {
            pause: Duration::from_millis(10),
            deadline,
        }
    }

    /// Sleep the next pause and return true; false at once if it would end past the deadline.
    pub async fn wait(&mut self) -> bool {
        if tokio::time::Instant::now() + self.pause > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(100));
        true
    }
}

/// Per-key gates in this process: one holder per key at a time, the others wait in turn. A
/// key's gate exists only while someone holds or awaits it.
#[derive(Default)]
pub struct Gates(DashMap<String, Arc<Mutex<()>>>);

/// A place at the gate of one key: held once [`Gates::enter`] returns it. Dropping it (or the
/// future that awaits the gate) leaves, and forgets the gate if nobody else holds or awaits it.
pub struct Pass<'a> {
    gates: &'a Gates,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
    gate: Option<Arc<Mutex<()>>>,
}

impl Gates {
    /// Wait for the gate of `key`, until `deadline` if one is given (`None`: it passed).
    pub async fn enter(&self, key: &str, deadline: Option<tokio::time::Instant>) -> Option<Pass<'_>> {
        let gate = self.0.entry(key.to_string()).or_default().clone();
        // in place before the wait, so a cancelled wait cleans up too
        let mut pass = Pass {
            gates: self,
            key: key.to_string(),
            guard: None,
            gate: Some(gate.clone()),
        };
        let guard = match gate.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                // another request of this corral reads the key: wait for it (a lock wait)
                let started = std::time::Instant::now();
                let got = match deadline {
                    Some(at) => tokio::time::timeout_at(at, gate.lock_owned()).await.ok(),
                    None => Some(gate.lock_owned().await),
                };
                metrics::lock_waited(started.elapsed(), got.is_some());
                got?
            }
        };
        pass.guard = Some(guard);
        Some(pass)
    }

    /// Keys with a gate now (held or awaited).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.guard.take();
        self.gate.take();
        // the check runs under the map's lock, so a request cloning the gate right now keeps it
        self.gates
            .0
            .remove_if(&self.key, |_, g| Arc::strong_count(g) == 1);
    }
}

/// Locks this corral holds in memcached (fill leases, refresh locks), by memcached key, with
/// the time each was taken and the CAS memcached gave it. The CAS makes a lock this corral's
/// alone: it is given back with a CAS-conditional delete, which cannot remove a lock that
/// expired meanwhile and was won by another corral. memcached lets a lock go after its lease
/// time whether or not it was given back, and so does this set: an entry older than `ttl`
/// counts as not held, and is dropped by the next look at it or, past a size that doubles, by
/// a sweep of the whole set, so a lock a vanished request never gave back costs nothing for
/// long.
pub struct Held {
    map: DashMap<String, (Instant, Option<u64>)>,
    ttl: Duration,
    /// Sweep the set when it grows past this.
    sweep_at: parking_lot::Mutex<usize>,
}

/// The smallest set size that triggers a sweep.
const HELD_SWEEP_MIN: usize = 1024;

impl Held {
    pub fn new(ttl: Duration) -> Self {
        Held {
            map: DashMap::new(),
            ttl,
            sweep_at: parking_lot::Mutex::new(HELD_SWEEP_MIN),
        }
    }

    /// Note that this corral took the lock of `key`, whose CAS is `cas`.
    pub fn take(&self, key: String, cas: Option<u64>) {
        self.map.insert(key, (Instant::now(), cas));
        let mut sweep_at = self.sweep_at.lock();
        if self.map.len() >= *sweep_at {
            self.map.retain(|_, (since, _)| since.elapsed() < self.ttl);
            *sweep_at = (self.map.len() * 2).max(HELD_SWEEP_MIN);
        }
    }

    /// Whether this corral holds the lock of `key` (taken less than `ttl` ago).
    pub fn holds(&self, key: &str) -> bool {
        if self.map.get(key).is_some_and(|e| e.0.elapsed() < self.ttl) {
            return true;
        }
        // never given back (the request vanished): memcached has dropped it too. Checked
        // again under the map's lock, so a lock taken again just now stays
        self.map
            .remove_if(key, |_, (since, _)| since.elapsed() >= self.ttl);
        false
    }

    /// Forget the lock of `key`: `Some(cas)` if this corral had noted it (give it back in
    /// memcached with a delete on that CAS), `None` if not.
    pub fn give_back(&self, key: &str) -> Option<Option<u64>> {
        self.map.remove(key).map(|(_, (_, cas))| cas)
    }

    /// Locks noted now, including expired ones not yet dropped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Locks held now (taken less than `ttl` ago).
    pub fn live(&self) -> usize {
        self.map
            .iter()
            .filter(|e| e.value().0.elapsed() < self.ttl)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Who revalidates a stale entry ([`Tiered::refresh_once`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// This corral, holding the cluster's refresh lock (give it back with
    /// [`Tiered::refresh_done`]).
    Mine(String),
    /// Another corral did: its fresher copy is in L1 now.
    Peer,
    /// Another corral holds the lock but no fresher copy came within `lock_timeout`: this
    /// corral goes upstream itself.
    TimedOut,
    /// No memcached, no stale complete entry, or memcached unavailable: Pingora's local
    /// revalidation, as without L2.
    Local,
}

impl Refresh {
    pub fn label(&self) -> &'static str {
        match self {
            Refresh::Mine(_) => "mine",
            Refresh::Peer => "peer",
            Refresh::TimedOut => "timeout",
            Refresh::Local => "local",
        }
    }
}

const REFRESH_SUFFIX: &str = ":refresh";

/// The memcached key of the refresh lock of the memcached key `mk`.
fn refresh_lock_key(mk: &str) -> String {
    format!("{mk}{REFRESH_SUFFIX}")
}

impl Tiered {
    /// Give back the fill lease for `key` if this corral still holds it: the request that won
    /// it ended without a fill (uncacheable, an upstream error or timeout, `only-if-cached`,
    /// the client gone), so other corrals stop waiting for a value that will never come. The
    /// proxy calls it at the end of every request that did not store.
    pub fn release_lease(&self, key: &CacheKey) {
        let Some(l2) = self.l2.clone() else { return };
        if self.leases.is_empty() {
            return;
        }
        let mk = l2.key(&key.combined());
        if let Some(cas) = self.leases.give_back(&mk) {
            tokio::spawn(async move {
                l2.delete_if(&mk, cas).await;
            });
        }
    }

    /// Pingora is about to revalidate the stale L1 entry of `key` in the background (grace).
    /// Every corral holding that copy sees it go stale at the same moment; only one of them
    /// should go upstream. The first takes a refresh lock in memcached (a lease on
    /// `<key>:refresh`) and goes ([`Refresh::Mine`]; it gives the lock back with
    /// [`Self::refresh_done`]). Another waits, bounded by `lock_timeout`, for the fresher copy
    /// to land in memcached and puts it in L1: its revalidation then finds a fresh entry and
    /// makes no upstream request ([`Refresh::Peer`]). Clients are never delayed: they are
    /// served the stale copy meanwhile.
    pub async fn refresh_once(
        &'static self,
        primary: &CacheKey,
        req: &RequestHeader,
        key_headers: &[http::HeaderName],
    ) -> Refresh {
        let local = || {
            metrics::STALE_REFRESHES.with_label_values(&["local"]).inc();
            Refresh::Local
        };
        let Some(l2) = &self.l2 else {
            return local();
        };
        let Some((validated, variance)) =
            self.l1
                .stale_validated(primary, req, key_headers, SystemTime::now())
        else {
            return local();
        };
        // the variant's own slot, in L1 and in L2, as Pingora stored it
        let mut key = primary.clone();
        if let Some(v) = variance {
            key.set_variance_key(v);
        }
        if self.refreshes(&l2.key(&key.combined())) {
            // a request of this corral revalidates it already (past grace)
            return local();
        }
        match self.refresh_or_wait(l2, &key, validated).await {
            Ok(_) => Refresh::Peer,
            Err(r) => r,
        }
    }

    /// An L1 hit that Pingora must revalidate before use (stale, past its serve-stale
    /// window: the clients wait): as [`Self::refresh_once`] does in the background, one
    /// corral of the cluster revalidates, the others wait for its copy in memcached and answer
    /// with that. Within this corral one request decides; the others wait for it, then find
    /// the fresh copy in L1 or leave the revalidation to Pingora's cache lock.
    pub(crate) async fn revalidate_once(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        stale: (CacheMeta, HitHandler),
        trace: &SpanHandle,
    ) -> Result<(CacheMeta, HitHandler)> {
        let mk = l2.key(&key.combined());
        if self.refreshes(&mk) {
            return Ok(stale);
        }
        let Some(_pass) = self.inflight.enter(&mk, None).await else {
            return Ok(stale);
        };
        {
            if self.refreshes(&mk) {
                return Ok(stale);
            }
            // the request before this one may have brought a fresh copy
            if let Some(hit) = self.l1.lookup(key, trace).await? {
                if hit.0.is_fresh(SystemTime::now()) {
                    return Ok(hit);
                }
            }
            let validated = memory::validated(&stale.1).map_or_else(|| stale.0.updated(), |v| v.0);
            let mut stale = stale;
            match self.refresh_or_wait(l2, key, validated).await {
                Ok(fresh) => return Ok(fresh),
                Err(Refresh::Mine(lock)) => CompleteHit::set_refresh_lock(&mut stale.1, lock),
                Err(_) => {}
            }
            Ok(stale)
        }
    }

    /// Take the cluster's refresh lock of `key` (`Err(Mine)`: this corral refreshes), or,
    /// if another corral holds it, wait for its copy ([`Self::await_peer_copy`]). Counted in
    /// `corral_stale_refreshes_total`.
    pub(crate) async fn refresh_or_wait(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<(CacheMeta, HitHandler), Refresh> {
        let mk = l2.key(&key.combined());
        let outcome = match self.take_refresh_lock(l2, &mk).await {
            Read::Won(_) => Err(Refresh::Mine(refresh_lock_key(&mk))),
            Read::Busy => self.await_peer_copy(l2, key, validated).await,
            _ => Err(Refresh::Local),
        };
        let how = outcome
            .as_ref()
            .map_or_else(Refresh::label, |_| Refresh::Peer.label());
        metrics::STALE_REFRESHES.with_label_values(&[how]).inc();
        outcome
    }

    /// Whether this corral holds the refresh lock of the memcached key `mk`.
    pub(crate) fn refreshes(&self, mk: &str) -> bool {
        self.refreshing.holds(mk)
    }

    /// Try to take the cluster's refresh lock of the memcached key `mk` (noted in
    /// `refreshing` when won).
    pub(crate) async fn take_refresh_lock(&self, l2: &L2, mk: &str) -> Read {
        let read = l2.get(&refresh_lock_key(mk), Some(self.lock_timeout)).await;
        if let Read::Won(cas) = read {
            self.refreshing.take(mk.to_string(), cas);
        }
        read
    }

    /// Wait, bounded by `lock_timeout`, for a copy of `key` validated after `validated` to land
    /// in memcached (fresh, and covered by no purge), put it in L1 and answer with it.
    /// `Err(Mine)` if the corral that held the refresh lock gave it up without a copy (its
    /// refresh failed or was uncacheable): this corral took the lock over and refreshes.
    /// `Err(TimedOut)` if nothing came; `Err(Local)` if memcached cannot be trusted now.
    pub(crate) async fn await_peer_copy(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<(CacheMeta, HitHandler), Refresh> {
        let mk = l2.key(&key.combined());
        let mut backoff = Backoff::until(tokio::time::Instant::now() + self.lock_timeout);
        while backoff.wait().await {
            if let Some(fresh) = self.peer_copy(l2, key, validated).await? {
                return Ok(fresh);
            }
            if let Read::Won(_) = self.take_refresh_lock(l2, &mk).await {
                // the lock was given back: a copy that landed just before counts. Whatever
                // else comes (no copy, or memcached not to be trusted now), this corral holds
                // the lock and refreshes: the lock goes with the request, never lost here
                let lock = refresh_lock_key(&mk);
                if let Ok(Some(fresh)) = self.peer_copy(l2, key, validated).await {
                    self.refresh_done(lock);
                    return Ok(fresh);
                }
                return Err(Refresh::Mine(lock));
            }
        }
        Err(Refresh::TimedOut)
    }

    /// One look for a peer's copy of `key` validated after `validated`: fresh and covered by
    /// no purge, it goes into L1 and answers. `Err(Local)` if memcached cannot be trusted now.
    pub(crate) async fn peer_copy(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<Option<(CacheMeta, HitHandler)>, Refresh> {
        if !self.log.usable(l2).await {
            // purges elsewhere are unknown
            return Err(Refresh::Local);
        }
        let generation = self.l1.generation();
        let read = l2.get(&l2.key(&key.combined()), None).await;
        let Read::Hit(bytes) = read else { return Ok(None) };
        let Ok(rec) = record::decode(bytes) else {
            return Ok(None);
        };
        let (host, path) = memory::split_url(key.primary_key_str().unwrap_or(""));
        let purged = || {
            self.validity
                .check(&host, path, rec.meta.updated(), rec.filler, rec.meta.headers(), 0)
                != Verdict::Valid
        };
        // a copy refreshed before a purge that covers it (a soft one keeps it in memcached) is
        // no better than ours: wait for the refresh under way
        if rec.meta.updated() > validated && rec.meta.is_fresh(SystemTime::now()) && !purged() {
            return Ok(self.promote(key, rec, generation).await);
        }
        Ok(None)
    }

    /// This corral's refresh is over (stored, or failed): free the refresh lock at once, so
    /// the next time the entry goes stale a corral can take it without waiting for it to
    /// expire.
    ///
    /// When the refresh stored a copy, the L2 write already gave the lock back, right after
    /// the copy landed (so a corral that sees the lock gone finds the copy): nothing to do.
    pub fn refresh_done(&self, lock: String) {
        let held = lock
            .strip_suffix(REFRESH_SUFFIX)
            .and_then(|mk| self.refreshing.give_back(mk));
        if let (Some(cas), Some(l2)) = (held, self.l2.clone()) {
            tokio::spawn(async move {
                l2.delete_if(&lock, cas).await;
            });
        }
    }

    /// The refresh lock of `mk` (its key and CAS) if this corral holds it, handed to the L2
    /// write of the refreshed copy, which gives it back once the copy has landed.
    pub(crate) fn refresh_lock_for_write(&self, mk: &str) -> Option<(String, Option<u64>)> {
        self.refreshing
            .give_back(mk)
            .map(|cas| (refresh_lock_key(mk), cas))
    }

    /// L1 missed: read L2, one read per key at a time in this corral.
    pub(crate) async fn l2_lookup_coalesced(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mk = l2.key(&key.combined());
        let deadline = tokio::time::Instant::now() + self.lock_timeout;
        match self.inflight.enter(&mk, Some(deadline)).await {
            // waited as long as a lock waiter may: look up as if there were no L2
            None => Ok(None),
            Some(_pass) => match self.l1.lookup(key, trace).await? {
                // the read we waited for found it (or a fill started here meanwhile)
                Some(hit) => Ok(Some(hit)),
                None => self.l2_lookup(l2, key, deadline).await,
            },
        }
    }

    /// The lease read of `key` in L2 after an L1 miss: a hit is promoted into L1; a won lease
    /// makes this corral the one that fills (a miss); a lease held elsewhere makes it wait,
    /// with [`Backoff`] until `deadline`, for the value to land in L2 or in its own L1.
    async fn l2_lookup(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mut backoff = Backoff::until(deadline);
        // since when this request waits for another corral's fetch (a lock wait)
        let mut waiting: Option<std::time::Instant> = None;
        let waited = |waiting: Option<std::time::Instant>, had_it: bool| {
            if let Some(since) = waiting {
                metrics::lock_waited(since.elapsed(), had_it);
            }
        };
        if !self.log.usable(l2).await {
            // a purge elsewhere may cover what memcached holds and we cannot tell (the purge
            // log unread, or the fence up): do without L2
            metrics::L2_LOOKUPS.with_label_values(&["unavailable"]).inc();
            return Ok(None);
        }
        // one memcached operation: the generation and the purge log are followed in the
        // background (purge::log::Follower), every WATCH_INTERVAL
        let mk = l2.key(&key.combined());
        loop {
            // a copy read after a clear of L1 that began before the read is from before the
            // clear (promote)
            let generation = self.l1.generation();
            let read = l2.get(&mk, Some(self.lock_timeout)).await;
            match read {
                Read::Hit(bytes) => match record::decode(bytes) {
                    Ok(rec) => {
                        metrics::L2_LOOKUPS.with_label_values(&["hit"]).inc();
                        waited(waiting, true);
                        return Ok(self.promote(key, rec, generation).await);
                    }
                    Err(e) => {
                        metrics::L2_LOOKUPS.with_label_values(&["corrupt"]).inc();
                        warn!(key = %mk, error = %e, "undecodable value in memcached: treated as a miss");
                        waited(waiting, false);
                        return Ok(None);
                    }
                },
                Read::Won(cas) => {
                    self.leases.take(mk, cas);
                    metrics::L2_LOOKUPS
                        .with_label_values(&[if waiting.is_some() { "waited" } else { "miss" }])
                        .inc();
                    // the other fetch gave up its lease: this one fills
                    waited(waiting, false);
                    return Ok(None);
                }
                Read::Busy => {
                    // another corral is fetching it: wait for its value, bounded
                    waiting.get_or_insert_with(std::time::Instant::now);
                    if !backoff.wait().await {
                        metrics::L2_LOOKUPS.with_label_values(&["waited"]).inc();
                        waited(waiting, false);
                        return Ok(None);
                    }
                    // this corral may be filling it too (a request that arrived first)
                    if let Some(hit) = self
                        .l1
                        .lookup(key, &pingora_cache::trace::Span::inactive().handle())
                        .await?
                    {
                        waited(waiting, true);
                        return Ok(Some(hit));
                    }
                }
                Read::Miss => {
                    metrics::L2_LOOKUPS.with_label_values(&["miss"]).inc();
                    waited(waiting, false);
                    return Ok(None);
                }
                Read::Unavailable => {
                    metrics::L2_LOOKUPS.with_label_values(&["unavailable"]).inc();
                    waited(waiting, false);
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gate_is_forgotten_when_its_pass_drops_or_its_wait_is_cancelled() {
        let gates = Gates::default();
        let pass = gates.enter("k", None).await.expect("no deadline");
        assert_eq!(gates.len(), 1);
        // a waiter that gives up (timeout) and one whose future is dropped mid-wait
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(gates.enter("k", Some(soon)).await.is_none());
        {
            let waiting = gates.enter("k", None);
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
        }
        assert_eq!(gates.len(), 1, "the holder keeps it");
        drop(pass);
        assert!(gates.is_empty(), "nobody holds or awaits the gate: forgotten");
    }

    #[tokio::test]
    async fn a_gate_lets_one_holder_in_at_a_time() {
        let gates = Gates::default();
        let first = gates.enter("k", None).await.expect("no deadline");
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(
            gates.enter("k", Some(soon)).await.is_none(),
            "held: the second waits"
        );
        assert!(
            gates.enter("other", Some(soon)).await.is_some(),
            "keys are independent"
        );
        drop(first);
        assert!(gates.enter("k", Some(soon)).await.is_some());
    }

    #[tokio::test]
    async fn a_gate_is_forgotten_when_the_last_waiter_out_is_a_cancelled_one() {
        let gates = Gates::default();
        let pass = gates.enter("k", None).await.expect("no deadline");
        let waiting = Box::pin(gates.enter("k", None));
        let mut waiting = waiting;
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(pass);
        drop(waiting);
        assert!(gates.is_empty());
    }

    #[test]
    fn a_held_lock_is_forgotten_after_its_ttl_and_the_set_stays_bounded() {
        let ttl = Duration::from_millis(300);
        let held = Held::new(ttl);
        held.take("a".into(), Some(7));
        assert!(held.holds("a"));
        assert_eq!(held.give_back("a"), Some(Some(7)), "given back with its CAS");
        assert_eq!(held.give_back("a"), None, "given back once");
        held.take("b".into(), None);
        std::thread::sleep(ttl + Duration::from_millis(50));
        assert!(!held.holds("b"), "memcached dropped it: so does the set");
        assert!(held.is_empty());
        // locks never given back: the set sweeps itself instead of growing
        for i in 0..HELD_SWEEP_MIN - 1 {
            held.take(format!("lost{i}"), None);
        }
        std::thread::sleep(ttl + Duration::from_millis(50));
        held.take("fresh".into(), None);
        assert_eq!(held.len(), 1, "the expired ones were swept");
        assert!(held.holds("fresh"));
    }
}
