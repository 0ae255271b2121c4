//! PD discovery against a real etcd: registration seen through a watch,
//! removal, PD outages, label matching, and the proxy's own registration.
//! MariaDB stands in for TiDB (discovery does not care what answers).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use mysql_async::prelude::*;
use tiproxy_tests::{Etcd, ProxyProcess, mariadb, opts};

async fn query_ok(addr: SocketAddr) -> Result<(), mysql_async::Error> {
    let mut c = mysql_async::Conn::new(opts(addr)).await?;
    let v: Option<i64> = c.query_first("SELECT 1").await?;
    assert_eq!(v, Some(1));
    c.disconnect().await
}

/// Registers `addr` as a TiDB, as TiDB does: info and ttl under a lease.
async fn register(etcd: &Etcd, addr: &str, labels: &str) -> (Client, i64) {
    let mut c = Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let lease = c.lease_grant(30, None).await.expect("lease").id();
    let (ip, _) = addr.rsplit_once(':').unwrap();
    let info = format!(
        r#"{{"version":"8.0.11-TiDB-v8.5.0","git_hash":"x","ip":"{ip}","status_port":0,"deploy_path":"/","start_timestamp":1,"labels":{labels}}}"#
    );
    c.put(
        format!("/topology/tidb/{addr}/info"),
        info,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put info");
    c.put(
        format!("/topology/tidb/{addr}/ttl"),
        "1",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put ttl");
    (c, lease)
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_tidb_is_used_within_a_second_and_removed_one_is_dropped() {
    let db = mariadb();
    let etcd = Etcd::start();
    let p = ProxyProcess::start_with_backends(&[], &format!("pd-addrs = \"{}\"", etcd.endpoint()));
    let p_api = p.api;
    // No TiDB yet: unhealthy, and clients get a clear error.
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 502, "{body}");
    let addr = db.addr().to_string();
    let (mut c, lease) = register(&etcd, &addr, "{}").await;
    let took = wait_until(
        "first connection through a newly registered TiDB",
        Duration::from_secs(5),
        || async { query_ok(p.sql).await.is_ok() },
    )
    .await;
    eprintln!("FIGURE registration->first connection: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (status, body) = tiproxy_tests::http_get(p_api, "/api/debug/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"pd\":\"ok\""), "{body}");

    // The proxy registered itself as TiProxy does.
    let resp = c
        .get("/topology/tiproxy/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let keys: Vec<String> = resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert!(
        keys.iter().any(|k| k.ends_with(&format!("{}/info", p.sql))),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with(&format!("{}/ttl", p.sql))),
        "{keys:?}"
    );

    // The TiDB goes away (its lease is revoked): new connections stop at once.
    c.lease_revoke(lease).await.expect("revoke");
    let gone = wait_until("removal seen", Duration::from_secs(5), || async {
        matches!(mysql_async::Conn::new(opts(p.sql)).await, Err(mysql_async::Error::Server(ref e)) if e.code == 1429)
    })
    .await;
    eprintln!("FIGURE removal->no new connections: {gone:?}");
    assert!(gone < Duration::from_secs(1), "took {gone:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pd_outage_keeps_serving_the_last_known_set() {
    let db = mariadb();
    let mut etcd = Etcd::start();
    let addr = db.addr().to_string();
    let _reg = register(&etcd, &addr, "{}").await;
    let p = ProxyProcess::start_with_backends(&[], &format!("pd-addrs = \"{}\"", etcd.endpoint()));
    wait_until("serving", Duration::from_secs(5), || async {
        query_ok(p.sql).await.is_ok()
    })
    .await;
    let mut held = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    etcd.stop();
    // Keeps working for existing and new clients while PD is gone.
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let v: Option<i64> = held.query_first("SELECT 2").await.expect("held session");
        assert_eq!(v, Some(2));
        query_ok(p.sql).await.expect("new session while PD is down");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    etcd.restart();
    wait_until("PD reconnected", Duration::from_secs(15), || async {
        p.get("/api/debug/health").1.contains("\"pd\":\"ok\"")
    })
    .await;
    query_ok(p.sql).await.expect("after PD is back");
    let warnings = p.log.lock().expect("log").matches("PD unreachable").count();
    assert_eq!(
        warnings,
        1,
        "one warning per outage, not one per retry:\n{}",
        p.log.lock().expect("log")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pd_down_at_start_still_starts_and_says_so() {
    let dead = format!("127.0.0.1:{}", tiproxy_tests::free_port());
    let p = ProxyProcess::start_with_backends(&[], &format!("pd-addrs = \"{dead}\""));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = p.get("/api/debug/health");
        if body.contains("unreachable") {
            assert_eq!(status, 502, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tidb_with_a_mismatched_label_is_never_used() {
    let db = mariadb();
    let etcd = Etcd::start();
    let addr = db.addr().to_string();
    let _reg = register(&etcd, &addr, r#"{"zone":"west"}"#).await;
    let p = ProxyProcess::start_with_backends(
        &[],
        &format!(
            "pd-addrs = \"{}\"\n[balance]\nlabel-name = \"zone\"\n[labels]\nzone = \"east\"",
            etcd.endpoint()
        ),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        match mysql_async::Conn::new(opts(p.sql)).await {
            Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1429),
            other => panic!("a west TiDB served an east proxy: {other:?}"),
        }
    }
}
