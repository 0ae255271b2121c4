//! `tiproxy-sim`: runs seed-derived simulations of the whole proxy.
//!
//! `--seed N` replays one seed and prints its trace; `--seeds A..B` sweeps
//! (B exclusive). A failing seed prints the command that replays it. Exit
//! status 1 when any seed fails.

use std::process::ExitCode;
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
    /// Plant a deliberate bug in the proxy (mutation testing): a sweep
    /// should fail. route-to-draining | no-evacuation | leak-lease-on-move
    #[arg(long, value_parser = parse_bug)]
    plant: Option<PlantedBug>,
}

fn parse_bug(s: &str) -> Result<PlantedBug, String> {
    Ok(match s {
        "route-to-draining" => PlantedBug::RouteToDraining,
        "no-evacuation" => PlantedBug::NoEvacuation,
        "leak-lease-on-move" => PlantedBug::LeakLeaseOnMove,
        _ => return Err(format!("unknown bug {s:?}")),
    })
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
            "REPRODUCE WITH: cargo run -p tiproxy-sim -- --seed {}{plant}",
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
        .try_init();
    let (from, to, single) = match (args.seed, args.seeds) {
        (Some(s), _) => (s, s + 1, true),
        (None, Some((a, b))) => (a, b, false),
        (None, None) => (0, 20, false),
    };
    let plant = match args.plant {
        Some(PlantedBug::RouteToDraining) => " --plant route-to-draining",
        Some(PlantedBug::NoEvacuation) => " --plant no-evacuation",
        Some(PlantedBug::LeakLeaseOnMove) => " --plant leak-lease-on-move",
        None => "",
    }
    .to_string();
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in from..to {
        let scenario = Scenario::from_seed(seed);
        if single {
            print!("{scenario}");
        }
        let o = run(
            &scenario,
            &RunOptions {
                verbose: single && !args.quiet,
                plant: args.plant,
            },
        );
        report(&o, &plant);
        if !o.passed() {
            failed.push(seed);
        }
    }
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
