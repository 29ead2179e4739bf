//! A real HTTP/1.1 origin server for tests and for the demo (`cargo run --example origin`).
//!
//! It counts requests per path (with query), answers each path with a handler that sees the
//! request and its hit number, and can set any header, delay, hang, fail (5xx) or drop the
//! connection. It can be stopped and started again on the same port, to simulate an outage.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// What the origin answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
    /// Close the connection without answering.
    pub drop_connection: bool,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            drop_connection: false,
        }
    }
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn dropped() -> Self {
        Reply {
            drop_connection: true,
            ..Reply::ok("")
        }
    }
}

/// What a handler sees of a request.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// 1 for the first request to this path, 2 for the second...
    pub n: usize,
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Handler>>,
    hits: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    total: AtomicUsize,
}

impl State {
    fn counter(&self, path: &str) -> Arc<AtomicUsize> {
        self.hits
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .clone()
    }
}

/// A running (or stopped) origin.
pub struct Origin {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The demo's answer for unregistered paths: a page that is fresh for 10 s, or what the query
/// asks for (`?cc=no-store`, `?sleep=500`).
fn default_reply(seen: &Seen) -> Reply {
    let query: HashMap<&str, &str> = seen
        .path
        .split_once('?')
        .map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect())
        .unwrap_or_default();
    if let Some(size) = query.get("size").and_then(|s| s.parse::<usize>().ok()) {
        // a static body of `size` bytes, for load tests (varying on the field `vary` names)
        let reply = Reply::ok(vec![b'x'; size.min(64 << 20)])
            .header("content-type", "application/octet-stream")
            .header("cache-control", "public, max-age=3600");
        return match query.get("vary") {
            Some(field) => reply.header("vary", *field),
            None => reply,
        };
    }
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    let body = format!(
        "hello from the origin: {} (request #{} for it, at {now})\n",
        seen.path, seen.n
    );
    let cc = query.get("cc").map_or("public, max-age=10".to_string(), |v| {
        v.replace("%20", " ").replace("%2C", ",")
    });
    let delay = query
        .get("sleep")
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    Reply::ok(body)
        .header("content-type", "text/plain")
        .header("cache-control", cc)
        .delay(delay)
}

impl Origin {
    /// Start on a free loopback port.
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        Self::serve(listener, Arc::new(State::default()))
    }

    /// Start on `addr` (e.g. a fixed port for the demo).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener, Arc::new(State::default())))
    }

    fn serve(listener: TcpListener, state: Arc<State>) -> Origin {
        let addr = listener.local_addr().expect("origin address");
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(accept_loop(listener, state.clone(), stop.clone()));
        Origin {
            addr,
            state,
            stop,
            task: Some(task),
        }
    }

    /// Answer `path` (exact, with query) with `handler`.
    pub fn route(&self, path: &str, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), Arc::new(handler));
    }

    /// Requests seen for `path` (exact, with query).
    pub fn hits(&self, path: &str) -> usize {
        self.state.counter(path).load(Ordering::SeqCst)
    }

    /// Requests seen in total.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Stop listening and drop every open connection (an outage).
    pub async fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Listen again on the same port, with the same routes and counters.
    pub async fn restart(&mut self) {
        assert!(self.task.is_none(), "origin already running");
        let listener = TcpListener::bind(self.addr).await.expect("rebind origin");
        self.stop = Arc::new(Notify::new());
        self.task = Some(tokio::spawn(accept_loop(
            listener,
            self.state.clone(),
            self.stop.clone(),
        )));
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: Arc<Notify>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(req, state.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    }
    // dropping the JoinSet aborts every connection task: the outage is total
    conns.abort_all();
}

#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}
impl std::error::Error for Dropped {}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let n = state.counter(&path).fetch_add(1, Ordering::SeqCst) + 1;
    state.total.fetch_add(1, Ordering::SeqCst);
    let seen = Seen {
        method: req.method().clone(),
        path: path.clone(),
        headers: req.headers().clone(),
        n,
    };
    let handler = state.routes.lock().unwrap().get(&path).cloned();
    let reply = match handler {
        Some(h) => h(&seen),
        None => default_reply(&seen),
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if reply.drop_connection {
        return Err(Dropped);
    }
    let mut resp = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        resp = resp.header(k.as_str(), v.as_str());
    }
    Ok(resp.body(Full::new(reply.body)).expect("valid reply"))
}
