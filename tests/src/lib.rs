//! tiproxy-tests: end-to-end scenarios with real processes.
//!
//! [`ProxyProcess`] runs the real `tiproxy` binary (built on first use)
//! with a generated configuration on free loopback ports, and kills it when
//! dropped. The scenarios live in `tests/`.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod netns;
pub mod playground;

use tiproxy_conformance::mariadb::{APP_PASSWORD, APP_USER, DATABASE, MariaDb};

pub mod pki;

/// The test binary's MariaDB, started on first use (one per test binary).
pub fn mariadb() -> &'static MariaDb {
    static DB: OnceLock<MariaDb> = OnceLock::new();
    DB.get_or_init(|| MariaDb::start().expect("start MariaDB"))
}

/// mysql_async options for the app user and the test database at `addr`
/// (MariaDB itself, or a proxy in front of it).
pub fn opts(addr: SocketAddr) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some(DATABASE))
        .prefer_socket(false)
        .into()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Builds the binaries once and returns the path of `name`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace())
            .args([
                "build",
                "-q",
                "-p",
                "tiproxy-runtime",
                "-p",
                "tiproxy-sim",
                "--bins",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the tiproxy binaries failed");
    });
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"));
    target.join("debug").join(name)
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// mysql_async options for the TiDB double's `app` user at `addr` (a
/// double, or a proxy in front of doubles), over TCP.
pub fn double_opts(addr: SocketAddr) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some("app"))
        .pass(Some("app-Pa55word"))
        .prefer_socket(false)
        .into()
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after
/// `limit`. Returns how long it took.
pub async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// A running `tiproxy` process.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    /// SQL address.
    pub sql: SocketAddr,
    /// API address.
    pub api: SocketAddr,
    /// Everything it logged (stderr), collected in the background.
    pub log: Arc<Mutex<String>>,
    /// The configuration file it was started with (edit it to hot-reload).
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `tiproxy` with `[proxy] addr` and `[api] addr` on free ports,
    /// `backend-addrs`, and `extra` appended to the `[proxy]` section (more
    /// sections may follow in `extra`). Waits until the SQL port accepts.
    pub fn start(backends: &[SocketAddr], extra: &str) -> ProxyProcess {
        let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        Self::start_with_backends(&list, extra)
    }

    /// Like [`ProxyProcess::start`], with backends given as TOML values
    /// (`host:port` strings are quoted; `{ ... }` tables are used as is).
    pub fn start_with_backends(backends: &[String], extra: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let list: Vec<String> = backends
            .iter()
            .map(|b| {
                if b.starts_with('{') {
                    b.clone()
                } else {
                    format!("\"{b}\"")
                }
            })
            .collect();
        let pd = if extra.contains("pd-addrs") {
            ""
        } else {
            "pd-addrs = \"\"\n"
        };
        let cfg = format!(
            "[proxy]\naddr = \"{sql}\"\n{pd}backend-addrs = [{}]\n{extra}\n[api]\naddr = \"{api}\"\n",
            list.join(", ")
        );
        // `extra` may open other sections; the [api] table then comes last
        // and still parses because TOML tables can appear in any order.
        Self::spawn(dir, sql, api, &cfg, Some("info"))
    }

    /// Starts `tiproxy` with the whole configuration `make(sql, api)`
    /// returns (given free SQL and API addresses) and `RUST_LOG` unset, so
    /// `[log]` alone decides what is logged.
    pub fn start_with_config(make: impl FnOnce(SocketAddr, SocketAddr) -> String) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let cfg = make(sql, api);
        Self::spawn(dir, sql, api, &cfg, None)
    }

    /// Like [`ProxyProcess::start_with_config`], with `flags` given to
    /// `tiproxy` after `--config FILE`.
    pub fn start_with_config_and_flags(
        flags: &[&str],
        make: impl FnOnce(SocketAddr, SocketAddr) -> String,
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let cfg = make(sql, api);
        Self::spawn_cmd(&[], flags, dir, sql, api, &cfg, None)
    }

    /// Like [`ProxyProcess::start`], with `tiproxy` run by a wrapper
    /// command: `wrapper` is the program and its arguments, followed by the
    /// tiproxy binary and its own (`["prlimit", "--nofile=64:64", "--"]`).
    pub fn start_wrapped(wrapper: &[&str], backends: &[SocketAddr], extra: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        let cfg = format!(
            "[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [{}]\n{extra}\n\
             [api]\naddr = \"{api}\"\n",
            list.join(", ")
        );
        Self::spawn_cmd(wrapper, &[], dir, sql, api, &cfg, Some("info"))
    }

    fn spawn(
        dir: tempfile::TempDir,
        sql: SocketAddr,
        api: SocketAddr,
        cfg: &str,
        rust_log: Option<&str>,
    ) -> ProxyProcess {
        Self::spawn_cmd(&[], &[], dir, sql, api, cfg, rust_log)
    }

    fn spawn_cmd(
        wrapper: &[&str],
        flags: &[&str],
        dir: tempfile::TempDir,
        sql: SocketAddr,
        api: SocketAddr,
        cfg: &str,
        rust_log: Option<&str>,
    ) -> ProxyProcess {
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, cfg).expect("write config");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary("tiproxy"));
                c
            }
            None => Command::new(binary("tiproxy")),
        };
        cmd.arg("--config")
            .arg(&path)
            .args(flags)
            .env_remove("RUST_LOG");
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tiproxy");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(sql).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tiproxy exited with {status}:\n{}",
                    log.lock().expect("log")
                );
            }
            assert!(Instant::now() < deadline, "tiproxy did not listen on {sql}");
            std::thread::sleep(Duration::from_millis(20));
        }
        ProxyProcess {
            child,
            sql,
            api,
            log,
            config: path,
            _dir: dir,
        }
    }

    /// Sends a signal (e.g. "TERM").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// GET on the API: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.api, path)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on `addr`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path)
}

