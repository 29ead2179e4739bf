//! The running configuration, and its reload (`SIGHUP`, admin `POST /reload`).
//!
//! The proxy and the admin listener read the config through [`Reloader::load`]: an
//! `arc-swap`, so a reload replaces it for the requests that start after it, while requests
//! in flight finish on the one they started with. What a reload can change at once is
//! [`crate::config::LIVE_KEYS`] (rules, TTLs, grace, allow-lists, tokens, `host_map`, the
//! upstream's address and timeouts, trusted proxies); the cache, the memcached client and
//! the connections are untouched. Any other change is reported as "needs restart" (in the
//! answer, the log and `/config`) and does not take effect until then. An invalid file
//! changes nothing: the error names the key, and the old config stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora_core::upstreams::peer::HttpPeer;
use serde::Serialize;

use crate::config::{changed_keys, Config, LIVE_KEYS};
use crate::metrics;
use crate::purge::Access;

/// One config and what is built from it once, not per request.
pub struct Live {
    pub cfg: Arc<Config>,
    /// Connection settings for the upstream, cloned per request.
    pub peer: HttpPeer,
    /// `upstream.address`, resolved when this config was loaded.
    pub upstream: std::net::SocketAddr,
    /// Who may send peer messages: `peers.token`, from a peer's address or `purge.allow`.
    pub peer_access: Access,
}

/// `upstream.address` resolved (blocking: at start, or off the runtime on a reload), as
/// Pingora's `HttpPeer` would, but with an error instead of a panic.
pub fn resolve_upstream(address: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .map_err(|e| format!("upstream.address: {address:?} does not resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream.address: {address:?} resolves to no address"))
}

