//! The HTTP API on `[api] addr`: TiProxy's health and metrics routes.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::metrics::metrics;
use crate::net::Network;
use crate::proxy::State;

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

/// Serves the API until the task is aborted.
pub async fn serve<N: Network>(st: Arc<State<N>>, listener: N::Listener) {
    let net = st.shared.net.clone();
    loop {
        let Ok((stream, peer)) = net.accept(&listener).await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(route(&st, req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, "api connection: {e}");
            }
        });
    }
}

fn route<N: Network>(st: &State<N>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().trim_end_matches('/');
    let path = path.strip_prefix("/api").unwrap_or(path);
    match (req.method(), path) {
        (&Method::GET, "/debug/health") => {
            let checksum = config_checksum(st);
            let d = st.discovery.lock().expect("status lock").clone();
            let pd = match (d.pd, &d.pd_error) {
                (false, _) => serde_json::Value::Null,
                (true, None) if d.pd_seen => "ok".into(),
                (true, None) => "connecting".into(),
                (true, Some(e)) => format!("unreachable: {e}").into(),
            };
            match st.unhealthy_reason() {
                None => json(
                    StatusCode::OK,
                    serde_json::json!({ "config_checksum": checksum, "pd": pd }),
                ),
                Some(r) => json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({ "config_checksum": checksum, "pd": pd, "unhealthy_reason": r }),
                ),
            }
        }
        (&Method::POST, "/debug/redirect") => {
            let q = req.uri().query().unwrap_or("");
            let param = |k: &str| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            };
            match st.redirect(param("from").as_deref(), param("to").as_deref()) {
                Ok(n) => json(StatusCode::OK, serde_json::json!({ "redirected": n })),
                Err(e) => json(StatusCode::NOT_FOUND, serde_json::json!({ "error": e })),
            }
        }
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(metrics().render())))
            .expect("static response parts"),
        (_, "/debug/health" | "/metrics" | "/debug/redirect") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": format!("{} is not allowed on {}", req.method(), req.uri().path()) }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no route {} {}", req.method(), req.uri().path()) }),
        ),
    }
}

/// A checksum of the configuration in effect (TiProxy reports one so
/// operators can tell instances with different configs apart).
fn config_checksum<N: Network>(st: &State<N>) -> u32 {
    let text = toml::to_string(&st.config).unwrap_or_default();
    // FNV-1a: stable across builds, unlike the std hasher.
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
