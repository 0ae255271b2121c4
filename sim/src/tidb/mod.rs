//! The TiDB double: a TiDB-compatible server model, small enough to reason
//! about, faithful where the proxy looks.
//!
//! - [`Cluster`]: what a TiDB cluster's instances share: a transactional
//!   store (snapshot reads, first-committer-wins commits), the accounts
//!   (`root` with no password, `app` / `app-Pa55word` with
//!   mysql_native_password, `sha2user` / `sha2-Pa55word` with
//!   caching_sha2_password), global variables and the session-token key.
//! - [`TidbServer::start`]: one instance on any
//!   [`Network`](tiproxy_runtime::net::Network) with TiDB's
//!   greeting (version `8.0.11-TiDB-v8.5.0`, capabilities `0x051BA6AF`,
//!   collation 46, a 20-byte salt, `mysql_native_password`), TiDB's auth
//!   flow (auth switch with the connection's salt whenever the client names
//!   another plugin, e.g. the proxy's `auth_unknown_plugin`; caching_sha2
//!   fast and full paths; `tidb_session_token`), an optional PROXY v2
//!   header, a status port and TiDB's graceful shutdown.
//! - [`LocalCluster`]: a cluster and its instances in one process (what the
//!   `tidb-double` binary serves).
//! - [`client::RawClient`]: a minimal MySQL client over any stream, for
//!   tests and simulated clients.
//!
//! # The SQL subset
//!
//! Everything else is refused with 1105 `unsupported in the TiDB double:
//! ...` (or 1064 for text that is not SQL).
//!
//! - `SELECT expr [[AS] alias], ...` without a table: literals, `?`,
//!   `@user_var`, `@@[session.|global.]var`, `DATABASE()`, `SCHEMA()`,
//!   `CONNECTION_ID()`, `LAST_INSERT_ID()`, `VERSION()`, `TIDB_VERSION()`,
//!   `USER()`, `CURRENT_USER()`, `ROW_COUNT()`, `FOUND_ROWS()`, `NOW()`,
//!   `CONCAT`, `COALESCE`/`IFNULL`, `IF`, `UPPER`, `LOWER`, `LENGTH`,
//!   `CHAR_LENGTH`, `SLEEP(s)`; operators `+ - * / DIV % = <=> <> != < <= > >=
//!   AND OR NOT IS [NOT] NULL [NOT] BETWEEN [NOT] IN [NOT] LIKE`; `LIMIT`.
//!   This covers what clients send on connect (`select @@version_comment
//!   limit 1`, mysql_async's `SELECT @@max_allowed_packet,@@wait_timeout`).
//! - `SELECT [DISTINCT] * | expr, ... FROM [db.]t [WHERE expr] [ORDER BY expr [ASC|DESC], ...]
//!   [GROUP BY ... [HAVING expr]] [LIMIT n [OFFSET m] | LIMIT m, n] [FOR
//!   UPDATE]`; aggregates `COUNT(*)`, `COUNT(e)`, `SUM`, `MIN`, `MAX`, `AVG`
//!   over the whole table or per group; uncorrelated scalar and IN
//!   subqueries; `information_schema.SCHEMATA | TABLES | COLUMNS`; table
//!   aliases, `t.*`, `t.c`. Two-table joins: `FROM a [AS x] [INNER] JOIN b
//!   [AS y] ON expr`, `LEFT [OUTER] JOIN ... ON`, `FROM a, b` (nested loop,
//!   up to 4,000,000 row pairs; 1052 for an ambiguous column, 1066 for a
//!   repeated alias). Primary-key conditions (`id = k`, `BETWEEN`,
//!   `>=`, `<`, ...) narrow a single table's scan.
//! - `INSERT INTO t [(cols)] VALUES (...), (...)` (auto-increment, last
//!   insert id, 1062 on a duplicate key), `UPDATE t SET c = expr, ... [WHERE]
//!   [LIMIT]`, `DELETE FROM t [WHERE] [LIMIT]`.
//! - `CREATE DATABASE [IF NOT EXISTS]`, `DROP DATABASE [IF EXISTS]`, `USE db`,
//!   `CREATE TABLE [IF NOT EXISTS] t (id INT|BIGINT PRIMARY KEY
//!   [AUTO_INCREMENT], c INT|BIGINT|TINYINT|SMALLINT|DOUBLE|VARCHAR(n)|CHAR(n)|TEXT
//!   [NOT NULL] [DEFAULT lit], ... [, PRIMARY KEY (id)] [, [UNIQUE] KEY name
//!   (cols)])` (an integer primary key is required), `CREATE [UNIQUE] INDEX
//!   name ON t (cols)` (kept in the schema, not used for reads), `DROP TABLE
//!   [IF EXISTS]`.
//! - `BEGIN` / `START TRANSACTION [...]` / `COMMIT` / `ROLLBACK`,
//!   `SET [SESSION|GLOBAL] var = v`, `SET @@var = v`, `SET @u = v`,
//!   `SET NAMES cs [COLLATE c]`, `SET autocommit = 0|1`, `SET TRANSACTION ...`
//!   (accepted, no effect). Autocommit statements commit at once; with
//!   autocommit off the first table access opens a transaction. IN_TRANS
//!   is set in every OK/EOF while one is open. Transactions are
//!   pessimistic by default (`tidb_txn_mode`, as TiDB): a write statement
//!   reads the latest rows and locks what it writes until the transaction
//!   ends; a writer that meets a lock waits (autocommit ones too), up to
//!   `innodb_lock_wait_timeout` (50 s, then 1205 for the statement); a
//!   wait that closes a cycle is a deadlock (1213, transaction rolled
//!   back). With `tidb_txn_mode = 'optimistic'` a conflicting COMMIT fails
//!   with 9007 (first committer wins).
//! - `SHOW PROCESSLIST`, `SHOW DATABASES`, `SHOW [FULL] TABLES`, `SHOW
//!   [GLOBAL|SESSION] VARIABLES [LIKE 'p']`, `SHOW CREATE TABLE`, `SHOW WARNINGS` (empty),
//!   `SHOW SESSION_STATES`, `SET SESSION_STATES '<json>'`.
//! - `PREPARE s FROM '...' | @var`, `EXECUTE s [USING @a, ...]`,
//!   `DEALLOCATE PREPARE s`, and the binary protocol (COM_STMT_PREPARE,
//!   EXECUTE with typed and NULL parameters, binary rows, CLOSE, RESET,
//!   SEND_LONG_DATA; no cursors).
//! - Commands: COM_QUERY (multi-statements when negotiated), COM_INIT_DB,
//!   COM_PING, COM_QUIT, COM_FIELD_LIST, COM_STATISTICS, COM_SET_OPTION,
//!   COM_RESET_CONNECTION, COM_CHANGE_USER, with or without DEPRECATE_EOF.

mod auth;
pub mod client;
mod cluster;
mod conn;
mod error;
mod fleet;
pub mod pd;
mod server;
mod session;
pub mod sql;
mod states;
mod status;
mod store;
mod sysvar;
mod time;
mod token;
pub mod value;

pub use auth::{User, native_scramble, sha2_scramble};
pub use cluster::{Clock, Cluster, ClusterOptions};
pub use conn::SERVER_CAPABILITIES;
pub use error::SqlError;
pub use fleet::{InstanceInfo, LocalCluster};
pub use server::{
    DEFAULT_SERVER_VERSION, Phase, ProcessEntry, TidbHandle, TidbOptions, TidbServer,
};
pub use store::Store;
pub use token::TokenError;
pub use value::Value;
