//! Cluster TLS (`[security.cluster-tls]`) with real processes: an etcd that
//! serves clients over TLS only and requires client certificates
//! (`--client-cert-auth`), `tidb-double` instances that register in it
//! over TLS and serve their status and metrics ports over HTTPS (requiring
//! client certificates, as TiDB with `cluster-ssl-ca`), and `tiproxy`.
//! Discovery, both registrations, health checks and metrics work; a wrong
//! CA or a Common Name outside `cert-allowed-cn` is refused with a log
//! line that says so, on the cluster legs and on the API.
//! Certificates are made here with rcgen.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_runtime::config::TlsConfig;
use tiproxy_runtime::pd::{EtcdPd, PdClient, PdConnector};
use tiproxy_tests::pki::Ca;
use tiproxy_tests::{Etcd, EtcdTls, ProxyProcess, TidbDouble, binary, double_opts};

/// Every certificate of the cluster, signed by `ca`, and a `rogue` CA
/// that signed nothing the cluster trusts.
struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    rogue: Ca,
    /// etcd's server certificate (CN `etcd`, valid for 127.0.0.1).
    etcd: (String, String),
    /// The TiDB status ports' certificate (CN `tidb`). It names a host
    /// nobody dials: as TiProxy, the proxy checks the chain, not the name.
    status: (String, String),
    /// What a TiDB shows etcd (CN `tidb`).
    tidb_client: (String, String),
    /// What the proxy shows etcd and TiDB (CN `tiproxy`).
    proxy_client: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "cluster");
        let rogue = Ca::new(dir.path(), "rogue");
        let etcd = ca.sign_cn("etcd", "etcd", &["127.0.0.1", "localhost"]);
        let status = ca.sign_cn("status", "tidb", &["tidb.cluster.invalid"]);
        let tidb_client = ca.sign_cn("tidb-client", "tidb", &["tidb"]);
        let proxy_client = ca.sign_cn("proxy-client", "tiproxy", &["tiproxy"]);
        Pki {
            _dir: dir,
            ca,
            rogue,
            etcd,
            status,
            tidb_client,
            proxy_client,
        }
    }

    /// etcd serving TLS only, client certificates required.
    fn etcd(&self) -> Etcd {
        Etcd::start_tls(EtcdTls {
            cert: self.etcd.0.clone(),
            key: self.etcd.1.clone(),
            ca: self.ca.pem(),
        })
    }

    /// `instances` TiDB doubles registered in `etcd` over TLS, status
    /// ports over HTTPS that require a client certificate.
    fn tidb(&self, etcd: &Etcd, instances: usize, graceful_wait: u64) -> TidbDouble {
        let ca = self.ca.pem();
        TidbDouble::start(
            instances,
            graceful_wait,
            &[
                "--pd",
                &etcd.endpoint(),
                "--pd-ttl",
                "5",
                "--pd-tls-ca",
                &ca,
                "--pd-tls-cert",
                &self.tidb_client.0,
                "--pd-tls-key",
                &self.tidb_client.1,
                "--status-tls-cert",
                &self.status.0,
                "--status-tls-key",
                &self.status.1,
                "--status-tls-ca",
                &ca,
            ],
        )
    }

    /// `[security.cluster-tls]` trusting `ca`, showing the proxy's
    /// certificate, with `allowed` as `cert-allowed-cn`.
    fn cluster_tls(&self, ca: &str, allowed: &[&str]) -> String {
        let allowed: Vec<String> = allowed.iter().map(|n| format!("\"{n}\"")).collect();
        format!(
            "[security.cluster-tls]\nca = \"{ca}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             cert-allowed-cn = [{}]\n",
            self.proxy_client.0,
            self.proxy_client.1,
            allowed.join(", ")
        )
    }
}

/// A proxy discovering TiDB through `etcd`, with `security` appended.
fn proxy_on_pd(etcd: &Etcd, security: &str) -> ProxyProcess {
    ProxyProcess::start_with_backends(
        &[],
        &format!(
            "pd-addrs = \"{}\"\n[health-check]\nmetrics-interval = \"300ms\"\n{security}",
            etcd.endpoint()
        ),
    )
}

/// `/api/backends` as JSON.
fn backends(p: &ProxyProcess) -> Vec<serde_json::Value> {
    let (status, body) = p.get("/api/backends");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .expect("json")
        .as_array()
        .expect("a list")
        .clone()
}

fn backend(p: &ProxyProcess, sql: SocketAddr) -> Option<serde_json::Value> {
    backends(p)
        .into_iter()
        .find(|b| b["addr"] == sql.to_string())
}

