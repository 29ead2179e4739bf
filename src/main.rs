//! The `corral` binary: parse the command line, load the config, run the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use corral::config::Config;

/// A caching HTTP reverse proxy on Pingora.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Opt {
    /// Configuration file (TOML). Without it, the embedded default (conf/corral.toml) is used.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,
}

/// glibc's malloc, set for a cache whose bodies of every size come and go. By default glibc
/// raises its mmap threshold each time it frees a large block, up to 32 MiB, so that bodies
/// of megabytes end up in its heaps, where evicting them leaves holes that stay resident. A
/// fixed threshold of 128 KiB (glibc's initial one) keeps larger bodies in mappings of their
/// own (unless a free block of the heap fits), returned to the system when evicted; a 1 MiB
/// trim threshold gives back the top of the heap sooner. Pingora's per-request buffers stay
/// below it: a lower threshold (32 KiB) kept less resident but cost a quarter of the hit
/// throughput in mmap calls. Measured (tests/cache.rs, a heavy-tailed workload through a
/// 16 MiB L1): RSS grew by 1.49x to 1.65x `memory_bytes` without this, 1.34x to 1.40x with
/// it. glibc's own settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or their
/// `GLIBC_TUNABLES` names) win when set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let set = |var: &str, tunable: &str| std::env::var_os(var).is_some() || tunables.contains(tunable);
    // SAFETY: mallopt takes two integers and only sets malloc's parameters; it is called
    // first in main, before any other thread exists.
    unsafe {
        if !set("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
        if !set("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold") {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    hold_sighup();
    let opt = Opt::parse();
    let read = match &opt.config {
        Some(path) => Config::read(path),
        None => Ok(Config::embedded_default()),
    };
    let loaded = read.and_then(|cfg| {
        if opt.check {
            cfg.check_addresses()
        } else {
            cfg.check_bindable()
        }
        .map(|()| cfg)
    });
    let mut cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("corral: bad configuration: {e:#}");
            return ExitCode::from(1);
        }
    };
    if opt.check {
        print!("{}", cfg.effective_toml());
        eprintln!("corral: {} is valid", cfg.source);
        return ExitCode::SUCCESS;
    }
    init_tracing(&cfg.log.level, cfg.log.json);
    fit_connections_to_nofile(&mut cfg);
    tracing::info!(
        config = %cfg.source,
        listen = %cfg.server.listen,
        admin = ?cfg.server.admin,
        upstream = %cfg.upstream.address,
        memory_bytes = cfg.cache.memory_bytes,
        "corral starting"
    );
    match corral::build_server(cfg, opt.config.clone()) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("corral: cannot start: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Install a handler for SIGHUP at once: its default action ends the process, and the
/// reload service ([`corral::live::OnSighup`]) only listens once the server runs. A SIGHUP
/// before that (a reload sent right after a restart) is then ignored instead of fatal. The
/// handler stays for the life of the process (tokio never removes it).
fn hold_sighup() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build();
    if let Ok(rt) = rt {
        rt.block_on(async {
            let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        });
    }
}

/// Raise the open-files limit to its hard limit, and keep `server.max_connections` below it,
/// with room for upstream and memcached connections and the process's own files: corral
/// refuses a connection with a 503 rather than run out of descriptors.
fn fit_connections_to_nofile(cfg: &mut Config) {
    let Some(nofile) = corral::conn::raise_nofile_limit() else {
        tracing::warn!("cannot read the open files limit (RLIMIT_NOFILE)");
        return;
    };
    let memcached = cfg
        .memcached
        .as_ref()
        .map_or(0, |m| m.servers.len() * m.pool_size);
    let reserve = cfg.upstream.max_connections + memcached + 64;
    let fit = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(reserve)
        .max(1);
    let limits = &mut cfg.server.limits;
    if fit < limits.max_connections {
        tracing::warn!(
            nofile,
            configured = limits.max_connections,
            max_connections = fit,
            "server.max_connections lowered to fit the open files limit (raise it with ulimit -n)"
        );
        limits.max_connections = fit;
    }
    tracing::info!(
        nofile,
        max_connections = limits.max_connections,
        "open files limit"
    );
}

fn init_tracing(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        // one object a line, the event's fields at the top level (method, host, path, status,
        // cache, duration_ms, upstream_ms, client for an access line), as log shippers expect
        fmt.json().flatten_event(true).with_current_span(false).init();
    } else {
        fmt.with_ansi(std::io::stdout().is_terminal()).init();
    }
}
