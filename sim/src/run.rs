//! One simulated run of the whole proxy: the real runtime
//! ([`tiproxy_runtime::start_on`] over [`TurmoilNet`]) on host `proxy`, TiDB
//! doubles on `tidb-<i>` sharing one cluster store, client sessions on
//! `client-<k>`, and a `checker` host that sets up the schema and runs the
//! end-of-run checks. The PD double runs on host `pd` ([`crate::pd`]): the
//! TiDBs register in it under leases, and the proxy finds them through its
//! real discovery code (`proxy.pd-addrs`), watching it over the simulated
//! network.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use tiproxy_runtime::config::Config;
use tiproxy_runtime::router::PlantedBug;

use crate::net::TurmoilNet;
use crate::pd::{PD_PORT, PdStore, SimPd};
use crate::scenario::{FaultKind, Scenario};
use crate::tidb::client::{ConnectOptions, RawClient};
use crate::tidb::pd::Registration;
use crate::tidb::{Cluster, ClusterOptions, TidbOptions, TidbServer, Value};
use crate::workload::{ClientSession, QUIT_AFTER_END, sleep_until};
use crate::world::{Invariant, Stats, Violation, World, now};

/// How a run is made.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print every trace event as it happens.
    pub verbose: bool,
    /// A deliberate bug to plant in the proxy (the mutation test).
    pub plant: Option<PlantedBug>,
    /// Keep the trace's lines and write them to `DIR/seed-N.trace` at the
    /// end (two runs of a seed whose hashes differ can then be compared).
    pub trace_dir: Option<std::path::PathBuf>,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Hash of the event trace: equal seeds give equal hashes.
    pub trace_hash: u64,
    /// Events in the trace.
    pub events: u64,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<Violation>,
    /// Simulated time the run took.
    pub sim_time: Duration,
    /// Counters.
    pub stats: Stats,
}

impl Outcome {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The SQL and status ports every TiDB double listens on (own host each).
const TIDB_SQL_PORT: u16 = 4000;
const TIDB_STATUS_PORT: u16 = 10080;
/// Simulated wall clock at the start (2024-01-01T00:00:00Z): session
/// tokens carry times, and they must not depend on when the run happens.
const EPOCH_SECS: u64 = 1_704_067_200;

/// The PD double's host.
const PD_HOST: &str = "pd";
/// TTL of a TiDB's PD lease when the scenario does not crash it (TiDB's
/// own is 45 s; a crash draws its own).
const TIDB_LEASE: Duration = Duration::from_secs(10);

fn pd_endpoints() -> Vec<String> {
    vec![format!("{PD_HOST}:{PD_PORT}")]
}

fn proxy_config(protection: bool, delay_ms: u32) -> Config {
    let text = format!(
        "[proxy]\naddr = \"0.0.0.0:6000\"\npd-addrs = \"{PD_HOST}:{PD_PORT}\"\nsession-protection = {protection}\nsession-protection-delay = \"{delay_ms}ms\"\n\n[api]\naddr = \"0.0.0.0:3080\"\n"
    );
    // The text is built here: a parse error is a bug in this function.
    Config::from_toml(&text, Path::new("simulation.toml"))
        .expect("the simulation's proxy config parses")
        .0
}

/// TiDB `i`'s PD registration, keyed by its host name (the proxy dials
/// what the key says).
fn registration(i: usize, ttl: Duration) -> Registration {
    Registration {
        pd: pd_endpoints(),
        sql: format!("{}:{TIDB_SQL_PORT}", Scenario::tidb_host(i)),
        status_port: TIDB_STATUS_PORT,
        version: "8.5.0".into(),
        labels: Default::default(),
        ttl,
        tls: None,
    }
}

/// Runs `scenario` to its end and checks every invariant.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> Outcome {
    let seed = scenario.seed;
    // Tasks go to each host's LocalSet, dropped in spawn order when the
    // host crashes (`tiproxy_runtime::task`: the trace must not depend on
    // what other threads of this process spawn).
    let _local = tiproxy_runtime::task::spawn_locally_on_this_thread();
    let cluster = Cluster::new(ClusterOptions {
        seed: Some(seed),
        clock: Some(Arc::new(|| {
            UNIX_EPOCH
                + Duration::from_secs(EPOCH_SECS)
                + turmoil::sim_elapsed().unwrap_or_default()
        })),
        ..ClusterOptions::default()
    });
    let world = World::new(
        scenario.clone(),
        cluster.clone(),
        opts.verbose,
        opts.trace_dir.is_some(),
    );
    let pd = {
        // Weak: the store lives in the world's hosts, not the other way.
        let w = Arc::downgrade(&world);
        PdStore::new(Box::new(move |at, what| {
            if let Some(w) = w.upgrade() {
                w.pd_changed(at, &what);
                w.event(at, what);
            }
        }))
    };
    let end = scenario.workload_end + QUIT_AFTER_END + Duration::from_secs(4);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(end + Duration::from_secs(60))
        .tick_duration(scenario.tick)
        .min_message_latency(Duration::ZERO)
        .max_message_latency(scenario.max_latency)
        .build();

