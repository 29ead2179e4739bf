//! Test harness: a real origin ([`origin`]), the real `corral` binary on free loopback ports,
//! and an HTTP client.
#![allow(dead_code, clippy::unwrap_used)]

pub mod origin;
pub mod rabbit;
pub mod relay;
pub mod silent_broker;
pub mod slow;
pub mod webhook;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use origin::{Origin, Reply};
#[allow(unused_imports)]
pub use rabbit::Rabbit;
#[allow(unused_imports)]
pub use relay::Relay;
#[allow(unused_imports)]
pub use silent_broker::{Seen, SilentBroker};
#[allow(unused_imports)]
pub use slow::SlowOrigin;
#[allow(unused_imports)]
pub use webhook::Webhook;

/// A free loopback port (bound then released; the proxy binds it right after), never one
/// this process handed out before: tests that pick several ports before starting anything
/// (corrals that list each other) must not get the same one twice.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The `[cache]` and `[[rule]]` parts of a test config; server and upstream are filled in.
#[derive(Default, Clone)]
pub struct Conf {
    /// Lines inside `[cache]`, e.g. `grace = "2s"`.
    pub cache: Vec<String>,
    /// Whole `[[rule]]` tables.
    pub rules: String,
    /// Lines inside `[memcached]`; the section is written only when there are some.
    pub memcached: Vec<String>,
    /// More lines inside `[server]` and `[upstream]` (listen, admin, address are set).
    pub server: Vec<String>,
    pub upstream: Vec<String>,
    /// Lines inside `[peers]`; the section is written only when there are some.
    pub peers: Vec<String>,
    /// Whole TOML sections (e.g. `[generation]` and its lines), written verbatim at the end
    /// of the file, after the rules.
    pub extra: Vec<String>,
    /// More lines inside `[log]` (its `level` is set).
    pub log: Vec<String>,
}

impl Conf {
    pub fn cache(mut self, line: &str) -> Self {
        self.cache.push(line.to_string());
        self
    }
    pub fn rules(mut self, toml: &str) -> Self {
        self.rules.push_str(toml);
        self
    }
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_string());
        self
    }
    pub fn upstream(mut self, line: &str) -> Self {
        self.upstream.push(line.to_string());
        self
    }
    /// A line inside `[log]`, e.g. `format = "json"`.
    pub fn log(mut self, line: &str) -> Self {
        self.log.push(line.to_string());
        self
    }
    pub fn memcached(mut self, line: &str) -> Self {
        self.memcached.push(line.to_string());
        self
    }
    /// A line inside `[peers]`, e.g. `token = "s3cret"`.
    pub fn peers(mut self, line: &str) -> Self {
        self.peers.push(line.to_string());
        self
    }
    /// A whole TOML section, header included (e.g. `"[generation]\nheader = \"X-Generation\""`),
    /// written verbatim at the end of the file.
    pub fn section(mut self, toml: &str) -> Self {
        self.extra.push(toml.to_string());
        self
    }
    /// Use these memcached servers for L2. The op timeout is raised from the 50 ms default:
    /// debug builds on a loaded 2-core CI machine are slow, and these tests check behaviour,
    /// not latency (a refused connection still opens the circuit at once).
    pub fn servers(self, servers: &[&Memcached]) -> Self {
        let list: Vec<String> = servers.iter().map(|m| format!("\"{}\"", m.addr)).collect();
        self.memcached(&format!("servers = [{}]", list.join(", ")))
            .memcached("op_timeout = \"250ms\"")
    }
}

/// A running `corral` process, killed on drop. Its log is printed if the test fails.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    /// The config file and the `bash -c` script it was started with, for [`Proxy::restart`].
    config: PathBuf,
    script: String,
    _dir: tempfile::TempDir,
}

pub fn corral_bin() -> &'static str {
    env!("CARGO_BIN_EXE_corral")
}

