//! Cache efficiency on a realistic workload (issue 16): the origin and the load generator.
//!
//! `benches/workload.sh` runs the origin once, then starts corral, nginx `proxy_cache` and
//! Varnish in turn with the same memory budget in front of it and drives each with the same
//! requests.
//!
//! ```text
//! cargo bench --bench workload -- origin --port 9000 --objects 20000
//! cargo bench --bench workload -- drive --target corral=http://127.0.0.1:6081 \
//!     --origin http://127.0.0.1:9000 --objects 20000 --requests 100000 --alpha 0.8 --scan
//! ```
//!
//! **Objects.** `GET /o/<id>` for `id` in `0..N` (`--objects`, default 1,000,000) answers a body
//! of `size(id)` bytes, `Cache-Control: public, max-age=86400`, and an `x-serial` header that
//! numbers the origin's answers (0, 1, 2...). Sizes are drawn once per id with a fixed seed: a
//! log-normal body (median 3 KiB, σ 1.3: about 82% of the objects are under 10 KiB) and, for 0.5%
//! of the objects, a Pareto tail from 64 KiB (shape 1.0: about 300 objects in a million are over
//! 1 MiB), within 64 B..=4 MiB. The origin slices one static buffer (no body is allocated per
//! request) and counts the requests and body bytes it served, which `GET /_stats` returns as
//! JSON.
//!
//! **Requests.** `--requests R` (default 2,000,000) ids drawn from a Zipf distribution over
//! popularity ranks (exponent `--alpha`), mapped to ids through a fixed random permutation, so
//! popularity and size are independent. With `--scan`, a crawler asks for every id once, in id
//! order: its N requests are spread evenly over the middle third of the Zipf requests (after
//! every Zipf request of that third, the scan requests that are due), so the run has R + N
//! requests and the scan is over when the last third begins. The sequence depends only on the
//! seed, N, R, α and the scan: every system is driven with the same one. `--connections C`
//! (default 32) keep-alive HTTP/1.1 connections take the next request of the sequence in turn.
//!
//! **Measures.** Each answer's body length is checked against `size(id)` (any mismatch, other
//! status than 200, or transport error is counted and fails the run). Over the whole run, the
//! origin's own counters (`/_stats` before and after) give the origin requests and bytes, hence
//! the request hit ratio `1 - origin requests / requests` and the byte hit ratio
//! `1 - origin bytes / client bytes`. Per third of the run, an answer is a miss when its
//! `x-serial` is one the client has not seen before (a request the origin answered for this
//! run; answers shared by collapsed requests count once): the last third, after the scan, shows
//! how well the cache recovered. Latency is from sending the request to the end of the body.
//!
//! The Zipf and size draws use `rand` 0.8 (already in Cargo.lock) and `rand_distr` 0.4 (its
//! distributions for rand 0.8), dev-dependencies of this bench only.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[path = "shared/workload_plan.rs"]
mod workload_plan;
use workload_plan::{object_sizes, Plan, MAX_SIZE};

/// The header that numbers the origin's answers.
const SERIAL: &str = "x-serial";
const THIRDS: [&str; 3] = ["first_third", "middle_third", "last_third"];

#[derive(Parser)]
#[command(about = "Workload benchmark of caching proxies (issue 16): origin and load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Runtime worker threads (1: a single-threaded runtime)
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Added by `cargo bench`; ignored
    #[arg(long = "bench", global = true, hide = true)]
    _bench: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the objects on 127.0.0.1 until killed; prints `origin ready <url>` once listening
    Origin(OriginArgs),
    /// Drive targets (in turn) with the request sequence and print what they did
    Drive(DriveArgs),
}

#[derive(Args)]
struct Workload {
    /// Distinct objects (ids 0..N)
    #[arg(long, default_value_t = 1_000_000)]
    objects: u32,
    /// Seed of the sizes, the popularity order and the request sequence
    #[arg(long, default_value_t = 16)]
    seed: u64,
}

