//! A backend connection that ends in the middle of a command: the client
//! must see through the proxy what it sees directly (the server's last
//! bytes, then the connection gone), never an error the proxy made up on a
//! connection it keeps open. That holds for a session killed by the server
//! and for a server process killed with SIGKILL (each run on a private
//! MariaDB, since the kill takes the server down).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tiproxy_conformance::mariadb::{APP_PASSWORD, APP_USER, DATABASE};
use tiproxy_conformance::outcome::ClientError;
use tiproxy_conformance::{
    MariaDb, Outcome, Proxy, ProxyOptions, Scenario, Session, Target, Transcript, compare,
};

fn mariadb() -> &'static MariaDb {
    static SERVER: OnceLock<Result<MariaDb, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| MariaDb::start().map_err(|err| err.to_string()))
        .as_ref()
        .unwrap_or_else(|err| panic!("starting the test MariaDB: {err}"))
}

/// What a client can tell from a failed or successful action without the
/// I/O error's wording (which names the OS error the socket happened to
/// get): the server's error, or that the connection is gone.
fn observed(result: Result<(), mysql_async::Error>) -> Outcome {
    let error = match result {
        Ok(()) => None,
        Err(mysql_async::Error::Server(e)) => Some(ClientError::Server {
            code: e.code,
            state: e.state,
            message: e.message,
        }),
        Err(_) => Some(ClientError::Client("connection lost".into())),
    };
    Outcome {
        error,
        ..Outcome::default()
    }
}

async fn run(s: &mut Session, sql: &str) -> Outcome {
    match s.conn() {
        None => observed(Err(mysql_async::Error::Other("no connection".into()))),
        Some(c) => observed(c.query_drop(sql).await),
    }
}

