//! The memcached L2 tier: shared between corral processes, outage-tolerant, and a dogpile lock
//! across proxies. Real memcached, real corral processes, real origin.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use pingora_cache::key::CacheHashKey;

/// Every corral of a site sees the site's Host, whatever address the client dialled.
const SITE: (&str, &str) = ("host", "www.site.test");

async fn get(url: &str) -> Got {
    get_with(url, &[SITE]).await
}

fn cacheable(body: String) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=60")
}

/// Wait until `proxy` has stored `n` values in memcached (the L2 write is asynchronous).
async fn l2_sets(proxy: &Proxy, n: f64) {
    eventually(Duration::from_secs(5), "L2 writes", || async {
        metric(
            &proxy.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= n
    })
    .await;
}

/// Two corrals on `conf`, both holding v1 of `path`: A fetched it, B took it from L2.
async fn two_holding_v1(origin: &Origin, conf: Conf, path: &str) -> (Proxy, Proxy) {
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    assert_eq!(get(&a.url(path)).await.body, "v1");
    l2_sets(&a, 1.0).await;
    assert!(get(&b.url(path)).await.cache.ends_with("detail=l2"));
    (a, b)
}

#[tokio::test]
async fn an_object_fetched_through_one_corral_is_an_l2_hit_at_another() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/shared", |_| cacheable("shared body".into()));
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;

    let first = get(&a.url("/shared")).await;
    assert!(first.cache.contains("fwd=miss; stored"), "{}", first.cache);
    l2_sets(&a, 1.0).await;

    // a range request answered from L2 is cut from its body like any other hit
    let part = get_with(&b.url("/shared"), &[SITE, ("range", "bytes=0-5")]).await;
    assert_eq!((part.status, part.body.as_str()), (206, "shared"));
    assert!(part.cache.ends_with("detail=l2"), "{}", part.cache);
    let b2 = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let at_b = get(&b2.url("/shared")).await;
    assert_eq!(at_b.body, "shared body");
    assert!(at_b.cache.starts_with("corral; hit; ttl="), "{}", at_b.cache);
    assert!(at_b.cache.ends_with("detail=l2"), "{}", at_b.cache);
    assert_eq!(origin.hits("/shared"), 1);
    // promoted into L1: the next hit is local
    let again = get(&b2.url("/shared")).await;
    assert!(
        again.cache.starts_with("corral; hit") && !again.cache.contains("l2"),
        "{}",
        again.cache
    );
}

/// A crawler's scan over what memcached holds does not push the popular set out of L1: a copy
/// promoted from L2 was admitted by the request that read it, and that read is not a second
/// use (S3-FIFO, the default, promotes a used entry to its main queue, whose clock would then
/// push out the entries read often).
#[tokio::test]
async fn a_scan_served_from_l2_does_not_flush_the_popular_set_from_l1() {
    const HOT: usize = 12;
    const SCAN: usize = 300;
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    let body = "p".repeat(16 * 1024);
    for set in ["hot", "scan"] {
        for i in 0..SCAN {
            let b = body.clone();
            origin.route(&format!("/{set}/{i}"), move |_| cacheable(b.clone()));
        }
    }
    // 1 MiB: about 58 entries of 16 KiB with their bookkeeping
    let conf = Conf::default()
        .servers(&[&mc])
        .cache("memory_bytes = \"1MiB\"")
        .cache("max_object_bytes = \"64KiB\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    // B puts what the scan will read into memcached
    for i in 0..SCAN {
        assert_eq!(get(&b.url(&format!("/scan/{i}"))).await.status, 200);
    }
    l2_sets(&b, SCAN as f64).await;
    // A's popular set: filled, then read
    for i in 0..HOT {
        get(&a.url(&format!("/hot/{i}"))).await;
    }
    for _ in 0..3 {
        for i in 0..HOT {
            let g = get(&a.url(&format!("/hot/{i}"))).await;
            assert!(
                g.cache.starts_with("corral; hit") && !g.cache.contains("l2"),
                "{}",
                g.cache
            );
        }
    }
    // the scan, five times L1's budget, every object from memcached
    for i in 0..SCAN {
        let g = get(&a.url(&format!("/scan/{i}"))).await;
        assert!(g.cache.ends_with("detail=l2"), "/scan/{i}: {}", g.cache);
    }
    let mut in_l1 = 0;
    for i in 0..HOT {
        let g = get(&a.url(&format!("/hot/{i}"))).await;
        if g.cache.starts_with("corral; hit") && !g.cache.contains("l2") {
            in_l1 += 1;
        }
    }
    assert!(
        in_l1 >= HOT - 1,
        "{in_l1} of the {HOT} popular entries still in L1"
    );
    assert_eq!(origin.hits("/hot/0"), 1);
}

#[tokio::test]
async fn two_corrals_with_two_hundred_clients_each_make_one_origin_request() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/stampede", |_| {
        cacheable("s".repeat(5000)).delay(Duration::from_millis(300))
    });
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let url = if i % 2 == 0 {
            a.url("/stampede")
        } else {
            b.url("/stampede")
        };
        let req = c.get(url).header(SITE.0, SITE.1);
        tasks.push(tokio::spawn(async move { send(req, &[]).await }));
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!((g.status, g.body.len()), (200, 5000), "{}", g.cache);
    }
    assert_eq!(
        origin.hits("/stampede"),
        1,
        "one upstream fetch for 2 proxies × 200 clients"
    );
}

