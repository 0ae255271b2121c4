//! The format and the files: what TiProxy's reader expects, byte by byte,
//! and round trips through rotation, gzip and AES-256-CTR.

use std::io::Read;
use std::time::{Duration, UNIX_EPOCH};

use super::format::{Decoder, Record, encode, parse_rfc3339};
use super::store::{self, RotateWriter};

fn rec(conn_id: u64, payload: &[u8]) -> Record {
    Record {
        start: UNIX_EPOCH + Duration::new(1_724_752_800, 123_456_000),
        conn_id,
        payload: payload.to_vec(),
        success: true,
        ps_id: 0,
        prepared_stmt: String::new(),
        digest: None,
    }
}

/// `pkg/sqlreplay/cmd/native.go`: `# Time: ` RFC3339Nano, `# Conn_ID: `,
/// `# Cmd_type: ` only when not Query, `# Success: false` only on failure,
/// `# Captured_ps_id: ` when set, `# Prepared_stmt: ` Go-quoted,
/// `# Payload_len: ` without the command byte, the payload, `\n`.
#[test]
fn records_are_tiproxys_native_format_field_by_field() {
    let mut out = Vec::new();
    encode(&rec(7, b"\x03select 1"), &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "# Time: 2024-08-27T10:00:00.123456Z\n# Conn_ID: 7\n# Payload_len: 8\nselect 1\n"
    );

    let mut exec = rec(9, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00");
    exec.success = false;
    exec.ps_id = 1;
    exec.prepared_stmt = "select \"a\"\n?".into();
    let mut out = Vec::new();
    encode(&exec, &mut out);
    let mut want = b"# Time: 2024-08-27T10:00:00.123456Z\n# Conn_ID: 9\n# Cmd_type: StmtExecute\n\
# Success: false\n# Captured_ps_id: 1\n# Prepared_stmt: \"select \\\"a\\\"\\n?\"\n# Payload_len: 9\n"
        .to_vec();
    want.extend_from_slice(&exec.payload[1..]);
    want.push(b'\n');
    assert_eq!(out, want);

    // An empty payload (COM_QUIT) still ends with a new line.
    let mut out = Vec::new();
    encode(&rec(9, b"\x01"), &mut out);
    assert!(out.ends_with(b"# Cmd_type: Quit\n# Payload_len: 0\n\n"));

    // And the decoder reads back what was written.
    let mut all = Vec::new();
    encode(&rec(7, b"\x03select 1"), &mut all);
    encode(&exec, &mut all);
    let mut d = Decoder::new(&all[..], "f");
    assert_eq!(d.next_record().unwrap(), Some(rec(7, b"\x03select 1")));
    assert_eq!(d.next_record().unwrap(), Some(exec));
    assert_eq!(d.next_record().unwrap(), None);
}

/// `--compare`'s digest rides in an extra header line. TiProxy's
/// `NativeDecoder.Decode` needs every line before the payload to start with
/// `# `, to hold `: ` and a non-empty value, and skips keys it does not
/// know (its `switch` has no default): the record stays readable to it.
#[test]
fn result_digests_ride_in_a_header_tiproxy_skips() {
    let mut r = rec(7, b"\x03select 1");
    r.digest = Some(tiproxy_core::digest::ResultDigest {
        rows: 3,
        unordered: 0xfeed,
        ordered: 0xbeef,
        affected: 0,
        error: 0,
    });
    let mut out = Vec::new();
    encode(&r, &mut out);
    let text = String::from_utf8(out.clone()).unwrap();
    assert_eq!(
        text,
        "# Time: 2024-08-27T10:00:00.123456Z\n# Conn_ID: 7\n\
# Result_digest: 3 0 0 000000000000feed 000000000000beef\n# Payload_len: 8\nselect 1\n"
    );
    for line in text.lines().take(4) {
        let (_, value) = line.strip_prefix("# ").unwrap().split_once(": ").unwrap();
        assert!(!value.is_empty(), "{line}");
    }
    let mut d = Decoder::new(&out[..], "f");
    assert_eq!(d.next_record().unwrap(), Some(r));
}

#[test]
fn times_parse_as_go_writes_them() {
    let t = parse_rfc3339("2024-08-27T10:00:00.123456Z").unwrap();
    assert_eq!(t, UNIX_EPOCH + Duration::new(1_724_752_800, 123_456_000));
    // Go writes local time with an offset.
    let t = parse_rfc3339("2024-08-27T18:00:00.5+08:00").unwrap();
    assert_eq!(t, UNIX_EPOCH + Duration::new(1_724_752_800, 500_000_000));
    assert!(parse_rfc3339("2024-08-27 10:00:00").is_none());
}

fn read_all(dir: &std::path::Path, key: Option<&[u8; 32]>) -> Vec<Record> {
    let mut out = Vec::new();
    for f in store::list_files(dir).unwrap() {
        let r = store::open_file(&f, key).unwrap();
        let mut d = Decoder::new(r, f.display().to_string());
        while let Some(r) = d.next_record().unwrap() {
            out.push(r);
        }
    }
    out
}

#[test]
fn compressed_encrypted_files_rotate_and_round_trip() {
    let dir = tempdir("rt");
    let key = [7u8; 32];
    let mut w = RotateWriter::new(&dir, 4096, true, Some(key)).unwrap();
    let mut want = Vec::new();
    for i in 0..300u64 {
        let r = rec(
            i % 4 + 1,
            format!("\x03insert into t values ({i})").as_bytes(),
        );
        let mut b = Vec::new();
        encode(&r, &mut b);
        w.write(&b).unwrap();
        want.push(r);
    }
    w.finish().unwrap();
    let files = store::list_files(&dir).unwrap();
    assert!(files.len() > 3, "rotated into {} files", files.len());
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("traffic-") && name.ends_with(".log.gz"),
            "{name}"
        );
        // gzip outside: the plain gzip stream holds the IV and ciphertext,
        // not the records.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(f).unwrap())
            .read_to_end(&mut plain)
            .unwrap();
        assert!(!plain.windows(8).any(|w| w == b"# Time: "));
    }
    assert_eq!(read_all(&dir, Some(&key)), want);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_truncated_file_names_file_and_offset_and_its_intact_part_reads() {
    let dir = tempdir("trunc");
    let mut w = RotateWriter::new(&dir, 1 << 20, false, None).unwrap();
    let mut b = Vec::new();
    for i in 0..10u64 {
        encode(&rec(1, format!("\x03select {i}").as_bytes()), &mut b);
    }
    let whole = b.len();
    w.write(&b).unwrap();
    w.finish().unwrap();
    let f = store::list_files(&dir).unwrap().remove(0);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..whole - 5]).unwrap();
    let mut d = Decoder::new(store::open_file(&f, None).unwrap(), f.display().to_string());
    let mut ok = 0;
    let err = loop {
        match d.next_record() {
            Ok(Some(_)) => ok += 1,
            Ok(None) => panic!("no error for a truncated file"),
            Err(e) => break e,
        }
    };
    assert_eq!(ok, 9, "the intact records read");
    let msg = err.to_string();
    assert!(msg.contains(&f.display().to_string()), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(err.offset as usize >= bytes.len() / 10 * 9, "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_key_is_required_and_checked() {
    assert!(
        store::load_key("aes256-ctr", "")
            .unwrap_err()
            .contains("encryption-key-path")
    );
    let dir = tempdir("key");
    let p = dir.join("k");
    std::fs::write(&p, b"short").unwrap();
    let e = store::load_key("aes256-ctr", p.to_str().unwrap()).unwrap_err();
    assert!(e.contains("expecting 32"), "{e}");
    assert!(
        store::load_key("rot13", "")
            .unwrap_err()
            .contains("unsupported")
    );
    assert_eq!(store::load_key("", "").unwrap(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tiproxy-traffic-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A session that existed before the capture starts from TiDB's exported
/// state; the texts of its prepared statements come from `prepared-stmts`
/// (TiDB's `sessionstates.PreparedStmtInfo`: `text`), best effort.
#[test]
fn prepared_texts_come_from_the_exported_state() {
    use super::capture::prepared_texts;
    let states = br#"{"prepared-stmts":{"1":{"text":"select ?","types":"AQ=="},"4":{"name":"p","text":"update t set v = ?"},"5":{"text":""}},"current-db":"shop"}"#;
    let got = prepared_texts(states).expect("two statements");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[&1], "select ?");
    assert_eq!(got[&4], "update t set v = ?");
    assert_eq!(prepared_texts(br#"{"current-db":"shop"}"#), None);
    assert_eq!(prepared_texts(b"not json"), None);
}
