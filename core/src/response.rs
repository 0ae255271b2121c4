//! Generic response packets: OK, ERR, EOF (old and the DEPRECATE_EOF
//! OK-as-terminator), LOCAL INFILE request, column count (with MariaDB's
//! "metadata follows" byte) and MariaDB progress reports.

use bytes::{BufMut, Bytes, BytesMut};

use crate::flags::{CapabilityFlags, StatusFlags};
use crate::packet::MAX_PAYLOAD;
use crate::wire::{Reader, WireError, put_lenenc_bytes, put_lenenc_int};

/// First byte of an OK packet.
pub const OK_HEADER: u8 = 0x00;
/// First byte of an EOF packet, and of the DEPRECATE_EOF terminator.
pub const EOF_HEADER: u8 = 0xfe;
/// First byte of an ERR packet.
pub const ERR_HEADER: u8 = 0xff;
/// First byte of a LOCAL INFILE request.
pub const LOCAL_INFILE_HEADER: u8 = 0xfb;

/// Whether a packet that starts with 0xFE is an old-style EOF packet
/// rather than a row: EOF payloads are shorter than 9 bytes.
#[inline]
pub fn is_eof(first: u8, len: usize) -> bool {
    first == EOF_HEADER && len < 9
}

/// Whether a packet ends a row stream: an EOF packet, or with
/// DEPRECATE_EOF an OK packet with a 0xFE header (a row can start with 0xFE
/// only when its first column is at least 16 MiB long, so its packet is
/// exactly `MAX_PAYLOAD` bytes).
#[inline]
pub fn is_row_terminator(first: u8, len: usize, deprecate_eof: bool) -> bool {
    first == EOF_HEADER
        && if deprecate_eof {
            len < MAX_PAYLOAD
        } else {
            len < 9
        }
}

/// An OK packet (or a DEPRECATE_EOF terminator, which has the same body).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OkPacket {
    /// Header byte: 0x00, or 0xFE for a terminator.
    pub header: u8,
    /// Affected rows.
    pub affected_rows: u64,
    /// Last insert id.
    pub last_insert_id: u64,
    /// Status flags.
    pub status: StatusFlags,
    /// Warning count.
    pub warnings: u16,
    /// Human-readable info (e.g. "Rows matched: 1  Changed: 1  Warnings: 0").
    pub info: Bytes,
    /// Session state changes (with `SESSION_TRACK` and
    /// `SESSION_STATE_CHANGED`), raw.
    pub session_state: Bytes,
}

impl OkPacket {
    /// Parses an OK or terminator payload.
    pub fn parse(payload: &[u8], caps: CapabilityFlags) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let header = r.u8("ok header")?;
        if header != OK_HEADER && header != EOF_HEADER {
            return Err(WireError::Invalid {
                field: "ok header",
                detail: "expected 0x00 or 0xFE",
            });
        }
        let affected_rows = r.lenenc_int("affected rows")?;
        let last_insert_id = r.lenenc_int("last insert id")?;
        let (status, warnings) = if caps.contains(CapabilityFlags::PROTOCOL_41) {
            (
                StatusFlags::from_bits_retain(r.u16("status flags")?),
                r.u16("warnings")?,
            )
        } else if caps.contains(CapabilityFlags::TRANSACTIONS) {
            (StatusFlags::from_bits_retain(r.u16("status flags")?), 0)
        } else {
            (StatusFlags::empty(), 0)
        };
        Ok(Self {
            header,
            affected_rows,
            last_insert_id,
            status,
            warnings,
            info: Bytes::new(),
            session_state: Bytes::new(),
        }
        .with_tail(r.rest(), caps))
    }

    /// Reads what follows the warnings. Servers write the info text
    /// length-encoded (MySQL's `net_store_data`), and with SESSION_TRACK the
    /// session state block after it; an info that does not parse as
    /// length-encoded is kept whole (older servers wrote it raw).
    fn with_tail(mut self, tail: &[u8], caps: CapabilityFlags) -> Self {
        if tail.is_empty() {
            return self;
        }
        let mut r = Reader::new(tail);
        match r.lenenc_bytes("info") {
            Ok(info) if caps.contains(CapabilityFlags::SESSION_TRACK) || r.is_empty() => {
                self.info = Bytes::copy_from_slice(info);
                if self.status.contains(StatusFlags::SESSION_STATE_CHANGED) {
                    self.session_state = Bytes::copy_from_slice(r.rest());
                }
            }
            _ => self.info = Bytes::copy_from_slice(tail),
        }
        self
    }

    /// Reads only the status flags of an OK payload: the hot-path variant
    /// of [`OkPacket::parse`].
    #[inline]
    pub fn status_of(payload: &[u8]) -> Result<StatusFlags, WireError> {
        let mut r = Reader::new(payload);
        r.u8("ok header")?;
        r.lenenc_int("affected rows")?;
        r.lenenc_int("last insert id")?;
        Ok(StatusFlags::from_bits_retain(r.u16("status flags")?))
    }

    /// Builds the payload (4.1 format). The info text is length-encoded, as
    /// servers write it; the session state block follows with
    /// `SESSION_TRACK` when `SESSION_STATE_CHANGED` is set.
    pub fn write(&self, out: &mut BytesMut, caps: CapabilityFlags) {
        out.put_u8(self.header);
        put_lenenc_int(out, self.affected_rows);
        put_lenenc_int(out, self.last_insert_id);
        out.put_u16_le(self.status.bits());
        out.put_u16_le(self.warnings);
        let state = caps.contains(CapabilityFlags::SESSION_TRACK)
            && self.status.contains(StatusFlags::SESSION_STATE_CHANGED);
        if !self.info.is_empty() || state {
            put_lenenc_bytes(out, &self.info);
        }
        if state {
            out.put_slice(&self.session_state);
        }
    }
}