#[tokio::test]
async fn memcached_dying_under_load_fails_no_request_and_is_used_again_when_back() {
    let mut mc = Memcached::start().await;
    let origin = Origin::start().await;
    for i in 0..100 {
        origin.route(&format!("/load/{i}"), move |_| cacheable(format!("item {i}")));
    }
    // an L1 far smaller than the working set: most requests need L2
    let conf = Conf::default()
        .servers(&[&mc])
        .cache("memory_bytes = \"8KiB\"")
        .cache("max_object_bytes = \"4KiB\"");
    let a = Proxy::start(origin.addr, conf).await;
    let c = client();
    let mut failures = 0;
    for round in 0..20 {
        if round == 5 {
            mc.stop();
        }
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let req = c.get(a.url(&format!("/load/{i}"))).header(SITE.0, SITE.1);
                tokio::spawn(async move { send(req, &[]).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let g = t.await.unwrap();
            if g.status != 200 || g.body != format!("item {i}") {
                failures += 1;
            }
        }
    }
    assert_eq!(
        failures, 0,
        "2,000 requests, memcached killed after 500: none failed"
    );
    let m = a.metrics().await;
    assert!(
        metric(&m, "corral_l2_lookups_total{result=\"hit\"}") >= 1.0,
        "L2 served while it was up: {m}"
    );
    assert!(
        metric(&m, "corral_l2_servers_down") >= 1.0,
        "the outage was noticed: {m}"
    );
    // evictions run right after each admission, in the background
    eventually(
        Duration::from_secs(3),
        "promotions respect the L1 bound",
        || async { metric(&a.metrics().await, "corral_l1_bytes") <= 8192.0 },
    )
    .await;

    mc.restart().await;
    eventually(Duration::from_secs(3), "circuit closes", || async {
        metric(&a.metrics().await, "corral_l2_servers_down") == 0.0
    })
    .await;
    origin.route("/after", |_| cacheable("after".into()));
    get(&a.url("/after")).await;
    eventually(Duration::from_secs(5), "new fills reach memcached", || async {
        mc.items().await >= 1
    })
    .await;
}

#[tokio::test]
async fn a_corrupted_value_in_memcached_is_a_miss_never_served() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/victim", |_| cacheable("the real body".into()));
    let a = Proxy::start(
        origin.addr,
        Conf::default().servers(&[&mc]).memcached("namespace = \"t\""),
    )
    .await;
    let combined = corral::key::for_url(SITE.1, "/victim").combined();
    let mk = corral::storage::memcached::key_for("t", 0, &combined);
    for (round, garbage) in [
        &b"CRRL\x01\x00\x00\x00\x09truncated"[..],
        b"hello, not a corral record",
    ]
    .into_iter()
    .enumerate()
    {
        let mut cmd = format!("set {mk} 0 60 {}\r\n", garbage.len()).into_bytes();
        cmd.extend_from_slice(garbage);
        cmd.extend_from_slice(b"\r\n");
        assert!(mc.command(&cmd, "\r\n").await.contains("STORED"));
        let g = get(&a.url("/victim")).await;
        assert_eq!(g.body, "the real body");
        assert!(g.cache.contains("fwd=miss"), "{}", g.cache);
        // the good copy reaches memcached, then a POST removes it from L1 and L2
        l2_sets(&a, round as f64 + 1.0).await;
        send(client().post(a.url("/victim")), &[SITE]).await;
    }
    let m = a.metrics().await;
    assert_eq!(metric(&m, "corral_l2_lookups_total{result=\"corrupt\"}"), 2.0);
}