#[derive(Args)]
struct OriginArgs {
    #[command(flatten)]
    workload: Workload,
    /// Port on 127.0.0.1 (0: any free port)
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Args)]
struct DriveArgs {
    #[command(flatten)]
    workload: Workload,
    /// A system to drive, as NAME=URL or URL (e.g. corral=http://127.0.0.1:6081); repeatable
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// The origin the targets are in front of, started with the same --objects and --seed
    #[arg(long)]
    origin: String,
    /// Zipf exponent of the popularity
    #[arg(long, default_value_t = 0.8)]
    alpha: f64,
    /// Zipf requests in the run (the scan's requests come on top)
    #[arg(long, default_value_t = 2_000_000)]
    requests: u64,
    /// A crawler asks for every id once, over the middle third of the run
    #[arg(long)]
    scan: bool,
    /// Keep-alive HTTP/1.1 connections
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Host header of the requests (default: the target URL's host and port)
    #[arg(long)]
    host: Option<String>,
    /// Seconds a request may take before it is counted as an error
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Also print the results as one JSON line
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Some(cmd) = cli.cmd else {
        // `cargo bench` with no arguments runs every bench: nothing to do here on its own
        eprintln!("workload: run benches/workload.sh, or `cargo bench --bench workload -- --help`");
        return Ok(());
    };
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    let passed = match cmd {
        Cmd::Origin(args) => runtime.block_on(serve_origin(args)).map(|()| true)?,
        Cmd::Drive(args) => runtime.block_on(drive(args))?,
    };
    drop(runtime);
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The workload: object sizes and the request sequence are in `shared/workload_plan.rs`

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line about the sizes: median, p90, p99, mean, largest, how many over 1 MiB.
fn describe_sizes(sizes: &[u32]) -> String {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| f64::from(sorted[((sorted.len() - 1) as f64 * q).round() as usize]);
    let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    let over_1mib = sizes.iter().filter(|&&s| s > 1 << 20).count();
    let under_10kib = sizes.iter().filter(|&&s| s < 10 << 10).count();
    format!(
        "{} objects, {} in all; size median {}, p90 {}, p99 {}, mean {}, largest {}; {:.1}% under 10 KiB, {over_1mib} over 1 MiB",
        sizes.len(),
        human_bytes(total as f64),
        human_bytes(at(0.5)),
        human_bytes(at(0.9)),
        human_bytes(at(0.99)),
        human_bytes(total as f64 / sizes.len() as f64),
        human_bytes(at(1.0)),
        100.0 * under_10kib as f64 / sizes.len() as f64,
    )
}

// ---------------------------------------------------------------------------------------------
// The origin

struct OriginState {
    sizes: Vec<u32>,
    /// `MAX_SIZE` bytes, sliced for every answer.
    body: &'static [u8],
    requests: AtomicU64,
    bytes: AtomicU64,
    objects: u32,
    seed: u64,
}

/// What `GET /_stats` of the origin says.
#[derive(Deserialize)]
struct OriginStats {
    /// Object requests served so far (the next answer's `x-serial`).
    requests: u64,
    /// Body bytes of those answers.
    bytes: u64,
    objects: u32,
    seed: u64,
}

async fn serve_origin(args: OriginArgs) -> anyhow::Result<()> {
    let (objects, seed) = (args.workload.objects, args.workload.seed);
    let sizes = object_sizes(objects, seed);
    let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    let state = Arc::new(OriginState {
        sizes,
        body: Box::leak(vec![b'x'; MAX_SIZE].into_boxed_slice()),
        requests: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        objects,
        seed,
    });
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("origin: cannot listen on 127.0.0.1:{}", args.port))?;
    let port = listener.local_addr()?.port();
    println!(
        "origin ready http://127.0.0.1:{port} ({objects} objects, {}, seed {seed})",
        human_bytes(total as f64)
    );
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // e.g. out of file descriptors: wait for some to be closed
                eprintln!("origin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, state: &OriginState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/_stats" {
        let stats = serde_json::json!({
            "requests": state.requests.load(Ordering::Relaxed),
            "bytes": state.bytes.load(Ordering::Relaxed),
            "objects": state.objects,
            "seed": state.seed,
        });
        let mut resp = Response::new(Full::new(Bytes::from(stats.to_string())));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    }
    let size = path
        .strip_prefix("/o/")
        .and_then(|id| id.parse::<usize>().ok())
        .and_then(|id| state.sizes.get(id).copied());
    let Some(size) = size else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"no such object\n")));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    };
    let serial = state.requests.fetch_add(1, Ordering::Relaxed);
    state.bytes.fetch_add(u64::from(size), Ordering::Relaxed);
    let body: &'static [u8] = state.body;
    let len = usize::try_from(size).expect("sizes are at most MAX_SIZE");
    let mut resp = Response::new(Full::new(Bytes::from_static(&body[..len])));
    let headers = resp.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(SERIAL, HeaderValue::from(serial));
    resp
}

// ---------------------------------------------------------------------------------------------
// The client

/// A system to drive, or the origin.
struct Endpoint {
    name: String,
    /// `host:port` to connect to.
    addr: String,
    /// The URL's authority, the default Host header.
    authority: String,
}

