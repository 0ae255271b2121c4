//! One TiDB instance: its SQL listener, status port, connections and
//! shutdown, over any [`Network`] (real TCP now, turmoil in simulation).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tiproxy_runtime::net::Network;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::auth::plugin;
use super::cluster::Cluster;

/// TiDB's release in the default server version.
pub const DEFAULT_SERVER_VERSION: &str = "8.0.11-TiDB-v8.5.0";

/// How one instance behaves.
#[derive(Debug, Clone)]
pub struct TidbOptions {
    /// Server version in the greeting, `VERSION()` and `/status`.
    pub server_version: String,
    /// `git_hash` in `/status`.
    pub git_hash: String,
    /// `graceful-wait-before-shutdown`: how long `/status` reports 500
    /// while everything keeps working, before shutdown starts.
    pub graceful_wait: Duration,
    /// How long shutdown waits for open transactions to end before it
    /// closes the remaining connections (TiDB: 15 s).
    pub graceful_close_timeout: Duration,
    /// The plugin named in the greeting (`default_authentication_plugin`).
    pub default_auth_plugin: &'static str,
    /// caching_sha2_password answers a correct scramble with fast-auth
    /// success (`0x01 0x03`), as MySQL does with a warm cache. Off, it
    /// always asks for full authentication (`0x01 0x04`), as TiDB does;
    /// the double then accepts the cleartext password even on plain TCP.
    pub caching_sha2_fast_path: bool,
    /// Whether a session-token signing certificate is configured: without
    /// one `/config` shows an empty `session-token-signing-cert` and
    /// `SHOW SESSION_STATES` fails with 8146, as older TiDB does.
    pub session_token_signing: bool,
    /// TiDB's `proxy-protocol-networks`: accept a PROXY v2 header before
    /// the handshake response (TiDB's lazy listener: the header may follow
    /// the greeting) and use its source address as the client's. Off, a
    /// header gets 8052 `invalid sequence`, as TiDB answers it.
    pub proxy_protocol: bool,
    /// The status port speaks HTTPS with this (TiDB's `cluster-ssl-cert`
    /// and `cluster-ssl-key`; with `cluster-ssl-ca`, clients must show a
    /// certificate it signed). `None`: plain HTTP.
    pub status_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for TidbOptions {
    fn default() -> Self {
        Self {
            server_version: DEFAULT_SERVER_VERSION.to_string(),
            git_hash: "0000000000000000000000000000000000000000".to_string(),
            graceful_wait: Duration::ZERO,
            graceful_close_timeout: Duration::from_secs(15),
            default_auth_plugin: plugin::NATIVE_PASSWORD,
            caching_sha2_fast_path: true,
            session_token_signing: true,
            proxy_protocol: false,
            status_tls: None,
        }
    }
}

/// Where an instance is in its life. Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Serving.
    Serving,
    /// Graceful shutdown began: `/status` is 500, everything else works.
    Draining,
    /// Not accepting; idle connections are closed, others after their
    /// transaction ends.
    Closing,
    /// Shut down.
    Stopped,
    /// Killed: every socket dropped at once.
    Killed,
}

/// A row of SHOW PROCESSLIST.
#[derive(Debug, Clone)]
pub struct ProcessEntry {
    /// Connection id.
    pub id: u64,
    /// User.
    pub user: String,
    /// Client `ip:port`.
    pub host: String,
    /// Current database.
    pub db: String,
    /// `Sleep`, `Query`, ...
    pub command: &'static str,
    /// When the current command (or idle period) began.
    pub since: Instant,
    /// The running statement.
    pub info: Option<String>,
    /// Whether a transaction is open.
    pub in_txn: bool,
}

/// State shared by an instance's tasks.
#[derive(Debug)]
pub struct Instance {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) opts: TidbOptions,
    pub(crate) sql_addr: SocketAddr,
    pub(crate) status_addr: SocketAddr,
    /// The phase, and a wake-up for its changes. Not a
    /// `tokio::sync::watch`: that puts each waiter in a randomly chosen
    /// shard, so waiters woke in a different order in every process and a
    /// simulated crash replayed differently (seed 4).
    phase: Mutex<Phase>,
    phase_changed: Notify,
    processes: Mutex<BTreeMap<u64, ProcessEntry>>,
    /// Open SQL connections, handshaking ones included.
    live: AtomicUsize,
    conn_closed: Notify,
    /// Armed by [`TidbHandle::crash_after_next_statement`]: the next
    /// statement runs but is never answered, and `crash_hit` wakes the
    /// caller, who kills the instance.
    crash_armed: std::sync::atomic::AtomicBool,
    crash_hit: Notify,
    /// What `/metrics` reports.
    usage: Mutex<Usage>,
    /// The PD and TiKV client counters `/metrics` reports.
    pub(crate) errors: super::status::ErrorCounters,
}

