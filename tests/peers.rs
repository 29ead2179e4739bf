//! Peer fan-out (issue 11) against three real corral processes on loopback: every purge kind
//! accepted at A reaches B's and C's L1 within 100 ms of A's answer, exactly once, with and
//! without memcached; the receiving endpoint's token, gaps and duplicates; a cut link (a
//! relay the test closes) with its back-off, backlog and overflow; a corral killed with
//! undelivered purges; `GET /peers`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const SITE: &str = "www.site.test";
const TOKEN: &str = "peer-s3cret";

/// Issue 11: within this long of A's answer, B and C have applied A's purge. Measured from
/// the moment the test has A's answer to the moment it sees the peer's counter move (polled
/// every 2 ms), so the real figure is lower; the tests of this file run one at a time (below)
/// so that a debug build on a 2-core machine is not also running another test's corrals.
const PROPAGATION: Duration = Duration::from_millis(100);

/// The tests of this file start three corrals each and measure latency: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const APPLIED: &str = "corral_peer_received_total{result=\"applied\"}";
const DUPLICATE: &str = "corral_peer_received_total{result=\"duplicate\"}";
const OWN: &str = "corral_peer_received_total{result=\"own\"}";
const REFUSED: &str = "corral_peer_received_total{result=\"refused\"}";
const INVALID: &str = "corral_peer_received_total{result=\"invalid\"}";
const GAPS: &str = "corral_peer_gaps_total";
const OVERFLOW_DROPS: &str = "corral_cache_drops_total{reason=\"peer-backlog-overflow\"}";

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn url_of(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// `name{peer="<url>"}`.
fn per_peer(name: &str, url: &str) -> String {
    format!("{name}{{peer=\"{url}\"}}")
}

/// The sum of every series of `name` whose labels contain `label`.
fn sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

/// `base` with a `[peers]` section listing `urls`, the shared token and `extra` lines.
fn with_peers(base: Conf, urls: &[String], extra: &[&str]) -> Conf {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let mut conf = base
        .peers(&format!("urls = [{}]", list.join(", ")))
        .peers(&format!("token = \"{TOKEN}\""));
    for line in extra {
        conf = conf.peers(line);
    }
    conf
}

/// Three corrals, each listing all three (itself included: it must skip itself).
struct Fleet {
    a: Proxy,
    b: Proxy,
    c: Proxy,
    /// When asked for, A reaches C through this relay (A lists `http://<relay>`, B and C list
    /// C's real address). A does not list its own address through a relay: a corral knows
    /// itself by its address.
    relay: Option<Relay>,
}

impl Fleet {
    async fn start(origin: &Origin, base: Conf, extra: &[&str], relay_to_c: bool) -> Fleet {
        let (a, b, c) = (loopback(), loopback(), loopback());
        let relay = if relay_to_c {
            Some(Relay::start(c).await)
        } else {
            None
        };
        let direct = vec![url_of(a), url_of(b), url_of(c)];
        let mut at_a = direct.clone();
        if let Some(r) = &relay {
            at_a[2] = url_of(r.addr);
        }
        let a = Proxy::start_on(a, origin.addr, with_peers(base.clone(), &at_a, extra)).await;
        let b = Proxy::start_on(b, origin.addr, with_peers(base.clone(), &direct, extra)).await;
        let c = Proxy::start_on(c, origin.addr, with_peers(base, &direct, extra)).await;
        Fleet { a, b, c, relay }
    }

    fn b_url(&self) -> String {
        url_of(self.b.addr)
    }

    /// C's URL as A knows it (the relay's, when there is one).
    fn c_at_a(&self) -> String {
        self.relay
            .as_ref()
            .map_or_else(|| url_of(self.c.addr), |r| url_of(r.addr))
    }

    fn relay(&self) -> &Relay {
        self.relay.as_ref().unwrap()
    }
}

async fn get(proxy: &Proxy, path: &str) -> Got {
    get_with(&proxy.url(path), &[("host", SITE)]).await
}

async fn purge(proxy: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut all = vec![("host", SITE)];
    all.extend_from_slice(headers);
    send(client().request(m, proxy.url(path)), &all).await
}

async fn admin_post(proxy: &Proxy, path: &str, body: &str) -> Got {
    send(
        client()
            .post(format!("http://{}{path}", proxy.admin))
            .body(body.to_string()),
        &[("content-type", "application/json")],
    )
    .await
}

/// Every path answers `v1`, `v2`, ... fresh for 300 s, with these extra headers.
fn versioned(origin: &Origin, path: &str, headers: &'static [(&'static str, &'static str)]) {
    origin.route(path, move |s| {
        let mut r = Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=300");
        for (k, v) in headers {
            r = r.header(k, *v);
        }
        r
    });
}

/// A fresh hit: `corral; hit; ttl=N` with N >= 0 (a stale one has a negative ttl).
fn fresh_hit(cache: &str) -> bool {
    cache
        .strip_prefix("corral; hit; ttl=")
        .and_then(|rest| rest.split(';').next())
        .and_then(|ttl| ttl.trim().parse::<i64>().ok())
        .is_some_and(|ttl| ttl >= 0)
}

/// Fill `paths` at each of `proxies`, then check each is a hit there.
async fn warm(proxies: &[&Proxy], paths: &[&str]) {
    for p in proxies {
        for path in paths {
            get(p, path).await;
            let again = get(p, path).await;
            assert!(
                again.cache.starts_with("corral; hit"),
                "{path} cached at {}: {}",
                p.addr,
                again.cache
            );
        }
    }
}

async fn assert_miss(proxy: &Proxy, path: &str, what: &str) {
    let got = get(proxy, path).await;
    assert!(
        got.cache.contains("fwd=miss"),
        "{what}: {path} at {} must be a miss: {}",
        proxy.addr,
        got.cache
    );
}

async fn counter(proxy: &Proxy, series: &str) -> f64 {
    metric(&proxy.metrics().await, series)
}

/// Poll (every 2 ms) until each of `nodes` counts `want` applied peer messages; the time that
/// took from `since` (A's answer). Panics on more than `want` (a loop, a duplicate applied)
/// or after 5 s.
async fn applied_everywhere(nodes: &[&Proxy], want: f64, since: Instant, what: &str) -> Duration {
    let http = client();
    let mut pending: Vec<&Proxy> = nodes.to_vec();
    let deadline = since + Duration::from_secs(5);
    loop {
        let mut still = Vec::new();
        for p in pending {
            let text = http
                .get(format!("http://{}/metrics", p.admin))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let n = metric(&text, APPLIED);
            assert!(
                n <= want,
                "{what}: {} applied {n} peer messages, more than the {want} A sent",
                p.addr
            );
            if n < want {
                still.push(p);
            }
        }
        if still.is_empty() {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not applied at {:?} 5 s after A's answer",
            still.iter().map(|p| p.addr).collect::<Vec<_>>()
        );
        pending = still;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The purge answered `got` (at `answered`) is applied by B and C within [`PROPAGATION`].
async fn propagated(peers: &[&Proxy], got: &Got, answered: Instant, want: f64, what: &str) {
    assert_eq!(got.status, 200, "{what} at A: {}", got.body);
    let took = applied_everywhere(peers, want, answered, what).await;
    assert!(
        took <= PROPAGATION,
        "{what}: B and C applied it {took:?} after A's answer (limit {PROPAGATION:?})"
    );
}

/// Lines of `proxy`'s log that contain every one of `words`.
fn log_lines(proxy: &Proxy, words: &[&str]) -> usize {
    proxy
        .log_text()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An envelope from peer `origin` covering `[first, last]`, with URL purges of `SITE` at
/// these (seq, path).
fn envelope(origin: u64, first: u64, last: u64, purges: &[(u64, &str)]) -> String {
    envelope_at(origin, first, last, purges, now_ms())
}

/// [`envelope`], with messages accepted at `at_ms` by the origin's clock.
fn envelope_at(origin: u64, first: u64, last: u64, purges: &[(u64, &str)], at_ms: u64) -> String {
    let messages: Vec<Value> = purges
        .iter()
        .map(|(seq, path)| {
            json!({
                "v": 1, "origin": origin, "seq": seq, "at_ms": at_ms,
                "body": {"type": "purge", "soft": false,
                         "target": {"kind": "url", "host": SITE, "path": path}}
            })
        })
        .collect();
    json!({"v": 1, "origin": origin, "covers": [first, last], "messages": messages}).to_string()
}

/// POST `body` to `proxy`'s peer endpoint, with `Authorization: Bearer <token>` if given.
async fn post_peer(proxy: &Proxy, token: Option<&str>, body: String) -> Got {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    send(client().post(proxy.url("/_corral/peers")).body(body), &headers).await
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// One corral that receives peer messages (it lists itself and a peer nobody runs; nothing
/// is ever purged at it, so it never sends).
async fn receiver(origin: &Origin) -> Proxy {
    let addr = loopback();
    let nobody = url_of(loopback());
    Proxy::start_on(
        addr,
        origin.addr,
        with_peers(Conf::default(), &[url_of(addr), nobody], &[]),
    )
    .await
}

#[tokio::test]
async fn every_purge_kind_at_a_reaches_b_and_c_within_100ms_exactly_once() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    for p in ["/u", "/s", "/ban/1", "/batch-u", "/keep"] {
        versioned(&origin, p, &[]);
    }
    versioned(&origin, "/t", &[("xkey", "tag-t")]);
    versioned(&origin, "/batch-t", &[("xkey", "batch-tag")]);
    versioned(&origin, "/mag", &[("x-magento-tags", "cat_p_1,cms_b")]);
    // grace: a soft-purged copy is served stale while one request refreshes it
    let f = Fleet::start(&origin, Conf::default().cache("grace = \"30s\""), &[], false).await;
    let (a, b, c) = (&f.a, &f.b, &f.c);
    let peers = [b, c];
    let mut sent = 0.0;

    // a URL purge
    warm(&peers, &["/u", "/keep"]).await;
    let r = purge(a, "PURGE", "/u", &[]).await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "PURGE").await;
    for p in peers {
        assert_miss(p, "/u", "PURGE").await;
    }
    assert_eq!(origin.hits("/u"), 4, "B and C each fetched /u again");

    // a soft purge: not a fresh hit any more, refreshed once at each
    warm(&peers, &["/s"]).await;
    let r = purge(a, "PURGE", "/s", &[("soft-purge", "1")]).await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "soft PURGE").await;
    for p in peers {
        let got = get(p, "/s").await;
        assert!(
            !fresh_hit(&got.cache),
            "soft-purged /s at {} served as fresh: {}",
            p.addr,
            got.cache
        );
    }
    eventually(Duration::from_secs(5), "B and C refresh /s", || async {
        origin.hits("/s") == 4
    })
    .await;

    // a ban (FOSHttpCache's shape)
    warm(&peers, &["/ban/1"]).await;
    let r = purge(a, "BAN", "/", &[("x-url", "^/ban/")]).await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "BAN").await;
    for p in peers {
        assert_miss(p, "/ban/1", "BAN").await;
    }
    assert_eq!(origin.hits("/ban/1"), 4);

    // a tag purge (xkey)
    warm(&peers, &["/t"]).await;
    let r = purge(a, "PURGEKEYS", "/", &[("xkey-purge", "tag-t")]).await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "PURGEKEYS").await;
    for p in peers {
        assert_miss(p, "/t", "PURGEKEYS").await;
    }
    assert_eq!(origin.hits("/t"), 4);

    // a tag pattern (Magento 2's shape)
    warm(&peers, &["/mag"]).await;
    let pattern = [("x-magento-tags-pattern", "((^|,)cat_p_1(,|$))")];
    let r = purge(a, "PURGE", "/", &pattern).await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "tag pattern").await;
    for p in peers {
        assert_miss(p, "/mag", "tag pattern").await;
    }
    assert_eq!(origin.hits("/mag"), 4);

    // an admin batch: a URL and a tag, two purges, two messages
    warm(&peers, &["/batch-u", "/batch-t"]).await;
    let batch = json!({"urls": [format!("http://{SITE}/batch-u")], "tags": ["batch-tag"]});
    let r = admin_post(a, "/purge", &batch.to_string()).await;
    let answered = Instant::now();
    sent += 2.0;
    propagated(&peers, &r, answered, sent, "admin batch").await;
    for p in peers {
        assert_miss(p, "/batch-u", "batch url").await;
        assert_miss(p, "/batch-t", "batch tag").await;
    }
    assert_eq!(origin.hits("/batch-u"), 4);
    assert_eq!(origin.hits("/batch-t"), 4);

    // nothing of the above touched /keep; a purge of everything does
    for p in peers {
        let kept = get(p, "/keep").await;
        assert!(fresh_hit(&kept.cache), "/keep at {}: {}", p.addr, kept.cache);
    }
    let r = admin_post(a, "/purge/all", "").await;
    let answered = Instant::now();
    sent += 1.0;
    propagated(&peers, &r, answered, sent, "purge-all").await;
    for p in peers {
        assert_miss(p, "/keep", "purge-all").await;
    }
    assert_eq!(origin.hits("/keep"), 4);

    // exactly once per node: give an echo (a loop) time to arrive, then count
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_a = a.metrics().await;
    assert_eq!(
        sum(&at_a, "corral_purges_total", "result=\"ok\""),
        sent,
        "purges A accepted"
    );
    for series in [APPLIED, DUPLICATE, OWN] {
        assert_eq!(metric(&at_a, series), 0.0, "nothing comes back to A: {series}");
    }
    for p in peers {
        let m = p.metrics().await;
        assert_eq!(metric(&m, APPLIED), sent, "applied at {}", p.addr);
        assert_eq!(metric(&m, DUPLICATE), 0.0, "duplicates at {}", p.addr);
        assert_eq!(metric(&m, OWN), 0.0, "own messages back at {}", p.addr);
        assert_eq!(metric(&m, GAPS), 0.0, "gaps at {}", p.addr);
        assert_eq!(
            sum(&m, "corral_peer_delivered_total", "peer="),
            0.0,
            "{} forwarded what it received",
            p.addr
        );
    }
    for url in [f.b_url(), f.c_at_a()] {
        assert_eq!(
            metric(&at_a, &per_peer("corral_peer_delivered_total", &url)),
            sent,
            "A delivered to {url}"
        );
    }
    assert_eq!(
        sum(
            &at_a,
            "corral_peer_delivered_total",
            &format!("\"{}\"", url_of(a.addr))
        ),
        0.0,
        "A never sends to itself"
    );
}

