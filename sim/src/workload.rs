//! A simulated client session: connects through the proxy with
//! [`RawClient`], sets up session state, runs its seed-drawn mix of
//! operations, and checks what it is told against what it expects.
//!
//! Checks made here, as the run goes: no error unless the scenario makes it
//! unavoidable, and never a hang (invariant 1); the ledger of reported
//! commits (checked against the store at the end, invariant 2); the TiDB
//! identity at both ends of every transaction (3); the session state after
//! every move the client notices, and at random (4); where the session is
//! at the end of its workload (5).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turmoil::net::TcpStream;

use crate::scenario::SessionPlan;
use crate::tidb::Value;
use crate::tidb::client::{ClientError, ConnectOptions, Credential, QueryResult, RawClient};
use crate::world::{Invariant, World, now};

/// Longest a client waits for one answer before calling it a hang.
pub const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// Keys of session `s` are `s * KEY_SPACE + n`.
pub const KEY_SPACE: i64 = 1_000_000;

/// The proxy's SQL address in the simulation.
pub const PROXY_ADDR: &str = "proxy:6000";

/// When sessions leave (after the end checks).
pub const QUIT_AFTER_END: Duration = Duration::from_secs(3);

/// The connection broke (already recorded); the session reconnects.
#[derive(Debug)]
struct Broken;

/// What the session should see.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    /// `@v`.
    v: String,
    /// `@n`.
    n: i64,
    /// The binary prepared statement's id.
    stmt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Increment,
    Transaction,
    UserVar,
    StateCheck,
    Prepared,
    Idle,
    Reconnect,
    Scan,
}

/// One client session.
#[derive(Debug)]
pub struct ClientSession {
    plan: SessionPlan,
    world: Arc<World>,
    rng: StdRng,
    client: Option<RawClient<TcpStream>>,
    /// The proxy's connection id (from its greeting).
    conn: Option<u32>,
    /// When the running operation began.
    op_started: Duration,
    /// An operation is running.
    in_op: bool,
    expected: Option<Expected>,
    /// (`@@hostname`, `CONNECTION_ID()`) last seen on this connection.
    identity: Option<(String, String)>,
    /// Next key number.
    seq: i64,
    /// Connections made.
    generation: u32,
}

fn summary(r: &QueryResult) -> String {
    if r.columns.is_empty() {
        return format!("ok affected={}", r.affected_rows);
    }
    let rows: Vec<String> = r
        .rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|c| c.as_deref().unwrap_or("NULL"))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    match rows.as_slice() {
        // Long result sets: enough to tell runs apart, short enough to read.
        [first, .., last] if rows.len() > 4 => {
            format!("[{} rows: {first}; ..; {last}]", rows.len())
        }
        _ => format!("[{}]", rows.join("; ")),
    }
}

