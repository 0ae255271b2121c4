//! TiProxy's own Grafana dashboard (`tiproxy_summary.json`) and alert rules
//! (`tiproxy.rules.yml`), as tiup deploys them, find their series in a
//! scrape of this proxy. [`QUERIED`] holds, as data, every series and label
//! they query; [`NOT_EXPORTED`] the few this proxy cannot have, with why.
//! A scripted workload on TiDB doubles (queries, prepared statements, moves
//! that succeed and fail, a dial to a dead TiDB, every TiDB killed before a
//! client connects) runs first; then one scrape of `/api/metrics` must
//! contain each series with each label.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts, free_port, http_get, http_request};

/// Every series TiProxy's dashboard and alert rules query, with the labels
/// they select or group by (`instance` and `job` are Prometheus' own).
/// Histograms are listed as scraped (`_bucket` with `le`, `_sum`,
/// `_count`).
const QUERIED: &[(&str, &[&str])] = &[
    // Alert rules.
    ("tiproxy_monitor_time_jump_back_total", &[]),
    ("tiproxy_server_err", &["type"]),
    ("tiproxy_backend_get_backend", &["res"]),
    // Dashboard: server.
    ("tiproxy_server_connections", &[]),
    ("tiproxy_server_create_connection_total", &[]),
    ("tiproxy_server_disconnection_total", &["type"]),
    ("tiproxy_server_maxprocs", &[]),
    ("process_cpu_seconds_total", &[]),
    ("process_resident_memory_bytes", &[]),
    ("process_start_time_seconds", &[]),
    // Dashboard: query summary.
    ("tiproxy_session_query_total", &["backend", "cmd_type"]),
    (
        "tiproxy_session_query_duration_seconds_bucket",
        &["le", "backend"],
    ),
    ("tiproxy_session_query_duration_seconds_sum", &[]),
    ("tiproxy_session_query_duration_seconds_count", &[]),
    ("tiproxy_session_handshake_duration_seconds_bucket", &["le"]),
    ("tiproxy_session_handshake_duration_seconds_sum", &[]),
    ("tiproxy_session_handshake_duration_seconds_count", &[]),
    // Dashboard: balance.
    ("tiproxy_balance_b_conn", &["backend"]),
    (
        "tiproxy_balance_migrate_total",
        &["from", "to", "reason", "migrate_res"],
    ),
    ("tiproxy_balance_pending_migrate", &["from", "to"]),
    ("tiproxy_balance_migrate_duration_seconds_bucket", &["le"]),
    ("tiproxy_balance_migrate_duration_seconds_sum", &[]),
    ("tiproxy_balance_migrate_duration_seconds_count", &[]),
    // Dashboard: backend.
    (
        "tiproxy_backend_get_backend_duration_seconds_bucket",
        &["le"],
    ),
    ("tiproxy_backend_get_backend_duration_seconds_sum", &[]),
    ("tiproxy_backend_get_backend_duration_seconds_count", &[]),
    ("tiproxy_backend_dial_backend_fail", &["backend"]),
    ("tiproxy_backend_ping_duration_seconds", &["backend"]),
    ("tiproxy_backend_health_check_seconds", &[]),
    // Dashboard: traffic.
    ("tiproxy_traffic_inbound_bytes", &["backend"]),
    ("tiproxy_traffic_inbound_packets", &["backend"]),
    ("tiproxy_traffic_outbound_bytes", &["backend"]),
    ("tiproxy_traffic_outbound_packets", &["backend"]),
    ("tiproxy_traffic_cross_location_bytes", &[]),
];

/// What the dashboard and rules also query, and why no scrape of this
/// proxy has it.
const NOT_EXPORTED: &[(&str, &str)] = &[
    (
        "up",
        "Prometheus writes it for every target it scrapes; no exporter does",
    ),
    (
        "go_goroutines",
        "a Go runtime series; the proxy is a Rust program (its threads are process_threads)",
    ),
    (
        "go_memory_classes_heap_objects_bytes",
        "a Go runtime series; the proxy's memory is process_resident_memory_bytes",
    ),
    (
        "go_memory_classes_heap_unused_bytes",
        "a Go runtime series; the proxy's memory is process_resident_memory_bytes",
    ),
    (
        "tiproxy_server_owner",
        "registered, never set: TiProxy elects an owner per job in PD (the metrics reader, \
         the VIP); every instance of this proxy reads its backends' metrics itself and no \
         job is elected",
    ),
];

