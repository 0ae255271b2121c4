//! Every HTTP API route, including bad input, against the tiproxy binary in
//! front of a real MariaDB; and `tiproxyctl` driving them.

use std::net::SocketAddr;
use std::process::Command;

use mysql_async::prelude::*;
use tiproxy_conformance::mariadb::{APP_USER, DATABASE};
use tiproxy_tests::{ProxyProcess, binary, mariadb, opts};

fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    tiproxy_tests::http_request_with_body(addr, method, path, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_routes_and_overrides() {
    let p = ProxyProcess::start(&[mariadb().addr()], "");
    assert_eq!(call(p.api, "GET", "/api/debug/health", "").0, 200);
    assert_eq!(
        call(p.api, "GET", "/debug/health", "").0,
        200,
        "also without the /api prefix"
    );
    let (s, b) = call(
        p.api,
        "PUT",
        "/api/debug/health",
        r#"{"healthy": false, "reason": "maintenance"}"#,
    );
    assert_eq!(s, 502, "{b}");
    assert!(
        json(&b)["unhealthy_reason"]
            .as_str()
            .unwrap()
            .contains("maintenance")
    );
    assert_eq!(call(p.api, "GET", "/api/debug/health", "").0, 502);
    let (s, b) = call(p.api, "PUT", "/api/debug/health", "{not json");
    assert_eq!(s, 400, "{b}");
    assert!(json(&b)["error"].as_str().unwrap().contains("healthy"));
    assert_eq!(call(p.api, "DELETE", "/api/debug/health", "").0, 200);
    assert_eq!(call(p.api, "GET", "/api/debug/health", "").0, 200);
    let (s, b) = call(p.api, "POST", "/api/debug/health", "");
    assert_eq!(s, 405, "{b}");
    assert!(json(&b)["error"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_unknown_routes() {
    let p = ProxyProcess::start(&[mariadb().addr()], "");
    let (s, b) = call(p.api, "GET", "/api/metrics", "");
    assert_eq!(s, 200);
    assert!(b.contains("tiproxy_server_connections"));
    assert_eq!(call(p.api, "DELETE", "/api/metrics", "").0, 405);
    let (s, b) = call(p.api, "GET", "/api/nothing/here", "");
    assert_eq!(s, 404);
    assert!(
        json(&b)["error"]
            .as_str()
            .unwrap()
            .contains("/api/nothing/here")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn config_get_and_put() {
    let p = ProxyProcess::start(&[mariadb().addr()], "");
    let (s, t) = call(p.api, "GET", "/api/admin/config", "");
    assert_eq!(s, 200);
    let parsed: toml::Table = t.parse().expect("GET returns TOML");
    assert_eq!(
        parsed["proxy"]["addr"].as_str(),
        Some(p.sql.to_string().as_str())
    );
    let (s, j) = call(p.api, "GET", "/api/admin/config?format=json", "");
    assert_eq!(s, 200);
    assert_eq!(
        json(&j)["api"]["addr"].as_str(),
        Some(p.api.to_string().as_str())
    );

    // A partial document patches: max-connections applies at once.
    let (s, b) = call(
        p.api,
        "PUT",
        "/api/admin/config",
        "[proxy]\nmax-connections = 1\n",
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["restart_required"], serde_json::json!([]));
    let first = mysql_async::Conn::new(opts(p.sql)).await.expect("first");
    match mysql_async::Conn::new(opts(p.sql)).await {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1040),
        other => panic!("expected 1040 after lowering max-connections, got {other:?}"),
    }
    drop(first);
    let (_, t) = call(p.api, "GET", "/api/admin/config", "");
    assert!(t.contains("max-connections = 1"), "{t}");
    assert!(
        t.contains(&p.sql.to_string()),
        "the rest of the config is kept: {t}"
    );

    // What cannot change live says so.
    let (s, b) = call(
        p.api,
        "PUT",
        "/api/admin/config",
        "[proxy]\naddr = \"127.0.0.1:1\"\n",
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        json(&b)["restart_required"],
        serde_json::json!(["proxy.addr"])
    );

    // Bad input: malformed TOML, a bad value, a wrong type.
    let (s, b) = call(p.api, "PUT", "/api/admin/config", "[proxy\nmax");
    assert_eq!(s, 400, "{b}");
    assert!(json(&b)["error"].as_str().unwrap().contains("TOML"), "{b}");
    let (s, b) = call(
        p.api,
        "PUT",
        "/api/admin/config",
        "[proxy]\nconn-buffer-size = 3\n",
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        json(&b)["error"]
            .as_str()
            .unwrap()
            .contains("conn-buffer-size"),
        "{b}"
    );
    let (s, b) = call(
        p.api,
        "PUT",
        "/api/admin/config",
        "[proxy]\nmax-connections = \"lots\"\n",
    );
    assert_eq!(s, 400, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_drain_and_sessions() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let addr = db.addr().to_string();
    let (s, b) = call(p.api, "GET", "/api/backends", "");
    assert_eq!(s, 200);
    let list = json(&b);
    assert_eq!(list[0]["addr"].as_str(), Some(addr.as_str()));
    assert_eq!(list[0]["state"].as_str(), Some("healthy"));

    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("BEGIN").await.expect("begin");
    let (s, b) = call(p.api, "GET", "/api/sessions", "");
    assert_eq!(s, 200);
    let sessions = json(&b);
    let me = &sessions[0];
    assert_eq!(me["user"].as_str(), Some(APP_USER));
    assert_eq!(me["db"].as_str(), Some(DATABASE));
    assert_eq!(me["backend"].as_str(), Some(addr.as_str()));
    assert_eq!(me["in_transaction"].as_bool(), Some(true));
    assert!(me["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    c.query_drop("COMMIT").await.expect("commit");

    // Drain: no new connections (the only backend), state says so; undrain.
    let (s, b) = call(p.api, "POST", &format!("/api/backends/{addr}/drain"), "");
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["state"].as_str(), Some("draining"));
    match mysql_async::Conn::new(opts(p.sql)).await {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1429),
        other => panic!("a drained backend took a connection: {other:?}"),
    }
    let (s, _) = call(p.api, "POST", &format!("/api/backends/{addr}/undrain"), "");
    assert_eq!(s, 200);
    mysql_async::Conn::new(opts(p.sql))
        .await
        .expect("undrained backend serves again");
    c.query_drop("SELECT 1")
        .await
        .expect("the existing session was never disturbed");

    let (s, b) = call(p.api, "POST", "/api/backends/nowhere:1/drain", "");
    assert_eq!(s, 404, "{b}");
    assert_eq!(
        call(p.api, "GET", &format!("/api/backends/{addr}/drain"), "").0,
        405
    );
    assert_eq!(
        call(p.api, "POST", "/api/debug/redirect?to=nowhere:1", "").0,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tiproxyctl_drives_the_api() {
    let db = mariadb();
    let p = ProxyProcess::start(&[db.addr()], "");
    let ctl = |args: &[&str]| {
        let out = Command::new(binary("tiproxyctl"))
            .args(["--port", &p.api.port().to_string()])
            .args(args)
            .output()
            .expect("run tiproxyctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = ctl(&["backends"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&db.addr().to_string()));
    let (code, out) = ctl(&["config", "get"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("[proxy]"), "{out}");
    let (code, out) = ctl(&["config", "get", "--json"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"proxy\""), "{out}");
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("patch.toml");
    std::fs::write(&f, "[proxy]\nmax-connections = 7\n").expect("write");
    let (code, out) = ctl(&["config", "set", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    std::fs::write(&f, "[proxy\n").expect("write");
    let (code, _) = ctl(&["config", "set", f.to_str().unwrap()]);
    assert_eq!(code, Some(1), "a rejected config exits 1");
    let (code, out) = ctl(&["drain", &db.addr().to_string()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("draining"), "{out}");
    let (code, _) = ctl(&["undrain", &db.addr().to_string()]);
    assert_eq!(code, Some(0));
    let (code, out) = ctl(&["sessions"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with('['), "{out}");
}
