//! The admin API of issue 15 against the real binary: `/stats`, `/keys`, `/stats/memcached`,
//! `/config`, `/readyz`, `POST /reload` (and SIGHUP), `/recent`, the new metrics, and which
//! endpoints check the `[purge]` allow-list and token.
//!
//! Spec sections (the admin API contract) and the tests that cover them:
//! - GET /stats: `stats_name_the_build_and_config_and_count_requests`
//! - GET /keys: `keys_lists_every_entry_once_across_pages_with_its_details`,
//!   `keys_filters_by_host_and_prefix_and_refuses_bad_parameters`
//! - Privileged endpoints (allow-list, token, open ones):
//!   `admin_endpoints_refuse_a_source_outside_the_allow_list`,
//!   `admin_endpoints_need_the_purge_token_when_one_is_set`
//! - GET /stats/memcached: `stats_memcached_reports_each_server_and_a_stopped_one_is_no_failure`,
//!   `stats_memcached_without_memcached_says_not_configured`
//! - GET /config: `config_shows_the_effective_file_with_secrets_redacted`
//! - GET /readyz: `readyz_follows_the_upstream`, `readyz_is_not_ready_when_every_memcached_is_down`
//! - POST /reload (and SIGHUP):
//!   `reload_under_traffic_applies_new_rules_and_allow_list_and_fails_no_request`,
//!   `an_invalid_file_is_refused_and_the_old_config_keeps_serving`,
//!   `a_changed_listen_address_needs_a_restart_and_the_old_one_keeps_serving`,
//!   `sighup_reloads_like_post_reload`
//! - GET /recent: `recent_lists_accepted_purges_newest_first`
//! - Metrics (corral_config_info, corral_build_info, process_*, corral_config_reloads_total):
//!   `metrics_name_the_config_the_build_and_count_reloads`
//! - GET / (the status page): not here, in tests/status_page.rs (headers and a browser)
//! - GET /peers, GET /bus (as before, now checked): in the two access tests

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SITE: &str = "www.site.test";

fn admin_url(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.admin)
}

async fn admin_get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    get_with(&admin_url(proxy, path), headers).await
}

async fn admin_post(proxy: &Proxy, path: &str, body: &str, headers: &[(&str, &str)]) -> Got {
    send(
        client().post(admin_url(proxy, path)).body(body.to_string()),
        headers,
    )
    .await
}

fn parse(got: &Got) -> Value {
    serde_json::from_str(&got.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", got.status, got.body))
}

/// GET an admin path from loopback without a token: it must answer 200 with JSON.
async fn admin_json(proxy: &Proxy, path: &str) -> Value {
    let got = admin_get(proxy, path, &[]).await;
    assert_eq!(got.status, 200, "{path}: {}", got.body);
    parse(&got)
}

async fn reload(proxy: &Proxy) -> Got {
    admin_post(proxy, "/reload", "", &[]).await
}

/// Replace `from` by `to` in the proxy's config file (`from` must be there).
fn rewrite(proxy: &Proxy, from: &str, to: &str) {
    let path = proxy.config_path();
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} in the config file:\n{text}");
    std::fs::write(path, text.replace(from, to)).unwrap();
}

/// A JSON array of strings.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s}"))
                .to_string()
        })
        .collect()
}

fn is_hash(h: &str) -> bool {
    h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit())
}

