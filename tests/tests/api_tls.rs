//! The HTTP API over TLS (`[security.server-http-tls]`) and `tiproxyctl`'s
//! TLS flags, with the real `tiproxy`, `tiproxyctl` and `tidb-double`
//! binaries and certificates made here with rcgen.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tiproxy_tests::pki::Ca;
use tiproxy_tests::{ProxyProcess, TidbDouble, binary, http_get};

/// `tiproxyctl --port <api port> args...`: (exit code, stdout, stderr).
fn ctl(api: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(binary("tiproxyctl"));
    if !args.contains(&"--host") {
        cmd.args(["--host", &api.ip().to_string()]);
    }
    let out = cmd
        .args(["--port", &api.port().to_string()])
        .args(args)
        .output()
        .expect("run tiproxyctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Retries `tiproxyctl args` until it exits 0 (health waits for the first
/// backend check; reloads take a moment).
fn ctl_until_ok(p: &ProxyProcess, args: &[&str], what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = ctl(p.api, args);
        if code == Some(0) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: tiproxyctl {args:?} exited {code:?}\nstdout: {out}\nstderr: {err}\nlog:\n{}",
            p.log.lock().expect("log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A proxy in front of one TiDB double, with `top` (top-level keys) first
/// and `security` (tables) last.
fn proxy(tidb: &TidbDouble, top: &str, security: &str) -> ProxyProcess {
    let backend = TidbDouble::backend_entry(&tidb.instances()[0]);
    let (top, security) = (top.to_string(), security.to_string());
    ProxyProcess::start_with_config(move |sql, api| {
        format!(
            "{top}[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [{backend}]\n\
             [api]\naddr = \"{api}\"\n{security}"
        )
    })
}

#[test]
fn https_api_verified_with_ca_or_insecure_and_refused_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "api");
    let other = Ca::new(dir.path(), "other");
    let (cert, key) = ca.sign("server", &["127.0.0.1", "localhost"]);
    let (client, client_key) = other.sign("client", &["client"]);
    let tidb = TidbDouble::start(1, 0, &[]);
    let p = proxy(
        &tidb,
        "",
        &format!("[security.server-http-tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n"),
    );
    let sql = tidb.instances()[0].sql.to_string();

    // Verified against the CA: health, then a route only HTTPS serves.
    ctl_until_ok(&p, &["--ca", &ca.pem(), "health"], "health with --ca");
    let (code, out, err) = ctl(p.api, &["--ca", &ca.pem(), "backends"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&sql), "{out}");

    // Without verification: --insecure, -k, and TiProxy's `--ca skip`.
    for flags in [&["--insecure"][..], &["-k"], &["--ca", "skip"]] {
        let args: Vec<&str> = flags.iter().copied().chain(["backends"]).collect();
        let (code, out, err) = ctl(p.api, &args);
        assert_eq!(code, Some(0), "{flags:?}: {out}{err}");
        assert!(out.contains(&sql), "{flags:?}: {out}");
    }

    // The wrong CA, and no CA (the public web roots): not trusted, exit 2,
    // naming the address and what to pass.
    let target = format!("tiproxy at {}", p.api);
    let other_ca = other.pem();
    for flags in [
        vec!["--ca", other_ca.as_str()],
        vec!["--cert", client.as_str(), "--key", client_key.as_str()],
    ] {
        let args: Vec<&str> = flags.iter().copied().chain(["health"]).collect();
        let (code, out, err) = ctl(p.api, &args);
        assert_eq!(code, Some(2), "{flags:?}: {out}{err}");
        assert!(err.contains(&format!("TLS with {target} failed")), "{err}");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(err.contains("not trusted: pass --ca"), "{err}");
        assert!(out.is_empty(), "{out}");
    }

    // Plain HTTP: TiProxy's exception, the health check for load
    // balancers, answers; every other route says to use HTTPS.
    let (status, body) = http_get(p.api, "/api/debug/health");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(p.api, "/api/admin/config");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("served over HTTPS"), "{body}");
    assert!(
        !body.contains("[proxy]"),
        "config leaked over plain HTTP: {body}"
    );
    let (code, out, err) = ctl(p.api, &["config", "get"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("served over HTTPS"), "{out}");
    let (code, out, _) = ctl(p.api, &["health"]);
    assert_eq!(code, Some(0), "plain health: {out}");

    // Unusable files are CLI errors (exit 2) naming the flag and the file.
    let missing = dir.path().join("missing.pem").display().to_string();
    let (code, _, err) = ctl(p.api, &["--ca", &missing, "health"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--ca {missing}: cannot read")),
        "{err}"
    );
    let (code, _, err) = ctl(p.api, &["--ca", &key, "health"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no certificate in the file"), "{err}");
    let (code, _, err) = ctl(p.api, &["--ca", &ca.pem(), "--cert", &client, "health"]);
    assert_eq!(code, Some(2), "--cert without --key: {err}");
    assert!(err.contains("--key"), "{err}");
    let (code, _, err) = ctl(
        p.api,
        &[
            "--ca",
            &ca.pem(),
            "--cert",
            &client,
            "--key",
            &missing,
            "health",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("--key {missing}")), "{err}");

    // A rotated certificate (another CA) is used by new connections.
    let next = Ca::new(dir.path(), "next");
    let (c2, k2) = next.sign("server-next", &["127.0.0.1"]);
    std::fs::rename(k2, &key).expect("rename key");
    std::fs::rename(c2, &cert).expect("rename cert");
    ctl_until_ok(
        &p,
        &["--ca", &next.pem(), "health"],
        "the rotated certificate",
    );
    let (code, _, err) = ctl(p.api, &["--ca", &ca.pem(), "health"]);
    assert_eq!(code, Some(2), "the old CA no longer verifies: {err}");
}

#[test]
fn https_api_with_ca_requires_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "api");
    let clients = Ca::new(dir.path(), "clients");
    let stranger = Ca::new(dir.path(), "stranger");
    let (cert, key) = ca.sign("server", &["127.0.0.1"]);
    let (good, good_key) = clients.sign("operator", &["operator"]);
    let (bad, bad_key) = stranger.sign("intruder", &["intruder"]);
    let tidb = TidbDouble::start(1, 0, &[]);
    let p = proxy(
        &tidb,
        "",
        &format!(
            "[security.server-http-tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{}\"\n",
            clients.pem()
        ),
    );
    let out = ctl_until_ok(
        &p,
        &[
            "--ca",
            &ca.pem(),
            "--cert",
            &good,
            "--key",
            &good_key,
            "backends",
        ],
        "a client certificate signed by security.server-http-tls.ca",
    );
    assert!(out.contains(&tidb.instances()[0].sql.to_string()), "{out}");

    let api_ca = ca.pem();
    for (what, flags) in [
        ("no client certificate", vec!["--ca", api_ca.as_str()]),
        (
            "a certificate from another CA",
            vec!["--ca", api_ca.as_str(), "--cert", &bad, "--key", &bad_key],
        ),
    ] {
        let args: Vec<&str> = flags.iter().copied().chain(["backends"]).collect();
        let (code, out, err) = ctl(p.api, &args);
        assert_eq!(code, Some(2), "{what}: {out}{err}");
        assert!(out.is_empty(), "{what}: {out}");
        assert!(
            err.contains(&format!("TLS with tiproxy at {} failed", p.api)),
            "{what}: {err}"
        );
        assert!(
            err.contains("refused the client certificate"),
            "{what}: {err}"
        );
    }
    // Plain HTTP still gets the health check and nothing else.
    assert_eq!(http_get(p.api, "/api/debug/health").0, 200);
    assert_eq!(http_get(p.api, "/api/sessions").0, 400);
}

#[test]
fn auto_certs_and_a_plain_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workdir = dir.path().join("work");
    let tidb = TidbDouble::start(1, 0, &[]);
    let p = proxy(
        &tidb,
        &format!("workdir = \"{}\"\n", workdir.display()),
        "[security.server-http-tls]\nauto-certs = true\n",
    );
    let generated = workdir.join("server-http-cert.pem");
    assert!(
        generated.exists(),
        "auto-certs writes {}",
        generated.display()
    );
    ctl_until_ok(&p, &["--insecure", "health"], "auto-certs with --insecure");
    // The generated certificate names localhost: trusting it verifies.
    let (code, out, err) = ctl(
        p.api,
        &[
            "--host",
            "localhost",
            "--ca",
            &generated.display().to_string(),
            "backends",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    drop(p);

    // server-http-tls off: plain HTTP serves every route, and tiproxyctl
    // with TLS flags says the API is not TLS.
    let p = proxy(&tidb, "", "");
    ctl_until_ok(&p, &["health"], "plain health");
    let (status, body) = http_get(p.api, "/api/backends");
    assert_eq!(status, 200, "{body}");
    let (code, out, err) = ctl(p.api, &["--insecure", "health"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("is tiproxy's API plain HTTP"), "{err}");

    // Turned on live through PUT /api/admin/config: new API connections
    // are HTTPS.
    let ca = Ca::new(dir.path(), "live");
    let (cert, key) = ca.sign("live-server", &["127.0.0.1"]);
    let patch = format!("[security.server-http-tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
    let (status, body) =
        tiproxy_tests::http_request_with_body(p.api, "PUT", "/api/admin/config", &patch);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("security.server-http-tls.cert"), "{body}");
    let (code, out, err) = ctl(p.api, &["--ca", &ca.pem(), "backends"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(http_get(p.api, "/api/backends").0, 400);
}
