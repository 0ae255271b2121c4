//! PROXY protocol v2 as TiProxy has it: with `proxy.proxy-protocol = "v2"`
//! a header in front of a client's first bytes is optional (a load
//! balancer's connections carry the original client address, direct
//! clients still connect), and `api.proxy-protocol = "v2"` does the same on
//! the HTTP API. The TiDB double accepts the header the proxy writes to it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_core::proxy_protocol::ProxyHeader;
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts};

fn header(source: &str, destination: SocketAddr) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    ProxyHeader::Proxy {
        source: source.parse().expect("addr"),
        destination,
    }
    .write(&mut b);
    b.to_vec()
}

/// A load balancer in front of the proxy: every connection gets a PROXY
/// header naming `source`, then bytes are relayed both ways.
async fn load_balancer(proxy: SocketAddr, source: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let Ok(mut up) = tokio::net::TcpStream::connect(proxy).await else {
                    return;
                };
                if up.write_all(&header(source, proxy)).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    addr
}

/// The client addresses `/api/sessions` lists.
fn session_clients(p: &ProxyProcess) -> Vec<String> {
    let (status, body) = p.get("/api/sessions");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s["client"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_port_takes_clients_with_and_without_a_proxy_header() {
    let tidb = TidbDouble::start(1, 0, &["--proxy-protocol"]);
    let backend = TidbDouble::backend_entry(&tidb.instances()[0]);
    let p = ProxyProcess::start_with_backends(&[backend], "proxy-protocol = \"v2\"");
    // A direct client: no header, served as before the option was set.
    let mut direct = Conn::new(double_opts(p.sql))
        .await
        .unwrap_or_else(|e| panic!("a client without a header: {e}\n{}", p.log.lock().unwrap()));
    let one: Option<i64> = direct.query_first("SELECT 1").await.expect("query");
    assert_eq!(one, Some(1));
    // Through a load balancer: the header's source is the session's client.
    let lb = load_balancer(p.sql, "10.9.8.7:4321").await;
    let mut behind = Conn::new(double_opts(lb))
        .await
        .unwrap_or_else(|e| panic!("a client behind a header: {e}\n{}", p.log.lock().unwrap()));
    let two: Option<i64> = behind.query_first("SELECT 2").await.expect("query");
    assert_eq!(two, Some(2));
    let clients = session_clients(&p);
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert!(
        clients.contains(&"10.9.8.7:4321".to_string()),
        "{clients:?}"
    );
    assert!(
        clients.iter().any(|c| c.starts_with("127.0.0.1:")),
        "{clients:?}"
    );
    // A header the proxy cannot use (version 3) closes the connection.
    let mut bad = TcpStream::connect(p.sql).expect("connect");
    bad.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut h = header("10.1.1.1:1", p.sql);
    h[12] = 0x31;
    bad.write_all(&h).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    loop {
        match bad.read(&mut buf) {
            Ok(0) | Err(_) => break,
            // The greeting went out before the header was read.
            Ok(_) => assert!(Instant::now() < deadline, "still open"),
        }
    }
    assert!(Instant::now() < deadline, "not closed within 10 s");
    direct.disconnect().await.expect("quit");
    behind.disconnect().await.expect("quit");
}

/// A raw `GET path` on `api`, after `prefix`: the status line's code, if
/// the answer was HTTP.
fn get_after(api: SocketAddr, prefix: &[u8], path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(api).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(prefix).expect("write");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[test]
fn the_api_port_takes_requests_with_and_without_a_proxy_header() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let backend = TidbDouble::backend_entry(&tidb.instances()[0]);
    let config = |api_proxy_protocol: &'static str| {
        let backend = backend.clone();
        move |sql: SocketAddr, api: SocketAddr| {
            format!(
                "[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [{backend}]\n\
                 [api]\naddr = \"{api}\"\nproxy-protocol = \"{api_proxy_protocol}\"\n"
            )
        }
    };
    let p = ProxyProcess::start_with_config(config("v2"));
    assert_eq!(get_after(p.api, b"", "/api/admin/config"), Some(200));
    let h = header("10.9.8.7:4321", p.api);
    assert_eq!(get_after(p.api, &h, "/api/admin/config"), Some(200));
    // Without the option the header is garbage to HTTP.
    let plain = ProxyProcess::start_with_config(config(""));
    assert_eq!(get_after(plain.api, b"", "/api/admin/config"), Some(200));
    assert_ne!(get_after(plain.api, &h, "/api/admin/config"), Some(200));
}

/// `proxy.proxy-protocol` is reloadable in TiProxy: switched on in the file,
/// the next connection's header is read (before, the header bytes are not
/// a handshake and the client is refused).
#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_applies_on_hot_reload() {
    let tidb = TidbDouble::start(1, 0, &["--proxy-protocol"]);
    let backend = TidbDouble::backend_entry(&tidb.instances()[0]);
    let p = ProxyProcess::start_with_backends(&[backend], "");
    let lb = load_balancer(p.sql, "10.9.8.6:4321").await;
    assert!(
        tokio::time::timeout(Duration::from_secs(10), Conn::new(double_opts(lb)))
            .await
            .map_or(true, |r| r.is_err()),
        "a header was read with proxy-protocol off"
    );
    let text = std::fs::read_to_string(&p.config).expect("config");
    std::fs::write(
        &p.config,
        text.replacen("[proxy]\n", "[proxy]\nproxy-protocol = \"v2\"\n", 1),
    )
    .expect("write config");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !p.log.lock().unwrap().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "{}", p.log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut behind = Conn::new(double_opts(lb))
        .await
        .unwrap_or_else(|e| panic!("after the reload: {e}\n{}", p.log.lock().unwrap()));
    let one: Option<i64> = behind.query_first("SELECT 1").await.expect("query");
    assert_eq!(one, Some(1));
    assert!(
        session_clients(&p).iter().any(|c| c == "10.9.8.6:4321"),
        "{:?}",
        session_clients(&p)
    );
}