/// Polls `f` every 50 ms until it holds; fails with the proxy's log after
/// `limit`.
fn wait_for(p: &ProxyProcess, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; log:\n{}",
            p.log.lock().expect("log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a log line holding every one of `needles`; returns it.
fn log_line(p: &ProxyProcess, needles: &[&str], limit: Duration) -> String {
    let mut found = String::new();
    wait_for(p, &format!("a log line with {needles:?}"), limit, || {
        let log = p.log.lock().expect("log");
        match log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            Some(l) => {
                found = l.to_string();
                true
            }
            None => false,
        }
    });
    found
}

async fn select_one(sql: SocketAddr) -> Result<i64, mysql_async::Error> {
    let mut c = mysql_async::Conn::new(double_opts(sql)).await?;
    let v: Option<i64> = c.query_first("SELECT 1").await?;
    c.disconnect().await?;
    Ok(v.unwrap_or(0))
}

/// Reads every key under `prefix` from etcd over TLS, as `pki`'s proxy.
fn etcd_keys(pki: &Pki, etcd: &Etcd, prefix: &str) -> Vec<String> {
    let tls = tiproxy_runtime::tls::cluster_config(&TlsConfig {
        ca: pki.ca.pem(),
        cert: pki.proxy_client.0.clone(),
        key: pki.proxy_client.1.clone(),
        ..TlsConfig::default()
    })
    .expect("client TLS")
    .expect("TLS on");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = EtcdPd
            .connect(&[etcd.endpoint()], Some(tls))
            .await
            .expect("etcd over TLS");
        let l = c.get_prefix(prefix).await.expect("get");
        l.kvs.into_iter().map(|(k, _)| k).collect()
    })
}

#[test]
fn discovery_registration_health_and_metrics_over_cluster_tls() {
    let pki = Pki::new();
    let etcd = pki.etcd();
    let tidb = pki.tidb(&etcd, 2, 3);
    let inst = tidb.instances();
    let p = proxy_on_pd(&etcd, &pki.cluster_tls(&pki.ca.pem(), &["etcd", "tidb"]));

    // Discovery over TLS (the TiDBs registered over TLS too), and the
    // status ports answer over HTTPS: both healthy.
    wait_for(
        &p,
        "both TiDBs discovered and healthy",
        Duration::from_secs(20),
        || {
            p.get("/api/debug/health").0 == 200
                && inst.iter().all(|i| {
                    backend(&p, i.sql).is_some_and(|b| {
                        b["state"] == "healthy"
                            && b["accepts_connections"] == true
                            && b["status_addr"] == i.status.to_string()
                    })
                })
        },
    );
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"pd\":\"ok\""), "{body}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    assert_eq!(
        rt.block_on(select_one(p.sql))
            .expect("a query through the proxy"),
        1
    );

    // The proxy registered itself in etcd over TLS, as TiProxy does.
    let keys = etcd_keys(&pki, &etcd, "/topology/tiproxy/");
    for suffix in ["info", "ttl"] {
        assert!(
            keys.iter()
                .any(|k| k.ends_with(&format!("{}/{suffix}", p.sql))),
            "{keys:?}"
        );
    }

    // Metrics over HTTPS: the memory use a TiDB reports reaches the proxy.
    tidb.set_load(0, None, Some(0.6));
    wait_for(
        &p,
        "TiDB 0's memory use read over HTTPS",
        Duration::from_secs(10),
        || {
            backend(&p, inst[0].sql)
                .and_then(|b| b["memory_usage"].as_f64())
                .is_some_and(|m| (m - 0.6).abs() < 0.01)
        },
    );

    // Health over HTTPS: a graceful shutdown's 500 is seen (draining),
    // then the TiDB deregisters over TLS and leaves the list.
    tidb.shutdown(1);
    wait_for(&p, "TiDB 1 draining", Duration::from_secs(3), || {
        backend(&p, inst[1].sql).is_some_and(|b| b["state"] == "draining")
    });
    wait_for(&p, "TiDB 1 gone from PD", Duration::from_secs(30), || {
        backend(&p, inst[1].sql).is_none_or(|b| b["state"] == "removed")
    });
    assert_eq!(
        rt.block_on(select_one(p.sql))
            .expect("a query after TiDB 1 left"),
        1
    );
}

