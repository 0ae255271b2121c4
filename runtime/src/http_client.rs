//! The one HTTP/1 client: TiDB status ports (`/status`, `/metrics`, over
//! HTTPS with `security.cluster-tls`), `tiproxyctl`, and the tests. hyper's
//! client connection API over any stream, so it runs over the [`Network`]
//! seam (turmoil in simulation) and over TLS alike.
//!
//! Every request has a deadline (the caller's) and every answer body a size
//! limit: a peer can neither hold a loop forever nor fill the proxy's
//! memory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONNECTION, HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::net::{Network, Stream};

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// Why a request got no (acceptable) answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed (an untrusted or refused certificate, a
    /// peer that speaks no TLS).
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls {
        /// The peer.
        addr: String,
        /// Why, in words ([`crate::tls::handshake_failure`]).
        reason: String,
    },
    /// The request could not be built (a bad method, path or host).
    #[error("bad request: {0}")]
    Request(String),
    /// The peer did not answer in HTTP/1.
    #[error("not an HTTP answer: {0}")]
    NotHttp(hyper::Error),
    /// The connection broke or the exchange failed.
    #[error("{0}")]
    Http(hyper::Error),
    /// The body was larger than the caller's limit.
    #[error("answer body over {0} bytes")]
    TooLarge(usize),
    /// No whole answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl HttpError {
    /// The I/O error under this one, if any (e.g. a TLS alert, which
    /// `tiproxyctl` turns into a hint).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        let mut e: &(dyn std::error::Error + 'static) = match self {
            HttpError::Connect(e) => return Some(e),
            HttpError::NotHttp(e) | HttpError::Http(e) => e,
            _ => return None,
        };
        loop {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Some(io);
            }
            e = e.source()?;
        }
    }

    fn from_hyper(e: hyper::Error) -> Self {
        if e.is_parse() || e.is_parse_status() {
            HttpError::NotHttp(e)
        } else {
            HttpError::Http(e)
        }
    }
}

/// Sends one request on `stream` (already connected, TLS or not) and reads
/// the answer, its body at most `limit` bytes. No deadline here: see
/// [`with_deadline`].
pub async fn send<S: Stream>(
    stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Bytes,
    limit: usize,
) -> Result<Response, HttpError> {
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|e| HttpError::Request(format!("method {method:?}: {e}")))?;
    let host = HeaderValue::from_str(host)
        .map_err(|e| HttpError::Request(format!("host {host:?}: {e}")))?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .header(CONNECTION, HeaderValue::from_static("close"))
        .body(Full::new(body))
        .map_err(|e| HttpError::Request(format!("{path:?}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(HttpError::from_hyper)?;
    let exchange = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(HttpError::from_hyper)?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => HttpError::from_hyper(*e),
                Err(_) => HttpError::TooLarge(limit),
            })?
            .to_bytes();
        Ok(Response {
            status,
            headers: parts.headers,
            body,
        })
    };
    // The connection future does the I/O; the exchange reads what it
    // delivers. Poll both; once the connection is done, what it delivered
    // is buffered (or the exchange fails with its error).
    tokio::pin!(exchange, conn);
    tokio::select! {
        biased;
        r = &mut exchange => return r,
        c = &mut conn => c.map_err(HttpError::from_hyper)?,
    }
    exchange.await
}

/// Runs `work` with a deadline.
pub async fn with_deadline<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// GET `path` on `addr` through `net`, over HTTPS with `tls` (plain HTTP
/// without), connection and handshake included within `timeout`, the body
/// at most `limit` bytes.
pub async fn get<N: Network>(
    net: &N,
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: &str,
    path: &str,
    timeout: Duration,
    limit: usize,
) -> Result<Response, HttpError> {
    with_deadline(timeout, async {
        let s = net.connect(addr).await.map_err(HttpError::Connect)?;
        let Some(tls) = tls else {
            return send(s, addr, "GET", path, Bytes::new(), limit).await;
        };
        let s = tokio_rustls::TlsConnector::from(tls)
            .connect(crate::tls::server_name(addr), s)
            .await
            .map_err(|e| HttpError::Tls {
                addr: addr.to_string(),
                reason: crate::tls::handshake_failure(&e).unwrap_or_else(|| e.to_string()),
            })?;
        send(s, addr, "GET", path, Bytes::new(), limit).await
    })
    .await
}

