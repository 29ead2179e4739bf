//! The purge API against the real binary: one test per request shape real clients send, the
//! refusals, soft purge, admin batches and purge-all, and purges reaching L2.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const SITE: &str = "www.site.test";

async fn get(proxy: &Proxy, path: &str) -> Got {
    get_with(&proxy.url(path), &[("host", SITE)]).await
}

async fn purge(proxy: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut all = vec![("host", SITE)];
    all.extend_from_slice(headers);
    send(client().request(m, proxy.url(path)), &all).await
}

/// An origin where every path is cacheable, counts versions, and carries tags by path.
async fn setup(conf: Conf) -> (Origin, Proxy) {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, conf).await;
    (origin, proxy)
}

fn tagged(origin: &Origin, path: &str, headers: &'static [(&'static str, &'static str)]) {
    origin.route(path, move |s| {
        let mut r = Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=300");
        for (k, v) in headers {
            r = r.header(k, *v);
        }
        r
    });
}

/// Fill `paths`, then check each is a hit.
async fn warm(proxy: &Proxy, paths: &[&str]) {
    for p in paths {
        get(proxy, p).await;
        assert!(get(proxy, p).await.cache.starts_with("corral; hit"), "{p} cached");
    }
}

async fn is_miss(proxy: &Proxy, path: &str) -> bool {
    get(proxy, path).await.cache.contains("fwd=miss")
}

#[tokio::test]
async fn purge_of_one_url_removes_every_variant_and_nothing_else() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/page", |s| {
        Reply::ok(format!("v{}", s.n))
            .header("cache-control", "max-age=300")
            .header("vary", "accept-language")
    });
    tagged(&origin, "/other", &[]);
    for lang in ["en", "fr"] {
        get_with(&proxy.url("/page"), &[("host", SITE), ("accept-language", lang)]).await;
    }
    warm(&proxy, &["/other"]).await;
    let r = purge(&proxy, "PURGE", "/page", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), r#"{"purged":2,"kind":"url","soft":false}"#);
    for lang in ["en", "fr"] {
        let g = get_with(&proxy.url("/page"), &[("host", SITE), ("accept-language", lang)]).await;
        assert!(g.cache.contains("fwd=miss"), "{lang}: {}", g.cache);
    }
    assert!(get(&proxy, "/other").await.cache.starts_with("corral; hit"));
    let nothing = purge(&proxy, "PURGE", "/never-cached", &[]).await;
    assert_eq!(
        (nothing.status, nothing.body.trim()),
        (200, r#"{"purged":0,"kind":"url","soft":false}"#)
    );
}

