//! TCP keepalive on real sockets. A TiDB double runs in a network namespace
//! behind a veth pair; the proxy reaches it over the pair. `ss -o` shows the
//! keepalive timers the profiles set on both legs. Then the namespace drops
//! every packet (iptables): the health checks mark the TiDB unhealthy, its
//! connections switch to `backend-unhealthy-keepalive`, and the idle session's
//! dead backend connection is found within that profile's bound. The client
//! gets what a vanished server gives it: the connection closed, no error the
//! proxy made up. With the healthy profile alone (idle 60 s) nothing would
//! be noticed for a minute.
//!
//! Needs root (CAP_NET_ADMIN) for `ip netns`; without it the test says so
//! and passes. CI runs as root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::*;
use tiproxy_tests::netns::{InsideTidb, Netns, must};
use tiproxy_tests::{ProxyProcess, TidbDouble, double_opts, http_request_with_body, install};

/// The keepalive timer `ss -o` shows on the established socket from
/// `local` (a port, or any) to `peer` (an address, or any): what is left
/// of it.
fn keepalive_timer(local_port: Option<u16>, peer: Option<SocketAddr>) -> Option<Duration> {
    let out = must("ss", &["-tnoH", "state", "established"]);
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (local, remote) = (f.get(2)?, f.get(3)?);
        if local_port.is_some_and(|p| !local.ends_with(&format!(":{p}"))) {
            return None;
        }
        if peer.is_some_and(|p| *remote != p.to_string()) {
            return None;
        }
        let timer = l.split("timer:(keepalive,").nth(1)?;
        parse_ss_time(timer.split(',').next()?)
    })
}

/// Waits (up to 5 s) for the keepalive timer of [`keepalive_timer`]'s
/// socket to be within `range`; what it was last.
async fn timer_within(
    local_port: Option<u16>,
    peer: Option<SocketAddr>,
    range: std::ops::RangeInclusive<Duration>,
    what: &str,
) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = keepalive_timer(local_port, peer);
        if let Some(t) = t
            && range.contains(&t)
        {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: keepalive timer {t:?}, not within {range:?}\n{}",
            must("ss", &["-tno"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ss`'s times: `1min2sec`, `59sec`, `980ms`, `2min`.
fn parse_ss_time(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        let c = rest.chars().next()?;
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            rest = &rest[1..];
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        let (unit, len) = if rest.starts_with("min") {
            (60.0, 3)
        } else if rest.starts_with("sec") {
            (1.0, 3)
        } else if rest.starts_with("ms") {
            (0.001, 2)
        } else {
            return None;
        };
        total += Duration::from_secs_f64(n * unit);
        rest = &rest[len..];
    }
    Some(total)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_backend_is_found_dead_by_keepalive_and_the_client_closed_as_by_the_server() {
    install(&["iproute2"], "ss");
    let Some(ns) = Netns::create() else {
        return;
    };
    install(&["iptables"], "iptables");
    let tidb = InsideTidb::start(&ns);
    let p = ProxyProcess::start_with_backends(
        &[format!(
            "{{ addr = \"{}\", status-addr = \"{}\" }}",
            tidb.sql, tidb.status
        )],
        "[proxy.frontend-keepalive]\nenabled = true\nidle = 30\nintvl = 5\ncnt = 3\n\
         [proxy.backend-healthy-keepalive]\nenabled = true\nidle = 60\nintvl = 3\ncnt = 5\ntimeout = 15\n\
         [proxy.backend-unhealthy-keepalive]\nenabled = true\nidle = 1\nintvl = 1\ncnt = 2\ntimeout = 3\n\
         [health-check]\nstatus-interval = \"300ms\"\ninterval = \"500ms\"\ndial-timeout = \"500ms\"\n",
    );
    let mut c = Conn::new(double_opts(p.sql))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", p.log.lock().unwrap()));
    let one: Option<i64> = c.query_first("SELECT 1").await.expect("query");
    assert_eq!(one, Some(1));

    // The profiles are on the sockets: the client leg's idle is 30 s, the
    // healthy backend's 60 s (the system default would be hours).
    let secs = Duration::from_secs;
    timer_within(Some(p.sql.port()), None, secs(1)..=secs(30), "client leg").await;
    timer_within(None, Some(tidb.sql), secs(20)..=secs(60), "backend leg").await;

    // The TiDB's network goes silent: nothing in, nothing out.
    ns.exec(&["iptables", "-A", "INPUT", "-j", "DROP"]);
    ns.exec(&["iptables", "-A", "OUTPUT", "-j", "DROP"]);
    let silent = Instant::now();
    // Unhealthy within a status check or two (~1 s), then idle 1 + 2
    // probes 1 s apart (or the 3 s user timeout): the session ends well
    // within 10 s. With only the healthy profile it would take over 60 s.
    let bound = Duration::from_secs(10);
    loop {
        let (status, body) = p.get("/api/sessions");
        assert_eq!(status, 200, "{body}");
        if body.trim() == "[]" {
            break;
        }
        assert!(
            silent.elapsed() < bound,
            "the dead backend connection was not noticed within {bound:?}: {body}\n{}\n{}",
            must("ss", &["-tno"]),
            p.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = silent.elapsed();
    eprintln!("FIGURE silent backend -> session closed: {took:?}");
    // What a client of a vanished server sees: the connection is gone; no
    // MySQL error came from the proxy.
    match c.query_drop("SELECT 2").await {
        Ok(()) => panic!("the session still answers"),
        Err(mysql_async::Error::Server(e)) => {
            panic!("the proxy made up an error instead of closing: {e}")
        }
        Err(_) => {}
    }
    assert!(
        keepalive_timer(Some(p.sql.port()), None).is_none(),
        "the client leg is closed"
    );
    ns.exec(&["iptables", "-F"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_profiles_reach_open_connections() {
    install(&["iproute2"], "ss");
    let tidb = TidbDouble::start(1, 0, &[]);
    let i = &tidb.instances()[0];
    let p = ProxyProcess::start_with_backends(
        &[TidbDouble::backend_entry(i)],
        "[proxy.frontend-keepalive]\nenabled = true\nidle = 30\n\
         [proxy.backend-healthy-keepalive]\nenabled = true\nidle = 40\n",
    );
    let mut c = Conn::new(double_opts(p.sql)).await.expect("connect");
    c.query_drop("SELECT 1").await.expect("query");
    let secs = Duration::from_secs;
    timer_within(Some(p.sql.port()), None, secs(1)..=secs(30), "client leg").await;
    timer_within(None, Some(i.sql), secs(20)..=secs(40), "backend leg").await;
    // A reload: the open session's sockets take the new idle times (the
    // kernel restarts the timer from the new value).
    let (status, body) = http_request_with_body(
        p.api,
        "PUT",
        "/api/admin/config",
        "[proxy.frontend-keepalive]\nidle = \"10m\"\n[proxy.backend-healthy-keepalive]\nidle = 1200\n",
    );
    assert_eq!(status, 200, "{body}");
    timer_within(
        Some(p.sql.port()),
        None,
        secs(500)..=secs(600),
        "client leg after the reload",
    )
    .await;
    timer_within(
        None,
        Some(i.sql),
        secs(1100)..=secs(1200),
        "backend leg after the reload",
    )
    .await;
    c.query_drop("SELECT 1")
        .await
        .expect("the session lives on");
}
