//! What the real `tiproxy` binary logs in front of real MariaDB: TiDB's
//! format by default, quiet when healthy and idle, client SQL errors as
//! metrics and not as log lines, and the JSON encoder into a log file.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, mariadb, opts};

fn config(sql: SocketAddr, api: SocketAddr, log: &str) -> String {
    let db = mariadb().addr();
    format!(
        "[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [\"{db}\"]\n[api]\naddr = \"{api}\"\n{log}"
    )
}

/// `[2024/01/02 15:04:05.000 +08:00] [INFO] [file.rs:12] [...`
fn is_tidb_line(l: &str) -> bool {
    let b = l.as_bytes();
    let stamp = "[dddd/dd/dd dd:dd:dd.ddd +dd:dd] [";
    b.len() > stamp.len()
        && stamp
            .bytes()
            .zip(b.iter().copied())
            .all(|(want, c)| match want {
                b'd' => c.is_ascii_digit(),
                b'+' => c == b'+' || c == b'-',
                w => c == w,
            })
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_proxy_is_quiet_and_sql_errors_are_not_logged() {
    let p =
        ProxyProcess::start_with_config(|sql, api| config(sql, api, "[log]\nlevel = \"info\"\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.log.lock().expect("log").contains("tiproxy started") {
        assert!(Instant::now() < deadline, "no start-up line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup = p.log.lock().expect("log").clone();
    for l in startup.lines() {
        assert!(is_tidb_line(l), "not TiDB's log format: {l}");
    }
    let started = startup
        .lines()
        .find(|l| l.contains("tiproxy started"))
        .expect("line");
    assert!(started.contains("] [INFO] [proxy.rs:"), "{started}");
    assert!(started.contains("[\"tiproxy started\"]"), "{started}");

    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    let e = c
        .query_drop("SELECT * FROM no_such_table_for_the_log_test")
        .await
        .expect_err("an SQL error");
    assert!(
        e.to_string().contains("no_such_table_for_the_log_test"),
        "{e}"
    );
    c.query_drop("SELECT 1").await.expect("the session goes on");
    let (_, m) = p.get("/api/metrics");
    let errors: f64 = m
        .lines()
        .filter(|l| l.starts_with("tiproxy_session_query_error_total") && l.contains("Query"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 1.0, "the SQL error is counted:\n{m}");
    drop(c);
    // The status and SQL probes run every 0.5 s and 3 s: several rounds.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = p.log.lock().expect("log").clone();
    let new = &after[startup.len()..];
    assert!(
        new.is_empty(),
        "an idle, healthy proxy logged at info or above:\n{new}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_encoder_into_a_log_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("logs").join("tiproxy.log");
    let f = file.display().to_string();
    let p = ProxyProcess::start_with_config(|sql, api| {
        config(
            sql,
            api,
            &format!(
                "[log]\nencoder = \"json\"\n[log.log-file]\nfilename = \"{f}\"\nmax-size = 1\n"
            ),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("tiproxy started")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no start-up line in {f}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["message"], "tiproxy started", "{line}");
    assert!(
        p.log.lock().expect("log").is_empty(),
        "nothing on stderr when logging to a file"
    );
}
