//! Every Prometheus metric corral exports, served on the admin listener at `/metrics`.
//!
//! Names are `corral_<noun>_<unit>`; counters end in `_total`; labels stay few.

use std::sync::LazyLock;

use prometheus::{
    register_gauge_vec, register_histogram, register_histogram_vec, register_int_counter,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec, GaugeVec, Histogram, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
};

/// Requests answered, by cache outcome (`hit`, `miss`, `stale`, `collapsed`, ...).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_requests_total",
        "Requests answered, by cache outcome",
        &["cache"]
    )
    .expect("metric registers once")
});

/// Requests sent to the upstream, by result (`ok`, `error`).
pub static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_upstream_requests_total",
        "Requests sent to the upstream, by result",
        &["result"]
    )
    .expect("metric registers once")
});

/// Time to answer a request, by cache outcome.
pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "corral_request_duration_seconds",
        "Time from request to the end of the response, by cache outcome",
        &["cache"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .expect("metric registers once")
});

/// Stale copies stale-if-error did not serve: a purge answered while the request was at the
/// origin covers them.
pub static STALE_REFUSED_PURGED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_stale_if_error_purged_total",
        "Stale copies not served on an upstream error because a purge answered meanwhile covers them"
    )
    .expect("metric registers once")
});

/// Each time the allocator gave its free pages back to the kernel ([`crate::trim`]), how long
/// it took: the longest time a worker may wait for an arena meanwhile.
pub static ALLOCATOR_TRIM_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "corral_allocator_trim_duration_seconds",
        "Time malloc_trim took each time L1's freed memory was given back to the kernel (it locks each arena in turn)",
        vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]
    )
    .expect("metric registers once")
});

/// Hits answered by the fast hit path (plain requests for fresh, variant-free L1 entries).
pub static FAST_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_fast_hits_total",
        "Hits answered by the fast path, without Pingora's cache state machine"
    )
    .expect("metric registers once")
});

/// Of the fast hits, those answered on an HTTP/1 connection before Pingora's session
/// ([`crate::proxy::FrontHits`]).
pub static FRONT_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_front_hits_total",
        "Fast hits answered on an HTTP/1 connection before Pingora's session (also in corral_fast_hits_total)"
    )
    .expect("metric registers once")
});

/// Entries invalidated by a successful unsafe request (RFC 9111 §4.4).
pub static INVALIDATIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_invalidations_total",
        "Stored entries invalidated by a successful POST/PUT/DELETE/PATCH to their URL"
    )
    .expect("metric registers once")
});

/// Invalidations by a successful unsafe request that L1 did not keep: the bound on them was
/// reached (the stored copies were removed all the same).
pub static INVALIDATIONS_UNRECORDED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_invalidations_unrecorded_total",
        "Unsafe-method invalidations L1 did not keep, the bound on them reached"
    )
    .expect("metric registers once")
});

/// Bytes held by the L1 memory tier (bodies + headers + overhead).
pub static L1_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("corral_l1_bytes", "Bytes held by the L1 memory tier").expect("metric registers once")
});

/// Entries held by the L1 memory tier.
pub static L1_ENTRIES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("corral_l1_entries", "Entries held by the L1 memory tier")
        .expect("metric registers once")
});

/// Entries evicted from L1 to respect `memory_bytes`; under `cache.eviction = "tinyufo"` or
/// `"s3fifo"`, also the fills it did not admit (stored, then dropped at once).
pub static L1_EVICTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("corral_l1_evicted_entries", "Entries evicted from L1 since start")
        .expect("metric registers once")
});

/// Origins (`scheme://host`) numbered in L1's table of URL origins: at most 1,024, after which
/// entries of other origins keep their URL whole (about 20 bytes more each).
pub static L1_ORIGINS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_l1_origins",
        "Origins numbered in L1's table of URL origins (at most 1024 until a restart)"
    )
    .expect("metric registers once")
});

/// The memcached namespace generation this corral uses (its L2 keys'): moved by a purge of
/// everything, a new upstream generation, or a reset of the purge log.
pub static L2_GENERATION: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_l2_generation",
        "The memcached namespace generation this corral's L2 keys are under"
    )
    .expect("metric registers once")
});

/// Client connections open on the proxy listener.
pub static CONNECTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_connections",
        "Client connections open on the proxy listener"
    )
    .expect("metric registers once")
});

