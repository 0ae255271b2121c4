//! The pieces of session migration that are plain data transformations:
//! reading the `SHOW SESSION_STATES` result the old backend returns (the
//! proxy consumes it; the client never sees it), and building the
//! `SET SESSION_STATES '<json>'` statement for the new backend.
//!
//! The state machine that sequences a move is [`super::migration`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::packet::MAX_PAYLOAD;
use crate::response::{
    ERR_HEADER, ErrPacket, OK_HEADER, is_eof, is_row_terminator, parse_column_count,
};
use crate::wire::Reader;

/// The statement that asks TiDB for the session's state and a token.
pub const SHOW_SESSION_STATES: &str = "SHOW SESSION_STATES";

/// Why a move did not happen. The session stays on its old backend unless
/// the old backend itself was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationFailure {
    /// The old backend refused to export the session (e.g. TiDB error 8146
    /// for temporary tables, table locks or advisory locks).
    #[error("old backend refused SHOW SESSION_STATES: {code} {message}")]
    StatesRefused {
        /// MySQL error code.
        code: u16,
        /// Message.
        message: String,
    },
    /// The old backend answered SHOW SESSION_STATES with something else
    /// than one row of (states, token).
    #[error("unexpected SHOW SESSION_STATES result: {0}")]
    BadStates(String),
    /// No session token: TiDB has no `security.session-token-signing-cert`.
    #[error(
        "TiDB returned no session token; set security.session-token-signing-cert and -key on every TiDB"
    )]
    NoToken,
    /// The new backend could not be reached.
    #[error("could not connect to the new backend: {0}")]
    Connect(String),
    /// The new backend rejected the token or the handshake.
    #[error("new backend rejected the session: {0}")]
    Handshake(String),
    /// The new backend rejected SET SESSION_STATES.
    #[error("new backend rejected SET SESSION_STATES: {code} {message}")]
    SetStatesRefused {
        /// MySQL error code.
        code: u16,
        /// Message.
        message: String,
    },
    /// The new backend connection closed during the move.
    #[error("new backend connection lost during the move: {0}")]
    NewBackendLost(String),
    /// The move took longer than the migration timeout.
    #[error("the move timed out")]
    TimedOut,
    /// The old backend was lost before its state could be read.
    #[error("old backend lost during the move: {0}")]
    OldBackendLost(String),
}

/// What the old backend returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedSession {
    /// The `Session_states` JSON.
    pub states: Bytes,
    /// The `Session_token` JSON, sent as auth data to the new backend.
    pub token: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    First,
    Columns(u64),
    ColumnsEof,
    Rows,
}

/// Consumes the result of `SHOW SESSION_STATES`, one packet at a time.
///
/// Boxed: a session reads the states only while it moves or refreshes its
/// protection copy, and every session's migration state holds the room
/// of the largest thing it may hold (issue 15: idle memory).
#[derive(Debug)]
pub struct StatesReader(Box<Reading>);

#[derive(Debug)]
struct Reading {
    deprecate_eof: bool,
    state: ReadState,
    columns: u64,
    joined: BytesMut,
    row: Option<ExportedSession>,
}

/// Progress of a [`StatesReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatesProgress {
    /// More packets are needed.
    More,
    /// The result is complete.
    Done(ExportedSession),
    /// The result is an error or malformed.
    Failed(MigrationFailure),
}

impl StatesReader {
    /// A reader for a backend leg that negotiated `deprecate_eof`.
    pub fn new(deprecate_eof: bool) -> Self {
        Self(Box::new(Reading {
            deprecate_eof,
            state: ReadState::First,
            columns: 0,
            joined: BytesMut::new(),
            row: None,
        }))
    }

    /// Feeds one whole packet payload.
    pub fn feed(&mut self, payload: &[u8]) -> StatesProgress {
        self.0.feed(payload)
    }
}

impl Reading {
    fn feed(&mut self, payload: &[u8]) -> StatesProgress {
        if payload.len() == MAX_PAYLOAD || !self.joined.is_empty() {
            self.joined.extend_from_slice(payload);
            if payload.len() == MAX_PAYLOAD {
                return StatesProgress::More;
            }
            let whole = std::mem::take(&mut self.joined);
            return self.feed_whole(&whole);
        }
        self.feed_whole(payload)
    }