impl Endpoint {
    /// `NAME=URL` or `URL` (named after its authority); plain `http://` only.
    fn parse(spec: &str) -> anyhow::Result<Endpoint> {
        let (name, url) = match spec.split_once('=') {
            Some((name, url)) if !name.contains('/') => (Some(name), url),
            _ => (None, spec),
        };
        let uri: Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
        ensure!(uri.scheme_str() == Some("http"), "{url:?}: only http:// URLs");
        let host = uri.host().with_context(|| format!("{url:?} has no host"))?;
        let authority = uri
            .authority()
            .with_context(|| format!("{url:?} has no host"))?
            .as_str()
            .to_string();
        let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        Ok(Endpoint {
            name: name.map_or_else(|| authority.clone(), str::to_string),
            addr,
            authority,
        })
    }
}

async fn connect(addr: &str) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

impl OriginStats {
    async fn fetch(origin: &Endpoint) -> anyhow::Result<OriginStats> {
        let mut sender = connect(&origin.addr).await?;
        sender.ready().await?;
        let req = Request::get("/_stats")
            .header(HOST, origin.authority.as_str())
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        ensure!(resp.status() == StatusCode::OK, "GET /_stats: {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body).context("GET /_stats: not the workload origin's JSON")
    }
}

/// One answer, as the client saw it.
struct Answer {
    status: StatusCode,
    serial: Option<u64>,
    len: u64,
}

/// Send `GET path` and read the whole answer.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    path: &str,
    host: &HeaderValue,
) -> anyhow::Result<Answer> {
    sender.ready().await?;
    let req = Request::get(path).header(HOST, host.clone()).body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let serial = resp
        .headers()
        .get(SERIAL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut body = resp.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len() as u64;
        }
    }
    Ok(Answer { status, serial, len })
}

/// The origin's serials this run has seen: one bit each, from the origin's request count at the
/// start of the run.
struct SerialSet {
    base: u64,
    words: Vec<AtomicU64>,
}

enum Sight {
    /// Not seen before in this run: the origin answered a request of this run.
    New,
    /// Seen before in this run (a hit, or a collapsed miss already counted).
    Seen,
    /// Older than the run (a target reused without a restart): a hit.
    Before,
    /// Beyond the set's capacity: counted as new, and reported.
    Outside,
}

