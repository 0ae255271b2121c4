//! Session migration with real processes: TiDB doubles and the tiproxy
//! binary. Clients run mysql_async workloads (autocommit statements,
//! explicit transactions, prepared statements, session and user variables,
//! USE db) while one TiDB shuts down gracefully; no client may see an error,
//! every session keeps its state, and a transaction open during the drain
//! commits on the old TiDB before its session moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts, eventually};

/// A session with state worth keeping, and a workload that checks it.
struct Client {
    id: usize,
    conn: Conn,
    stmt: mysql_async::Statement,
}

impl Client {
    async fn connect(proxy: SocketAddr, id: usize) -> Client {
        let mut conn = Conn::new(double_opts(proxy))
            .await
            .expect("connect through tiproxy");
        conn.query_drop(format!("USE db{}", id % 2))
            .await
            .expect("use");
        conn.query_drop(format!("SET @me = 'client-{id}'"))
            .await
            .expect("user var");
        conn.query_drop(format!("SET SESSION sql_select_limit = {}", 1000 + id))
            .await
            .expect("session var");
        let stmt = conn.prep("SELECT ?, @me").await.expect("prepare");
        Client { id, conn, stmt }
    }

    /// One round of work; panics on any error or lost state.
    async fn round(&mut self, n: u64) {
        let id = self.id as i64;
        let c = &mut self.conn;
        c.exec_drop(
            "INSERT INTO t (k, v) VALUES (?, ?)",
            (id * 1_000_000 + n as i64, n as i64),
        )
        .await
        .unwrap_or_else(|e| panic!("client {id} insert {n}: {e}"));
        let (echo, me): (i64, String) = c
            .exec_first(&self.stmt, (n as i64,))
            .await
            .unwrap_or_else(|e| panic!("client {id} prepared statement: {e}"))
            .expect("a row");
        assert_eq!(
            (echo, me.as_str()),
            (n as i64, format!("client-{id}").as_str())
        );
        let db: Option<String> = c
            .query_first("SELECT DATABASE()")
            .await
            .expect("database()");
        assert_eq!(
            db.as_deref(),
            Some(format!("db{}", id % 2).as_str()),
            "client {id} lost its database"
        );
        let limit: Option<u64> = c
            .query_first("SELECT @@sql_select_limit")
            .await
            .expect("sysvar");
        assert_eq!(
            limit,
            Some(1000 + id as u64),
            "client {id} lost its session variable"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_moves_every_session_without_errors() {
    let cluster = TidbDouble::start(2, 3, &[]);
    let tidbs = cluster.instances();
    let backends: Vec<String> = tidbs.iter().map(TidbDouble::backend_entry).collect();
    let proxy = ProxyProcess::start_with_backends(&backends, "");

    // Schema, directly on one TiDB (the store is shared).
    let mut admin = Conn::new(double_opts(tidbs[1].sql)).await.expect("direct");
    for db in ["db0", "db1"] {
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

    let mut clients = Vec::new();
    for id in 0..6 {
        clients.push(Client::connect(proxy.sql, id).await);
    }
    eventually(
        "sessions spread over both TiDBs",
        Duration::from_secs(5),
        || cluster.instances().iter().all(|i| i.connections >= 2),
    )
    .await;

    // A transaction open across the drain, on whichever TiDB it landed.
    let mut txn = Conn::new(double_opts(proxy.sql)).await.expect("txn client");
    txn.query_drop("USE db0").await.expect("use");
    txn.query_drop("BEGIN").await.expect("begin");
    txn.query_drop("INSERT INTO t (k, v) VALUES (-1, 1)")
        .await
        .expect("insert in txn");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for mut c in clients {
        let stop = stop.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.round(n).await;
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (c, n)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Drain the TiDB that has the most sessions.
    let victim = cluster
        .instances()
        .into_iter()
        .max_by_key(|i| i.connections)
        .expect("instance");
    let drained_at = Instant::now();
    cluster.shutdown(victim.index);
    // The transaction keeps going on the draining TiDB and commits there.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    txn.query_drop("INSERT INTO t (k, v) VALUES (-2, 2)")
        .await
        .expect("insert in txn during drain");
    txn.query_drop("COMMIT").await.expect("commit during drain");

    let moved = eventually(
        "every session off the draining TiDB",
        Duration::from_secs(20),
        || {
            cluster
                .instances()
                .iter()
                .find(|i| i.index == victim.index)
                .is_some_and(|i| i.connections == 0)
        },
    )
    .await;
    eprintln!(
        "FIGURE drain start -> last session moved: {moved:?} (victim had {})",
        victim.connections
    );
    let _ = drained_at;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    let mut clients = Vec::new();
    for w in workers {
        let (c, n) = w
            .await
            .expect("a client saw an error (see its panic above)");
        rounds += n;
        clients.push(c);
    }
    assert!(rounds > 20, "workload ran {rounds} rounds");

    // State after the move, and where the sessions are now.
    let remaining = cluster.instances();
    let survivor = remaining
        .iter()
        .find(|i| i.index != victim.index)
        .expect("survivor");
    for c in &mut clients {
        c.round(999_999).await;
        let port: Option<u16> = c.conn.query_first("SELECT @@port").await.expect("@@port");
        assert_eq!(
            port,
            Some(survivor.sql.port()),
            "client {} is on the surviving TiDB",
            c.id
        );
        let infos: Vec<String> = c
            .conn
            .query_map("SHOW PROCESSLIST", |row: mysql_async::Row| {
                row.get::<Option<String>, _>("Info")
                    .flatten()
                    .unwrap_or_default()
            })
            .await
            .expect("processlist");
        assert!(
            infos.iter().any(|info| info.contains("SHOW PROCESSLIST")),
            "SHOW PROCESSLIST on the new TiDB lists the session itself: {infos:?}"
        );
    }
    assert!(
        survivor.connections >= 7,
        "all sessions on the surviving TiDB: {remaining:?}"
    );

    // The transaction committed exactly once, and its session moved too.
    drop(admin);
    let mut direct = Conn::new(double_opts(survivor.sql))
        .await
        .expect("direct to the survivor");
    let n: Option<i64> = direct
        .query_first("SELECT COUNT(*) FROM db0.t WHERE k < 0")
        .await
        .expect("count");
    assert_eq!(n, Some(2));
    txn.query_drop("SELECT 1")
        .await
        .expect("the transaction's session still works after its move");
    let log = proxy.log.lock().expect("log").clone();
    assert!(!log.contains("panicked"), "{log}");
}
