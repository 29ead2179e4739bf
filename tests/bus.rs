//! Issue 13: purges over a real RabbitMQ (`[bus]`): every accepted purge is published to a
//! durable fanout exchange with publisher confirms; each corral consumes its own durable queue.
//! Each test starts its own broker (Debian's `rabbitmq-server`, `.ci/run` installs it).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const SITE: (&str, &str) = ("host", "www.site.test");
const APPLIED: &str = "corral_bus_applied_total";

/// One broker test at a time: each runs a broker and three corrals on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// The bus section of a test corral. `confirm_timeout` is the default's 2 s: with 500 ms, a
/// broker just started or restarted (on a loaded 2-core machine) sometimes confirmed the first
/// purge too late, and a confirm that times out ends the session (a 503, then a reconnection
/// with back-off; over and over while the broker stays slow).
fn bus(amqp_url: &str, extra: &str) -> Conf {
    Conf::default().section(&format!(
        "[bus]\namqp_url = \"{amqp_url}\"\nexchange = \"corral.test\"\nconfirm_timeout = \"2s\"\n{extra}"
    ))
}

/// Every path answers `<path> #<n>`, fresh for 300 s.
fn pages(origin: &Origin, paths: &[String]) {
    for p in paths {
        let p2 = p.clone();
        origin.route(p, move |s| {
            Reply::ok(format!("{p2} #{}", s.n)).header("cache-control", "max-age=300")
        });
    }
}

async fn get(proxy: &Proxy, path: &str) -> Got {
    get_with(&proxy.url(path), &[SITE]).await
}

async fn warm(proxy: &Proxy, paths: &[String]) {
    for p in paths {
        get(proxy, p).await;
        let again = get(proxy, p).await;
        assert!(again.cache.starts_with("corral; hit"), "{p}: {}", again.cache);
    }
}

async fn purge(proxy: &Proxy, path: &str) -> Got {
    send(
        client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), proxy.url(path)),
        &[SITE],
    )
    .await
}

async fn counter(proxy: &Proxy, series: &str) -> f64 {
    metric(&proxy.metrics().await, series)
}

/// `GET /bus` on the admin listener of `proxy`: the text, and its JSON.
async fn bus_status(proxy: &Proxy) -> (String, serde_json::Value) {
    admin_json(proxy, "/bus").await
}