/// Client connections refused because `server.max_connections` were open.
pub static CONNECTIONS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_connections_refused_total",
        "Client connections answered 503 and closed because server.max_connections were open"
    )
    .expect("metric registers once")
});

/// Client connections closed by a timeout, by `kind` (`header`; idle keep-alive connections
/// are closed by Pingora, uncounted).
pub static CONNECTION_TIMEOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_connection_timeouts_total",
        "Client connections closed because a request head took longer than server.header_timeout (kind=header)",
        &["kind"]
    )
    .expect("metric registers once")
});

/// Requests holding one of the `upstream.max_connections` slots.
pub static UPSTREAM_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_upstream_active",
        "Requests to the upstream in progress (at most upstream.max_connections)"
    )
    .expect("metric registers once")
});

/// Requests answered 503 because every upstream slot was taken and the queue was full or
/// the wait ran out.
pub static UPSTREAM_BUSY: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_upstream_busy_total",
        "Requests answered 503 because upstream.max_connections were busy and the queue was full or timed out"
    )
    .expect("metric registers once")
});

/// Per-outcome handles, resolved once: `with_label_values` hashes the label on every call.
pub struct OutcomeMetrics {
    pub requests: IntCounter,
    pub seconds: prometheus::Histogram,
}

/// [`OutcomeMetrics`] for `label`, from a small fixed table of every outcome label (an
/// unknown one, a bug, is counted as `error` rather than leaking a handle per call).
pub fn for_outcome(label: &'static str) -> &'static OutcomeMetrics {
    static TABLE: LazyLock<Vec<(&'static str, &'static OutcomeMetrics)>> = LazyLock::new(|| {
        crate::cache_status::Outcome::ALL
            .iter()
            .map(|o| o.as_str())
            .chain(["error", "purge", "refused"])
            .map(|l| (l, &*Box::leak(Box::new(resolve(l)))))
            .collect()
    });
    let find = |wanted: &str| TABLE.iter().find(|(l, _)| *l == wanted).map(|(_, m)| *m);
    debug_assert!(find(label).is_some(), "unknown outcome label {label}");
    find(label)
        .or_else(|| find("error"))
        .expect("error is in the table")
}

fn resolve(label: &str) -> OutcomeMetrics {
    OutcomeMetrics {
        requests: REQUESTS.with_label_values(&[label]),
        seconds: REQUEST_SECONDS.with_label_values(&[label]),
    }
}

/// memcached operations by `op` (`get`, `set`, `delete`) and `result` (`ok`, `skipped`).
pub static L2_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_l2_requests_total",
        "memcached operations, by op and result (skipped = server's circuit open)",
        &["op", "result"]
    )
    .expect("metric registers once")
});

/// memcached failures by `op`: transport errors, timeouts, refusals.
pub static L2_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("corral_l2_errors_total", "memcached failures, by op", &["op"])
        .expect("metric registers once")
});

/// L2 lookups by result: `hit`, `miss`, `corrupt` (undecodable value), `unavailable`, `waited`.
pub static L2_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_l2_lookups_total",
        "L2 lookups after an L1 miss, by result",
        &["result"]
    )
    .expect("metric registers once")
});

/// memcached servers whose circuit is open (considered down).
pub static L2_SERVERS_DOWN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_l2_servers_down",
        "memcached servers currently skipped as down"
    )
    .expect("metric registers once")
});

/// Purge requests by kind (`url`, `ban`, `tags`, `tag-pattern`, `all`) and result
/// (`ok`, `refused` = not allowed, `invalid` = malformed).
pub static PURGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_purges_total",
        "Purge requests, by kind and result",
        &["kind", "result"]
    )
    .expect("metric registers once")
});

/// Ban and tag records kept (checked on hits until the sweeper lets them expire).
pub static PURGE_RECORDS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_purge_records",
        "URL, ban and tag purge records kept, checked against entries older than them"
    )
    .expect("metric registers once")
});

/// Heap bytes held by the purge records (outside `memory_bytes`).
pub static PURGE_RECORD_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_purge_record_bytes",
        "Heap bytes held by the URL, ban and tag purge records kept (estimated from their sizes)"
    )
    .expect("metric registers once")
});

/// The sequence number of the last record of memcached's purge log applied here.
pub static PURGE_LOG_APPLIED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_purge_log_applied",
        "Sequence number of the last record of memcached's purge log this corral applied"
    )
    .expect("metric registers once")
});

