//! The configuration file: TiProxy's format and defaults (so an existing
//! `proxy.toml` works unchanged), plus `proxy.backend-addrs` for running
//! without PD. Every key is defined once, here, with its default.
//!
//! Unknown keys produce warnings; a bad value stops start-up with an error
//! that names the file and the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod balance;
mod clusters;
mod ha;
mod keepalive;
mod listen;
mod not_applicable;
mod reload_class;

pub use clusters::{BackendCluster, DEFAULT_CLUSTER};
pub use ha::{HaConfig, VirtualIp};
pub use keepalive::Keepalive;
pub use reload_class::{changed_keys, classify};

pub use balance::{
    BalanceConfig, ConnCountFactor, CpuFactor, HealthFactor, LocationFactor, MemoryFactor,
    RESTART_REQUIRED, StatusFactor,
};

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file the value came from.
    pub file: String,
    /// The key (dotted path), or "-" when the file itself is unreadable.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct Config {
    /// SQL listener, backends, connection handling.
    pub proxy: ProxyConfig,
    /// HTTP API listener.
    pub api: ApiConfig,
    /// TLS on every leg.
    pub security: SecurityConfig,
    /// Logging.
    pub log: LogConfig,
    /// Balancing: policy, factors, rates.
    pub balance: BalanceConfig,
    /// How backends are health-checked (not in TiProxy's file format: its
    /// knobs of the same names are fixed in code).
    pub health_check: HealthCheckConfig,
    /// Labels of this proxy instance (e.g. `zone`).
    pub labels: BTreeMap<String, String>,
    /// Working directory for generated files (auto-certs).
    pub workdir: String,
    /// TiProxy's switch of `/api/traffic` (capture and replay): unset means on, as
    /// TiProxy's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_traffic_replay: Option<bool>,
    /// Virtual IP failover between proxies.
    pub ha: HaConfig,
    /// TiProxy's metering section (not applicable, warned about).
    pub metering: toml::Table,
}