/// A private etcd (Debian `etcd-server`, installed if missing) on free
/// loopback ports with a temp data dir; killed on drop. `stop` and
/// `restart` keep the data dir, for outage tests.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Client port.
    pub port: u16,
    peer_port: u16,
    tls: Option<EtcdTls>,
}

/// etcd's client TLS (PEM files): its certificate and key, and the CA a
/// client's certificate must chain to (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// `--cert-file`.
    pub cert: String,
    /// `--key-file`.
    pub key: String,
    /// `--trusted-ca-file`.
    pub ca: String,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Starts etcd serving clients over TLS only, requiring client
    /// certificates signed by `tls.ca`.
    pub fn start_tls(tls: EtcdTls) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Etcd {
        install(&["etcd-server"], "etcd");
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            peer_port: free_port(),
            tls,
        };
        e.restart();
        e
    }

    /// The client endpoint (`127.0.0.1:port`).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let tls: Vec<String> = match &self.tls {
            Some(t) => [
                "--cert-file",
                &t.cert,
                "--key-file",
                &t.key,
                "--trusted-ca-file",
                &t.ca,
                "--client-cert-auth",
            ]
            .map(String::from)
            .to_vec(),
            None => Vec::new(),
        };
        let child = Command::new("etcd")
            .args(&tls)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--name", "default"])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs Debian packages if `probe` is not on the PATH.
pub fn install(packages: &[&str], probe: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {probe}"))
        .output()
        .map(|o| o.status.success());
    if found.unwrap_or(false) {
        return;
    }
    let status = Command::new(workspace().join("scripts/install-deps.sh"))
        .args(packages)
        .status()
        .expect("run install-deps.sh");
    assert!(status.success(), "installing {packages:?} failed");
}

/// One instance of a [`TidbDouble`] cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TidbInstance {
    /// Index in the cluster.
    pub index: usize,
    /// SQL address.
    pub sql: SocketAddr,
    /// Status address.
    pub status: SocketAddr,
    /// serving, draining, closing, stopped, killed.
    pub state: String,
    /// Open connections.
    pub connections: u64,
}

/// A `tidb-double` process: a TiDB cluster double whose instances share one
/// store, driven through its control API. Killed on drop.
#[derive(Debug)]
pub struct TidbDouble {
    child: Child,
    /// Control API address.
    pub control: SocketAddr,
}

impl TidbDouble {
    /// Starts `instances` instances with `graceful_wait` seconds of
    /// graceful-wait-before-shutdown; `extra` are more command-line flags.
    pub fn start(instances: usize, graceful_wait: u64, extra: &[&str]) -> TidbDouble {
        let mut child = Command::new(binary("tidb-double"))
            .args([
                "--instances",
                &instances.to_string(),
                "--graceful-wait",
                &graceful_wait.to_string(),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tidb-double");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("tidb-double prints its addresses");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad first line {line:?}: {e}"));
        let control = v["control"]
            .as_str()
            .expect("control")
            .parse()
            .expect("addr");
        TidbDouble { child, control }
    }

