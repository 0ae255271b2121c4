//! `tiproxyctl`: talks to a running tiproxy's HTTP API.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tiproxy_runtime::http_client::{self, HttpError};

#[derive(Parser, Debug)]
#[command(name = "tiproxyctl", version = tiproxy_runtime::VERSION, long_version = tiproxy_runtime::LONG_VERSION, about = "Control a running tiproxy through its HTTP API")]
struct Args {
    /// API host.
    #[arg(long, default_value = "localhost", global = true)]
    host: String,
    /// API port.
    #[arg(long, default_value_t = 3080, global = true)]
    port: u16,
    /// HTTPS, verifying tiproxy's certificate against this CA (PEM);
    /// `skip` is the same as --insecure.
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<String>,
    /// HTTPS with this client certificate (PEM), for an API whose
    /// `security.server-http-tls.ca` requires one. Without --ca, tiproxy's
    /// certificate is verified against the public web roots.
    #[arg(long, value_name = "FILE", requires = "key", global = true)]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert", global = true)]
    key: Option<PathBuf>,
    /// HTTPS without verifying tiproxy's certificate (testing, expired
    /// certificates).
    #[arg(long, short = 'k', global = true)]
    insecure: bool,
    /// Format of tiproxyctl's own log (on stderr): tidb, json or console.
    #[arg(
        long = "log_encoder",
        value_name = "ENCODER",
        default_value = "tidb",
        global = true
    )]
    log_encoder: String,
    /// Level of tiproxyctl's own log: debug shows each request and answer.
    #[arg(
        long = "log_level",
        value_name = "LEVEL",
        default_value = "warn",
        global = true
    )]
    log_level: String,
    /// Indent JSON answers; `--indent=false` prints each on one line.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        global = true
    )]
    indent: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Health of the proxy (exit 1 when unhealthy).
    Health,
    /// Prometheus metrics.
    Metrics,
    /// The configuration in effect.
    Config {
        #[command(subcommand)]
        op: ConfigOp,
    },
    /// Backends with state and connection counts.
    Backends,
    /// Move every session off a backend and give it no new ones.
    Drain {
        /// Backend SQL address (host:port).
        addr: String,
    },
    /// Undo `drain`.
    Undrain {
        /// Backend SQL address (host:port).
        addr: String,
    },
    /// Sessions: client, backend, user, database, transaction, idle time.
    Sessions,
    /// The playground's TiDB doubles (`scripts/run.sh`): list, add, shut
    /// down, kill, restart, load. Talks to the doubles' control API, not to
    /// tiproxy.
    Tidb {
        /// The TiDB doubles' control API.
        #[arg(long, default_value = "127.0.0.1:4080")]
        control: String,
        #[command(subcommand)]
        op: TidbOp,
    },
    /// Ask sessions to move at their next transaction boundary.
    Redirect {
        /// Only sessions on this backend.
        #[arg(long)]
        from: Option<String>,
        /// To this backend (default: the least loaded other one).
        #[arg(long)]
        to: Option<String>,
    },
    /// Traffic capture and replay in TiProxy's native format (TiProxy's
    /// commands).
    Traffic {
        #[command(subcommand)]
        op: TrafficOp,
    },
}

#[derive(Subcommand, Debug)]
enum TrafficOp {
    /// Capture every command of every session into files.
    Capture {
        /// Directory for the traffic files (on the proxy's host).
        #[arg(long)]
        output: String,
        /// How long, as Go writes durations (`15s`, `1m30s`).
        #[arg(long)]
        duration: String,
        /// `aes256-ctr` (key: the proxy's security.encryption-key-path).
        #[arg(long)]
        encryption_method: Option<String>,
        /// gzip the files (TiProxy's default; `--compress=false` to not).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        compress: bool,
        /// Also keep a digest of each command's result (rows, affected
        /// rows, error code); a replay of this capture then reports every
        /// statement whose result differs.
        #[arg(long)]
        compare: bool,
    },
    /// Replay a capture against the cluster behind this proxy.
    Replay {
        /// Directory of the traffic files (on the proxy's host).
        #[arg(long)]
        input: String,
        /// The user replay logs in as.
        #[arg(long)]
        username: String,
        /// Its password (asked on the terminal when not given).
        #[arg(long)]
        password: Option<String>,
        /// Speed: 2 replays twice as fast (0.1 to 10).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Only replay statements that do not write.
        #[arg(long)]
        read_only: bool,
        /// When prepared statements are closed: `directed` (as captured),
        /// `always` (after each execution), `never`.
        #[arg(long, default_value = "directed")]
        ps_close: String,
        /// Where to connect (default: the proxy's own SQL port).
        #[arg(long)]
        addr: Option<String>,
    },
    /// Stop the running capture or replay.
    Cancel,
    /// The jobs: status, progress, errors.
    Show,
}

