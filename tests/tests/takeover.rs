//! The proxy replaced by a new process (`tiproxy --takeover`) while
//! sessions run: against a TiDB double and against MariaDB, sessions with
//! a prepared statement, user variables, transactions, compression and a
//! large result run without pause while the proxy is replaced again and
//! again by a process reporting another version. No client sees an error,
//! `CONNECTION_ID()` never changes, each new process answers
//! `tiproxyctl health`, each old one exits. Then the failure paths: the new
//! process killed halfway (the old one keeps what it still ran and serves
//! on), and a new process refused for an incompatible configuration or an
//! unknown handover format (the old one serves on).
//!
//! 100 sessions per backend (`SESSIONS`), every kind of session among
//! them: 20 takeovers took 10.3 s (MariaDB) and 13.1 s (TiDB double) on
//! the shared 2-core machine.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder};
use tiproxy_tests::{TidbDouble, binary, double_opts, free_port, http_get, mariadb, opts};

/// Sessions per backend kind.
const SESSIONS: usize = 100;
/// Takeovers in a row per backend kind.
const ROUNDS: usize = 20;

/// A `tiproxy` process of this test.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(config: &Path, version: &str, flags: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(binary("tiproxy"));
        cmd.arg("--config")
            .arg(config)
            .args(flags)
            .env("RUST_LOG", "info")
            .env("TIPROXY_VERSION_OVERRIDE", version);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tiproxy");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
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

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy's configuration: its own workdir (the takeover socket), one
/// backend.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    sql: SocketAddr,
    api: SocketAddr,
}

fn setup(backend: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "workdir = \"{}\"\n[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [{backend}]\n\
             graceful-close-conn-timeout = 10\n[api]\naddr = \"{api}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        config,
        sql,
        api,
    }
}

