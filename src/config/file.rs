//! The file structs (exactly what the TOML may contain, with the defaults) and their
//! validation into [`Config`], one function per section.

use super::{
    key_host, resolve, BusConfig, CacheConfig, Config, ConfigError, GenerationConfig, LogConfig, PeerUrl,
    PeersConfig, PurgeConfig, Rule, ServerConfig, UpstreamConfig,
};

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    upstream: UpstreamFile,
    #[serde(default)]
    cache: CacheFile,
    #[serde(default)]
    log: LogFile,
    #[serde(default)]
    memcached: MemcachedFile,
    #[serde(default)]
    purge: PurgeFile,
    #[serde(default)]
    peers: PeersFile,
    #[serde(default)]
    generation: GenerationFile,
    #[serde(default)]
    bus: BusFile,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct ServerFile {
    listen: String,
    /// Empty string disables the admin listener.
    admin: String,
    threads: usize,
    #[serde(with = "humantime_serde")]
    header_timeout: Duration,
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
    max_connections: usize,
    trusted_proxies: Vec<String>,
    admin_hosts: Vec<String>,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: "127.0.0.1:6081".into(),
            admin: "127.0.0.1:6082".into(),
            threads: 2,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            admin_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct UpstreamFile {
    address: String,
    tls: bool,
    sni: String,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    first_byte_timeout: Duration,
    #[serde(with = "humantime_serde")]
    read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    write_timeout: Duration,
    max_connections: usize,
    max_queue: usize,
    #[serde(with = "humantime_serde")]
    queue_timeout: Duration,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        UpstreamFile {
            address: "127.0.0.1:8080".into(),
            tls: false,
            sni: String::new(),
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct CacheFile {
    #[serde(with = "size")]
    memory_bytes: ByteSize,
    #[serde(with = "size")]
    max_object_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    default_ttl: Duration,
    #[serde(with = "humantime_serde")]
    grace: Duration,
    #[serde(with = "humantime_serde")]
    stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    lock_timeout: Duration,
    hit_for_miss_keys: usize,
    honor_client_no_cache: bool,
    normalize_accept_encoding: bool,
    targeted_header: String,
    strip_targeted: bool,
    eviction: crate::storage::eviction::Policy,
    trim_allocator: bool,
}

impl Default for CacheFile {
    fn default() -> Self {
        CacheFile {
            memory_bytes: ByteSize::mib(256),
            max_object_bytes: ByteSize::mib(8),
            default_ttl: Duration::ZERO,
            // RFC 9111 §4.2.4: no stale response unless the origin or the client allows it
            // (stale-while-revalidate, max-stale); grace is Varnish's opt-in
            grace: Duration::ZERO,
            stale_if_error: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(5),
            hit_for_miss_keys: 16384,
            eviction: crate::storage::eviction::Policy::S3fifo,
            trim_allocator: true,
            honor_client_no_cache: true,
            normalize_accept_encoding: true,
            targeted_header: String::new(),
            strip_targeted: true,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct LogFile {
    level: String,
    access_log: bool,
    format: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: "info".into(),
            access_log: true,
            format: "text".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct MemcachedFile {
    servers: Vec<String>,
    namespace: String,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    op_timeout: Duration,
    #[serde(with = "size")]
    max_object_bytes: ByteSize,
    pool_size: usize,
    #[serde(with = "humantime_serde")]
    max_ttl: Duration,
}

impl Default for MemcachedFile {
    fn default() -> Self {
        MemcachedFile {
            servers: Vec::new(),
            namespace: "corral".into(),
            connect_timeout: Duration::from_millis(100),
            op_timeout: Duration::from_millis(50),
            // memcached's default item limit is 1 MiB, key and item header included
            max_object_bytes: ByteSize::b(1_000_000),
            pool_size: 16,
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PurgeFile {
    allow: Vec<String>,
    token: String,
    host_map: std::collections::BTreeMap<String, String>,
    default_host: String,
    strip_tag_headers: bool,
    #[serde(with = "humantime_serde")]
    sweep_interval: Duration,
    #[serde(with = "humantime_serde")]
    clock_skew: Duration,
    #[serde(with = "humantime_serde")]
    max_unconfirmed: Duration,
    /// For tests: this corral's purge clock runs this many milliseconds off.
    clock_offset_ms: i64,
    acknowledge: String,
}

impl Default for PurgeFile {
    fn default() -> Self {
        PurgeFile {
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            token: String::new(),
            host_map: Default::default(),
            default_host: String::new(),
            strip_tag_headers: true,
            sweep_interval: Duration::from_secs(1),
            clock_skew: Duration::from_secs(1),
            max_unconfirmed: Duration::from_secs(2),
            clock_offset_ms: 0,
            acknowledge: "local".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PeersFile {
    urls: Vec<String>,
    token: String,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    #[serde(with = "humantime_serde")]
    retry_delay: Duration,
    backlog: usize,
}

impl Default for PeersFile {
    fn default() -> Self {
        PeersFile {
            urls: Vec::new(),
            token: String::new(),
            timeout: Duration::from_secs(1),
            retry_delay: Duration::from_secs(30),
            backlog: 10_000,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct GenerationFile {
    header: String,
    url: String,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    #[serde(with = "humantime_serde")]
    settle: Duration,
    webhooks: Vec<String>,
}

impl Default for GenerationFile {
    fn default() -> Self {
        GenerationFile {
            header: String::new(),
            url: String::new(),
            interval: Duration::from_secs(5),
            settle: Duration::from_secs(10),
            webhooks: Vec::new(),
        }
    }
}

impl GenerationFile {
    fn validate(self, source: &str) -> Result<GenerationConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let header = match self.header.as_str() {
            "" => None,
            h => match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => return err("generation.header", format!("{h:?} is not a header name")),
            },
        };
        let poll = match self.url.as_str() {
            "" => None,
            u if u.starts_with('/') => Some((u.to_string(), String::new())),
            u => {
                let uri: http::Uri = match u.parse() {
                    Ok(uri) => uri,
                    Err(e) => return err("generation.url", format!("{u:?}: {e}")),
                };
                let (Some("http" | "https"), Some(host)) = (uri.scheme_str(), uri.host()) else {
                    return err(
                        "generation.url",
                        format!("{u:?}: a path (\"/_generation\") or an http URL of the site"),
                    );
                };
                let path = uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();
                Some((path, host.to_string()))
            }
        };
        if self.interval < Duration::from_millis(100) {
            return err(
                "generation.interval",
                format!("{:?}: at least 100ms", self.interval),
            );
        }
        let mut webhooks = Vec::with_capacity(self.webhooks.len());
        for (i, url) in self.webhooks.iter().enumerate() {
            let hook = super::Webhook::parse(url)
                .map_err(|reason| ConfigError::new(source, format!("generation.webhooks[{i}]"), reason))?;
            webhooks.push(hook);
        }
        Ok(GenerationConfig {
            header,
            poll,
            interval: self.interval,
            settle: self.settle,
            webhooks,
        })
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct BusFile {
    amqp_url: String,
    exchange: String,
    queue_max: usize,
    #[serde(with = "humantime_serde")]
    confirm_timeout: Duration,
    outbox: usize,
}

impl Default for BusFile {
    fn default() -> Self {
        BusFile {
            amqp_url: String::new(),
            exchange: "corral.purge".into(),
            queue_max: 100_000,
            confirm_timeout: Duration::from_secs(2),
            outbox: 10_000,
        }
    }
}

impl BusFile {
    fn validate(self, source: &str) -> Result<Option<BusConfig>, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        if self.amqp_url.is_empty() {
            return Ok(None);
        }
        if !self.amqp_url.starts_with("amqp://") {
            return err(
                "bus.amqp_url",
                "must start with amqp:// (amqps:// is not built in: use a TLS sidecar, or a private network)"
                    .into(),
            );
        }
        if let Err(e) = self.amqp_url.parse::<lapin::uri::AMQPUri>() {
            return err("bus.amqp_url", format!("not an AMQP URI: {e}"));
        }
        if self.exchange.is_empty()
            || self.exchange.len() > 200
            || self.exchange.contains(char::is_whitespace)
        {
            return err(
                "bus.exchange",
                format!("{:?}: 1 to 200 characters, no spaces", self.exchange),
            );
        }
        if self.queue_max == 0 {
            return err("bus.queue_max", "at least 1".into());
        }
        if self.outbox == 0 {
            return err("bus.outbox", "at least 1".into());
        }
        if self.confirm_timeout < Duration::from_millis(10) {
            return err(
                "bus.confirm_timeout",
                format!("{:?}: at least 10ms", self.confirm_timeout),
            );
        }
        Ok(Some(BusConfig {
            amqp_url: self.amqp_url,
            exchange: self.exchange,
            queue_max: self.queue_max,
            confirm_timeout: self.confirm_timeout,
            outbox: self.outbox,
        }))
    }
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RuleFile {
    host: Option<String>,
    path_prefix: Option<String>,
    #[serde(with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(with = "humantime_serde")]
    grace: Option<Duration>,
    #[serde(with = "humantime_serde")]
    stale_if_error: Option<Duration>,
    bypass: bool,
    cache_private: bool,
    cache_set_cookie: bool,
    key_headers: Vec<String>,
}

/// Sizes: `"256MiB"`, `"1 GiB"`, `"64KB"` or a plain number of bytes, with a message that
/// says so when the value is neither.
mod size {
    use bytesize::ByteSize;
    use serde::{de, Deserialize, Deserializer, Serializer};

    /// Written back as a number of bytes (`/config`, `--check`).
    pub fn serialize<S: Serializer>(v: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.as_u64())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("expected a size like \"256MiB\" or a number of bytes"))?
        {
            Raw::Bytes(n) => Ok(ByteSize::b(n)),
            Raw::Text(t) => t.trim().parse::<ByteSize>().map_err(|_| {
                de::Error::custom(format!(
                    "invalid size {t:?}: expected a size like \"256MiB\" or a number of bytes"
                ))
            }),
        }
    }
}

impl FileConfig {
    pub(super) fn validate(self, source: &str) -> Result<Config, ConfigError> {
        let effective = serde_json::to_value(&self)
            .map_err(|e| ConfigError::new(source, "-", format!("cannot be written back: {e}")))?;
        let server = self.server.validate(source)?;
        let upstream = self.upstream.validate(source)?;
        Ok(Config {
            source: source.to_string(),
            effective: super::FileView(std::sync::Arc::new(effective)),
            hash: String::new(),
            peers: self.peers.validate(source, server.listen)?,
            generation: self.generation.validate(source)?,
            bus: self.bus.validate(source)?,
            server,
            upstream,
            cache: self.cache.validate(source)?,
            log: self.log.validate(source)?,
            memcached: self.memcached.validate(source)?,
            purge: self.purge.validate(source)?,
            rules: self
                .rules
                .into_iter()
                .enumerate()
                .map(|(i, r)| r.validate(source, i))
                .collect::<Result<_, _>>()?,
        })
        .map(|mut cfg| {
            // of the redacted view: the hash is shown to anyone (/stats, /metrics) and must
            // not let a token be guessed offline
            cfg.hash = super::hash_of(&cfg.redacted());
            cfg
        })
    }
}

impl ServerFile {
    fn validate(self, source: &str) -> Result<ServerConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let listen = resolve(source, "server.listen", &self.listen)?;
        let admin = match self.admin.as_str() {
            "" => None,
            a => Some(resolve(source, "server.admin", a)?),
        };
        if admin == Some(listen) {
            return err("server.admin", "must differ from server.listen".into());
        }
        if self.threads == 0 || self.threads > 1024 {
            return err("server.threads", format!("{} is not in 1..=1024", self.threads));
        }
        for (key, d) in [
            ("server.header_timeout", self.header_timeout),
            ("server.keepalive_timeout", self.keepalive_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return err(key, format!("{d:?}: must be at least 10ms"));
            }
        }
        if self.max_connections == 0 {
            return err("server.max_connections", "must be greater than 0".into());
        }
        let trusted_proxies = cidrs(source, "server.trusted_proxies", &self.trusted_proxies)?;
        let mut admin_hosts = Vec::new();
        for (i, h) in self.admin_hosts.iter().enumerate() {
            let name = h.trim().to_ascii_lowercase();
            if name.is_empty() || name.contains(['/', ' ', ':', '*']) {
                return err(
                    &format!("server.admin_hosts[{i}]"),
                    format!("{h:?} is not a host name (no port, no scheme)"),
                );
            }
            admin_hosts.push(name);
        }
        Ok(ServerConfig {
            listen,
            admin,
            trusted_proxies,
            admin_hosts,
            threads: self.threads,
            limits: crate::conn::Limits {
                header_timeout: self.header_timeout,
                keepalive_timeout: self.keepalive_timeout,
                max_connections: self.max_connections,
            },
        })
    }
}

impl UpstreamFile {
    fn validate(self, source: &str) -> Result<UpstreamConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let up = self;
        let Some((host, port)) = up.address.rsplit_once(':') else {
            return err("upstream.address", format!("{:?} is not host:port", up.address));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return err("upstream.address", format!("{:?} is not host:port", up.address));
        }
        for (key, d) in [
            ("upstream.connect_timeout", up.connect_timeout),
            ("upstream.first_byte_timeout", up.first_byte_timeout),
            ("upstream.read_timeout", up.read_timeout),
            ("upstream.queue_timeout", up.queue_timeout),
            ("upstream.write_timeout", up.write_timeout),
        ] {
            if d.is_zero() {
                return err(key, "must be greater than 0".into());
            }
        }
        if up.max_connections == 0 {
            return err("upstream.max_connections", "must be greater than 0".into());
        }
        let sni = if up.sni.is_empty() {
            host.trim_start_matches('[').trim_end_matches(']').to_string()
        } else {
            up.sni
        };
        Ok(UpstreamConfig {
            address: up.address,
            tls: up.tls,
            sni,
            connect_timeout: up.connect_timeout,
            first_byte_timeout: up.first_byte_timeout,
            read_timeout: up.read_timeout,
            write_timeout: up.write_timeout,
            max_connections: up.max_connections,
            max_queue: up.max_queue,
            queue_timeout: up.queue_timeout,
        })
    }
}

impl CacheFile {
    fn validate(self, source: &str) -> Result<CacheConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let c = self;
        let memory_bytes = usize::try_from(c.memory_bytes.as_u64()).unwrap_or(usize::MAX);
        let max_object_bytes = usize::try_from(c.max_object_bytes.as_u64()).unwrap_or(usize::MAX);
        if memory_bytes < 1024 {
            return err(
                "cache.memory_bytes",
                format!("{} is too small (at least 1KiB)", c.memory_bytes),
            );
        }
        if max_object_bytes == 0 || max_object_bytes > memory_bytes {
            return err(
                "cache.max_object_bytes",
                format!(
                    "{} must be > 0 and <= cache.memory_bytes ({})",
                    c.max_object_bytes, c.memory_bytes
                ),
            );
        }
        if let Err(reason) = c.eviction.check_max_object(max_object_bytes, None) {
            return err("cache.max_object_bytes", reason);
        }
        if c.lock_timeout.is_zero() {
            return err("cache.lock_timeout", "must be greater than 0".into());
        }
        if c.hit_for_miss_keys == 0 {
            return err("cache.hit_for_miss_keys", "must be greater than 0".into());
        }
        let targeted_header = match c.targeted_header.as_str() {
            "" => None,
            h => match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name)
                    if matches!(
                        name.as_str(),
                        "cache-control"
                            | "expires"
                            | "pragma"
                            | "age"
                            | "vary"
                            | "date"
                            | "cdn-cache-control"
                            | "surrogate-control"
                    ) =>
                {
                    return err(
                        "cache.targeted_header",
                        format!(
                            "{h:?} is a standard field: name corral's own, e.g. \"Corral-Cache-Control\""
                        ),
                    )
                }
                Ok(name) => Some(name),
                Err(_) => return err("cache.targeted_header", format!("{h:?} is not a header name")),
            },
        };
        Ok(CacheConfig {
            targeted_header,
            strip_targeted: c.strip_targeted,
            memory_bytes,
            max_object_bytes,
            default_ttl: c.default_ttl,
            grace: c.grace,
            stale_if_error: c.stale_if_error,
            lock_timeout: c.lock_timeout,
            hit_for_miss_keys: c.hit_for_miss_keys,
            honor_client_no_cache: c.honor_client_no_cache,
            normalize_accept_encoding: c.normalize_accept_encoding,
            eviction: c.eviction,
            trim_allocator: c.trim_allocator,
        })
    }
}

impl LogFile {
    fn validate(self, source: &str) -> Result<LogConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return err("log.level", format!("{:?} is not a level or filter", self.level));
        }
        let json = match self.format.as_str() {
            "text" => false,
            "json" => true,
            other => return err("log.format", format!("{other:?}: \"text\" or \"json\"")),
        };
        Ok(LogConfig {
            level: self.level,
            access_log: self.access_log,
            json,
        })
    }
}

impl MemcachedFile {
    fn validate(self, source: &str) -> Result<Option<crate::storage::memcached::L2Config>, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let m = self;
        let memcached = if m.servers.is_empty() {
            None
        } else {
            for (i, server) in m.servers.iter().enumerate() {
                let ok = server
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return err(
                        &format!("memcached.servers[{i}]"),
                        format!("{server:?} is not host:port"),
                    );
                }
            }
            if m.namespace.is_empty() || m.namespace.len() > 64 || m.namespace.contains(char::is_whitespace) {
                return err(
                    "memcached.namespace",
                    format!("{:?}: 1 to 64 characters, no spaces", m.namespace),
                );
            }
            for (key, d) in [
                ("memcached.connect_timeout", m.connect_timeout),
                ("memcached.op_timeout", m.op_timeout),
            ] {
                if d.is_zero() {
                    return err(key, "must be greater than 0".into());
                }
            }
            if m.pool_size == 0 {
                return err("memcached.pool_size", "must be greater than 0".into());
            }
            if m.max_ttl < Duration::from_secs(1) || m.max_ttl > Duration::from_secs(30 * 24 * 3600) {
                return err(
                    "memcached.max_ttl",
                    format!("{:?}: must be between 1s and 30 days", m.max_ttl),
                );
            }
            Some(crate::storage::memcached::L2Config {
                servers: m.servers,
                namespace: m.namespace,
                connect_timeout: m.connect_timeout,
                op_timeout: m.op_timeout,
                max_object_bytes: usize::try_from(m.max_object_bytes.as_u64()).unwrap_or(usize::MAX),
                pool_size: m.pool_size,
                max_ttl: m.max_ttl,
            })
        };
        Ok(memcached)
    }
}

/// Networks as written in `key` (CIDRs, or single addresses); the error names the entry.
fn cidrs(source: &str, key: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        source,
                        format!("{key}[{i}]"),
                        format!("{net:?} is not a CIDR like 10.0.0.0/8"),
                    )
                })
        })
        .collect()
}

