//! What one client action produced, in a form two runs can be compared by.
//!
//! An [`Outcome`] holds everything mysql_async exposes about a command's
//! response: per result set the column definitions, the rows and the OK
//! fields (affected rows, last insert id, warnings, info), the status flags
//! and session-state tracking data of the final OK, any error, and the rows
//! of `SHOW WARNINGS` when the server reported warnings. Connection ids,
//! timings and anything else that legitimately differs between two
//! connections are never captured.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};

use mysql_async::consts::{ColumnFlags, ColumnType, StatusFlags};
use mysql_async::prelude::Protocol;
use mysql_async::{Column, Conn, QueryResult, Row, Value};

/// Byte values longer than this are kept as length + digest, not verbatim.
const VERBATIM_LIMIT: usize = 512;

/// One value of a row.
#[derive(Clone, PartialEq)]
pub enum Cell {
    /// NULL.
    Null,
    /// Bytes that are valid UTF-8 (text protocol values, strings).
    Text(String),
    /// Bytes that are not UTF-8.
    Bytes(Vec<u8>),
    /// A long byte value: its length, a digest and its first bytes.
    Long {
        len: usize,
        digest: u64,
        head: String,
    },
    /// Any binary-protocol value other than bytes (ints, floats, dates, times).
    Value(Value),
}

impl From<Value> for Cell {
    fn from(value: Value) -> Cell {
        match value {
            Value::NULL => Cell::Null,
            Value::Bytes(bytes) if bytes.len() > VERBATIM_LIMIT => {
                let mut hasher = DefaultHasher::new();
                bytes.hash(&mut hasher);
                Cell::Long {
                    len: bytes.len(),
                    digest: hasher.finish(),
                    head: String::from_utf8_lossy(&bytes[..32]).into_owned(),
                }
            }
            Value::Bytes(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Cell::Text(text),
                Err(err) => Cell::Bytes(err.into_bytes()),
            },
            other => Cell::Value(other),
        }
    }
}

impl fmt::Debug for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Null => f.write_str("NULL"),
            Cell::Text(text) => write!(f, "{text:?}"),
            Cell::Bytes(bytes) => {
                f.write_str("x'")?;
                for byte in bytes {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str("'")
            }
            Cell::Long { len, digest, head } => {
                write!(f, "<{len} bytes, digest {digest:016x}, starting {head:?}>")
            }
            Cell::Value(value) => write!(f, "{value:?}"),
        }
    }
}

/// A column definition as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMeta {
    pub schema: String,
    pub table: String,
    pub org_table: String,
    pub name: String,
    pub org_name: String,
    pub column_type: ColumnType,
    pub flags: ColumnFlags,
    pub charset: u16,
    pub length: u32,
    pub decimals: u8,
}

impl From<&Column> for ColumnMeta {
    fn from(column: &Column) -> ColumnMeta {
        ColumnMeta {
            schema: column.schema_str().into_owned(),
            table: column.table_str().into_owned(),
            org_table: column.org_table_str().into_owned(),
            name: column.name_str().into_owned(),
            org_name: column.org_name_str().into_owned(),
            column_type: column.column_type(),
            flags: column.flags(),
            charset: column.character_set(),
            length: column.column_length(),
            decimals: column.decimals(),
        }
    }
}

/// The OK-packet fields mysql_async shows at one point of a response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OkFields {
    pub affected_rows: u64,
    pub last_insert_id: Option<u64>,
    pub warnings: u16,
    pub info: String,
}

/// One result set: its column definitions (empty for an OK-only result),
/// its OK fields (see [`Outcome::read`] for which) and its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultSet {
    pub columns: Vec<ColumnMeta>,
    pub ok: OkFields,
    pub rows: Vec<Vec<Cell>>,
}

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientError {
    /// An ERR packet from the server (or the proxy).
    Server {
        code: u16,
        state: String,
        message: String,
    },
    /// Anything else mysql_async reported (I/O, driver, TLS), as its text.
    Client(String),
}

impl From<mysql_async::Error> for ClientError {
    fn from(err: mysql_async::Error) -> ClientError {
        match err {
            mysql_async::Error::Server(err) => ClientError::Server {
                code: err.code,
                state: err.state,
                message: err.message,
            },
            other => ClientError::Client(other.to_string()),
        }
    }
}