/// Processors the double reports (`tidb_server_maxprocs`).
pub const MAXPROCS: f64 = 8.0;
/// Its memory quota (`tidb_server_memory_quota_bytes`): 8 GiB.
pub const MEMORY_QUOTA_BYTES: f64 = 8.0 * 1024.0 * 1024.0 * 1024.0;
/// CPU use each session adds (of all processors).
pub const CPU_PER_SESSION: f64 = 0.002;
/// Memory use with no load set (of the quota).
pub const BASE_MEMORY: f64 = 0.05;

/// CPU and memory use as `/metrics` reports them: a load set through the
/// control API (`POST /instances/<i>/load`) plus a small share per session,
/// integrated into `process_cpu_seconds_total` as time passes.
#[derive(Debug)]
struct Usage {
    /// CPU use set from outside, 0.0-1.0 of all processors.
    cpu: f64,
    /// Memory use set from outside, 0.0-1.0 of the quota.
    memory: f64,
    cpu_seconds: f64,
    at: Instant,
}

impl Instance {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a crash is armed.
    pub(crate) fn crash_armed(&self) -> bool {
        self.crash_armed.load(Ordering::SeqCst)
    }

    /// Whether this statement is the armed one (it then stays unanswered:
    /// the caller waits forever and the kill ends it).
    pub(crate) fn take_crash(&self) -> bool {
        if self.crash_armed.swap(false, Ordering::SeqCst) {
            // notify_one keeps the permit if the waiter is not there yet.
            self.crash_hit.notify_one();
            return true;
        }
        false
    }

    /// Moves to `next` if it is later than the current phase.
    pub(crate) fn advance(&self, next: Phase) {
        self.update_phase(|p| (next > p).then_some(next));
    }

    /// Sets the phase to what `f` returns for the current one, if anything;
    /// whether it changed.
    fn update_phase(&self, f: impl FnOnce(Phase) -> Option<Phase>) -> bool {
        let changed = {
            let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            match f(*p) {
                Some(next) => {
                    *p = next;
                    true
                }
                None => false,
            }
        };
        if changed {
            // Waiters wake in the order they started waiting.
            self.phase_changed.notify_waiters();
        }
        changed
    }

    /// Resolves once the phase is at least `p`.
    pub(crate) async fn reached(&self, p: Phase) {
        loop {
            // Registered before the check: no change slips between.
            let changed = self.phase_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.phase() >= p {
                return;
            }
            changed.await;
        }
    }

    /// Authenticated sessions (what `/status` counts).
    pub fn processes(&self) -> Vec<ProcessEntry> {
        self.lock_processes().values().cloned().collect()
    }

    /// Number of authenticated sessions.
    pub fn connection_count(&self) -> usize {
        self.lock_processes().len()
    }

    fn lock_processes(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProcessEntry>> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, e: ProcessEntry) {
        self.lock_processes().insert(e.id, e);
    }

    pub(crate) fn update(&self, id: u64, f: impl FnOnce(&mut ProcessEntry)) {
        if let Some(e) = self.lock_processes().get_mut(&id) {
            f(e);
        }
    }