impl ClientSession {
    /// A session that runs `plan`.
    pub fn new(plan: SessionPlan, world: Arc<World>) -> Self {
        let seed =
            world.scenario.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(plan.id as u64 + 1));
        Self {
            plan,
            world,
            rng: StdRng::seed_from_u64(seed),
            client: None,
            conn: None,
            op_started: Duration::ZERO,
            in_op: false,
            expected: None,
            identity: None,
            seq: 0,
            generation: 0,
        }
    }

    fn event(&self, what: impl std::fmt::Display) {
        self.world
            .event(now(), format_args!("s{} {what}", self.plan.id));
    }

    fn violation(&self, inv: Invariant, msg: impl std::fmt::Display) {
        self.world
            .violation(inv, now(), format!("session s{}: {msg}", self.plan.id));
    }

    /// Runs the session to its end.
    pub async fn run(mut self) {
        while !self.world.is_set_up() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sleep_until(self.plan.start).await;
        let end = self.world.scenario.workload_end;
        while now() < end {
            if self.client.is_none() && self.connect().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let op = self.pick();
            // The world hears which sessions are mid-operation: one with a
            // statement in flight when its TiDB breaks cannot be restored.
            let conn = self.conn;
            self.in_op = true;
            self.world.op_running(conn, true);
            let _ = self.operation(op).await;
            self.in_op = false;
            self.world.op_running(conn, false);
            self.world.op_running(self.conn, false);
            let think = self
                .rng
                .random_range(0..=self.plan.think_max.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
        self.finish().await;
    }

    fn pick(&mut self) -> Op {
        let m = self.plan.mix;
        let mut x = self.rng.random_range(0..m.total());
        for (w, op) in [
            (m.insert, Op::Insert),
            (m.increment, Op::Increment),
            (m.transaction, Op::Transaction),
            (m.user_var, Op::UserVar),
            (m.state_check, Op::StateCheck),
            (m.prepared, Op::Prepared),
            (m.idle, Op::Idle),
            (m.scan, Op::Scan),
            (m.reconnect, Op::Reconnect),
        ] {
            if x < w {
                return op;
            }
            x -= w;
        }
        Op::Idle
    }

    /// Records a failed request: unavoidable, or a violation. The
    /// connection is dropped either way.
    fn failed(&mut self, what: &str, e: &ClientError) {
        self.failed_since(what, e, None);
    }

    /// A failure; for a connect, `started` is when it began.
    fn failed_since(&mut self, what: &str, e: &ClientError, started: Option<Duration>) {
        let at = now();
        let clean = !matches!(e, ClientError::Protocol(_));
        let protected = self
            .world
            .protected_error_allowed(self.conn, at, self.op_started);
        let allowed = protected.unwrap_or_else(|| {
            self.world.error_allowed(self.conn, at)
                || started.is_some_and(|t| self.world.connect_was_doomed(t))
        });
        if clean && allowed {
            self.world.allowed_error();
            self.event(format_args!("{what} -> unavoidable error: {e}"));
        } else if clean && protected == Some(false) {
            self.violation(
                Invariant::ProtectedSurvives,
                format_args!(
                    "{what} failed: {e} (proxy connection {:?}, protected when its TiDB broke)",
                    self.conn
                ),
            );
        } else {
            self.violation(
                Invariant::NoClientError,
                format_args!("{what} failed: {e} (proxy connection {:?})", self.conn),
            );
        }
        self.client = None;
        self.conn = None;
        self.expected = None;
        self.identity = None;
    }

    fn hung(&mut self, what: &str) {
        self.violation(
            Invariant::NoClientError,
            format_args!("{what}: no answer within {OP_TIMEOUT:?} (a hang)"),
        );
        self.client = None;
        self.conn = None;
        self.expected = None;
        self.identity = None;
    }

    async fn query(&mut self, sql: &str) -> Result<QueryResult, Broken> {
        let c = self.client.as_mut().ok_or(Broken)?;
        self.world.op();
        match tokio::time::timeout(OP_TIMEOUT, c.query(sql)).await {
            Ok(Ok(r)) => {
                self.event(format_args!("{sql} -> {}", summary(&r)));
                Ok(r)
            }
            Ok(Err(e)) => {
                self.failed(sql, &e);
                Err(Broken)
            }
            Err(_) => {
                self.hung(sql);
                Err(Broken)
            }
        }
    }

    async fn execute(&mut self, id: u32, param: Value) -> Result<QueryResult, Broken> {
        let c = self.client.as_mut().ok_or(Broken)?;
        self.world.op();
        let what = format!("EXECUTE stmt {id} ({param:?})");
        match tokio::time::timeout(OP_TIMEOUT, c.execute(id, &[param])).await {
            Ok(Ok(r)) => {
                self.event(format_args!("{what} -> {}", summary(&r)));
                Ok(r)
            }
            Ok(Err(e)) => {
                self.failed(&what, &e);
                Err(Broken)
            }
            Err(_) => {
                self.hung(&what);
                Err(Broken)
            }
        }
    }

    async fn connect(&mut self) -> Result<(), Broken> {
        self.generation += 1;
        let at = now();
        let stream = match tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(PROXY_ADDR)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.failed("connect", &ClientError::Io(e));
                return Err(Broken);
            }
            Err(_) => {
                self.hung("connect");
                return Err(Broken);
            }
        };
        let password = match self.plan.user {
            "sha2user" => "sha2-Pa55word",
            _ => "app-Pa55word",
        };
        let opts = ConnectOptions {
            user: self.plan.user.to_string(),
            credential: Credential::Password(password.to_string()),
            database: Some(self.database().to_string()),
            deprecate_eof: self.plan.deprecate_eof,
            multi_statements: true,
            plugin: None,
        };
        match tokio::time::timeout(OP_TIMEOUT, RawClient::connect(stream, &opts)).await {
            Ok(Ok(c)) => {
                self.conn = Some(c.connection_id);
                // A reconnect inside an operation: the new session is
                // mid-operation too (seed 4200724: its setup's
                // COM_STMT_PREPARE was in flight at a crash).
                if self.in_op {
                    self.world.op_running(self.conn, true);
                }
                self.client = Some(c);
            }
            Ok(Err(e)) => {
                self.failed_since("login", &e, Some(at));
                return Err(Broken);
            }
            Err(_) => {
                self.hung("login");
                return Err(Broken);
            }
        }
        self.event(format_args!(
            "connected (#{}) as {} after {}ms",
            self.generation,
            self.plan.user,
            (now() - at).as_millis()
        ));
        // Session state that every move must carry.
        let id = self.plan.id;
        let v = format!("s{id}-c{}", self.generation);
        self.query(&format!("SET @v = '{v}', @n = 0")).await?;
        self.query(&format!("SET SESSION group_concat_max_len = {}", 1000 + id))
            .await?;
        self.query(&format!("PREPARE p FROM 'SELECT ? + {id}'"))
            .await?;
        let c = self.client.as_mut().ok_or(Broken)?;
        let sql = format!("SELECT CONCAT(?, '-s{id}')");
        let stmt = match tokio::time::timeout(OP_TIMEOUT, c.prepare(&sql)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.failed("COM_STMT_PREPARE", &e);
                return Err(Broken);
            }
            Err(_) => {
                self.hung("COM_STMT_PREPARE");
                return Err(Broken);
            }
        };
        self.event(format_args!("prepared {sql} as stmt {}", stmt.id));
        self.expected = Some(Expected {
            v,
            n: 0,
            stmt: stmt.id,
        });
        Ok(())
    }

    fn database(&self) -> &'static str {
        if self.plan.use_db { "sim" } else { "test" }
    }

    fn next_key(&mut self) -> i64 {
        self.seq += 1;
        self.plan.id as i64 * KEY_SPACE + self.seq
    }

    /// Reads the TiDB identity; notes a move when it changed on the same
    /// connection. Returns it and whether it moved.
    async fn identity(&mut self) -> Result<((String, String), bool), Broken> {
        let r = self.query("SELECT @@hostname, CONNECTION_ID()").await?;
        let row = r.rows.first().cloned().unwrap_or_default();
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let id = (get(0), get(1));
        let moved = self.identity.as_ref().is_some_and(|old| *old != id);
        if moved {
            self.world.moved();
            self.event(format_args!(
                "moved: {:?} -> {:?}",
                self.identity.as_ref().map(|x| &x.0),
                id.0
            ));
        }
        self.identity = Some(id.clone());
        Ok((id, moved))
    }

    async fn operation(&mut self, op: Op) -> Result<(), Broken> {
        self.op_started = now();
        match op {
            Op::Insert => {
                let k = self.next_key();
                let r = self
                    .query(&format!(
                        "INSERT INTO sim.kv (id, s, v) VALUES ({k}, {}, 'auto')",
                        self.plan.id
                    ))
                    .await;
                self.world.ledger(|l| match &r {
                    Ok(_) => l.committed.insert(k),
                    Err(_) => l.unknown.insert(k),
                });
                r.map(|_| ())
            }
            Op::Increment => {
                let id = self.plan.id;
                let r = self
                    .query(&format!(
                        "UPDATE sim.counters SET n = n + 1 WHERE id = {id}"
                    ))
                    .await;
                match &r {
                    Ok(q) if q.affected_rows != 1 => self.violation(
                        Invariant::CommitsExactlyOnce,
                        format_args!("an increment matched {} rows, not 1", q.affected_rows),
                    ),
                    _ => {}
                }
                self.world.ledger(|l| {
                    let e = l.increments.entry(id).or_default();
                    match &r {
                        Ok(_) => e.0 += 1,
                        Err(_) => e.1 += 1,
                    }
                });
                r.map(|_| ())
            }
            Op::Transaction => self.transaction().await,
            Op::UserVar => {
                let n = self.rng.random_range(1..1_000_000i64);
                let v = format!("s{}-v{n}", self.plan.id);
                self.query(&format!("SET @v = '{v}', @n = {n}")).await?;
                if let Some(e) = self.expected.as_mut() {
                    e.v = v;
                    e.n = n;
                }
                self.after_move_check().await
            }
            Op::StateCheck => self.state_check().await,
            Op::Prepared => {
                let Some(e) = self.expected.clone() else {
                    return Err(Broken);
                };
                let k = self.rng.random_range(0..1000);
                let r = self.execute(e.stmt, Value::Str(format!("p{k}"))).await?;
                let want = format!("p{k}-s{}", self.plan.id);
                if r.scalar().as_deref() != Some(want.as_str()) {
                    self.violation(
                        Invariant::SessionStateKept,
                        format_args!(
                            "prepared statement {} returned {:?}, expected {want:?}",
                            e.stmt,
                            r.scalar()
                        ),
                    );
                }
                Ok(())
            }
            Op::Scan => self.scan().await,
            Op::Reconnect => {
                if let Some(c) = self.client.take() {
                    self.world.op();
                    // COM_QUIT has no answer; the proxy closes both legs.
                    if let Ok(Err(e)) = tokio::time::timeout(OP_TIMEOUT, c.quit()).await {
                        self.event(format_args!("quit: {e}"));
                    }
                    self.event("quit to reconnect");
                }
                self.conn = None;
                self.expected = None;
                self.identity = None;
                self.connect().await
            }
            Op::Idle => {
                let left = self.world.scenario.workload_end.saturating_sub(now());
                let ms = self.rng.random_range(100..2_000u64);
                tokio::time::sleep(Duration::from_millis(ms).min(left)).await;
                Ok(())
            }
        }
    }

    /// Reads back every key of this session: each insert it was told
    /// committed must be there, none it was told failed (invariant 2, as
    /// the run goes; a long result set too).
    async fn scan(&mut self) -> Result<(), Broken> {
        let lo = self.plan.id as i64 * KEY_SPACE;
        let hi = lo + KEY_SPACE;
        // What the client knew before asking: commits reported later may or
        // may not be seen.
        let (committed, failed) = self.world.ledger(|l| {
            (
                l.committed.range(lo..hi).copied().collect::<Vec<_>>(),
                l.failed.range(lo..hi).copied().collect::<Vec<_>>(),
            )
        });
        let r = self
            .query(&format!(
                "SELECT id, v FROM sim.kv WHERE id >= {lo} AND id < {hi} ORDER BY id"
            ))
            .await?;
        let seen: std::collections::BTreeSet<i64> = r
            .rows
            .iter()
            .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
            .collect();
        if let Some(k) = committed.iter().find(|k| !seen.contains(k)) {
            self.violation(
                Invariant::CommitsExactlyOnce,
                format_args!(
                    "key {k} was reported committed but a later read does not see it ({} rows read)",
                    seen.len()
                ),
            );
        }
        if let Some(k) = failed.iter().find(|k| seen.contains(k)) {
            self.violation(
                Invariant::CommitsExactlyOnce,
                format_args!("key {k} was reported failed or rolled back but a read sees it"),
            );
        }
        Ok(())
    }

    /// Checks the whole state when the identity shows a move.
    async fn after_move_check(&mut self) -> Result<(), Broken> {
        let (_, moved) = self.identity().await?;
        if moved {
            self.state_check().await?;
        }
        Ok(())
    }

    async fn transaction(&mut self) -> Result<(), Broken> {
        let k1 = self.next_key();
        let k2 = self.next_key();
        let two = self.rng.random_bool(0.5);
        let commit = self.rng.random_bool(0.7);
        let keys: Vec<i64> = if two { vec![k1, k2] } else { vec![k1] };
        let fail = |s: &Self| s.world.ledger(|l| l.failed.extend(keys.iter().copied()));
        let body = async {
            let r = self.query("BEGIN").await?;
            if !r.status.contains(tiproxy_core::StatusFlags::IN_TRANS) {
                self.violation(Invariant::TxnOnOneTidb, "BEGIN answered without IN_TRANS");
            }
            let (first, _) = self.identity().await?;
            self.query(&format!(
                "INSERT INTO sim.kv (id, s, v) VALUES ({k1}, {}, 'txn')",
                self.plan.id
            ))
            .await?;
            let r = self
                .query(&format!("SELECT id FROM sim.kv WHERE id = {k1}"))
                .await?;
            if r.rows.len() != 1 {
                self.violation(
                    Invariant::TxnOnOneTidb,
                    format_args!("the transaction does not see its own insert of {k1}"),
                );
            }
            if two {
                self.query(&format!(
                    "INSERT INTO sim.kv (id, s, v) VALUES ({k2}, {}, 'txn')",
                    self.plan.id
                ))
                .await?;
            }
            let (last, _) = self.identity().await?;
            if first != last {
                self.violation(
                    Invariant::TxnOnOneTidb,
                    format_args!("a transaction began on {first:?} and continued on {last:?}"),
                );
            }
            Ok::<(), Broken>(())
        };
        if body.await.is_err() {
            // The connection broke before COMMIT: the transaction died with it.
            fail(self);
            return Err(Broken);
        }
        if commit {
            let r = self.query("COMMIT").await;
            self.world.ledger(|l| match &r {
                Ok(_) => l.committed.extend(keys.iter().copied()),
                Err(_) => l.unknown.extend(keys.iter().copied()),
            });
            r?;
        } else {
            let r = self.query("ROLLBACK").await;
            fail(self);
            r?;
        }
        if self
            .client
            .as_ref()
            .is_some_and(|c| c.status.contains(tiproxy_core::StatusFlags::IN_TRANS))
        {
            self.violation(
                Invariant::TxnOnOneTidb,
                "still IN_TRANS after the transaction ended",
            );
        }
        Ok(())
    }

    /// Reads every piece of session state and compares.
    async fn state_check(&mut self) -> Result<(), Broken> {
        let Some(e) = self.expected.clone() else {
            return Err(Broken);
        };
        let r = self
            .query("SELECT @v, @n, DATABASE(), @@group_concat_max_len")
            .await?;
        let row = r.rows.first().cloned().unwrap_or_default();
        let got: Vec<String> = row
            .iter()
            .map(|c| c.clone().unwrap_or_else(|| "NULL".into()))
            .collect();
        let want = vec![
            e.v.clone(),
            e.n.to_string(),
            self.database().to_string(),
            (1000 + self.plan.id).to_string(),
        ];
        if got != want {
            self.violation(
                Invariant::SessionStateKept,
                format_args!(
                    "@v, @n, DATABASE(), @@group_concat_max_len are {got:?}, expected {want:?}"
                ),
            );
        }
        let r = self.query("EXECUTE p USING @n").await?;
        let want = (e.n + self.plan.id as i64).to_string();
        if r.scalar().as_deref() != Some(want.as_str()) {
            self.violation(
                Invariant::SessionStateKept,
                format_args!(
                    "EXECUTE p USING @n returned {:?}, expected {want}",
                    r.scalar()
                ),
            );
        }
        let r = self.execute(e.stmt, Value::Str("chk".into())).await?;
        let want = format!("chk-s{}", self.plan.id);
        if r.scalar().as_deref() != Some(want.as_str()) {
            self.violation(
                Invariant::SessionStateKept,
                format_args!(
                    "prepared statement {} returned {:?}, expected {want:?}",
                    e.stmt,
                    r.scalar()
                ),
            );
        }
        self.identity().await?;
        Ok(())
    }

    /// The end of the workload: check the state once more, report where
    /// the session is, stay connected for the leak check, then leave.
    async fn finish(&mut self) {
        let deadline = self.world.scenario.workload_end + Duration::from_secs(1);
        while now() < deadline {
            if self.client.is_none() && self.connect().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if self.state_check().await.is_err() {
                continue;
            }
            if let Some((host, _)) = &self.identity {
                match host.parse::<IpAddr>() {
                    Ok(ip) => self.world.final_home(self.plan.id, ip),
                    Err(_) => self.violation(
                        Invariant::Liveness,
                        format_args!("@@hostname {host:?} is not an address"),
                    ),
                }
            }
            break;
        }
        sleep_until(self.world.scenario.workload_end + QUIT_AFTER_END).await;
        if let Some(c) = self.client.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.quit()).await;
            self.event("quit");
        }
    }
}

/// Sleeps until simulated time `t` on this host.
pub async fn sleep_until(t: Duration) {
    let n = now();
    if t > n {
        tokio::time::sleep(t - n).await;
    }
}