/// `GET path` on the admin listener of `proxy`: the text, and its JSON.
async fn admin_json(proxy: &Proxy, path: &str) -> (String, serde_json::Value) {
    let text = client()
        .get(format!("http://{}{path}", proxy.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v = serde_json::from_str(&text).unwrap();
    (text, v)
}

/// The relays of a purge from another site that `corrals` counted with `result`, in all.
async fn relays(corrals: &[&Proxy], result: &str) -> f64 {
    let series = format!("corral_purge_relays_total{{result=\"{result}\"}}");
    let mut sum = 0.0;
    for p in corrals {
        sum += counter(p, &series).await;
    }
    sum
}

/// `path`, filled through `filler` into its memcached, is served by `reader` (which shares
/// that memcached) from there, then from its L1.
async fn served_from_memcached(filler: &Proxy, reader: &Proxy, path: &str) {
    let first = get(filler, path).await.body;
    assert!(first.ends_with("#1"), "{path}: {first}");
    eventually(
        Duration::from_secs(5),
        "the reader takes the filler's copy from memcached",
        || async { get(reader, path).await.cache.ends_with("detail=l2") },
    )
    .await;
    assert!(get(reader, path).await.cache.starts_with("corral; hit"), "{path}");
}

/// Wait until the bus of `proxy` is connected (its queue declared and consumed).
async fn connected(proxy: &Proxy) {
    eventually(Duration::from_secs(20), "bus connected", || async {
        counter(proxy, "corral_bus_connected").await == 1.0
    })
    .await;
}

async fn fleet(origin: &Origin, conf: Conf) -> (Proxy, Proxy, Proxy) {
    let a = Proxy::start_on(loopback(), origin.addr, conf.clone()).await;
    let b = Proxy::start_on(loopback(), origin.addr, conf.clone()).await;
    let c = Proxy::start_on(loopback(), origin.addr, conf).await;
    for p in [&a, &b, &c] {
        connected(p).await;
    }
    (a, b, c)
}

#[tokio::test]
async fn a_purge_at_a_reaches_b_and_c_through_the_broker() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = vec!["/p".into(), "/q".into()];
    pages(&origin, &paths);
    let (a, b, c) = fleet(&origin, bus(&rabbit.url(), "")).await;
    warm(&b, &paths).await;
    warm(&c, &paths).await;
    let r = purge(&a, "/p").await;
    assert_eq!(r.status, 200, "confirmed by the broker: {}", r.body);
    let answered = Instant::now();
    for p in [&b, &c] {
        eventually(Duration::from_secs(2), "applied from the bus", || async {
            counter(p, APPLIED).await == 1.0
        })
        .await;
    }
    let took = answered.elapsed();
    for p in [&b, &c] {
        let got = get(p, "/p").await;
        assert!(got.cache.contains("fwd=miss"), "{}", got.cache);
        assert!(
            get(p, "/q").await.cache.starts_with("corral; hit"),
            "/q not purged"
        );
    }
    // A's own message comes back on its own queue, and is not applied twice
    eventually(Duration::from_secs(5), "A consumed its own message", || async {
        counter(&a, "corral_bus_consumed_total").await >= 1.0
    })
    .await;
    assert_eq!(counter(&a, APPLIED).await, 0.0);
    let (text, v) = bus_status(&a).await;
    assert_eq!(v["connected"], true, "{text}");
    assert!(v["confirmed"].as_u64().unwrap() >= 1, "{text}");
    eprintln!("purge applied at B and C {took:?} after A's answer");
}

#[tokio::test]
async fn purges_made_while_the_broker_is_down_reach_every_corral_when_it_is_back() {
    let _serial = SERIAL.lock().await;
    let mut rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..20).map(|i| format!("/down/{i}")).collect();
    pages(&origin, &paths);
    let (a, b, c) = fleet(&origin, bus(&rabbit.url(), "")).await;
    warm(&b, &paths).await;
    warm(&c, &paths).await;
    rabbit.stop();
    for p in &paths {
        let started = Instant::now();
        let r = purge(&a, p).await;
        // no memcached: nothing else carries it; applied here, kept in the outbox
        assert_eq!(r.status, 503, "{p}: {}", r.body);
        assert!(r.body.contains("retry"), "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "fails fast: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(counter(&a, "corral_bus_outbox").await, 20.0);
    rabbit.restart().await;
    for p in [&b, &c] {
        // this failed 2 times in about 20 runs (once in CI) with the 30 s it had, cause not
        // found: the wait is longer now, and a failure says where each corral stood
        let deadline = Instant::now() + Duration::from_secs(60);
        while counter(p, APPLIED).await != 20.0 {
            if Instant::now() > deadline {
                let status = |q: &Proxy| {
                    let admin = q.admin;
                    async move {
                        let bus = client().get(format!("http://{admin}/bus")).send().await;
                        match bus {
                            Ok(r) => r.text().await.unwrap_or_default(),
                            Err(e) => e.to_string(),
                        }
                    }
                };
                panic!(
                    "not every purge applied 60 s after the broker is back: at {} {} of 20\n\
                     A's outbox {}, A's /bus {}\nthis corral's /bus {}\nA's log:\n{}\n\
                     this corral's log:\n{}",
                    p.addr,
                    counter(p, APPLIED).await,
                    counter(&a, "corral_bus_outbox").await,
                    status(&a).await,
                    status(p).await,
                    a.log_text(),
                    p.log_text(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for path in &paths {
            let got = get(p, path).await;
            assert!(
                got.cache.contains("fwd=miss"),
                "{path} at {}: {}",
                p.addr,
                got.cache
            );
        }
    }
    assert!(a.log_text().contains("message bus unreachable"));
    assert!(a.log_text().contains("message bus connected"));
}

/// A corral that only consumes, whose connection dies without a reset (a broker host gone, a
/// firewall that forgets the connection), learns it from the AMQP heartbeat corral asks for,
/// reconnects, and applies what was published meanwhile. With RabbitMQ's own 60 s heartbeat
/// it would stay connected to nothing for two minutes, deaf to purges.
#[tokio::test]
async fn a_consumer_whose_connection_dies_silently_reconnects_and_applies_the_purges() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..5).map(|i| format!("/silent/{i}")).collect();
    pages(&origin, &paths);
    let relay = Relay::start(rabbit.addr).await;
    let a = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "")).await;
    let c_url = format!("amqp://guest:guest@{}/%2f", relay.addr);
    let c = Proxy::start_on(loopback(), origin.addr, bus(&c_url, "")).await;
    connected(&a).await;
    connected(&c).await;
    warm(&c, &paths).await;
    relay.stall();
    let stalled = Instant::now();
    for p in &paths {
        assert_eq!(purge(&a, p).await.status, 200, "{p}");
    }
    // C's lapin drops the dead connection after 20 s of silence and C reconnects; the purges
    // were delivered to the old consumer, and reach the new one once the broker drops the old
    // connection on the same heartbeat: about 30 s in all (two minutes without the fix)
    eventually(
        Duration::from_secs(75),
        "C notices its dead connection, reconnects and applies the purges",
        || async { counter(&c, APPLIED).await == paths.len() as f64 },
    )
    .await;
    eprintln!("applied at C {:?} after its link stalled", stalled.elapsed());
    for p in &paths {
        assert!(get(&c, p).await.cache.contains("fwd=miss"), "{p}");
    }
}

#[tokio::test]
async fn a_corral_stopped_while_purges_are_published_applies_them_from_its_queue() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..20).map(|i| format!("/away/{i}")).collect();
    pages(&origin, &paths);
    let (a, _b, mut c) = fleet(&origin, bus(&rabbit.url(), "")).await;
    c.kill();
    for p in &paths {
        assert_eq!(purge(&a, p).await.status, 200);
    }
    // back on the same address: the same node, the same durable queue
    c.restart().await;
    connected(&c).await;
    eventually(
        Duration::from_secs(10),
        "C applies its queue's backlog",
        || async { counter(&c, APPLIED).await == 20.0 },
    )
    .await;
    for p in &paths {
        assert!(get(&c, p).await.cache.contains("fwd=miss"));
    }
}

