//! Prometheus metrics with TiProxy's names. Hot-path handles are resolved
//! once (per command code) so counting a query is two atomic adds.

use std::sync::OnceLock;

use prometheus::core::Desc;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tiproxy_core::Command;

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

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// What was registered (names and labels), empty or not.
    descs: Vec<Desc>,
    /// Open client connections.
    pub connections: IntGauge,
    /// Client connections accepted.
    pub create_connection: IntCounter,
    /// Connections refused at max-connections.
    pub reject_max_connections: IntCounter,
    /// Connections refused over `high-memory-usage-reject-threshold`.
    pub reject_memory: IntCounter,
    /// Disconnections by cause.
    pub disconnection: IntCounterVec,
    queries: Vec<(IntCounter, Histogram)>,
    /// Commands answered with ERR, by command code (counted on errors only).
    query_errors: Vec<IntCounter>,
    /// Connections per backend.
    pub backend_conn: IntGaugeVec,
    /// Backend health (1 healthy, 0 not).
    pub backend_status: IntGaugeVec,
    /// Moves by outcome.
    pub migrate: IntCounterVec,
    /// Moves under way, by target.
    pub pending_migrate: IntGaugeVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let mut descs = Vec::new();
        let mut reg = |c: Box<dyn prometheus::core::Collector>| {
            descs.extend(c.desc().into_iter().cloned());
            registry.register(c).expect("metric names are unique")
        };
        let connections = IntGauge::new(
            "tiproxy_server_connections",
            "Number of client connections.",
        )
        .expect("valid");
        reg(Box::new(connections.clone()));
        let create_connection = IntCounter::new(
            "tiproxy_server_create_connection_total",
            "Client connections created.",
        )
        .expect("valid");
        reg(Box::new(create_connection.clone()));
        let reject = IntCounterVec::new(
            Opts::new(
                "tiproxy_server_reject_connection_total",
                "Client connections rejected.",
            ),
            &["type"],
        )
        .expect("valid");
        reg(Box::new(reject.clone()));
        let disconnection = IntCounterVec::new(
            Opts::new(
                "tiproxy_server_disconnection_total",
                "Client disconnections by cause.",
            ),
            &["type"],
        )
        .expect("valid");
        reg(Box::new(disconnection.clone()));
        let query_total = IntCounterVec::new(
            Opts::new(
                "tiproxy_session_query_total",
                "Commands executed, by command type.",
            ),
            &["cmd_type"],
        )
        .expect("valid");
        reg(Box::new(query_total.clone()));
        let buckets = prometheus::exponential_buckets(0.0005, 2.0, 20).expect("valid buckets");
        let query_duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "tiproxy_session_query_duration_seconds",
                "Command latency seen by the proxy.",
            )
            .buckets(buckets),
            &["cmd_type"],
        )
        .expect("valid");
        reg(Box::new(query_duration.clone()));
        let queries = (0u8..=0x1f)
            .map(|b| {
                let t = cmd_type(Command::from_byte(b));
                (
                    query_total.with_label_values(&[t]),
                    query_duration.with_label_values(&[t]),
                )
            })
            .collect();
        let query_error = IntCounterVec::new(
            Opts::new(
                "tiproxy_session_query_error_total",
                "Commands the backend answered with an error, by command type.",
            ),
            &["cmd_type"],
        )
        .expect("valid");
        reg(Box::new(query_error.clone()));
        let query_errors = (0u8..=0x1f)
            .map(|b| query_error.with_label_values(&[cmd_type(Command::from_byte(b))]))
            .collect();
        let backend_conn = IntGaugeVec::new(
            Opts::new("tiproxy_balance_b_conn", "Connections per backend."),
            &["backend"],
        )
        .expect("valid");
        reg(Box::new(backend_conn.clone()));
        let backend_status = IntGaugeVec::new(
            Opts::new(
                "tiproxy_backend_b_status",
                "Backend health, 1 when healthy.",
            ),
            &["backend"],
        )
        .expect("valid");
        reg(Box::new(backend_status.clone()));
        let migrate = IntCounterVec::new(
            Opts::new("tiproxy_balance_migrate_total", "Session moves."),
            &["from", "to", "reason", "migrate_res"],
        )
        .expect("valid");
        reg(Box::new(migrate.clone()));
        let pending_migrate = IntGaugeVec::new(
            Opts::new(
                "tiproxy_balance_pending_migrate",
                "Session moves under way, by target.",
            ),
            &["to"],
        )
        .expect("valid");
        reg(Box::new(pending_migrate.clone()));
        Self {
            descs,
            query_errors,
            pending_migrate,
            reject_max_connections: reject.with_label_values(&["max_connections"]),
            reject_memory: reject.with_label_values(&["memory"]),
            registry,
            connections,
            create_connection,
            disconnection,
            queries,
            backend_conn,
            backend_status,
            migrate,
        }
    }

    /// Counts one finished command.
    #[inline]
    pub fn query(&self, cmd: Command, seconds: f64) {
        let i = usize::from(cmd.to_byte());
        if let Some((c, h)) = self.queries.get(i) {
            c.inc();
            h.observe(seconds);
        }
    }

    /// Counts one command the backend answered with ERR.
    pub fn query_error(&self, cmd: Command) {
        if let Some(c) = self.query_errors.get(usize::from(cmd.to_byte())) {
            c.inc();
        }
    }

    /// Every metric family this build exports, as `(name, label names)`,
    /// including families that have no samples yet.
    pub fn families(&self) -> Vec<(String, Vec<String>)> {
        self.descs
            .iter()
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect()
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
