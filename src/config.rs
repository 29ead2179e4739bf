//! Configuration: one TOML file, parsed into file structs, then validated into [`Config`].
//!
//! Every error names the file, the dotted key and the reason, e.g.
//! `conf/corral.toml: cache.grace: invalid duration "10x": unknown time unit "x"`.
//! [`Config::check_bindable`] also checks that the listen addresses can be bound, so that
//! `main` fails before Pingora binds anything.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use crate::policy::Effective;

/// The embedded default configuration, the same text as `conf/corral.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../conf/corral.toml");

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    /// Dotted path of the offending key (`cache.grace`, `rule[2].path_prefix`), or `-` when the
    /// file as a whole is wrong (unreadable, not TOML).
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(file: &str, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

mod file;
use file::FileConfig;

/// `url` with what may be a secret replaced by [`REDACTED`]: the password of
/// `scheme://user:password@host/...` (the last `@` ends it: a password may hold a `/`), and,
/// with `query`, the query string (webhook URLs often carry a token there).
fn redact_url(url: &str, query: bool) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) if rest[..at].contains(':') => {
                let user = rest[..at].split(':').next().unwrap_or("");
                format!("{scheme}://{user}:{REDACTED}{}", &rest[at..])
            }
            _ => url.to_string(),
        },
        None => url.to_string(),
    };
    if query {
        if let Some(q) = out.find('?') {
            out.truncate(q + 1);
            out.push_str(REDACTED);
        }
    }
    out
}

// === validated config: what the rest of the code uses ===

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (a path, or `<embedded default>`), for messages.
    pub source: String,
    /// The file as read, every default filled in, secrets included (see [`Config::redacted`]):
    /// the same sections and keys as the TOML.
    pub effective: FileView,
    /// 16 hex digits of the MD5 of [`Config::redacted`]: the same for the same settings,
    /// whatever the comments and layout of the file. Secrets are not part of it (it is shown
    /// to anyone who reaches the admin listener).
    pub hash: String,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub purge: PurgeConfig,
    /// `[peers]`: the other corrals of the site, which every accepted purge is sent to.
    pub peers: PeersConfig,
    /// `[generation]`: the upstream's generation, and the drops when it changes.
    pub generation: GenerationConfig,
    /// `[bus]`: purges over an AMQP broker; `None` = off.
    pub bus: Option<BusConfig>,
    /// The L2 tier; `None` = L1 only.
    pub memcached: Option<crate::storage::memcached::L2Config>,
    /// Ordered; the first rule that matches a request decides.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub threads: usize,
    /// Client connections: head and idle deadlines, and the cap ([`crate::conn`]).
    pub limits: crate::conn::Limits,
    /// Peers whose forwarding headers (`X-Forwarded-*`, `Forwarded`) are believed: a TLS
    /// terminator or load balancer in front of corral. From anyone else they are removed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Host names the admin listener answers to, besides addresses and `localhost` (a DNS
    /// rebinding guard: a web page cannot reach it under its own name).
    pub admin_hosts: Vec<String>,
}