/// A prepared statement's metadata (COM_STMT_PREPARE response).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub params: Vec<ColumnMeta>,
    pub columns: Vec<ColumnMeta>,
}

/// Everything observable about one client action.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// For a prepare: the statement's parameter and column definitions.
    pub prepared: Option<Prepared>,
    /// The result sets, in order.
    pub sets: Vec<ResultSet>,
    /// The OK fields once the whole response was read.
    pub end: OkFields,
    /// Status flags of the last OK packet read, if the last packet was OK.
    pub status: Option<StatusFlags>,
    /// Session-state tracking data of that OK packet.
    pub session_state: Option<Vec<u8>>,
    /// The error that ended the action, if any.
    pub error: Option<ClientError>,
    /// `SHOW WARNINGS` rows, fetched when the server reported warnings.
    pub show_warnings: Vec<Vec<Cell>>,
}

impl Outcome {
    /// An outcome that is only an error (failed connect, failed prepare).
    pub fn from_error(err: mysql_async::Error) -> Outcome {
        Outcome {
            error: Some(err.into()),
            ..Outcome::default()
        }
    }

    /// True if any point of the response reported warnings.
    pub fn has_warnings(&self) -> bool {
        self.end.warnings > 0 || self.sets.iter().any(|set| set.ok.warnings > 0)
    }

    /// The first value of the first row of the first result set, if any.
    pub fn scalar(&self) -> Option<&Cell> {
        self.sets.first()?.rows.first()?.first()
    }

    /// Reads every result set of `result` into an outcome. Errors in the
    /// middle of a multi-result response end the outcome there.
    pub async fn read<P: Protocol>(mut result: QueryResult<'_, '_, P>) -> Outcome {
        let mut outcome = Outcome::default();
        loop {
            let columns: Vec<ColumnMeta> = result
                .columns()
                .map(|columns| columns.iter().map(ColumnMeta::from).collect())
                .unwrap_or_default();
            // Before its rows are read a row set shows a stale OK (from
            // whatever mysql_async read last); an OK-only set shows its own.
            let header = ok_fields(&result);
            let rows = match result.collect::<Row>().await {
                Ok(rows) => rows,
                Err(err) => {
                    outcome.error = Some(err.into());
                    break;
                }
            };
            let rows = rows
                .into_iter()
                .map(|row| row.unwrap().into_iter().map(Cell::from).collect())
                .collect();
            // After the rows: the set's terminator, or the next set's OK
            // when an OK-only set follows.
            let ok = if columns.is_empty() {
                header
            } else {
                ok_fields(&result)
            };
            outcome.sets.push(ResultSet { columns, ok, rows });
            if result.is_empty() {
                break;
            }
        }
        outcome.end = ok_fields(&result);
        // An error after the first result set is held back by mysql_async
        // until the result is dropped; it belongs to this action.
        if let Err(err) = result.drop_result().await
            && outcome.error.is_none()
        {
            outcome.error = Some(err.into());
        }
        outcome
    }

    /// Records the connection's last OK packet's status flags and session
    /// state (only visible once the result is released).
    pub fn read_final_ok(&mut self, conn: &Conn) {
        if let Some(ok) = conn.last_ok_packet() {
            self.status = Some(ok.status_flags());
            self.session_state = ok.session_state_info_ref().map(<[u8]>::to_vec);
        }
    }
}

fn ok_fields<P: Protocol>(result: &QueryResult<'_, '_, P>) -> OkFields {
    OkFields {
        affected_rows: result.affected_rows(),
        last_insert_id: result.last_insert_id(),
        warnings: result.warnings(),
        info: result.info().into_owned(),
    }
}

/// One recorded action and what it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What was done, e.g. `[main] query: SELECT 1`.
    pub action: String,
    /// Whether the action was expected to succeed (checked on the direct run).
    pub expect_ok: bool,
    /// What it produced.
    pub outcome: Outcome,
}

/// The ordered steps of one scenario run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    pub steps: Vec<Step>,
}

