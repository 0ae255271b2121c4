//! The cluster's transactional store, shared by every TiDB instance of a
//! cluster (as TiKV is).
//!
//! Tables are `BTreeMap`s from an integer primary key to multi-version rows.
//! A transaction reads the snapshot of its start timestamp plus its own
//! buffered writes and commits atomically. DDL is not transactional: it
//! applies at once, as TiDB's does.
//!
//! Two transaction modes, as TiDB's `tidb_txn_mode`:
//! - *optimistic*: a commit fails with TiDB's write conflict (9007) if
//!   another transaction committed one of its keys after it started, or
//!   holds a lock on one (first committer wins);
//! - *pessimistic* (TiDB's default): each write statement reads the latest
//!   committed rows (TiDB's `for_update_ts`) and locks the keys it writes
//!   until the transaction ends, so its commit cannot conflict. A statement
//!   that meets another transaction's lock waits for it ([`Locking::Wait`]);
//!   a wait that would close a cycle is a deadlock ([`Locking::Deadlock`]),
//!   found at once as TiKV's detector does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::error::SqlError;
use super::sql::{ColType, CreateTable, IndexDef, bare_column};
use super::value::{Value, column_flag, column_type};

/// A row: one value per column, in schema order.
pub type Row = Arc<Vec<Value>>;

/// A table's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    /// Unique id; a re-created table gets a new one.
    pub id: u64,
    /// Database name as created.
    pub db: String,
    /// Table name as created.
    pub name: String,
    /// Columns.
    pub columns: Vec<ColumnSchema>,
    /// Index of the primary key column (an integer).
    pub pk: usize,
    /// Secondary indexes, as declared (not used for reads).
    pub indexes: Vec<IndexDef>,
}

/// A column's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSchema {
    /// Name.
    pub name: String,
    /// Type.
    pub ty: ColType,
    /// NOT NULL (always true for the primary key).
    pub not_null: bool,
    /// Default value.
    pub default: Value,
    /// AUTO_INCREMENT.
    pub auto_increment: bool,
}

impl TableSchema {
    /// The index of a column, case-insensitively. `t.c` finds a join's
    /// column `t.c`, or a table's `c` (the qualifier names the table); `c`
    /// finds a table's `c`, or the join column `t.c` when only one side
    /// has a `c`.
    pub fn column(&self, name: &str) -> Option<usize> {
        let find = |n: &str| {
            self.columns
                .iter()
                .position(|c| c.name.eq_ignore_ascii_case(n))
        };
        if let Some(i) = find(name) {
            return Some(i);
        }
        if name.contains('.') {
            return find(bare_column(name));
        }
        let suffix = format!(".{}", name.to_lowercase());
        let mut sides = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name.to_lowercase().ends_with(&suffix));
        match (sides.next(), sides.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }
}

impl ColumnSchema {
    /// Column type, flags, length and charset as sent in a column definition.
    pub fn wire_type(&self, is_pk: bool) -> (u8, u16, u32, u16) {
        let mut flags = 0;
        if self.not_null {
            flags |= column_flag::NOT_NULL;
        }
        if is_pk {
            flags |= column_flag::PRI_KEY;
        }
        if self.auto_increment {
            flags |= column_flag::AUTO_INCREMENT;
        }
        let num = column_flag::NUM | column_flag::BINARY;
        match self.ty {
            ColType::Int(8) => (column_type::TINY, flags | num, 4, 63),
            ColType::Int(16) => (column_type::SHORT, flags | num, 6, 63),
            ColType::Int(24) => (column_type::INT24, flags | num, 9, 63),
            ColType::Int(_) => (column_type::LONG, flags | num, 11, 63),
            ColType::BigInt => (column_type::LONGLONG, flags | num, 20, 63),
            ColType::Double => (column_type::DOUBLE, flags | num, 22, 63),
            ColType::Varchar(n) => (column_type::VAR_STRING, flags, n * 4, 46),
            ColType::Text => (column_type::BLOB, flags | column_flag::BLOB, 262_140, 46),
        }
    }

