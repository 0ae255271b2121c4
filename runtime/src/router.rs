//! The router: the set of backends, their health and connection counts,
//! and the choice of a backend for a new connection.
//!
//! Discovery replaces the set with [`Router::set_backends`]; each backend's
//! health is a [`BackendHealth`] (the rules live in the core) that the
//! health checks and dials feed through [`Router::handle_status`],
//! [`Router::handle_probe`] and [`Router::handle_dial`]; sessions hold a
//! [`Lease`] on their backend so counts stay exact. Moves under way,
//! cool-downs and backends that cannot export sessions are the core's move
//! ledger, kept here ([`Router::with_moves`]). Backends are picked inside a
//! [`Scope`]: the group of `[balance] routing-rule` a session belongs to
//! (`group`).

mod failover;
mod group;

pub use group::{Scope, client_info};

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tiproxy_core::balance::{
    BackendLoad, CpuMeter, CpuSample, Groups, HealthLevel, HealthMeter, HealthReading, MoveLedger,
    Policy, Routing, RoutingRule, route,
};
pub use tiproxy_core::health::FAILED_BACKEND_PAUSE;
use tiproxy_core::health::{
    BackendHealth, CheckFailure, Dial, ExhaustionLog, HealthConfig, LocalExhaustion, Outcome,
};
use tiproxy_core::{CapabilityFlags, MariaDbCapabilities};
use tokio::time::Instant;
use tracing::warn;

use crate::config::BackendEntry;
use crate::metrics::metrics;

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// `host:port` of its SQL port.
    pub addr: String,
    /// `host:port` of its status port, when known.
    pub status_addr: Option<String>,
    conns: AtomicI64,
    /// Its health: drain, failures, whether its state is known, operator
    /// drain, removal (the rules are the core's).
    health: Mutex<BackendHealth>,
    /// Its `zone` label.
    zone: Option<String>,
    /// CPU and memory use from its `/metrics`.
    resources: Mutex<Resources>,
    /// Its series (queries, traffic), resolved once.
    pub metrics: crate::metrics::BackendMetrics,
}

/// What a backend's `/metrics` said.
#[derive(Debug, Default)]
struct Resources {
    /// CPU use between reads of `process_cpu_seconds_total`.
    cpu: CpuMeter,
    /// Memory use of quota, and when.
    memory: Option<(f64, Instant)>,
    /// TiDB's error counters towards PD and TiKV (the health factor).
    health: HealthMeter,
    /// The health level last reported, to log changes once.
    reported: HealthLevel,
}

/// Memory use older than this is not used.
pub const MEMORY_METRICS_EXPIRY: Duration = Duration::from_secs(60);

/// The values read from a TiDB's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsReading {
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: Option<f64>,
    /// `tidb_server_maxprocs`.
    pub maxprocs: Option<f64>,
    /// `process_resident_memory_bytes`.
    pub resident_bytes: Option<f64>,
    /// `tidb_server_memory_quota_bytes`.
    pub quota_bytes: Option<f64>,
    /// The error counters of TiProxy's health factor.
    pub health: HealthReading,
}

impl MetricsReading {
    /// The metric names, in field order.
    pub const NAMES: [&'static str; 4] = [
        "process_cpu_seconds_total",
        "tidb_server_maxprocs",
        "process_resident_memory_bytes",
        "tidb_server_memory_quota_bytes",
    ];

    /// Reads them from a Prometheus text exposition.
    pub fn parse(text: &[u8]) -> Self {
        let v = tiproxy_core::prom::first_values(text, &Self::NAMES);
        let ok = |x: Option<f64>| x.filter(|x| x.is_finite() && *x >= 0.0);
        Self {
            cpu_seconds: ok(v[0]),
            maxprocs: ok(v[1]).filter(|x| *x > 0.0),
            resident_bytes: ok(v[2]),
            quota_bytes: ok(v[3]).filter(|x| *x > 0.0),
            health: HealthReading::parse(text),
        }
    }
}