impl ServerConfig {
    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        crate::purge::in_networks(&self.trusted_proxies, ip)
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port`, resolved by Pingora per connection.
    pub address: String,
    pub tls: bool,
    /// TLS server name; defaults to the host part of `address`.
    pub sni: String,
    pub connect_timeout: Duration,
    /// From the request sent to the response head; then 504 (or a stale copy).
    pub first_byte_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Requests to the upstream at once; more wait in a queue of `max_queue`, at most
    /// `queue_timeout`, then get 503.
    pub max_connections: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub memory_bytes: usize,
    pub max_object_bytes: usize,
    pub default_ttl: Duration,
    pub grace: Duration,
    pub stale_if_error: Duration,
    pub lock_timeout: Duration,
    pub hit_for_miss_keys: usize,
    pub honor_client_no_cache: bool,
    /// Forward cacheable requests with a normalised `Accept-Encoding`
    /// ([`crate::key::normalize_accept_encoding`]).
    pub normalize_accept_encoding: bool,
    /// corral's own targeted cache-control field (RFC 9213), before `CDN-Cache-Control`.
    pub targeted_header: Option<http::HeaderName>,
    /// Remove the targeted fields (corral's own, `CDN-Cache-Control`, `Surrogate-Control`)
    /// from client responses: they are meant for this cache.
    pub strip_targeted: bool,
    /// What L1 keeps when it is full ([`crate::storage::eviction`]).
    pub eviction: crate::storage::eviction::Policy,
    /// Give the allocator's free pages back to the kernel after L1 released memory
    /// ([`crate::trim`]; glibc only).
    pub trim_allocator: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub access_log: bool,
    /// `log.format = "json"`: one JSON object per line (fields at the top level).
    pub json: bool,
}

/// `[purge]`: who may purge and which site a purge applies to.
#[derive(Debug, Clone)]
pub struct PurgeConfig {
    pub access: crate::purge::Access,
    /// Purge `Host` (as sent, lower-case, with port) → the site's host. Plone and Magento send
    /// purges to the proxy's own address.
    pub host_map: std::collections::BTreeMap<String, String>,
    /// The site a purge applies to when `host_map` has no entry; empty = the purge's `Host`.
    pub default_host: Option<String>,
    /// Remove tag headers (xkey, Surrogate-Key, ...) from client responses.
    pub strip_tag_headers: bool,
    /// How often the ban sweeper runs (checks L1 against new bans, expires old ones).
    pub sweep_interval: Duration,
    /// How far apart the clocks of the corrals of a namespace may be: a purge another corral
    /// accepted at T covers what this corral validated before T + this.
    pub clock_skew: Duration,
    /// How long this corral serves L1 copies without having confirmed memcached's purge log;
    /// past it, copies validated before the last confirmation are revalidated (the fence).
    pub max_unconfirmed: Duration,
    /// For tests: the purge clock of this corral runs this many milliseconds off.
    pub clock_offset_ms: i64,
    /// `purge.acknowledge = "cluster"`: with memcached, a purge is answered 2xx only once
    /// every corral of the namespace has it or is fenced (`max_unconfirmed` after it was
    /// logged), so no request sent after the answer gets a copy from before it, anywhere.
    pub acknowledge_cluster: bool,
}

impl PurgeConfig {
    /// The site host a purge sent with `host` applies to.
    pub fn site_for(&self, host: &str) -> String {
        self.host_map
            .get(host)
            .cloned()
            .or_else(|| self.default_host.clone())
            .map_or_else(|| host.to_string(), |h| crate::key::normalize_host(&h))
    }
}

/// `[peers]`: the other corrals of the site ([`crate::transport::peers`]).
#[derive(Debug, Clone, Default)]
pub struct PeersConfig {
    /// Every corral listed, this one included (marked [`PeerUrl::is_self`]).
    pub peers: Vec<PeerUrl>,
    /// Peers authenticate each other with it (`Authorization: Bearer`); without it, this
    /// corral neither sends nor accepts peer messages.
    pub token: Option<String>,
    /// One delivery attempt.
    pub timeout: Duration,
    /// A failed peer gets no attempt for this long, then one probe.
    pub retry_delay: Duration,
    /// Messages kept per failed peer; beyond, the queue becomes one "drop your cache".
    pub backlog: usize,
}

/// `[bus]` ([`crate::transport::bus`]).
#[derive(Clone)]
pub struct BusConfig {
    /// `amqp://user:pass@host:5672/%2f` (secret: never logged whole).
    pub amqp_url: String,
    /// The durable fanout exchange every corral publishes to.
    pub exchange: String,
    /// Messages a corral's queue keeps while it is away (`x-max-length`, oldest dropped).
    pub queue_max: usize,
    /// How long a publish waits for the broker's confirm.
    pub confirm_timeout: Duration,
    /// Purges kept here while the broker cannot be reached.
    pub outbox: usize,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("amqp_url", &"<redacted>")
            .field("exchange", &self.exchange)
            .field("queue_max", &self.queue_max)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("outbox", &self.outbox)
            .finish()
    }
}

/// `[generation]` ([`crate::generation`]).
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    /// The response header that carries the upstream's generation; `None`: off.
    pub header: Option<http::HeaderName>,
    /// Polled on the upstream every `interval`: (path and query, Host; "" = the upstream's).
    pub poll: Option<(String, String)>,
    pub interval: Duration,
    /// How long an older generation must be the only one seen to count as a rollback.
    pub settle: Duration,
    /// Where each drop event is POSTed.
    pub webhooks: Vec<Webhook>,
}

/// One entry of `generation.webhooks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub addr: SocketAddr,
    pub tls: bool,
    pub host: String,
    pub path: String,
}

impl Webhook {
    pub fn parse(url: &str) -> Result<Webhook, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: needs a host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: resolves to nothing"))?;
        Ok(Webhook {
            url: url.to_string(),
            addr,
            tls,
            host: authority.as_str().rsplit('@').next().unwrap_or(host).to_string(),
            path: uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string(),
        })
    }
}

/// One entry of `peers.urls`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerUrl {
    /// As written (for logs, metrics, `GET /peers`).
    pub url: String,
    pub addr: SocketAddr,
    pub tls: bool,
    /// The host part (the `Host` header, and the TLS server name).
    pub host: String,
    /// This corral's own address: listed so one file serves the fleet, never sent to.
    pub is_self: bool,
}