/// `bash -c script corral -c config`, stdout and stderr into `out`.
fn spawn_corral(script: &str, config: &std::path::Path, out: std::fs::File) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(corral_bin())
        .arg("-c")
        .arg(config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn corral")
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, conf: Conf) -> Proxy {
        Proxy::start_wrapped(upstream, conf, "exec \"$0\" \"$@\"").await
    }

    /// [`Proxy::start`], with corral run by `bash -c script corral -c FILE` (e.g. to set
    /// limits with `ulimit` first; the script ends with `exec "$0" "$@"`).
    pub async fn start_wrapped(upstream: SocketAddr, conf: Conf, script: &str) -> Proxy {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Proxy::launch(addr, upstream, conf, script).await
    }

    /// [`Proxy::start`] with the proxy listener on `addr` (from [`free_port`]), chosen before
    /// the start: corrals that list each other (`[peers] urls`) need their addresses first.
    pub async fn start_on(addr: SocketAddr, upstream: SocketAddr, conf: Conf) -> Proxy {
        Proxy::launch(addr, upstream, conf, "exec \"$0\" \"$@\"").await
    }

    async fn launch(addr: SocketAddr, upstream: SocketAddr, conf: Conf, script: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = format!(
            "[server]\nlisten = \"{addr}\"\nadmin = \"{admin}\"\nthreads = 2\n{}\n\n\
             [upstream]\naddress = \"{upstream}\"\nconnect_timeout = \"1s\"\n{}\n\n\
             [cache]\n{}\n\n[log]\nlevel = \"info,pingora_core=warn,pingora_proxy=warn\"\n{}\n\n{}\n{}",
            conf.server.join("\n"),
            if conf
                .upstream
                .iter()
                .any(|l| l.starts_with("read_timeout") || l.starts_with("first_byte_timeout"))
            {
                conf.upstream.join("\n")
            } else {
                // tests of hung origins wait for this
                format!(
                    "read_timeout = \"5s\"\nfirst_byte_timeout = \"5s\"\n{}",
                    conf.upstream.join("\n")
                )
            },
            conf.cache.join("\n"),
            conf.log.join("\n"),
            if conf.memcached.is_empty() {
                String::new()
            } else {
                format!("[memcached]\n{}\n", conf.memcached.join("\n"))
            },
            if conf.peers.is_empty() {
                conf.rules
            } else {
                format!("[peers]\n{}\n\n{}", conf.peers.join("\n"), conf.rules)
            }
        );
        let text = if conf.extra.is_empty() {
            text
        } else {
            format!("{text}\n\n{}\n", conf.extra.join("\n\n"))
        };
        let path = dir.path().join("corral.toml");
        std::fs::write(&path, text).unwrap();
        let log = dir.path().join("corral.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = spawn_corral(script, &path, out);
        let mut proxy = Proxy {
            child,
            addr,
            admin,
            log,
            config: path,
            script: script.to_string(),
            _dir: dir,
        };
        proxy.wait_ready().await;
        proxy
    }

    /// Kill the process hard (SIGKILL): nothing is flushed, nothing delivered.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kill it (if it still runs) and start it again on the same addresses with the same
    /// config file; its log goes on in the same file, after a `---- restarted ----` line.
    pub async fn restart(&mut self) {
        self.kill();
        let mut out = std::fs::OpenOptions::new().append(true).open(&self.log).unwrap();
        std::io::Write::write_all(&mut out, b"---- restarted ----\n").unwrap();
        self.child = spawn_corral(&self.script, &self.config, out);
        self.wait_ready().await;
    }

    /// Ready = the admin listener answers /healthz and the proxy port accepts.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = client();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("corral exited early ({status}):\n{}", self.log_text());
            }
            let healthy = client
                .get(format!("http://{}/healthz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if healthy && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "corral not ready in 20 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The corral process's resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The config file it was started with (tests of `POST /reload` and SIGHUP rewrite it).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// The process id of what the `bash -c` script runs: corral itself when the script ends
    /// with `exec` (as [`Proxy::start`]'s does), e.g. to send it SIGHUP.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited by `limit` from now (polled every 20 ms).
    pub async fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The admin `/stats` JSON as (entries, bytes, memory_bytes).
    pub async fn stats(&self) -> (u64, u64, u64) {
        let text = client()
            .get(format!("http://{}/stats", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let field = |name: &str| -> u64 {
            let at = text
                .find(&format!("\"{name}\":"))
                .unwrap_or_else(|| panic!("{name} in {text}"));
            text[at + name.len() + 3..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap()
        };
        (field("l1_entries"), field("l1_bytes"), field("memory_bytes"))
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- corral log ----\n{}\n---- end of corral log ----",
                self.log_text()
            );
        }
    }
}

/// A real memcached on a free loopback port, killed on drop.
pub struct Memcached {
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// A port for memcached, below the kernel's ephemeral range (where `free_port` and outgoing
/// connections get theirs) and never handed out twice by this process: a test that kills its
/// memcached must not see another test's server appear on the same port.
fn memcached_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 400) * 25;
    loop {
        let port = (base + NEXT.fetch_add(1, Ordering::SeqCst) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Memcached {
    pub async fn start() -> Memcached {
        let addr: SocketAddr = format!("127.0.0.1:{}", memcached_port()).parse().unwrap();
        let mut m = Memcached { addr, child: None };
        m.restart().await;
        m
    }

    /// Start (again) on the same port, empty.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "memcached already running");
        let child = Command::new("memcached")
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-l",
                "127.0.0.1",
                "-U",
                "0",
                "-u",
                "root",
                "-m",
                "64",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run memcached ({e}): install it with `apt-get install memcached` (.ci/run does)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "memcached did not start on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kill it (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send one raw text-protocol command, return the raw answer.
    pub async fn command(&self, cmd: &[u8], until: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(cmd).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(until) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "memcached closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).to_string()
    }

    /// Number of items stored.
    pub async fn items(&self) -> u64 {
        self.stat("curr_items").await
    }

    /// One counter of memcached's `stats` (`cmd_get`: the gets it answered since it started).
    pub async fn stat(&self, name: &str) -> u64 {
        let stats = self.command(b"stats\r\n", "END\r\n").await;
        let prefix = format!("STAT {name} ");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until `cond` holds, checking every 10 ms, at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "not reached in {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one metric line (`name{labels} value`) in a Prometheus text page, 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An HTTP client that never uses a system proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A simple response: status, `cache-status` header, body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub cache: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

pub async fn get(url: &str) -> Got {
    get_with(url, &[]).await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Got {
    send(client().get(url), headers).await
}

pub async fn send(mut req: reqwest::RequestBuilder, headers: &[(&str, &str)]) -> Got {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let cache = headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.text().await.unwrap_or_default();
    Got {
        status,
        cache,
        headers,
        body,
    }
}
