//! HTTP caching semantics (RFC 9111) against the real binary and a real origin.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

async fn setup(conf: Conf) -> (Origin, Proxy) {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, conf).await;
    (origin, proxy)
}

fn cacheable(body: &str) -> Reply {
    Reply::ok(body.to_string()).header("cache-control", "max-age=60")
}

/// A raw TCP origin, for what hyper cannot send (interim responses, upgrades): `serve` gets
/// each connection, on a task of its own.
async fn raw_origin<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

#[tokio::test]
async fn miss_then_hit() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/a", |_| cacheable("A"));
    let first = get(&proxy.url("/a")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, "A");
    assert!(
        first.cache.starts_with("corral; fwd=miss; stored"),
        "{}",
        first.cache
    );
    let second = get(&proxy.url("/a")).await;
    assert_eq!(second.body, "A");
    assert!(second.cache.starts_with("corral; hit; ttl="), "{}", second.cache);
    assert!(
        second.headers.contains_key("age"),
        "a hit carries Age (RFC 9111 §4)"
    );
    assert_eq!(origin.hits("/a"), 1);
}

/// A plain request for a fresh entry is answered by corral's fast hit path; a conditional one
/// (or one with a range, or request directives) goes through Pingora's full hit path. Both must
/// answer alike.
#[tokio::test]
async fn fast_and_full_hit_paths_answer_alike() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/same", |_| {
        cacheable("same body")
            .header("etag", "\"v1\"")
            .header("content-type", "text/plain; charset=utf-8")
            .header("x-custom", "kept")
            .header("xkey", "tag-1")
    });
    get(&proxy.url("/same")).await;
    let fast = get(&proxy.url("/same")).await;
    // If-None-Match that does not match: the full path, answered 200 from the cache
    let full = get_with(&proxy.url("/same"), &[("if-none-match", "\"other\"")]).await;
    for (name, got) in [("fast", &fast), ("full", &full)] {
        assert_eq!((got.status, got.body.as_str()), (200, "same body"), "{name}");
        assert!(
            got.cache.starts_with("corral; hit; ttl="),
            "{name}: {}",
            got.cache
        );
        assert!(got.headers.contains_key("age"), "{name}: Age");
        assert!(got.headers.contains_key("date"), "{name}: Date");
        assert!(!got.headers.contains_key("xkey"), "{name}: tags stripped");
        for h in [
            "etag",
            "content-type",
            "x-custom",
            "content-length",
            "cache-control",
        ] {
            assert_eq!(got.headers.get(h), fast.headers.get(h), "{name}: {h}");
        }
    }
    assert_eq!(fast.headers.get_all("cache-status").iter().count(), 1);
    assert_eq!(fast.headers.get_all("age").iter().count(), 1);
    // HEAD on the fast path: the GET's headers, no body
    let head = send(client().head(proxy.url("/same")), &[]).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert!(head.cache.starts_with("corral; hit"), "{}", head.cache);
    assert_eq!(
        head.headers.get("content-length"),
        fast.headers.get("content-length")
    );
    // a matching validator: 304 from the cache
    let not_modified = get_with(&proxy.url("/same"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(origin.hits("/same"), 1);
    // the plain GET and the HEAD took the fast path, the conditional ones did not
    let fast_hits = || async { metric(&proxy.metrics().await, "corral_fast_hits_total") };
    assert_eq!(fast_hits().await, 2.0);
    let again = get(&proxy.url("/same")).await;
    assert!(again.cache.starts_with("corral; hit; ttl="), "{}", again.cache);
    assert_eq!(fast_hits().await, 3.0);
    // request directives take the full path too
    get_with(&proxy.url("/same"), &[("cache-control", "max-age=30")]).await;
    get_with(&proxy.url("/same"), &[("range", "bytes=0-3")]).await;
    assert_eq!(fast_hits().await, 3.0);
    assert_eq!(origin.hits("/same"), 1);
}

#[tokio::test]
async fn query_and_host_are_part_of_the_key() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/q?x=1", |_| cacheable("x1"));
    origin.route("/q?x=2", |_| cacheable("x2"));
    assert_eq!(get(&proxy.url("/q?x=1")).await.body, "x1");
    assert_eq!(get(&proxy.url("/q?x=2")).await.body, "x2");
    assert_eq!(get(&proxy.url("/q?x=1")).await.body, "x1");
    assert_eq!(origin.hits("/q?x=1"), 1);
    let other_host = get_with(&proxy.url("/q?x=1"), &[("host", "other.example")]).await;
    assert!(other_host.cache.contains("fwd=miss"), "{}", other_host.cache);
    assert_eq!(origin.hits("/q?x=1"), 2);
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/v", |s| {
        let enc = s
            .headers
            .get("accept-encoding")
            .map_or("none", |v| v.to_str().unwrap())
            .to_string();
        cacheable(&format!("variant {enc}")).header("vary", "Accept-Encoding")
    });
    let url = proxy.url("/v");
    let gz = get_with(&url, &[("accept-encoding", "gzip")]).await;
    let br = get_with(&url, &[("accept-encoding", "br")]).await;
    assert_eq!(gz.body, "variant gzip");
    assert_eq!(br.body, "variant br");
    let gz2 = get_with(&url, &[("accept-encoding", "gzip")]).await;
    let br2 = get_with(&url, &[("accept-encoding", "br")]).await;
    assert_eq!(
        (gz2.body.as_str(), br2.body.as_str()),
        ("variant gzip", "variant br")
    );
    assert!(
        gz2.cache.contains("hit") && br2.cache.contains("hit"),
        "{} / {}",
        gz2.cache,
        br2.cache
    );
    assert_eq!(origin.hits("/v"), 2);
}

