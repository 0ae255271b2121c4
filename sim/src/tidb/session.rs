//! One TiDB session: its variables, current database, transaction and
//! prepared statements, and the executor of the SQL subset over the
//! cluster's store. Wire formats live in `conn`; this module only sees
//! values and statements.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tiproxy_core::StatusFlags;

use super::cluster::Cluster;
use super::error::SqlError;
use super::server::Instance;
use super::sql::{
    BinOp, Delete, Expr, Insert, Parsed, PrepareSource, Select, SelectItem, SetItem, Stmt,
    TableName, Update, bare_column, is_aggregate, parse,
};
use super::store::{Locking, Row, TableSchema, Txn};
use super::sysvar::{self, Scope};
use super::time::format_datetime;
use super::value::{BINARY_COLLATION, UTF8MB4_BIN, Value, column_flag, column_type};

mod join;
mod query;

/// How many times an autocommit statement is retried after a write conflict.
const AUTOCOMMIT_RETRIES: usize = 10;

/// A result column's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Schema (database).
    pub db: String,
    /// Table (alias).
    pub table: String,
    /// Table.
    pub org_table: String,
    /// Column name (alias).
    pub name: String,
    /// Column name.
    pub org_name: String,
    /// Collation id.
    pub charset: u16,
    /// Display length.
    pub length: u32,
    /// Column type.
    pub ty: u8,
    /// Flags.
    pub flags: u16,
    /// Decimals.
    pub decimals: u8,
}

impl Column {
    /// An expression column named `name` whose type comes from `sample`.
    pub fn expr(name: &str, sample: &Value) -> Self {
        let (ty, flags) = sample.column_type();
        let (charset, length, decimals) = match ty {
            column_type::VAR_STRING => (UTF8MB4_BIN, 1024, 0),
            column_type::DOUBLE => (BINARY_COLLATION, 22, 31),
            column_type::NULL => (BINARY_COLLATION, 0, 0),
            _ => (BINARY_COLLATION, 21, 0),
        };
        Self {
            db: String::new(),
            table: String::new(),
            org_table: String::new(),
            name: name.to_string(),
            org_name: String::new(),
            charset,
            length,
            ty,
            flags,
            decimals,
        }
    }

    /// A text column of a SHOW statement.
    pub fn text(name: &str) -> Self {
        Self::expr(name, &Value::Str(String::new()))
    }

    /// A JSON column (SHOW SESSION_STATES).
    pub fn json(name: &str) -> Self {
        Self {
            charset: BINARY_COLLATION,
            length: u32::MAX,
            ty: column_type::JSON,
            flags: column_flag::BINARY | column_flag::BLOB,
            decimals: 0,
            ..Self::text(name)
        }
    }

    /// A column of a table.
    pub fn of_table(schema: &TableSchema, i: usize, alias: Option<&str>) -> Self {
        let c = &schema.columns[i];
        let (ty, flags, length, charset) = c.wire_type(i == schema.pk);
        Self {
            db: schema.db.clone(),
            table: schema.name.clone(),
            org_table: schema.name.clone(),
            // A join's columns are named `q.c`; the client sees `c`.
            name: alias.unwrap_or(bare_column(&c.name)).to_string(),
            org_name: bare_column(&c.name).to_string(),
            charset,
            length,
            ty,
            flags,
            decimals: if ty == column_type::DOUBLE { 31 } else { 0 },
        }
    }
}

/// Rows to send.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultSet {
    /// Column definitions.
    pub columns: Vec<Column>,
    /// Rows, one value per column.
    pub rows: Vec<Vec<Value>>,
}

/// What a statement produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An OK packet.
    Ok {
        /// Affected rows.
        affected_rows: u64,
        /// Last insert id.
        last_insert_id: u64,
        /// Info text.
        info: String,
    },
    /// A result set.
    Rows(ResultSet),
}

impl Output {
    fn ok() -> Self {
        Output::Ok {
            affected_rows: 0,
            last_insert_id: 0,
            info: String::new(),
        }
    }
}

/// A prepared statement, from COM_STMT_PREPARE or PREPARE.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Statement id.
    pub id: u32,
    /// Name, for text-protocol statements.
    pub name: Option<String>,
    /// Database current when prepared: unqualified tables resolve there.
    pub db: String,
    /// Parsed statement.
    pub parsed: Arc<Parsed>,
    /// Parameter types of the last binary execute (2 bytes each).
    pub param_types: Vec<u8>,
    /// COM_STMT_SEND_LONG_DATA chunks per parameter, until the next execute.
    pub long_data: BTreeMap<u16, Vec<u8>>,
}

/// A session.
#[derive(Debug)]
pub struct Session {
    pub(super) cluster: Arc<Cluster>,
    pub(super) instance: Arc<Instance>,
    /// Connection id.
    pub conn_id: u64,
    /// Authenticated user.
    pub user: String,
    /// Client host (IP).
    pub host: String,
    /// Current database, empty for none.
    pub db: String,
    /// Whether the client set CLIENT_FOUND_ROWS (UPDATE reports matched rows).
    pub found_rows_flag: bool,
    pub(super) sys_vars: BTreeMap<&'static str, String>,
    pub(super) user_vars: BTreeMap<String, Value>,
    pub(super) txn: Option<Txn>,
    pub(super) prepared: BTreeMap<u32, Prepared>,
    pub(super) last_stmt_id: u32,
    pub(super) last_insert_id: u64,
    pub(super) found_rows: u64,
    pub(super) affected_rows: i64,
    /// Time requested by SLEEP() in the last statement; the connection
    /// waits it out before answering.
    pub sleep: Duration,
    /// Set when the last statement met another transaction's lock: the
    /// connection waits on it and runs the statement again.
    pub lock_wait: Option<LockWait>,
}

/// A statement waiting for a lock (see [`Session::lock_wait`]).
#[derive(Debug)]
pub struct LockWait {
    /// Changes when any lock is released.
    pub rx: super::store::ReleaseWatch,
    /// The waiting transaction.
    pub txn_id: u64,
}

/// Per-statement context: bound parameters and the database unqualified
/// tables resolve in.
struct Ctx<'a> {
    params: &'a [Value],
    db: String,
}

impl Session {
    /// A new session for `user` on `instance`.
    pub(super) fn new(instance: Arc<Instance>, conn_id: u64, user: &str, host: &str) -> Self {
        Self {
            cluster: Arc::clone(&instance.cluster),
            instance,
            conn_id,
            user: user.to_string(),
            host: host.to_string(),
            db: String::new(),
            found_rows_flag: false,
            sys_vars: BTreeMap::new(),
            user_vars: BTreeMap::new(),
            txn: None,
            prepared: BTreeMap::new(),
            last_stmt_id: 0,
            last_insert_id: 0,
            found_rows: 0,
            affected_rows: 0,
            sleep: Duration::ZERO,
            lock_wait: None,
        }
    }

    /// COM_RESET_CONNECTION: everything but the user and database.
    pub fn reset(&mut self) {
        self.txn = None;
        self.sys_vars.clear();
        self.user_vars.clear();
        self.prepared.clear();
        self.last_insert_id = 0;
        self.found_rows = 0;
        self.affected_rows = 0;
    }

    /// Whether a transaction is open.
    pub fn in_txn(&self) -> bool {
        self.txn.is_some()
    }

    /// The session's value of a system variable.
    pub fn sys_var(&self, name: &str) -> Option<String> {
        let v = sysvar::lookup(name)?;
        if let Some(s) = self.sys_vars.get(v.name) {
            return Some(s.clone());
        }
        Some(
            self.cluster
                .global_var(v.name)
                .unwrap_or_else(|| v.default.to_string()),
        )
    }

    fn autocommit(&self) -> bool {
        self.sys_var("autocommit").as_deref() != Some("OFF")
    }

    /// Whether sql_mode has NO_BACKSLASH_ESCAPES.
    pub fn no_backslash_escapes(&self) -> bool {
        self.sys_var("sql_mode")
            .is_some_and(|m| m.to_ascii_uppercase().contains("NO_BACKSLASH_ESCAPES"))
    }

    /// Status flags for OK and EOF packets.
    pub fn status(&self) -> StatusFlags {
        let mut s = StatusFlags::empty();
        if self.autocommit() {
            s |= StatusFlags::AUTOCOMMIT;
        }
        if self.txn.is_some() {
            s |= StatusFlags::IN_TRANS;
        }
        if self.no_backslash_escapes() {
            s |= StatusFlags::NO_BACKSLASH_ESCAPES;
        }
        s
    }

    /// Parses a COM_QUERY text.
    pub fn parse(&self, sql: &str) -> Result<Vec<Parsed>, SqlError> {
        parse(sql, self.no_backslash_escapes())
    }

