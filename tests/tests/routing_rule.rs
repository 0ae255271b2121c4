//! `[balance] routing-rule` against a real etcd: TiDB doubles register in
//! PD with TiDB's `labels` (`cidr`), the proxy groups them, and sessions
//! stay inside the group of their client's address, when they are opened,
//! when a TiDB is added to a group (the rebalance stays inside it) and when
//! one drains (its sessions move to its group's other TiDB, never to the
//! emptier group). A client whose address no TiDB serves gets the proxy's
//! MySQL error naming it.
//!
//! Clients come from 127.0.0.1 (directly) and from 127.0.0.2 / 127.0.0.3
//! (through a relay whose socket to the proxy is bound to that loopback
//! address: the MySQL client cannot choose its source address). Behind a
//! load balancer sending PROXY headers, `proxy_cidr` routes by the
//! balancer's address and `client_cidr` by the client's the header names.

use std::net::SocketAddr;
use std::time::Duration;

use mysql_async::prelude::*;
use tiproxy_core::proxy_protocol::ProxyHeader;
use tiproxy_tests::{
    Etcd, ProxyProcess, TidbDouble, double_opts, eventually, http_request_with_body,
};
use tokio::net::{TcpListener, TcpSocket};

/// A relay on 127.0.0.1 whose connections reach `to` from `source`.
async fn relay_from(source: &str, to: SocketAddr) -> SocketAddr {
    relay(source, to, None).await
}

/// A load balancer on 127.0.0.1 whose connections reach `to` from
/// `source`, each first sending a PROXY v2 header naming `named`.
async fn relay(source: &str, to: SocketAddr, named: Option<SocketAddr>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = l.local_addr().expect("addr");
    let source: SocketAddr = format!("{source}:0").parse().expect("source");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            tokio::spawn(async move {
                let s = TcpSocket::new_v4().expect("socket");
                s.bind(source).expect("bind the source address");
                let Ok(mut proxy) = s.connect(to).await else {
                    return;
                };
                if let Some(source) = named {
                    use tokio::io::AsyncWriteExt;
                    let mut h = bytes::BytesMut::new();
                    ProxyHeader::Proxy {
                        source,
                        destination: to,
                    }
                    .write(&mut h);
                    if proxy.write_all(&h).await.is_err() {
                        return;
                    }
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut proxy).await;
            });
        }
    });
    addr
}

/// Each instance's connections as the TiDB double counts them.
fn per_instance(d: &TidbDouble) -> Vec<u64> {
    d.instances().iter().map(|i| i.connections).collect()
}

/// Starts one more instance of `d` with the label `cidr`.
fn add_with_cidr(d: &TidbDouble, cidr: &str) {
    let body = serde_json::json!({ "labels": { "cidr": cidr } }).to_string();
    let (status, reply) = http_request_with_body(d.control, "POST", "/instances", &body);
    assert!((200..300).contains(&status), "{status} {reply}");
}

async fn open(addr: SocketAddr, n: usize) -> Vec<mysql_async::Conn> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = mysql_async::Conn::new(double_opts(addr))
            .await
            .expect("a session through the proxy");
        out.push(c);
    }
    out
}

async fn all_answer(conns: &mut [mysql_async::Conn]) {
    for c in conns {
        let v: Option<i64> = c.query_first("SELECT 1").await.expect("the session lives");
        assert_eq!(v, Some(1));
    }
}