/// Label values the workload must have produced, by what a user watches:
/// the alert on failed backend lookups, moves that succeed and fail, the
/// dead TiDB's failed dial, and queries on both TiDBs.
fn wanted_values(
    tidb: &[SocketAddr],
    dead: SocketAddr,
) -> Vec<(&'static str, &'static str, String)> {
    let mut v = vec![
        ("tiproxy_backend_get_backend", "res", "fail".to_string()),
        ("tiproxy_backend_get_backend", "res", "succeed".to_string()),
        (
            "tiproxy_balance_migrate_total",
            "migrate_res",
            "succeed".to_string(),
        ),
        (
            "tiproxy_balance_migrate_total",
            "migrate_res",
            "fail".to_string(),
        ),
        ("tiproxy_balance_migrate_total", "reason", "api".to_string()),
        (
            "tiproxy_backend_dial_backend_fail",
            "backend",
            dead.to_string(),
        ),
        ("tiproxy_server_err", "type", "backend_metrics".to_string()),
        (
            "tiproxy_session_query_total",
            "cmd_type",
            "StmtExecute".to_string(),
        ),
        (
            "tiproxy_session_query_total",
            "cmd_type",
            "Ping".to_string(),
        ),
    ];
    for t in tidb {
        v.push(("tiproxy_session_query_total", "backend", t.to_string()));
        v.push(("tiproxy_traffic_inbound_packets", "backend", t.to_string()));
        v.push((
            "tiproxy_backend_ping_duration_seconds",
            "backend",
            t.to_string(),
        ));
    }
    v
}

/// One scraped sample: its labels.
type Samples = BTreeMap<String, Vec<BTreeMap<String, String>>>;

/// Parses Prometheus' text exposition (what `/api/metrics` serves) into
/// series name -> the label sets of its samples.
fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, _value) = line.rsplit_once(' ').expect("sample value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let mut set = BTreeMap::new();
        // Label values here hold no quotes or commas.
        for kv in labels.split("\",").filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
            set.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.entry(name.to_string()).or_default().push(set);
    }
    out
}

