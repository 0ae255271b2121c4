//! Resource and location balancing with real processes: TiDB doubles whose
//! `/metrics` report the CPU and memory use a test sets, and the tiproxy
//! binary reading them. Sessions leave a TiDB whose CPU is pegged, whose
//! memory is at OOM risk or whose requests to PD fail (the double's error
//! counters), new connections avoid it, sessions gather in the
//! proxy's zone, and the drain figure (status 500 to the last session
//! moved) is measured. Clients keep querying throughout: no errors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::{ProxyProcess, TidbDouble, TidbInstance, double_opts, eventually};

/// Backend entries with SQL and status ports, and a zone label each.
fn entries(tidbs: &[TidbInstance], zones: &[&str]) -> Vec<String> {
    tidbs
        .iter()
        .zip(zones)
        .map(|(t, z)| {
            format!(
                "{{ addr = \"{}\", status-addr = \"{}\", labels = {{ zone = \"{z}\" }} }}",
                t.sql, t.status
            )
        })
        .collect()
}

/// Sessions per backend SQL address, as the proxy counts them, and the
/// backends' JSON.
fn backends(proxy: &ProxyProcess) -> Vec<serde_json::Value> {
    let (status, body) = proxy.get("/api/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .or_else(|| v["backends"].as_array())
        .expect("backend list")
        .clone()
}

fn connections_on(proxy: &ProxyProcess, addr: SocketAddr) -> i64 {
    backends(proxy)
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .and_then(|b| b["connections"].as_i64())
        .unwrap_or(0)
}

/// `n` clients that run `SELECT @@port` in a loop until stopped; counts
/// queries and errors.
struct Workload {
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Conn>>,
}

impl Workload {
    async fn start(proxy: SocketAddr, n: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut c = Conn::new(double_opts(proxy))
                .await
                .expect("connect through tiproxy");
            c.query_drop(format!("SET @me = {i}"))
                .await
                .expect("user var");
            let (stop, queries, errors) = (stop.clone(), queries.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c.query_first::<(u16, i64), _>("SELECT @@port, @me").await {
                        Ok(Some((_, me))) if me == i as i64 => {}
                        Ok(other) => {
                            eprintln!("client {i}: wrong answer {other:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("client {i}: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    queries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                c
            }));
        }
        Workload {
            stop,
            queries,
            errors,
            tasks,
        }
    }

    /// Stops the clients; asserts they ran and saw no error.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let c = t.await.expect("client task");
            c.disconnect().await.expect("clean disconnect");
        }
        assert!(self.queries.load(Ordering::Relaxed) > 0, "the clients ran");
        assert_eq!(self.errors.load(Ordering::Relaxed), 0, "client errors");
    }
}

/// The port a new connection through the proxy lands on.
async fn new_connection_port(proxy: SocketAddr) -> u16 {
    let mut c = Conn::new(double_opts(proxy)).await.expect("connect");
    let p: u16 = c
        .query_first("SELECT @@port")
        .await
        .expect("q")
        .expect("row");
    c.disconnect().await.expect("disconnect");
    p
}

fn start(zones: &[&str], extra: &str) -> (TidbDouble, Vec<TidbInstance>, ProxyProcess) {
    let cluster = TidbDouble::start(zones.len(), 2, &[]);
    let tidbs = cluster.instances();
    let proxy = ProxyProcess::start_with_backends(
        &entries(&tidbs, zones),
        &format!("[health-check]\nmetrics-interval = \"300ms\"\n{extra}"),
    );
    (cluster, tidbs, proxy)
}