#[tokio::test]
async fn accept_encoding_is_normalised_so_browsers_share_variants() {
    fn echo(s: &common::origin::Seen) -> Reply {
        let enc = s
            .headers
            .get("accept-encoding")
            .map_or("none", |v| v.to_str().unwrap());
        cacheable(&format!("variant {enc}")).header("vary", "Accept-Encoding")
    }
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/v", echo);
    let url = proxy.url("/v");
    // Chrome, Firefox, Safari, curl --compressed: one variant, fetched once
    for (i, ae) in [
        "gzip, deflate, br, zstd",
        "gzip, deflate, br",
        "br, gzip",
        "deflate, gzip, br",
    ]
    .iter()
    .enumerate()
    {
        let got = get_with(&url, &[("accept-encoding", ae)]).await;
        assert_eq!(got.body, "variant br, gzip", "{ae}");
        assert_eq!(got.cache.contains("hit"), i > 0, "{ae}: {}", got.cache);
    }
    let gzip = get_with(&url, &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(gzip.body, "variant gzip");
    // a client that takes neither says so to the origin (an absent field means "anything")
    let identity = get_with(&url, &[("accept-encoding", "identity")]).await;
    assert_eq!(identity.body, "variant identity");
    let deflate = get_with(&url, &[("accept-encoding", "deflate")]).await;
    assert_eq!(deflate.body, "variant identity");
    assert!(deflate.cache.contains("hit"), "{}", deflate.cache);
    assert_eq!(get(&url).await.body, "variant none");
    assert_eq!(origin.hits("/v"), 4);
    // a bypassed request goes as the client sent it
    let post = send(client().post(&url).header("accept-encoding", "zstd"), &[]).await;
    assert_eq!(post.body, "variant zstd");

    // and off, the origin sees every spelling
    let conf = Conf::default().cache("normalize_accept_encoding = false");
    let (origin, proxy) = setup(conf).await;
    origin.route("/v", echo);
    let got = get_with(
        &proxy.url("/v"),
        &[("accept-encoding", "gzip, deflate, br, zstd")],
    )
    .await;
    assert_eq!(got.body, "variant gzip, deflate, br, zstd");
}

#[tokio::test]
async fn refreshing_one_variant_leaves_the_others_valid() {
    // Pingora keeps the first variant in the URL's primary slot and takes its lineage time as
    // the tombstone of the others: a refresh must not move it, or every refresh of the
    // first variant would turn the others into misses
    let conf = Conf::default().cache("grace = \"30s\"");
    let (origin, proxy) = setup(conf).await;
    origin.route("/vr", |s| {
        let enc = s
            .headers
            .get("accept-encoding")
            .map_or("none", |v| v.to_str().unwrap());
        let etag = format!("\"{enc}\"");
        let reply = if s.headers.get("if-none-match").is_some_and(|v| v == etag.as_str()) {
            Reply::ok("").status(304)
        } else {
            Reply::ok(format!("variant {enc}"))
        };
        reply
            .header("etag", etag.as_str())
            .header("cache-control", "max-age=1")
            .header("vary", "Accept-Encoding")
    });
    let url = proxy.url("/vr");
    let fetch = |enc: &'static str| {
        let url = url.clone();
        async move { get_with(&url, &[("accept-encoding", enc)]).await }
    };
    assert_eq!(fetch("gzip").await.body, "variant gzip");
    assert_eq!(fetch("br").await.body, "variant br");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // the first variant is served stale and refreshed in the background (a 304)
    assert!(fetch("gzip").await.cache.starts_with("corral; hit; ttl=-"));
    eventually(Duration::from_secs(5), "the refresh", || async {
        fetch("gzip").await.cache.starts_with("corral; hit; ttl=0")
    })
    .await;
    // the other variant is still the stale copy, served at once while it is refreshed,
    // not a miss that makes its clients wait
    let br = fetch("br").await;
    assert_eq!(br.body, "variant br");
    assert!(br.cache.starts_with("corral; hit; ttl=-"), "{}", br.cache);
    eventually(Duration::from_secs(5), "its refresh", || async {
        fetch("br").await.cache.starts_with("corral; hit; ttl=0")
    })
    .await;
    assert_eq!(origin.hits("/vr"), 4, "two fills, two 304s");
}

#[tokio::test]
async fn vary_star_is_never_served_from_cache() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/star", |_| cacheable("s").header("vary", "*"));
    get(&proxy.url("/star")).await;
    get(&proxy.url("/star")).await;
    assert_eq!(origin.hits("/star"), 2);
}

#[tokio::test]
async fn private_no_store_set_cookie_and_authorization_are_not_stored() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/private", |_| {
        Reply::ok("p").header("cache-control", "private, max-age=60")
    });
    origin.route("/nostore", |_| {
        Reply::ok("n").header("cache-control", "no-store, max-age=60")
    });
    origin.route("/cookie", |_| {
        cacheable("c").header("set-cookie", "session=secret")
    });
    origin.route("/auth", |_| cacheable("a"));
    for path in ["/private", "/nostore", "/cookie"] {
        for _ in 0..2 {
            let got = get(&proxy.url(path)).await;
            assert_eq!(got.status, 200);
            assert!(
                !got.cache.starts_with("corral; hit") && !got.cache.contains("stored"),
                "{path}: {}",
                got.cache
            );
        }
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    // the cookie reaches the client that asked, it is just never stored
    assert_eq!(
        get(&proxy.url("/cookie"))
            .await
            .headers
            .get("set-cookie")
            .unwrap(),
        "session=secret"
    );
    for _ in 0..2 {
        let got = get_with(&proxy.url("/auth"), &[("authorization", "Bearer t")]).await;
        assert_eq!(got.cache, "corral; fwd=bypass");
    }
    assert_eq!(origin.hits("/auth"), 2);
}

#[tokio::test]
async fn a_rule_can_store_set_cookie_responses_without_the_cookie() {
    let conf = Conf::default().rules("[[rule]]\npath_prefix = \"/static/\"\ncache_set_cookie = true\n");
    let (origin, proxy) = setup(conf).await;
    origin.route("/static/app.css", |_| {
        cacheable("css").header("set-cookie", "tracker=1")
    });
    let first = get(&proxy.url("/static/app.css")).await;
    assert!(first.cache.contains("stored"), "{}", first.cache);
    let hit = get(&proxy.url("/static/app.css")).await;
    assert!(hit.cache.contains("hit"), "{}", hit.cache);
    assert!(
        hit.headers.get("set-cookie").is_none(),
        "a stored cookie would leak to everyone"
    );
    assert_eq!(origin.hits("/static/app.css"), 1);
}

#[tokio::test]
async fn bypass_rule_and_default_ttl_rule() {
    let conf = Conf::default().rules(
        "[[rule]]\npath_prefix = \"/admin\"\nbypass = true\n\n[[rule]]\npath_prefix = \"/news\"\nttl = \"1m\"\n",
    );
    let (origin, proxy) = setup(conf).await;
    origin.route("/admin/x", |_| cacheable("admin"));
    origin.route("/news/1", |_| Reply::ok("news")); // no lifetime at all
    origin.route("/other", |_| Reply::ok("other"));
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/admin/x")).await.cache, "corral; fwd=bypass");
        get(&proxy.url("/news/1")).await;
        get(&proxy.url("/other")).await;
    }
    assert_eq!(origin.hits("/admin/x"), 2);
    assert_eq!(origin.hits("/news/1"), 1, "the rule's ttl makes it fresh");
    assert_eq!(origin.hits("/other"), 2, "no lifetime, no rule: not stored");
}

/// RFC 9111 §4.3.4: a 304 that brings fields the stored response did not have makes the entry
/// heavier, and L1 charges it. Before, the entry kept the weight of its first response: an
/// origin could grow every entry by up to the header limit, uncounted.
/// `/grow`: a 10-byte body fresh for 1 s, then 304s that bring a 20 KiB `x-big` field.
fn growing_on_304(origin: &Origin) {
    let big = "b".repeat(20 * 1024);
    origin.route("/grow", move |s| {
        let etag = "\"v1\"";
        if s.headers.get("if-none-match").is_some_and(|v| v == etag) {
            Reply::ok("")
                .status(304)
                .header("etag", etag)
                .header("cache-control", "max-age=60")
                .header("x-big", &big)
        } else {
            Reply::ok("0123456789")
                .header("etag", etag)
                .header("cache-control", "max-age=1")
        }
    });
}