impl Backend {
    fn new(addr: String, status_addr: Option<String>, zone: Option<String>) -> Self {
        metrics().backend_status.with_label_values(&[&addr]).set(1);
        let series = metrics().backend(&addr);
        Self {
            addr,
            health: Mutex::new(BackendHealth::new(status_addr.is_some())),
            status_addr,
            conns: AtomicI64::new(0),
            zone,
            resources: Mutex::new(Resources::default()),
            metrics: series,
        }
    }

    /// A copy of its health, for queries.
    pub fn health(&self) -> BackendHealth {
        self.health.lock().expect("backend lock").clone()
    }

    /// Feeds its health and keeps the `backend_status` gauge in step.
    fn update_health(&self, f: impl FnOnce(&mut BackendHealth) -> Outcome) -> Outcome {
        let mut h = self.health.lock().expect("backend lock");
        let was_failed = h.is_failed();
        let out = f(&mut h);
        if h.is_failed() != was_failed {
            metrics()
                .backend_status
                .with_label_values(&[&self.addr])
                .set(i64::from(!h.is_failed()));
        }
        out
    }

    /// Whether its state is known (see [`BackendHealth::is_known`]).
    pub fn is_known(&self) -> bool {
        self.health().is_known()
    }

    /// Its `zone` label.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Records a `/metrics` reading taken at `now`. CPU use is the growth
    /// of `process_cpu_seconds_total` since the previous reading (at least
    /// a second earlier) over `tidb_server_maxprocs`; memory use is
    /// resident bytes over the memory quota.
    pub fn record_metrics(&self, m: MetricsReading, now: Instant) {
        let sessions = self.connections().max(0) as u32;
        let mut r = self.resources.lock().expect("backend lock");
        if let (Some(total), Some(procs)) = (m.cpu_seconds, m.maxprocs) {
            r.cpu.record(total, procs, sessions, now.into_std());
        }
        if let (Some(rss), Some(quota)) = (m.resident_bytes, m.quota_bytes) {
            r.memory = Some(((rss / quota).clamp(0.0, 1.0), now));
        }
        r.health.record(m.health, now.into_std());
    }

    /// Its health from TiDB's error rates at `now`.
    pub fn health_level(&self, now: Instant) -> HealthLevel {
        let r = self.resources.lock().expect("backend lock");
        r.health.level(now.into_std())
    }

    /// The health factor's view at `now`: what it judged, each indicator's
    /// failures and total over the window, and whether the level changed
    /// since the last call (to log it once).
    pub fn health_report(
        &self,
        now: Instant,
    ) -> (
        tiproxy_core::balance::Judgement,
        [Option<(f64, f64)>; 2],
        bool,
    ) {
        let mut r = self.resources.lock().expect("backend lock");
        let j = r.health.judge(now.into_std());
        let changed = j.level != r.reported;
        r.reported = j.level;
        (j, r.health.increases(now.into_std()), changed)
    }

    /// CPU use and memory use when recent enough.
    pub fn resources(&self, now: Instant) -> (Option<CpuSample>, Option<f64>) {
        let r = self.resources.lock().expect("backend lock");
        (
            r.cpu.sample(now.into_std()),
            r.memory
                .filter(|(_, at)| now.saturating_duration_since(*at) <= MEMORY_METRICS_EXPIRY)
                .map(|(m, _)| m),
        )
    }

    /// Sessions on this backend.
    pub fn connections(&self) -> i64 {
        self.conns.load(Ordering::Relaxed)
    }

    /// Whether it is neither draining nor removed.
    pub fn is_healthy(&self) -> bool {
        let h = self.health();
        !h.is_removed()
            && !h.is_draining()
            && !h.is_manually_drained()
            && h.failover_since().is_none()
    }

    /// Whether its sessions should move elsewhere (draining or removed).
    pub fn should_evacuate(&self) -> bool {
        !self.is_healthy()
    }

