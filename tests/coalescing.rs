//! Dogpile protection: coalesced misses, grace, stale-if-error, lock timeout, hit-for-miss.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Send `n` GETs at once and collect what each got.
async fn burst(url: &str, n: usize) -> Vec<Got> {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let req = c.get(url);
            tokio::spawn(async move { send(req, &[]).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Wait until `cond` holds, checking every 5 ms, at most `limit`.
async fn until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached in {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn five_hundred_clients_on_a_cold_key_make_one_origin_request() {
    let origin = Origin::start().await;
    origin.route("/cold", |_| {
        Reply::ok("x".repeat(20_000))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300))
    });
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let all = burst(&proxy.url("/cold"), 500).await;
    assert_eq!(origin.hits("/cold"), 1, "one upstream request for 500 clients");
    assert!(all.iter().all(|g| g.status == 200 && g.body.len() == 20_000));
    let collapsed = all.iter().filter(|g| g.cache.contains("collapsed")).count();
    let stored = all.iter().filter(|g| g.cache.contains("stored")).count();
    assert_eq!(stored, 1, "exactly one request fetched");
    assert!(
        collapsed >= 400,
        "most waited on the fetch: {collapsed} collapsed"
    );
}

#[tokio::test]
async fn expired_within_grace_everyone_gets_stale_at_once_and_one_refresh_happens() {
    let origin = Origin::start().await;
    let refresh_gate = Arc::new(AtomicBool::new(false));
    let gate = refresh_gate.clone();
    origin.route("/grace", move |s| {
        if s.n == 1 {
            Reply::ok("v1").header("cache-control", "max-age=1")
        } else {
            gate.store(true, Ordering::SeqCst);
            // the refresh is slow: nobody may wait for it
            Reply::ok("v2")
                .header("cache-control", "max-age=60")
                .delay(Duration::from_millis(1500))
        }
    });
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"30s\"")).await;
    assert_eq!(get(&proxy.url("/grace")).await.body, "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await; // max-age=1 runs out

    let started = Instant::now();
    let all = burst(&proxy.url("/grace"), 100).await;
    let took = started.elapsed();
    assert!(
        all.iter().all(|g| g.status == 200 && g.body == "v1"),
        "everyone gets the stale copy"
    );
    assert!(
        all.iter().all(|g| g.cache.starts_with("corral; hit; ttl=-")),
        "{:?}",
        all[0].cache
    );
    assert!(
        took < Duration::from_millis(1000),
        "nobody waited for the 1.5 s refresh: {took:?}"
    );

    until(Duration::from_secs(5), || origin.hits("/grace") == 2).await;
    // the background refresh stores v2; wait for it to be served
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let g = get(&proxy.url("/grace")).await;
        if g.body == "v2" {
            assert!(g.cache.starts_with("corral; hit"), "{}", g.cache);
            break;
        }
        assert!(Instant::now() < deadline, "refresh never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        origin.hits("/grace"),
        2,
        "exactly one refresh for 100 stale requests"
    );
    assert!(refresh_gate.load(Ordering::SeqCst));
}

#[tokio::test]
async fn origin_stale_while_revalidate_wins_over_grace() {
    let origin = Origin::start().await;
    origin.route("/swr", |s| {
        Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=1, stale-while-revalidate=0")
    });
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"30s\"")).await;
    get(&proxy.url("/swr")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let g = get(&proxy.url("/swr")).await;
    assert_eq!(g.body, "v2", "stale-while-revalidate=0 forbids serving stale");
}

#[tokio::test]
async fn a_hanging_lock_holder_releases_waiters_after_lock_timeout() {
    let origin = Origin::start().await;
    origin.route("/hang", |s| {
        let r = Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=60");
        if s.n == 1 {
            r.delay(Duration::from_secs(6))
        } else {
            r
        }
    });
    let proxy = Proxy::start(origin.addr, Conf::default().cache("lock_timeout = \"500ms\"")).await;
    let holder_url = proxy.url("/hang");
    let holder = tokio::spawn(async move { get(&holder_url).await });
    until(Duration::from_secs(5), || origin.hits("/hang") == 1).await;
    let started = Instant::now();
    let waiters = burst(&proxy.url("/hang"), 20).await;
    let took = started.elapsed();
    assert!(waiters.iter().all(|g| g.status == 200 && g.body != "v1"));
    assert!(
        took < Duration::from_secs(3),
        "waiters were released after lock_timeout: {took:?}"
    );
    assert!(origin.hits("/hang") >= 2);
    holder.abort();
}

#[tokio::test]
async fn origin_down_serves_stale_within_stale_if_error_then_502() {
    let mut origin = Origin::start().await;
    origin.route("/sie", |_| {
        Reply::ok("saved").header("cache-control", "max-age=1, stale-if-error=2")
    });
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"0s\"")).await;
    assert_eq!(get(&proxy.url("/sie")).await.body, "saved");
    origin.stop().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // stale now, within stale-if-error
    let stale = get(&proxy.url("/sie")).await;
    assert_eq!((stale.status, stale.body.as_str()), (200, "saved"));
    assert!(stale.cache.starts_with("corral; hit; ttl=-"), "{}", stale.cache);
    tokio::time::sleep(Duration::from_millis(2200)).await; // past stale-if-error
    assert_eq!(get(&proxy.url("/sie")).await.status, 502);
    origin.restart().await;
    assert_eq!(
        get(&proxy.url("/sie")).await.status,
        200,
        "back to normal when the origin is"
    );
}

