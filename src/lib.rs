//! corral: a caching HTTP reverse proxy on Pingora.
//!
//! It sits in front of a web application and caches its responses by RFC 9111, in memory
//! (L1, bounded by bytes), with dogpile protection: one upstream request per cold or expired
//! key, stale copies served while one request revalidates or while the upstream fails.
//!
//! # Layout
//! - [`config`]: the TOML file → validated [`config::Config`]
//! - [`fields`]: header fields read alike from a header map or a stored head
//! - [`key`]: cache key (scheme + host + path + query, Vary variance)
//! - [`policy`]: RFC 9111 storability and freshness
//! - [`storage`]: cache tiers behind pingora-cache's `Storage` (L1 memory, L2 memcached)
//! - [`lock`]: one request works for many: fill leases, refresh locks, in-process gates
//! - [`cache`]: the cache as one object (tiers, purge records, lock), and the purge entry point
//! - [`proxy`]: `impl ProxyHttp`, glue only (with `fast_hit`, `headers`, `upstream` slots)
//! - [`conn`]: client connections: the cap, head and idle deadlines
//! - [`cache_status`]: the RFC 9211 `Cache-Status` header and outcome labels
//! - [`onstack`]: short texts put together on the stack (the hit path's key and `Cache-Status`)
//! - [`purge`]: purge requests of every client shape → one `Purge`; validity records;
//!   memcached's purge log and its follower; the ban sweeper
//! - [`transport`]: purges carried to the other corrals directly (the message, the transport
//!   interface, HTTP to the peers with back-off and a backlog, the receiving inbox)
//! - [`admin`]: admin listener (`/metrics`, `/healthz`, `/stats`, `/peers`, `POST /purge`, `POST /purge/all`)
//! - [`json`]: the JSON answers corral writes itself
//! - [`metrics`]: every Prometheus metric

pub mod admin;
pub mod cache;
pub mod cache_status;
pub mod client;
pub mod config;
pub mod conn;
pub mod events;
pub mod fields;
pub mod generation;
pub mod json;
pub mod key;
pub mod live;
pub mod lock;
pub mod metrics;
pub mod onstack;
pub mod policy;
pub mod proxy;
pub mod purge;
pub mod storage;
pub mod throttle;
pub mod transport;
pub mod trim;

use std::sync::Arc;

use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::listening::Service;

use crate::cache::CacheParts;
use crate::config::Config;
use crate::proxy::Corral;

/// Build the Pingora server for `cfg`: the proxy service and, if configured, the admin one.
/// Nothing is bound until the server runs. Fails only if the memcached client cannot be built
/// (a server name that does not resolve); a server that is down is not an error.
pub fn build_server(cfg: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<Server> {
    metrics::register_process();
    // the memcached client resolves names here and dials lazily, on the proxy's own runtime
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let l2 = match &cfg.memcached {
        Some(m) => Some(
            rt.block_on(storage::memcached::L2::connect(m))
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let with_generation = cfg.generation.header.is_some() || cfg.generation.poll.is_some();
    // the namespace's current upstream generation: a restarted corral that sees it again
    // does not take it for a change (memcached down: the first one seen is adopted)
    let shared_generation = match (&cfg.memcached, with_generation) {
        // a client of its own, on this runtime that ends with this function: a server found
        // down here must not leave the proxy's client with a probe that died with it
        (Some(m), true) => rt.block_on(async {
            match storage::memcached::L2::connect(m).await {
                Ok(once) => once.upstream_generation().await,
                Err(_) => Vec::new(),
            }
        }),
        _ => Vec::new(),
    };
    if !cfg.server.listen.ip().is_loopback()
        && cfg.purge.access.token.is_none()
        && !cfg.purge.access.allow.is_empty()
    {
        // behind a TLS terminator or load balancer on an allowed address, every client looks
        // like it: purges would be open to all
        tracing::warn!(listen = %cfg.server.listen, allow = ?cfg.purge.access.allow, trusted_proxies = ?cfg.server.trusted_proxies, "purges are allowed by source address alone on a listener that is not loopback-only: set purge.token, and list a TLS terminator or load balancer in server.trusted_proxies so that its clients' addresses are checked instead of its own");
    }
    let cfg = Arc::new(cfg);
    let conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: true,
        // tests and operators stop corral quickly; in-flight requests get this long
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let parts = CacheParts::leak(&cfg, l2);
    let cluster = transport::Cluster::leak(parts, &cfg);
    let generations =
        with_generation.then(|| generation::Generations::leak(&cfg, cluster, shared_generation));
    let reloader = live::Reloader::leak(cfg.clone(), path).map_err(anyhow::Error::msg)?;
    reloader.attach(cluster);
    let mut proxy = pingora_proxy::http_proxy(&server.configuration, Corral::new(reloader, cluster));
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    options.h2_idle_timeout = Some(cfg.server.limits.keepalive_timeout);
    proxy.server_options = Some(options);
    let mut proxy = Service::new(
        "corral proxy".to_string(),
        conn::Guarded::new(
            proxy,
            crate::proxy::FrontHits::new(reloader, parts),
            cfg.server.limits,
        ),
    );
    proxy.add_tcp(&cfg.server.listen.to_string());
    server.add_service(proxy);

    // config reloads on SIGHUP (POST /reload is the admin listener's)
    server.add_service(pingora_core::services::background::background_service(
        "config reload",
        live::OnSighup(reloader),
    ));

    // the ban sweeper, on its own runtime: never on a request's path
    server.add_service(pingora_core::services::background::background_service(
        "ban sweeper",
        purge::sweep::Sweeper::new(parts.storage, cfg.purge.sweep_interval),
    ));

    // what eviction frees in the middle of malloc's heaps, given back to the kernel
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    if cfg.cache.trim_allocator {
        tracing::info!("cache.trim_allocator is ignored: this build's allocator is not glibc's");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !cfg.cache.trim_allocator {
        tracing::info!("allocator trim off (cache.trim_allocator = false)");
    } else {
        server.add_service(pingora_core::services::background::background_service(
            "allocator trim",
            trim::Trimmer::new(parts.storage.l1, cfg.cache.memory_bytes),
        ));
    }

    if generations.is_some() || !cfg.generation.webhooks.is_empty() {
        // the generation poll and the webhooks' deliveries, on their own runtime
        server.add_service(pingora_core::services::background::background_service(
            "generation and events",
            generation::Background {
                generations,
                cfg: cfg.clone(),
                live: reloader,
            },
        ));
    }

    if cluster.has_transports() {
        // delivery to peers, on its own runtime: never on a request's path
        server.add_service(pingora_core::services::background::background_service(
            "purge transports",
            transport::Starter(cluster),
        ));
    }

    if let Some(admin_addr) = cfg.server.admin {
        let mut admin = Service::new(
            "corral admin".to_string(),
            admin::Admin::new(parts, cluster, reloader),
        );
        admin.add_tcp(&admin_addr.to_string());
        server.add_service(admin);
    }
    Ok(server)
}
