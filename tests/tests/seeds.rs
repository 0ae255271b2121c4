//! The seed experiments (../shared/seeds): a cluster in PD, two clients
//! through the proxy, a TiDB added (connections spread without an error),
//! one removed (its sessions move back), and a transaction held open during
//! the scale-out that finishes before its session moves. Real processes: etcd,
//! TiDB doubles registering themselves in PD, the tiproxy binary.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder};
use tiproxy_tests::{Etcd, ProxyProcess, TidbDouble};

/// Schema set-up as root, directly on a TiDB (not counted as an app session).
async fn create_schema(addr: SocketAddr) {
    let o = OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some("root"))
        .prefer_socket(false);
    let mut c = Conn::new(o).await.expect("direct as root");
    c.query_drop("CREATE DATABASE IF NOT EXISTS seed")
        .await
        .expect("db");
    c.query_drop("CREATE TABLE IF NOT EXISTS seed.t (id INT PRIMARY KEY, v INT)")
        .await
        .expect("table");
    c.disconnect().await.expect("disconnect");
}

fn opts(addr: SocketAddr) -> Opts {
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some("app"))
        .pass(Some("app-Pa55word"))
        .db_name(Some("seed"))
        .prefer_socket(false)
        .into()
}

async fn port(c: &mut Conn) -> u16 {
    c.query_first("SELECT @@port")
        .await
        .expect("@@port")
        .expect("a row")
}

