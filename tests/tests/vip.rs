//! `[ha]` virtual IP failover between two real `tiproxy` processes, each in
//! its own network namespace on a bridge the test creates (and removes),
//! with a third namespace for the client. etcd (PD) and a TiDB double run
//! in the test's own namespace; each proxy reaches etcd through its own
//! relay, so one proxy can be cut off from PD alone.
//!
//! Shown: the client reaches the VIP; after `kill -9` of the owner it can
//! connect again within 3 s (printed); SIGTERM of the owner refuses no
//! attempt; an owner cut off from etcd gives the address up before the
//! other proxy takes it (both namespaces polled). Needs root
//! (CAP_NET_ADMIN, CAP_SYS_ADMIN): without it the test fails and says so.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tiproxy_tests::{Etcd, TidbDouble, binary, http_get, install, opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SQL_PORT: u16 = 6000;
const API_PORT: u16 = 3080;

/// The bridge, the namespaces and their addresses; removed on drop.
struct Lab {
    /// `10.213.<net>.0/24`, unique per test process.
    net: u8,
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Creates the bridge and namespaces `a`, `b` (proxies) and `c`
    /// (client). Panics, naming the cause, when it cannot.
    fn create() -> Lab {
        install(&["iproute2"], "ip");
        let pid = std::process::id();
        let mut lab = Lab {
            net: (pid % 250 + 1) as u8,
            bridge: format!("tpvbr{}", pid % 100_000),
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        if let Err(e) = lab.build() {
            panic!(
                "cannot create the network namespaces this test needs (run it as root, \
                 with CAP_NET_ADMIN and CAP_SYS_ADMIN): {e}"
            );
        }
        lab
    }

    fn build(&mut self) -> Result<(), String> {
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host(1)),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        for (name, host) in [("a", 11), ("b", 12), ("c", 50)] {
            let ns = self.ns(name);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let veth = format!("{}{name}", self.bridge);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            self.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
            let addr = format!("{}/24", self.host(host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.bridge)
    }

    fn host(&self, h: u8) -> String {
        format!("10.213.{}.{h}", self.net)
    }

    fn vip(&self) -> String {
        self.host(100)
    }

    /// Whether namespace `name`'s eth0 has the VIP now.
    fn holds(&self, name: &str) -> bool {
        let out = ip(&[
            "-n",
            &self.ns(name),
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .expect("read the namespace's addresses");
        out.contains(&format!(" {}/32 ", self.vip()))
    }

    /// Waits until `name` holds the VIP; panics after `limit`.
    fn wait_holder(&self, name: &str, limit: Duration, why: &str) {
        let deadline = Instant::now() + limit;
        while !self.holds(name) {
            assert!(
                Instant::now() < deadline,
                "{name} did not take the VIP: {why}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        for v in &self.veths {
            let _ = ip(&["link", "del", v]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A TCP relay from the bridge to etcd that can be cut: bytes then stop
/// flowing both ways, with the connections left open, like a partition.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Relay {
    fn start(rt: &tokio::runtime::Runtime, listen: &str, to: SocketAddr) -> Relay {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(format!("{listen}:0")))
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        rt.spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pipe(ir, ow, flag.clone()), pipe(or, iw, flag));
                });
            }
        });
        Relay { addr, cut }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !cut.load(Ordering::Relaxed) && to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A `tiproxy` in one of the lab's namespaces.
struct Proxy {
    child: Child,
    name: &'static str,
    addr: String,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(lab: &Lab, name: &'static str, host: u8, pd: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = lab.host(host);
        let cfg = format!(
            "[proxy]\naddr = \"0.0.0.0:{SQL_PORT}\"\nadvertise-addr = \"{addr}\"\n\
             pd-addrs = \"{pd}\"\ngraceful-wait-before-shutdown = 0\n\
             graceful-close-conn-timeout = 2\n\
             [api]\naddr = \"0.0.0.0:{API_PORT}\"\n\
             [ha]\nvirtual-ip = \"{}/32\"\ninterface = \"eth0\"\n",
            lab.vip()
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, cfg).expect("write config");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(name)])
            .arg(binary("tiproxy"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tiproxy");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let sql: SocketAddr = format!("{addr}:{SQL_PORT}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&sql, Duration::from_millis(200)).is_err() {
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "tiproxy {name} exited with {s}:\n{}",
                    log.lock().expect("log")
                );
            }
            assert!(Instant::now() < deadline, "tiproxy {name} did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Proxy {
            child,
            name,
            addr,
            log,
            _dir: dir,
        }
    }

    fn id(&self) -> String {
        format!("{}:{SQL_PORT}", self.addr)
    }

    fn api(&self, path: &str) -> (u16, String) {
        http_get(
            format!("{}:{API_PORT}", self.addr).parse().expect("addr"),
            path,
        )
    }

    fn health(&self) -> serde_json::Value {
        let (_, body) = self.api("/api/debug/health");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("health {body:?}: {e}"))
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn wait_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "tiproxy {} did not exit:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How one connection attempt to the VIP ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The proxy's handshake arrived.
    Greeted,
    /// Refused (RST).
    Refused,
    /// Nothing within the attempt's time.
    Silent,
    /// Another error (reset after accept, ...).
    Failed,
}

/// Orders for the client thread, which lives in namespace `c`.
enum Order {
    /// Attempt until one that started after the order is greeted, or until
    /// the time is up; answer every attempt (start, end, outcome).
    UntilGreeted(Duration, mpsc::Sender<Vec<(Instant, Instant, Outcome)>>),
    /// Attempt repeatedly until told to stop; answer every attempt.
    Repeat(
        Arc<AtomicBool>,
        mpsc::Sender<Vec<(Instant, Instant, Outcome)>>,
    ),
    /// A query through the VIP with mysql_async; answer its result.
    Query(mpsc::Sender<Result<u64, String>>),
}

fn client_thread(ns: String, vip: SocketAddr) -> mpsc::Sender<Order> {
    let (tx, rx) = mpsc::channel::<Order>();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the client namespace");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for order in rx {
            match order {
                Order::UntilGreeted(limit, answer) => {
                    let start = Instant::now();
                    let mut seen = Vec::new();
                    while start.elapsed() < limit {
                        let a = attempt(vip, Duration::from_millis(300));
                        seen.push(a);
                        if a.2 == Outcome::Greeted {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = answer.send(seen);
                }
                Order::Repeat(stop, answer) => {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        // Long enough for SYN retransmissions (1 s, 3 s).
                        seen.push(attempt(vip, Duration::from_secs(5)));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = answer.send(seen);
                }
                Order::Query(answer) => {
                    let r = rt.block_on(async {
                        let q = async {
                            use mysql_async::prelude::Queryable;
                            // The TiDB double has no test database.
                            let o = mysql_async::OptsBuilder::from_opts(opts(vip))
                                .db_name(None::<String>);
                            let mut c = mysql_async::Conn::new(o).await?;
                            let v: Option<u64> = c.query_first("SELECT 1").await?;
                            c.disconnect().await?;
                            Ok::<_, mysql_async::Error>(v.unwrap_or(0))
                        };
                        match tokio::time::timeout(Duration::from_secs(10), q).await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err("timed out".into()),
                        }
                    });
                    let _ = answer.send(r);
                }
            }
        }
    });
    tx
}

