//! One request works for many: the locks of the tiered cache.
//!
//! | what | where | held by | given back |
//! |---|---|---|---|
//! | Pingora's cache lock | in process, per key | the request that fills | when its response ends; waiters time out after `lock_timeout` |
//! | the L2 read gate (`Tiered::inflight`) | in process, per memcached key | one L2 read | a drop guard (the gate is forgotten once unheld) |
//! | the fill lease | memcached, `mg <key> N<ttl>` | the corral whose read won it | the L2 write of the value, or [`Tiered::release_lease`] for an uncacheable answer; memcached forgets it after `lock_timeout` |
//! | the refresh lock | memcached, `<key>:refresh` | the corral that revalidates a stale copy | [`Tiered::refresh_done`], after the refreshed copy landed (or the refresh failed) |
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

use super::*;

/// The bounded wait for another request's work: 10 ms, doubling to 100 ms, until a deadline.
pub(super) struct Backoff {
    pause: Duration,
    deadline: tokio::time::Instant,
}

impl Backoff {
    pub(super) fn until(deadline: tokio::time::Instant) -> Self {
        Backoff {
            pause: Duration::from_millis(10),
            deadline,
        }
    }

    /// Sleep the next pause and return true; false at once if it would end past the deadline.
    pub(super) async fn wait(&mut self) -> bool {
        if tokio::time::Instant::now() + self.pause > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(100));
        true
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
    /// Give back the fill lease for `key` (the response turned out uncacheable), so other
    /// corrals stop waiting for a value that will never come.
    pub fn release_lease(&self, key: &CacheKey) {
        let Some(l2) = self.l2.clone() else { return };
        let mk = l2.key(&key.combined());
        if self.leases.remove(&mk).is_some() {
            tokio::spawn(async move {
                l2.delete(&mk).await;
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
    pub async fn refresh_once(&'static self, primary: &CacheKey, req: &RequestHeader) -> Refresh {
        let local = || {
            metrics::STALE_REFRESHES.with_label_values(&["local"]).inc();
            Refresh::Local
        };
        let Some(l2) = &self.l2 else {
            return local();
        };
        let Some((validated, variance)) = self.l1.stale_validated(primary, req, SystemTime::now()) else {
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
    pub(super) async fn revalidate_once(
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
        let gate = self.inflight.entry(mk.clone()).or_default().clone();
        let guard = gate.clone().lock_owned().await;
        let result = async {
            if self.refreshes(&mk) {
                return Ok(stale);
            }
            // the request before this one may have brought a fresh copy
            if let Some(hit) = self.l1.lookup(key, trace).await? {
                if hit.0.is_fresh(SystemTime::now()) {
                    return Ok(hit);
                }
            }
            let validated = memory::validated(&stale.1).unwrap_or_else(|| stale.0.updated());
            let mut stale = stale;
            match self.refresh_or_wait(l2, key, validated).await {
                Ok(fresh) => return Ok(fresh),
                Err(Refresh::Mine(lock)) => CompleteHit::set_refresh_lock(&mut stale.1, lock),
                Err(_) => {}
            }
            Ok(stale)
        }
        .await;
        drop(guard);
        drop(gate);
        self.inflight.remove_if(&mk, |_, g| Arc::strong_count(g) == 1);
        result
    }

    /// Take the cluster's refresh lock of `key` (`Err(Mine)`: this corral refreshes), or,
    /// if another corral holds it, wait for its copy ([`Self::await_peer_copy`]). Counted in
    /// `corral_stale_refreshes_total`.
    pub(super) async fn refresh_or_wait(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<(CacheMeta, HitHandler), Refresh> {
        let mk = l2.key(&key.combined());
        let outcome = match self.take_refresh_lock(l2, &mk).await {
            Read::Won => Err(Refresh::Mine(refresh_lock_key(&mk))),
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
    pub(super) fn refreshes(&self, mk: &str) -> bool {
        let held = self.refreshing.get(mk).map(|since| since.elapsed());
        match held {
            Some(for_) if for_ < self.lock_timeout => true,
            Some(_) => {
                // never given back (the request vanished): memcached has dropped it too
                self.refreshing.remove(mk);
                false
            }
            None => false,
        }
    }

    /// Try to take the cluster's refresh lock of the memcached key `mk` (noted in
    /// `refreshing` when won).
    pub(super) async fn take_refresh_lock(&self, l2: &L2, mk: &str) -> Read {
        let read = l2.get(&refresh_lock_key(mk), Some(self.lock_timeout)).await;
        if matches!(read, Read::Won) {
            self.refreshing.insert(mk.to_string(), std::time::Instant::now());
        }
        read
    }

    /// Wait, bounded by `lock_timeout`, for a copy of `key` validated after `validated` to land
    /// in memcached (fresh, and covered by no purge), put it in L1 and answer with it.
    /// `Err(Mine)` if the corral that held the refresh lock gave it up without a copy (its
    /// refresh failed or was uncacheable): this corral took the lock over and refreshes.
    /// `Err(TimedOut)` if nothing came; `Err(Local)` if memcached cannot be trusted now.
    pub(super) async fn await_peer_copy(
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
            if let Read::Won = self.take_refresh_lock(l2, &mk).await {
                // the lock was given back: a copy that landed just before counts
                if let Some(fresh) = self.peer_copy(l2, key, validated).await? {
                    self.refresh_done(refresh_lock_key(&mk));
                    return Ok(fresh);
                }
                return Err(Refresh::Mine(refresh_lock_key(&mk)));
            }
        }
        Err(Refresh::TimedOut)
    }

    /// One look for a peer's copy of `key` validated after `validated`: fresh and covered by
    /// no purge, it goes into L1 and answers. `Err(Local)` if memcached cannot be trusted now.
    pub(super) async fn peer_copy(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        validated: SystemTime,
    ) -> std::result::Result<Option<(CacheMeta, HitHandler)>, Refresh> {
        let current = l2.key_at(l2.generation(), &key.combined());
        let (read, moved, log_complete) = tokio::join!(
            l2.get(&current, None),
            self.adopt_generation(l2),
            self.pull_log(l2)
        );
        if moved || !log_complete {
            // a purge of everything dropped the entry, or bans elsewhere are unknown
            return Err(Refresh::Local);
        }
        let Read::Hit(bytes) = read else { return Ok(None) };
        let Ok(rec) = record::decode(bytes) else {
            return Ok(None);
        };
        let (host, path) = memory::split_url(key.primary_key_str().unwrap_or(""));
        let purged = || {
            self.validity
                .check(host, path, rec.meta.updated(), rec.meta.headers(), 0)
                != Verdict::Valid
        };
        // a copy refreshed before a purge that covers it (a soft one keeps it in memcached) is
        // no better than ours: wait for the refresh under way
        if rec.meta.updated() > validated && rec.meta.is_fresh(SystemTime::now()) && !purged() {
            return Ok(self.promote(key, rec));
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
            .is_some_and(|mk| self.refreshing.remove(mk).is_some());
        if let (true, Some(l2)) = (held, self.l2.clone()) {
            tokio::spawn(async move {
                l2.delete(&lock).await;
            });
        }
    }

    /// The refresh lock of `mk` if this corral holds it, handed to the L2 write of the
    /// refreshed copy, which gives it back once the copy has landed.
    pub(super) fn refresh_lock_for_write(&self, mk: &str) -> Option<String> {
        self.refreshing.remove(mk).map(|_| refresh_lock_key(mk))
    }

    /// L1 missed: read L2, one read per key at a time in this corral.
    pub(super) async fn l2_lookup_coalesced(
        &'static self,
        l2: &L2,
        key: &CacheKey,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let mk = l2.key(&key.combined());
        let deadline = tokio::time::Instant::now() + self.lock_timeout;
        let gate = self.inflight.entry(mk.clone()).or_default().clone();
        let result = match tokio::time::timeout_at(deadline, gate.clone().lock_owned()).await {
            // waited as long as a lock waiter may: look up as if there were no L2
            Err(_) => Ok(None),
            Ok(_guard) => match self.l1.lookup(key, trace).await? {
                // the read we waited for found it (or a fill started here meanwhile)
                Some(hit) => Ok(Some(hit)),
                None => self.l2_lookup(l2, key, deadline).await,
            },
        };
        drop(gate);
        // forget the gate once nobody holds or awaits it (the check runs under the map's lock,
        // so a lookup that is cloning it right now keeps it)
        self.inflight.remove_if(&mk, |_, g| Arc::strong_count(g) == 1);
        result
    }
}
