use bytes::BytesMut;

use super::*;
use crate::flags::{CapabilityFlags, MariaDbCapabilities};
use crate::response::{EofPacket, ErrPacket, OkPacket, PrepareOk};

pub(super) fn ok(status: StatusFlags) -> Vec<u8> {
    let mut b = BytesMut::new();
    OkPacket {
        status,
        ..OkPacket::default()
    }
    .write(&mut b, CapabilityFlags::PROTOCOL_41);
    b.to_vec()
}

pub(super) fn ok_terminator(status: StatusFlags) -> Vec<u8> {
    let mut v = ok(status);
    v[0] = 0xfe;
    v
}

pub(super) fn eof(status: StatusFlags) -> Vec<u8> {
    let mut b = BytesMut::new();
    EofPacket {
        warnings: 0,
        status,
    }
    .write(&mut b);
    b.to_vec()
}

pub(super) fn err() -> Vec<u8> {
    let mut b = BytesMut::new();
    ErrPacket {
        code: 1146,
        sql_state: *b"42S02",
        message: "Table 't' doesn't exist".into(),
    }
    .write(&mut b);
    b.to_vec()
}

pub(super) fn column_def() -> Vec<u8> {
    // A plausible column definition: catalog "def", then other fields.
    b"\x03def\x04test\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00"
        .to_vec()
}

pub(super) fn row(text: &str) -> Vec<u8> {
    let mut v = vec![text.len() as u8];
    v.extend_from_slice(text.as_bytes());
    v
}

/// Feeds one backend packet the way the session does: first byte, then the
/// whole payload only if the tracker asks for it.
pub(super) fn feed(t: &mut CommandTracker, payload: &[u8]) -> BackendPacket {
    let first = payload.first().copied().unwrap_or(0);
    let view = if t.backend_needs_whole(payload.len(), first) {
        payload
    } else {
        &payload[..payload.len().min(1)]
    };
    t.on_backend_packet(payload.len(), view).unwrap()
}

pub(super) fn command(t: &mut CommandTracker, payload: &[u8]) -> ClientPacket {
    let n = t.client_prefix_needed(payload.len());
    t.on_client_packet(payload.len(), &payload[..n])
}

pub(super) fn tracker(deprecate_eof: bool) -> CommandTracker {
    CommandTracker::new(deprecate_eof, StatusFlags::AUTOCOMMIT)
}

pub(super) const DONE: BackendPacket = BackendPacket::Done { ok: true };
const FAILED: BackendPacket = BackendPacket::Done { ok: false };
const MORE: BackendPacket = BackendPacket::Progress;

#[test]
fn query_ok_and_err() {
    let mut t = tracker(false);
    assert_eq!(
        command(&mut t, b"\x03insert into t values (1)"),
        ClientPacket::Forward
    );
    assert!(!t.accepts_client_packet());
    assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
    assert!(t.is_idle() && t.at_safe_point());
    command(&mut t, b"\x03select * from missing");
    assert_eq!(feed(&mut t, &err()), FAILED);
    assert!(t.is_idle());
}

#[test]
fn text_result_set_with_and_without_deprecate_eof() {
    for deprecate in [false, true] {
        let mut t = tracker(deprecate);
        command(&mut t, b"\x03select a, b from t");
        assert_eq!(feed(&mut t, &[2]), MORE);
        assert_eq!(feed(&mut t, &column_def()), MORE);
        assert_eq!(feed(&mut t, &column_def()), MORE);
        if !deprecate {
            assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), MORE);
        }
        for i in 0..100 {
            assert_eq!(feed(&mut t, &row(&i.to_string())), MORE);
        }
        // A row whose first byte is 0xFE but long: not a terminator.
        let mut long_row = vec![0xfe];
        long_row.extend_from_slice(&[0; 20]);
        if !deprecate {
            assert_eq!(feed(&mut t, &long_row), MORE);
        }
        let end = if deprecate {
            ok_terminator(StatusFlags::AUTOCOMMIT)
        } else {
            eof(StatusFlags::AUTOCOMMIT)
        };
        assert_eq!(feed(&mut t, &end), DONE, "deprecate_eof={deprecate}");
        assert!(t.is_idle());
    }
}

#[test]
fn error_in_the_middle_of_rows() {
    let mut t = tracker(false);
    command(&mut t, b"\x03select sleep(10) from t");
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    feed(&mut t, &eof(StatusFlags::empty()));
    feed(&mut t, &row("1"));
    assert_eq!(feed(&mut t, &err()), FAILED);
}

