//! Prometheus metrics with TiProxy's names, labels and buckets (its
//! `pkg/metrics`: every family it registers), the `process_*` collector,
//! and our own extras (`tiproxy_session_query_error_total`). What the
//! families mean is here; the places that count are where the events
//! happen (the connection driver, the router, the health and balance
//! loops), through the handles this module hands out. Hot-path handles are
//! resolved once: per backend and command code ([`BackendMetrics`]), so
//! counting a query is two atomic adds.

use std::sync::OnceLock;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};
use tiproxy_core::Command;

mod backend;
mod monitor;
mod protect;
mod traffic;

pub use self::backend::{BackendMetrics, PendingMove};
pub use self::monitor::monitor_loop;
pub use self::protect::ProtectMetrics;
pub use self::traffic::{FrameCounter, LegTraffic};

/// TiProxy's `cmd_type` label for a command.
pub fn cmd_type(c: Command) -> &'static str {
    match c {
        Command::Sleep => "Sleep",
        Command::Quit => "Quit",
        Command::InitDb => "InitDB",
        Command::Query => "Query",
        Command::FieldList => "FieldList",
        Command::CreateDb => "CreateDB",
        Command::DropDb => "DropDB",
        Command::Refresh => "Refresh",
        Command::Shutdown => "(DEPRECATED)Shutdown",
        Command::Statistics => "Statistics",
        Command::ProcessInfo => "ProcessInfo",
        Command::Connect => "Connect",
        Command::ProcessKill => "ProcessKill",
        Command::Debug => "Debug",
        Command::Ping => "Ping",
        Command::Time => "Time",
        Command::DelayedInsert => "DelayedInsert",
        Command::ChangeUser => "ChangeUser",
        Command::BinlogDump => "BinlogDump",
        Command::TableDump => "TableDump",
        Command::ConnectOut => "ConnectOut",
        Command::RegisterSlave => "RegisterSlave",
        Command::StmtPrepare => "StmtPrepare",
        Command::StmtExecute => "StmtExecute",
        Command::StmtSendLongData => "StmtSendLongData",
        Command::StmtClose => "StmtClose",
        Command::StmtReset => "StmtReset",
        Command::SetOption => "SetOption",
        Command::StmtFetch => "StmtFetch",
        Command::Daemon => "Daemon",
        Command::BinlogDumpGtid => "BinlogDumpGtid",
        Command::ResetConnection => "ResetConnect",
        Command::StmtBulkExecute => "StmtBulkExecute",
        Command::Unknown(_) => "Unknown",
    }
}

/// Command codes with handles resolved once (0x00..=0x1f); others (MariaDB's
/// bulk execute, unknown codes) look their series up each time.
const COMMAND_SLOTS: usize = 0x20;

/// `Server error` types counted in `tiproxy_server_err` (TiProxy's names,
/// which its `TiProxyReportErr` alert sums).
pub mod err_type {
    /// Reading a TiDB's `/metrics` failed.
    pub const BACKEND_METRICS: &str = "backend_metrics";
    /// Fetching the backend list from PD failed.
    pub const FETCH_BACKEND_LIST: &str = "fetchBackendList";
    /// Loading a certificate failed.
    pub const LOAD_CERT: &str = "load_cert";
    /// Registering this proxy in PD failed.
    pub const INFO_SYNCER: &str = "info_syncer";
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// What was registered (names and labels), empty or not.
    descs: Vec<Desc>,
    /// The names of the histogram families among them.
    histograms: Vec<String>,