#[tokio::test]
async fn regex_and_ban_shapes() {
    let (origin, proxy) = setup(Conf::default()).await;
    for p in ["/news/1", "/news/2", "/about", "/img/a.png", "/styles/x/a.png"] {
        tagged(&origin, p, &[]);
    }
    // WordPress Proxy Cache Purge: PURGE with X-Purge-Method: regex
    warm(&proxy, &["/news/1", "/news/2", "/about"]).await;
    assert_eq!(
        purge(&proxy, "PURGE", "/news/.*", &[("x-purge-method", "regex")])
            .await
            .status,
        200
    );
    assert!(is_miss(&proxy, "/news/1").await && is_miss(&proxy, "/news/2").await);
    assert!(!is_miss(&proxy, "/about").await);
    // FOSHttpCache: BAN with X-Url / X-Host
    warm(&proxy, &["/news/1", "/about"]).await;
    let r = purge(
        &proxy,
        "BAN",
        "/",
        &[("x-url", "^/about$"), ("x-host", "^www\\.site\\.test$")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(is_miss(&proxy, "/about").await);
    assert!(!is_miss(&proxy, "/news/1").await);
    // a ban for another host leaves this one alone
    purge(
        &proxy,
        "BAN",
        "/",
        &[("x-url", "^/news"), ("x-host", "^other\\.org$")],
    )
    .await;
    assert!(!is_miss(&proxy, "/news/1").await);
    // Drupal: URIBAN with a path regex
    warm(&proxy, &["/styles/x/a.png", "/img/a.png"]).await;
    assert_eq!(purge(&proxy, "URIBAN", "/styles/.*", &[]).await.status, 200);
    assert!(is_miss(&proxy, "/styles/x/a.png").await);
    assert!(!is_miss(&proxy, "/img/a.png").await);
}

#[tokio::test]
async fn every_tag_header_and_purge_header() {
    let (origin, proxy) = setup(Conf::default()).await;
    tagged(&origin, "/x1", &[("xkey", "product-1 list")]);
    tagged(&origin, "/x2", &[("xkey", "product-2 list")]);
    tagged(&origin, "/s1", &[("surrogate-key", "sk-1 sk-all")]);
    tagged(&origin, "/d1", &[("cache-tags", "node:1 node_list")]);
    tagged(&origin, "/f1", &[("x-cache-tags", "fos-1,fos-all")]);
    tagged(&origin, "/m1", &[("x-magento-tags", "cat_p_1,cat_c_5")]);
    tagged(&origin, "/m2", &[("x-magento-tags", "cat_p_12")]);
    let all = ["/x1", "/x2", "/s1", "/d1", "/f1", "/m1", "/m2"];
    warm(&proxy, &all).await;
    // tags are stripped from what clients see
    assert!(get(&proxy, "/x1").await.headers.get("xkey").is_none());

    purge(&proxy, "PURGEKEYS", "/", &[("xkey-purge", "product-1")]).await;
    assert!(is_miss(&proxy, "/x1").await && !is_miss(&proxy, "/x2").await);
    // logged at INFO with its kind, target, count and source
    let line = proxy
        .log_text()
        .lines()
        .find(|l| l.contains("purge accepted"))
        .map(str::to_string)
        .unwrap_or_default();
    for field in [
        "INFO",
        "kind=\"tags\"",
        "target=product-1",
        "purged=0",
        "source=Some(127.0.0.1)",
    ] {
        assert!(line.contains(field), "{field} in {line:?}");
    }
    purge(&proxy, "PURGE", "/", &[("surrogate-key", "sk-1")]).await;
    assert!(is_miss(&proxy, "/s1").await);
    purge(&proxy, "BAN", "/", &[("cache-tags", "node:1")]).await;
    assert!(is_miss(&proxy, "/d1").await);
    purge(&proxy, "PURGETAGS", "/", &[("x-cache-tags", "fos-1")]).await;
    assert!(is_miss(&proxy, "/f1").await);
    warm(&proxy, &["/f1"]).await;
    purge(&proxy, "BAN", "/", &[("x-cache-tags", "(^|,)(fos-all)(,|$)")]).await;
    assert!(is_miss(&proxy, "/f1").await);
    purge(
        &proxy,
        "PURGE",
        "/",
        &[("x-magento-tags-pattern", "((^|,)cat_p_1(,|$))")],
    )
    .await;
    assert!(is_miss(&proxy, "/m1").await);
    assert!(!is_miss(&proxy, "/m2").await, "cat_p_12 is not cat_p_1");
    assert!(!is_miss(&proxy, "/x2").await, "untouched by all of the above");
}

#[tokio::test]
async fn plone_purgebyid_and_magento_x_pool() {
    let (origin, proxy) = setup(Conf::default()).await;
    tagged(&origin, "/p1", &[("x-ids-involved", "#uuid-1#uuid-9#")]);
    tagged(&origin, "/p2", &[("x-ids-involved", "#uuid-2#")]);
    tagged(&origin, "/static.css", &[("x-pool", "static")]);
    tagged(&origin, "/page", &[("x-pool", "pages")]);
    warm(&proxy, &["/p1", "/p2", "/static.css", "/page"]).await;
    // collective.purgebyid: the id is the last path segment, matched against X-Ids-Involved
    let r = purge(&proxy, "PURGE", "/@@purgebyid/uuid-9", &[]).await;
    assert_eq!(
        (r.status, r.body.contains("\"kind\":\"tags\"")),
        (200, true),
        "{}",
        r.body
    );
    assert!(is_miss(&proxy, "/p1").await);
    assert!(!is_miss(&proxy, "/p2").await);
    // Magento deploys: X-Pool is a regex on the response's X-Pool
    assert_eq!(
        purge(&proxy, "PURGE", "/", &[("x-pool", "^static$")])
            .await
            .status,
        200
    );
    assert!(is_miss(&proxy, "/static.css").await);
    assert!(!is_miss(&proxy, "/page").await);
    // both Magento headers at once: both bans (Magento's VCL does the two)
    tagged(&origin, "/cat", &[("x-magento-tags", "cat_c_5")]);
    tagged(
        &origin,
        "/other",
        &[("x-magento-tags", "cat_c_6"), ("x-pool", "other")],
    );
    warm(&proxy, &["/cat", "/other"]).await;
    let both = purge(
        &proxy,
        "PURGE",
        "/",
        &[
            ("x-pool", "^pages$"),
            ("x-magento-tags-pattern", "(^|,)cat_c_5(,|$)"),
        ],
    )
    .await;
    assert_eq!(both.status, 200, "{}", both.body);
    assert!(is_miss(&proxy, "/page").await, "by X-Pool");
    assert!(is_miss(&proxy, "/cat").await, "by X-Magento-Tags");
    assert!(!is_miss(&proxy, "/other").await, "neither");
    // one bad pattern refuses the whole purge
    let bad = purge(
        &proxy,
        "PURGE",
        "/",
        &[("x-pool", ".*"), ("x-magento-tags-pattern", "(")],
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(!is_miss(&proxy, "/other").await);
}

/// Conf with a fast ban sweeper and grace, for the sweeper tests.
fn swept() -> Conf {
    let mut conf = Conf::default().cache("grace = \"30s\"");
    conf.rules.push_str("[purge]\nsweep_interval = \"20ms\"\n");
    conf
}

/// Entries the ban sweeper marked stale (soft purges) at `proxy`.
async fn stale_marks(proxy: &Proxy) -> f64 {
    metric(
        &proxy.metrics().await,
        "corral_sweeper_entries_total{result=\"stale\"}",
    )
}

async fn records(proxy: &Proxy) -> f64 {
    metric(&proxy.metrics().await, "corral_purge_records")
}

#[tokio::test]
async fn the_sweeper_frees_banned_entries_and_the_bans_expire() {
    let (origin, proxy) = setup(swept()).await;
    let keep: Vec<String> = (0..40).map(|i| format!("/keep/{i}")).collect();
    let drop: Vec<String> = (0..40).map(|i| format!("/drop/{i}")).collect();
    for p in keep.iter().chain(&drop) {
        tagged(&origin, p, &[]);
    }
    tagged(&origin, "/soft", &[("xkey", "soft-one")]);
    for p in keep.iter().chain(&drop).chain([&"/soft".to_string()]) {
        get(&proxy, p).await;
    }
    assert_eq!(proxy.stats().await.0, 81);

    assert_eq!(
        purge(&proxy, "BAN", "/", &[("x-url", "^/drop/")]).await.status,
        200
    );
    assert_eq!(
        purge(&proxy, "PURGEKEYS", "/", &[("xkey-softpurge", "soft-one")])
            .await
            .status,
        200
    );
    // nobody asks for the banned entries: the sweeper removes them, and then the records
    eventually(Duration::from_secs(10), "banned entries swept", || async {
        proxy.stats().await.0 == 41
    })
    .await;
    eventually(Duration::from_secs(10), "records expired", || async {
        let m = proxy.metrics().await;
        metric(&m, "corral_purge_records") == 0.0 && metric(&m, "corral_purge_records_expired_total") == 2.0
    })
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_sweeper_entries_total{result=\"removed\"}"),
        40.0
    );
    assert_eq!(metric(&m, "corral_sweeper_entries_total{result=\"stale\"}"), 1.0);
    assert_eq!(metric(&m, "corral_purge_records_expired_total"), 2.0);

    // with the records gone, what they did holds: banned entries are misses, the soft-purged
    // one is stale (served stale while one request refreshes), the rest are hits
    assert!(is_miss(&proxy, "/drop/7").await);
    assert_eq!(origin.hits("/drop/7"), 2);
    let soft = get(&proxy, "/soft").await;
    assert!(soft.cache.starts_with("corral; hit; ttl=-"), "{}", soft.cache);
    assert_eq!(soft.body, "v1");
    eventually(Duration::from_secs(5), "one background refresh", || async {
        origin.hits("/soft") == 2
    })
    .await;
    for p in &keep {
        assert!(!is_miss(&proxy, p).await, "{p} still cached");
    }
    assert_eq!(origin.hits("/keep/3"), 1);
}

/// Wait until a sweeper pass has run entirely after this call (or, with nothing holding them
/// back, the purge records are gone).
async fn a_sweeper_pass(proxy: &Proxy) {
    let passes = || async { metric(&proxy.metrics().await, "corral_sweeper_passes_total") };
    let before = passes().await;
    eventually(Duration::from_secs(5), "a sweeper pass", || async {
        passes().await > before + 1.0 || records(proxy).await == 0.0
    })
    .await;
}

/// A purge answered while the origin is composing the answer a fill will store: that answer
/// was made before the purge (an application changes its content, then purges), so the copy
/// must not outlive the purge, although it reaches corral after it. corral used to count a
/// copy as validated when the answer arrived, after the purge, and kept it fresh. It is
/// validated when its request left for the origin.
#[tokio::test]
async fn a_purge_answered_while_the_origin_composes_a_fill_covers_that_fill() {
    for (method, path, headers) in [
        ("BAN", "/", &[("x-url", "^/slow$")][..]),
        ("PURGEKEYS", "/", &[("xkey-purge", "slow")][..]),
        ("PURGE", "/slow", &[][..]),
        // RFC 9111 §4.4: a successful unsafe request invalidates the URL, and what its
        // origin composed before it too (the POST's own answer is the origin's v2)
        ("POST", "/slow", &[][..]),
        // the control: without a purge, the held answer is stored
        ("", "", &[][..]),
    ] {
        let mut origin = SlowOrigin::holding_the_header().await;
        let proxy = Proxy::start(origin.addr, swept()).await;
        let fill = origin.held_fill(&proxy, SITE).await;
        if method.is_empty() {
            assert_eq!(origin.release(fill).await, "v1-aabbbbb");
            let hit = get(&proxy, "/slow").await;
            assert_eq!(hit.body, "v1-aabbbbb", "{}", hit.cache);
            assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
            continue;
        }
        assert_eq!(purge(&proxy, method, path, headers).await.status, 200, "{method}");
        // the sweeper passes meanwhile: nothing in L1 needs the record, but the answer on
        // its way does
        a_sweeper_pass(&proxy).await;
        // the client that asked before the purge gets the answer made before it
        assert_eq!(origin.release(fill).await, "v1-aabbbbb", "{method}");
        let after = get(&proxy, "/slow").await;
        let next = if method == "POST" {
            "v3-aabbbbb"
        } else {
            "v2-aabbbbb"
        };
        assert_eq!(after.body, next, "{method}: {}", after.cache);
        assert!(after.cache.contains("fwd=miss"), "{method}: {}", after.cache);
    }
}

/// The same for a URL that corral bypasses (hit-for-miss: it once answered `private`) whose
/// next answer turns out cacheable, and is stored: the cache was bypassed when its request
/// left, so it was not counted as awaited, and a sweeper pass dropped the ban before it
/// landed.
#[tokio::test]
async fn a_ban_answered_while_a_bypassed_request_awaits_its_answer_covers_it() {
    // the control: without the ban, the bypassed request's answer is stored
    let mut origin = SlowOrigin::private_then_holding_the_header().await;
    let proxy = Proxy::start(origin.addr, swept()).await;
    let fill = origin.held_fill(&proxy, SITE).await;
    assert_eq!(origin.release(fill).await, "v2-aabbbbb");
    let hit = get(&proxy, "/slow").await;
    assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
    assert_eq!(hit.body, "v2-aabbbbb");

    let mut origin = SlowOrigin::private_then_holding_the_header().await;
    let proxy = Proxy::start(origin.addr, swept()).await;
    let fill = origin.held_fill(&proxy, SITE).await;
    let ban = purge(&proxy, "BAN", "/", &[("x-url", "^/slow$")]).await;
    assert_eq!(ban.status, 200);
    a_sweeper_pass(&proxy).await;
    assert_eq!(origin.release(fill).await, "v2-aabbbbb");
    let after = get(&proxy, "/slow").await;
    assert_eq!(after.body, "v3-aabbbbb", "{}", after.cache);
}

/// stale-if-error falls back on a stale copy when the origin fails, but never on one that a
/// purge answered while the request was at the origin covers: the purge took the copy out of
/// the cache, not out of the hands of the request that had looked it up. Each purge shape,
/// a purge of everything and a successful POST to the URL; the control (no purge) serves the
/// stale copy.
#[tokio::test]
async fn stale_if_error_never_serves_a_copy_purged_while_its_request_was_at_the_origin() {
    for (method, path, headers) in [
        ("PURGE", "/slow", &[][..]),
        ("BAN", "/", &[("x-url", "^/slow$")][..]),
        ("PURGEKEYS", "/", &[("xkey-purge", "slow")][..]),
        ("ALL", "", &[][..]),
        // a successful unsafe request invalidates the URL (RFC 9111 §4.4) as a purge does
        ("POST", "/slow", &[][..]),
        ("", "", &[][..]),
    ] {
        let mut origin = SlowOrigin::stale_then_held_error().await;
        let mut conf = Conf::default()
            .cache("grace = \"0s\"")
            .cache("stale_if_error = \"1m\"");
        conf.rules.push_str("[purge]\nsweep_interval = \"20ms\"\n");
        let proxy = Proxy::start(origin.addr, conf).await;
        let revalidation = origin.stale_fill(&proxy, SITE).await;
        match method {
            "" => {}
            "ALL" => assert_eq!(admin_post(&proxy, "/purge/all", "").await.status, 200),
            _ => assert_eq!(purge(&proxy, method, path, headers).await.status, 200, "{method}"),
        }
        // the sweeper passes while the origin holds the answer: the record stays
        a_sweeper_pass(&proxy).await;
        let got = origin.release(revalidation).await;
        let refused = metric(&proxy.metrics().await, "corral_stale_if_error_purged_total");
        if method.is_empty() {
            assert_eq!(got, "v1-aabbbbb", "the control: stale-if-error serves the copy");
            assert_eq!(refused, 0.0);
            continue;
        }
        assert_eq!(got, "", "{method}: the origin's 503, not the purged copy");
        assert_eq!(refused, 1.0, "{method}");
    }
}

/// RFC 9111 §4.4's invalidation is no purge record: any client can make one, and each record
/// costs a sweeper pass over all of L1 and a check on every entry's next hit. L1 keeps it
/// apart, by time (the POST rows above show what it covers). (No sweeper pass in this test.)
#[tokio::test]
async fn an_unsafe_request_leaves_no_purge_record() {
    let mut conf = Conf::default();
    conf.rules.push_str("[purge]\nsweep_interval = \"1h\"\n");
    let (origin, proxy) = setup(conf).await;
    origin.route("/api", |_| Reply::ok("done"));
    tagged(&origin, "/page", &[]);
    assert_eq!(purge(&proxy, "POST", "/api", &[]).await.body, "done");
    warm(&proxy, &["/page"]).await;
    assert_eq!(purge(&proxy, "POST", "/page", &[]).await.status, 200);
    assert_eq!(records(&proxy).await, 0.0);
    assert!(is_miss(&proxy, "/page").await, "invalidated");
}

/// The same while the request waits in the queue for an upstream slot, before it is sent:
/// nothing else keeps the ban's record then (the request that holds the slot is a POST, whose
/// answer is never stored), and the sweeper drops it once L1 no longer holds the copy. The
/// copy keeps it from its lookup to the request's end. The control (no ban) gets the copy.
#[tokio::test]
async fn stale_if_error_never_serves_a_copy_banned_while_its_request_queued_for_the_origin() {
    for ban in [true, false] {
        let origin = Origin::start().await;
        origin.route("/q", |s| {
            let cc = if s.n == 1 {
                "max-age=1, stale-if-error=60"
            } else {
                "max-age=60"
            };
            Reply::ok(format!("v{}", s.n)).header("cache-control", cc)
        });
        origin.route("/hold", |_| Reply::ok("held").delay(Duration::from_secs(3)));
        let mut conf = Conf::default()
            .cache("grace = \"0s\"")
            .cache("stale_if_error = \"1m\"")
            .upstream("max_connections = 1")
            .upstream("queue_timeout = \"1500ms\"");
        conf.rules.push_str("[purge]\nsweep_interval = \"20ms\"\n");
        let proxy = Proxy::start(origin.addr, conf).await;
        assert_eq!(get(&proxy, "/q").await.body, "v1");
        // max-age=1: expiry is a matter of time
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let hold = send(client().post(proxy.url("/hold")), &[("host", SITE)]);
        let hold = tokio::spawn(hold);
        eventually(Duration::from_secs(5), "the slot is taken", || async {
            origin.hits("/hold") == 1
        })
        .await;
        let url = proxy.url("/q");
        let stale = tokio::spawn(async move { get_with(&url, &[("host", SITE)]).await });
        // it finds the stale copy and queues (no signal for that: a third of the queue's time)
        tokio::time::sleep(Duration::from_millis(500)).await;
        if ban {
            let banned = purge(&proxy, "BAN", "/", &[("x-url", "^/q$")]).await;
            assert_eq!(banned.status, 200);
            a_sweeper_pass(&proxy).await;
        }
        let got = stale.await.unwrap();
        let refused = metric(&proxy.metrics().await, "corral_stale_if_error_purged_total");
        if ban {
            assert_eq!((got.status, refused), (503, 1.0), "{got:?}");
        } else {
            assert_eq!(
                (got.status, got.body.as_str(), refused),
                (200, "v1", 0.0),
                "{got:?}"
            );
        }
        assert_eq!(origin.hits("/q"), 1, "it never reached the origin");
        assert_eq!(hold.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn a_ban_during_a_slow_fill_still_applies_and_then_expires() {
    let mut origin = SlowOrigin::start().await;
    let proxy = Proxy::start(origin.addr, swept()).await;
    let fill = origin.first_fill(&proxy, SITE).await;
    // the stored response was validated before this ban: it must not be served after it
    assert_eq!(
        purge(&proxy, "BAN", "/", &[("x-url", "^/slow$")]).await.status,
        200
    );
    // the sweeper passes while the fill is still in progress: the entry escapes that pass
    a_sweeper_pass(&proxy).await;
    assert_eq!(origin.finish(fill).await, b"v1-aabbbbb");
    let after = get(&proxy, "/slow").await;
    assert!(after.cache.contains("fwd=miss"), "{}", after.cache);
    assert_eq!(after.body, "v2-aabbbbb");
    // the fill held the record back; the sweeper checks what landed, then drops it
    eventually(Duration::from_secs(10), "record expired", || async {
        records(&proxy).await == 0.0
    })
    .await;
    assert!(get(&proxy, "/slow").await.cache.starts_with("corral; hit"));
}

/// See: issue 10, item 2. The PURGE removed the URL's row with the fill's slot in it; the
/// sweeper then dropped the URL record (no fill in the table held it back) and the fill's
/// commit put the pre-purge body back, fresh.
#[tokio::test]
async fn r10_a_purge_during_a_slow_fill_is_not_undone_by_the_fill() {
    let mut origin = SlowOrigin::start().await;
    let proxy = Proxy::start(origin.addr, swept()).await;
    let fill = origin.first_fill(&proxy, SITE).await;
    assert_eq!(purge(&proxy, "PURGE", "/slow", &[]).await.status, 200);
    a_sweeper_pass(&proxy).await;
    assert_eq!(origin.finish(fill).await, b"v1-aabbbbb");
    let after = get(&proxy, "/slow").await;
    assert!(after.cache.contains("fwd=miss"), "{}", after.cache);
    assert_eq!(after.body, "v2-aabbbbb");
    eventually(Duration::from_secs(20), "record expired", || async {
        records(&proxy).await == 0.0
    })
    .await;
    let hit = get(&proxy, "/slow").await;
    assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
    assert_eq!(hit.body, "v2-aabbbbb");
}

/// The soft variant: the copy the fill commits is stale at once (served stale within grace,
/// while one request revalidates), never fresh.
#[tokio::test]
async fn r10_a_soft_purge_during_a_slow_fill_leaves_the_fill_stale() {
    let mut origin = SlowOrigin::start().await;
    let proxy = Proxy::start(origin.addr, swept()).await;
    let fill = origin.first_fill(&proxy, SITE).await;
    assert_eq!(
        purge(&proxy, "PURGE", "/slow", &[("soft-purge", "1")])
            .await
            .status,
        200
    );
    a_sweeper_pass(&proxy).await;
    assert_eq!(origin.finish(fill).await, b"v1-aabbbbb");
    let after = get(&proxy, "/slow").await;
    assert!(
        after.cache.contains("fwd=miss") || after.cache.starts_with("corral; hit; ttl=-"),
        "not fresh after a soft purge: {}",
        after.cache
    );
    eventually(Duration::from_secs(5), "the revalidation", || async {
        let got = get(&proxy, "/slow").await;
        got.body == "v2-aabbbbb" && got.cache.starts_with("corral; hit; ttl=2")
    })
    .await;
}

#[tokio::test]
async fn a_hundred_thousand_bans_expire_without_touching_other_entries() {
    let (origin, proxy) = setup(swept()).await;
    let pages: Vec<String> = (0..20).map(|i| format!("/page/{i}")).collect();
    for p in &pages {
        tagged(&origin, p, &[]);
        get(&proxy, p).await;
    }
    // 20 batches of 5,000 bans through the admin API, none matching a cached page; the
    // sweeper drops them as fast as they come, so the cap that folds old bans into an
    // "everything before T" record (and would invalidate the pages) is never reached
    let mut n = 0;
    for round in 0..20 {
        let bans: Vec<String> = (0..5000)
            .map(|i| format!("{{\"url\":\"^/gone/{round}/{i}$\"}}"))
            .collect();
        let body = format!("{{\"bans\":[{}]}}", bans.join(","));
        let r = admin_post(&proxy, "/purge", &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        n += 5000;
        eventually(Duration::from_secs(30), "bans expired", || async {
            records(&proxy).await == 0.0
        })
        .await;
    }
    assert_eq!(n, 100_000);
    eventually(Duration::from_secs(5), "every ban counted as expired", || async {
        metric(&proxy.metrics().await, "corral_purge_records_expired_total") == 100_000.0
    })
    .await;
    for p in &pages {
        assert!(!is_miss(&proxy, p).await, "{p} untouched by 100k bans");
        assert_eq!(origin.hits(p), 1);
    }
}

#[tokio::test]
async fn soft_purge_serves_stale_once_while_one_request_refreshes() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"30s\"")).await;
    tagged(&origin, "/soft", &[("xkey", "soft-tag")]);
    tagged(&origin, "/soft2", &[]);
    warm(&proxy, &["/soft", "/soft2"]).await;
    purge(&proxy, "PURGEKEYS", "/", &[("xkey-softpurge", "soft-tag")]).await;
    let stale = get(&proxy, "/soft").await;
    assert_eq!(stale.body, "v1", "the stale copy is served");
    assert!(stale.cache.starts_with("corral; hit; ttl=-"), "{}", stale.cache);
    eventually(Duration::from_secs(5), "background refresh", || async {
        origin.hits("/soft") == 2
    })
    .await;
    eventually(Duration::from_secs(5), "refreshed copy served", || async {
        get(&proxy, "/soft").await.body == "v2"
    })
    .await;
    assert_eq!(origin.hits("/soft"), 2);

    let r = purge(&proxy, "PURGE", "/soft2", &[("soft-purge", "1")]).await;
    assert_eq!(r.body.trim(), r#"{"purged":1,"kind":"url","soft":true}"#);
    assert_eq!(get(&proxy, "/soft2").await.body, "v1");
}

#[tokio::test]
async fn host_map_applies_a_purge_sent_to_the_proxy_address_to_the_site() {
    let conf = Conf::default().rules(""); // [purge] is written below as a rule-free table
    let origin = Origin::start().await;
    tagged(&origin, "/plone/doc", &[]);
    let mut conf = conf;
    conf.rules.push_str(&format!(
        "[purge]\nhost_map = {{ \"cache1:6081\" = \"{SITE}\" }}\n"
    ));
    let proxy = Proxy::start(origin.addr, conf).await;
    warm(&proxy, &["/plone/doc"]).await;
    let r = send(
        client().request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            proxy.url("/plone/doc"),
        ),
        &[("host", "cache1:6081")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(is_miss(&proxy, "/plone/doc").await);
}

/// A `host_map` key written with the default port (`cache1:80`) matches a purge sent to
/// `cache1`, whose Host corral normalises (no `:80`) like every Host.
#[tokio::test]
async fn host_map_keys_are_normalised_like_the_purge_host() {
    let origin = Origin::start().await;
    tagged(&origin, "/plone/doc", &[]);
    let mut conf = Conf::default();
    conf.rules
        .push_str(&format!("[purge]\nhost_map = {{ \"Cache1:80\" = \"{SITE}\" }}\n"));
    let proxy = Proxy::start(origin.addr, conf).await;
    warm(&proxy, &["/plone/doc"]).await;
    let r = send(
        client().request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            proxy.url("/plone/doc"),
        ),
        &[("host", "cache1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(is_miss(&proxy, "/plone/doc").await);
}

#[tokio::test]
async fn refused_purges_purge_nothing() {
    let origin = Origin::start().await;
    tagged(&origin, "/keep", &[("xkey", "k")]);
    let mut conf = Conf::default();
    conf.rules
        .push_str("[purge]\ntoken = \"s3cret\"\nallow = [\"127.0.0.1/32\"]\n");
    let proxy = Proxy::start(origin.addr, conf).await;
    warm(&proxy, &["/keep"]).await;

    // from a source outside the allow-list (127.0.0.2 is loopback, but not in this one)
    let outsider = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = send(
        outsider.request(reqwest::Method::from_bytes(b"PURGE").unwrap(), proxy.url("/keep")),
        &[("host", SITE), ("authorization", "Bearer s3cret")],
    )
    .await;
    assert_eq!(r.status, 405);
    // without or with a wrong token
    assert_eq!(purge(&proxy, "PURGE", "/keep", &[]).await.status, 405);
    assert_eq!(
        purge(&proxy, "PURGE", "/keep", &[("authorization", "Bearer nope")])
            .await
            .status,
        405
    );
    // malformed
    let bad = purge(
        &proxy,
        "BAN",
        "/",
        &[("authorization", "Bearer s3cret"), ("x-url", "([")],
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("x-url"), "{}", bad.body);
    let huge = "a".repeat(20_000);
    let r = purge(
        &proxy,
        "BAN",
        "/",
        &[("authorization", "Bearer s3cret"), ("x-url", &huge)],
    )
    .await;
    assert!(
        r.status == 400 || r.status == 431,
        "oversize header: {}",
        r.status
    );
    assert_eq!(
        purge(&proxy, "PURGEKEYS", "/", &[("authorization", "Bearer s3cret")])
            .await
            .status,
        400
    );
    assert!(
        get(&proxy, "/keep").await.cache.starts_with("corral; hit"),
        "nothing was purged"
    );
    // the right token from an allowed source works
    assert_eq!(
        purge(&proxy, "PURGE", "/keep", &[("authorization", "Bearer s3cret")])
            .await
            .status,
        200
    );
    assert!(is_miss(&proxy, "/keep").await);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_purges_total{kind=\"-\",result=\"refused\"}"),
        3.0
    );
}

async fn admin_post(proxy: &Proxy, path: &str, body: &str) -> Got {
    send(
        client()
            .post(format!("http://{}{path}", proxy.admin))
            .body(body.to_string()),
        &[],
    )
    .await
}

#[tokio::test]
async fn admin_batch_is_all_or_nothing() {
    let (origin, proxy) = setup(Conf::default()).await;
    for p in ["/b1", "/b2", "/b3", "/b4"] {
        tagged(&origin, p, &[("xkey", "batch-tag")]);
    }
    tagged(&origin, "/b5", &[]);
    warm(&proxy, &["/b1", "/b2", "/b3", "/b5"]).await;
    let bad = admin_post(
        &proxy,
        "/purge",
        &format!(r#"{{"urls": ["http://{SITE}/b1"], "bans": [{{"url": "(("}}]}}"#),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("bans[0].url"), "{}", bad.body);
    assert!(!is_miss(&proxy, "/b1").await, "one bad entry: nothing purged");
    let ok = admin_post(
        &proxy,
        "/purge",
        &format!(r#"{{"urls": ["http://{SITE}/b1", "http://{SITE}/b1"], "tags": ["batch-tag"], "bans": [{{"url": "^/b3$"}}]}}"#),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains(r#""url":1"#), "duplicates once: {}", ok.body);
    assert!(is_miss(&proxy, "/b1").await && is_miss(&proxy, "/b2").await && is_miss(&proxy, "/b3").await);
    assert!(!is_miss(&proxy, "/b5").await);
}

#[tokio::test]
async fn purge_all_empties_l1_and_l2() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    tagged(&origin, "/all1", &[]);
    tagged(&origin, "/all2", &[]);
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    warm(&a, &["/all1", "/all2"]).await;
    eventually(Duration::from_secs(5), "L2 writes", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 2.0
    })
    .await;
    let r = admin_post(&a, "/purge/all", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let generation = mc.command(b"get corral/corral/generation\r\n", "END\r\n").await;
    assert!(
        generation.contains("VALUE"),
        "the generation was bumped in memcached: {generation}"
    );
    assert!(is_miss(&a, "/all1").await);
    // B never had it in L1; the generation bump hides L2's copy from B too
    assert!(is_miss(&b, "/all2").await, "B must not get the purged L2 entry");
}

#[tokio::test]
async fn a_url_purge_at_one_corral_reaches_l2() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    tagged(&origin, "/shared", &[]);
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    warm(&a, &["/shared"]).await;
    eventually(Duration::from_secs(5), "L2 write", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 1.0
    })
    .await;
    assert_eq!(purge(&a, "PURGE", "/shared", &[]).await.status, 200);
    let at_b = get(&b, "/shared").await;
    assert!(at_b.cache.contains("fwd=miss"), "{}", at_b.cache);
    assert_eq!(at_b.body, "v2");
}

#[tokio::test]
async fn url_purges_reach_other_corrals_l1_and_soft_ones_keep_l2_stale() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    tagged(&origin, "/hard", &[]);
    tagged(&origin, "/soft", &[]);
    let conf = Conf::default().servers(&[&mc]).cache("grace = \"30s\"");
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf.clone()).await;
    for p in ["/hard", "/soft"] {
        get(&a, p).await;
        eventually(Duration::from_secs(5), "L2 write", || async {
            get(&b, p).await.cache.contains("detail=l2")
        })
        .await;
        assert!(get(&b, p).await.cache.starts_with("corral; hit"), "{p} in B's L1");
    }
    // purged at A; B's L1 copy goes within a second (B reads A's purge log)
    assert_eq!(purge(&a, "PURGE", "/hard", &[]).await.status, 200);
    eventually(Duration::from_secs(5), "B drops /hard", || async {
        get(&b, "/hard").await.cache.contains("fwd=miss")
    })
    .await;
    assert_eq!(origin.hits("/hard"), 2);

    // soft: every corral serves the stale copy while one request refreshes, and a corral
    // started after the purge gets it from L2 stale too, not a cold miss
    assert_eq!(
        purge(&a, "PURGE", "/soft", &[("soft-purge", "1")]).await.status,
        200
    );
    let c = Proxy::start(origin.addr, conf).await;
    let at_c = get(&c, "/soft").await;
    assert!(at_c.cache.starts_with("corral; hit; ttl=-"), "{}", at_c.cache);
    assert_eq!(at_c.body, "v1", "the stale copy, from L2");
    eventually(Duration::from_secs(5), "one refresh", || async {
        origin.hits("/soft") == 2
    })
    .await;
    eventually(Duration::from_secs(5), "refreshed copy", || async {
        get(&c, "/soft").await.body == "v2"
    })
    .await;
}

#[tokio::test]
async fn a_purge_that_cannot_reach_memcached_is_not_acknowledged() {
    let mut mc = Memcached::start().await;
    let origin = Origin::start().await;
    tagged(&origin, "/p", &[]);
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    warm(&a, &["/p"]).await;
    mc.stop();
    let r = purge(&a, "PURGE", "/p", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("retry"), "{}", r.body);
    assert!(is_miss(&a, "/p").await, "still purged locally");
    assert_eq!(admin_post(&a, "/purge/all", "").await.status, 503);
}

#[tokio::test]
async fn bans_and_tag_purges_reach_every_corral_through_l2() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    tagged(&origin, "/news/1", &[]);
    tagged(&origin, "/t1", &[("xkey", "tag-one")]);
    tagged(&origin, "/keep", &[("xkey", "tag-two")]);
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    warm(&a, &["/news/1", "/t1", "/keep"]).await;
    eventually(Duration::from_secs(5), "L2 writes", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 3.0
    })
    .await;
    // accepted at A, answered 2xx: from now on no corral may serve the old copies from L2
    assert_eq!(purge(&a, "BAN", "/", &[("x-url", "^/news/")]).await.status, 200);
    assert_eq!(
        purge(&a, "PURGEKEYS", "/", &[("xkey-purge", "tag-one")])
            .await
            .status,
        200
    );
    assert!(is_miss(&b, "/news/1").await, "B honours A's ban on an L2 read");
    assert!(is_miss(&b, "/t1").await, "B honours A's tag purge on an L2 read");
    assert!(
        get(&b, "/keep").await.cache.ends_with("detail=l2"),
        "the rest is still shared"
    );
    // a corral started after the purge honours it too
    let c = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let at_c = get(&c, "/news/1").await;
    assert!(
        !at_c.body.starts_with("v1"),
        "C never serves the banned copy: {}",
        at_c.cache
    );
}

#[tokio::test]
async fn a_url_purge_reaches_every_vary_variant_in_l2() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/v", |s| {
        Reply::ok(format!("v{}", s.n))
            .header("cache-control", "max-age=300")
            .header("vary", "accept-language")
    });
    let a = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let fetch = |p: &Proxy, lang: &'static str| {
        let url = p.url("/v");
        async move { get_with(&url, &[("host", SITE), ("accept-language", lang)]).await }
    };
    fetch(&a, "en").await; // primary slot
    fetch(&a, "fr").await; // a secondary variant
    eventually(Duration::from_secs(5), "L2 writes", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 2.0
    })
    .await;
    assert!(
        fetch(&b, "fr").await.cache.ends_with("detail=l2"),
        "B shares the variant"
    );
    let c = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    assert_eq!(purge(&a, "PURGE", "/v", &[]).await.status, 200);
    // A refills the primary slot after the purge; C then looks up "fr": primary hit, Vary
    // says another variant, and the "fr" variant stored before the purge must not come back
    let a_en = fetch(&a, "en").await;
    assert!(a_en.cache.contains("fwd=miss"), "{}", a_en.cache);
    eventually(Duration::from_secs(5), "A's L2 write", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 3.0
    })
    .await;
    let g = fetch(&c, "fr").await;
    assert!(
        g.cache.contains("fwd=miss"),
        "fr at C after the purge: {} {}",
        g.cache,
        g.body
    );
}

