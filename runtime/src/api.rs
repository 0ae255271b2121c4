//! The HTTP API on `[api] addr`: TiProxy's routes (health, metrics, config,
//! redirect) and what operators also need (backends, drain, sessions, a
//! status summary), and the web status page at `/` (files from `src/ui/`,
//! built into the binary). Every route is also served without the `/api`
//! prefix, as TiProxy does. Errors are JSON `{"error": "..."}` with the
//! right status code. With `security.server-http-tls` the listener speaks
//! HTTPS (told apart from plain HTTP by the first byte). With
//! `api.proxy-protocol = "v2"` a PROXY header may come first. CPU profiles
//! (`/api/debug/pprof/profile`) are `cpu_profile`'s business.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tiproxy_core::proxy_protocol::ProxyHeader;
use tokio::io::AsyncReadExt;
use tracing::{debug, info};

use crate::metrics::metrics;
use crate::net::{Network, Prefixed};
use crate::state::State;

mod cpu_profile;
mod traffic;

type Resp = Response<Full<Bytes>>;

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

fn reply(status: StatusCode, body: serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    reply(status, json!({ "error": msg.to_string() }))
}

fn text(content_type: &'static str, body: String) -> Resp {
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

/// A file of the status page. They are built into the binary, and the page
/// loads nothing from elsewhere (its content security policy forbids it).
fn ui_file(name: &str) -> Option<Resp> {
    let (content_type, body) = match name {
        "index.html" => ("text/html; charset=utf-8", include_str!("ui/index.html")),
        "app.js" => ("text/javascript; charset=utf-8", include_str!("ui/app.js")),
        "style.css" => ("text/css; charset=utf-8", include_str!("ui/style.css")),
        _ => return None,
    };
    Some(
        Response::builder()
            .header("content-type", content_type)
            .header("cache-control", "no-cache")
            .header("x-content-type-options", "nosniff")
            .header(
                "content-security-policy",
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            )
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts"),
    )
}

/// How long a connection may take to send its first byte and finish the
/// TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves the API until the task is aborted. With `security.server-http-tls`
/// it speaks HTTPS; a plain HTTP request on the same port is answered only
/// for `GET /api/debug/health` (as TiProxy does, so load balancers can
/// check it), anything else with 400.
pub async fn serve<N: Network>(st: Arc<State<N>>, listener: N::Listener) {
    let net = st.shared.net.clone();
    // `api.proxy-protocol` needs a restart, as in TiProxy.
    let proxy_protocol = st.config.api.proxy_protocol == "v2";
    loop {
        let Ok((stream, peer)) = net.accept(&listener).await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let st = st.clone();
        crate::task::spawn(async move {
            // An optional PROXY header first: HTTP clients speak first, so
            // it is read before anything else.
            let (stream, peer) = if proxy_protocol {
                let mut stream = stream;
                let read = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    crate::proxy_header::read_optional(&mut stream),
                )
                .await;
                match read {
                    Ok(Ok((header, early))) => {
                        let peer = match header {
                            Some(ProxyHeader::Proxy { source, .. }) => source,
                            _ => peer,
                        };
                        (Prefixed::new(early, stream), peer)
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, "api: bad PROXY protocol header: {e}");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "api: no request within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                }
            } else {
                (Prefixed::new(Bytes::new(), stream), peer)
            };
            // The acceptor in effect when the connection arrives (reloads
            // apply to new connections).
            let Some(acceptor) = st.api_tls.get() else {
                return http(st, stream, peer, true).await;
            };
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let mut stream = stream;
                let mut first = [0u8; 1];
                if stream.read(&mut first).await? == 0 {
                    return Ok(None);
                }
                let stream = Prefixed::new(Bytes::copy_from_slice(&first), stream);
                if first[0] != TLS_HANDSHAKE_RECORD {
                    return Ok(Some(Err(stream)));
                }
                acceptor.accept(stream).await.map(|s| Some(Ok(s)))
            })
            .await;
            match tls {
                Ok(Ok(Some(Ok(s)))) => http(st, s, peer, true).await,
                Ok(Ok(Some(Err(plain)))) => http(st, plain, peer, false).await,
                Ok(Ok(None)) => {}
                // A certificate refused (cert-allowed-cn, an unknown CA,
                // none shown) is loud; a client that went away is not.
                Ok(Err(e)) => match crate::tls::handshake_failure(&e) {
                    Some(why) if crate::tls::is_certificate_refusal(&e) => {
                        st.api_refusals
                            .refused("security.server-http-tls", &peer, &why);
                    }
                    _ => debug!(%peer, "api TLS handshake: {e}"),
                },
                Err(_) => debug!(%peer, "api TLS handshake timed out"),
            }
        });
    }
}