    // tiproxy_server_*, tiproxy_monitor_*
    /// Open client connections.
    pub connections: IntGauge,
    /// Client connections accepted.
    pub create_connection: IntCounter,
    /// Connections refused, by why (`max_connections`, `memory`).
    pub reject_connection: IntCounterVec,
    /// Connections refused at max-connections.
    pub reject_max_connections: IntCounter,
    /// Connections refused over `high-memory-usage-reject-threshold`.
    pub reject_memory: IntCounter,
    /// Disconnections by cause.
    pub disconnection: IntCounterVec,
    /// Processors the proxy may use (TiProxy: GOMAXPROCS).
    pub maxprocs: IntGauge,
    /// Jobs this instance owns, by TiProxy's election key (`vip/<address>`).
    pub owner: IntGaugeVec,
    /// Server start and close.
    pub server_event: IntCounterVec,
    /// Sessions in the proxy's own takeover, by `result`: `handed_over`,
    /// `resumed` (refused, or the new process is gone) and `kept` (could
    /// not move: TLS) in the old process; `adopted` in the new one.
    pub takeover_sessions: IntCounterVec,
    /// Takeover attempts this process answered, by result.
    pub takeovers: IntCounterVec,
    /// Internal errors by kind ([`err_type`]).
    pub server_err: IntCounterVec,
    /// Wall clock jumps backwards.
    pub time_jump_back: IntCounter,
    /// Every 5 s of a live process.
    pub keep_alive: IntCounter,

    // tiproxy_session_*
    query_total: IntCounterVec,
    query_duration: HistogramVec,
    handshake_duration: HistogramVec,
    query_error: IntCounterVec,
    /// Commands answered with ERR, by command code (counted on errors only).
    query_errors: Vec<IntCounter>,
    /// When a command started, seconds after its connection was accepted.
    pub query_time_since_conn_creation: Histogram,
    /// How long client connections lived.
    pub conn_lifetime: Histogram,

    // tiproxy_backend_*
    /// Backend health (1 healthy, 0 not).
    pub backend_status: IntGaugeVec,
    /// Time to find a backend for a new connection (and dial it).
    pub get_backend_duration: Histogram,
    /// Backends found for new connections, by `res` (succeed, fail).
    pub get_backend: IntCounterVec,
    /// Dials that failed, by backend.
    pub dial_backend_fail: IntCounterVec,
    /// How long the last SQL-port probe of each backend took.
    pub ping_duration: GaugeVec,
    /// How long the last health check round took.
    pub health_check_seconds: Gauge,
    /// What a backend's `/metrics` said (`cpu`, `memory`: 0.0-1.0).
    pub backend_metric: GaugeVec,

    // tiproxy_balance_*
    /// Connections per backend.
    pub backend_conn: IntGaugeVec,
    /// Each backend's rank by each balance factor (lower goes first).
    pub backend_score: GaugeVec,
    /// Moves by route, reason and outcome.
    pub migrate: IntCounterVec,
    /// Move durations by route and outcome.
    pub migrate_duration: HistogramVec,
    /// Moves under way, by route and reason.
    pub pending_migrate: IntGaugeVec,

    // tiproxy_traffic_*
    inbound_bytes: IntCounterVec,
    inbound_packets: IntCounterVec,
    outbound_bytes: IntCounterVec,
    outbound_packets: IntCounterVec,
    /// Bytes exchanged with backends in another zone than the proxy's.
    pub cross_location_bytes: IntCounter,
    /// Captures stopped early, by reason (queue_full, disk_slow,
    /// write_error, canceled).
    pub traffic_capture_stopped: IntCounterVec,

    // tiproxy_replay_*
    /// Commands a traffic replay has yet to send.
    pub replay_pending_cmds: IntGauge,
    /// How far a replay lags behind the capture's timing.
    pub replay_wait_time: Gauge,

    /// Crash protection (`tiproxy_session_restore_total`, `_protected`).
    pub protect: ProtectMetrics,
}

/// `count` buckets from `start`, each twice the last (Prometheus'
/// `ExponentialBuckets`, as TiProxy declares them).
fn exp_buckets(start: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, 2.0, count).expect("valid buckets")
}

/// Registers collectors and remembers what they declare.
struct Registrar {
    registry: Registry,
    descs: Vec<Desc>,
    histograms: Vec<String>,
}

impl Registrar {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> C {
        self.register(Box::new(c.clone()));
        c
    }

    fn register(&mut self, c: Box<dyn Collector>) {
        self.descs.extend(c.desc().into_iter().cloned());
        self.registry.register(c).expect("metric names are unique");
    }

    fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid"))
    }

    fn counter_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
    }

    fn int_gauge(&mut self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid"))
    }

    fn int_gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"))
    }

    fn gauge(&mut self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("valid"))
    }

    fn gauge_vec(&mut self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid"))
    }

    fn histogram(&mut self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.histograms.push(name.to_string());
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid"),
        )
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> HistogramVec {
        self.histograms.push(name.to_string());
        self.add(
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid"),
        )
    }
}

