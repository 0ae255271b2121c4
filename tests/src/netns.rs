//! Network namespaces for tests that cut a TiDB off the network: a
//! namespace joined to this one by a veth pair, and a `tidb-double` running
//! inside it. `iptables` in the namespace then drops its packets, which is
//! what a dead host or a partition looks like to the proxy (no reset, no
//! FIN: only silence). Needs root (CAP_NET_ADMIN); `Netns::create` says so
//! and returns `None` without it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Runs a command; its stdout, or the failure with stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn must(cmd: &str, args: &[&str]) -> String {
    run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A network namespace joined to this one by a veth pair: `host` here,
/// `inside` there. Removed (with the pair) on drop.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`ip netns exec NAME`).
    pub name: String,
    /// This side's address on the pair.
    pub host: String,
    /// The namespace's address on the pair.
    pub inside: String,
}

impl Netns {
    /// `None` when namespaces cannot be made here (not root).
    pub fn create() -> Option<Netns> {
        let id = std::process::id();
        let name = format!("tpka{id}");
        if let Err(e) = run("ip", &["netns", "add", &name]) {
            eprintln!("SKIPPED: the keepalive test needs root (CAP_NET_ADMIN) for ip netns: {e}");
            return None;
        }
        let net = id % 250 + 1;
        let ns = Netns {
            name,
            host: format!("10.213.{net}.1"),
            inside: format!("10.213.{net}.2"),
        };
        let (vh, vn) = (format!("vka{id}h"), format!("vka{id}n"));
        must(
            "ip",
            &["link", "add", &vh, "type", "veth", "peer", "name", &vn],
        );
        must("ip", &["link", "set", &vn, "netns", &ns.name]);
        must(
            "ip",
            &["addr", "add", &format!("{}/30", ns.host), "dev", &vh],
        );
        must("ip", &["link", "set", &vh, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.inside),
            "dev",
            &vn,
        ]);
        ns.exec(&["ip", "link", "set", &vn, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Runs a command inside the namespace; panics on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        must("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Packets flow again first: sockets the killed TiDB left behind
        // finish their close instead of holding the namespace (and the
        // pair) alive for minutes of unanswered retransmissions.
        let _ = run("ip", &["netns", "exec", &self.name, "iptables", "-F"]);
        // Deleting the namespace deletes its end of the pair, and so both.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A `tidb-double` running inside the namespace; killed on drop.
#[derive(Debug)]
pub struct InsideTidb {
    child: Child,
    /// Its SQL address.
    pub sql: SocketAddr,
    /// Its status address.
    pub status: SocketAddr,
}

impl InsideTidb {
    pub fn start(ns: &Netns) -> InsideTidb {
        Self::start_with(ns, &[])
    }

    /// Like [`InsideTidb::start`], with more `tidb-double` arguments.
    pub fn start_with(ns: &Netns, extra: &[&str]) -> InsideTidb {
        let double = crate::binary("tidb-double");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(double)
            .args(["--instances", "1", "--host", &ns.inside])
            .args(extra)
            .args(["--control-addr", &format!("{}:0", ns.inside)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tidb-double in the namespace");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("tidb-double prints its addresses");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let i = &v["instances"][0];
        InsideTidb {
            child,
            sql: i["sql"].as_str().expect("sql").parse().expect("addr"),
            status: i["status"].as_str().expect("status").parse().expect("addr"),
        }
    }
}

impl Drop for InsideTidb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