/// `[proxy]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct ProxyConfig {
    /// SQL listen address(es), comma separated.
    pub addr: String,
    /// The host registered in PD (TiProxy's meaning: a host or DNS name,
    /// the SQL port is added; a `host:port` is taken whole). The
    /// `--advertise-addr` flag overrides it.
    pub advertise_addr: String,
    /// PD endpoints, comma separated; empty for static backends. When unset
    /// and `backend-addrs` is given, static backends are used; when both
    /// are unset, TiProxy's default `127.0.0.1:2379`.
    pub pd_addrs: Option<String>,
    /// Static backend list, used when `pd-addrs` is empty: `"host:port"`,
    /// or `{ addr = "host:port", status-addr = "host:10080" }` to also
    /// watch the TiDB status port (500 means draining: sessions move away).
    pub backend_addrs: Vec<BackendEntry>,
    /// TiProxy's port range `[first, last]`: with one host in `addr`, a
    /// listener on each port of the range (`addr`'s own port is unused).
    pub port_range: Vec<i64>,
    /// Maximum client connections; 0 means unlimited.
    pub max_connections: u64,
    /// TiProxy's memory-based rejection threshold (accepted, not implemented).
    pub high_memory_usage_reject_threshold: f64,
    /// Largest amount of bytes buffered towards a slow peer before the
    /// proxy stops reading the other side; 0 means 32 KiB. 1 KiB to 16 MiB.
    pub conn_buffer_size: i64,
    /// Crash protection: keep a copy of every idle session's state (TiDB's
    /// `SHOW SESSION_STATES`) so it survives its TiDB's crash on another
    /// TiDB. Off by default: it costs one query per state change.
    pub session_protection: bool,
    /// Largest state copy kept per session, in bytes (1 KiB to 16 MiB);
    /// a session with more state is not protected.
    pub session_state_cap: i64,
    /// How long a session must stay idle after a state change before its
    /// copy is re-exported (Go-style duration, `"0s"` to `"10s"`; `"0s"`:
    /// at once). Back-to-back statements then cost no export.
    pub session_protection_delay: String,
    /// Keepalive on client connections.
    #[serde(deserialize_with = "Keepalive::frontend_over")]
    pub frontend_keepalive: Keepalive,
    /// Keepalive on connections to healthy backends.
    #[serde(deserialize_with = "Keepalive::healthy_over")]
    pub backend_healthy_keepalive: Keepalive,
    /// Keepalive on connections to unhealthy backends.
    #[serde(deserialize_with = "Keepalive::unhealthy_over")]
    pub backend_unhealthy_keepalive: Keepalive,
    /// `"v2"`: accept a PROXY v2 header from a load balancer and write one
    /// to backends; `""`: off.
    pub proxy_protocol: String,
    /// Seconds to report unhealthy before shutting down.
    pub graceful_wait_before_shutdown: u64,
    /// Seconds to wait for sessions to reach a transaction boundary on shutdown.
    pub graceful_close_conn_timeout: u64,
    /// TiProxy's public endpoints (accepted, not implemented).
    pub public_endpoints: Vec<String>,
    /// TiProxy's clusters, each discovered through its own PD (replaces
    /// `pd-addrs`; reloadable).
    pub backend_clusters: Vec<BackendCluster>,
    /// TiProxy's failover list (accepted, not implemented).
    pub fail_backend_list: Vec<String>,
    /// TiProxy's failover timeout (accepted, not implemented).
    pub failover_timeout: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:6000".into(),
            advertise_addr: String::new(),
            pd_addrs: None,
            backend_addrs: Vec::new(),
            port_range: Vec::new(),
            max_connections: 0,
            high_memory_usage_reject_threshold: 0.9,
            conn_buffer_size: 0,
            session_protection: false,
            session_state_cap: 64 * 1024,
            session_protection_delay: "200ms".into(),
            frontend_keepalive: Keepalive::default(),
            backend_healthy_keepalive: Keepalive::backend_healthy(),
            backend_unhealthy_keepalive: Keepalive::backend_unhealthy(),
            proxy_protocol: String::new(),
            graceful_wait_before_shutdown: 0,
            graceful_close_conn_timeout: 15,
            public_endpoints: Vec::new(),
            backend_clusters: Vec::new(),
            fail_backend_list: Vec::new(),
            failover_timeout: 60,
        }
    }
}

impl ProxyConfig {
    /// PD endpoints in effect (empty: static backends).
    pub fn effective_pd_addrs(&self) -> Vec<String> {
        let raw = match &self.pd_addrs {
            Some(s) => s.as_str(),
            None if !self.backend_addrs.is_empty() => "",
            None => "127.0.0.1:2379",
        };
        split_list(raw)
    }

    /// Crash-protection settings of new sessions.
    pub fn protect(&self) -> tiproxy_core::session::protect::ProtectConfig {
        tiproxy_core::session::protect::ProtectConfig {
            enabled: self.session_protection,
            state_cap: self.session_state_cap.clamp(0, u32::MAX.into()) as u32,
            // Validated at load (at most 10 s); the default if unparsable.
            delay_ms: parse_duration(&self.session_protection_delay)
                .map_or(tiproxy_core::session::protect::DEFAULT_DELAY_MS, |d| {
                    d.as_millis().min(u16::MAX.into()) as u16
                }),
            ..Default::default()
        }
    }

    /// Buffer limit in bytes.
    pub fn buffer_limit(&self) -> usize {
        if self.conn_buffer_size == 0 {
            32 * 1024
        } else {
            self.conn_buffer_size as usize
        }
    }
}

/// One static backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BackendEntry {
    /// `"host:port"` of the SQL port.
    Addr(String),
    /// SQL port and, optionally, the TiDB status port.
    Full {
        /// `host:port` of the SQL port.
        addr: String,
        /// `host:port` of the status port (`GET /status`).
        #[serde(
            default,
            rename = "status-addr",
            skip_serializing_if = "Option::is_none"
        )]
        status_addr: Option<String>,
        /// Labels (TiDB's `labels` in PD); `zone` is matched against this
        /// proxy's own `labels.zone` by the location factor.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
    },
}

