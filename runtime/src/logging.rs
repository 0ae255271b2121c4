//! Logging setup from `[log]`.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber. `RUST_LOG` overrides `log.level`.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let level = match cfg.level.to_lowercase().as_str() {
        "fatal" => "error".to_string(),
        l => l.to_string(),
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},hyper=warn,rustls=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let file = if cfg.log_file.filename.is_empty() {
        None
    } else {
        Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&cfg.log_file.filename)
                .map_err(|e| {
                    format!(
                        "log.log-file.filename: cannot open {}: {e}",
                        cfg.log_file.filename
                    )
                })?,
        )
    };
    let res = match (cfg.encoder.as_str(), file) {
        ("json", Some(f)) => builder.json().with_writer(Mutex::new(f)).try_init(),
        ("json", None) => builder.json().with_writer(std::io::stderr).try_init(),
        (_, Some(f)) => builder
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .try_init(),
        (_, None) => builder.with_writer(std::io::stderr).try_init(),
    };
    res.map_err(|e| e.to_string())
}
