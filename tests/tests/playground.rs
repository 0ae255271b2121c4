//! The README's run command (`scripts/run.sh`, the playground) driven end to
//! end: etcd as PD, TiDB doubles registered in it, tiproxy in front. Two
//! mysql_async clients connect, a TiDB is added with `tiproxyctl tidb add`
//! and the sessions spread over both, then the first TiDB is shut down with
//! `tiproxyctl tidb shutdown` and its session moves; the clients query all
//! along without an error. The playground runs on free ports, with the
//! debug binaries (`TIPROXY_BIN_DIR`) instead of a release build.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::playground::start_playground;
use tiproxy_tests::{double_opts, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_scale_out_and_in_with_tiproxyctl() {
    tiproxy_tests::install(&["etcd-server"], "etcd");
    let pg = start_playground(1);
    let tidbs = pg.ctl(&["tidb", "list"]);
    let first = tidbs[0]["sql"].as_str().expect("sql").to_string();
    eventually(
        "tiproxy found the TiDB in PD",
        Duration::from_secs(20),
        || pg.spread().iter().any(|(a, _)| *a == first),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..2u16 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.sql.port()));
        let mut c = Conn::new(double_opts(addr))
            .await
            .expect("connect to the playground");
        c.query_drop(format!("SET @me = {i}")).await.expect("set");
        let (stop, errors, queries) = (stop.clone(), errors.clone(), queries.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.query_first::<(u16, u16), _>("SELECT @@port, @me").await {
                    Ok(Some((_, me))) if me == i => {}
                    other => {
                        eprintln!("client {i}: {other:?}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                queries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            c.disconnect().await.expect("disconnect");
        }));
    }
    eventually(
        "both sessions on the first TiDB",
        Duration::from_secs(10),
        || pg.spread().iter().any(|(a, n)| *a == first && *n == 2),
    )
    .await;

    // Scale out: the new TiDB registers in PD; one session moves to it.
    let added = pg.ctl(&["tidb", "add"]);
    let second = added["sql"].as_str().expect("sql").to_string();
    eventually("sessions spread 1/1", Duration::from_secs(20), || {
        let s = pg.spread();
        s.iter().any(|(a, n)| *a == first && *n == 1)
            && s.iter().any(|(a, n)| *a == second && *n == 1)
    })
    .await;

    // Scale in: the first TiDB shuts down gracefully; its session moves.
    pg.ctl(&["tidb", "shutdown", "0"]);
    eventually(
        "both sessions on the second TiDB",
        Duration::from_secs(20),
        || pg.spread().iter().any(|(a, n)| *a == second && *n == 2),
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    assert!(queries.load(Ordering::Relaxed) > 10, "the clients ran");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "client errors");
}
