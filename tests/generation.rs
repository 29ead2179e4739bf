//! Issue 12: a change of the upstream's generation (`[generation] header`, or the polled
//! `url`) drops the local cache, moves memcached's namespace generation once for the whole
//! site, and says so: one ERROR log line, `corral_cache_drops_total{reason}`, a webhook POST
//! and a line on the admin listener's `GET /events`. The first generation is adopted quietly;
//! the same value again, a missing header and a restart are no change; an older value seen
//! again is served but not stored, and becomes a rollback only after `settle`.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use pingora_cache::key::CacheHashKey;
use serde_json::Value;

/// Every corral of the site sees the site's Host, whatever address the client dialled.
const SITE: (&str, &str) = ("host", "www.site.test");
/// The memcached namespace of the tests that use memcached.
const NS: &str = "t";

const HEADER_MODE: &str = "[generation]\nheader = \"X-Generation\"";

const UPSTREAM_DROPS: &str = "corral_cache_drops_total{reason=\"upstream-generation\"}";
const NAMESPACE_DROPS: &str = "corral_cache_drops_total{reason=\"namespace-generation\"}";
const SUPERSEDED: &str = "corral_generation_superseded_total";
const WEBHOOK_OK: &str = "corral_webhook_deliveries_total{result=\"ok\"}";
const UPSTREAM_LINE: &str = "dropping stale cache: upstream-generation";
const NAMESPACE_LINE: &str = "dropping stale cache: namespace-generation";

/// A corral sharing memcached follows its namespace generation every 250 ms: within this long
/// of another corral's drop, it has dropped too.
const FOLLOW: Duration = Duration::from_secs(2);
/// How long the tests wait to show that something does not happen.
const QUIET: Duration = Duration::from_millis(300);
/// Generous bound for things that happen at once (a drop after the response that caused it).
const SOON: Duration = Duration::from_secs(5);

/// Each test starts its own corrals, and several measure how soon something happens: one at a
/// time, so that a debug build on a 2-core machine is not also running another test's corrals.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The generation the origin answers with, switched by the test.
#[derive(Clone)]
struct Generation(Arc<Mutex<String>>);