#[tokio::test]
async fn a_queue_that_overflowed_makes_its_consumer_drop_its_cache() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..21)
        .map(|i| format!("/ovf/{i}"))
        .chain(["/kept".to_string()])
        .collect();
    pages(&origin, &paths);
    // C reaches the broker through a relay the test cuts
    let relay = Relay::start(rabbit.addr).await;
    let conf = bus(&rabbit.url(), "queue_max = 5");
    let a = Proxy::start_on(loopback(), origin.addr, conf.clone()).await;
    let c_url = format!("amqp://guest:guest@{}/%2f", relay.addr);
    let c = Proxy::start_on(loopback(), origin.addr, bus(&c_url, "queue_max = 5")).await;
    connected(&a).await;
    connected(&c).await;
    // C learns A's sequence numbers
    assert_eq!(purge(&a, &paths[0]).await.status, 200);
    eventually(Duration::from_secs(5), "C applied the first", || async {
        counter(&c, APPLIED).await == 1.0
    })
    .await;
    warm(&c, &["/kept".to_string()]).await;
    relay.cut();
    eventually(Duration::from_secs(10), "C sees the bus down", || async {
        counter(&c, "corral_bus_connected").await == 0.0
    })
    .await;
    for p in &paths[1..21] {
        assert_eq!(purge(&a, p).await.status, 200);
    }
    relay.restore();
    eventually(Duration::from_secs(20), "C drops its cache", || async {
        counter(&c, "corral_cache_drops_total{reason=\"peer-gap\"}").await == 1.0
    })
    .await;
    assert!(c.log_text().contains("dropping stale cache: peer-gap"));
    assert!(
        get(&c, "/kept").await.cache.contains("fwd=miss"),
        "never purged, dropped with the cache"
    );
}

