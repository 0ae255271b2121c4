//! A throwaway MariaDB server for one test binary.
//!
//! [`MariaDb::start`] installs `mariadb-server` and `mariadb-client` with
//! apt-get if they are missing, initialises a datadir in a fresh temp dir,
//! starts `mariadbd` on a free loopback port with TLS certificates from
//! [`crate::certs`], waits until it greets, and creates the test users and
//! database. It never assumes a server is already running and never reads
//! the machine's `my.cnf` (`--no-defaults` everywhere).
//!
//! Dropping the guard kills the server and removes the temp dir. A watchdog
//! shell holds the read end of a pipe whose write end only this process
//! owns, so the server and its files go away even when the test binary is
//! killed or the guard lives in a `static` and is never dropped.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::certs::{self, CertFiles};

/// The application user every scenario connects as (mysql_native_password).
pub const APP_USER: &str = "app";
/// [`APP_USER`]'s password.
pub const APP_PASSWORD: &str = "app-Pa55word";
/// A second user, the target of COM_CHANGE_USER.
pub const OTHER_USER: &str = "other";
/// [`OTHER_USER`]'s password.
pub const OTHER_PASSWORD: &str = "other-Pa55word";
/// A database created at start; scenarios make their own as well.
pub const DATABASE: &str = "conformance";

/// How long `mariadbd` may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running MariaDB server that is killed and deleted on drop.
#[derive(Debug)]
pub struct MariaDb {
    dir: PathBuf,
    port: u16,
    certs: CertFiles,
    server: Child,
    /// Dropping it closes the watchdog's stdin: the watchdog then kills the
    /// server and removes `dir`.
    watchdog_stdin: Option<ChildStdin>,
    watchdog: Child,
}

impl MariaDb {
    /// Installs (if needed), initialises and starts a server, then creates
    /// [`APP_USER`], [`OTHER_USER`] and [`DATABASE`].
    pub fn start() -> Result<MariaDb, MariaDbError> {
        let bin = Binaries::find_or_install()?;
        let dir = tempfile::Builder::new()
            .prefix("tiproxy-conformance-mariadb-")
            .tempdir()
            .map_err(MariaDbError::TempDir)?
            .keep();
        let datadir = dir.join("data");
        // A private tmpdir: installs running side by side (a process per
        // test under nextest) otherwise collide on temporary tables in /tmp
        // ("Error on delete of '/tmp/#sql-temptable-...'").
        let tmpdir = dir.join("tmp");
        std::fs::create_dir_all(&tmpdir).map_err(MariaDbError::TempDir)?;
        let output = Command::new(&bin.install_db)
            .arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--tmpdir={}", tmpdir.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .output()
            .map_err(|source| MariaDbError::Spawn {
                program: bin.install_db.clone(),
                source,
            })?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(MariaDbError::InstallDb {
                status: output.status,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        let certs = match certs::generate(&dir) {
            Ok(certs) => certs,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err.into());
            }
        };

        // On failure the half-started guard's drop removes `dir`.
        let db = Self::launch(&bin, &dir, certs)?;
        db.create_users()?;
        Ok(db)
    }