impl Live {
    /// The live parts of `cfg`, its upstream at `upstream` ([`resolve_upstream`]).
    pub fn new(cfg: Arc<Config>, upstream: std::net::SocketAddr) -> Live {
        let up = &cfg.upstream;
        let mut peer = HttpPeer::new(upstream, up.tls, up.sni.clone());
        peer.options.connection_timeout = Some(up.connect_timeout);
        // Pingora 0.9.1 times every read of an upstream response with one value, the head's
        // and the body's alike: the smaller of the two settings, so that a hung origin is
        // given up on after first_byte_timeout (README: Limits and timeouts)
        peer.options.read_timeout = Some(up.first_byte_timeout.min(up.read_timeout));
        peer.options.write_timeout = Some(up.write_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        let mut allow = cfg.purge.access.allow.clone();
        allow.extend(cfg.peers.peers.iter().map(|p| ipnet::IpNet::from(p.addr.ip())));
        let peer_access = Access {
            allow,
            token: cfg.peers.token.clone(),
        };
        Live {
            cfg,
            peer,
            upstream,
            peer_access,
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reloaded {
    /// `ok`, `unchanged` or `invalid`.
    pub result: &'static str,
    /// The hash of the config now in use (the old one when invalid).
    pub hash: String,
    /// The keys whose values changed (dotted, as in the file).
    pub changed: Vec<String>,
    /// The changed keys that take effect only after a restart.
    pub needs_restart: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The running config and how to read it again.
pub struct Reloader {
    /// The file given with `-c`; `None` for the embedded default, which cannot change.
    path: Option<PathBuf>,
    /// The config corral started with: what the settings that need a restart still are.
    started: Arc<Config>,
    live: ArcSwap<Live>,
    /// The settings read from the file that wait for a restart.
    pending: parking_lot::Mutex<Vec<String>>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
    /// Where a change of `[peers] urls` or `token` goes ([`Reloader::attach`]).
    cluster: std::sync::OnceLock<&'static crate::transport::Cluster>,
}

impl Reloader {
    /// Build and leak the reloader for `cfg` (read from `path`). Fails when the upstream's
    /// address does not resolve.
    pub fn leak(cfg: Arc<Config>, path: Option<PathBuf>) -> Result<&'static Reloader, String> {
        let upstream = resolve_upstream(&cfg.upstream.address)?;
        metrics::set_config_hash(None, &cfg.hash);
        Ok(Box::leak(Box::new(Reloader {
            path,
            started: cfg.clone(),
            live: ArcSwap::from_pointee(Live::new(cfg, upstream)),
            pending: parking_lot::Mutex::new(Vec::new()),
            busy: tokio::sync::Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
        })))
    }

    /// The cluster whose peers a reload may change.
    pub fn attach(&self, cluster: &'static crate::transport::Cluster) {
        let _ = self.cluster.set(cluster);
    }

    /// The config in use now.
    pub fn load(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Changed settings read from the file that wait for a restart.
    pub fn pending_restart(&self) -> Vec<String> {
        self.pending.lock().clone()
    }

    /// Read the file again and apply what can change live; `why` is for the log
    /// (`SIGHUP`, `admin`).
    /// A reload refused: the running config stays, and the refusal is counted and logged.
    fn refused(&self, why: &str, hash: &str, needs_restart: Vec<String>, error: String) -> Reloaded {
        metrics::CONFIG_RELOADS.with_label_values(&["invalid"]).inc();
        tracing::error!(trigger = why, error = %error, "config reload refused: the running config stays");
        Reloaded {
            result: "invalid",
            hash: hash.to_string(),
            changed: Vec::new(),
            needs_restart,
            error: Some(error),
        }
    }

    pub async fn reload(&self, why: &str) -> Reloaded {
        let _one = self.busy.lock().await;
        let old = self.load();
        let read = match &self.path {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || Config::read(&path))
                    .await
                    .unwrap_or_else(|e| {
                        Err(crate::config::ConfigError {
                            file: "-".into(),
                            key: "-".into(),
                            reason: format!("reading the file failed: {e}"),
                        })
                    })
            }
            None => Ok(Config::embedded_default()),
        };
        let new = match read {
            Ok(new) => new,
            Err(e) => return self.refused(why, &old.cfg.hash, self.pending_restart(), e.to_string()),
        };
        // `cache.eviction` and `memory_bytes` change only at a restart, `max_object_bytes` at
        // once: the file is checked against the manager that runs (a file that switches to lru
        // would otherwise let tinyufo be handed objects it can only fetch and throw away, and
        // S3-FIFO's shards were sized for the max_object_bytes it started with)
        let running = &self.started.cache;
        if let Err(reason) = running.eviction.check_max_object(
            new.cache.max_object_bytes,
            Some((running.memory_bytes, running.max_object_bytes)),
        ) {
            let error = format!("{}: cache.max_object_bytes: {reason}", new.source);
            return self.refused(why, &old.cfg.hash, self.pending_restart(), error);
        }
        let changed = changed_keys(&old.cfg.effective, &new.effective);
        // against what runs, not the last file read: later reloads keep reporting them
        let needs_restart: Vec<String> = changed_keys(&self.started.effective, &new.effective)
            .into_iter()
            .filter(|k| !LIVE_KEYS.contains(&k.as_str()))
            .collect();
        *self.pending.lock() = needs_restart.clone();
        if changed.is_empty() {
            metrics::CONFIG_RELOADS.with_label_values(&["unchanged"]).inc();
            tracing::info!(trigger = why, hash = %old.cfg.hash, "config reload: unchanged");
            return Reloaded {
                result: "unchanged",
                hash: old.cfg.hash.clone(),
                changed,
                needs_restart,
                error: None,
            };
        }
        // the upstream's address is resolved before anything changes: a name that does not
        // resolve refuses the reload (it would have made Pingora's peer panic)
        let upstream = if new.upstream.address == old.cfg.upstream.address {
            Ok(old.upstream)
        } else {
            let address = new.upstream.address.clone();
            tokio::task::spawn_blocking(move || resolve_upstream(&address))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        };
        let upstream = match upstream {
            Ok(a) => a,
            Err(e) => {
                let error = format!("{}: {e}", new.source);
                return self.refused(why, &old.cfg.hash, needs_restart, error);
            }
        };
        // stored whatever changed: the file's view and hash (/config, /stats, the metric) are
        // the new file's, the settings that need a restart keep their running values
        let merged = Arc::new(merge_live(&old.cfg, new));
        self.live.store(Arc::new(Live::new(merged.clone(), upstream)));
        if changed.iter().any(|k| k == "peers.urls" || k == "peers.token") {
            if let Some(cluster) = self.cluster.get() {
                cluster.reconfigure_peers(&merged.peers);
            }
        }
        metrics::set_config_hash(Some(&old.cfg.hash), &merged.hash);
        metrics::CONFIG_RELOADS.with_label_values(&["ok"]).inc();
        tracing::info!(trigger = why, hash = %merged.hash, changed = ?changed, "config reloaded");
        if !needs_restart.is_empty() {
            tracing::warn!(keys = ?needs_restart, "config reload: these settings change only after a restart");
        }
        Reloaded {
            result: "ok",
            hash: merged.hash.clone(),
            changed,
            needs_restart,
            error: None,
        }
    }
}

/// `old` with the live settings of `new` ([`LIVE_KEYS`]); the rest stays as it runs. The
/// effective view and the hash are `new`'s: what the file says.
fn merge_live(old: &Config, new: Config) -> Config {
    let mut merged = old.clone();
    let up = &mut merged.upstream;
    up.address = new.upstream.address;
    up.tls = new.upstream.tls;
    up.sni = new.upstream.sni;
    up.connect_timeout = new.upstream.connect_timeout;
    up.first_byte_timeout = new.upstream.first_byte_timeout;
    up.read_timeout = new.upstream.read_timeout;
    up.write_timeout = new.upstream.write_timeout;
    let cache = &mut merged.cache;
    cache.default_ttl = new.cache.default_ttl;
    cache.grace = new.cache.grace;
    cache.stale_if_error = new.cache.stale_if_error;
    cache.max_object_bytes = new.cache.max_object_bytes;
    cache.honor_client_no_cache = new.cache.honor_client_no_cache;
    cache.normalize_accept_encoding = new.cache.normalize_accept_encoding;
    cache.strip_targeted = new.cache.strip_targeted;
    merged.rules = new.rules;
    let purge = &mut merged.purge;
    purge.access = new.purge.access;
    purge.host_map = new.purge.host_map;
    purge.default_host = new.purge.default_host;
    purge.strip_tag_headers = new.purge.strip_tag_headers;
    merged.server.trusted_proxies = new.server.trusted_proxies;
    merged.server.admin_hosts = new.server.admin_hosts;
    merged.peers.peers = new.peers.peers;
    merged.peers.token = new.peers.token;
    merged.log.access_log = new.log.access_log;
    merged.effective = new.effective;
    merged.hash = new.hash;
    merged
}

/// The background service that reloads on every `SIGHUP`, until corral stops.
pub struct OnSighup(pub &'static Reloader);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for OnSighup {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: reload with POST /reload");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    self.0.reload("SIGHUP").await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_key_is_a_key_of_the_file() {
        let cfg = Config::embedded_default();
        for key in LIVE_KEYS {
            let found = match key.split_once('.') {
                Some((section, k)) => cfg.effective.get(section).and_then(|s| s.get(k)).is_some(),
                None => cfg.effective.get(*key).is_some(),
            };
            assert!(found, "{key} is not in the effective config");
        }
    }

    #[test]
    fn changes_are_named_by_section_and_key() {
        let a = Config::from_str("[cache]\ngrace = \"1s\"\n", "a").unwrap();
        let b = Config::from_str(
            "[cache]\ngrace = \"2s\"\n[server]\nlisten = \"127.0.0.1:1\"\n[[rule]]\nttl = \"1s\"\n",
            "b",
        )
        .unwrap();
        assert_eq!(
            changed_keys(&a.effective, &b.effective),
            vec!["cache.grace", "rule", "server.listen"]
        );
        assert!(changed_keys(&a.effective, &a.effective).is_empty());
        assert_ne!(a.hash, b.hash);
        let merged = merge_live(&a, b);
        assert_eq!(merged.cache.grace, Duration::from_secs(2));
        assert_eq!(merged.rules.len(), 1);
        assert_eq!(merged.server.listen, a.server.listen, "listen needs a restart");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::from_str(
            "[purge]\ntoken = \"s3cret\"\n[bus]\namqp_url = \"amqp://user:pw@127.0.0.1:5672/%2f\"\n",
            "c",
        )
        .unwrap();
        let text = c.redacted().to_string();
        assert!(!text.contains("s3cret") && !text.contains(":pw@"), "{text}");
        assert!(
            text.contains("amqp://user:<redacted>@127.0.0.1:5672/%2f"),
            "{text}"
        );
        let hooks = Config::from_str(
            "[generation]\nurl = \"/gen?key=k3y\"\nwebhooks = [\"https://u:p4ss@127.0.0.1/x?token=t0k\"]\n",
            "h",
        )
        .unwrap()
        .redacted()
        .to_string();
        for secret in ["k3y", "p4ss", "t0k"] {
            assert!(!hooks.contains(secret), "{secret} in {hooks}");
        }
        assert!(
            hooks.contains("https://u:<redacted>@127.0.0.1/x?<redacted>"),
            "{hooks}"
        );
        let plain = Config::embedded_default().redacted();
        assert_eq!(plain["purge"]["token"], "");
        // the hash is shown to anyone: a token cannot be guessed from it
        let other = Config::from_str(
            "[purge]\ntoken = \"other\"\n[bus]\namqp_url = \"amqp://user:pw2@127.0.0.1:5672/%2f\"\n",
            "d",
        )
        .unwrap();
        assert_eq!(c.hash, other.hash);
        assert!(
            !changed_keys(&c.effective, &other.effective).is_empty(),
            "a token change is a change"
        );
    }
}
