//! The command byte that opens every client request in the command phase.

/// A `COM_*` command code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// COM_SLEEP (internal to servers; never valid from a client).
    Sleep,
    /// COM_QUIT: close the connection, no response.
    Quit,
    /// COM_INIT_DB: change the default database.
    InitDb,
    /// COM_QUERY: a text-protocol statement.
    Query,
    /// COM_FIELD_LIST: column definitions of a table (deprecated).
    FieldList,
    /// COM_CREATE_DB (deprecated).
    CreateDb,
    /// COM_DROP_DB (deprecated).
    DropDb,
    /// COM_REFRESH (deprecated).
    Refresh,
    /// COM_SHUTDOWN.
    Shutdown,
    /// COM_STATISTICS: a single human-readable string, no OK.
    Statistics,
    /// COM_PROCESS_INFO: a result set (deprecated).
    ProcessInfo,
    /// COM_CONNECT (internal).
    Connect,
    /// COM_PROCESS_KILL.
    ProcessKill,
    /// COM_DEBUG: EOF or ERR.
    Debug,
    /// COM_PING.
    Ping,
    /// COM_TIME (internal).
    Time,
    /// COM_DELAYED_INSERT (internal).
    DelayedInsert,
    /// COM_CHANGE_USER: re-authenticate as another user.
    ChangeUser,
    /// COM_BINLOG_DUMP: replication stream.
    BinlogDump,
    /// COM_TABLE_DUMP.
    TableDump,
    /// COM_CONNECT_OUT (internal).
    ConnectOut,
    /// COM_REGISTER_SLAVE.
    RegisterSlave,
    /// COM_STMT_PREPARE.
    StmtPrepare,
    /// COM_STMT_EXECUTE.
    StmtExecute,
    /// COM_STMT_SEND_LONG_DATA: no response.
    StmtSendLongData,
    /// COM_STMT_CLOSE: no response.
    StmtClose,
    /// COM_STMT_RESET.
    StmtReset,
    /// COM_SET_OPTION: multi-statements on or off.
    SetOption,
    /// COM_STMT_FETCH: rows from an open cursor.
    StmtFetch,
    /// COM_DAEMON (internal).
    Daemon,
    /// COM_BINLOG_DUMP_GTID: replication stream.
    BinlogDumpGtid,
    /// COM_RESET_CONNECTION.
    ResetConnection,
    /// COM_STMT_BULK_EXECUTE (MariaDB, 0xFA): execute a prepared statement
    /// once per parameter set of an array, with
    /// `MariaDbCapabilities::STMT_BULK_OPERATIONS`.
    StmtBulkExecute,
    /// Any other byte; forwarded, the server answers it with an error.
    Unknown(u8),
}

impl Command {
    /// Decodes a command byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Sleep,
            0x01 => Self::Quit,
            0x02 => Self::InitDb,
            0x03 => Self::Query,
            0x04 => Self::FieldList,
            0x05 => Self::CreateDb,
            0x06 => Self::DropDb,
            0x07 => Self::Refresh,
            0x08 => Self::Shutdown,
            0x09 => Self::Statistics,
            0x0a => Self::ProcessInfo,
            0x0b => Self::Connect,
            0x0c => Self::ProcessKill,
            0x0d => Self::Debug,
            0x0e => Self::Ping,
            0x0f => Self::Time,
            0x10 => Self::DelayedInsert,
            0x11 => Self::ChangeUser,
            0x12 => Self::BinlogDump,
            0x13 => Self::TableDump,
            0x14 => Self::ConnectOut,
            0x15 => Self::RegisterSlave,
            0x16 => Self::StmtPrepare,
            0x17 => Self::StmtExecute,
            0x18 => Self::StmtSendLongData,
            0x19 => Self::StmtClose,
            0x1a => Self::StmtReset,
            0x1b => Self::SetOption,
            0x1c => Self::StmtFetch,
            0x1d => Self::Daemon,
            0x1e => Self::BinlogDumpGtid,
            0x1f => Self::ResetConnection,
            0xfa => Self::StmtBulkExecute,
            other => Self::Unknown(other),
        }
    }

    /// The command byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Sleep => 0x00,
            Self::Quit => 0x01,
            Self::InitDb => 0x02,
            Self::Query => 0x03,
            Self::FieldList => 0x04,
            Self::CreateDb => 0x05,
            Self::DropDb => 0x06,
            Self::Refresh => 0x07,
            Self::Shutdown => 0x08,
            Self::Statistics => 0x09,
            Self::ProcessInfo => 0x0a,
            Self::Connect => 0x0b,
            Self::ProcessKill => 0x0c,
            Self::Debug => 0x0d,
            Self::Ping => 0x0e,
            Self::Time => 0x0f,
            Self::DelayedInsert => 0x10,
            Self::ChangeUser => 0x11,
            Self::BinlogDump => 0x12,
            Self::TableDump => 0x13,
            Self::ConnectOut => 0x14,
            Self::RegisterSlave => 0x15,
            Self::StmtPrepare => 0x16,
            Self::StmtExecute => 0x17,
            Self::StmtSendLongData => 0x18,
            Self::StmtClose => 0x19,
            Self::StmtReset => 0x1a,
            Self::SetOption => 0x1b,
            Self::StmtFetch => 0x1c,
            Self::Daemon => 0x1d,
            Self::BinlogDumpGtid => 0x1e,
            Self::ResetConnection => 0x1f,
            Self::StmtBulkExecute => 0xfa,
            Self::Unknown(b) => b,
        }
    }

    /// A stable lowercase name, used for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sleep => "sleep",
            Self::Quit => "quit",
            Self::InitDb => "init_db",
            Self::Query => "query",
            Self::FieldList => "field_list",
            Self::CreateDb => "create_db",
            Self::DropDb => "drop_db",
            Self::Refresh => "refresh",
            Self::Shutdown => "shutdown",
            Self::Statistics => "statistics",
            Self::ProcessInfo => "process_info",
            Self::Connect => "connect",
            Self::ProcessKill => "process_kill",
            Self::Debug => "debug",
            Self::Ping => "ping",
            Self::Time => "time",
            Self::DelayedInsert => "delayed_insert",
            Self::ChangeUser => "change_user",
            Self::BinlogDump => "binlog_dump",
            Self::TableDump => "table_dump",
            Self::ConnectOut => "connect_out",
            Self::RegisterSlave => "register_slave",
            Self::StmtPrepare => "stmt_prepare",
            Self::StmtExecute => "stmt_execute",
            Self::StmtSendLongData => "stmt_send_long_data",
            Self::StmtClose => "stmt_close",
            Self::StmtReset => "stmt_reset",
            Self::SetOption => "set_option",
            Self::StmtFetch => "stmt_fetch",
            Self::Daemon => "daemon",
            Self::BinlogDumpGtid => "binlog_dump_gtid",
            Self::ResetConnection => "reset_connection",
            Self::StmtBulkExecute => "stmt_bulk_execute",
            Self::Unknown(_) => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn every_byte_round_trips() {
        for b in 0..=u8::MAX {
            assert_eq!(Command::from_byte(b).to_byte(), b);
        }
    }
}
