//! `tiproxy`: the proxy server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tiproxy_runtime::config::Config;

#[derive(Parser, Debug)]
#[command(name = "tiproxy", version = tiproxy_runtime::VERSION, long_version = tiproxy_runtime::LONG_VERSION, about = "MySQL-protocol proxy for TiDB that keeps connections alive across TiDB restarts")]
struct Args {
    /// Configuration file (TiProxy's proxy.toml format).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The host registered in PD, over `proxy.advertise-addr` (as
    /// TiProxy's flag: a host, or a DNS name; the SQL port is added).
    #[arg(long = "advertise-addr", value_name = "HOST")]
    advertise_addr: Option<String>,
    /// Take over from the proxy running with the same `workdir`: its
    /// listeners, then its sessions (see README, "Upgrading in place").
    #[arg(long)]
    takeover: bool,
    /// Deprecated in TiProxy and ignored: `[log] encoder` decides.
    #[arg(long = "log_encoder", value_name = "ENCODER")]
    log_encoder: Option<String>,
    /// Deprecated in TiProxy and ignored: `[log] level` decides.
    #[arg(long = "log_level", value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The bytes read at start: the watcher reloads only when they change.
    let loaded = args
        .config
        .as_ref()
        .map(|p| std::fs::read(p).unwrap_or_default());
    let (mut config, warnings) = match &args.config {
        Some(p) => match Config::load(p) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("tiproxy: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
        None => (Config::default(), Vec::new()),
    };
    if let Some(a) = args
        .advertise_addr
        .as_ref()
        .filter(|a| !a.trim().is_empty())
    {
        config.proxy.advertise_addr = a.trim().to_string();
    }
    if let Err(e) = tiproxy_runtime::logging::init(&config.log) {
        eprintln!("tiproxy: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    for w in warnings {
        tracing::warn!("{w}");
    }
    for (flag, given, key) in [
        ("--log_encoder", &args.log_encoder, "encoder"),
        ("--log_level", &args.log_level, "level"),
    ] {
        if given.is_some() {
            tracing::warn!(
                "{flag} is deprecated (as in TiProxy) and ignored; [log] {key} in the configuration decides"
            );
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tiproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let workers = match worker_threads(std::env::var("TIPROXY_WORKER_THREADS").ok()) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("tiproxy: {e}");
                return ExitCode::from(2);
            }
        };
        // `TIPROXY_WORKER_PLACEMENT=round-robin`: new connections in turn
        // (the tests use it to make connections move between threads).
        let round_robin = std::env::var("TIPROXY_WORKER_PLACEMENT").as_deref() == Ok("round-robin");
        let net = match tiproxy_runtime::net::TokioNet::with_placement(workers, round_robin) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("tiproxy: cannot start worker threads: {e}");
                return ExitCode::FAILURE;
            }
        };
        let started = if args.takeover {
            match tiproxy_runtime::takeover::connect(&config).await {
                Ok(inherited) => tiproxy_runtime::start_takeover(net, config, inherited).await,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("tiproxy: {e}");
                    return ExitCode::from(3);
                }
            }
        } else {
            tiproxy_runtime::start_on(net, config).await
        };
        let mut proxy = match started {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("tiproxy: cannot start: {e}");
                return ExitCode::from(2);
            }
        };
        let watch = args.config.zip(loaded).map(|(path, loaded)| {
            tiproxy_runtime::task::spawn(tiproxy_runtime::reload::watch(
                proxy.state().clone(),
                path,
                loaded,
            ))
        });
        // The wall-clock monitor (`tiproxy_monitor_*`): the real process
        // only, the simulation's clock is virtual.
        let monitor = tiproxy_runtime::task::spawn(tiproxy_runtime::metrics::monitor_loop());
        let mut takeover = proxy.serve_takeover();
        let taken_over = tokio::select! {
            _ = wait_for_signal() => false,
            r = &mut takeover => r.is_ok(),
        };
        takeover.abort();
        monitor.abort();
        if let Some(w) = watch {
            w.abort();
        }
        if taken_over {
            tracing::info!("taken over by a new process: exiting once the sessions left here end");
            proxy.shutdown_after_takeover().await;
        } else {
            proxy.shutdown().await;
        }
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down gracefully"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down gracefully"),
    }
}

/// Connection worker threads: `TIPROXY_WORKER_THREADS` when set (as Go's
/// `GOMAXPROCS` caps TiProxy), otherwise the CPUs this process may use
/// (affinity and cgroup quota included).
fn worker_threads(var: Option<String>) -> Result<usize, String> {
    match var {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "TIPROXY_WORKER_THREADS={v:?} is not a thread count between 1 and 1024"
            )),
        },
        None => Ok(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)),
    }
}