#[tokio::test]
async fn a_successful_post_removes_the_url_from_l2_too() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/doc", |s| cacheable(format!("v{}", s.n)));
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    assert_eq!(get(&a.url("/doc")).await.body, "v1");
    l2_sets(&a, 1.0).await;
    send(client().post(a.url("/doc")), &[SITE]).await; // the origin counts it: v2
    let at_b = get(&b.url("/doc")).await;
    assert_eq!(at_b.body, "v3", "B does not get the copy the POST invalidated");
}

#[tokio::test]
async fn grace_works_from_l2() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/graceful", |s| {
        Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=1")
    });
    let conf = Conf::default().servers(&[&mc]).cache("grace = \"30s\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    assert_eq!(get(&a.url("/graceful")).await.body, "v1");
    l2_sets(&a, 1.0).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // stale now, within grace
    let stale = get(&b.url("/graceful")).await;
    assert_eq!(stale.body, "v1", "B serves the stale copy it found in L2");
    assert!(stale.cache.starts_with("corral; hit; ttl=-"), "{}", stale.cache);
    eventually(Duration::from_secs(5), "one background refresh", || async {
        origin.hits("/graceful") == 2
    })
    .await;
}

#[tokio::test]
async fn objects_over_the_l2_limit_stay_in_l1() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/large", |_| cacheable("L".repeat(20 * 1024)));
    origin.route("/small", |_| cacheable("s".repeat(1024)));
    let conf = Conf::default()
        .servers(&[&mc])
        .memcached("max_object_bytes = \"10KiB\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    get(&a.url("/large")).await;
    get(&a.url("/small")).await;
    l2_sets(&a, 1.0).await;
    assert!(
        get(&a.url("/large")).await.cache.starts_with("corral; hit"),
        "still an L1 hit at A"
    );
    assert!(
        get(&b.url("/large")).await.cache.contains("fwd=miss"),
        "never reached memcached"
    );
    assert!(get(&b.url("/small")).await.cache.ends_with("detail=l2"));
    assert_eq!(origin.hits("/large"), 2);
    assert_eq!(origin.hits("/small"), 1);
}

#[tokio::test]
async fn keys_spread_over_servers_and_one_down_leaves_the_others_serving() {
    // three: with one down, the other two are still a read quorum of the purge log (with two
    // servers, a corral that reaches one is fenced: tests/invariant.rs)
    let mc1 = Memcached::start().await;
    let mut mc2 = Memcached::start().await;
    let mc3 = Memcached::start().await;
    let origin = Origin::start().await;
    for i in 0..40 {
        origin.route(&format!("/spread/{i}"), move |_| cacheable(format!("v{i}")));
    }
    let conf = Conf::default().servers(&[&mc1, &mc2, &mc3]);
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    for i in 0..40 {
        get(&a.url(&format!("/spread/{i}"))).await;
    }
    l2_sets(&a, 40.0).await;
    // besides the values, each server holds the purge log's epoch (a control key)
    let epoch_and = |n: u64| {
        n.checked_sub(1)
            .expect("the purge log's epoch is on every server")
    };
    let n1 = epoch_and(mc1.items().await);
    let n2 = epoch_and(mc2.items().await);
    let n3 = epoch_and(mc3.items().await);
    assert_eq!(n1 + n2 + n3, 40);
    assert!(
        n1 >= 3 && n2 >= 3 && n3 >= 3,
        "keys are spread: {n1} / {n2} / {n3}"
    );

    mc2.stop();
    let mut from_l2 = 0;
    for i in 0..40 {
        let g = get(&b.url(&format!("/spread/{i}"))).await;
        assert_eq!((g.status, g.body.clone()), (200, format!("v{i}")));
        if g.cache.ends_with("detail=l2") {
            from_l2 += 1;
        }
    }
    assert_eq!(
        from_l2 as u64,
        n1 + n3,
        "the live servers still serve their share"
    );
}

