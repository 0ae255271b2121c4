//! `tiproxyctl`: talks to a running tiproxy's HTTP API.

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(name = "tiproxyctl", version = tiproxy_runtime::VERSION, about = "Control a running tiproxy through its HTTP API")]
struct Args {
    /// API host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// API port.
    #[arg(long, default_value_t = 3080)]
    port: u16,
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
    /// Ask sessions to move at their next transaction boundary.
    Redirect {
        /// Only sessions on this backend.
        #[arg(long)]
        from: Option<String>,
        /// To this backend (default: the least loaded other one).
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigOp {
    /// Print it (TOML, or JSON with --json).
    Get {
        /// JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Apply a TOML file (or - for standard input); keys it leaves out keep
    /// their values.
    Set {
        /// The TOML file.
        file: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
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
            op: ConfigOp::Set { file },
        } => {
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
    match rt.block_on(request(&args.host, args.port, method, &path, &body)) {
        Ok((status, body)) => {
            // Pretty-print JSON; print anything else as it is.
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(body)),
                Err(_) => println!("{}", body.trim_end()),
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!(
                "tiproxyctl: cannot reach tiproxy at {}:{}: {e}",
                args.host, args.port
            );
            ExitCode::from(2)
        }
    }
}

/// A minimal HTTP/1.0 request.
async fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}
