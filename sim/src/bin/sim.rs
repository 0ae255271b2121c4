//! `tiproxy-sim`: runs seed-derived simulations of the whole proxy.
//!
//! `--seed N` replays one seed and prints its trace; `--seeds A..B` sweeps
//! (B exclusive). A failing seed prints the command that replays it. Exit
//! status 1 when any seed fails.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use clap::Parser;
use tiproxy_runtime::router::PlantedBug;
use tiproxy_sim::run::{Outcome, RunOptions, run};
use tiproxy_sim::scenario::Scenario;

#[derive(Debug, Parser)]
#[command(about = "Deterministic simulation of tiproxy with TiDB doubles, faults and clients")]
struct Args {
    /// Run one seed, printing its derived options and every trace event.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep seeds `A..B` (B exclusive).
    #[arg(long, value_parser = parse_range)]
    seeds: Option<(u64, u64)>,
    /// With --seed: print only the options and the result, not the trace.
    #[arg(long)]
    quiet: bool,
    /// Seeds run at once, each simulation on its own thread (a simulation
    /// is single-threaded; results do not depend on this).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Plant a deliberate bug in the proxy (mutation testing; needs
    /// `--features sim-mutations`): a sweep should fail. route-to-draining |
    /// no-evacuation | leak-lease-on-move | move-inside-transaction |
    /// forget-user-variable | restore-stale-copy |
    /// resend-in-flight
    #[arg(long, value_parser = parse_bug)]
    plant: Option<PlantedBug>,
    /// Run the virtual IP election model (`tiproxy_sim::ha`: at most one
    /// owner under PD outages, partitions, crashes) for these seeds instead.
    #[arg(long)]
    ha: bool,
    /// Write each seed's trace to `DIR/seed-N.trace` (to compare two runs
    /// of a seed whose trace hashes differ).
    #[arg(long, value_name = "DIR")]
    trace_dir: Option<std::path::PathBuf>,
}

/// Log lines carry the simulated time of the host that wrote them (the
/// seed's run is on the thread named by the line's thread id).
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>10.3}s", t.as_secs_f64()),
            None => write!(w, "{:>11}", "-"),
        }
    }
}

fn parse_bug(s: &str) -> Result<PlantedBug, String> {
    PlantedBug::ALL
        .into_iter()
        .find(|b| b.name() == s)
        .ok_or_else(|| format!("unknown bug {s:?}"))
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range A..B"))?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {s}"));
    }
    Ok((a, b))
}

fn report(o: &Outcome, plant: &str) {
    println!(
        "seed {}: {} in {:.1}s simulated; trace {:016x} ({} events); {} ops, {} moves seen, {} unavoidable errors, {} keys committed",
        o.seed,
        if o.passed() { "ok" } else { "FAILED" },
        o.sim_time.as_secs_f64(),
        o.trace_hash,
        o.events,
        o.stats.ops,
        o.stats.moves_seen,
        o.stats.allowed_errors,
        o.stats.committed_keys,
    );
    for v in &o.violations {
        println!("  {v}");
    }
    if !o.passed() {
        println!(
            "REPRODUCE WITH: cargo run -p tiproxy-sim{} -- --seed {}{plant}",
            if plant.is_empty() {
                ""
            } else {
                " --features sim-mutations"
            },
            o.seed
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .with_timer(SimTime)
        .with_thread_ids(true)
        .with_ansi(false)
        .try_init();
    let (from, to, single) = match (args.seed, args.seeds) {
        (Some(s), _) => (s, s + 1, true),
        (None, Some((a, b))) => (a, b, false),
        (None, None) => (0, 20, false),
    };
    let plant = match args.plant {
        Some(b) => format!(" --plant {}", b.name()),
        None => String::new(),
    };
    if args.plant.is_some() && !cfg!(feature = "sim-mutations") {
        eprintln!("--plant needs a build with --features sim-mutations");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    if args.ha {
        return sweep_ha(from, to, started);
    }
    let mut failed = Vec::new();
    let opts = RunOptions {
        verbose: single && !args.quiet,
        plant: args.plant,
        trace_dir: args.trace_dir.clone(),
    };
    if single {
        // The seed and every option derived from it, first.
        print!("{}", Scenario::from_seed(from));
    }
    // Workers take the next seed from a shared counter and send outcomes
    // back; they are printed as they finish.
    let next = Arc::new(AtomicU64::new(from));
    let (tx, rx) = mpsc::channel::<Outcome>();
    let workers: Vec<_> = (0..args.jobs.min(to - from))
        .map(|_| {
            let (next, tx, opts) = (next.clone(), tx.clone(), opts.clone());
            std::thread::spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= to {
                        return;
                    }
                    if tx.send(run(&Scenario::from_seed(seed), &opts)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    for o in rx {
        report(&o, &plant);
        if !o.passed() {
            failed.push(o.seed);
        }
    }
    for w in workers {
        if w.join().is_err() {
            eprintln!("a simulation thread panicked");
            return ExitCode::FAILURE;
        }
    }
    failed.sort_unstable();
    let secs = started.elapsed().as_secs_f64();
    let n = to - from;
    println!(
        "{n} seed(s) in {secs:.1}s ({:.1} seeds/min); {} failed{}",
        n as f64 * 60.0 / secs.max(1e-9),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(": {failed:?}")
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--ha`: the election model's seeds, one after another (each takes
/// milliseconds on tokio's paused clock).
fn sweep_ha(from: u64, to: u64, started: Instant) -> ExitCode {
    let mut failed = 0;
    for seed in from..to {
        match tiproxy_sim::ha::run_seed(seed) {
            Ok(s) if to - from == 1 => println!("seed {seed}: ok {s:?}"),
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                println!("{e}\nREPRODUCE WITH: cargo run -p tiproxy-sim -- --ha --seed {seed}");
            }
        }
    }
    println!(
        "ha: {} seed(s) in {:.1}s; {failed} failed",
        to - from,
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
