//! TiProxy's native capture format, one command per record
//! (pingcap/tiproxy `pkg/sqlreplay/cmd/native.go`):
//!
//! ```text
//! # Time: 2024-08-27T10:00:00.123456789Z      RFC 3339 with nanoseconds
//! # Conn_ID: 42
//! # Cmd_type: StmtExecute                      omitted for COM_QUERY
//! # Success: false                             omitted when true
//! # Captured_ps_id: 1                          omitted when 0
//! # Prepared_stmt: "select ?"                  Go-quoted; omitted when empty
//! # Result_digest: 3 0 0 <hex16> <hex16>       ours, with --compare only
//! # Payload_len: 8                             without the command byte
//! <payload bytes, binary>\n
//! ```
//!
//! Command names are TiProxy's (`pkg/proxy/net/command.go`, the same as
//! TiDB's metrics labels). The decoder reads as TiProxy's does, and names
//! the file, line and byte offset of anything it cannot read.
//!
//! `Result_digest` is this project's addition (`--compare`): rows, affected
//! rows, error code and the unordered and ordered row hashes
//! ([`ResultDigest`]). It sits among the header lines because TiProxy's
//! decoder (`NativeDecoder.Decode`) reads every `# key: value` line up to
//! `Payload_len` and ignores keys it does not know: TiProxy replays such a
//! capture as if the line were not there. A side file would have needed its
//! own rotation, compression and encryption in step with the records.

use std::io::BufRead;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};
use tiproxy_core::digest::ResultDigest;

/// TiProxy's names of the command bytes, indexed by the byte.
const NAMES: [&str; 32] = [
    "Sleep",
    "Quit",
    "InitDB",
    "Query",
    "FieldList",
    "CreateDB",
    "DropDB",
    "Refresh",
    "(DEPRECATED)Shutdown",
    "Statistics",
    "ProcessInfo",
    "Connect",
    "ProcessKill",
    "Debug",
    "Ping",
    "Time",
    "DelayedInsert",
    "ChangeUser",
    "BinlogDump",
    "TableDump",
    "ConnectOut",
    "RegisterSlave",
    "StmtPrepare",
    "StmtExecute",
    "StmtSendLongData",
    "StmtClose",
    "StmtReset",
    "SetOption",
    "StmtFetch",
    "Daemon",
    "BinlogDumpGtid",
    "ResetConnect",
];

/// COM_QUERY.
pub const COM_QUERY: u8 = 0x03;

/// TiProxy's name of a command byte.
pub fn command_name(b: u8) -> Option<&'static str> {
    NAMES.get(b as usize).copied()
}

/// The command byte of a TiProxy command name.
pub fn command_byte(name: &str) -> Option<u8> {
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

/// One captured command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the command started.
    pub start: SystemTime,
    /// The client connection's id (non-zero).
    pub conn_id: u64,
    /// The command byte, then its payload.
    pub payload: Vec<u8>,
    /// False when the server answered with ERR.
    pub success: bool,
    /// The prepared statement id (prepare, execute, close, ...), or 0.
    pub ps_id: u32,
    /// The prepared statement's text for statement commands, or empty.
    pub prepared_stmt: String,
    /// With `--compare`: what the command got back.
    pub digest: Option<ResultDigest>,
}

/// Appends one record to `out`.
pub fn encode(r: &Record, out: &mut Vec<u8>) {
    use std::io::Write;
    let cmd = r.payload.first().copied().unwrap_or(COM_QUERY);
    out.extend_from_slice(b"# Time: ");
    write_rfc3339_nano(r.start, out);
    let _ = write!(out, "\n# Conn_ID: {}\n", r.conn_id);
    if cmd != COM_QUERY {
        let _ = writeln!(out, "# Cmd_type: {}", command_name(cmd).unwrap_or("Sleep"));
    }
    if !r.success {
        out.extend_from_slice(b"# Success: false\n");
    }
    if r.ps_id != 0 {
        let _ = writeln!(out, "# Captured_ps_id: {}", r.ps_id);
    }
    if !r.prepared_stmt.is_empty() {
        out.extend_from_slice(b"# Prepared_stmt: ");
        go_quote(&r.prepared_stmt, out);
        out.push(b'\n');
    }
    if let Some(d) = &r.digest {
        let _ = writeln!(out, "# Result_digest: {}", d.to_text());
    }
    let body = r.payload.get(1..).unwrap_or(&[]);
    let _ = writeln!(out, "# Payload_len: {}", body.len());
    out.extend_from_slice(body);
    out.push(b'\n');
}