/// The addresses `/api/backends` lists as taking sessions.
fn accepting(p: &ProxyProcess) -> Vec<String> {
    let (_, body) = p.get("/api/backends");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v.as_array()
        .map(|l| {
            l.iter()
                .filter(|b| b["accepts_connections"] == true)
                .filter_map(|b| b["addr"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cidr_keeps_sessions_in_their_group_through_scale_out_and_drain() {
    let etcd = Etcd::start();
    // Instances 0 and 1 serve 127.0.0.1; 2 (and later 3) serve 127.0.0.2.
    // One double: the instances share a store and a signing key, so a move
    // across groups would succeed if the proxy asked for one.
    let tidb = TidbDouble::start(
        2,
        5,
        &[
            "--pd",
            &etcd.endpoint(),
            "--pd-ttl",
            "5",
            "--labels",
            "cidr=127.0.0.1/32",
        ],
    );
    add_with_cidr(&tidb, "127.0.0.2/32");
    let p = ProxyProcess::start_with_config(|sql, api| {
        format!(
            "[proxy]\naddr = \"{sql}\"\npd-addrs = \"{}\"\n[api]\naddr = \"{api}\"\n\
             [balance]\nrouting-rule = \"client_cidr\"\n[log]\nlevel = \"info\"\n",
            etcd.endpoint()
        )
    });
    let log = || p.log.lock().expect("log").clone();
    eventually("three TiDBs known", Duration::from_secs(15), || {
        accepting(&p).len() == 3
    })
    .await;
    // `/api/backends` names each TiDB's group.
    let (_, body) = p.get("/api/backends");
    let listed: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut groups: Vec<String> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["group"].to_string())
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        [
            r#"["127.0.0.1/32"]"#,
            r#"["127.0.0.1/32"]"#,
            r#"["127.0.0.2/32"]"#
        ],
        "{body}"
    );

    // Opened: 127.0.0.1's sessions on 0 and 1, 127.0.0.2's on 2.
    let two = relay_from("127.0.0.2", p.sql).await;
    let mut a = open(p.sql, 6).await;
    let mut b = open(two, 4).await;
    eventually("sessions in their groups", Duration::from_secs(5), || {
        let n = per_instance(&tidb);
        n[0] + n[1] == 6 && n[2] == 4
    })
    .await;

    // No TiDB serves 127.0.0.3: the proxy's error, naming the address.
    let three = relay_from("127.0.0.3", p.sql).await;
    match mysql_async::Conn::new(double_opts(three)).await {
        Ok(_) => panic!("a client no group serves got a session"),
        Err(mysql_async::Error::Server(e)) => {
            assert_eq!(e.code, 1429, "{e:?}");
            assert!(
                e.message
                    .contains("no TiDB serves client address 127.0.0.3"),
                "{e:?}"
            );
        }
        Err(e) => panic!("not a MySQL error: {e}"),
    }

    // Scale-out of 127.0.0.2's group: its sessions spread onto the new
    // TiDB; 127.0.0.1's, though 3 a TiDB against 0, stay where they are.
    add_with_cidr(&tidb, "127.0.0.2/32");
    eventually(
        "the new TiDB takes half its group",
        Duration::from_secs(20),
        || {
            let n = per_instance(&tidb);
            n.len() == 4 && n[2] == 2 && n[3] == 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = per_instance(&tidb);
    assert_eq!((n[0] + n[1], n[2] + n[3]), (6, 4), "{n:?}\n{}", log());

    // Drain of instance 0: its sessions go to 1, never to the other
    // group's emptier TiDBs.
    tidb.shutdown(0);
    eventually("instance 0 emptied into 1", Duration::from_secs(20), || {
        let n = per_instance(&tidb);
        n[0] == 0 && n[1] == 6
    })
    .await;
    let n = per_instance(&tidb);
    assert_eq!(n[2] + n[3], 4, "{n:?}\n{}", log());
    all_answer(&mut a).await;
    all_answer(&mut b).await;
    let n = per_instance(&tidb);
    assert_eq!((n[1], n[2] + n[3]), (6, 4), "{n:?}\n{}", log());
    assert!(log().contains("routing group formed"), "{}", log());
}

#[tokio::test(flavor = "multi_thread")]
async fn port_rule_routes_by_listener_port_and_an_unlabelled_port_is_refused() {
    let etcd = Etcd::start();
    // Instance 0 is labelled with a port the proxy does not listen on.
    let tidb = TidbDouble::start(
        1,
        0,
        &[
            "--pd",
            &etcd.endpoint(),
            "--pd-ttl",
            "5",
            "--labels",
            "tiproxy-port=1",
        ],
    );
    // Three listeners (`proxy.addr` as a list): the one ProxyProcess waits
    // on and two below the kernel's ephemeral range, so no other test's
    // free port or connection can take them meanwhile.
    let low = |from: u16| {
        (from..30000)
            .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            .expect("a free port below the ephemeral range")
    };
    let second = low(20000 + (std::process::id() % 5000) as u16);
    let third = low(second + 1);
    let mut base = 0;
    let p = ProxyProcess::start_with_config(|sql, api| {
        base = sql.port();
        format!(
            "[proxy]\naddr = \"{sql},127.0.0.1:{second},127.0.0.1:{third}\"\npd-addrs = \"{}\"\n\
             [api]\naddr = \"{api}\"\n[balance]\nrouting-rule = \"port\"\n[log]\nlevel = \"info\"\n",
            etcd.endpoint()
        )
    });
    // Instance 1 serves listener `base`, 2 serves `second`; `third` has no
    // TiDB.
    for port in [base, second] {
        let body = serde_json::json!({ "labels": { "tiproxy-port": port.to_string() } });
        let (s, r) = http_request_with_body(tidb.control, "POST", "/instances", &body.to_string());
        assert!((200..300).contains(&s), "{s} {r}");
    }
    eventually("three TiDBs known", Duration::from_secs(15), || {
        accepting(&p).len() == 3
    })
    .await;
    let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().expect("addr") };
    let _first = open(at(base), 3).await;
    let _second = open(at(second), 2).await;
    eventually("sessions by listener port", Duration::from_secs(5), || {
        per_instance(&tidb) == [0, 3, 2]
    })
    .await;
    match mysql_async::Conn::new(double_opts(at(third))).await {
        Ok(_) => panic!("a port no TiDB is labelled with got a session"),
        Err(mysql_async::Error::Server(e)) => {
            assert!(
                e.message
                    .contains(&format!("no TiDB serves listener port {third}")),
                "{e:?}"
            );
        }
        Err(e) => panic!("not a MySQL error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_load_balancer_proxy_cidr_routes_by_its_address_client_cidr_by_the_header() {
    // The proxy sends TiDB a PROXY header too (as TiProxy does).
    let tidb = TidbDouble::start(1, 0, &["--proxy-protocol"]);
    let i = &tidb.instances()[0];
    // The TiDB serves the balancer's network, not the client's.
    let entry = format!(
        "{{ addr = \"{}\", status-addr = \"{}\", labels = {{ cidr = \"127.0.0.0/8\" }} }}",
        i.sql, i.status
    );
    let client: SocketAddr = "10.9.9.9:5000".parse().expect("addr");
    for (rule, served) in [("proxy_cidr", true), ("client_cidr", false)] {
        let p = ProxyProcess::start_with_backends(
            std::slice::from_ref(&entry),
            &format!("proxy-protocol = \"v2\"\n[balance]\nrouting-rule = \"{rule}\"\n"),
        );
        let lb = relay("127.0.0.1", p.sql, Some(client)).await;
        match mysql_async::Conn::new(double_opts(lb)).await {
            Ok(mut c) => {
                assert!(served, "{rule}: the client 10.9.9.9 got a session");
                let v: Option<i64> = c.query_first("SELECT 1").await.expect("query");
                assert_eq!(v, Some(1));
            }
            Err(mysql_async::Error::Server(e)) => {
                assert!(!served, "{rule}: refused: {e:?}");
                assert!(
                    e.message.contains("no TiDB serves client address 10.9.9.9"),
                    "{e:?}"
                );
            }
            Err(e) => panic!("{rule}: not a MySQL error: {e}"),
        }
    }
}