/// The `ttl=` of a `Cache-Status` value.
fn ttl_of(cache_status: &str) -> i64 {
    cache_status
        .split("; ")
        .find_map(|p| p.strip_prefix("ttl="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {cache_status:?}"))
}

fn cacheable(body: String) -> Reply {
    Reply::ok(body).header("cache-control", "max-age=60")
}

fn purge_method() -> reqwest::Method {
    reqwest::Method::from_bytes(b"PURGE").unwrap()
}

/// `/stats` names the build and the running config, and counts requests by cache outcome,
/// upstream requests by result and purges by result, next to the L1 fields it always had.
#[tokio::test]
async fn stats_name_the_build_and_config_and_count_requests() {
    let origin = Origin::start().await;
    origin.route("/s", |_| cacheable("stats".into()));
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    assert!(get(&proxy.url("/s")).await.cache.contains("fwd=miss"));
    assert!(get(&proxy.url("/s")).await.cache.starts_with("corral; hit"));
    eventually(Duration::from_secs(5), "the hit counted in /stats", || async {
        admin_json(&proxy, "/stats").await["requests"]["hit"].as_u64() == Some(1)
    })
    .await;
    let s = admin_json(&proxy, "/stats").await;
    assert_eq!(s["version"].as_str(), Some(env!("CARGO_PKG_VERSION")), "{s}");
    assert!(s["uptime_s"].as_u64().is_some_and(|u| u < 600), "{s}");
    assert!(
        s["config_hash"].as_str().is_some_and(is_hash),
        "16 hex digits: {s}"
    );
    assert_eq!(s["requests"]["miss"].as_u64(), Some(1), "{s}");
    assert_eq!(s["upstream"]["ok"].as_u64(), Some(1), "{s}");
    assert_eq!(s["upstream"]["error"].as_u64().unwrap_or(0), 0, "{s}");
    // the same counters as /metrics
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_requests_total{cache=\"hit\"}"), 1.0);
    assert_eq!(metric(&m, "corral_upstream_requests_total{result=\"ok\"}"), 1.0);
    // the old fields are kept
    assert_eq!(s["l1_entries"].as_u64(), Some(1), "{s}");
    assert!(s["l1_bytes"].as_u64().is_some_and(|b| b > 0), "{s}");
    assert_eq!(s["memory_bytes"].as_u64(), Some(256 << 20), "{s}");
    assert_eq!(s["l1_evicted"].as_u64(), Some(0), "{s}");
    // a purge is counted by result
    let purged = send(client().request(purge_method(), proxy.url("/s")), &[]).await;
    assert_eq!(purged.status, 200, "{}", purged.body);
    eventually(Duration::from_secs(5), "the purge counted in /stats", || async {
        admin_json(&proxy, "/stats").await["purges"]["ok"].as_u64() == Some(1)
    })
    .await;
}

async fn keys(proxy: &Proxy, query: &[(&str, &str)]) -> Got {
    send(client().get(admin_url(proxy, "/keys")).query(query), &[]).await
}

/// Every page of `/keys` with `limit`, following `next` until it is null: the entries and the
/// number of pages.
async fn all_keys(proxy: &Proxy, limit: usize) -> (Vec<Value>, usize) {
    let limit_text = limit.to_string();
    let mut cursor: Option<String> = None;
    let (mut all, mut pages) = (Vec::new(), 0);
    loop {
        let mut q = vec![("limit", limit_text.as_str())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let got = keys(proxy, &q).await;
        assert_eq!(got.status, 200, "page {pages}: {}", got.body);
        let page = parse(&got);
        let list = page["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("keys in {page}"))
            .clone();
        assert!(list.len() <= limit, "more than limit={limit}: {page}");
        all.extend(list);
        pages += 1;
        assert!(pages <= 50, "paging never ends");
        match &page["next"] {
            Value::Null => return (all, pages),
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("next is {other}"),
        }
    }
}

/// 25 URLs on two hosts (the key holds the host) and a Vary'd URL in two languages, in L1.
/// Returns the (host, path) of every entry, the Vary'd one twice.
async fn fill_keys(origin: &Origin, proxy: &Proxy) -> Vec<(String, String)> {
    let mut expected = Vec::new();
    for i in 0..25 {
        let host = if i < 13 { "a.test" } else { "b.test" };
        // a few with a query: the path includes it
        let path = if i % 5 == 0 {
            format!("/k/{i}?x={i}")
        } else {
            format!("/k/{i}")
        };
        let tagged = host == "a.test";
        origin.route(&path, move |_| {
            let r = cacheable(format!("body of key {i}"));
            if tagged {
                r.header("xkey", "tag-a")
            } else {
                r
            }
        });
        let g = get_with(&proxy.url(&path), &[("host", host)]).await;
        assert!(g.cache.contains("stored"), "{host}{path}: {}", g.cache);
        expected.push((host.to_string(), path));
    }
    origin.route("/vary", |s| {
        let lang = s
            .headers
            .get("accept-language")
            .map_or("none", |v| v.to_str().unwrap())
            .to_string();
        cacheable(format!("in {lang}")).header("vary", "Accept-Language")
    });
    for lang in ["en", "fr"] {
        let g = get_with(
            &proxy.url("/vary"),
            &[("host", "a.test"), ("accept-language", lang)],
        )
        .await;
        assert!(g.cache.contains("stored"), "/vary {lang}: {}", g.cache);
        expected.push(("a.test".to_string(), "/vary".to_string()));
    }
    expected.sort();
    expected
}

fn host_and_path(k: &Value) -> (String, String) {
    (
        k["host"]
            .as_str()
            .unwrap_or_else(|| panic!("host in {k}"))
            .to_string(),
        k["path"]
            .as_str()
            .unwrap_or_else(|| panic!("path in {k}"))
            .to_string(),
    )
}

/// Paging `/keys` 10 at a time lists every L1 entry exactly once (two Vary variants as two
/// entries with different variants), each with its URL, size, age, remaining ttl, tags and
/// hits.
#[tokio::test]
async fn keys_lists_every_entry_once_across_pages_with_its_details() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let expected = fill_keys(&origin, &proxy).await;
    assert_eq!(expected.len(), 27);
    let hot = "/k/0?x=0";
    for _ in 0..3 {
        let g = get_with(&proxy.url(hot), &[("host", "a.test")]).await;
        assert!(g.cache.starts_with("corral; hit"), "{}", g.cache);
    }
    eventually(Duration::from_secs(5), "the hits counted", || async {
        let got = keys(&proxy, &[("host", "a.test"), ("prefix", "/k/0")]).await;
        parse(&got)["keys"][0]["hits"].as_u64().is_some_and(|h| h >= 3)
    })
    .await;

    let (all, pages) = all_keys(&proxy, 10).await;
    assert_eq!(pages, 3, "27 entries, 10 a page");
    let mut seen: Vec<(String, String)> = all.iter().map(host_and_path).collect();
    seen.sort();
    assert_eq!(seen, expected, "every entry exactly once");
    let mut distinct: Vec<String> = all
        .iter()
        .map(|k| format!("{}|{}", k["url"], k["variant"]))
        .collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 27, "no entry twice");

    for k in &all {
        let (host, path) = host_and_path(k);
        assert_eq!(
            k["url"].as_str(),
            Some(format!("http://{host}{path}").as_str()),
            "{k}"
        );
        assert!(k["bytes"].as_u64().is_some_and(|b| b > 0), "{k}");
        assert!(
            k["ttl_s"].as_i64().is_some_and(|t| t > 0 && t <= 60),
            "max-age=60: {k}"
        );
        assert!(k["age_s"].as_u64().is_some_and(|a| a <= 60), "{k}");
        assert_eq!(k["stale"].as_bool(), Some(false), "{k}");
        let tags = if k["tags"].is_null() {
            Vec::new()
        } else {
            strings(&k["tags"])
        };
        if path.starts_with("/k/") {
            assert_eq!(tags.contains(&"tag-a".to_string()), host == "a.test", "{k}");
            assert!(k["variant"].is_null(), "no Vary: {k}");
        }
    }
    let variants: Vec<&Value> = all
        .iter()
        .filter(|k| k["path"].as_str() == Some("/vary"))
        .map(|k| &k["variant"])
        .collect();
    assert_eq!(variants.len(), 2);
    assert!(!variants[0].is_null() && !variants[1].is_null(), "{variants:?}");
    assert_ne!(variants[0], variants[1]);

    let hits = |path: &str| -> u64 {
        all.iter()
            .find(|k| k["path"].as_str() == Some(path))
            .and_then(|k| k["hits"].as_u64())
            .unwrap_or_else(|| panic!("hits of {path}"))
    };
    assert!(hits(hot) >= 3, "{}", hits(hot));
    assert_eq!(hits("/k/1"), 0, "never requested since its fill");
}

/// `/keys?host=` (case-insensitive) and `?prefix=` (of the path) filter, together too; a bad
/// limit or cursor, and `tier=l2` (not built: corral does not track its memcached keys), are 400.
#[tokio::test]
async fn keys_filters_by_host_and_prefix_and_refuses_bad_parameters() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let expected = fill_keys(&origin, &proxy).await;
    // (query, the host and the path prefix it selects)
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, Option<&'a str>);
    let cases: &[Case] = &[
        (&[("host", "A.TEST")], Some("a.test"), None),
        (&[("host", "b.test")], Some("b.test"), None),
        (&[("prefix", "/k/1")], None, Some("/k/1")),
        (
            &[("host", "b.test"), ("prefix", "/k/1")],
            Some("b.test"),
            Some("/k/1"),
        ),
        (&[("prefix", "/nothing")], None, Some("/nothing")),
    ];
    for (query, host, prefix) in cases {
        let got = keys(&proxy, query).await;
        assert_eq!(got.status, 200, "{query:?}: {}", got.body);
        let v = parse(&got);
        let mut listed: Vec<(String, String)> = v["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("keys in {v}"))
            .iter()
            .map(host_and_path)
            .collect();
        listed.sort();
        let want: Vec<(String, String)> = expected
            .iter()
            .filter(|(h, p)| host.is_none_or(|w| h == w) && prefix.is_none_or(|w| p.starts_with(w)))
            .cloned()
            .collect();
        assert_eq!(listed, want, "{query:?}");
        assert!(v["next"].is_null(), "one page under the default limit: {v}");
    }
    for (query, what) in [
        (vec![("limit", "0")], "limit=0"),
        (vec![("limit", "abc")], "limit=abc"),
        (vec![("cursor", "garbage")], "a cursor no page gave"),
        (vec![("tier", "l2")], "tier=l2 without track_keys"),
    ] {
        let got = keys(&proxy, &query).await;
        assert_eq!(got.status, 400, "{what}: {}", got.body);
        assert!(parse(&got)["error"].is_string(), "{what}: {}", got.body);
    }
    let l2 = keys(&proxy, &[("tier", "l2")]).await;
    assert!(l2.body.contains("tier=l2 is not available"), "{}", l2.body);
}

/// The checked admin endpoints and where they are answered.
const CHECKED_GETS: [&str; 5] = ["/keys", "/stats/memcached", "/config", "/peers", "/recent"];
const OPEN_GETS: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/stats", "/"];

/// From a source outside `purge.allow` every checked endpoint answers 403 `not allowed`
/// (GETs, `/events`, `POST /reload`), the purge endpoints 405 as purges on the proxy listener
/// do; `/healthz`, `/readyz`, `/metrics`, `/stats` and the page stay open.
#[tokio::test]
async fn admin_endpoints_refuse_a_source_outside_the_allow_list() {
    let origin = Origin::start().await;
    let conf = Conf::default().section("[purge]\nallow = [\"10.0.0.0/8\"]");
    let proxy = Proxy::start(origin.addr, conf).await;
    for path in CHECKED_GETS.iter().chain(&["/bus"]) {
        let got = admin_get(&proxy, path, &[]).await;
        assert_eq!(got.status, 403, "{path}: {}", got.body);
        assert_eq!(parse(&got)["error"].as_str(), Some("not allowed"), "{path}");
    }
    for (path, body, status) in [
        ("/reload", "", 403),
        ("/purge", "{\"urls\":[]}", 405),
        ("/purge/all", "", 405),
    ] {
        let got = admin_post(&proxy, path, body, &[]).await;
        assert_eq!(got.status, status, "POST {path}: {}", got.body);
        assert_eq!(parse(&got)["error"].as_str(), Some("not allowed"), "POST {path}");
    }
    // the status only: a stream that was let through would never end
    let events = client().get(admin_url(&proxy, "/events")).send().await.unwrap();
    assert_eq!(events.status().as_u16(), 403);
    drop(events);
    for path in OPEN_GETS {
        let got = admin_get(&proxy, path, &[]).await;
        assert_eq!(got.status, 200, "{path} is open: {}", got.body);
    }
}

/// With `purge.token` set, a checked endpoint needs `Authorization: Bearer <token>` (scheme in
/// any case) even from loopback; a missing or wrong token is 403; the open ones need none.
#[tokio::test]
async fn admin_endpoints_need_the_purge_token_when_one_is_set() {
    let origin = Origin::start().await;
    let conf = Conf::default().section("[purge]\ntoken = \"s3cret\"");
    let proxy = Proxy::start(origin.addr, conf).await;
    for path in CHECKED_GETS {
        for refused in [None, Some("Bearer wrong"), Some("Basic s3cret"), Some("s3cret")] {
            let headers: Vec<(&str, &str)> = refused.map(|a| ("authorization", a)).into_iter().collect();
            let got = admin_get(&proxy, path, &headers).await;
            assert_eq!(got.status, 403, "{path} with {refused:?}: {}", got.body);
            assert_eq!(parse(&got)["error"].as_str(), Some("not allowed"), "{path}");
        }
        for allowed in ["Bearer s3cret", "bearer  s3cret"] {
            let got = admin_get(&proxy, path, &[("authorization", allowed)]).await;
            assert_eq!(got.status, 200, "{path} with {allowed:?}: {}", got.body);
            parse(&got);
        }
    }
    let auth = [("authorization", "Bearer s3cret")];
    let peers = parse(&admin_get(&proxy, "/peers", &auth).await);
    assert!(peers["peers"].is_array(), "{peers}");
    // allowed, and then there is no [bus]
    assert_eq!(admin_get(&proxy, "/bus", &auth).await.status, 404);
    assert_eq!(admin_get(&proxy, "/bus", &[]).await.status, 403);
    let events = client().get(admin_url(&proxy, "/events")).send().await.unwrap();
    assert_eq!(events.status().as_u16(), 403);
    drop(events);
    let events = client()
        .get(admin_url(&proxy, "/events"))
        .header("authorization", "Bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    drop(events);
    assert_eq!(reload(&proxy).await.status, 403);
    let r = admin_post(&proxy, "/reload", "", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(parse(&r)["result"].as_str(), Some("unchanged"), "{}", r.body);
    for path in OPEN_GETS {
        let got = admin_get(&proxy, path, &[]).await;
        assert_eq!(got.status, 200, "{path} is open: {}", got.body);
    }
}

/// The entry of `addr` in a `/stats/memcached` answer.
fn server_entry(v: &Value, addr: std::net::SocketAddr) -> Value {
    let want = addr.to_string();
    v["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("servers in {v}"))
        .iter()
        .find(|s| s["server"].as_str() == Some(want.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{want} in {v}"))
}

/// `/stats/memcached` asks each server for its stats; a stopped server is reported
/// unreachable with the error, next to the live one's numbers, and the answer is still 200.
#[tokio::test]
async fn stats_memcached_reports_each_server_and_a_stopped_one_is_no_failure() {
    let up = Memcached::start().await;
    let mut down = Memcached::start().await;
    let origin = Origin::start().await;
    origin.route("/m", |_| cacheable("m".into()));
    let proxy = Proxy::start(origin.addr, Conf::default().servers(&[&up, &down])).await;
    let v = admin_json(&proxy, "/stats/memcached").await;
    assert_eq!(v["configured"].as_bool(), Some(true), "{v}");
    assert_eq!(v["servers"].as_array().map(Vec::len), Some(2), "{v}");
    for addr in [up.addr, down.addr] {
        assert_eq!(server_entry(&v, addr)["reachable"].as_bool(), Some(true), "{v}");
    }
    get(&proxy.url("/m")).await;
    eventually(Duration::from_secs(5), "the L2 write", || async {
        metric(
            &proxy.metrics().await,
            "corral_l2_requests_total{op=\"set\",result=\"ok\"}",
        ) >= 1.0
    })
    .await;
    down.stop();
    let down_addr = down.addr;
    eventually(Duration::from_secs(10), "the stopped server seen", || async {
        server_entry(&admin_json(&proxy, "/stats/memcached").await, down_addr)["reachable"].as_bool()
            == Some(false)
    })
    .await;
    let got = admin_get(&proxy, "/stats/memcached", &[]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let v = parse(&got);
    assert_eq!(v["configured"].as_bool(), Some(true), "{v}");
    let live = server_entry(&v, up.addr);
    assert_eq!(live["reachable"].as_bool(), Some(true), "{v}");
    assert_eq!(live["circuit"].as_str(), Some("closed"), "{v}");
    assert!(live["stats"]["uptime"].as_u64().is_some_and(|u| u > 0), "{v}");
    assert!(live["stats"]["curr_items"].as_u64().is_some(), "{v}");
    // the harness runs memcached with -m 64
    assert_eq!(live["stats"]["limit_maxbytes"].as_u64(), Some(64 << 20), "{v}");
    let gone = server_entry(&v, down_addr);
    assert!(gone["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert!(gone["circuit"].is_string(), "{v}");
    assert!(v["corral"].is_object(), "{v}");
}

/// Without `[memcached]`, `/stats/memcached` says so (200, not an error).
#[tokio::test]
async fn stats_memcached_without_memcached_says_not_configured() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let v = admin_json(&proxy, "/stats/memcached").await;
    assert_eq!(v["configured"].as_bool(), Some(false), "{v}");
    assert_eq!(v["servers"].as_array().map(Vec::len), Some(0), "{v}");
}

/// `/config` is the effective file: values as set, every default filled in, the secrets
/// (purge and peers tokens, the bus password) replaced by `<redacted>` and nowhere in the
/// body, empty ones left empty; with the file's path and the hash `/stats` shows.
#[tokio::test]
async fn config_shows_the_effective_file_with_secrets_redacted() {
    let origin = Origin::start().await;
    let conf = Conf::default()
        .cache("grace = \"3s\"")
        .peers("token = \"tok-peers-4712\"")
        .section("[purge]\ntoken = \"tok-purge-4711\"")
        // no broker there: corral starts anyway and keeps trying
        .section("[bus]\namqp_url = \"amqp://user:amqp-pw-4713@127.0.0.1:1/%2f\"");
    let proxy = Proxy::start(origin.addr, conf).await;
    let got = admin_get(&proxy, "/config", &[("authorization", "Bearer tok-purge-4711")]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    for secret in ["tok-purge-4711", "tok-peers-4712", "amqp-pw-4713"] {
        assert!(!got.body.contains(secret), "{secret} shown: {}", got.body);
    }
    let c = parse(&got);
    assert_eq!(c["purge"]["token"].as_str(), Some("<redacted>"), "{c}");
    assert_eq!(c["peers"]["token"].as_str(), Some("<redacted>"), "{c}");
    let amqp = c["bus"]["amqp_url"]
        .as_str()
        .unwrap_or_else(|| panic!("bus.amqp_url in {c}"));
    assert!(
        amqp.contains("<redacted>") && amqp.contains("127.0.0.1:1"),
        "{amqp}"
    );
    // as set
    assert_eq!(
        c["server"]["listen"].as_str(),
        Some(proxy.addr.to_string().as_str()),
        "{c}"
    );
    assert_eq!(
        c["upstream"]["address"].as_str(),
        Some(origin.addr.to_string().as_str()),
        "{c}"
    );
    // defaults the file never set
    assert!(!c["cache"]["default_ttl"].is_null(), "{c}");
    assert_ne!(
        c["cache"]["grace"], c["cache"]["default_ttl"],
        "3s is not 0s: {c}"
    );
    assert_eq!(c["cache"]["hit_for_miss_keys"].as_u64(), Some(16384), "{c}");
    assert_eq!(strings(&c["purge"]["allow"]), ["127.0.0.0/8", "::1/128"], "{c}");
    assert_eq!(c["memcached"]["namespace"].as_str(), Some("corral"), "{c}");
    // where it came from, and which it is
    assert_eq!(
        c["source"].as_str(),
        Some(proxy.config_path().to_str().unwrap()),
        "{c}"
    );
    assert!(c["hash"].as_str().is_some_and(is_hash), "{c}");
    let stats = admin_json(&proxy, "/stats").await;
    assert_eq!(c["hash"], stats["config_hash"]);

    // no secrets set: they stay empty, not "<redacted>"
    let plain = Proxy::start(origin.addr, Conf::default()).await;
    let c = admin_json(&plain, "/config").await;
    assert!(c["purge"]["token"].as_str().unwrap_or("").is_empty(), "{c}");
    assert!(c["peers"]["token"].as_str().unwrap_or("").is_empty(), "{c}");
    assert!(c["bus"]["amqp_url"].as_str().unwrap_or("").is_empty(), "{c}");
    assert_ne!(c["hash"], stats["config_hash"], "another file, another hash");
}

/// `/readyz` is 200 while the upstream accepts connections, 503 with the reason once it does
/// not (the check is cached about a second), and 200 again when it is back. Checks that are
/// not configured are absent.
#[tokio::test]
async fn readyz_follows_the_upstream() {
    let mut origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let got = admin_get(&proxy, "/readyz", &[]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let v = parse(&got);
    assert_eq!(v["ready"].as_bool(), Some(true), "{v}");
    assert_eq!(v["checks"]["upstream"]["ok"].as_bool(), Some(true), "{v}");
    for absent in ["memcached", "peers", "bus"] {
        assert!(v["checks"].get(absent).is_none(), "{absent} not configured: {v}");
    }
    origin.stop().await;
    eventually(
        Duration::from_secs(10),
        "not ready without the upstream",
        || async { admin_get(&proxy, "/readyz", &[]).await.status == 503 },
    )
    .await;
    let got = admin_get(&proxy, "/readyz", &[]).await;
    let v = parse(&got);
    assert_eq!(v["ready"].as_bool(), Some(false), "{v}");
    assert!(
        v["reason"].as_str().is_some_and(|r| r.contains("upstream")),
        "{v}"
    );
    assert_eq!(v["checks"]["upstream"]["ok"].as_bool(), Some(false), "{v}");
    origin.restart().await;
    eventually(Duration::from_secs(10), "ready again", || async {
        admin_get(&proxy, "/readyz", &[]).await.status == 200
    })
    .await;
}

/// With every memcached server down (circuits open after failed requests) `/readyz` is 503
/// and says memcached, though the upstream is fine.
#[tokio::test]
async fn readyz_is_not_ready_when_every_memcached_is_down() {
    let mut mc = Memcached::start().await;
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let v = admin_json(&proxy, "/readyz").await;
    assert_eq!(v["ready"].as_bool(), Some(true), "{v}");
    assert_eq!(v["checks"]["memcached"]["ok"].as_bool(), Some(true), "{v}");
    mc.stop();
    let admin = proxy.admin;
    let mut i = 0;
    eventually(Duration::from_secs(10), "not ready without memcached", || {
        // misses make L2 requests, which fail and open the circuit
        i += 1;
        let url = proxy.url(&format!("/rz/{i}"));
        async move {
            assert_eq!(get(&url).await.status, 200, "served without L2");
            get(&format!("http://{admin}/readyz")).await.status == 503
        }
    })
    .await;
    let got = admin_get(&proxy, "/readyz", &[]).await;
    assert_eq!(got.status, 503, "{}", got.body);
    let v = parse(&got);
    assert_eq!(v["ready"].as_bool(), Some(false), "{v}");
    assert!(
        v["reason"].as_str().is_some_and(|r| r.contains("memcached")),
        "{v}"
    );
    assert_eq!(v["checks"]["memcached"]["ok"].as_bool(), Some(false), "{v}");
    assert_eq!(v["checks"]["upstream"]["ok"].as_bool(), Some(true), "{v}");
}

/// `POST /reload` while 4 clients send 3000+ requests: a rule's ttl and the purge allow-list
/// change, the answer lists them, no request fails, the next fill uses the new ttl, and a
/// source the new allow-list leaves out can no longer purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_applies_new_rules_and_allow_list_and_fails_no_request() {
    let origin = Origin::start().await;
    let path_of = |i: usize| {
        if i.is_multiple_of(2) {
            format!("/r/{i}")
        } else {
            format!("/p/{i}")
        }
    };
    for i in 0..20 {
        origin.route(&path_of(i), move |_| {
            if i.is_multiple_of(2) {
                // no lifetime of its own: the rule's ttl decides
                Reply::ok(format!("r{i}"))
            } else {
                cacheable(format!("p{i}"))
            }
        });
    }
    for p in ["/r/before", "/r/after"] {
        origin.route(p, |_| Reply::ok("no lifetime"));
    }
    let conf = Conf::default()
        .rules("[[rule]]\npath_prefix = \"/r/\"\nttl = \"1s\"\n")
        .section("[purge]\nallow = [\"127.0.0.0/8\"]");
    let proxy = Proxy::start(origin.addr, conf).await;
    // 127.0.0.2 is loopback, in 127.0.0.0/8 and not in 127.0.0.1/32
    let outsider = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let purge = send(outsider.request(purge_method(), proxy.url("/p/1")), &[]).await;
    assert_eq!(purge.status, 200, "allowed before: {}", purge.body);
    let before = get(&proxy.url("/r/before")).await;
    assert!(before.cache.contains("stored"), "{}", before.cache);
    assert!(ttl_of(&before.cache) <= 1, "{}", before.cache);
    let old_hash = admin_json(&proxy, "/stats").await["config_hash"]
        .as_str()
        .unwrap()
        .to_string();

    let urls: Arc<Vec<String>> = Arc::new((0..20).map(|i| proxy.url(&path_of(i))).collect());
    let done = Arc::new(AtomicUsize::new(0));
    let reloaded = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4usize {
        let (urls, done, reloaded, c) = (urls.clone(), done.clone(), reloaded.clone(), client());
        tasks.push(tokio::spawn(async move {
            // 750 each, and at least 50 more once the reload has been answered
            let (mut n, mut after, mut failures) = (0usize, 0usize, Vec::new());
            while n < 750 || after < 50 {
                let url = &urls[(n * 4 + t) % urls.len()];
                let outcome = match c.get(url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match r.bytes().await {
                            Ok(_) => status.to_string(),
                            Err(e) => format!("{status}, then the body failed: {e}"),
                        }
                    }
                    Err(e) => e.to_string(),
                };
                if outcome != "200" {
                    failures.push(format!("{url}: {outcome}"));
                }
                if reloaded.load(Ordering::SeqCst) {
                    after += 1;
                }
                n += 1;
                done.fetch_add(1, Ordering::SeqCst);
            }
            (n, failures)
        }));
    }
    eventually(Duration::from_secs(60), "traffic under way", || async {
        done.load(Ordering::SeqCst) >= 400
    })
    .await;
    rewrite(&proxy, "ttl = \"1s\"", "ttl = \"60s\"");
    rewrite(&proxy, "allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.1/32\"]");
    let r = reload(&proxy).await;
    reloaded.store(true, Ordering::SeqCst);
    let at_reload = done.load(Ordering::SeqCst);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = parse(&r);
    assert_eq!(v["result"].as_str(), Some("ok"), "{v}");
    let changed = strings(&v["changed"]);
    assert!(changed.iter().any(|k| k.starts_with("rule")), "{v}");
    assert!(changed.iter().any(|k| k == "purge.allow"), "{v}");
    assert!(
        !changed
            .iter()
            .any(|k| k.starts_with("cache.") || k.starts_with("server.")),
        "only what changed: {v}"
    );
    assert!(strings(&v["needs_restart"]).is_empty(), "{v}");
    let new_hash = v["hash"].as_str().unwrap_or_else(|| panic!("hash in {v}"));
    assert!(is_hash(new_hash) && new_hash != old_hash, "{v}");

    let (mut total, mut failures) = (0, Vec::new());
    for task in tasks {
        let (n, f) = task.await.unwrap();
        total += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        total >= 3000 && total > at_reload,
        "{total} requests, {at_reload} before the reload"
    );

    assert_eq!(
        admin_json(&proxy, "/stats").await["config_hash"].as_str(),
        Some(new_hash)
    );
    // the new rule: a new fill is fresh for 60 s
    let after = get(&proxy.url("/r/after")).await;
    assert!(after.cache.contains("stored"), "{}", after.cache);
    assert!(ttl_of(&after.cache) >= 30, "the reloaded ttl: {}", after.cache);
    // the new allow-list: 127.0.0.2 is out, 127.0.0.1 still in
    let refused = send(outsider.request(purge_method(), proxy.url("/p/1")), &[]).await;
    assert_eq!(refused.status, 405, "{}", refused.body);
    let allowed = send(client().request(purge_method(), proxy.url("/p/1")), &[]).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
}

/// A file that does not validate is refused with the key and the reason; the old config keeps
/// serving and is what `/config` shows, and the refusal is counted. Reloading the old file
/// again is `unchanged`.
#[tokio::test]
async fn an_invalid_file_is_refused_and_the_old_config_keeps_serving() {
    let origin = Origin::start().await;
    origin.route("/still", |_| cacheable("still here".into()));
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"3s\"")).await;
    let before = admin_json(&proxy, "/config").await;
    let original = std::fs::read_to_string(proxy.config_path()).unwrap();
    rewrite(&proxy, "grace = \"3s\"", "grace = \"10x\"");
    let r = reload(&proxy).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v = parse(&r);
    assert_eq!(v["result"].as_str(), Some("invalid"), "{v}");
    let error = v["error"].as_str().unwrap_or_else(|| panic!("error in {v}"));
    assert!(error.contains("cache.grace"), "names the key: {error}");
    assert!(
        error.contains(proxy.config_path().to_str().unwrap()),
        "names the file: {error}"
    );

    let still = get(&proxy.url("/still")).await;
    assert_eq!((still.status, still.body.as_str()), (200, "still here"));
    let now = admin_json(&proxy, "/config").await;
    assert_eq!(now["cache"]["grace"], before["cache"]["grace"]);
    assert_eq!(now["hash"], before["hash"]);
    assert_eq!(admin_json(&proxy, "/stats").await["config_hash"], before["hash"]);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_config_reloads_total{result=\"invalid\"}"), 1.0);
    assert_eq!(metric(&m, "corral_config_reloads_total{result=\"ok\"}"), 0.0);

    std::fs::write(proxy.config_path(), original).unwrap();
    let r = reload(&proxy).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = parse(&r);
    assert_eq!(v["result"].as_str(), Some("unchanged"), "{v}");
    assert!(strings(&v["changed"]).is_empty(), "{v}");
    assert!(strings(&v["needs_restart"]).is_empty(), "{v}");
    assert_eq!(v["hash"], before["hash"], "{v}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_config_reloads_total{result=\"unchanged\"}"),
        1.0
    );
}

/// S3-FIFO's shards are sized at start for `max_object_bytes`: a reload may raise it as far as
/// a running shard keeps, not past that (every such object would be fetched and thrown away).
#[tokio::test]
async fn a_reload_cannot_lift_max_object_bytes_past_the_running_s3fifo_shards() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        origin.addr,
        Conf::default()
            .cache("memory_bytes = \"256MiB\"")
            .cache("max_object_bytes = \"8MiB\""),
    )
    .await;
    // four shards of 64 MiB: 40 MiB fits one
    rewrite(
        &proxy,
        "max_object_bytes = \"8MiB\"",
        "max_object_bytes = \"40MiB\"",
    );
    let r = reload(&proxy).await;
    assert_eq!(r.status, 200, "{}", r.body);
    rewrite(
        &proxy,
        "max_object_bytes = \"40MiB\"",
        "max_object_bytes = \"100MiB\"",
    );
    let r = reload(&proxy).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v = parse(&r);
    let error = v["error"].as_str().unwrap_or_else(|| panic!("error in {v}"));
    assert!(
        error.contains("cache.max_object_bytes") && error.contains("s3fifo") && error.contains("restart"),
        "{error}"
    );
    assert_eq!(
        admin_json(&proxy, "/config").await["cache"]["max_object_bytes"],
        40 << 20
    );
}

/// `cache.eviction` changes only at a restart and `max_object_bytes` at once: a file that
/// switches to lru cannot lift `max_object_bytes` past what the running TinyUFO can keep.
#[tokio::test]
async fn a_reload_cannot_lift_max_object_bytes_past_the_running_tinyufo() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        origin.addr,
        Conf::default()
            .cache("memory_bytes = \"1GiB\"")
            .cache("max_object_bytes = \"8MiB\"")
            .cache("eviction = \"tinyufo\""),
    )
    .await;
    rewrite(
        &proxy,
        "max_object_bytes = \"8MiB\"\neviction = \"tinyufo\"",
        "max_object_bytes = \"20MiB\"\neviction = \"lru\"",
    );
    let r = reload(&proxy).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v = parse(&r);
    let error = v["error"].as_str().unwrap_or_else(|| panic!("error in {v}"));
    assert!(
        error.contains("cache.max_object_bytes") && error.contains("tinyufo"),
        "{error}"
    );
    assert_eq!(
        admin_json(&proxy, "/config").await["cache"]["max_object_bytes"],
        8 << 20
    );
}