/// An old-style EOF packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EofPacket {
    /// Warning count.
    pub warnings: u16,
    /// Status flags.
    pub status: StatusFlags,
}

impl EofPacket {
    /// Parses an EOF payload (0xFE, then warnings and status with 4.1).
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("eof header")? != EOF_HEADER {
            return Err(WireError::Invalid {
                field: "eof header",
                detail: "expected 0xFE",
            });
        }
        if r.is_empty() {
            return Ok(Self::default());
        }
        Ok(Self {
            warnings: r.u16("warnings")?,
            status: StatusFlags::from_bits_retain(r.u16("status flags")?),
        })
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(EOF_HEADER);
        out.put_u16_le(self.warnings);
        out.put_u16_le(self.status.bits());
    }
}

/// Reads the status flags of any terminator: an EOF packet or a
/// DEPRECATE_EOF OK packet.
#[inline]
pub fn terminator_status(payload: &[u8]) -> Result<StatusFlags, WireError> {
    if payload.len() < 9 {
        EofPacket::parse(payload).map(|e| e.status)
    } else {
        OkPacket::status_of(payload)
    }
}

/// An ERR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    /// Error code.
    pub code: u16,
    /// SQL state (5 ASCII characters).
    pub sql_state: [u8; 5],
    /// Message.
    pub message: Bytes,
}

impl ErrPacket {
    /// Parses an ERR payload. The `#` SQL state marker is optional: servers
    /// omit it before they know the client speaks 4.1.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("err header")? != ERR_HEADER {
            return Err(WireError::Invalid {
                field: "err header",
                detail: "expected 0xFF",
            });
        }
        let code = r.u16("error code")?;
        let mut sql_state = *b"HY000";
        if r.peek() == Some(b'#') && r.remaining() >= 6 {
            r.u8("sql state marker")?;
            sql_state.copy_from_slice(r.take(5, "sql state")?);
        }
        Ok(Self {
            code,
            sql_state,
            message: Bytes::copy_from_slice(r.rest()),
        })
    }

    /// Builds the payload (4.1 format, with the SQL state).
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(ERR_HEADER);
        out.put_u16_le(self.code);
        out.put_u8(b'#');
        out.put_slice(&self.sql_state);
        out.put_slice(&self.message);
    }

    /// Builds the payload as a server sends it before its greeting, when
    /// the client's protocol is not known yet (too many connections, out
    /// of resources): without the SQL state, which clients would show as
    /// part of the message (MySQL's `net_send_error_packet`).
    pub fn write_pre_handshake(&self, out: &mut BytesMut) {
        out.put_u8(ERR_HEADER);
        out.put_u16_le(self.code);
        out.put_slice(&self.message);
    }

    /// The message as text (lossy).
    pub fn message_text(&self) -> String {
        String::from_utf8_lossy(&self.message).into_owned()
    }
}

