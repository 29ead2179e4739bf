//! The namespace's control keys in memcached: the generation and the purge log (its epoch,
//! sequence counter, records and checkpoint). Unlike cache entries, each lives on every server
//! and is read from all of them, with quorums, so that one server down or restarted neither
//! hides a purge nor stops the others from serving.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::future::join_all;
use memcache::exp::{Arithmetic, Get, Meta, Op, OpResult, Ttl};
use tracing::{info, warn};

use crate::metrics;

use super::{Server, L2, MAX_TTL};

/// Sequence numbers a purge log record is tried under before its purge is refused: each
/// try after the first follows a number that another purge's record took ([`L2::append_log`]).
const APPEND_TRIES: usize = 4;

/// Numbers below the one a bump took that a record is also written under, when the servers
/// answered the bump with different values ([`L2::append_log`]). More apart than this, the
/// lower one is a server that was down, which the bump brings up to the others.
const FILL_BELOW: u64 = 8;

/// How long the marker of a purge relayed from another log is kept once it is written, in
/// seconds: a week, as long as the bus keeps a queue nobody consumes (a message is not
/// delivered later than that).
const RELAY_MARKER_TTL: u32 = 7 * 24 * 3600;

/// How long a claim of a relay holds before it is written ([`L2::claim_relay`]), at least:
/// [`L2::relay_lease`] lengthens it with a long `op_timeout`. A corral that stops before it
/// writes the purge lets the claim lapse after this, and another corral of the site that saw
/// it held writes the purge instead ([`crate::cache::CacheParts::relay_remote`]).
pub const RELAY_LEASE_MIN_SECS: u32 = 30;

/// Memcached operations a claimer's writing of a relay takes at most, for
/// [`L2::relay_lease`]: three tries, each a log append (up to four bumps, each after a read
/// of the epoch, with its record and up to [`FILL_BELOW`] numbers filled) and a delete, with
/// margin.
const RELAY_WRITE_OPS: u32 = 150;

/// The marker's value while its claim holds: this word, the claiming corral's id and the
/// claim's lease in seconds. Once the purge is written it is [`RELAY_DONE`]; any other value
/// (`1`, the marker of an older corral, kept a week from its claim) counts as written.
const RELAY_CLAIMED: &str = "claimed";
const RELAY_DONE: &[u8] = b"done";

/// What [`L2::claim_relay`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayClaim {
    /// This corral claimed it, on the `server`-th server: it writes the purge, then marks it
    /// written there ([`L2::relay_written`]); if it cannot, the claim lapses.
    Mine { server: usize },
    /// Another corral claimed it on the `server`-th server and has not written it: `holder`
    /// is the claim (its corral and lease), `lease` how long it holds at most.
    Held {
        server: usize,
        holder: Bytes,
        lease: std::time::Duration,
    },
    /// Another corral wrote it.
    Written,
    /// No server answered (or not the one asked, and none of the others says it is written).
    Unreachable,
}
/// The epoch a replace of the purge log's epoch `current` writes: higher than it, so that
/// where a replace reached only some servers, the highest epoch (the one the servers' answers
/// agree on, [`L2::control_state`]) is the new one, and [`L2::restore_log`] puts it on
/// the others. Random above it, so that two corrals replacing at once pick different ones.
/// (Near `u64::MAX` it starts again low, and a raise could not write it over the higher one;
/// epochs start below 2^63 and climb by at most 2^32 a reset, so that takes 2^31 resets.)
pub fn next_log_epoch(current: u64, random: u64) -> u64 {
    current
        .checked_add(1 + (random >> 32))
        .unwrap_or(random >> 2)
        .max(1)
}

/// A control key's value as a number: `None` when absent or unreadable.
fn number(v: &Option<Vec<u8>>) -> Option<u64> {
    v.as_deref()
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
}

/// A batch's results, or its first failure when every operation failed (the connection did):
/// [`L2::with_server_at`] then counts the server's failure, as for a single operation.
fn failed_whole<T>(
    results: Vec<memcache::exp::Result<T>>,
) -> memcache::exp::Result<Vec<memcache::exp::Result<T>>> {
    if !results.iter().all(Result::is_err) {
        return Ok(results);
    }
    match results.into_iter().next() {
        Some(Err(e)) => Err(e),
        _ => Ok(Vec::new()),
    }
}

/// For each server's answer of the log's epoch (`None`: it did not answer), whether it holds
/// the epoch: the highest any holds (the newest, [`next_log_epoch`]), or none where no server
/// has a readable one (a new namespace: [`L2::control_state`] counts the same).
fn holding_epoch(answers: &[Option<Option<Vec<u8>>>]) -> Vec<bool> {
    let epoch = answers.iter().flatten().filter_map(number).max();
    answers
        .iter()
        .map(|a| a.as_ref().is_some_and(|a| holds(a, epoch)))
        .collect()
}