    /// Converts a value for storage in this column, or says why not.
    pub fn coerce(&self, v: Value, row: usize) -> Result<Value, SqlError> {
        if v.is_null() {
            if self.not_null {
                return Err(SqlError::new(
                    1048,
                    "23000",
                    format!("Column '{}' cannot be null", self.name),
                ));
            }
            return Ok(Value::Null);
        }
        let out_of_range = || {
            SqlError::new(
                1264,
                "22003",
                format!("Out of range value for column '{}' at row {row}", self.name),
            )
        };
        match self.ty {
            ColType::Int(bits) => {
                let i = int_value(&v, &self.name, row)?;
                let max = (1i64 << (bits - 1)) - 1;
                if i > max || i < -max - 1 {
                    return Err(out_of_range());
                }
                Ok(Value::Int(i))
            }
            ColType::BigInt => Ok(Value::Int(int_value(&v, &self.name, row)?)),
            ColType::Double => Ok(Value::Double(v.as_f64().unwrap_or(0.0))),
            ColType::Varchar(n) => {
                let s = v.to_text().unwrap_or_default();
                if s.chars().count() > n as usize {
                    return Err(SqlError::new(
                        1406,
                        "22001",
                        format!("Data too long for column '{}' at row {row}", self.name),
                    ));
                }
                Ok(Value::Str(s))
            }
            ColType::Text => Ok(Value::Str(v.to_text().unwrap_or_default())),
        }
    }
}

fn int_value(v: &Value, col: &str, row: usize) -> Result<i64, SqlError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::UInt(u) => i64::try_from(*u).map_err(|_| {
            SqlError::new(
                1264,
                "22003",
                format!("Out of range value for column '{col}' at row {row}"),
            )
        }),
        Value::Double(d) => Ok(d.round() as i64),
        Value::Str(s) => s.trim().parse::<i64>().map_err(|_| {
            SqlError::new(
                1366,
                "HY000",
                format!("Incorrect bigint value: '{s}' for column '{col}' at row {row}"),
            )
        }),
        Value::Null => Ok(0),
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The last timestamp handed out.
    ts: u64,
    next_table_id: u64,
    dbs: BTreeMap<String, Database>,
    /// table id -> (db key, table key).
    by_id: HashMap<u64, (String, String)>,
    /// Start timestamps of open transactions, with counts.
    active: BTreeMap<u64, usize>,
    /// The last transaction id handed out.
    txn_ids: u64,
    /// Pessimistic locks: (table id, key) -> the holding transaction's id.
    locks: HashMap<(u64, i64), u64>,
    /// Lock waits: waiting transaction id -> the id of the one it waits for.
    waits: HashMap<u64, u64>,
}

#[derive(Debug)]
struct Database {
    name: String,
    tables: BTreeMap<String, Table>,
}

#[derive(Debug)]
struct Table {
    schema: Arc<TableSchema>,
    rows: BTreeMap<i64, Vec<Version>>,
    /// The next auto-increment id.
    next_auto_id: i64,
}

#[derive(Debug, Clone)]
struct Version {
    ts: u64,
    /// `None`: deleted.
    row: Option<Row>,
}

/// The store. Cheap to share: every method locks one mutex briefly.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<Inner>,
    /// Bumped (under `inner`'s mutex) whenever locks are released: what a
    /// lock waiter awaits before it tries again.
    released: Arc<Released>,
}

/// A counter of lock releases and its waiters. Not a `tokio::sync::watch`:
/// a watch parks its waiters in shards picked by tokio's unseeded RNG, so
/// they would wake in a different order in every process and a simulation
/// seed would not replay (sim/README.md); a `Notify` wakes in FIFO order.
#[derive(Debug, Default)]
pub struct Released {
    version: AtomicU64,
    notify: Notify,
}