    fn feed_whole(&mut self, payload: &[u8]) -> StatesProgress {
        let bad =
            |what: &str| StatesProgress::Failed(MigrationFailure::BadStates(what.to_string()));
        let first = payload.first().copied().unwrap_or(0);
        if first == ERR_HEADER && !matches!(self.state, ReadState::Columns(_)) {
            return match ErrPacket::parse(payload) {
                Ok(e) => StatesProgress::Failed(MigrationFailure::StatesRefused {
                    code: e.code,
                    message: e.message_text(),
                }),
                Err(e) => bad(&e.to_string()),
            };
        }
        match self.state {
            ReadState::First => {
                if first == OK_HEADER {
                    return bad("an OK packet instead of a result set");
                }
                match parse_column_count(payload) {
                    Ok(n) if n >= 2 => {
                        self.columns = n;
                        self.state = ReadState::Columns(n);
                        StatesProgress::More
                    }
                    Ok(_) => bad("fewer than two columns"),
                    Err(e) => bad(&e.to_string()),
                }
            }
            ReadState::Columns(left) => {
                self.state = if left > 1 {
                    ReadState::Columns(left - 1)
                } else if self.deprecate_eof {
                    ReadState::Rows
                } else {
                    ReadState::ColumnsEof
                };
                StatesProgress::More
            }
            ReadState::ColumnsEof => {
                if !is_eof(first, payload.len()) {
                    return bad("missing EOF after column definitions");
                }
                self.state = ReadState::Rows;
                StatesProgress::More
            }
            ReadState::Rows => {
                if is_row_terminator(first, payload.len(), self.deprecate_eof) {
                    return match self.row.take() {
                        Some(row) if row.token.is_empty() => {
                            StatesProgress::Failed(MigrationFailure::NoToken)
                        }
                        Some(row) => StatesProgress::Done(row),
                        None => bad("no rows"),
                    };
                }
                if self.row.is_some() {
                    return bad("more than one row");
                }
                let mut r = Reader::new(payload);
                let states = match r.lenenc_nullable("Session_states") {
                    Ok(v) => v.unwrap_or_default(),
                    Err(e) => return bad(&e.to_string()),
                };
                let token = match r.lenenc_nullable("Session_token") {
                    Ok(v) => v.unwrap_or_default(),
                    Err(e) => return bad(&e.to_string()),
                };
                self.row = Some(ExportedSession {
                    states: Bytes::copy_from_slice(states),
                    token: Bytes::copy_from_slice(token),
                });
                StatesProgress::More
            }
        }
    }
}

/// Builds the COM_QUERY payload `SET SESSION_STATES '<states>'`.
///
/// With `no_backslash_escapes` (the session's sql_mode has
/// NO_BACKSLASH_ESCAPES, reported in the status flags) a backslash is an
/// ordinary character and only quotes are doubled; otherwise backslashes and
/// quotes are escaped with a backslash.
pub fn set_session_states_query(states: &[u8], no_backslash_escapes: bool) -> BytesMut {
    let prefix = b"SET SESSION_STATES '";
    let extra = states.iter().filter(|&&b| b == b'\'' || b == b'\\').count();
    let mut out = BytesMut::with_capacity(1 + prefix.len() + states.len() + extra + 1);
    out.put_u8(crate::Command::Query.to_byte());
    out.put_slice(prefix);
    for &b in states {
        match b {
            b'\'' if no_backslash_escapes => out.put_slice(b"''"),
            b'\'' => out.put_slice(b"\\'"),
            b'\\' if !no_backslash_escapes => out.put_slice(b"\\\\"),
            other => out.put_u8(other),
        }
    }
    out.put_u8(b'\'');
    out
}