impl PurgeFile {
    fn validate(self, source: &str) -> Result<PurgeConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let p = self;
        let allow = cidrs(source, "purge.allow", &p.allow)?;
        if p.token.contains(char::is_whitespace) {
            return err("purge.token", "must not contain spaces".into());
        }
        if p.clock_skew > Duration::from_secs(60) {
            return err(
                "purge.clock_skew",
                format!("{:?}: at most 60s (synchronise the clocks instead)", p.clock_skew),
            );
        }
        if p.max_unconfirmed < Duration::from_millis(500) {
            return err(
                "purge.max_unconfirmed",
                format!(
                    "{:?}: at least 500ms (the purge log is read every 250ms)",
                    p.max_unconfirmed
                ),
            );
        }
        let acknowledge_cluster = match p.acknowledge.as_str() {
            "local" => false,
            "cluster" => true,
            other => {
                return err(
                    "purge.acknowledge",
                    format!("{other:?}: \"local\" (answer once applied here and logged) or \"cluster\" (once every corral has it or is fenced)"),
                )
            }
        };
        if p.clock_offset_ms.unsigned_abs() > 3_600_000 {
            return err("purge.clock_offset_ms", "at most an hour either way".into());
        }
        if p.sweep_interval < Duration::from_millis(10) {
            return err(
                "purge.sweep_interval",
                format!("{:?}: must be at least 10ms", p.sweep_interval),
            );
        }
        // keys as a purge's Host is normalised (lower case, no ":80", no trailing dot): a key
        // written "cache:80" must match a purge sent to "cache"
        let mut host_map = std::collections::BTreeMap::new();
        for (k, v) in p.host_map {
            let key = key_host(&k);
            if host_map.insert(key.clone(), key_host(&v)).is_some() {
                return err(
                    &format!("purge.host_map.{k}"),
                    format!("{k:?} is the same host as another key ({key:?})"),
                );
            }
        }
        let purge = PurgeConfig {
            access: crate::purge::Access {
                allow,
                token: Some(p.token).filter(|t| !t.is_empty()),
            },
            host_map,
            default_host: Some(p.default_host)
                .filter(|h| !h.is_empty())
                .map(|h| key_host(&h)),
            strip_tag_headers: p.strip_tag_headers,
            clock_skew: p.clock_skew,
            max_unconfirmed: p.max_unconfirmed,
            clock_offset_ms: p.clock_offset_ms,
            acknowledge_cluster,
            sweep_interval: p.sweep_interval,
        };
        Ok(purge)
    }
}

