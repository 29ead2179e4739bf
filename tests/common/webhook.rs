//! A webhook receiver for tests: an HTTP/1.1 server that records every request it gets
//! (method, path, content type, body) and answers 200, or first the failure statuses it was
//! told to answer (one per request, in order), then 200.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request the receiver got, and the status it answered.
#[derive(Clone, Debug)]
pub struct Hooked {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: String,
    pub status: u16,
    /// When it arrived (its body read).
    pub at: Instant,
}

#[derive(Default)]
struct State {
    failures: Mutex<VecDeque<u16>>,
    seen: Mutex<Vec<Hooked>>,
}

/// A running receiver, stopped on drop.
pub struct Webhook {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> Webhook {
        Webhook::failing(&[]).await
    }

    /// A receiver that answers `statuses` to its first requests (one each), then 200.
    pub async fn failing(statuses: &[u16]) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            failures: Mutex::new(statuses.iter().copied().collect()),
            seen: Mutex::default(),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, state.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Webhook { addr, state, task }
    }

    /// The URL to configure: `http://<addr>/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Hooked> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests arrived (delivery attempts).
    pub fn attempts(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// The bodies of the requests answered 200 (delivered events).
    pub fn delivered(&self) -> Vec<String> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.status == 200)
            .map(|h| h.body.clone())
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req.into_body().collect().await?.to_bytes();
    let status = state.failures.lock().unwrap().pop_front().unwrap_or(200);
    state.seen.lock().unwrap().push(Hooked {
        method,
        path,
        content_type,
        body: String::from_utf8_lossy(&body).to_string(),
        status,
        at: Instant::now(),
    });
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"ok\n")))
        .unwrap())
}
