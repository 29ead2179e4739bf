//! Hostile clients and a hung origin, against the real binary with raw sockets: a Host that
//! tries to poison another URL, connections that stay silent, an origin that never answers.
//! See: issue 8.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cacheable(body: &str) -> Reply {
    Reply::ok(body.to_string()).header("cache-control", "max-age=60")
}

async fn setup(conf: Conf) -> (Origin, Proxy) {
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, conf).await;
    (origin, proxy)
}

/// Send `request` on a new connection and read until the proxy closes it (at most 10 s).
async fn raw(proxy: &Proxy, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    String::from_utf8_lossy(&got).to_string()
}

/// One whole response (head and a `Content-Length` body) read from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "closed mid-response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Open `n` idle connections to the proxy and wait until it counts them.
async fn idle_connections(proxy: &Proxy, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::new();
    for _ in 0..n {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    eventually(Duration::from_secs(5), "the connections counted", || async {
        metric(&proxy.metrics().await, "corral_connections") >= n as f64
    })
    .await;
    idle
}

/// How long until the proxy closes `s` (reads and drops whatever it sends), at most `limit`.
async fn closed_after(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn a_host_with_a_slash_is_refused_and_poisons_no_other_url() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/x", |_| cacheable("attacker's page"));
    origin.route("/evil/x", |_| cacheable("the real /evil/x"));
    for host in [
        "victim.test/evil",
        "victim.test?a",
        "victim.test#a",
        "user@victim.test",
        "victim test",
    ] {
        let answer = raw(
            &proxy,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
    }
    assert_eq!(origin.hits("/x"), 0, "a refused request never reaches the origin");
    let real = get_with(&proxy.url("/evil/x"), &[("host", "victim.test")]).await;
    assert_eq!(real.body, "the real /evil/x");
    assert!(real.cache.contains("fwd=miss"), "{}", real.cache);
    let m = proxy.metrics().await;
    // Pingora refuses the userinfo form itself, before any of corral's filters
    assert_eq!(metric(&m, "corral_requests_total{cache=\"refused\"}"), 4.0, "{m}");
}

#[tokio::test]
async fn two_hosts_or_none_are_refused() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/two", |_| cacheable("x"));
    let two = raw(
        &proxy,
        b"GET /two HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    let none = raw(&proxy, b"GET /two HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    assert_eq!(origin.hits("/two"), 0);
}

/// Over h2c, a `host` field without `:authority` is what names the site: it is checked the
/// same way.
#[tokio::test]
async fn an_h2c_host_with_a_slash_is_refused() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/x", |_| cacheable("attacker's page"));
    origin.route("/evil/x", |_| cacheable("the real /evil/x"));
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    async fn status(h2: &h2::client::SendRequest<bytes::Bytes>, host: &str, path: &str) -> u16 {
        // no scheme and no authority in the URI: the request carries only `host`
        let req = http::Request::builder()
            .uri(path)
            .header("host", host)
            .body(())
            .unwrap();
        let mut h2 = h2.clone().ready().await.unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        resp.await.unwrap().status().as_u16()
    }
    assert_eq!(status(&h2, "victim.test/evil", "/x").await, 400);
    assert_eq!(origin.hits("/x"), 0);
    assert_eq!(status(&h2, "victim.test", "/evil/x").await, 200);
}

#[tokio::test]
async fn a_trailing_dot_host_is_the_same_site_and_one_purge_covers_both() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/dot", |s| cacheable(&format!("v{}", s.n)));
    let first = get_with(&proxy.url("/dot"), &[("host", "site.test.")]).await;
    assert!(first.cache.contains("fwd=miss"), "{}", first.cache);
    let second = get_with(&proxy.url("/dot"), &[("host", "Site.Test")]).await;
    assert!(second.cache.contains("hit"), "{}", second.cache);
    assert_eq!(second.body, first.body);
    let purged = send(
        client().request("PURGE".parse().unwrap(), proxy.url("/dot")),
        &[("host", "site.test.")],
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.body);
    let after = get_with(&proxy.url("/dot"), &[("host", "site.test")]).await;
    assert!(after.cache.contains("fwd=miss"), "{}", after.cache);
    assert_eq!(origin.hits("/dot"), 2);
}

/// The origin is asked for the host the key was made of, so a spelling of it (`Site.Test.`)
/// cannot make the origin answer for another virtual host under this site's key.
#[tokio::test]
async fn the_origin_gets_the_normalised_host() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/which", |s| {
        let host = s.headers.get("host").map(|h| h.to_str().unwrap().to_string());
        cacheable(&format!("{host:?}"))
    });
    let got = get_with(&proxy.url("/which"), &[("host", "Site.Test.")]).await;
    assert_eq!(got.body, "Some(\"site.test\")");
    // an absolute-form target without Host: the origin gets the normalised host too
    let answer = raw(
        &proxy,
        b"GET http://Other.Test./which HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.ends_with("Some(\"other.test\")"), "{answer}");
}