impl BackendEntry {
    /// The SQL address.
    pub fn addr(&self) -> &str {
        match self {
            BackendEntry::Addr(a) | BackendEntry::Full { addr: a, .. } => a,
        }
    }

    /// The status address, if given.
    pub fn status_addr(&self) -> Option<&str> {
        match self {
            BackendEntry::Addr(_) => None,
            BackendEntry::Full { status_addr, .. } => status_addr.as_deref(),
        }
    }

    /// Its `zone` label, if any.
    pub fn zone(&self) -> Option<&str> {
        match self {
            BackendEntry::Addr(_) => None,
            BackendEntry::Full { labels, .. } => labels.get("zone").map(String::as_str),
        }
    }
}

impl From<&str> for BackendEntry {
    fn from(s: &str) -> Self {
        BackendEntry::Addr(s.to_string())
    }
}

/// `[api]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct ApiConfig {
    /// HTTP listen address.
    pub addr: String,
    /// `"v2"` to accept PROXY headers on the API port.
    pub proxy_protocol: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:3080".into(),
            proxy_protocol: String::new(),
        }
    }
}

/// `[security]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct SecurityConfig {
    /// TLS for clients on the SQL port.
    pub server_tls: TlsConfig,
    /// TLS for the HTTP API: HTTPS only (plain HTTP gets the health check
    /// alone); `ca` requires client certificates.
    pub server_http_tls: TlsConfig,
    /// TLS towards PD (etcd) and TiDB status and metrics ports: on with
    /// `ca` (verified) or `skip-ca`; `cert`/`key` shown when asked.
    pub cluster_tls: TlsConfig,
    /// TLS towards TiDB SQL ports.
    pub sql_tls: TlsConfig,
    /// Refuse backends without TLS.
    pub require_backend_tls: bool,
    /// The AES-256 key of `aes256-ctr` traffic captures (its first 32
    /// bytes).
    pub encryption_key_path: String,
}

/// One TLS object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
    /// CA bundle (PEM): on servers, client certificates are required and
    /// verified; on clients, the peer is verified against it.
    pub ca: String,
    /// Lowest TLS version: "1.2" or "1.3".
    pub min_tls_version: String,
    /// Common Names a peer certificate may have (empty: any the CA
    /// signed): client certificates on `server-tls` and `server-http-tls`
    /// (with `ca`), PD's and TiDB's on `cluster-tls`.
    pub cert_allowed_cn: Vec<String>,
    /// Generate a self-signed certificate at start.
    pub auto_certs: bool,
    /// Auto-certs: 0 makes an ECDSA P-256 key (as strong as RSA 3072 and
    /// made at once; TiProxy makes RSA 4096, whose signature costs every
    /// TLS handshake ~4 ms of CPU against ~0.02 ms: README), otherwise an RSA key of this
    /// many bits, at least 2048 (TiProxy's floor is 1024; the TLS library
    /// here refuses smaller RSA keys).
    pub rsa_key_size: u32,
    /// Lifetime of auto-certs, a Go duration (`"2160h"`); empty: 90 days,
    /// TiProxy's default.
    pub autocert_expire_duration: String,
    /// Client side: skip verifying the peer's certificate.
    pub skip_ca: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: String::new(),
            key: String::new(),
            ca: String::new(),
            min_tls_version: "1.2".into(),
            cert_allowed_cn: Vec::new(),
            auto_certs: false,
            rsa_key_size: 0,
            autocert_expire_duration: String::new(),
            skip_ca: false,
        }
    }
}

impl TlsConfig {
    /// Server side: whether TLS is offered.
    pub fn server_enabled(&self) -> bool {
        self.auto_certs || !self.cert.is_empty()
    }

    /// Client side: whether TLS is configured at all.
    pub fn client_enabled(&self) -> bool {
        self.skip_ca || !self.ca.is_empty() || !self.cert.is_empty()
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct LogConfig {
    /// `debug`, `info`, `warn`, `error`.
    pub level: String,
    /// `tidb`, `json` or `console`.
    pub encoder: String,
    /// TiProxy's simple mode (accepted).
    pub simple: bool,
    /// Log file.
    pub log_file: LogFile,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            encoder: "tidb".into(),
            simple: false,
            log_file: LogFile::default(),
        }
    }
}