    /// USE / COM_INIT_DB.
    pub fn use_db(&mut self, db: &str) -> Result<(), SqlError> {
        match self.cluster.store().database_name(db) {
            Some(name) => {
                self.db = name;
                Ok(())
            }
            None => Err(SqlError::unknown_db(db)),
        }
    }

    /// Executes one statement of a COM_QUERY.
    pub fn execute(&mut self, p: &Parsed) -> Result<Output, SqlError> {
        if p.params > 0 {
            return Err(SqlError::syntax("?"));
        }
        let ctx = Ctx {
            params: &[],
            db: self.db.clone(),
        };
        self.run(&p.stmt, &ctx)
    }

    // ----- prepared statements -----

    /// COM_STMT_PREPARE: the new statement's id, parameter count and
    /// result columns.
    pub fn prepare(&mut self, sql: &str) -> Result<(u32, usize, Vec<Column>), SqlError> {
        let parsed = self.parse_preparable(sql)?;
        let columns = self.describe(&parsed.stmt, &self.db.clone())?;
        let params = parsed.params;
        let id = self.add_prepared(None, parsed, Vec::new());
        Ok((id, params, columns))
    }

    fn parse_preparable(&self, sql: &str) -> Result<Parsed, SqlError> {
        let mut v = self.parse(sql)?;
        if v.len() != 1 {
            return Err(SqlError::new(
                1064,
                "42000",
                "You have an error in your SQL syntax; can not prepare multiple statements",
            ));
        }
        let p = v.remove(0);
        if matches!(
            p.stmt,
            Stmt::Prepare { .. } | Stmt::Execute { .. } | Stmt::Deallocate { .. }
        ) {
            return Err(SqlError::new(
                1295,
                "HY000",
                "This command is not supported in the prepared statement protocol yet",
            ));
        }
        Ok(p)
    }

    pub(super) fn add_prepared(
        &mut self,
        name: Option<String>,
        parsed: Parsed,
        types: Vec<u8>,
    ) -> u32 {
        self.last_stmt_id += 1;
        let id = self.last_stmt_id;
        self.prepared.insert(
            id,
            Prepared {
                id,
                name,
                db: self.db.clone(),
                parsed: Arc::new(parsed),
                param_types: types,
                long_data: BTreeMap::new(),
            },
        );
        id
    }

    /// A prepared statement by id.
    pub fn prepared(&self, id: u32) -> Option<&Prepared> {
        self.prepared.get(&id)
    }

    /// COM_STMT_CLOSE.
    pub fn close_prepared(&mut self, id: u32) {
        self.prepared.remove(&id);
    }

    /// COM_STMT_RESET: drops buffered long data. False if unknown.
    pub fn reset_prepared(&mut self, id: u32) -> bool {
        match self.prepared.get_mut(&id) {
            Some(p) => {
                p.long_data.clear();
                true
            }
            None => false,
        }
    }

    /// COM_STMT_SEND_LONG_DATA.
    pub fn send_long_data(&mut self, id: u32, param: u16, data: &[u8]) {
        if let Some(p) = self.prepared.get_mut(&id) {
            p.long_data
                .entry(param)
                .or_default()
                .extend_from_slice(data);
        }
    }

    /// Takes the long data of a statement (consumed by its execute) and
    /// records the parameter types that execute bound.
    pub fn begin_execute(&mut self, id: u32, types: Option<Vec<u8>>) -> BTreeMap<u16, Vec<u8>> {
        match self.prepared.get_mut(&id) {
            Some(p) => {
                if let Some(t) = types {
                    p.param_types = t;
                }
                std::mem::take(&mut p.long_data)
            }
            None => BTreeMap::new(),
        }
    }

    /// COM_STMT_EXECUTE with decoded parameters.
    pub fn execute_prepared(&mut self, id: u32, params: &[Value]) -> Result<Output, SqlError> {
        let Some(p) = self.prepared.get(&id) else {
            return Err(SqlError::unknown_stmt(
                &id.to_string(),
                "mysqld_stmt_execute",
            ));
        };
        if params.len() != p.parsed.params {
            return Err(SqlError::new(
                1210,
                "HY000",
                "Incorrect arguments to mysqld_stmt_execute",
            ));
        }
        let parsed = Arc::clone(&p.parsed);
        let ctx = Ctx {
            params,
            db: p.db.clone(),
        };
        self.run(&parsed.stmt, &ctx)
    }

    // ----- the executor -----

    fn run(&mut self, stmt: &Stmt, ctx: &Ctx<'_>) -> Result<Output, SqlError> {
        self.sleep = Duration::ZERO;
        let out = self.run_inner(stmt, ctx);
        match &out {
            Ok(Output::Ok { affected_rows, .. }) => self.affected_rows = *affected_rows as i64,
            Ok(Output::Rows(rs)) => {
                self.affected_rows = -1;
                self.found_rows = rs.rows.len() as u64;
            }
            Err(_) => self.affected_rows = -1,
        }
        out
    }

    fn run_inner(&mut self, stmt: &Stmt, ctx: &Ctx<'_>) -> Result<Output, SqlError> {
        match stmt {
            Stmt::Select(s) => match self.resolve_subqueries(s, ctx)? {
                Some(resolved) => self.select(&resolved, ctx).map(Output::Rows),
                None => self.select(s, ctx).map(Output::Rows),
            },
            Stmt::ShowCreateTable(t) => self.show_create_table(t, ctx).map(Output::Rows),
            Stmt::ShowProcessList { full } => Ok(Output::Rows(self.show_processlist(*full))),
            Stmt::ShowDatabases => {
                let mut rs = ResultSet {
                    columns: vec![Column::text("Database")],
                    rows: Vec::new(),
                };
                for d in self.cluster.store().databases() {
                    rs.rows.push(vec![Value::Str(d)]);
                }
                Ok(Output::Rows(rs))
            }
            Stmt::ShowTables { db, full } => {
                let db = match db {
                    Some(d) => d.clone(),
                    None if ctx.db.is_empty() => return Err(SqlError::no_db()),
                    None => ctx.db.clone(),
                };
                let tables = self.cluster.store().tables(&db)?;
                let mut columns = vec![Column::text(&format!("Tables_in_{db}"))];
                if *full {
                    columns.push(Column::text("Table_type"));
                }
                let rows = tables
                    .into_iter()
                    .map(|t| {
                        let mut r = vec![Value::Str(t)];
                        if *full {
                            r.push(Value::Str("BASE TABLE".into()));
                        }
                        r
                    })
                    .collect();
                Ok(Output::Rows(ResultSet { columns, rows }))
            }
            Stmt::ShowVariables { global, like } => {
                let mut rows = Vec::new();
                for v in sysvar::SYSVARS {
                    if let Some(p) = like
                        && !like_match(v.name, p, true)
                    {
                        continue;
                    }
                    let val = if *global {
                        self.cluster
                            .global_var(v.name)
                            .unwrap_or_else(|| v.default.to_string())
                    } else {
                        self.read_sys_var(v.name, false)?
                            .to_text()
                            .unwrap_or_default()
                    };
                    rows.push(vec![Value::Str(v.name.into()), Value::Str(val)]);
                }
                rows.sort_by(|a, b| a[0].sql_cmp(&b[0]).unwrap_or(Ordering::Equal));
                Ok(Output::Rows(ResultSet {
                    columns: vec![Column::text("Variable_name"), Column::text("Value")],
                    rows,
                }))
            }
            Stmt::ShowWarnings => Ok(Output::Rows(ResultSet {
                columns: vec![
                    Column::text("Level"),
                    Column::expr("Code", &Value::UInt(0)),
                    Column::text("Message"),
                ],
                rows: Vec::new(),
            })),
            Stmt::ShowSessionStates => self.show_session_states().map(Output::Rows),
            Stmt::SetSessionStates(json) => {
                self.import_states(json)?;
                Ok(Output::ok())
            }
            Stmt::Use(db) => {
                self.use_db(db)?;
                Ok(Output::ok())
            }
            Stmt::CreateDatabase {
                name,
                if_not_exists,
            } => {
                self.implicit_commit()?;
                self.cluster.store().create_database(name, *if_not_exists)?;
                Ok(Output::Ok {
                    affected_rows: 1,
                    last_insert_id: 0,
                    info: String::new(),
                })
            }
            Stmt::DropDatabase { name, if_exists } => {
                self.implicit_commit()?;
                self.cluster.store().drop_database(name, *if_exists)?;
                if self.db.eq_ignore_ascii_case(name) {
                    self.db.clear();
                }
                Ok(Output::ok())
            }
            Stmt::CreateTable(def) => {
                self.implicit_commit()?;
                let db = self.table_db(&def.table, ctx)?;
                self.cluster.store().create_table(&db, def)?;
                Ok(Output::ok())
            }
            Stmt::CreateIndex { table, index } => {
                self.implicit_commit()?;
                let db = self.table_db(table, ctx)?;
                self.cluster.store().create_index(&db, &table.name, index)?;
                Ok(Output::ok())
            }
            Stmt::DropTable { tables, if_exists } => {
                self.implicit_commit()?;
                for t in tables {
                    let db = self.table_db(t, ctx)?;
                    self.cluster.store().drop_table(&db, &t.name, *if_exists)?;
                }
                Ok(Output::ok())
            }
            Stmt::Insert(ins) => self.write(|s, txn| s.insert(txn, ins, ctx)),
            Stmt::Update(up) => self.write(|s, txn| s.update(txn, up, ctx)),
            Stmt::Delete(del) => self.write(|s, txn| s.delete(txn, del, ctx)),
            Stmt::Begin => {
                self.implicit_commit()?;
                let pessimistic = self.pessimistic();
                self.txn = Some(self.cluster.store().begin_mode(pessimistic));
                Ok(Output::ok())
            }
            Stmt::Commit => {
                if let Some(txn) = self.txn.take() {
                    self.cluster.store().commit(txn)?;
                }
                Ok(Output::ok())
            }
            Stmt::Rollback => {
                self.txn = None;
                Ok(Output::ok())
            }
            Stmt::Set(items) => {
                for item in items {
                    self.set(item, ctx)?;
                }
                Ok(Output::ok())
            }
            Stmt::SetTransaction => Ok(Output::ok()),
            Stmt::Prepare { name, source } => {
                let text = match source {
                    PrepareSource::Text(t) => t.clone(),
                    PrepareSource::UserVar(v) => self
                        .user_vars
                        .get(v)
                        .and_then(Value::to_text)
                        .unwrap_or_else(|| "NULL".into()),
                };
                let parsed = self.parse_preparable(&text)?;
                self.prepared
                    .retain(|_, p| p.name.as_deref() != Some(name.as_str()));
                self.add_prepared(Some(name.clone()), parsed, Vec::new());
                Ok(Output::Ok {
                    affected_rows: 0,
                    last_insert_id: 0,
                    info: "Statement prepared".into(),
                })
            }
            Stmt::Execute { name, using } => {
                let Some(p) = self
                    .prepared
                    .values()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                else {
                    return Err(SqlError::unknown_stmt(name, "EXECUTE"));
                };
                if using.len() != p.parsed.params {
                    return Err(SqlError::new(
                        1210,
                        "HY000",
                        "Incorrect arguments to EXECUTE",
                    ));
                }
                let parsed = Arc::clone(&p.parsed);
                let params: Vec<Value> = using
                    .iter()
                    .map(|v| self.user_vars.get(v).cloned().unwrap_or(Value::Null))
                    .collect();
                let inner = Ctx {
                    params: &params,
                    db: p.db.clone(),
                };
                self.run_inner(&parsed.stmt, &inner)
            }
            Stmt::Deallocate { name } => {
                let before = self.prepared.len();
                self.prepared
                    .retain(|_, p| p.name.as_deref() != Some(name.as_str()));
                if self.prepared.len() == before {
                    return Err(SqlError::unknown_stmt(name, "DEALLOCATE PREPARE"));
                }
                Ok(Output::ok())
            }
        }
    }