    /// Whether it is draining: its status port reported a shutdown, an
    /// operator drained it, or it is in `proxy.fail-backend-list`.
    pub fn is_draining(&self) -> bool {
        let h = self.health();
        h.is_draining() || h.is_manually_drained() || h.failover_since().is_some()
    }

    /// Drains (or undrains) it by operator request.
    pub fn set_manual_drain(&self, d: bool) {
        self.health
            .lock()
            .expect("backend lock")
            .set_manual_drain(d);
    }

    /// Whether an operator drained it.
    pub fn is_manually_drained(&self) -> bool {
        self.health().is_manually_drained()
    }

    /// Whether it was removed from the backend set.
    pub fn is_removed(&self) -> bool {
        self.health().is_removed()
    }

    /// Whether it is not marked failed (its last checks or dial passed).
    pub fn probe_ok(&self) -> bool {
        !self.health().is_failed()
    }
}

/// A session's claim on a backend; the count drops when the lease does.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    /// Takes a lease.
    pub fn new(backend: Arc<Backend>) -> Self {
        let n = backend.conns.fetch_add(1, Ordering::Relaxed) + 1;
        metrics()
            .backend_conn
            .with_label_values(&[&backend.addr])
            .set(n);
        Self { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let n = self.backend.conns.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics()
            .backend_conn
            .with_label_values(&[&self.backend.addr])
            .set(n);
    }
}

/// What backends said about themselves in their greetings.
#[derive(Debug, Clone)]
pub struct BackendProfile {
    /// Server version shown to clients.
    pub server_version: Bytes,
    /// Capabilities.
    pub capabilities: CapabilityFlags,
    /// MariaDB extended capabilities (empty for TiDB and MySQL, whose
    /// greetings keep `CLIENT_MYSQL` set).
    pub mariadb_capabilities: MariaDbCapabilities,
    /// Default collation.
    pub charset: u8,
}

impl Default for BackendProfile {
    fn default() -> Self {
        // Until a backend has greeted the proxy, offer nothing a backend
        // might lack that would change the shape of responses.
        Self {
            server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::DEPRECATE_EOF,
            mariadb_capabilities: MariaDbCapabilities::empty(),
            charset: 46,
        }
    }
}

/// A deliberate bug the simulation plants to prove that its seed sweeps
/// catch it (mutation testing). Planting needs the `sim-mutations` feature;
/// without it [`Router::planted`] is always false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// New sessions and moves may go to a draining TiDB.
    RouteToDraining,
    /// Sessions on draining or removed TiDBs are not moved away.
    NoEvacuation,
    /// A session that moved keeps its lease on the backend it left.
    LeakLeaseOnMove,
    /// A pending move commits the client's open transaction behind its back
    /// and moves ([`tiproxy_core::session::PlantedBug::MoveInsideTransaction`]).
    MoveInsideTransaction,
    /// A move loses the session's first user variable
    /// ([`tiproxy_core::session::PlantedBug::ForgetUserVariable`]).
    ForgetUserVariable,
    /// Crash protection restores from a copy older than the session's last
    /// change ([`tiproxy_core::session::PlantedBug::RestoreStaleCopy`]).
    RestoreStaleCopy,
    /// A restore re-sends the statement that was in flight when the backend
    /// died ([`tiproxy_core::session::PlantedBug::ResendInFlight`]).
    ResendInFlight,
}

impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 7] = [
        PlantedBug::RouteToDraining,
        PlantedBug::NoEvacuation,
        PlantedBug::LeakLeaseOnMove,
        PlantedBug::MoveInsideTransaction,
        PlantedBug::ForgetUserVariable,
        PlantedBug::RestoreStaleCopy,
        PlantedBug::ResendInFlight,
    ];

    /// Its name on the simulation's command line.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::RouteToDraining => "route-to-draining",
            PlantedBug::NoEvacuation => "no-evacuation",
            PlantedBug::LeakLeaseOnMove => "leak-lease-on-move",
            PlantedBug::MoveInsideTransaction => "move-inside-transaction",
            PlantedBug::ForgetUserVariable => "forget-user-variable",
            PlantedBug::RestoreStaleCopy => "restore-stale-copy",
            PlantedBug::ResendInFlight => "resend-in-flight",
        }
    }

    /// The session-level bug this plants in every new session's core.
    pub fn in_session(self) -> Option<tiproxy_core::session::PlantedBug> {
        use tiproxy_core::session::PlantedBug as P;
        match self {
            PlantedBug::MoveInsideTransaction => Some(P::MoveInsideTransaction),
            PlantedBug::ForgetUserVariable => Some(P::ForgetUserVariable),
            PlantedBug::RestoreStaleCopy => Some(P::RestoreStaleCopy),
            PlantedBug::ResendInFlight => Some(P::ResendInFlight),
            _ => None,
        }
    }
}

/// How new connections are routed: `[balance] policy`, `routing-policy`,
/// `conn-count.count-ratio-threshold` and this proxy's `zone` label.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// Ranks backends.
    pub policy: Policy,
    /// Picks among them.
    pub routing: Routing,
    /// What "would be balanced away" means for session counts.
    pub count_ratio_threshold: f64,
    /// This proxy's zone.
    pub zone: Option<String>,
}

impl RoutingSettings {
    /// The settings a configuration asks for.
    pub fn from_config(c: &crate::config::Config) -> Self {
        let plan = c.balance.plan_config();
        Self {
            policy: plan.policy,
            routing: c.balance.routing(),
            count_ratio_threshold: plan.count_ratio_threshold,
            zone: c.labels.get("zone").cloned(),
        }
    }
}

impl Default for RoutingSettings {
    /// The best-ranked backend, TiProxy's default ranking: what a router
    /// does until the proxy sets its configuration (the router's own
    /// tests rely on it being exact).
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            routing: Routing::Idlest,
            count_ratio_threshold: tiproxy_core::balance::COUNT_RATIO_THRESHOLD,
            zone: None,
        }
    }
}

/// The backend set.
#[derive(Debug, Default)]
pub struct Router {
    backends: RwLock<Vec<Arc<Backend>>>,
    profile: RwLock<Option<BackendProfile>>,
    /// A seeded generator replacing the OS's randomness (simulation).
    seeded_rng: Mutex<Option<StdRng>>,
    /// The bug planted by the simulation's mutation test.
    #[cfg(feature = "sim-mutations")]
    planted: Mutex<Option<PlantedBug>>,
    /// See [`RoutingSettings`].
    balance: RwLock<RoutingSettings>,
    /// `[health-check]`'s failure threshold (set by the health loop).
    health: RwLock<HealthConfig>,
    /// Connections refused because the proxy ran out of descriptors or
    /// memory (accepts and dials share it: one line a second at most).
    exhaustion: Mutex<ExhaustionLog>,
    /// A task will write the refusals the last line did not cover.
    refusals_flush: AtomicBool,
    /// Moves under way, cool-downs, backends that cannot export sessions;
    /// backends by SQL address.
    moves: Mutex<MoveLedger<String>>,
    /// Told when moves under way end (the ledger has room again): the
    /// balance loop then starts more evacuations before its next tick.
    moves_ended: tokio::sync::Notify,
    /// `proxy.fail-backend-list` and `proxy.failover-timeout`.
    fail_list: Mutex<failover::FailList>,
    /// The groups of `[balance] routing-rule` (backends by SQL address).
    groups: Mutex<Groups<String>>,
}

impl Router {
    /// A router over `entries`, every backend in one group.
    pub fn new(entries: &[BackendEntry]) -> Self {
        Self::with_rule(entries, RoutingRule::All)
    }

    /// A router over `entries`, grouped by `rule` (not reloadable).
    pub fn with_rule(entries: &[BackendEntry], rule: RoutingRule) -> Self {
        let r = Self {
            groups: Mutex::new(Groups::new(rule)),
            ..Self::default()
        };
        r.set_backends(entries);
        // The configured set is assumed up, so the proxy serves at once.
        for b in r.backends() {
            b.health.lock().expect("backend lock").set_known();
        }
        r
    }