fn wait_listening(p: &mut Proc, sql: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(sql).is_err() {
        assert!(p.alive(), "tiproxy exited:\n{}", p.log());
        assert!(Instant::now() < deadline, "tiproxy did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tiproxyctl health` against `api`, retried for a while; its stdout.
fn health(api: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = Command::new(binary("tiproxyctl"))
            .args(["--host", &api.ip().to_string()])
            .args(["--port", &api.port().to_string()])
            .arg("health")
            .output()
            .expect("run tiproxyctl");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "tiproxyctl health: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sample of `/api/metrics` (0 when absent).
fn sample(api: SocketAddr, series: &str) -> u64 {
    let (_, body) = http_get(api, "/api/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Prepared,
    UserVars,
    Transaction,
    Compressed,
    LargeResult,
}

const KINDS: [Kind; 5] = [
    Kind::Prepared,
    Kind::UserVars,
    Kind::Transaction,
    Kind::Compressed,
    Kind::LargeResult,
];

const BIG_ROWS: usize = 300;

/// Runs one session until `stop`; the number of rounds it did, or what
/// went wrong.
async fn session(
    kind: Kind,
    opts: Opts,
    table: String,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let opts = match kind {
        Kind::Compressed => OptsBuilder::from_opts(opts)
            .compression(Some(mysql_async::Compression::default()))
            .into(),
        _ => opts,
    };
    let e = |what: &str, err: mysql_async::Error| format!("{kind:?} {what}: {err}");
    let mut c = Conn::new(opts).await.map_err(|x| e("connect", x))?;
    let id: u64 = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .map_err(|x| e("connection id", x))?
        .unwrap();
    c.query_drop("SET @kept = 4242")
        .await
        .map_err(|x| e("set", x))?;
    let stmt = c.prep("SELECT ? + 1").await.map_err(|x| e("prepare", x))?;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let k = n as i64;
        match kind {
            Kind::Prepared => {
                let v: i64 = c
                    .exec_first(&stmt, (k,))
                    .await
                    .map_err(|x| e("execute", x))?
                    .unwrap();
                if v != k + 1 {
                    return Err(format!("prepared: {v} for {k}"));
                }
            }
            Kind::UserVars => {
                c.query_drop(format!("SET @v = {k}"))
                    .await
                    .map_err(|x| e("set", x))?;
                let v: (i64, i64) = c
                    .query_first("SELECT @v, @kept")
                    .await
                    .map_err(|x| e("select", x))?
                    .unwrap();
                if v != (k, 4242) {
                    return Err(format!("user variables: {v:?} for {k}"));
                }
            }
            Kind::Transaction => {
                c.query_drop("BEGIN").await.map_err(|x| e("begin", x))?;
                let _: Option<i64> = c
                    .query_first("SELECT 1")
                    .await
                    .map_err(|x| e("in transaction", x))?;
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _: Option<i64> = c
                    .query_first("SELECT 2")
                    .await
                    .map_err(|x| e("in transaction", x))?;
                c.query_drop("COMMIT").await.map_err(|x| e("commit", x))?;
            }
            Kind::Compressed => {
                let v: i64 = c
                    .exec_first(&stmt, (k,))
                    .await
                    .map_err(|x| e("execute", x))?
                    .unwrap();
                if v != k + 1 {
                    return Err(format!("compressed: {v} for {k}"));
                }
            }
            Kind::LargeResult => {
                let rows: Vec<(i64, String)> = c
                    .query(format!("SELECT id, v FROM {table}"))
                    .await
                    .map_err(|x| e("large select", x))?;
                if rows.len() != BIG_ROWS || rows.iter().any(|(_, v)| v.len() != 2000) {
                    return Err(format!("large result: {} rows", rows.len()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after: u64 = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .map_err(|x| e("connection id", x))?
        .unwrap();
    if after != id {
        return Err(format!("{kind:?}: CONNECTION_ID() {id} became {after}"));
    }
    let kept: i64 = c
        .query_first("SELECT @kept")
        .await
        .map_err(|x| e("select", x))?
        .unwrap();
    if kept != 4242 {
        return Err(format!("{kind:?}: @kept is {kept}"));
    }
    c.disconnect().await.map_err(|x| e("disconnect", x))?;
    Ok(n)
}

/// Creates `table` with [`BIG_ROWS`] rows of 2000 bytes each.
async fn big_table(opts: Opts, create_db: Option<&str>, table: &str) {
    let mut c = Conn::new(opts).await.expect("connect");
    if let Some(db) = create_db {
        c.query_drop(format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await
            .expect("create database");
    }
    c.query_drop(format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    c.query_drop(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, v VARCHAR(2000))"
    ))
    .await
    .expect("create table");
    let value = "x".repeat(2000);
    for chunk in (0..BIG_ROWS).collect::<Vec<_>>().chunks(50) {
        let rows: Vec<String> = chunk.iter().map(|i| format!("({i}, '{value}')")).collect();
        c.query_drop(format!("INSERT INTO {table} VALUES {}", rows.join(", ")))
            .await
            .expect("insert");
    }
    c.disconnect().await.expect("disconnect");
}

/// Replaces `old` by a new process reporting `version`; returns it once
/// the old one exited and the new one answers `tiproxyctl health`.
/// With `quiet`, the old process must have logged no warning.
fn replace(mut old: Proc, s: &Setup, version: &str, quiet: bool) -> Proc {
    let mut new = Proc::spawn(&s.config, version, &["--takeover"], &[]);
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|st| st.success()),
        "the old process did not exit cleanly ({status:?}):\n{}\nnew:\n{}",
        old.log(),
        new.log()
    );
    assert!(new.alive(), "the new process died:\n{}", new.log());
    // A takeover is quiet: nothing refused, nothing resumed.
    let old_log = old.log();
    assert!(
        !quiet || !(old_log.contains("[WARN]") || old_log.contains("[ERROR]")),
        "old:\n{old_log}\nnew:\n{}",
        new.log()
    );
    let log = new.log();
    assert!(
        log.contains("took over the listeners") && log.contains(version),
        "{log}"
    );
    health(s.api);
    new
}

async fn takeovers_keep_every_session(s: Setup, opts: Opts, table: String) {
    let mut proc = Proc::spawn(&s.config, "takeover-test-0", &[], &[]);
    wait_listening(&mut proc, s.sql);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| {
            tokio::spawn(session(
                KINDS[i % KINDS.len()],
                opts.clone(),
                table.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut adopted = 0;
    for round in 1..=ROUNDS {
        let version = format!("takeover-test-{round}");
        proc = tokio::task::block_in_place(|| replace(proc, &s, &version, true));
        adopted += sample(s.api, "tiproxy_takeover_sessions_total{result=\"adopted\"}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{ROUNDS} takeovers with {SESSIONS} sessions in {:?}",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let n = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
        assert!(n > 0);
    }
    // Every session moved every time (none is on TLS).
    assert_eq!(adopted, (ROUNDS * SESSIONS) as u64);
    // New clients are served by the last process.
    let mut c = Conn::new(opts).await.expect("a new client");
    let one: i64 = c.query_first("SELECT 1").await.unwrap().unwrap();
    assert_eq!(one, 1);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeovers_keep_tidb_double_sessions() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let opts = double_opts(s.sql);
    // The double serves the proxy's handshake only once the proxy ran.
    let mut p = Proc::spawn(&s.config, "setup", &[], &[]);
    wait_listening(&mut p, s.sql);
    big_table(opts.clone(), Some("tk"), "tk.big").await;
    drop(p);
    takeovers_keep_every_session(s, opts, "tk.big".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeovers_keep_mariadb_sessions() {
    let db = mariadb();
    let s = setup(&format!("\"{}\"", db.addr()));
    let opts = opts(s.sql);
    let mut p = Proc::spawn(&s.config, "setup", &[], &[]);
    wait_listening(&mut p, s.sql);
    big_table(opts.clone(), None, "takeover_big").await;
    drop(p);
    takeovers_keep_every_session(s, opts, "takeover_big".into()).await;
}

/// The new process killed while the old one waits for a session in a
/// transaction: the old one keeps that session (and every other it still
/// ran), accepts again, and a later takeover succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_killed_halfway_leaves_the_old_one_serving() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let opts = double_opts(s.sql);
    let mut old = Proc::spawn(&s.config, "old", &[], &[]);
    wait_listening(&mut old, s.sql);
    let mut busy = Conn::new(opts.clone()).await.unwrap();
    let busy_id: u64 = busy
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    busy.query_drop("SET @mine = 7").await.unwrap();
    busy.query_drop("BEGIN").await.unwrap();
    let mut idle = Conn::new(opts.clone()).await.unwrap();
    let _: Option<i64> = idle.query_first("SELECT 1").await.unwrap();

    let mut new = Proc::spawn(&s.config, "doomed", &["--takeover"], &[]);
    // The idle session moves; the busy one waits for its transaction.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !new.log().contains("took over the listeners")
        || sample(s.api, "tiproxy_takeover_sessions_total{result=\"adopted\"}") < 1
    {
        assert!(
            Instant::now() < deadline,
            "no session moved:\n{}\n{}",
            old.log(),
            new.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    new.kill9();

    // The old process still runs the session in its transaction.
    let v: i64 = busy.query_first("SELECT @mine").await.unwrap().unwrap();
    assert_eq!(v, 7);
    busy.query_drop("COMMIT").await.unwrap();
    let id: u64 = busy
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, busy_id);
    assert!(old.alive(), "the old process exited:\n{}", old.log());
    // The session that went to the killed process ended with it.
    assert!(idle.query_drop("SELECT 1").await.is_err());
    // The old process accepts and answers the API again.
    let mut fresh = Conn::new(opts.clone())
        .await
        .expect("the old process accepts again");
    let _: Option<i64> = fresh.query_first("SELECT 1").await.unwrap();
    health(s.api);
    assert!(
        sample(
            s.api,
            "tiproxy_takeover_sessions_total{result=\"handed_over\"}"
        ) >= 1,
        "{}",
        old.log()
    );
    // And a later takeover takes everything it holds.
    let new = tokio::task::block_in_place(|| replace(old, &s, "second", false));
    let id: u64 = busy
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, busy_id);
    let _: Option<i64> = fresh.query_first("SELECT 1").await.unwrap();
    drop(new);
}

/// The numbers in the old process's log line for a takeover abandoned
/// midway: (kept, in flight, handed over).
fn abandoned_counts(log: &str) -> Option<(usize, usize, usize)> {
    let line = log
        .lines()
        .find(|l| l.contains("takeover failed while handing over sessions"))?;
    let before = |text: &str, marker: &str| -> Option<usize> {
        let head = &text[..text.find(marker)?];
        head.rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    Some((
        before(line, " sessions kept here")?,
        before(line, " of them were in flight")?,
        before(line, " handed over (")?,
    ))
}

/// `kill -9` of the new process while sessions move, with many sessions:
/// each one the old process still ran keeps working there with its state
/// and connection id; each one already handed over sees its connection
/// closed (an error at once, not a hang); the two add up to every session,
/// and match what the old process logs and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_new_process_costs_only_the_sessions_it_held_and_they_are_counted() {
    const IDLE: usize = 12;
    const BUSY: usize = 4;
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let opts = double_opts(s.sql);
    let mut old = Proc::spawn(&s.config, "old", &[], &[]);
    wait_listening(&mut old, s.sql);
    let mut conns = Vec::new();
    for i in 0..IDLE + BUSY {
        let mut c = Conn::new(opts.clone()).await.expect("connect");
        let id = connection_id(&mut c).await;
        c.query_drop(format!("SET @mine = {i}")).await.expect("set");
        if i >= IDLE {
            // In a transaction: not at a point it can move.
            c.query_drop("BEGIN").await.expect("begin");
        }
        conns.push((c, id));
    }

    let mut new = Proc::spawn(&s.config, "doomed", &["--takeover"], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sample(s.api, "tiproxy_takeover_sessions_total{result=\"adopted\"}") < IDLE as u64 / 2 {
        assert!(
            Instant::now() < deadline,
            "sessions did not move:\n{}\n{}",
            old.log(),
            new.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    new.kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (kept, in_flight, handed_over) = loop {
        if let Some(counts) = abandoned_counts(&old.log()) {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "the old process did not report the failed takeover:\n{}",
            old.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("kept {kept} ({in_flight} in flight), handed over {handed_over}");

    let (mut working, mut closed) = (0, 0);
    for (i, (c, id)) in conns.iter_mut().enumerate() {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            c.query_first::<(i64, u32), _>("SELECT @mine, CONNECTION_ID()"),
        )
        .await
        .unwrap_or_else(|_| panic!("session {i} hangs:\n{}", old.log()));
        match answer {
            Ok(row) => {
                assert_eq!(row, Some((i as i64, *id)), "session {i} lost its state");
                working += 1;
            }
            Err(mysql_async::Error::Io(_))
            | Err(mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed)) => {
                assert!(i < IDLE, "session {i} was in a transaction: it cannot move");
                closed += 1;
            }
            Err(e) => panic!("session {i}: not a closed connection: {e}"),
        }
    }
    assert!(handed_over >= IDLE / 2, "{handed_over} handed over");
    assert_eq!(working + closed, IDLE + BUSY);
    assert_eq!(working, kept, "{}", old.log());
    assert_eq!(closed, handed_over, "{}", old.log());
    // The transactions carry on in the old process.
    for (c, _) in &mut conns[IDLE..] {
        c.query_drop("COMMIT")
            .await
            .expect("commit on the old process");
    }
    // The old process serves the API again, with the same counts.
    health(s.api);
    assert_eq!(
        sample(
            s.api,
            "tiproxy_takeover_sessions_total{result=\"handed_over\"}"
        ),
        handed_over as u64
    );
    assert_eq!(
        sample(s.api, "tiproxy_takeovers_total{result=\"failed\"}"),
        1
    );
    assert!(old.alive(), "{}", old.log());
}

/// Clients connect without pause while the proxy is replaced again and
/// again: none is refused, and every session opened (some in the instant
/// the old process stops accepting) is handed over rather than left
/// behind to be closed by the old process's drain: each still answers
/// with its connection id at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_connecting_during_takeovers_are_never_refused_or_closed() {
    const ROUNDS: usize = 5;
    const HELD: usize = 300;
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let opts = double_opts(s.sql);
    let mut proc = Proc::spawn(&s.config, "hammer-0", &[], &[]);
    wait_listening(&mut proc, s.sql);
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let (opts, stop, held) = (opts.clone(), stop.clone(), held.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut c = Conn::new(opts.clone())
                        .await
                        .map_err(|e| format!("connect {n}: {e}"))?;
                    let id: u32 = c
                        .query_first("SELECT CONNECTION_ID()")
                        .await
                        .map_err(|e| format!("first query {n}: {e}"))?
                        .ok_or("no row")?;
                    n += 1;
                    let mut held = held.lock().await;
                    if held.len() < HELD {
                        held.push((c, id));
                    } else {
                        drop(held);
                        c.disconnect()
                            .await
                            .map_err(|e| format!("disconnect {n}: {e}"))?;
                    }
                }
                Ok::<u64, String>(n)
            })
        })
        .collect();
    for round in 1..=ROUNDS {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let version = format!("hammer-{round}");
        proc = tokio::task::block_in_place(|| replace(proc, &s, &version, true));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in connects {
        total += t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    }
    let mut held = held.lock().await;
    eprintln!(
        "{total} connections during {ROUNDS} takeovers, {} held",
        held.len()
    );
    assert!(total >= 100, "only {total} connections");
    for (c, id) in held.iter_mut() {
        let now = tokio::time::timeout(Duration::from_secs(10), connection_id(c))
            .await
            .expect("a held session hangs");
        assert_eq!(now, *id);
    }
}

/// With `proxy.session-protection`, each session's state copy moves with
/// it: the new process holds every idle session protected at once (none
/// needs a `SHOW SESSION_STATES` of its own, which an idle session would
/// only run at its next command, unprotected until then), and each
/// session continues with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protected_sessions_stay_protected_through_a_takeover() {
    const N: usize = 10;
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let cfg = std::fs::read_to_string(&s.config).expect("config").replace(
        "graceful-close-conn-timeout = 10\n",
        "graceful-close-conn-timeout = 10\nsession-protection = true\n",
    );
    std::fs::write(&s.config, cfg).expect("config");
    let protected = "tiproxy_session_protected";
    let mut old = Proc::spawn(&s.config, "protect-0", &[], &[]);
    wait_listening(&mut old, s.sql);
    let mut conns = Vec::new();
    for i in 0..N {
        let mut c = Conn::new(double_opts(s.sql)).await.expect("connect");
        c.query_drop(format!("SET @mine = {i}")).await.expect("set");
        let id = connection_id(&mut c).await;
        conns.push((c, id));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while sample(s.api, protected) != N as u64 {
        assert!(Instant::now() < deadline, "not protected:\n{}", old.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = tokio::task::block_in_place(|| replace(old, &s, "protect-1", true));
    assert_eq!(
        sample(s.api, "tiproxy_takeover_sessions_total{result=\"adopted\"}"),
        N as u64
    );
    // The clients stay idle: only a copy that came along protects them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(s.api, protected) != N as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {N} adopted sessions protected:\n{}",
            sample(s.api, protected),
            new.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, (c, id)) in conns.iter_mut().enumerate() {
        let row: Option<(i64, u32)> = c
            .query_first("SELECT @mine, CONNECTION_ID()")
            .await
            .expect("the session answers");
        assert_eq!(row, Some((i as i64, *id)));
    }
}

/// A new process with another API address, or another handover format,
/// is refused with a clear message; the old one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_new_process_is_refused() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let opts = double_opts(s.sql);
    let mut old = Proc::spawn(&s.config, "old", &[], &[]);
    wait_listening(&mut old, s.sql);
    let mut c = Conn::new(opts.clone()).await.unwrap();
    let id: u64 = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();

    let other = s.config.with_file_name("other.toml");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let moved = format!("127.0.0.1:{}", free_port());
    std::fs::write(&other, text.replace(&s.api.to_string(), &moved)).unwrap();
    let mut refused = Proc::spawn(&other, "new", &["--takeover"], &[]);
    let status = refused.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(3));
    assert!(
        refused.log().contains("api.addr differs"),
        "{}",
        refused.log()
    );

    let mut skewed = Proc::spawn(
        &s.config,
        "new",
        &["--takeover"],
        &[("TIPROXY_TAKEOVER_FORMAT", "99")],
    );
    let status = skewed.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(3));
    let log = skewed.log();
    assert!(log.contains("takeover format"), "{log}");

    assert!(old.alive());
    let again: u64 = c
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, id);
    let mut fresh = Conn::new(opts)
        .await
        .expect("the old process still accepts");
    let _: Option<i64> = fresh.query_first("SELECT 1").await.unwrap();
    health(s.api);
}

/// TLS client sessions stay with the old process (no kernel TLS here: the
/// record layer lives in that process). Through a takeover the plain
/// session moves and the TLS one keeps answering, with its state, from the
/// old process; after `graceful-close-conn-timeout` the old process closes
/// it at its next boundary (it is idle) and exits, and new TLS clients are
/// served by the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_sessions_stay_with_the_old_process_until_its_close_timeout() {
    let tidb = TidbDouble::start(1, 0, &[]);
    let s = setup(&TidbDouble::backend_entry(&tidb.instances()[0]));
    let cfg = std::fs::read_to_string(&s.config).expect("config").replace(
        "graceful-close-conn-timeout = 10",
        "graceful-close-conn-timeout = 3",
    );
    std::fs::write(
        &s.config,
        format!("{cfg}[security.server-tls]\nauto-certs = true\n"),
    )
    .expect("config");
    let mut old = Proc::spawn(&s.config, "takeover-tls-0", &[], &[]);
    wait_listening(&mut old, s.sql);
    let tls_opts: Opts = OptsBuilder::from_opts(double_opts(s.sql))
        .ssl_opts(Some(
            mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true),
        ))
        .into();
    let mut tls = Conn::new(tls_opts.clone()).await.expect("TLS session");
    let mut plain = Conn::new(double_opts(s.sql)).await.expect("plain session");
    let plain_id = connection_id(&mut plain).await;
    tls.query_drop("SET @kept = 'tls'").await.expect("set");

    let mut new = Proc::spawn(&s.config, "takeover-tls-1", &["--takeover"], &[]);
    let started = Instant::now();
    while sample(s.api, "tiproxy_takeover_sessions_total{result=\"adopted\"}") != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the plain session was not adopted:\nold:\n{}\nnew:\n{}",
            old.log(),
            new.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The TLS session answers from the old process, which still runs.
    let kept: Option<String> = tls.query_first("SELECT @kept").await.unwrap_or_else(|e| {
        panic!(
            "TLS query {:?} after the takeover began: {e}\nold:\n{}\nnew:\n{}",
            started.elapsed(),
            old.log(),
            new.log()
        )
    });
    assert_eq!(kept.as_deref(), Some("tls"));
    assert!(old.alive(), "the old process still serves the TLS session");
    assert_eq!(
        connection_id(&mut plain).await,
        plain_id,
        "the plain session moved"
    );

    // Past the close timeout the old process closes it and exits.
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)));
    assert!(
        status.is_some_and(|st| st.success()),
        "the old process did not exit after its close timeout ({status:?}):\n{}",
        old.log()
    );
    assert!(
        tls.query_drop("SELECT 1").await.is_err(),
        "the TLS session ended with the old process"
    );
    let mut again = Conn::new(tls_opts).await.expect("a new TLS client");
    let one: i64 = again.query_first("SELECT 1").await.unwrap().unwrap();
    assert_eq!(one, 1);
    assert_eq!(
        connection_id(&mut plain).await,
        plain_id,
        "the plain session lives on"
    );
    assert!(new.alive(), "the new process serves on:\n{}", new.log());
}

async fn connection_id(c: &mut Conn) -> u32 {
    c.query_first("SELECT CONNECTION_ID()")
        .await
        .expect("connection id")
        .expect("a row")
}

/// The shipped systemd unit (reload = takeover) is one systemd accepts:
/// `systemd-analyze verify` reports nothing. (No systemd runs on the test
/// machines: the reload itself is not exercised here.)
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/tiproxy.service");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    let text = std::fs::read_to_string(&unit).expect("unit");
    assert!(text.contains("ExecReload=") && text.contains("--takeover"));
}
