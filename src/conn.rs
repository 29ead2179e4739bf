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
//! | idle HTTP/1 keep-alive | `server.keepalive_timeout` (the wait for a request's first byte in [`Guarded`]'s loop; Pingora's keep-alive timeout, set by the proxy per request, while its session reads ahead) | closed |
//! | idle HTTP/2 connection | `server.keepalive_timeout` (Pingora's `h2_idle_timeout`) | closed |
//!
//! HTTP/1 connections are served by [`Guarded`]'s own loop: it reads each request head, lets
//! a [`Front`] (the proxy's fast hits) answer a plain GET or HEAD for a fresh cached entry
//! there and then, and hands every other request to Pingora's HTTP/1 session, with the bytes
//! already read as the session's first ([`ServerSession::set_pipelined_prefix`]). A fast hit
//! so skips Pingora's per-request session and its request future (about 13 KB, moved into a
//! box on every request); Pingora decides everything else, and every doubt is its.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType,
    ALPN,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// A request head as the connection read it, for a [`Front`] to answer.
pub struct Head<'a> {
    /// `GET` or `HEAD`: no other method reaches a [`Front`].
    pub head: bool,
    /// The request target in origin form (`/path?query`), its bytes checked by
    /// [`plain_target`].
    pub target: &'a str,
    pub http10: bool,
    pub headers: &'a [httparse::Header<'a>],
    /// Whether the response keeps the connection open (`connection: keep-alive`, or `close`).
    pub keep_alive: bool,
    pub stream: &'a Stream,
}

/// What answers some requests before Pingora's HTTP/1 session exists (the proxy's fast hits).
pub trait Front: Send + Sync + 'static {
    /// A response given, logged by [`Front::done`] once written.
    type Answer: Send;

    /// The answer to `head`, its status line and header written to `out` (empty on entry),
    /// with the body to write after it; `None` leaves the request to Pingora, which then
    /// reads the same bytes. Only for a head without a body (no `Content-Length`,
    /// `Transfer-Encoding`, `Expect` or `Upgrade`), and never once anything is written.
    fn answer(&self, head: &Head<'_>, out: &mut BytesMut) -> Option<(Self::Answer, Option<Bytes>)>;

    /// The answer was written (`written`), or the client went away during it.
    fn done(&self, answer: Self::Answer, written: bool);
}

/// An HTTP application ([`HttpServerApp`]: the proxy) with [`Limits`] around it, and its
/// HTTP/1 connections served by [`Guarded::http1`]'s loop with a [`Front`].
pub struct Guarded<A, F> {
    inner: Arc<A>,
    front: F,
    limits: Limits,
    /// Connections open now.
    open: AtomicUsize,
}

impl<A, F> Guarded<A, F> {
    pub fn new(inner: A, front: F, limits: Limits) -> Self {
        Guarded {
            inner: Arc::new(inner),
            front,
            limits,
            open: AtomicUsize::new(0),
        }
    }
}

/// The bytes a request head may take to be answered by the [`Front`]: a longer one goes to
/// Pingora whole (which allows far more).
const FRONT_HEAD_MAX: usize = 8 * 1024;

/// The header fields a [`Front`] is shown at most: a head with more goes to Pingora.
const FRONT_FIELDS_MAX: usize = 48;

/// Fields that give a request a body or another protocol: such a request is Pingora's.
const FRAMING: [&str; 4] = ["content-length", "transfer-encoding", "expect", "upgrade"];

/// A request target a [`Front`] may key by as it is: origin form (`/...`), and only bytes
/// that `http::Uri` keeps unchanged (RFC 3986's unreserved, sub-delims, `:@/?%`), so that
/// Pingora's `uri.path_and_query()` of the same bytes is the same text. Anything else goes
/// to Pingora.
pub fn plain_target(target: &[u8]) -> bool {
    target.first() == Some(&b'/')
        && target
            .iter()
            .all(|&b| crate::key::unreserved_or_sub_delim(b) || matches!(b, b':' | b'@' | b'/' | b'?' | b'%'))
}

