//! The system variables the double knows, with TiDB's defaults.
//!
//! Values are kept as strings, as TiDB keeps them; reading `@@name` turns
//! booleans into 0/1 and integers into numbers.

use super::error::SqlError;
use super::value::Value;

/// How a variable's value is read and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// ON/OFF, read as 1/0.
    Bool,
    /// An integer.
    Int,
    /// Free text.
    Str,
}

/// Where a variable can be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Session and global.
    Both,
    /// Global only.
    Global,
    /// Read-only (computed or fixed).
    ReadOnly,
}

/// One known variable.
#[derive(Debug, Clone, Copy)]
pub struct SysVar {
    /// Name, lowercase.
    pub name: &'static str,
    /// Default value.
    pub default: &'static str,
    /// Kind.
    pub kind: VarKind,
    /// Scope.
    pub scope: Scope,
}

const fn var(name: &'static str, default: &'static str, kind: VarKind, scope: Scope) -> SysVar {
    SysVar {
        name,
        default,
        kind,
        scope,
    }
}

use Scope::{Both, Global, ReadOnly};
use VarKind::{Bool, Int, Str};

/// TiDB's `version_comment`.
pub const VERSION_COMMENT: &str =
    "TiDB Server (Apache License 2.0) Community Edition, MySQL 8.0 compatible";

/// Every variable the double knows. Read-only ones whose value depends on
/// the session or instance are computed by the session (`version`,
/// `hostname`, `port`, `in_transaction`, ...).
pub const SYSVARS: &[SysVar] = &[
    var("autocommit", "ON", Bool, Both),
    var("auto_increment_increment", "1", Int, Both),
    var("auto_increment_offset", "1", Int, Both),
    var("character_set_client", "utf8mb4", Str, Both),
    var("character_set_connection", "utf8mb4", Str, Both),
    var("character_set_database", "utf8mb4", Str, Both),
    var("character_set_results", "utf8mb4", Str, Both),
    var("character_set_server", "utf8mb4", Str, Both),
    var("collation_connection", "utf8mb4_bin", Str, Both),
    var("collation_database", "utf8mb4_bin", Str, Both),
    var("collation_server", "utf8mb4_bin", Str, Both),
    var(
        "default_authentication_plugin",
        "mysql_native_password",
        Str,
        Global,
    ),
    var("div_precision_increment", "4", Int, Both),
    var("foreign_key_checks", "OFF", Bool, Both),
    var("group_concat_max_len", "1024", Int, Both),
    var("init_connect", "", Str, Global),
    var("interactive_timeout", "28800", Int, Both),
    var("innodb_lock_wait_timeout", "50", Int, Both),
    var("lower_case_table_names", "2", Int, ReadOnly),
    var("max_allowed_packet", "67108864", Int, Both),
    var("max_execution_time", "0", Int, Both),
    var("net_buffer_length", "16384", Int, Both),
    var("net_read_timeout", "30", Int, Both),
    var("net_write_timeout", "60", Int, Both),
    var("sql_auto_is_null", "OFF", Bool, Both),
    var(
        "sql_mode",
        "ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION",
        Str,
        Both,
    ),
    var("sql_safe_updates", "OFF", Bool, Both),
    var("sql_select_limit", "18446744073709551615", Int, Both),
    var("system_time_zone", "UTC", Str, ReadOnly),
    // TiDB's default since v3.0.8 (`DefTiDBTxnMode`): pessimistic.
    var("tidb_txn_mode", "pessimistic", Str, Both),
    var("time_zone", "SYSTEM", Str, Both),
    var("transaction_isolation", "REPEATABLE-READ", Str, Both),
    var("transaction_read_only", "OFF", Bool, Both),
    var("tx_isolation", "REPEATABLE-READ", Str, Both),
    var("tx_read_only", "OFF", Bool, Both),
    var("unique_checks", "ON", Bool, Both),
    var("version_comment", VERSION_COMMENT, Str, ReadOnly),
    var("wait_timeout", "28800", Int, Both),
    var("license", "Apache License 2.0", Str, ReadOnly),
    var("performance_schema", "OFF", Bool, ReadOnly),
    var("query_cache_size", "1048576", Int, ReadOnly),
    var("query_cache_type", "OFF", Str, ReadOnly),
    // Computed by the session; the defaults here are placeholders.
    var("version", "", Str, ReadOnly),
    var("hostname", "", Str, ReadOnly),
    var("port", "4000", Int, ReadOnly),
    var("socket", "", Str, ReadOnly),
    var("in_transaction", "0", Int, ReadOnly),
    var("tidb_current_ts", "0", Int, ReadOnly),
    var("last_insert_id", "0", Int, ReadOnly),
    var("identity", "0", Int, ReadOnly),
    var("warning_count", "0", Int, ReadOnly),
    var("error_count", "0", Int, ReadOnly),
];

/// Looks a variable up by (lowercase) name.
pub fn lookup(name: &str) -> Option<&'static SysVar> {
    SYSVARS.iter().find(|v| v.name == name)
}

impl SysVar {
    /// Whether a session can set it (and so whether it is migrated).
    pub fn session_settable(&self) -> bool {
        self.scope == Scope::Both
    }

    /// Validates and canonicalizes a new value.
    pub fn canonical(&self, v: &Value) -> Result<String, SqlError> {
        let bad = || {
            SqlError::new(
                1231,
                "42000",
                format!(
                    "Variable '{}' can't be set to the value of '{}'",
                    self.name,
                    v.to_text().unwrap_or_else(|| "NULL".into())
                ),
            )
        };
        match self.kind {
            VarKind::Bool => match v {
                Value::Int(0) | Value::UInt(0) => Ok("OFF".into()),
                Value::Int(1) | Value::UInt(1) => Ok("ON".into()),
                Value::Str(s) => match s.to_ascii_uppercase().as_str() {
                    "ON" | "1" | "TRUE" => Ok("ON".into()),
                    "OFF" | "0" | "FALSE" => Ok("OFF".into()),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            },
            VarKind::Int => match v {
                Value::Int(i) => Ok(i.to_string()),
                Value::UInt(u) => Ok(u.to_string()),
                Value::Double(d) => Ok((d.round() as i64).to_string()),
                Value::Str(s) => s
                    .trim()
                    .parse::<i64>()
                    .map(|i| i.to_string())
                    .map_err(|_| bad()),
                Value::Null => Err(bad()),
            },
            VarKind::Str => Ok(v.to_text().unwrap_or_default()),
        }
    }

    /// The value `SELECT @@name` shows for a stored string.
    pub fn read(&self, s: &str) -> Value {
        match self.kind {
            VarKind::Bool => Value::Int(i64::from(s == "ON")),
            VarKind::Int => match s.parse::<i64>() {
                Ok(i) => Value::Int(i),
                Err(_) => s.parse::<u64>().map_or(Value::Str(s.into()), Value::UInt),
            },
            VarKind::Str => Value::Str(s.into()),
        }
    }
}
