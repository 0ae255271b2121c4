//! Traffic replay end to end, two clusters: proxy A in front of MariaDB A
//! captures a scripted 15 s workload (text and prepared statements,
//! transactions, multi-statements, four concurrent sessions and one opened
//! before the capture began), encrypted and compressed; proxy B in front
//! of MariaDB B (same starting data) replays it with `tiproxyctl traffic
//! replay --speed 2`: no failures, no result differing (`--compare`),
//! `CHECKSUM TABLE` equal on A and B, and the replay takes half the
//! captured span. Then a damaged capture: the
//! error names the file and offset and the intact part is replayed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_conformance::mariadb::{APP_PASSWORD, APP_USER, MariaDb};
use tiproxy_runtime::traffic::format::{Decoder, Record};
use tiproxy_runtime::traffic::store;
use tiproxy_tests::{ProxyProcess, TidbDouble, binary, double_opts, mariadb, opts};

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

/// `tiproxyctl traffic capture` into `out` for `duration`, with `extra`
/// arguments; it must start.
fn capture(p: &ProxyProcess, out: &Path, duration: &str, extra: &[&str]) {
    let out = out.to_str().expect("a UTF-8 path");
    let mut args = vec![
        "traffic",
        "capture",
        "--output",
        out,
        "--duration",
        duration,
    ];
    args.extend_from_slice(extra);
    let (ok, o) = ctl(p, &args);
    assert!(ok && o.contains("capture started"), "{o}");
}

/// `tiproxyctl traffic replay` of the capture in `input` as the test's
/// MariaDB user, with `extra` arguments.
fn replay(p: &ProxyProcess, input: &Path, extra: &[&str]) -> (bool, String) {
    replay_as(p, input, (APP_USER, APP_PASSWORD), extra)
}

/// `tiproxyctl traffic replay` of the capture in `input` as `user`.
fn replay_as(
    p: &ProxyProcess,
    input: &Path,
    (user, password): (&str, &str),
    extra: &[&str],
) -> (bool, String) {
    let input = input.to_str().expect("a UTF-8 path");
    let mut args = vec![
        "traffic",
        "replay",
        "--input",
        input,
        "--username",
        user,
        "--password",
        password,
    ];
    args.extend_from_slice(extra);
    ctl(p, &args)
}

fn last_job(p: &ProxyProcess) -> serde_json::Value {
    let (ok, out) = ctl(p, &["traffic", "show"]);
    assert!(ok, "traffic show: {out}");
    let jobs: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    jobs.as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_else(|| panic!("no job: {out}"))
}