/// A new `server.listen` cannot be taken without a restart: the reload applies the rest,
/// says so in `needs_restart`, and the proxy keeps answering on the old address only.
#[tokio::test]
async fn a_changed_listen_address_needs_a_restart_and_the_old_one_keeps_serving() {
    let origin = Origin::start().await;
    origin.route("/here", |_| cacheable("here".into()));
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"3s\"")).await;
    let elsewhere: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    rewrite(
        &proxy,
        &format!("listen = \"{}\"", proxy.addr),
        &format!("listen = \"{elsewhere}\""),
    );
    rewrite(&proxy, "grace = \"3s\"", "grace = \"4s\"");
    let r = reload(&proxy).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = parse(&r);
    assert_eq!(v["result"].as_str(), Some("ok"), "{v}");
    assert!(
        strings(&v["needs_restart"]).contains(&"server.listen".to_string()),
        "{v}"
    );
    assert!(strings(&v["changed"]).contains(&"cache.grace".to_string()), "{v}");
    let here = get(&proxy.url("/here")).await;
    assert_eq!((here.status, here.body.as_str()), (200, "here"));
    assert!(
        tokio::net::TcpStream::connect(elsewhere).await.is_err(),
        "nothing listens on the new address before a restart"
    );
    // a later reload of something else does not forget what waits for the restart
    rewrite(&proxy, "grace = \"4s\"", "grace = \"5s\"");
    let v = parse(&reload(&proxy).await);
    assert_eq!(strings(&v["changed"]), vec!["cache.grace".to_string()], "{v}");
    assert_eq!(
        strings(&v["needs_restart"]),
        vec!["server.listen".to_string()],
        "{v}"
    );
    let c = admin_json(&proxy, "/config").await;
    assert_eq!(
        strings(&c["needs_restart"]),
        vec!["server.listen".to_string()],
        "{c}"
    );
    // nor does a file that does not validate
    rewrite(&proxy, "grace = \"5s\"", "grace = \"5x\"");
    let v = parse(&reload(&proxy).await);
    assert_eq!(v["result"].as_str(), Some("invalid"), "{v}");
    assert_eq!(
        strings(&v["needs_restart"]),
        vec!["server.listen".to_string()],
        "{v}"
    );
}