    // PD first: it is listening when the TiDBs register.
    {
        let pd = pd.clone();
        let delay = scenario.pd_delay;
        sim.host(PD_HOST, move || crate::pd::serve(pd.clone(), delay));
    }
    for i in 0..scenario.total_tidbs() {
        let world = world.clone();
        let host = Scenario::tidb_host(i);
        sim.host(host.clone(), move || {
            tidb_host(world.clone(), i, host.clone())
        });
    }
    {
        let world = world.clone();
        let plant = opts.plant;
        let pd = pd.clone();
        sim.host("proxy", move || {
            proxy_host(world.clone(), pd.clone(), plant)
        });
    }
    for k in 0..scenario.client_hosts {
        let world = world.clone();
        sim.client(format!("client-{k}"), async move {
            let mut tasks = Vec::new();
            for p in world.scenario.sessions.iter().filter(|p| p.host == k) {
                let s = ClientSession::new(p.clone(), world.clone());
                tasks.push(tokio::task::spawn_local(s.run()));
            }
            for t in tasks {
                t.await?;
            }
            Ok(())
        });
    }
    {
        let world = world.clone();
        sim.client("checker", checker(world, pd.clone()));
    }
    if !scenario.held_links.is_empty()
        || scenario.pd_held.is_some()
        || !scenario.partitions.is_empty()
    {
        let world = world.clone();
        sim.client("network", network_faults(world));
    }

    let steps = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    watchdog(seed, steps.clone(), done.clone());
    // PD's outage: the host goes down (its data stays) and comes back.
    let mut outage = scenario.pd_outage.map(|(at, len)| (at, at + len, false));
    loop {
        steps.fetch_add(1, Ordering::Relaxed);
        if let Some((at, back, down)) = &mut outage {
            let t = sim.elapsed();
            if !*down && t >= *at {
                sim.crash(PD_HOST);
                world.event(t, "pd: down");
                *down = true;
            } else if *down && t >= *back {
                sim.bounce(PD_HOST);
                world.event(t, "pd: up again");
                outage = None;
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                world.violation(Invariant::Simulation, sim.elapsed(), e.to_string());
                break;
            }
        }
        // Fail fast: the first violation is the interesting one.
        if world.failed() {
            break;
        }
    }
    done.store(true, Ordering::Relaxed);
    let sim_time = sim.elapsed();
    drop(sim);
    if !world.failed() {
        check_store(&world, sim_time);
    }
    let (trace_hash, events) = world.trace();
    if let Some(dir) = &opts.trace_dir {
        let path = dir.join(format!("seed-{seed}.trace"));
        if let Err(e) = std::fs::write(&path, world.trace_lines()) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    Outcome {
        seed,
        trace_hash,
        events,
        violations: world.violations(),
        sim_time,
        stats: world.stats(),
    }
}

/// Wall-clock time one simulation step may take before the run is judged
/// stuck in a busy loop (every host shares one thread: a task that never
/// yields stops simulated time itself, so no simulated check can fire).
pub const STUCK_STEP: Duration = Duration::from_secs(60);

/// Ends the process if the run stops stepping: a livelock in some host.
fn watchdog(seed: u64, steps: Arc<AtomicU64>, done: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut last = steps.load(Ordering::Relaxed);
        let mut since = std::time::Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let now = steps.load(Ordering::Relaxed);
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            } else if since.elapsed() > STUCK_STEP {
                eprintln!(
                    "seed {seed}: one simulation step ran for {STUCK_STEP:?} of wall time: a busy loop (livelock) in the proxy or a double"
                );
                eprintln!("REPRODUCE WITH: cargo run -p tiproxy-sim -- --seed {seed}");
                std::process::exit(3);
            }
        }
    });
}

