//! The status port: `GET /status` (TiProxy's health check; 500 from the
//! start of graceful shutdown) and `GET /config` (TiProxy reads
//! `security.session-token-signing-cert` to know the instance can take
//! migrated sessions) and `GET /metrics` (CPU and memory use, what
//! TiProxy's resource balancing reads). Over HTTPS with
//! [`super::TidbOptions::status_tls`], as TiDB with cluster TLS.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tiproxy_runtime::net::{Network, Stream};

use super::server::{Instance, Phase};

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve<N: Network>(net: N, listener: N::Listener, inst: Arc<Instance>) {
    loop {
        tokio::select! {
            biased;
            _ = inst.reached(Phase::Stopped) => break,
            r = net.accept(&listener) => {
                let Ok((stream, peer)) = r else { continue };
                let inst = Arc::clone(&inst);
                tokio::spawn(async move {
                    let Some(tls) = inst.opts.status_tls.clone() else {
                        return serve_conn(stream, inst).await;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_conn(s, inst).await,
                        // TiDB logs a refused client at warn, too.
                        Ok(Err(e)) => tracing::warn!(%peer, status = %inst.status_addr, "status port TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "status port TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Serves HTTP/1 on one (plain or TLS) connection until it ends or the
/// instance stops.
async fn serve_conn<S: Stream>(stream: S, inst: Arc<Instance>) {
    let svc_inst = Arc::clone(&inst);
    let svc = service_fn(move |req| {
        let inst = Arc::clone(&svc_inst);
        async move { Ok::<_, Infallible>(route(&inst, &req)) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        biased;
        _ = inst.reached(Phase::Stopped) => {}
        _ = conn => {}
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn route(inst: &Instance, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return json(StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    match req.uri().path() {
        "/status" => {
            // TiDB answers 500 with no body once shutdown began.
            if inst.phase() >= Phase::Draining {
                return json(StatusCode::INTERNAL_SERVER_ERROR, String::new());
            }
            let body = serde_json::json!({
                "connections": inst.connection_count(),
                "version": inst.opts.server_version,
                "git_hash": inst.opts.git_hash,
            });
            json(StatusCode::OK, body.to_string())
        }
        "/metrics" => {
            let mut r = json(StatusCode::OK, inst.metrics_text());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/config" => {
            let (cert, key) = if inst.opts.session_token_signing {
                (
                    inst.cluster.signing_cert_path(),
                    "/tidb-double/session-token-signing.key",
                )
            } else {
                ("", "")
            };
            let body = serde_json::json!({
                "host": inst.sql_addr.ip().to_string(),
                "advertise-address": inst.sql_addr.ip().to_string(),
                "port": inst.sql_addr.port(),
                "store": "tikv",
                "graceful-wait-before-shutdown": inst.opts.graceful_wait.as_secs(),
                "status": {
                    "status-host": inst.status_addr.ip().to_string(),
                    "status-port": inst.status_addr.port(),
                    "report-status": true,
                },
                "security": {
                    "session-token-signing-cert": cert,
                    "session-token-signing-key": key,
                },
            });
            json(StatusCode::OK, body.to_string())
        }
        _ => json(StatusCode::NOT_FOUND, String::new()),
    }
}