/// Keys in each per-key lock map (`leases`, `refreshing`, `gates`): all of them go back to 0
/// when no request is in flight, whatever the requests' fate.
pub static LOCK_ENTRIES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_lock_entries",
        "Keys held in each per-key lock map of this corral (fill leases, refresh locks, L2 read gates)",
        &["map"]
    )
    .expect("metric registers once")
});

/// Values not written to memcached (or deleted right after) because a purge accepted while
/// they were fetched covers them.
pub static L2_WRITES_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_l2_writes_purged_total",
        "Values kept out of memcached (or deleted right after) because a purge accepted during their fetch covers them, or that could not be checked"
    )
    .expect("metric registers once")
});

/// Times memcached's purge log was found reset (restart, flush, eviction of its counter).
pub static PURGE_LOG_RESETS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_purge_log_resets_total",
        "Times memcached's purge log was found reset; everything validated before was treated as purged"
    )
    .expect("metric registers once")
});

/// 1 while this corral is fenced (it cannot confirm memcached's purge log).
pub static FENCED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_fenced",
        "1 while this corral cannot confirm memcached's purge log and revalidates its L1 copies before use"
    )
    .expect("metric registers once")
});

/// Times the fence went up.
pub static FENCES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_fences_total",
        "Times this corral went without confirming memcached's purge log for purge.max_unconfirmed"
    )
    .expect("metric registers once")
});

/// Hits that the fence sent upstream for revalidation.
pub static FENCED_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_fenced_revalidations_total",
        "L1 copies revalidated upstream before use because the fence was up"
    )
    .expect("metric registers once")
});

/// Ban and tag records dropped because no entry older than them remains.
pub static PURGE_RECORDS_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_purge_records_expired_total",
        "Ban and tag purge records dropped once no entry older than them could remain"
    )
    .expect("metric registers once")
});

/// Revalidations of stale entries (in the background within grace, for waiting clients past
/// it), by who refreshed (`mine`: this corral, holding
/// the cluster's refresh lock; `peer`: another corral, whose copy was taken from memcached;
/// `timeout`: the other corral's copy did not come within lock_timeout; `local`: no memcached,
/// or it is unavailable: refreshed here as without L2).
pub static STALE_REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_stale_refreshes_total",
        "Revalidations of stale entries, by who refreshed (mine, peer, timeout, local)",
        &["how"]
    )
    .expect("metric registers once")
});

/// Passes of the ban sweeper over L1.
pub static SWEEPS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_sweeper_passes_total",
        "Passes of the ban sweeper over L1 (run when purge records arrived or were held back)"
    )
    .expect("metric registers once")
});

/// What the ban sweeper did to L1 entries (`checked`, `removed`, `stale`).
pub static SWEPT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_sweeper_entries_total",
        "L1 entries the ban sweeper checked, removed (hard purge) or marked stale (soft purge)",
        &["result"]
    )
    .expect("metric registers once")
});

/// Whether each peer is up (1) or failed and backing off (0).
pub static PEER_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_peer_up",
        "Whether each peer corral is up (1) or failed and left alone until peers.retry_delay (0)",
        &["peer"]
    )
    .expect("metric registers once")
});

/// Purge messages waiting for each peer.
pub static PEER_BACKLOG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_peer_backlog",
        "Purge messages queued for each peer corral, not delivered yet",
        &["peer"]
    )
    .expect("metric registers once")
});

/// Purge messages each peer took.
pub static PEER_DELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_peer_delivered_total",
        "Purge messages delivered to each peer corral",
        &["peer"]
    )
    .expect("metric registers once")
});

/// Failed delivery attempts per peer.
pub static PEER_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_peer_failures_total",
        "Delivery attempts to each peer corral that failed (connect error, timeout, non-2xx)",
        &["peer"]
    )
    .expect("metric registers once")
});

/// Backlogs discarded for a "drop your cache" message.
pub static PEER_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_peer_backlog_dropped_total",
        "Times a peer's backlog overflowed peers.backlog and was replaced by one 'drop your cache' message",
        &["peer"]
    )
    .expect("metric registers once")
});

/// The last delivery's round trip per peer.
pub static PEER_LAST_DELIVERY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "corral_peer_last_delivery_seconds",
        "Round trip of the last successful delivery to each peer corral",
        &["peer"]
    )
    .expect("metric registers once")
});