/// Send SIGHUP to `pid`.
fn sighup(pid: u32) {
    let sent = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill -HUP {pid}");
}

/// An admin JSON answer, or None while it cannot be had (for `eventually`).
async fn try_json(url: String) -> Option<Value> {
    let resp = client().get(url).send().await.ok()?;
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

/// SIGHUP re-reads the file like `POST /reload`: the process goes on, with the new values.
#[tokio::test]
async fn sighup_reloads_like_post_reload() {
    let origin = Origin::start().await;
    origin.route("/hup", |_| cacheable("hup".into()));
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"3s\"")).await;
    let before = admin_json(&proxy, "/config").await;
    rewrite(&proxy, "grace = \"3s\"", "grace = \"7s\"");
    sighup(proxy.pid());
    let url = admin_url(&proxy, "/config");
    eventually(Duration::from_secs(10), "the SIGHUP reload", || async {
        try_json(url.clone())
            .await
            .is_some_and(|c| c["hash"] != before["hash"] && c["cache"]["grace"] != before["cache"]["grace"])
    })
    .await;
    let now = admin_json(&proxy, "/config").await;
    assert_eq!(admin_json(&proxy, "/stats").await["config_hash"], now["hash"]);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_config_reloads_total{result=\"ok\"}"), 1.0);
    let still = get(&proxy.url("/hup")).await;
    assert_eq!((still.status, still.body.as_str()), (200, "hup"), "still running");
}