/// Serves HTTP/1 on one connection; `full` is false for plain HTTP on an
/// HTTPS listener (the health check only).
async fn http<N: Network, S: crate::net::Stream>(
    st: Arc<State<N>>,
    stream: S,
    peer: std::net::SocketAddr,
    full: bool,
) {
    let svc = hyper::service::service_fn(move |req| {
        let st = st.clone();
        async move {
            Ok::<_, Infallible>(if full || is_health_check(&req) {
                route(&st, req).await
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "the API is served over HTTPS (security.server-http-tls); \
                     over plain HTTP only GET /api/debug/health answers",
                )
            })
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        debug!(%peer, "api connection: {e}");
    }
}

/// `GET /api/debug/health` or `GET /debug/health`.
fn is_health_check(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && matches!(
            req.uri().path().trim_end_matches('/'),
            "/api/debug/health" | "/debug/health"
        )
}

/// Reads the request body (at most [`MAX_BODY`] bytes).
async fn body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("cannot read the body: {e}"),
        )),
    }
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.replace("%3A", ":").replace("%3a", ":"))
}

async fn route<N: Network>(st: &State<N>, req: Request<Incoming>) -> Resp {
    let full = req.uri().path().trim_end_matches('/').to_string();
    let path = full.strip_prefix("/api").unwrap_or(&full).to_string();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    match (method.clone(), parts.as_slice()) {
        // The status page: `/` only (not `/api`), its files under `/ui/`.
        (Method::GET, []) if full.is_empty() => {
            ui_file("index.html").expect("the page is built in")
        }
        (Method::GET, ["ui", name]) => match ui_file(name) {
            Some(r) => r,
            None => error(StatusCode::NOT_FOUND, format!("no file {full}")),
        },
        (Method::GET, ["status"]) => reply(StatusCode::OK, status(st)),
        (Method::GET, ["debug", "health"]) => health(st),
        (Method::PUT, ["debug", "health"]) => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            #[derive(serde::Deserialize)]
            struct Set {
                healthy: bool,
                #[serde(default)]
                reason: String,
            }
            match serde_json::from_slice::<Set>(&b) {
                Ok(s) => {
                    let v = (!s.healthy).then(|| {
                        if s.reason.is_empty() {
                            "no reason given".into()
                        } else {
                            s.reason
                        }
                    });
                    info!(unhealthy = ?v, "health set through the API");
                    *st.manual_unhealthy.lock().expect("health lock") = v;
                    health(st)
                }
                Err(e) => error(
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"healthy\": bool, \"reason\": string}}: {e}"),
                ),
            }
        }
        (Method::DELETE, ["debug", "health"]) => {
            *st.manual_unhealthy.lock().expect("health lock") = None;
            health(st)
        }
        (Method::POST, ["debug", "redirect"]) => {
            match st.redirect(
                query_param(&req, "from").as_deref(),
                query_param(&req, "to").as_deref(),
            ) {
                Ok(n) => reply(StatusCode::OK, json!({ "redirected": n })),
                Err(e) => error(StatusCode::NOT_FOUND, e),
            }
        }
        (Method::GET, ["debug", "workers"]) => reply(
            StatusCode::OK,
            json!({ "workers": st.shared.net.workers_info().unwrap_or_default() }),
        ),
        (Method::GET, ["metrics"]) => text("text/plain; version=0.0.4", metrics().render()),
        (Method::GET, ["debug", "pprof", "profile"]) => {
            cpu_profile::profile(query_param(&req, "seconds")).await
        }
        (Method::GET, ["debug", "pprof", ..]) => error(
            StatusCode::NOT_FOUND,
            format!(
                "{full}: only CPU profiles are served, at /api/debug/pprof/profile?seconds=N \
                 (1-{}); there is no heap profile (the proxy uses the system allocator)",
                cpu_profile::MAX_SECONDS
            ),
        ),
        (Method::GET, ["admin", "config"]) => {
            let cfg = st.live_config.read().expect("config lock").clone();
            let want_json = query_param(&req, "format").as_deref() == Some("json")
                || req
                    .headers()
                    .get("accept")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/json"));
            if want_json {
                match serde_json::to_value(&cfg) {
                    Ok(v) => reply(StatusCode::OK, v),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            } else {
                match toml::to_string(&cfg) {
                    Ok(t) => text("application/toml", t),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
        }
        (Method::PUT, ["admin", "config"]) => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Ok(text) = std::str::from_utf8(&b) else {
                return error(StatusCode::BAD_REQUEST, "the body is not UTF-8 TOML");
            };
            // Like TiProxy, the body patches the configuration in effect:
            // keys it leaves out keep their values. A changed config file
            // takes the same path (`crate::reload`).
            match st.patch_config(text, "PUT /api/admin/config") {
                Ok((done, warnings)) => {
                    info!(applied = ?done.applied, restart_required = ?done.restart_required, "configuration updated through the API");
                    reply(
                        StatusCode::OK,
                        json!({
                            "applied": done.applied,
                            "restart_required": done.restart_required,
                            "warnings": warnings,
                        }),
                    )
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::GET, ["backends"]) => {
            let list: Vec<serde_json::Value> = st
                .router()
                .backends()
                .iter()
                .map(|b| backend_json(st, b))
                .collect();
            reply(StatusCode::OK, json!(list))
        }
        (Method::POST, ["backends", addr, action @ ("drain" | "undrain")]) => {
            let addr = addr.replace("%3A", ":").replace("%3a", ":");
            match st.router().find(&addr) {
                Some(b) => {
                    b.set_manual_drain(*action == "drain");
                    info!(backend = %addr, "{action}ed through the API");
                    reply(StatusCode::OK, backend_json(st, &b))
                }
                None => error(StatusCode::NOT_FOUND, format!("unknown backend {addr}")),
            }
        }
        (_, ["traffic", op]) => {
            let op = op.to_string();
            traffic::route(st, &op, req).await
        }
        (Method::GET, ["sessions"]) => {
            // Each connection describes itself; one that does not answer
            // within a second (stuck writing to a slow peer) is left out.
            let mut waits = Vec::new();
            for (_, m) in st.sessions() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                m.send(crate::conn::Control::Describe(Arc::new(
                    std::sync::Mutex::new(Some(tx)),
                )));
                waits.push(rx);
            }
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut list = Vec::new();
            for rx in waits {
                if let Ok(Ok(i)) = tokio::time::timeout_at(deadline, rx).await {
                    list.push(json!({
                        "connection_id": i.connection_id,
                        "client": i.client,
                        "backend": i.backend,
                        "user": i.user,
                        "db": i.db,
                        "in_transaction": i.in_transaction,
                        "idle_ms": i.idle_ms,
                        "commands": i.commands,
                    }));
                }
            }
            reply(StatusCode::OK, json!(list))
        }
        (
            _,
            ["debug", "health"]
            | ["debug", "redirect"]
            | ["metrics"]
            | ["debug", "pprof", ..]
            | ["admin", "config"]
            | ["backends"]
            | ["backends", _, "drain" | "undrain"]
            | ["sessions"]
            | ["status"]
            | ["ui", _],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {full}"),
        ),
        (_, []) if full.is_empty() => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on /"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {full}")),
    }
}