#[tokio::test]
async fn a_304_that_adds_fields_is_charged_for_them() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"0s\"")).await;
    growing_on_304(&origin);
    assert_eq!(get(&proxy.url("/grow")).await.body, "0123456789");
    let (entries, before, _) = proxy.stats().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // let max-age=1 run out
    let reval = get(&proxy.url("/grow")).await;
    assert!(reval.cache.contains("fwd-status=304"), "{}", reval.cache);
    assert_eq!(reval.headers["x-big"].len(), 20 * 1024);
    let (entries_after, after, _) = proxy.stats().await;
    assert_eq!(entries_after, entries);
    assert!(after >= before + 20 * 1024, "L1 bytes {before} -> {after}");
    let hit = get(&proxy.url("/grow")).await;
    assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
    assert_eq!(origin.hits("/grow"), 2);
}

/// The same, at the budget's edge: the eviction manager learns the new weight, and evicts to
/// stay within `memory_bytes` (each policy).
#[tokio::test]
async fn a_304_that_grows_an_entry_past_the_budget_evicts() {
    for policy in ["lru", "tinyufo", "s3fifo"] {
        let conf = Conf::default()
            .cache("grace = \"0s\"")
            .cache("memory_bytes = \"24KiB\"")
            .cache("max_object_bytes = \"4KiB\"")
            .cache(&format!("eviction = \"{policy}\""));
        let (origin, proxy) = setup(conf).await;
        growing_on_304(&origin);
        // (bodies of 200 bytes: with the entries' bookkeeping they take a third of the budget,
        // so that the 304's 20 KiB of fields pass it)
        for i in 0..4 {
            origin.route(&format!("/small/{i}"), |_| {
                Reply::ok("s".repeat(200)).header("cache-control", "max-age=60")
            });
        }
        get(&proxy.url("/grow")).await;
        for i in 0..4 {
            get(&proxy.url(&format!("/small/{i}"))).await;
        }
        let (entries, before, limit) = proxy.stats().await;
        assert_eq!(entries, 5, "{policy}: all fit ({before} of {limit} bytes)");
        assert!(
            before + 20 * 1024 > limit + 4096,
            "{policy}: the 304 must pass the budget"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await; // let max-age=1 run out
        let reval = get(&proxy.url("/grow")).await;
        assert!(
            reval.cache.contains("fwd-status=304"),
            "{policy}: {}",
            reval.cache
        );
        let (entries, after, _) = proxy.stats().await;
        assert!(
            after <= limit,
            "{policy}: L1 holds {after} bytes, over its {limit}"
        );
        assert!(entries < 5, "{policy}: something was evicted ({entries} entries)");
    }
}

#[tokio::test]
async fn stale_entry_is_revalidated_and_304_refreshes_stored_headers() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"0s\"")).await;
    origin.route("/r", |s| {
        let etag = "\"v1\"";
        if s.headers.get("if-none-match").is_some_and(|v| v == etag) {
            Reply::ok("")
                .status(304)
                .header("etag", etag)
                .header("cache-control", "max-age=60")
                .header("x-rev", "2")
        } else {
            Reply::ok("body v1")
                .header("etag", etag)
                .header("cache-control", "max-age=1")
                .header("x-rev", "1")
        }
    });
    let first = get(&proxy.url("/r")).await;
    assert_eq!(first.headers["x-rev"], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await; // let max-age=1 run out
    let reval = get(&proxy.url("/r")).await;
    assert_eq!(reval.status, 200);
    assert_eq!(reval.body, "body v1", "the stored body is reused");
    assert!(
        reval.cache.starts_with("corral; fwd=stale; fwd-status=304"),
        "{}",
        reval.cache
    );
    assert_eq!(reval.headers["x-rev"], "2", "a 304 updates the stored headers");
    let fast = metric(&proxy.metrics().await, "corral_fast_hits_total");
    let hit = get(&proxy.url("/r")).await;
    assert!(hit.cache.starts_with("corral; hit"), "{}", hit.cache);
    assert_eq!(hit.headers["x-rev"], "2");
    // the body now lies apart from the head (a buffer of its own came with the 304), and the
    // fast path reads it there
    assert_eq!(hit.body, "body v1");
    assert_eq!(hit.headers["content-length"], "7");
    assert_eq!(
        metric(&proxy.metrics().await, "corral_fast_hits_total"),
        fast + 1.0
    );
    assert_eq!(origin.hits("/r"), 2);
}

#[tokio::test]
async fn changed_resource_replaces_the_stale_entry() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"0s\"")).await;
    origin.route("/c", |s| {
        Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=1")
    });
    assert_eq!(get(&proxy.url("/c")).await.body, "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = get(&proxy.url("/c")).await;
    assert_eq!(fresh.body, "v2");
    assert!(
        fresh
            .cache
            .starts_with("corral; fwd=stale; fwd-status=200; stored"),
        "{}",
        fresh.cache
    );
    assert_eq!(get(&proxy.url("/c")).await.body, "v2");
}

#[tokio::test]
async fn head_is_answered_from_a_cached_get_and_fills_it() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/h1", |_| cacheable("hello"));
    origin.route("/h2", |_| cacheable("world"));
    let c = client();
    get(&proxy.url("/h1")).await;
    let head = send(c.head(proxy.url("/h1")), &[]).await;
    assert!(head.cache.contains("hit"), "{}", head.cache);
    assert_eq!(head.headers["content-length"], "5");
    assert_eq!(head.body, "");
    // a HEAD miss fetches the whole GET, so the next GET is a hit
    send(c.head(proxy.url("/h2")), &[]).await;
    let after = get(&proxy.url("/h2")).await;
    assert_eq!(after.body, "world");
    assert!(after.cache.contains("hit"), "{}", after.cache);
    assert_eq!(origin.hits("/h1") + origin.hits("/h2"), 2);
}

#[tokio::test]
async fn successful_unsafe_methods_invalidate_the_url() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/doc", |s| match s.method.as_str() {
        "GET" => cacheable(&format!("doc v{}", s.n)),
        "DELETE" => Reply::ok("nope").status(403),
        _ => Reply::ok("done").header("location", "/doc/list"),
    });
    origin.route("/doc/list", |s| cacheable(&format!("list v{}", s.n)));
    let c = client();
    assert_eq!(get(&proxy.url("/doc")).await.body, "doc v1");
    assert_eq!(get(&proxy.url("/doc/list")).await.body, "list v1");
    // a failed DELETE invalidates nothing (RFC 9111 §4.4: only non-error responses)
    assert_eq!(send(c.delete(proxy.url("/doc")), &[]).await.status, 403);
    assert!(get(&proxy.url("/doc")).await.cache.contains("hit"));
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::PATCH,
    ] {
        let done = send(c.request(method.clone(), proxy.url("/doc")), &[]).await;
        assert_eq!(done.body, "done");
        let after = get(&proxy.url("/doc")).await;
        assert!(
            after.cache.contains("fwd=miss"),
            "after {method}: {}",
            after.cache
        );
        let list = get(&proxy.url("/doc/list")).await;
        assert!(
            list.cache.contains("fwd=miss"),
            "Location is invalidated too, after {method}"
        );
    }
}

