//! The `corral` binary: parse the command line, load the config, run the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the hit path allocates small, short-lived objects (headers, keys); measured with
/// benches/load.sh, it serves more hits per core than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
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

fn main() -> ExitCode {
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
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("corral: bad configuration: {e:#}");
            return ExitCode::from(1);
        }
    };
    if opt.check {
        println!("corral: {} is valid", cfg.source);
        return ExitCode::SUCCESS;
    }
    init_tracing(&cfg.log.level);
    tracing::info!(
        config = %cfg.source,
        listen = %cfg.server.listen,
        admin = ?cfg.server.admin,
        upstream = %cfg.upstream.address,
        memory_bytes = cfg.cache.memory_bytes,
        "corral starting"
    );
    match corral::build_server(cfg) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("corral: cannot start: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}