#[tokio::test]
async fn with_memcached_a_url_purge_reaches_peers_l1_within_100ms() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    versioned(&origin, "/m", &[]);
    let f = Fleet::start(&origin, Conf::default().servers(&[&mc]), &[], false).await;
    let (a, b, c) = (&f.a, &f.b, &f.c);
    // B fetches /m (v1, into memcached), C takes B's copy from L2: both hold v1 in L1
    assert_eq!(get(b, "/m").await.body, "v1");
    assert!(get(b, "/m").await.cache.starts_with("corral; hit"));
    eventually(Duration::from_secs(5), "B's L2 write", || async {
        counter(b, "corral_l2_requests_total{op=\"set\",result=\"ok\"}").await >= 1.0
    })
    .await;
    eventually(Duration::from_secs(5), "C takes B's copy from L2", || async {
        get(c, "/m").await.cache.contains("detail=l2")
    })
    .await;
    let held = get(c, "/m").await;
    assert!(fresh_hit(&held.cache), "{}", held.cache);
    assert_eq!(held.body, "v1");

    let r = purge(a, "PURGE", "/m", &[]).await;
    let answered = Instant::now();
    // well before the 250 ms of memcached's purge log follower: this is the peer message
    propagated(&[b, c], &r, answered, 1.0, "PURGE with memcached").await;
    for p in [b, c] {
        let got = get(p, "/m").await;
        assert_ne!(got.body, "v1", "{} serves the purged copy: {}", p.addr, got.cache);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in [b, c] {
        let m = p.metrics().await;
        assert_eq!(metric(&m, APPLIED), 1.0, "once at {} by peers", p.addr);
        assert_eq!(metric(&m, DUPLICATE), 0.0);
    }
    assert_eq!(counter(a, APPLIED).await, 0.0);
}