/// HTTP/1.0 without keep-alive: corral answers and closes, as the client expects.
#[tokio::test]
async fn an_http10_request_gets_its_connection_closed() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/ten", |_| cacheable("ten"));
    let start = Instant::now();
    let answer = raw(&proxy, b"GET /ten HTTP/1.0\r\nHost: h\r\n\r\n").await;
    assert!(answer.ends_with("ten"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_header_timeout() {
    let (_origin, proxy) = setup(Conf::default().server("header_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let took = closed_after(&mut s, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "corral_connection_timeouts_total{kind=\"header\"}") >= 1.0,
        "{m}"
    );
}

/// A head trickled a byte at a time keeps each read under any per-read timeout: the whole
/// head has `header_timeout`.
#[tokio::test]
async fn a_trickled_request_head_is_cut_at_header_timeout() {
    let (origin, proxy) = setup(Conf::default().server("header_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n").await.unwrap();
    let start = Instant::now();
    let mut closed = false;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(format!("X-{i}: y\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(0)) | Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after 4 s of trickling");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_eq!(origin.hits("/slow"), 0);
}

#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_keepalive_timeout() {
    let (origin, proxy) = setup(Conf::default().server("keepalive_timeout = \"1s\"")).await;
    origin.route("/ka", |_| cacheable("ka"));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        // two requests on the connection, each answered: keep-alive works
        s.write_all(b"GET /ka HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
        let text = read_response(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ka"), "{text}");
    }
    let took = closed_after(&mut s, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// Each request on a keep-alive connection has its own `header_timeout`: a connection that
/// lives longer than it, with requests in time, is never cut.
#[tokio::test]
async fn a_keepalive_connection_outlives_header_timeout() {
    let (origin, proxy) = setup(Conf::default().server("header_timeout = \"1s\"")).await;
    origin.route("/long", |_| cacheable("long"));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..4 {
        s.write_all(b"GET /long HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let text = read_response(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("long"),
            "{text}"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

/// On a keep-alive connection, a later request that takes longer than `header_timeout` at
/// the origin still gets its answer: the head deadline ends with the head.
#[tokio::test]
async fn a_slow_second_request_on_a_keepalive_connection_is_answered() {
    let (origin, proxy) = setup(Conf::default().server("header_timeout = \"1s\"")).await;
    origin.route("/fast", |_| cacheable("fast"));
    origin.route("/slow2", |_| cacheable("slow").delay(Duration::from_millis(2500)));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s).await.ends_with("fast"));
    s.write_all(b"GET /slow2 HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("slow"),
        "{text}"
    );
}

/// A request in progress has no head deadline: an origin slower than `header_timeout` and
/// `keepalive_timeout` still gets its answer through.
#[tokio::test]
async fn a_slow_response_outlives_the_client_timeouts() {
    let (origin, proxy) = setup(
        Conf::default()
            .server("header_timeout = \"1s\"")
            .server("keepalive_timeout = \"1s\""),
    )
    .await;
    origin.route("/slowpage", |_| {
        cacheable("late").delay(Duration::from_millis(2500))
    });
    let got = get(&proxy.url("/slowpage")).await;
    assert_eq!((got.status, got.body.as_str()), (200, "late"));
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed() {
    let (_origin, proxy) = setup(Conf::default().server("keepalive_timeout = \"1s\"")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // the HTTP/2 preface and an empty SETTINGS frame, then nothing
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let took = closed_after(&mut s, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_are_closed() {
    // idle connections are not cut by header_timeout while the test runs
    let (origin, proxy) = setup(
        Conf::default()
            .server("max_connections = 20")
            .server("header_timeout = \"60s\""),
    )
    .await;
    origin.route("/cap", |_| cacheable("cap"));
    let mut idle = idle_connections(&proxy, 20).await;
    let refused = raw(&proxy, b"GET /cap HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("Retry-After: 1"), "{refused}");
    assert_eq!(origin.hits("/cap"), 0);
    idle.truncate(10);
    eventually(
        Duration::from_secs(5),
        "closed connections leave the count",
        || async { metric(&proxy.metrics().await, "corral_connections") <= 10.0 },
    )
    .await;
    let ok = get(&proxy.url("/cap")).await;
    assert_eq!(ok.status, 200);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_connections_refused_total"), 1.0, "{m}");
}

/// Started with a soft limit of open files below the hard one, corral raises it; with a
/// low hard limit, it lowers `max_connections` to fit, so a flood of idle connections gets
/// 503s instead of taking every descriptor.
#[tokio::test]
async fn the_open_files_limit_is_raised_and_the_cap_fits_it() {
    let origin = Origin::start().await;
    origin.route("/fd", |_| cacheable("fd"));
    // the harness runs corral through this wrapper: soft 64, hard 200
    let proxy = Proxy::start_wrapped(
        origin.addr,
        Conf::default()
            .upstream("max_connections = 16")
            .server("header_timeout = \"60s\""),
        "ulimit -Sn 64 && ulimit -Hn 200 && exec \"$0\" \"$@\"",
    )
    .await;
    let log = proxy.log_text();
    assert!(log.contains("nofile=200"), "{log}");
    // 200 - 16 upstream - 64 spare
    assert!(log.contains("max_connections=120"), "{log}");
    let idle = idle_connections(&proxy, 120).await;
    let refused = raw(&proxy, b"GET /fd HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    drop(idle);
    // the server sees the idle connections close a moment later: until then a new one still
    // gets the 503, written at once (a client library takes that for a broken connection)
    eventually(Duration::from_secs(5), "served again", || async {
        let Ok(mut s) = TcpStream::connect(proxy.addr).await else {
            return false;
        };
        let request = b"GET /fd HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        if s.write_all(request).await.is_err() {
            return false;
        }
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        got.starts_with(b"HTTP/1.1 200")
    })
    .await;
    assert_eq!(get(&proxy.url("/fd")).await.status, 200);
}

#[tokio::test]
async fn a_hung_origin_gets_504_after_first_byte_timeout() {
    let (origin, proxy) = setup(
        Conf::default()
            .upstream("first_byte_timeout = \"1s\"")
            .upstream("read_timeout = \"30s\""),
    )
    .await;
    origin.route("/hang", |_| cacheable("never").delay(Duration::from_secs(20)));
    let start = Instant::now();
    let got = get(&proxy.url("/hang")).await;
    assert_eq!(got.status, 504, "{got:?}");
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_stale_copy_is_served_as_soon_as_the_first_byte_timeout_fires() {
    let (origin, proxy) = setup(
        Conf::default()
            .cache("grace = \"0s\"")
            .cache("stale_if_error = \"5m\"")
            .upstream("first_byte_timeout = \"1s\"")
            .upstream("read_timeout = \"30s\""),
    )
    .await;
    origin.route("/sie", |s| {
        let r = Reply::ok(format!("v{}", s.n)).header("cache-control", "max-age=1");
        if s.n == 1 {
            r
        } else {
            r.delay(Duration::from_secs(20))
        }
    });
    assert_eq!(get(&proxy.url("/sie")).await.body, "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await; // max-age=1 runs out
    let start = Instant::now();
    let stale = get(&proxy.url("/sie")).await;
    assert_eq!((stale.status, stale.body.as_str()), (200, "v1"), "{stale:?}");
    // RFC 9211: a hit with a negative ttl is a stale copy
    assert!(stale.cache.starts_with("corral; hit; ttl=-"), "{}", stale.cache);
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
}

/// A sick origin gets at most `upstream.max_connections` requests at once; the queue in front
/// of them is bounded in length and in time; everything past it gets 503 with Retry-After.
#[tokio::test]
async fn upstream_connections_are_capped_and_the_queue_is_bounded() {
    let (origin, proxy) = setup(
        Conf::default()
            .upstream("max_connections = 2")
            .upstream("max_queue = 2")
            .upstream("queue_timeout = \"500ms\""),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        origin.route(&format!("/busy/{i}"), |_| {
            Reply::ok("slow")
                .header("cache-control", "no-store")
                .delay(Duration::from_secs(2))
        });
        let url = proxy.url(&format!("/busy/{i}"));
        tasks.push(tokio::spawn(async move { get(&url).await }));
        // in order: the first two take the slots, the next two queue, the last two overflow
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        if got.status == 503 {
            assert_eq!(
                got.headers.get("retry-after").map(|v| v.to_str().unwrap()),
                Some("1")
            );
        }
        statuses.push(got.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503, 503]);
    assert_eq!(
        origin.total(),
        2,
        "the origin saw only the requests that had a slot"
    );
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "corral_upstream_busy_total"), 4.0, "{m}");
    eventually(Duration::from_secs(5), "every slot given back", || async {
        metric(&proxy.metrics().await, "corral_upstream_active") == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_lower_case_bearer_token_is_accepted() {
    let origin = Origin::start().await;
    let mut conf = Conf::default();
    conf.rules.push_str("[purge]\ntoken = \"s3cret\"\n");
    let proxy = Proxy::start(origin.addr, conf).await;
    let purge = |auth: &'static str| {
        let url = proxy.url("/tok");
        async move {
            send(
                client().request("PURGE".parse().unwrap(), url),
                &[("authorization", auth)],
            )
            .await
            .status
        }
    };
    assert_eq!(purge("bearer s3cret").await, 200);
    assert_eq!(purge("BEARER s3cret").await, 200);
    assert_eq!(purge("bearer wrong").await, 405);
}

/// A raw origin that records each request as it arrives (head and body, until the client
/// has been quiet for 300 ms) and answers 200 `ok`.
async fn recording_origin() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let quiet = Duration::from_millis(if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        300
                    } else {
                        5000
                    });
                    match tokio::time::timeout(quiet, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).to_lowercase());
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, requests)
}

/// Two identical `Content-Length` lines reach the origin as one (RFC 9112 §6.3).
#[tokio::test]
async fn a_repeated_content_length_is_forwarded_once() {
    let (addr, requests) = recording_origin().await;
    let proxy = Proxy::start(addr, Conf::default()).await;
    let answer = raw(
        &proxy,
        b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].matches("content-length").count(),
        1,
        "{}",
        requests[0]
    );
    assert!(requests[0].contains("content-length: 5\r\n"), "{}", requests[0]);
    assert!(requests[0].ends_with("\r\n\r\nhello"), "{}", requests[0]);
}

/// Pingora 0.9.1 reads chunked request bodies leniently (through httparse): a chunk size with
/// trailing whitespace, a bare LF in a chunk extension, an empty size line. corral cannot
/// reject these forms (Pingora decodes the body before any filter of corral sees it). What it
/// does today, kept in sight by this test (the README's security notes name the forms): the
/// body is decoded and forwarded with clean framing of Pingora's own, so the origin never
/// sees the odd form.
#[tokio::test]
async fn lenient_chunked_request_bodies_are_reframed_current_behaviour() {
    for (what, body) in [
        (
            "trailing whitespace after the size",
            &b"5 \r\nhello\r\n0\r\n\r\n"[..],
        ),
        (
            "bare LF in a chunk extension",
            &b"5;a=b\nc\r\nhello\r\n0\r\n\r\n"[..],
        ),
        (
            "an empty line where a chunk size belongs",
            &b"5\r\nhello\r\n\r\n0\r\n\r\n"[..],
        ),
    ] {
        let (addr, requests) = recording_origin().await;
        let proxy = Proxy::start(addr, Conf::default()).await;
        let mut request =
            b"POST /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_vec();
        request.extend_from_slice(body);
        let answer = raw(&proxy, &request).await;
        eprintln!("{what}: {answer:?} / {:?}", requests.lock().unwrap());
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 1, "{what}");
        assert!(
            requests[0].ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            "{what}: {:?}",
            requests[0]
        );
    }
}

/// RSS, not corral's own counter: 4 KB objects worth 3x `memory_bytes` leave the process
/// within 1.25x `memory_bytes` of where it started. (Each stored header used to keep Pingora's
/// 4 KiB read buffer alive: 2.4x here, 5x with 1 KB objects.)
#[tokio::test]
async fn l1_stays_within_its_budget_in_rss() {
    const BUDGET: u64 = 8 << 20;
    const SIZE: u64 = 4000;
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().cache("memory_bytes = \"8MiB\"")).await;
    let c = client();
    let fetch = |path: String| {
        let c = c.clone();
        async move {
            let r = c.get(path).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    };
    // connections, buffers and pools in place before the first measure
    for _ in 0..200 {
        fetch(proxy.url(&format!("/warm?size={SIZE}"))).await;
    }
    let start = proxy.rss();
    for i in 0..3 * BUDGET / SIZE {
        fetch(proxy.url(&format!("/rss/{i}?size={SIZE}"))).await;
    }
    // Pingora evicts right after an admission, on its own task: the count settles at once
    eventually(Duration::from_secs(5), "L1 back within its budget", || async {
        proxy.stats().await.1 <= BUDGET
    })
    .await;
    let (entries, bytes, _) = proxy.stats().await;
    let grown = proxy.rss().saturating_sub(start);
    eprintln!("{entries} entries, {bytes} bytes counted, RSS +{grown}");
    assert!(
        grown <= BUDGET * 5 / 4,
        "RSS grew by {grown} bytes for a budget of {BUDGET}"
    );
}

/// Purge records with memcached are kept for a day: each must cost little. 2,000 bans and
/// tag-pattern bans grow RSS by well under 4 MiB, not the ~60 MiB they took with a compiled
/// regex each (and a second copy read back from memcached's log).
#[tokio::test]
async fn purge_records_are_small() {
    let memcached = Memcached::start().await;
    let origin = Origin::start().await;
    let proxy = Proxy::start(origin.addr, Conf::default().servers(&[&memcached])).await;
    assert_eq!(get(&proxy.url("/warm")).await.status, 200);
    let start = proxy.rss();
    let c = client();
    for i in 0..2000 {
        let (name, value) = match i % 4 {
            // what FOSHttpCache and Drupal send: a path prefix, an exact host, tag regexes
            0 => ("x-url", format!("^/news/{i}/")),
            1 => ("x-host", format!("^www{i}\\.example\\.org$")),
            2 => ("x-cache-tags", format!("(^|,)node-{i}(,|$)")),
            _ => ("x-url", format!("^/section/{}/page-{i}$", i % 7)),
        };
        let r = c
            .request(reqwest::Method::from_bytes(b"BAN").unwrap(), proxy.url("/"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // the log is read back every second: this corral's own records are kept once
    eventually(Duration::from_secs(10), "the purge log read back", || async {
        metric(&proxy.metrics().await, "corral_purge_log_applied") >= 2000.0
    })
    .await;
    let m = proxy.metrics().await;
    let records = metric(&m, "corral_purge_records");
    let bytes = metric(&m, "corral_purge_record_bytes");
    let grown = proxy.rss().saturating_sub(start);
    eprintln!("{records} records, {bytes} bytes counted, RSS +{grown}");
    assert_eq!(records, 2000.0, "{m}");
    assert!(bytes / records < 1000.0, "{bytes} bytes for {records} records");
    assert!(grown < 4 << 20, "RSS grew by {grown} bytes for 2,000 records");
}

/// Forwarding headers are not part of the key: from a client they would let one request store
/// a redirect to `http://` (or another host's links, another path, another method) that every
/// other client then gets. They reach the origin only from `server.trusted_proxies`; corral
/// sends its own `X-Forwarded-For`, `-Proto` and `-Host`.
#[tokio::test]
async fn forwarding_headers_from_a_client_never_reach_the_origin() {
    const FORWARDING: [(&str, &str); 9] = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-port", "1234"),
        ("x-forwarded-prefix", "/evil"),
        ("forwarded", "for=203.0.113.9;proto=gopher;host=evil.example"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
    ];
    for trusted in [false, true] {
        let conf = if trusted {
            Conf::default().server("trusted_proxies = [\"127.0.0.1/32\"]")
        } else {
            Conf::default()
        };
        let (origin, proxy) = setup(conf).await;
        origin.route("/fw", |s| {
            let seen: Vec<String> = FORWARDING
                .iter()
                .map(|(name, _)| {
                    format!(
                        "{name}={}",
                        s.headers.get(*name).map_or("-", |v| v.to_str().unwrap())
                    )
                })
                .collect();
            Reply::ok(seen.join("\n")).header("cache-control", "no-store")
        });
        let got = get_with(&proxy.url("/fw"), &FORWARDING).await;
        for (name, value) in FORWARDING {
            let line = got
                .body
                .lines()
                .find(|l| l.starts_with(&format!("{name}=")))
                .unwrap();
            match (trusted, name) {
                // a trusted proxy's list, with this hop appended
                (true, "x-forwarded-for") => assert_eq!(line, "x-forwarded-for=203.0.113.9, 127.0.0.1"),
                // path and method overrides: no proxy sets them, from nobody
                (true, "x-original-url" | "x-rewrite-url" | "x-http-method-override") => {
                    assert_eq!(line, format!("{name}=-"), "{name} passed from a trusted proxy")
                }
                (true, _) => assert_eq!(line, format!("{name}={value}"), "believed from a trusted proxy"),
                (false, "x-forwarded-for") => assert_eq!(line, "x-forwarded-for=127.0.0.1", "the peer only"),
                (false, "x-forwarded-proto") => assert_eq!(line, "x-forwarded-proto=http"),
                (false, "x-forwarded-host") => {
                    assert!(line.starts_with("x-forwarded-host=127.0.0.1"), "{line}")
                }
                (false, _) => assert_eq!(
                    line,
                    format!("{name}=-"),
                    "{name} from a client reached the origin"
                ),
            }
        }
    }
}

/// Behind a TLS terminator on the same host every peer is 127.0.0.1, inside the default purge
/// allow-list. With the terminator in `server.trusted_proxies`, the allow-list looks at the
/// client it saw (the last untrusted address of `X-Forwarded-For`), not at the terminator.
#[tokio::test]
async fn purges_behind_a_trusted_tls_terminator_are_checked_against_the_real_client() {
    let (origin, proxy) = setup(Conf::default().server("trusted_proxies = [\"127.0.0.1/32\"]")).await;
    origin.route("/p", |s| cacheable(&format!("v{}", s.n)));
    get(&proxy.url("/p")).await;
    let url = proxy.url("/p");
    let purge = |xff: &'static str| {
        let req = client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), url.clone());
        async move { send(req, &[("x-forwarded-for", xff)]).await }
    };
    // an internet client through the terminator: refused, nothing purged
    let outsider = purge("203.0.113.9").await;
    assert_eq!(outsider.status, 405, "{}", outsider.body);
    assert!(get(&proxy.url("/p")).await.cache.starts_with("corral; hit"));
    // a client that claims loopback in front of its real address is still the real address
    assert_eq!(purge("127.0.0.1, 203.0.113.9").await.status, 405);
    // garbage the terminator passed on is an unknown client, never the terminator itself
    assert_eq!(purge("127.0.0.1, x").await.status, 405);
    assert_eq!(purge("unknown").await.status, 405);
    // the CMS on the same host, through the terminator: allowed
    assert_eq!(purge("127.0.0.1").await.status, 200);
}

/// A `[[rule]]`'s `key_headers` key the cache by request headers the origin answers by without
/// saying `Vary`: behind a TLS terminator that serves both schemes, the `https` page and the
/// `http` redirect are two variants, each stored once, each served to its own scheme. A
/// client naming the keyed header in `Connection` (so that it never reaches the origin) gets
/// nothing stored. A purge of the URL removes every variant.
#[tokio::test]
async fn a_rules_key_headers_store_one_variant_per_value() {
    let conf = Conf::default()
        .server("trusted_proxies = [\"127.0.0.1/32\"]")
        .rules("[[rule]]\npath_prefix = \"/k\"\nkey_headers = [\"X-Forwarded-Proto\"]\n")
        .rules("[[rule]]\npath_prefix = \"/d\"\nkey_headers = [\"x-device\"]\n");
    let (origin, proxy) = setup(conf).await;
    for (path, keyed) in [("/k", "x-forwarded-proto"), ("/d", "x-device")] {
        origin.route(path, move |s| {
            let value = s.headers.get(keyed).map_or("-", |v| v.to_str().unwrap());
            cacheable(&format!("{value} #{}", s.n))
        });
    }
    let url = proxy.url("/k");
    let https = get_with(&url, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(https.body, "https #1");
    let http = get_with(&url, &[("x-forwarded-proto", "http")]).await;
    assert_eq!(http.body, "http #2", "the https variant answered an http request");
    for _ in 0..2 {
        let again = get_with(&url, &[("x-forwarded-proto", "https")]).await;
        assert_eq!(
            (again.body.as_str(), again.cache.starts_with("corral; hit")),
            ("https #1", true)
        );
        let again = get_with(&url, &[("x-forwarded-proto", "http")]).await;
        assert_eq!(
            (again.body.as_str(), again.cache.starts_with("corral; hit")),
            ("http #2", true)
        );
    }
    assert_eq!(origin.hits("/k"), 2);
    // a keyed header stripped by the client's Connection: answered, not stored
    let stripped = get_with(
        &proxy.url("/d"),
        &[("x-device", "mobile"), ("connection", "x-device")],
    )
    .await;
    assert_eq!(stripped.body, "- #1");
    let plain = get_with(&proxy.url("/d"), &[("x-device", "mobile")]).await;
    assert_eq!(
        plain.body, "mobile #2",
        "the mobile variant was stored from a request without it"
    );
    let plain = get_with(&proxy.url("/d"), &[("x-device", "mobile")]).await;
    assert_eq!(plain.body, "mobile #2");
    // one purge of the URL takes both variants
    let purge = client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), url.clone());
    assert_eq!(send(purge, &[]).await.status, 200);
    assert_eq!(
        get_with(&url, &[("x-forwarded-proto", "https")]).await.body,
        "https #3"
    );
    assert_eq!(
        get_with(&url, &[("x-forwarded-proto", "http")]).await.body,
        "http #4"
    );
}

/// A listener that is not loopback-only, with purges allowed by address alone: said at start.
#[tokio::test]
async fn purges_open_by_address_on_a_public_listener_are_warned_about() {
    let origin = Origin::start().await;
    let addr: std::net::SocketAddr = format!("0.0.0.0:{}", free_port()).parse().unwrap();
    let proxy = Proxy::start_on(addr, origin.addr, Conf::default()).await;
    assert!(
        proxy
            .log_text()
            .contains("purges are allowed by source address alone"),
        "{}",
        proxy.log_text()
    );
    let quiet = Proxy::start(origin.addr, Conf::default()).await;
    assert!(!quiet
        .log_text()
        .contains("purges are allowed by source address alone"));
}

/// A response that varies on a forwarding header corral rewrites is keyed by what the origin
/// was sent: a client that sends `X-Forwarded-Proto: https` directly cannot store the answer to
/// corral's own `http` under the `https` variant.
#[tokio::test]
async fn a_variant_keyed_by_a_forwarding_header_is_what_the_origin_was_sent() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/proto", |s| {
        let proto = s
            .headers
            .get("x-forwarded-proto")
            .map_or("-", |v| v.to_str().unwrap());
        cacheable(&format!("proto={proto}")).header("vary", "X-Forwarded-Proto")
    });
    let url = proxy.url("/proto");
    let attack = get_with(&url, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(attack.body, "proto=http");
    let plain = get(&url).await;
    assert_eq!(plain.body, "proto=http");
    assert!(
        plain.cache.starts_with("corral; hit"),
        "one variant for every untrusted client: {}",
        plain.cache
    );
    assert_eq!(origin.hits("/proto"), 1);
}

/// An origin that answers every request on a connection with a `103 Early Hints` and the final
/// response in one write, so that both arrive in one read (what exposed the loss).
async fn early_hints_origin(cache_control: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let answer = format!(
                        "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
                         HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: {cache_control}\r\n\r\nok"
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A `103 Early Hints` reaches the client on every miss, also when it arrives with the final
/// response in one read and that response is stored (Pingora dropped it there: about half of
/// the attempts), exactly once, before the final response. A hit has none: interim responses
/// are never stored.
#[tokio::test]
async fn early_hints_reach_the_client_every_time_and_are_never_stored() {
    for cache_control in ["max-age=60", "no-store"] {
        let origin = early_hints_origin(cache_control).await;
        let proxy = Proxy::start(origin, Conf::default()).await;
        for i in 0..20 {
            let request = format!("GET /eh{i} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
            let got = raw(&proxy, request.as_bytes()).await;
            assert_eq!(
                got.matches("HTTP/1.1 103 Early Hints").count(),
                1,
                "{cache_control}, /eh{i}: {got}"
            );
            assert!(got.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{got}");
            let final_at = got.find("HTTP/1.1 200 OK").expect(&got);
            assert!(
                got[..final_at].contains("link: </style.css>")
                    || got[..final_at].contains("Link: </style.css>"),
                "{got}"
            );
            assert!(got.ends_with("ok"), "{got}");
            if cache_control == "max-age=60" {
                let hit = raw(&proxy, request.as_bytes()).await;
                assert!(hit.starts_with("HTTP/1.1 200 OK\r\n"), "a stored 103: {hit}");
                assert!(
                    hit.to_ascii_lowercase().contains("cache-status: corral; hit"),
                    "{hit}"
                );
            }
        }
        // two misses on one keep-alive connection: the second gets its 103 too, once
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /ka1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut first = Vec::new();
        let mut chunk = [0u8; 4096];
        while !first.ends_with(b"ok") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed after {}", String::from_utf8_lossy(&first));
            first.extend_from_slice(&chunk[..n]);
        }
        s.write_all(b"GET /ka2 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut second = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut second))
            .await
            .unwrap()
            .unwrap();
        for got in [first, second] {
            let got = String::from_utf8_lossy(&got).to_string();
            assert_eq!(
                got.matches("HTTP/1.1 103 Early Hints").count(),
                1,
                "{cache_control}: {got}"
            );
        }
        // never to an HTTP/1.0 client (RFC 9110 §15.2)
        let old = raw(&proxy, b"GET /h10 HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
        assert!(
            old.starts_with("HTTP/1.1 200 OK\r\n") && old.ends_with("ok"),
            "{old}"
        );
    }
}

// The front: on HTTP/1 connections corral reads each request head itself and answers a plain
// fast hit before Pingora's session exists; everything else goes to Pingora with the bytes
// already read (src/conn.rs, `FrontHits` in src/proxy/fast_hit.rs).

/// `corral_front_hits_total` and `corral_fast_hits_total`.
async fn hit_counts(proxy: &Proxy) -> (f64, f64) {
    let m = proxy.metrics().await;
    (
        metric(&m, "corral_front_hits_total"),
        metric(&m, "corral_fast_hits_total"),
    )
}

/// A response without the values that change from one second to the next (`Date`, `Age`, the
/// TTL); their fields stay where they are.
fn steady(response: &str) -> String {
    response
        .split("\r\n")
        .map(|l| match (l.split_once(':'), l.find("ttl=")) {
            (Some((name, _)), _) if name.eq_ignore_ascii_case("date") || name.eq_ignore_ascii_case("age") => {
                format!("{name}: N")
            }
            (_, Some(at)) => format!("{}ttl=N", &l[..at]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// A hit the front answers is the response Pingora's fast hit sends for the same request:
/// each pair differs only in a `Connection` token, which the front leaves to Pingora (a
/// hop-by-hop field to remove), over HTTP/1.1 and 1.0, GET and HEAD.
#[tokio::test]
async fn a_hit_answered_before_pingora_is_the_one_pingora_sends() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/same", |_| {
        cacheable("the same body")
            .header("etag", "\"v1\"")
            .header("x-one", "1")
            .header("link", "</a>; rel=preload")
            .header("x-two", "2")
            .header("link", "</b>; rel=preload")
            .header("Surrogate-Key", "tag-a tag-b")
            .header("Set-Cookie-Not", "n")
            .header("Age", "3")
            .header("Server", "origin")
            .header("Content-Type", "text/plain")
    });
    let stored = raw(
        &proxy,
        b"GET /same HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(stored.contains("corral; fwd=miss"), "{stored}");
    let pairs: [(&[u8], &[u8], &str); 4] = [
        (
            b"GET /same HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"GET /same HTTP/1.1\r\nHost: h\r\nConnection: close, x-hop\r\n\r\n",
            "the same body",
        ),
        (
            b"HEAD /same HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"HEAD /same HTTP/1.1\r\nHost: h\r\nConnection: close, x-hop\r\n\r\n",
            "\r\n\r\n",
        ),
        (
            b"GET /same HTTP/1.0\r\nHost: h\r\n\r\n",
            b"GET /same HTTP/1.0\r\nHost: h\r\nConnection: x-hop\r\n\r\n",
            "the same body",
        ),
        (
            b"GET /same HTTP/1.0\r\nHost: H:80\r\nConnection: keep-alive, close\r\n\r\n",
            b"GET /same HTTP/1.0\r\nHost: H:80\r\nConnection: keep-alive, close, x-hop\r\n\r\n",
            "the same body",
        ),
    ];
    for (front, pingora, ends) in pairs {
        let (front0, fast0) = hit_counts(&proxy).await;
        let a = raw(&proxy, front).await;
        assert_eq!(hit_counts(&proxy).await, (front0 + 1.0, fast0 + 1.0), "{a}");
        let b = raw(&proxy, pingora).await;
        assert_eq!(
            hit_counts(&proxy).await,
            (front0 + 1.0, fast0 + 2.0),
            "Pingora's fast hit: {b}"
        );
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with(ends), "{a}");
        assert!(
            a.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{a}"
        );
        assert!(a.contains("cache-status: corral; hit; ttl="), "{a}");
        assert!(a.to_ascii_lowercase().contains("\r\ndate: "), "{a}");
        // the tag header is stripped (purge.strip_tag_headers), other names kept lower-case
        assert!(!a.to_ascii_lowercase().contains("surrogate-key"), "{a}");
        assert!(a.contains("\r\nset-cookie-not: n\r\n"), "{a}");
        assert_eq!(steady(&a), steady(&b));
    }
    assert_eq!(origin.hits("/same"), 1);
}

/// Hits and misses on one keep-alive connection: after a request Pingora answered, the next
/// hit is the front's again; a request Pingora read ahead into (pipelined after a body) is
/// answered in order and nothing is lost.
#[tokio::test]
async fn after_pingora_answers_the_connection_comes_back_to_the_front() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/back", |_| cacheable("back"));
    origin.route("/form", |_| Reply::ok("posted".to_string()));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /back HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let miss = read_response(&mut s).await;
    assert!(miss.contains("fwd=miss") && miss.ends_with("back"), "{miss}");
    let (front0, _) = hit_counts(&proxy).await;
    s.write_all(b"GET /back HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let hit = read_response(&mut s).await;
    assert!(hit.contains("corral; hit") && hit.ends_with("back"), "{hit}");
    assert_eq!(hit_counts(&proxy).await.0, front0 + 1.0, "the hit after a miss");
    // a POST with a body and a hit behind it, in one write: the front hands both to Pingora,
    // which answers the POST and the hit it read ahead
    s.write_all(
        b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
          GET /back HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await
    .unwrap();
    let mut both = String::new();
    while !both.ends_with("back") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("both answers within 10 s")
            .unwrap();
        assert!(n > 0, "closed: {both}");
        both.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let (posted, behind) = both
        .split_once("postedHTTP/1.1")
        .expect("the POST's answer first");
    assert!(posted.contains("fwd=bypass"), "{both}");
    assert!(behind.contains("corral; hit"), "{both}");
    let (front1, _) = hit_counts(&proxy).await;
    assert_eq!(front1, front0 + 1.0, "the hit read ahead is Pingora's");
    s.write_all(b"GET /back HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let again = read_response(&mut s).await;
    assert!(
        again.contains("corral; hit") && again.ends_with("back"),
        "{again}"
    );
    assert_eq!(hit_counts(&proxy).await.0, front1 + 1.0, "back to the front");
    assert_eq!(origin.hits("/back"), 1);
    assert_eq!(origin.hits("/form"), 1);
}

/// A request with a body is never the front's, so a body is never read as a request: a GET
/// whose body holds a request for another URL (`Content-Length` or chunked) is answered once,
/// and the URL in its body never reaches the origin.
#[tokio::test]
async fn a_body_on_a_get_is_never_read_as_a_request() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/hit", |_| cacheable("hit"));
    origin.route("/secret", |_| cacheable("secret"));
    raw(
        &proxy,
        b"GET /hit HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let smuggled = "GET /secret HTTP/1.1\r\nHost: h\r\n\r\n";
    let by_length = format!(
        "GET /hit HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let chunked = format!(
        "GET /hit HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    for first in [by_length, chunked] {
        let (front0, _) = hit_counts(&proxy).await;
        let request = format!("{first}GET /hit HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let text = raw(&proxy, request.as_bytes()).await;
        // Pingora answers the first from the cache, and closes the connection rather than
        // read a body it did not need, or reads the body and answers the second too
        let answers = text.matches("HTTP/1.1 200 OK").count();
        assert!(answers == 1 || answers == 2, "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), answers, "nothing else: {text}");
        assert_eq!(text.matches("corral; hit").count(), answers, "{text}");
        assert!(!text.contains("secret"), "{text}");
        // the first is Pingora's (it has a body), and so is what it read with it
        assert_eq!(hit_counts(&proxy).await.0, front0, "{text}");
    }
    assert_eq!(origin.hits("/secret"), 0);
    assert_eq!(origin.hits("/hit"), 1);
}

/// A head longer than the front reads (8 KiB) goes to Pingora as read, and is still a hit; a
/// head that arrives in pieces is the front's.
#[tokio::test]
async fn long_and_split_heads_are_answered() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/h", |_| cacheable("head"));
    raw(&proxy, b"GET /h HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
    let (front0, fast0) = hit_counts(&proxy).await;
    let long = format!(
        "GET /h HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    let text = raw(&proxy, long.as_bytes()).await;
    assert!(text.contains("corral; hit") && text.ends_with("head"), "{text}");
    assert_eq!(
        hit_counts(&proxy).await,
        (front0, fast0 + 1.0),
        "Pingora's fast hit"
    );
    // in three writes, apart (the bytes are sent at once: no delay of Nagle's)
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for piece in [&b"GET /h HT"[..], b"TP/1.1\r\nHost: h\r\n\r", b"\n"] {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = read_response(&mut s).await;
    assert!(text.contains("corral; hit") && text.ends_with("head"), "{text}");
    assert_eq!(
        hit_counts(&proxy).await,
        (front0 + 1.0, fast0 + 2.0),
        "the front's"
    );
    assert_eq!(origin.hits("/h"), 1);
}

/// An idle keep-alive connection the front served does not hold the process at shutdown:
/// it is closed at once, and corral exits well before its 5 s graceful timeout.
#[tokio::test]
async fn an_idle_connection_after_a_front_hit_ends_at_shutdown() {
    let (origin, mut proxy) = setup(Conf::default()).await;
    origin.route("/idle", |_| cacheable("idle"));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /idle HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut s).await;
    }
    assert_eq!(hit_counts(&proxy).await.0, 1.0);
    let term = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(proxy.pid().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let closed = closed_after(&mut s, Duration::from_secs(4)).await;
    assert!(closed < Duration::from_secs(2), "{closed:?}");
    assert!(
        proxy.exited_within(Duration::from_secs(3)).await,
        "{}",
        proxy.log_text()
    );
}

/// Pingora's settings for a connection's next request show the bytes it read ahead in their
/// `Debug`; a request carrying the text `pipelined_prefix: None` among them must not pass for
/// "nothing read ahead" (its bytes would be dropped, and its body read as a request): it is
/// answered, with its body.
#[tokio::test]
async fn a_read_ahead_request_that_looks_like_no_prefix_is_answered() {
    let (origin, proxy) = setup(Conf::default()).await;
    origin.route("/form", |_| Reply::ok("posted".to_string()));
    origin.route("/echo", |req| {
        let length = req
            .headers
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_string());
        Reply::ok(format!("echo {}", length.unwrap_or_default()))
    });
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(
        b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
          POST /echo HTTP/1.1\r\nHost: h\r\nX-Look: a, pipelined_prefix: None, b\r\n\
          Content-Length: 33\r\n\r\n",
    )
    .await
    .unwrap();
    let first = read_response(&mut s).await;
    assert!(first.ends_with("posted"), "{first}");
    // the second request's body, later: a request in its own right if its head was lost
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"GET /secret HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let second = read_response(&mut s).await;
    assert!(second.ends_with("echo 33"), "{second}");
    assert_eq!(origin.hits("/echo"), 1);
    assert_eq!(origin.hits("/secret"), 0);
}

/// Requests pipelined in one write are answered by the front, in order; empty lines between
/// them are skipped (RFC 9112 §2.2).
#[tokio::test]
async fn pipelined_hits_are_the_fronts_in_order() {
    let (origin, proxy) = setup(Conf::default()).await;
    for i in 0..3 {
        origin.route(&format!("/p{i}"), move |_| cacheable(&format!("body {i}")));
        raw(
            &proxy,
            format!("GET /p{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
    }
    let (front0, _) = hit_counts(&proxy).await;
    let text = raw(
        &proxy,
        b"GET /p0 HTTP/1.1\r\nHost: h\r\n\r\n\r\n\
          GET /p1 HTTP/1.1\r\nHost: h\r\n\r\n\
          GET /p2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let bodies: Vec<&str> = text
        .split("HTTP/1.1 200 OK")
        .skip(1)
        .map(|r| r.rsplit("\r\n\r\n").next().unwrap())
        .collect();
    assert_eq!(bodies, ["body 0", "body 1", "body 2"], "{text}");
    assert_eq!(hit_counts(&proxy).await.0, front0 + 3.0);
    for i in 0..3 {
        assert_eq!(origin.hits(&format!("/p{i}")), 1);
    }
}

/// The start of a request read with a hit before it has `header_timeout`, not the idle wait's
/// `keepalive_timeout`: a client that sends one byte more and goes silent is cut at the head
/// deadline. Empty lines after a hit are not a request's start: the connection waits for the
/// next request as long as an idle one does.
#[tokio::test]
async fn a_head_begun_behind_a_front_hit_has_header_timeout() {
    let conf = Conf::default()
        .server("header_timeout = \"1s\"")
        .server("keepalive_timeout = \"30s\"");
    let (origin, proxy) = setup(conf).await;
    origin.route("/b", |_| cacheable("b"));
    raw(&proxy, b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
    let (front0, _) = hit_counts(&proxy).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\nG").await.unwrap();
    let hit = read_response(&mut s).await;
    assert!(hit.contains("corral; hit") && hit.ends_with("b"), "{hit}");
    assert_eq!(hit_counts(&proxy).await.0, front0 + 1.0);
    let closed = closed_after(&mut s, Duration::from_secs(10)).await;
    assert!(closed < Duration::from_secs(3), "{closed:?}");
    // a blank line after the hit, then silence: still open after the head deadline, and
    // the next request is answered
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut s).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
    let again = read_response(&mut s).await;
    assert!(again.contains("corral; hit") && again.ends_with("b"), "{again}");
    assert_eq!(hit_counts(&proxy).await.0, front0 + 3.0);
}