/// `/recent` lists accepted purges newest first, each with its kind, target, count and source.
#[tokio::test]
async fn recent_lists_accepted_purges_newest_first() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    for p in ["/recent/one", "/recent/two"] {
        origin.route(p, move |_| cacheable(format!("page {p}")));
        get_with(&proxy.url(p), &[("host", SITE)]).await;
        let hit = get_with(&proxy.url(p), &[("host", SITE)]).await;
        assert!(hit.cache.starts_with("corral; hit"), "{p}: {}", hit.cache);
    }
    for p in ["/recent/one", "/recent/two"] {
        let r = send(client().request(purge_method(), proxy.url(p)), &[("host", SITE)]).await;
        assert_eq!(r.status, 200, "{p}: {}", r.body);
    }
    eventually(Duration::from_secs(5), "the purges in /recent", || async {
        admin_json(&proxy, "/recent").await["events"][0]["target"]
            .as_str()
            .is_some_and(|t| t.contains("/recent/two"))
    })
    .await;
    let v = admin_json(&proxy, "/recent").await;
    let events = v["events"].as_array().unwrap_or_else(|| panic!("events in {v}"));
    assert!(events.len() >= 2, "{v}");
    let (newest, older) = (&events[0], &events[1]);
    assert_eq!(newest["event"].as_str(), Some("purge"), "{v}");
    assert_eq!(newest["kind"].as_str(), Some("url"), "{v}");
    assert_eq!(newest["purged"].as_u64(), Some(1), "{v}");
    assert_eq!(newest["soft"].as_bool(), Some(false), "{v}");
    assert_eq!(newest["source"].as_str(), Some("local"), "{v}");
    assert!(
        older["target"]
            .as_str()
            .is_some_and(|t| t.contains("/recent/one")),
        "{v}"
    );
    assert_eq!(older["purged"].as_u64(), Some(1), "{v}");
    let at = |e: &Value| e["at_ms"].as_u64().unwrap_or_else(|| panic!("at_ms in {e}"));
    assert!(at(newest) >= at(older), "{v}");
    assert!(at(newest) > 1_600_000_000_000, "milliseconds since 1970: {v}");
}