/// Largest `/metrics` body read (TiDB's is a few MiB at most).
const METRICS_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Largest `/status` body read (TiDB's is a short JSON object).
const STATUS_BODY_LIMIT: usize = 64 * 1024;

/// GET `path` on `addr` (HTTPS with `tls`): the status code and the body
/// (at most [`METRICS_BODY_LIMIT`]), all within `timeout`.
pub(crate) async fn http_get<N: Network>(
    net: &N,
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    get(net, tls, addr, path, timeout, METRICS_BODY_LIMIT)
        .await
        .map(|r| (r.status, r.body.into()))
        .map_err(|e| e.to_string())
}

/// GET `path` on `addr` (HTTPS with `tls`); the status code, within
/// `timeout`.
pub(crate) async fn http_status<N: Network>(
    net: &N,
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, HttpError> {
    get(net, tls, addr, path, timeout, STATUS_BODY_LIMIT)
        .await
        .map(|r| r.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server on a duplex pipe that answers `answer` to
    /// whatever it is sent.
    fn server(answer: &'static [u8]) -> tokio::io::DuplexStream {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        crate::task::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = server.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let _ = server.write_all(answer).await;
            let _ = server.shutdown().await;
        });
        client
    }

    #[tokio::test]
    async fn reads_status_headers_and_body() {
        let s = server(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nbusy!");
        let r = send(s, "tidb:10080", "GET", "/status", Bytes::new(), 100)
            .await
            .unwrap();
        assert_eq!(r.status, 500);
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(&r.body[..], b"busy!");
    }

    #[tokio::test]
    async fn a_body_without_length_is_read_to_the_end() {
        // HTTP/1.0 style: the body ends when the server closes.
        let s = server(b"HTTP/1.0 200 OK\r\n\r\nprocess_cpu_seconds_total 3\n");
        let r = send(s, "x", "GET", "/metrics", Bytes::new(), 100)
            .await
            .unwrap();
        assert_eq!(
            (r.status, &r.body[..]),
            (200, &b"process_cpu_seconds_total 3\n"[..])
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let s = server(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world");
        let e = send(s, "x", "GET", "/metrics", Bytes::new(), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(10)), "{e:?}");
        // Without a length, the same limit holds on what arrives.
        let s = server(b"HTTP/1.0 200 OK\r\n\r\nhello world, and more");
        let e = send(s, "x", "GET", "/metrics", Bytes::new(), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::TooLarge(10)), "{e:?}");
    }

    #[tokio::test]
    async fn a_peer_that_is_not_http_is_named() {
        let s = server(b"\x15\x03\x03\x00\x02\x02\x46 not http at all\r\n\r\n");
        let e = send(s, "x", "GET", "/", Bytes::new(), 10)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::NotHttp(_)), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_hits_the_deadline() {
        let (client, _server) = tokio::io::duplex(1024);
        let e = with_deadline(
            Duration::from_secs(2),
            send(client, "x", "GET", "/", Bytes::new(), 10),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, HttpError::Timeout(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_request_body_is_sent_with_its_length() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let peer = crate::task::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).ends_with("level = 'debug'") {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let r = send(
            client,
            "127.0.0.1:3080",
            "PUT",
            "/api/admin/config",
            Bytes::from_static(b"level = 'debug'"),
            100,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let sent = peer.await.unwrap().to_ascii_lowercase();
        assert!(
            sent.starts_with("put /api/admin/config http/1.1\r\n"),
            "{sent}"
        );
        assert!(sent.contains("content-length: 15\r\n"), "{sent}");
        assert!(sent.contains("host: 127.0.0.1:3080\r\n"), "{sent}");
    }
}