async fn killed_while_waiting_for_a_lock(t: Target) -> Transcript {
    let mut b = t.session("b").await;
    b.query("CREATE TABLE k (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        .await;
    b.query("INSERT INTO k VALUES (1, 1)").await;
    b.query("BEGIN").await;
    b.query("SELECT v FROM k WHERE id = 1 FOR UPDATE").await;

    let mut a = t.session("a").await;
    // The server's id for A's connection (through the proxy: the
    // backend's), read outside the transcript: the two runs' ids differ.
    let id: u64 = a
        .conn()
        .expect("connected")
        .query_first("SELECT CONNECTION_ID()")
        .await
        .expect("CONNECTION_ID()")
        .expect("one row");

    let waiting = tokio::spawn(async move {
        let o = run(&mut a, "SELECT v FROM k WHERE id = 1 FOR UPDATE").await;
        (a, o)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = t.session("c").await;
    let killed = run(&mut c, &format!("KILL {id}")).await;
    c.record("KILL <a>".into(), true, killed);
    let (mut a, waited) = waiting.await.expect("the waiting session");
    // A's steps go into B's transcript: A's own would end with a COM_QUIT
    // on a dead connection, whose I/O error wording is the OS's.
    b.record("[a] lock wait, killed meanwhile".into(), false, waited);
    // The connection is unusable afterwards, as it is directly.
    let next = run(&mut a, "SELECT 1").await;
    b.record("[a] next statement".into(), false, next);
    let usable = a.is_connected();
    b.record(
        format!("[a] still connected: {usable}"),
        true,
        Outcome::default(),
    );

    b.query("ROLLBACK").await;
    let mut transcript = b.finish_session().await;
    transcript.extend(c.finish_session().await);
    transcript
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_of_a_session_waiting_on_a_lock_looks_the_same_through_the_proxy() {
    let [direct, _] = compare(
        mariadb(),
        Scenario::new("killed"),
        killed_while_waiting_for_a_lock,
    )
    .await;
    // Directly, the killed session fails (the assertion above made the
    // proxied run match it step by step).
    let lock_wait = direct
        .steps
        .iter()
        .find(|s| s.action.contains("lock wait"))
        .expect("the lock wait step");
    assert!(lock_wait.outcome.error.is_some(), "{lock_wait:?}");
}

fn app_opts(addr: SocketAddr) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some(DATABASE))
        .prefer_socket(false)
}

/// The pid of `db`'s mariadbd, from its pid file.
fn server_pid(db: &MariaDb) -> String {
    let file = db.dir().join("mariadbd.pid");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .to_string()
}

fn sigkill(pid: &str) {
    let status = Command::new("kill")
        .args(["-KILL", pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid}");
}

/// A client (connected to `addr`, directly or through the proxy) in the
/// middle of `SELECT SLEEP(30)` when `db`'s server process gets SIGKILL:
/// what the statement and the next one return.
async fn killed_mid_query(db: &MariaDb, addr: SocketAddr) -> [Outcome; 2] {
    let mut conn = Conn::new(app_opts(addr)).await.expect("connect");
    conn.query_drop("SELECT 1")
        .await
        .expect("a first statement");
    let pid = server_pid(db);
    let sleeping = tokio::spawn(async move {
        let r = conn.query_drop("SELECT SLEEP(30)").await;
        (conn, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    sigkill(&pid);
    let (mut conn, r) = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the statement ends once the server is gone")
        .expect("the client task");
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the failure took {:?}",
        killed_at.elapsed()
    );
    let during = observed(r);
    let next = tokio::time::timeout(Duration::from_secs(20), conn.query_drop("SELECT 1"))
        .await
        .expect("the next statement fails at once");
    [during, observed(next)]
}

/// A mariadbd started again on `db`'s datadir and port (after a SIGKILL);
/// killed on drop, before `db`'s own drop removes the datadir.
struct Restarted(Child);

impl Restarted {
    fn start(db: &MariaDb) -> Restarted {
        let dir = db.dir();
        let bin = [
            "/usr/sbin/mariadbd",
            "/usr/bin/mariadbd",
            "/usr/sbin/mysqld",
        ]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file())
        .expect("mariadbd");
        let child = Command::new(bin)
            .arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg(format!("--port={}", db.port()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg("--skip-name-resolve")
            .arg("--innodb-flush-log-at-trx-commit=0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart mariadbd");
        Restarted(child)
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_sigkill_mid_query_looks_the_same_through_the_proxy() {
    let start = |what: &str| {
        MariaDb::start().unwrap_or_else(|e| panic!("starting the {what} MariaDB: {e}"))
    };
    let direct_db = start("direct");
    let proxied_db = start("proxied");
    let direct = killed_mid_query(&direct_db, direct_db.addr()).await;
    let proxy = Proxy::start(proxied_db.addr(), ProxyOptions::default())
        .await
        .expect("start the proxy");
    let proxied = killed_mid_query(&proxied_db, proxy.sql_addr()).await;
    let errors = |o: &[Outcome; 2]| o.each_ref().map(|o| o.error.clone());
    eprintln!(
        "direct: {:?}; proxied: {:?}",
        errors(&direct),
        errors(&proxied)
    );
    // Directly the client just loses its connection: no server error.
    for o in &direct {
        assert_eq!(
            o.error,
            Some(ClientError::Client("connection lost".into())),
            "directly: {o:?}"
        );
    }
    // Through the proxy: the same, and no error the proxy made up.
    assert_eq!(proxied, direct, "through the proxy vs directly");

    // The server comes back on the same port: the proxy serves new clients.
    let _back = Restarted::start(&proxied_db);
    let began = Instant::now();
    let answer = loop {
        let attempt = async {
            let mut c = Conn::new(app_opts(proxy.sql_addr())).await?;
            let v: Option<i64> = c.query_first("SELECT 41 + 1").await?;
            c.disconnect().await?;
            Ok::<_, mysql_async::Error>(v)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(v)) => break v,
            other => {
                assert!(
                    began.elapsed() < Duration::from_secs(60),
                    "no client served within 60 s of the restart: {other:?}\n{}",
                    proxied_db.error_log_tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("served again {:?} after the restart", began.elapsed());
    assert_eq!(answer, Some(42));
    proxy.shutdown().await;
}