#[tokio::test]
async fn every_method_is_forwarded() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/m", |s| Reply::ok(s.method.to_string()));
    let c = client();
    for m in ["PUT", "DELETE", "OPTIONS", "PATCH", "POST", "PROPFIND"] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let got = send(c.request(method, proxy.url("/m")), &[]).await;
        assert_eq!((got.status, got.body.as_str()), (200, m));
        assert_eq!(got.cache, "corral; fwd=bypass");
    }
    assert_eq!(origin.hits("/m"), 6);
}

#[tokio::test]
async fn headers_named_in_connection_are_stripped_both_ways() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/conn", |s| {
        let leaked = s.headers.contains_key("x-hop") || s.headers.contains_key("keep-alive");
        Reply::ok(if leaked { "leaked" } else { "clean" })
            .header("cache-control", "max-age=60")
            .header("connection", "x-internal")
            .header("x-internal", "secret")
    });
    let got = get_with(
        &proxy.url("/conn"),
        &[
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
        ],
    )
    .await;
    assert_eq!(got.body, "clean");
    assert!(got.headers.get("x-internal").is_none());
    let hit = get(&proxy.url("/conn")).await;
    assert!(hit.headers.get("x-internal").is_none(), "never stored either");
}

#[tokio::test]
async fn invalid_or_past_expires_means_stale() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"0s\"")).await;
    origin.route("/e1", |_| Reply::ok("e").header("expires", "0"));
    origin.route("/e2", |_| {
        Reply::ok("e").header("expires", "Thu, 01 Jan 1970 00:00:00 GMT")
    });
    for path in ["/e1", "/e2"] {
        get(&proxy.url(path)).await;
        let again = get(&proxy.url(path)).await;
        assert!(!again.cache.contains("hit"), "{path}: {}", again.cache);
        assert_eq!(origin.hits(path), 2, "{path}");
    }
}

#[tokio::test]
async fn upstream_age_is_honoured_and_added_to() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/aged", |_| {
        Reply::ok("old")
            .header("cache-control", "max-age=1000")
            .header("age", "100")
    });
    get(&proxy.url("/aged")).await;
    let hit = get(&proxy.url("/aged")).await;
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "age {age}");
    let ttl: i64 = hit.cache.rsplit("ttl=").next().unwrap().parse().unwrap();
    assert!((890..=900).contains(&ttl), "ttl {ttl}");
}

#[tokio::test]
async fn client_no_cache_revalidates_and_only_if_cached_never_forwards() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/nc", |s| cacheable(&format!("v{}", s.n)));
    assert_eq!(get(&proxy.url("/nc")).await.body, "v1");
    let forced = get_with(&proxy.url("/nc"), &[("cache-control", "no-cache")]).await;
    assert_eq!(forced.body, "v2");
    assert!(
        forced.cache.starts_with("corral; fwd=request"),
        "{}",
        forced.cache
    );
    let pragma = get_with(&proxy.url("/nc"), &[("pragma", "no-cache")]).await;
    assert_eq!(pragma.body, "v3");
    assert_eq!(
        get(&proxy.url("/nc")).await.body,
        "v3",
        "the refreshed copy is stored"
    );

    let missing = get_with(&proxy.url("/not-cached"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(missing.status, 504);
    assert_eq!(origin.hits("/not-cached"), 0);
    let cached = get_with(&proxy.url("/nc"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!((cached.status, cached.body.as_str()), (200, "v3"));
}

#[tokio::test]
async fn ranges_are_served_from_the_whole_stored_body() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/range", |s| {
        assert!(s.headers.get("range").is_none(), "corral fetches whole bodies");
        cacheable("0123456789")
    });
    let part = get_with(&proxy.url("/range"), &[("range", "bytes=2-5")]).await;
    assert_eq!((part.status, part.body.as_str()), (206, "2345"));
    let part = get_with(&proxy.url("/range"), &[("range", "bytes=7-")]).await;
    assert_eq!((part.status, part.body.as_str()), (206, "789"));
    assert_eq!(origin.hits("/range"), 1);
}

#[tokio::test]
async fn odd_partial_responses_pass_through() {
    let (origin, proxy) = setup(Conf::default()).await;
    // an origin that answers 206 to a request without Range, and one with a Content-Range
    // that does not match the body: passed on, never stored, never a 502
    origin.route("/odd206", |_| {
        Reply::ok("abc")
            .status(206)
            .header("content-range", "bytes 0-2/10")
            .header("cache-control", "max-age=60")
    });
    origin.route("/chunked", |_| {
        Reply::ok("x".repeat(100)).header("transfer-encoding", "chunked")
    });
    for _ in 0..2 {
        let got = get(&proxy.url("/odd206")).await;
        assert_eq!((got.status, got.body.as_str()), (206, "abc"));
    }
    assert_eq!(origin.hits("/odd206"), 2);
    let put = send(client().put(proxy.url("/odd206")).body("x"), &[]).await;
    assert_eq!(put.status, 206);
    let chunked = get(&proxy.url("/chunked")).await;
    assert_eq!((chunked.status, chunked.body.len()), (200, 100));
}

#[tokio::test]
async fn interim_1xx_responses_pass_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // hyper cannot send 103 Early Hints
    let addr = raw_origin(|mut s| async move {
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\nok")
            .await;
    })
    .await;
    let proxy = Proxy::start(addr, Conf::default()).await;
    let got = get(&proxy.url("/early")).await;
    assert_eq!((got.status, got.body.as_str()), (200, "ok"));
    let again = get(&proxy.url("/early")).await;
    assert!(again.cache.contains("hit"), "{}", again.cache);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/p1", |_| cacheable("one"));
    origin.route("/p2", |_| cacheable("two"));
    origin.route("/form", |_| Reply::ok("posted".to_string()));
    // five requests in one write, before reading any answer (RFC 9112 §9.3.2): misses, a
    // HEAD and a GET answered from cache, a POST with a body
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /p2 HTTP/1.1\r\nHost: h\r\n\r\n\
          HEAD /p1 HTTP/1.1\r\nHost: h\r\n\r\n\
          POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
          GET /p2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got));
    read.await.expect("the connection closes after the last").unwrap();
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert_eq!(text.matches("http/1.1 200 ok").count(), 5, "{text}");
    let order: Vec<usize> = ["one", "two", "cache-status: corral; hit", "posted", "two"]
        .iter()
        .scan(0, |from, needle| {
            let at = *from + text[*from..].find(needle)?;
            *from = at + needle.len();
            Some(at)
        })
        .collect();
    assert_eq!(order.len(), 5, "answers out of order: {text}");
    assert_eq!((origin.hits("/p1"), origin.hits("/p2")), (1, 1));
}