#[tokio::test]
async fn a_peer_message_without_the_right_token_is_refused() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    versioned(&origin, "/r", &[]);
    let b = receiver(&origin).await;
    warm(&[&b], &["/r"]).await;
    let message = || envelope(7_700_001, 1, 1, &[(1, "/r")]);

    let none = post_peer(&b, None, message()).await;
    assert_eq!(none.status, 401, "no token: {}", none.body);
    let wrong = post_peer(&b, Some("not-the-token"), message()).await;
    assert_eq!(wrong.status, 403, "wrong token: {}", wrong.body);
    for refused in [&none, &wrong] {
        assert!(parse(&refused.body).get("error").is_some(), "{}", refused.body);
    }
    // malformed JSON, an unknown version: 400
    let garbage = post_peer(&b, Some(TOKEN), "{\"v\":1,".to_string()).await;
    assert_eq!(garbage.status, 400, "malformed: {}", garbage.body);
    let mut v2 = parse(&message());
    v2["v"] = json!(2);
    v2["messages"][0]["v"] = json!(2);
    let future = post_peer(&b, Some(TOKEN), v2.to_string()).await;
    assert_eq!(future.status, 400, "unknown version: {}", future.body);

    assert!(
        fresh_hit(&get(&b, "/r").await.cache),
        "nothing applied: /r still a hit"
    );
    eventually(Duration::from_secs(2), "the refusal logged", || async {
        log_lines(&b, &["peer message refused"]) >= 2
    })
    .await;
    assert!(
        b.log_text()
            .lines()
            .filter(|l| l.contains("peer message refused"))
            .all(|l| l.contains("WARN")),
        "refusals are warnings"
    );
    let m = b.metrics().await;
    assert_eq!(metric(&m, APPLIED), 0.0);
    assert_eq!(metric(&m, REFUSED), 2.0);
    assert_eq!(metric(&m, INVALID), 2.0);

    // the same message with the token is taken: the refusals were for the token alone
    let ok = post_peer(&b, Some(TOKEN), message()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let answer = parse(&ok.body);
    assert_eq!(answer["applied"], 1, "{}", ok.body);
    assert_eq!(answer["duplicates"], 0, "{}", ok.body);
    assert!(answer["corral"].is_u64(), "{}", ok.body);
    assert_miss(&b, "/r", "taken with the token").await;
}