    fn lock_usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        // Bring the CPU counter up to now at the use so far.
        let now = Instant::now();
        let busy = (u.cpu + CPU_PER_SESSION * self.connection_count() as f64).min(1.0);
        u.cpu_seconds += busy * MAXPROCS * now.saturating_duration_since(u.at).as_secs_f64();
        u.at = now;
        u
    }

    /// Sets the CPU and/or memory use `/metrics` reports beyond the
    /// sessions' own share (0.0-1.0).
    pub fn set_load(&self, cpu: Option<f64>, memory: Option<f64>) {
        let mut u = self.lock_usage();
        if let Some(c) = cpu {
            u.cpu = c.clamp(0.0, 1.0);
        }
        if let Some(m) = memory {
            u.memory = m.clamp(0.0, 1.0);
        }
    }

    /// `/metrics`: TiDB's names for what TiProxy's CPU and memory factors
    /// read, in Prometheus text format.
    pub(crate) fn metrics_text(&self) -> String {
        let u = self.lock_usage();
        let rss = u.memory.max(BASE_MEMORY) * MEMORY_QUOTA_BYTES;
        format!(
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
# TYPE process_cpu_seconds_total counter\n\
process_cpu_seconds_total {:.3}\n\
# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
# TYPE process_resident_memory_bytes gauge\n\
process_resident_memory_bytes {rss:.0}\n\
# HELP tidb_server_maxprocs The value of GOMAXPROCS.\n\
# TYPE tidb_server_maxprocs gauge\n\
tidb_server_maxprocs {MAXPROCS}\n\
# HELP tidb_server_memory_quota_bytes The value of memory quota bytes.\n\
# TYPE tidb_server_memory_quota_bytes gauge\n\
tidb_server_memory_quota_bytes {MEMORY_QUOTA_BYTES:.0}\n\
# HELP tidb_server_connections Number of connections.\n\
# TYPE tidb_server_connections gauge\n\
tidb_server_connections {}\n",
            u.cpu_seconds,
            self.connection_count()
        )
    }
}

/// Counts a connection task from accept to exit.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    inst: Arc<Instance>,
    id: u64,
}