#[tokio::test]
async fn websocket_handshakes_bypass_the_cache_and_reach_the_origin() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // a cacheable page at /ws, and a WebSocket-style echo after a 101
    let addr = raw_origin(|mut s| async move {
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        if !req.contains("upgrade: websocket") {
            let page = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\
                        Cache-Control: max-age=60\r\n\r\npage";
            let _ = s.write_all(page.as_bytes()).await;
            return;
        }
        let switch = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\n\r\n";
        let _ = s.write_all(switch.as_bytes()).await;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&[b"echo:", &buf[..n]].concat()).await.is_err() {
                break;
            }
        }
    })
    .await;
    let proxy = Proxy::start(addr, Conf::default()).await;
    // the page is cached; a handshake for the same URL must not be answered with it
    assert_eq!(get(&proxy.url("/ws")).await.body, "page");
    assert!(get(&proxy.url("/ws")).await.cache.contains("hit"));
    // an h2c upgrade offer (curl --http2 on http://) is ignored: still a plain cached GET
    let h2c = [
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ];
    assert!(get_with(&proxy.url("/ws"), &h2c).await.cache.contains("hit"));
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("cache-status: corral; fwd=bypass"), "{head}");
    // The tunnel after the 101 is Pingora's, and racy in 0.9.1: in about one handshake in
    // five here it closes the connection right after the 101 (its request-body pipe is shut
    // before the upgrade is seen). So the echo is tried, not asserted; see README.
    let _ = s.write_all(b"hello").await;
    let n = s.read(&mut buf).await.unwrap_or(0);
    assert!(n == 0 || &buf[..n] == b"echo:hello", "{:?}", &buf[..n]);
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the handshake counted as a bypass",
        || async { metric(&proxy.metrics().await, "corral_requests_total{cache=\"bypass\"}") == 1.0 },
    )
    .await;
    assert_eq!(
        metric(&proxy.metrics().await, "corral_requests_total{cache=\"error\"}"),
        0.0
    );
}

#[tokio::test]
async fn objects_over_max_object_bytes_stream_through_unstored() {
    let (origin, proxy) = setup(Conf::default().cache("max_object_bytes = \"64KiB\"")).await;
    let big = "b".repeat(200 * 1024);
    let small = "s".repeat(10 * 1024);
    let (b, s) = (big.clone(), small.clone());
    origin.route("/big", move |_| cacheable(&b));
    origin.route("/small", move |_| cacheable(&s));
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/big")).await.body, big);
        assert_eq!(get(&proxy.url("/small")).await.body, small);
    }
    assert_eq!(origin.hits("/big"), 2);
    assert_eq!(origin.hits("/small"), 1);
}

/// 3 MiB through a 1 MiB cache under each policy: the bound holds, the cache is still used,
/// the newest entries stay. Which old ones go is the policy's: LRU drops the oldest; S3-FIFO
/// keeps the entries that filled the empty cache in its main queue and drops the newer ones
/// that were never hit from its small queue (what keeps a popular set through a scan).
#[tokio::test]
async fn memory_bound_holds_after_three_times_memory_bytes() {
    for policy in ["lru", "tinyufo", "s3fifo"] {
        let conf = Conf::default()
            .cache("memory_bytes = \"1MiB\"")
            .cache("max_object_bytes = \"64KiB\"")
            .cache(&format!("eviction = \"{policy}\""));
        let (origin, proxy) = setup(conf).await;
        let body = "m".repeat(32 * 1024);
        for i in 0..96 {
            let b = body.clone();
            origin.route(&format!("/mem/{i}"), move |_| cacheable(&b));
        }
        // 96 × 32 KiB = 3 MiB through a 1 MiB cache
        for i in 0..96 {
            assert_eq!(get(&proxy.url(&format!("/mem/{i}"))).await.body.len(), body.len());
        }
        // eviction runs right after each admission, in the background: wait for it, bounded
        let mut stats = proxy.stats().await;
        for _ in 0..200 {
            if stats.1 <= stats.2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            stats = proxy.stats().await;
        }
        let (entries, bytes, limit) = stats;
        assert_eq!(limit, 1024 * 1024);
        assert!(bytes <= limit, "{policy}: {bytes} bytes held, limit {limit}");
        assert!(
            entries >= 20,
            "{policy}: the cache is still used: {entries} entries"
        );
        assert!(entries < 96, "{policy}: {entries} entries: nothing was evicted");
        // Pingora's LRU is sharded (16): an eviction takes the oldest entry of the longer of
        // two random shards, so the newest entry goes when it is alone in the shard drawn. Of
        // the four newest, all but one stay (two such draws in four evictions is unlikely);
        // the other policies keep the newest one
        let (first, needed) = if policy == "lru" { (92, 3) } else { (95, 1) };
        let mut newest = Vec::new();
        for i in (first..96).rev() {
            newest.push(get(&proxy.url(&format!("/mem/{i}"))).await.cache);
        }
        let kept = newest.iter().filter(|c| c.contains("hit")).count();
        assert!(kept >= needed, "{policy}: the newest stay: {newest:?}");
        let oldest = get(&proxy.url("/mem/0")).await.cache;
        match policy {
            "lru" => assert!(oldest.contains("fwd=miss"), "the oldest was evicted: {oldest}"),
            "s3fifo" => assert!(
                oldest.contains("hit"),
                "the oldest is in the main queue: {oldest}"
            ),
            _ => {}
        }
    }
}