/// `[log.log-file]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct LogFile {
    /// File to log to; empty logs to stderr.
    pub filename: String,
    /// Rotate when a write would pass this size in MB (0 = 300).
    pub max_size: u64,
    /// Days to keep rotated files (0 = no limit).
    pub max_days: u64,
    /// Rotated files to keep (0 = no limit).
    pub max_backups: u64,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            filename: String::new(),
            max_size: 300,
            max_days: 3,
            max_backups: 3,
        }
    }
}

/// `[health-check]`. Durations are Go-style strings (`"500ms"`, `"3s"`,
/// `"1m"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct HealthCheckConfig {
    /// Whether backends are checked at all.
    pub enable: bool,
    /// How often a TiDB's status port is asked `GET /status` (500 means
    /// it is shutting down: its sessions move).
    pub status_interval: String,
    /// How often the SQL port is probed for a greeting.
    pub interval: String,
    /// Consecutive failed checks (of one kind) before a backend gets no
    /// new connections; failed dials by sessions count at once.
    pub failure_threshold: u32,
    /// Timeout of one check.
    pub dial_timeout: String,
    /// How often a TiDB's `/metrics` is read for CPU and memory use.
    pub metrics_interval: String,
    /// Timeout of one `/metrics` read.
    pub metrics_timeout: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enable: true,
            status_interval: "500ms".into(),
            interval: "3s".into(),
            failure_threshold: 1,
            dial_timeout: "2s".into(),
            metrics_interval: "5s".into(),
            metrics_timeout: "3s".into(),
        }
    }
}

impl HealthCheckConfig {
    /// The durations, in the order of the fields, parsed (validated at
    /// load; a bad value falls back to the default).
    pub fn durations(&self) -> HealthCheckDurations {
        let d = Self::default();
        let get = |v: &str, def: &str| {
            parse_duration(v)
                .or_else(|_| parse_duration(def))
                .unwrap_or(Duration::from_secs(1))
        };
        HealthCheckDurations {
            status_interval: get(&self.status_interval, &d.status_interval),
            interval: get(&self.interval, &d.interval),
            dial_timeout: get(&self.dial_timeout, &d.dial_timeout),
            metrics_interval: get(&self.metrics_interval, &d.metrics_interval),
            metrics_timeout: get(&self.metrics_timeout, &d.metrics_timeout),
        }
    }
}

/// `[health-check]`'s durations, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheckDurations {
    /// `status-interval`.
    pub status_interval: Duration,
    /// `interval`.
    pub interval: Duration,
    /// `dial-timeout`.
    pub dial_timeout: Duration,
    /// `metrics-interval`.
    pub metrics_interval: Duration,
    /// `metrics-timeout`.
    pub metrics_timeout: Duration,
}

/// Parses a Go-style duration: a number with `ms`, `s`, `m` or `h`
/// (`"500ms"`, `"1.5s"`, `"2m"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration like \"500ms\", \"3s\" or \"1m\""))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "\"{s}\" has no unit; use ms, s, m or h (e.g. \"3s\")"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("\"{s}\": {e}"))
}

/// Splits a comma-separated list, trimming blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

