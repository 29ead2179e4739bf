//! A real RabbitMQ (Debian's `rabbitmq-server`) on a free loopback port, with its own data
//! directory and node name; stopped on drop. (Debian's wrapper runs the broker with `su`,
//! which resets `HOME`: the Erlang cookie is the rabbitmq user's, shared with a system broker
//! if there is one; the node names keep them apart.)
//!
//! As root, Debian's `rabbitmq-server` drops to the `rabbitmq` user: its data, log,
//! feature-flags and plugins paths are set by environment to a directory that user owns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Rabbit {
    pub addr: SocketAddr,
    dir: PathBuf,
    node: String,
    child: Option<Child>,
}

/// The server script; `None` if RabbitMQ is not installed (`.ci/run` installs it).
fn server() -> Option<&'static str> {
    [
        "/usr/sbin/rabbitmq-server",
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

impl Rabbit {
    pub async fn start() -> Rabbit {
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("corral-rabbit-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // the broker runs as the rabbitmq user when started as root
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        let mut r = Rabbit {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            node: format!("corraltest{port}@localhost"),
            dir,
            child: None,
        };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let server = server().expect("rabbitmq-server is not installed: apt-get install -y rabbitmq-server");
        let d = |name: &str| self.dir.join(name);
        let port = self.addr.port();
        let log = std::fs::File::create(d("console.log")).unwrap();
        let child = Command::new(server)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            // the distribution port: out of the way of other brokers' and of free_port's range
            .env("RABBITMQ_DIST_PORT", (10_000 + port % 20_000).to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("feature_flags"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d("plugins-expand"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("HOME", &self.dir)
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rabbitmq-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ not up in 60 s:\n{}",
                std::fs::read_to_string(d("console.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in from loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Stop the broker (its durable queues stay on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // the script starts the Erlang VM as another user, with the node name in its
            // environment only: kill every process that carries it
            let marker = format!("RABBITMQ_NODENAME={}", self.node);
            for pid in node_processes(&marker) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start it again, on the same port and data (durable queues and their messages back).
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }
}

/// Processes whose environment holds `marker` (`NAME=value`).
fn node_processes(marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
        })
        // epmd, started by the first broker, inherits its environment and serves every node
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() != "epmd"))
        .collect()
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