/// After a purge of everything (a deploy's generation change does the same), L1 fills again
/// to its budget. The eviction manager was not told that L1 was emptied: under TinyUFO the
/// popular entries of before stayed in its main queue with their use counts, weighing the
/// whole budget, and every new entry was evicted from the small queue at once (about one in
/// ten kept).
#[tokio::test]
async fn after_a_purge_of_everything_the_cache_fills_to_its_budget_again() {
    for policy in ["tinyufo", "lru", "s3fifo"] {
        let conf = Conf::default()
            .cache("memory_bytes = \"2MiB\"")
            .cache("max_object_bytes = \"64KiB\"")
            .cache(&format!("eviction = \"{policy}\""));
        let (origin, proxy) = setup(conf).await;
        let body = "e".repeat(16 * 1024);
        for set in ["before", "after"] {
            for i in 0..80 {
                let b = body.clone();
                origin.route(&format!("/{set}/{i}"), move |_| cacheable(&b));
            }
        }
        // 80 × 16 KiB fit in 2 MiB; each asked three times (the popular set)
        for _ in 0..3 {
            for i in 0..80 {
                get(&proxy.url(&format!("/before/{i}"))).await;
            }
        }
        let all = client()
            .post(format!("http://{}/purge/all", proxy.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(all.status(), 200, "{policy}");
        for i in 0..80 {
            get(&proxy.url(&format!("/after/{i}"))).await;
        }
        let mut hits = 0;
        for i in 0..80 {
            if get(&proxy.url(&format!("/after/{i}")))
                .await
                .cache
                .starts_with("corral; hit")
            {
                hits += 1;
            }
        }
        assert!(
            hits >= 72,
            "{policy}: {hits} of 80 entries that fit the budget were kept after the purge"
        );
    }
}

/// Issue 16: the memory bound as the kernel sees it. corral's own count (the test above)
/// cannot catch what it under-counts (per-entry bookkeeping, buffers kept alive, the
/// allocator's waste), so this one reads the process's RSS. A heavy-tailed workload of four
/// times the budget (objects of 1 KiB to 1 MiB, skewed popularity, a scan of every object in
/// the middle) under each eviction policy: what corral grew by may not pass 1.5 times
/// `memory_bytes` as the load ends, nor 1.28 times once the allocator's free pages are given
/// back at rest (src/trim.rs). Growth, not the absolute RSS: the binary, its threads and
/// runtime are a fixed cost, reported with the benchmark (README, Benchmarks). glibc only: the
/// trims, and the figures, are its malloc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn rss_growth_stays_within_the_budget_under_a_heavy_tailed_workload() {
    const N: usize = 3000;
    const BUDGET: u64 = 16 << 20;
    let size = |i: usize| match i % 97 {
        0 => 1 << 20,
        1..=9 => 64 << 10,
        _ => 1024 + (i * 7919) % 12288,
    };
    let total: usize = (0..N).map(size).sum();
    assert!(total as u64 > 4 * BUDGET, "the workload is {total} bytes");
    for policy in ["lru", "tinyufo", "s3fifo"] {
        let conf = Conf::default()
            .cache("memory_bytes = \"16MiB\"")
            .cache("max_object_bytes = \"2MiB\"")
            .cache(&format!("eviction = \"{policy}\""));
        let (origin, proxy) = setup(conf).await;
        for i in 0..N {
            let body = bytes::Bytes::from(vec![b'a' + (i % 26) as u8; size(i)]);
            origin.route(&format!("/w/{i}"), move |_| {
                Reply::ok(body.clone()).header("cache-control", "max-age=600")
            });
        }
        let client = client();
        let fetch = |i: usize| {
            let (client, url) = (client.clone(), proxy.url(&format!("/w/{i}")));
            async move {
                let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
                assert_eq!(body.len(), size(i), "{policy}: /w/{i}");
            }
        };
        // connections, buffers and pools in place before the first measure
        for _ in 0..10 {
            join_all((0..16).map(|_| fetch(1))).await;
        }
        let base = proxy.rss();

        // skewed popularity: id = N * u^3 for u uniform in [0, 1) (a fixed sequence)
        let mut x: u64 = 16;
        let mut skewed = |n: usize| -> Vec<usize> {
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                    ((N as f64) * u * u * u) as usize
                })
                .collect()
        };
        let mut ids = skewed(6000);
        ids.extend(0..N);
        ids.extend(skewed(6000));
        for chunk in ids.chunks(16) {
            join_all(chunk.iter().map(|&i| fetch(i))).await;
        }
        // evictions run on spawned tasks after each admission: let them finish
        eventually(Duration::from_secs(10), "L1 back under its limit", || async {
            let (_, bytes, limit) = proxy.stats().await;
            bytes <= limit
        })
        .await;
        let (entries, bytes, _) = proxy.stats().await;
        let at_end = proxy.rss().saturating_sub(base);
        // what eviction freed inside malloc's heaps is given back once the releases stop, at
        // least 10 s after the trim before (src/trim.rs, checked each second): poll for it, up
        // to 30 s, until RSS is within the bound and fell by a 20th of the budget at least
        // (so that a load that ended under the bound still shows the trim)
        let at_rest = BUDGET * 128 / 100;
        let fell = |grown: u64| grown <= at_rest && grown + BUDGET / 20 <= at_end;
        let waited = std::time::Instant::now();
        let mut grown = at_end;
        while !fell(grown) && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            grown = proxy.rss().saturating_sub(base);
        }
        eprintln!(
            "{policy}: RSS growth {:.2}x the budget as the load ended, {:.2}x after {:.1} s at rest",
            at_end as f64 / BUDGET as f64,
            grown as f64 / BUDGET as f64,
            waited.elapsed().as_secs_f64()
        );
        eprintln!(
            "{policy}: RSS {} MiB at the start, grew by {:.1} MiB ({:.2}x the budget); \
             {entries} entries, {:.1} MiB counted; origin requests {} of {}",
            base >> 20,
            grown as f64 / (1 << 20) as f64,
            grown as f64 / BUDGET as f64,
            bytes as f64 / (1 << 20) as f64,
            origin.total(),
            ids.len() + 1,
        );
        assert!(entries >= 100, "{policy}: the cache is used: {entries} entries");
        assert!(
            bytes >= BUDGET * 9 / 10,
            "{policy}: L1 is filled to its budget: {bytes} bytes"
        );
        assert!(origin.total() < ids.len() * 9 / 10, "{policy}: hits happened");
        // under load, the peak: measured 1.31-1.41x (1.49-1.65x without the allocator tuning in
        // src/main.rs); it catches a gross under-count, not the last tenth
        assert!(
            at_end <= BUDGET * 150 / 100,
            "{policy}: RSS grew by {at_end} bytes under load, more than 1.5 x memory_bytes ({BUDGET})"
        );
        // at rest, once the free pages are given back: measured 1.15-1.21x (without
        // src/trim.rs it stays at the peak, 1.31-1.41x)
        assert!(
            fell(grown),
            "{policy}: RSS grew by {grown} bytes 30 s after the load ended ({at_end} as it \
             ended): more than 1.28 x memory_bytes ({BUDGET}), or less than a 20th of it given \
             back"
        );
        let metrics = proxy.metrics().await;
        let trims: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("corral_allocator_trim_duration_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .expect("corral_allocator_trim_duration_seconds is exported");
        assert!(
            trims >= 1.0,
            "{policy}: the free pages were given back ({trims} trims)"
        );
    }
}

