//! Command tracking: for every command the client sends, which response
//! shape the backend will send, where in that response the stream is, the
//! server status flags, prepared statements, open cursors and pending long
//! data. Pure: fed packet headers and the few payload bytes it asks for.
//!
//! The negotiated options that change response shapes travel in
//! [`TrackerOptions`]: DEPRECATE_EOF and MariaDB's extended capabilities.
//! - CACHE_METADATA: every column count packet carries a "metadata
//!   follows" byte; when it is 0 (a COM_STMT_EXECUTE result whose columns
//!   the client already has), no column definitions follow, only the EOF
//!   that ends them when DEPRECATE_EOF is off.
//! - PROGRESS: an ERR-headed packet with code 0xFFFF while a command runs
//!   is a progress report: forwarded, the command goes on.
//! - STMT_BULK_OPERATIONS: COM_STMT_BULK_EXECUTE (0xFA) answers like
//!   COM_STMT_EXECUTE: OK, ERR, or (BULK_UNIT_RESULTS, RETURNING) a result
//!   set.
//! - EXTENDED_METADATA: column definitions carry one more length-encoded
//!   string; they are forwarded without being parsed, so nothing changes
//!   here.
//!
//! An idle tracker exports what it keeps between commands and a fresh one
//! imports it (`export.rs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::command::Command;
use crate::flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use crate::packet::MAX_PAYLOAD;
use crate::response::{
    ColumnCount, ERR_HEADER, LOCAL_INFILE_HEADER, OK_HEADER, PrepareOk, is_eof, is_progress_report,
    is_row_terminator, terminator_status,
};
use crate::wire::{Reader, WireError};

mod export;

/// The statement id MariaDB reads as "the statement prepared last" (lets a
/// client pipeline COM_STMT_PREPARE and COM_STMT_EXECUTE).
pub const LAST_PREPARED_ID: u32 = u32::MAX;

/// COM_SET_OPTION's option values.
const MULTI_STATEMENTS_ON: u16 = 0;
const MULTI_STATEMENTS_OFF: u16 = 1;

/// What was negotiated for a session that changes the shape of responses,
/// plus the one protocol option a client can change later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackerOptions {
    /// CLIENT_DEPRECATE_EOF on both legs: OK packets (0xFE header) end row
    /// streams and no EOF follows column definitions.
    pub deprecate_eof: bool,
    /// MariaDB extended capabilities in effect on both legs.
    pub mariadb: MariaDbCapabilities,
    /// Whether COM_QUERY may carry several statements: CLIENT_MULTI_STATEMENTS
    /// at connect, then whatever COM_SET_OPTION last set (the tracker keeps
    /// it current).
    pub multi_statements: bool,
}

impl TrackerOptions {
    /// The options of a session whose legs agreed on `caps` and `mariadb`.
    pub fn negotiated(caps: CapabilityFlags, mariadb: MariaDbCapabilities) -> Self {
        Self {
            deprecate_eof: caps.contains(CapabilityFlags::DEPRECATE_EOF),
            mariadb,
            multi_statements: caps.contains(CapabilityFlags::MULTI_STATEMENTS),
        }
    }

    fn cache_metadata(&self) -> bool {
        self.mariadb.contains(MariaDbCapabilities::CACHE_METADATA)
    }
}

/// A prepared statement the backend holds for the session, as its
/// COM_STMT_PREPARE response described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedStatement {
    /// Number of parameters.
    pub params: u16,
    /// Number of result columns.
    pub columns: u16,
}

