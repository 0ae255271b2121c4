//! `tidb-double`: a TiDB cluster double in one process, for tests and the
//! playground. N instances share one store; a small HTTP control API starts,
//! shuts down, kills and restarts instances.
//!
//! Once listening it prints one JSON line on stdout:
//! `{"control":"127.0.0.1:P","instances":[{"index":0,"sql":"...","status":"...","state":"serving","connections":0}, ...]}`.
//! Logs go to stderr (`RUST_LOG` sets the level). SIGTERM or SIGINT kills
//! every instance and exits 0.
//!
//! Control API (`--control-addr`):
//! - `GET /instances`: the list above.
//! - `GET /instances/<i>`: one instance.
//! - `POST /instances`: start one more; optional JSON body
//!   `{"sql":"host:port","status":"host:port"}`.
//! - `POST /instances/<i>/shutdown`: TiDB's graceful shutdown, in the
//!   background (202; watch `state` go draining, closing, stopped).
//! - `POST /instances/<i>/kill`: drop every connection at once (200 when done).
//! - `POST /instances/<i>/restart`: start a stopped or killed instance again
//!   on the same addresses.
//! - `POST /instances/<i>/load`: `{"cpu":0.9,"memory":0.8}` (either may be
//!   left out): the CPU and memory use its `/metrics` reports.
//! - `POST /instances/<i>/errors`: `{"pd":0.9,"tikv":0.5}` (either may be
//!   left out): the share of its TSO requests to PD and RPCs to TiKV that
//!   fail, as its `/metrics` counters show (TiProxy's health factor).
//!
//! Cluster TLS, as TiDB's `[security] cluster-ssl-*`: `--status-tls-cert`
//! and `--status-tls-key` serve the status ports over HTTPS
//! (`--status-tls-ca`: clients must show a certificate it signed);
//! `--pd-tls-ca` (or `--pd-tls-skip-ca`), `--pd-tls-cert`, `--pd-tls-key`
//! register in PD over TLS.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tiproxy_runtime::config::TlsConfig;
use tiproxy_runtime::net::TokioNet;
use tiproxy_runtime::pd::EtcdPd;
use tiproxy_sim::tidb::pd::Registration;
use tiproxy_sim::tidb::{
    Cluster, ClusterOptions, DEFAULT_SERVER_VERSION, LocalCluster, TidbOptions,
};

