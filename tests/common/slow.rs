//! A raw origin whose first answer stalls mid-body until the test lets it go on: a fill in
//! progress that the test controls (purges during a fill, L2 writes that land late).

use crate::common::{client, Proxy};

/// A raw origin that sends the header and half of a chunked body (`v<n>-aa`), then waits
/// for the test before the rest (`bbbbb`); later requests are answered at once.
pub struct SlowOrigin {
    pub addr: std::net::SocketAddr,
    go_on: Option<tokio::sync::oneshot::Sender<()>>,
    requests: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl SlowOrigin {
    pub async fn start() -> SlowOrigin {
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
                        // chunked, because Pingora holds back up to 1460 bytes of a body of
                        // known length (flushing at its end) but flushes each chunk
                        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                                    Cache-Control: max-age=300\r\n\r\n";
                        if s.write_all(format!("{head}5\r\nv{n}-aa\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if n == 1 {
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
        assert_eq!(self.requests.recv().await, Some(1), "the fill is under way");
        let first = fill.chunk().await.unwrap().unwrap();
        assert!(b"v1-aa".starts_with(&first), "{first:?}");
        (fill, first.to_vec())
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
