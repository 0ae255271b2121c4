//! `make`, `make dist` and `make clean` on a fresh clone of this commit, as
//! a user would run them (issue 17):
//!
//! - `make` builds `tiproxy` and `tiproxyctl`, which name the commit;
//! - `make dist` writes the release tarball and the tiup tarball, each with
//!   a checksum `sha256sum -c` accepts; the binaries in them need no
//!   `GLIBC_` symbol version above 2.17 (`objdump -T`) and no shared
//!   library beyond glibc's and libgcc_s (`readelf -d`), say so in
//!   `--version`, and the unpacked `tiproxy` serves SQL over TLS to a real
//!   MariaDB while the unpacked `tiproxyctl` reads its health;
//! - `make clean` leaves nothing behind that git does not track.
//!
//! The clone is of the committed HEAD: uncommitted changes are not in it.
//! Its builds go to `<target>/dist-test/target`, kept between runs, so a
//! later run rebuilds only the workspace's own crates; a first run (CI) is
//! two full release builds, host and glibc 2.17 (see README, "Install from
//! a release tarball", for how long).

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tiproxy_tests::{free_port, install, mariadb, opts, workspace};

/// Highest glibc the dist binaries may need: CentOS 7's.
const GLIBC_BASELINE: (u32, u32) = (2, 17);

/// Shared libraries a dist binary may need: glibc's own and libgcc_s.
const ALLOWED_NEEDED: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "libgcc_s.so.1",
];

/// How long one `make` may take (a full release build on 2 busy cores).
const MAKE_LIMIT: Duration = Duration::from_secs(40 * 60);