    /// Commits an open transaction before DDL or BEGIN, as MySQL does.
    fn implicit_commit(&mut self) -> Result<(), SqlError> {
        if let Some(txn) = self.txn.take() {
            self.cluster.store().commit(txn)?;
        }
        Ok(())
    }

    fn table_db(&self, t: &TableName, ctx: &Ctx<'_>) -> Result<String, SqlError> {
        match &t.db {
            Some(d) => Ok(d.clone()),
            None if ctx.db.is_empty() => Err(SqlError::no_db()),
            None => Ok(ctx.db.clone()),
        }
    }

    fn schema_of(&self, t: &TableName, ctx: &Ctx<'_>) -> Result<Arc<TableSchema>, SqlError> {
        let db = self.table_db(t, ctx)?;
        self.cluster.store().schema(&db, &t.name)
    }

    /// Runs `f` in the open transaction, or in one of its own: committed
    /// at once with autocommit, kept open without. A failed statement
    /// leaves the transaction as it was.
    ///
    /// A pessimistic transaction's statement reads the latest commits and
    /// locks the keys it wrote (`store` module doc). Autocommit statements
    /// lock too, whatever `tidb_txn_mode` says: TiDB's mode names explicit
    /// transactions, but an autocommit write that meets a lock waits for
    /// it as well (TiKV resolves the lock before the prewrite goes on). A
    /// statement that must wait returns 1205 with `lock_wait` set: the
    /// connection waits for a lock release and runs it again, and sends the
    /// 1205 once `innodb_lock_wait_timeout` has passed (TiDB rolls back only
    /// the statement). A deadlock rolls back the whole transaction (1213),
    /// as TiDB does.
    fn write<F>(&mut self, mut f: F) -> Result<Output, SqlError>
    where
        F: FnMut(&mut Self, &mut Txn) -> Result<Output, SqlError>,
    {
        let store = Arc::clone(self.cluster.store());
        let autocommit = self.txn.is_none() && self.autocommit();
        let mut attempt = 0;
        loop {
            let mut txn = match self.txn.take() {
                Some(t) => t,
                None if autocommit => store.begin_mode(true),
                None => store.begin_mode(self.pessimistic()),
            };
            let saved = txn.snapshot_writes();
            if txn.is_pessimistic() {
                store.begin_current_read(&mut txn);
            }
            let out = f(self, &mut txn);
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    txn.end_current_read();
                    txn.restore_writes(saved);
                    if !autocommit {
                        self.txn = Some(txn);
                    }
                    return Err(e);
                }
            };
            if txn.is_pessimistic() {
                let keys = txn.unlocked_writes();
                // Checked against what the statement read: its for_update_ts.
                let locking = store.lock_keys(&mut txn, &keys);
                txn.end_current_read();
                match locking {
                    Locking::Locked => {}
                    Locking::Stale => {
                        txn.restore_writes(saved);
                        if !autocommit {
                            self.txn = Some(txn);
                        }
                        attempt += 1;
                        if attempt > AUTOCOMMIT_RETRIES * 10 {
                            return Err(SqlError::other(
                                "pessimistic write statement kept meeting newer commits",
                            ));
                        }
                        continue;
                    }
                    Locking::Wait(rx) => {
                        txn.restore_writes(saved);
                        self.lock_wait = Some(LockWait {
                            rx,
                            txn_id: txn.id(),
                        });
                        if !autocommit {
                            self.txn = Some(txn);
                        }
                        return Err(SqlError::lock_wait_timeout());
                    }
                    Locking::Deadlock => return Err(SqlError::deadlock()),
                }
            }
            if !autocommit {
                self.txn = Some(txn);
                return Ok(out);
            }
            match store.commit(txn) {
                Ok(()) => return Ok(out),
                Err(e) if e.code == 9007 && attempt < AUTOCOMMIT_RETRIES => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether new explicit transactions are pessimistic (`tidb_txn_mode`;
    /// TiDB treats an empty value as optimistic).
    fn pessimistic(&self) -> bool {
        self.sys_var("tidb_txn_mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("pessimistic"))
    }

    /// `innodb_lock_wait_timeout`: how long a statement waits for a lock.
    pub fn lock_wait_timeout(&self) -> Duration {
        let secs = self
            .sys_var("innodb_lock_wait_timeout")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(50);
        Duration::from_secs(secs)
    }

    /// Forgets the wait of a statement that gave up (lock wait timeout).
    pub fn stop_waiting(&self, txn_id: u64) {
        self.cluster.store().stop_waiting(txn_id);
    }

    /// Runs a read in the open transaction or a fresh snapshot (opening a
    /// transaction if autocommit is off, as the read starts one).
    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &Txn) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        if self.txn.is_none() && !self.autocommit() {
            let pessimistic = self.pessimistic();
            self.txn = Some(self.cluster.store().begin_mode(pessimistic));
        }
        match self.txn.take() {
            Some(txn) => {
                let out = f(self, &txn);
                self.txn = Some(txn);
                out
            }
            None => {
                let txn = self.cluster.store().begin();
                f(self, &txn)
            }
        }
    }

    fn insert(&mut self, txn: &mut Txn, ins: &Insert, ctx: &Ctx<'_>) -> Result<Output, SqlError> {
        let schema = self.schema_of(&ins.table, ctx)?;
        let targets: Vec<usize> = match &ins.columns {
            Some(cols) => cols
                .iter()
                .map(|c| {
                    schema
                        .column(c)
                        .ok_or_else(|| SqlError::unknown_column(c, "field list"))
                })
                .collect::<Result<_, _>>()?,
            None => (0..schema.columns.len()).collect(),
        };
        let pk = schema.pk;
        let auto = schema.columns[pk].auto_increment;
        let mut first_generated: Option<i64> = None;
        let mut first_explicit: Option<i64> = None;
        for (n, values) in ins.rows.iter().enumerate() {
            let rownum = n + 1;
            if values.len() != targets.len() && !(values.is_empty() && ins.columns.is_none()) {
                return Err(SqlError::new(
                    1136,
                    "21S01",
                    format!("Column count doesn't match value count at row {rownum}"),
                ));
            }
            let mut row: Vec<Value> = schema.columns.iter().map(|c| c.default.clone()).collect();
            for (i, e) in targets.iter().zip(values) {
                row[*i] = self.eval(e, ctx, None)?;
            }
            let needs_id = matches!(row[pk], Value::Null | Value::Int(0) | Value::UInt(0));
            if auto && needs_id {
                let id = self.cluster.store().alloc_auto_id(&schema)?;
                first_generated.get_or_insert(id);
                row[pk] = Value::Int(id);
            }
            for (i, c) in schema.columns.iter().enumerate() {
                let v = std::mem::replace(&mut row[i], Value::Null);
                row[i] = c.coerce(v, rownum)?;
            }
            let Value::Int(k) = row[pk] else {
                return Err(SqlError::other("primary key is not an integer"));
            };
            if auto && !needs_id {
                self.cluster.store().observe_id(&schema, k);
                first_explicit.get_or_insert(k);
            }
            let existing = self.cluster.store().scan(
                txn,
                &schema,
                (Bound::Included(k), Bound::Included(k)),
            )?;
            if !existing.is_empty() {
                return Err(SqlError::new(
                    1062,
                    "23000",
                    format!("Duplicate entry '{k}' for key '{}.PRIMARY'", schema.name),
                ));
            }
            txn.put(schema.id, k, Some(Arc::new(row)));
        }
        if let Some(id) = first_generated {
            self.last_insert_id = id as u64;
        }
        let reported = first_generated.or(first_explicit).unwrap_or(0);
        let n = ins.rows.len() as u64;
        Ok(Output::Ok {
            affected_rows: n,
            last_insert_id: reported as u64,
            info: if n > 1 {
                format!("Records: {n}  Duplicates: 0  Warnings: 0")
            } else {
                String::new()
            },
        })
    }

    /// Rows of a table that match `filter`, in key order.
    fn matching_rows(
        &mut self,
        txn: &Txn,
        schema: &TableSchema,
        filter: Option<&Expr>,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<(i64, Row)>, SqlError> {
        let range = match filter {
            Some(f) => self.key_range(f, schema, ctx),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let rows = self.cluster.store().scan(txn, schema, range)?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, row) in rows {
            let keep = match filter {
                Some(f) => self.eval(f, ctx, Some((schema, &row)))?.is_true(),
                None => true,
            };
            if keep {
                out.push((k, row));
            }
        }
        Ok(out)
    }

    fn limit_of(&mut self, e: Option<&Expr>, ctx: &Ctx<'_>) -> Result<Option<usize>, SqlError> {
        match e {
            None => Ok(None),
            Some(e) => {
                let v = self.eval(e, ctx, None)?;
                Ok(Some(v.as_i64().unwrap_or(0).max(0) as usize))
            }
        }
    }

    fn update(&mut self, txn: &mut Txn, up: &Update, ctx: &Ctx<'_>) -> Result<Output, SqlError> {
        let schema = self.schema_of(&up.table, ctx)?;
        let targets: Vec<usize> = up
            .sets
            .iter()
            .map(|(c, _)| {
                schema
                    .column(c)
                    .ok_or_else(|| SqlError::unknown_column(c, "field list"))
            })
            .collect::<Result<_, _>>()?;
        let mut rows = self.matching_rows(txn, &schema, up.filter.as_ref(), ctx)?;
        if let Some(n) = self.limit_of(up.limit.as_ref(), ctx)? {
            rows.truncate(n);
        }
        let (mut matched, mut changed) = (0u64, 0u64);
        for (k, row) in rows {
            matched += 1;
            let mut new: Vec<Value> = row.as_ref().clone();
            for (i, (_, e)) in targets.iter().zip(&up.sets) {
                let v = self.eval(e, ctx, Some((&schema, &new)))?;
                new[*i] = schema.columns[*i].coerce(v, matched as usize)?;
            }
            if new == *row {
                continue;
            }
            changed += 1;
            let Value::Int(nk) = new[schema.pk] else {
                return Err(SqlError::other("primary key is not an integer"));
            };
            if nk != k {
                let clash = self.cluster.store().scan(
                    txn,
                    &schema,
                    (Bound::Included(nk), Bound::Included(nk)),
                )?;
                if !clash.is_empty() {
                    return Err(SqlError::new(
                        1062,
                        "23000",
                        format!("Duplicate entry '{nk}' for key '{}.PRIMARY'", schema.name),
                    ));
                }
                txn.put(schema.id, k, None);
            }
            txn.put(schema.id, nk, Some(Arc::new(new)));
        }
        Ok(Output::Ok {
            affected_rows: if self.found_rows_flag {
                matched
            } else {
                changed
            },
            last_insert_id: 0,
            info: format!("Rows matched: {matched}  Changed: {changed}  Warnings: 0"),
        })
    }

    fn delete(&mut self, txn: &mut Txn, del: &Delete, ctx: &Ctx<'_>) -> Result<Output, SqlError> {
        let schema = self.schema_of(&del.table, ctx)?;
        let mut rows = self.matching_rows(txn, &schema, del.filter.as_ref(), ctx)?;
        if let Some(n) = self.limit_of(del.limit.as_ref(), ctx)? {
            rows.truncate(n);
        }
        for (k, _) in &rows {
            txn.put(schema.id, *k, None);
        }
        Ok(Output::Ok {
            affected_rows: rows.len() as u64,
            last_insert_id: 0,
            info: String::new(),
        })
    }

    /// The primary-key range implied by `pk <op> constant` conjuncts of a
    /// WHERE clause; rows are still filtered by the whole clause.
    fn key_range(
        &mut self,
        f: &Expr,
        schema: &TableSchema,
        ctx: &Ctx<'_>,
    ) -> (Bound<i64>, Bound<i64>) {
        let mut lo = Bound::Unbounded;
        let mut hi = Bound::Unbounded;
        let mut conjuncts = Vec::new();
        collect_conjuncts(f, &mut conjuncts);
        let pk_name = &schema.columns[schema.pk].name;
        let is_pk =
            |e: &Expr| matches!(e, Expr::Column(c) if bare_column(c).eq_ignore_ascii_case(pk_name));
        for c in conjuncts {
            let (op, k) = match c {
                Expr::Bin(op, a, b) if is_pk(a) && !refs_column(b) => (*op, self.const_int(b, ctx)),
                Expr::Bin(op, a, b) if is_pk(b) && !refs_column(a) => {
                    let flipped = match op {
                        BinOp::Lt => BinOp::Gt,
                        BinOp::Le => BinOp::Ge,
                        BinOp::Gt => BinOp::Lt,
                        BinOp::Ge => BinOp::Le,
                        other => *other,
                    };
                    (flipped, self.const_int(a, ctx))
                }
                Expr::Between(e, a, b, false) if is_pk(e) && !refs_column(a) && !refs_column(b) => {
                    if let (Some(a), Some(b)) = (self.const_int(a, ctx), self.const_int(b, ctx)) {
                        tighten_lo(&mut lo, Bound::Included(a));
                        tighten_hi(&mut hi, Bound::Included(b));
                    }
                    continue;
                }
                _ => continue,
            };
            let Some(k) = k else { continue };
            match op {
                BinOp::Eq | BinOp::NullSafeEq => {
                    tighten_lo(&mut lo, Bound::Included(k));
                    tighten_hi(&mut hi, Bound::Included(k));
                }
                BinOp::Gt => tighten_lo(&mut lo, Bound::Excluded(k)),
                BinOp::Ge => tighten_lo(&mut lo, Bound::Included(k)),
                BinOp::Lt => tighten_hi(&mut hi, Bound::Excluded(k)),
                BinOp::Le => tighten_hi(&mut hi, Bound::Included(k)),
                _ => {}
            }
        }
        // An empty range (lo > hi) would make BTreeMap::range panic.
        let lo_v = match lo {
            Bound::Included(a) => Some(a as i128),
            Bound::Excluded(a) => Some(a as i128 + 1),
            Bound::Unbounded => None,
        };
        let hi_v = match hi {
            Bound::Included(b) => Some(b as i128),
            Bound::Excluded(b) => Some(b as i128 - 1),
            Bound::Unbounded => None,
        };
        if let (Some(a), Some(b)) = (lo_v, hi_v)
            && a > b
        {
            return (Bound::Included(1), Bound::Excluded(1));
        }
        if lo == Bound::Excluded(i64::MAX) || hi == Bound::Excluded(i64::MIN) {
            return (Bound::Included(1), Bound::Excluded(1));
        }
        if let (Bound::Excluded(a), Bound::Excluded(b)) = (lo, hi)
            && a == b
        {
            return (Bound::Included(1), Bound::Excluded(1));
        }
        (lo, hi)
    }

    /// An integer constant (no columns): exact integers only.
    fn const_int(&mut self, e: &Expr, ctx: &Ctx<'_>) -> Option<i64> {
        match self.eval(e, ctx, None).ok()? {
            Value::Int(i) => Some(i),
            Value::UInt(u) => i64::try_from(u).ok(),
            Value::Str(s) => s.trim().parse().ok(),
            Value::Double(d) if d == d.trunc() && d.abs() < 9e18 => Some(d as i64),
            _ => None,
        }
    }

    fn select(&mut self, s: &Select, ctx: &Ctx<'_>) -> Result<ResultSet, SqlError> {
        let Some(from) = &s.from else {
            return self.select_without_table(s, ctx);
        };
        let found = match &s.join {
            Some(join) => Some(self.join_rows(s, from, join, ctx)?),
            None => self.information_schema(from, s.filter.as_ref(), ctx)?,
        };
        let (schema, mut rows) = match found {
            Some(found) => found,
            None => {
                let schema = self.schema_of(from, ctx)?;
                let rows =
                    self.read(|me, txn| me.matching_rows(txn, &schema, s.filter.as_ref(), ctx))?;
                (schema, rows)
            }
        };
        let aggregate = !s.group_by.is_empty()
            || s.items.iter().any(|i| match i {
                SelectItem::Expr { expr, .. } => expr.has_aggregate(),
                SelectItem::Star | SelectItem::TableStar(_) => false,
            });
        // Output columns: definitions, and how to compute each.
        enum Src<'e> {
            Col(usize),
            Expr(&'e Expr),
        }
        let mut srcs = Vec::new();
        let mut names = Vec::new();
        for item in &s.items {
            match item {
                SelectItem::Star => {
                    for i in 0..schema.columns.len() {
                        srcs.push(Src::Col(i));
                        names.push(bare_column(&schema.columns[i].name).to_string());
                    }
                }
                SelectItem::TableStar(q) => {
                    for i in join::table_star(s, &schema, q)? {
                        srcs.push(Src::Col(i));
                        names.push(bare_column(&schema.columns[i].name).to_string());
                    }
                }
                SelectItem::Expr { expr, name } => {
                    match expr {
                        Expr::Column(c) if !aggregate => {
                            let i = column_index(&schema, c)?;
                            srcs.push(Src::Col(i));
                        }
                        e => srcs.push(Src::Expr(e)),
                    }
                    names.push(name.clone());
                }
            }
        }
        let mut out_rows: Vec<Vec<Value>> = Vec::new();
        if aggregate {
            let exprs: Vec<Expr> = srcs
                .iter()
                .map(|src| match src {
                    Src::Col(i) => Expr::Column(schema.columns[*i].name.clone()),
                    Src::Expr(e) => (*e).clone(),
                })
                .collect();
            out_rows = self.aggregate_rows(s, &exprs, &names, &rows, &schema, ctx)?;
        } else {
            if !s.order_by.is_empty() {
                let mut keyed = Vec::with_capacity(rows.len());
                for (k, r) in rows.drain(..) {
                    let mut keys = Vec::new();
                    for (e, _) in &s.order_by {
                        let e = match e {
                            Expr::Lit(Value::Int(n)) if *n >= 1 && (*n as usize) <= srcs.len() => {
                                match &srcs[*n as usize - 1] {
                                    Src::Col(i) => Expr::Column(schema.columns[*i].name.clone()),
                                    Src::Expr(x) => (*x).clone(),
                                }
                            }
                            other => other.clone(),
                        };
                        keys.push(self.eval(&e, ctx, Some((&schema, &r)))?);
                    }
                    keyed.push((keys, k, r));
                }
                keyed.sort_by(|a, b| {
                    for (i, (_, desc)) in s.order_by.iter().enumerate() {
                        let o = order_cmp(&a.0[i], &b.0[i]);
                        let o = if *desc { o.reverse() } else { o };
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    a.1.cmp(&b.1)
                });
                rows = keyed.into_iter().map(|(_, k, r)| (k, r)).collect();
            }
            let offset = self.limit_of(s.offset.as_ref(), ctx)?.unwrap_or(0);
            let limit = self.limit_of(s.limit.as_ref(), ctx)?.unwrap_or(usize::MAX);
            // DISTINCT dedupes before OFFSET/LIMIT count rows.
            let (skip, take) = if s.distinct {
                (0, usize::MAX)
            } else {
                (offset, limit)
            };
            for (_, r) in rows.iter().skip(skip).take(take) {
                let mut out = Vec::with_capacity(srcs.len());
                for src in &srcs {
                    out.push(match src {
                        Src::Col(i) => r[*i].clone(),
                        Src::Expr(e) => self.eval(e, ctx, Some((&schema, r)))?,
                    });
                }
                out_rows.push(out);
            }
            if s.distinct {
                out_rows = super::value::distinct_rows(out_rows, offset, limit);
            }
        }
        let columns = srcs
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(n, (src, name))| match src {
                Src::Col(i) => Column::of_table(&schema, *i, Some(name)),
                Src::Expr(_) => Column::expr(name, &sample(&out_rows, n)),
            })
            .collect();
        Ok(ResultSet {
            columns,
            rows: out_rows,
        })
    }

    fn select_without_table(&mut self, s: &Select, ctx: &Ctx<'_>) -> Result<ResultSet, SqlError> {
        let mut row = Vec::new();
        let mut names = Vec::new();
        for item in &s.items {
            let SelectItem::Expr { expr, name } = item else {
                return Err(SqlError::new(1096, "HY000", "No tables used"));
            };
            let v = if expr.has_aggregate() {
                let folded = self.fold_aggregates_dual(expr, ctx)?;
                self.eval(&folded, ctx, None)?
            } else {
                self.eval(expr, ctx, None)?
            };
            row.push(v);
            names.push(name.clone());
        }
        let keep = match &s.filter {
            Some(f) => self.eval(f, ctx, None)?.is_true(),
            None => true,
        };
        let offset = self.limit_of(s.offset.as_ref(), ctx)?.unwrap_or(0);
        let limit = self.limit_of(s.limit.as_ref(), ctx)?.unwrap_or(usize::MAX);
        let rows = if keep && offset == 0 && limit > 0 {
            vec![row]
        } else {
            Vec::new()
        };
        let columns = names
            .iter()
            .enumerate()
            .map(|(n, name)| Column::expr(name, &sample(&rows, n)))
            .collect();
        Ok(ResultSet { columns, rows })
    }

    /// Replaces aggregate calls in `e` by their values over `rows`.
    fn fold_aggregates(
        &mut self,
        e: &Expr,
        rows: &[(i64, Row)],
        schema: &TableSchema,
        ctx: &Ctx<'_>,
    ) -> Result<Expr, SqlError> {
        Ok(match e {
            Expr::CountStar => Expr::Lit(Value::Int(rows.len() as i64)),
            Expr::Func(name, args) if is_aggregate(name) => {
                let [arg] = args.as_slice() else {
                    return Err(SqlError::new(
                        1582,
                        "42000",
                        format!(
                            "Incorrect parameter count in the call to native function '{name}'"
                        ),
                    ));
                };
                let mut vals = Vec::new();
                for (_, r) in rows {
                    let v = self.eval(arg, ctx, Some((schema, r)))?;
                    if !v.is_null() {
                        vals.push(v);
                    }
                }
                Expr::Lit(aggregate(name, vals))
            }
            Expr::Func(name, args) => Expr::Func(
                name.clone(),
                args.iter()
                    .map(|a| self.fold_aggregates(a, rows, schema, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Neg(a) => Expr::Neg(Box::new(self.fold_aggregates(a, rows, schema, ctx)?)),
            Expr::Not(a) => Expr::Not(Box::new(self.fold_aggregates(a, rows, schema, ctx)?)),
            Expr::Bin(op, a, b) => Expr::Bin(
                *op,
                Box::new(self.fold_aggregates(a, rows, schema, ctx)?),
                Box::new(self.fold_aggregates(b, rows, schema, ctx)?),
            ),
            other => other.clone(),
        })
    }

    /// Aggregates without FROM run over one empty row.
    fn fold_aggregates_dual(&mut self, e: &Expr, ctx: &Ctx<'_>) -> Result<Expr, SqlError> {
        Ok(match e {
            Expr::CountStar => Expr::Lit(Value::Int(1)),
            Expr::Func(name, args) if is_aggregate(name) => {
                let mut vals = Vec::new();
                for a in args {
                    let v = self.eval(a, ctx, None)?;
                    if !v.is_null() {
                        vals.push(v);
                    }
                }
                Expr::Lit(aggregate(name, vals))
            }
            other => other.clone(),
        })
    }

    /// Result columns of a statement, for COM_STMT_PREPARE.
    fn describe(&mut self, stmt: &Stmt, db: &str) -> Result<Vec<Column>, SqlError> {
        let ctx = Ctx {
            params: &[],
            db: db.to_string(),
        };
        match stmt {
            Stmt::Select(s) => {
                let schema = match (&s.from, &s.join) {
                    (Some(t), Some(j)) => {
                        Some(self.join_schema(t, s.alias.as_deref(), j, &ctx)?.schema)
                    }
                    (Some(t), None) => Some(self.schema_of(t, &ctx)?),
                    (None, _) => None,
                };
                let mut cols = Vec::new();
                for item in &s.items {
                    match (item, &schema) {
                        (SelectItem::Star, Some(sc)) => {
                            for i in 0..sc.columns.len() {
                                cols.push(Column::of_table(sc, i, None));
                            }
                        }
                        (SelectItem::TableStar(q), Some(sc)) => {
                            for i in join::table_star(s, sc, q)? {
                                cols.push(Column::of_table(sc, i, None));
                            }
                        }
                        (SelectItem::Star | SelectItem::TableStar(_), None) => {
                            return Err(SqlError::new(1096, "HY000", "No tables used"));
                        }
                        (
                            SelectItem::Expr {
                                expr: Expr::Column(c),
                                name,
                            },
                            Some(sc),
                        ) if sc.column(c).is_some() => {
                            // Checked by the guard.
                            let i = sc.column(c).unwrap_or_default();
                            cols.push(Column::of_table(sc, i, Some(name)));
                        }
                        (SelectItem::Expr { expr, name }, _) => {
                            let sample = match expr {
                                Expr::CountStar => Value::Int(0),
                                Expr::Func(f, _) if f == "COUNT" || f == "CONNECTION_ID" => {
                                    Value::Int(0)
                                }
                                Expr::Lit(v) => v.clone(),
                                _ => Value::Str(String::new()),
                            };
                            cols.push(Column::expr(name, &sample));
                        }
                    }
                }
                Ok(cols)
            }
            Stmt::ShowProcessList { .. }
            | Stmt::ShowDatabases
            | Stmt::ShowTables { .. }
            | Stmt::ShowVariables { .. }
            | Stmt::ShowCreateTable(_)
            | Stmt::ShowWarnings => {
                // Columns are known only when run; describe by running.
                match self.run_inner(stmt, &ctx)? {
                    Output::Rows(rs) => Ok(rs.columns),
                    Output::Ok { .. } => Ok(Vec::new()),
                }
            }
            Stmt::ShowSessionStates => Ok(vec![
                Column::json("Session_states"),
                Column::json("Session_token"),
            ]),
            _ => Ok(Vec::new()),
        }
    }

    fn set(&mut self, item: &SetItem, ctx: &Ctx<'_>) -> Result<(), SqlError> {
        match item {
            SetItem::UserVar { name, value } => {
                let v = self.eval(value, ctx, None)?;
                self.user_vars.insert(name.clone(), v);
                Ok(())
            }
            SetItem::Names {
                charset,
                collation,
                character_set,
            } => {
                let collation = collation.clone().unwrap_or_else(|| {
                    if charset == "binary" {
                        "binary".to_string()
                    } else {
                        format!("{charset}_bin")
                    }
                });
                self.set_session_var("character_set_client", charset.clone());
                self.set_session_var("character_set_results", charset.clone());
                if !*character_set {
                    self.set_session_var("character_set_connection", charset.clone());
                    self.set_session_var("collation_connection", collation);
                }
                Ok(())
            }
            SetItem::SysVar {
                global,
                name,
                value,
            } => {
                let Some(var) = sysvar::lookup(name) else {
                    return Err(SqlError::unknown_sysvar(name));
                };
                if var.scope == Scope::ReadOnly {
                    return Err(SqlError::new(
                        1238,
                        "HY000",
                        format!("Variable '{name}' is a read only variable"),
                    ));
                }
                let canonical = match value {
                    None => None,
                    Some(e) => {
                        let v = self.eval(e, ctx, None)?;
                        Some(var.canonical(&v)?)
                    }
                };
                if *global {
                    let v = canonical.unwrap_or_else(|| var.default.to_string());
                    self.cluster.set_global_var(var.name, v);
                    return Ok(());
                }
                if var.scope == Scope::Global {
                    return Err(SqlError::new(
                        1229,
                        "HY000",
                        format!(
                            "Variable '{name}' is a GLOBAL variable and should be set with SET GLOBAL"
                        ),
                    ));
                }
                // Turning autocommit on commits the open transaction.
                if var.name == "autocommit" && canonical.as_deref() != Some("OFF") {
                    self.implicit_commit()?;
                }
                let names: &[&'static str] = match var.name {
                    "tx_isolation" | "transaction_isolation" => {
                        &["tx_isolation", "transaction_isolation"]
                    }
                    "tx_read_only" | "transaction_read_only" => {
                        &["tx_read_only", "transaction_read_only"]
                    }
                    _ => &[var.name],
                };
                for n in names {
                    match &canonical {
                        Some(v) => {
                            self.sys_vars.insert(n, v.clone());
                        }
                        None => {
                            self.sys_vars.remove(n);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) fn set_session_var(&mut self, name: &str, value: String) {
        if let Some(v) = sysvar::lookup(name)
            && v.session_settable()
        {
            self.sys_vars.insert(v.name, value);
        }
    }

    /// `@@name` as a value; session-dependent read-only ones are computed.
    fn read_sys_var(&self, name: &str, global: bool) -> Result<Value, SqlError> {
        let Some(var) = sysvar::lookup(name) else {
            return Err(SqlError::unknown_sysvar(name));
        };
        let computed = match var.name {
            "version" => Some(Value::Str(self.instance.opts.server_version.clone())),
            "hostname" => Some(Value::Str(self.instance.sql_addr.ip().to_string())),
            "port" => Some(Value::Int(i64::from(self.instance.sql_addr.port()))),
            "in_transaction" => Some(Value::Int(i64::from(self.txn.is_some()))),
            "tidb_current_ts" => Some(Value::UInt(self.txn.as_ref().map_or(0, Txn::start_ts))),
            "last_insert_id" | "identity" => Some(Value::UInt(self.last_insert_id)),
            _ => None,
        };
        if let Some(v) = computed {
            return Ok(v);
        }
        let s = if global {
            self.cluster
                .global_var(var.name)
                .unwrap_or_else(|| var.default.to_string())
        } else {
            self.sys_var(var.name).unwrap_or_default()
        };
        Ok(var.read(&s))
    }

    // ----- expressions -----

    fn eval(
        &mut self,
        e: &Expr,
        ctx: &Ctx<'_>,
        row: Option<(&TableSchema, &[Value])>,
    ) -> Result<Value, SqlError> {
        Ok(match e {
            Expr::Lit(v) => v.clone(),
            Expr::Param(i) => ctx.params.get(*i).cloned().unwrap_or(Value::Null),
            Expr::UserVar(n) => self.user_vars.get(n).cloned().unwrap_or(Value::Null),
            Expr::SysVar { global, name } => self.read_sys_var(name, *global)?,
            Expr::Column(c) => {
                let Some((schema, r)) = row else {
                    return Err(SqlError::unknown_column(c, "field list"));
                };
                let i = column_index(schema, c)?;
                r[i].clone()
            }
            Expr::CountStar => {
                return Err(SqlError::new(
                    1111,
                    "HY000",
                    "Invalid use of group function",
                ));
            }
            Expr::Neg(a) => match self.eval(a, ctx, row)? {
                Value::Null => Value::Null,
                Value::Int(i) => Value::Int(i.checked_neg().ok_or_else(out_of_range)?),
                Value::UInt(u) => Value::Int(-(i64::try_from(u).map_err(|_| out_of_range())?)),
                v => Value::Double(-v.as_f64().unwrap_or(0.0)),
            },
            Expr::Not(a) => match self.eval(a, ctx, row)? {
                Value::Null => Value::Null,
                v => Value::Int(i64::from(!v.is_true())),
            },
            Expr::IsNull(a, not) => {
                Value::Int(i64::from(self.eval(a, ctx, row)?.is_null() != *not))
            }
            Expr::Between(a, lo, hi, not) => {
                let v = self.eval(a, ctx, row)?;
                let lo = self.eval(lo, ctx, row)?;
                let hi = self.eval(hi, ctx, row)?;
                match (v.sql_cmp(&lo), v.sql_cmp(&hi)) {
                    (Some(x), Some(y)) => Value::Int(i64::from(
                        (x != Ordering::Less && y != Ordering::Greater) != *not,
                    )),
                    _ => Value::Null,
                }
            }
            Expr::InList(a, list, not) => {
                let v = self.eval(a, ctx, row)?;
                if v.is_null() {
                    return Ok(Value::Null);
                }
                let mut saw_null = false;
                let mut found = false;
                for x in list {
                    match v.sql_cmp(&self.eval(x, ctx, row)?) {
                        Some(Ordering::Equal) => {
                            found = true;
                            break;
                        }
                        None => saw_null = true,
                        _ => {}
                    }
                }
                if !found && saw_null {
                    Value::Null
                } else {
                    Value::Int(i64::from(found != *not))
                }
            }
            Expr::Like(a, p, not) => {
                let v = self.eval(a, ctx, row)?;
                let p = self.eval(p, ctx, row)?;
                match (v.to_text(), p.to_text()) {
                    (Some(v), Some(p)) => Value::Int(i64::from(like_match(&v, &p, false) != *not)),
                    _ => Value::Null,
                }
            }
            Expr::Bin(op, a, b) => {
                let x = self.eval(a, ctx, row)?;
                // AND/OR short-circuit as MySQL does for definite results.
                match op {
                    BinOp::And if !x.is_null() && !x.is_true() => return Ok(Value::Int(0)),
                    BinOp::Or if x.is_true() => return Ok(Value::Int(1)),
                    _ => {}
                }
                let y = self.eval(b, ctx, row)?;
                binary(*op, x, y)?
            }
            Expr::Func(name, args) => self.call(name, args, ctx, row)?,
            // Resolved before the query runs where the double supports them.
            Expr::Subquery(_) | Expr::InSubquery(..) => {
                return Err(SqlError::unsupported("a subquery here"));
            }
        })
    }

    fn call(
        &mut self,
        name: &str,
        args: &[Expr],
        ctx: &Ctx<'_>,
        row: Option<(&TableSchema, &[Value])>,
    ) -> Result<Value, SqlError> {
        let mut vals = Vec::with_capacity(args.len());
        for a in args {
            vals.push(self.eval(a, ctx, row)?);
        }
        let arity = |n: usize| -> Result<(), SqlError> {
            if vals.len() == n {
                Ok(())
            } else {
                Err(SqlError::new(
                    1582,
                    "42000",
                    format!("Incorrect parameter count in the call to native function '{name}'"),
                ))
            }
        };
        Ok(match name {
            "DATABASE" | "SCHEMA" => {
                arity(0)?;
                if self.db.is_empty() {
                    Value::Null
                } else {
                    Value::Str(self.db.clone())
                }
            }
            "CONNECTION_ID" => {
                arity(0)?;
                Value::UInt(self.conn_id)
            }
            "LAST_INSERT_ID" => match vals.as_slice() {
                [] => Value::UInt(self.last_insert_id),
                [v] => {
                    self.last_insert_id = v.as_i64().unwrap_or(0) as u64;
                    v.clone()
                }
                _ => return arity(1).map(|_| Value::Null),
            },
            "VERSION" => {
                arity(0)?;
                Value::Str(self.instance.opts.server_version.clone())
            }
            "TIDB_VERSION" => {
                arity(0)?;
                Value::Str(format!(
                    "Release Version: {}\nEdition: Community\nGit Commit Hash: {}\nTiDB double",
                    self.instance.opts.server_version, self.instance.opts.git_hash
                ))
            }
            "USER" | "SESSION_USER" | "SYSTEM_USER" => {
                arity(0)?;
                Value::Str(format!("{}@{}", self.user, self.host))
            }
            "CURRENT_USER" => {
                arity(0)?;
                Value::Str(format!("{}@%", self.user))
            }
            "ROW_COUNT" => {
                arity(0)?;
                Value::Int(self.affected_rows)
            }
            "FOUND_ROWS" => {
                arity(0)?;
                Value::UInt(self.found_rows)
            }
            "NOW" | "CURRENT_TIMESTAMP" | "LOCALTIME" | "LOCALTIMESTAMP" | "SYSDATE" => {
                Value::Str(format_datetime(self.cluster.now()))
            }
            "CONCAT" => {
                let mut s = String::new();
                for v in &vals {
                    match v.to_text() {
                        Some(t) => s.push_str(&t),
                        None => return Ok(Value::Null),
                    }
                }
                Value::Str(s)
            }
            "COALESCE" | "IFNULL" => vals
                .into_iter()
                .find(|v| !v.is_null())
                .unwrap_or(Value::Null),
            "IF" => {
                arity(3)?;
                let mut it = vals.into_iter();
                let (c, a, b) = (it.next(), it.next(), it.next());
                if c.is_some_and(|c| c.is_true()) { a } else { b }.unwrap_or(Value::Null)
            }
            "UPPER" | "UCASE" => {
                arity(1)?;
                vals[0]
                    .to_text()
                    .map_or(Value::Null, |s| Value::Str(s.to_uppercase()))
            }
            "LOWER" | "LCASE" => {
                arity(1)?;
                vals[0]
                    .to_text()
                    .map_or(Value::Null, |s| Value::Str(s.to_lowercase()))
            }
            "LENGTH" | "OCTET_LENGTH" => {
                arity(1)?;
                vals[0]
                    .to_text()
                    .map_or(Value::Null, |s| Value::Int(s.len() as i64))
            }
            "CHAR_LENGTH" | "CHARACTER_LENGTH" => {
                arity(1)?;
                vals[0]
                    .to_text()
                    .map_or(Value::Null, |s| Value::Int(s.chars().count() as i64))
            }
            "SLEEP" => {
                arity(1)?;
                let secs = vals[0].as_f64().unwrap_or(0.0).max(0.0);
                self.sleep += Duration::from_secs_f64(secs.min(3600.0));
                Value::Int(0)
            }
            n if is_aggregate(n) => {
                return Err(SqlError::new(
                    1111,
                    "HY000",
                    "Invalid use of group function",
                ));
            }
            other => {
                return Err(SqlError::unsupported(format!("function {other}()")));
            }
        })
    }

    fn show_processlist(&self, full: bool) -> ResultSet {
        let procs = self.instance.processes();
        let now = tokio::time::Instant::now();
        let rows = procs
            .into_iter()
            .map(|p| {
                let info = p.info.map(|i| {
                    if full {
                        i
                    } else {
                        i.chars().take(100).collect()
                    }
                });
                vec![
                    Value::UInt(p.id),
                    Value::Str(p.user),
                    Value::Str(p.host),
                    if p.db.is_empty() {
                        Value::Null
                    } else {
                        Value::Str(p.db)
                    },
                    Value::Str(p.command.to_string()),
                    Value::Int(now.saturating_duration_since(p.since).as_secs() as i64),
                    Value::Str(
                        if p.in_txn {
                            "in transaction"
                        } else {
                            "autocommit"
                        }
                        .into(),
                    ),
                    info.map_or(Value::Null, Value::Str),
                ]
            })
            .collect();
        ResultSet {
            columns: vec![
                Column::expr("Id", &Value::UInt(0)),
                Column::text("User"),
                Column::text("Host"),
                Column::text("db"),
                Column::text("Command"),
                Column::expr("Time", &Value::Int(0)),
                Column::text("State"),
                Column::text("Info"),
            ],
            rows,
        }
    }
}

/// A column's index in `schema`: 1052 if both sides of a join have an
/// unqualified `c`, 1054 if neither has it, as MySQL.
fn column_index(schema: &TableSchema, c: &str) -> Result<usize, SqlError> {
    schema.column(c).ok_or_else(|| {
        let suffix = format!(".{}", c.to_lowercase());
        let sides = schema
            .columns
            .iter()
            .filter(|col| col.name.to_lowercase().ends_with(&suffix))
            .count();
        if !c.contains('.') && sides > 1 {
            SqlError::new(
                1052,
                "23000",
                format!("Column '{c}' in field list is ambiguous"),
            )
        } else {
            SqlError::unknown_column(c, "field list")
        }
    })
}

fn out_of_range() -> SqlError {
    SqlError::new(1690, "22003", "BIGINT value is out of range")
}

fn sample(rows: &[Vec<Value>], col: usize) -> Value {
    rows.iter()
        .map(|r| &r[col])
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(Value::Null)
}

fn order_cmp(a: &Value, b: &Value) -> Ordering {
    match (a.is_null(), b.is_null()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => a.sql_cmp(b).unwrap_or(Ordering::Equal),
    }
}

fn aggregate(name: &str, vals: Vec<Value>) -> Value {
    match name {
        "COUNT" => Value::Int(vals.len() as i64),
        "SUM" | "AVG" => {
            if vals.is_empty() {
                return Value::Null;
            }
            let all_int = vals.iter().all(|v| matches!(v, Value::Int(_)));
            if name == "SUM" && all_int {
                let s: i128 = vals
                    .iter()
                    .map(|v| i128::from(v.as_i64().unwrap_or(0)))
                    .sum();
                return i64::try_from(s).map_or(Value::Double(s as f64), Value::Int);
            }
            let s: f64 = vals.iter().map(|v| v.as_f64().unwrap_or(0.0)).sum();
            if name == "AVG" {
                Value::Double(s / vals.len() as f64)
            } else {
                Value::Double(s)
            }
        }
        "MIN" | "MAX" => {
            let want = if name == "MIN" {
                Ordering::Less
            } else {
                Ordering::Greater
            };
            let mut best: Option<Value> = None;
            for v in vals {
                best = match best {
                    Some(b) if v.sql_cmp(&b) != Some(want) => Some(b),
                    _ => Some(v),
                };
            }
            best.unwrap_or(Value::Null)
        }
        _ => Value::Null,
    }
}

fn binary(op: BinOp, x: Value, y: Value) -> Result<Value, SqlError> {
    use BinOp::*;
    if op == NullSafeEq {
        return Ok(Value::Int(i64::from(match (x.is_null(), y.is_null()) {
            (true, true) => true,
            (false, false) => x.sql_cmp(&y) == Some(Ordering::Equal),
            _ => false,
        })));
    }
    if op == And {
        return Ok(match (x.is_null(), y.is_null()) {
            _ if (!x.is_null() && !x.is_true()) || (!y.is_null() && !y.is_true()) => Value::Int(0),
            (false, false) => Value::Int(1),
            _ => Value::Null,
        });
    }
    if op == Or {
        return Ok(if x.is_true() || y.is_true() {
            Value::Int(1)
        } else if x.is_null() || y.is_null() {
            Value::Null
        } else {
            Value::Int(0)
        });
    }
    if x.is_null() || y.is_null() {
        return Ok(Value::Null);
    }
    let cmp = |want: fn(Ordering) -> bool| -> Value {
        x.sql_cmp(&y)
            .map_or(Value::Null, |o| Value::Int(i64::from(want(o))))
    };
    let as_i = |v: &Value| -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::UInt(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    };
    let ints = as_i(&x).zip(as_i(&y));
    let f = || (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
    Ok(match op {
        Eq => cmp(|o| o == Ordering::Equal),
        Ne => cmp(|o| o != Ordering::Equal),
        Lt => cmp(|o| o == Ordering::Less),
        Le => cmp(|o| o != Ordering::Greater),
        Gt => cmp(|o| o == Ordering::Greater),
        Ge => cmp(|o| o != Ordering::Less),
        Add => match ints {
            Some((a, b)) => Value::Int(a.checked_add(b).ok_or_else(out_of_range)?),
            None => Value::Double(f().0 + f().1),
        },
        Sub => match ints {
            Some((a, b)) => Value::Int(a.checked_sub(b).ok_or_else(out_of_range)?),
            None => Value::Double(f().0 - f().1),
        },
        Mul => match ints {
            Some((a, b)) => Value::Int(a.checked_mul(b).ok_or_else(out_of_range)?),
            None => Value::Double(f().0 * f().1),
        },
        Div => {
            let (a, b) = f();
            if b == 0.0 {
                Value::Null
            } else {
                Value::Double(a / b)
            }
        }
        IntDiv => {
            let (a, b) = f();
            if b == 0.0 {
                Value::Null
            } else {
                Value::Int((a / b).trunc() as i64)
            }
        }
        Mod => match ints {
            Some((_, 0)) => Value::Null,
            Some((a, b)) => Value::Int(a.wrapping_rem(b)),
            None => {
                let (a, b) = f();
                if b == 0.0 {
                    Value::Null
                } else {
                    Value::Double(a % b)
                }
            }
        },
        NullSafeEq | And | Or => Value::Null,
    })
}

fn collect_conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    if let Expr::Bin(BinOp::And, a, b) = e {
        collect_conjuncts(a, out);
        collect_conjuncts(b, out);
    } else {
        out.push(e);
    }
}

fn refs_column(e: &Expr) -> bool {
    match e {
        Expr::Column(_) => true,
        Expr::Lit(_)
        | Expr::Param(_)
        | Expr::UserVar(_)
        | Expr::SysVar { .. }
        | Expr::CountStar => false,
        // Functions may have side effects (SLEEP, LAST_INSERT_ID(x)): keep them per row.
        Expr::Func(..) => true,
        Expr::Neg(a) | Expr::Not(a) | Expr::IsNull(a, _) => refs_column(a),
        Expr::Bin(_, a, b) | Expr::Like(a, b, _) => refs_column(a) || refs_column(b),
        Expr::Between(a, b, c, _) => refs_column(a) || refs_column(b) || refs_column(c),
        Expr::InList(a, l, _) => refs_column(a) || l.iter().any(refs_column),
        Expr::Subquery(_) | Expr::InSubquery(..) => true,
    }
}

fn tighten_lo(lo: &mut Bound<i64>, new: Bound<i64>) {
    let key = |b: &Bound<i64>| match b {
        Bound::Included(a) => Some((*a, 0)),
        Bound::Excluded(a) => Some((*a, 1)),
        Bound::Unbounded => None,
    };
    if key(lo).is_none_or(|cur| key(&new).is_some_and(|n| n > cur)) {
        *lo = new;
    }
}

fn tighten_hi(hi: &mut Bound<i64>, new: Bound<i64>) {
    let key = |b: &Bound<i64>| match b {
        Bound::Included(a) => Some((*a, 1)),
        Bound::Excluded(a) => Some((*a, 0)),
        Bound::Unbounded => None,
    };
    if key(hi).is_none_or(|cur| key(&new).is_some_and(|n| n < cur)) {
        *hi = new;
    }
}

/// SQL LIKE with `%`, `_` and backslash escapes.
pub fn like_match(s: &str, pat: &str, case_insensitive: bool) -> bool {
    let fold = |c: char| {
        if case_insensitive {
            c.to_ascii_lowercase()
        } else {
            c
        }
    };
    let s: Vec<char> = s.chars().map(fold).collect();
    // (char, is_literal)
    let mut p: Vec<(char, bool)> = Vec::new();
    let mut it = pat.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                p.push((fold(n), true));
            }
        } else {
            p.push((fold(c), false));
        }
    }
    // Iterative wildcard matching with backtracking on the last `%`.
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == ('%', false) {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && (p[pi] == ('_', false) || p[pi].0 == s[si]) {
            si += 1;
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == ('%', false) {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns() {
        assert!(like_match("max_allowed_packet", "max%", true));
        assert!(like_match("MAX_ALLOWED_PACKET", "max\\_allowed%", true));
        assert!(!like_match("maxallowed", "max\\_%", true));
        assert!(like_match("abc", "a_c", false));
        assert!(!like_match("abc", "A%", false));
        assert!(like_match("", "%", false));
    }

    #[test]
    fn arithmetic_and_null_logic() {
        assert_eq!(
            binary(BinOp::Add, Value::Int(1), Value::Int(2)).unwrap(),
            Value::Int(3)
        );
        assert_eq!(
            binary(BinOp::Sub, Value::Int(1), Value::UInt(2)).unwrap(),
            Value::Int(-1)
        );
        assert_eq!(
            binary(BinOp::Div, Value::Int(1), Value::Int(0)).unwrap(),
            Value::Null
        );
        assert_eq!(
            binary(BinOp::And, Value::Null, Value::Int(0)).unwrap(),
            Value::Int(0)
        );
        assert_eq!(
            binary(BinOp::Or, Value::Null, Value::Int(0)).unwrap(),
            Value::Null
        );
        assert_eq!(
            binary(BinOp::NullSafeEq, Value::Null, Value::Null).unwrap(),
            Value::Int(1)
        );
        assert_eq!(
            binary(BinOp::Add, Value::Int(i64::MAX), Value::Int(1))
                .unwrap_err()
                .code,
            1690
        );
    }
}