impl PeerUrl {
    /// Parse `http://host:port` (or `https://`), resolve it, and recognise this corral's own
    /// address (`listen`, or a local address of this machine when `listen` is unspecified).
    pub fn parse(url: &str, listen: SocketAddr) -> Result<PeerUrl, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: must start with http:// or https://")),
        };
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(format!("{url:?}: no path: peers are reached at their root"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: needs a host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{:?}: no user or password in the URL (peers authenticate with peers.token)",
                authority.host()
            ));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: resolves to nothing"))?;
        let is_self = addr.port() == listen.port()
            && (addr.ip() == listen.ip() || (listen.ip().is_unspecified() && is_local(addr.ip())));
        Ok(PeerUrl {
            url: url.to_string(),
            addr,
            tls,
            host: host.to_string(),
            is_self,
        })
    }
}

/// Whether `ip` is an address of this machine: a socket can be bound to it.
fn is_local(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Per-route policy (`[[rule]]`), like a dogpile.cache region: first match wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    /// Lower-case host without port; `*.example.org` matches every subdomain (not the apex).
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Freshness for responses without an explicit lifetime (overrides `cache.default_ttl`).
    pub ttl: Option<Duration>,
    pub grace: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// Pass through, never store, never look up.
    pub bypass: bool,
    /// Store responses marked `private` or answering a request with `Authorization`.
    pub cache_private: bool,
    /// Store responses that carry `Set-Cookie`; the cookie is stripped from the stored copy.
    pub cache_set_cookie: bool,
    /// Request headers added to the key, as if every response varied on them (`Vary`): e.g.
    /// `X-Forwarded-Proto` behind a TLS terminator that serves both schemes.
    pub key_headers: std::sync::Arc<[http::HeaderName]>,
}

impl Rule {
    /// Does this rule apply to `host` (lower-case, no port) and `path`?
    pub fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match self.host.as_deref() {
            None => true,
            Some(pattern) => match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                None => pattern == host,
            },
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix))
    }
}

/// 16 hex digits of the MD5 of `value`'s JSON (object keys are sorted: serde_json's map).
pub(crate) fn hash_of(value: &serde_json::Value) -> String {
    use md5::{Digest, Md5};
    let digest = Md5::digest(value.to_string().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// [`Config::effective`]: a JSON value that never prints (it holds the secrets).
#[derive(Clone)]
pub struct FileView(pub std::sync::Arc<serde_json::Value>);

impl std::ops::Deref for FileView {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.0
    }
}

impl std::fmt::Debug for FileView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileView(<secrets included: see Config::redacted>)")
    }
}

/// What replaces a secret in [`Config::redacted`].
pub const REDACTED: &str = "<redacted>";

/// The dotted keys whose values differ between two [`Config::effective`] values: a section's
/// key (`cache.grace`), or `rule` when the rules differ.
pub fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return out;
    };
    let sections: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for section in sections {
        let (a, b) = (old.get(section), new.get(section));
        if a == b {
            continue;
        }
        match (a.and_then(|v| v.as_object()), b.and_then(|v| v.as_object())) {
            (Some(a), Some(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    if a.get(key) != b.get(key) {
                        out.push(format!("{section}.{key}"));
                    }
                }
            }
            _ => out.push(section.clone()),
        }
    }
    out
}

/// Settings a reload applies at once; any other change needs a restart. Per request, the
/// proxy reads its config once (at the start), so a request sees one config throughout.
pub const LIVE_KEYS: &[&str] = &[
    "upstream.address",
    "upstream.tls",
    "upstream.sni",
    "upstream.connect_timeout",
    "upstream.first_byte_timeout",
    "upstream.read_timeout",
    "upstream.write_timeout",
    "cache.default_ttl",
    "cache.grace",
    "cache.stale_if_error",
    "cache.max_object_bytes",
    "cache.honor_client_no_cache",
    "cache.normalize_accept_encoding",
    "cache.strip_targeted",
    "rule",
    "purge.allow",
    "purge.token",
    "purge.host_map",
    "purge.default_host",
    "purge.strip_tag_headers",
    "server.trusted_proxies",
    "server.admin_hosts",
    "log.access_log",
    "peers.urls",
    "peers.token",
];