impl Metrics {
    /// Deletes every series of the backend `addr` (label `backend`, `from`
    /// or `to`), as TiProxy's `DelBackend` does when a backend leaves: a
    /// proxy in front of a churning cluster does not grow `/metrics`
    /// forever.
    pub fn forget_backend(&self, addr: &str) {
        fn forget<T: prometheus::core::MetricVecBuilder>(
            vec: &prometheus::core::MetricVec<T>,
            addr: &str,
        ) {
            use prometheus::core::Collector;
            for family in vec.collect() {
                for m in family.get_metric() {
                    let pairs = m.get_label();
                    if pairs
                        .iter()
                        .any(|p| matches!(p.name(), "backend" | "from" | "to") && p.value() == addr)
                    {
                        // By name: collected pairs are sorted, not in
                        // the declared order remove_label_values needs.
                        let labels: std::collections::HashMap<&str, &str> =
                            pairs.iter().map(|p| (p.name(), p.value())).collect();
                        let _ = vec.remove(&labels);
                    }
                }
            }
        }
        forget(&self.query_total, addr);
        forget(&self.query_duration, addr);
        forget(&self.handshake_duration, addr);
        forget(&self.backend_status, addr);
        forget(&self.dial_backend_fail, addr);
        forget(&self.ping_duration, addr);
        forget(&self.backend_metric, addr);
        forget(&self.backend_conn, addr);
        forget(&self.backend_score, addr);
        forget(&self.migrate, addr);
        forget(&self.migrate_duration, addr);
        forget(&self.pending_migrate, addr);
        forget(&self.inbound_bytes, addr);
        forget(&self.inbound_packets, addr);
        forget(&self.outbound_bytes, addr);
        forget(&self.outbound_packets, addr);
    }

