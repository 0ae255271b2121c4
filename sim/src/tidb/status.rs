//! The status port: `GET /status` (TiProxy's health check; 500 from the
//! start of graceful shutdown) and `GET /config` (TiProxy reads
//! `security.session-token-signing-cert` to know the instance can take
//! migrated sessions) and `GET /metrics` (CPU and memory use, what
//! TiProxy's resource balancing reads, and the PD and TiKV client counters
//! its health factor reads, [`ErrorCounters`]). Over HTTPS with
//! [`super::TidbOptions::status_tls`], as TiDB with cluster TLS.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tiproxy_runtime::net::{Network, Stream};
use tokio::time::Instant;

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
                tiproxy_runtime::task::spawn(async move {
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
            let mut text = inst.metrics_text();
            inst.errors.write_metrics(&mut text);
            let mut r = json(StatusCode::OK, text);
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

/// TSO requests a TiDB sends to PD per second (its PD client batches the
/// TSO of every statement; an idle TiDB still asks for some).
pub const TSO_PER_SECOND: f64 = 20.0;
/// RPCs a TiDB sends to TiKV per second.
pub const TIKV_RPC_PER_SECOND: f64 = 50.0;

/// The client-side counters TiProxy's health factor reads from TiDB's
/// `/metrics`, as histograms with TiDB's names and `type` labels (PD
/// client: `pd_client_cmd_handle_cmds_duration_seconds{type="tso"}` for
/// successful commands, `pd_client_cmd_handle_failed_cmds_duration_seconds`
/// for failed ones; client-go: `tidb_tikvclient_request_seconds` per
/// request type and store, `tidb_tikvclient_backoff_seconds{type="tikvRPC"}`
/// per RPC backoff). The double sends requests at a steady rate
/// ([`TSO_PER_SECOND`], [`TIKV_RPC_PER_SECOND`]); a share of them fails
/// as set through the control API (`POST /instances/<i>/errors`), as when
/// this TiDB loses PD or TiKV.
#[derive(Debug)]
pub struct ErrorCounters(Mutex<Counters>);

#[derive(Debug)]
struct Counters {
    /// Share of TSO requests failing, 0.0-1.0.
    pd_fail: f64,
    /// Share of TiKV RPCs backing off, 0.0-1.0.
    tikv_fail: f64,
    tso_ok: f64,
    tso_failed: f64,
    rpc_total: f64,
    rpc_backoff: f64,
    at: Instant,
}

impl Default for ErrorCounters {
    fn default() -> Self {
        Self(Mutex::new(Counters {
            pd_fail: 0.0,
            tikv_fail: 0.0,
            tso_ok: 0.0,
            tso_failed: 0.0,
            rpc_total: 0.0,
            rpc_backoff: 0.0,
            at: Instant::now(),
        }))
    }
}

impl ErrorCounters {
    /// The counters brought up to now at the shares so far.
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let secs = now.saturating_duration_since(c.at).as_secs_f64();
        c.tso_ok += TSO_PER_SECOND * secs * (1.0 - c.pd_fail);
        c.tso_failed += TSO_PER_SECOND * secs * c.pd_fail;
        c.rpc_total += TIKV_RPC_PER_SECOND * secs;
        c.rpc_backoff += TIKV_RPC_PER_SECOND * secs * c.tikv_fail;
        c.at = now;
        c
    }

    /// Sets the share of TSO requests to PD and of RPCs to TiKV that fail
    /// from now on (each 0.0-1.0; `None` keeps it).
    pub fn set(&self, pd: Option<f64>, tikv: Option<f64>) {
        let mut c = self.lock();
        if let Some(p) = pd {
            c.pd_fail = p.clamp(0.0, 1.0);
        }
        if let Some(t) = tikv {
            c.tikv_fail = t.clamp(0.0, 1.0);
        }
    }

    /// Appends the four histograms (each one `+Inf` bucket, sum, count).
    pub(crate) fn write_metrics(&self, out: &mut String) {
        let c = self.lock();
        let series: [(&str, &str, &str, f64); 4] = [
            (
                "pd_client_cmd_handle_cmds_duration_seconds",
                "Bucketed histogram of processing time (s) of handled success cmds.",
                "type=\"tso\"",
                c.tso_ok,
            ),
            (
                "pd_client_cmd_handle_failed_cmds_duration_seconds",
                "Bucketed histogram of processing time (s) of failed handled cmds.",
                "type=\"tso\"",
                c.tso_failed,
            ),
            (
                "tidb_tikvclient_request_seconds",
                "Bucketed histogram of sending request duration.",
                "stale_read=\"false\",store=\"1\",type=\"Get\"",
                c.rpc_total,
            ),
            (
                "tidb_tikvclient_backoff_seconds",
                "total backoff seconds of a single backoffer.",
                "type=\"tikvRPC\"",
                c.rpc_backoff,
            ),
        ];
        for (name, help, labels, count) in series {
            let n = count.floor();
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} histogram\n\
                 {name}_bucket{{{labels},le=\"+Inf\"}} {n}\n\
                 {name}_sum{{{labels}}} {:.3}\n\
                 {name}_count{{{labels}}} {n}\n",
                n * 0.001
            );
        }
    }
}