#[tokio::test]
async fn a_stale_entry_is_refreshed_once_across_corrals() {
    refreshed_once_across_corrals(&[None]).await;
}

#[tokio::test]
async fn each_stale_vary_variant_is_refreshed_once_across_corrals() {
    // the first variant lives in Pingora's primary slot, the other in a secondary one
    refreshed_once_across_corrals(&[Some("gzip"), Some("br")]).await;
}

/// Two corrals hold the same copies (one per `Accept-Encoding` in `variants`), which go stale
/// for both at once, twice: a changed response (200), then an unchanged one (304). Each
/// variant is refreshed once per round for both corrals; the second round also shows the
/// refresh lock was given back, not left to expire.
async fn refreshed_once_across_corrals(variants: &[Option<&'static str>]) {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    // per variant: v1 (validator "a"), then a changed v2 (validator "b"), then 304s for "b"
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::HashMap::new()));
    origin.route("/popular", move |s| {
        let enc = s
            .headers
            .get("accept-encoding")
            .map_or("none", |v| v.to_str().unwrap());
        let n = {
            let mut seen = seen.lock();
            let n = seen.entry(enc.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let reply = match s.headers.get("if-none-match") {
            Some(v) if n > 2 && v == "\"b\"" => Reply::ok("").status(304),
            _ => Reply::ok(format!("{enc} v{}", n.min(2))),
        };
        reply
            .header("etag", if n == 1 { "\"a\"" } else { "\"b\"" })
            .header("cache-control", "max-age=1")
            .header("vary", "Accept-Encoding")
            .delay(Duration::from_millis(300))
    });
    let conf = Conf::default().servers(&[&mc]).cache("grace = \"30s\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    let fetch = |p: &Proxy, enc: Option<&'static str>| {
        let req = client().get(p.url("/popular")).header(SITE.0, SITE.1);
        let req = match enc {
            Some(e) => req.header("accept-encoding", e),
            None => req,
        };
        async move { send(req, &[]).await }
    };
    let n = variants.len();
    for (i, &enc) in variants.iter().enumerate() {
        assert!(fetch(&a, enc).await.body.ends_with(" v1"));
        l2_sets(&a, (i + 1) as f64).await;
        assert!(fetch(&b, enc).await.cache.ends_with("detail=l2"));
    }
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let p = if i % 2 == 0 { &a } else { &b };
                let enc = variants[(i / 2) % n];
                let got = fetch(p, enc);
                tokio::spawn(got)
            })
            .collect();
        for t in tasks {
            let got = t.await.unwrap();
            let stale = if round == 1 { " v1" } else { " v2" };
            assert!(got.body.ends_with(stale), "served stale at once: {}", got.cache);
        }
        // each corral answers fresh once its refresh is done (its own or the other's)
        for p in [&a, &b] {
            for &enc in variants {
                eventually(Duration::from_secs(10), "a fresh copy", || async {
                    let got = fetch(p, enc).await;
                    got.cache.starts_with("corral; hit; ttl=0") && got.body.ends_with(" v2")
                })
                .await;
            }
        }
        let refreshes = n * (1 + round);
        assert_eq!(
            origin.hits("/popular"),
            refreshes,
            "one refresh per variant for both"
        );
        let peer = |m: String| metric(&m, "corral_stale_refreshes_total{how=\"peer\"}");
        let adopted = peer(a.metrics().await) + peer(b.metrics().await);
        assert_eq!(adopted, (n * round) as f64);
    }
    for p in [&a, &b] {
        assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
    }
}