/// One connection to the VIP: connect within `limit`, then read the
/// proxy's initial handshake (protocol version 10).
fn attempt(vip: SocketAddr, limit: Duration) -> (Instant, Instant, Outcome) {
    let start = Instant::now();
    let outcome = match TcpStream::connect_timeout(&vip, limit) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut head = [0u8; 5];
            match s.read_exact(&mut head) {
                Ok(()) if head[4] == 10 => Outcome::Greeted,
                _ => Outcome::Failed,
            }
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            Outcome::Silent
        }
        Err(_) => Outcome::Failed,
    };
    (start, Instant::now(), outcome)
}

fn query(client: &mpsc::Sender<Order>) -> Result<u64, String> {
    let (tx, rx) = mpsc::channel();
    client.send(Order::Query(tx)).expect("client thread");
    rx.recv().expect("client answer")
}

fn owner_in_health(p: &Proxy) -> Option<String> {
    p.health()["vip"]["owner"].as_str().map(String::from)
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_virtual_ip_moves_between_proxies_without_two_holders() {
    let lab = Lab::create();
    let etcd = Etcd::start();
    let etcd_addr: SocketAddr = etcd.endpoint().parse().expect("etcd addr");
    let _tidb = TidbDouble::start(
        1,
        0,
        &[
            "--host",
            &lab.host(1),
            "--pd",
            &etcd.endpoint(),
            "--pd-ttl",
            "10",
        ],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let relay_a = Relay::start(&rt, &lab.host(1), etcd_addr);
    let relay_b = Relay::start(&rt, &lab.host(1), etcd_addr);
    let vip: SocketAddr = format!("{}:{SQL_PORT}", lab.vip()).parse().expect("vip");
    let client = client_thread(lab.ns("c"), vip);
    let label = format!("tiproxy_server_owner{{type=\"vip/{}\"}} 1", lab.vip());

    // The first proxy is elected and holds the VIP; the second waits.
    let mut a = Proxy::start(&lab, "a", 11, relay_a.addr);
    lab.wait_holder("a", Duration::from_secs(15), "the only candidate");
    let b = Proxy::start(&lab, "b", 12, relay_b.addr);
    wait_for(Duration::from_secs(10), "b to see a as the owner", || {
        owner_in_health(&b) == Some(a.id())
    });
    assert!(!lab.holds("b"), "a candidate holds the VIP");
    assert_eq!(a.health()["vip"]["holding"], true, "{}", a.health());
    assert_eq!(b.health()["vip"]["holding"], false, "{}", b.health());
    assert!(a.api("/metrics").1.contains(&label), "the owner's metric");
    assert!(
        !b.api("/metrics").1.contains("tiproxy_server_owner{"),
        "b owns nothing"
    );
    assert_eq!(query(&client), Ok(1), "a query through the VIP");

    // kill -9 of the owner: the client connects to the VIP again within 3 s.
    let killed = Instant::now();
    a.child.kill().expect("kill -9");
    let _ = a.child.wait();
    let (tx, rx) = mpsc::channel();
    client
        .send(Order::UntilGreeted(Duration::from_secs(10), tx))
        .expect("client");
    let seen = rx.recv().expect("client answer");
    let (_, greeted_at, last) = *seen.last().expect("attempts");
    assert_eq!(
        last,
        Outcome::Greeted,
        "the VIP never answered again: {seen:?}\n{}",
        b.log()
    );
    let took = greeted_at - killed;
    println!(
        "kill -9 of the owner: the client connected to the VIP again after {took:?} ({} attempts)",
        seen.len()
    );
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    assert!(lab.holds("b"));
    assert_eq!(
        query(&client),
        Ok(1),
        "a query through the VIP after kill -9"
    );

    // The killed proxy left the address behind; restarted, it removes it
    // and waits as a candidate.
    drop(a);
    let a = Proxy::start(&lab, "a", 11, relay_a.addr);
    wait_for(Duration::from_secs(10), "a to see b as the owner", || {
        owner_in_health(&a) == Some(b.id())
    });
    assert!(!lab.holds("a"), "the restarted proxy kept the old address");

    // SIGTERM of the owner: attempts during the handover are never refused.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    client
        .send(Order::Repeat(stop.clone(), tx))
        .expect("client");
    std::thread::sleep(Duration::from_millis(300));
    let mut b = b;
    b.signal("TERM");
    lab.wait_holder("a", Duration::from_secs(10), "b resigned");
    b.wait_exit(Duration::from_secs(10));
    // Until an attempt after the handover has been greeted.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let seen = rx.recv().expect("client answer");
    let refused: Vec<_> = seen.iter().filter(|s| s.2 != Outcome::Greeted).collect();
    let slowest = seen.iter().map(|s| s.1 - s.0).max().unwrap_or_default();
    println!(
        "SIGTERM of the owner: {} attempts, none refused; the slowest took {slowest:?}",
        seen.len()
    );
    assert!(
        refused.is_empty(),
        "attempts not greeted during SIGTERM: {refused:?}"
    );
    assert!(b.log().contains("released the virtual IP"), "{}", b.log());
    drop(b);

    // The owner (now a) is cut off from etcd: it gives the address up
    // before b takes it. Both namespaces are polled meanwhile.
    let b = Proxy::start(&lab, "b", 12, relay_b.addr);
    wait_for(Duration::from_secs(10), "b to see a as the owner", || {
        owner_in_health(&b) == Some(a.id())
    });
    let cut = Instant::now();
    relay_a.cut.store(true, Ordering::Relaxed);
    let mut released = None;
    let mut taken = None;
    let deadline = cut + Duration::from_secs(20);
    while taken.is_none() && Instant::now() < deadline {
        let (ha, hb) = (lab.holds("a"), lab.holds("b"));
        assert!(
            !(ha && hb),
            "both proxies hold the VIP at {:?}",
            cut.elapsed()
        );
        if !ha && released.is_none() {
            released = Some(cut.elapsed());
        }
        if hb {
            taken = Some(cut.elapsed());
        }
    }
    let (Some(released), Some(taken)) = (released, taken) else {
        panic!(
            "no handover after the cut (released {released:?}, taken {taken:?}):\n{}\n{}",
            a.log(),
            b.log()
        );
    };
    println!(
        "owner cut off from etcd: released after {released:?}, taken by the other after {taken:?}"
    );
    assert!(released < taken);
    assert_eq!(
        query(&client),
        Ok(1),
        "a query through the VIP after the cut"
    );
    assert!(a.health()["vip"]["error"].is_string(), "{}", a.health());
    drop(relay_b);
}

/// Bad `[ha]` settings stop start-up with an error naming the key.
#[test]
fn a_bad_ha_section_stops_start_up_naming_the_key() {
    for (ha, expect) in [
        (
            "virtual-ip = \"10.213.0.100\"\ninterface = \"eth0\"",
            "ha.virtual-ip",
        ),
        (
            "virtual-ip = \"10.213.0.100/32\"\ninterface = \"tpvnosuch0\"",
            "ha.interface: [ha] interface \"tpvnosuch0\" does not exist",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.toml");
        let cfg = format!(
            "[proxy]\naddr = \"127.0.0.1:0\"\npd-addrs = \"127.0.0.1:{}\"\n\
             [api]\naddr = \"127.0.0.1:0\"\n[ha]\n{ha}\n",
            tiproxy_tests::free_port()
        );
        std::fs::write(&path, cfg).expect("write config");
        let out = Command::new(binary("tiproxy"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run tiproxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
}