/// Whether a response to this request keeps the connection (RFC 9112 §9.3), exactly as
/// Pingora 0.9.1's `respect_keepalive` decides: from the first `Connection` field alone,
/// `keep-alive` as its whole value keeps, a `close` token closes, anything else leaves the
/// version's default. `None` (the request is Pingora's) if there is more than one
/// `Connection` field, or a token other than `close` and `keep-alive` (a hop-by-hop field
/// to remove: Pingora's).
fn keep_alive(http10: bool, headers: &[httparse::Header<'_>]) -> Option<bool> {
    let mut fields = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"));
    let Some(field) = fields.next() else {
        return Some(!http10);
    };
    if fields.next().is_some() {
        return None;
    }
    if field.value.eq_ignore_ascii_case(b"keep-alive") {
        return Some(true);
    }
    let mut close = false;
    for token in field.value.split(|b| *b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
            return None;
        }
    }
    Some(!close && !http10)
}

/// Whether `buf` holds the end of a request head (an empty line: `\n\n`, or `\n\r\n`, as
/// `httparse` takes bare line feeds) at or after `from`.
fn head_ends(buf: &[u8], from: usize) -> bool {
    let mut i = from;
    while let Some(at) = buf
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        let lf = i + at;
        match buf.get(lf + 1) {
            Some(b'\n') => return true,
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return true,
            _ => i = lf + 1,
        }
    }
    false
}

/// What became of a request head read by the connection's loop.
enum Read {
    /// An empty line is in the buffer, within [`FRONT_HEAD_MAX`]: the head is complete (or
    /// not one `httparse` takes: Pingora's).
    Head,
    /// For Pingora: longer than [`FRONT_HEAD_MAX`].
    Pingora,
    /// The client closed, went silent, or the read failed: the connection ends.
    Gone,
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
impl<A: HttpServerApp + Send + Sync + 'static, F: Front> ServerApp for Guarded<A, F> {
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
        if h2
            || matches!(
                stream.selected_alpn_proto(),
                Some(ALPN::H2) | Some(ALPN::Custom(_))
            )
        {
            // HTTP/2 multiplexes: Pingora's h2_idle_timeout covers an idle connection
            return self.inner.process_new(stream, shutdown).await;
        }
        let stream: Stream = Box::new(Deadlined::new(
            stream,
            self.limits,
            accepted + self.limits.header_timeout,
        ));
        self.http1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

impl<A: HttpServerApp + Send + Sync + 'static, F: Front> Guarded<A, F> {
    /// An HTTP/1 connection, request after request: each head is read here, answered by the
    /// [`Front`] if it can, and otherwise handed to Pingora with the bytes read so far (see
    /// the module docs). Pingora's keep-alive loop, with the [`Front`] in front of it.
    async fn http1(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let mut buf = BytesMut::with_capacity(2048);
        let mut out = BytesMut::new();
        let mut shutdown = shutdown.clone();
        let mut first = true;
        loop {
            let read = self.read_head(&mut stream, &mut buf, first, &mut shutdown).await;
            first = false;
            match read {
                Read::Gone => return,
                Read::Head => {
                    let shutting_down = *shutdown.borrow();
                    if let Some((len, answer, body, keep)) =
                        self.front(&stream, &buf, shutting_down, &mut out)
                    {
                        buf.advance(len);
                        mark(&stream, |d| {
                            d.heads.fetch_add(1, Ordering::AcqRel);
                        });
                        let written = write_answer(&mut stream, &out, body.as_ref()).await.is_ok();
                        mark(&stream, |d| {
                            d.dones.fetch_add(1, Ordering::AcqRel);
                        });
                        self.front.done(answer, written);
                        if !(written && keep) {
                            stream.as_mut().shutdown().await;
                            return;
                        }
                        continue;
                    }
                }
                Read::Pingora => {}
            }
            match self.pingora(stream, std::mem::take(&mut buf), &shutdown).await {
                Some(s) => stream = s,
                None => return,
            }
        }
    }