/// A broker that opens the connection and then answers nothing (its channel layer wedged, or
/// its queues still recovering): the set-up waits 10 s for a channel, then closes the
/// connection the AMQP way (`Connection.Close`, not only a dropped socket), says why on
/// `/bus`, and connects again; meanwhile the corral is not counted connected.
#[tokio::test]
async fn a_broker_that_opens_the_connection_and_then_answers_nothing_is_left_and_tried_again() {
    let broker = SilentBroker::start().await;
    let origin = Origin::start().await;
    let a = Proxy::start_on(loopback(), origin.addr, bus(&broker.url(), "")).await;
    eventually(Duration::from_secs(20), "a first connection opened", || async {
        broker.when(1, Seen::Opened).is_some()
    })
    .await;
    eventually(Duration::from_secs(40), "a second connection opened", || async {
        broker.when(2, Seen::Opened).is_some()
    })
    .await;
    let events = broker.events();
    let opened = broker.when(1, Seen::Opened).unwrap();
    // the set-up asked for a channel (Channel.Open) and waited for it
    assert!(broker.when(1, Seen::Method(20, 10)).is_some(), "{events:?}");
    let closed = broker
        .when(1, Seen::Close)
        .unwrap_or_else(|| panic!("the first connection was not closed with Connection.Close: {events:?}"));
    let waited = closed - opened;
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(15),
        "the set-up gave up after {waited:?}, not after its 10 s"
    );
    assert!(broker.when(2, Seen::Opened).unwrap() > closed, "{events:?}");
    assert_eq!(counter(&a, "corral_bus_connected").await, 0.0);
    let (text, v) = bus_status(&a).await;
    assert_eq!(v["connected"], false, "{text}");
    let why = v["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("open a channel") && why.contains("no answer from the broker within 10s"),
        "{text}"
    );
}

/// Two sites, each with its own memcached, joined by the bus: a purge accepted at site 1 is
/// written to site 2's memcached too, by one of site 2's corrals (the other counts it as
/// done by another). So a corral of site 2 that is not on the bus, or that starts after the
/// purge (with no record of its own), does not serve site 2's older copy from memcached: a
/// URL purge deletes it, and a ban is a record of site 2's purge log.
#[tokio::test]
async fn a_purge_from_another_site_reaches_that_sites_memcached() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let (mc1, mc2) = (Memcached::start().await, Memcached::start().await);
    let paths = ["/site/x".to_string(), "/site/y".to_string()];
    pages(&origin, &paths);
    let a = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc1])).await;
    let b = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc2])).await;
    let b2 = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc2])).await;
    // a second corral of site 1: it shares A's purge log, and writes nothing again
    let a2 = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc1])).await;
    for p in [&a, &b, &b2, &a2] {
        connected(p).await;
    }
    // site 2's memcached holds both pages; P (site 2, not on the bus) took them from it
    let p = Proxy::start_on(loopback(), origin.addr, Conf::default().servers(&[&mc2])).await;
    for path in &paths {
        served_from_memcached(&b, &p, path).await;
    }
    assert_eq!(purge(&a, &paths[0]).await.status, 200);
    let ban = send(
        client().request(reqwest::Method::from_bytes(b"BAN").unwrap(), a.url("/")),
        &[SITE, ("x-url", "^/site/y$")],
    )
    .await;
    assert_eq!(ban.status, 200);
    let site2 = [&b, &b2];
    let relays = |result: &'static str| relays(&site2, result);
    eventually(
        Duration::from_secs(20),
        "both purges written to site 2's memcached, once each",
        || async { relays("relayed").await == 2.0 },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the other corral of site 2 counts them as done",
        || async { relays("other").await == 2.0 },
    )
    .await;
    assert_eq!(relays("failed").await, 0.0);
    eventually(Duration::from_secs(10), "A2 applies both", || async {
        counter(&a2, APPLIED).await == 2.0
    })
    .await;
    let a2_metrics = a2.metrics().await;
    assert!(
        !a2_metrics.contains("corral_purge_relays_total{"),
        "A2 relayed: {a2_metrics}"
    );
    // P learns both from site 2's purge log
    eventually(Duration::from_secs(10), "P serves neither old copy", || async {
        get(&p, &paths[0]).await.body != format!("{} #1", paths[0])
            && get(&p, &paths[1]).await.body != format!("{} #1", paths[1])
    })
    .await;
    // a corral of site 2 started after the purges
    let c = Proxy::start_on(loopback(), origin.addr, Conf::default().servers(&[&mc2])).await;
    for path in &paths {
        let got = get(&c, path).await;
        assert_ne!(got.body, format!("{path} #1"), "{path}: {}", got.cache);
    }
}