impl ConnGuard {
    fn new(inst: &Arc<Instance>, id: u64) -> Self {
        inst.live.fetch_add(1, Ordering::SeqCst);
        Self {
            inst: Arc::clone(inst),
            id,
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.inst.lock_processes().remove(&self.id);
        self.inst.live.fetch_sub(1, Ordering::SeqCst);
        self.inst.conn_closed.notify_waiters();
    }
}

/// Starts TiDB instances.
#[derive(Debug)]
pub struct TidbServer;

impl TidbServer {
    /// Binds `sql_addr` and `status_addr` (port 0 picks a free one) and
    /// serves until shut down or killed.
    pub async fn start<N: Network>(
        net: N,
        cluster: Arc<Cluster>,
        sql_addr: &str,
        status_addr: &str,
        opts: TidbOptions,
    ) -> io::Result<TidbHandle> {
        let sql_listener = net.bind(sql_addr).await?;
        let status_listener = net.bind(status_addr).await?;
        let inst = Arc::new(Instance {
            cluster,
            opts,
            sql_addr: net.listener_addr(&sql_listener)?,
            status_addr: net.listener_addr(&status_listener)?,
            phase: Mutex::new(Phase::Serving),
            phase_changed: Notify::new(),
            processes: Mutex::new(BTreeMap::new()),
            live: AtomicUsize::new(0),
            conn_closed: Notify::new(),
            crash_armed: std::sync::atomic::AtomicBool::new(false),
            crash_hit: Notify::new(),
            usage: Mutex::new(Usage {
                cpu: 0.0,
                memory: 0.0,
                cpu_seconds: 0.0,
                at: Instant::now(),
            }),
            errors: super::status::ErrorCounters::default(),
        });
        let accept =
            tiproxy_runtime::task::spawn(accept_loop(net.clone(), sql_listener, Arc::clone(&inst)));
        let status = tiproxy_runtime::task::spawn(super::status::serve(
            net,
            status_listener,
            Arc::clone(&inst),
        ));
        tracing::info!(sql = %inst.sql_addr, status = %inst.status_addr, "TiDB double instance started");
        Ok(TidbHandle {
            inst,
            tasks: Arc::new(Mutex::new(vec![accept, status])),
        })
    }
}

async fn accept_loop<N: Network>(net: N, listener: N::Listener, inst: Arc<Instance>) {
    loop {
        // Biased: a fixed polling order keeps simulated runs replayable.
        tokio::select! {
            biased;
            _ = inst.reached(Phase::Closing) => break,
            r = net.accept(&listener) => match r {
                Ok((stream, peer)) => {
                    let guard = ConnGuard::new(&inst, inst.cluster.next_conn_id());
                    let inst = Arc::clone(&inst);
                    net.spawn_connection(stream, move |s| super::conn::serve(s, peer, inst, guard));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    tracing::info!(sql = %inst.sql_addr, "stopped accepting connections");
}

/// Controls a running instance. Clones control the same instance.
#[derive(Debug, Clone)]
pub struct TidbHandle {
    inst: Arc<Instance>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TidbHandle {
    /// The bound SQL address.
    pub fn sql_addr(&self) -> SocketAddr {
        self.inst.sql_addr
    }

    /// The bound status address.
    pub fn status_addr(&self) -> SocketAddr {
        self.inst.status_addr
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.inst.phase()
    }

    /// Authenticated sessions.
    pub fn connection_count(&self) -> usize {
        self.inst.connection_count()
    }

    /// Sets the CPU and/or memory use its `/metrics` reports (0.0-1.0).
    pub fn set_load(&self, cpu: Option<f64>, memory: Option<f64>) {
        self.inst.set_load(cpu, memory);
    }

    /// Makes this share (0.0-1.0) of its TSO requests to PD and/or RPCs
    /// to TiKV fail, as its `/metrics` counters show.
    pub fn set_errors(&self, pd: Option<f64>, tikv: Option<f64>) {
        self.inst.errors.set(pd, tikv);
    }

    /// The cluster the instance belongs to.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.inst.cluster
    }

    /// TiDB's graceful shutdown: `/status` answers 500 at once; after
    /// `graceful_wait` the listener closes and idle connections are closed,
    /// those in a transaction when it ends; after `graceful_close_timeout`
    /// the rest are closed. Returns when everything is closed. Calling it
    /// again (or after `kill`) just waits for the end.
    pub async fn graceful_shutdown(&self) {
        if self.begin_shutdown() {
            self.shutdown_sequence().await;
        }
        self.stopped().await;
    }

    /// [`TidbHandle::graceful_shutdown`] in the background: `/status`
    /// answers 500 when this returns.
    pub fn start_graceful_shutdown(&self) {
        if self.begin_shutdown() {
            let h = self.clone();
            tiproxy_runtime::task::spawn(async move { h.shutdown_sequence().await });
        }
    }

    /// Moves a serving instance to draining; false if it was not serving.
    fn begin_shutdown(&self) -> bool {
        let began = self
            .inst
            .update_phase(|p| (p == Phase::Serving).then_some(Phase::Draining));
        if began {
            tracing::info!(sql = %self.inst.sql_addr, "graceful shutdown: reporting unhealthy");
        }
        began
    }

    async fn shutdown_sequence(&self) {
        tokio::time::sleep(self.inst.opts.graceful_wait).await;
        self.inst.advance(Phase::Closing);
        let drained =
            tokio::time::timeout(self.inst.opts.graceful_close_timeout, self.no_connections())
                .await;
        if drained.is_err() {
            tracing::info!(
                left = self.inst.live.load(Ordering::SeqCst),
                "graceful shutdown timed out; closing the remaining connections"
            );
        }
        self.inst.advance(Phase::Stopped);
    }

    /// Arms a crash in the middle of a statement: the next write outside a
    /// transaction (`INSERT`, `UPDATE`, `DELETE`, `REPLACE`, a `PREPARE` or
    /// `COM_STMT_PREPARE`) runs, is applied, and is never answered;
    /// [`TidbHandle::statement_hit`] resolves then. A TiDB killed by the
    /// OOM killer or a panic dies like this, after its commit and before
    /// its reply: the one case where sending the statement again would
    /// run it twice.
    pub fn crash_after_next_statement(&self) {
        self.inst.crash_armed.store(true, Ordering::SeqCst);
    }

    /// Resolves once an armed statement ran (see
    /// [`TidbHandle::crash_after_next_statement`]).
    pub async fn statement_hit(&self) {
        self.inst.crash_hit.notified().await;
    }

    /// Drops every connection and listener at once.
    pub fn kill(&self) {
        self.inst.advance(Phase::Killed);
        tracing::info!(sql = %self.inst.sql_addr, "killed");
    }

    /// Waits until the instance is stopped or killed and all its tasks and
    /// connections are gone.
    pub async fn stopped(&self) {
        self.inst.reached(Phase::Stopped).await;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        self.no_connections().await;
    }

    async fn no_connections(&self) {
        loop {
            let notified = self.inst.conn_closed.notified();
            if self.inst.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}
