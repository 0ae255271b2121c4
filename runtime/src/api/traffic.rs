//! `/api/traffic/{capture,cancel,show}`: TiProxy's routes and form fields
//! (pingcap/tiproxy `pkg/server/api/traffic.go`). Replies are plain text
//! for capture and cancel, JSON for show, as TiProxy's are; errors are
//! this API's JSON errors. One extra capture field, `file-size` (bytes per
//! file), exists for tests; TiProxy's files are 300 MiB.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::{Resp, body, error, reply};
use crate::net::Network;
use crate::state::State;
use crate::traffic;

fn plain(msg: &str) -> Resp {
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(msg.to_string())))
        .expect("static response parts")
}

/// Serves `/api/traffic/<op>`.
pub(super) async fn route<N: Network>(st: &State<N>, op: &str, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    match (method, op) {
        (Method::POST, "capture") => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            capture(st, &b)
        }
        (Method::POST, "cancel") => match traffic::cancel() {
            Ok(m) => plain(m.as_str()),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::GET, "show") => reply(StatusCode::OK, traffic::show()),
        (Method::POST, "replay") => error(
            StatusCode::NOT_IMPLEMENTED,
            "traffic replay is not in this build yet; captures are TiProxy's native format, \
             replay them with TiProxy's tiproxyctl traffic replay",
        ),
        (m, op) => error(
            StatusCode::NOT_FOUND,
            format!("no route {m} /api/traffic/{op}"),
        ),
    }
}

fn capture<N: Network>(st: &State<N>, form: &[u8]) -> Resp {
    let cfg = st.live_config();
    if cfg.enable_traffic_replay == Some(false) {
        return error(StatusCode::BAD_REQUEST, "traffic capture is disabled");
    }
    let field = |k: &str| {
        form_urlencoded::parse(form)
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.into_owned())
    };
    let duration = match field("duration").map(|d| traffic::parse_go_duration(&d)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        None => Default::default(),
    };
    // TiProxy compresses unless told `compress=false`.
    let compress = field("compress")
        .and_then(|c| c.parse::<bool>().ok())
        .unwrap_or(true);
    let file_size = match field("file-size").map(|s| s.parse::<u64>()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "file-size must be a positive integer",
            );
        }
        None => traffic::store::FILE_SIZE,
    };
    let c = traffic::CaptureConfig {
        output: PathBuf::from(field("output").unwrap_or_default()),
        duration,
        compress,
        encryption_method: field("encrypt-method").unwrap_or_default(),
        key_path: cfg.security.encryption_key_path.clone(),
        file_size,
    };
    match traffic::start_capture(c) {
        Ok(()) => plain("capture started"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