    /// Read the next request head into `buf` (which may hold it, or its start, already: a
    /// pipelined request). The wait for its first byte is the keep-alive timeout (for the
    /// first request, [`Deadlined`]'s deadline from the accept), and ends at shutdown.
    async fn read_head(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        first: bool,
        shutdown: &mut ShutdownWatch,
    ) -> Read {
        // what is left of the last read after a request the front answered: empty lines
        // before a request line are ignored (RFC 9112 §2.2), and are not the next request's
        // start (which would end the idle wait's keep-alive timeout)
        let noise = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        buf.advance(noise);
        if !buf.is_empty() {
            // the start of the next request, read with the last one: [`Deadlined`] saw no
            // read begin it, and is told (its head has header_timeout from the next wait, here
            // or in Pingora's session)
            mark(stream, |d| d.began.store(true, Ordering::Release));
        } else {
            if *shutdown.borrow() {
                return Read::Gone;
            }
            buf.reserve(2048);
            let wait = async {
                if first {
                    stream.read_buf(buf).await
                } else {
                    match tokio::time::timeout(self.limits.keepalive_timeout, stream.read_buf(buf)).await {
                        Ok(read) => read,
                        Err(_) => Ok(0),
                    }
                }
            };
            let read = tokio::select! {
                read = wait => read,
                _ = shutdown.changed() => Ok(0),
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Read::Gone;
            }
        }
        let mut from = 0;
        loop {
            if head_ends(buf, from) {
                return Read::Head;
            }
            if buf.len() >= FRONT_HEAD_MAX {
                // Pingora reads on (it takes far longer heads)
                return Read::Pingora;
            }
            // the empty line may begin in the last two bytes read
            from = buf.len().saturating_sub(2);
            buf.reserve(2048);
            // within the head's deadline ([`Deadlined`])
            match stream.read_buf(buf).await {
                Ok(n) if n > 0 => {}
                _ => return Read::Gone,
            }
        }
    }

    /// The [`Front`]'s answer to the head at the start of `bytes` (which hold an empty line),
    /// with the head's length and whether the connection is kept after it; `None` if the
    /// request is Pingora's (`httparse` finds it invalid, or incomplete: blank lines first).
    fn front(
        &self,
        stream: &Stream,
        bytes: &[u8],
        shutting_down: bool,
        out: &mut BytesMut,
    ) -> Option<(usize, F::Answer, Option<Bytes>, bool)> {
        let mut fields = [httparse::EMPTY_HEADER; FRONT_FIELDS_MAX];
        let mut req = httparse::Request::new(&mut fields);
        let Ok(httparse::Status::Complete(len)) = req.parse(bytes) else {
            return None;
        };
        let head = match req.method? {
            "GET" => false,
            "HEAD" => true,
            _ => return None,
        };
        let target = req.path?;
        let http10 = match req.version? {
            1 => false,
            0 => true,
            _ => return None,
        };
        if !plain_target(target.as_bytes())
            || req
                .headers
                .iter()
                .any(|h| FRAMING.iter().any(|f| h.name.eq_ignore_ascii_case(f)))
        {
            return None;
        }
        let keep = keep_alive(http10, req.headers)? && !shutting_down;
        out.clear();
        let head = Head {
            head,
            target,
            http10,
            headers: req.headers,
            keep_alive: keep,
            stream,
        };
        let (answer, body) = self.front.answer(&head, out)?;
        Some((len, answer, body, keep))
    }

    /// Hand the connection to Pingora's HTTP/1 session for one request (more, while it reads
    /// ahead into the next one), `read` being the bytes of it already read. Returns the
    /// connection once a request is done and nothing of the next one is read, or `None` if
    /// it is closed.
    async fn pingora(&self, stream: Stream, read: BytesMut, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut session = ServerSession::new_http1(stream);
        // as Pingora's own loop sets a new connection (the proxy sets its keep-alive timeout)
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        let limit = self
            .inner
            .server_options()
            .and_then(|o| o.keepalive_request_limit);
        session.set_keepalive_reuses_remaining(limit);
        if !read.is_empty() {
            session.set_pipelined_prefix(read);
        }
        loop {
            let (stream, settings) = self.inner.process_new_http(session, shutdown).await?.consume();
            match settings {
                // Pingora read ahead into the next request (pipelined): its bytes are in the
                // settings, where only a session can take them
                Some(settings) if !surely_no_prefix(&settings) => {
                    session = ServerSession::new_http1(stream);
                    settings.apply_to_session(&mut session);
                }
                _ => return Some(stream),
            }
        }
    }
}