#[tokio::test]
async fn a_sequence_gap_floors_the_cache_and_a_repeat_is_a_duplicate() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    for p in ["/cached", "/g1", "/g5"] {
        versioned(&origin, p, &[]);
    }
    let b = receiver(&origin).await;
    warm(&[&b], &["/cached"]).await;
    const PEER: u64 = 7_700_002;

    let first = post_peer(&b, Some(TOKEN), envelope(PEER, 1, 1, &[(1, "/g1")])).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let answer = parse(&first.body);
    assert_eq!(
        (answer["applied"].as_u64(), answer["gap"].as_bool()),
        (Some(1), Some(false)),
        "{}",
        first.body
    );
    assert!(
        fresh_hit(&get(&b, "/cached").await.cache),
        "no gap yet: /cached untouched"
    );

    // 2..=4 never arrive: everything B validated before is taken for purged. (Accepted 10 s
    // ago: a purge on another clock covers copies validated up to purge.clock_skew after it,
    // and /g5 is cached again below to show the duplicate is not applied.)
    let jump = envelope_at(PEER, 5, 5, &[(5, "/g5")], now_ms() - 10_000);
    let second = post_peer(&b, Some(TOKEN), jump.clone()).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let answer = parse(&second.body);
    assert_eq!(
        (answer["applied"].as_u64(), answer["gap"].as_bool()),
        (Some(1), Some(true)),
        "{}",
        second.body
    );
    assert_eq!(counter(&b, GAPS).await, 1.0);
    assert_miss(&b, "/cached", "after a gap").await;
    assert_eq!(origin.hits("/cached"), 2);

    // the same message again: skipped, counted as a duplicate, no new gap
    warm(&[&b], &["/g5"]).await;
    let again = post_peer(&b, Some(TOKEN), jump).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let answer = parse(&again.body);
    assert_eq!(
        (answer["applied"].as_u64(), answer["duplicates"].as_u64()),
        (Some(0), Some(1)),
        "{}",
        again.body
    );
    assert!(
        fresh_hit(&get(&b, "/g5").await.cache),
        "a duplicate is not applied again"
    );
    let m = b.metrics().await;
    assert_eq!(metric(&m, APPLIED), 2.0);
    assert_eq!(metric(&m, DUPLICATE), 1.0);
    assert_eq!(metric(&m, GAPS), 1.0);
}