impl PeersFile {
    fn validate(self, source: &str, listen: std::net::SocketAddr) -> Result<PeersConfig, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        if self.token.contains(char::is_whitespace) {
            return err("peers.token", "must not contain spaces".into());
        }
        if !self.urls.is_empty() && self.token.is_empty() {
            return err(
                "peers.token",
                "required when peers.urls is set: peers authenticate each other with it".into(),
            );
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > Duration::from_secs(60) {
            return err("peers.timeout", format!("{:?}: not in 10ms..=60s", self.timeout));
        }
        if self.retry_delay < Duration::from_millis(100) {
            return err(
                "peers.retry_delay",
                format!("{:?}: at least 100ms", self.retry_delay),
            );
        }
        if self.backlog == 0 || self.backlog > 1_000_000 {
            return err("peers.backlog", format!("{} is not in 1..=1000000", self.backlog));
        }
        let mut peers: Vec<PeerUrl> = Vec::with_capacity(self.urls.len());
        for (i, url) in self.urls.iter().enumerate() {
            let key = format!("peers.urls[{i}]");
            let peer =
                PeerUrl::parse(url, listen).map_err(|reason| ConfigError::new(source, &key, reason))?;
            if peers.iter().any(|p| p.addr == peer.addr && p.tls == peer.tls) {
                return err(&key, format!("{url:?} is listed twice"));
            }
            peers.push(peer);
        }
        Ok(PeersConfig {
            peers,
            token: Some(self.token).filter(|t| !t.is_empty()),
            timeout: self.timeout,
            retry_delay: self.retry_delay,
            backlog: self.backlog,
        })
    }
}