fn wait_done(p: &ProxyProcess, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let j = last_job(p);
        if j["status"] != "running" {
            return j;
        }
        assert!(start.elapsed() < limit, "job still running: {j}");
        std::thread::sleep(Duration::from_millis(50));
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

const SETUP: &[&str] = &[
    "drop table if exists replay_t",
    "create table replay_t (id int primary key, v varchar(64), n int not null)",
    "insert into replay_t values (1, 'one', 1), (2, 'two', 2), (3, 'three', 3)",
];

async fn checksum(addr: std::net::SocketAddr) -> i64 {
    let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
    let row: (String, Option<i64>) = c
        .query_first("checksum table replay_t")
        .await
        .expect("checksum")
        .expect("a row");
    row.1.expect("a checksum")
}

/// One session for about `secs` seconds: every kind of command, ids in
/// its own range so sessions never collide.
async fn workload(addr: std::net::SocketAddr, i: i64, secs: u64) {
    let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
    let end = Instant::now() + Duration::from_secs(secs);
    let mut k = 0i64;
    while Instant::now() < end {
        let id = i * 10_000 + k;
        c.query_drop(format!(
            "insert into replay_t values ({id}, 'text {i}', {k})"
        ))
        .await
        .expect("text insert");
        c.exec_drop(
            "insert into replay_t values (?, ?, ?)",
            (id + 5_000, format!("prepared {i}"), k),
        )
        .await
        .expect("prepared insert");
        c.query_drop("begin").await.expect("begin");
        c.exec_drop("update replay_t set n = n + ? where id = ?", (1, id))
            .await
            .expect("update in a transaction");
        c.query_drop(format!("update replay_t set v = 'tx {k}' where id = {id}"))
            .await
            .expect("update");
        c.query_drop("commit").await.expect("commit");
        let r: Vec<(i64, i64)> = c
            .query(format!(
                "select count(*), {k} from replay_t where id >= {} and id < {}; select 3, 4",
                i * 10_000,
                (i + 1) * 10_000
            ))
            .await
            .expect("multi-statement");
        assert_eq!(r.len(), 1);
        k += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    c.disconnect().await.expect("quit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_captured_workload_replays_on_another_cluster() {
    let (db_a, db_b) = (mariadb(), MariaDb::start().expect("a second MariaDB"));
    let dir = tempfile::tempdir().expect("tempdir");
    let keyfile = dir.path().join("enc.key");
    let key: [u8; 32] = *b"0123456789abcdef0123456789abcdef";
    std::fs::write(&keyfile, key).expect("key");
    let sec = format!(
        "[security]\nencryption-key-path = \"{}\"\n",
        keyfile.display()
    );
    let a = ProxyProcess::start(&[db_a.addr()], &sec);
    let b = ProxyProcess::start(&[db_b.addr()], &sec);
    for addr in [db_a.addr(), db_b.addr()] {
        let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
        for s in SETUP {
            c.query_drop(*s).await.expect("setup");
        }
    }
    assert_eq!(checksum(db_a.addr()).await, checksum(db_b.addr()).await);
    // Opened before the capture: replay starts it in its database.
    let mut early = mysql_async::Conn::new(opts(a.sql)).await.expect("connect");

    let out = dir.path().join("capture");
    capture(
        &a,
        &out,
        "15s",
        &["--encryption-method", "aes256-ctr", "--compare"],
    );
    let mut sessions = Vec::new();
    for i in 1..=4 {
        sessions.push(tokio::spawn(workload(a.sql, i, 12)));
    }
    for k in 0..4 {
        early
            .query_drop(format!("update replay_t set n = n * 2 + {k} where id <= 3"))
            .await
            .expect("early update");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    for s in sessions {
        s.await.expect("workload");
    }
    drop(early);
    let job = wait_done(&a, Duration::from_secs(30));
    assert_eq!(job["status"], "done", "{job}");
    let recs = read_capture(&out, Some(&key));
    let span = recs
        .last()
        .unwrap()
        .start
        .duration_since(recs[0].start)
        .unwrap();
    assert!(span > Duration::from_secs(10), "captured span {span:?}");
    let before_b = checksum(db_b.addr()).await;
    assert_ne!(checksum(db_a.addr()).await, before_b, "the workload wrote");

    // Replay on B at twice the speed.
    let started = Instant::now();
    let (ok, o) = replay(&b, &out, &["--speed", "2"]);
    assert!(ok && o.contains("replay started"), "{o}");
    let job = wait_done(&b, Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["failed_cmds"], 0, "{job}");
    assert_eq!(job["other_errors"], 0, "{job}");
    // Same starting data: every result compares equal, concurrency or not.
    assert_eq!(job["differed_cmds"], 0, "{job}");
    assert_eq!(job["progress"], "100%", "{job}");
    assert_eq!(job["replayed_cmds"], recs.len(), "{job}");
    assert_eq!(
        checksum(db_a.addr()).await,
        checksum(db_b.addr()).await,
        "B holds what A holds after the replay"
    );
    let ratio = took.as_secs_f64() / span.as_secs_f64();
    eprintln!(
        "replay at --speed 2: {took:?} for a {span:?} capture ({ratio:.2}), {} commands",
        recs.len()
    );
    assert!(
        (0.4..=0.6).contains(&ratio),
        "--speed 2 took {took:?} of a {span:?} capture ({ratio:.2})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_capture_names_the_place_and_replays_the_rest() {
    let db = mariadb();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("c");
    let p = ProxyProcess::start(&[db.addr()], "");
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("create table if not exists replay_damage (id int primary key)")
        .await
        .expect("create");
    capture(&p, &out, "2s", &["--compress=false"]);
    for i in 0..20 {
        c.query_drop(format!("select {i} from replay_damage"))
            .await
            .expect("query");
    }
    assert_eq!(wait_done(&p, Duration::from_secs(10))["status"], "done");
    let files = store::list_files(&out).expect("files");
    let file = files.last().unwrap();
    let len = std::fs::metadata(file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(len * 2 / 3).unwrap();
    drop(f);

    let (ok, o) = replay(&p, &out, &["--read-only"]);
    assert!(ok, "{o}");
    let job = wait_done(&p, Duration::from_secs(20));
    assert_eq!(job["status"], "canceled", "{job}");
    let err = job["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&file.display().to_string())
            && err.contains("offset")
            && err.contains("truncated"),
        "{job}"
    );
    let replayed = job["replayed_cmds"].as_u64().unwrap_or(0);
    assert!(replayed >= 5, "the intact part is replayed: {job}");
    assert_eq!(job["failed_cmds"], 0, "{job}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_replay_under_every_ps_close() {
    let db = mariadb();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("ps");
    let p = ProxyProcess::start(&[db.addr()], "");
    capture(&p, &out, "2s", &[]);
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    for i in 0..5i64 {
        let r: Option<i64> = c.exec_first("select ? + 1", (i,)).await.expect("execute");
        assert_eq!(r, Some(i + 1));
        let r: Option<String> = c
            .exec_first("select concat(?, 'x')", (i,))
            .await
            .expect("execute");
        assert_eq!(r, Some(format!("{i}x")));
    }
    // A statement closed, then prepared again under a new id.
    let s = c.prep("select ? * 2").await.expect("prepare");
    let _: Option<i64> = c.exec_first(&s, (21,)).await.expect("execute");
    c.close(s).await.expect("close");
    let _: Option<i64> = c.exec_first("select ? * 2", (4,)).await.expect("execute");
    c.disconnect().await.expect("quit");
    assert_eq!(wait_done(&p, Duration::from_secs(10))["status"], "done");
    for ps_close in ["directed", "always", "never"] {
        let (ok, o) = replay(&p, &out, &["--speed", "10", "--ps-close", ps_close]);
        assert!(ok, "{o}");
        let job = wait_done(&p, Duration::from_secs(20));
        assert_eq!(job["status"], "done", "{ps_close}: {job}");
        assert_eq!(job["failed_cmds"], 0, "{ps_close}: {job}");
        assert_eq!(job["other_errors"], 0, "{ps_close}: {job}");
        assert!(job["replayed_cmds"].as_u64().unwrap_or(0) >= 12, "{job}");
    }
    let (ok, o) = ctl(
        &p,
        &[
            "traffic",
            "replay",
            "--input",
            "/x",
            "--username",
            "u",
            "--password",
            "p",
            "--ps-close",
            "sometimes",
        ],
    );
    assert!(!ok && o.contains("invalid ps-close"), "{o}");
    let (ok, o) = ctl(
        &p,
        &[
            "traffic",
            "replay",
            "--input",
            "/x",
            "--username",
            "u",
            "--password",
            "p",
            "--speed",
            "20",
        ],
    );
    assert!(!ok && o.contains("speed should be between"), "{o}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_statement_is_reported_in_show_and_on_the_target() {
    let db = mariadb();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("f");
    let p = ProxyProcess::start(&[db.addr()], "");
    capture(&p, &out, "2s", &[]);
    let mut c = mysql_async::Conn::new(opts(p.sql)).await.expect("connect");
    c.query_drop("create table replay_ro (id int)")
        .await
        .expect("create");
    for _ in 0..3 {
        c.query_drop("select * from replay_ro")
            .await
            .expect("select");
    }
    c.query_drop("drop table replay_ro").await.expect("drop");
    c.disconnect().await.expect("quit");
    assert_eq!(wait_done(&p, Duration::from_secs(10))["status"], "done");

    // Read-only: the CREATE is left out, so the SELECTs fail now.
    let (ok, o) = replay(&p, &out, &["--read-only"]);
    assert!(ok, "{o}");
    let job = wait_done(&p, Duration::from_secs(20));
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["failed_cmds"], 3, "{job}");
    assert_eq!(job["filtered_cmds"], 2, "CREATE and DROP: {job}");
    let f = &job["failures"][0];
    assert_eq!(f["cmd_type"], "Query", "{job}");
    assert_eq!(f["sample_stmt"], "select * from replay_ro", "{job}");
    assert_eq!(f["count"], 3, "{job}");
    assert!(
        f["sample_err_msg"]
            .as_str()
            .unwrap_or_default()
            .contains("1146"),
        "{job}"
    );
    // TiProxy's report table on the target.
    let mut direct = mysql_async::Conn::new(opts(db.addr()))
        .await
        .expect("connect");
    let rows: Vec<(String, String, i64)> = direct
        .query("select cmd_type, sample_stmt, count from tiproxy_traffic_replay.fail")
        .await
        .expect("the report table");
    assert!(
        rows.contains(&("Query".into(), "select * from replay_ro".into(), 3)),
        "{rows:?}"
    );
}

/// `--compare`: the capture keeps a digest of each result; with one row
/// changed on B beforehand, the replay names exactly the statements whose
/// result depends on that row (text, prepared, ordered and unordered
/// reads, and a write's affected rows) and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn result_comparison_names_the_statements_whose_results_differ() {
    let (db_a, db_b) = (mariadb(), MariaDb::start().expect("a second MariaDB"));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("cmp");
    let a = ProxyProcess::start(&[db_a.addr()], "");
    let b = ProxyProcess::start(&[db_b.addr()], "");
    for addr in [db_a.addr(), db_b.addr()] {
        let mut c = mysql_async::Conn::new(opts(addr)).await.expect("connect");
        c.query_drop("drop table if exists cmp_t")
            .await
            .expect("drop");
        c.query_drop("create table cmp_t (id int primary key, v varchar(32), n int)")
            .await
            .expect("create");
        c.query_drop(
            "insert into cmp_t values (1, 'one', 1), (2, 'two', 2), (3, 'three', 3), \
             (4, 'four', 4), (5, 'five', 5), (6, 'six', 6), (7, 'seven', 7)",
        )
        .await
        .expect("insert");
    }
    let mut direct_b = mysql_async::Conn::new(opts(db_b.addr()))
        .await
        .expect("connect");
    direct_b
        .query_drop("update cmp_t set v = 'changed' where id = 7")
        .await
        .expect("change one row on B");

    let mut c = mysql_async::Conn::new(opts(a.sql)).await.expect("connect");
    capture(&a, &out, "3s", &["--compare"]);
    let differing = [
        "select id, v from cmp_t where id = 7",
        "select v from cmp_t order by id",
        "select id from cmp_t where v = 'seven'",
        "update cmp_t set n = n + 1 where v = 'seven'",
    ];
    let same = [
        "select id, v from cmp_t where id = 3",
        "select count(*), sum(id) from cmp_t",
        "select v from cmp_t where id < 7",
        "update cmp_t set n = n + 1 where id = 2",
        "select n from cmp_t where id = 2",
    ];
    for q in differing.iter().chain(&same) {
        c.query_drop(*q).await.expect("statement");
    }
    // Same on both, and failing on both: not a difference.
    assert!(c.query_drop("select * from cmp_missing").await.is_err());
    // One prepared statement, one differing execution of two.
    for id in [4, 7] {
        let _: Option<String> = c
            .exec_first("select v from cmp_t where id = ?", (id,))
            .await
            .expect("execute");
    }
    c.disconnect().await.expect("quit");
    assert_eq!(wait_done(&a, Duration::from_secs(10))["status"], "done");
    let recs = read_capture(&out, None);
    assert!(
        recs.iter()
            .filter(|r| r.payload[0] == 0x03)
            .all(|r| r.digest.is_some()),
        "every query carries its result digest"
    );

    let (ok, o) = replay(&b, &out, &["--speed", "10"]);
    assert!(ok, "{o}");
    let job = wait_done(&b, Duration::from_secs(20));
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["failed_cmds"], 0, "{job}");
    assert_eq!(job["differed_cmds"], differing.len() + 1, "{job}");
    let mut named: Vec<String> = job["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| d["sample_stmt"].as_str().unwrap_or_default().to_string())
        .collect();
    named.sort();
    let mut want: Vec<String> = differing.iter().map(|s| s.to_string()).collect();
    want.push("select v from cmp_t where id = ?".into());
    want.sort();
    assert_eq!(named, want, "{job}");
    let sample = |stmt: &str| -> String {
        job["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["sample_stmt"] == stmt)
            .and_then(|d| d["sample_diff"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        sample("update cmp_t set n = n + 1 where v = 'seven'"),
        "captured 0 rows, 1 affected, replayed 0 rows, 0 affected",
        "{job}"
    );
    assert_eq!(
        sample("select id from cmp_t where v = 'seven'"),
        "captured 1 rows, 0 affected, replayed 0 rows, 0 affected",
        "{job}"
    );
    assert_eq!(
        sample("select id, v from cmp_t where id = 7"),
        "captured 1 rows, 0 affected, replayed as many rows with other values",
        "{job}"
    );
    // And on the target, next to TiProxy's tables.
    let rows: Vec<(String, String, i64)> = direct_b
        .query("select cmd_type, sample_stmt, count from tiproxy_traffic_replay.result_diff")
        .await
        .expect("the result_diff table");
    assert_eq!(rows.len(), want.len(), "{rows:?}");
    assert!(
        rows.contains(&(
            "StmtExecute".into(),
            "select v from cmp_t where id = ?".into(),
            1
        )),
        "{rows:?}"
    );
}

/// On TiDB, a session opened before the capture starts, in the capture,
/// from the state TiDB exports (`SET SESSION_STATES '...'` first, as
/// TiProxy records it): replayed on another cluster, its user variable and
/// the statement it prepared before the capture are there, so its commands
/// run without a failure and return what they returned (`--compare`).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_older_than_the_capture_replays_from_its_state_on_tidb() {
    let (tidb_a, tidb_b) = (TidbDouble::start(1, 0, &[]), TidbDouble::start(1, 0, &[]));
    let (ia, ib) = (&tidb_a.instances()[0], &tidb_b.instances()[0]);
    for addr in [ia.sql, ib.sql] {
        let mut c = mysql_async::Conn::new(double_opts(addr))
            .await
            .expect("connect");
        c.query_drop("create database capdb")
            .await
            .expect("database");
        c.query_drop("create table capdb.st (id int primary key, v varchar(32))")
            .await
            .expect("create");
        c.query_drop("insert into capdb.st values (1, 'one'), (2, 'two'), (3, 'three')")
            .await
            .expect("insert");
    }
    let a = ProxyProcess::start_with_backends(&[TidbDouble::backend_entry(ia)], "");
    let b = ProxyProcess::start_with_backends(&[TidbDouble::backend_entry(ib)], "");
    // In a database of its own: the exported state carries it too.
    let in_db =
        |addr| mysql_async::OptsBuilder::from_opts(double_opts(addr)).db_name(Some("capdb"));
    let mut early = mysql_async::Conn::new(in_db(a.sql)).await.expect("connect");
    early.query_drop("set @k = 2").await.expect("set");
    let stmt = early
        .prep("select v from st where id = ?")
        .await
        .expect("prepare before the capture");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("states");
    capture(&a, &out, "2s", &["--compare"]);
    let v: Option<String> = early.exec_first(&stmt, (1,)).await.expect("execute");
    assert_eq!(v.as_deref(), Some("one"));
    let k: Option<i64> = early.query_first("select @k").await.expect("select");
    assert_eq!(k, Some(2));
    early
        .query_drop("update st set v = 'changed' where id = @k")
        .await
        .expect("update");
    let v: Option<String> = early.exec_first(&stmt, (2,)).await.expect("execute");
    assert_eq!(v.as_deref(), Some("changed"));
    early.disconnect().await.expect("quit");
    assert_eq!(wait_done(&a, Duration::from_secs(10))["status"], "done");

    let recs = read_capture(&out, None);
    let first = recs.first().expect("records");
    assert!(
        first.payload.starts_with(b"\x03SET SESSION_STATES '"),
        "first record: {:?}",
        String::from_utf8_lossy(&first.payload)
    );
    let execs: Vec<&Record> = recs.iter().filter(|r| r.payload[0] == 0x17).collect();
    assert_eq!(execs.len(), 2, "{recs:?}");
    assert!(
        execs
            .iter()
            .all(|r| r.prepared_stmt == "select v from st where id = ?"),
        "executions carry the text of the statement prepared before: {execs:?}"
    );

    let (ok, o) = replay_as(&b, &out, ("app", "app-Pa55word"), &["--speed", "10"]);
    assert!(ok, "{o}");
    let job = wait_done(&b, Duration::from_secs(20));
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["failed_cmds"], 0, "{job}");
    assert_eq!(job["differed_cmds"], 0, "{job}");
    assert_eq!(job["replayed_cmds"], recs.len(), "{job}");
    let mut c = mysql_async::Conn::new(in_db(ib.sql))
        .await
        .expect("connect");
    let v: Option<String> = c
        .query_first("select v from st where id = 2")
        .await
        .expect("select");
    assert_eq!(v.as_deref(), Some("changed"), "the update ran on B with @k");
}