/// Whether a server whose answer of the log's epoch was `answer` holds `epoch`, the highest
/// any server holds. One with an unreadable value lacks it, even when no server has a
/// readable one (it would otherwise agree with "none" at every read, and the log be reset at
/// each).
fn holds(answer: &Option<Vec<u8>>, epoch: Option<u64>) -> bool {
    number(answer) == epoch && (epoch.is_some() || answer.is_none())
}

/// The distinct values among `answers` (each server's, `None` where it had none), in the
/// servers' order.
fn distinct<'a>(answers: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<Bytes> {
    let mut out: Vec<Bytes> = Vec::new();
    for v in answers.flatten() {
        if !out.iter().any(|o| o.as_ref() == v) {
            out.push(Bytes::copy_from_slice(v));
        }
    }
    out
}

/// A server's answer to a bump ([`L2::bump_counter_range`]): its log epoch, read just before
/// (`None`: unreadable; `Some(None)`: it has none), and the counter's new value.
type EpochAndBump = (Option<Option<Vec<u8>>>, Option<u64>);

/// What a bump took ([`L2::bump_counter_range`]).
struct Bumped {
    /// The value taken: the highest any server answered.
    top: u64,
    /// The lowest a server that holds the epoch answered.
    low: u64,
    /// For each server, whether it holds the log's epoch.
    holding: Vec<bool>,
    /// Whether a write quorum of those holds `top` (the servers behind raised): only then may
    /// the purge be acknowledged. Otherwise it is refused, but its record is still written
    /// under `top` (a number no record filled would be a gap every reader waits on, then
    /// drops its L1 for).
    held: bool,
}

/// What [`L2::raise_on`] is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raise {
    /// Only say whether the server's number is lower ([`Raised::Lower`]); write nothing.
    Check,
    /// Raise it, on its CAS; without a CAS (memcached `-C`), nothing is written.
    Up,
    /// Raise it, on its CAS; without one, set it blind (a reset's epoch, a counter behind
    /// another server's: it must land, and a concurrent write costs another reset or a
    /// skipped number at worst).
    Replace,
}

/// What [`L2::raise_on`] did with a server's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raised {
    /// It held as much or more: kept.
    Kept,
    /// It held less, or none, or an unreadable value (asked only to check).
    Lower,
    /// Set to the value.
    Set,
}

/// Who must answer a counter's bump for the value it took to be used ([`L2::bump_counter_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bump {
    /// A purge's: the log's counter for a record, the generation for a purge of everything.
    /// A read quorum of servers that hold the log's epoch, asked before the bump, so that the
    /// servers bumped share one with the write quorum of every purge acknowledged before: their
    /// highest number is above that purge's. A server restarted empty (lacking the epoch)
    /// counts from 1 again, and one that was down is behind, with nothing to bring it up until
    /// a bump reaches it with the others: a number they alone hand out may be one an earlier
    /// purge holds on the servers that do not answer, or one the corrals have read past (with
    /// two servers, a write quorum is one: a purge on each, one down and then the other, took
    /// one number or one generation). A record there would read as the only one under it, or
    /// not be read at all, and two purges of everything handed one generation are one.
    Purge,
    /// A reset's bump of the generation: a write quorum, whatever epoch the servers hold (a
    /// reset happens because they lost it; its floor, [`L2::raise_generation`], is above
    /// every generation seen).
    Reset,
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

impl L2 {
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
    /// parallel): for each server that answered, each key's value (`None` when it has none).
    async fn get_many_everywhere(&self, keys: &[String]) -> Vec<Vec<Option<Vec<u8>>>> {
        self.get_many_at(keys).await.into_iter().map(|(_, a)| a).collect()
    }

