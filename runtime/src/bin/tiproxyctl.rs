//! `tiproxyctl`: talks to a running tiproxy's HTTP API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(name = "tiproxyctl", version = tiproxy_runtime::VERSION, about = "Control a running tiproxy")]
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = match args.cmd {
        Cmd::Health => "/api/debug/health",
        Cmd::Metrics => "/api/metrics",
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(get(&args.host, args.port, path)) {
        Ok((status, body)) => {
            println!("{}", body.trim_end());
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

/// A minimal HTTP/1.0 GET.
async fn get(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
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