/// Sessions of user `app` that `SHOW PROCESSLIST` lists, seen from `c`.
async fn app_sessions(c: &mut Conn) -> usize {
    let users: Vec<String> = c
        .query_map("SHOW PROCESSLIST", |row: mysql_async::Row| {
            row.get::<String, _>("User").unwrap_or_default()
        })
        .await
        .expect("processlist");
    users.iter().filter(|u| *u == "app").count()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

fn start(etcd: &Etcd, instances: usize) -> (TidbDouble, ProxyProcess) {
    let cluster = TidbDouble::start(instances, 2, &["--pd", &etcd.endpoint(), "--pd-ttl", "5"]);
    let proxy =
        ProxyProcess::start_with_backends(&[], &format!("pd-addrs = \"{}\"", etcd.endpoint()));
    (cluster, proxy)
}

async fn wait_healthy(proxy: &ProxyProcess) {
    let start = Instant::now();
    loop {
        let (code, body) = proxy.get("/api/debug/health");
        if code == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "proxy not healthy within 30 s: {code} {body}\nits log:\n{}",
            proxy.log.lock().expect("log")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_out_spreads_scale_in_moves_back_and_a_transaction_finishes_first() {
    let etcd = Etcd::start();
    let (cluster, proxy) = start(&etcd, 1);
    wait_healthy(&proxy).await;
    let a = cluster.instances()[0].clone();
    create_schema(a.sql).await;

    // Two clients through the proxy: one TiDB, so they see each other.
    let mut c1 = Conn::new(opts(proxy.sql)).await.expect("client 1");
    let mut c2 = Conn::new(opts(proxy.sql)).await.expect("client 2");
    assert_eq!(port(&mut c1).await, a.sql.port());
    assert_eq!(port(&mut c2).await, a.sql.port());
    assert_eq!(
        app_sessions(&mut c1).await,
        2,
        "both sessions on the one TiDB"
    );

    // Client 2 holds a transaction open across the scale-out.
    c2.query_drop("BEGIN").await.expect("begin");
    c2.query_drop("INSERT INTO t VALUES (1, 1)")
        .await
        .expect("insert");

    // Scale out: the new TiDB registers itself in PD.
    let b = cluster.add();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The transaction never leaves its TiDB.
    assert_eq!(
        port(&mut c2).await,
        a.sql.port(),
        "a session in a transaction does not move"
    );
    c2.query_drop("INSERT INTO t VALUES (2, 2)")
        .await
        .expect("insert in the open transaction");
    c2.query_drop("COMMIT").await.expect("commit");

    // The two sessions end up on different TiDBs, without an error.
    let t = Instant::now();
    loop {
        if port(&mut c1).await != port(&mut c2).await {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sessions never spread over both TiDBs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spread = t.elapsed();
    eprintln!("FIGURE commit -> sessions spread: {spread:?}");
    assert_eq!(
        app_sessions(&mut c1).await,
        1,
        "each client now sees only itself"
    );
    assert_eq!(app_sessions(&mut c2).await, 1);
    let n: Option<i64> = c1
        .query_first("SELECT COUNT(*) FROM t")
        .await
        .expect("count");
    assert_eq!(n, Some(2), "the transaction's rows, exactly once");

    // Scale in: the new TiDB shuts down gracefully; its session moves back.
    cluster.shutdown(b.index);
    let t = Instant::now();
    loop {
        if port(&mut c1).await == a.sql.port() && port(&mut c2).await == a.sql.port() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sessions never moved back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app_sessions(&mut c1).await, 2);
    let log = proxy.log.lock().expect("log").clone();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalancing_evens_out_sessions_after_scale_out() {
    let etcd = Etcd::start();
    let (cluster, proxy) = start(&etcd, 1);
    wait_healthy(&proxy).await;
    let a = cluster.instances()[0].clone();
    create_schema(a.sql).await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(Conn::new(opts(proxy.sql)).await.expect("client"));
    }
    let registered = Instant::now();
    cluster.add();
    cluster.add();
    let took = eventually(
        "sessions spread over three TiDBs",
        Duration::from_secs(20),
        || async {
            let counts: Vec<u64> = cluster.instances().iter().map(|i| i.connections).collect();
            let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
            min > 0 && (max as f64) <= 1.2 * (min as f64)
        },
    )
    .await;
    let counts: Vec<u64> = cluster.instances().iter().map(|i| i.connections).collect();
    let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
    eprintln!(
        "FIGURE spread after rebalancing: {counts:?}, max/min = {:.2}, in {took:?} ({:?} since registration)",
        max as f64 / min as f64,
        registered.elapsed()
    );
    // Every session still works, and no session ping-pongs afterwards.
    for c in &mut clients {
        let v: Option<i64> = c.query_first("SELECT 1").await.expect("query after moves");
        assert_eq!(v, Some(1));
    }
    let before = proxy.get("/api/metrics").1;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = proxy.get("/api/metrics").1;
    let moves = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("tiproxy_balance_migrate_total") && l.contains("succeed"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(moves(&before), moves(&after), "no moves once balanced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_tidb_gives_a_clear_error_and_gets_no_new_connections() {
    let etcd = Etcd::start();
    let (cluster, proxy) = start(&etcd, 2);
    wait_healthy(&proxy).await;
    let start = Instant::now();
    while proxy
        .get("/api/metrics")
        .1
        .matches("tiproxy_backend_b_status{")
        .count()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "both TiDBs not known within 10 s; backends {}\nTiDBs {:?}\nproxy log:\n{}",
            proxy.get("/api/backends").1,
            cluster.instances(),
            proxy.log.lock().expect("log")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    create_schema(cluster.instances()[0].sql).await;
    // prefer-idle routes at random between TiDBs the balancer would not
    // move away from (1 session against 0 is not worth a move), so open
    // sessions until both TiDBs hold one; the rest are dropped.
    let mut a = Conn::new(opts(proxy.sql)).await.expect("a");
    let pa = port(&mut a).await;
    let mut b = None;
    for _ in 0..30 {
        let mut c = Conn::new(opts(proxy.sql)).await.expect("b");
        if port(&mut c).await != pa {
            b = Some(c);
            break;
        }
    }
    let mut b = b.expect("30 connections all reached one TiDB: the other is not routed to");
    let victim = cluster
        .instances()
        .into_iter()
        .find(|i| i.sql.port() == pa)
        .expect("victim");
    cluster.kill(victim.index);
    // Its session gets a clean error, not a hang.
    let r = tokio::time::timeout(Duration::from_secs(10), a.query_drop("SELECT 1")).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "the killed TiDB's session gets an error: {r:?}"
    );
    // New connections never reach it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..6 {
        let mut c = Conn::new(opts(proxy.sql)).await.expect("new connection");
        assert_ne!(
            port(&mut c).await,
            pa,
            "a new connection reached the killed TiDB"
        );
    }
    b.query_drop("SELECT 1")
        .await
        .expect("the other TiDB's session is unaffected");
}
