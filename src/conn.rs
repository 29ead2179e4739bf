//! Client connections: how many may be open, and how long each may stay silent.
//!
//! Pingora 0.9.1 leaves three doors open that a client can hold with nothing but silence:
//! a new connection waits for its first bytes without a limit (the h2c preface check), each
//! read of a request head has its own 60 s timeout (so a head trickled a byte at a time never
//! ends), and nothing caps how many connections are open, so idle ones can take every file
//! descriptor. corral wraps the proxy's [`ServerApp`] in [`Guarded`]:
//!
//! | what | limit | then |
//! |---|---|---|
//! | open connections | `server.max_connections` | the new one gets a 503 and is closed at once |
//! | first bytes of a connection | `server.header_timeout` from accept | closed |
//! | a whole HTTP/1 request head | `server.header_timeout` from its first byte (the accept for the first request) | closed |
//! | idle HTTP/1 keep-alive | `server.keepalive_timeout` (Pingora's keep-alive timeout, set by the proxy per request) | closed |
//! | idle HTTP/2 connection | `server.keepalive_timeout` (Pingora's `h2_idle_timeout`) | closed |
//!
//! The head deadline lives in [`Deadlined`], a wrapper around the connection's stream. It
//! knows where a request starts from the bytes (the first one after an idle wait) and where
//! it ends from the proxy: [`head_received`] (in `request_filter`) stops the clock, and
//! [`request_done`] (in `logging`) makes the connection idle again. The clock is a timer only
//! when a read of a head has to wait (a head usually arrives in one packet), so a hit costs
//! no timer of corral's. Reads while a request is in progress (its body, Pingora's check for a
//! client that went away while the response streams) have no deadline from here: Pingora's own
//! read timeouts cover them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics;

/// The HTTP/2 connection preface (RFC 9113 §3.4): a connection that starts with it is h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection over the cap gets before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The connection limits of the proxy listener (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
}

/// A [`ServerApp`] with [`Limits`] around it.
pub struct Guarded<A> {
    inner: Arc<A>,
    limits: Limits,
    /// Connections open now.
    open: AtomicUsize,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: Limits) -> Self {
        Guarded {
            inner: Arc::new(inner),
            limits,
            open: AtomicUsize::new(0),
        }
    }
}

/// One open connection, counted while it lives.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(open: &'a AtomicUsize, max: usize) -> Option<Slot<'a>> {
        let now = open.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = Slot(open);
        metrics::CONNECTIONS.inc();
        // over the cap: the slot goes again when dropped here
        (now <= max).then_some(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::CONNECTIONS.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let Some(_slot) = Slot::take(&self.open, self.limits.max_connections) else {
            metrics::CONNECTIONS_REFUSED.inc();
            // a clean answer, then the descriptor goes back at once
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(BUSY).await;
                let _ = stream.flush().await;
                stream.as_mut().shutdown().await;
            })
            .await;
            return None;
        };
        let accepted = Instant::now();
        // Pingora reads the first 24 bytes (to tell h2c from HTTP/1) without a time limit
        let mut preface = [0u8; H2_PREFACE.len()];
        let h2 = match tokio::time::timeout(self.limits.header_timeout, stream.try_peek(&mut preface)).await {
            Ok(Ok(peeked)) => peeked && preface == *H2_PREFACE,
            // closed before 24 bytes (a load balancer's TCP check, a tiny HTTP/1.0 request)
            Ok(Err(_)) => return None,
            // silent, or a short request that never went on
            Err(_) => {
                metrics::CONNECTION_TIMEOUTS.with_label_values(&["header"]).inc();
                return None;
            }
        };
        let stream: Stream = if h2 {
            // HTTP/2 multiplexes: Pingora's h2_idle_timeout covers an idle connection
            stream
        } else {
            Box::new(Deadlined::new(
                stream,
                self.limits,
                accepted + self.limits.header_timeout,
            ))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// An HTTP/1 client stream whose reads fail with `TimedOut` once a request head or an idle
/// wait takes too long (see the module docs).
#[derive(Debug)]
pub struct Deadlined {
    inner: Stream,
    limits: Limits,
    /// Request heads received and requests done on this connection, counted by the proxy's
    /// hooks ([`head_received`], [`request_done`]). Counts, not a state: a request served
    /// whole between two reads (pipelined) still moves them.
    heads: AtomicU64,
    dones: AtomicU64,
    /// The counts the deadline below was worked out for.
    seen: (u64, u64),
    /// Idle, waiting for the first byte of the next request.
    idle: bool,
    /// A head began since the last read that waited: its deadline starts at the next wait.
    head_started: bool,
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadlined {
    fn new(inner: Stream, limits: Limits, deadline: Instant) -> Self {
        Deadlined {
            inner,
            limits,
            heads: AtomicU64::new(0),
            dones: AtomicU64::new(0),
            seen: (0, 0),
            idle: false,
            head_started: false,
            deadline: Some(deadline),
            sleep: None,
        }
    }

    fn of(session: &pingora_proxy::Session) -> Option<&Deadlined> {
        session
            .as_downstream()
            .stream()?
            .as_any()
            .downcast_ref::<Deadlined>()
    }
}

/// The request head has arrived: no deadline from here until the request is done.
pub fn head_received(session: &pingora_proxy::Session) {
    if let Some(d) = Deadlined::of(session) {
        d.heads.fetch_add(1, Ordering::AcqRel);
    }
}

/// The response is written: the connection is idle until the next request's first byte.
pub fn request_done(session: &pingora_proxy::Session) {
    if let Some(d) = Deadlined::of(session) {
        d.dones.fetch_add(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let counts = (
            this.heads.load(Ordering::Acquire),
            this.dones.load(Ordering::Acquire),
        );
        if counts != this.seen {
            this.seen = counts;
            // every request received is done: idle; otherwise one is in progress. The idle
            // wait itself is Pingora's keep-alive timeout (the proxy sets it to
            // keepalive_timeout): no timer of ours on the hot path
            this.idle = counts.1 >= counts.0;
            this.deadline = None;
            // a head that arrived whole: no deadline left to start for it
            this.head_started = false;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.idle && buf.filled().len() > before {
                    // the next request began: its whole head has header_timeout, from the
                    // first read of it that has to wait (no clock read on the hot path, where
                    // a head arrives whole)
                    this.idle = false;
                    this.head_started = true;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if std::mem::take(&mut this.head_started) {
            this.deadline = Some(Instant::now() + this.limits.header_timeout);
        }
        let Some(deadline) = this.deadline else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::CONNECTION_TIMEOUTS.with_label_values(&["header"]).inc();
                this.deadline = None;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client header timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Deadlined {
    async fn shutdown(&mut self) {
        self.inner.as_mut().shutdown().await
    }
}

impl UniqueID for Deadlined {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadlined {
    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora_core::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadlined {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadlined {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Deadlined {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora_core::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Deadlined {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Raise the soft limit of open files to the hard limit; returns the soft limit in force
/// afterwards (`None` if it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}