#[test]
fn multi_statement_results_follow_more_results_exists() {
    let more = StatusFlags::AUTOCOMMIT | StatusFlags::MORE_RESULTS_EXISTS;
    let mut t = tracker(false);
    command(&mut t, b"\x03select 1; insert into t values (2); select 3");
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
    feed(&mut t, &row("1"));
    assert_eq!(feed(&mut t, &eof(more)), MORE);
    assert_eq!(feed(&mut t, &ok(more)), MORE);
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
    feed(&mut t, &row("3"));
    assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
}

#[test]
fn transaction_status_follows_ok_packets() {
    let mut t = tracker(true);
    command(&mut t, b"\x03begin");
    feed(&mut t, &ok(StatusFlags::AUTOCOMMIT | StatusFlags::IN_TRANS));
    assert!(t.in_transaction());
    assert!(t.is_idle() && !t.at_safe_point());
    command(&mut t, b"\x03commit");
    feed(&mut t, &ok(StatusFlags::AUTOCOMMIT));
    assert!(t.at_safe_point());
}

#[test]
fn prepare_execute_fetch_close() {
    for deprecate in [false, true] {
        let mut t = tracker(deprecate);
        command(&mut t, b"\x16select a from t where b = ? and c = ?");
        let mut p = BytesMut::new();
        PrepareOk {
            statement_id: 7,
            columns: 1,
            params: 2,
            warnings: 0,
        }
        .write(&mut p);
        assert_eq!(feed(&mut t, &p), MORE);
        feed(&mut t, &column_def());
        let r = feed(&mut t, &column_def());
        if !deprecate {
            assert_eq!(r, MORE);
            assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), MORE);
        }
        assert_eq!(
            feed(&mut t, &column_def()),
            if deprecate { DONE } else { MORE }
        );
        if !deprecate {
            assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
        }
        assert!(t.prepared().contains_key(&7));

        // Long data makes the session unsafe to move until executed.
        assert_eq!(
            command(&mut t, b"\x18\x07\x00\x00\x00\x00\x00abc"),
            ClientPacket::ForwardNoResponse
        );
        assert!(t.long_data().contains(&7) && !t.at_safe_point());

        // Execute with a cursor: the result ends after the column definitions.
        command(&mut t, b"\x17\x07\x00\x00\x00\x01\x01\x00\x00\x00");
        assert!(t.long_data().is_empty());
        feed(&mut t, &[1]);
        let cursor = StatusFlags::AUTOCOMMIT | StatusFlags::CURSOR_EXISTS;
        let r = feed(&mut t, &column_def());
        if deprecate {
            assert_eq!(r, MORE);
            assert_eq!(feed(&mut t, &ok_terminator(cursor)), DONE);
        } else {
            assert_eq!(r, MORE);
            assert_eq!(feed(&mut t, &eof(cursor)), DONE);
        }
        assert!(t.cursors().contains(&7) && !t.at_safe_point());

        // Fetch: rows then a terminator; LAST_ROW_SENT closes the cursor.
        command(&mut t, b"\x1c\x07\x00\x00\x00\x02\x00\x00\x00");
        feed(&mut t, &[0x00, 0x00, 0x01]);
        let end = StatusFlags::AUTOCOMMIT | StatusFlags::LAST_ROW_SENT;
        let term = if deprecate {
            ok_terminator(end)
        } else {
            eof(end)
        };
        assert_eq!(feed(&mut t, &term), DONE);
        assert!(t.cursors().is_empty() && t.at_safe_point());

        assert_eq!(
            command(&mut t, b"\x19\x07\x00\x00\x00"),
            ClientPacket::ForwardNoResponse
        );
        assert!(t.prepared().is_empty() && t.is_idle());
    }
}

