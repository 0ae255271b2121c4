//! A backend connection that ends in the middle of a command: the client
//! must see through the proxy what it sees directly (the server's last
//! bytes, then the connection gone), never an error the proxy made up on a
//! connection it keeps open.

use std::sync::OnceLock;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tiproxy_conformance::outcome::ClientError;
use tiproxy_conformance::{MariaDb, Outcome, Scenario, Session, Target, Transcript, compare};

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