/// Parses a column count packet (a length-encoded integer, nothing else).
pub fn parse_column_count(payload: &[u8]) -> Result<u64, WireError> {
    let mut r = Reader::new(payload);
    let n = r.lenenc_int("column count")?;
    if n == 0 {
        return Err(WireError::Invalid {
            field: "column count",
            detail: "a result set has at least one column",
        });
    }
    Ok(n)
}

/// A column count packet as MariaDB sends it to a client that negotiated
/// `CACHE_METADATA`: the count, then whether column definitions follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnCount {
    /// Number of columns.
    pub columns: u64,
    /// Whether column definitions follow (always, without `CACHE_METADATA`;
    /// with it, a COM_STMT_EXECUTE result of a statement whose metadata the
    /// client already holds says 0).
    pub metadata_follows: bool,
}

impl ColumnCount {
    /// Parses a column count packet; `cache_metadata` is whether
    /// `MariaDbCapabilities::CACHE_METADATA` was negotiated, in which case
    /// the "metadata follows" byte (0 or 1) must be there.
    pub fn parse(payload: &[u8], cache_metadata: bool) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let columns = r.lenenc_int("column count")?;
        if columns == 0 {
            return Err(WireError::Invalid {
                field: "column count",
                detail: "a result set has at least one column",
            });
        }
        let metadata_follows = if cache_metadata {
            match r.u8("metadata follows")? {
                0 => false,
                1 => true,
                _ => {
                    return Err(WireError::Invalid {
                        field: "metadata follows",
                        detail: "expected 0 or 1",
                    });
                }
            }
        } else {
            true
        };
        Ok(Self {
            columns,
            metadata_follows,
        })
    }

    /// Builds the payload (the flag byte only with `cache_metadata`).
    pub fn write(&self, out: &mut BytesMut, cache_metadata: bool) {
        put_lenenc_int(out, self.columns);
        if cache_metadata {
            out.put_u8(u8::from(self.metadata_follows));
        }
    }
}

/// A MariaDB progress report (sent with `MariaDbCapabilities::PROGRESS`
/// while a statement runs): an ERR-headed packet with error code 0xFFFF,
/// which no real error uses.
pub fn is_progress_report(payload: &[u8]) -> bool {
    payload.len() >= 3 && payload[0] == ERR_HEADER && payload[1] == 0xff && payload[2] == 0xff
}

/// COM_STMT_PREPARE's first response packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareOk {
    /// Statement id assigned by the server.
    pub statement_id: u32,
    /// Number of result columns.
    pub columns: u16,
    /// Number of parameters.
    pub params: u16,
    /// Warning count.
    pub warnings: u16,
}