#[test]
fn binary_result_set_without_cursor() {
    let mut t = tracker(false);
    command(&mut t, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00");
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
    feed(&mut t, &[0x00, 0x00, 0x01]);
    assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
    assert!(t.cursors().is_empty());
}

#[test]
fn prepare_error() {
    let mut t = tracker(false);
    command(&mut t, b"\x16select from");
    assert_eq!(feed(&mut t, &err()), FAILED);
    assert!(t.prepared().is_empty());
}

#[test]
fn local_infile_upload() {
    let mut t = tracker(false);
    command(&mut t, b"\x03load data local infile '/tmp/x' into table t");
    assert_eq!(feed(&mut t, b"\xfb/tmp/x"), BackendPacket::AwaitClient);
    assert!(t.accepts_client_packet());
    assert_eq!(command(&mut t, b"1,2\n3,4\n"), ClientPacket::Forward);
    // An empty packet that ends a 16 MiB chunk is not the end of the file.
    assert_eq!(t.on_client_packet(MAX_PAYLOAD, &[]), ClientPacket::Forward);
    assert_eq!(t.on_client_packet(0, &[]), ClientPacket::Forward);
    assert_eq!(t.state(), State::InfileUpload);
    assert_eq!(t.on_client_packet(0, &[]), ClientPacket::Forward);
    assert!(!t.accepts_client_packet());
    assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
}

#[test]
fn commands_without_response_and_quit() {
    let mut t = tracker(false);
    assert_eq!(command(&mut t, b"\x01"), ClientPacket::Quit);
    assert_eq!(
        command(&mut t, b"\x12\x00\x00\x00\x00"),
        ClientPacket::Unsupported(Command::BinlogDump)
    );
    assert!(t.is_idle());
}

#[test]
fn simple_commands() {
    // INIT_DB, PING, RESET_CONNECTION, STMT_RESET, PROCESS_KILL: OK or ERR.
    for cmd in [
        &b"\x02test"[..],
        b"\x0e",
        b"\x1f",
        b"\x1a\x01\x00\x00\x00",
        b"\x0c\x01\x00\x00\x00",
    ] {
        let mut t = tracker(false);
        command(&mut t, cmd);
        assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE, "{cmd:?}");
        command(&mut t, cmd);
        assert_eq!(feed(&mut t, &err()), FAILED);
    }
    // SET_OPTION and DEBUG answer with EOF on old servers.
    let mut t = tracker(false);
    command(&mut t, b"\x1b\x00\x00");
    assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
    command(&mut t, b"\x0d");
    assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
}

#[test]
fn statistics_is_one_string_packet() {
    let mut t = tracker(false);
    command(&mut t, b"\x09");
    assert_eq!(feed(&mut t, b"Uptime: 10  Threads: 1"), DONE);
}

#[test]
fn field_list_ends_with_eof() {
    let mut t = tracker(false);
    command(&mut t, b"\x04t\x00");
    feed(&mut t, &column_def());
    feed(&mut t, &column_def());
    assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), DONE);
}

#[test]
fn reset_connection_and_change_user_forget_statements() {
    let mut t = tracker(true);
    command(&mut t, b"\x16select 1");
    let mut p = BytesMut::new();
    PrepareOk {
        statement_id: 1,
        columns: 0,
        params: 0,
        warnings: 0,
    }
    .write(&mut p);
    assert_eq!(feed(&mut t, &p), DONE);
    assert_eq!(t.prepared().len(), 1);
    command(&mut t, b"\x1f");
    feed(&mut t, &ok(StatusFlags::AUTOCOMMIT));
    assert!(t.prepared().is_empty());

    command(&mut t, b"\x16select 1");
    feed(&mut t, &p);
    assert_eq!(command(&mut t, b"\x11root\x00"), ClientPacket::ChangeUser);
    assert_eq!(
        feed(
            &mut t,
            b"\xfemysql_native_password\x00abcdefghij0123456789\x00"
        ),
        BackendPacket::AwaitClient
    );
    assert!(t.accepts_client_packet());
    assert_eq!(command(&mut t, &[7; 20]), ClientPacket::Forward);
    assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
    assert!(t.prepared().is_empty());
}

#[test]
fn large_rows_span_packets() {
    let mut t = tracker(true);
    command(&mut t, b"\x03select repeat('a', 20000000)");
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    // A 16 MiB - 1 packet that starts with 0xFE (the length prefix of a
    // long string) and its continuation must not end the result.
    assert!(!t.backend_needs_whole(MAX_PAYLOAD, 0xfe));
    assert_eq!(t.on_backend_packet(MAX_PAYLOAD, &[0xfe]).unwrap(), MORE);
    assert!(!t.backend_needs_whole(5, 0xfe));
    assert_eq!(t.on_backend_packet(5, &[0xfe]).unwrap(), MORE);
    assert_eq!(feed(&mut t, &ok_terminator(StatusFlags::AUTOCOMMIT)), DONE);
}