#[tokio::test]
async fn origin_5xx_serves_stale_within_stale_if_error() {
    let origin = Origin::start().await;
    origin.route("/five", |s| {
        if s.n == 1 {
            Reply::ok("good").header("cache-control", "max-age=1")
        } else {
            Reply::ok("broken").status(503)
        }
    });
    let proxy = Proxy::start(
        origin.addr,
        Conf::default()
            .cache("grace = \"0s\"")
            .cache("stale_if_error = \"1m\""),
    )
    .await;
    get(&proxy.url("/five")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let g = get(&proxy.url("/five")).await;
    assert_eq!((g.status, g.body.as_str()), (200, "good"));
    assert!(origin.hits("/five") >= 2);
}

#[tokio::test]
async fn uncacheable_urls_are_remembered_and_not_queued_behind_the_lock() {
    let origin = Origin::start().await;
    origin.route("/dynamic", |s| {
        Reply::ok(format!("n{}", s.n))
            .header("cache-control", "private")
            .delay(Duration::from_millis(400))
    });
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    get(&proxy.url("/dynamic")).await; // learn that it is uncacheable
    let started = Instant::now();
    let all = burst(&proxy.url("/dynamic"), 20).await;
    let took = started.elapsed();
    assert!(
        all.iter()
            .all(|g| g.cache == "corral; fwd=uri-miss; detail=hit-for-miss"),
        "{}",
        all[0].cache
    );
    assert_eq!(origin.hits("/dynamic"), 21);
    // queued one by one behind a lock this would take 20 × 400 ms
    assert!(
        took < Duration::from_secs(3),
        "requests ran in parallel: {took:?}"
    );
    let mut bodies: Vec<_> = all.iter().map(|g| g.body.clone()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 20, "each client got its own response");
}

#[tokio::test]
async fn concurrent_client_no_cache_requests_share_one_revalidation() {
    let origin = Origin::start().await;
    origin.route("/ncc", |s| {
        Reply::ok(format!("v{}", s.n))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(200))
    });
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    get(&proxy.url("/ncc")).await;
    let c = client();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let req = c.get(proxy.url("/ncc")).header("cache-control", "no-cache");
            tokio::spawn(async move { send(req, &[]).await })
        })
        .collect();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, 200);
        assert_ne!(g.body, "v1", "no-cache got a validated response");
    }
    assert!(
        origin.hits("/ncc") <= 3,
        "no-cache is not a stampede: {} origin requests",
        origin.hits("/ncc")
    );
}

#[tokio::test]
async fn a_chunked_body_whose_end_arrives_alone_completes_for_filler_and_waiters() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // a raw origin that keeps its connection open and sends the last chunk on its own, when
    // the test says: Pingora then finishes the fill without an end-of-body write
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let mut wait = Some(wait);
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                count.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                            Cache-Control: max-age=60\r\n\r\n5\r\nhello\r\n";
                s.write_all(head.as_bytes()).await.unwrap();
                if let Some(w) = wait.take() {
                    let _ = w.await;
                }
                s.write_all(b"0\r\n\r\n").await.unwrap();
            }
        }
    });
    let proxy = Proxy::start(addr, Conf::default()).await;
    let mut filler = client().get(proxy.url("/chunks")).send().await.unwrap();
    // the first chunk has reached the client: the fill is in storage
    assert_eq!(&filler.chunk().await.unwrap().unwrap()[..], b"hello");
    let waiters = {
        let url = proxy.url("/chunks");
        tokio::spawn(async move { burst(&url, 20).await })
    };
    go_on.send(()).unwrap();
    let limit = Duration::from_secs(10);
    let rest = tokio::time::timeout(limit, filler.chunk()).await;
    assert!(rest.expect("the filler's body ends").unwrap().is_none());
    let waiters = tokio::time::timeout(limit, waiters).await;
    for got in waiters.expect("the waiters' bodies end").unwrap() {
        assert_eq!((got.status, got.body.as_str()), (200, "hello"));
    }
    assert_eq!(served.load(Ordering::SeqCst), 1);
    assert!(get(&proxy.url("/chunks")).await.cache.contains("hit"));
}

#[tokio::test]
async fn a_range_request_during_a_fill_gets_its_range() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // a raw origin that sends half of a 4,000-byte body, then the rest when the test says
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut wait = Some(wait);
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 4000\r\nCache-Control: max-age=60\r\n\r\n";
                s.write_all(format!("{head}{}", "a".repeat(2000)).as_bytes())
                    .await
                    .unwrap();
                if let Some(w) = wait.take() {
                    let _ = w.await;
                }
                s.write_all("b".repeat(2000).as_bytes()).await.unwrap();
            }
        }
    });
    let proxy = Proxy::start(addr, Conf::default()).await;
    let mut filler = client().get(proxy.url("/big")).send().await.unwrap();
    // the first half has reached the client: the fill is in storage
    assert_eq!(filler.chunk().await.unwrap().unwrap()[0], b'a');
    let ranged = {
        let url = proxy.url("/big");
        tokio::spawn(async move { get_with(&url, &[("range", "bytes=1990-2009")]).await })
    };
    go_on.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ranged)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.status, 206, "{}", got.cache);
    assert_eq!(got.body, format!("{}{}", "a".repeat(10), "b".repeat(10)));
    assert_eq!(got.headers["content-range"], "bytes 1990-2009/4000");
    while filler.chunk().await.unwrap().is_some() {}
}
