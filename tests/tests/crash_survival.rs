//! Crash protection with real processes: three TiDB doubles (one
//! `tidb-double` process, instances sharing a store and a token key), the
//! tiproxy binary with `proxy.session-protection = true`, 200 pooled idle
//! sessions with state (USE db, a user variable, a prepared statement, a
//! changed sql_mode) and 20 sessions idle inside a transaction. One TiDB
//! crashes (the double drops its listener and every connection at once):
//! every idle session on it continues on another TiDB with identical state
//! and no error; the ones in a transaction are closed as the server closed
//! them; `tiproxy_session_restore_total` says so.

use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::netns::{InsideTidb, Netns};
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts, install};

const IDLE: usize = 200;
const BUSY: usize = 20;

/// The value of one sample of the proxy's `/metrics` (0 when absent).
fn sample(proxy: &ProxyProcess, series: &str) -> u64 {
    let (status, body) = proxy.get("/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

struct Idle {
    id: usize,
    conn: Conn,
    stmt: mysql_async::Statement,
    port: u16,
}

async fn port_of(c: &mut Conn) -> u16 {
    c.query_first::<u16, _>("SELECT @@port")
        .await
        .expect("@@port")
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_outlive_their_tidbs_crash() {
    let cluster = TidbDouble::start(3, 0, &[]);
    let tidbs = cluster.instances();
    let backends: Vec<String> = tidbs.iter().map(TidbDouble::backend_entry).collect();
    // No balancing by count: the random initial spread (prefer-idle)
    // would otherwise move sessions after each recorded its TiDB, and the
    // restores counted would not match the sessions seen on the victim.
    let proxy = ProxyProcess::start_with_backends(
        &backends,
        "session-protection = true\n[balance.conn-count]\ncount-ratio-threshold = 100\n",
    );

    let mut admin = Conn::new(double_opts(tidbs[0].sql)).await.expect("direct");
    for db in ["db0", "db1", "db2"] {
        admin
            .query_drop(format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await
            .expect("db");
        admin
            .query_drop(format!(
                "CREATE TABLE IF NOT EXISTS {db}.t (k BIGINT PRIMARY KEY, v BIGINT)"
            ))
            .await
            .expect("table");
    }
    drop(admin);

    let mut idle = Vec::new();
    for id in 0..IDLE {
        let mut conn = Conn::new(double_opts(proxy.sql)).await.expect("connect");
        conn.query_drop(format!("USE db{}", id % 3))
            .await
            .expect("use");
        conn.query_drop(format!("SET @me = 'client-{id}'"))
            .await
            .expect("user variable");
        conn.query_drop("SET SESSION sql_mode = 'ANSI_QUOTES'")
            .await
            .expect("sql_mode");
        let stmt = conn.prep("SELECT ?, @me").await.expect("prepare");
        let port = port_of(&mut conn).await;
        idle.push(Idle {
            id,
            conn,
            stmt,
            port,
        });
    }
    let mut busy = Vec::new();
    for id in 0..BUSY {
        let mut conn = Conn::new(double_opts(proxy.sql)).await.expect("connect");
        let port = port_of(&mut conn).await;
        conn.query_drop("BEGIN").await.expect("begin");
        conn.query_drop(format!(
            "INSERT INTO db0.t (k, v) VALUES ({}, 1)",
            1_000_000 + id
        ))
        .await
        .expect("insert in a transaction");
        busy.push((conn, port));
    }
    // Every idle session holds a fresh copy once its last change is
    // exported; the busy ones hold none.
    wait_for(
        "every idle session protected",
        Duration::from_secs(20),
        || sample(&proxy, "tiproxy_session_protected") == IDLE as u64,
    )
    .await;

    // Crash the TiDB with the most idle sessions.
    let victim = tidbs
        .iter()
        .max_by_key(|t| idle.iter().filter(|c| c.port == t.sql.port()).count())
        .expect("a TiDB")
        .clone();
    let on_victim = idle.iter().filter(|c| c.port == victim.sql.port()).count();
    let busy_on_victim = busy.iter().filter(|(_, p)| *p == victim.sql.port()).count();
    assert!(on_victim > 0, "sessions spread over the TiDBs");
    let crashed_at = Instant::now();
    cluster.kill(victim.index);
    let took = wait_for(
        "every idle session on the crashed TiDB restored",
        Duration::from_secs(20),
        || sample(&proxy, "tiproxy_session_restore_total{result=\"ok\"}") == on_victim as u64,
    )
    .await;
    eprintln!(
        "FIGURE crash -> last restore: {took:?} ({on_victim} idle sessions restored, {} s wall)",
        crashed_at.elapsed().as_secs_f64()
    );

    // Every idle session carries on with its state, without an error.
    for c in &mut idle {
        let id = c.id;
        let port = port_of(&mut c.conn).await;
        assert_ne!(
            port,
            victim.sql.port(),
            "client {id} still on the dead TiDB"
        );
        // (Sessions that were elsewhere may have been moved since by
        // balancing: the restores unbalanced the two TiDBs left.)
        let (echo, me): (i64, String) = c
            .conn
            .exec_first(&c.stmt, (id as i64,))
            .await
            .unwrap_or_else(|e| panic!("client {id} prepared statement: {e}"))
            .expect("a row");
        assert_eq!((echo, me), (id as i64, format!("client-{id}")));
        let db: Option<String> = c
            .conn
            .query_first("SELECT DATABASE()")
            .await
            .expect("database()");
        assert_eq!(db, Some(format!("db{}", id % 3)), "client {id} database");
        let mode: String = c
            .conn
            .query_first("SELECT @@sql_mode")
            .await
            .expect("sql_mode")
            .expect("a row");
        assert_eq!(mode, "ANSI_QUOTES", "client {id} sql_mode");
        c.conn
            .query_drop(format!("INSERT INTO t (k, v) VALUES ({id}, 1)"))
            .await
            .unwrap_or_else(|e| panic!("client {id} insert after the crash: {e}"));
    }

    // Sessions in a transaction on the crashed TiDB are closed, as the
    // server closed them; the others commit.
    let mut lost = 0;
    for (mut conn, port) in busy {
        let r = conn.query_drop("COMMIT").await;
        if port == victim.sql.port() {
            assert!(
                r.is_err(),
                "a transaction on the crashed TiDB cannot commit"
            );
            lost += 1;
        } else {
            r.expect("commit on a live TiDB");
        }
    }
    assert_eq!(lost, busy_on_victim);
    assert_eq!(
        sample(
            &proxy,
            "tiproxy_session_restore_total{result=\"unprotected_busy\"}"
        ),
        busy_on_victim as u64
    );
    assert_eq!(
        sample(&proxy, "tiproxy_session_restore_total{result=\"ok\"}"),
        on_victim as u64
    );
    assert_eq!(
        sample(&proxy, "tiproxy_session_restore_total{result=\"failed\"}"),
        0
    );
}

/// The same with the TiDB's network cut instead of a crash: a TiDB double
/// in a network namespace whose packets are all dropped (no reset, no FIN:
/// silence, as from a dead host or a partition). Its status checks time
/// out, so the proxy marks it unhealthy and its connections switch to
/// `backend-unhealthy-keepalive` (idle 1 s, 2 probes 1 s apart, user
/// timeout 3 s). Each idle session's dead connection is found within that
/// bound, about 1 s + 3 s, and the session continues on the other TiDB
/// with its state and no error. The two doubles are separate processes
/// given one seed, so they derive the same session-token key, as the TiDBs
/// of one cluster share `session-token-signing-cert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_outlive_their_tidbs_network_cut() {
    const SESSIONS: usize = 40;
    let Some(ns) = Netns::create() else {
        return;
    };
    install(&["iptables"], "iptables");
    // One seed: the same session-token key in both processes.
    let cut = InsideTidb::start_with(&ns, &["--seed", "7"]);
    let other = TidbDouble::start(1, 0, &["--seed", "7"]);
    let live = other.instances()[0].clone();
    for addr in [cut.sql, live.sql] {
        let mut admin = Conn::new(double_opts(addr)).await.expect("direct");
        admin
            .query_drop("CREATE DATABASE IF NOT EXISTS db0")
            .await
            .expect("db");
    }
    let proxy = ProxyProcess::start_with_backends(
        &[
            format!(
                "{{ addr = \"{}\", status-addr = \"{}\" }}",
                cut.sql, cut.status
            ),
            TidbDouble::backend_entry(&live),
        ],
        "session-protection = true\n\
         [proxy.backend-unhealthy-keepalive]\nenabled = true\nidle = 1\nintvl = 1\ncnt = 2\ntimeout = 3\n\
         [health-check]\nstatus-interval = \"300ms\"\ninterval = \"500ms\"\ndial-timeout = \"500ms\"\n\
         [balance.conn-count]\ncount-ratio-threshold = 100\n",
    );

    let mut sessions = Vec::new();
    for id in 0..SESSIONS {
        let mut conn = Conn::new(double_opts(proxy.sql))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", proxy.log.lock().unwrap()));
        conn.query_drop("USE db0").await.expect("use");
        conn.query_drop(format!("SET @me = 'client-{id}'"))
            .await
            .expect("user variable");
        let stmt = conn.prep("SELECT ?, @me").await.expect("prepare");
        let port = port_of(&mut conn).await;
        sessions.push(Idle {
            id,
            conn,
            stmt,
            port,
        });
    }
    let on_cut = sessions.iter().filter(|s| s.port == cut.sql.port()).count();
    assert!(
        on_cut > 0 && on_cut < SESSIONS,
        "sessions spread over both TiDBs: {on_cut} of {SESSIONS} on the one to cut"
    );
    wait_for("every session protected", Duration::from_secs(20), || {
        sample(&proxy, "tiproxy_session_protected") == SESSIONS as u64
    })
    .await;

    // The TiDB's network goes silent: nothing in, nothing out.
    ns.exec(&["iptables", "-A", "INPUT", "-j", "DROP"]);
    ns.exec(&["iptables", "-A", "OUTPUT", "-j", "DROP"]);
    let silent = Instant::now();
    // Unhealthy within a few status checks (~1 s), then the unhealthy
    // profile's bound (3 s); 15 s leaves room for a loaded machine.
    let took = loop {
        let restored = sample(&proxy, "tiproxy_session_restore_total{result=\"ok\"}");
        if restored == on_cut as u64 {
            break silent.elapsed();
        }
        if silent.elapsed() > Duration::from_secs(15) {
            let metrics = proxy.get("/metrics").1;
            let restore: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("tiproxy_session_restore")
                        || l.starts_with("tiproxy_balance_migrate_total")
                })
                .collect();
            panic!(
                "{restored} of {on_cut} sessions on the cut TiDB restored within 15 s\n{}\nsessions: {}\nproxy log:\n{}",
                restore.join("\n"),
                proxy.get("/api/sessions").1,
                proxy.log.lock().expect("log")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "FIGURE network cut -> last restore: {took:?} ({on_cut} idle sessions restored, {:.1} s wall)",
        silent.elapsed().as_secs_f64()
    );

    for s in &mut sessions {
        let id = s.id;
        let port = port_of(&mut s.conn).await;
        assert_eq!(port, live.sql.port(), "client {id} is on the live TiDB");
        let (echo, me): (i64, String) = s
            .conn
            .exec_first(&s.stmt, (id as i64,))
            .await
            .unwrap_or_else(|e| panic!("client {id} prepared statement: {e}"))
            .expect("a row");
        assert_eq!((echo, me), (id as i64, format!("client-{id}")));
        let db: Option<String> = s
            .conn
            .query_first("SELECT DATABASE()")
            .await
            .expect("database()");
        assert_eq!(db.as_deref(), Some("db0"), "client {id} database");
    }
    assert_eq!(
        sample(&proxy, "tiproxy_session_restore_total{result=\"failed\"}"),
        0
    );
    ns.exec(&["iptables", "-F"]);
}