impl PrepareOk {
    /// Parses the payload (0x00, id, columns, params, filler, warnings).
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        if r.u8("prepare ok header")? != OK_HEADER {
            return Err(WireError::Invalid {
                field: "prepare ok header",
                detail: "expected 0x00",
            });
        }
        let statement_id = r.u32("statement id")?;
        let columns = r.u16("column count")?;
        let params = r.u16("parameter count")?;
        let warnings = if r.remaining() >= 3 {
            r.u8("filler")?;
            r.u16("warnings")?
        } else {
            0
        };
        Ok(Self {
            statement_id,
            columns,
            params,
            warnings,
        })
    }

    /// Builds the payload.
    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(OK_HEADER);
        out.put_u32_le(self.statement_id);
        out.put_u16_le(self.columns);
        out.put_u16_le(self.params);
        out.put_u8(0);
        out.put_u16_le(self.warnings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ok_round_trips_and_status_fast_path_agrees() {
        let caps = CapabilityFlags::PROTOCOL_41;
        let ok = OkPacket {
            header: OK_HEADER,
            affected_rows: 300,
            last_insert_id: 1 << 40,
            status: StatusFlags::IN_TRANS | StatusFlags::AUTOCOMMIT,
            warnings: 2,
            info: Bytes::from_static(b"Rows matched: 1"),
            session_state: Bytes::new(),
        };
        let mut out = BytesMut::new();
        ok.write(&mut out, caps);
        assert_eq!(OkPacket::parse(&out, caps).unwrap(), ok);
        assert_eq!(OkPacket::status_of(&out).unwrap(), ok.status);
        // With session tracking: info then the state block.
        let caps = caps | CapabilityFlags::SESSION_TRACK;
        let tracked = OkPacket {
            status: StatusFlags::AUTOCOMMIT | StatusFlags::SESSION_STATE_CHANGED,
            session_state: Bytes::from_static(b"\x05\x01\x00\x04test"),
            ..ok
        };
        let mut out = BytesMut::new();
        tracked.write(&mut out, caps);
        assert_eq!(OkPacket::parse(&out, caps).unwrap(), tracked);
    }

    #[test]
    fn err_with_and_without_sql_state() {
        let e = ErrPacket {
            code: 1045,
            sql_state: *b"28000",
            message: Bytes::from_static(b"Access denied"),
        };
        let mut out = BytesMut::new();
        e.write(&mut out);
        assert_eq!(ErrPacket::parse(&out).unwrap(), e);
        let bare = ErrPacket::parse(&[0xff, 0x10, 0x04, b'T', b'o', b'o']).unwrap();
        assert_eq!(bare.code, 1040);
        assert_eq!(&bare.message[..], b"Too");
    }

    #[test]
    fn eof_and_terminator_status() {
        let e = EofPacket {
            warnings: 0,
            status: StatusFlags::MORE_RESULTS_EXISTS,
        };
        let mut out = BytesMut::new();
        e.write(&mut out);
        assert_eq!(EofPacket::parse(&out).unwrap(), e);
        assert_eq!(
            terminator_status(&out).unwrap(),
            StatusFlags::MORE_RESULTS_EXISTS
        );
        assert!(is_eof(out[0], out.len()));
        assert!(!is_eof(0xfe, 9));
        assert!(is_row_terminator(0xfe, 100, true));
        assert!(!is_row_terminator(0xfe, MAX_PAYLOAD, true));
    }

    #[test]
    fn prepare_ok_round_trips() {
        let p = PrepareOk {
            statement_id: 9,
            columns: 3,
            params: 2,
            warnings: 0,
        };
        let mut out = BytesMut::new();
        p.write(&mut out);
        assert_eq!(PrepareOk::parse(&out).unwrap(), p);
    }

    #[test]
    fn column_count_with_and_without_metadata_flag() {
        for (cache, follows) in [(false, true), (true, true), (true, false)] {
            let c = ColumnCount {
                columns: 300,
                metadata_follows: follows,
            };
            let mut out = BytesMut::new();
            c.write(&mut out, cache);
            assert_eq!(out.len(), 3 + usize::from(cache));
            assert_eq!(ColumnCount::parse(&out, cache).unwrap(), c);
        }
        assert!(ColumnCount::parse(&[1], true).is_err(), "flag byte missing");
        assert!(
            ColumnCount::parse(&[1, 2], true).is_err(),
            "flag byte is 0/1"
        );
    }

    #[test]
    fn progress_report_is_err_ffff() {
        // What mariadbd's net_send_progress_packet writes: 0xFF, 0xFFFF,
        // one string, stage 1 of 2, 50.000%, "copy".
        let report = b"\xff\xff\xff\x01\x01\x02\x50\xc3\x00\x04copy";
        assert!(is_progress_report(report));
        assert!(!is_progress_report(&err_bytes(1146)));
        assert!(!is_progress_report(&[0xff, 0xff]));
    }

    fn err_bytes(code: u16) -> Vec<u8> {
        let mut out = BytesMut::new();
        ErrPacket {
            code,
            sql_state: *b"42S02",
            message: Bytes::from_static(b"x"),
        }
        .write(&mut out);
        out.to_vec()
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = OkPacket::parse(&bytes, CapabilityFlags::PROTOCOL_41);
            let _ = OkPacket::status_of(&bytes);
            let _ = ErrPacket::parse(&bytes);
            let _ = EofPacket::parse(&bytes);
            let _ = terminator_status(&bytes);
            let _ = parse_column_count(&bytes);
            let _ = ColumnCount::parse(&bytes, true);
            let _ = PrepareOk::parse(&bytes);
        }
    }
}