/// `/metrics` carries the running config's hash and the build, process metrics, and counts
/// reloads; after a reload only the new hash is 1.
#[tokio::test]
async fn metrics_name_the_config_the_build_and_count_reloads() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"3s\"")).await;
    let hash = admin_json(&proxy, "/stats").await["config_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let info = |h: &str| format!("corral_config_info{{hash=\"{h}\"}}");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, &info(&hash)), 1.0, "{m}");
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        m.lines()
            .any(|l| l.starts_with("corral_build_info{") && l.contains(&version) && l.ends_with(" 1")),
        "{m}"
    );
    assert!(metric(&m, "process_resident_memory_bytes") > 0.0, "{m}");

    rewrite(&proxy, "grace = \"3s\"", "grace = \"5s\"");
    let r = reload(&proxy).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let new_hash = parse(&r)["hash"].as_str().unwrap().to_string();
    assert_ne!(new_hash, hash);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "corral_config_reloads_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, &info(&new_hash)), 1.0, "{m}");
    assert_eq!(metric(&m, &info(&hash)), 0.0, "the old hash is gone: {m}");
}

/// The series an operator reaches for first in an incident: upstream time to first byte,
/// lock waits (a slow fill that ten clients wait for: one fetch, nine collapsed waits),
/// memcached per server (requests, op latency, whether it is used: 0 once it is stopped).
#[tokio::test]
async fn metrics_show_upstream_latency_lock_waits_and_each_memcached_server() {
    let origin = Origin::start().await;
    origin.route("/slow", |_| {
        cacheable("slow".into()).delay(Duration::from_millis(300))
    });
    let mut mc = Memcached::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    let url = proxy.url("/slow");
    let clients: Vec<_> = (0..10).map(|_| get(&url)).collect();
    for got in futures::future::join_all(clients).await {
        assert_eq!(got.body, "slow");
    }
    assert_eq!(origin.hits("/slow"), 1);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_upstream_first_byte_seconds_count"), 1.0, "{m}");
    assert!(metric(&m, "corral_upstream_first_byte_seconds_sum") >= 0.3, "{m}");
    // each of the nine waited at least once (in this corral's gate, then perhaps for the
    // lease the first one holds in memcached), and every wait ended with the value
    let waits = metric(&m, "corral_lock_waits_total{result=\"collapsed\"}");
    assert!((9.0..=18.0).contains(&waits), "{m}");
    assert_eq!(
        metric(&m, "corral_lock_waits_total{result=\"timeout\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "corral_lock_wait_seconds_count"), waits, "{m}");
    assert!(metric(&m, "corral_lock_wait_seconds_sum") > 0.0, "{m}");
    let server = format!("server=\"{}\"", mc.addr);
    let series = |name: &str, extra: &str| format!("{name}{{{extra}{server}}}");
    assert!(
        metric(&m, &series("corral_l2_server_requests_total", "result=\"ok\",")) > 0.0,
        "{m}"
    );
    assert!(
        metric(&m, "corral_l2_op_duration_seconds_count{op=\"get\"}") > 0.0,
        "{m}"
    );
    assert_eq!(metric(&m, &series("corral_l2_server_up", "")), 1.0, "{m}");
    mc.stop();
    eventually(
        Duration::from_secs(10),
        "the stopped server is marked down",
        || async {
            get(&proxy.url(&format!("/down/{}", rand_suffix()))).await;
            metric(&proxy.metrics().await, &series("corral_l2_server_up", "")) == 0.0
        },
    )
    .await;
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `log.format = "json"`: one object a line; an access line has the fields log shippers
/// expect at the top level.
#[tokio::test]
async fn json_logs_carry_the_access_fields_at_the_top_level() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().log("format = \"json\"")).await;
    get(&proxy.url("/j")).await;
    eventually(Duration::from_secs(5), "the access line", || async {
        proxy.log_text().contains("corral::access")
    })
    .await;
    let log = proxy.log_text();
    let line = log.lines().find(|l| l.contains("corral::access")).unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["method"], "GET", "{line}");
    assert_eq!(v["path"], "/j", "{line}");
    assert_eq!(v["status"], 200, "{line}");
    assert_eq!(v["cache"], "miss", "{line}");
    assert_eq!(v["client"], "127.0.0.1", "{line}");
    assert!(
        v["duration_ms"].as_f64().is_some() && v["upstream_ms"].as_f64().is_some(),
        "{line}"
    );
    assert!(
        v["host"].as_str().is_some_and(|h| h.starts_with("127.0.0.1")),
        "{line}"
    );
    // every line of the log is JSON, the start-up lines too
    for l in log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}

