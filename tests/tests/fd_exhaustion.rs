//! The proxy out of file descriptors (issue 12, item 4): `tiproxy` runs
//! under a low `RLIMIT_NOFILE` (through util-linux `prlimit`) in front of
//! MariaDB, and clients connect until it has none left. The excess clients
//! get MySQL error 1040 naming the limit; the backend stays healthy (a
//! failed dial for lack of descriptors is not the backend's fault); the log
//! says so at most about once a second; and once clients leave, new ones
//! work at once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tiproxy_tests::{ProxyProcess, http_get, mariadb, opts};

/// The descriptor limits the proxy runs under: a few dozen sessions. Two
/// of them, one apart: each session holds two descriptors, so with one the
/// last client is accepted and its backend dial fails, with the other the
/// accept itself fails (the reserve descriptor's path; CI once found it
/// lost for good when another task took the descriptor it freed).
const NOFILE: [u32; 2] = [64, 65];

/// `tiproxy` in front of `backend`, started by `prlimit --nofile=N`.
fn limited_proxy(backend: SocketAddr, nofile: u32) -> ProxyProcess {
    let limit = format!("--nofile={nofile}:{nofile}");
    ProxyProcess::start_wrapped(&["prlimit", &limit, "--"], &[backend], "")
}

/// Everything the proxy logged so far.
fn log(p: &ProxyProcess) -> String {
    p.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A client that logs in and runs a statement (a client left waiting for
/// a greeting is an error too).
async fn working_client(addr: SocketAddr) -> Result<mysql_async::Conn, mysql_async::Error> {
    let login = async {
        let mut c = mysql_async::Conn::new(opts(addr)).await?;
        let one: Option<i64> = c.query_first("SELECT 1").await?;
        assert_eq!(one, Some(1));
        Ok(c)
    };
    tokio::time::timeout(Duration::from_secs(10), login)
        .await
        .unwrap_or_else(|_| Err(mysql_async::Error::Other("no answer within 10 s".into())))
}

/// What `/api/backends` says of the one backend: (state, accepts).
fn backend_state(p: &ProxyProcess) -> (String, bool) {
    let (code, body) = http_get(p.api, "/api/backends");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let b = v
        .as_array()
        .and_then(|a| a.first())
        .or_else(|| v["backends"].as_array().and_then(|a| a.first()))
        .unwrap_or_else(|| panic!("no backend in {body}"));
    (
        b["state"].as_str().unwrap_or_default().to_string(),
        b["accepts_connections"].as_bool().unwrap_or(false),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_refuses_with_1040_keeps_the_backend_and_recovers() {
    for nofile in NOFILE {
        exhaust(nofile).await;
    }
}

async fn exhaust(nofile: u32) {
    let t0 = Instant::now();
    let db = mariadb();
    let p = limited_proxy(db.addr(), nofile);
    eprintln!(
        "RLIMIT_NOFILE {nofile}: MariaDB and the proxy up in {:?}",
        t0.elapsed()
    );
    assert_eq!(backend_state(&p), ("healthy".into(), true));

    // Fill the proxy up: every client holds two of its descriptors (its
    // own and the backend's), so at most NOFILE / 2 get in.
    let started = Instant::now();
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..nofile {
        match working_client(p.sql).await {
            Ok(c) => held.push(c),
            Err(e) => refusals.push(e),
        }
        if refusals.len() >= 40 {
            break;
        }
    }
    let flood = started.elapsed();
    assert!(
        !held.is_empty() && held.len() < nofile as usize / 2,
        "{} clients got in under RLIMIT_NOFILE {nofile}",
        held.len()
    );
    // A further flood, to be sure the log stays quiet.
    for _ in 0..60 {
        if let Ok(c) = working_client(p.sql).await {
            held.push(c);
        } else {
            refusals.push(mysql_async::Error::Other("counted".into()));
        }
    }
    let flood = flood.max(started.elapsed());
    eprintln!(
        "{} clients in, {} refused, in {flood:?}",
        held.len(),
        refusals.len()
    );
    assert!(refusals.len() >= 40, "only {} refusals", refusals.len());
    let mut server_errors = 0;
    for e in &refusals {
        if let mysql_async::Error::Server(se) = e {
            server_errors += 1;
            assert_eq!(se.code, 1040, "{se:?}");
            assert!(
                se.message
                    .contains(&format!("out of file descriptors (RLIMIT_NOFILE {nofile})"))
                    && se.message.contains("ulimit -n"),
                "the message names the limit and what to raise: {}",
                se.message
            );
        }
    }
    let firsts: Vec<String> = refusals.iter().take(40).map(|e| e.to_string()).collect();
    assert!(
        refusals
            .iter()
            .take(40)
            .all(|e| matches!(e, mysql_async::Error::Server(_))),
        "every refused client gets a MySQL error, not a dropped connection: {firsts:#?}"
    );
    assert!(server_errors >= 40);

    // One client leaves: two descriptors free, enough to ask the API. The
    // backend was never blamed.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        backend_state(&p),
        ("healthy".into(), true),
        "a dial that failed for lack of descriptors marked the backend down"
    );

    // Everyone leaves: new clients work at once.
    for c in held.drain(..) {
        let _ = c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = Vec::new();
    for _ in 0..5 {
        again.push(
            working_client(p.sql)
                .await
                .expect("a client after the flood works"),
        );
    }
    for c in again {
        let _ = c.disconnect().await;
    }

    // The log: the episode in a few lines with counts, at most about one a
    // second, and no backend warnings.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let log = log(&p);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused: out of file descriptors"))
        .collect();
    eprintln!("{}", lines.join("\n"));
    // `["N connection(s) refused: ..."]`: the counts add up to the clients
    // refused.
    let counted: usize = lines
        .iter()
        .filter_map(|l| {
            l.split("[\"")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(
        counted,
        refusals.len(),
        "every refusal counted once:\n{log}"
    );
    let allowed = flood.as_secs() as usize + 2;
    assert!(
        !lines.is_empty() && lines.len() <= allowed,
        "{} refusal lines over {flood:?} (at most {allowed}):\n{log}",
        lines.len()
    );
    assert!(
        !log.contains("cannot connect to") && !log.contains("probe failed"),
        "the backend was blamed:\n{log}"
    );
}