    /// Replaces the set, keeping the state of backends that stay. Removed
    /// backends stay listed (flagged) while sessions remain on them, so
    /// their sessions can be moved away.
    pub fn set_backends(&self, entries: &[BackendEntry]) {
        self.set_cluster_backends(entries, &[]);
    }

    /// [`Router::set_backends`] where `entries[i]` is of backend cluster
    /// `clusters[i]` (the port rule's groups are per cluster).
    pub fn set_cluster_backends(&self, entries: &[BackendEntry], clusters: &[&str]) {
        let mut list = self.backends.write().expect("router lock");
        let mut next = Vec::with_capacity(entries.len());
        for e in entries {
            match list.iter().find(|b| b.addr == e.addr()) {
                Some(b) => {
                    b.health.lock().expect("backend lock").set_removed(false);
                    next.push(b.clone())
                }
                None => next.push(Arc::new(Backend::new(
                    e.addr().to_string(),
                    e.status_addr().map(String::from),
                    e.zone().map(String::from),
                ))),
            }
        }
        for b in list.iter() {
            if !next.iter().any(|n| n.addr == b.addr) {
                b.health.lock().expect("backend lock").set_removed(true);
                metrics()
                    .backend_status
                    .with_label_values(&[&b.addr])
                    .set(0);
                if b.connections() > 0 {
                    next.push(b.clone());
                } else {
                    // Gone: if it comes back, it is a new server.
                    self.with_moves(|l| l.forget_backend(&b.addr));
                    metrics().forget_backend(&b.addr);
                }
            }
        }
        self.regroup(&next, entries, clusters);
        *list = next;
    }

    /// From now on, draw randomness (salts, tie-breaks) from a generator
    /// seeded with `seed` instead of the OS, so a simulated run replays.
    pub fn seed_rng(&self, seed: u64) {
        *self.seeded_rng.lock().expect("rng lock") = Some(StdRng::seed_from_u64(seed));
    }

    /// Runs `f` with the proxy's randomness: the seeded generator if
    /// [`Router::seed_rng`] was called, else the OS-seeded thread RNG.
    pub fn with_rng<R>(&self, f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
        match self.seeded_rng.lock().expect("rng lock").as_mut() {
            Some(rng) => f(rng),
            None => f(&mut rand::rng()),
        }
    }

    /// Plants `bug` (the simulation's mutation test).
    #[cfg(feature = "sim-mutations")]
    pub fn plant(&self, bug: PlantedBug) {
        *self.planted.lock().expect("router lock") = Some(bug);
    }

    /// The planted bug; always `None` without `sim-mutations`.
    pub fn planted_bug(&self) -> Option<PlantedBug> {
        #[cfg(feature = "sim-mutations")]
        {
            *self.planted.lock().expect("router lock")
        }
        #[cfg(not(feature = "sim-mutations"))]
        {
            None
        }
    }

    /// Whether `bug` was planted; always false without `sim-mutations`.
    pub fn planted(&self, bug: PlantedBug) -> bool {
        #[cfg(feature = "sim-mutations")]
        {
            *self.planted.lock().expect("router lock") == Some(bug)
        }
        #[cfg(not(feature = "sim-mutations"))]
        {
            let _ = bug;
            false
        }
    }

    /// The backend with this SQL address.
    pub fn find(&self, addr: &str) -> Option<Arc<Backend>> {
        self.backends().into_iter().find(|b| b.addr == addr)
    }