#[test]
fn make_dist_on_a_fresh_clone_runs_on_glibc_2_17_and_make_clean_leaves_nothing() {
    install(&["make"], "make");
    install(&["binutils"], "objdump");
    let target_root = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let work = target_root.join("dist-test");
    let src = work.join("src");
    let cache = work.join("target");
    std::fs::create_dir_all(&work).expect("work dir");

    // A fresh clone of the commit under test, at the same path every run
    // (cargo keys the workspace's crates by path: the cache stays valid).
    let head = git(&workspace(), &["rev-parse", "HEAD"]);
    let _ = std::fs::remove_dir_all(&src);
    run(
        Command::new("git")
            .args(["clone", "--quiet", "--no-checkout"])
            .arg(workspace())
            .arg(&src),
        &work.join("clone.log"),
        Duration::from_secs(300),
    );
    git(&src, &["checkout", "--quiet", "--detach", &head]);
    let short = git(&src, &["rev-parse", "--short=10", "HEAD"]);

    // make: both binaries, naming the commit and built for this host.
    let took = run(
        make(&src, "").env("CARGO_TARGET_DIR", &cache),
        &work.join("make.log"),
        MAKE_LIMIT,
    );
    eprintln!("make: {took:?}");
    for bin in ["tiproxy", "tiproxyctl"] {
        let v = version(&cache.join("release").join(bin));
        assert!(v.contains(&format!("git {short})")), "{bin}: {v}");
        assert!(v.contains("glibc:      host"), "{bin}: {v}");
    }

    // make dist: the two tarballs and their checksums.
    let took = run(
        make(&src, "dist").env("CARGO_TARGET_DIR", &cache),
        &work.join("make-dist.log"),
        MAKE_LIMIT,
    );
    eprintln!("make dist: {took:?}");
    let dist = src.join("dist");
    let pkg = format!("tiproxy-v{}-linux-amd64", env!("CARGO_PKG_VERSION"));
    let tarball = format!("{pkg}.tar.gz");
    for file in [tarball.as_str(), "tiproxy.tar.gz"] {
        let sum = format!("{file}.sha256");
        let out = Command::new("sha256sum")
            .args(["-c", &sum])
            .current_dir(&dist)
            .output()
            .expect("sha256sum");
        assert!(
            out.status.success(),
            "{sum}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        tar_list(&dist.join(&tarball)),
        [
            format!("{pkg}/"),
            format!("{pkg}/LICENSE"),
            format!("{pkg}/README.md"),
            format!("{pkg}/bin/"),
            format!("{pkg}/bin/tiproxy"),
            format!("{pkg}/bin/tiproxyctl"),
            format!("{pkg}/conf/"),
            format!("{pkg}/conf/proxy.toml"),
        ]
    );
    // tiup runs the entry named at publish time from the archive root.
    assert_eq!(tar_list(&dist.join("tiproxy.tar.gz")), ["tiproxy"]);

    let unpacked = tempfile::tempdir().expect("tempdir");
    for file in [tarball.as_str(), "tiproxy.tar.gz"] {
        let out = Command::new("tar")
            .arg("-xzf")
            .arg(dist.join(file))
            .arg("-C")
            .arg(unpacked.path())
            .output()
            .expect("tar");
        assert!(out.status.success(), "{file}: {out:?}");
    }
    let bin = unpacked.path().join(&pkg).join("bin");
    assert_eq!(
        std::fs::read(unpacked.path().join("tiproxy")).expect("tiup's tiproxy"),
        std::fs::read(bin.join("tiproxy")).expect("tiproxy"),
        "the tiup tarball holds the same tiproxy"
    );
    for name in ["tiproxy", "tiproxyctl"] {
        let path = bin.join(name);
        let glibc = glibc_versions(&path);
        let newest = glibc.iter().max().copied();
        eprintln!(
            "{name}: newest GLIBC_ {newest:?}, NEEDED {:?}",
            needed(&path)
        );
        assert!(
            newest.is_none_or(|v| v <= GLIBC_BASELINE),
            "{name} needs GLIBC_{newest:?} (> 2.17): {glibc:?}"
        );
        for lib in needed(&path) {
            assert!(
                ALLOWED_NEEDED.contains(&lib.as_str()),
                "{name} needs {lib}, which an old distribution may lack"
            );
        }
        let v = version(&path);
        for fact in [
            format!("{name} {} (git {short})", env!("CARGO_PKG_VERSION")),
            "glibc:      2.17".into(),
            "target:     x86_64-unknown-linux-gnu".into(),
            "rustc:      rustc ".into(),
            "build time: ".into(),
        ] {
            assert!(v.contains(&fact), "{name} --version lacks {fact:?}:\n{v}");
        }
    }

    sql_round_trip(&bin, unpacked.path());

    // make clean, on the tree as a plain `make` leaves it (its own target/,
    // here hard links to the kept cache) and with dist/ from `make dist`.
    let out = Command::new("cp")
        .arg("-al")
        .arg(&cache)
        .arg(src.join("target"))
        .output()
        .expect("cp");
    assert!(out.status.success(), "cp -al: {out:?}");
    run(
        make(&src, "clean")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR"),
        &work.join("make-clean.log"),
        Duration::from_secs(300),
    );
    assert!(!src.join("target").exists(), "make clean left target/");
    assert!(!dist.exists(), "make clean left dist/");
    let left = git(&src, &["status", "--porcelain", "--ignored"]);
    assert!(left.is_empty(), "make clean left:\n{left}");
    assert!(
        cache.join("release").join("tiproxy").exists(),
        "make clean in the clone reached the kept cache"
    );
}

/// The unpacked `tiproxy` in front of MariaDB with TLS for clients (ring,
/// compiled by Zig, does the handshake): a table written and read back with
/// prepared statements; the unpacked `tiproxyctl` reads its health.
fn sql_round_trip(bin: &Path, dir: &Path) {
    let db = mariadb().addr();
    let sql: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let api = free_port();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "workdir = \"{}\"\n[proxy]\naddr = \"{sql}\"\npd-addrs = \"\"\nbackend-addrs = [\"{db}\"]\n\
             [api]\naddr = \"127.0.0.1:{api}\"\n[security.server-tls]\nauto-certs = true\n",
            dir.join("work").display()
        ),
    )
    .expect("write config");
    let log = dir.join("tiproxy.log");
    let proxy = Proxy(
        Command::new(bin.join("tiproxy"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("spawn the dist tiproxy"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(sql).is_err() {
        assert!(
            Instant::now() < deadline,
            "the dist tiproxy did not listen on {sql}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tls = mysql_async::OptsBuilder::from_opts(opts(sql)).ssl_opts(Some(
            mysql_async::SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true),
        ));
        let mut c = mysql_async::Conn::new(tls)
            .await
            .expect("TLS session through the dist tiproxy");
        c.query_drop(
            "CREATE TABLE IF NOT EXISTS dist_round_trip (id INT PRIMARY KEY, s VARCHAR(32))",
        )
        .await
        .expect("create");
        c.query_drop("DELETE FROM dist_round_trip")
            .await
            .expect("delete");
        c.exec_batch(
            "INSERT INTO dist_round_trip VALUES (?, ?)",
            [(1, "centos 7"), (2, "glibc 2.17")],
        )
        .await
        .expect("insert");
        let rows: Vec<(i32, String)> = c
            .exec(
                "SELECT id, s FROM dist_round_trip WHERE id >= ? ORDER BY id",
                (1,),
            )
            .await
            .expect("select");
        assert_eq!(
            rows,
            [(1, "centos 7".to_string()), (2, "glibc 2.17".to_string())]
        );
        c.disconnect().await.expect("disconnect");
    });

    let out = Command::new(bin.join("tiproxyctl"))
        .args(["--host", "127.0.0.1", "--port", &api.to_string(), "health"])
        .output()
        .expect("run the dist tiproxyctl");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("config_checksum"),
        "tiproxyctl health: {out:?}"
    );
    drop(proxy);
}

