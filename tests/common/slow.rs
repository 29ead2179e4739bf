//! A raw origin whose first answer stalls until the test lets it go on: a fill in progress
//! that the test controls (purges during a fill, L2 writes that land late), stalled mid-body
//! or, with [`SlowOrigin::holding_the_header`], before its header.

use crate::common::{client, Proxy};

/// How long a test waits for the origin to get a request, or for a held request's answer.
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A raw origin that sends the header and half of a chunked body (`v<n>-aa`), then waits
/// for the test before the rest (`bbbbb`); later requests are answered at once. Each answer
/// carries `xkey: slow`.
pub struct SlowOrigin {
    pub addr: std::net::SocketAddr,
    /// The request whose answer is held ([`SlowOrigin::holding_the_header`]).
    held: usize,
    go_on: Option<tokio::sync::oneshot::Sender<()>>,
    requests: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl SlowOrigin {
    pub async fn start() -> SlowOrigin {
        SlowOrigin::launch(false, false, false).await
    }

    /// A slow origin whose first answer is composed (its version taken) as soon as the
    /// request arrives, and sent, header and all, only when the test lets it go on: content
    /// made before whatever the test does next, which reaches corral after it.
    pub async fn holding_the_header() -> SlowOrigin {
        SlowOrigin::launch(true, false, false).await
    }

    /// [`SlowOrigin::holding_the_header`], after a first answer (`v1`) marked
    /// `Cache-Control: private` and sent at once: corral remembers the URL as uncacheable
    /// (hit-for-miss) and bypasses its cache for the next request, whose answer (`v2`) is
    /// held, and cacheable.
    pub async fn private_then_holding_the_header() -> SlowOrigin {
        SlowOrigin::launch(true, true, false).await
    }

    /// A first answer (`v1`) fresh for one second and usable on errors for a minute
    /// (`stale-if-error=60`), sent at once; the next request is held, then answered `503`:
    /// a revalidation that fails while the test does something, with a stale copy to fall
    /// back on ([`SlowOrigin::stale_fill`]).
    pub async fn stale_then_held_error() -> SlowOrigin {
        SlowOrigin::launch(true, true, true).await
    }

    async fn launch(hold_header: bool, private_first: bool, error: bool) -> SlowOrigin {
        let held = if private_first { 2 } else { 1 };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
        let (n_tx, requests) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let wait = std::sync::Arc::new(tokio::sync::Mutex::new(Some(wait)));
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (wait, n, n_tx) = (wait.clone(), n.clone(), n_tx.clone());
                // a connection each: the stalled one does not hold up the others
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                        let n = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        let _ = n_tx.send(n);
                        if n == held && hold_header {
                            if let Some(w) = wait.lock().await.take() {
                                let _ = w.await;
                            }
                        }
                        if n == held && error {
                            let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                            if s.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let cc = match (n < held, error) {
                            (true, true) => "max-age=1, stale-if-error=60",
                            (true, false) => "private",
                            _ => "max-age=300",
                        };
                        // chunked, because Pingora holds back up to 1460 bytes of a body of
                        // known length (flushing at its end) but flushes each chunk
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                             Cache-Control: {cc}\r\nXkey: slow\r\n\r\n"
                        );
                        if s.write_all(format!("{head}5\r\nv{n}-aa\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if n == 1 && !hold_header {
                            if let Some(w) = wait.lock().await.take() {
                                let _ = w.await;
                            }
                        }
                        if s.write_all(b"5\r\nbbbbb\r\n0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowOrigin {
            addr,
            held,
            go_on: Some(go_on),
            requests,
        }
    }

    /// Start the first fill of `/slow` at `proxy` and return it once its response header and
    /// first chunk have reached the client: corral holds the header, so the entry is
    /// validated before anything the test does next, whatever the scheduling.
    pub async fn first_fill(&mut self, proxy: &Proxy, host: &str) -> (reqwest::Response, Vec<u8>) {
        let mut fill = client()
            .get(proxy.url("/slow"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(self.next_request().await, Some(1), "the fill is under way");
        let first = fill.chunk().await.unwrap().unwrap();
        assert!(b"v1-aa".starts_with(&first), "{first:?}");
        (fill, first.to_vec())
    }

    /// Start the first fill of `/slow` at `proxy` ([`SlowOrigin::holding_the_header`]) and
    /// return once the origin has its request: its answer (`v1`, or `v2` after a private
    /// first one) is made, corral has none of it yet. [`SlowOrigin::release`] lets it go.
    pub async fn held_fill(&mut self, proxy: &Proxy, host: &str) -> tokio::task::JoinHandle<String> {
        for _ in 1..self.held {
            // the answers before the held one, at once
            let got = client().get(proxy.url("/slow")).header("host", host).send().await;
            got.unwrap().text().await.unwrap();
            assert!(self.next_request().await.is_some());
        }
        let request = client().get(proxy.url("/slow")).header("host", host);
        let fill = tokio::spawn(async move { request.send().await.unwrap().text().await.unwrap() });
        assert_eq!(
            self.next_request().await,
            Some(self.held),
            "the fill is under way"
        );
        fill
    }

    /// [`SlowOrigin::stale_then_held_error`]: store `v1` at `proxy`, let it go stale, and
    /// send the request that revalidates it; return once the origin holds that request.
    pub async fn stale_fill(&mut self, proxy: &Proxy, host: &str) -> tokio::task::JoinHandle<String> {
        let first = client().get(proxy.url("/slow")).header("host", host).send().await;
        assert_eq!(first.unwrap().text().await.unwrap(), "v1-aabbbbb");
        assert_eq!(self.next_request().await, Some(1));
        // max-age=1: expiry is a matter of time
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let request = client().get(proxy.url("/slow")).header("host", host);
        let fill = tokio::spawn(async move { request.send().await.unwrap().text().await.unwrap() });
        assert_eq!(
            self.next_request().await,
            Some(2),
            "the revalidation is under way"
        );
        fill
    }

    /// The number of the next request the origin got: bounded, so that a request corral
    /// answered without the origin fails the test instead of hanging it.
    async fn next_request(&mut self) -> Option<usize> {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("the origin got the request")
    }

    /// Send the held answer; the body the fill's client got.
    pub async fn release(&mut self, fill: tokio::task::JoinHandle<String>) -> String {
        self.go_on.take().unwrap().send(()).unwrap();
        tokio::time::timeout(WAIT, fill)
            .await
            .expect("the held request's client got its answer")
            .unwrap()
    }

    /// Let the first fill finish; the whole body its client got.
    pub async fn finish(&mut self, (mut fill, mut body): (reqwest::Response, Vec<u8>)) -> Vec<u8> {
        self.go_on.take().unwrap().send(()).unwrap();
        while let Some(chunk) = fill.chunk().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        body
    }
}