    fn launch(bin: &Binaries, dir: &Path, certs: CertFiles) -> Result<MariaDb, MariaDbError> {
        let port = free_port().map_err(MariaDbError::Port)?;
        let mut server = Command::new(&bin.mariadbd)
            .arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg("--skip-name-resolve")
            .arg("--local-infile=1")
            .arg("--max-allowed-packet=64M")
            .arg("--max-connections=1000")
            .arg("--character-set-server=utf8mb4")
            .arg("--collation-server=utf8mb4_general_ci")
            // Durability is not under test; speed is.
            .arg("--innodb-flush-log-at-trx-commit=0")
            .arg("--innodb-doublewrite=0")
            .arg(format!("--ssl-cert={}", certs.server_cert.display()))
            .arg(format!("--ssl-key={}", certs.server_key.display()))
            .arg(format!("--ssl-ca={}", certs.ca_cert.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| MariaDbError::Spawn {
                program: bin.mariadbd.clone(),
                source,
            })?;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            // A dying server may still be writing: retry the removal.
            .arg(
                r#"read _ignored; kill -9 "$1" 2>/dev/null
                for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
                    sleep 0.2; rm -rf "$2" 2>/dev/null; [ -e "$2" ] || break
                done"#,
            )
            .arg("tiproxy-conformance-watchdog")
            .arg(server.id().to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| {
                let _ = server.kill();
                let _ = server.wait();
                MariaDbError::Spawn {
                    program: "sh".into(),
                    source,
                }
            })?;
        let watchdog_stdin = watchdog.stdin.take();
        let mut db = MariaDb {
            dir: dir.to_owned(),
            port,
            certs,
            server,
            watchdog_stdin,
            watchdog,
        };
        db.wait_ready()?;
        Ok(db)
    }

    /// Waits until the server sends its initial handshake on the TCP port.
    fn wait_ready(&mut self) -> Result<(), MariaDbError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.server.try_wait().map_err(MariaDbError::Wait)? {
                return Err(MariaDbError::Exited {
                    status,
                    log_tail: self.error_log_tail(),
                });
            }
            if greets(self.addr()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MariaDbError::StartupTimeout {
                    waited: STARTUP_TIMEOUT,
                    log_tail: self.error_log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_users(&self) -> Result<(), MariaDbError> {
        self.run_sql(&format!(
            "DELETE FROM mysql.global_priv WHERE User = '';
             FLUSH PRIVILEGES;
             CREATE USER '{APP_USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{APP_PASSWORD}');
             GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'%';
             CREATE USER '{OTHER_USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{OTHER_PASSWORD}');
             GRANT ALL PRIVILEGES ON *.* TO '{OTHER_USER}'@'%';
             CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4;"
        ))
        .map(drop)
    }

    /// Runs SQL as root over the unix socket with the `mariadb` client, in
    /// batch mode; returns its standard output.
    pub fn run_sql(&self, sql: &str) -> Result<String, MariaDbError> {
        let output = Command::new(client_binary())
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .arg("--user=root")
            .arg("--batch")
            .arg("--skip-column-names")
            .arg("-e")
            .arg(sql)
            .output()
            .map_err(|source| MariaDbError::Spawn {
                program: client_binary(),
                source,
            })?;
        if !output.status.success() {
            return Err(MariaDbError::Sql {
                sql: sql.to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The server's SQL address on 127.0.0.1.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The temp dir holding the datadir, certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificates the server presents.
    pub fn certs(&self) -> &CertFiles {
        &self.certs
    }

    /// The last lines of the server's error log (for failure messages).
    pub fn error_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        self.watchdog_stdin = None;
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Paths of the server binaries.
struct Binaries {
    mariadbd: PathBuf,
    install_db: PathBuf,
}

impl Binaries {
    fn find() -> Option<Binaries> {
        Some(Binaries {
            mariadbd: find_program("mariadbd")?,
            install_db: find_program("mariadb-install-db")?,
        })
        .filter(|_| find_program("mariadb").is_some())
    }

    fn find_or_install() -> Result<Binaries, MariaDbError> {
        if let Some(bin) = Self::find() {
            return Ok(bin);
        }
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        let apt = |args: &[&str]| -> Result<(), MariaDbError> {
            let mut cmd = if as_root {
                Command::new("apt-get")
            } else {
                let mut sudo = Command::new("sudo");
                sudo.arg("apt-get");
                sudo
            };
            let output = cmd
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .map_err(|source| MariaDbError::Spawn {
                    program: "apt-get".into(),
                    source,
                })?;
            if output.status.success() {
                Ok(())
            } else {
                Err(MariaDbError::Install {
                    output: String::from_utf8_lossy(&output.stderr).into_owned(),
                })
            }
        };
        apt(&["update", "-qq"])?;
        apt(&["install", "-y", "-qq", "mariadb-server", "mariadb-client"])?;
        Self::find().ok_or(MariaDbError::Install {
            output:
                "apt-get succeeded but mariadbd, mariadb-install-db or mariadb is still missing"
                    .into(),
        })
    }
}

/// The `mariadb` command-line client.
pub fn client_binary() -> PathBuf {
    find_program("mariadb").unwrap_or_else(|| "mariadb".into())
}

/// Looks a program up in `PATH` and the sbin directories root's `PATH` has.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True once the server sends a protocol-10 initial handshake.
fn greets(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && head[4] == 10
}

/// Why the test MariaDB could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MariaDbError {
    /// apt-get failed to install the server packages.
    #[error(
        "installing mariadb-server and mariadb-client with apt-get failed (needs root or sudo): {output}"
    )]
    Install { output: String },
    /// A program could not be started at all.
    #[error("starting {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The temp dir could not be made.
    #[error("creating a temp dir for the datadir: {0}")]
    TempDir(std::io::Error),
    /// No free loopback port could be found.
    #[error("finding a free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    /// Waiting on the server process failed.
    #[error("waiting on mariadbd: {0}")]
    Wait(std::io::Error),
    /// mariadb-install-db failed.
    #[error("mariadb-install-db exited with {status}:\n{output}")]
    InstallDb { status: ExitStatus, output: String },
    /// mariadbd exited before accepting connections.
    #[error(
        "mariadbd exited with {status} before accepting connections; error log tail:\n{log_tail}"
    )]
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    /// mariadbd did not accept connections in time.
    #[error("mariadbd did not accept connections within {waited:?}; error log tail:\n{log_tail}")]
    StartupTimeout { waited: Duration, log_tail: String },
    /// Setup SQL failed.
    #[error("running `{sql}` as root failed: {stderr}")]
    Sql { sql: String, stderr: String },
    /// The test certificates could not be made.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
}