#[tokio::test]
async fn a_cut_peer_is_left_alone_for_retry_delay_then_gets_every_purge() {
    let _serial = SERIAL.lock().await;
    const RETRY: Duration = Duration::from_secs(3);
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..20).map(|i| format!("/cut/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    for p in paths.iter().chain(&["/x"]) {
        versioned(&origin, p, &[]);
    }
    let f = Fleet::start(
        &origin,
        Conf::default(),
        &["timeout = \"300ms\"", "retry_delay = \"3s\""],
        true,
    )
    .await;
    let (a, b, c) = (&f.a, &f.b, &f.c);
    let (b_url, c_url) = (f.b_url(), f.c_at_a());
    let relay = f.relay();
    warm(&[c], &paths).await;
    warm(&[c], &["/x"]).await;

    relay.cut();
    // the failure comes after this: A's next attempt is due no earlier than t0 + RETRY
    let t0 = Instant::now();
    assert_eq!(purge(a, "PURGE", paths[0], &[]).await.status, 200);
    eventually(Duration::from_secs(2), "A finds C failed", || async {
        counter(a, &per_peer("corral_peer_failures_total", &c_url)).await >= 1.0
    })
    .await;
    // A had never talked to C: no pooled connection, so its one attempt is one connection
    let first = relay.attempts_while_cut();
    assert_eq!(first, 1, "one delivery attempt, then back-off");
    for p in &paths[1..] {
        let r = purge(a, "PURGE", p, &[]).await;
        assert_eq!(r.status, 200, "accepted while C is down: {}", r.body);
    }
    // ?wait=peers: B's result, and C's (not delivered: backing off)
    let waited = purge(a, "PURGE", "/x?wait=peers", &[]).await;
    assert_eq!(waited.status, 200, "{}", waited.body);
    let results = parse(&waited.body)["peers"].clone();
    assert_eq!(results[&b_url], "delivered", "{}", waited.body);
    let at_c = results[&c_url].as_str().unwrap_or_default();
    assert!(
        !at_c.is_empty() && at_c != "delivered",
        "C is cut: {}",
        waited.body
    );
    // no connection attempt to C within retry_delay (a sleep: proving that nothing happens)
    tokio::time::sleep((t0 + Duration::from_millis(2500)).saturating_duration_since(Instant::now())).await;
    let quiet = relay.attempts_while_cut();
    assert!(
        t0.elapsed() < RETRY,
        "the check ran {:?} after the first purge: too late to mean anything",
        t0.elapsed()
    );
    assert_eq!(quiet, first, "connection attempts to C within retry_delay");
    applied_everywhere(&[b], 21.0, Instant::now(), "B gets all").await;

    // then one probe, still cut
    eventually(Duration::from_secs(5), "A probes C after retry_delay", || async {
        relay.attempts_while_cut() > first
    })
    .await;
    assert_eq!(relay.attempts_while_cut(), first + 1, "one probe");
    assert_eq!(counter(c, APPLIED).await, 0.0, "nothing reached C");

    // the link back: the next probe goes through and the backlog drains
    relay.restore();
    applied_everywhere(&[c], 21.0, Instant::now(), "C gets the backlog").await;
    for p in paths.iter().chain(&["/x"]) {
        assert_miss(c, p, "purged while C was cut off").await;
        assert_eq!(origin.hits(p), 2, "{p} fetched again once, by C");
    }
    eventually(Duration::from_secs(2), "C's backlog empty", || async {
        let m = a.metrics().await;
        metric(&m, &per_peer("corral_peer_backlog", &c_url)) == 0.0
            && metric(&m, &per_peer("corral_peer_up", &c_url)) == 1.0
    })
    .await;
    assert_eq!(
        log_lines(a, &["peer failed", c_url.as_str()]),
        1,
        "one 'peer failed' line for C, not one per purge or per probe"
    );
    assert_eq!(
        log_lines(a, &["peer back", c_url.as_str()]),
        1,
        "one 'peer back' line for C"
    );
    assert_eq!(
        log_lines(a, &["peer failed", b_url.as_str()]),
        0,
        "B never failed"
    );
    assert_eq!(counter(c, DUPLICATE).await, 0.0);
}