#[test]
fn a_wrong_ca_or_a_disallowed_cn_is_refused_with_a_clear_log_line() {
    let pki = Pki::new();
    let etcd = pki.etcd();
    let tidb = pki.tidb(&etcd, 1, 0);
    let inst = tidb.instances();
    let limit = Duration::from_secs(15);

    // PD's certificate is not signed by the CA the proxy trusts.
    let p = proxy_on_pd(&etcd, &pki.cluster_tls(&pki.rogue.pem(), &[]));
    log_line(
        &p,
        &[
            "PD unreachable",
            "TLS handshake with PD",
            "not signed by the trusted CA",
        ],
        limit,
    );
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("not signed by the trusted CA"), "{body}");
    drop(p);

    // PD's certificate is signed by the CA, but its Common Name (etcd) is
    // not in cert-allowed-cn.
    let p = proxy_on_pd(&etcd, &pki.cluster_tls(&pki.ca.pem(), &["pd-only"]));
    log_line(
        &p,
        &[
            "PD unreachable",
            "is not in security.cluster-tls.cert-allowed-cn",
        ],
        limit,
    );
    assert!(backends(&p).is_empty());
    drop(p);

    // A TiDB status port with a certificate from another CA, and one whose
    // Common Name is not allowed: the backend's status is unreachable.
    let entry = TidbDouble::backend_entry(&inst[0]);
    for (ca, allowed, words) in [
        (pki.rogue.pem(), vec![], "not signed by the trusted CA"),
        (
            pki.ca.pem(),
            vec!["someone-else"],
            "is not in security.cluster-tls.cert-allowed-cn",
        ),
    ] {
        let p = ProxyProcess::start_with_backends(
            std::slice::from_ref(&entry),
            &pki.cluster_tls(&ca, &allowed),
        );
        let status = inst[0].status.to_string();
        log_line(
            &p,
            &[
                "status port unreachable",
                "TLS handshake with",
                &status,
                words,
            ],
            limit,
        );
    }

    // etcd refuses a proxy whose own certificate another CA signed. (Why
    // is said only when the proxy reads PD's alert before its next write
    // fails: after a TLS 1.3 handshake the two race.)
    let rogue_client = pki.rogue.sign_cn("rogue-client", "tiproxy", &["tiproxy"]);
    let p = proxy_on_pd(
        &etcd,
        &format!(
            "[security.cluster-tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.ca.pem(),
            rogue_client.0,
            rogue_client.1
        ),
    );
    log_line(&p, &["PD unreachable"], limit);
    let (status, body) = p.get("/api/debug/health");
    assert_eq!(status, 502, "{body}");
    assert!(backends(&p).is_empty());
}

/// `tiproxyctl` over HTTPS with a client certificate: (exit code, stdout,
/// stderr).
fn ctl(
    api: SocketAddr,
    ca: &str,
    cert: &(String, String),
    args: &[&str],
) -> (Option<i32>, String, String) {
    let out = Command::new(binary("tiproxyctl"))
        .args(["--host", &api.ip().to_string()])
        .args(["--port", &api.port().to_string()])
        .args(["--ca", ca, "--cert", &cert.0, "--key", &cert.1])
        .args(args)
        .output()
        .expect("run tiproxyctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn api_client_certificates_are_checked_against_cert_allowed_cn() {
    let pki = Pki::new();
    let api = pki
        .ca
        .sign_cn("api", "tiproxy-api", &["127.0.0.1", "localhost"]);
    let prometheus = pki.ca.sign_cn("prometheus", "prometheus", &["prometheus"]);
    let intruder = pki.ca.sign_cn("intruder", "intruder", &["intruder"]);
    let outsider = pki.rogue.sign_cn("outsider", "prometheus", &["prometheus"]);
    let tidb = TidbDouble::start(1, 0, &[]);
    let entry = TidbDouble::backend_entry(&tidb.instances()[0]);
    let ca = pki.ca.pem();
    let p = ProxyProcess::start_with_backends(
        &[entry],
        &format!(
            "[security.server-http-tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{ca}\"\n\
             cert-allowed-cn = [\"prometheus\", \" tidb \"]\n",
            api.0, api.1
        ),
    );

    // A listed Common Name gets in.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = ctl(p.api, &ca, &prometheus, &["health"]);
        if code == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health as prometheus: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out, err) = ctl(p.api, &ca, &prometheus, &["config", "get"]);
    assert_eq!(code, Some(0), "{out}{err}");

    // Signed by the CA but not listed: refused, and the proxy says why.
    let (code, out, err) = ctl(p.api, &ca, &intruder, &["config", "get"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(!out.contains("[proxy]"), "{out}");
    let line = log_line(
        &p,
        &[
            "security.server-http-tls",
            "refused a TLS peer",
            "intruder",
            "cert-allowed-cn",
        ],
        Duration::from_secs(5),
    );
    assert!(line.contains("WARN"), "{line}");

    // A listed name from another CA: refused too, once a minute in the log
    // (the second refusal is counted into the next line, not logged).
    let (code, out, err) = ctl(p.api, &ca, &outsider, &["config", "get"]);
    assert_ne!(code, Some(0), "{out}{err}");
    std::thread::sleep(Duration::from_millis(300));
    let log = p.log.lock().expect("log").clone();
    assert_eq!(log.matches("refused a TLS peer").count(), 1, "{log}");
}