#[tokio::test]
async fn an_expired_entry_past_grace_is_revalidated_once_across_corrals() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    // v1 (validator "a"), then a changed v2 (validator "b"), then 304s for "b"; refreshes are
    // slow, so both corrals' clients are waiting at once
    origin.route("/expired", |s| {
        let reply = match s.headers.get("if-none-match") {
            Some(v) if s.n > 2 && v == "\"b\"" => Reply::ok("").status(304),
            _ => Reply::ok(format!("v{}", s.n.min(2))),
        };
        let delay = if s.n > 1 { 300 } else { 0 };
        reply
            .header("etag", if s.n == 1 { "\"a\"" } else { "\"b\"" })
            .header("cache-control", "max-age=1")
            .delay(Duration::from_millis(delay))
    });
    // no grace: past max-age, clients wait for a revalidation
    let conf = Conf::default().servers(&[&mc]).cache("grace = \"0s\"");
    let (a, b) = two_holding_v1(&origin, conf, "/expired").await;
    let c = client();
    let how = |m: &str, label: &str| metric(m, &format!("corral_stale_refreshes_total{{how=\"{label}\"}}"));
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let url = if i % 2 == 0 {
                    a.url("/expired")
                } else {
                    b.url("/expired")
                };
                let req = c.get(url).header(SITE.0, SITE.1);
                tokio::spawn(async move { send(req, &[]).await })
            })
            .collect();
        for t in tasks {
            let got = t.await.unwrap();
            assert_eq!(got.body, "v2", "the revalidated copy: {}", got.cache);
        }
        assert_eq!(
            origin.hits("/expired"),
            1 + round,
            "one revalidation for both corrals"
        );
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        assert_eq!(how(&ma, "mine") + how(&mb, "mine"), round as f64);
        assert_eq!(how(&ma, "peer") + how(&mb, "peer"), round as f64);
    }
    for p in [&a, &b] {
        assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
    }
}

#[tokio::test]
async fn when_the_refreshing_corral_fails_another_takes_over_at_once() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    // v1, then a slow 500 (A's revalidation), then v3
    origin.route("/flaky", |s| match s.n {
        1 => Reply::ok("v1").header("cache-control", "max-age=1"),
        2 => Reply::ok("down").status(500).delay(Duration::from_millis(300)),
        n => Reply::ok(format!("v{n}")).header("cache-control", "max-age=60"),
    });
    // no grace; a lock_timeout far longer than the test: B must not wait it out
    let conf = Conf::default()
        .servers(&[&mc])
        .cache("grace = \"0s\"")
        .cache("lock_timeout = \"30s\"");
    let (a, b) = two_holding_v1(&origin, conf, "/flaky").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let at_a = {
        let url = a.url("/flaky");
        tokio::spawn(async move { get(&url).await })
    };
    eventually(Duration::from_secs(5), "A revalidating", || async {
        origin.hits("/flaky") == 2
    })
    .await;
    // B waits for A's copy; A's revalidation fails and gives the lock back: B takes it over
    let at_b = get(&b.url("/flaky")).await;
    assert_eq!(at_b.body, "v3", "{}", at_b.cache);
    assert_eq!(at_a.await.unwrap().body, "v1", "A: stale-if-error");
    assert_eq!(origin.hits("/flaky"), 3);
    let m = b.metrics().await;
    assert_eq!(metric(&m, "corral_stale_refreshes_total{how=\"mine\"}"), 1.0);
    assert_eq!(metric(&m, "corral_stale_refreshes_total{how=\"timeout\"}"), 0.0);
}

/// The memcached key of `path` on the site, namespace `t`, generation 0.
fn mc_key(path: &str) -> String {
    let combined = corral::key::for_url(SITE.1, path).combined();
    corral::storage::memcached::key_for("t", 0, &combined)
}

/// Whether memcached holds nothing under `key` (neither a value nor a lease placeholder).
async fn absent(mc: &Memcached, key: &str) -> bool {
    mc.command(format!("mg {key} v\r\n").as_bytes(), "\r\n")
        .await
        .starts_with("EN")
}

/// See: issue 10, item 6. A corral that won the fill lease and then failed (here the origin
/// drops the connection) kept the lease until `lock_timeout`: every other corral waited that
/// long for a value that would never come.
#[tokio::test]
async fn r10_a_lease_won_by_a_failed_fill_is_given_back_at_once() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/gone", |s| match s.n {
        1 => Reply::dropped(),
        n => cacheable(format!("v{n}")),
    });
    let conf = Conf::default()
        .servers(&[&mc])
        .memcached("namespace = \"t\"")
        .cache("lock_timeout = \"30s\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    assert_eq!(get(&a.url("/gone")).await.status, 502);
    let key = mc_key("/gone");
    eventually(Duration::from_secs(5), "the lease given back", || {
        absent(&mc, &key)
    })
    .await;
    let at_b = get(&b.url("/gone")).await;
    assert_eq!(at_b.body, "v2");
    let m = b.metrics().await;
    assert_eq!(metric(&m, "corral_l2_lookups_total{result=\"waited\"}"), 0.0);
}

