//! Runs one scenario twice, directly against MariaDB and through the proxy,
//! each time on a freshly created database, and fails with the first
//! difference between the two transcripts.
//!
//! Set `CONFORMANCE_DUMP=<dir>` to get both transcripts of every scenario
//! written there as `<name>.direct.txt` and `<name>.proxied.txt`.
//!
//! The direct run is checked first: a step expected to succeed that failed
//! there is a bug in the scenario or the harness, reported as such rather
//! than as a proxy difference.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, SslOpts};

use crate::mariadb::{APP_PASSWORD, APP_USER, MariaDb};
use crate::outcome::Transcript;
use crate::proxy::{Proxy, ProxyOptions};
use crate::session::Session;

/// The client-side max_allowed_packet (the server runs with 64M too).
pub const MAX_ALLOWED_PACKET: usize = 64 * 1024 * 1024;

/// How long one run of a scenario may take before it counts as hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Which path a run takes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Straight to MariaDB.
    Direct,
    /// Through the proxy.
    Proxied,
}

/// Where a scenario run connects, and how.
#[derive(Debug, Clone)]
pub struct Target {
    /// Direct or proxied.
    pub side: Side,
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// The scenario's database, created empty before the run.
    pub database: String,
    /// Whether clients use TLS to `addr`.
    pub tls: bool,
}

impl Target {
    /// Connection options for [`APP_USER`] on the scenario database.
    pub fn opts(&self) -> OptsBuilder {
        self.opts_as(APP_USER, APP_PASSWORD)
    }

    /// Connection options for another user or password.
    pub fn opts_as(&self, user: &str, password: &str) -> OptsBuilder {
        let opts = OptsBuilder::default()
            .ip_or_hostname(self.addr.ip().to_string())
            .tcp_port(self.addr.port())
            .user(Some(user))
            .pass(Some(password))
            .db_name(Some(self.database.clone()))
            // mysql_async would otherwise switch to MariaDB's unix socket
            // behind the proxy's back.
            .prefer_socket(false)
            .max_allowed_packet(Some(MAX_ALLOWED_PACKET));
        if self.tls {
            // The proxy's auto-certs are self-signed: no verification on
            // either side, so both runs do the same handshake.
            opts.ssl_opts(
                SslOpts::default()
                    .with_danger_accept_invalid_certs(true)
                    .with_danger_skip_domain_validation(true),
            )
        } else {
            opts
        }
    }

    /// A recording session of [`APP_USER`]; the connect must succeed.
    pub async fn session(&self, name: &str) -> Session {
        Session::connect(name, self.opts()).await
    }
}

/// One scenario's name and the proxy features it needs.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Also the database name (prefixed `cf_`): letters, digits, `_`.
    pub name: &'static str,
    /// What the proxy's config turns on.
    pub proxy: ProxyOptions,
    /// Clients use TLS (to MariaDB directly, to the proxy when proxied).
    pub client_tls: bool,
}

impl Scenario {
    /// A plain scenario: no TLS anywhere.
    pub fn new(name: &'static str) -> Scenario {
        Scenario {
            name,
            proxy: ProxyOptions::default(),
            client_tls: false,
        }
    }

    /// Clients connect with TLS; the proxy serves its auto-certs.
    pub fn with_client_tls(mut self) -> Scenario {
        self.client_tls = true;
        self.proxy.client_tls = true;
        self
    }

    /// The proxy must reach MariaDB over TLS.
    pub fn with_backend_tls(mut self) -> Scenario {
        self.proxy.backend_tls = true;
        self
    }

    fn database(&self) -> String {
        format!("cf_{}", self.name)
    }
}

/// Runs `run` directly and through a proxy started for this run, and panics
/// with a diff if the transcripts differ. Returns both transcripts.
pub async fn compare<F, Fut>(mariadb: &MariaDb, scenario: Scenario, run: F) -> [Transcript; 2]
where
    F: Fn(Target) -> Fut,
    Fut: Future<Output = Transcript>,
{
    let name = scenario.name;
    let mut target = Target {
        side: Side::Direct,
        addr: mariadb.addr(),
        database: scenario.database(),
        tls: scenario.client_tls,
    };

    recreate_database(mariadb, &target.database).await;
    let direct = timed(name, Side::Direct, run(target.clone())).await;
    let problems = direct.unexpected_errors();
    assert!(
        problems.is_empty(),
        "scenario {name}: the direct run itself failed, so the scenario or harness is wrong:\n{}",
        problems.join("\n")
    );

    recreate_database(mariadb, &target.database).await;
    let proxy = Proxy::start(mariadb.addr(), scenario.proxy)
        .await
        .unwrap_or_else(|err| panic!("scenario {name}: {err}"));
    target.side = Side::Proxied;
    target.addr = proxy.sql_addr();
    let proxied = timed(name, Side::Proxied, run(target)).await;
    proxy.shutdown().await;

    if let Some(dir) = std::env::var_os("CONFORMANCE_DUMP") {
        let dir = std::path::PathBuf::from(dir);
        for (side, transcript) in [("direct", &direct), ("proxied", &proxied)] {
            let path = dir.join(format!("{name}.{side}.txt"));
            if let Err(err) = std::fs::write(&path, format!("{transcript:#?}")) {
                eprintln!("writing {}: {err}", path.display());
            }
        }
    }
    if let Some(diff) = direct.difference(&proxied) {
        panic!(
            "scenario {name}: the proxied run differs from the direct run ({} vs {} steps)\n{diff}",
            direct.steps.len(),
            proxied.steps.len()
        );
    }
    [direct, proxied]
}

async fn timed(name: &str, side: Side, run: impl Future<Output = Transcript>) -> Transcript {
    tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("scenario {name}: the {side:?} run hung for {RUN_TIMEOUT:?}"))
}

/// Root's options on the server itself (root@127.0.0.1 has no password).
pub fn admin_opts(mariadb: &MariaDb) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(mariadb.port())
        .user(Some("root"))
        .prefer_socket(false)
}

/// Drops and creates `database`, so both runs start from the same state.
pub async fn recreate_database(mariadb: &MariaDb, database: &str) {
    let result = async {
        let mut conn = Conn::new(admin_opts(mariadb)).await?;
        conn.query_drop(format!(
            "DROP DATABASE IF EXISTS `{database}`; CREATE DATABASE `{database}` CHARACTER SET utf8mb4"
        ))
        .await?;
        conn.disconnect().await
    }
    .await;
    if let Err(err) = result {
        panic!(
            "recreating database {database} as root: {err}\nMariaDB error log tail:\n{}",
            mariadb.error_log_tail()
        );
    }
}