/// Where the tracker is in the current exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No command in flight: the next client packet starts one.
    Idle,
    /// Waiting for the first packet of a result (OK, ERR, column count, or
    /// a LOCAL INFILE request when `infile` is allowed).
    Result {
        /// COM_QUERY may answer with a LOCAL INFILE request.
        infile: bool,
    },
    /// Column definitions of a result set; `left` remain.
    Columns {
        /// Definitions still to come.
        left: u64,
    },
    /// The EOF after column definitions (without DEPRECATE_EOF).
    ColumnsEof,
    /// Rows until a terminator or ERR.
    Rows,
    /// COM_STMT_FETCH rows.
    FetchRows,
    /// The first packet of a COM_STMT_PREPARE response.
    PrepareFirst,
    /// Parameter definitions of a prepare response.
    PrepareParams {
        /// Definitions still to come.
        left: u16,
        /// Column definitions after the parameters.
        columns: u16,
    },
    /// The EOF after parameter definitions.
    PrepareParamsEof {
        /// Column definitions after the EOF.
        columns: u16,
    },
    /// Column definitions of a prepare response.
    PrepareColumns {
        /// Definitions still to come.
        left: u16,
    },
    /// The EOF after the prepare column definitions.
    PrepareColumnsEof,
    /// COM_FIELD_LIST: column definitions until EOF or ERR.
    FieldList,
    /// A single OK, ERR or EOF.
    Simple,
    /// COM_STATISTICS: one string packet.
    Statistics,
    /// The client is uploading a LOCAL INFILE; an empty packet ends it.
    InfileUpload,
    /// COM_CHANGE_USER authentication exchange.
    ChangeUserAuth,
}

/// What the tracker made of a client packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPacket {
    /// Forward it; a response follows (or more client packets, for uploads).
    Forward,
    /// Forward it; the command has no response (the tracker is idle again).
    ForwardNoResponse,
    /// COM_QUIT: close after forwarding.
    Quit,
    /// A command the proxy cannot relay (replication streams); answer it
    /// with an error instead of forwarding.
    Unsupported(Command),
    /// COM_CHANGE_USER: the session must rewrite it (see `ChangeUser`).
    ChangeUser,
}

/// What the tracker made of a backend packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendPacket {
    /// Part of a response still in progress.
    Progress,
    /// The client must answer (auth switch / more data in COM_CHANGE_USER,
    /// LOCAL INFILE request): the client's next packets are expected.
    AwaitClient,
    /// The response is complete; `ok` is false when it ended with ERR.
    Done {
        /// Whether the command succeeded.
        ok: bool,
    },
}

/// A backend packet that does not fit the expected response shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// Bytes arrived while no response was expected.
    #[error("unexpected packet from backend while {0}")]
    Unexpected(&'static str),
    /// A packet could not be decoded.
    #[error("malformed response packet: {0}")]
    Malformed(#[from] WireError),
}

/// The per-session command tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTracker {
    options: TrackerOptions,
    status: StatusFlags,
    state: State,
    command: Option<Command>,
    statement: u32,
    /// COM_SET_OPTION in flight: the multi-statements value its OK sets.
    set_option: Option<bool>,
    prepared: BTreeMap<u32, PreparedStatement>,
    last_prepared: Option<u32>,
    cursors: BTreeSet<u32>,
    long_data: BTreeSet<u32>,
    backend_continues: bool,
    client_continues: bool,
}

impl CommandTracker {
    /// A tracker for a session whose client and backend agreed on
    /// `deprecate_eof` (and nothing else that changes shapes), starting
    /// from the status the handshake's OK reported.
    pub fn new(deprecate_eof: bool, status: StatusFlags) -> Self {
        Self::with_options(
            TrackerOptions {
                deprecate_eof,
                ..TrackerOptions::default()
            },
            status,
        )
    }

    /// A tracker for a session with the given negotiated options, starting
    /// from the status the handshake's OK reported.
    pub fn with_options(options: TrackerOptions, status: StatusFlags) -> Self {
        Self {
            options,
            status,
            state: State::Idle,
            command: None,
            statement: 0,
            set_option: None,
            prepared: BTreeMap::new(),
            last_prepared: None,
            cursors: BTreeSet::new(),
            long_data: BTreeSet::new(),
            backend_continues: false,
            client_continues: false,
        }
    }