impl Transcript {
    /// Appends a step.
    pub fn push(&mut self, action: impl Into<String>, expect_ok: bool, outcome: Outcome) {
        self.steps.push(Step {
            action: action.into(),
            expect_ok,
            outcome,
        });
    }

    /// Appends every step of `other`.
    pub fn extend(&mut self, other: Transcript) {
        self.steps.extend(other.steps);
    }

    /// Steps that were expected to succeed but failed, rendered for a message.
    pub fn unexpected_errors(&self) -> Vec<String> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, step)| step.expect_ok && step.outcome.error.is_some())
            .map(|(i, step)| format!("step {i} {}: {:?}", step.action, step.outcome.error))
            .collect()
    }

    /// None if equal; otherwise a readable account of the first difference
    /// between `self` (direct) and `other` (proxied).
    pub fn difference(&self, other: &Transcript) -> Option<String> {
        if self == other {
            return None;
        }
        let mut out = String::new();
        for i in 0..self.steps.len().max(other.steps.len()) {
            match (self.steps.get(i), other.steps.get(i)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    out += &format!(
                        "first difference at step {i}\n  direct:  {}\n  proxied: {}\n\
                         --- direct\n+++ proxied\n",
                        a.action, b.action
                    );
                    out += &line_diff(&format!("{a:#?}"), &format!("{b:#?}"));
                    break;
                }
                (Some(a), None) => {
                    out += &format!(
                        "the proxied run ended before step {i} ({}) of the direct run\n",
                        a.action
                    );
                    break;
                }
                (None, Some(b)) => {
                    out += &format!(
                        "the proxied run has an extra step {i} ({}):\n{b:#?}\n",
                        b.action
                    );
                    break;
                }
                (None, None) => unreachable!("the loop stops at the longer transcript"),
            }
        }
        Some(out)
    }
}

/// Lines compared by LCS at most; beyond that the changed middle is shown
/// whole (an O(n*m) table over a 20,000-row result would not finish).
const LCS_LIMIT: usize = 2_000;

/// A unified-style line diff (LCS), with three lines of context.
pub fn line_diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a_mid, b_mid) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut lines: Vec<(char, &str)> = a[..prefix].iter().map(|l| (' ', *l)).collect();
    if a_mid.len() > LCS_LIMIT || b_mid.len() > LCS_LIMIT {
        lines.extend(a_mid.iter().take(LCS_LIMIT).map(|l| ('-', *l)));
        lines.extend(b_mid.iter().take(LCS_LIMIT).map(|l| ('+', *l)));
    } else {
        lines.extend(lcs_lines(a_mid, b_mid));
    }
    lines.extend(a[a.len() - suffix..].iter().map(|l| (' ', *l)));

    let near_change = |k: usize| {
        let lo = k.saturating_sub(3);
        let hi = (k + 4).min(lines.len());
        lines[lo..hi].iter().any(|(mark, _)| *mark != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (mark, line)) in lines.iter().enumerate() {
        if near_change(k) {
            if skipped {
                out += "   ...\n";
                skipped = false;
            }
            out += &format!("{mark}{line}\n");
        } else {
            skipped = true;
        }
    }
    if skipped {
        out += "   ...\n";
    }
    out
}

/// The lines of `a` and `b` marked ' ' (both), '-' (only a), '+' (only b).
fn lcs_lines<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(char, &'a str)> {
    // lcs[i][j] = length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', a[i]));
            i += 1;
        } else {
            lines.push(('+', b[j]));
            j += 1;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diff_marks_changed_lines_only() {
        let diff = line_diff("a\nb\nc\nd\ne\nf\ng\nh\ni", "a\nb\nc\nd\nX\nf\ng\nh\ni");
        assert_eq!(diff, "   ...\n b\n c\n d\n-e\n+X\n f\n g\n h\n   ...\n");
    }

    #[test]
    fn long_bytes_are_digested() {
        let a = Cell::from(Value::Bytes(vec![b'a'; 1000]));
        let b = Cell::from(Value::Bytes(vec![b'a'; 1000]));
        let mut changed = vec![b'a'; 1000];
        changed[999] = b'b';
        assert_eq!(a, b);
        assert_ne!(a, Cell::from(Value::Bytes(changed)));
        assert!(format!("{a:?}").starts_with("<1000 bytes"));
    }
}