impl Generation {
    fn new(g: &str) -> Generation {
        Generation(Arc::new(Mutex::new(g.to_string())))
    }
    fn set(&self, g: &str) {
        *self.0.lock().unwrap() = g.to_string();
    }
    fn get(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// `path` answers `<path> <generation> #<n>`, fresh for 300 s, with `X-Generation:
/// <generation>` (the generation at the time of the request).
fn page(origin: &Origin, generation: &Generation, path: &str) {
    let (generation, p) = (generation.clone(), path.to_string());
    origin.route(path, move |s| {
        let g = generation.get();
        Reply::ok(format!("{p} {g} #{}", s.n))
            .header("cache-control", "max-age=300")
            .header("X-Generation", g)
    });
}

fn pages(origin: &Origin, generation: &Generation, paths: &[&str]) {
    for p in paths {
        page(origin, generation, p);
    }
}

/// `path` answers `<path> #<n>`, fresh for 300 s, without a generation header.
fn plain_page(origin: &Origin, path: &str) {
    let p = path.to_string();
    origin.route(path, move |s| {
        Reply::ok(format!("{p} #{}", s.n)).header("cache-control", "max-age=300")
    });
}

async fn get(proxy: &Proxy, path: &str) -> Got {
    get_with(&proxy.url(path), &[SITE]).await
}

/// Fetch `path` twice: the second must be a hit with the same body. Returns the first.
async fn cached(proxy: &Proxy, path: &str) -> Got {
    let first = get(proxy, path).await;
    assert_eq!(first.status, 200, "{path}: {first:?}");
    let again = get(proxy, path).await;
    assert!(
        again.cache.starts_with("corral; hit"),
        "{path} cached at {}: {}",
        proxy.addr,
        again.cache
    );
    assert_eq!(again.body, first.body, "{path}");
    first
}

async fn miss(proxy: &Proxy, path: &str, what: &str) -> Got {
    let got = get(proxy, path).await;
    assert!(
        got.cache.contains("fwd=miss"),
        "{what}: {path} at {} must be a miss: {}",
        proxy.addr,
        got.cache
    );
    got
}

async fn counter(proxy: &Proxy, series: &str) -> f64 {
    metric(&proxy.metrics().await, series)
}

/// Wait (at most `limit`) until `series` reaches `want` at `proxy`, then check it is exactly
/// `want` (no second drop, no duplicate).
async fn reaches(proxy: &Proxy, series: &str, want: f64, limit: Duration, what: &str) {
    eventually(limit, what, || async { counter(proxy, series).await >= want }).await;
    assert_eq!(counter(proxy, series).await, want, "{what}: {series}");
}

/// `corral_upstream_generation_info{generation="<g>"}`.
fn info(g: &str) -> String {
    format!("corral_upstream_generation_info{{generation=\"{g}\"}}")
}

/// The sum of every `corral_cache_drops_total{reason=...}` series: drops for any reason.
fn all_drops(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("corral_cache_drops_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

fn lines_with(log: &str, text: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(text))
        .map(str::to_string)
        .collect()
}

/// Wait for `n` log lines containing `text` at `proxy`, check there are exactly `n`, return them.
async fn logged(proxy: &Proxy, text: &str, n: usize) -> Vec<String> {
    eventually(SOON, text, || async {
        lines_with(&proxy.log_text(), text).len() >= n
    })
    .await;
    let lines = lines_with(&proxy.log_text(), text);
    assert_eq!(lines.len(), n, "lines with {text:?}: {lines:#?}");
    lines
}

/// The value of the ` name=` field of a log line, up to the next space (`g1`, `"g1"` or
/// `Some("g1")`, whichever way the field is formatted).
fn field(line: &str, name: &str) -> String {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"));
    line[at + name.len() + 2..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Check one drop line: ERROR, old and new generations, and how much was dropped.
fn check_line(line: &str, old: &str, new: &str, dropped_at_least: u64) {
    assert!(line.contains("ERROR"), "an ERROR line: {line}");
    assert!(field(line, "old").contains(old), "old={old}: {line}");
    assert!(field(line, "new").contains(new), "new={new}: {line}");
    let dropped: u64 = field(line, "dropped")
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("dropped=<number>: {line}"));
    assert!(
        dropped >= dropped_at_least,
        "dropped >= {dropped_at_least}: {line}"
    );
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

// === memcached ===

/// L2 (namespace [`NS`]) on `mc`, and the generation header.
fn shared_conf(mc: &Memcached) -> Conf {
    Conf::default()
        .servers(&[mc])
        .memcached(&format!("namespace = \"{NS}\""))
        .section(HEADER_MODE)
}

/// The memcached key of `path` on the site, in namespace generation `generation`.
fn l2_key(path: &str, generation: u64) -> String {
    let combined = corral::key::for_url(SITE.1, path).combined();
    corral::storage::memcached::key_for(NS, generation, &combined)
}

/// Whether memcached holds a (non-empty) value under `key`: not a lease placeholder.
async fn in_l2(mc: &Memcached, key: &str) -> bool {
    let head = mc.command(format!("mg {key} v\r\n").as_bytes(), "\r\n").await;
    head.strip_prefix("VA ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n > 0)
}

/// The value memcached holds under `key`, if any.
async fn mc_get(mc: &Memcached, key: &str) -> Option<String> {
    let answer = mc.command(format!("get {key}\r\n").as_bytes(), "END\r\n").await;
    let (head, rest) = answer.split_once("\r\n")?;
    if !head.starts_with("VALUE ") {
        return None;
    }
    let len: usize = head.split_whitespace().nth(3)?.parse().ok()?;
    Some(String::from_utf8_lossy(&rest.as_bytes()[..len.min(rest.len())]).to_string())
}

/// memcached's namespace generation (absent = 0).
async fn namespace_generation(mc: &Memcached) -> u64 {
    mc_get(mc, &format!("corral/{NS}/generation"))
        .await
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until memcached's namespace generation reaches `want` (the move is made in the
/// background, after the drop), then check it is exactly `want`: moved once.
async fn namespace_moved_to(mc: &Memcached, want: u64, what: &str) {
    eventually(SOON, what, || async { namespace_generation(mc).await >= want }).await;
    assert_eq!(namespace_generation(mc).await, want, "{what}: moved once");
}

/// The key holding the namespace's current upstream generation.
fn upstream_generation_key() -> String {
    format!("corral/{NS}/upstream-generation")
}

/// A corral holding `/a` of g1 in L1 and in L2, with g1 shared as the namespace's current
/// generation in memcached.
async fn holding_a_in_l2(origin: &Origin, mc: &Memcached) -> Proxy {
    let corral = Proxy::start(origin.addr, shared_conf(mc)).await;
    assert_eq!(cached(&corral, "/a").await.body, "/a g1 #1");
    let key = l2_key("/a", 0);
    eventually(SOON, "/a written to L2", || in_l2(mc, &key)).await;
    eventually(
        SOON,
        "g1 shared as the namespace's current generation (corral/t/upstream-generation)",
        || async {
            mc_get(mc, &upstream_generation_key())
                .await
                .is_some_and(|v| v.contains("g1"))
        },
    )
    .await;
    corral
}

// === header mode ===

#[tokio::test]
async fn a_new_generation_drops_the_cache_and_the_response_that_carried_it_is_stored() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/b", "/new"]);
    let corral = Proxy::start(origin.addr, Conf::default().section(HEADER_MODE)).await;

    assert_eq!(cached(&corral, "/a").await.body, "/a g1 #1");
    assert_eq!(cached(&corral, "/b").await.body, "/b g1 #1");
    let m = corral.metrics().await;
    assert_eq!(all_drops(&m), 0.0, "the first generation seen is adopted quietly");
    assert_eq!(metric(&m, &info("g1")), 1.0);

    generation.set("g2");
    let new = get(&corral, "/new").await;
    assert_eq!(new.body, "/new g2 #1");
    assert!(
        new.cache.contains("fwd=miss; stored"),
        "the response that carried g2 is stored: {}",
        new.cache
    );
    reaches(&corral, UPSTREAM_DROPS, 1.0, SOON, "the drop").await;

    let again = get(&corral, "/new").await;
    assert!(
        again.cache.starts_with("corral; hit"),
        "/new survived the drop it caused: {}",
        again.cache
    );
    assert_eq!(again.body, "/new g2 #1");
    assert_eq!(origin.hits("/new"), 1);

    // the objects of g1 are gone: the next request for each reaches the origin
    assert_eq!(miss(&corral, "/a", "after the drop").await.body, "/a g2 #2");
    assert_eq!(miss(&corral, "/b", "after the drop").await.body, "/b g2 #2");
    assert_eq!((origin.hits("/a"), origin.hits("/b")), (2, 2));
    // and cached again, under g2, without another drop
    assert!(get(&corral, "/a").await.cache.starts_with("corral; hit"));

    let m = corral.metrics().await;
    assert_eq!(metric(&m, UPSTREAM_DROPS), 1.0);
    assert_eq!(all_drops(&m), 1.0, "no drop for another reason");
    assert_eq!(metric(&m, &info("g2")), 1.0);
    assert_eq!(
        metric(&m, &info("g1")),
        0.0,
        "only the current generation is shown"
    );

    let lines = logged(&corral, UPSTREAM_LINE, 1).await;
    check_line(&lines[0], "g1", "g2", 2);
    assert_eq!(lines_with(&corral.log_text(), "dropping stale cache").len(), 1);
}

#[tokio::test]
async fn the_same_generation_repeated_and_a_missing_header_are_no_change() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/b"]);
    let paths: Vec<String> = (0..20).map(|i| format!("/p{i}")).collect();
    for p in &paths {
        page(&origin, &generation, p);
    }
    plain_page(&origin, "/plain");
    plain_page(&origin, "/plain2");
    let corral = Proxy::start(origin.addr, Conf::default().section(HEADER_MODE)).await;

    cached(&corral, "/a").await;
    // g1, many times over
    for p in &paths {
        assert_eq!(get(&corral, p).await.body, format!("{p} g1 #1"));
    }
    // no header at all, between responses with g1
    assert_eq!(cached(&corral, "/plain").await.body, "/plain #1");
    cached(&corral, "/b").await;
    cached(&corral, "/plain2").await;
    for p in &paths {
        assert!(get(&corral, p).await.cache.starts_with("corral; hit"), "{p}");
    }
    tokio::time::sleep(QUIET).await;

    let m = corral.metrics().await;
    assert_eq!(all_drops(&m), 0.0, "no drop");
    assert_eq!(metric(&m, SUPERSEDED), 0.0, "nothing superseded");
    assert_eq!(metric(&m, &info("g1")), 1.0, "a missing header leaves g1 current");
    let hit = get(&corral, "/a").await;
    assert!(
        hit.cache.starts_with("corral; hit"),
        "/a still cached: {}",
        hit.cache
    );
    assert_eq!(origin.hits("/a"), 1);
    assert!(
        !corral.log_text().contains("dropping stale cache"),
        "no drop logged"
    );
}

#[tokio::test]
async fn a_restarted_corral_that_sees_the_current_generation_does_not_drop() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/b", "/c"]);
    let mut corral = holding_a_in_l2(&origin, &mc).await;

    corral.restart().await;
    let from_l2 = get(&corral, "/a").await;
    assert_eq!(from_l2.body, "/a g1 #1");
    assert!(
        from_l2.cache.ends_with("detail=l2"),
        "the L2 of g1 is still in use after the restart: {}",
        from_l2.cache
    );
    assert_eq!(cached(&corral, "/b").await.body, "/b g1 #1");
    tokio::time::sleep(QUIET).await;

    let m = corral.metrics().await;
    assert_eq!(all_drops(&m), 0.0, "the restarted corral dropped nothing");
    assert_eq!(metric(&m, &info("g1")), 1.0);
    let log = corral.log_text();
    assert!(log.contains("---- restarted ----"));
    assert!(!log.contains("dropping stale cache"), "no drop logged");
    assert_eq!(origin.hits("/a"), 1);
    assert_eq!(namespace_generation(&mc).await, 0, "the namespace did not move");

    // a new generation after the restart is still a change
    generation.set("g2");
    assert_eq!(get(&corral, "/c").await.body, "/c g2 #1");
    reaches(&corral, UPSTREAM_DROPS, 1.0, SOON, "the drop after the restart").await;
    assert_eq!(miss(&corral, "/a", "after the drop").await.body, "/a g2 #2");
    namespace_moved_to(&mc, 1, "the namespace moved for g2").await;
}

/// The shared generation is read at start: a corral that starts after a deploy and whose first
/// response carries the new generation drops (here: moves L2 away from the old objects), it
/// does not adopt the new value as its "first".
#[tokio::test]
async fn a_corral_started_after_a_deploy_drops_what_the_namespace_held_for_the_old_generation() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/b"]);
    let mut corral = holding_a_in_l2(&origin, &mc).await;

    corral.kill();
    generation.set("g2");
    corral.restart().await;
    eventually(
        SOON,
        "the restarted corral reads the namespace's current generation (g1) at start",
        || async { counter(&corral, &info("g1")).await == 1.0 },
    )
    .await;

    assert_eq!(get(&corral, "/b").await.body, "/b g2 #1");
    reaches(&corral, UPSTREAM_DROPS, 1.0, SOON, "g2 is new to the namespace").await;
    let lines = logged(&corral, UPSTREAM_LINE, 1).await;
    check_line(&lines[0], "g1", "g2", 0);
    assert_eq!(
        miss(&corral, "/a", "the L2 copy of g1 is unreachable").await.body,
        "/a g2 #2"
    );
    namespace_moved_to(&mc, 1, "the namespace moved for g2").await;
    assert_eq!(counter(&corral, &info("g2")).await, 1.0);
}

// === two corrals sharing memcached ===

#[tokio::test]
async fn a_second_corral_that_never_saw_the_new_generation_stops_serving_the_old_objects() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/new", "/other"]);
    let a = holding_a_in_l2(&origin, &mc).await;
    let b = Proxy::start(origin.addr, shared_conf(&mc)).await;

    let at_b = get(&b, "/a").await;
    assert_eq!(at_b.body, "/a g1 #1");
    assert!(
        at_b.cache.ends_with("detail=l2"),
        "B took A's copy: {}",
        at_b.cache
    );
    cached(&b, "/a").await;
    assert_eq!(origin.hits("/a"), 1);
    let moved_from = namespace_generation(&mc).await;

    // only A sees g2
    generation.set("g2");
    assert_eq!(get(&a, "/new").await.body, "/new g2 #1");
    reaches(&a, UPSTREAM_DROPS, 1.0, SOON, "A's drop").await;
    namespace_moved_to(&mc, moved_from + 1, "A moved the namespace").await;

    // B follows: its /a of g1 is gone, the next request reaches the origin
    let since = Instant::now();
    eventually(FOLLOW, "B stops serving /a of g1", || async {
        get(&b, "/a").await.body != "/a g1 #1"
    })
    .await;
    eprintln!("B followed in {:?}", since.elapsed());
    assert_eq!(origin.hits("/a"), 2, "B's next /a reached the origin");
    let again = get(&b, "/a").await;
    assert_eq!(again.body, "/a g2 #2");
    assert!(again.cache.starts_with("corral; hit"), "{}", again.cache);

    // B fetched a g2 response itself (/a above), and another: it adopted g2 quietly
    assert_eq!(cached(&b, "/other").await.body, "/other g2 #1");
    tokio::time::sleep(QUIET).await;
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, NAMESPACE_DROPS),
        1.0,
        "B dropped once, for the namespace"
    );
    assert_eq!(
        metric(&m, UPSTREAM_DROPS),
        0.0,
        "B adopted g2 without a drop of its own"
    );
    assert_eq!(metric(&m, SUPERSEDED), 0.0);
    assert_eq!(metric(&m, &info("g2")), 1.0);
    assert_eq!(logged(&b, NAMESPACE_LINE, 1).await.len(), 1);
    assert!(lines_with(&b.log_text(), UPSTREAM_LINE).is_empty());

