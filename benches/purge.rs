//! Purge costs: accepting a ban or a tag purge must not grow with what the cache holds, and the
//! per-hit check of recorded bans must stay small.
//!
//! `cargo bench --bench purge`. Figures are in README.md ("Benchmarks").

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use corral::cache::CacheParts;
use corral::config::Config;
use corral::key;
use corral::purge::{self, Purge, Validity};
use corral::storage::memory::{self, MetaParts};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora_cache::CacheMeta;
use pingora_http::{RequestHeader, ResponseHeader};

fn meta(tag: &str) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).expect("status");
    h.append_header("cache-control", "max-age=3600").expect("header");
    h.append_header("xkey", tag.to_string()).expect("header");
    let then = SystemTime::now() - Duration::from_secs(60);
    CacheMeta::new(then + Duration::from_secs(3600), then, 10, 300, h)
}

/// Cache parts whose L1 holds `n` entries (tagged `t0`..`t99`).
async fn parts_with(n: usize) -> &'static CacheParts {
    let cfg = Config::from_str(
        "[cache]\nmemory_bytes = \"4GiB\"\nmax_object_bytes = \"1MiB\"\n",
        "bench",
    )
    .expect("config");
    let parts = CacheParts::leak(&cfg, None);
    let body = Bytes::from_static(b"x");
    for i in 0..n {
        let k = key::for_url("www.example.org", &format!("/page/{i}"));
        // (built on L1's builder thread)
        parts
            .storage
            .l1
            .insert(
                &k,
                MetaParts::from_meta(&meta(&format!("t{}", i % 100)), memory::url_of(&k)),
                body.clone(),
                parts.storage.l1.generation(),
            )
            .await;
    }
    parts
}

fn ban(pattern: &str) -> Purge {
    let mut r = RequestHeader::build("BAN", b"/", None).expect("request");
    r.append_header("x-url", pattern).expect("header");
    purge::parse(&r, "www.example.org", "/").expect("valid ban")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let the_ban = ban("^/page/4[0-9]+$");

    let mut group = c.benchmark_group("accept_ban");
    for n in [1_000usize, 1_000_000] {
        let parts = rt.block_on(parts_with(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| rt.block_on(parts.apply(black_box(&the_ban))))
        });
    }
    group.finish();

    let parts = rt.block_on(parts_with(100_000));
    let tags = Purge {
        target: purge::Target::Tags(vec!["t7".into()]),
        soft: false,
    };
    c.bench_function("accept_tag_purge_100k_entries", |b| {
        b.iter(|| rt.block_on(parts.apply(black_box(&tags))))
    });

    // the per-hit price of recorded bans: 1,000 bans, none matching
    let v = Validity::default();
    for i in 0..1_000 {
        v.record(&ban(&format!("^/other/{i}$")), purge::now_stamp());
    }
    let m = meta("t1");
    c.bench_function("hit_check_1000_bans", |b| {
        b.iter(|| v.verdict(black_box("www.example.org"), black_box("/page/1"), &m))
    });
    // the same hit once the entry was checked (by an earlier hit or by the sweeper)
    let upto = v.published();
    c.bench_function("hit_check_1000_bans_already_checked", |b| {
        b.iter(|| {
            v.check(
                black_box("www.example.org"),
                black_box("/page/1"),
                m.updated(),
                corral::purge::corral_id(),
                m.headers(),
                upto,
            )
        })
    });

    // one sweeper pass over 100k entries after one new ban (matching 1 in 10), entries put
    // back each time so that every pass has the same work
    let mut group = c.benchmark_group("sweep_100k_entries_one_new_ban");
    group.sample_size(10);
    group.bench_function("pass", |b| {
        b.iter_batched(
            || {
                let parts = rt.block_on(parts_with(100_000));
                parts.validity.record(&ban("^/page/[0-9]*7$"), purge::now_stamp());
                parts
            },
            |parts| rt.block_on(parts.storage.l1.sweep(parts.validity, parts.validity.published())),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
