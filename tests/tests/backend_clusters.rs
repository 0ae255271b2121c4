//! `proxy.backend-clusters` against two real etcds, each the PD of its own
//! TiDB double cluster: sessions reach both clusters (TiProxy's rule with no
//! `balance.routing-rule`: every TiDB of every cluster is one group), a
//! cluster added by hot reload is used, a removed one gets no new session
//! and its TiDBs leave the backend list; bad entries are refused with
//! TiProxy's errors.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use mysql_async::prelude::*;
use tiproxy_tests::{Etcd, ProxyProcess, TidbDouble, double_opts};

/// A TiDB double cluster of `n` instances registered in `etcd`.
fn cluster(etcd: &Etcd, n: usize) -> TidbDouble {
    TidbDouble::start(n, 0, &["--pd", &etcd.endpoint(), "--pd-ttl", "5"])
}

fn clusters_toml(list: &[(&str, &Etcd)]) -> String {
    list.iter()
        .map(|(name, e)| {
            format!(
                "[[proxy.backend-clusters]]\nname = \"{name}\"\npd-addrs = \"{}\"\n",
                e.endpoint()
            )
        })
        .collect()
}

fn config(sql: SocketAddr, api: SocketAddr, list: &[(&str, &Etcd)]) -> String {
    format!(
        "[proxy]\naddr = \"{sql}\"\n{}\n[api]\naddr = \"{api}\"\n[log]\nlevel = \"info\"\n",
        clusters_toml(list)
    )
}

fn log(p: &ProxyProcess) -> String {
    p.log.lock().expect("log").clone()
}

fn wait_for(p: &ProxyProcess, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            log(p)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster `/api/backends` names for the TiDB at `addr`.
fn cluster_of(p: &ProxyProcess, addr: &str) -> serde_json::Value {
    let (_, body) = p.get("/api/backends");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("a list")
        .iter()
        .find(|b| b["addr"] == addr)
        .map(|b| b["cluster"].clone())
        .unwrap_or_default()
}

/// The SQL addresses `/api/backends` lists as taking new sessions.
fn accepting(p: &ProxyProcess) -> Vec<String> {
    let (status, body) = p.get("/api/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("a list")
        .iter()
        .filter(|b| b["accepts_connections"] == true)
        .map(|b| b["addr"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The SQL addresses `/api/backends` lists as in use (not removed).
fn listed(p: &ProxyProcess) -> Vec<String> {
    let (status, body) = p.get("/api/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("a list")
        .iter()
        .filter(|b| b["state"] != "removed")
        .map(|b| b["addr"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn connections(c: &TidbDouble) -> u64 {
    c.instances().iter().map(|i| i.connections).sum()
}

async fn sessions(p: &ProxyProcess, n: usize) -> Vec<mysql_async::Conn> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = mysql_async::Conn::new(double_opts(p.sql))
            .await
            .expect("session through the proxy");
        let v: Option<i64> = c.query_first("SELECT 1").await.expect("query");
        assert_eq!(v, Some(1));
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_reach_both_clusters_and_a_removed_cluster_is_drained() {
    let (pd_a, pd_b) = (Etcd::start(), Etcd::start());
    let (a, b) = (cluster(&pd_a, 2), cluster(&pd_b, 2));
    let addrs = |c: &TidbDouble| -> Vec<String> {
        c.instances().iter().map(|i| i.sql.to_string()).collect()
    };
    let (a_addrs, b_addrs) = (addrs(&a), addrs(&b));
    let p =
        ProxyProcess::start_with_config(|sql, api| config(sql, api, &[("a", &pd_a), ("b", &pd_b)]));
    wait_for(&p, "all four TiDBs known", Duration::from_secs(10), || {
        let l = accepting(&p);
        a_addrs.iter().chain(&b_addrs).all(|x| l.contains(x))
    });

    assert_eq!(cluster_of(&p, &a_addrs[0]), "a");
    assert_eq!(cluster_of(&p, &b_addrs[1]), "b");

    // One group across clusters: new sessions go to TiDBs of both.
    let held = sessions(&p, 8).await;
    let (on_a, on_b) = (connections(&a), connections(&b));
    assert!(on_a >= 1 && on_b >= 1, "a {on_a}, b {on_b}");

    // The proxy registered itself in each cluster's PD.
    for e in [&pd_a, &pd_b] {
        let mut c = Client::connect([e.endpoint()], None).await.expect("etcd");
        let keys = c
            .get("/topology/tiproxy/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("get");
        assert!(
            keys.kvs()
                .iter()
                .any(|kv| String::from_utf8_lossy(kv.key()).contains(&p.sql.to_string())),
            "not registered in {}",
            e.endpoint()
        );
    }
    for c in held {
        c.disconnect().await.expect("quit");
    }
    wait_for(&p, "sessions closed", Duration::from_secs(5), || {
        connections(&a) + connections(&b) == 0
    });

    // Cluster b removed by hot reload: its TiDBs leave, new sessions all go to a.
    std::fs::write(&p.config, config(p.sql, p.api, &[("a", &pd_a)])).expect("write");
    wait_for(&p, "b's TiDBs gone", Duration::from_secs(15), || {
        let l = listed(&p);
        b_addrs.iter().all(|x| !l.contains(x)) && a_addrs.iter().all(|x| l.contains(x))
    });
    assert!(log(&p).contains("removed backend cluster"), "{}", log(&p));
    let held = sessions(&p, 6).await;
    assert_eq!(connections(&b), 0, "a session went to a removed cluster");
    assert!(connections(&a) >= 6, "a {}", connections(&a));
    for c in held {
        c.disconnect().await.expect("quit");
    }

    // Added back by hot reload: its TiDBs are used again.
    std::fs::write(
        &p.config,
        config(p.sql, p.api, &[("a", &pd_a), ("b", &pd_b)]),
    )
    .expect("write");
    wait_for(&p, "b's TiDBs back", Duration::from_secs(15), || {
        let l = accepting(&p);
        b_addrs.iter().all(|x| l.contains(x))
    });
    assert!(log(&p).contains("added backend cluster"), "{}", log(&p));
    let _held = sessions(&p, 8).await;
    assert!(connections(&b) >= 1, "b {}", connections(&b));
}

#[test]
fn bad_entries_are_refused_with_tiproxys_errors() {
    let cases = [
        (
            "[[proxy.backend-clusters]]\npd-addrs = \"127.0.0.1:2379\"\n",
            "proxy.backend-clusters[0].name: is empty",
        ),
        (
            "[[proxy.backend-clusters]]\nname = \"x\"\npd-addrs = \"127.0.0.1:2379\"\n\
             [[proxy.backend-clusters]]\nname = \"x\"\npd-addrs = \"127.0.0.1:2380\"\n",
            "duplicate name \"x\"",
        ),
        (
            "[[proxy.backend-clusters]]\nname = \"x\"\npd-addrs = \"127.0.0.1\"\n",
            "proxy.backend-clusters[x].pd-addrs",
        ),
        (
            "[[proxy.backend-clusters]]\nname = \"x\"\npd-addrs = \"127.0.0.1:2379\"\nns-servers = [\"10.0.0.1:abc\"]\n",
            "port is invalid",
        ),
    ];
    for (clusters, want) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            format!("[proxy]\naddr = \"127.0.0.1:0\"\n{clusters}"),
        )
        .expect("write");
        let out = std::process::Command::new(tiproxy_tests::binary("tiproxy"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run tiproxy");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{clusters} started");
        assert!(err.contains(want), "{clusters}\nwant {want:?} in:\n{err}");
    }
}