/// The dist `tiproxy`, killed on drop.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `make [goal]` in `dir`.
fn make(dir: &Path, goal: &str) -> Command {
    let mut c = Command::new("make");
    c.current_dir(dir);
    if !goal.is_empty() {
        c.arg(goal);
    }
    c
}

/// Runs `cmd` in its own process group with its output in `log`; panics
/// with the log's tail when it fails or outlives `limit` (the whole group is
/// killed then). Returns how long it took.
fn run(cmd: &mut Command, log: &Path, limit: Duration) -> Duration {
    let started = Instant::now();
    let out = File::create(log).expect("log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > limit {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if status.is_none_or(|s| !s.success()) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{cmd:?}: {} after {:?}; last lines of {}:\n{}",
            status.map_or("timed out".to_string(), |s| s.to_string()),
            started.elapsed(),
            log.display(),
            tail.join("\n")
        );
    }
    started.elapsed()
}

/// `git args` in `dir`; its trimmed output.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git (the test clones the workspace: it needs a git checkout)");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {out:?}",
        dir.display()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `bin --version`.
fn version(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert!(out.status.success(), "{}: {out:?}", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The entries of a .tar.gz, sorted.
fn tar_list(file: &Path) -> Vec<String> {
    let out = Command::new("tar")
        .arg("-tzf")
        .arg(file)
        .output()
        .expect("tar");
    assert!(out.status.success(), "{}: {out:?}", file.display());
    let mut entries: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    entries.sort();
    entries
}

/// Every `GLIBC_x.y[.z]` symbol version `bin` imports (`objdump -T`), as
/// (major, minor); a non-numeric one (`GLIBC_PRIVATE`) fails the test.
fn glibc_versions(bin: &Path) -> Vec<(u32, u32)> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(bin)
        .output()
        .expect("objdump");
    assert!(
        out.status.success(),
        "objdump -T {}: {out:?}",
        bin.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("GLIBC_")
        .skip(1)
        .map(|rest| {
            let v: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>());
            match (parts.next(), parts.next()) {
                (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
                _ => panic!(
                    "{}: unexpected symbol version GLIBC_{rest:.20}",
                    bin.display()
                ),
            }
        })
        .collect()
}

/// The shared libraries `bin` names as NEEDED (`readelf -d`).
fn needed(bin: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(bin)
        .output()
        .expect("readelf");
    assert!(
        out.status.success(),
        "readelf -d {}: {out:?}",
        bin.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect()
}