/// A live scrape, with every family carrying series (a miss, hits, a purge, memcached, a
/// reload), passes `promtool check metrics` (Debian's `prometheus` package; `./x test`
/// installs it): names, types, HELP, units and counter suffixes as Prometheus lints them.
#[tokio::test]
async fn a_live_scrape_passes_promtool() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("promtool is missing: install Debian's prometheus package, or run ./x test");
    let origin = Origin::start().await;
    let mc = Memcached::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().servers(&[&mc])).await;
    for _ in 0..3 {
        get(&proxy.url("/scrape")).await;
    }
    let m = reqwest::Method::from_bytes(b"PURGE").unwrap();
    send(client().request(m, proxy.url("/scrape")), &[]).await;
    assert_eq!(reload(&proxy).await.status, 200);
    let scrape = proxy.metrics().await;
    assert!(scrape.contains("corral_l2_server_up{"), "{scrape}");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}");
}

/// A SIGHUP that arrives before the reload service listens (right after a start) does not
/// end the process: its default action would. `main` installs the handler first thing; the
/// signal is sent as soon as the process shows a SIGHUP handler (`SigCgt` in
/// /proc/PID/status), which is normally long before the server runs. (Sent right after the
/// spawn, it could land before `main` starts at all: no process can catch that.)
#[tokio::test]
async fn a_sighup_right_after_the_start_is_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin = \"127.0.0.1:{admin}\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(corral_bin())
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let catches_hup = || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & 1 == 1)
    };
    let started = std::time::Instant::now();
    while !catches_hup() {
        assert!(started.elapsed() < Duration::from_secs(10), "no SIGHUP handler");
        std::thread::sleep(Duration::from_millis(1));
    }
    sighup(child.id());
    let url = format!("http://127.0.0.1:{admin}/healthz");
    eventually(Duration::from_secs(10), "corral up after the SIGHUP", || async {
        client().get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "corral ended");
    let _ = child.kill();
    let _ = child.wait();
}