    // A dropped once (its own), not again when it read its own move of the namespace
    let m = a.metrics().await;
    assert_eq!(metric(&m, UPSTREAM_DROPS), 1.0);
    assert_eq!(
        all_drops(&m),
        1.0,
        "A: no namespace-generation drop for its own move"
    );
    assert_eq!(
        namespace_generation(&mc).await,
        moved_from + 1,
        "the namespace moved once in all"
    );
    // and A serves /a of g2 (B's copy from L2, or the origin's), never its own of g1
    let at_a = get(&a, "/a").await;
    assert!(at_a.body.starts_with("/a g2 #"), "{at_a:?}");
}

// === webhooks ===

fn webhook_conf(hook: &Webhook) -> Conf {
    Conf::default().section(&format!(
        "[generation]\nheader = \"X-Generation\"\nwebhooks = [\"{}\"]",
        hook.url()
    ))
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn a_webhook_receives_exactly_one_event_per_change() {
    let _serial = SERIAL.lock().await;
    let hook = Webhook::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/b", "/new"]);
    let corral = Proxy::start(origin.addr, webhook_conf(&hook)).await;
    cached(&corral, "/a").await;
    cached(&corral, "/b").await;

    generation.set("g2");
    let before = now_ms();
    assert_eq!(get(&corral, "/new").await.body, "/new g2 #1");
    eventually(SOON, "the event delivered", || async { hook.attempts() >= 1 }).await;
    // the same generation again: no second event
    assert_eq!(get(&corral, "/a").await.body, "/a g2 #2");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let requests = hook.requests();
    assert_eq!(requests.len(), 1, "one event, once: {requests:#?}");
    let r = &requests[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hook"));
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    let event = parse(&r.body);
    assert_eq!(event["event"], "cache_dropped", "{event}");
    assert_eq!(event["reason"], "upstream-generation", "{event}");
    assert_eq!(event["old"], "g1", "{event}");
    assert_eq!(event["new"], "g2", "{event}");
    assert!(event["corral"].is_number(), "corral: {event}");
    assert!(
        event["dropped"].as_u64().is_some_and(|n| n >= 2),
        "dropped /a and /b at least: {event}"
    );
    let at = event["at"]
        .as_str()
        .unwrap_or_else(|| panic!("at is a string: {event}"));
    assert!(at.contains('T') && at.ends_with('Z'), "RFC 3339 UTC: {at}");
    let at_ms = event["at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("at_ms is a number: {event}"));
    assert!(
        at_ms + 1000 >= before && at_ms <= now_ms() + 1000,
        "at_ms {at_ms} is now ({before})"
    );
    reaches(&corral, WEBHOOK_OK, 1.0, SOON, "the delivery counted").await;
}

#[tokio::test]
async fn a_failing_webhook_is_retried_with_back_off_and_never_blocks_a_request() {
    let _serial = SERIAL.lock().await;
    let hook = Webhook::failing(&[500, 500]).await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/new"]);
    let corral = Proxy::start(origin.addr, webhook_conf(&hook)).await;
    cached(&corral, "/a").await;

    generation.set("g2");
    assert_eq!(get(&corral, "/new").await.body, "/new g2 #1");
    assert!(
        hook.delivered().is_empty(),
        "the request that caused the drop did not wait for the delivery"
    );
    eventually(SOON, "the first attempt", || async { hook.attempts() >= 1 }).await;
    // while the delivery is retried, corral serves as usual
    let t = Instant::now();
    let during = get(&corral, "/new").await;
    let took = t.elapsed();
    assert!(during.cache.starts_with("corral; hit"), "{}", during.cache);
    assert!(
        took < Duration::from_millis(400),
        "a hit during the retries took {took:?}"
    );
    assert!(
        hook.delivered().is_empty(),
        "that request was served during the retries"
    );

    eventually(
        Duration::from_secs(8),
        "delivered on the third attempt",
        || async { !hook.delivered().is_empty() },
    )
    .await;
    let requests = hook.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 500, 200], "{requests:#?}");
    let events: Vec<Value> = requests.iter().map(|r| parse(&r.body)).collect();
    assert!(
        events.iter().all(|e| e == &events[0]),
        "the same event each time: {events:#?}"
    );
    assert_eq!(events[0]["reason"], "upstream-generation");
    assert_eq!(events[0]["new"], "g2");
    // back-off between attempts (0.5 s, then 1 s; some jitter allowed)
    let first_gap = requests[1].at - requests[0].at;
    let second_gap = requests[2].at - requests[1].at;
    assert!(
        first_gap >= Duration::from_millis(250),
        "first back-off {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(500),
        "second back-off {second_gap:?}"
    );
    reaches(&corral, WEBHOOK_OK, 1.0, SOON, "the delivery counted").await;
    assert_eq!(hook.attempts(), 3);
}

// === GET /events ===

/// The `data:` payloads of the complete events in `buf` (an event ends with a blank line).
fn events(buf: &str) -> Vec<String> {
    let mut blocks: Vec<&str> = buf.split("\n\n").collect();
    blocks.pop(); // what follows the last blank line is not complete yet
    blocks
        .iter()
        .flat_map(|b| b.lines())
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Read `resp`'s body into `buf` until `done(buf)`, at most `limit`.
async fn read_until(
    resp: &mut reqwest::Response,
    buf: &mut String,
    limit: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done(buf.as_str()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => panic!("the event stream ended before {what}: {buf:?}"),
            Ok(Err(e)) => panic!("the event stream failed before {what} ({e}): {buf:?}"),
            Err(_) => panic!("not reached in {limit:?}: {what}; read so far: {buf:?}"),
        }
    }
}

/// Read `resp`'s body into `buf` for `d`.
async fn read_for(resp: &mut reqwest::Response, buf: &mut String, d: Duration) {
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => panic!("the event stream ended: {buf:?}"),
            Ok(Err(e)) => panic!("the event stream failed ({e}): {buf:?}"),
            Err(_) => return,
        }
    }
}