#[test]
fn unexpected_backend_packets_are_errors() {
    let mut t = tracker(false);
    assert!(t.on_backend_packet(1, &[0]).is_err());
    command(&mut t, b"\x0e");
    assert!(matches!(
        t.on_backend_packet(3, &[0x42, 1, 2]),
        Err(TrackError::Unexpected(_))
    ));
    let mut t = tracker(false);
    command(&mut t, b"\x03select 1");
    assert!(matches!(
        t.on_backend_packet(1, &[0xfc]),
        Err(TrackError::Malformed(_))
    ));
}

pub(super) fn mariadb_tracker(deprecate_eof: bool, mariadb: MariaDbCapabilities) -> CommandTracker {
    CommandTracker::with_options(
        TrackerOptions {
            deprecate_eof,
            mariadb,
            multi_statements: false,
        },
        StatusFlags::AUTOCOMMIT,
    )
}

pub(super) fn prepare_ok(id: u32, params: u16, columns: u16) -> Vec<u8> {
    let mut p = BytesMut::new();
    PrepareOk {
        statement_id: id,
        columns,
        params,
        warnings: 0,
    }
    .write(&mut p);
    p.to_vec()
}

/// Feeds a whole prepare response: PREPARE_OK, definitions, EOFs.
pub(super) fn prepare(t: &mut CommandTracker, id: u32, params: u16, columns: u16) {
    command(t, b"\x16select ?");
    let mut last = feed(t, &prepare_ok(id, params, columns));
    let deprecate = t.options().deprecate_eof;
    for n in [params, columns] {
        if n == 0 {
            continue;
        }
        for _ in 0..n {
            last = feed(t, &column_def());
        }
        if !deprecate {
            last = feed(t, &eof(StatusFlags::AUTOCOMMIT));
        }
    }
    assert_eq!(last, DONE);
}

pub(super) fn terminator(deprecate: bool, status: StatusFlags) -> Vec<u8> {
    if deprecate {
        ok_terminator(status)
    } else {
        eof(status)
    }
}

#[test]
fn cache_metadata_execute_without_column_definitions() {
    let cache = MariaDbCapabilities::CACHE_METADATA;
    for deprecate in [false, true] {
        let mut t = mariadb_tracker(deprecate, cache);
        prepare(&mut t, 1, 0, 2);
        // First execute: metadata follows (flag 1), two definitions.
        command(&mut t, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00");
        assert_eq!(feed(&mut t, &[2, 1]), MORE);
        assert_eq!(feed(&mut t, &column_def()), MORE);
        assert_eq!(feed(&mut t, &column_def()), MORE);
        if !deprecate {
            assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), MORE);
        }
        assert_eq!(feed(&mut t, &[0, 0, 1, 2]), MORE);
        let end = terminator(deprecate, StatusFlags::AUTOCOMMIT);
        assert_eq!(feed(&mut t, &end), DONE);
        // Second execute: flag 0, rows come straight after the count (and
        // the column EOF without DEPRECATE_EOF).
        command(&mut t, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00");
        assert_eq!(feed(&mut t, &[2, 0]), MORE);
        if !deprecate {
            assert_eq!(t.state(), State::ColumnsEof);
            assert_eq!(feed(&mut t, &eof(StatusFlags::AUTOCOMMIT)), MORE);
        }
        assert_eq!(t.state(), State::Rows);
        assert_eq!(feed(&mut t, &[0, 0, 1, 2]), MORE);
        assert_eq!(feed(&mut t, &end), DONE, "deprecate_eof={deprecate}");
        assert!(t.is_idle());
    }
}

#[test]
fn cache_metadata_text_results_carry_the_flag() {
    let mut t = mariadb_tracker(true, MariaDbCapabilities::CACHE_METADATA);
    command(&mut t, b"\x03select 1");
    // Without the flag byte the packet is malformed for this session.
    assert!(matches!(
        t.on_backend_packet(1, &[1]),
        Err(TrackError::Malformed(_))
    ));
    let mut t = mariadb_tracker(true, MariaDbCapabilities::CACHE_METADATA);
    command(&mut t, b"\x03select 1");
    assert_eq!(feed(&mut t, &[1, 1]), MORE);
    assert_eq!(feed(&mut t, &column_def()), MORE);
    assert_eq!(feed(&mut t, &row("1")), MORE);
    assert_eq!(feed(&mut t, &ok_terminator(StatusFlags::AUTOCOMMIT)), DONE);
}