/// See: issue 10, item 6. Every per-key lock map goes back to empty, and memcached holds no
/// lease placeholder, after a thousand fills that fail in every way a fill can: the origin
/// drops the connection, answers an uncacheable 500, is slower than `first_byte_timeout`,
/// the client asks `only-if-cached`, or the client goes away mid-request.
#[tokio::test]
async fn r10_lock_maps_are_empty_after_a_thousand_failed_fills() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    for i in 0..1000 {
        let path = format!("/fail/{i}");
        origin.route(&path, move |_| match i % 5 {
            0 => Reply::dropped(),
            1 => Reply::ok("no").status(500).header("cache-control", "no-store"),
            2 => cacheable("late".into()).delay(Duration::from_millis(400)),
            3 => cacheable("never asked".into()),
            _ => cacheable("the client is gone".into()).delay(Duration::from_millis(300)),
        });
    }
    let conf = Conf::default()
        .servers(&[&mc])
        .memcached("namespace = \"t\"")
        .cache("lock_timeout = \"30s\"")
        .upstream("first_byte_timeout = \"150ms\"");
    let a = Proxy::start(origin.addr, conf).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let (mut ok, mut gone) = (0, 0);
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let results = futures::future::join_all(chunk.iter().map(|&i| {
            let url = a.url(&format!("/fail/{i}"));
            let impatient = impatient.clone();
            async move {
                match i % 5 {
                    3 => Some(
                        get_with(&url, &[SITE, ("cache-control", "only-if-cached")])
                            .await
                            .status,
                    ),
                    4 => {
                        let r = impatient.get(&url).header(SITE.0, SITE.1).send().await;
                        assert!(r.is_err(), "the client gave up first");
                        None
                    }
                    _ => Some(get(&url).await.status),
                }
            }
        }))
        .await;
        for r in results {
            match r {
                Some(status) => {
                    assert!(status >= 500, "a failed fill: {status}");
                    ok += 1;
                }
                None => gone += 1,
            }
        }
    }
    assert_eq!((ok, gone), (800, 200));
    eventually(Duration::from_secs(10), "every lock given back", || async {
        let m = a.metrics().await;
        ["leases", "refreshing", "gates"]
            .iter()
            .all(|map| metric(&m, &format!("corral_lock_entries{{map=\"{map}\"}}")) == 0.0)
            // nothing but the purge log's epoch: no lease placeholder left behind
            && mc.items().await == 1
    })
    .await;
}

/// See: issue 10, item 3. B fills a URL, A hard-purges it meanwhile, and B's write to
/// memcached lands after A's delete: once A's sweeper has dropped its record of the purge,
/// A must not take B's pre-purge copy from memcached.
#[tokio::test]
async fn r10_a_purged_url_does_not_come_back_from_l2() {
    let mc = Memcached::start().await;
    let mut origin = SlowOrigin::start().await;
    let mut conf = Conf::default()
        .servers(&[&mc])
        .memcached("namespace = \"t\"")
        .cache("lock_timeout = \"30s\"");
    conf.rules.push_str("[purge]\nsweep_interval = \"20ms\"\n");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    // B fills /slow (it won the lease) and its client has the header: validated before the purge
    let fill = origin.first_fill(&b, SITE.1).await;
    // A follows memcached's purge log from its first L2 lookup on
    assert_eq!(get(&a.url("/warm")).await.body, "v2-aabbbbb");
    let purged = send(
        client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), a.url("/slow")),
        &[SITE],
    )
    .await;
    assert_eq!(purged.status, 200);
    assert_eq!(origin.finish(fill).await, b"v1-aabbbbb");
    // B's write to memcached has been tried
    eventually(Duration::from_secs(5), "B's L2 write", || async {
        metric(
            &b.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 1.0
    })
    .await;
    // A has read its own record back from the log, and its sweeper has dropped the record
    eventually(Duration::from_secs(20), "A's purge record expired", || async {
        let m = a.metrics().await;
        metric(&m, "corral_purge_log_applied") >= 1.0 && metric(&m, "corral_purge_records") == 0.0
    })
    .await;
    let at_a = get(&a.url("/slow")).await;
    assert_eq!(at_a.body, "v3-aabbbbb", "{}", at_a.cache);
    assert!(at_a.cache.contains("fwd=miss"), "{}", at_a.cache);
}