#[tokio::test]
async fn the_admin_event_stream_carries_the_drop() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/new"]);
    let corral = Proxy::start(origin.addr, Conf::default().section(HEADER_MODE)).await;
    cached(&corral, "/a").await;

    // no overall timeout: the stream stays open; each read below is bounded
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut resp = http
        .get(format!("http://{}/events", corral.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let mut buf = String::new();
    read_until(&mut resp, &mut buf, SOON, "': connected'", |b| {
        b.contains(": connected\n\n")
    })
    .await;
    assert!(buf.starts_with(": connected"), "{buf:?}");
    assert!(events(&buf).is_empty(), "no event yet: {buf:?}");

    generation.set("g2");
    assert_eq!(get(&corral, "/new").await.body, "/new g2 #1");
    read_until(&mut resp, &mut buf, SOON, "a data line", |b| {
        !events(b).is_empty()
    })
    .await;
    let event = parse(&events(&buf)[0]);
    assert_eq!(event["event"], "cache_dropped", "{event}");
    assert_eq!(event["reason"], "upstream-generation", "{event}");
    assert_eq!(event["old"], "g1", "{event}");
    assert_eq!(event["new"], "g2", "{event}");
    assert!(event["corral"].is_number(), "{event}");

    // the same generation again: nothing more on the stream
    assert_eq!(get(&corral, "/a").await.body, "/a g2 #2");
    read_for(&mut resp, &mut buf, Duration::from_millis(500)).await;
    assert_eq!(events(&buf).len(), 1, "{buf:?}");
}

// === poll mode ===

#[tokio::test]
async fn a_polled_generation_change_drops_the_cache_without_any_request() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    let g = generation.clone();
    // the generation in the body, no header
    origin.route("/_generation", move |_| {
        Reply::ok(format!("{}\n", g.get())).header("cache-control", "no-store")
    });
    // pages carry no generation at all
    plain_page(&origin, "/a");
    let conf = Conf::default()
        .section("[generation]\nheader = \"X-Generation\"\nurl = \"/_generation\"\ninterval = \"200ms\"");
    let corral = Proxy::start(origin.addr, conf).await;
    eventually(SOON, "the first poll adopted g1", || async {
        counter(&corral, &info("g1")).await == 1.0
    })
    .await;
    assert_eq!(cached(&corral, "/a").await.body, "/a #1");
    assert_eq!(all_drops(&corral.metrics().await), 0.0);
    let polls = origin.hits("/_generation");

    generation.set("g2");
    let since = Instant::now();
    eventually(
        Duration::from_millis(1500),
        "the drop, seen by the poll alone",
        || async { counter(&corral, UPSTREAM_DROPS).await >= 1.0 },
    )
    .await;
    eprintln!("dropped {:?} after the change", since.elapsed());
    assert_eq!(origin.hits("/a"), 1, "no client request passed");
    assert!(origin.hits("/_generation") > polls, "polled");
    let m = corral.metrics().await;
    assert_eq!(metric(&m, UPSTREAM_DROPS), 1.0);
    assert_eq!(metric(&m, &info("g2")), 1.0);
    let lines = logged(&corral, UPSTREAM_LINE, 1).await;
    check_line(&lines[0], "g1", "g2", 1);

    assert_eq!(miss(&corral, "/a", "after the polled drop").await.body, "/a #2");
    // polling on, the same g2: no other drop
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter(&corral, UPSTREAM_DROPS).await, 1.0);
    assert!(get(&corral, "/a").await.cache.starts_with("corral; hit"));
}

