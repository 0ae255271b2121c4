//! TiDB's graceful shutdown and a kill, as a proxy in front would see them:
//! `/status` turns 500 at once, connections keep working during
//! graceful-wait-before-shutdown, then idle ones are closed, those in a
//! transaction when it ends, and the rest after the close timeout.

mod common;

use std::time::Duration;

use common::{fleet, http, raw};
use tiproxy_sim::tidb::client::ConnectOptions;
use tiproxy_sim::tidb::{Phase, TidbOptions};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

fn opts(wait_ms: u64, close_ms: u64) -> TidbOptions {
    TidbOptions {
        graceful_wait: Duration::from_millis(wait_ms),
        graceful_close_timeout: Duration::from_millis(close_ms),
        ..TidbOptions::default()
    }
}

#[tokio::test]
async fn status_and_config_report_what_tiproxy_reads() {
    let f = fleet(1, TidbOptions::default()).await;
    let info = f.instances()[0].clone();
    let _c = raw(&info.sql, &ConnectOptions::password("root", "")).await;
    let (code, body) = http("GET", &info.status, "/status", "").await.unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 1);
    assert_eq!(v["version"], "8.0.11-TiDB-v8.5.0");
    assert!(v["git_hash"].is_string());
    let (code, body) = http("GET", &info.status, "/config", "").await.unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["security"]["session-token-signing-cert"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let (code, _) = http("GET", &info.status, "/nope", "").await.unwrap();
    assert_eq!(code, 404);
}

#[tokio::test]
async fn graceful_shutdown_drains_like_tidb() {
    let f = fleet(1, opts(800, 1500)).await;
    let h = f.instance(0).unwrap();
    let info = f.instances()[0].clone();
    let root = ConnectOptions::password("root", "");
    let mut idle = raw(&info.sql, &root).await;
    let mut in_txn = raw(&info.sql, &root).await;
    let mut stuck = raw(&info.sql, &root).await;
    idle.query("CREATE TABLE test.g (id INT PRIMARY KEY)")
        .await
        .unwrap();
    in_txn.query("BEGIN").await.unwrap();
    in_txn.query("INSERT INTO test.g VALUES (1)").await.unwrap();
    stuck.query("BEGIN").await.unwrap();
    stuck.query("INSERT INTO test.g VALUES (2)").await.unwrap();

    let started = Instant::now();
    h.start_graceful_shutdown();
    let (code, body) = http("GET", &info.status, "/status", "").await.unwrap();
    assert_eq!((code, body.as_str()), (500, ""), "unhealthy at once");
    assert_eq!(h.phase(), Phase::Draining);

    // During graceful-wait everything works, new logins included.
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        idle.query("SELECT 1").await.unwrap().scalar().as_deref(),
        Some("1")
    );
    let mut late = raw(&info.sql, &root).await;
    late.ping().await.unwrap();

    // After it: no new logins, idle sessions closed, transactions may finish.
    sleep(Duration::from_millis(800)).await;
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(h.phase(), Phase::Closing);
    assert!(
        TcpStream::connect(&info.sql).await.is_err(),
        "the listener is closed"
    );
    assert!(idle.query("SELECT 1").await.is_err(), "idle session closed");
    assert!(late.ping().await.is_err(), "idle session closed");
    let r = in_txn.query("INSERT INTO test.g VALUES (3)").await.unwrap();
    assert!(r.status.contains(tiproxy_core::StatusFlags::IN_TRANS));
    in_txn.query("COMMIT").await.unwrap();
    assert!(
        in_txn.query("SELECT 1").await.is_err(),
        "closed once its transaction ended"
    );

    // The transaction that never ends is cut at the close timeout.
    h.graceful_shutdown().await;
    assert!(started.elapsed() >= Duration::from_millis(800 + 1500));
    assert_eq!(h.phase(), Phase::Stopped);
    assert!(stuck.query("COMMIT").await.is_err());
    assert!(
        http("GET", &info.status, "/status", "").await.is_err(),
        "status port closed"
    );

    // The committed transaction is in the shared store; the cut one is not.
    let i = f.restart(0).await.unwrap();
    assert_eq!(i.sql, info.sql);
    let mut c = raw(&i.sql, &root).await;
    let r = c.query("SELECT id FROM test.g ORDER BY id").await.unwrap();
    assert_eq!(r.rows, vec![vec![Some("1".into())], vec![Some("3".into())]]);
}

#[tokio::test]
async fn kill_drops_everything_at_once() {
    let f = fleet(2, TidbOptions::default()).await;
    let h = f.instance(0).unwrap();
    let info = f.instances()[0].clone();
    let root = ConnectOptions::password("root", "");
    let mut a = raw(&info.sql, &root).await;
    a.query("BEGIN").await.unwrap();
    let mut sleeping = raw(&info.sql, &root).await;
    let during =
        tiproxy_runtime::task::spawn(async move { sleeping.query("SELECT SLEEP(30)").await });
    sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    h.kill();
    h.stopped().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(during.await.unwrap().is_err(), "a running query is cut");
    assert!(a.query("SELECT 1").await.is_err());
    assert!(TcpStream::connect(&info.sql).await.is_err());
    assert_eq!(f.instances()[0].state, Phase::Killed);
    // The other instance is untouched.
    let mut b = raw(&f.instances()[1].sql, &root).await;
    b.ping().await.unwrap();
}