/// CPU use is known once two `/metrics` reads a second apart were made.
async fn wait_cpu_known(proxy: &ProxyProcess) {
    eventually(
        "CPU use read from every TiDB",
        Duration::from_secs(10),
        || backends(proxy).iter().all(|b| b["cpu_usage"].is_number()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_bound_tidb_sheds_its_sessions_and_gets_no_new_ones() {
    let (cluster, tidbs, proxy) = start(&["a", "a"], "");
    let work = Workload::start(proxy.sql, 20).await;
    eventually("20 sessions spread 10/10", Duration::from_secs(10), || {
        connections_on(&proxy, tidbs[0].sql) == 10 && connections_on(&proxy, tidbs[1].sql) == 10
    })
    .await;
    wait_cpu_known(&proxy).await;
    cluster.set_load(0, Some(0.9), None);
    let took = eventually("the busy TiDB emptied", Duration::from_secs(20), || {
        connections_on(&proxy, tidbs[0].sql) == 0
    })
    .await;
    eprintln!("FIGURE cpu: 10 sessions left a TiDB at 90% CPU in {took:?}");
    let b = backends(&proxy);
    let busy = b
        .iter()
        .find(|x| x["addr"] == tidbs[0].sql.to_string())
        .expect("listed");
    assert!(busy["cpu_usage"].as_f64().expect("cpu") > 0.8, "{busy}");
    for _ in 0..5 {
        assert_eq!(new_connection_port(proxy.sql).await, tidbs[1].sql.port());
    }
    // Nothing moves back while the CPU stays high.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connections_on(&proxy, tidbs[0].sql), 0);
    work.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tidb_at_oom_risk_is_emptied_within_ten_seconds() {
    let (cluster, tidbs, proxy) = start(&["a", "a"], "");
    let work = Workload::start(proxy.sql, 20).await;
    eventually("20 sessions spread 10/10", Duration::from_secs(10), || {
        connections_on(&proxy, tidbs[0].sql) == 10 && connections_on(&proxy, tidbs[1].sql) == 10
    })
    .await;
    cluster.set_load(1, None, Some(0.8));
    eventually("memory use read", Duration::from_secs(5), || {
        backends(&proxy)
            .iter()
            .any(|b| b["memory_usage"].as_f64().is_some_and(|m| m > 0.75))
    })
    .await;
    let took = eventually(
        "the TiDB at OOM risk emptied",
        Duration::from_secs(15),
        || connections_on(&proxy, tidbs[1].sql) == 0,
    )
    .await;
    eprintln!("FIGURE memory: 10 sessions left a TiDB at 80% of its memory quota in {took:?}");
    assert_eq!(new_connection_port(proxy.sql).await, tidbs[0].sql.port());
    work.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tidb_failing_towards_pd_is_emptied_and_avoided() {
    // TiProxy's health factor: the TiDB whose TSO requests to PD fail is
    // ranked last; its sessions leave (all within 60 s, here 10 per
    // second: the one-per-tick floor) and new connections go elsewhere.
    let (cluster, tidbs, proxy) = start(&["a", "a"], "");
    let work = Workload::start(proxy.sql, 20).await;
    eventually("20 sessions spread 10/10", Duration::from_secs(10), || {
        connections_on(&proxy, tidbs[0].sql) == 10 && connections_on(&proxy, tidbs[1].sql) == 10
    })
    .await;
    cluster.set_errors(0, Some(0.9), None);
    let took = eventually(
        "the TiDB failing towards PD emptied",
        Duration::from_secs(15),
        || connections_on(&proxy, tidbs[0].sql) == 0,
    )
    .await;
    eprintln!("FIGURE health: 10 sessions left a TiDB failing 90% of its TSO requests in {took:?}");
    let failing = backends(&proxy)
        .into_iter()
        .find(|x| x["addr"] == tidbs[0].sql.to_string())
        .expect("listed");
    assert_eq!(failing["score"]["health"], 2, "{failing}");
    for _ in 0..5 {
        assert_eq!(new_connection_port(proxy.sql).await, tidbs[1].sql.port());
    }
    let log = proxy.log.lock().expect("log").clone();
    assert_eq!(
        log.matches("TiDB fails towards PD or TiKV").count(),
        1,
        "one loud line naming the indicator: {log}"
    );
    assert!(log.contains("failure_pd"), "{log}");
    // TiKV errors on the other TiDB as well: both fail, nothing moves
    // back (TiProxy moves only from failing to normal).
    cluster.set_errors(1, None, Some(0.5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connections_on(&proxy, tidbs[0].sql), 0);
    work.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_gather_in_the_proxys_zone() {
    let (_cluster, tidbs, proxy) = start(
        &["west", "east"],
        "[labels]\nzone = \"east\"\n[balance]\npolicy = \"location\"\n",
    );
    // The zone's TiDB is drained: sessions land outside the zone.
    let east = tidbs[1].sql;
    let (status, body) =
        tiproxy_tests::http_request(proxy.api, "POST", &format!("/api/backends/{east}/drain"));
    assert_eq!(status, 200, "{body}");
    let work = Workload::start(proxy.sql, 10).await;
    assert_eq!(connections_on(&proxy, tidbs[0].sql), 10);
    // Back in service: every session moves into the zone, new ones go there.
    let (status, body) =
        tiproxy_tests::http_request(proxy.api, "POST", &format!("/api/backends/{east}/undrain"));
    assert_eq!(status, 200, "{body}");
    let took = eventually("all sessions in the zone", Duration::from_secs(15), || {
        connections_on(&proxy, east) == 10
    })
    .await;
    eprintln!("FIGURE location: 10 sessions moved into the proxy's zone in {took:?}");
    assert_eq!(new_connection_port(proxy.sql).await, east.port());
    let b = backends(&proxy);
    let west = b
        .iter()
        .find(|x| x["addr"] == tidbs[0].sql.to_string())
        .expect("listed");
    assert_eq!(west["zone"], "west");
    assert_eq!(west["score"]["location"], 1, "{west}");
    work.finish().await;
}

/// The figure: from a TiDB's `/status` turning 500 (graceful
/// shutdown with graceful-wait) to its last session moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_500_to_last_session_moved() {
    let cluster = TidbDouble::start(2, 10, &[]);
    let tidbs = cluster.instances();
    let proxy = ProxyProcess::start_with_backends(
        &entries(&tidbs, &["a", "a"]),
        "[health-check]\nstatus-interval = \"100ms\"\n",
    );
    let work = Workload::start(proxy.sql, 30).await;
    // prefer-idle (the default routing policy) picks at random among
    // backends the balancer would not move sessions away from, so the
    // split settles near 15/15, not exactly there.
    let mut moved = 0;
    eventually(
        "30 sessions connected, 10 to 20 on each TiDB",
        Duration::from_secs(10),
        || {
            moved = connections_on(&proxy, tidbs[0].sql);
            (10..=20).contains(&moved) && moved + connections_on(&proxy, tidbs[1].sql) == 30
        },
    )
    .await;
    let t0 = Instant::now();
    cluster.shutdown(0);
    eventually("the draining TiDB emptied", Duration::from_secs(8), || {
        connections_on(&proxy, tidbs[0].sql) == 0
    })
    .await;
    let took = t0.elapsed();
    eprintln!(
        "FIGURE drain: {moved} sessions moved off a TiDB within {took:?} of its /status turning 500 (status-interval 100ms)"
    );
    assert_eq!(connections_on(&proxy, tidbs[1].sql), 30);
    work.finish().await;
}