// === flapping and rollback ===

fn settle_conf(settle: &str) -> Conf {
    Conf::default().section(&format!(
        "[generation]\nheader = \"X-Generation\"\nsettle = \"{settle}\""
    ))
}

/// Two app servers mid-deploy: g1, g2, g1, g2. Only g2, never seen before, is a change; g1
/// seen again is served but not stored, and does not become current within `settle`.
#[tokio::test]
async fn a_flapping_upstream_makes_one_drop_and_does_not_store_the_superseded_generation() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/x", "/y", "/z"]);
    let corral = Proxy::start(origin.addr, settle_conf("30s")).await;
    cached(&corral, "/a").await;

    generation.set("g2");
    assert_eq!(cached(&corral, "/x").await.body, "/x g2 #1");
    reaches(&corral, UPSTREAM_DROPS, 1.0, SOON, "drop #1").await;

    // g1 again: superseded, served, not stored, no drop
    generation.set("g1");
    let y = get(&corral, "/y").await;
    assert_eq!((y.status, y.body.as_str()), (200, "/y g1 #1"));
    assert!(
        !y.cache.contains("stored"),
        "a superseded response is not stored: {}",
        y.cache
    );
    let y = get(&corral, "/y").await;
    assert_eq!(y.body, "/y g1 #2", "not stored: the origin answered again");
    assert!(!y.cache.contains("stored"), "{}", y.cache);
    assert_eq!(origin.hits("/y"), 2);

    // g2 again: the current generation, stored, no drop
    generation.set("g2");
    assert_eq!(cached(&corral, "/z").await.body, "/z g2 #1");
    tokio::time::sleep(QUIET).await;

    let m = corral.metrics().await;
    assert_eq!(metric(&m, UPSTREAM_DROPS), 1.0, "one drop in all");
    assert_eq!(all_drops(&m), 1.0);
    assert!(metric(&m, SUPERSEDED) >= 1.0, "superseded responses counted");
    assert_eq!(metric(&m, &info("g2")), 1.0);
    assert_eq!(metric(&m, &info("g1")), 0.0);
    // /x of g2 was never dropped again
    assert!(get(&corral, "/x").await.cache.starts_with("corral; hit"));
    assert_eq!(origin.hits("/x"), 1);
    assert_eq!(logged(&corral, UPSTREAM_LINE, 1).await.len(), 1);
}