    fn new() -> Self {
        let mut r = Registrar {
            registry: Registry::new(),
            descs: Vec::new(),
            histograms: Vec::new(),
        };
        // tiproxy_server_*, tiproxy_monitor_*
        let connections = r.int_gauge(
            "tiproxy_server_connections",
            "Number of client connections.",
        );
        let create_connection = r.counter(
            "tiproxy_server_create_connection_total",
            "Client connections created.",
        );
        let reject_connection = r.counter_vec(
            "tiproxy_server_reject_connection_total",
            "Client connections rejected.",
            &["type"],
        );
        let disconnection = r.counter_vec(
            "tiproxy_server_disconnection_total",
            "Client disconnections by cause.",
            &["type"],
        );
        let maxprocs = r.int_gauge(
            "tiproxy_server_maxprocs",
            "Processors the proxy may use (TiProxy: GOMAXPROCS).",
        );
        maxprocs.set(std::thread::available_parallelism().map_or(1, |n| n.get()) as i64);
        let owner = r.int_gauge_vec(
            "tiproxy_server_owner",
            "The TiProxy owner of each job type.",
            &["type"],
        );
        let server_event = r.counter_vec(
            "tiproxy_server_event",
            "Server events (start, close).",
            &["type"],
        );
        let takeover_sessions = r.counter_vec(
            "tiproxy_takeover_sessions_total",
            "Sessions in a takeover by a new proxy process, by result.",
            &["result"],
        );
        let takeovers = r.counter_vec(
            "tiproxy_takeovers_total",
            "Takeover attempts answered by this process (done, refused, failed).",
            &["result"],
        );
        let server_err = r.counter_vec("tiproxy_server_err", "Internal errors by kind.", &["type"]);
        let time_jump_back = r.counter(
            "tiproxy_monitor_time_jump_back_total",
            "Times the wall clock jumped backwards.",
        );
        let keep_alive = r.counter(
            "tiproxy_monitor_keep_alive_total",
            "Counts every 5 seconds the process is alive.",
        );

        // tiproxy_session_*: 0.5 ms .. 1.5 days
        let query_total = r.counter_vec(
            "tiproxy_session_query_total",
            "Commands executed, by backend and command type.",
            &["backend", "cmd_type"],
        );
        let query_duration = r.histogram_vec(
            "tiproxy_session_query_duration_seconds",
            "Command latency seen by the proxy, by backend and command type.",
            exp_buckets(0.0005, 29),
            &["backend", "cmd_type"],
        );
        let handshake_duration = r.histogram_vec(
            "tiproxy_session_handshake_duration_seconds",
            "Time from accepting a client to its authentication by the backend.",
            exp_buckets(0.0005, 29),
            &["backend"],
        );
        let query_error = r.counter_vec(
            "tiproxy_session_query_error_total",
            "Commands the backend answered with an error, by command type.",
            &["cmd_type"],
        );
        let query_errors = (0..COMMAND_SLOTS)
            .map(|b| query_error.with_label_values(&[cmd_type(Command::from_byte(b as u8))]))
            .collect();
        let query_time_since_conn_creation = r.histogram(
            "tiproxy_session_query_time_since_conn_creation_seconds",
            "When commands start, seconds after their connection was accepted.",
            exp_buckets(1.0, 21),
        );
        let conn_lifetime = r.histogram(
            "tiproxy_session_conn_lifetime_seconds",
            "How long client connections lived.",
            exp_buckets(0.1, 25),
        );

        // tiproxy_backend_*
        let backend_status = r.int_gauge_vec(
            "tiproxy_backend_b_status",
            "Backend health, 1 when healthy.",
            &["backend"],
        );
        let get_backend_duration = r.histogram(
            "tiproxy_backend_get_backend_duration_seconds",
            "Time to find and dial a backend for a new connection.",
            exp_buckets(0.000_001, 26),
        );
        let get_backend = r.counter_vec(
            "tiproxy_backend_get_backend",
            "Backends found for new connections, by result.",
            &["res"],
        );
        let dial_backend_fail = r.counter_vec(
            "tiproxy_backend_dial_backend_fail",
            "Failed dials, by backend.",
            &["backend"],
        );
        let ping_duration = r.gauge_vec(
            "tiproxy_backend_ping_duration_seconds",
            "Time of the last SQL-port probe of each backend.",
            &["backend"],
        );
        let health_check_seconds = r.gauge(
            "tiproxy_backend_health_check_seconds",
            "Time of the last health check round of a backend.",
        );
        let backend_metric = r.gauge_vec(
            "tiproxy_backend_backend_metric",
            "What each backend's /metrics said (cpu, memory: 0-1).",
            &["backend", "metric"],
        );

        // tiproxy_balance_*
        let backend_conn = r.int_gauge_vec(
            "tiproxy_balance_b_conn",
            "Connections per backend.",
            &["backend"],
        );
        let backend_score = r.gauge_vec(
            "tiproxy_balance_b_score",
            "Each backend's rank by each balance factor (lower goes first).",
            &["backend", "factor"],
        );
        let migrate = r.counter_vec(
            "tiproxy_balance_migrate_total",
            "Session moves by route, reason and result.",
            &["from", "to", "reason", "migrate_res"],
        );
        let migrate_duration = r.histogram_vec(
            "tiproxy_balance_migrate_duration_seconds",
            "Session move durations, by route and result.",
            exp_buckets(0.0001, 26),
            &["from", "to", "migrate_res"],
        );
        let pending_migrate = r.int_gauge_vec(
            "tiproxy_balance_pending_migrate",
            "Session moves under way, by route and reason.",
            &["from", "to", "reason"],
        );

        // tiproxy_traffic_*
        let inbound_bytes = r.counter_vec(
            "tiproxy_traffic_inbound_bytes",
            "Bytes from backends.",
            &["backend"],
        );
        let inbound_packets = r.counter_vec(
            "tiproxy_traffic_inbound_packets",
            "MySQL packets from backends.",
            &["backend"],
        );
        let outbound_bytes = r.counter_vec(
            "tiproxy_traffic_outbound_bytes",
            "Bytes to backends.",
            &["backend"],
        );
        let outbound_packets = r.counter_vec(
            "tiproxy_traffic_outbound_packets",
            "MySQL packets to backends.",
            &["backend"],
        );
        let cross_location_bytes = r.counter(
            "tiproxy_traffic_cross_location_bytes",
            "Bytes exchanged with backends outside the proxy's zone.",
        );

        let traffic_capture_stopped = r.counter_vec(
            "tiproxy_traffic_capture_stopped_total",
            "Traffic captures stopped before their duration, by reason.",
            &["reason"],
        );

        // tiproxy_replay_*
        let replay_pending_cmds = r.int_gauge(
            "tiproxy_replay_pending_cmds",
            "Commands a traffic replay has yet to send.",
        );
        let replay_wait_time = r.gauge(
            "tiproxy_replay_wait_time",
            "How far a traffic replay lags behind the capture's timing (seconds).",
        );

        let protect = ProtectMetrics::register(&mut r);

        // process_*: CPU, memory, descriptors, threads, start time.
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));

        Self {
            registry: r.registry,
            descs: r.descs,
            histograms: r.histograms,
            connections,
            create_connection,
            reject_max_connections: reject_connection.with_label_values(&["max_connections"]),
            reject_memory: reject_connection.with_label_values(&["memory"]),
            reject_connection,
            disconnection,
            maxprocs,
            owner,
            server_event,
            takeover_sessions,
            takeovers,
            server_err,
            time_jump_back,
            keep_alive,
            query_total,
            query_duration,
            handshake_duration,
            query_error,
            query_errors,
            query_time_since_conn_creation,
            conn_lifetime,
            backend_status,
            get_backend_duration,
            get_backend,
            dial_backend_fail,
            ping_duration,
            health_check_seconds,
            backend_metric,
            backend_conn,
            backend_score,
            migrate,
            migrate_duration,
            pending_migrate,
            inbound_bytes,
            inbound_packets,
            outbound_bytes,
            outbound_packets,
            cross_location_bytes,
            traffic_capture_stopped,
            replay_pending_cmds,
            replay_wait_time,
            protect,
        }
    }

    /// The handles of one backend's series (see [`BackendMetrics`]).
    pub fn backend(&self, addr: &str) -> BackendMetrics {
        BackendMetrics::new(self, addr)
    }

    /// Counts one command the backend answered with ERR.
    pub fn query_error(&self, cmd: Command) {
        match self.query_errors.get(usize::from(cmd.to_byte())) {
            Some(c) => c.inc(),
            None => self.query_error.with_label_values(&[cmd_type(cmd)]).inc(),
        }
    }

    /// Counts one internal error of kind `what` ([`err_type`]).
    pub fn server_error(&self, what: &str) {
        self.server_err.with_label_values(&[what]).inc();
    }

    /// Every metric family this build exports, as `(name, label names)`,
    /// including families that have no samples yet.
    pub fn families(&self) -> Vec<(String, Vec<String>)> {
        self.descs
            .iter()
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect()
    }

    /// The histogram families among [`Metrics::families`] (scraped as
    /// `_bucket`, `_sum` and `_count`), with samples or not.
    pub fn histograms(&self) -> &[String] {
        &self.histograms
    }

    /// The current samples (families without samples are left out).
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        // Encoding into a Vec cannot fail.
        enc.encode(&self.registry.gather(), &mut buf)
            .expect("encode to memory");
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Microseconds since the metrics clock started (monotonic): what a
/// connection keeps to time its handshake, commands and lifetime in eight
/// bytes.
pub fn clock_us() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::metrics;
    use crate::config::BackendEntry;
    use crate::router::Router;

    #[test]
    fn a_removed_backend_leaves_no_series() {
        let (gone, kept) = ("10.9.9.9:4000", "10.9.9.8:4000");
        let r = Router::new(&[
            BackendEntry::Addr(gone.into()),
            BackendEntry::Addr(kept.into()),
        ]);
        let m = metrics();
        m.backend_status.with_label_values(&[gone]).set(1);
        m.migrate
            .with_label_values(&[kept, gone, "status", "succeed"])
            .inc();
        m.query_total.with_label_values(&[gone, "query"]).inc();
        m.query_total.with_label_values(&[kept, "query"]).inc();
        assert!(m.render().contains(gone));
        r.set_backends(&[BackendEntry::Addr(kept.into())]);
        let text = m.render();
        assert!(!text.contains(gone), "{text}");
        assert!(
            text.contains(&format!("tiproxy_session_query_total{{backend=\"{kept}\"")),
            "{text}"
        );
    }
}