/// What mariadbd sends while ALTER TABLE copies rows: stage 1 of 2, 50%.
pub(super) const PROGRESS: &[u8] = b"\xff\xff\xff\x01\x01\x02\x50\xc3\x00\x08copy rows";

#[test]
fn progress_reports_do_not_end_the_command() {
    let mut t = mariadb_tracker(false, MariaDbCapabilities::PROGRESS);
    command(&mut t, b"\x03alter table t add column c int");
    for _ in 0..3 {
        assert_eq!(feed(&mut t, PROGRESS), MORE);
        assert_eq!(t.state(), State::Result { infile: true });
    }
    assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
    // A real error still ends it.
    command(&mut t, b"\x03alter table missing add column c int");
    assert_eq!(feed(&mut t, PROGRESS), MORE);
    assert_eq!(feed(&mut t, &err()), FAILED);
    // LOAD DATA LOCAL: reports may come while the file is read.
    command(&mut t, b"\x03load data local infile 'x' into table t");
    assert_eq!(feed(&mut t, b"\xfbx"), BackendPacket::AwaitClient);
    assert_eq!(feed(&mut t, PROGRESS), MORE);
    assert_eq!(command(&mut t, b"1\n"), ClientPacket::Forward);
    assert_eq!(command(&mut t, b""), ClientPacket::Forward);
    assert_eq!(feed(&mut t, PROGRESS), MORE);
    assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
    // Without PROGRESS negotiated the same packet is an ERR: the end.
    let mut t = mariadb_tracker(false, MariaDbCapabilities::empty());
    command(&mut t, b"\x03alter table t add column c int");
    assert_eq!(feed(&mut t, PROGRESS), FAILED);
}

#[test]
fn bulk_execute_answers_ok_err_or_a_result_set() {
    let caps = MariaDbCapabilities::STMT_BULK_OPERATIONS | MariaDbCapabilities::BULK_UNIT_RESULTS;
    for deprecate in [false, true] {
        let mut t = mariadb_tracker(deprecate, caps);
        prepare(&mut t, 3, 2, 0);
        // 0xFA, statement id, flags (SEND_TYPES_TO_SERVER), types, rows.
        let bulk = b"\xfa\x03\x00\x00\x00\x80\x00\x03\x00\x03\x00\x00\x01\x00\x00\x00";
        assert_eq!(command(&mut t, bulk), ClientPacket::Forward);
        assert_eq!(t.command(), Some(Command::StmtBulkExecute));
        assert_eq!(feed(&mut t, &ok(StatusFlags::AUTOCOMMIT)), DONE);
        command(&mut t, bulk);
        assert_eq!(feed(&mut t, &err()), FAILED);
        // Unit results: one row per parameter set (id, affected rows).
        command(&mut t, b"\xfa\x03\x00\x00\x00\xc0\x00");
        assert_eq!(feed(&mut t, &[2]), MORE);
        feed(&mut t, &column_def());
        feed(&mut t, &column_def());
        if !deprecate {
            feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
        }
        feed(&mut t, &[0, 0, 1, 1]);
        feed(&mut t, &[0, 0, 2, 1]);
        let end = terminator(deprecate, StatusFlags::AUTOCOMMIT);
        assert_eq!(feed(&mut t, &end), DONE);
        assert!(t.at_safe_point());
    }
}

/// With EXTENDED_METADATA a column definition carries one more string
/// after the original column name (`\x01` format `json` here, as MariaDB
/// sends for a JSON column). The tracker forwards definitions unparsed and
/// follows the result exactly as without it.
#[test]
fn extended_metadata_column_definitions_are_followed() {
    let ext_def = b"\x03def\x00\x00\x00\x11JSON_OBJECT('a',1)\x00\x06\x01\x04json\x0c\x21\x00\x00\x00\x00\x00\xfc\x80\x00\x27\x00\x00";
    for deprecate in [false, true] {
        let mut t = mariadb_tracker(deprecate, MariaDbCapabilities::EXTENDED_METADATA);
        command(&mut t, b"\x03SELECT JSON_OBJECT('a',1)");
        feed(&mut t, &[1]);
        assert_eq!(feed(&mut t, ext_def), MORE);
        if !deprecate {
            feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
        }
        assert_eq!(feed(&mut t, &row("{\"a\": 1}")), MORE);
        let end = terminator(deprecate, StatusFlags::AUTOCOMMIT);
        assert_eq!(feed(&mut t, &end), DONE);
    }
}