/// g1 → g2 → g1 for good: once g1 is the only generation seen for `settle`, it is a rollback,
/// a change back to g1 (a second drop), and g1 responses are stored again.
#[tokio::test]
async fn an_older_generation_seen_alone_for_settle_is_a_rollback() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/x", "/after"]);
    let corral = Proxy::start(origin.addr, settle_conf("1s")).await;
    cached(&corral, "/a").await;

    generation.set("g2");
    assert_eq!(cached(&corral, "/x").await.body, "/x g2 #1");
    reaches(&corral, UPSTREAM_DROPS, 1.0, SOON, "drop #1").await;

    // back to g1 for good; a new path every 100 ms
    generation.set("g1");
    let since = Instant::now();
    let mut first: Option<Got> = None;
    let mut i = 0;
    loop {
        let path = format!("/r{i}");
        page(&origin, &generation, &path);
        let got = get(&corral, &path).await;
        assert_eq!(got.body, format!("{path} g1 #1"));
        if first.is_none() {
            first = Some(got);
        }
        if counter(&corral, UPSTREAM_DROPS).await >= 2.0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "no rollback within 3 s of g1 alone (settle 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        i += 1;
    }
    let took = since.elapsed();
    eprintln!("rollback after {took:?} ({} requests)", i + 1);
    // settle is measured from the first g1 seen (or from the last g2): not before ~1 s
    assert!(
        took >= Duration::from_millis(800),
        "rolled back before settle: {took:?}"
    );
    let first = first.unwrap();
    assert!(
        !first.cache.contains("stored"),
        "g1 right after g2 is superseded, not stored: {}",
        first.cache
    );

    let m = corral.metrics().await;
    assert_eq!(metric(&m, UPSTREAM_DROPS), 2.0);
    assert!(metric(&m, SUPERSEDED) >= 1.0);
    assert_eq!(metric(&m, &info("g1")), 1.0);
    assert_eq!(metric(&m, &info("g2")), 0.0);
    let lines = logged(&corral, UPSTREAM_LINE, 2).await;
    check_line(&lines[0], "g1", "g2", 1);
    check_line(&lines[1], "g2", "g1", 1);

    // the rollback dropped the objects of g2, and g1 is stored again
    assert_eq!(miss(&corral, "/x", "after the rollback").await.body, "/x g1 #2");
    assert_eq!(cached(&corral, "/after").await.body, "/after g1 #1");
    assert_eq!(counter(&corral, UPSTREAM_DROPS).await, 2.0);
}

