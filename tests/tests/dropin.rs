//! The drop-in test: a TiProxy production configuration with every key of
//! TiProxy's `lib/config` at a non-default value. The proxy starts with it
//! and serves; each key is either in effect (the effective configuration
//! `tiproxyctl config get --json` prints holds the value, and the test file
//! named for it exercises its behaviour and names the key) or reported at
//! start-up as not applicable, with the reason, in the log.
//!
//! Left out: `[ha]` (a virtual IP on a real interface; issue 16's `[ha]`
//! work has its own test in a network namespace).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tiproxy_tests::{ProxyProcess, TidbDouble, binary, workspace};

/// How a key is accounted for.
enum Check {
    /// In the effective configuration at this JSON pointer with this
    /// value; the file (from the workspace root) whose test shows it
    /// acting, or the code acting on it, names the key.
    Acted(&'static str, serde_json::Value, &'static str),
    /// Logged at start-up as not applicable (or not implemented), with a
    /// reason containing this text.
    NotApplicable(&'static str),
}

fn keys(workdir: &str, cert: &str, key: &str, sql_port: u16) -> Vec<(&'static str, Check)> {
    use Check::*;
    use serde_json::json;
    let v = |x: serde_json::Value| x;
    vec![
        (
            "workdir",
            Acted("/workdir", json!(workdir), "tests/tests/api_tls.rs"),
        ),
        (
            "enable-traffic-replay",
            Acted(
                "/enable-traffic-replay",
                json!(true),
                "tests/tests/traffic.rs",
            ),
        ),
        ("metering", NotApplicable("TiDB Cloud's usage metering")),
        (
            "labels",
            Acted("/labels/zone", json!("east"), "tests/tests/balance.rs"),
        ),
        (
            "advertise-addr",
            Acted(
                "/proxy/advertise-addr",
                json!("10.1.2.3"),
                "tests/tests/cli_flags.rs",
            ),
        ),
        (
            "pd-addrs",
            Acted("/proxy/pd-addrs", json!(""), "tests/tests/discovery.rs"),
        ),
        (
            "port-range",
            Acted(
                "/proxy/port-range",
                json!([sql_port, sql_port]),
                "tests/tests/dropin.rs",
            ),
        ),
        (
            "max-connections",
            Acted(
                "/proxy/max-connections",
                json!(500),
                "tests/tests/reload.rs",
            ),
        ),
        (
            "high-memory-usage-reject-threshold",
            Acted(
                "/proxy/high-memory-usage-reject-threshold",
                json!(0.8),
                "tests/tests/memory_reject.rs",
            ),
        ),
        (
            "conn-buffer-size",
            Acted(
                "/proxy/conn-buffer-size",
                json!(65536),
                "tests/tests/backpressure.rs",
            ),
        ),
        (
            "frontend-keepalive",
            Acted(
                "/proxy/frontend-keepalive/enabled",
                json!(false),
                "tests/tests/keepalive.rs",
            ),
        ),
        (
            "backend-healthy-keepalive",
            Acted(
                "/proxy/backend-healthy-keepalive/cnt",
                json!(4),
                "tests/tests/keepalive.rs",
            ),
        ),
        (
            "backend-unhealthy-keepalive",
            Acted(
                "/proxy/backend-unhealthy-keepalive/cnt",
                json!(2),
                "tests/tests/keepalive.rs",
            ),
        ),
        (
            "proxy-protocol",
            Acted(
                "/proxy/proxy-protocol",
                json!("v2"),
                "tests/tests/proxy_protocol.rs",
            ),
        ),
        (
            "graceful-wait-before-shutdown",
            Acted(
                "/proxy/graceful-wait-before-shutdown",
                json!(3),
                "runtime/src/proxy.rs",
            ),
        ),
        (
            "graceful-close-conn-timeout",
            Acted(
                "/proxy/graceful-close-conn-timeout",
                json!(20),
                "tests/tests/runtime.rs",
            ),
        ),
        (
            "public-endpoints",
            NotApplicable("traffic metering which clients are public"),
        ),
        (
            "backend-clusters",
            Acted(
                "/proxy/backend-clusters/0/name",
                json!("c2"),
                "tests/tests/backend_clusters.rs",
            ),
        ),
        (
            "ns-servers",
            NotApplicable("ns-servers does not apply here"),
        ),
        (
            "fail-backend-list",
            Acted(
                "/proxy/fail-backend-list",
                json!(["tidb-9"]),
                "tests/tests/failover.rs",
            ),
        ),
        (
            "failover-timeout",
            Acted(
                "/proxy/failover-timeout",
                json!(30),
                "tests/tests/failover.rs",
            ),
        ),
        // [api]
        (
            "addr",
            Acted("/api/addr", v(json!(null)), "tests/tests/api.rs"),
        ),
        (
            "proxy-protocol",
            Acted(
                "/api/proxy-protocol",
                json!("v2"),
                "tests/tests/proxy_protocol.rs",
            ),
        ),
        // [security]
        (
            "cert",
            Acted(
                "/security/server-tls/cert",
                json!(cert),
                "tests/tests/api_tls.rs",
            ),
        ),
        (
            "key",
            Acted(
                "/security/server-tls/key",
                json!(key),
                "tests/tests/api_tls.rs",
            ),
        ),
        (
            "ca",
            Acted(
                "/security/server-tls/ca",
                json!(cert),
                "tests/tests/api_tls.rs",
            ),
        ),
        (
            "min-tls-version",
            Acted(
                "/security/server-tls/min-tls-version",
                json!("1.3"),
                "runtime/src/tls.rs",
            ),
        ),
        (
            "cert-allowed-cn",
            Acted(
                "/security/cluster-tls/cert-allowed-cn",
                json!(["tidb"]),
                "tests/tests/cluster_tls.rs",
            ),
        ),
        (
            "auto-certs",
            Acted(
                "/security/server-http-tls/auto-certs",
                json!(true),
                "tests/tests/api_tls.rs",
            ),
        ),
        (
            "rsa-key-size",
            Acted(
                "/security/server-http-tls/rsa-key-size",
                json!(2048),
                "tests/tests/dropin.rs",
            ),
        ),
        (
            "autocert-expire-duration",
            Acted(
                "/security/server-http-tls/autocert-expire-duration",
                json!("72h"),
                "tests/tests/dropin.rs",
            ),
        ),
        (
            "skip-ca",
            Acted(
                "/security/sql-tls/skip-ca",
                json!(true),
                "runtime/src/tls.rs",
            ),
        ),
        (
            "encryption-key-path",
            Acted(
                "/security/encryption-key-path",
                serde_json::Value::Null,
                "tests/tests/traffic.rs",
            ),
        ),
        (
            "require-backend-tls",
            Acted(
                "/security/require-backend-tls",
                json!(true),
                "tests/tests/dropin.rs",
            ),
        ),
        // [log]
        (
            "encoder",
            Acted("/log/encoder", json!("json"), "tests/tests/logging.rs"),
        ),
        (
            "simple",
            NotApplicable("log.encoder chooses the format here"),
        ),
        (
            "level",
            Acted("/log/level", json!("warn"), "tests/tests/logging.rs"),
        ),
        (
            "filename",
            Acted(
                "/log/log-file/filename",
                json!(null),
                "tests/tests/logging.rs",
            ),
        ),
        (
            "max-size",
            Acted(
                "/log/log-file/max-size",
                json!(10),
                "tests/tests/logging.rs",
            ),
        ),
        (
            "max-days",
            Acted("/log/log-file/max-days", json!(2), "runtime/src/logging.rs"),
        ),
        (
            "max-backups",
            Acted(
                "/log/log-file/max-backups",
                json!(2),
                "runtime/src/logging.rs",
            ),
        ),
        // [balance]
        (
            "label-name",
            Acted(
                "/balance/label-name",
                json!("az"),
                "tests/tests/discovery.rs",
            ),
        ),
        (
            "routing-rule",
            Acted(
                "/balance/routing-rule",
                json!("client_cidr"),
                "tests/tests/routing_rule.rs",
            ),
        ),
        (
            "policy",
            Acted(
                "/balance/policy",
                json!("location"),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "routing-policy",
            Acted(
                "/balance/routing-policy",
                json!("random"),
                "core/src/balance/route.rs",
            ),
        ),
        (
            "status",
            Acted(
                "/balance/status/migrations-per-second",
                json!(100.0),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "health",
            Acted(
                "/balance/health/migrations-per-second",
                json!(5.0),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "memory",
            Acted(
                "/balance/memory/migrations-per-second",
                json!(5.0),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "cpu",
            Acted(
                "/balance/cpu/migrations-per-second",
                json!(5.0),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "location",
            Acted(
                "/balance/location/migrations-per-second",
                json!(5.0),
                "tests/tests/balance.rs",
            ),
        ),
        (
            "conn-count",
            Acted(
                "/balance/conn-count/count-ratio-threshold",
                json!(1.5),
                "core/src/balance.rs",
            ),
        ),
    ]
}

/// A self-signed certificate and key for `server-tls` (its own CA too).
fn write_cert(dir: &Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let (c, k) = (dir.join("sql.pem"), dir.join("sql.key"));
    std::fs::write(&c, ck.cert.pem()).expect("write cert");
    std::fs::write(&k, ck.signing_key.serialize_pem()).expect("write key");
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn a_tiproxy_production_config_with_every_key_changed_starts_and_each_key_is_accounted_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workdir = dir.path().join("work").display().to_string();
    let logfile = dir.path().join("log").join("tiproxy.log");
    let (cert, key) = write_cert(dir.path());
    let tidb = TidbDouble::start(2, 0, &[]);
    let entries: Vec<String> = tidb
        .instances()
        .iter()
        .map(|i| {
            format!(
                "{{ addr = \"{}\", status-addr = \"{}\", labels = {{ az = \"east\", zone = \"east\", cidr = \"127.0.0.0/8\" }} }}",
                i.sql, i.status
            )
        })
        .collect();
    let log_path = logfile.display().to_string();
    let mut api_addr = None;
    // port-range: the SQL port comes from the range, not from addr's 6000.
    let p = ProxyProcess::start_with_config(|sql, api| {
        api_addr = Some(api);
        format!(
            r#"workdir = "{workdir}"
enable-traffic-replay = true
[proxy]
addr = "127.0.0.1:6000"
advertise-addr = "10.1.2.3"
pd-addrs = ""
backend-addrs = [{backends}]
port-range = [{port}, {port}]
max-connections = 500
high-memory-usage-reject-threshold = 0.8
conn-buffer-size = 65536
proxy-protocol = "v2"
graceful-wait-before-shutdown = 3
graceful-close-conn-timeout = 20
public-endpoints = ["10.0.0.0/8"]
fail-backend-list = ["tidb-9"]
failover-timeout = 30
[proxy.frontend-keepalive]
enabled = false
[proxy.backend-healthy-keepalive]
enabled = true
idle = "30s"
cnt = 4
intvl = "2s"
timeout = "10s"
[proxy.backend-unhealthy-keepalive]
enabled = true
idle = "5s"
cnt = 2
intvl = "1s"
timeout = "3s"
[[proxy.backend-clusters]]
name = "c2"
pd-addrs = "10.0.0.9:2379"
ns-servers = ["10.0.0.53"]
[api]
addr = "{api}"
proxy-protocol = "v2"
[security]
encryption-key-path = "{dir}/enc.key"
require-backend-tls = true
[security.server-tls]
cert = "{cert}"
key = "{key}"
ca = "{cert}"
min-tls-version = "1.3"
[security.server-http-tls]
auto-certs = true
rsa-key-size = 2048
autocert-expire-duration = "72h"
[security.cluster-tls]
skip-ca = true
cert-allowed-cn = ["tidb"]
[security.sql-tls]
skip-ca = true
min-tls-version = "1.3"
[log]
encoder = "json"
simple = true
level = "warn"
[log.log-file]
filename = "{log_path}"
max-size = 10
max-days = 2
max-backups = 2
[balance]
label-name = "az"
routing-rule = "client_cidr"
policy = "location"
routing-policy = "random"
[balance.status]
migrations-per-second = 100
[balance.health]
migrations-per-second = 5
[balance.memory]
migrations-per-second = 5
[balance.cpu]
migrations-per-second = 5
[balance.location]
migrations-per-second = 5
[balance.conn-count]
migrations-per-second = 50
count-ratio-threshold = 1.5
[labels]
az = "east"
zone = "east"
[metering]
type = "s3"
"#,
            backends = entries.join(", "),
            dir = dir.path().display(),
            port = sql.port(),
        )
    });
    let api = api_addr.expect("api address");

    // The effective configuration, over the auto-cert HTTPS API.
    let deadline = Instant::now() + Duration::from_secs(20);
    let effective: serde_json::Value = loop {
        let out = Command::new(binary("tiproxyctl"))
            .args(["--host", "127.0.0.1", "--port", &api.port().to_string()])
            .args(["--insecure", "config", "get", "--json"])
            .output()
            .expect("run tiproxyctl");
        if out.status.success() {
            break serde_json::from_slice(&out.stdout).expect("config JSON");
        }
        assert!(
            Instant::now() < deadline,
            "tiproxyctl config get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let logged = || {
        let file = std::fs::read_to_string(&logfile).unwrap_or_default();
        format!("{}{file}", p.log.lock().expect("log"))
    };

    let root = workspace();
    let mut report = Vec::new();
    for (key, check) in keys(&workdir, &cert, &key, p.sql.port()) {
        match check {
            Check::Acted(pointer, want, test) => {
                let got = &effective
                    .pointer(pointer)
                    .unwrap_or(&serde_json::Value::Null);
                // Addresses and paths made at run time: present is enough.
                if want.is_null() {
                    assert!(!got.is_null(), "{key}: {pointer} missing in {effective}");
                } else {
                    assert_eq!(*got, &want, "{key}: {pointer} in the effective config");
                }
                let text = std::fs::read_to_string(root.join(test))
                    .unwrap_or_else(|e| panic!("{key}: test file {test}: {e}"));
                assert!(text.contains(key), "{key}: {test} does not exercise it");
                report.push(format!("{key}: acted on ({test})"));
            }
            Check::NotApplicable(reason) => {
                let log = logged();
                assert!(
                    log.contains(reason),
                    "{key}: no start-up line saying why it does not apply ({reason})\n{log}"
                );
                report.push(format!("{key}: not applicable, said at start-up"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));

    // Behaviour shown here: auto-certs in workdir with the RSA key size and
    // lifetime asked for; logs as JSON lines in log-file.
    let pem = std::fs::read(Path::new(&workdir).join("server-http-cert.pem")).expect("auto-cert");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    match cert.public_key().parsed().expect("key") {
        x509_parser::public_key::PublicKey::RSA(k) => assert_eq!(k.key_size(), 2048),
        other => panic!("rsa-key-size = 2048 gave {other:?}"),
    }
    let v = cert.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        72 * 3600 + 3600,
        "autocert-expire-duration = 72h (valid from an hour back)"
    );
    // require-backend-tls: the doubles have no TLS, so a client gets the
    // proxy's error instead of a plain backend session.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let refused = rt.block_on(async {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(p.sql.ip().to_string())
            .tcp_port(p.sql.port())
            .user(Some("app"))
            .pass(Some("app-Pa55word"))
            .prefer_socket(false);
        mysql_async::Conn::new(opts).await
    });
    assert!(
        refused.is_err(),
        "require-backend-tls let a session reach a plain backend"
    );
    let file = std::fs::read_to_string(&logfile).expect("log-file written");
    let first = file.lines().next().expect("a line");
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "json encoder: {first}"
    );
}

/// Whether a loopback port can be bound now.
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn port_range_listens_on_every_port_of_the_range_and_each_proxies() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let backend = tidb.instances()[0].sql;
    // Three ports around the free one ProxyProcess waits on, so the range
    // holds it; `addr`'s own port (6000) is not listened on. When its
    // neighbours are taken (other tests run beside this one), that start
    // uses a range of one and is tried again on another port.
    let mut found = None;
    for _ in 0..20 {
        let mut range = None;
        let p = ProxyProcess::start_with_config(|sql, api| {
            let s = sql.port();
            let (first, last) = [(s, s + 2), (s - 1, s + 1), (s - 2, s)]
                .into_iter()
                .find(|&(a, b)| (a..=b).all(|p| p == s || port_free(p)))
                .inspect(|r| range = Some(*r))
                .unwrap_or((s, s));
            format!(
                "[proxy]\naddr = \"127.0.0.1:6000\"\nport-range = [{first}, {last}]\n\
                 pd-addrs = \"\"\nbackend-addrs = [\"{backend}\"]\n[api]\naddr = \"{api}\"\n"
            )
        });
        if let Some(r) = range {
            found = Some((p, r));
            break;
        }
    }
    let (p, (first, last)) = found.expect("three free ports in a row within 20 tries");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        for port in first..=last {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut c = mysql_async::Conn::new(tiproxy_tests::double_opts(addr))
                .await
                .unwrap_or_else(|e| panic!("connect through port {port} of the range: {e}"));
            let served: Option<u16> = c.query_first("SELECT @@port").await.expect("query");
            assert_eq!(
                served,
                Some(backend.port()),
                "port {port} proxies to the TiDB"
            );
            c.disconnect().await.expect("disconnect");
        }
    });
    drop(p);

    // Config errors name the key and say what to fix; tiproxy exits 2.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    for (cfg, says) in [
        (
            "addr = \"127.0.0.1:6000\"\nport-range = [7000]",
            "proxy.port-range: [7000] must hold exactly two ports",
        ),
        (
            "addr = \"127.0.0.1:6000\"\nport-range = [7001, 7000]",
            "proxy.port-range: [7001, 7000] is not a range of ports",
        ),
        (
            "addr = \"127.0.0.1:6000\"\nport-range = [7000, 70000]",
            "proxy.port-range: [7000, 70000] is not a range of ports",
        ),
        (
            "addr = \"127.0.0.1:6000,127.0.0.2:6000\"\nport-range = [7000, 7001]",
            "with proxy.port-range it must name exactly one host",
        ),
    ] {
        std::fs::write(&path, format!("[proxy]\n{cfg}\n")).expect("write");
        let out = Command::new(binary("tiproxy"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run tiproxy");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cfg}: {err}");
        assert!(err.contains(says), "{cfg}: wanted {says:?} in {err}");
    }
}

/// The not-after time of the PEM certificate at `path`.
fn not_after(path: &Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[test]
fn auto_certs_are_renewed_before_they_expire_and_the_new_one_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workdir = dir.path().join("work");
    let pem = workdir.join("server-http-cert.pem");
    let tidb = TidbDouble::start(1, 0, &[]);
    let backend = tidb.instances()[0].sql;
    let started = Instant::now();
    let p = ProxyProcess::start_with_config(|sql, api| {
        format!(
            "workdir = \"{}\"\n[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\n\
             backend-addrs = [\"{backend}\"]\n[api]\naddr = \"{api}\"\n\
             [security.server-http-tls]\nauto-certs = true\nautocert-expire-duration = \"4s\"\n",
            workdir.display()
        )
    });
    let first = not_after(&pem).expect("the first auto-cert is written at start");
    // Renewed at half its 4 s life: the file gets a later certificate.
    let renewed = loop {
        match not_after(&pem) {
            Some(t) if t > first => break t,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the 4 s auto-cert was not renewed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Once the first has expired, the API still verifies against the new
    // certificate: the proxy serves it, not the expired one.
    let expired = std::time::UNIX_EPOCH + Duration::from_secs(first as u64 + 1);
    while std::time::SystemTime::now() < expired {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The file is written just before the proxy swaps certificates (and
    // renewals go on every 2 s), so a try may hold the next one: retry.
    let ca = pem.display().to_string();
    let mut last = String::new();
    let served = (0..5).any(|_| {
        let out = Command::new(binary("tiproxyctl"))
            .args(["--host", "localhost", "--port", &p.api.port().to_string()])
            .args(["--ca", &ca, "health"])
            .output()
            .expect("run tiproxyctl");
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(300));
        out.status.success()
    });
    assert!(
        served,
        "the renewed certificate (not after {renewed}) is served after the first expired: {last}"
    );
    assert!(
        p.log
            .lock()
            .expect("log")
            .contains("security.server-http-tls: auto-cert renewed before it expires"),
        "renewal is logged"
    );
}