/// The fault beside the test above: site 2's memcached is down when a purge from site 1
/// arrives. The receiving corral still applies it to its L1, acks it, and counts and logs the
/// relay it could not make (`result="failed"`), instead of holding up the bus.
#[tokio::test]
async fn a_purge_from_another_site_is_applied_when_that_sites_memcached_is_down() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let (mc1, mut mc2) = (Memcached::start().await, Memcached::start().await);
    let paths = ["/down/x".to_string()];
    pages(&origin, &paths);
    let a = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc1])).await;
    let b = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc2])).await;
    for p in [&a, &b] {
        connected(p).await;
    }
    warm(&b, &paths).await;
    mc2.stop();
    assert_eq!(purge(&a, &paths[0]).await.status, 200);
    eventually(Duration::from_secs(10), "B applies the purge", || async {
        counter(&b, APPLIED).await == 1.0
    })
    .await;
    let failed = "corral_purge_relays_total{result=\"failed\"}";
    eventually(
        Duration::from_secs(10),
        "B counts the relay it could not make",
        || async { counter(&b, failed).await == 1.0 },
    )
    .await;
    assert!(b
        .log_text()
        .contains("could not be written to this corral's memcached"));
    let got = get(&b, &paths[0]).await;
    assert!(got.body.ends_with("#2"), "{}: {}", got.body, got.cache);
}

/// The fault of the relay's claim: a corral of site 2 claims a purge from site 1 and stops
/// before it writes it (its claim put in site 2's memcached by hand, holding 8 s). The other
/// corrals of site 2 find it held and watch it; once the claim lapses, one of them writes the
/// purge, once, and marks it written, and the other counts it as another's. A corral of site 2
/// that takes its copies from memcached then serves none from before the purge. Before, a
/// claim was kept a week and nobody wrote the purge.
#[tokio::test]
async fn a_relay_claimed_by_a_corral_that_stopped_is_written_by_another_corral_of_its_site() {
    let _serial = SERIAL.lock().await;
    let rabbit = Rabbit::start().await;
    let origin = Origin::start().await;
    let (mc1, mc2) = (Memcached::start().await, Memcached::start().await);
    let path = "/lapse/x".to_string();
    pages(&origin, std::slice::from_ref(&path));
    let a = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc1])).await;
    let b = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc2])).await;
    let b2 = Proxy::start_on(loopback(), origin.addr, bus(&rabbit.url(), "").servers(&[&mc2])).await;
    for p in [&a, &b, &b2] {
        connected(p).await;
    }
    // P (site 2, not on the bus) serves B's copy from site 2's memcached
    let p = Proxy::start_on(loopback(), origin.addr, Conf::default().servers(&[&mc2])).await;
    served_from_memcached(&b, &p, &path).await;
    // A's next message: its id, and the number after those it published
    let (_, peers) = admin_json(&a, "/peers").await;
    let (id, published) = (
        peers["corral"].as_u64().unwrap(),
        peers["published"].as_u64().unwrap(),
    );
    let key = format!("corral/corral/relayed/{id}/{}", published + 1);
    // as a corral with the id 1 claims it: "claimed", its id, its lease
    let claimed = mc2
        .command(format!("set {key} 0 8 11\r\nclaimed 1 8\r\n").as_bytes(), "\r\n")
        .await;
    assert_eq!(claimed, "STORED\r\n");
    assert_eq!(purge(&a, &path).await.status, 200);
    let site2 = [&b, &b2];
    let relays = |result: &'static str| relays(&site2, result);
    eventually(
        Duration::from_secs(5),
        "both corrals of site 2 apply it",
        || async { counter(&b, APPLIED).await + counter(&b2, APPLIED).await == 2.0 },
    )
    .await;
    // held: neither writes it nor counts it yet (each watches the claim)
    assert_eq!((relays("relayed").await, relays("other").await), (0.0, 0.0));
    eventually(
        Duration::from_secs(20),
        "the purge written once the claim lapsed",
        || async { relays("relayed").await == 1.0 },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the other corral of site 2 finds it written",
        || async { relays("other").await == 1.0 },
    )
    .await;
    let marker = mc2.command(format!("get {key}\r\n").as_bytes(), "END\r\n").await;
    assert!(marker.contains("\r\ndone\r\n"), "{marker}");
    assert!((b.log_text() + &b2.log_text()).contains("let its claim lapse unwritten"));
    eventually(
        Duration::from_secs(10),
        "P serves no copy from before the purge",
        || async { !get(&p, &path).await.body.ends_with("#1") },
    )
    .await;
    // written once: the other corral, still watching until then, found it written
    assert_eq!((relays("relayed").await, relays("failed").await), (1.0, 0.0));
    assert_eq!(relays("unwatched").await, 0.0);
}