fn health<N: Network>(st: &State<N>) -> Resp {
    let checksum = config_checksum(st);
    let d = st.discovery.lock().expect("status lock").clone();
    let pd = match (d.pd, &d.pd_error) {
        (false, _) => serde_json::Value::Null,
        (true, None) if d.pd_seen => "ok".into(),
        (true, None) => "connecting".into(),
        (true, Some(e)) => format!("unreachable: {e}").into(),
    };
    let mut body = json!({ "config_checksum": checksum, "pd": pd });
    if let Some(ha) = st.ha.lock().expect("ha status lock").clone() {
        body["vip"] = json!(ha);
    }
    match st.unhealthy_reason() {
        None => reply(StatusCode::OK, body),
        Some(r) => {
            body["unhealthy_reason"] = r.into();
            reply(StatusCode::BAD_GATEWAY, body)
        }
    }
}

/// `GET /api/status`: the totals the status page samples, read from the
/// metrics registry (nothing extra is counted for it).
fn status<N: Network>(st: &State<N>) -> serde_json::Value {
    use prometheus::proto::MetricType;
    let families = metrics().gather();
    // Sum of a family's samples, grouped by one label's value ("" = all).
    let by = |name: &str, label: &str| -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for f in families.iter().filter(|f| f.name() == name) {
            for m in f.get_metric() {
                let v = match f.get_field_type() {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => continue,
                };
                let key = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == label)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                let e = out.entry(key).or_insert(json!(0u64));
                *e = json!(e.as_u64().unwrap_or(0) + v.max(0.0) as u64);
            }
        }
        out
    };
    let total = |name: &str| -> u64 { by(name, "").values().filter_map(|v| v.as_u64()).sum() };
    let migrations = by("tiproxy_balance_migrate_total", "migrate_res");
    json!({
        "version": crate::VERSION,
        "unhealthy_reason": st.unhealthy_reason(),
        "connections": total("tiproxy_server_connections"),
        "connections_created": total("tiproxy_server_create_connection_total"),
        "connections_rejected": total("tiproxy_server_reject_connection_total"),
        "queries": total("tiproxy_session_query_total"),
        "query_errors": total("tiproxy_session_query_error_total"),
        "migrations": {
            "succeeded": migrations.get("succeed").and_then(|v| v.as_u64()).unwrap_or(0),
            "failed": migrations.get("fail").and_then(|v| v.as_u64()).unwrap_or(0),
        },
        "pending_migrations": total("tiproxy_balance_pending_migrate"),
        "protected_sessions": total("tiproxy_session_protected"),
        "restores": by("tiproxy_session_restore_total", "result"),
        "disconnections": by("tiproxy_server_disconnection_total", "type"),
        "vip": st.ha.lock().expect("ha status lock").clone(),
    })
}