/// Whether Pingora's settings for a connection's next request surely carry no bytes of it.
/// Pingora 0.9.1 keeps them private; its `Debug` shows them
/// (`HttpPersistentSettings { keepalive_timeout: .., keepalive_reuses_remaining: ..,
/// user_context: .., pipelined_prefix: None, .. }`). Only the first `pipelined_prefix: ` is
/// read: the fields before it are not the client's, and the prefix's own bytes, which are
/// (a request may carry the text `pipelined_prefix: None`), are never looked at, nor
/// formatted ([`FirstField`] stops the formatting there). Anything else (bytes, another
/// layout in a later Pingora) counts as bytes, and the next request stays Pingora's: a
/// slower path, never a lost byte.
fn surely_no_prefix(settings: &pingora_core::apps::HttpPersistentSettings) -> bool {
    use std::fmt::Write;
    let mut shown = FirstField {
        text: String::with_capacity(128),
        value: None,
    };
    let _ = write!(shown, "{settings:?}");
    shown.value == Some(true)
}

/// A `fmt::Write` that keeps what is written until it holds [`PREFIX_FIELD`] and the four
/// bytes after it (whether they are `None`), then fails the formatting; or fails at
/// [`FIRST_FIELD_MAX`] bytes without it.
struct FirstField {
    text: String,
    value: Option<bool>,
}

const PREFIX_FIELD: &str = ", pipelined_prefix: ";
const FIRST_FIELD_MAX: usize = 512;

impl std::fmt::Write for FirstField {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.text.push_str(s);
        if let Some(at) = self.text.find(PREFIX_FIELD) {
            let value = &self.text.as_bytes()[at + PREFIX_FIELD.len()..];
            if value.len() >= 4 {
                self.value = Some(value.starts_with(b"None"));
                return Err(std::fmt::Error);
            }
        }
        if self.text.len() > FIRST_FIELD_MAX {
            return Err(std::fmt::Error);
        }
        Ok(())
    }
}

/// [`Deadlined`]'s counts of heads and responses, moved for a request the [`Front`] answers
/// (the proxy's hooks move them for Pingora's).
fn mark(stream: &Stream, f: impl FnOnce(&Deadlined)) {
    if let Some(d) = stream.as_any().downcast_ref::<Deadlined>() {
        f(d);
    }
}

