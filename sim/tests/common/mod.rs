//! Helpers shared by the sim's integration tests.

#![allow(dead_code)]

use std::time::Duration;

use tiproxy_runtime::net::TokioNet;
use tiproxy_sim::tidb::client::{ConnectOptions, RawClient};
use tiproxy_sim::tidb::{Cluster, ClusterOptions, LocalCluster, TidbOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A cluster with `n` instances on free loopback ports.
pub async fn fleet(n: usize, opts: TidbOptions) -> LocalCluster<TokioNet> {
    let f = LocalCluster::new(
        TokioNet::default(),
        Cluster::new(ClusterOptions::default()),
        opts,
    );
    for _ in 0..n {
        f.start_instance("127.0.0.1:0", "127.0.0.1:0")
            .await
            .unwrap();
    }
    f
}

/// The SQL address of instance `i`.
pub fn sql_addr(f: &LocalCluster<TokioNet>, i: usize) -> String {
    f.instances()[i].sql.clone()
}

/// A raw client logged in to `addr`.
pub async fn raw(addr: &str, opts: &ConnectOptions) -> RawClient<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    RawClient::connect(s, opts).await.unwrap()
}

/// A mysql_async connection.
pub async fn conn(
    addr: &str,
    user: &str,
    pass: &str,
    db: Option<&str>,
) -> Result<mysql_async::Conn, mysql_async::Error> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(host.to_string())
        .tcp_port(port.parse().unwrap())
        .user(Some(user.to_string()))
        .pass(Some(pass.to_string()))
        .db_name(db.map(str::to_string))
        .prefer_socket(false);
    mysql_async::Conn::new(opts).await
}

/// The server error code of a mysql_async error.
pub fn code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// A minimal HTTP/1.1 request; returns (status code, body).
pub async fn http(
    method: &str,
    addr: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Escapes a JSON document the way TiProxy builds `SET SESSION_STATES`.
pub fn set_session_states(json: &str) -> String {
    format!(
        "SET SESSION_STATES '{}'",
        json.replace('\\', "\\\\").replace('\'', "\\'")
    )
}