    /// Every instance.
    pub fn instances(&self) -> Vec<TidbInstance> {
        let (status, body) = http_get(self.control, "/instances");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let list = v
            .as_array()
            .or_else(|| v["instances"].as_array())
            .expect("instance list")
            .clone();
        list.iter()
            .map(|i| TidbInstance {
                index: i["index"].as_u64().expect("index") as usize,
                sql: i["sql"].as_str().expect("sql").parse().expect("addr"),
                status: i["status"].as_str().expect("status").parse().expect("addr"),
                state: i["state"].as_str().unwrap_or("").to_string(),
                connections: i["connections"].as_u64().unwrap_or(0),
            })
            .collect()
    }

    /// Starts one more instance; returns it.
    pub fn add(&self) -> TidbInstance {
        let (status, body) = http_request(self.control, "POST", "/instances");
        assert!((200..300).contains(&status), "{status} {body}");
        self.instances().pop().expect("an instance")
    }

    /// Begins instance `i`'s graceful shutdown.
    pub fn shutdown(&self, i: usize) {
        let (status, body) =
            http_request(self.control, "POST", &format!("/instances/{i}/shutdown"));
        assert!((200..300).contains(&status), "{status} {body}");
    }

    /// Kills instance `i` (every connection dropped at once).
    pub fn kill(&self, i: usize) {
        let (status, body) = http_request(self.control, "POST", &format!("/instances/{i}/kill"));
        assert!((200..300).contains(&status), "{status} {body}");
    }

    /// Makes instance `i`'s `/metrics` report this CPU and/or memory use
    /// (0.0-1.0).
    pub fn set_load(&self, i: usize, cpu: Option<f64>, memory: Option<f64>) {
        let body = serde_json::json!({ "cpu": cpu, "memory": memory }).to_string();
        let (status, reply) =
            http_request_with_body(self.control, "POST", &format!("/instances/{i}/load"), &body);
        assert_eq!(status, 200, "{reply}");
    }

    /// Makes this share (0.0-1.0) of instance `i`'s TSO requests to PD
    /// and/or RPCs to TiKV fail, as its `/metrics` shows.
    pub fn set_errors(&self, i: usize, pd: Option<f64>, tikv: Option<f64>) {
        let body = serde_json::json!({ "pd": pd, "tikv": tikv }).to_string();
        let (status, reply) = http_request_with_body(
            self.control,
            "POST",
            &format!("/instances/{i}/errors"),
            &body,
        );
        assert_eq!(status, 200, "{reply}");
    }

    /// The backend-addrs TOML entry of instance `i` (SQL and status ports).
    pub fn backend_entry(i: &TidbInstance) -> String {
        format!("{{ addr = \"{}\", status-addr = \"{}\" }}", i.sql, i.status)
    }
}

impl Drop for TidbDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request without a body: (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request_with_body(addr, method, path, "")
}

/// A request with `body`: (status, body).
pub fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let r = http_exchange(addr, method, path, body);
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// How long one test request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer body a test reads.
pub const HTTP_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// One request with the proxy's own HTTP client (the one `tiproxyctl` and
/// the health checks use), from any test, async or not: it runs on its own
/// thread and runtime. Panics when there is no HTTP answer within
/// [`HTTP_TIMEOUT`].
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> tiproxy_runtime::http_client::Response {
    use tiproxy_runtime::http_client::{send, with_deadline};
    let (method, path) = (method.to_string(), path.to_string());
    let body = bytes::Bytes::copy_from_slice(body.as_bytes());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(with_deadline(HTTP_TIMEOUT, async {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(tiproxy_runtime::http_client::HttpError::Connect)?;
            send(s, &addr.to_string(), &method, &path, body, HTTP_BODY_LIMIT).await
        }))
    })
    .join()
    .expect("request thread")
    .unwrap_or_else(|e| panic!("{addr}: no HTTP answer: {e}"))
}

/// A TLS client verifier that accepts any certificate: the tests' proxies
/// use self-signed auto-certs.
#[derive(Debug)]
pub struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