/// Go's `time.RFC3339Nano` in UTC: trailing zeros of the fraction dropped.
pub fn write_rfc3339_nano(t: SystemTime, out: &mut Vec<u8>) {
    use std::io::Write;
    let d = OffsetDateTime::from(t);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    );
    let mut ns = d.nanosecond();
    if ns != 0 {
        // The fraction without its trailing zeros, without an allocation
        // (this runs once per captured command).
        let mut digits = 9;
        while ns % 10 == 0 {
            ns /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{ns:0digits$}");
    }
    out.push(b'Z');
}

/// Parses RFC 3339 (with or without a fraction, `Z` or a `±hh:mm` offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let year = num(0..4)? as i32;
    let month = Month::try_from(num(5..7)? as u8).ok()?;
    let day = num(8..10)? as u8;
    let (hour, minute, second) = (num(11..13)? as u8, num(14..16)? as u8, num(17..19)? as u8);
    let mut i = 19;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() || frac.len() > 9 {
            return None;
        }
        nanos = frac.parse::<u32>().ok()? * 10u32.pow(9 - frac.len() as u32);
    }
    let offset = match &s[i..] {
        "Z" | "z" => UtcOffset::UTC,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let h: i8 = o[1..3].parse().ok()?;
            let m: i8 = o[4..6].parse().ok()?;
            let sign = if o.starts_with('-') { -1 } else { 1 };
            UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
        }
        _ => return None,
    };
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    let dt = date.with_time(time).assume_offset(offset);
    let ns = dt.unix_timestamp_nanos();
    if ns < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).ok()?))
}