/// Problems of a scrape against the table: missing series, labels and
/// label values.
fn problems(samples: &Samples, wanted: &[(&str, &str, String)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (name, labels) in QUERIED {
        let Some(sets) = samples.get(*name) else {
            bad.push(format!("{name}: no sample"));
            continue;
        };
        for l in *labels {
            if !sets.iter().any(|s| s.contains_key(*l)) {
                bad.push(format!("{name}: no label {l}"));
            }
        }
    }
    for (name, label, value) in wanted {
        let found = samples
            .get(*name)
            .is_some_and(|sets| sets.iter().any(|s| s.get(*label) == Some(value)));
        if !found {
            bad.push(format!("{name}: no sample with {label}=\"{value}\""));
        }
    }
    bad
}

/// A round of work of every kind the dashboard breaks queries down by.
async fn work(c: &mut Conn) {
    let one: Option<i64> = c.query_first("SELECT 1").await.expect("SELECT 1");
    assert_eq!(one, Some(1));
    let stmt = c.prep("SELECT ?").await.expect("prepare");
    let echo: Option<i64> = c.exec_first(&stmt, (7,)).await.expect("execute");
    assert_eq!(echo, Some(7));
    c.close(stmt).await.expect("close statement");
    c.ping().await.expect("ping");
}

fn scrape(proxy: &ProxyProcess) -> Samples {
    let (status, body) = http_get(proxy.api, "/api/metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// Waits until the scrape has `name` with `label="value"`.
async fn wait_for_value(proxy: &ProxyProcess, name: &str, label: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(proxy);
        if s.get(name).is_some_and(|sets| {
            sets.iter()
                .any(|l| l.get(label).map(String::as_str) == Some(value))
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}=\"{value}\"}} did not appear: {:?}",
            s.get(name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_table_says_why_each_absent_series_is_absent() {
    // Nothing is in both lists, and what is registered but unset is
    // registered (TiProxy's dashboard queries it without an error).
    for (name, _why) in NOT_EXPORTED {
        assert!(
            !QUERIED.iter().any(|(q, _)| q == name),
            "{name} is in both lists"
        );
    }
    let families: BTreeSet<String> = tiproxy_runtime::metrics::metrics()
        .families()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(families.contains("tiproxy_server_owner"));
    for (name, _) in QUERIED {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
            .unwrap_or(*name);
        assert!(families.contains(family), "{name} is not registered");
    }
    // The check fails on a scrape that lacks something.
    let empty = Samples::new();
    assert_eq!(problems(&empty, &[]).len(), QUERIED.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiproxy_dashboard_and_alert_series_are_scraped_after_a_workload() {
    let cluster = TidbDouble::start(2, 0, &[]);
    let tidbs = cluster.instances();
    let tidb: Vec<SocketAddr> = tidbs.iter().map(|i| i.sql).collect();
    // A TiDB whose SQL port refuses while its status port (borrowed from a
    // live one) says it serves: the proxy dials it and fails.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut backends: Vec<String> = tidbs.iter().map(TidbDouble::backend_entry).collect();
    backends.push(format!(
        "{{ addr = \"{dead}\", status-addr = \"{}\" }}",
        tidbs[0].status
    ));
    // Probes never fail a backend (dials still do, at once), so the dead
    // TiDB stays a candidate for the move below; /metrics is read often.
    let proxy = ProxyProcess::start_with_backends(
        &backends,
        "[health-check]\nfailure-threshold = 1000\nmetrics-interval = \"500ms\"\n",
    );

    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = Conn::new(double_opts(proxy.sql))
            .await
            .expect("connect through tiproxy");
        work(&mut c).await;
        clients.push(c);
    }

    // A move to the dead TiDB fails; moves to a live one succeed (every
    // session not on it moves, so both directions move someone).
    let redirect = |to: SocketAddr| {
        let (status, body) =
            http_request(proxy.api, "POST", &format!("/api/debug/redirect?to={to}"));
        assert_eq!(status, 200, "{body}");
    };
    redirect(dead);
    wait_for_value(
        &proxy,
        "tiproxy_balance_migrate_total",
        "migrate_res",
        "fail",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    redirect(tidb[1]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redirect(tidb[0]);
    wait_for_value(
        &proxy,
        "tiproxy_balance_migrate_total",
        "migrate_res",
        "succeed",
    )
    .await;
    for c in &mut clients {
        work(c).await;
    }
    let s = scrape(&proxy);
    let dials = s.get("tiproxy_backend_dial_backend_fail");
    assert!(
        dials.is_some_and(|d| d
            .iter()
            .any(|l| l.get("backend") == Some(&dead.to_string()))),
        "no failed dial to the dead TiDB counted: {dials:?}"
    );

    // Every TiDB dies: sessions break, a new client finds no backend, and
    // reading the TiDBs' /metrics fails.
    cluster.kill(0);
    cluster.kill(1);
    let refused = Conn::new(double_opts(proxy.sql)).await;
    assert!(
        refused.is_err(),
        "a client got a session with every TiDB dead"
    );
    wait_for_value(&proxy, "tiproxy_backend_get_backend", "res", "fail").await;
    wait_for_value(&proxy, "tiproxy_server_err", "type", "backend_metrics").await;
    drop(clients);

    let samples = scrape(&proxy);
    let bad = problems(&samples, &wanted_values(&tidb, dead));
    assert!(
        bad.is_empty(),
        "series TiProxy's dashboard or alert rules query are missing:\n  {}",
        bad.join("\n  ")
    );
    let log = proxy.log.lock().expect("log").clone();
    assert!(!log.contains("panicked"), "{log}");
}
