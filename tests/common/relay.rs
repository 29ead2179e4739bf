//! A TCP relay between a corral and a server (memcached, or a peer corral) that the test can
//! cut and restore: a network partition for one link only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    refused: Arc<AtomicUsize>,
    stall: Arc<Notify>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let stall = Arc::new(Notify::new());
        let (o, c, r, st) = (open.clone(), conns.clone(), refused.clone(), stall.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    // cut: the connection is closed at once
                    r.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let stalled = st.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = stalled.notified() => {
                                // both ends held open, nothing carried: a link that died
                                // without a reset
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay {
            addr,
            open,
            conns,
            refused,
            stall,
        }
    }

    /// Stop carrying anything on the connections open now, and keep them open: neither end
    /// learns that the link is dead, except by a timeout of its own. New connections are
    /// carried as before.
    pub fn stall(&self) {
        self.stall.notify_waiters();
    }

    /// Cut every connection through the relay, and refuse new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// TCP connections accepted (and closed at once) while cut, since the relay started,
    /// over every cut: the connection attempts made through a dead link.
    pub fn attempts_while_cut(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}
