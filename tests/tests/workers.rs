//! Connection worker threads (`runtime/src/workers.rs`) in front of a real
//! MariaDB: sessions move between threads with their sockets and state,
//! and a light load gathers on one thread.

use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, mariadb, opts};

/// Connections per worker, from `GET /api/debug/workers`.
fn per_worker(p: &ProxyProcess) -> Vec<u64> {
    let (code, body) = p.get("/api/debug/workers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| w["connections"].as_u64().expect("connections"))
        .collect()
}

/// Sessions start on both of two threads (placed in turn); a light load
/// makes the proxy gather them on the first, each moving at the end of a
/// command with its sockets and session. Nothing a client sees changes: no
/// error, the same connection id, user variables and prepared statements
/// intact, results right throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_between_worker_threads_with_their_state() {
    let db = mariadb();
    let p = ProxyProcess::start_wrapped(
        &[
            "env",
            "TIPROXY_WORKER_THREADS=2",
            "TIPROXY_WORKER_PLACEMENT=round-robin",
        ],
        &[db.addr()],
        "",
    );
    const N: i64 = 8;
    let mut conns = Vec::new();
    for i in 0..N {
        let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
        c.query_drop(format!("SET @v = {i}")).await.expect("set");
        let stmt = c.prep("SELECT ? + @v").await.expect("prepare");
        let id: u64 = c
            .query_first("SELECT CONNECTION_ID()")
            .await
            .expect("id")
            .expect("row");
        conns.push((c, stmt, id, i));
    }
    let before = per_worker(&p);
    assert_eq!(before.len(), 2, "two workers: {before:?}");
    assert!(
        before.iter().all(|&n| n > 0),
        "round-robin placement puts sessions on both threads: {before:?}"
    );

    // A light load: every session runs a command every 20 ms. The monitor
    // sees both threads nearly idle and asks the second one's sessions to
    // move to the first; each moves when its next command ends.
    let start = Instant::now();
    let mut rounds = 0u64;
    let gathered = loop {
        for (c, stmt, id, i) in conns.iter_mut() {
            let sum: i64 = c
                .exec_first(&*stmt, (100i64,))
                .await
                .expect("execute")
                .expect("row");
            assert_eq!(sum, 100 + *i, "prepared statement and @v intact");
            let now_id: u64 = c
                .query_first("SELECT CONNECTION_ID()")
                .await
                .expect("id")
                .expect("row");
            assert_eq!(now_id, *id, "the same backend connection");
        }
        rounds += 1;
        let w = per_worker(&p);
        if w[1] == 0 && w[0] == N as u64 {
            break w;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sessions did not gather on one worker within 20 s: {w:?} after {rounds} rounds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "gathered {N} sessions on one worker ({before:?} -> {gathered:?}) in {:.1} s, {rounds} rounds",
        start.elapsed().as_secs_f64()
    );
    // The moved sessions keep working, and so does a new one.
    for (c, stmt, _, i) in conns.iter_mut() {
        let s: i64 = c
            .exec_first(&*stmt, (1i64,))
            .await
            .expect("execute")
            .expect("row");
        assert_eq!(s, 1 + *i);
    }
    let mut fresh = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    let v: Option<i64> = fresh.query_first("SELECT 41 + 1").await.expect("query");
    assert_eq!(v, Some(42));
    fresh.disconnect().await.expect("disconnect");
    for (c, _, _, _) in conns {
        c.disconnect().await.expect("disconnect");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        per_worker(&p).iter().sum::<u64>(),
        0,
        "every connection counted off its worker when it ended"
    );
    let log = p.log.lock().expect("log").clone();
    assert!(!log.contains("cannot move"), "{log}");
}
