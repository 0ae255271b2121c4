//! `proxy.fail-backend-list` and `proxy.failover-timeout` with real
//! processes, as an operator uses them: a TiDB is added to the list by a
//! hot reload. Its idle sessions move to the other TiDB with their state,
//! new connections avoid it, and a session held in a transaction (which
//! cannot move) is closed once `failover-timeout` has passed, not before.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts};

async fn port(c: &mut Conn) -> u16 {
    c.query_first("SELECT @@port")
        .await
        .expect("@@port")
        .expect("row")
}

fn log(p: &ProxyProcess) -> String {
    p.log.lock().expect("log").clone()
}

/// The `fail_backend_list` flag `/api/backends` shows for `addr`.
fn in_fail_list(p: &ProxyProcess, addr: SocketAddr) -> bool {
    let (status, body) = p.get("/api/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let list = v
        .as_array()
        .or_else(|| v["backends"].as_array())
        .expect("backend list")
        .clone();
    list.iter()
        .find(|b| b["addr"] == addr.to_string())
        .and_then(|b| b["fail_backend_list"].as_bool())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tidb_in_fail_backend_list_is_left_and_its_stuck_sessions_closed_after_the_timeout() {
    let cluster = TidbDouble::start(2, 2, &[]);
    let tidbs = cluster.instances();
    let (failed, other) = (tidbs[0].sql, tidbs[1].sql);
    let entries: Vec<String> = tidbs.iter().map(TidbDouble::backend_entry).collect();
    let proxy = ProxyProcess::start_with_backends(
        &entries,
        "fail-backend-list = []\nfailover-timeout = 3\n",
    );

    // Idle sessions with state, on both TiDBs.
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut c = Conn::new(double_opts(proxy.sql)).await.expect("connect");
        c.query_drop(format!("SET @me = {i}")).await.expect("set");
        idle.push(c);
    }
    let mut on_failed = 0;
    for c in &mut idle {
        if port(c).await == failed.port() {
            on_failed += 1;
        }
    }
    assert!(on_failed > 0, "some idle session is on the TiDB to fail");
    // One session on it held in a transaction: it cannot move.
    // Connections that land elsewhere stay open: prefer-idle routes to the
    // idler TiDB, so closing them could keep every new one off this TiDB.
    let mut stuck = None;
    let mut elsewhere = Vec::new();
    for _ in 0..50 {
        let mut c = Conn::new(double_opts(proxy.sql)).await.expect("connect");
        if port(&mut c).await == failed.port() {
            stuck = Some(c);
            break;
        }
        elsewhere.push(c);
    }
    drop(elsewhere);
    let mut stuck = stuck.expect("a connection lands on the TiDB to fail");
    stuck.query_drop("BEGIN").await.expect("begin");

    // The operator lists it.
    let text = std::fs::read_to_string(&proxy.config).expect("config");
    let listed = text.replacen(
        "fail-backend-list = []",
        &format!("fail-backend-list = [\"{failed}\"]"),
        1,
    );
    let listed_at = Instant::now();
    std::fs::write(&proxy.config, listed).expect("write config");
    while !in_fail_list(&proxy, failed) {
        assert!(
            listed_at.elapsed() < Duration::from_secs(15),
            "the reload did not reach the router\n{}",
            log(&proxy)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Idle sessions leave it, keeping their state.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, c) in idle.iter_mut().enumerate() {
        loop {
            let (p, me): (u16, i64) = c
                .query_first("SELECT @@port, @me")
                .await
                .expect("an idle session keeps working")
                .expect("row");
            assert_eq!(me, i as i64, "session {i} kept its variable");
            if p == other.port() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "session {i} still on the failed TiDB"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let moved = listed_at.elapsed();
    eprintln!("FIGURE failover: {on_failed} idle sessions left a listed TiDB within {moved:?}");
    // New connections avoid it.
    for _ in 0..5 {
        let mut c = Conn::new(double_opts(proxy.sql)).await.expect("connect");
        assert_eq!(port(&mut c).await, other.port(), "a new connection");
        c.disconnect().await.expect("disconnect");
    }

    // The session in a transaction stays until failover-timeout (3 s)...
    if listed_at.elapsed() < Duration::from_millis(2500) {
        let p = port(&mut stuck).await;
        assert_eq!(p, failed.port(), "in a transaction: not moved, not closed");
    }
    // ... and is closed after it.
    let closed_after = loop {
        let r = stuck.query_drop("SELECT 1").await;
        if r.is_err() {
            break listed_at.elapsed();
        }
        assert!(
            listed_at.elapsed() < Duration::from_secs(20),
            "the stuck session was never closed\n{}",
            log(&proxy)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "FIGURE failover: the session in a transaction was closed {closed_after:?} after the list changed"
    );
    assert!(
        closed_after >= Duration::from_secs(3),
        "closed before failover-timeout: {closed_after:?}"
    );
    assert!(
        log(&proxy).contains("after failover-timeout"),
        "{}",
        log(&proxy)
    );
    for c in idle {
        c.disconnect().await.expect("clean disconnect");
    }
}