impl RuleFile {
    fn validate(self, source: &str, i: usize) -> Result<Rule, ConfigError> {
        let err = |key: &str, reason: String| Err(ConfigError::new(source, key, reason));
        let at = |field: &str| format!("rule[{i}].{field}");
        if let Some(h) = &self.host {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty() || bare.contains(['/', ':', ' ', '*']) {
                return err(
                    &at("host"),
                    format!("{h:?} is not a host name (no port, no path)"),
                );
            }
        }
        if let Some(p) = &self.path_prefix {
            if !p.starts_with('/') {
                return err(&at("path_prefix"), format!("{p:?} must start with '/'"));
            }
        }
        let mut key_headers: Vec<http::HeaderName> = Vec::new();
        for (j, name) in self.key_headers.iter().enumerate() {
            let key = at(&format!("key_headers[{j}]"));
            let Ok(h) = http::HeaderName::from_bytes(name.trim().as_bytes()) else {
                return err(&key, format!("{name:?} is not a header name"));
            };
            let hop = [
                "connection",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
                "transfer-encoding",
                "upgrade",
                "host",
            ];
            if hop.contains(&h.as_str()) {
                return err(
                    &key,
                    format!("{name:?} is hop-by-hop or already in the key: it cannot key a variant"),
                );
            }
            if key_headers.contains(&h) {
                return err(&key, format!("{name:?} is listed twice"));
            }
            key_headers.push(h);
        }
        if self.bypass
            && (self.ttl.is_some()
                || self.grace.is_some()
                || self.cache_private
                || self.cache_set_cookie
                || !key_headers.is_empty())
        {
            return err(
                &at("bypass"),
                "a bypass rule stores nothing: drop ttl, grace, cache_private, cache_set_cookie, key_headers"
                    .into(),
            );
        }
        Ok(Rule {
            host: self.host.map(|h| h.to_ascii_lowercase()),
            path_prefix: self.path_prefix,
            ttl: self.ttl,
            grace: self.grace,
            stale_if_error: self.stale_if_error,
            bypass: self.bypass,
            cache_private: self.cache_private,
            cache_set_cookie: self.cache_set_cookie,
            key_headers: key_headers.into(),
        })
    }
}
