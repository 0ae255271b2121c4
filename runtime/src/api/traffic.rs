//! `/api/traffic/{capture,replay,cancel,show}`: TiProxy's routes and form
//! fields (pingcap/tiproxy `pkg/server/api/traffic.go`). Replies are plain
//! text for capture, replay and cancel, JSON for show, as TiProxy's are;
//! errors are this API's JSON errors. One extra capture field, `file-size`
//! (bytes per file), exists for tests; TiProxy's files are 300 MiB.
//! Replay's `addr` (TiProxy's field: where to connect) defaults to this
//! proxy's own SQL port.

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
        (Method::POST, "replay") => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            replay(st, &b)
        }
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
        compare: field("compare").is_some_and(|c| c.eq_ignore_ascii_case("true")),
    };
    match traffic::start_capture(c) {
        Ok(()) => plain("capture started"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn replay<N: Network>(st: &State<N>, form: &[u8]) -> Resp {
    let cfg = st.live_config();
    if cfg.enable_traffic_replay == Some(false) {
        return error(StatusCode::BAD_REQUEST, "traffic replay is disabled");
    }
    let field = |k: &str| {
        form_urlencoded::parse(form)
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.into_owned())
    };
    let speed = match field("speed").filter(|s| !s.is_empty()) {
        None => 1.0,
        Some(s) => match s.parse::<f64>() {
            Ok(v) => v,
            Err(_) => return error(StatusCode::BAD_REQUEST, format!("invalid speed: {s}")),
        },
    };
    let ps_close = match traffic::PsClose::parse(&field("ps-close").unwrap_or_default()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let addr = match field("addr").filter(|a| !a.is_empty()) {
        Some(a) => a,
        None => match own_sql_addr(&cfg) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
    };
    let c = traffic::ReplayConfig {
        input: PathBuf::from(field("input").unwrap_or_default()),
        username: field("username").unwrap_or_default(),
        password: field("password").unwrap_or_default(),
        speed,
        read_only: field("readonly").is_some_and(|r| r.eq_ignore_ascii_case("true")),
        ps_close,
        key_path: cfg.security.encryption_key_path.clone(),
        addr,
    };
    match traffic::start_replay(c) {
        Ok(()) => plain("replay started"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The proxy's first SQL address, reachable from here (an unspecified
/// host becomes loopback).
fn own_sql_addr(cfg: &crate::config::Config) -> Result<String, String> {
    let addrs = cfg
        .proxy
        .sql_addrs()
        .map_err(|(k, m)| format!("{k}: {m}"))?;
    let first = addrs.first().ok_or("proxy.addr names no address")?;
    let (host, port) = first
        .rsplit_once(':')
        .ok_or_else(|| format!("proxy.addr {first} has no port"))?;
    let host = match host.trim_matches(['[', ']']) {
        "" | "0.0.0.0" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    };
    Ok(format!("{host}:{port}"))
}