#[derive(Subcommand, Debug)]
enum TidbOp {
    /// Every instance with its addresses, state and connections.
    List,
    /// Start one more instance (registered in PD: tiproxy finds it).
    Add {
        /// Labels to register with, `key=value` (e.g. `zone=east`).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// TiDB's graceful shutdown: /status turns 500, tiproxy moves the
    /// sessions away, then the instance stops.
    Shutdown {
        /// Instance index (from `list`).
        index: usize,
    },
    /// Drop every connection at once, as a crash would.
    Kill {
        /// Instance index.
        index: usize,
    },
    /// Start a stopped or killed instance again on the same addresses.
    Restart {
        /// Instance index.
        index: usize,
    },
    /// Make an instance report CPU and memory use on its `/metrics` (what
    /// tiproxy's resource balancing reads).
    Load {
        /// Instance index.
        index: usize,
        /// CPU use, 0.0-1.0 of its processors.
        #[arg(long)]
        cpu: Option<f64>,
        /// Memory use, 0.0-1.0 of its memory quota.
        #[arg(long)]
        memory: Option<f64>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

#[derive(Subcommand, Debug)]
enum ConfigOp {
    /// Print it (TOML, or JSON with --json).
    Get {
        /// JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Apply TOML from a file (or standard input when none is given, or
    /// for -); keys it leaves out keep their values.
    Set {
        /// The TOML file (TiProxy's form: --input FILE).
        #[arg(long, value_name = "FILE", conflicts_with = "file")]
        input: Option<String>,
        /// The TOML file.
        file: Option<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_log(&args) {
        eprintln!("tiproxyctl: {e}");
        return ExitCode::from(2);
    }
    let mut target = format!("{}:{}", args.host, args.port);
    let mut what = "tiproxy";
    let (method, path, body) = match &args.cmd {
        Cmd::Health => ("GET", "/api/debug/health".to_string(), String::new()),
        Cmd::Metrics => ("GET", "/api/metrics".to_string(), String::new()),
        Cmd::Config {
            op: ConfigOp::Get { json },
        } => (
            "GET",
            if *json {
                "/api/admin/config?format=json"
            } else {
                "/api/admin/config"
            }
            .to_string(),
            String::new(),
        ),
        Cmd::Config {
            op: ConfigOp::Set { input, file },
        } => {
            let file = input.as_deref().or(file.as_deref()).unwrap_or("-");
            let mut text = String::new();
            let read = if file == "-" {
                std::io::stdin().read_to_string(&mut text).map(|_| ())
            } else {
                std::fs::read_to_string(file).map(|t| text = t)
            };
            if let Err(e) = read {
                eprintln!("tiproxyctl: cannot read {file}: {e}");
                return ExitCode::from(2);
            }
            ("PUT", "/api/admin/config".to_string(), text)
        }
        Cmd::Backends => ("GET", "/api/backends".to_string(), String::new()),
        Cmd::Drain { addr } => ("POST", format!("/api/backends/{addr}/drain"), String::new()),
        Cmd::Undrain { addr } => (
            "POST",
            format!("/api/backends/{addr}/undrain"),
            String::new(),
        ),
        Cmd::Sessions => ("GET", "/api/sessions".to_string(), String::new()),
        Cmd::Tidb { control, op } => {
            target = control.clone();
            what = "the TiDB doubles' control API";
            match op {
                TidbOp::List => ("GET", "/instances".to_string(), String::new()),
                TidbOp::Add { labels } => {
                    let labels: serde_json::Map<String, serde_json::Value> = labels
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                        .collect();
                    (
                        "POST",
                        "/instances".to_string(),
                        serde_json::json!({ "labels": labels }).to_string(),
                    )
                }
                TidbOp::Shutdown { index } => (
                    "POST",
                    format!("/instances/{index}/shutdown"),
                    String::new(),
                ),
                TidbOp::Kill { index } => {
                    ("POST", format!("/instances/{index}/kill"), String::new())
                }
                TidbOp::Restart { index } => {
                    ("POST", format!("/instances/{index}/restart"), String::new())
                }
                TidbOp::Load { index, cpu, memory } => {
                    for (name, v) in [("--cpu", cpu), ("--memory", memory)] {
                        if let Some(v) = v
                            && !(0.0..=1.0).contains(v)
                        {
                            eprintln!("tiproxyctl: {name} must be within 0.0-1.0, got {v}");
                            return ExitCode::from(2);
                        }
                    }
                    (
                        "POST",
                        format!("/instances/{index}/load"),
                        serde_json::json!({ "cpu": cpu, "memory": memory }).to_string(),
                    )
                }
            }
        }
        Cmd::Redirect { from, to } => {
            let mut q = Vec::new();
            if let Some(f) = from {
                q.push(format!("from={f}"));
            }
            if let Some(t) = to {
                q.push(format!("to={t}"));
            }
            let path = if q.is_empty() {
                "/api/debug/redirect".to_string()
            } else {
                format!("/api/debug/redirect?{}", q.join("&"))
            };
            ("POST", path, String::new())
        }
        Cmd::Traffic { op } => match op {
            TrafficOp::Capture {
                output,
                duration,
                encryption_method,
                compress,
                compare,
            } => {
                let mut f = form_urlencoded::Serializer::new(String::new());
                f.append_pair("output", output)
                    .append_pair("duration", duration)
                    .append_pair("compress", if *compress { "true" } else { "false" });
                if let Some(m) = encryption_method {
                    f.append_pair("encrypt-method", m);
                }
                if *compare {
                    f.append_pair("compare", "true");
                }
                ("POST", "/api/traffic/capture".to_string(), f.finish())
            }
            TrafficOp::Replay {
                input,
                username,
                password,
                speed,
                read_only,
                ps_close,
                addr,
            } => {
                let password = match password {
                    Some(p) => p.clone(),
                    None => {
                        eprint!("Input password for user {username}: ");
                        let mut line = String::new();
                        if let Err(e) = std::io::stdin().read_line(&mut line) {
                            eprintln!("tiproxyctl: cannot read the password: {e}");
                            return ExitCode::from(2);
                        }
                        line.trim_end_matches(['\r', '\n']).to_string()
                    }
                };
                let mut f = form_urlencoded::Serializer::new(String::new());
                f.append_pair("input", input)
                    .append_pair("username", username)
                    .append_pair("password", &password)
                    .append_pair("speed", &speed.to_string())
                    .append_pair("readonly", if *read_only { "true" } else { "false" })
                    .append_pair("ps-close", ps_close);
                if let Some(a) = addr {
                    f.append_pair("addr", a);
                }
                ("POST", "/api/traffic/replay".to_string(), f.finish())
            }
            TrafficOp::Cancel => ("POST", "/api/traffic/cancel".to_string(), String::new()),
            TrafficOp::Show => ("GET", "/api/traffic/show".to_string(), String::new()),
        },
    };
    // The TiDB doubles' control API is plain HTTP.
    let tls = if matches!(args.cmd, Cmd::Tidb { .. }) {
        None
    } else {
        match tls_config(&args) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tiproxyctl: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tiproxyctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::debug!(
        method,
        url = %format!(
            "{}://{target}{path}",
            if tls.is_some() { "https" } else { "http" }
        ),
        body_bytes = body.len(),
        "request"
    );
    let call = request(&target, &args.host, tls, method, &path, &body);
    match rt.block_on(async { tokio::time::timeout(TIMEOUT, call).await }) {
        Err(_) => {
            eprintln!(
                "tiproxyctl: {what} at {target} did not answer within {}s",
                TIMEOUT.as_secs()
            );
            ExitCode::from(2)
        }
        Ok(r) => report(r, what, &target, args.indent),
    }
}

/// tiproxyctl's own log, on stderr, as `--log_encoder` and `--log_level`
/// say (TiProxy's flags and defaults).
fn init_log(args: &Args) -> Result<(), String> {
    if !["debug", "info", "warn", "error"].contains(&args.log_level.to_lowercase().as_str()) {
        return Err(format!(
            "--log_level {:?} is not one of debug, info, warn, error",
            args.log_level
        ));
    }
    if !["tidb", "json", "console"].contains(&args.log_encoder.as_str()) {
        return Err(format!(
            "--log_encoder {:?} is not one of tidb, json, console",
            args.log_encoder
        ));
    }
    tiproxy_runtime::logging::init(&tiproxy_runtime::config::LogConfig {
        level: args.log_level.to_lowercase(),
        encoder: args.log_encoder.clone(),
        ..Default::default()
    })
}

/// How long one request may take, connecting included.
const TIMEOUT: Duration = Duration::from_secs(30);

fn report(r: Result<(u16, String), Failure>, what: &str, target: &str, indent: bool) -> ExitCode {
    match r {
        Ok((status, body)) => {
            tracing::debug!(status, body_bytes = body.len(), "answer");
            // JSON indented (or on one line); anything else as it is.
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => {
                    let out = if indent {
                        serde_json::to_string_pretty(&v)
                    } else {
                        serde_json::to_string(&v)
                    };
                    println!("{}", out.unwrap_or(body))
                }
                Err(_) => println!("{}", body.trim_end()),
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(Failure::Connect(e)) => {
            eprintln!("tiproxyctl: cannot reach {what} at {target}: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Tls(e)) => {
            eprintln!("tiproxyctl: TLS with {what} at {target} failed: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Io(e)) => {
            eprintln!("tiproxyctl: talking to {what} at {target} failed: {e}");
            ExitCode::from(2)
        }
        Err(Failure::NotHttp) => {
            eprintln!(
                "tiproxyctl: {what} at {target} did not answer in HTTP \
                 (if its API is HTTPS, pass --ca FILE or --insecure)"
            );
            ExitCode::from(2)
        }
    }
}

/// Why a request got no HTTP answer.
enum Failure {
    /// No TCP connection.
    Connect(std::io::Error),
    /// The TLS handshake or session failed (with a hint).
    Tls(String),
    /// The connection broke.
    Io(String),
    /// The answer was not HTTP.
    NotHttp,
}

/// The TLS client setup the flags ask for, or `None` for plain HTTP.
fn tls_config(args: &Args) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let insecure = args.insecure || args.ca.as_deref() == Some("skip");
    if !insecure && args.ca.is_none() && args.cert.is_none() {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tiproxy_runtime::tls::SkipVerify))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &args.ca {
            Some(ca) => {
                for c in read_certs("--ca", ca.as_ref())? {
                    roots.add(c).map_err(|e| format!("--ca {ca}: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("--cert", cert)?;
            let private = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--key {}: cannot read a private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| format!("--cert/--key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

fn read_certs(flag: &str, path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {shown}: cannot read: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {shown}: bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{flag} {shown}: no certificate in the file"));
    }
    Ok(certs)
}

/// Largest answer body read (the API's listings are a few MiB at most).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// One request with the runtime's HTTP client, over TLS when `tls` is set.
async fn request(
    addr: &str,
    host: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Failure> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Failure::Connect)?;
    let body = bytes::Bytes::copy_from_slice(body.as_bytes());
    let answer = match tls {
        None => http_client::send(tcp, addr, method, path, body, BODY_LIMIT).await,
        Some(tls) => {
            let name =
                ServerName::try_from(host.trim_matches(['[', ']']).to_string()).map_err(|e| {
                    Failure::Tls(format!("--host {host} is not a valid TLS server name: {e}"))
                })?;
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| failure(&e))?;
            http_client::send(s, addr, method, path, body, BODY_LIMIT).await
        }
    };
    match answer {
        Ok(r) => Ok((r.status, String::from_utf8_lossy(&r.body).into_owned())),
        Err(HttpError::NotHttp(_)) => Err(Failure::NotHttp),
        // Closed without a word: a TLS server refusing a plain request.
        Err(HttpError::Http(e)) if e.is_incomplete_message() => Err(Failure::NotHttp),
        Err(e) => match e.io_error() {
            Some(io) => Err(failure(io)),
            None => Err(Failure::Io(e.to_string())),
        },
    }
}

/// Names a TLS failure and what to check.
fn failure(e: &std::io::Error) -> Failure {
    use rustls::AlertDescription as A;
    let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Failure::Io(e.to_string());
    };
    let hint = match t {
        rustls::Error::InvalidCertificate(_) => {
            "tiproxy's certificate is not trusted: pass --ca with the CA that signed it \
             (security.server-http-tls), or --insecure"
        }
        rustls::Error::AlertReceived(
            A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateUnknown,
        ) => {
            "tiproxy refused the client certificate: its security.server-http-tls.ca \
             requires --cert/--key signed by that CA"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the answer is not TLS: is tiproxy's API plain HTTP (no \
             security.server-http-tls)? Then drop --ca/--cert/--insecure"
        }
        _ => "",
    };
    Failure::Tls(if hint.is_empty() {
        t.to_string()
    } else {
        format!("{t}; {hint}")
    })
}