/// `cache.trim_allocator`: on by default, the trimmer runs (its histogram is exported); off,
/// none runs (src/trim.rs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn the_allocator_trimmer_runs_unless_turned_off() {
    const SERIES: &str = "corral_allocator_trim_duration_seconds_count";
    let (_origin, on) = setup(Conf::default()).await;
    eventually(Duration::from_secs(10), "the trimmer started", || async {
        on.log_text().contains("allocator trim on") && on.metrics().await.contains(SERIES)
    })
    .await;
    assert!(!on.log_text().contains("allocator trim off"));
    let (_origin, off) = setup(Conf::default().cache("trim_allocator = false")).await;
    // said at start-up, before the services run: the branch that starts no trimmer was taken
    eventually(Duration::from_secs(10), "the trimmer said off", || async {
        off.log_text().contains("allocator trim off")
    })
    .await;
    assert!(
        !off.log_text().contains("allocator trim on"),
        "{}",
        off.log_text()
    );
    assert!(
        !off.metrics().await.contains(SERIES),
        "no trimmer with trim_allocator = false"
    );
}

/// Issue 16: what a small cached object costs beyond its body and header, as the kernel sees
/// it. 20,000 objects of 100 bytes, nothing evicted: corral's RSS may grow by at most 550
/// bytes per entry beyond body and header on the wire (measured 377 to 393 since the body is
/// a slice of the head's buffer and a row's slots keep no variance, 2026-11-30, on a 2-core
/// machine; 447 to 460 at the stop before, d5455a5, whose 60 bytes more this bound does
/// not catch: its margin is for a noisy machine, and benches/memory.sh measures; 627 to 634 with the body,
/// URL, head and offsets in one buffer, 8-byte times and TinyUFO's 32-byte key, before S3-FIFO
/// became the default; 921 to 951
/// with the head as text and offsets in a buffer of its own; about 1,050 with (name, value)
/// pairs; 1,665 when the header was stored as an `http::HeaderMap` and each row's slot
/// vector had room for four variants). A bound with a margin for a noisy machine: it
/// catches a regression to the layout before, not the last tenth (benches/memory.sh
/// measures).
#[tokio::test]
async fn a_small_object_costs_little_beyond_its_body_and_header() {
    const N: usize = 20_000;
    let conf = Conf::default().cache("memory_bytes = \"1GiB\"");
    let (_origin, proxy) = setup(conf).await;
    let client = client();
    let fetch = |i: usize| {
        let (client, url) = (client.clone(), proxy.url(&format!("/tiny/{i}?size=100")));
        async move {
            let r = client.get(url).send().await.unwrap();
            let head: usize = r
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum();
            assert_eq!(r.bytes().await.unwrap().len(), 100);
            head
        }
    };
    // connections, buffers and pools in place before the first measure: 16 at once, as below
    for _ in 0..10 {
        let tasks: Vec<_> = (0..16).map(|_| tokio::spawn(fetch(0))).collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let (before, _, _) = proxy.stats().await;
    let base = proxy.rss();
    let mut head = 0;
    for chunk in (1..=N).collect::<Vec<_>>().chunks(16) {
        let tasks: Vec<_> = chunk.iter().map(|&i| tokio::spawn(fetch(i))).collect();
        for t in tasks {
            head = t.await.unwrap();
        }
    }
    // a client reads a miss's body while it is stored: the last commits may trail it
    eventually(Duration::from_secs(5), "every object is kept", || async {
        proxy.stats().await.0 - before == N as u64
    })
    .await;
    let stored = N;
    let per_entry = proxy.rss().saturating_sub(base) as usize / stored;
    // the head as the client saw it, less what a hit adds (Age, Cache-Status, and Date and
    // Connection, which the origin sends too): a bound on the stored fields
    let beyond = per_entry.saturating_sub(100 + head);
    eprintln!(
        "RSS growth per entry {per_entry} bytes, {beyond} beyond body and header ({head} bytes of header)"
    );
    assert!(
        beyond <= 550,
        "a 100-byte object costs {beyond} bytes beyond its body and header"
    );
}

/// Run `futs` at once, each on a task of its own, and wait for all of them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn join_all<F: std::future::Future<Output = ()> + Send + 'static>(futs: impl Iterator<Item = F>) {
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn metrics_count_outcomes() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/metered", |_| cacheable("m"));
    get(&proxy.url("/metered")).await;
    get(&proxy.url("/metered")).await;
    // outcomes are counted when Pingora logs the request, just after the response is sent
    eventually(Duration::from_secs(5), "both requests counted", || async {
        let text = proxy.metrics().await;
        metric(&text, "corral_requests_total{cache=\"hit\"}") == 1.0
            && metric(&text, "corral_requests_total{cache=\"miss\"}") == 1.0
    })
    .await;
    let text = proxy.metrics().await;
    assert!(text.contains("corral_requests_total{cache=\"hit\"} 1"), "{text}");
    assert!(text.contains("corral_requests_total{cache=\"miss\"} 1"), "{text}");
    assert!(text.contains("corral_l1_entries 1"), "{text}");
    // the one origin its URL starts with got a number in L1's table of origins
    assert_eq!(metric(&text, "corral_l1_origins"), 1.0, "{text}");
}

/// RFC 9110 §12.5.3: without Accept-Encoding any coding is acceptable. A client that accepts
/// neither gzip nor br must not be sent gzip because corral dropped its field.
#[tokio::test]
async fn a_client_that_takes_no_compression_never_gets_gzip() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/z", |s| {
        // a gzip-capable origin: compresses unless told the client cannot take it
        let ae = s
            .headers
            .get("accept-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        let gzip = ae.as_deref().is_none_or(|v| v.contains("gzip"));
        let r = cacheable(if gzip { "GZIPPED" } else { "plain" }).header("vary", "Accept-Encoding");
        if gzip {
            r.header("content-encoding", "gzip")
        } else {
            r
        }
    });
    let got = get_with(&proxy.url("/z"), &[("accept-encoding", "deflate")]).await;
    assert_eq!(got.body, "plain");
    assert!(got.headers.get("content-encoding").is_none());
}

/// RFC 9111 §5.1: `Age: 7200, 0` is 7200 (the first value), and an Age too large for a
/// number makes the entry stale, not fresh.
#[tokio::test]
async fn an_age_list_and_a_huge_age_make_the_entry_stale() {
    let (origin, proxy) = setup(Conf::default().cache("grace = \"0s\"")).await;
    origin.route("/age-list", |s| {
        cacheable(&format!("v{}", s.n)).header("age", "7200, 0")
    });
    origin.route("/age-huge", |s| {
        cacheable(&format!("v{}", s.n)).header("age", "99999999999999999999999")
    });
    for path in ["/age-list", "/age-huge"] {
        let first = get(&proxy.url(path)).await;
        assert_eq!(first.body, "v1");
        // max-age=60 minus an age of hours: stale at once, so the next request goes upstream
        let again = get(&proxy.url(path)).await;
        assert!(!again.cache.starts_with("corral; hit"), "{path}: {}", again.cache);
        assert_eq!(origin.hits(path), 2, "{path}");
    }
}