/// Write a [`Front`]'s answer: its head and body in one vectored write where the socket
/// takes them.
async fn write_answer(stream: &mut Stream, head: &[u8], body: Option<&Bytes>) -> std::io::Result<()> {
    let body: &[u8] = body.map_or(&[], |b| b.as_ref());
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        let bufs = [std::io::IoSlice::new(head), std::io::IoSlice::new(body)];
        let n = stream.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    stream.write_all(body).await?;
    stream.flush().await
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
    /// A request head began in bytes read with the one before (pipelined), set by the
    /// [`Front`]'s loop: no longer idle, and its deadline starts at the next wait.
    began: AtomicBool,
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
            began: AtomicBool::new(false),
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
            // wait itself is keepalive_timeout, [`Guarded::read_head`]'s (or Pingora's, set by
            // the proxy, while its session reads ahead): no timer here on the hot path
            this.idle = counts.1 >= counts.0;
            this.deadline = None;
            // a head that arrived whole: no deadline left to start for it
            this.head_started = false;
        }
        if this.began.load(Ordering::Acquire) {
            this.began.store(false, Ordering::Release);
            this.idle = false;
            this.head_started = true;
            this.deadline = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_head_ends_at_its_empty_line_with_or_without_carriage_returns() {
        assert!(head_ends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 0));
        assert!(head_ends(b"GET / HTTP/1.1\nHost: h\n\n", 0));
        assert!(head_ends(b"GET / HTTP/1.1\r\nHost: h\n\r\nGET /next", 0));
        assert!(!head_ends(b"GET / HTTP/1.1\r\nHost: h\r\n", 0));
        assert!(!head_ends(b"GET / HTTP/1.1\r\nHost: h\r\n\r", 0));
        // an empty line that began before `from` still counts from the byte before it
        let split = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(head_ends(split, split.len() - 2 - 2));
    }

    proptest! {
        /// Wherever a read cuts a head, the scan from the last two bytes finds its end once
        /// the rest arrives, as a scan of the whole does.
        #[test]
        fn a_head_cut_anywhere_is_found_complete(cut in 0usize..40, lf_only in any::<bool>()) {
            let head: &[u8] = if lf_only { b"GET /a HTTP/1.1\nHost: h\nX: y\n\n" } else { b"GET /a HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\n" };
            let cut = cut.min(head.len() - 1);
            let first = &head[..cut];
            prop_assert!(!head_ends(first, 0));
            prop_assert!(head_ends(head, first.len().saturating_sub(2)));
        }

        /// A target the front keys by is the text Pingora's `uri.path_and_query()` gives.
        #[test]
        fn a_plain_target_is_what_http_keeps(target in "/[ -~]{0,40}") {
            if plain_target(target.as_bytes()) {
                let uri: http::Uri = target.parse().expect("a plain target parses");
                prop_assert_eq!(uri.path_and_query().map(|p| p.as_str()), Some(target.as_str()));
            }
        }
    }

    #[test]
    fn targets_that_are_not_plain_go_to_pingora() {
        for t in [
            "*",
            "http://h/a",
            "/a#frag",
            "/a b",
            "/a\"",
            "/{x}",
            "/a|b",
            "/é",
            "",
        ] {
            assert!(!plain_target(t.as_bytes()), "{t}");
        }
        for t in ["/", "/a/b?c=d&e=%20f", "/~u/x.y-z_w!$'()*+,;=:@"] {
            assert!(plain_target(t.as_bytes()), "{t}");
        }
    }

    /// The settings' `Debug` with no bytes read ahead, with some, and with bytes that show the
    /// text the check looks for.
    #[tokio::test]
    async fn the_prefix_check_reads_the_field_not_the_bytes() {
        use pingora_core::apps::HttpPersistentSettings;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(client));
        let session = ServerSession::new_http1(stream);
        let settings = |prefix: Option<&[u8]>| {
            let mut settings = HttpPersistentSettings::for_session(&session);
            if let Some(p) = prefix {
                settings.set_pipelined_prefix(BytesMut::from(p));
            }
            settings
        };
        assert!(surely_no_prefix(&settings(None)));
        assert!(!surely_no_prefix(&settings(Some(b"GET / HTTP/1.1\r\n"))));
        assert!(!surely_no_prefix(&settings(Some(
            b"X: a, pipelined_prefix: None, b"
        ))));
        assert!(!surely_no_prefix(&settings(Some(b", pipelined_prefix: None,"))));
        // a long prefix is not formatted past its first bytes
        let long = vec![b'x'; 1 << 20];
        assert!(!surely_no_prefix(&settings(Some(&long))));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let h = |v: &'static [u8]| httparse::Header {
            name: "Connection",
            value: v,
        };
        assert_eq!(keep_alive(false, &[]), Some(true));
        assert_eq!(keep_alive(true, &[]), Some(false));
        assert_eq!(keep_alive(true, &[h(b"Keep-Alive")]), Some(true));
        assert_eq!(keep_alive(false, &[h(b"close")]), Some(false));
        assert_eq!(keep_alive(false, &[h(b"keep-alive, CLOSE")]), Some(false));
        // as Pingora 0.9.1: `keep-alive` keeps only as the whole value; the version decides
        // otherwise
        assert_eq!(keep_alive(true, &[h(b"keep-alive,")]), Some(false));
        assert_eq!(keep_alive(true, &[h(b"keep-alive, keep-alive")]), Some(false));
        assert_eq!(keep_alive(false, &[h(b"keep-alive,")]), Some(true));
        // two fields: Pingora reads the first alone
        assert_eq!(keep_alive(false, &[h(b"keep-alive"), h(b"close")]), None);
        // another token names a field to remove: Pingora's
        assert_eq!(keep_alive(false, &[h(b"keep-alive, x-hop")]), None);
        assert_eq!(keep_alive(false, &[h(b"upgrade")]), None);
    }
}