/// A TiDB: starts (late, if it is the added one), registers in PD, has its
/// fault when the scenario says, and stays up (or down) to the end.
async fn tidb_host(world: Arc<World>, i: usize, host: String) -> turmoil::Result {
    let s = &world.scenario;
    if i >= s.initial_tidbs
        && let Some(t) = s.added_tidb
    {
        sleep_until(t).await;
    }
    let fault = s.fault_of(i).copied();
    let (graceful_wait, ttl) = match fault.map(|f| f.kind) {
        Some(FaultKind::GracefulShutdown { graceful_wait, .. }) => (graceful_wait, TIDB_LEASE),
        Some(FaultKind::Crash { lease, .. }) => (Duration::ZERO, lease),
        None => (Duration::ZERO, TIDB_LEASE),
    };
    let sql_addr = format!("0.0.0.0:{TIDB_SQL_PORT}");
    let status_addr = format!("0.0.0.0:{TIDB_STATUS_PORT}");
    let start = || {
        TidbServer::start(
            TurmoilNet::new(&host).with_links(world.links.clone()),
            world.cluster.clone(),
            &sql_addr,
            &status_addr,
            TidbOptions {
                graceful_wait,
                ..TidbOptions::default()
            },
        )
    };
    let reg = registration(i, ttl);
    let h = start().await?;
    world.tidb_started(i, h.clone(), h.sql_addr().ip());
    world.event(now(), format_args!("tidb-{i} started at {}", h.sql_addr()));
    let pd = SimPd::new(Some(world.links.clone()));
    let keeper = tiproxy_runtime::task::spawn(reg.clone().keep_registered(pd.clone()));
    if let Some(f) = fault {
        sleep_until(f.at).await;
        if let FaultKind::Crash {
            mid_statement: true,
            ..
        } = f.kind
        {
            // The crash (and what the invariants excuse) is when a
            // statement has run, not at `f.at`.
            h.crash_after_next_statement();
            let _ =
                tokio::time::timeout(crate::scenario::MID_STATEMENT_WAIT, h.statement_hit()).await;
        }
        world.fault_begins(i, s.fault_breaks_sessions(&f), now());
        let restart_after = match f.kind {
            FaultKind::GracefulShutdown {
                restart_after,
                graceful_wait,
            } => {
                let w = world.clone();
                let wait_ends = f.at + graceful_wait;
                tiproxy_runtime::task::spawn(async move {
                    sleep_until(wait_ends).await;
                    w.tidb_wait_ended(i, now());
                });
                h.graceful_shutdown().await;
                world.tidb_shut_down(i, now());
                keeper.abort();
                // As TiDB: one try; if PD is down, the lease ends it.
                if let Err(e) = reg.deregister(&pd).await {
                    world.event(
                        now(),
                        format_args!("tidb-{i}: PD deregistration failed: {e}"),
                    );
                }
                restart_after
            }
            FaultKind::Crash { restart_after, .. } => {
                h.kill();
                keeper.abort();
                h.stopped().await;
                world.event(now(), format_args!("tidb-{i} crashed"));
                restart_after
            }
        };
        if let Some(r) = restart_after {
            tokio::time::sleep(r).await;
            let h = start().await?;
            world.tidb_started(i, h.clone(), h.sql_addr().ip());
            world.tidb_restarted(i);
            world.event(now(), format_args!("tidb-{i} restarted"));
            tiproxy_runtime::task::spawn(reg.clone().keep_registered(pd.clone()));
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// The proxy, started once PD lists the initial TiDBs (a cluster is up
/// before its proxy), and a summary of its backends every second.
async fn proxy_host(
    world: Arc<World>,
    pd: Arc<PdStore>,
    plant: Option<PlantedBug>,
) -> turmoil::Result {
    let s = &world.scenario;
    while (0..s.initial_tidbs).any(|i| {
        pd.get(&format!(
            "/topology/tidb/{}:{TIDB_SQL_PORT}/ttl",
            Scenario::tidb_host(i)
        ))
        .is_none()
    }) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let net = TurmoilNet::new("proxy")
        .with_rng_seed(s.seed.rotate_left(17) ^ 0x5eed)
        .with_links(world.links.clone());
    let proxy =
        tiproxy_runtime::start_on(net, proxy_config(s.protection, s.protection_delay_ms)).await?;
    let st = proxy.state().clone();
    // Before the first session: start_on's tasks have not run yet.
    if let Some(bug) = plant {
        #[cfg(feature = "sim-mutations")]
        st.router().plant(bug);
        #[cfg(not(feature = "sim-mutations"))]
        world.violation(
            Invariant::Simulation,
            now(),
            format!(
                "cannot plant {}: build with --features sim-mutations",
                bug.name()
            ),
        );
    }
    world.set_proxy(st.clone());
    world.event(
        now(),
        format_args!("proxy started (planted bug: {plant:?})"),
    );
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let backends: Vec<String> = st
            .router()
            .backends()
            .iter()
            .map(|b| {
                format!(
                    "{}={}{}{}",
                    b.addr,
                    b.connections(),
                    if b.is_draining() { " draining" } else { "" },
                    if st.router().accepts(b) {
                        ""
                    } else {
                        " closed"
                    }
                )
            })
            .collect();
        world.event(
            now(),
            format_args!(
                "proxy: {} client connections; {}",
                st.connections(),
                backends.join(", ")
            ),
        );
    }
}

/// Holds, cuts and releases links as the scenario says (turmoil applies
/// holds to every host; this host only keeps the schedule).
async fn network_faults(world: Arc<World>) -> turmoil::Result {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Step {
        Hold,
        Cut,
        Release,
    }
    // (when, link, step): link `None` is proxy <-> pd.
    let s = &world.scenario;
    let mut steps: Vec<(Duration, Option<usize>, Step)> = Vec::new();
    for h in &s.held_links {
        steps.push((h.at, Some(h.tidb), Step::Hold));
        steps.push((h.at + h.len, Some(h.tidb), Step::Release));
    }
    if let Some((at, len)) = s.pd_held {
        steps.push((at, None, Step::Hold));
        steps.push((at + len, None, Step::Release));
    }
    for p in &s.partitions {
        steps.push((p.at, p.tidb, Step::Hold));
        steps.push((p.cut_at(), p.tidb, Step::Cut));
        steps.push((p.at + p.len, p.tidb, Step::Release));
    }
    steps.sort();
    // Nested holds of one link end with the last release.
    let mut held: std::collections::BTreeMap<Option<usize>, u32> = Default::default();
    for (at, link, step) in steps {
        sleep_until(at).await;
        let host = link.map_or(PD_HOST.to_string(), Scenario::tidb_host);
        let n = held.entry(link).or_default();
        match step {
            Step::Hold => {
                *n += 1;
                if *n == 1 {
                    turmoil::hold("proxy", host.as_str());
                    world.event(now(), format_args!("net: proxy <-> {host} held"));
                }
            }
            Step::Cut => {
                world
                    .links
                    .cut(turmoil::lookup("proxy"), turmoil::lookup(host.as_str()));
                match link {
                    Some(i) => world.partition_cut(i, now()),
                    None => world.event(now(), "net: proxy <-> pd cut"),
                }
            }
            Step::Release => {
                *n -= 1;
                if *n == 0 {
                    turmoil::release("proxy", host.as_str());
                    world.event(now(), format_args!("net: proxy <-> {host} released"));
                }
            }
        }
    }
    Ok(())
}

/// Sets up the schema straight on `tidb-0` (not through the proxy), then
/// runs the end checks: liveness and balance, then leaks.
async fn checker(world: Arc<World>, pd: Arc<PdStore>) -> turmoil::Result {
    let s = world.scenario.clone();
    // The schema, before any session starts (sessions start at >= 500ms).
    let mut attempt = 0;
    loop {
        attempt += 1;
        match setup(s.sessions.len()).await {
            Ok(()) => break,
            Err(e) if attempt < 50 => {
                world.event(now(), format_args!("setup: {e}; retrying"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                world.violation(Invariant::Simulation, now(), format!("setup failed: {e}"));
                return Ok(());
            }
        }
    }
    world.setup_finished();
    world.event(now(), "checker: schema ready");

    sleep_until(s.workload_end + Duration::from_secs(2)).await;
    check_liveness(&world);
    if pd
        .keys(tiproxy_runtime::discovery::TIPROXY_TOPOLOGY)
        .is_empty()
    {
        world.violation(
            Invariant::Liveness,
            now(),
            "the proxy is not registered in PD (/topology/tiproxy/)",
        );
    }
    check_connections(&world, s.sessions.len(), "while every session is connected");

    sleep_until(s.workload_end + QUIT_AFTER_END + Duration::from_secs(3)).await;
    check_connections(&world, 0, "after every client left");
    Ok(())
}

async fn setup(sessions: usize) -> Result<(), String> {
    let stream = turmoil::net::TcpStream::connect(format!("tidb-0:{TIDB_SQL_PORT}"))
        .await
        .map_err(|e| e.to_string())?;
    let mut c = RawClient::connect(stream, &ConnectOptions::password("root", ""))
        .await
        .map_err(|e| e.to_string())?;
    // One counter row per session; keys of `sim.kv` are per session too
    // (`KEY_SPACE`), so no two clients ever conflict.
    let rows: Vec<String> = (0..sessions).map(|i| format!("({i}, 0)")).collect();
    let sql = [
        "CREATE DATABASE IF NOT EXISTS sim".to_string(),
        "CREATE TABLE IF NOT EXISTS sim.kv (id BIGINT PRIMARY KEY, s INT, v VARCHAR(16))"
            .to_string(),
        "CREATE TABLE IF NOT EXISTS sim.counters (id BIGINT PRIMARY KEY, n BIGINT)".to_string(),
        "DELETE FROM sim.counters".to_string(),
        format!("INSERT INTO sim.counters VALUES {}", rows.join(", ")),
    ];
    for q in sql {
        c.query(&q).await.map_err(|e| format!("{q}: {e}"))?;
    }
    let _ = c.quit().await;
    Ok(())
}

/// Invariant 5: every session ended its workload on a TiDB that had no
/// fault; faulted TiDBs hold no session; the live ones are balanced.
fn check_liveness(world: &World) {
    let at = now();
    let s = &world.scenario;
    let finals = world.finals();
    for p in &s.sessions {
        match finals.get(&p.id) {
            None => world.violation(
                Invariant::Liveness,
                at,
                format!("session s{} could not run its end check", p.id),
            ),
            Some(ip) => match world.tidb_at(*ip) {
                Some(i) if !world.is_faulted(i) => {}
                Some(i) => world.violation(
                    Invariant::Liveness,
                    at,
                    format!(
                        "session s{} is still on tidb-{i}, which had its fault, {}s after the last fault settled (at {}ms)",
                        p.id,
                        crate::scenario::LIVENESS_BOUND.as_secs(),
                        (s.workload_end - crate::scenario::LIVENESS_BOUND).as_millis()
                    ),
                ),
                None => world.violation(
                    Invariant::Liveness,
                    at,
                    format!("session s{} is on {ip}, which is no TiDB", p.id),
                ),
            },
        }
    }
    let mut live: Vec<(usize, usize)> = Vec::new();
    for (i, h) in world.tidbs() {
        let n = h.connection_count();
        if world.is_faulted(i) {
            if n > 0 {
                world.violation(
                    Invariant::Liveness,
                    at,
                    format!("tidb-{i} had its fault but still has {n} session(s)"),
                );
            }
        } else {
            live.push((i, n));
        }
    }
    world.event(at, format_args!("checker: sessions per live TiDB {live:?}"));
    // The proxy's balance rule (count-ratio-threshold 1.2, and a move must
    // leave the source at least as loaded as the target).
    if let (Some(hi), Some(lo)) = (
        live.iter().max_by_key(|x| x.1),
        live.iter().min_by_key(|x| x.1),
    ) && hi.1 >= lo.1 + 2
        && hi.1 as f64 > 1.2 * lo.1.max(1) as f64
    {
        world.violation(
            Invariant::Liveness,
            at,
            format!(
                "unbalanced: tidb-{} has {} sessions, tidb-{} has {}",
                hi.0, hi.1, lo.0, lo.1
            ),
        );
    }
}

/// Invariant 6: the proxy's client connections, its backend leases and the
/// TiDBs' sessions all equal `expected`.
fn check_connections(world: &World, expected: usize, when: &str) {
    let at = now();
    let Some(st) = world.proxy() else {
        world.violation(Invariant::NoLeaks, at, "the proxy never started");
        return;
    };
    let clients = st.connections() as usize;
    let leases: i64 = st.router().backends().iter().map(|b| b.connections()).sum();
    let sessions: usize = world
        .tidbs()
        .iter()
        .map(|(_, h)| h.connection_count())
        .sum();
    world.event(
        at,
        format_args!(
            "checker: {when}: {clients} client connections, {leases} backend leases, {sessions} TiDB sessions (expected {expected})"
        ),
    );
    if clients != expected || leases != expected as i64 || sessions != expected {
        world.violation(
            Invariant::NoLeaks,
            at,
            format!(
                "{when}: the proxy has {clients} client connections and {leases} backend leases, the TiDBs {sessions} sessions; expected {expected} of each"
            ),
        );
    }
}

/// Invariant 2, on the store itself after the run.
fn check_store(world: &World, at: Duration) {
    let store = world.cluster.store();
    let txn = store.begin();
    let scan = |table: &str| -> Result<Vec<(i64, Vec<Value>)>, String> {
        let schema = store.schema("sim", table).map_err(|e| e.to_string())?;
        let rows = store
            .scan(&txn, &schema, (Bound::Unbounded, Bound::Unbounded))
            .map_err(|e| e.to_string())?;
        Ok(rows.into_iter().map(|(k, r)| (k, r.to_vec())).collect())
    };
    let (kv, counters) = match (scan("kv"), scan("counters")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            world.violation(
                Invariant::CommitsExactlyOnce,
                at,
                format!("cannot read the store: {e}"),
            );
            return;
        }
    };
    let stored: BTreeSet<i64> = kv.iter().map(|(k, _)| *k).collect();
    let mut problems = Vec::new();
    world.ledger(|l| {
        for k in l.committed.difference(&stored) {
            problems.push(format!("key {k} was reported committed but is not in the store"));
        }
        for k in l.failed.intersection(&stored) {
            problems.push(format!("key {k} was reported failed or rolled back but is in the store"));
        }
        for k in &stored {
            if !l.committed.contains(k) && !l.unknown.contains(k) && !l.failed.contains(k) {
                problems.push(format!("key {k} is in the store but no client wrote it"));
            }
        }
        for (id, row) in &counters {
            let n = match row.get(1) {
                Some(Value::Int(n)) => *n,
                other => {
                    problems.push(format!("counter {id} holds {other:?}"));
                    continue;
                }
            };
            let (ok, unknown) = l.increments.get(&(*id as usize)).copied().unwrap_or_default();
            if n < ok || n > ok + unknown {
                problems.push(format!(
                    "session s{id}'s counter is {n}, but {ok} increments were reported done and {unknown} had an unknown outcome"
                ));
            }
        }
    });
    for p in problems.into_iter().take(10) {
        world.violation(Invariant::CommitsExactlyOnce, at, p);
    }
}
