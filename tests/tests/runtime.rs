//! The `tiproxy` binary in front of a real MariaDB: bad input, limits,
//! health, graceful shutdown, configuration errors, version.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_core::packet::{PacketDecoder, write_packet};
use tiproxy_core::response::ErrPacket;
use tiproxy_tests::{ProxyProcess, binary, free_port, http_get, mariadb, opts};

/// A client works: connect, query, disconnect.
async fn works(addr: SocketAddr) {
    let mut c = mysql_async::Conn::new(opts(addr))
        .await
        .expect("connect through tiproxy");
    let v: Option<i64> = c.query_first("SELECT 40 + 2").await.expect("query");
    assert_eq!(v, Some(42));
    c.disconnect().await.expect("disconnect");
}

/// Reads packets until one arrives or the peer closes; returns the first
/// payload (None if closed first).
fn read_packet(s: &mut TcpStream, timeout: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut d = PacketDecoder::default();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(Some(p)) = d.next_payload() {
            return Some(p.data.to_vec());
        }
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => d.extend(&buf[..n]),
            Err(e) => panic!("no packet and no close within {timeout:?}: {e}"),
        }
    }
}

/// Reads until EOF; true when the peer closed within `timeout`.
fn closes_within(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn connect_raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let greeting = read_packet(&mut s, Duration::from_secs(10)).expect("greeting");
    assert_eq!(greeting[0], 10, "protocol v10 greeting");
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_truncated_and_oversize_input_is_refused_and_others_keep_working() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");

    // Garbage after the greeting: a clear MySQL error, then close.
    let mut s = connect_raw(p.sql);
    s.write_all(b"\x05\x00\x00\x01GET /").expect("write");
    let e = read_packet(&mut s, Duration::from_secs(5)).expect("an error packet");
    let e = ErrPacket::parse(&e).expect("ERR");
    // "GE" reads as the capability flags of a pre-4.1 client: 1251; other
    // garbage is a bad handshake: 1043.
    assert!(
        matches!(e.code, 1043 | 1251),
        "{} {}",
        e.code,
        e.message_text()
    );
    assert!(closes_within(&mut s, Duration::from_secs(5)));

    // Plain garbage that is not even a packet header sequence.
    let mut s = connect_raw(p.sql);
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02])
        .expect("write");
    assert!(
        read_packet(&mut s, Duration::from_secs(5)).is_some_and(|e| e[0] == 0xff)
            || closes_within(&mut s, Duration::from_secs(5))
    );

    // A header announcing a huge handshake packet: 1153 at once, no buffering.
    let mut s = connect_raw(p.sql);
    s.write_all(&[0xff, 0xff, 0xff, 0x01]).expect("write");
    let e = ErrPacket::parse(&read_packet(&mut s, Duration::from_secs(5)).expect("error"))
        .expect("ERR");
    assert_eq!(e.code, 1153, "{}", e.message_text());

    // A truncated handshake response, then the client goes away.
    let mut s = connect_raw(p.sql);
    s.write_all(b"\x40\x00\x00\x01\x8d\xa2\x0b\x00")
        .expect("write");
    drop(s);

    // Others keep working the whole time, and nothing was buffered.
    works(p.sql).await;
    assert!(p.rss_kib() < 64 * 1024, "RSS {} KiB", p.rss_kib());
    let log = p.log.lock().expect("log").clone();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_client_is_timed_out_and_dropped() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let started = Instant::now();
    let mut s = connect_raw(p.sql);
    // Stay silent: the handshake timeout (15 s) ends it with an error.
    let e = read_packet(&mut s, Duration::from_secs(30)).expect("an error before close");
    let e = ErrPacket::parse(&e).expect("ERR");
    assert_eq!(e.code, 1043, "{}", e.message_text());
    assert!(
        e.message_text().contains("timed out"),
        "{}",
        e.message_text()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(14) && waited < Duration::from_secs(25),
        "{waited:?}"
    );
    assert!(closes_within(&mut s, Duration::from_secs(5)));
    works(p.sql).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_gives_1040() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "max-connections = 2");
    let a = mysql_async::Conn::new(opts(p.sql)).await.expect("first");
    let b = mysql_async::Conn::new(opts(p.sql)).await.expect("second");
    let err = mysql_async::Conn::new(opts(p.sql))
        .await
        .expect_err("third is refused");
    match err {
        mysql_async::Error::Server(e) => {
            assert_eq!(e.code, 1040);
            assert!(e.message.contains("max-connections"), "{}", e.message);
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    drop(a);
    b.disconnect().await.expect("disconnect");
    // Capacity frees up once a connection ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mysql_async::Conn::new(opts(p.sql)).await {
            Ok(c) => {
                c.disconnect().await.expect("disconnect");
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("capacity never freed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_backends_and_metrics_count_queries() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("config_checksum"), "{body}");
    works(p.sql).await;
    let (status, metrics) = p.get("/api/metrics");
    assert_eq!(status, 200);
    // TiProxy's labels: the backend and the command type.
    assert!(
        metrics.contains(&format!(
            "tiproxy_session_query_total{{backend=\"{}\",cmd_type=\"Query\"}}",
            db.addr()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("tiproxy_server_connections"), "{metrics}");
    let (status, body) = p.get("/api/nope");
    assert_eq!(status, 404, "{body}");

    // A proxy whose only backend is down: 502, and clients get a clear error.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let q = ProxyProcess::start(&[dead], "");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(q.api, "/api/debug/health");
        if status == 502 {
            assert!(body.contains("unhealthy_reason"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never turned 502: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    match mysql_async::Conn::new(opts(q.sql)).await {
        Err(mysql_async::Error::Server(e)) => {
            assert_eq!(e.code, 1429, "{}", e.message);
            assert!(e.message.contains("TiDB"), "{}", e.message);
        }
        other => panic!("expected error 1429, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_transaction_finish_then_closes() {
    let db = mariadb();
    let mut p = ProxyProcess::start(&[db.addr()], "graceful-close-conn-timeout = 15");
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("CREATE TABLE IF NOT EXISTS graceful (id INT PRIMARY KEY)")
        .await
        .expect("create");
    c.query_drop("DELETE FROM graceful").await.expect("clean");
    c.query_drop("BEGIN").await.expect("begin");
    c.query_drop("INSERT INTO graceful VALUES (1)")
        .await
        .expect("insert");
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New connections are no longer served.
    assert!(
        mysql_async::Conn::new(opts(p.sql)).await.is_err(),
        "a draining proxy takes no new sessions"
    );
    // The open transaction still commits.
    c.query_drop("INSERT INTO graceful VALUES (2)")
        .await
        .expect("insert in the open transaction");
    c.query_drop("COMMIT")
        .await
        .expect("commit during shutdown");
    let status = p
        .wait_exit(Duration::from_secs(10))
        .expect("tiproxy exits after the last session");
    assert!(status.success(), "{status}");
    // The commit is durable.
    let mut d = mysql_async::Conn::new(opts(db.addr()))
        .await
        .expect("direct");
    let n: Option<i64> = d
        .query_first("SELECT COUNT(*) FROM graceful")
        .await
        .expect("count");
    assert_eq!(n, Some(2));
    // And the session was closed after the boundary.
    assert!(c.query_drop("SELECT 1").await.is_err());
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[proxy]\nmax-connections = -3\n").expect("write");
    let out = Command::new(binary("tiproxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("max-connections"),
        "{err}"
    );

    std::fs::write(&path, "[proxy]\nproxy-protocol = \"v1\"\n").expect("write");
    let out = Command::new(binary("tiproxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.proxy-protocol"));

    let out = Command::new(binary("tiproxy"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn unknown_keys_warn_but_start() {
    let db_port = free_port();
    let p = ProxyProcess::start(
        &[format!("127.0.0.1:{db_port}").parse().expect("addr")],
        "no-such-key = 1",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p
        .log
        .lock()
        .expect("log")
        .contains("unknown key proxy.no-such-key")
    {
        assert!(
            Instant::now() < deadline,
            "no warning: {}",
            p.log.lock().expect("log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn version_names_version_and_git_hash() {
    for bin in ["tiproxy", "tiproxyctl"] {
        let out = Command::new(binary(bin))
            .arg("--version")
            .output()
            .expect("run");
        assert!(out.status.success());
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(
            v.contains(env!("CARGO_PKG_VERSION")) && v.contains("git "),
            "{bin}: {v}"
        );
        assert!(!v.contains("git unknown"), "{bin}: {v}");
    }
}

#[test]
fn tiproxyctl_health_reads_the_api() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let out = Command::new(binary("tiproxyctl"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &p.api.port().to_string(),
            "health",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config_checksum"));
    let out = Command::new(binary("tiproxyctl"))
        .args(["--port", &free_port().to_string(), "health"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "unreachable proxy");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_v2_is_accepted_and_forwarded() {
    let db = mariadb();
    // The proxy takes a PROXY header from its clients and writes one to
    // MariaDB; MariaDB must be told to trust it, so this checks the inbound
    // side against the proxy and the outbound bytes with a fake backend.
    let fake = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let fake_addr = fake.local_addr().expect("addr");
    let p = ProxyProcess::start(&[fake_addr], "proxy-protocol = \"v2\"");
    let _ = db;
    let mut s = TcpStream::connect(p.sql).expect("connect");
    let mut hdr = bytes::BytesMut::new();
    tiproxy_core::proxy_protocol::ProxyHeader::Proxy {
        source: "10.9.8.7:4321".parse().expect("addr"),
        destination: p.sql,
    }
    .write(&mut hdr);
    s.write_all(&hdr).expect("write header");
    let g = read_packet(&mut s, Duration::from_secs(5)).expect("greeting after the PROXY header");
    assert_eq!(g[0], 10);
    // Send a handshake response; the proxy dials the fake backend and must
    // open with a PROXY header naming the original client.
    let mut resp = bytes::BytesMut::new();
    tiproxy_core::handshake::HandshakeResponse {
        capabilities: tiproxy_core::CapabilityFlags::PROTOCOL_41
            | tiproxy_core::CapabilityFlags::SECURE_CONNECTION
            | tiproxy_core::CapabilityFlags::PLUGIN_AUTH,
        max_packet_size: 1 << 24,
        charset: 45,
        filler: [0; 23],
        mariadb_capabilities: Default::default(),
        username: bytes::Bytes::from_static(b"u"),
        auth_response: bytes::Bytes::new(),
        database: None,
        auth_plugin: Some(bytes::Bytes::from_static(b"mysql_native_password")),
        attributes: Default::default(),
        zstd_level: None,
    }
    .write(&mut resp);
    let mut pkt = bytes::BytesMut::new();
    write_packet(&mut pkt, 1, &resp);
    s.write_all(&pkt).expect("write response");
    // The proxy's backend probes also connect (with a LOCAL header); find
    // the session's connection among them.
    fake.set_nonblocking(false).expect("blocking");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probes = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no proxied connection reached the backend\n{}",
            p.log.lock().expect("log")
        );
        let (mut b, _) = fake.accept().expect("proxy dials the backend");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 64];
        let mut got = Vec::new();
        let header = loop {
            if let Some((h, _)) = tiproxy_core::proxy_protocol::ProxyHeader::parse(&got)
                .expect("a valid PROXY header first")
            {
                break Some(h);
            }
            match b.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break None,
            }
        };
        match header {
            Some(tiproxy_core::proxy_protocol::ProxyHeader::Proxy { source, .. }) => {
                assert_eq!(source, "10.9.8.7:4321".parse().expect("addr"));
                break;
            }
            // A probe: keep it open so the backend does not look dead.
            Some(tiproxy_core::proxy_protocol::ProxyHeader::Local) => probes.push(b),
            None => panic!(
                "backend connection without a PROXY header: {got:02x?}\n{}",
                p.log.lock().expect("log")
            ),
        }
    }
    // A client without the header is served as a plain client (see
    // tests/proxy_protocol.rs); this one's bytes are no handshake, so it is
    // closed.
    let mut plain = TcpStream::connect(p.sql).expect("connect");
    plain.write_all(b"\x05\x00\x00\x01hello").expect("write");
    assert!(closes_within(&mut plain, Duration::from_secs(20)));
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_a_server_without_session_states_keeps_sessions_whole() {
    // MariaDB has no SHOW SESSION_STATES: every move fails at its first
    // step, and the session must stay where it was, fully usable.
    let db = mariadb();
    let a = db.addr();
    // The same server under a second name: two backends for the router.
    let other = format!("localhost:{}", db.port());
    let p = ProxyProcess::start_with_backends(&[a.to_string(), other], "");
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("SET @kept = 41").await.expect("set");
    let (status, body) = post(p.api, "/api/debug/redirect");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"redirected\":1"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v: Option<i64> = c
        .query_first("SELECT @kept + 1")
        .await
        .expect("session still works");
    assert_eq!(v, Some(42));
    let (_, metrics) = p.get("/api/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tiproxy_balance_migrate_total")
                && l.contains("migrate_res=\"fail\"")),
        "{metrics}"
    );
    let (status, body) = post(p.api, "/api/debug/redirect?to=nowhere:1");
    assert_eq!(status, 404, "{body}");
}

/// A POST without a body: (status, body).
fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    tiproxy_tests::http_request(addr, "POST", path)
}