    /// The options in effect (`multi_statements` as last set).
    pub fn options(&self) -> TrackerOptions {
        self.options
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The command in flight.
    pub fn command(&self) -> Option<Command> {
        self.command
    }

    /// Last known server status flags.
    pub fn status(&self) -> StatusFlags {
        self.status
    }

    /// Overrides the status after an exchange the proxy ran itself.
    pub fn set_status(&mut self, status: StatusFlags) {
        self.status = status;
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.status.contains(StatusFlags::IN_TRANS)
    }

    /// Prepared statements the backend holds for this session, by id.
    pub fn prepared(&self) -> &BTreeMap<u32, PreparedStatement> {
        &self.prepared
    }

    /// Statements with an open cursor.
    pub fn cursors(&self) -> &BTreeSet<u32> {
        &self.cursors
    }

    /// Statements with long data sent but not yet executed.
    pub fn long_data(&self) -> &BTreeSet<u32> {
        &self.long_data
    }

    /// Forgets the exchange in progress, as if it had never started: only
    /// the simulation's planted `ResendInFlight` does this.
    #[cfg(feature = "sim-mutations")]
    pub fn abandon_exchange(&mut self) {
        self.state = State::Idle;
        self.command = None;
        self.set_option = None;
        self.backend_continues = false;
        self.client_continues = false;
    }

    /// No exchange in progress.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle && !self.client_continues
    }

    /// Whether the session is at a point where it may move to another
    /// backend: no exchange in progress, no transaction, no open cursor,
    /// no pending long data.
    pub fn at_safe_point(&self) -> bool {
        self.is_idle()
            && !self.in_transaction()
            && self.cursors.is_empty()
            && self.long_data.is_empty()
    }

    /// Whether the client may send a packet now (a new command, upload
    /// data, an auth reply, or the rest of a large command).
    pub fn accepts_client_packet(&self) -> bool {
        self.client_continues
            || matches!(
                self.state,
                State::Idle | State::InfileUpload | State::ChangeUserAuth
            )
    }

    /// How many payload bytes of a client packet of `len` bytes the tracker
    /// needs to see.
    pub fn client_prefix_needed(&self, len: usize) -> usize {
        if self.client_continues || self.state != State::Idle {
            return 0;
        }
        let want = match len {
            0 => 0,
            _ => 5, // command byte + statement id covers every case but CHANGE_USER
        };
        want.min(len)
    }

    /// Feeds a client packet: its length and at least
    /// [`Self::client_prefix_needed`] payload bytes.
    pub fn on_client_packet(&mut self, len: usize, prefix: &[u8]) -> ClientPacket {
        let continues = len == MAX_PAYLOAD;
        if std::mem::replace(&mut self.client_continues, continues) {
            return ClientPacket::Forward;
        }
        match self.state {
            State::InfileUpload => {
                if len == 0 {
                    self.state = State::Result { infile: true };
                }
                return ClientPacket::Forward;
            }
            State::ChangeUserAuth => return ClientPacket::Forward,
            _ => {}
        }
        let Some(&first) = prefix.first() else {
            // An empty command packet: the server answers with an error.
            self.begin(Command::Sleep, State::Simple);
            return ClientPacket::Forward;
        };
        let cmd = Command::from_byte(first);
        let stmt = match statement_id(prefix) {
            Some(LAST_PREPARED_ID) => self.last_prepared.unwrap_or(LAST_PREPARED_ID),
            Some(id) => id,
            None => 0,
        };
        match cmd {
            Command::Quit => {
                self.client_continues = false;
                return ClientPacket::Quit;
            }
            Command::BinlogDump
            | Command::BinlogDumpGtid
            | Command::RegisterSlave
            | Command::TableDump => {
                self.client_continues = false;
                return ClientPacket::Unsupported(cmd);
            }
            Command::StmtClose => {
                self.prepared.remove(&stmt);
                self.cursors.remove(&stmt);
                self.long_data.remove(&stmt);
                if self.last_prepared == Some(stmt) {
                    self.last_prepared = None;
                }
                return ClientPacket::ForwardNoResponse;
            }
            Command::StmtSendLongData => {
                self.long_data.insert(stmt);
                return ClientPacket::ForwardNoResponse;
            }
            _ => {}
        }
        self.statement = stmt;
        let next = match cmd {
            Command::Query => State::Result { infile: true },
            Command::ProcessInfo => State::Result { infile: false },
            Command::StmtExecute => {
                self.long_data.remove(&stmt);
                // Executing a statement closes its previous cursor.
                self.cursors.remove(&stmt);
                State::Result { infile: false }
            }
            // Answers like COM_STMT_EXECUTE. Long data and cursors are left
            // as they are: bulk execution uses neither, and keeping them
            // only delays a move.
            Command::StmtBulkExecute => State::Result { infile: false },
            Command::SetOption => {
                self.set_option = match prefix.get(1..3) {
                    Some(&[lo, hi]) => match u16::from_le_bytes([lo, hi]) {
                        MULTI_STATEMENTS_ON => Some(true),
                        MULTI_STATEMENTS_OFF => Some(false),
                        _ => None,
                    },
                    _ => None,
                };
                State::Simple
            }
            Command::StmtFetch => State::FetchRows,
            Command::StmtPrepare => State::PrepareFirst,
            Command::StmtReset => {
                self.long_data.remove(&stmt);
                self.cursors.remove(&stmt);
                State::Simple
            }
            Command::FieldList => State::FieldList,
            Command::Statistics => State::Statistics,
            Command::ChangeUser => State::ChangeUserAuth,
            _ => State::Simple,
        };
        self.begin(cmd, next);
        if cmd == Command::ChangeUser {
            ClientPacket::ChangeUser
        } else {
            ClientPacket::Forward
        }
    }