/// The simulation's planted bug `ForgetUserVariable`: renames the first
/// user variable in a `Session_states` document (TiDB's `user-var-values`
/// and `user-var-types` maps), so the new session no longer has it.
#[cfg(feature = "sim-mutations")]
pub fn forget_first_user_variable(states: &[u8]) -> Bytes {
    let mut out = states.to_vec();
    for key in [&b"\"user-var-values\":{\""[..], b"\"user-var-types\":{\""] {
        if let Some(at) = out.windows(key.len()).position(|w| w == key) {
            let end = at + key.len();
            out.splice(end..end, b"forgotten-".iter().copied());
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{CapabilityFlags, StatusFlags};
    use crate::response::{EofPacket, OkPacket};
    use crate::wire::put_lenenc_bytes;

    fn result(deprecate_eof: bool, states: &[u8], token: Option<&[u8]>) -> Vec<Vec<u8>> {
        let mut pkts = vec![
            vec![2u8],
            b"\x03def\x00\x00\x00\x0eSession_states\x00".to_vec(),
            b"\x03def\x00\x00\x00\x0dSession_token\x00".to_vec(),
        ];
        let mut eof = BytesMut::new();
        EofPacket {
            warnings: 0,
            status: StatusFlags::AUTOCOMMIT,
        }
        .write(&mut eof);
        if !deprecate_eof {
            pkts.push(eof.to_vec());
        }
        let mut row = BytesMut::new();
        put_lenenc_bytes(&mut row, states);
        match token {
            Some(t) => put_lenenc_bytes(&mut row, t),
            None => row.put_u8(0xfb),
        }
        pkts.push(row.to_vec());
        if deprecate_eof {
            let mut ok = BytesMut::new();
            OkPacket {
                header: 0xfe,
                status: StatusFlags::AUTOCOMMIT,
                ..Default::default()
            }
            .write(&mut ok, CapabilityFlags::PROTOCOL_41);
            pkts.push(ok.to_vec());
        } else {
            pkts.push(eof.to_vec());
        }
        pkts
    }

    #[test]
    fn reads_states_and_token() {
        for deprecate in [false, true] {
            let mut r = StatesReader::new(deprecate);
            let pkts = result(
                deprecate,
                br#"{"current-db":"test"}"#,
                Some(br#"{"username":"root"}"#),
            );
            let mut last = StatesProgress::More;
            for p in &pkts {
                last = r.feed(p);
            }
            assert_eq!(
                last,
                StatesProgress::Done(ExportedSession {
                    states: Bytes::from_static(br#"{"current-db":"test"}"#),
                    token: Bytes::from_static(br#"{"username":"root"}"#),
                })
            );
        }
    }

    #[test]
    fn missing_token_and_errors_fail() {
        let mut r = StatesReader::new(false);
        let mut last = StatesProgress::More;
        for p in &result(false, b"{}", None) {
            last = r.feed(p);
        }
        assert_eq!(last, StatesProgress::Failed(MigrationFailure::NoToken));

        let mut r = StatesReader::new(false);
        let mut e = BytesMut::new();
        ErrPacket {
            code: 8146,
            sql_state: *b"HY000",
            message: "cannot migrate the current session: session has temporary tables".into(),
        }
        .write(&mut e);
        assert!(matches!(
            r.feed(&e),
            StatesProgress::Failed(MigrationFailure::StatesRefused { code: 8146, .. })
        ));
    }

    #[cfg(feature = "sim-mutations")]
    #[test]
    fn the_planted_bug_forgets_exactly_the_first_user_variable() {
        let states = br#"{"user-var-values":{"n":{"k":1},"v":{"k":5}},"user-var-types":{"n":{"Tp":8},"v":{"Tp":15}},"current-db":"sim"}"#;
        assert_eq!(
            &forget_first_user_variable(states)[..],
            br#"{"user-var-values":{"forgotten-n":{"k":1},"v":{"k":5}},"user-var-types":{"forgotten-n":{"Tp":8},"v":{"Tp":15}},"current-db":"sim"}"#
        );
        assert_eq!(&forget_first_user_variable(b"{}")[..], b"{}");
    }

    #[test]
    fn escaping_keeps_json_intact() {
        let q = set_session_states_query(br#"{"a":"it's \"x\" \\n"}"#, false);
        assert_eq!(
            &q[1..],
            br#"SET SESSION_STATES '{"a":"it\'s \\"x\\" \\\\n"}'"#
        );
        let q = set_session_states_query(br#"{"a":"it's \n"}"#, true);
        assert_eq!(&q[1..], br#"SET SESSION_STATES '{"a":"it''s \n"}'"#);
    }
}