/// Messages received from peers, by what became of them.
pub static PEER_RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_peer_received_total",
        "Purge messages received from peer corrals: applied, duplicate, own (this corral's); refused and invalid count requests",
        &["result"]
    )
    .expect("metric registers once")
});

/// Jumps in a peer's sequence numbers.
pub static PEER_GAPS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_peer_gaps_total",
        "Times a peer's purge messages were found missing: everything validated before was treated as purged"
    )
    .expect("metric registers once")
});

/// Times the local cache was dropped, by reason.
pub static CACHE_DROPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_cache_drops_total",
        "Times this corral emptied its L1 because it could no longer vouch for it, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});

/// The upstream generation this corral holds as current (1), and those it held (0).
pub static UPSTREAM_GENERATION: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_upstream_generation_info",
        "The upstream's generation ([generation] header or url): 1 for the current one",
        &["generation"]
    )
    .expect("metric registers once")
});

/// Responses of an older upstream generation, served and not stored.
pub static GENERATION_SUPERSEDED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_generation_superseded_total",
        "Responses carrying an older upstream generation than the current one (mid-deploy): served, not stored"
    )
    .expect("metric registers once")
});

/// Webhook deliveries of events, by result.
pub static WEBHOOKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_webhook_deliveries_total",
        "Events POSTed to generation.webhooks: ok, failed (after every retry), dropped (queue full)",
        &["result"]
    )
    .expect("metric registers once")
});

/// Whether the message bus is connected.
pub static BUS_CONNECTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_bus_connected",
        "1 while the AMQP message bus ([bus]) is connected"
    )
    .expect("metric registers once")
});

/// Purge messages published to the bus (attempts).
pub static BUS_PUBLISHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_published_total",
        "Purge messages published to the message bus (attempts)"
    )
    .expect("metric registers once")
});

/// Publishes the broker confirmed.
pub static BUS_CONFIRMED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_confirmed_total",
        "Purge messages the broker confirmed"
    )
    .expect("metric registers once")
});

/// Publishes the broker refused.
pub static BUS_NACKED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_nacked_total",
        "Purge messages the broker refused (nack); retried"
    )
    .expect("metric registers once")
});

/// Purges waiting in the outbox.
pub static BUS_OUTBOX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "corral_bus_outbox",
        "Purge messages waiting to be published and confirmed"
    )
    .expect("metric registers once")
});

/// Purges the outbox could not keep.
pub static BUS_OUTBOX_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_outbox_dropped_total",
        "Purge messages dropped from a full outbox (receivers see the gap and drop their caches)"
    )
    .expect("metric registers once")
});

/// Messages taken from this corral's queue.
pub static BUS_CONSUMED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_consumed_total",
        "Messages consumed from this corral's queue"
    )
    .expect("metric registers once")
});

/// Of those, the purges applied (not duplicates or this corral's own).
pub static BUS_APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_bus_applied_total",
        "Purges from the message bus applied here (not duplicates, not this corral's own)"
    )
    .expect("metric registers once")
});

/// Purge log records dated ahead of this clock by more than `purge.clock_skew`.
pub static PURGE_RECORDS_AHEAD: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_purge_records_ahead_total",
        "Purge log records dated further ahead than purge.clock_skew (counted from now + the skew instead)"
    )
    .expect("metric registers once")
});

/// Purge log records not taken under their sequence number because another purge's record
/// held it on enough servers (two purges handed one number by servers bumped in opposite
/// orders, or numbers handed out again by a counter lost alone): the record was tried under
/// the next number, or, after the fourth, the purge refused.
pub static PURGE_LOG_SEQ_TAKEN: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_purge_log_seq_taken_total",
        "Purge log records whose sequence number another purge's record held (tried under the next one; after the fourth the purge is refused)"
    )
    .expect("metric registers once")
});

/// Purges refused (answered 503, to be retried) because too few of the memcached servers
/// that answered their counter's bump hold the purge log's epoch: the others are down, or
/// restarted and not yet given the log back, and the number the bump took may be one an
/// earlier purge holds on the servers that do not answer.
pub static PURGE_BUMPS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "corral_purge_bumps_refused_total",
        "Purges refused because too few memcached servers holding the purge log answered their counter's bump"
    )
    .expect("metric registers once")
});