/// Whoever can write to memcached must not be able to plant a copy that passes every purge:
/// a value validated in the future is refused (a miss), and so is the planted body.
#[tokio::test]
async fn a_value_planted_in_memcached_with_a_future_date_is_never_served() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/planted", |_| cacheable("the real body".into()));
    let a = Proxy::start(
        origin.addr,
        Conf::default().servers(&[&mc]).memcached("namespace = \"t\""),
    )
    .await;
    let combined = corral::key::for_url(SITE.1, "/planted").combined();
    let mk = corral::storage::memcached::key_for("t", 0, &combined);
    let later = std::time::SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    let mut head = pingora_http::ResponseHeader::build(200, None).unwrap();
    head.append_header("cache-control", "max-age=60").unwrap();
    head.append_header("content-length", "6").unwrap();
    let meta = pingora_cache::CacheMeta::new(later + Duration::from_secs(60), later, 0, 0, head);
    let value = corral::storage::record::encode(&meta, 1, b"POISON").unwrap();
    let mut cmd = format!("set {mk} 0 60 {}\r\n", value.len()).into_bytes();
    cmd.extend_from_slice(&value);
    cmd.extend_from_slice(b"\r\n");
    assert!(mc.command(&cmd, "\r\n").await.contains("STORED"));
    let g = get(&a.url("/planted")).await;
    assert_eq!(g.body, "the real body");
    assert!(g.cache.contains("fwd=miss"), "{}", g.cache);
}

/// A purge log record dated far ahead (planted, or a clock far off) counts from now plus
/// `purge.clock_skew`, not from its date: the cache works again a moment later, not in a year.
#[tokio::test]
async fn a_purge_record_dated_far_ahead_does_not_switch_the_cache_off() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/after", |s| cacheable(format!("v{}", s.n)));
    let a = Proxy::start(
        origin.addr,
        Conf::default().servers(&[&mc]).memcached("namespace = \"t\""),
    )
    .await;
    // the corral has read the log once (it creates its epoch), then a ban of everything,
    // dated a year ahead, is appended to it
    get(&a.url("/after")).await;
    // a purge of something else makes the log's counter
    let purge = send(
        client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), a.url("/other")),
        &[SITE],
    )
    .await;
    assert_eq!(purge.status, 200, "{}", purge.body);
    let seq = mc.command(b"incr corral/t/purgelog/seq 1\r\n", "\r\n").await;
    let seq: u64 = seq.trim().parse().unwrap_or_else(|_| panic!("incr: {seq}"));
    let at = std::time::SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let record = format!(
        "{{\"at_ms\":{at_ms},\"soft\":false,\"what\":{{\"kind\":\"ban\",\"host\":null,\"url\":\".*\",\"content_type\":null}},\"origin\":12345}}"
    );
    let mut cmd = format!("set corral/t/purgelog/{seq} 0 0 {}\r\n", record.len()).into_bytes();
    cmd.extend_from_slice(record.as_bytes());
    cmd.extend_from_slice(b"\r\n");
    assert!(mc.command(&cmd, "\r\n").await.contains("STORED"));
    eventually(Duration::from_secs(5), "the record applied", || async {
        metric(&a.metrics().await, "corral_purge_records_ahead_total") >= 1.0
    })
    .await;
    // past now + the skew (1 s), plus the skew margin every record of another corral's clock
    // gets (1 s), what is fetched is cached again
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let first = get(&a.url("/after")).await;
    let again = get(&a.url("/after")).await;
    assert!(
        again.cache.starts_with("corral; hit"),
        "{} then {}",
        first.cache,
        again.cache
    );
}