impl SerialSet {
    fn new(base: u64, capacity: usize) -> SerialSet {
        SerialSet {
            base,
            words: (0..capacity.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn sight(&self, serial: u64) -> Sight {
        let Some(offset) = serial.checked_sub(self.base) else {
            return Sight::Before;
        };
        let word = usize::try_from(offset / 64).ok().and_then(|w| self.words.get(w));
        let Some(word) = word else {
            return Sight::Outside;
        };
        let bit = 1u64 << (offset % 64);
        if (word.fetch_or(bit, Ordering::Relaxed) & bit) == 0 {
            Sight::New
        } else {
            Sight::Seen
        }
    }
}

/// What the load tasks share for one target.
struct Shared {
    plan: Arc<Plan>,
    sizes: Arc<Vec<u32>>,
    next: AtomicUsize,
    seen: SerialSet,
    addr: String,
    host: HeaderValue,
    timeout: Duration,
}

/// Answers of one third of the run.
#[derive(Default)]
struct Third {
    /// Verified answers.
    ok: u64,
    /// Their body bytes.
    bytes: u64,
    /// Those of them the origin answered for this run (a serial seen for the first time).
    origin: u64,
    origin_bytes: u64,
    /// Latency of each verified answer, µs.
    latency_us: Vec<u32>,
}

/// What the load tasks counted.
#[derive(Default)]
struct Tally {
    thirds: [Third; 3],
    /// Connection failures, transport errors and timeouts.
    transport: u64,
    /// Answers with another status than 200.
    status: u64,
    /// Answers whose body length is not size(id).
    length: u64,
    /// Answers without a readable `x-serial`.
    no_serial: u64,
    /// Serials beyond the set's capacity (counted as origin answers).
    outside: u64,
    /// The first few failures, for the report.
    examples: Vec<String>,
}

impl Tally {
    fn failures(&self) -> u64 {
        self.transport + self.status + self.length + self.no_serial
    }

    fn note(&mut self, example: String) {
        if self.examples.len() < 5 {
            self.examples.push(example);
        }
    }

    fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.thirds.iter_mut().zip(other.thirds) {
            mine.ok += theirs.ok;
            mine.bytes += theirs.bytes;
            mine.origin += theirs.origin;
            mine.origin_bytes += theirs.origin_bytes;
            mine.latency_us.extend(theirs.latency_us);
        }
        self.transport += other.transport;
        self.status += other.status;
        self.length += other.length;
        self.no_serial += other.no_serial;
        self.outside += other.outside;
        for example in other.examples {
            self.note(example);
        }
    }
}

/// One keep-alive connection: takes the next request of the sequence until there is none.
async fn load_task(shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    loop {
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(&id) = shared.plan.seq.get(index) else {
            break;
        };
        // a connection the server closed (e.g. `Connection: close` after its request limit)
        // is replaced, not counted
        let ready = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            sender = None;
            match connect(&shared.addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    tally.transport += 1;
                    tally.note(format!("/o/{id}: {e:#}"));
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            continue;
        };
        let path = format!("/o/{id}");
        let started = Instant::now();
        let result = tokio::time::timeout(shared.timeout, exchange(s, &path, &shared.host)).await;
        let latency_us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let answer = match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                sender = None;
                tally.transport += 1;
                tally.note(format!("{path}: {e:#}"));
                continue;
            }
            Err(_) => {
                sender = None;
                tally.transport += 1;
                tally.note(format!("{path}: no answer within {:?}", shared.timeout));
                continue;
            }
        };
        if answer.status != StatusCode::OK {
            tally.status += 1;
            tally.note(format!("{path}: status {}", answer.status));
            continue;
        }
        let expected = u64::from(shared.sizes[id as usize]);
        if answer.len != expected {
            tally.length += 1;
            tally.note(format!("{path}: {} body bytes, expected {expected}", answer.len));
            continue;
        }
        let Some(serial) = answer.serial else {
            tally.no_serial += 1;
            tally.note(format!("{path}: no {SERIAL} header"));
            continue;
        };
        let from_origin = match shared.seen.sight(serial) {
            Sight::New => true,
            Sight::Seen | Sight::Before => false,
            Sight::Outside => {
                tally.outside += 1;
                true
            }
        };
        let third = &mut tally.thirds[shared.plan.third_of(index)];
        third.ok += 1;
        third.bytes += answer.len;
        third.latency_us.push(latency_us);
        if from_origin {
            third.origin += 1;
            third.origin_bytes += answer.len;
        }
    }
    tally
}

/// `1 - part / whole`, 0 for an empty whole.
fn hit_ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        1.0 - part as f64 / whole as f64
    }
}

/// Percentile `q` of sorted µs values, in ms.
fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted_us[index]) / 1000.0
}

