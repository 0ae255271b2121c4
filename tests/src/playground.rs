//! The playground (`scripts/run.sh`) as the end-to-end tests start it: etcd
//! as PD, TiDB doubles registered in it, tiproxy in front, on free ports,
//! with the debug binaries (`TIPROXY_BIN_DIR`) instead of a release build.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, free_port, workspace};

/// The playground process group; stopped (TERM, then KILL) on drop.
#[derive(Debug)]
pub struct Playground {
    child: Child,
    /// The proxy's SQL address.
    pub sql: SocketAddr,
    /// The proxy's API port.
    pub api_port: u16,
    /// The TiDB doubles' control API.
    pub control: String,
    /// The banner the script printed.
    pub banner: String,
}

impl Drop for Playground {
    fn drop(&mut self) {
        let pg = format!("-{}", self.child.id());
        // `--`: procps kill would read `-PID` as a signal.
        let _ = Command::new("kill").args(["-TERM", "--", &pg]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &pg]).status();
        let _ = self.child.wait();
    }
}

/// Starts `scripts/run.sh` with `tidbs` TiDB doubles on free ports and
/// waits until its proxy listens.
pub fn start_playground(tidbs: usize) -> Playground {
    // Make sure the binaries exist before the script looks for them.
    let bin_dir = binary("tiproxy").parent().expect("bin dir").to_path_buf();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let (sql, api, control) = (ports[0], ports[1], ports[2]);
    // etcd wants two consecutive ports (client, peer); TiDB instances get
    // base + i: take bases below the kernel's ephemeral range (32768+),
    // where outgoing connections cannot hold them, distinct per process.
    let base = 20000 + (std::process::id() % 1200) as u16 * 10;
    let mut child = Command::new("bash")
        .arg(workspace().join("scripts/run.sh"))
        .env("TIPROXY_BIN_DIR", &bin_dir)
        .env("PLAYGROUND_TIDBS", tidbs.to_string())
        .env("PLAYGROUND_SQL_PORT", sql.to_string())
        .env("PLAYGROUND_API_PORT", api.to_string())
        .env("PLAYGROUND_CONTROL_PORT", control.to_string())
        .env("PLAYGROUND_PD_PORT", base.to_string())
        .env("PLAYGROUND_TIDB_SQL_BASE", (base + 2).to_string())
        .env("PLAYGROUND_TIDB_STATUS_BASE", (base + 6).to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run scripts/run.sh");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("playground| {line}");
            let _ = tx.send(line);
        }
    });
    let pg = Playground {
        child,
        sql: format!("127.0.0.1:{sql}").parse().expect("addr"),
        api_port: api,
        control: format!("127.0.0.1:{control}"),
        banner: String::new(),
    };
    let mut pg = pg;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops everything") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
            }
            Err(e) => panic!("the playground did not print its banner: {e}\n{banner}"),
        }
    }
    assert!(banner.contains(&format!("127.0.0.1:{sql}")), "{banner}");
    assert!(
        banner.contains("tidb --control"),
        "says how to scale: {banner}"
    );
    while TcpStream::connect(pg.sql).is_err() {
        assert!(
            Instant::now() < deadline,
            "the playground's proxy never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pg.banner = banner;
    pg
}

impl Playground {
    /// Runs `tiproxyctl` against the playground; its JSON output.
    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--port".to_string(), self.api_port.to_string()];
        if args.first() == Some(&"tidb") {
            full.extend(["tidb".into(), "--control".into(), self.control.clone()]);
            full.extend(args[1..].iter().map(|s| s.to_string()));
        } else {
            full.extend(args.iter().map(|s| s.to_string()));
        }
        let out = Command::new(binary("tiproxyctl"))
            .args(&full)
            .output()
            .expect("run tiproxyctl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "tiproxyctl {full:?}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("tiproxyctl {full:?}: {e}: {text}"))
    }

    /// Sessions per TiDB SQL address, from `tiproxyctl backends`.
    pub fn spread(&self) -> Vec<(String, i64)> {
        let v = self.ctl(&["backends"]);
        let list = v
            .as_array()
            .or_else(|| v["backends"].as_array())
            .cloned()
            .unwrap_or_default();
        list.iter()
            .map(|b| {
                (
                    b["addr"].as_str().unwrap_or("").to_string(),
                    b["connections"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    }
}