#[tokio::test]
async fn a_backlog_overflow_makes_the_cut_peer_drop_its_cache() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..20).map(|i| format!("/ovf/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    for p in paths.iter().chain(&["/other"]) {
        versioned(&origin, p, &[]);
    }
    let f = Fleet::start(
        &origin,
        Conf::default(),
        &["timeout = \"300ms\"", "retry_delay = \"1s\"", "backlog = 5"],
        true,
    )
    .await;
    let (a, c) = (&f.a, &f.c);
    let c_url = f.c_at_a();
    warm(&[c], &paths).await;
    warm(&[c], &["/other"]).await;
    assert_eq!(c.stats().await.0, 21);

    f.relay().cut();
    assert_eq!(purge(a, "PURGE", paths[0], &[]).await.status, 200);
    eventually(Duration::from_secs(2), "A finds C failed", || async {
        counter(a, &per_peer("corral_peer_failures_total", &c_url)).await >= 1.0
    })
    .await;
    // queued when answered: 20 for a backlog of 5
    for p in &paths[1..] {
        assert_eq!(purge(a, "PURGE", p, &[]).await.status, 200);
    }
    f.relay().restore();
    eventually(Duration::from_secs(5), "C drops its cache", || async {
        counter(c, OVERFLOW_DROPS).await >= 1.0
    })
    .await;
    assert!(
        counter(a, &per_peer("corral_peer_backlog_dropped_total", &c_url)).await >= 1.0,
        "A counts the overflow"
    );
    assert_eq!(counter(c, OVERFLOW_DROPS).await, 1.0);
    assert_eq!(c.stats().await.0, 0, "C's L1 is empty");
    let said = c
        .log_text()
        .lines()
        .find(|l| l.contains("dropping stale cache"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(said.contains("ERROR"), "said loudly: {said:?}");
    // what was never purged is gone too, and what was purged is not served
    assert_miss(c, "/other", "dropped with the cache").await;
    assert_miss(c, paths[7], "purged").await;
}

#[tokio::test]
async fn a_killed_corrals_undelivered_purge_still_reaches_c_through_memcached() {
    let _serial = SERIAL.lock().await;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    versioned(&origin, "/k", &[]);
    versioned(&origin, "/k2", &[]);
    let mut f = Fleet::start(
        &origin,
        Conf::default().servers(&[&mc]),
        &["timeout = \"300ms\"", "retry_delay = \"60s\""],
        true,
    )
    .await;
    let c_url = f.c_at_a();
    warm(&[&f.c], &["/k"]).await;
    assert_eq!(get(&f.c, "/k").await.body, "v1");

    f.relay().cut();
    assert_eq!(purge(&f.a, "PURGE", "/k", &[]).await.status, 200);
    eventually(Duration::from_secs(2), "A fails to deliver to C", || async {
        counter(&f.a, &per_peer("corral_peer_failures_total", &c_url)).await >= 1.0
    })
    .await;
    applied_everywhere(&[&f.b], 1.0, Instant::now(), "B got it").await;
    // the purge waits in A's memory, for C, for 60 s: A dies with it
    f.a.kill();
    eventually(
        Duration::from_secs(3),
        "C stops serving /k through memcached's purge log",
        || async { get(&f.c, "/k").await.body != "v1" },
    )
    .await;
    let m = f.c.metrics().await;
    assert_eq!(metric(&m, APPLIED), 0.0, "the peer message never arrived");
    assert!(metric(&m, "corral_purge_log_applied") >= 1.0);

    // A back on the same address, the link restored: the fleet works again
    f.relay().restore();
    warm(&[&f.c], &["/k2"]).await;
    f.a.restart().await;
    let r = purge(&f.a, "PURGE", "/k2?wait=peers", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = parse(&r.body)["peers"].clone();
    assert_eq!(results[&c_url], "delivered", "{}", r.body);
    assert_eq!(results[&f.b_url()], "delivered", "{}", r.body);
    // delivered = applied: and not taken for a duplicate of the first A's message
    assert_eq!(counter(&f.c, APPLIED).await, 1.0);
    assert_eq!(counter(&f.b, APPLIED).await, 2.0);
    assert_ne!(get(&f.c, "/k2").await.body, "v1");
}

#[tokio::test]
async fn admin_peers_lists_every_peer_up_with_its_counts() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    let f = Fleet::start(&origin, Conf::default(), &[], false).await;
    let (a, b, c) = (&f.a, &f.b, &f.c);
    for p in ["/p1", "/p2"] {
        assert_eq!(purge(a, "PURGE", p, &[]).await.status, 200);
    }
    applied_everywhere(&[b, c], 2.0, Instant::now(), "both purges").await;
    let peers_of_a = || async {
        let text = client()
            .get(format!("http://{}/peers", a.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        parse(&text)
    };
    let entry = |v: &Value, url: &str| -> Option<Value> {
        v["peers"]
            .as_array()?
            .iter()
            .find(|p| p["url"].as_str().map(|u| u.trim_end_matches('/')) == Some(url))
            .cloned()
    };
    eventually(Duration::from_secs(2), "A counts both deliveries", || async {
        let v = peers_of_a().await;
        [f.b_url(), f.c_at_a()]
            .iter()
            .all(|u| entry(&v, u.as_str()).is_some_and(|p| p["delivered"] == 2))
    })
    .await;
    let v = peers_of_a().await;
    assert!(v["corral"].is_u64(), "{v}");
    for url in [f.b_url(), f.c_at_a()] {
        let p = entry(&v, url.as_str()).unwrap_or_else(|| panic!("{url} in {v}"));
        assert_eq!(p["state"], "up", "{p}");
        assert_eq!(p["backlog"], 0, "{p}");
        assert_eq!(p["failures"], 0, "{p}");
        assert_eq!(p["dropped"], 0, "{p}");
        assert!(p["failed_since_ms"].is_null(), "{p}");
        assert!(p["last_latency_ms"].is_number(), "{p}");
        let m = a.metrics().await;
        assert_eq!(metric(&m, &per_peer("corral_peer_up", &url)), 1.0);
        assert_eq!(metric(&m, &per_peer("corral_peer_delivered_total", &url)), 2.0);
        assert_eq!(metric(&m, &per_peer("corral_peer_backlog", &url)), 0.0);
    }
    // A itself: listed as "self", or not at all
    if let Some(me) = entry(&v, url_of(a.addr).as_str()) {
        assert_eq!(me["state"], "self", "{me}");
        assert_eq!(me["delivered"], 0, "{me}");
    }
    let listed = v["peers"].as_array().map_or(0, Vec::len);
    assert!((2..=3).contains(&listed), "B, C and maybe A itself: {v}");
}

/// Without memcached nothing else carries a purge that a corral accepted and died with: the
/// peers notice its restart (same node, new id) and count everything before as purged.
#[tokio::test]
async fn a_restarted_sender_without_memcached_makes_its_peers_drop_what_it_may_have_lost() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    for p in ["/r1", "/r2", "/kept"] {
        versioned(&origin, p, &[]);
    }
    let mut f = Fleet::start(&origin, Conf::default(), &[], false).await;
    assert_eq!(purge(&f.a, "PURGE", "/r1", &[]).await.status, 200);
    applied_everywhere(&[&f.b, &f.c], 1.0, Instant::now(), "the first A's purge").await;
    warm(&[&f.b], &["/kept"]).await;
    // A dies (with whatever it had not delivered) and comes back as a new process
    f.a.kill();
    f.a.restart().await;
    let r = purge(&f.a, "PURGE", "/r2?wait=peers", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(parse(&r.body)["peers"][&f.b_url()], "delivered", "{}", r.body);
    // B could not know what the first A lost: /kept, never purged, is fetched again
    assert_miss(&f.b, "/kept", "after a peer restarted").await;
    let drops = "corral_cache_drops_total{reason=\"peer-restart\"}";
    assert_eq!(counter(&f.b, drops).await, 1.0);
    assert!(
        f.b.log_text().contains("dropping stale cache: peer"),
        "the drop is logged"
    );
    // once per restart, not once per message
    assert_eq!(purge(&f.a, "PURGE", "/r1?wait=peers", &[]).await.status, 200);
    assert_eq!(counter(&f.b, drops).await, 1.0);
}

/// `[peers] urls` and `token` change on a config reload, without a restart: a corral that had
/// no peers is given one (its purges reach it from then on, with `?wait=peers` saying so), a
/// removed peer gets nothing more, and the cache of both stays.
#[tokio::test]
async fn a_reload_adds_and_removes_peers() {
    let _serial = SERIAL.lock().await;
    let origin = Origin::start().await;
    for p in ["/r1", "/r2", "/kept"] {
        versioned(&origin, p, &[]);
    }
    let (a_addr, b_addr) = (loopback(), loopback());
    // B accepts peer messages (its token); A starts alone
    let b = Proxy::start_on(
        b_addr,
        origin.addr,
        with_peers(Conf::default(), &[url_of(a_addr)], &[]),
    )
    .await;
    let a = Proxy::start_on(a_addr, origin.addr, Conf::default()).await;
    warm(&[&a, &b], &["/r1", "/r2", "/kept"]).await;
    assert!(purge(&a, "PURGE", "/kept?wait=peers", &[])
        .await
        .body
        .contains("\"purged\":1"));
    assert!(fresh_hit(&get(&b, "/kept").await.cache), "A has no peers yet");

    // A is given B
    let path = a.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    let with_b = format!(
        "{text}\n[peers]\nurls = [\"{}\"]\ntoken = \"{TOKEN}\"\n",
        url_of(b_addr)
    );
    std::fs::write(&path, &with_b).unwrap();
    let r = admin_post(&a, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("peers.urls") && r.body.contains("\"needs_restart\":[]"),
        "{}",
        r.body
    );
    let got = purge(&a, "PURGE", "/r1?wait=peers", &[]).await;
    assert!(
        got.body
            .contains(&format!("\"{}\":\"delivered\"", url_of(b_addr))),
        "{}",
        got.body
    );
    assert_miss(&b, "/r1", "a purge through the peer added by the reload").await;
    assert!(fresh_hit(&get(&a, "/r2").await.cache), "A's cache stayed");

    // and B is taken away again
    std::fs::write(&path, &text).unwrap();
    let r = admin_post(&a, "/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = purge(&a, "PURGE", "/r2?wait=peers", &[]).await;
    assert!(!got.body.contains(&url_of(b_addr)), "{}", got.body);
    assert!(
        fresh_hit(&get(&b, "/r2").await.cache),
        "a removed peer is not sent to"
    );
    let status = get_with(&format!("http://{}/peers", a.admin), &[]).await;
    assert!(!status.body.contains(&url_of(b_addr)), "{}", status.body);
}
