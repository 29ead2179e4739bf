//! A tiny demo origin for trying corral by hand.
//!
//! ```text
//! cargo run --example origin            # listens on 127.0.0.1:8080 (corral's default upstream)
//! cargo run                             # corral on 127.0.0.1:6081, in another terminal
//! curl -si localhost:6081/hello         # cache-status: corral; fwd=miss; stored
//! curl -si localhost:6081/hello         # cache-status: corral; hit; ttl=9
//! curl -si 'localhost:6081/p?cc=no-store'    # never stored
//! curl -si 'localhost:6081/slow?sleep=1000'  # a slow page: try ten of these at once
//! curl -s  localhost:6081/blob?size=1024 | wc -c    # a static 1 KiB body, fresh for an hour
//! ```
//!
//! Every path answers `Cache-Control: public, max-age=10` unless `?cc=` says otherwise.
//! An optional argument sets the address: `cargo run --example origin -- 127.0.0.1:9000`.

#[path = "../tests/common/origin.rs"]
mod origin;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let addr = addr.parse().expect("address like 127.0.0.1:8080");
    let origin = origin::Origin::start_on(addr).await.unwrap_or_else(|e| {
        eprintln!("origin: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    println!("demo origin listening on http://{}", origin.addr);
    tokio::signal::ctrl_c().await.expect("ctrl-c handler");
}