/// Without memcached, the peers are told: a corral that sees a new generation sends it to
/// them, and each drops its L1 once (a peer that saw it too does not drop again).
#[tokio::test]
async fn without_memcached_the_peers_are_told_of_a_new_generation() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/new", "/later"]);
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let urls = format!("urls = [\"http://{a_addr}\", \"http://{b_addr}\"]");
    let conf = Conf::default()
        .section(HEADER_MODE)
        .peers(&urls)
        .peers("token = \"t0ken\"");
    let a = Proxy::start_on(a_addr, origin.addr, conf.clone()).await;
    let b = Proxy::start_on(b_addr, origin.addr, conf).await;
    cached(&a, "/a").await;
    cached(&b, "/a").await;
    generation.set("g2");
    get(&a, "/new").await;
    eventually(SOON, "B told of g2 by A", || async {
        counter(&b, "corral_cache_drops_total{reason=\"peer-generation\"}").await == 1.0
    })
    .await;
    let got = miss(&b, "/a", "B after A saw g2").await;
    assert!(got.body.contains("g2"), "{}", got.body);
    // B now holds g2 as current: its own g2 responses are no change
    get(&b, "/later").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(counter(&b, UPSTREAM_DROPS).await, 0.0);
    assert_eq!(counter(&a, UPSTREAM_DROPS).await, 1.0);
    assert_eq!(
        metric(
            &b.metrics().await,
            "corral_upstream_generation_info{generation=\"g2\"}"
        ),
        1.0
    );
}

