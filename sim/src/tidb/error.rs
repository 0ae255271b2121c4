//! The MySQL errors the double sends, with TiDB's codes, SQL states and
//! message texts.

use std::fmt;

/// An error that reaches the client as an ERR packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SqlError {
    /// MySQL / TiDB error code.
    pub code: u16,
    /// SQLSTATE, five characters.
    pub state: &'static str,
    /// Message text.
    pub message: String,
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ERROR {} ({}): {}", self.code, self.state, self.message)
    }
}

impl SqlError {
    /// An error with a code, state and message.
    pub fn new(code: u16, state: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            state,
            message: message.into(),
        }
    }

    /// 1105: a statement or clause outside the double's SQL subset.
    pub fn unsupported(what: impl fmt::Display) -> Self {
        Self::new(
            1105,
            "HY000",
            format!("unsupported in the TiDB double: {what}"),
        )
    }

    /// 1205, as TiDB words it (`ErrLockWaitTimeout`).
    pub fn lock_wait_timeout() -> Self {
        Self::new(
            1205,
            "HY000",
            "Lock wait timeout exceeded; try restarting transaction",
        )
    }

    /// 1213, as TiDB words it (`ErrDeadlock`); the transaction is rolled back.
    pub fn deadlock() -> Self {
        Self::new(
            1213,
            "40001",
            "Deadlock found when trying to get lock; try restarting transaction",
        )
    }

    /// 1105 with a free-form message.
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(1105, "HY000", message)
    }

    /// 1064: the text is not SQL at all.
    pub fn syntax(near: &str) -> Self {
        let near: String = near.chars().take(80).collect();
        Self::new(
            1064,
            "42000",
            format!(
                "You have an error in your SQL syntax; check the manual that corresponds to your TiDB version for the right syntax to use line 1 near \"{near}\""
            ),
        )
    }

    /// 1045, exactly as TiDB words it.
    pub fn access_denied(user: &str, host: &str, using_password: bool) -> Self {
        let yes = if using_password { "YES" } else { "NO" };
        Self::new(
            1045,
            "28000",
            format!("Access denied for user '{user}'@'{host}' (using password: {yes})"),
        )
    }

    /// 8146: TiDB refuses SHOW SESSION_STATES.
    pub fn cannot_migrate(reason: &str) -> Self {
        Self::new(
            8146,
            "HY000",
            format!("cannot migrate the current session: {reason}"),
        )
    }

    /// 1046.
    pub fn no_db() -> Self {
        Self::new(1046, "3D000", "No database selected")
    }

    /// 1049.
    pub fn unknown_db(db: &str) -> Self {
        Self::new(1049, "42000", format!("Unknown database '{db}'"))
    }

    /// 1146.
    pub fn no_such_table(db: &str, table: &str) -> Self {
        Self::new(1146, "42S02", format!("Table '{db}.{table}' doesn't exist"))
    }

    /// 1054.
    pub fn unknown_column(col: &str, clause: &str) -> Self {
        Self::new(
            1054,
            "42S22",
            format!("Unknown column '{col}' in '{clause}'"),
        )
    }

    /// 1193.
    pub fn unknown_sysvar(name: &str) -> Self {
        Self::new(1193, "HY000", format!("Unknown system variable '{name}'"))
    }

    /// 1243.
    pub fn unknown_stmt(handler: &str, given_to: &str) -> Self {
        Self::new(
            1243,
            "HY000",
            format!("Unknown prepared statement handler ({handler}) given to {given_to}"),
        )
    }
}