    /// A lease on `b`, just dialled, if it is still the listed entry for
    /// its address and has not left the set. Seed 747323 held a move's dial
    /// for 4 s; meanwhile its TiDB left the set (its entry, without
    /// sessions, was dropped) and came back as a new entry, and the lease
    /// taken when the dial finally completed counted on the old entry, so
    /// the router saw an empty TiDB that held four sessions. The check and
    /// the count run under the set's lock, which removal also takes.
    /// Health is not asked again: the dial that just succeeded is newer
    /// news than a failed check (seed 542964: checks held by the network
    /// marked a TiDB failed, and the rescue of a session whose TiDB had shut
    /// down was refused the connection that got through).
    pub fn lease(&self, b: &Arc<Backend>) -> Option<Lease> {
        let list = self.backends.read().expect("router lock");
        (list.iter().any(|x| Arc::ptr_eq(x, b)) && !b.is_removed()).then(|| Lease::new(b.clone()))
    }

    /// Every backend.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().expect("router lock").clone()
    }

    /// Whether any backend can take a connection now.
    pub fn has_healthy(&self) -> bool {
        let now = Instant::now();
        self.backends().iter().any(|b| self.usable(b, now))
    }

    /// Whether `b` takes sessions now (healthy, not draining, not paused
    /// after a failure).
    pub fn accepts(&self, b: &Backend) -> bool {
        self.usable(b, Instant::now())
    }

    fn usable(&self, b: &Backend, now: Instant) -> bool {
        b.is_known() && self.reachable(b, now)
    }

    /// Whether `b` takes sessions now if its state is known.
    fn reachable(&self, b: &Backend, now: Instant) -> bool {
        let h = b.health();
        let now = now.into_std();
        if self.planted(PlantedBug::RouteToDraining) {
            return !h.is_removed() && h.paused_until(now).is_none();
        }
        h.reachable(now)
    }

    /// Sets `[health-check]`'s failure threshold (reloadable).
    pub fn set_failure_threshold(&self, n: u32) {
        self.health.write().expect("router lock").failure_threshold = n;
    }

    fn health_config(&self) -> HealthConfig {
        *self.health.read().expect("router lock")
    }

    /// `b`'s status port answered (`Ok(http status)`) or failed, now.
    pub fn handle_status(&self, b: &Backend, answer: Result<u16, CheckFailure>) -> Outcome {
        let (now, cfg) = (Instant::now().into_std(), self.health_config());
        b.update_health(|h| h.handle_status(now, answer, &cfg))
    }

    /// `b`'s SQL port greeted a probe (`Ok`) or failed, now.
    pub fn handle_probe(&self, b: &Backend, answer: Result<(), CheckFailure>) -> Outcome {
        let (now, cfg) = (Instant::now().into_std(), self.health_config());
        b.update_health(|h| h.handle_probe(now, answer, &cfg))
    }

    /// A connection was refused (at accept, or at its backend dial) because
    /// the proxy is out of `what`: one warning a second at most, with a
    /// count; refusals a line did not cover are told when the next is due.
    pub fn refused_locally(self: &Arc<Self>, what: LocalExhaustion) {
        let now = Instant::now().into_std();
        let (line, due) = {
            let mut log = self.exhaustion.lock().expect("router lock");
            (log.refused(now, what), log.next_due())
        };
        if let Some((n, what)) = line {
            warn!("{n} connection(s) refused: {what}; {}", what.hint());
        }
        if let Some(due) = due
            && !self.refusals_flush.swap(true, Ordering::Relaxed)
        {
            let router = self.clone();
            crate::task::spawn(async move {
                tokio::time::sleep_until(Instant::from_std(due)).await;
                router.refusals_flush.store(false, Ordering::Relaxed);
                let now = Instant::now().into_std();
                let line = router.exhaustion.lock().expect("router lock").poll(now);
                if let Some((n, what)) = line {
                    warn!("{n} connection(s) refused: {what}; {}", what.hint());
                }
            });
        }
    }

    /// A session's dial of `b` ended, now.
    pub fn handle_dial(&self, b: &Backend, dial: Dial) -> Outcome {
        let (now, cfg) = (Instant::now().into_std(), self.health_config());
        b.update_health(|h| h.handle_dial(now, dial, &cfg))
    }

    /// Runs `f` on the move ledger. Never call the router from `f`: the
    /// ledger's lock is held.
    pub fn with_moves<R>(&self, f: impl FnOnce(&mut MoveLedger<String>) -> R) -> R {
        let mut l = self.moves.lock().expect("move ledger lock");
        let before = l.in_flight();
        let r = f(&mut l);
        if l.in_flight() < before {
            self.moves_ended.notify_one();
        }
        r
    }

    /// Completes once a move under way ended since the last call (or
    /// since the router began, the first time).
    pub async fn moves_ended(&self) {
        self.moves_ended.notified().await
    }

    /// Sessions on their way to `b`.
    pub fn incoming(&self, b: &Backend) -> u32 {
        self.with_moves(|l| l.incoming(&b.addr))
    }

    /// Whether sessions on `b` can be moved (its SHOW SESSION_STATES did
    /// not fail as on a server that cannot export sessions).
    pub fn can_export(&self, b: &Backend) -> bool {
        self.with_moves(|l| l.can_export(&b.addr))
    }

    /// Sets the balance policy, routing policy, count ratio and this
    /// proxy's zone (reloadable).
    pub fn set_balance(&self, s: RoutingSettings) {
        *self.balance.write().expect("router lock") = s;
    }

    /// The balance policy.
    pub fn policy(&self) -> Policy {
        self.balance.read().expect("router lock").policy
    }

    /// What the balancer knows of `b` now (`movable` left at 0).
    pub fn load_of(&self, b: &Backend, now: Instant) -> BackendLoad {
        let (cpu, memory) = b.resources(now);
        let local = match &self.balance.read().expect("router lock").zone {
            Some(zone) => b.zone() == Some(zone.as_str()),
            None => true,
        };
        BackendLoad {
            sessions: b.connections().max(0) as u32,
            incoming: self.incoming(b),
            movable: 0,
            accepts: self.usable(b, now),
            evacuate: b.should_evacuate(),
            cpu,
            memory,
            local,
            health: b.health_level(now),
        }
    }

    /// The backend for a new connection in `scope`, skipping `exclude`, by
    /// the routing policy over the balance policy's ranking (by default:
    /// healthy, no memory risk, least CPU, in this proxy's zone, fewest
    /// connections); see [`tiproxy_core::balance::route`].
    pub fn pick(&self, exclude: &[String], scope: Scope) -> Option<Arc<Backend>> {
        let now = Instant::now();
        let list: Vec<Arc<Backend>> = self
            .backends()
            .into_iter()
            .filter(|b| self.in_scope(b, scope))
            .collect();
        let mut loads: Vec<BackendLoad> = list
            .iter()
            .map(|b| BackendLoad {
                accepts: !exclude.contains(&b.addr) && self.usable(b, now),
                ..self.load_of(b, now)
            })
            .collect();
        if !loads.iter().any(|l| l.accepts) {
            // Only backends whose state is not known yet (PD's first list):
            // better one of them than no backend.
            for (l, b) in loads.iter_mut().zip(&list) {
                l.accepts = !exclude.contains(&b.addr) && self.reachable(b, now);
            }
        }
        if !loads.iter().any(|l| l.accepts) {
            return None;
        }
        let draw = self.with_rng(|r| r.next_u64());
        let s = self.balance.read().expect("router lock").clone();
        route(&loads, s.policy, s.routing, s.count_ratio_threshold, draw).map(|i| list[i].clone())
    }

    /// Records what a backend announced.
    pub fn set_profile(&self, p: BackendProfile) {
        *self.profile.write().expect("router lock") = Some(p);
    }

    /// What backends announced, or TiDB defaults before any was seen.
    pub fn profile(&self) -> BackendProfile {
        self.profile
            .read()
            .expect("router lock")
            .clone()
            .unwrap_or_default()
    }

    /// Whether a backend has announced itself yet.
    pub fn has_profile(&self) -> bool {
        self.profile.read().expect("router lock").is_some()
    }
}

#[cfg(test)]
mod tests;