    fn begin(&mut self, cmd: Command, state: State) {
        self.command = Some(cmd);
        self.state = state;
    }

    /// Whether the tracker needs the whole payload of a backend packet of
    /// `len` bytes whose first byte is `first` (otherwise it is passed on
    /// without being looked at further).
    #[inline]
    pub fn backend_needs_whole(&self, len: usize, first: u8) -> bool {
        if self.backend_continues {
            return false;
        }
        match self.state {
            State::Columns { .. } | State::PrepareParams { .. } | State::PrepareColumns { .. } => {
                false
            }
            State::Rows | State::FetchRows | State::FieldList => {
                first == ERR_HEADER || is_row_terminator(first, len, self.options.deprecate_eof)
            }
            _ => true,
        }
    }

    /// Feeds a backend packet: its length and the payload bytes asked for
    /// (the whole payload when [`Self::backend_needs_whole`] said so,
    /// otherwise at least the first byte).
    pub fn on_backend_packet(
        &mut self,
        len: usize,
        payload: &[u8],
    ) -> Result<BackendPacket, TrackError> {
        let continues = len == MAX_PAYLOAD;
        if std::mem::replace(&mut self.backend_continues, continues) {
            return Ok(BackendPacket::Progress);
        }
        let first = payload.first().copied().unwrap_or(0);
        if first == ERR_HEADER
            && self.options.mariadb.contains(MariaDbCapabilities::PROGRESS)
            && self.progress_possible()
            && is_progress_report(payload)
        {
            // Forwarded to the client as it came; the command goes on.
            return Ok(BackendPacket::Progress);
        }
        match self.state {
            State::Idle => Err(TrackError::Unexpected("no command was in flight")),
            State::InfileUpload => Err(TrackError::Unexpected("the client was uploading a file")),
            State::Result { infile } => match first {
                OK_HEADER => {
                    let status = crate::response::OkPacket::status_of(payload)?;
                    Ok(self.result_end(status))
                }
                ERR_HEADER => Ok(self.finish(false)),
                LOCAL_INFILE_HEADER if infile => {
                    self.state = State::InfileUpload;
                    Ok(BackendPacket::AwaitClient)
                }
                _ => {
                    let count = ColumnCount::parse(payload, self.options.cache_metadata())?;
                    self.state = if count.metadata_follows {
                        State::Columns {
                            left: count.columns,
                        }
                    } else {
                        self.after_column_definitions()
                    };
                    Ok(BackendPacket::Progress)
                }
            },
            State::Columns { left } => {
                self.state = if left > 1 {
                    State::Columns { left: left - 1 }
                } else {
                    self.after_column_definitions()
                };
                Ok(BackendPacket::Progress)
            }
            State::ColumnsEof => {
                if first == ERR_HEADER {
                    return Ok(self.finish(false));
                }
                if !is_eof(first, len) {
                    return Err(TrackError::Unexpected(
                        "expecting EOF after column definitions",
                    ));
                }
                let status = terminator_status(payload)?;
                if status.contains(StatusFlags::CURSOR_EXISTS)
                    && self.command == Some(Command::StmtExecute)
                {
                    // A cursor was opened: rows come through COM_STMT_FETCH.
                    self.cursors.insert(self.statement);
                    return Ok(self.result_end(status));
                }
                self.state = State::Rows;
                Ok(BackendPacket::Progress)
            }
            State::Rows => {
                if first == ERR_HEADER {
                    return Ok(self.finish(false));
                }
                if is_row_terminator(first, len, self.options.deprecate_eof) {
                    let status = terminator_status(payload)?;
                    if status.contains(StatusFlags::CURSOR_EXISTS)
                        && self.command == Some(Command::StmtExecute)
                    {
                        self.cursors.insert(self.statement);
                    }
                    return Ok(self.result_end(status));
                }
                Ok(BackendPacket::Progress)
            }
            State::FetchRows => {
                if first == ERR_HEADER {
                    return Ok(self.finish(false));
                }
                if is_row_terminator(first, len, self.options.deprecate_eof) {
                    let status = terminator_status(payload)?;
                    if status.contains(StatusFlags::LAST_ROW_SENT)
                        || !status.contains(StatusFlags::CURSOR_EXISTS)
                    {
                        self.cursors.remove(&self.statement);
                    }
                    self.status = status - StatusFlags::MORE_RESULTS_EXISTS;
                    return Ok(self.finish(true));
                }
                Ok(BackendPacket::Progress)
            }
            State::PrepareFirst => {
                if first == ERR_HEADER {
                    return Ok(self.finish(false));
                }
                let p = PrepareOk::parse(payload)?;
                self.prepared.insert(
                    p.statement_id,
                    PreparedStatement {
                        params: p.params,
                        columns: p.columns,
                    },
                );
                self.last_prepared = Some(p.statement_id);
                self.state = self.after_prepare_params(p.params, p.columns);
                Ok(self.progress_or_done())
            }
            State::PrepareParams { left, columns } => {
                self.state = if left > 1 {
                    State::PrepareParams {
                        left: left - 1,
                        columns,
                    }
                } else if self.options.deprecate_eof {
                    self.prepare_columns(columns)
                } else {
                    State::PrepareParamsEof { columns }
                };
                Ok(self.progress_or_done())
            }
            State::PrepareParamsEof { columns } => {
                if !is_eof(first, len) {
                    return Err(TrackError::Unexpected(
                        "expecting EOF after parameter definitions",
                    ));
                }
                self.state = self.prepare_columns(columns);
                Ok(self.progress_or_done())
            }
            State::PrepareColumns { left } => {
                self.state = if left > 1 {
                    State::PrepareColumns { left: left - 1 }
                } else if self.options.deprecate_eof {
                    State::Idle
                } else {
                    State::PrepareColumnsEof
                };
                Ok(self.progress_or_done())
            }
            State::PrepareColumnsEof => {
                if !is_eof(first, len) {
                    return Err(TrackError::Unexpected(
                        "expecting EOF after column definitions",
                    ));
                }
                self.state = State::Idle;
                Ok(self.progress_or_done())
            }
            State::FieldList => {
                if first == ERR_HEADER {
                    return Ok(self.finish(false));
                }
                if is_row_terminator(first, len, self.options.deprecate_eof) {
                    self.status = terminator_status(payload)?;
                    return Ok(self.finish(true));
                }
                Ok(BackendPacket::Progress)
            }
            State::Simple => match first {
                OK_HEADER => {
                    self.status = crate::response::OkPacket::status_of(payload)?;
                    self.after_simple_ok();
                    Ok(self.finish(true))
                }
                ERR_HEADER => Ok(self.finish(false)),
                _ if is_row_terminator(first, len, self.options.deprecate_eof) => {
                    // COM_SET_OPTION and COM_DEBUG answer with EOF on some servers.
                    self.status = terminator_status(payload)?;
                    self.after_simple_ok();
                    Ok(self.finish(true))
                }
                _ => Err(TrackError::Unexpected("expecting OK or ERR")),
            },
            State::Statistics => Ok(self.finish(true)),
            State::ChangeUserAuth => match first {
                OK_HEADER => {
                    self.status = crate::response::OkPacket::status_of(payload)?;
                    self.forget_statements();
                    Ok(self.finish(true))
                }
                ERR_HEADER => Ok(self.finish(false)),
                0xfe | 0x01 => Ok(BackendPacket::AwaitClient),
                _ => Err(TrackError::Unexpected(
                    "expecting an auth packet after COM_CHANGE_USER",
                )),
            },
        }
    }