#[derive(Debug, Parser)]
#[command(
    name = "tidb-double",
    version,
    about = "A TiDB cluster double: N instances sharing one store"
)]
struct Args {
    /// Instances to start.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Address the instances listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// SQL port of instance 0; instance i gets base + i. 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    sql_port_base: u16,
    /// Status port of instance 0; instance i gets base + i. 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    status_port_base: u16,
    /// graceful-wait-before-shutdown, seconds.
    #[arg(long, default_value_t = 0)]
    graceful_wait: u64,
    /// Seconds a graceful shutdown waits for open transactions.
    #[arg(long, default_value_t = 15)]
    graceful_close_timeout: u64,
    /// Control API address.
    #[arg(long, default_value = "127.0.0.1:0")]
    control_addr: String,
    /// Server version the instances announce.
    #[arg(long, default_value = DEFAULT_SERVER_VERSION)]
    server_version: String,
    /// Session token lifetime, seconds.
    #[arg(long, default_value_t = 60)]
    token_lifetime: u64,
    /// caching_sha2_password always asks for full authentication (as TiDB).
    #[arg(long)]
    no_sha2_fast_path: bool,
    /// No session-token signing cert: no migration support (as old TiDB).
    #[arg(long)]
    no_session_token: bool,
    /// Accept a PROXY protocol v2 header from clients (TiDB's
    /// proxy-protocol-networks); without it a header gets error 8052.
    #[arg(long)]
    proxy_protocol: bool,
    /// RNG seed for salts and the signing key.
    #[arg(long)]
    seed: Option<u64>,
    /// PD (etcd) endpoints to register every instance in, as TiDB does.
    #[arg(long, value_delimiter = ',')]
    pd: Vec<String>,
    /// Lease TTL of the PD registration, seconds (TiDB: 45).
    #[arg(long, default_value_t = 45)]
    pd_ttl: u64,
    /// Labels of every instance, `key=value,...` (e.g. `zone=east`).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Status ports over HTTPS with this certificate (PEM; TiDB's
    /// cluster-ssl-cert). Needs --status-tls-key.
    #[arg(long, requires = "status_tls_key")]
    status_tls_cert: Option<String>,
    /// The private key of --status-tls-cert (PEM).
    #[arg(long, requires = "status_tls_cert")]
    status_tls_key: Option<String>,
    /// Clients of the status ports must show a certificate this CA signed
    /// (PEM; TiDB's cluster-ssl-ca).
    #[arg(long, requires = "status_tls_cert")]
    status_tls_ca: Option<String>,
    /// Register in PD over TLS, verifying PD against this CA (PEM).
    #[arg(long)]
    pd_tls_ca: Option<String>,
    /// Register in PD over TLS without verifying PD.
    #[arg(long)]
    pd_tls_skip_ca: bool,
    /// The certificate shown to PD (PEM). Needs --pd-tls-key.
    #[arg(long, requires = "pd_tls_key")]
    pd_tls_cert: Option<String>,
    /// The private key of --pd-tls-cert (PEM).
    #[arg(long, requires = "pd_tls_cert")]
    pd_tls_key: Option<String>,
}

impl Args {
    /// The status ports' TLS, built with the proxy's own rules.
    fn status_tls(&self) -> Result<Option<Arc<tokio_rustls::rustls::ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.status_tls_cert, &self.status_tls_key) else {
            return Ok(None);
        };
        let cfg = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: self.status_tls_ca.clone().unwrap_or_default(),
            ..TlsConfig::default()
        };
        tiproxy_runtime::tls::server_config(&cfg, "status-tls", std::path::Path::new("."))
            .map_err(|e| format!("--{e}"))
    }

    /// PD's TLS (`cluster-tls` rules: on with a CA or skip-ca).
    fn pd_tls(&self) -> Result<Option<Arc<tokio_rustls::rustls::ClientConfig>>, String> {
        let cfg = TlsConfig {
            ca: self.pd_tls_ca.clone().unwrap_or_default(),
            skip_ca: self.pd_tls_skip_ca,
            cert: self.pd_tls_cert.clone().unwrap_or_default(),
            key: self.pd_tls_key.clone().unwrap_or_default(),
            ..TlsConfig::default()
        };
        tiproxy_runtime::tls::cluster_config(&cfg).map_err(|e| format!("--pd-tls: {e}"))
    }
}

impl Args {
    fn label_map(&self, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self
            .labels
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.extend(extra.clone());
        m
    }
}

fn port_of(base: u16, i: usize) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(i as u16)
    }
}

struct Control {
    fleet: LocalCluster<TokioNet>,
    args: Args,
    /// TLS towards PD; `None`: plain.
    pd_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// PD registration task and record per instance.
    registrations: Mutex<HashMap<usize, (tokio::task::JoinHandle<()>, Registration)>>,
}