/// Purges received over the bus from a corral of another purge log (another site's
/// memcached), by what became of writing them to this corral's: `relayed` (this corral wrote
/// it), `other` (another corral of this site did), `failed` (memcached could not take it).
pub static PURGE_RELAYS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_purge_relays_total",
        "Purges from another site's corral written to this site's memcached, by result (relayed, other, failed)",
        &["result"]
    )
    .expect("metric registers once")
});

/// Render every registered metric in the Prometheus text format.
/// Time from the request sent upstream to the response header (time to first byte).
pub static UPSTREAM_FIRST_BYTE_SECONDS: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        "corral_upstream_first_byte_seconds",
        "Time from the request sent to the upstream to its response header (time to first byte)",
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric registers once")
});

/// Requests that waited for another request's fetch of the same key (the cache lock), by
/// result: `collapsed` (served what it stored), `timeout` (waited `lock_timeout`, then went).
pub static LOCK_WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_lock_waits_total",
        "Requests that waited for another request's fetch of the same key, by result",
        &["result"]
    )
    .expect("metric registers once")
});

/// How long those requests waited.
pub static LOCK_WAIT_SECONDS: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        "corral_lock_wait_seconds",
        "How long a request waited for another request's fetch of the same key",
        vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .expect("metric registers once")
});

/// A request waited `waited` for another request's fetch of the same key, and then had it
/// (`collapsed`) or gave up (`timeout`).
pub fn lock_waited(waited: std::time::Duration, had_it: bool) {
    LOCK_WAITS
        .with_label_values(&[if had_it { "collapsed" } else { "timeout" }])
        .inc();
    LOCK_WAIT_SECONDS.observe(waited.as_secs_f64());
}

/// memcached operations by server and result (`ok`, `error`, `skipped`).
pub static L2_SERVER_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_l2_server_requests_total",
        "memcached operations, by server and result (skipped = the server's circuit is open)",
        &["server", "result"]
    )
    .expect("metric registers once")
});

/// memcached operation latency by op, answered or failed (skipped ones are not timed).
pub static L2_OP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "corral_l2_op_duration_seconds",
        "memcached operation time, by op (answered or failed; skipped ones are not timed)",
        &["op"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
    )
    .expect("metric registers once")
});

/// 1 while corral uses a memcached server (circuit closed), 0 while it skips it.
pub static L2_SERVER_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_l2_server_up",
        "1 while corral uses the memcached server (circuit closed), 0 while it skips it",
        &["server"]
    )
    .expect("metric registers once")
});

/// Config reloads (`SIGHUP`, `POST /reload`), by result (`ok`, `unchanged`, `invalid`).
pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "corral_config_reloads_total",
        "Config reloads (SIGHUP, POST /reload), by result",
        &["result"]
    )
    .expect("metric registers once")
});

/// `corral_config_info{hash} 1`: the config in use (its hash, as `/config` and `/stats` show).
static CONFIG_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "corral_config_info",
        "The config in use: its hash (as /config shows it)",
        &["hash"]
    )
    .expect("metric registers once")
});

/// `corral_build_info{version} 1`.
static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("corral_build_info", "corral's version", &["version"])
        .expect("metric registers once")
});

/// The config in use is `new` (replacing `old`'s series).
pub fn set_config_hash(old: Option<&str>, new: &str) {
    if let Some(old) = old.filter(|o| *o != new) {
        let _ = CONFIG_INFO.remove_label_values(&[old]);
    }
    CONFIG_INFO.with_label_values(&[new]).set(1);
}

/// Set `corral_build_info`. The process metrics (`process_resident_memory_bytes`,
/// `process_open_fds`, `process_cpu_seconds_total`, ...) come with the default registry: the
/// prometheus crate registers its process collector there (feature `process`).
pub fn register_process() {
    BUILD_INFO.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
}

/// A counter family's values by label values (joined with `:` when there are several),
/// summed over the labels not in `keep` (indices into the label list).
pub fn counts(family: &IntCounterVec, keep: &[usize]) -> std::collections::BTreeMap<String, u64> {
    use prometheus::core::Collector;
    let mut out = std::collections::BTreeMap::new();
    for mf in family.collect() {
        for m in mf.get_metric() {
            let labels = m.get_label();
            let key: Vec<&str> = keep
                .iter()
                .filter_map(|&i| labels.get(i).map(|l| l.get_value()))
                .collect();
            *out.entry(key.join(":")).or_insert(0) += m.get_counter().get_value() as u64;
        }
    }
    out
}

pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}
