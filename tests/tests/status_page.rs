//! The web status page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): it renders the backends, shows
//! a TiDB that joins later, shows a drained one as draining, lists the
//! sessions, and counts query errors and session moves. Real processes:
//! etcd as PD, TiDB doubles registering in it, the tiproxy binary.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use serde_json::{Value, json};
use tiproxy_tests::{Etcd, ProxyProcess, TidbDouble, free_port, http_request, install};

/// Every wait in this test is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// chromedriver (and the Chromium it starts) in a process group of its own,
/// with a temporary profile; the whole group is killed on drop, pass or fail.
struct Browser {
    driver: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        // Installed by scripts/test.sh and .ci/run. In CI a missing browser
        // is a broken install step and fails the test; a developer machine
        // gets the packages here. Never skipped.
        for probe in ["chromium", "chromedriver"] {
            if std::env::var("CI").as_deref() == Ok("true") {
                assert!(
                    on_path(probe),
                    "{probe} is missing: .ci/run must install chromium and chromium-driver"
                );
            } else {
                install(&["chromium", "chromium-driver"], probe);
            }
        }
        let port = free_port();
        let profile = tempfile::tempdir().expect("tempdir");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver is installed (Debian package chromium-driver)");
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Browser {
            driver,
            port,
            profile,
        }
    }

    /// A WebDriver session on a headless Chromium.
    async fn client(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    // CI runs as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    // Containers give /dev/shm only a few MiB.
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        match tokio::time::timeout(WAIT, builder.connect(&url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("Chromium did not start through chromedriver: {e}"),
            Err(_) => panic!("Chromium did not start within {WAIT:?}"),
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group holds chromedriver and every Chromium process it started
        // (its id is chromedriver's). `--` is needed: without it procps kill
        // turns `-KILL -1791` into kill(-1, SIGKILL), every process.
        let group = self.driver.id();
        if group > 1 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows: its title and the text of every table cell.
async fn page(client: &Client) -> Value {
    const READ: &str = r#"
        const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)]
            .map((r) => [...r.cells].map((c) => c.textContent));
        return {
            title: document.title,
            health: document.getElementById("health").textContent,
            qps: document.getElementById("qps").textContent,
            backends: rows("backends"),
            sessions: rows("sessions"),
            moves: rows("moves"),
            errors: rows("errors"),
        };"#;
    match tokio::time::timeout(WAIT, client.execute(READ, vec![])).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("reading the page: {e}"),
        Err(_) => panic!("reading the page took over {WAIT:?}"),
    }
}

/// Waits until the page shows what `ok` looks for; the last view on failure.
async fn until(client: &Client, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = page(client).await;
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "the page did not show {what} within {WAIT:?}; it shows:\n{v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cells of the row whose first cell is `key` in table `table`.
fn row<'a>(v: &'a Value, table: &str, key: &str) -> Option<Vec<&'a str>> {
    v[table].as_array()?.iter().find_map(|r| {
        let cells: Vec<&str> = r.as_array()?.iter().filter_map(Value::as_str).collect();
        (cells.first() == Some(&key)).then_some(cells)
    })
}

/// A "since start" (last column) counter of the errors or moves table.
fn total(v: &Value, table: &str, key: &str) -> u64 {
    row(v, table, key)
        .and_then(|r| r.last()?.parse().ok())
        .unwrap_or(0)
}

fn post(api: SocketAddr, path: &str) {
    let (status, body) = http_request(api, "POST", path);
    assert_eq!(status, 200, "POST {path}: {body}");
}

