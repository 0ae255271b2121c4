//! Hot reload of the config file against the real `tiproxy` binary and real
//! MariaDB: max-connections, the backend list, the log level, a broken file,
//! a restart-only key, a rotated server certificate, and the rule between
//! the file and `PUT /api/admin/config`.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mysql_async::prelude::*;
use tiproxy_conformance::mariadb::MariaDb;
use tiproxy_tests::{ProxyProcess, mariadb, opts};

/// Replaces `from` with `to` in the proxy's config file, as an editor would.
fn edit(p: &ProxyProcess, from: &str, to: &str) {
    let text = std::fs::read_to_string(&p.config).expect("read config");
    assert!(text.contains(from), "{from:?} not in:\n{text}");
    std::fs::write(&p.config, text.replacen(from, to, 1)).expect("write config");
}

fn log(p: &ProxyProcess) -> String {
    p.log.lock().expect("log").clone()
}

/// Polls `check` every 100 ms for up to 15 s (the watcher also polls every
/// 5 s should inotify miss an event).
async fn eventually<F, Fut>(what: &str, p: &ProxyProcess, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within 15 s\n{}",
            log(p)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect_error_code(addr: SocketAddr) -> Option<u16> {
    match mysql_async::Conn::new(opts(addr)).await {
        Ok(c) => {
            let _ = c.disconnect().await;
            None
        }
        Err(mysql_async::Error::Server(e)) => Some(e.code),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The first session under a limit of 1: the start-up helper's readiness
/// probe (a bare TCP connect) may hold the slot for a moment.
async fn first_connection(p: &ProxyProcess) -> mysql_async::Conn {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mysql_async::Conn::new(opts(p.sql)).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "first connection: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn put(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    tiproxy_tests::http_request_with_body(addr, "PUT", path, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_follows_the_file() {
    let p = ProxyProcess::start(&[mariadb().addr()], "max-connections = 1");
    let first = first_connection(&p).await;
    assert_eq!(connect_error_code(p.sql).await, Some(1040));
    edit(&p, "max-connections = 1", "max-connections = 3");
    eventually(
        "a second connection after raising the limit",
        &p,
        || async { connect_error_code(p.sql).await.is_none() },
    )
    .await;
    let second = mysql_async::Conn::new(opts(p.sql)).await.expect("second");
    let third = mysql_async::Conn::new(opts(p.sql)).await.expect("third");
    assert_eq!(
        connect_error_code(p.sql).await,
        Some(1040),
        "the new limit is 3"
    );
    assert!(log(&p).contains("configuration reloaded"), "{}", log(&p));
    drop((first, second, third));
}

#[tokio::test(flavor = "multi_thread")]
async fn new_connections_go_to_the_new_backend_list() {
    let a = mariadb();
    let b = MariaDb::start().expect("start a second MariaDB");
    let p = ProxyProcess::start(&[a.addr()], "");
    let port_of = |addr: SocketAddr| async move {
        let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
        let port: u16 = c
            .query_first("SELECT @@port")
            .await
            .expect("q")
            .expect("row");
        let _ = c.disconnect().await;
        port
    };
    assert_eq!(port_of(p.sql).await, a.port());
    let mut kept = mysql_async::Conn::new(opts(p.sql)).await.expect("kept");
    edit(
        &p,
        &format!("backend-addrs = [\"{}\"]", a.addr()),
        &format!("backend-addrs = [\"{}\"]", b.addr()),
    );
    eventually("a new connection on the new backend", &p, || async {
        port_of(p.sql).await == b.port()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(port_of(p.sql).await, b.port(), "every new connection");
    }
    // A session on the removed MariaDB is not cut (MariaDB cannot export
    // sessions, so it stays where it is).
    let port: u16 = kept
        .query_first("SELECT @@port")
        .await
        .expect("the kept session still works")
        .expect("row");
    assert_eq!(port, a.port());
}

#[tokio::test(flavor = "multi_thread")]
async fn log_level_change_shows_debug_lines() {
    let db = mariadb().addr();
    let p = ProxyProcess::start_with_config(|sql, api| {
        format!(
            "[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [\"{db}\"]\n[api]\naddr = \"{api}\"\n[log]\nlevel = \"info\"\n"
        )
    });
    let c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!log(&p).contains("[DEBUG]"), "{}", log(&p));
    edit(&p, "level = \"info\"", "level = \"debug\"");
    eventually("debug lines after level = debug", &p, || async {
        let c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
        let _ = c.disconnect().await;
        log(&p).contains("[DEBUG]")
    })
    .await;
    assert!(
        log(&p).contains("authenticated"),
        "the session's debug line: {}",
        log(&p)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_file_keeps_the_config_in_effect() {
    let p = ProxyProcess::start(&[mariadb().addr()], "max-connections = 1");
    let good = std::fs::read_to_string(&p.config).expect("read");
    std::fs::write(&p.config, "[proxy\nmax-connections = 5\n").expect("write");
    let file = p.config.display().to_string();
    eventually("an error naming the file", &p, || async {
        let l = log(&p);
        l.contains("[ERROR]") && l.contains(&file) && l.contains("malformed TOML")
    })
    .await;
    // A bad value names its key.
    std::fs::write(
        &p.config,
        good.replace(
            "max-connections = 1",
            "max-connections = 5\nconn-buffer-size = 3",
        ),
    )
    .expect("write");
    eventually("an error naming the key", &p, || async {
        log(&p).contains("proxy.conn-buffer-size")
    })
    .await;
    // Nothing of either file applied: the old limit holds.
    let first = first_connection(&p).await;
    assert_eq!(connect_error_code(p.sql).await, Some(1040));
    let (_, cfg) = tiproxy_tests::http_get(p.api, "/api/admin/config");
    assert!(cfg.contains("max-connections = 1"), "{cfg}");
    // Still running, and a good file applies again.
    std::fs::write(
        &p.config,
        good.replace("max-connections = 1", "max-connections = 2"),
    )
    .expect("write");
    eventually("the fixed file applied", &p, || async {
        connect_error_code(p.sql).await.is_none()
    })
    .await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_only_key_says_so_and_changes_nothing() {
    let p = ProxyProcess::start(&[mariadb().addr()], "");
    let other = format!("127.0.0.1:{}", tiproxy_tests::free_port());
    edit(
        &p,
        &format!("addr = \"{}\"", p.sql),
        &format!("addr = \"{other}\""),
    );
    eventually("a warning naming proxy.addr", &p, || async {
        let l = log(&p);
        l.contains("[WARN]") && l.contains("proxy.addr changed; it takes effect after a restart")
    })
    .await;
    let mut c = mysql_async::Conn::new(opts(p.sql))
        .await
        .expect("the old listener still serves");
    c.query_drop("SELECT 1").await.expect("query");
    assert!(
        TcpStream::connect(&other).is_err(),
        "no listener on {other}"
    );
}

/// The file and the API: an API change holds until the file changes again;
/// then the keys the file names win.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_holds_until_the_file_changes() {
    let p = ProxyProcess::start(&[mariadb().addr()], "max-connections = 1");
    let (s, b) = put(
        p.api,
        "/api/admin/config",
        "[proxy]\nmax-connections = 4\n[log]\nencoder = \"json\"\n",
    );
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert_eq!(v["applied"], serde_json::json!(["proxy.max-connections"]));
    assert_eq!(v["restart_required"], serde_json::json!(["log.encoder"]));
    let c1 = first_connection(&p).await;
    let c2 = mysql_async::Conn::new(opts(p.sql))
        .await
        .expect("c2 (API limit 4)");
    // The file changes (another key): its max-connections = 1 wins again.
    let text = std::fs::read_to_string(&p.config).expect("read");
    std::fs::write(
        &p.config,
        format!("{text}\n[balance]\npolicy = \"connection\"\n"),
    )
    .expect("write");
    eventually("the file's limit back", &p, || async {
        connect_error_code(p.sql).await == Some(1040)
    })
    .await;
    drop((c1, c2));
}

// ------------------------------------------------------------ TLS rotation

/// The certificate the proxy shows a new client: greeting, SSL request,
/// TLS handshake.
async fn peer_cert(addr: SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.expect("greeting header");
        let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
        let mut greeting = vec![0u8; len];
        s.read_exact(&mut greeting).await.expect("greeting");
        let mut payload = BytesMut::new();
        tiproxy_core::handshake::SslRequest {
            capabilities: tiproxy_core::CapabilityFlags::PROTOCOL_41
                | tiproxy_core::CapabilityFlags::SECURE_CONNECTION,
            max_packet_size: 1 << 24,
            charset: 45,
            mariadb_capabilities: Default::default(),
        }
        .write(&mut payload);
        let mut pkt = vec![payload.len() as u8, 0, 0, 1];
        pkt.extend_from_slice(&payload);
        s.write_all(&pkt).await.expect("ssl request");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(tiproxy_tests::AnyCert))
        .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                s,
            )
            .await
            .expect("TLS handshake");
        tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("TLS handshake within 10 s")
}

fn write_cert(dir: &Path, name: &str) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()])
        .expect("generate");
    // Written beside, then renamed over: the way cert managers rotate.
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(dir.join("key.tmp"), ck.signing_key.serialize_pem()).expect("write");
    std::fs::write(dir.join("cert.tmp"), ck.cert.pem()).expect("write");
    std::fs::rename(dir.join("key.tmp"), key).expect("rename");
    std::fs::rename(dir.join("cert.tmp"), cert).expect("rename");
    ck.cert.der().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_server_certificate_is_used_by_new_connections() {
    let certs = tempfile::tempdir().expect("tempdir");
    let first = write_cert(certs.path(), "first");
    let db = mariadb().addr();
    let dir = certs.path().display().to_string();
    let p = ProxyProcess::start_with_config(|sql, api| {
        format!(
            "[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [\"{db}\"]\n[api]\naddr = \"{api}\"\n\
             [security.server-tls]\ncert = \"{dir}/server.pem\"\nkey = \"{dir}/server.key\"\n"
        )
    });
    assert_eq!(peer_cert(p.sql).await, first);
    // A TLS session through the proxy works with the first certificate.
    let tls_opts = |addr: SocketAddr| -> mysql_async::Opts {
        mysql_async::OptsBuilder::from_opts(opts(addr))
            .ssl_opts(Some(
                mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true),
            ))
            .into()
    };
    let mut kept = mysql_async::Conn::new(tls_opts(p.sql))
        .await
        .expect("TLS session");
    let second = write_cert(certs.path(), "second");
    assert_ne!(first, second);
    eventually("the new certificate on a new connection", &p, || async {
        peer_cert(p.sql).await == second
    })
    .await;
    kept.query_drop("SELECT 1")
        .await
        .expect("the established TLS session is untouched");
    let mut c = mysql_async::Conn::new(tls_opts(p.sql))
        .await
        .expect("a TLS session with the new certificate");
    c.query_drop("SELECT 1").await.expect("query");
    assert!(log(&p).contains("TLS certificates reloaded"), "{}", log(&p));
}