/// RFC 9110 §5.6.7: recipients MUST accept the obsolete RFC 850 and asctime date formats.
#[tokio::test]
async fn expires_in_every_date_format_and_case_gives_freshness() {
    let (origin, proxy) = setup(Conf::default()).await;
    let now = std::time::SystemTime::now();
    let in_an_hour = now + Duration::from_secs(3600);
    let date = httpdate::fmt_http_date(now);
    let imf = httpdate::fmt_http_date(in_an_hour);
    // the same instant in the two obsolete formats, built from the IMF one:
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let parts: Vec<&str> = imf.split(' ').collect();
    let (wd, day, mon, year, time) = (
        parts[0].trim_end_matches(','),
        parts[1],
        parts[2],
        parts[3],
        parts[4],
    );
    let full = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ]
    .into_iter()
    .find(|d| d.starts_with(wd))
    .unwrap();
    let rfc850 = format!("{full}, {day}-{mon}-{} {time} GMT", &year[2..]);
    let asctime = format!("{wd} {mon} {:>2} {time} {year}", day.trim_start_matches('0'));
    for (i, expires) in [imf.to_uppercase(), rfc850, asctime].into_iter().enumerate() {
        let path = format!("/exp{i}");
        let (d, e) = (date.clone(), expires.clone());
        origin.route(&path, move |_| {
            Reply::ok("x")
                .header("date", d.clone())
                .header("expires", e.clone())
        });
        get(&proxy.url(&path)).await;
        let again = get(&proxy.url(&path)).await;
        assert!(
            again.cache.starts_with("corral; hit"),
            "{expires}: {}",
            again.cache
        );
    }
}

/// A client can name any header in `Connection`; corral then removes it from the upstream
/// request. A response that varies on it must not be stored as the variant of the value the
/// client sent (cache poisoning).
#[tokio::test]
async fn connection_cannot_make_corral_store_a_variant_the_upstream_never_saw() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/lang", |s| {
        let lang = s
            .headers
            .get("accept-language")
            .map_or("none", |v| v.to_str().unwrap());
        cacheable(&format!("lang={lang}")).header("vary", "Accept-Language")
    });
    let url = proxy.url("/lang");
    let attack = get_with(
        &url,
        &[("accept-language", "de"), ("connection", "accept-language")],
    )
    .await;
    assert_eq!(attack.body, "lang=none", "the upstream did not see the header");
    assert!(!attack.cache.contains("stored"), "{}", attack.cache);
    let victim = get_with(&url, &[("accept-language", "de")]).await;
    assert_eq!(victim.body, "lang=de");
    // and the URL itself is still cached normally (not remembered as uncacheable)
    let again = get_with(&url, &[("accept-language", "de")]).await;
    assert!(again.cache.starts_with("corral; hit"), "{}", again.cache);
}

/// RFC 9111 §4.2.4: a cache MUST NOT serve stale unless allowed. With the default config an
/// expired entry is revalidated before it is served (no grace), and its waiting clients share
/// that one revalidation.
#[tokio::test]
async fn by_default_an_expired_entry_is_never_served_stale() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/exp", |s| {
        Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=1")
    });
    assert_eq!(get(&proxy.url("/exp")).await.body, "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get(&proxy.url("/exp")).await;
    assert_eq!(after.body, "v2", "not the stale v1: {}", after.cache);
    assert!(!after.cache.contains("ttl=-"), "{}", after.cache);
}

/// RFC 9111 §4.3.4: a 304 updates the stored header fields before the next client sees them,
/// with grace off (the client waits for the revalidation) and on (the next one after it).
#[tokio::test]
async fn a_304_updates_the_stored_headers_before_the_next_client_with_or_without_grace() {
    for grace in ["0s", "30s"] {
        let (origin, proxy) = setup(Conf::default().cache(&format!("grace = \"{grace}\""))).await;
        origin.route("/r", |s| {
            if s.n == 1 {
                Reply::ok("body")
                    .header("cache-control", "max-age=1")
                    .header("etag", "\"e1\"")
                    .header("x-version", "1")
            } else {
                Reply::ok("")
                    .status(304)
                    .header("cache-control", "max-age=60")
                    .header("etag", "\"e1\"")
                    .header("x-version", "2")
            }
        });
        let url = proxy.url("/r");
        assert_eq!(get(&url).await.headers["x-version"], "1");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let first = get(&url).await;
        assert_eq!(first.body, "body", "grace {grace}");
        if grace == "0s" {
            assert_eq!(
                first.headers["x-version"], "2",
                "grace 0: the revalidated headers"
            );
        }
        eventually(Duration::from_secs(5), "the 304 merged", || async {
            let got = get(&url).await;
            got.headers["x-version"] == "2" && got.cache.starts_with("corral; hit") && got.body == "body"
        })
        .await;
        assert_eq!(origin.hits("/r"), 2, "grace {grace}: one revalidation");
    }
}

/// RFC 9213: a targeted field (corral's own, then CDN-Cache-Control, then Surrogate-Control)
/// decides for corral instead of Cache-Control, and is not passed on to clients.
#[tokio::test]
async fn targeted_cache_control_decides_for_corral_and_is_stripped() {
    let (origin, proxy) = setup(Conf::default().cache("targeted_header = \"Corral-Cache-Control\"")).await;
    /// A path, the fields its response carries, whether corral stores it.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
    let routes: [Case; 5] = [
        // a fresh CDN-Cache-Control beats Cache-Control: no-store
        (
            "/cdn",
            &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")],
            true,
        ),
        // private there keeps it out, whatever Cache-Control says
        (
            "/cdn-private",
            &[("cache-control", "max-age=60"), ("cdn-cache-control", "private")],
            false,
        ),
        // corral's own field first
        (
            "/own",
            &[
                ("cache-control", "private"),
                ("cdn-cache-control", "no-store"),
                ("corral-cache-control", "max-age=60"),
            ],
            true,
        ),
        // Surrogate-Control: max-age, as Fastly and Akamai users send it
        (
            "/surrogate",
            &[
                ("cache-control", "no-cache, no-store"),
                ("surrogate-control", "max-age=60"),
            ],
            true,
        ),
        // no targeted field: Cache-Control as always
        ("/plain", &[("cache-control", "no-store")], false),
    ];
    for (path, headers, stored) in routes {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        origin.route(path, move |s| {
            let mut r = Reply::ok(format!("v{}", s.n));
            for (k, v) in &headers {
                r = r.header(k, v.clone());
            }
            r
        });
        let first = get(&proxy.url(path)).await;
        for name in ["cdn-cache-control", "surrogate-control", "corral-cache-control"] {
            assert!(
                first.headers.get(name).is_none(),
                "{path}: {name} passed to the client"
            );
        }
        let again = get(&proxy.url(path)).await;
        assert_eq!(
            again.cache.starts_with("corral; hit"),
            stored,
            "{path}: {}",
            again.cache
        );
        for name in ["cdn-cache-control", "surrogate-control", "corral-cache-control"] {
            assert!(
                again.headers.get(name).is_none(),
                "{path}: {name} passed on a hit"
            );
        }
    }
}
