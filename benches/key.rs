//! The hit path's hot half: cache key of a request, then an L1 lookup and body read.
//!
//! `cargo bench --bench key`. Figures are in README.md ("Benchmarks").

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use corral::key;
use corral::storage::memory::MemoryStorage;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pingora_cache::storage::Storage;
use pingora_cache::trace::Span;
use pingora_cache::CacheMeta;
use pingora_http::{RequestHeader, ResponseHeader};

fn request(path: &str) -> RequestHeader {
    let mut r = RequestHeader::build("GET", path.as_bytes(), None).expect("valid request");
    r.append_header("host", "www.example.org").expect("valid header");
    r.append_header("accept-encoding", "gzip, br")
        .expect("valid header");
    r.append_header("user-agent", "bench/1.0").expect("valid header");
    r
}

fn response() -> ResponseHeader {
    let mut h = ResponseHeader::build(200, None).expect("valid status");
    for (k, v) in [
        ("content-type", "text/html; charset=utf-8"),
        ("cache-control", "public, max-age=3600"),
        ("etag", "\"abc123\""),
        ("last-modified", "Mon, 23 Nov 2026 10:00:00 GMT"),
        ("content-length", "1024"),
    ] {
        h.append_header(k, v).expect("valid header");
    }
    h
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let storage: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new()));
    let trace = Span::inactive().handle();
    let body = Bytes::from(vec![b'x'; 1024]);
    // 10k stored URLs, so lookups hit a populated table
    rt.block_on(async {
        for i in 0..10_000 {
            let key = key::for_request(&request(&format!("/page/{i}?q=1"))).expect("valid host");
            let now = SystemTime::now();
            let meta = CacheMeta::new(now + Duration::from_secs(3600), now, 10, 300, response());
            let mut miss = storage
                .get_miss_handler(&key, &meta, &trace)
                .await
                .expect("miss handler");
            miss.write_body(body.clone(), true).await.expect("write");
            miss.finish().await.expect("finish");
        }
    });
    let req = request("/page/4242?q=1");

    c.bench_function("cache_key", |b| {
        b.iter(|| key::for_request(black_box(&req)).expect("valid host"))
    });

    c.bench_function("key_and_l1_hit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let key = key::for_request(black_box(&req)).expect("valid host");
                let (meta, mut hit) = storage.lookup(&key, &trace).await.expect("lookup").expect("hit");
                let body = hit.read_body().await.expect("read").expect("body");
                black_box((meta.is_fresh(SystemTime::now()), body.len()))
            })
        })
    });

    c.bench_function("l1_miss", |b| {
        let missing = key::for_request(&request("/not/stored")).expect("valid host");
        b.iter(|| {
            rt.block_on(async {
                storage
                    .lookup(black_box(&missing), &trace)
                    .await
                    .expect("lookup")
                    .is_none()
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