impl Released {
    fn bump(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// A lock waiter's view of [`Released`]: changed once any lock is released
/// after it was made.
#[derive(Debug)]
pub struct ReleaseWatch {
    released: Arc<Released>,
    seen: u64,
}

impl ReleaseWatch {
    /// Whether a lock was released since this watch was made.
    pub fn has_changed(&self) -> bool {
        self.released.version.load(Ordering::SeqCst) != self.seen
    }

    /// Waits until a lock is released after this watch was made.
    pub async fn changed(&mut self) {
        loop {
            let notified = self.released.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a release between the two
            // still wakes it.
            notified.as_mut().enable();
            if self.has_changed() {
                return;
            }
            notified.await;
        }
    }
}

/// What [`Store::lock_keys`] decided.
#[derive(Debug)]
pub enum Locking {
    /// Every key is locked by the transaction and none was committed after
    /// its `for_update_ts`.
    Locked,
    /// A key was committed after the statement read it: run the statement
    /// again on fresh data (TiDB retries it with a new `for_update_ts`).
    Stale,
    /// Another transaction holds a key: wait for a change, then run the
    /// statement again.
    Wait(ReleaseWatch),
    /// Waiting would close a cycle of waits.
    Deadlock,
}

/// An open transaction: a snapshot timestamp and buffered writes. Dropping
/// it rolls it back.
#[derive(Debug)]
pub struct Txn {
    store: Arc<Store>,
    /// Unique; names the transaction in locks and waits.
    id: u64,
    start_ts: u64,
    /// Pessimistic mode: writes lock their keys (see the module doc).
    pessimistic: bool,
    /// While a pessimistic write statement runs: the timestamp it reads at.
    for_update_ts: Option<u64>,
    /// Keys this transaction has locked.
    locked: HashSet<(u64, i64)>,
    /// (table id, key) -> new row, or `None` for a delete.
    writes: BTreeMap<(u64, i64), Option<Row>>,
}

impl Txn {
    /// The snapshot timestamp.
    pub fn start_ts(&self) -> u64 {
        self.start_ts
    }

    /// The timestamp reads see: the statement's `for_update_ts` while a
    /// pessimistic write runs, else the start timestamp.
    fn read_ts(&self) -> u64 {
        self.for_update_ts.unwrap_or(self.start_ts)
    }

    /// The transaction's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the transaction is pessimistic.
    pub fn is_pessimistic(&self) -> bool {
        self.pessimistic
    }

    /// Ends a current read started with [`Store::begin_current_read`].
    pub fn end_current_read(&mut self) {
        self.for_update_ts = None;
    }

    /// Keys written but not yet locked (what the last statement wrote).
    pub fn unlocked_writes(&self) -> Vec<(u64, i64)> {
        self.writes
            .keys()
            .filter(|k| !self.locked.contains(k))
            .copied()
            .collect()
    }

    /// Buffers a write.
    pub fn put(&mut self, table: u64, key: i64, row: Option<Row>) {
        self.writes.insert((table, key), row);
    }

    /// A copy of the buffered writes, to undo a failed statement.
    pub fn snapshot_writes(&self) -> BTreeMap<(u64, i64), Option<Row>> {
        self.writes.clone()
    }

    /// Puts back writes taken with [`Txn::snapshot_writes`].
    pub fn restore_writes(&mut self, writes: BTreeMap<(u64, i64), Option<Row>>) {
        self.writes = writes;
    }

    /// Whether the transaction wrote anything.
    pub fn is_read_only(&self) -> bool {
        self.writes.is_empty()
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        let mut inner = self.store.lock();
        if let Some(n) = inner.active.get_mut(&self.start_ts) {
            *n -= 1;
            if *n == 0 {
                inner.active.remove(&self.start_ts);
            }
        }
        // Commit or rollback: the locks go, and so does a wait (a session
        // closed while waiting).
        inner.waits.remove(&self.id);
        if !self.locked.is_empty() {
            for k in &self.locked {
                if inner.locks.get(k) == Some(&self.id) {
                    inner.locks.remove(k);
                }
            }
            self.store.released.bump();
        }
    }
}

/// Adds `index` to `schema`: 1072 for an unknown column, 1061 for a
/// name already used, as MySQL.
fn add_index(schema: &mut TableSchema, index: &IndexDef) -> Result<(), SqlError> {
    if let Some(c) = index.columns.iter().find(|c| schema.column(c).is_none()) {
        return Err(SqlError::new(
            1072,
            "42000",
            format!("Key column '{c}' doesn't exist in table"),
        ));
    }
    if schema
        .indexes
        .iter()
        .any(|i| i.name.eq_ignore_ascii_case(&index.name))
    {
        return Err(SqlError::new(
            1061,
            "42000",
            format!("Duplicate key name '{}'", index.name),
        ));
    }
    schema.indexes.push(index.clone());
    Ok(())
}

fn key(name: &str) -> String {
    name.to_lowercase()
}

impl Store {
    /// A store with the `test` database, as TiDB starts with.
    pub fn new() -> Arc<Self> {
        let s = Arc::new(Self::default());
        // Cannot fail on an empty store.
        let _ = s.create_database("test", true);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in the double; keep going
        // with the data as it is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an optimistic transaction on the latest snapshot.
    pub fn begin(self: &Arc<Self>) -> Txn {
        self.begin_mode(false)
    }

    /// Starts a transaction on the latest snapshot, pessimistic or not.
    pub fn begin_mode(self: &Arc<Self>, pessimistic: bool) -> Txn {
        let mut inner = self.lock();
        let start_ts = inner.ts;
        *inner.active.entry(start_ts).or_default() += 1;
        inner.txn_ids += 1;
        Txn {
            store: Arc::clone(self),
            id: inner.txn_ids,
            start_ts,
            pessimistic,
            for_update_ts: None,
            locked: HashSet::new(),
            writes: BTreeMap::new(),
        }
    }

    /// Makes `txn`'s reads see the latest commits (plus its own writes)
    /// until [`Txn::end_current_read`]: a pessimistic write statement.
    /// The versions it reads stay: they are the newest.
    pub fn begin_current_read(&self, txn: &mut Txn) {
        txn.for_update_ts = Some(self.lock().ts);
    }

    /// Locks `keys` for `txn` (a pessimistic write statement's keys),
    /// all or none. Leaves a wait edge for deadlock detection when it
    /// must wait; the next call (or the transaction's end) removes it.
    pub fn lock_keys(&self, txn: &mut Txn, keys: &[(u64, i64)]) -> Locking {
        let mut inner = self.lock();
        inner.waits.remove(&txn.id);
        let read_ts = txn.read_ts();
        for k in keys {
            let Some(holder) = inner.locks.get(k).copied() else {
                continue;
            };
            if holder == txn.id {
                continue;
            }
            // A cycle: the holder waits, transitively, for us. (Each
            // transaction waits for at most one other; the walk is bounded
            // by the number of waits.)
            let mut at = holder;
            for _ in 0..=inner.waits.len() {
                match inner.waits.get(&at) {
                    Some(&next) if next == txn.id => return Locking::Deadlock,
                    Some(&next) => at = next,
                    None => break,
                }
            }
            inner.waits.insert(txn.id, holder);
            return Locking::Wait(ReleaseWatch {
                released: self.released.clone(),
                seen: self.released.version.load(Ordering::SeqCst),
            });
        }
        let stale = keys.iter().any(|(table, k)| {
            table_by_id(&inner, *table)
                .and_then(|t| t.rows.get(k))
                .and_then(|v| v.last())
                .is_some_and(|v| v.ts > read_ts)
        });
        if stale {
            return Locking::Stale;
        }
        for k in keys {
            inner.locks.insert(*k, txn.id);
            txn.locked.insert(*k);
        }
        Locking::Locked
    }

    /// Forgets `txn`'s lock wait (it gave up: lock wait timeout).
    pub fn stop_waiting(&self, txn_id: u64) {
        self.lock().waits.remove(&txn_id);
    }

    /// Whether a database exists.
    pub fn has_database(&self, db: &str) -> bool {
        self.lock().dbs.contains_key(&key(db))
    }

    /// The database's name as created.
    pub fn database_name(&self, db: &str) -> Option<String> {
        self.lock().dbs.get(&key(db)).map(|d| d.name.clone())
    }

    /// Database names, sorted.
    pub fn databases(&self) -> Vec<String> {
        self.lock().dbs.values().map(|d| d.name.clone()).collect()
    }

    /// Table names of a database, sorted.
    pub fn tables(&self, db: &str) -> Result<Vec<String>, SqlError> {
        let inner = self.lock();
        let d = inner
            .dbs
            .get(&key(db))
            .ok_or_else(|| SqlError::unknown_db(db))?;
        Ok(d.tables.values().map(|t| t.schema.name.clone()).collect())
    }

    /// CREATE DATABASE.
    pub fn create_database(&self, name: &str, if_not_exists: bool) -> Result<(), SqlError> {
        let mut inner = self.lock();
        if inner.dbs.contains_key(&key(name)) {
            if if_not_exists {
                return Ok(());
            }
            return Err(SqlError::new(
                1007,
                "HY000",
                format!("Can't create database '{name}'; database exists"),
            ));
        }
        inner.dbs.insert(
            key(name),
            Database {
                name: name.to_string(),
                tables: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// DROP DATABASE.
    pub fn drop_database(&self, name: &str, if_exists: bool) -> Result<(), SqlError> {
        let mut inner = self.lock();
        match inner.dbs.remove(&key(name)) {
            Some(d) => {
                for t in d.tables.values() {
                    inner.by_id.remove(&t.schema.id);
                }
                Ok(())
            }
            None if if_exists => Ok(()),
            None => Err(SqlError::new(
                1008,
                "HY000",
                format!("Can't drop database '{name}'; database doesn't exist"),
            )),
        }
    }

    /// CREATE TABLE in `db`.
    pub fn create_table(&self, db: &str, def: &CreateTable) -> Result<(), SqlError> {
        let name = &def.table.name;
        let mut pk = def.primary_key.as_ref().and_then(|p| {
            def.columns
                .iter()
                .position(|c| c.name.eq_ignore_ascii_case(p))
        });
        if def.primary_key.is_some() && pk.is_none() {
            return Err(SqlError::new(
                1072,
                "42000",
                format!(
                    "Key column '{}' doesn't exist in table",
                    def.primary_key.as_deref().unwrap_or_default()
                ),
            ));
        }
        for (i, c) in def.columns.iter().enumerate() {
            if c.primary_key {
                if pk.is_some_and(|p| p != i) {
                    return Err(SqlError::new(1068, "42000", "Multiple primary key defined"));
                }
                pk = Some(i);
            }
        }
        let Some(pk) = pk else {
            return Err(SqlError::unsupported(
                "a table without an integer PRIMARY KEY (the double keys rows by it)",
            ));
        };
        if !matches!(def.columns[pk].ty, ColType::Int(_) | ColType::BigInt) {
            return Err(SqlError::unsupported("a non-integer PRIMARY KEY"));
        }
        if def
            .columns
            .iter()
            .enumerate()
            .any(|(i, c)| c.auto_increment && i != pk)
        {
            return Err(SqlError::new(
                1075,
                "42000",
                "Incorrect table definition; there can be only one auto column and it must be defined as a key",
            ));
        }
        let mut inner = self.lock();
        let Some(d) = inner.dbs.get(&key(db)) else {
            return Err(SqlError::unknown_db(db));
        };
        let db_name = d.name.clone();
        if d.tables.contains_key(&key(name)) {
            if def.if_not_exists {
                return Ok(());
            }
            return Err(SqlError::new(
                1050,
                "42S01",
                format!("Table '{db_name}.{name}' already exists"),
            ));
        }
        inner.next_table_id += 1;
        let id = inner.next_table_id;
        let columns = def
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| ColumnSchema {
                name: c.name.clone(),
                ty: c.ty,
                not_null: c.not_null || i == pk,
                default: c.default.clone().unwrap_or(Value::Null),
                auto_increment: c.auto_increment,
            })
            .collect();
        let schema = Arc::new(TableSchema {
            id,
            db: db_name,
            name: name.clone(),
            columns,
            pk,
            indexes: Vec::new(),
        });
        let mut schema = schema;
        for index in &def.indexes {
            add_index(Arc::make_mut(&mut schema), index)?;
        }
        inner.by_id.insert(id, (key(db), key(name)));
        // Checked above that the database exists.
        if let Some(d) = inner.dbs.get_mut(&key(db)) {
            d.tables.insert(
                key(name),
                Table {
                    schema,
                    rows: BTreeMap::new(),
                    next_auto_id: 1,
                },
            );
        }
        Ok(())
    }

    /// CREATE INDEX: checks the columns and the name and records the index
    /// in the schema. Sessions holding the old schema `Arc` keep working:
    /// the rows are unchanged.
    pub fn create_index(&self, db: &str, table: &str, index: &IndexDef) -> Result<(), SqlError> {
        let mut inner = self.lock();
        let d = inner
            .dbs
            .get_mut(&key(db))
            .ok_or_else(|| SqlError::unknown_db(db))?;
        let db_name = d.name.clone();
        let t = d
            .tables
            .get_mut(&key(table))
            .ok_or_else(|| SqlError::no_such_table(&db_name, table))?;
        add_index(Arc::make_mut(&mut t.schema), index)
    }

    /// DROP TABLE.
    pub fn drop_table(&self, db: &str, name: &str, if_exists: bool) -> Result<(), SqlError> {
        let mut inner = self.lock();
        let removed = inner
            .dbs
            .get_mut(&key(db))
            .and_then(|d| d.tables.remove(&key(name)));
        match removed {
            Some(t) => {
                inner.by_id.remove(&t.schema.id);
                Ok(())
            }
            None if if_exists => Ok(()),
            None => Err(SqlError::new(
                1051,
                "42S02",
                format!("Unknown table '{db}.{name}'"),
            )),
        }
    }

    /// A table's schema.
    pub fn schema(&self, db: &str, table: &str) -> Result<Arc<TableSchema>, SqlError> {
        let inner = self.lock();
        let d = inner
            .dbs
            .get(&key(db))
            .ok_or_else(|| SqlError::unknown_db(db))?;
        d.tables
            .get(&key(table))
            .map(|t| Arc::clone(&t.schema))
            .ok_or_else(|| SqlError::no_such_table(&d.name, table))
    }

    /// Rows of `schema`'s table with keys in `range`, as `txn` sees them.
    pub fn scan(
        &self,
        txn: &Txn,
        schema: &TableSchema,
        range: (Bound<i64>, Bound<i64>),
    ) -> Result<Vec<(i64, Row)>, SqlError> {
        let mut out: BTreeMap<i64, Row> = BTreeMap::new();
        {
            let inner = self.lock();
            let t = table_by_id(&inner, schema.id)
                .ok_or_else(|| SqlError::no_such_table(&schema.db, &schema.name))?;
            for (k, versions) in t.rows.range(range) {
                if let Some(v) = versions.iter().rev().find(|v| v.ts <= txn.read_ts())
                    && let Some(row) = &v.row
                {
                    out.insert(*k, Arc::clone(row));
                }
            }
        }
        let lo = (schema.id, i64::MIN);
        let hi = (schema.id, i64::MAX);
        for ((_, k), w) in txn.writes.range(lo..=hi) {
            if !range_contains(&range, *k) {
                continue;
            }
            match w {
                Some(row) => out.insert(*k, Arc::clone(row)),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// Allocates the next auto-increment id of a table.
    pub fn alloc_auto_id(&self, schema: &TableSchema) -> Result<i64, SqlError> {
        let mut inner = self.lock();
        let t = table_by_id_mut(&mut inner, schema.id)
            .ok_or_else(|| SqlError::no_such_table(&schema.db, &schema.name))?;
        let id = t.next_auto_id;
        t.next_auto_id += 1;
        Ok(id)
    }

    /// Moves the auto-increment counter past an explicitly inserted id.
    pub fn observe_id(&self, schema: &TableSchema, id: i64) {
        let mut inner = self.lock();
        if let Some(t) = table_by_id_mut(&mut inner, schema.id)
            && id >= t.next_auto_id
        {
            t.next_auto_id = id.saturating_add(1);
        }
    }

    /// Commits `txn`: all its writes become visible at once, or none do.
    pub fn commit(&self, mut txn: Txn) -> Result<(), SqlError> {
        if txn.writes.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut txn.writes);
        let mut inner = self.lock();
        // Check everything first: a failed commit changes nothing.
        for (table_id, k) in writes.keys() {
            let Some(t) = table_by_id(&inner, *table_id) else {
                return Err(SqlError::new(
                    8028,
                    "HY000",
                    "Information schema is changed during the execution of the statement (a table written by this transaction was dropped) [try again later]",
                ));
            };
            // A pessimistic transaction's keys are locked and were read at
            // their latest version: nothing can conflict.
            if txn.locked.contains(&(*table_id, *k)) {
                continue;
            }
            // A key another transaction has locked is about to change:
            // a conflict as much as a newer commit.
            let locked_by_other = inner
                .locks
                .get(&(*table_id, *k))
                .is_some_and(|&holder| holder != txn.id);
            let newer = t
                .rows
                .get(k)
                .and_then(|v| v.last())
                .map(|v| v.ts)
                .filter(|&ts| ts > txn.start_ts);
            if newer.is_some() || locked_by_other {
                return Err(SqlError::new(
                    9007,
                    "HY000",
                    format!(
                        "Write conflict, txnStartTS={}, conflictCommitTS={}, key={{tableID={}, handle={}}}, reason=optimistic [try again later]",
                        txn.start_ts,
                        newer.unwrap_or(0),
                        table_id,
                        k
                    ),
                ));
            }
        }
        inner.ts += 1;
        let commit_ts = inner.ts;
        // Versions older than the oldest open snapshot (other than this
        // transaction's) can go, except the newest of them.
        let oldest = inner
            .active
            .iter()
            .find(|&(&ts, &n)| ts != txn.start_ts || n > 1)
            .map_or(commit_ts, |(&ts, _)| ts);
        for ((table_id, k), row) in writes {
            // Checked above that every table exists.
            let Some(t) = table_by_id_mut(&mut inner, table_id) else {
                continue;
            };
            let versions = t.rows.entry(k).or_default();
            versions.push(Version { ts: commit_ts, row });
            if let Some(keep_from) = versions.iter().rposition(|v| v.ts <= oldest) {
                versions.drain(..keep_from);
            }
            if versions.len() == 1 && versions[0].row.is_none() && versions[0].ts <= oldest {
                t.rows.remove(&k);
            }
        }
        Ok(())
    }
}

fn range_contains(range: &(Bound<i64>, Bound<i64>), k: i64) -> bool {
    let lo = match range.0 {
        Bound::Included(a) => k >= a,
        Bound::Excluded(a) => k > a,
        Bound::Unbounded => true,
    };
    let hi = match range.1 {
        Bound::Included(b) => k <= b,
        Bound::Excluded(b) => k < b,
        Bound::Unbounded => true,
    };
    lo && hi
}

fn table_by_id(inner: &Inner, id: u64) -> Option<&Table> {
    let (d, t) = inner.by_id.get(&id)?;
    inner.dbs.get(d)?.tables.get(t)
}

fn table_by_id_mut(inner: &mut Inner, id: u64) -> Option<&mut Table> {
    let (d, t) = inner.by_id.get(&id)?.clone();
    inner.dbs.get_mut(&d)?.tables.get_mut(&t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tidb::sql::{Stmt, parse};

    fn setup() -> (Arc<Store>, Arc<TableSchema>) {
        let s = Store::new();
        let Stmt::CreateTable(def) = parse("CREATE TABLE t (id INT PRIMARY KEY, v INT)", false)
            .unwrap()
            .remove(0)
            .stmt
        else {
            panic!()
        };
        s.create_table("test", &def).unwrap();
        let schema = s.schema("test", "T").unwrap();
        (s, schema)
    }

    fn row(id: i64, v: i64) -> Option<Row> {
        Some(Arc::new(vec![Value::Int(id), Value::Int(v)]))
    }

    #[test]
    fn snapshots_do_not_see_later_commits() {
        let (s, t) = setup();
        let mut w = s.begin();
        w.put(t.id, 1, row(1, 10));
        s.commit(w).unwrap();
        let r = s.begin();
        let mut w = s.begin();
        w.put(t.id, 1, row(1, 20));
        s.commit(w).unwrap();
        let seen = s
            .scan(&r, &t, (Bound::Unbounded, Bound::Unbounded))
            .unwrap();
        assert_eq!(seen[0].1[1], Value::Int(10));
        let fresh = s.begin();
        let seen = s
            .scan(&fresh, &t, (Bound::Unbounded, Bound::Unbounded))
            .unwrap();
        assert_eq!(seen[0].1[1], Value::Int(20));
    }

    #[test]
    fn first_committer_wins() {
        let (s, t) = setup();
        let mut a = s.begin();
        let mut b = s.begin();
        a.put(t.id, 1, row(1, 1));
        b.put(t.id, 1, row(1, 2));
        s.commit(a).unwrap();
        assert_eq!(s.commit(b).unwrap_err().code, 9007);
        // Disjoint keys do not conflict.
        let mut a = s.begin();
        let mut b = s.begin();
        a.put(t.id, 2, row(2, 1));
        b.put(t.id, 3, row(3, 2));
        s.commit(a).unwrap();
        s.commit(b).unwrap();
    }

    #[test]
    fn own_writes_and_deletes_are_visible_before_commit() {
        let (s, t) = setup();
        let mut w = s.begin();
        w.put(t.id, 1, row(1, 1));
        w.put(t.id, 2, row(2, 2));
        s.commit(w).unwrap();
        let mut x = s.begin();
        x.put(t.id, 1, None);
        x.put(t.id, 5, row(5, 5));
        let keys: Vec<i64> = s
            .scan(&x, &t, (Bound::Unbounded, Bound::Unbounded))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![2, 5]);
        drop(x);
        let keys: Vec<i64> = s
            .scan(&s.begin(), &t, (Bound::Unbounded, Bound::Unbounded))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![1, 2]);
    }

    #[test]
    fn pessimistic_locks_wait_and_find_deadlocks() {
        let (s, t) = setup();
        let mut a = s.begin_mode(true);
        let mut b = s.begin_mode(true);
        assert!(matches!(s.lock_keys(&mut a, &[(t.id, 1)]), Locking::Locked));
        assert!(matches!(s.lock_keys(&mut b, &[(t.id, 2)]), Locking::Locked));
        let Locking::Wait(rx) = s.lock_keys(&mut b, &[(t.id, 1)]) else {
            panic!("b waits for a")
        };
        assert!(!rx.has_changed());
        // a now waits for b's key: a cycle.
        assert!(matches!(
            s.lock_keys(&mut a, &[(t.id, 2)]),
            Locking::Deadlock
        ));
        // Rolling a back releases its lock and wakes b.
        drop(a);
        assert!(rx.has_changed());
        assert!(matches!(s.lock_keys(&mut b, &[(t.id, 1)]), Locking::Locked));
        // An optimistic writer of a locked key conflicts at commit.
        let mut o = s.begin();
        o.put(t.id, 1, row(1, 9));
        assert_eq!(s.commit(o).unwrap_err().code, 9007);
        b.put(t.id, 1, row(1, 5));
        s.commit(b).unwrap();
        let seen = s
            .scan(&s.begin(), &t, (Bound::Unbounded, Bound::Unbounded))
            .unwrap();
        assert_eq!(seen[0].1[1], Value::Int(5));
    }

    #[test]
    fn current_reads_see_later_commits_and_stale_locks_retry() {
        let (s, t) = setup();
        let all = (Bound::Unbounded, Bound::Unbounded);
        let mut p = s.begin_mode(true);
        let mut w = s.begin();
        w.put(t.id, 1, row(1, 10));
        s.commit(w).unwrap();
        assert!(s.scan(&p, &t, all).unwrap().is_empty(), "snapshot read");
        // Locking a key committed after what the statement read: run again.
        assert!(matches!(s.lock_keys(&mut p, &[(t.id, 1)]), Locking::Stale));
        s.begin_current_read(&mut p);
        assert_eq!(s.scan(&p, &t, all).unwrap()[0].1[1], Value::Int(10));
        assert!(matches!(s.lock_keys(&mut p, &[(t.id, 1)]), Locking::Locked));
        p.end_current_read();
        p.put(t.id, 1, row(1, 11));
        // A pessimistic commit does not conflict with what it locked.
        s.commit(p).unwrap();
    }
}
