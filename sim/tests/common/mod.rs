//! Helpers shared by the sim's integration tests.

#![allow(dead_code)]

use std::time::Duration;

use tiproxy_runtime::net::TokioNet;
use tiproxy_sim::tidb::client::{ConnectOptions, RawClient};
use tiproxy_sim::tidb::{Cluster, ClusterOptions, LocalCluster, TidbOptions};
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

/// One HTTP/1.1 request with the proxy's own client (the one `tiproxyctl`
/// and the health checks use); returns (status code, body). Any failure
/// (no connection, no answer within 10 s, not HTTP) is an I/O error.
pub async fn http(
    method: &str,
    addr: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use tiproxy_runtime::http_client::{HttpError, send, with_deadline};
    let body = bytes::Bytes::copy_from_slice(body.as_bytes());
    let r = with_deadline(Duration::from_secs(10), async {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| HttpError::Timeout(Duration::from_secs(5)))?
            .map_err(HttpError::Connect)?;
        send(s, addr, method, path, body, 16 << 20).await
    })
    .await
    .map_err(|e| match e {
        HttpError::Connect(e) => e,
        e => std::io::Error::other(e),
    })?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// Escapes a JSON document the way TiProxy builds `SET SESSION_STATES`.
pub fn set_session_states(json: &str) -> String {
    format!(
        "SET SESSION_STATES '{}'",
        json.replace('\\', "\\\\").replace('\'', "\\'")
    )
}