/// A request with the response headers kept: (status, headers as
/// lower-case `name: value` lines, body).
fn get_raw(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let r = tiproxy_tests::http_exchange(addr, method, path, "");
    let head: String = r
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\r\n", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    (
        r.status,
        head.to_ascii_lowercase(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn page_files_and_status_json() {
    let cluster = TidbDouble::start(1, 0, &[]);
    let backend = TidbDouble::backend_entry(&cluster.instances()[0]);
    let proxy = ProxyProcess::start_with_backends(&[backend], "");

    let (status, head, body) = get_raw(proxy.api, "GET", "/");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "the page may load nothing from elsewhere: {head}"
    );
    assert!(body.contains("<title>tiproxy status</title>"), "{body}");
    for (file, kind) in [
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let (status, head, body) = get_raw(proxy.api, "GET", file);
        assert_eq!(status, 200, "{file}: {body}");
        assert!(head.contains(kind), "{file}: {head}");
        assert!(body.len() > 500, "{file} is the real file");
    }
    assert_eq!(get_raw(proxy.api, "GET", "/ui/nothing.js").0, 404);
    assert_eq!(get_raw(proxy.api, "GET", "/api").0, 404, "/api is no page");
    assert_eq!(get_raw(proxy.api, "POST", "/").0, 405);
    assert_eq!(get_raw(proxy.api, "POST", "/api/status").0, 405);

    // One good and one failing query through the proxy.
    let opts = OptsBuilder::default()
        .ip_or_hostname(proxy.sql.ip().to_string())
        .tcp_port(proxy.sql.port())
        .user(Some("root"))
        .prefer_socket(false);
    let mut conn = tokio::time::timeout(WAIT, Conn::new(opts))
        .await
        .expect("connect within the limit")
        .expect("a session through the proxy");
    conn.query_drop("SELECT 1").await.expect("select");
    conn.query_drop("SELECT * FROM no_such_db.no_such_table")
        .await
        .expect_err("the backend answers with an error");

    let (status, _, body) = get_raw(proxy.api, "GET", "/api/status");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["connections"], 1, "{v:#}");
    assert!(v["queries"].as_u64() >= Some(2), "{v:#}");
    assert_eq!(v["query_errors"], 1, "{v:#}");
    assert_eq!(
        v["migrations"],
        json!({ "succeeded": 0, "failed": 0 }),
        "{v:#}"
    );
    assert!(v["unhealthy_reason"].is_null(), "{v:#}");
    let (_, metrics) = proxy.get("/api/metrics");
    assert!(
        metrics.contains("tiproxy_session_query_error_total{cmd_type=\"Query\"} 1"),
        "{metrics}"
    );
    let (_, sessions) = proxy.get("/api/sessions");
    let sessions: Value = serde_json::from_str(&sessions).expect("JSON");
    assert!(sessions[0]["commands"].as_u64() >= Some(2), "{sessions:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_in_chromium_shows_backends_sessions_moves_and_errors() {
    let etcd = Etcd::start();
    let cluster = TidbDouble::start(1, 0, &["--pd", &etcd.endpoint(), "--pd-ttl", "5"]);
    let proxy =
        ProxyProcess::start_with_backends(&[], &format!("pd-addrs = \"{}\"", etcd.endpoint()));
    let a = cluster.instances()[0].sql.to_string();
    // Healthy once PD has answered with the TiDB.
    let start = Instant::now();
    while proxy.get("/api/debug/health").0 != 200 {
        // PD's first answer and the first status check; generous, as the
        // machine may be busy building.
        assert!(
            start.elapsed() < 3 * WAIT,
            "the proxy never became healthy: {}\n{}",
            proxy.get("/api/debug/health").1,
            proxy.log.lock().expect("log")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One client session with a few queries and one that fails.
    let opts = OptsBuilder::default()
        .ip_or_hostname(proxy.sql.ip().to_string())
        .tcp_port(proxy.sql.port())
        .user(Some("root"))
        .prefer_socket(false);
    let mut conn = tokio::time::timeout(WAIT, Conn::new(opts))
        .await
        .expect("connect within the limit")
        .expect("a session through the proxy");
    for _ in 0..3 {
        conn.query_drop("SELECT 1").await.expect("select");
    }
    conn.query_drop("SELECT * FROM no_such_db.no_such_table")
        .await
        .expect_err("the backend answers with an error");

    let browser = Browser::start();
    let client = browser.client().await;
    let url = format!("http://{}/", proxy.api);
    tokio::time::timeout(WAIT, client.goto(&url))
        .await
        .expect("page load within the limit")
        .expect("the page loads");
    let title = client.title().await.expect("title");
    assert_eq!(title, "tiproxy status");

    let v = until(
        &client,
        "the first TiDB as healthy, the session and the query error",
        |v| {
            row(v, "backends", &a).is_some_and(|r| r[1] == "healthy" && r[2] == "1")
                && v["sessions"].as_array().is_some_and(|s| s.len() == 1)
                && total(v, "errors", "query errors (backend ERR)") >= 1
        },
    )
    .await;
    let session = &v["sessions"][0];
    assert_eq!(session[2], a, "the session's backend: {v:#}");
    assert_eq!(session[3], "root", "the session's user: {v:#}");
    assert_eq!(v["health"], "serving");

    // Queries on the session show as QPS, in total and on its backend.
    let start = Instant::now();
    loop {
        for _ in 0..20 {
            conn.query_drop("SELECT 1").await.expect("select");
        }
        let v = page(&client).await;
        let number = |s: Option<&str>| s.and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        let backend_qps = number(row(&v, "backends", &a).map(|r| r[3]));
        if backend_qps > 0.0 && number(v["qps"].as_str()) > 0.0 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the page never showed queries per second: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A TiDB joins through PD: the page shows it without a reload.
    let b = cluster.add().sql.to_string();
    until(&client, "the TiDB added afterwards", |v| {
        row(v, "backends", &b).is_some_and(|r| r[1] == "healthy")
    })
    .await;

    // Drained by an operator: shown as draining.
    post(proxy.api, &format!("/api/backends/{b}/drain"));
    until(&client, "the drained TiDB as draining", |v| {
        row(v, "backends", &b).is_some_and(|r| r[1].starts_with("draining"))
    })
    .await;

    // Undrain it and drain the first one: the session moves, and the page
    // shows it on its new TiDB and counts the move.
    post(proxy.api, &format!("/api/backends/{b}/undrain"));
    post(proxy.api, &format!("/api/backends/{a}/drain"));
    let v = until(&client, "the session moved to the second TiDB", |v| {
        row(v, "backends", &a).is_some_and(|r| r[1].starts_with("draining"))
            && v["sessions"].as_array().is_some_and(|s| s.len() == 1)
            && v["sessions"][0][2] == b.as_str()
            && total(v, "moves", "succeeded") >= 1
    })
    .await;
    assert_eq!(total(&v, "moves", "failed"), 0, "{v:#}");

    if let Ok(path) = std::env::var("STATUS_PAGE_SCREENSHOT") {
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
    }
    conn.query_drop("SELECT 1")
        .await
        .expect("the moved session still works");
    let _ = tokio::time::timeout(WAIT, client.close()).await;
    drop(browser);
}