#[test]
fn statement_id_minus_one_means_the_last_prepared() {
    let mut t = tracker(true);
    prepare(&mut t, 9, 0, 1);
    // Execute "-1" with a cursor: the cursor belongs to statement 9.
    command(&mut t, b"\x17\xff\xff\xff\xff\x01\x01\x00\x00\x00");
    feed(&mut t, &[1]);
    feed(&mut t, &column_def());
    let cursor = StatusFlags::AUTOCOMMIT | StatusFlags::CURSOR_EXISTS;
    assert_eq!(feed(&mut t, &ok_terminator(cursor)), DONE);
    assert!(t.cursors().contains(&9));
    command(&mut t, b"\x19\xff\xff\xff\xff");
    assert!(t.prepared().is_empty() && t.cursors().is_empty());
}

#[test]
fn set_option_tracks_multi_statements() {
    let mut t = tracker(false);
    assert!(!t.options().multi_statements);
    command(&mut t, b"\x1b\x00\x00");
    feed(&mut t, &eof(StatusFlags::AUTOCOMMIT));
    assert!(t.options().multi_statements);
    command(&mut t, b"\x1b\x01\x00");
    feed(&mut t, &err());
    assert!(
        t.options().multi_statements,
        "a failed SET_OPTION changes nothing"
    );
    command(&mut t, b"\x1b\x01\x00");
    feed(&mut t, &ok(StatusFlags::AUTOCOMMIT));
    assert!(!t.options().multi_statements);
}

/// deprecate_eof, negotiated flags, command, the answer's payloads.
type Captured = (bool, MariaDbCapabilities, &'static [u8], Vec<&'static [u8]>);

/// Answers captured from MariaDB 10.11.19 by conformance/tests/mariadb_ext.rs
/// (payloads, in order; the ALTER's closing OK is shortened to a bare OK):
/// the tracker ends each on its last packet.
#[test]
fn real_mariadb_answers_are_followed() {
    const JSON_DEF: &[u8] = b"\x03def\x00\x00\x00\x12JSON_OBJECT('a',1)\x00\x06\x01\x04json\x0c\x2d\x00\x48\x00\x00\x00\xfd\x00\x00\x27\x00\x00";
    const ROW: &[u8] = b"\x08{\"a\": 1}";
    const EOF: &[u8] = b"\xfe\x00\x00\x02\x00";
    const OK_TERM: &[u8] = b"\xfe\x00\x00\x02\x00\x00\x00";
    const PROGRESS_REAL: &[u8] = b"\xff\xff\xff\x01\x01\x02\x82\x06\x00\x11copy to tmp table";
    let ext = MariaDbCapabilities::EXTENDED_METADATA;
    let cache = MariaDbCapabilities::CACHE_METADATA;
    let cases: [Captured; 5] = [
        (
            false,
            ext,
            b"\x03SELECT JSON_OBJECT('a',1)",
            vec![b"\x01", JSON_DEF, EOF, ROW, EOF],
        ),
        (
            true,
            ext,
            b"\x03SELECT JSON_OBJECT('a',1)",
            vec![b"\x01", JSON_DEF, ROW, OK_TERM],
        ),
        // COM_STMT_EXECUTE with metadata skipped: count, [EOF], row, end.
        (
            false,
            cache,
            b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00",
            vec![b"\x02\x00", EOF, b"\x00\x00\x01\x00\x00\x00\x01x", EOF],
        ),
        (
            true,
            cache,
            b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00",
            vec![b"\x02\x00", b"\x00\x00\x01\x00\x00\x00\x01x", OK_TERM],
        ),
        (
            false,
            MariaDbCapabilities::PROGRESS,
            b"\x03ALTER TABLE big ADD COLUMN c INT",
            vec![
                PROGRESS_REAL,
                PROGRESS_REAL,
                b"\x00\x00\x00\x02\x00\x00\x00",
            ],
        ),
    ];
    for (deprecate, caps, cmd, answer) in cases {
        let mut t = mariadb_tracker(deprecate, caps);
        command(&mut t, cmd);
        let (last, rest) = answer.split_last().unwrap();
        for p in rest {
            assert_eq!(feed(&mut t, p), MORE, "{caps:?} {p:?}");
        }
        assert_eq!(feed(&mut t, last), DONE, "{caps:?} deprecate={deprecate}");
        assert!(t.is_idle());
        assert_eq!(t.status(), StatusFlags::AUTOCOMMIT);
    }
}