    /// Where a result set goes once its column definitions (sent or
    /// skipped) are done.
    fn after_column_definitions(&self) -> State {
        if self.options.deprecate_eof {
            State::Rows
        } else {
            State::ColumnsEof
        }
    }

    /// Whether a MariaDB progress report can arrive now: while a statement
    /// runs, before or between its results (and while LOAD DATA LOCAL reads
    /// the client's file). Only states that look at a whole ERR packet.
    fn progress_possible(&self) -> bool {
        matches!(
            self.state,
            State::Result { .. }
                | State::Simple
                | State::Rows
                | State::FetchRows
                | State::PrepareFirst
                | State::InfileUpload
        )
    }

    fn after_prepare_params(&self, params: u16, columns: u16) -> State {
        if params > 0 {
            State::PrepareParams {
                left: params,
                columns,
            }
        } else {
            self.prepare_columns(columns)
        }
    }

    fn prepare_columns(&self, columns: u16) -> State {
        if columns > 0 {
            State::PrepareColumns { left: columns }
        } else {
            State::Idle
        }
    }

    fn progress_or_done(&mut self) -> BackendPacket {
        if self.state == State::Idle {
            self.finish(true)
        } else {
            BackendPacket::Progress
        }
    }

    /// A result (OK or row terminator) ended with `status`: another result
    /// follows when MORE_RESULTS_EXISTS is set.
    fn result_end(&mut self, status: StatusFlags) -> BackendPacket {
        self.status = status;
        if status.contains(StatusFlags::MORE_RESULTS_EXISTS) {
            self.state = State::Result {
                infile: self.command == Some(Command::Query),
            };
            BackendPacket::Progress
        } else {
            self.finish(true)
        }
    }

    fn after_simple_ok(&mut self) {
        match self.command {
            Some(Command::ResetConnection) => self.forget_statements(),
            Some(Command::SetOption) => {
                if let Some(on) = self.set_option {
                    self.options.multi_statements = on;
                }
            }
            _ => {}
        }
    }

    fn forget_statements(&mut self) {
        self.prepared.clear();
        self.last_prepared = None;
        self.cursors.clear();
        self.long_data.clear();
    }

    fn finish(&mut self, ok: bool) -> BackendPacket {
        self.state = State::Idle;
        self.backend_continues = false;
        self.set_option = None;
        BackendPacket::Done { ok }
    }
}

/// Reads the statement id from a COM_STMT_* payload prefix.
pub fn statement_id(prefix: &[u8]) -> Option<u32> {
    let mut r = Reader::new(prefix.get(1..)?);
    r.u32("statement id").ok()
}

#[cfg(test)]
mod tests;