async fn drive(args: DriveArgs) -> anyhow::Result<bool> {
    let (objects, seed) = (args.workload.objects, args.workload.seed);
    ensure!(objects > 0, "--objects must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    let origin = Endpoint::parse(&args.origin)?;
    let targets = args
        .targets
        .iter()
        .map(|t| Endpoint::parse(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sizes = Arc::new(object_sizes(objects, seed));
    let plan = Arc::new(Plan::new(objects, seed, args.alpha, args.requests, args.scan)?);
    eprintln!("workload: {}", describe_sizes(&sizes));
    eprintln!(
        "workload: {} requests: {} Zipf (alpha {}) + {} scan, {} connections",
        plan.seq.len(),
        plan.zipf_requests,
        args.alpha,
        plan.scan_requests,
        args.connections
    );
    let mut passed = true;
    for target in &targets {
        passed &= drive_target(&args, target, &origin, &sizes, &plan).await?;
    }
    Ok(passed)
}

async fn drive_target(
    args: &DriveArgs,
    target: &Endpoint,
    origin: &Endpoint,
    sizes: &Arc<Vec<u32>>,
    plan: &Arc<Plan>,
) -> anyhow::Result<bool> {
    let before = OriginStats::fetch(origin)
        .await
        .with_context(|| format!("origin {}", origin.addr))?;
    if before.objects != args.workload.objects || before.seed != args.workload.seed {
        bail!(
            "the origin serves {} objects with seed {}, not {} with seed {}: start it with the same --objects and --seed",
            before.objects,
            before.seed,
            args.workload.objects,
            args.workload.seed
        );
    }
    let host = args.host.as_deref().unwrap_or(&target.authority);
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        sizes: sizes.clone(),
        next: AtomicUsize::new(0),
        // at most one origin answer per request, unless the target fetches on its own: room
        // for twice that
        seen: SerialSet::new(before.requests, 2 * plan.seq.len() + 1024),
        addr: target.addr.clone(),
        host: HeaderValue::from_str(host).with_context(|| format!("Host {host:?}"))?,
        timeout: Duration::from_secs(args.timeout),
    });
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.connections {
        tasks.spawn(load_task(shared.clone()));
    }
    let mut tally = Tally::default();
    while let Some(done) = tasks.join_next().await {
        tally.merge(done.context("a load task panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = OriginStats::fetch(origin)
        .await
        .with_context(|| format!("origin {}", origin.addr))?;
    let origin_requests = after.requests.saturating_sub(before.requests);
    let origin_bytes = after.bytes.saturating_sub(before.bytes);

    let ok: u64 = tally.thirds.iter().map(|t| t.ok).sum();
    let client_bytes: u64 = tally.thirds.iter().map(|t| t.bytes).sum();
    let origin_seen: u64 = tally.thirds.iter().map(|t| t.origin).sum();
    let mut all_us: Vec<u32> = Vec::with_capacity(usize::try_from(ok).unwrap_or(0));
    for third in &mut tally.thirds {
        third.latency_us.sort_unstable();
        all_us.extend_from_slice(&third.latency_us);
    }
    all_us.sort_unstable();
    let hit = hit_ratio(origin_requests, ok);
    let byte_hit = hit_ratio(origin_bytes, client_bytes);
    let last = &tally.thirds[2];
    let last_hit = hit_ratio(last.origin, last.ok);
    let last_byte_hit = hit_ratio(last.origin_bytes, last.bytes);
    let rps = ok as f64 / elapsed.max(1e-9);
    let p50 = percentile_ms(&all_us, 0.5);
    let p99 = percentile_ms(&all_us, 0.99);
    let failures = tally.failures();

    println!(
        "{:<10} alpha={} scan={}  requests {}  origin {origin_requests}  hit {:.1}%  byte-hit {:.1}%  | last third: hit {:.1}%  byte-hit {:.1}%  | {rps:.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  errors {failures}",
        target.name,
        args.alpha,
        if args.scan { "yes" } else { "no" },
        plan.seq.len(),
        100.0 * hit,
        100.0 * byte_hit,
        100.0 * last_hit,
        100.0 * last_byte_hit,
    );
    if failures > 0 {
        eprintln!(
            "{}: FAILED: {} transport errors or timeouts, {} answers not 200, {} bodies of the wrong length, {} without {SERIAL}; e.g.:",
            target.name, tally.transport, tally.status, tally.length, tally.no_serial
        );
        for example in &tally.examples {
            eprintln!("  {example}");
        }
    }
    if tally.outside > 0 {
        eprintln!(
            "{}: note: {} serials beyond the expected range (the target fetched more than it was asked?)",
            target.name, tally.outside
        );
    }
    if args.json {
        let thirds: Vec<serde_json::Value> = tally
            .thirds
            .iter()
            .zip(THIRDS)
            .map(|(t, name)| {
                serde_json::json!({
                    "name": name,
                    "requests": t.ok,
                    "bytes": t.bytes,
                    "origin_requests": t.origin,
                    "origin_bytes": t.origin_bytes,
                    "hit_ratio": hit_ratio(t.origin, t.ok),
                    "byte_hit_ratio": hit_ratio(t.origin_bytes, t.bytes),
                    "p50_ms": percentile_ms(&t.latency_us, 0.5),
                    "p99_ms": percentile_ms(&t.latency_us, 0.99),
                })
            })
            .collect();
        let line = serde_json::json!({
            "system": target.name,
            "objects": args.workload.objects,
            "seed": args.workload.seed,
            "alpha": args.alpha,
            "scan": args.scan,
            "zipf_requests": plan.zipf_requests,
            "scan_requests": plan.scan_requests,
            "requests": plan.seq.len(),
            "ok": ok,
            "connections": args.connections,
            "client_bytes": client_bytes,
            "origin_requests": origin_requests,
            "origin_bytes": origin_bytes,
            "origin_requests_seen": origin_seen,
            "hit_ratio": hit,
            "byte_hit_ratio": byte_hit,
            "last_third_hit_ratio": last_hit,
            "last_third_byte_hit_ratio": last_byte_hit,
            "elapsed_s": elapsed,
            "rps": rps,
            "p50_ms": p50,
            "p99_ms": p99,
            "errors": failures,
            "errors_transport": tally.transport,
            "errors_status": tally.status,
            "errors_length": tally.length,
            "errors_no_serial": tally.no_serial,
            "thirds": thirds,
        });
        println!("{line}");
    }
    Ok(failures == 0)
}
