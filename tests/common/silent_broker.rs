//! An AMQP 0-9-1 broker that opens connections and then answers nothing: the connection
//! handshake (`Connection.Start`, `Tune`, `Open-Ok`) is made, heartbeats are sent every
//! second, and every later method (`Channel.Open` first) is read and left unanswered. A
//! broker still recovering its queues, or one whose channel layer is wedged, looks like
//! this to a client: alive, and silent. A real RabbitMQ cannot be made to do it, and a
//! relay cannot stall a link between the handshake and the next method, hence this stub.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a connection did, in order ([`SilentBroker::events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The handshake was made (`Open-Ok` sent): the client holds an open connection.
    Opened,
    /// A method other than the handshake's: (class, method), e.g. (20, 10) `Channel.Open`.
    Method(u16, u16),
    /// The client closed the connection the AMQP way (`Connection.Close`).
    Close,
    /// The client's end of the socket closed.
    Eof,
}

pub struct SilentBroker {
    pub addr: SocketAddr,
    events: Arc<Mutex<Vec<(usize, Seen, Instant)>>>,
}

const FRAME_METHOD: u8 = 1;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

impl SilentBroker {
    pub async fn start() -> SilentBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events: Arc<Mutex<Vec<(usize, Seen, Instant)>>> = Arc::default();
        let ev = events.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((sock, _)) = listener.accept().await {
                n += 1;
                let ev = ev.clone();
                tokio::spawn(connection(n, sock, ev));
            }
        });
        SilentBroker { addr, events }
    }

    /// `amqp://` URL of this broker.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Every event so far: (connection number from 1, what, when).
    pub fn events(&self) -> Vec<(usize, Seen, Instant)> {
        self.events.lock().unwrap().clone()
    }

    /// When connection `n` first did `what`.
    pub fn when(&self, n: usize, what: Seen) -> Option<Instant> {
        self.events()
            .into_iter()
            .find(|&(c, s, _)| c == n && s == what)
            .map(|(_, _, t)| t)
    }
}

async fn connection(n: usize, sock: TcpStream, events: Arc<Mutex<Vec<(usize, Seen, Instant)>>>) {
    let note = |s: Seen| events.lock().unwrap().push((n, s, Instant::now()));
    let (mut rd, wr) = sock.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let mut header = [0u8; 8];
    if rd.read_exact(&mut header).await.is_err() || &header != b"AMQP\x00\x00\x09\x01" {
        return;
    }
    // Connection.Start: version 0-9, no server properties, PLAIN, en_US
    let mut start = vec![0, 10, 0, 10, 0, 9, 0, 0, 0, 0];
    long_string(&mut start, b"PLAIN");
    long_string(&mut start, b"en_US");
    send(&wr, FRAME_METHOD, &start).await;
    if !until(&mut rd, (10, 11)).await {
        return note(Seen::Eof);
    }
    // Connection.Tune: 2047 channels, 128 KiB frames, 10 s heartbeat
    send(&wr, FRAME_METHOD, &[0, 10, 0, 30, 0x07, 0xFF, 0, 2, 0, 0, 0, 10]).await;
    if !until(&mut rd, (10, 31)).await || !until(&mut rd, (10, 40)).await {
        return note(Seen::Eof);
    }
    // Connection.Open-Ok (its reserved short string, empty)
    send(&wr, FRAME_METHOD, &[0, 10, 0, 41, 0]).await;
    note(Seen::Opened);
    let beat = {
        let wr = wr.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !send(&wr, FRAME_HEARTBEAT, &[]).await {
                    return;
                }
            }
        })
    };
    loop {
        match frame(&mut rd).await {
            None => {
                note(Seen::Eof);
                break;
            }
            Some((FRAME_METHOD, payload)) if payload.len() >= 4 => {
                let class = u16::from_be_bytes([payload[0], payload[1]]);
                let method = u16::from_be_bytes([payload[2], payload[3]]);
                note(if (class, method) == (10, 50) {
                    Seen::Close
                } else {
                    Seen::Method(class, method)
                });
            }
            Some(_) => {}
        }
    }
    beat.abort();
}

fn long_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Write one frame on channel 0; whether it went out.
async fn send(wr: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>, kind: u8, payload: &[u8]) -> bool {
    let mut f = vec![kind, 0, 0];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    wr.lock().await.write_all(&f).await.is_ok()
}

/// Read one frame: (type, payload); `None` at the end of the stream or on a malformed frame.
async fn frame(rd: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 7];
    rd.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut payload = vec![0u8; len + 1];
    rd.read_exact(&mut payload).await.ok()?;
    (payload.pop() == Some(FRAME_END)).then_some((head[0], payload))
}

/// Read frames until the method `(class, method)`; whether it came.
async fn until(rd: &mut tokio::net::tcp::OwnedReadHalf, want: (u16, u16)) -> bool {
    while let Some((kind, p)) = frame(rd).await {
        if kind == FRAME_METHOD
            && p.len() >= 4
            && (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])) == want
        {
            return true;
        }
    }
    false
}
