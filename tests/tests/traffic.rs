//! Traffic capture end to end: the tiproxy binary in front of a real
//! MariaDB captures a scripted workload (text and prepared statements,
//! transactions, multi-statements, an error, a statement with a password,
//! four concurrent sessions and one opened before the capture) driven by
//! `tiproxyctl traffic`, encrypted (`security.encryption-key-path`) and
//! compressed; the files are then read as TiProxy's reader would. Also
//! the refusals: `enable-traffic-replay = false`, a used directory, no
//! duration, no key; and `traffic cancel`.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_conformance::mariadb::DATABASE;
use tiproxy_runtime::traffic::format::{Decoder, Record, command_name};
use tiproxy_runtime::traffic::store;
use tiproxy_tests::{ProxyProcess, binary, http_request_with_body, mariadb, opts};

fn ctl(p: &ProxyProcess, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("tiproxyctl"))
        .args(["--host", "127.0.0.1", "--port", &p.api.port().to_string()])
        .args(args)
        .output()
        .expect("run tiproxyctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn show(p: &ProxyProcess) -> serde_json::Value {
    let (ok, out) = ctl(p, &["traffic", "show"]);
    assert!(ok, "traffic show: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn wait_done(p: &ProxyProcess, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let jobs = show(p);
        let last = jobs.as_array().and_then(|a| a.last()).cloned();
        if let Some(j) = last.filter(|j| j["status"] != "running") {
            return j;
        }
        assert!(start.elapsed() < limit, "capture still running: {jobs}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_capture(dir: &Path, key: Option<&[u8; 32]>) -> Vec<Record> {
    let mut out = Vec::new();
    for f in store::list_files(dir).expect("list") {
        let r = store::open_file(&f, key).expect("open");
        let mut d = Decoder::new(r, f.display().to_string());
        while let Some(r) = d.next_record().unwrap_or_else(|e| panic!("decode: {e}")) {
            out.push(r);
        }
    }
    out
}

fn text(r: &Record) -> String {
    String::from_utf8_lossy(&r.payload[1..]).into_owned()
}

fn name(r: &Record) -> &'static str {
    command_name(r.payload[0]).unwrap_or("?")
}

async fn workload(addr: std::net::SocketAddr, i: u32) {
    let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
    c.query_drop(format!("insert into traffic_t values ({i}, 'text')"))
        .await
        .expect("text insert");
    c.exec_drop(
        "insert into traffic_t values (?, ?)",
        (100 + i, format!("prepared {i}")),
    )
    .await
    .expect("prepared insert");
    c.query_drop("begin").await.expect("begin");
    c.query_drop(format!("update traffic_t set v = 'tx' where id = {i}"))
        .await
        .expect("update");
    c.query_drop("commit").await.expect("commit");
    let r: Vec<(i64, i64)> = c
        .query("select 1, 2; select 3, 4")
        .await
        .expect("multi-statement");
    assert_eq!(r, vec![(1, 2)]);
    assert!(
        c.query_drop("select * from traffic_no_such_table")
            .await
            .is_err()
    );
    // Holds a password: TiProxy's capture leaves it out (it fails here
    // anyway: the app user may not create users).
    let _ = c
        .query_drop(format!(
            "CREATE USER traffic_u{i} IDENTIFIED BY 'sekrit-pw'"
        ))
        .await;
    c.disconnect().await.expect("quit");
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_writes_every_command_encrypted_and_compressed() {
    let db = mariadb();
    let dir = tempfile::tempdir().expect("tempdir");
    let keyfile = dir.path().join("enc.key");
    std::fs::write(&keyfile, b"0123456789abcdef0123456789abcdef\n").expect("key");
    let key: [u8; 32] = *b"0123456789abcdef0123456789abcdef";
    let p = ProxyProcess::start(
        &[db.addr()],
        &format!(
            "[security]\nencryption-key-path = \"{}\"\n",
            keyfile.display()
        ),
    );
    let mut setup = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    setup
        .query_drop("drop table if exists traffic_t")
        .await
        .expect("drop");
    setup
        .query_drop("create table traffic_t (id int primary key, v varchar(64))")
        .await
        .expect("create");
    // Opened before the capture: it starts from its current database.
    let mut early = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");

    let out_dir = dir.path().join("capture");
    let (ok, out) = ctl(
        &p,
        &[
            "traffic",
            "capture",
            "--output",
            out_dir.to_str().unwrap(),
            "--duration",
            "4s",
            "--encryption-method",
            "aes256-ctr",
        ],
    );
    assert!(ok && out.contains("capture started"), "{out}");
    let running = show(&p);
    assert_eq!(running[0]["status"], "running", "{running}");
    assert_eq!(running[0]["encryption-method"], "aes256-ctr");
    // One capture at a time.
    let (ok, out) = ctl(
        &p,
        &[
            "traffic",
            "capture",
            "--output",
            "/tmp/x",
            "--duration",
            "1s",
        ],
    );
    assert!(!ok && out.contains("a job is running"), "{out}");

    let n: i64 = early
        .query_first("select count(*) from traffic_t")
        .await
        .expect("early query")
        .expect("a row");
    assert_eq!(n, 0);
    let mut sessions = Vec::new();
    for i in 1..=4 {
        sessions.push(tokio::spawn(workload(p.sql, i)));
    }
    for s in sessions {
        s.await.expect("workload");
    }
    let job = wait_done(&p, Duration::from_secs(20));
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["progress"], "100%", "{job}");

    let files = store::list_files(&out_dir).expect("files");
    assert!(!files.is_empty());
    for f in &files {
        assert!(f.to_string_lossy().ends_with(".log.gz"), "{}", f.display());
        let raw = std::fs::read(f).expect("read");
        assert!(!raw.windows(9).any(|w| w == b"sekrit-pw"));
    }
    let meta = store::read_meta(&out_dir).expect("meta");
    let recs = read_capture(&out_dir, Some(&key));
    assert_eq!(meta.version, "v1");
    assert_eq!(meta.cmds as usize, recs.len(), "meta counts every record");
    assert_eq!(meta.encrypt_method, "aes256-ctr");
    assert!(meta.filtered_cmds >= 4, "{meta:?}");
    assert!(
        recs.iter().all(|r| !text(r).contains("sekrit-pw")),
        "statements with passwords are left out"
    );
    // Without the key the records are unreadable.
    let plain = store::open_file(&files[0], None).map(|mut r| {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        s
    });
    assert!(!plain.unwrap_or_default().starts_with(b"# Time: "));

    // The early session: its database first, then its query.
    let early_conn = recs
        .iter()
        .find(|r| text(r) == "select count(*) from traffic_t")
        .expect("the early session's query")
        .conn_id;
    let early_recs: Vec<&Record> = recs.iter().filter(|r| r.conn_id == early_conn).collect();
    assert!(early_recs.len() >= 2, "{early_recs:?}");
    assert_eq!(name(early_recs[0]), "InitDB");
    assert_eq!(text(early_recs[0]), DATABASE);
    assert_eq!(text(early_recs[1]), "select count(*) from traffic_t");

    // Every workload session, command by command.
    for i in 1..=4u32 {
        let insert = format!("insert into traffic_t values ({i}, 'text')");
        let conn = recs
            .iter()
            .find(|r| text(r) == insert)
            .unwrap_or_else(|| panic!("no {insert:?} in {recs:#?}"))
            .conn_id;
        let mine: Vec<&Record> = recs.iter().filter(|r| r.conn_id == conn).collect();
        assert_eq!(name(mine[0]), "InitDB", "a new session starts in its db");
        let prepare = mine
            .iter()
            .find(|r| name(r) == "StmtPrepare")
            .expect("prepare");
        assert_eq!(text(prepare), "insert into traffic_t values (?, ?)");
        assert_ne!(prepare.ps_id, 0);
        let exec = mine
            .iter()
            .find(|r| name(r) == "StmtExecute")
            .expect("execute");
        assert_eq!(exec.ps_id, prepare.ps_id);
        assert_eq!(exec.prepared_stmt, "insert into traffic_t values (?, ?)");
        assert!(exec.success);
        let texts: Vec<String> = mine.iter().map(|r| text(r)).collect();
        for want in [
            "begin",
            &format!("update traffic_t set v = 'tx' where id = {i}"),
            "commit",
            "select 1, 2; select 3, 4",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        let failed = mine
            .iter()
            .find(|r| text(r) == "select * from traffic_no_such_table")
            .expect("failed query");
        assert!(
            !failed.success,
            "an ERR answer is recorded as Success: false"
        );
        assert_eq!(name(mine[mine.len() - 1]), "Quit");
        assert!(
            mine.windows(2).all(|w| w[0].start <= w[1].start),
            "a session's commands are in order"
        );
    }
    drop(early);
    drop(setup);
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_refusals_and_cancel() {
    let db = mariadb();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("c");
    let p = ProxyProcess::start(&[db.addr()], "");
    let form = |f: &str| http_request_with_body(p.api, "POST", "/api/traffic/capture", f);
    let (s, b) = form("output=/tmp/tiproxy-traffic-none");
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("duration is required"), "{b}");
    let (s, b) = form("output=/tmp/x&duration=ten");
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("invalid duration"), "{b}");
    // aes256-ctr without security.encryption-key-path.
    let (s, b) = form(&format!(
        "output={}&duration=1s&encrypt-method=aes256-ctr",
        out.display()
    ));
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("encryption-key-path is not set"), "{b}");

    // Cancel: the job says so, the files are complete and readable.
    let (ok, o) = ctl(
        &p,
        &[
            "traffic",
            "capture",
            "--output",
            out.to_str().unwrap(),
            "--duration",
            "1m",
            "--compress=false",
        ],
    );
    assert!(ok, "{o}");
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("select 42").await.expect("query");
    let (ok, o) = ctl(&p, &["traffic", "cancel"]);
    assert!(ok, "{o}");
    let job = wait_done(&p, Duration::from_secs(10));
    assert_eq!(job["status"], "canceled", "{job}");
    assert_eq!(job["error"], "manually stopped", "{job}");
    let recs = read_capture(&out, None);
    assert!(recs.iter().any(|r| text(r) == "select 42"), "{recs:?}");
    assert!(
        store::list_files(&out)
            .unwrap()
            .iter()
            .all(|f| f.to_string_lossy().ends_with(".log"))
    );
    // The directory holds a capture now: refused.
    let (s, b) = form(&format!("output={}&duration=1s", out.display()));
    assert_eq!(s, 500, "{b}");
    assert!(b.contains("already exists"), "{b}");
    let (ok, o) = ctl(&p, &["traffic", "cancel"]);
    assert!(!ok && o.contains("no job running"), "{o}");
    drop(c);

    // `enable-traffic-replay = false` turns the API off.
    let off = ProxyProcess::start_with_config(|sql, api| {
        format!(
            "enable-traffic-replay = false\n[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\n\
             backend-addrs = [\"{}\"]\n[api]\naddr = \"{api}\"\n",
            db.addr()
        )
    });
    let (s, b) = http_request_with_body(
        off.api,
        "POST",
        "/api/traffic/capture",
        "output=/tmp/x&duration=1s",
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("traffic capture is disabled"), "{b}");
}