/// The control keys (purge log, generation) are on every server: with one of three down a
/// purge is taken, and reaches the other corral; with one of two down it is refused (503): a
/// purge is numbered by a majority of the servers, and the one left may be behind.
#[tokio::test]
async fn purges_hold_with_one_of_three_memcached_servers_down_and_wait_with_one_of_two() {
    for n in [3, 2] {
        purges_with_one_memcached_server_down(n).await;
    }
}

async fn purges_with_one_memcached_server_down(servers: usize) {
    let mut mcs = Vec::new();
    for _ in 0..servers {
        mcs.push(Memcached::start().await);
    }
    let origin = Origin::start().await;
    for i in 0..10 {
        tagged(&origin, &format!("/two/{i}"), &[]);
    }
    let refs: Vec<&Memcached> = mcs.iter().collect();
    let a = Proxy::start(origin.addr, Conf::default().servers(&refs)).await;
    let b = Proxy::start(origin.addr, Conf::default().servers(&refs)).await;
    drop(refs);
    let paths: Vec<String> = (0..10).map(|i| format!("/two/{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    warm(&a, &paths).await;
    eventually(Duration::from_secs(5), "L2 writes", || async {
        metric(
            &a.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 10.0
    })
    .await;
    mcs.last_mut().unwrap().stop();
    let status = purge(&a, "BAN", "/", &[("x-url", "^/two/")]).await.status;
    if servers == 2 {
        assert_eq!(status, 503, "a ban with one of two memcached servers down");
        assert_eq!(
            metric(&a.metrics().await, "corral_purge_bumps_refused_total"),
            1.0,
            "refused for want of a read quorum"
        );
        return;
    }
    assert_eq!(status, 200, "a ban with one of {servers} memcached servers down");
    for p in &paths {
        let g = get(&b, p).await;
        assert!(
            g.cache.contains("fwd=miss"),
            "{p} at B after the ban: {}",
            g.cache
        );
    }
}

#[tokio::test]
async fn a_stale_refresh_never_takes_a_peer_copy_that_a_later_purge_covers() {
    let mc = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/p", |s| {
        // v1 goes stale at once; v3 is slow, so B looks at memcached while it is under way
        let max_age = if s.n == 1 { "max-age=1" } else { "max-age=300" };
        let delay = if s.n == 3 { 300 } else { 0 };
        Reply::ok(format!("v{}", s.n))
            .header("cache-control", max_age)
            .header("xkey", "t")
            .delay(Duration::from_millis(delay))
    });
    let conf = swept().servers(&[&mc]);
    let a = Proxy::start(origin.addr, conf.clone()).await;
    let b = Proxy::start(origin.addr, conf).await;
    assert_eq!(get(&a, "/p").await.body, "v1");
    eventually(Duration::from_secs(5), "B has v1 from L2", || async {
        get(&b, "/p").await.cache.contains("detail=l2")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A refreshes: memcached gets v2 (fresh for 300 s); B keeps its stale v1
    assert_eq!(get(&a, "/p").await.body, "v1");
    eventually(Duration::from_secs(5), "A refreshed, into L2", || async {
        get(&a, "/p").await.body == "v2"
            && metric(
                &a.metrics().await,
                "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
            ) >= 2.0
    })
    .await;
    // a soft purge covers v2, in A's L1 and in memcached
    let soft = [("xkey-softpurge", "t")];
    assert_eq!(purge(&a, "PURGEKEYS", "/", &soft).await.status, 200);
    eventually(Duration::from_secs(5), "A's v2 marked stale", || async {
        stale_marks(&a).await >= 1.0
    })
    .await;
    // B knows of the purge (it follows memcached's purge log every 250 ms)
    eventually(Duration::from_secs(5), "B read the purge", || async {
        metric(&b.metrics().await, "corral_purge_log_applied") >= 1.0
    })
    .await;
    // A refreshes again, slowly, holding the cluster's refresh lock; then B's copy is due
    assert_eq!(get(&a, "/p").await.body, "v2");
    eventually(Duration::from_secs(5), "A's refresh under way", || async {
        origin.hits("/p") == 3
    })
    .await;
    assert_eq!(
        get(&b, "/p").await.body,
        "v1",
        "B serves its stale copy meanwhile"
    );
    // B takes A's v3 when it lands, not the purged v2 it finds in memcached first
    eventually(Duration::from_secs(10), "B has v3", || async {
        let got = get(&b, "/p").await;
        got.body == "v3" && got.cache.starts_with("corral; hit; ttl=2")
    })
    .await;
    assert_eq!(origin.hits("/p"), 3);
    let peer = metric(&b.metrics().await, "corral_stale_refreshes_total{how=\"peer\"}");
    assert_eq!(peer, 1.0);
}

/// A CMS that purges through the proxy's own address (Plone without `purge.host_map`) is
/// answered 200 `purged:0` and believes it worked: the purge is counted as
/// `result="no_match"` and logged at INFO with the `host_map` hint, once a minute per site. A
/// purge of an uncached URL of a cached site is an ordinary `ok`.
#[tokio::test]
async fn a_purge_for_a_site_never_cached_is_counted_and_hinted_once() {
    let (origin, proxy) = setup(Conf::default()).await;
    tagged(&origin, "/doc", &[]);
    warm(&proxy, &["/doc"]).await;
    let own = proxy.addr.to_string();
    for _ in 0..3 {
        let m = reqwest::Method::from_bytes(b"PURGE").unwrap();
        let got = send(client().request(m, proxy.url("/doc")), &[("host", own.as_str())]).await;
        assert_eq!(
            (got.status, got.body.contains("\"purged\":0")),
            (200, true),
            "{}",
            got.body
        );
    }
    assert!(
        get(&proxy, "/doc").await.cache.starts_with("corral; hit"),
        "the site's copy stays"
    );
    let plain = purge(&proxy, "PURGE", "/never-cached", &[]).await;
    assert_eq!(plain.status, 200);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_purges_total{kind=\"url\",result=\"no_match\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "corral_purges_total{kind=\"url\",result=\"ok\"}"),
        1.0,
        "{m}"
    );
    let log = proxy.log_text();
    assert_eq!(log.matches("purge matched no cached site").count(), 1, "{log}");
    assert!(log.contains("host_map"), "{log}");
}

/// A purge from outside the allow-list is logged at WARN with its source once a minute (a CMS
/// retries five times, then drops the purge silently), and counted every time.
#[tokio::test]
async fn refused_purges_are_warned_about_once_a_minute_per_source() {
    let (_origin, proxy) = setup(Conf::default().section("[purge]\nallow = [\"10.0.0.0/8\"]")).await;
    for _ in 0..5 {
        assert_eq!(purge(&proxy, "PURGE", "/x", &[]).await.status, 405);
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_purges_total{kind=\"-\",result=\"refused\"}"),
        5.0,
        "{m}"
    );
    let log = proxy.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("purge refused (405)"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("source=127.0.0.1"),
        "{}",
        lines[0]
    );
}