/// Go's `strconv.Quote` for what statements hold: `"` and `\` escaped,
/// control characters as `\n`, `\t`, `\r` or `\xNN`; other UTF-8 as is.
fn go_quote(s: &str, out: &mut Vec<u8>) {
    use std::io::Write;
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// The inverse of [`go_quote`] (and of the escapes Go's `Unquote` reads
/// that statements use).
fn go_unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Vec::with_capacity(inner.len());
    let b = inner.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let e = *b.get(i + 1)?;
        i += 2;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'"' => out.push(b'"'),
            b'\\' => out.push(b'\\'),
            b'\'' => out.push(b'\''),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'x' => {
                out.push(u8::from_str_radix(inner.get(i..i + 2)?, 16).ok()?);
                i += 2;
            }
            b'u' | b'U' => {
                let n = if e == b'u' { 4 } else { 8 };
                let c = char::from_u32(u32::from_str_radix(inner.get(i..i + n)?, 16).ok()?)?;
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += n;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Why a capture file cannot be read further.
#[derive(Debug, thiserror::Error)]
#[error("{file}, line {line}, offset {offset}: {what}")]
pub struct DecodeError {
    /// The file.
    pub file: String,
    /// The record's line (1-based).
    pub line: usize,
    /// Bytes of the (decrypted, decompressed) file read before the problem.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

/// Reads records from one file's plain text.
#[derive(Debug)]
pub struct Decoder<R> {
    r: R,
    file: String,
    line: usize,
    offset: u64,
    buf: Vec<u8>,
}

/// The longest header line accepted (a prepared statement's text is in one).
const MAX_LINE: u64 = 64 << 20;
/// The largest payload accepted: MySQL's largest packet.
const MAX_PAYLOAD: usize = 1 << 30;

impl<R: BufRead> Decoder<R> {
    /// Reads `r`, naming `file` in errors.
    pub fn new(r: R, file: impl Into<String>) -> Self {
        Self {
            r,
            file: file.into(),
            line: 0,
            offset: 0,
            buf: Vec::new(),
        }
    }

    /// Lines read so far (the next record starts on the line after).
    pub fn line(&self) -> usize {
        self.line
    }

    fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            file: self.file.clone(),
            line: self.line,
            offset: self.offset,
            what: what.into(),
        }
    }

    /// The next record; `Ok(None)` at a clean end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        let mut start = None;
        let mut conn_id = 0u64;
        let mut cmd = COM_QUERY;
        let mut success = true;
        let mut ps_id = 0u32;
        let mut prepared_stmt = String::new();
        let mut digest = None;
        let record_offset = self.offset;
        loop {
            self.buf.clear();
            let n = <&mut R as std::io::Read>::take(&mut self.r, MAX_LINE)
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| self.err(format!("read failed: {e}")))?;
            if n == 0 {
                if self.offset == record_offset {
                    return Ok(None);
                }
                return Err(self.err("the file ends inside a record (truncated)"));
            }
            self.line += 1;
            if self.buf.last() != Some(&b'\n') {
                return Err(self.err("the file ends inside a record (truncated)"));
            }
            self.offset += n as u64;
            let line = String::from_utf8_lossy(&self.buf[..n - 1]).into_owned();
            let Some((key, value)) = line
                .strip_prefix("# ")
                .and_then(|l| l.split_once(": "))
                .filter(|(_, v)| !v.is_empty())
            else {
                return Err(self.err(format!("not a `# Key: value` line: {line:.80}")));
            };
            match key {
                "Time" => {
                    start = Some(
                        parse_rfc3339(value)
                            .ok_or_else(|| self.err(format!("bad Time: {value}")))?,
                    )
                }
                "Conn_ID" => {
                    conn_id = value
                        .parse()
                        .map_err(|_| self.err(format!("bad Conn_ID: {value}")))?
                }
                "Cmd_type" => {
                    cmd = command_byte(value)
                        .ok_or_else(|| self.err(format!("unknown Cmd_type: {value}")))?
                }
                "Success" => success = value == "true",
                "Captured_ps_id" => {
                    ps_id = value
                        .parse()
                        .map_err(|_| self.err(format!("bad Captured_ps_id: {value}")))?
                }
                "Prepared_stmt" => {
                    prepared_stmt = go_unquote(value)
                        .ok_or_else(|| self.err(format!("bad Prepared_stmt: {value:.80}")))?
                }
                "Result_digest" => {
                    digest = Some(
                        ResultDigest::from_text(value)
                            .ok_or_else(|| self.err(format!("bad Result_digest: {value:.80}")))?,
                    )
                }
                "Payload_len" => {
                    let len: usize = value
                        .parse()
                        .ok()
                        .filter(|l| *l <= MAX_PAYLOAD)
                        .ok_or_else(|| self.err(format!("bad Payload_len: {value}")))?;
                    let mut payload = vec![0u8; len + 1];
                    payload[0] = cmd;
                    self.read_exact(&mut payload[1..])?;
                    let mut nl = [0u8; 1];
                    self.read_exact(&mut nl)?;
                    if nl[0] != b'\n' {
                        return Err(self.err("no new line after the payload"));
                    }
                    let Some(start) = start else {
                        return Err(self.err("record without Time"));
                    };
                    if conn_id == 0 {
                        return Err(self.err("record without Conn_ID"));
                    }
                    return Ok(Some(Record {
                        start,
                        conn_id,
                        payload,
                        success,
                        ps_id,
                        prepared_stmt,
                        digest,
                    }));
                }
                // Keys a later TiProxy may add are skipped, as its reader does.
                _ => {}
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), DecodeError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.err("the file ends inside a record's payload (truncated)"))
            }
            Err(e) => Err(self.err(format!("read failed: {e}"))),
        }
    }
}