impl Control {
    /// Registers instance `i` in PD (when `--pd` is given).
    fn register(&self, i: usize, labels: &BTreeMap<String, String>) {
        if self.args.pd.is_empty() {
            return;
        }
        let Some(info) = self.fleet.instances().into_iter().find(|x| x.index == i) else {
            return;
        };
        let reg = Registration {
            pd: self.args.pd.clone(),
            sql: info.sql.clone(),
            status_port: info
                .status
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0),
            version: self.args.server_version.clone(),
            labels: self.args.label_map(labels),
            ttl: Duration::from_secs(self.args.pd_ttl),
            tls: self.pd_tls.clone(),
        };
        let task = tiproxy_runtime::task::spawn(reg.clone().keep_registered(EtcdPd));
        if let Some((old, _)) = self
            .registrations
            .lock()
            .expect("registrations")
            .insert(i, (task, reg))
        {
            old.abort();
        }
    }

    /// A crash: the registration stops being kept alive and expires.
    fn crash_registration(&self, i: usize) {
        if let Some((task, _)) = self.registrations.lock().expect("registrations").remove(&i) {
            task.abort();
        }
    }

    /// The end of a graceful shutdown: the keys are deleted.
    async fn deregister(&self, i: usize) {
        let entry = self.registrations.lock().expect("registrations").remove(&i);
        if let Some((task, reg)) = entry {
            task.abort();
            if let Err(e) = reg.deregister(&EtcdPd).await {
                tracing::warn!(sql = %reg.sql, "PD deregistration failed: {e}");
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidb-double: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidb-double: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let status_tls = args.status_tls()?;
    let pd_tls = args.pd_tls()?;
    let cluster = Cluster::new(ClusterOptions {
        seed: args.seed,
        token_lifetime: Duration::from_secs(args.token_lifetime),
        ..ClusterOptions::default()
    });
    let opts = TidbOptions {
        server_version: args.server_version.clone(),
        graceful_wait: Duration::from_secs(args.graceful_wait),
        graceful_close_timeout: Duration::from_secs(args.graceful_close_timeout),
        caching_sha2_fast_path: !args.no_sha2_fast_path,
        session_token_signing: !args.no_session_token,
        proxy_protocol: args.proxy_protocol,
        status_tls,
        ..TidbOptions::default()
    };
    let fleet = LocalCluster::new(TokioNet::default(), cluster, opts);
    for i in 0..args.instances {
        let sql = format!("{}:{}", args.host, port_of(args.sql_port_base, i));
        let status = format!("{}:{}", args.host, port_of(args.status_port_base, i));
        fleet
            .start_instance(&sql, &status)
            .await
            .map_err(|e| format!("cannot start instance {i} on {sql} / {status}: {e}"))?;
    }
    let listener = tokio::net::TcpListener::bind(&args.control_addr)
        .await
        .map_err(|e| format!("cannot bind the control address {}: {e}", args.control_addr))?;
    let control_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let ctl = Arc::new(Control {
        fleet,
        args,
        pd_tls,
        registrations: Mutex::new(HashMap::new()),
    });
    for i in 0..ctl.args.instances {
        ctl.register(i, &BTreeMap::new());
    }
    let line = serde_json::json!({
        "control": control_addr.to_string(),
        "instances": ctl.fleet.instances(),
    });
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    tracing::info!(control = %control_addr, "tidb-double ready");

    let accept_ctl = Arc::clone(&ctl);
    let accept = tiproxy_runtime::task::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let ctl = Arc::clone(&accept_ctl);
            tiproxy_runtime::task::spawn(async move {
                let svc = service_fn(move |req| {
                    let ctl = Arc::clone(&ctl);
                    async move { Ok::<_, Infallible>(route(&ctl, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    wait_for_signal().await;
    tracing::info!("signal received: killing every instance");
    accept.abort();
    ctl.fleet.kill_all().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, serde_json::json!({ "error": msg.to_string() }))
}

#[derive(Debug, Default, Deserialize)]
struct NewInstance {
    sql: Option<String>,
    status: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn route(ctl: &Arc<Control>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["instances"]) => {
            reply(StatusCode::OK, serde_json::json!(ctl.fleet.instances()))
        }
        (Method::POST, ["instances"]) => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let want: NewInstance = if body.iter().all(u8::is_ascii_whitespace) {
                NewInstance::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(w) => w,
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")),
                }
            };
            let i = ctl.fleet.instances().len();
            let sql = want.sql.unwrap_or_else(|| {
                format!("{}:{}", ctl.args.host, port_of(ctl.args.sql_port_base, i))
            });
            let status = want.status.unwrap_or_else(|| {
                format!(
                    "{}:{}",
                    ctl.args.host,
                    port_of(ctl.args.status_port_base, i)
                )
            });
            match ctl.fleet.start_instance(&sql, &status).await {
                Ok(info) => {
                    ctl.register(info.index, &want.labels);
                    reply(StatusCode::OK, serde_json::json!(info))
                }
                Err(e) => error(
                    StatusCode::CONFLICT,
                    format!("cannot start on {sql} / {status}: {e}"),
                ),
            }
        }
        (m, ["instances", idx, rest @ ..]) => {
            let Some(i) = idx
                .parse::<usize>()
                .ok()
                .filter(|i| ctl.fleet.instance(*i).is_some())
            else {
                return error(StatusCode::NOT_FOUND, format!("no instance {idx}"));
            };
            // Checked just above.
            let Some(h) = ctl.fleet.instance(i) else {
                return error(StatusCode::NOT_FOUND, format!("no instance {idx}"));
            };
            let current = |ctl: &Control| serde_json::json!(ctl.fleet.instances().get(i).cloned());
            match (m, rest) {
                (Method::GET, []) => reply(StatusCode::OK, current(ctl)),
                (Method::POST, ["shutdown"]) => {
                    h.start_graceful_shutdown();
                    if !ctl.args.pd.is_empty() {
                        let ctl2 = Arc::clone(ctl);
                        let h2 = h.clone();
                        tiproxy_runtime::task::spawn(async move {
                            h2.stopped().await;
                            ctl2.deregister(i).await;
                        });
                    }
                    reply(StatusCode::ACCEPTED, current(ctl))
                }
                (Method::POST, ["kill"]) => {
                    ctl.crash_registration(i);
                    h.kill();
                    h.stopped().await;
                    reply(StatusCode::OK, current(ctl))
                }
                (Method::POST, ["load"]) => {
                    #[derive(Deserialize)]
                    struct Load {
                        cpu: Option<f64>,
                        memory: Option<f64>,
                    }
                    let body = match req.into_body().collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => return error(StatusCode::BAD_REQUEST, e),
                    };
                    let load: Load = match serde_json::from_slice(&body) {
                        Ok(l) => l,
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}"));
                        }
                    };
                    if [load.cpu, load.memory]
                        .iter()
                        .flatten()
                        .any(|v| !(0.0..=1.0).contains(v))
                    {
                        return error(StatusCode::BAD_REQUEST, "cpu and memory are 0.0-1.0");
                    }
                    h.set_load(load.cpu, load.memory);
                    reply(StatusCode::OK, current(ctl))
                }
                (Method::POST, ["errors"]) => {
                    #[derive(Deserialize)]
                    struct Errors {
                        pd: Option<f64>,
                        tikv: Option<f64>,
                    }
                    let body = match req.into_body().collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => return error(StatusCode::BAD_REQUEST, e),
                    };
                    let e: Errors = match serde_json::from_slice(&body) {
                        Ok(e) => e,
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}"));
                        }
                    };
                    if [e.pd, e.tikv]
                        .iter()
                        .flatten()
                        .any(|v| !(0.0..=1.0).contains(v))
                    {
                        return error(StatusCode::BAD_REQUEST, "pd and tikv are 0.0-1.0");
                    }
                    h.set_errors(e.pd, e.tikv);
                    reply(StatusCode::OK, current(ctl))
                }
                (Method::POST, ["restart"]) => match ctl.fleet.restart(i).await {
                    Ok(info) => {
                        ctl.register(i, &BTreeMap::new());
                        reply(StatusCode::OK, serde_json::json!(info))
                    }
                    Err(e) => error(StatusCode::CONFLICT, e),
                },
                _ => error(StatusCode::NOT_FOUND, format!("no route {path}")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no route {path}")),
    }
}