impl Config {
    /// [`Config::effective`] with secrets replaced by [`REDACTED`]: `purge.token`,
    /// `peers.token`, the password in `bus.amqp_url`, and the passwords and query strings
    /// of `generation.url` and `generation.webhooks`. An empty secret stays empty.
    pub fn redacted(&self) -> serde_json::Value {
        let mut v = (*self.effective).clone();
        for (section, key) in [("purge", "token"), ("peers", "token")] {
            if let Some(slot) = v.get_mut(section).and_then(|s| s.get_mut(key)) {
                if slot.as_str().is_some_and(|t| !t.is_empty()) {
                    *slot = serde_json::Value::from(REDACTED);
                }
            }
        }
        if let Some(slot) = v.get_mut("bus").and_then(|s| s.get_mut("amqp_url")) {
            if let Some(url) = slot.as_str() {
                *slot = serde_json::Value::from(redact_url(url, false));
            }
        }
        if let Some(generation) = v.get_mut("generation") {
            if let Some(slot) = generation.get_mut("url") {
                if let Some(url) = slot.as_str() {
                    *slot = serde_json::Value::from(redact_url(url, true));
                }
            }
            if let Some(hooks) = generation.get_mut("webhooks").and_then(|h| h.as_array_mut()) {
                for slot in hooks {
                    if let Some(url) = slot.as_str() {
                        *slot = serde_json::Value::from(redact_url(url, true));
                    }
                }
            }
        }
        v
    }

    /// [`Config::redacted`] as TOML (`corral --check`): the file with every default filled in.
    pub fn effective_toml(&self) -> String {
        fn no_nulls(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.retain(|_, x| !x.is_null());
                    m.values_mut().for_each(no_nulls);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(no_nulls),
                _ => {}
            }
        }
        let mut v = self.redacted();
        no_nulls(&mut v);
        toml::to_string(&v).unwrap_or_else(|e| format!("# cannot be written as TOML: {e}\n"))
    }

    /// Parse and validate `text`; `source` names it in errors. Touches no socket.
    pub fn from_str(text: &str, source: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "-".to_string() } else { key };
            // toml's message carries the line and a caret under the bad value
            ConfigError::new(source, key, e.inner().to_string().trim_end().to_string())
        })?;
        file.validate(source)
    }

    /// Read `path` and validate it (no socket is touched).
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&source, "-", format!("cannot read: {e}")))?;
        Config::from_str(&text, &source)
    }

    /// The embedded default configuration (memory cache only).
    pub fn embedded_default() -> Config {
        Config::from_str(DEFAULT_CONFIG, "<embedded default>").expect("the embedded default config is valid")
    }

    /// For `--check`: every listen address must be one this machine has. "In use" is accepted:
    /// the running corral may hold it while its next config is checked.
    pub fn check_addresses(&self) -> Result<(), ConfigError> {
        self.bind_each(true)
    }

    /// Bind and release each listen address, so a bad one fails before Pingora starts.
    pub fn check_bindable(&self) -> Result<(), ConfigError> {
        self.bind_each(false)
    }

    fn bind_each(&self, in_use_is_fine: bool) -> Result<(), ConfigError> {
        let mut addrs = vec![("server.listen", self.server.listen)];
        if let Some(admin) = self.server.admin {
            addrs.push(("server.admin", admin));
        }
        for (key, addr) in addrs {
            match TcpListener::bind(addr) {
                Ok(_) => {}
                Err(e) if in_use_is_fine && e.kind() == std::io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    return Err(ConfigError::new(
                        &self.source,
                        key,
                        format!("cannot bind {addr}: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The cache settings for a request to `host` + `path`: the `[cache]` defaults, overridden
    /// by the first matching `[[rule]]` (returned too).
    pub fn effective(&self, host: &str, path: &str) -> (Effective, Option<&Rule>) {
        let c = &self.cache;
        let rule = self.rule_for(host, path);
        let eff = Effective {
            default_ttl: rule.and_then(|r| r.ttl).unwrap_or(c.default_ttl),
            grace: rule.and_then(|r| r.grace).unwrap_or(c.grace),
            stale_if_error: rule.and_then(|r| r.stale_if_error).unwrap_or(c.stale_if_error),
            cache_private: rule.is_some_and(|r| r.cache_private),
            cache_set_cookie: rule.is_some_and(|r| r.cache_set_cookie),
        };
        (eff, rule)
    }

    /// The first rule that applies to this request, if any.
    pub fn rule_for(&self, host: &str, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(host, path))
    }
}

fn key_host(h: &str) -> String {
    crate::key::normalize_host(h)
}

fn resolve(source: &str, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::new(source, key, "must not be empty (host:port)"));
    }
    value
        .to_socket_addrs()
        .map_err(|e| ConfigError::new(source, key, format!("invalid address {value:?}: {e}")))?
        .next()
        .ok_or_else(|| ConfigError::new(source, key, format!("{value:?} resolves to nothing")))
}

#[cfg(test)]
mod tests;