fn backend_json<N: Network>(st: &State<N>, b: &crate::router::Backend) -> serde_json::Value {
    let now = tokio::time::Instant::now();
    let (cpu, memory) = b.resources(now);
    // The rank among the backends of its routing group (every backend under
    // the default rule) under the policy (lower goes first): the ones a new
    // session of that group is balanced over.
    let router = st.router();
    let scope = router.scope_of(b);
    let all: Vec<_> = router
        .backends()
        .into_iter()
        .filter(|x| std::ptr::eq(&**x, b) || scope.is_some_and(|s| router.in_scope(x, s)))
        .collect();
    let loads: Vec<_> = all.iter().map(|x| router.load_of(x, now)).collect();
    let ranks = tiproxy_core::balance::scores(&loads, router.policy());
    let score: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .position(|x| std::ptr::eq(&**x, b))
        .and_then(|i| ranks.get(i))
        .map(|r| {
            r.iter()
                .map(|(f, v)| (f.name().to_string(), json!(v)))
                .collect()
        })
        .unwrap_or_default();
    let state = if b.is_removed() {
        "removed"
    } else if b.is_draining() {
        "draining"
    } else if !b.probe_ok() {
        "unhealthy"
    } else {
        "healthy"
    };
    json!({
        "addr": b.addr,
        "status_addr": b.status_addr,
        "state": state,
        "manually_drained": b.is_manually_drained(),
        "fail_backend_list": b.failover_since().is_some(),
        "accepts_connections": st.router().accepts(b),
        "connections": b.connections(),
        "incoming_moves": st.router().incoming(b),
        "supports_migration": st.router().can_export(b),
        "zone": b.zone(),
        // `proxy.backend-clusters` (or `default` for `pd-addrs`); null for
        // a static backend.
        "cluster": st.clusters.cluster_of(&b.addr),
        // `balance.routing-rule`: the CIDRs or `cluster:port` of its group
        // (`[]`: in none, it gets no session); null under the default rule.
        "group": router.group_values(b),
        "cpu_usage": cpu.map(|c| c.usage),
        "memory_usage": memory,
        "score": score,
    })
}

/// A checksum of the configuration in effect (TiProxy reports one so
/// operators can tell instances with different configs apart).
fn config_checksum<N: Network>(st: &State<N>) -> u32 {
    let text = toml::to_string(&*st.live_config.read().expect("config lock")).unwrap_or_default();
    // FNV-1a: stable across builds, unlike the std hasher.
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