/// With memcached and peers both, a change reaches the other corral twice (the peer message,
/// then the namespace move): it drops once.
#[tokio::test]
async fn with_memcached_and_peers_a_change_is_one_drop_per_corral() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/a", "/new", "/later"]);
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let urls = format!("urls = [\"http://{a_addr}\", \"http://{b_addr}\"]");
    let conf = Conf::default()
        .servers(&[&mc])
        .section(HEADER_MODE)
        .peers(&urls)
        .peers("token = \"t0ken\"");
    let a = Proxy::start_on(a_addr, origin.addr, conf.clone()).await;
    let b = Proxy::start_on(b_addr, origin.addr, conf).await;
    cached(&a, "/a").await;
    cached(&b, "/a").await;
    generation.set("g2");
    get(&a, "/new").await;
    eventually(SOON, "B dropped for g2", || async {
        let m = b.metrics().await;
        metric(&m, "corral_cache_drops_total{reason=\"peer-generation\"}") + metric(&m, NAMESPACE_DROPS)
            >= 1.0
    })
    .await;
    // long enough for B's follower to have seen A's namespace move (every 250 ms)
    tokio::time::sleep(Duration::from_millis(1200)).await;
    get(&b, "/later").await;
    let m = b.metrics().await;
    let drops: f64 = m
        .lines()
        .filter(|l| l.starts_with("corral_cache_drops_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(drops, 1.0, "one drop at B for one change:\n{m}");
    let got = miss(&b, "/a", "B after the change").await;
    assert!(got.body.contains("g2"), "{}", got.body);
    assert_eq!(counter(&a, UPSTREAM_DROPS).await, 1.0);
}

/// A poll endpoint that fails (500) is no change: nothing is dropped, the failure is said once,
/// and the recovery once; a generation read after it is compared with the one before.
#[tokio::test]
async fn a_failing_generation_poll_drops_nothing_and_is_logged_once() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    let failing = Arc::new(Mutex::new(false));
    let (g, f) = (generation.clone(), failing.clone());
    origin.route("/_generation", move |_| {
        if *f.lock().unwrap() {
            Reply::ok("upstream trouble").status(500)
        } else {
            Reply::ok(format!("{}\n", g.get())).header("cache-control", "no-store")
        }
    });
    plain_page(&origin, "/a");
    let conf = Conf::default()
        .section("[generation]\nheader = \"X-Generation\"\nurl = \"/_generation\"\ninterval = \"100ms\"");
    let corral = Proxy::start(origin.addr, conf).await;
    eventually(SOON, "the first poll adopted g1", || async {
        counter(&corral, &info("g1")).await == 1.0
    })
    .await;
    cached(&corral, "/a").await;
    *failing.lock().unwrap() = true;
    let polls = origin.hits("/_generation");
    eventually(SOON, "several failed polls", || async {
        origin.hits("/_generation") >= polls + 5
    })
    .await;
    *failing.lock().unwrap() = false;
    eventually(SOON, "the poll answers again", || async {
        corral.log_text().contains("generation poll answers again")
    })
    .await;
    assert_eq!(all_drops(&corral.metrics().await), 0.0);
    assert!(
        get(&corral, "/a").await.cache.starts_with("corral; hit"),
        "the cache kept"
    );
    let log = corral.log_text();
    assert_eq!(
        log.matches("generation poll failed").count(),
        1,
        "once per state change"
    );
}

/// See: the review of 2026-12-01. A corral that saw a new upstream generation expects the
/// namespace to move once (its own move, or that of a corral that saw it too), and does not
/// drop its L1 a second time for it. Another corral's purge of everything, in the same
/// seconds, moves it the same way: what A fetched since its drop must not outlive it. Here
/// no corral moves the namespace for the change (its claim is taken), so the one move A sees
/// is C's purge of everything.
#[tokio::test]
async fn a_purge_of_everything_is_not_taken_for_the_move_of_an_upstream_change() {
    use md5::{Digest, Md5};
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let generation = Generation::new("g1");
    pages(&origin, &generation, &["/p", "/q"]);
    let a = Proxy::start(origin.addr, shared_conf(&mc)).await;
    let c = Proxy::start(origin.addr, shared_conf(&mc)).await;
    cached(&a, "/p").await;
    // the namespace is moved for the change g1 -> g2 by whoever claims it: taken already
    for before in 0..=2u64 {
        let digest = Md5::digest(format!("{before}:g1->g2").as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let claim = format!("set corral/{NS}/claim/{hex} 0 0 1\r\n1\r\n");
        assert!(mc.command(claim.as_bytes(), "\r\n").await.contains("STORED"));
    }
    let moved_from = namespace_generation(&mc).await;
    generation.set("g2");
    get(&a, "/q").await;
    reaches(&a, UPSTREAM_DROPS, 1.0, SOON, "A drops its L1 for g2").await;
    let fetched = cached(&a, "/p").await;
    assert!(fetched.body.contains("g2"), "{}", fetched.body);
    let all = client()
        .post(format!("http://{}/purge/all", c.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), 200);
    assert_eq!(
        namespace_generation(&mc).await,
        moved_from + 1,
        "C's purge moved it"
    );
    eventually(
        FOLLOW,
        "A does not serve what it fetched before C's purge of everything",
        || async { get(&a, "/p").await.body != fetched.body },
    )
    .await;
}