    /// [`Self::get_many_everywhere`], each answer with its server.
    async fn get_many_at(&self, keys: &[String]) -> Vec<(&Server, Vec<Option<Vec<u8>>>)> {
        let answers = join_all(self.inner.servers.iter().map(|server| async move {
            let results = self
                .with_server_at(server, "get", |c| async move {
                    failed_whole(c.run_many(keys.iter().map(Get::new)).await?)
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
                .map(|values| (server, values))
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// The control keys of the namespace in one pipelined read per server: the purge log's
    /// epoch (`None` when no server has it) and last sequence number, and the generation
    /// (counters: the highest any server has, absent = 0). `None` if no server answered.
    ///
    /// A counter's highest value counts (the read is complete) only once a write quorum of
    /// servers holding the epoch holds it: the servers that answered behind it are raised
    /// first. A corral follows the log past that number, or adopts that generation, and a
    /// purge is numbered by a read quorum of holders, which shares a server with that write
    /// quorum: it is handed a higher one. Without it, a value one server alone took (a bump
    /// refused after its `incr` landed there, or one whose raise of the others failed) was
    /// handed out again by the others once that server was down: a record under a number the
    /// corrals had read past, a purge of everything under a generation already adopted.
    pub async fn control_state(&self) -> Option<ControlState> {
        let keys = [self.log_epoch_key(), self.log_seq_key(), self.generation_key()];
        let answers = self.get_many_at(&keys).await;
        if answers.is_empty() {
            return None;
        }
        let top = |i: usize| {
            answers
                .iter()
                .map(|(_, a)| number(&a[i]).unwrap_or(0))
                .max()
                .unwrap_or(0)
        };
        let epoch = answers.iter().filter_map(|(_, a)| number(&a[0])).max();
        // a server counts toward the quorum only if it holds the log's epoch: one restarted
        // empty has lost the records it took, and must not stand in for them
        let agreeing = answers.iter().filter(|(_, a)| holds(&a[0], epoch)).count();
        let (log_seq, generation) = (top(1), top(2));
        let mut held = true;
        for (i, value) in [(1, log_seq), (2, generation)] {
            let holder = |a: &Vec<Option<Vec<u8>>>| holds(&a[0], epoch);
            let at = |a: &Vec<Option<Vec<u8>>>| number(&a[i]).unwrap_or(0) >= value;
            let holding = answers.iter().filter(|(_, a)| holder(a) && at(a)).count();
            if value == 0 || holding >= self.write_quorum() {
                continue;
            }
            let raised = join_all(
                answers
                    .iter()
                    .filter(|(_, a)| holder(a) && !at(a))
                    .map(|(server, _)| self.raise_on(server, &keys[i], value, Raise::Replace)),
            )
            .await;
            let now = holding + raised.iter().filter(|r| r.is_some()).count();
            held &= now >= self.write_quorum();
        }
        Some(ControlState {
            epoch,
            log_seq,
            generation,
            complete: agreeing >= self.read_quorum() && held,
            lacking: answers.len() - agreeing,
        })
    }

    /// Purge log records `from..=to` (at most a few hundred), in one pipelined read per
    /// server: for each number, every distinct record the servers that answered hold under it
    /// (empty: none holds one, expired or evicted, or one still being written). `None` if
    /// fewer than a read quorum (a majority) answered.
    pub async fn log_records(&self, from: u64, to: u64) -> Option<Vec<Vec<Bytes>>> {
        let keys: Vec<String> = (from..=to).map(|n| self.log_key(n)).collect();
        let answers = self.get_many_everywhere(&keys).await;
        // a majority, as for the control keys: a record acknowledged on a write quorum is on
        // one of them (two purges handed one number may each be on a server of its own)
        if answers.len() < self.read_quorum() {
            return None;
        }
        Some(
            (0..keys.len())
                .map(|i| distinct(answers.iter().map(|a| a[i].as_deref())))
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

    /// Whether a server that lost the log can be put back rather than the log reset: only
    /// when two write quorums always share a server (1, 3, 5 servers), so that no two
    /// records of one number were acknowledged on disjoint servers, of which the lost one
    /// may have held one (with 4: write quorum 2, records on two disjoint halves).
    pub fn can_put_back(&self) -> bool {
        2 * self.write_quorum() > self.inner.servers.len()
    }

    /// Servers that must take a purge log record or a counter bump for the purge to be
    /// acknowledged (1 of 1, 1 of 2, 2 of 3, 3 of 5).
    pub fn write_quorum(&self) -> usize {
        self.inner.servers.len() + 1 - self.read_quorum()
    }

    /// Increment a counter on every live server and bring laggards (a server that was down) up
    /// to the highest value, so it never goes backwards. Returns that value, `None` if the
    /// servers that took it are not the ones `who` asks for.
    async fn bump_counter(&self, key: &str, who: Bump) -> Option<u64> {
        self.bump_counter_range(key, who)
            .await
            .filter(|b| b.held)
            .map(|b| b.top)
    }

    /// [`Self::bump_counter`], with the lowest value a server that holds the log's epoch
    /// answered (below the value taken when two bumps reached the servers in opposite orders:
    /// each took the highest, and the number below it went to neither), and for each server
    /// whether it holds the epoch ([`Bumped`]).
    async fn bump_counter_range(&self, key: &str, who: Bump) -> Option<Bumped> {
        let k = key.as_bytes();
        // which servers hold the epoch, asked first: a purge refused then bumps nothing (a
        // number it took would be a gap every reader waits for, a generation a move of its own)
        let holding = match who {
            Bump::Reset => vec![true; self.inner.servers.len()],
            Bump::Purge => holding_epoch(&self.get_everywhere(self.log_epoch_key().as_bytes()).await),
        };
        let needed = match who {
            Bump::Purge => self.read_quorum(),
            Bump::Reset => 0,
        };
        let refused = |holders: usize| {
            metrics::PURGE_BUMPS_REFUSED.inc();
            warn!(
                key,
                holders,
                needed,
                "a purge (or a move of the namespace) is refused: too few memcached servers that hold the purge log answered (others are down, or restarted and not yet given the log back), and the number the rest hand out may be one an earlier purge took"
            );
        };
        let holders = holding.iter().filter(|h| **h).count();
        if holders < needed {
            refused(holders);
            return None;
        }
        // each server's epoch again, on the connection its bump goes on, just before it: a
        // server that restarts between the first read and the bump (a restart breaks the
        // connection) answers this one without the epoch, and its counter, from 1 again, does
        // not count as a holder's
        let epoch_key = self.log_epoch_key();
        let ek = epoch_key.as_bytes();
        let answers: Vec<Option<EpochAndBump>> =
            join_all(self.inner.servers.iter().map(|server| async move {
                let mut results = self
                    .with_server_at(server, "incr", |c| async move {
                        // created, and kept, without an expiry: a counter that vanished would
                        // read as 0
                        let bump = Arithmetic::new(k).delta(1).initial(1, MAX_TTL).ttl(Ttl::NEVER);
                        let results = c.run_batch([Op::from(Get::new(ek)), Op::from(bump)]).await?;
                        // (a transport failure is in each operation's result: the server's
                        // failure, so that its circuit opens as with a single operation)
                        failed_whole(results)
                    })
                    .await?
                    .into_iter();
                let epoch = match results.next()? {
                    Ok(OpResult::Get(r)) => {
                        let hit = r.hit();
                        Some(r.value.filter(|v| hit && !v.is_empty()))
                    }
                    _ => None,
                };
                let value = match results.next()? {
                    Ok(OpResult::Arithmetic(r)) => r.value,
                    _ => None,
                };
                Some((epoch, value))
            }))
            .await;
        let results: Vec<Option<u64>> = answers.iter().map(|a| a.as_ref().and_then(|(_, v)| *v)).collect();
        let holding = match who {
            Bump::Reset => holding,
            Bump::Purge => {
                let epochs: Vec<_> = answers
                    .iter()
                    .map(|a| a.as_ref().and_then(|(e, _)| e.clone()))
                    .collect();
                holding_epoch(&epochs)
            }
        };
        let on_holders = || {
            results
                .iter()
                .zip(&holding)
                .filter(|(_, h)| **h)
                .flat_map(|(r, _)| *r)
        };
        let top = results.iter().flatten().copied().max()?;
        // raised on its CAS, not set: a set landing after another bump raised it further would
        // take the counter back below a record that bump's purge holds there. (Also when the
        // bump is refused: the value it took on some servers is one the corrals may adopt;
        // they raise the others before they do, `control_state`)
        let raised = join_all(
            self.inner
                .servers
                .iter()
                .zip(&results)
                .zip(&holding)
                .filter(|((_, value), _)| value.is_some_and(|v| v < top))
                .map(|((server, _), holds)| async move {
                    self.raise_on(server, key, top, Raise::Replace).await.is_some() && *holds
                }),
        )
        .await;
        if on_holders().count() < needed {
            // (a holder stopped answering, or restarted, between the two)
            refused(on_holders().count());
            return None;
        }
        // the value taken is used at once by this corral (a generation, a record's number):
        // a write quorum of holders must hold it, as before a corral follows a value it read
        // (`control_state`), or a bump with those that hold it down would take it again
        let holding_top = on_holders().filter(|&v| v == top).count() + raised.iter().filter(|r| **r).count();
        let held = who == Bump::Reset || holding_top >= self.write_quorum();
        if !held {
            refused(holding_top);
        }
        if results.iter().filter(|r| r.is_some()).count() < self.write_quorum() {
            return None;
        }
        // (a server lacking the epoch counts from 1 again: not a number two bumps skipped)
        let low = on_holders().min().unwrap_or(top);
        Some(Bumped {
            top,
            low,
            holding,
            held,
        })
    }

    fn log_epoch_key(&self) -> String {
        format!("corral/{}/purgelog/epoch", self.inner.namespace)
    }

    /// Make `candidate` the purge log's epoch on every server: added where a server has none,
    /// written over a lower, empty or unreadable one (a corral that found the log reset tells
    /// every other one), on its CAS, a higher one kept: corrals that start or reset at once
    /// leave the highest of their epochs on every server, not each its own on some (every
    /// server lacking the others': reset again, and again). Returns the epoch now in place.
    /// `reset` is the log's last number the corrals follow it from after a reset, and the
    /// generation the reset moved the namespace to: each server's counter and generation are
    /// raised to them before the epoch is written there (a server restarted empty would
    /// otherwise hold the new epoch with a counter from 1, and a purge it numbers with another
    /// such server, the rest down, be one the corrals never read; or a generation from 0, and
    /// a purge of everything handed one the namespace had). `None`: a new
    /// namespace's epoch, added only where a server has none, so that of the corrals that
    /// start at once the first to write wins everywhere (with a raise, one that read its own
    /// epoch back before a higher one landed would see it change: a reset, and its first
    /// copies refetched).
    pub async fn set_log_epoch(&self, candidate: u64, reset: Option<(u64, u64)>) -> Option<u64> {
        let key = self.log_epoch_key();
        let seq_key = self.log_seq_key();
        let generation_key = self.generation_key();
        let k = key.as_bytes();
        let v = candidate.to_string();
        let v = v.as_bytes();
        join_all(self.inner.servers.iter().map(|server| async {
            match reset {
                None => {
                    self.with_server_at(server, "set", |c| async move {
                        c.set(k, v).ttl(Ttl::NEVER).add().send().await
                    })
                    .await;
                }
                Some((seq, generation)) => {
                    for (key, value) in [(&seq_key, seq), (&generation_key, generation)] {
                        if self.raise_on(server, key, value, Raise::Replace).await.is_none() {
                            return;
                        }
                    }
                    self.raise_on(server, &key, candidate, Raise::Replace).await;
                }
            }
        }))
        .await;
        self.control_state().await.and_then(|state| state.epoch)
    }

    /// Put the log back on every server that lacks its epoch (`state.epoch`, the highest the
    /// servers hold), so that they count toward the read quorum again: first its counter and
    /// the generation, raised to `state`'s (a server restarted empty has neither, and once it
    /// counts, the log's last numbers must not rest on the servers that had them alone: with
    /// its counter a number whose record it lost reads as a gap, covered by a floor, not as
    /// the end of the log), then the epoch. Each key is added where the server has none, and
    /// set over a lower or unreadable value on its CAS (a replace that reached only some
    /// servers leaves the epoch before it on the others; `add` could never move it, and the
    /// read quorum would stay out of reach: L2 fenced until a restart). A higher value is
    /// kept: a bump or a replace since the read. Replaces write epochs higher than the one
    /// they replace ([`next_log_epoch`]), so the highest is the newest. The caller does this
    /// only after a complete read (a read quorum holding the epoch), so that `state`'s
    /// counter is the log's.
    pub async fn restore_log(&self, state: &ControlState) {
        let Some(epoch) = state.epoch else {
            return;
        };
        let keys = [
            (self.log_seq_key(), state.log_seq),
            (self.generation_key(), state.generation),
            (self.log_restored_key(), state.log_seq),
            (self.log_epoch_key(), epoch),
        ];
        join_all(self.inner.servers.iter().map(|server| async {
            let [(seq_key, seq), (generation_key, generation), (restored_key, restored), (epoch_key, epoch)] =
                &keys;
            if self.raise_on(server, epoch_key, *epoch, Raise::Check).await != Some(Raised::Lower) {
                return;
            }
            // (the epoch last: a server counts only once it holds the rest, and the numbers
            // up to `restored` it answers "none" for may be records it lost: `fill_skipped`)
            let counters = [
                (seq_key, *seq),
                (generation_key, *generation),
                (restored_key, *restored),
            ];
            for (key, value) in counters {
                if self.raise_on(server, key, value, Raise::Up).await.is_none() {
                    return;
                }
            }
            if self.raise_on(server, epoch_key, *epoch, Raise::Up).await == Some(Raised::Set) {
                info!(server = %server.id, epoch, "purge log put back on a server that lacked it");
            }
        }))
        .await;
    }

    /// Raise the number under `key` on `server` to `value`: added where it has none, set over
    /// a lower or unreadable one on its CAS, a higher or equal one kept. `None` if the server
    /// did not answer, or the value moved meanwhile (a CAS or an `add` lost).
    async fn raise_on(&self, server: &Server, key: &str, value: u64, how: Raise) -> Option<Raised> {
        // a CAS lost to another writer is read again and tried again, a few times
        for _ in 0..3 {
            match self.raise_once(server, key, value, how).await? {
                Some(done) => return Some(done),
                None => continue,
            }
        }
        None
    }

    /// One try of [`Self::raise_on`]: `Some(None)` when a CAS or an `add` was lost.
    async fn raise_once(&self, server: &Server, key: &str, value: u64, how: Raise) -> Option<Option<Raised>> {
        let k = key.as_bytes();
        let held = self
            .with_server_at(server, "get", |c| async move {
                c.get(k).meta(Meta::NONE.cas()).send().await
            })
            .await?;
        let hit = held.hit();
        let number = number(&held.value).filter(|_| hit);
        if number.is_some_and(|n| n >= value) {
            return Some(Some(Raised::Kept));
        }
        if how == Raise::Check {
            return Some(Some(Raised::Lower));
        }
        let v = value.to_string();
        let v = v.as_bytes();
        let cas = held.item.cas.filter(|_| hit);
        if hit && matches!(cas, None | Some(0)) && how == Raise::Up {
            // memcached returns the CAS asked for, 0 when started with -C (CAS off): a set
            // on it would be blind, and could write over a replace made since the read
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    server = %server.id,
                    key,
                    "memcached gave no CAS (started with -C?): the purge log is not put back on a server that holds an older value of it (it does not count toward a complete read until it is reset)"
                );
            }
            return None;
        }
        let stored = self
            .with_server_at(server, "set", |c| async move {
                let set = c.set(k, v).ttl(Ttl::NEVER);
                match cas.filter(|&c| c != 0) {
                    Some(cas) => set.compare_cas(cas).send().await,
                    None if hit => set.send().await,
                    None => set.add().send().await,
                }
            })
            .await?;
        Some(stored.applied().then_some(Raised::Set))
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

    /// How long this corral's claims of relays hold ([`Self::claim_relay`]): at least
    /// [`RELAY_LEASE_MIN_SECS`], and longer than its writing of one can take with its
    /// `op_timeout` ([`RELAY_WRITE_OPS`] operations and the tries' waits). A claim carries its
    /// lease, so a watcher of another config waits as long as the claim holds.
    pub fn relay_lease(&self) -> u32 {
        let write = self.inner.op_timeout.as_secs_f64() * f64::from(RELAY_WRITE_OPS) + 2.0;
        RELAY_LEASE_MIN_SECS.max(write.ceil().min(f64::from(u32::MAX / 2)) as u32)
    }

    /// Claim the writing of another purge log's purge (`origin`'s message `seq`) to this
    /// namespace's log ([`crate::cache::CacheParts::relay_remote`]): every corral of a site
    /// receives it, one writes it. A marker added (`add`) on the first server that answers, in
    /// the configured order: every corral of the site asks the same one, so one claims it
    /// (two if they disagree on which servers are up, which costs a second record). The claim
    /// holds [`Self::relay_lease`]; the marker of a written purge is kept a week. A marker
    /// already there is read on that server: held or written.
    ///
    /// `on`: only that server (a watcher asks the one it saw the claim on: asking the next one
    /// while that one is down would claim the purge again while its claimer writes it). When
    /// it does not answer, the others are read for a marker that says written.
    pub async fn claim_relay(&self, origin: u64, seq: u64, on: Option<usize>) -> RelayClaim {
        let key = self.relay_key(origin, seq);
        let k = key.as_bytes();
        let lease = self.relay_lease();
        let claim = format!("{RELAY_CLAIMED} {} {lease}", crate::purge::corral_id());
        let claim = claim.as_bytes();
        let servers = self.inner.servers.iter().enumerate();
        for (i, server) in servers.filter(|(i, _)| on.is_none_or(|on| on == *i)) {
            let added = self
                .with_server_at(server, "set", |c| async move {
                    c.set(k, claim).ttl(Ttl::secs(lease)).add().send().await
                })
                .await;
            let Some(added) = added else {
                continue;
            };
            if added.applied() {
                return RelayClaim::Mine { server: i };
            }
            let marker = self
                .with_server_at(server, "get", |c| async move { c.get(k).send().await })
                .await;
            let held = |v: &[u8]| {
                let text = std::str::from_utf8(v).ok()?;
                let mut words = text.split(' ');
                (words.next()? == RELAY_CLAIMED).then_some(())?;
                let lease: u64 = words.nth(1)?.parse().ok()?;
                Some(std::time::Duration::from_secs(lease))
            };
            return match marker {
                Some(r) if r.hit() => match r.value.as_deref().map(|v| (v, held(v))) {
                    Some((v, Some(lease))) => RelayClaim::Held {
                        server: i,
                        holder: Bytes::copy_from_slice(v),
                        lease,
                    },
                    // done, or an older corral's marker
                    _ => RelayClaim::Written,
                },
                // lapsed since the add, or unread: asked again later
                _ => RelayClaim::Held {
                    server: i,
                    holder: Bytes::new(),
                    lease: std::time::Duration::from_secs(u64::from(lease)),
                },
            };
        }
        if on.is_some() {
            let written = self.get_everywhere(k).await;
            if written.iter().flatten().flatten().any(|v| v == RELAY_DONE) {
                return RelayClaim::Written;
            }
        }
        RelayClaim::Unreachable
    }

    /// Mark a relay this corral claimed on the `server`-th server ([`Self::claim_relay`]) as
    /// written, there, kept a week; if that server does not answer, on the first other one
    /// that does. If none takes it, the claim lapses and another corral may write the purge
    /// again: a second record.
    pub async fn relay_written(&self, origin: u64, seq: u64, server: usize) {
        let key = self.relay_key(origin, seq);
        let k = key.as_bytes();
        let servers = &self.inner.servers;
        let order = servers.get(server).into_iter().chain(
            servers
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != server)
                .map(|(_, s)| s),
        );
        for s in order {
            let set = self
                .with_server_at(s, "set", |c| async move {
                    c.set(k, RELAY_DONE).ttl(Ttl::secs(RELAY_MARKER_TTL)).send().await
                })
                .await;
            if set.is_some() {
                return;
            }
        }
    }

    fn relay_key(&self, origin: u64, seq: u64) -> String {
        format!("corral/{}/relayed/{origin}/{seq}", self.inner.namespace)
    }

    fn log_seq_key(&self) -> String {
        format!("corral/{}/purgelog/seq", self.inner.namespace)
    }

    fn log_key(&self, seq: u64) -> String {
        format!("corral/{}/purgelog/{seq}", self.inner.namespace)
    }

    /// Append a record to the namespace's purge log (on every live server). Returns its
    /// sequence number, or `None` if memcached could not take it.
    ///
    /// With several servers two purges can be handed one sequence number: the counter is
    /// bumped on each server, and the highest answer taken, so two bumps that reach the
    /// servers in opposite orders both read the same highest value. A record is therefore
    /// added (`add`: stored only where that number holds no record yet), never set over
    /// another one: each server keeps the first record written under a number. A purge whose
    /// record a write quorum of servers did not take bumps again, up to [`APPEND_TRIES`]
    /// times; one whose record some servers took and others did not (each kept the other
    /// purge's) is acknowledged, and the reads take every distinct record a number holds on
    /// the servers that answered ([`Self::log_records`]).
    ///
    /// Two bumps that reached the servers in opposite orders also leave the number below the
    /// one they took to neither: each writes its record there too, if it is free (`add`; at
    /// most [`FILL_BELOW`] numbers), or every reader would wait for it and then count it gone
    /// (a floor). A record is never set over another: after [`APPEND_TRIES`] numbers found
    /// taken the purge is refused (`None`: answered 503, to be retried). A record's age does
    /// not tell whether every corral applied it (clocks differ, readers fall behind), so even
    /// the records a counter lost alone hands out again are not written over: purges are
    /// refused until the counter passes them (each refusal moves it by [`APPEND_TRIES`]).
    pub async fn append_log(&self, record: &[u8]) -> Option<u64> {
        for _ in 0..APPEND_TRIES {
            let bumped = self.bump_counter_range(&self.log_seq_key(), Bump::Purge).await?;
            let (seq, low, holding) = (bumped.top, bumped.low, bumped.holding);
            let key = self.log_key(seq);
            let k = key.as_bytes();
            let added = join_all(self.inner.servers.iter().map(|server| {
                self.with_server_at(server, "set", |c| async move {
                    c.set(k, record).ttl(Ttl::secs(MAX_TTL)).add().send().await
                })
            }))
            .await;
            if seq > low && seq - low <= FILL_BELOW {
                self.fill_skipped(low, seq, record).await;
            }
            if !bumped.held {
                // refused, its number filled
                return None;
            }
            // (only servers that hold the epoch count: a complete read reaches them)
            let on_holders = || added.iter().zip(&holding).filter(|(_, holds)| **holds);
            let took = on_holders()
                .filter(|(r, _)| r.as_ref().is_some_and(|r| r.applied()))
                .count();
            if took >= self.write_quorum() {
                return Some(seq);
            }
            if on_holders().filter(|(r, _)| r.is_some()).count() < self.write_quorum() {
                // too few servers answered: not a number another purge took
                return None;
            }
            metrics::PURGE_LOG_SEQ_TAKEN.inc();
        }
        None
    }

    fn log_restored_key(&self) -> String {
        format!("corral/{}/purgelog/restored", self.inner.namespace)
    }

    /// Write `record` under the numbers `low..seq` that two bumps in opposite orders skipped:
    /// those no server that answers holds a record under, when the servers that can vouch for
    /// such a number are a read quorum (which overlaps the write quorum of any record under
    /// it). A server vouches for number `n` if it holds the log's epoch and was not put back
    /// at or after `n` ([`Self::restore_log`] marks up to where: a server restarted empty
    /// answers "none" for the records it lost). A number some server holds a record under is
    /// not skipped but missed by a server that was behind (the bump brought it up): filling
    /// it there would hide, from a reader of that server, the record it lacks, should the
    /// servers that hold it be lost (a gap reads as one, and is covered by a floor). Best
    /// effort: a number left empty costs a floor.
    async fn fill_skipped(&self, low: u64, seq: u64, record: &[u8]) {
        let mut keys = vec![self.log_epoch_key(), self.log_restored_key()];
        keys.extend((low..seq).map(|n| self.log_key(n)));
        let answers = self.get_many_everywhere(&keys).await;
        let epoch = answers.iter().filter_map(|a| number(&a[0])).max();
        let fill = (low..seq).zip(2..).filter(|&(n, i)| {
            let vouching = answers
                .iter()
                .filter(|a| epoch.is_some() && number(&a[0]) == epoch)
                // (an unreadable marker vouches for nothing)
                .filter(|a| a[1].is_none() || number(&a[1]).is_some_and(|restored| restored < n))
                .count();
            vouching >= self.read_quorum() && answers.iter().all(|a| a[i].is_none())
        });
        join_all(fill.map(|(_, i)| self.add_everywhere(keys[i].as_bytes(), record))).await;
    }

    /// Add `value` under `key` on every server that has none (`add`), best effort.
    async fn add_everywhere(&self, key: &[u8], value: &[u8]) {
        join_all(self.inner.servers.iter().map(|server| {
            self.with_server_at(server, "set", |c| async move {
                c.set(key, value).ttl(Ttl::secs(MAX_TTL)).add().send().await
            })
        }))
        .await;
    }

    /// Bump the namespace generation (purge everything): every L2 entry of the namespace
    /// becomes unreachable at once. Returns the new generation, or `None` if memcached failed
    /// or too few servers that hold the log answered ([`Bump::Purge`]).
    pub async fn bump_generation(&self) -> Option<u64> {
        self.bump_generation_as(Bump::Purge).await
    }

    /// A reset's [`Self::bump_generation`]: a write quorum of servers, whatever they hold.
    pub async fn bump_generation_for_reset(&self) -> Option<u64> {
        self.bump_generation_as(Bump::Reset).await
    }

    async fn bump_generation_as(&self, who: Bump) -> Option<u64> {
        let g = self.bump_counter(&self.generation_key(), who).await?;
        let old = self.inner.generation.fetch_max(g, Ordering::AcqRel);
        info!(namespace = %self.inner.namespace, from = old, to = g, "memcached namespace generation bumped");
        Some(g)
    }

    /// Raise the namespace generation to `floor` on every server (where it is lower) and in
    /// this corral: a reset's bump, above a generation a server that was down may still hold.
    /// Returns the generation now used, `None` if no write quorum took it.
    pub async fn raise_generation(&self, floor: u64) -> Option<u64> {
        let key = self.generation_key();
        let raised = join_all(
            self.inner
                .servers
                .iter()
                .map(|server| self.raise_on(server, &key, floor, Raise::Replace)),
        )
        .await;
        if raised.iter().flatten().count() < self.write_quorum() {
            return None;
        }
        let old = self.inner.generation.fetch_max(floor, Ordering::AcqRel);
        info!(namespace = %self.inner.namespace, from = old, to = floor, "memcached namespace generation raised");
        Some(old.max(floor))
    }

    fn upstream_generation_key(&self) -> String {
        format!("corral/{}/upstream-generation", self.inner.namespace)
    }

    /// The upstream generations of the namespace ([`crate::generation`]), oldest first, the
    /// current one last, as the first server that has them holds them; empty if none does.
    pub async fn upstream_generation(&self) -> Vec<String> {
        let key = self.upstream_generation_key();
        self.get_everywhere(key.as_bytes())
            .await
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|v| serde_json::from_slice::<Vec<String>>(&v).ok())
            .unwrap_or_default()
    }

    /// Record the namespace's upstream generations (the current one last), on every server.
    pub async fn set_upstream_generation(&self, seen: &[String]) {
        let key = self.upstream_generation_key();
        let value = serde_json::to_vec(seen).unwrap_or_default();
        self.set_everywhere(key.as_bytes(), &value).await;
    }

    /// Claim the move of the namespace for the change `change` (its text names the
    /// generations and the namespace generation it starts from): exactly one of the corrals
    /// that see the same change at once gets `Some(true)` (memcached `add` on one server);
    /// `None` if that server could not be asked.
    pub async fn claim(&self, change: &str) -> Option<bool> {
        use md5::{Digest, Md5};
        let digest = Md5::digest(change.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("corral/{}/claim/{hex}", self.inner.namespace);
        let k = key.as_bytes();
        self.with_server(k, "add", |c| async move {
            c.set(k, b"1").ttl(Ttl::secs(24 * 3600)).add().send().await
        })
        .await
        .map(|r| r.applied())
    }
}

#[cfg(test)]
mod tests {
    use super::{distinct, next_log_epoch};

    #[test]
    fn a_replaced_epoch_is_higher_than_the_one_it_replaces() {
        for (current, random) in [(1, 0), (1, u64::MAX), (u64::MAX / 2, 12345 << 32), (7, 1)] {
            assert!(next_log_epoch(current, random) > current, "{current} {random}");
        }
        // two corrals replacing at once pick different epochs (their random high halves)
        assert_ne!(next_log_epoch(5, 1 << 32), next_log_epoch(5, 2 << 32));
        // at the top it starts again low, never at 0 (no epoch)
        assert!(next_log_epoch(u64::MAX, 0) >= 1);
        assert!(next_log_epoch(u64::MAX - 3, u64::MAX) < u64::MAX / 2);
    }

    #[test]
    fn distinct_keeps_each_value_once_in_the_servers_order() {
        let (a, b): (&[u8], &[u8]) = (b"{\"a\":1}", b"{\"b\":2}");
        let got = distinct([Some(b), None, Some(a), Some(b)].into_iter());
        assert_eq!(
            got,
            vec![bytes::Bytes::from_static(b), bytes::Bytes::from_static(a)]
        );
        assert!(distinct([None, None].into_iter()).is_empty());
    }
}