/// An upstream address that does not resolve refuses the reload (Pingora's peer would panic on
/// it), by POST and by SIGHUP alike; the old config keeps serving, and a later reload works.
#[tokio::test]
async fn a_reload_to_an_upstream_that_does_not_resolve_is_refused() {
    let origin = Origin::start().await;
    origin.route("/u", |_| cacheable("u".into()));
    let proxy = Proxy::start(origin.addr, Conf::default().cache("grace = \"3s\"")).await;
    let before = admin_json(&proxy, "/config").await["hash"].clone();
    let address = format!("address = \"{}\"", origin.addr);
    rewrite(&proxy, &address, "address = \"nope.invalid:80\"");
    let r = reload(&proxy).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("upstream.address"), "{}", r.body);
    // one at a time: two signals sent before the first is handled arrive as one
    for refused in [2.0, 3.0] {
        sighup(proxy.pid());
        eventually(Duration::from_secs(10), "the SIGHUP reloads refused", || async {
            metric(
                &proxy.metrics().await,
                "corral_config_reloads_total{result=\"invalid\"}",
            ) >= refused
        })
        .await;
    }
    let m = proxy.metrics().await;
    assert!(m.contains("corral_config_reloads_total"), "{m}");
    assert_eq!(admin_json(&proxy, "/config").await["hash"], before);
    assert_eq!(get(&proxy.url("/u")).await.body, "u");
    // the SIGHUP listener is still there
    rewrite(&proxy, "address = \"nope.invalid:80\"", &address);
    rewrite(&proxy, "grace = \"3s\"", "grace = \"6s\"");
    sighup(proxy.pid());
    let url = admin_url(&proxy, "/config");
    eventually(Duration::from_secs(10), "a later SIGHUP reload", || async {
        try_json(url.clone())
            .await
            .is_some_and(|c| c["cache"]["grace"] == "6s")
    })
    .await;
}

/// `cache.trim_allocator` changes only at a restart: a reload that turns it off says so, and
/// the trimmer that runs keeps running.
#[tokio::test]
async fn turning_the_allocator_trim_off_needs_a_restart() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().cache("trim_allocator = true")).await;
    rewrite(&proxy, "trim_allocator = true", "trim_allocator = false");
    let v = parse(&reload(&proxy).await);
    assert_eq!(v["result"].as_str(), Some("ok"), "{v}");
    assert_eq!(
        strings(&v["needs_restart"]),
        vec!["cache.trim_allocator".to_string()],
        "{v}"
    );
    // the trimmer that started keeps running: nothing said it stopped, its series is there
    assert!(
        proxy.log_text().contains("allocator trim on"),
        "{}",
        proxy.log_text()
    );
    assert!(!proxy.log_text().contains("allocator trim off"));
    assert!(proxy
        .metrics()
        .await
        .contains("corral_allocator_trim_duration_seconds_count"));
}

/// A reload that changes only settings that need a restart still shows the file it read
/// (`/config`, `/stats` and `corral_config_info` agree, one series), and putting the old file
/// back clears `needs_restart`.
#[tokio::test]
async fn a_restart_only_change_is_shown_consistently_and_undone_by_the_old_file() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default()).await;
    let hashes = |m: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.starts_with("corral_config_info{") && l.ends_with(" 1"))
            .map(|l| l.to_string())
            .collect()
    };
    for threads in ["3", "4"] {
        let from = if threads == "3" {
            "threads = 2"
        } else {
            "threads = 3"
        };
        rewrite(&proxy, from, &format!("threads = {threads}"));
        let v = parse(&reload(&proxy).await);
        assert_eq!(v["result"].as_str(), Some("ok"), "{v}");
        assert_eq!(
            strings(&v["needs_restart"]),
            vec!["server.threads".to_string()],
            "{v}"
        );
        let hash = v["hash"].as_str().unwrap().to_string();
        assert_eq!(
            admin_json(&proxy, "/config").await["hash"].as_str(),
            Some(hash.as_str())
        );
        assert_eq!(
            admin_json(&proxy, "/stats").await["config_hash"].as_str(),
            Some(hash.as_str())
        );
        let m = proxy.metrics().await;
        assert_eq!(
            hashes(&m),
            vec![format!("corral_config_info{{hash=\"{hash}\"}} 1")],
            "{m}"
        );
    }
    rewrite(&proxy, "threads = 4", "threads = 2");
    let v = parse(&reload(&proxy).await);
    assert_eq!(v["result"].as_str(), Some("ok"), "{v}");
    assert!(strings(&v["needs_restart"]).is_empty(), "{v}");
    assert!(strings(&admin_json(&proxy, "/config").await["needs_restart"]).is_empty());
}

/// The admin listener answers only under an address, `localhost` or a name in
/// `server.admin_hosts` (a page that rebinds its own name to 127.0.0.1 is refused), and a
/// request a browser marks with a foreign `Origin` is refused (no cross-site POST /reload).
#[tokio::test]
async fn the_admin_listener_refuses_foreign_hosts_and_origins() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        origin.addr,
        Conf::default().server("admin_hosts = [\"corral-admin.internal\"]"),
    )
    .await;
    let port = proxy.admin.port();
    for (host, status) in [
        (format!("evil.example:{port}"), 403),
        ("evil.example".to_string(), 403),
        (format!("corral-admin.internal:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let got = admin_get(&proxy, "/config", &[("host", host.as_str())]).await;
        assert_eq!(got.status, status, "Host {host}: {}", got.body);
    }
    let own = format!("http://127.0.0.1:{port}");
    for (from, status) in [("http://evil.example", 403), (own.as_str(), 200)] {
        let got = admin_post(&proxy, "/reload", "", &[("origin", from)]).await;
        assert_eq!(got.status, status, "Origin {from}: {}", got.body);
    }
    let refused = admin_post(&proxy, "/purge/all", "", &[("origin", "http://evil.example")]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
}