impl Config {
    /// Parses and validates a configuration. Returns the warnings (unknown
    /// keys, accepted-but-unimplemented keys) beside it.
    pub fn from_toml(text: &str, file: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let file_name = file.display().to_string();
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: file_name.clone(),
            key: "-".into(),
            message: e.to_string().trim().to_string(),
        })?;
        let cfg: Config = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
            .map_err(|e| ConfigError {
                file: file_name.clone(),
                key: "-".into(),
                message: e.to_string().trim().replace('\n', " "),
            })?;
        let mut warnings: Vec<String> = unknown
            .into_iter()
            .map(|k| format!("{file_name}: unknown key {k} is ignored"))
            .collect();
        cfg.validate(&file_name, &mut warnings)?;
        Ok((cfg, warnings))
    }

    /// This configuration with the keys of `text` (a TOML document, possibly
    /// partial) replaced, validated as a whole: TiProxy's rule for both
    /// `PUT /api/admin/config` and a changed config file. Keys the patch
    /// leaves out keep their values.
    pub fn patch(&self, text: &str, file: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let name = file.display().to_string();
        let patch: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            file: name.clone(),
            key: "-".into(),
            message: format!("malformed TOML: {}", e.to_string().trim()),
        })?;
        let mut merged = toml::Table::try_from(self).map_err(|e| ConfigError {
            file: name,
            key: "-".into(),
            message: format!("cannot serialise the configuration in effect: {e}"),
        })?;
        merge(&mut merged, patch);
        Self::from_toml(&merged.to_string(), file)
    }

    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            key: "-".into(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::from_toml(&text, path)
    }

    fn validate(&self, file: &str, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        self.proxy.sql_addrs().map_err(|(key, m)| err(key, m))?;
        check_host_port(&self.api.addr).map_err(|m| err("api.addr", m))?;
        for b in &self.proxy.backend_addrs {
            check_host_port(b.addr()).map_err(|m| err("proxy.backend-addrs", m))?;
            if let Some(s) = b.status_addr() {
                check_host_port(s).map_err(|m| err("proxy.backend-addrs.status-addr", m))?;
            }
        }
        for a in self.proxy.effective_pd_addrs() {
            let hp = a
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            check_host_port(hp).map_err(|m| err("proxy.pd-addrs", m))?;
        }
        self.proxy.check_clusters().map_err(|(k, m)| err(&k, m))?;
        for (key, v) in [
            ("proxy.proxy-protocol", &self.proxy.proxy_protocol),
            ("api.proxy-protocol", &self.api.proxy_protocol),
        ] {
            if !v.is_empty() && v != "v2" {
                return Err(err(
                    key,
                    format!("\"{v}\" is not supported; use \"v2\" or \"\""),
                ));
            }
        }
        let m = self.proxy.high_memory_usage_reject_threshold;
        if !(0.0..=1.0).contains(&m) {
            return Err(err(
                "proxy.high-memory-usage-reject-threshold",
                format!(
                    "{m} is out of range; use 0 (off) or 0.5 to 1 (a share of the memory limit)"
                ),
            ));
        }
        for (key, k) in [
            ("proxy.frontend-keepalive", &self.proxy.frontend_keepalive),
            (
                "proxy.backend-healthy-keepalive",
                &self.proxy.backend_healthy_keepalive,
            ),
            (
                "proxy.backend-unhealthy-keepalive",
                &self.proxy.backend_unhealthy_keepalive,
            ),
        ] {
            // The kernel's limits (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL,
            // MAX_TCP_KEEPCNT): beyond them setsockopt fails on every socket.
            for (field, v, max) in [
                ("idle", k.idle, 32767),
                ("intvl", k.intvl, 32767),
                ("cnt", u64::from(k.cnt), 127),
                ("timeout", k.timeout, u64::from(u32::MAX) / 1000),
            ] {
                if v > max {
                    return Err(err(
                        &format!("{key}.{field}"),
                        format!("{v} is out of range; use 0 (system default) to {max}"),
                    ));
                }
            }
        }
        let b = self.proxy.conn_buffer_size;
        if b != 0 && !(1024..=16 * 1024 * 1024).contains(&b) {
            return Err(err(
                "proxy.conn-buffer-size",
                format!("{b} is out of range; use 0 (32 KiB) or 1024 to 16777216"),
            ));
        }
        let cap = self.proxy.session_state_cap;
        if !(1024..=16 * 1024 * 1024).contains(&cap) {
            return Err(err(
                "proxy.session-state-cap",
                format!("{cap} is out of range; use 1024 to 16777216"),
            ));
        }
        let delay = &self.proxy.session_protection_delay;
        let d = parse_duration(delay).map_err(|m| err("proxy.session-protection-delay", m))?;
        if d > Duration::from_secs(10) {
            return Err(err(
                "proxy.session-protection-delay",
                format!("\"{delay}\" is out of range; use 0s to 10s"),
            ));
        }
        if !["debug", "info", "warn", "error", "fatal", "trace"]
            .contains(&self.log.level.to_lowercase().as_str())
        {
            return Err(err(
                "log.level",
                format!(
                    "\"{}\" is not one of debug, info, warn, error",
                    self.log.level
                ),
            ));
        }
        if !["tidb", "json", "console"].contains(&self.log.encoder.as_str()) {
            return Err(err(
                "log.encoder",
                format!("\"{}\" is not one of tidb, json, console", self.log.encoder),
            ));
        }
        for (key, t) in [
            ("security.server-tls", &self.security.server_tls),
            ("security.server-http-tls", &self.security.server_http_tls),
            ("security.cluster-tls", &self.security.cluster_tls),
            ("security.sql-tls", &self.security.sql_tls),
        ] {
            if t.cert.is_empty() != t.key.is_empty() {
                return Err(err(key, "cert and key must be given together".into()));
            }
            if !["1.2", "1.3", "1.0", "1.1", ""].contains(&t.min_tls_version.as_str()) {
                return Err(err(
                    &format!("{key}.min-tls-version"),
                    format!("\"{}\" is not one of 1.2, 1.3", t.min_tls_version),
                ));
            }
            if !t.autocert_expire_duration.is_empty() {
                match parse_duration(&t.autocert_expire_duration) {
                    Ok(d) if !d.is_zero() => {}
                    Ok(_) => {
                        return Err(err(
                            &format!("{key}.autocert-expire-duration"),
                            "0 is no lifetime; use e.g. \"2160h\" or leave it out".into(),
                        ));
                    }
                    Err(m) => return Err(err(&format!("{key}.autocert-expire-duration"), m)),
                }
            }
            if t.rsa_key_size > 8192 {
                return Err(err(
                    &format!("{key}.rsa-key-size"),
                    format!(
                        "{} is out of range; use 0 (ECDSA P-256) or up to 8192",
                        t.rsa_key_size
                    ),
                ));
            }
            for (f, path) in [("cert", &t.cert), ("key", &t.key), ("ca", &t.ca)] {
                if !path.is_empty() && !Path::new(path).exists() {
                    return Err(err(
                        &format!("{key}.{f}"),
                        format!("file {path} does not exist"),
                    ));
                }
            }
        }
        self.balance.validate(file, warnings)?;
        let h = &self.health_check;
        for (key, v) in [
            ("health-check.status-interval", &h.status_interval),
            ("health-check.interval", &h.interval),
            ("health-check.dial-timeout", &h.dial_timeout),
            ("health-check.metrics-interval", &h.metrics_interval),
            ("health-check.metrics-timeout", &h.metrics_timeout),
        ] {
            let d = parse_duration(v).map_err(|m| err(key, m))?;
            if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                return Err(err(key, format!("\"{v}\" is out of range; use 10ms to 1h")));
            }
        }
        if h.failure_threshold == 0 {
            return Err(err(
                "health-check.failure-threshold",
                "must be at least 1".into(),
            ));
        }
        self.ha.virtual_ip().map_err(|(key, m)| err(key, m))?;
        if self.ha.half_set() {
            warnings.push(format!(
                "{file}: [ha] needs both virtual-ip and interface; the virtual IP is off"
            ));
        }
        self.not_applicable(file, warnings);
        Ok(())
    }

    /// The working directory (for auto-certs).
    pub fn workdir(&self) -> PathBuf {
        if self.workdir.is_empty() {
            std::env::temp_dir().join("tiproxy-work")
        } else {
            PathBuf::from(&self.workdir)
        }
    }
}

/// Deep-merges `patch` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, patch: toml::Table) {
    for (k, v) in patch {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(p)) => merge(b, p),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Checks `host:port` syntax (a resolvable name is checked at use).
fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("\"{s}\" is not host:port")),
    }
}

#[cfg(test)]
mod tests;
