//! MariaDB's extended capabilities against a real MariaDB: a raw-protocol
//! client negotiates them (CLIENT_MYSQL clear, the extended word in the
//! handshake response's filler), runs statements whose answers change
//! shape with them, and feeds every byte of every answer to the core's
//! `CommandTracker`. The tracker must end each response exactly where the
//! server ended it: `Done` on the last packet, idle, with the server's
//! status, and nothing left on the wire (a COM_PING right after gets its
//! own OK, sequence id 1, first).
//!
//! These are the bytes the proxy relays raw, so they are what its tracker
//! must follow once the session relays the flags.
//!
//! The `*_through_the_proxy` tests run the same raw client through the
//! proxy (which then announces MariaDB's word in its own greeting and
//! relays the client's choice) and compare its answers with the direct
//! ones; `mariadb_cli_shows_format_json` does the same with the `mariadb`
//! command-line client's `--column-type-info`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tiproxy_conformance::mariadb::client_binary;
use tiproxy_conformance::proxy::REAL_PROXY;
use tiproxy_conformance::{MariaDb, Proxy, ProxyOptions};
use tiproxy_core::flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use tiproxy_core::handshake::{ConnectAttributes, HandshakeResponse, InitialHandshake};
use tiproxy_core::response::{OkPacket, PrepareOk, is_progress_report};
use tiproxy_core::tracker::{BackendPacket, ClientPacket, CommandTracker, State, TrackerOptions};

/// A passwordless user, so the raw client needs no scramble.
const RAW_USER: &str = "raw_ext";
const DB: &str = "mariadb_ext";
/// How the `mariadb` client (10.11) prints a JSON column's extended type
/// information under `--column-type-info`.
const JSON_FORMAT: &str = "Type:       VAR_STRING (format=json)";

fn mariadb() -> &'static MariaDb {
    static SERVER: OnceLock<Result<MariaDb, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let m = MariaDb::start().map_err(|err| err.to_string())?;
            m.run_sql(&format!(
                "CREATE USER '{RAW_USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('');
                 GRANT ALL PRIVILEGES ON *.* TO '{RAW_USER}'@'%';
                 CREATE DATABASE {DB};"
            ))
            .map_err(|err| err.to_string())?;
            Ok(m)
        })
        .as_ref()
        .unwrap_or_else(|err| panic!("starting the test MariaDB: {err}"))
}

/// The proxy in front of [`mariadb()`], started once for the binary on a
/// runtime of its own (the raw client is blocking), after it has learned
/// the backend's greeting: until then it announces no extended word.
fn proxy() -> SocketAddr {
    static PROXY: OnceLock<(tokio::runtime::Runtime, Proxy)> = OnceLock::new();
    let (_, p) = PROXY.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the proxy");
        let p = rt
            .block_on(Proxy::start(mariadb().addr(), ProxyOptions::default()))
            .expect("starting the proxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut s = TcpStream::connect(p.sql_addr()).expect("connect to the proxy");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let g = read_packet(&mut s).expect("the proxy's greeting");
            let g = InitialHandshake::parse(&g.payload).expect("greeting parses");
            if !g.mariadb_capabilities.is_empty() || !REAL_PROXY {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy never announced MariaDB's extended capabilities: {g:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (rt, p)
    });
    p.sql_addr()
}

/// Standard capabilities the raw client asks for (CLIENT_MYSQL clear).
fn client_caps(deprecate_eof: bool) -> CapabilityFlags {
    let mut caps = CapabilityFlags::PROTOCOL_41
        | CapabilityFlags::SECURE_CONNECTION
        | CapabilityFlags::PLUGIN_AUTH
        | CapabilityFlags::TRANSACTIONS
        | CapabilityFlags::MULTI_RESULTS
        | CapabilityFlags::PS_MULTI_RESULTS
        | CapabilityFlags::CONNECT_WITH_DB;
    caps.set(CapabilityFlags::DEPRECATE_EOF, deprecate_eof);
    caps
}

/// One packet as read from the wire.
struct Packet {
    seq: u8,
    payload: Vec<u8>,
}

/// A raw-protocol connection with a tracker fed everything it exchanges.
struct Raw {
    s: TcpStream,
    tracker: CommandTracker,
    greeting: InitialHandshake,
}

impl Raw {
    fn connect(deprecate_eof: bool, want: MariaDbCapabilities) -> Raw {
        Raw::connect_to(mariadb().addr(), deprecate_eof, want)
    }

    /// [`Raw::connect`] to `addr`: MariaDB itself or the proxy in front.
    fn connect_to(addr: SocketAddr, deprecate_eof: bool, want: MariaDbCapabilities) -> Raw {
        let mut s = TcpStream::connect(addr).expect("connect to MariaDB");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let g = read_packet(&mut s).expect("greeting");
        let greeting = InitialHandshake::parse(&g.payload).expect("greeting parses");
        assert!(
            greeting.capabilities.has_mariadb_extension(),
            "MariaDB clears CLIENT_MYSQL in its greeting"
        );
        let mariadb = greeting.mariadb_capabilities & want;
        assert_eq!(
            mariadb, want,
            "server offers {:?}",
            greeting.mariadb_capabilities
        );
        let caps = client_caps(deprecate_eof);
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: 1 << 24,
            charset: 45,
            filler: [0; 23],
            mariadb_capabilities: mariadb,
            username: RAW_USER.into(),
            auth_response: Default::default(),
            database: Some(DB.into()),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: ConnectAttributes::default(),
            zstd_level: None,
        };
        let mut b = BytesMut::new();
        resp.write(&mut b);
        write_packet(&mut s, 1, &b);
        let mut ok = read_packet(&mut s).expect("auth answer");
        if ok.payload.first() == Some(&0xfe) {
            // An auth switch (the proxy relays MariaDB's own salt): the
            // password is empty, so is the answer.
            write_packet(&mut s, ok.seq.wrapping_add(1), &[]);
            ok = read_packet(&mut s).expect("auth answer after the switch");
        }
        assert_eq!(
            ok.payload[0],
            0,
            "authenticated: {:?}",
            String::from_utf8_lossy(&ok.payload)
        );
        let status = OkPacket::status_of(&ok.payload).unwrap();
        let options = TrackerOptions::negotiated(caps, mariadb);
        Raw {
            s,
            tracker: CommandTracker::with_options(options, status),
            greeting,
        }
    }

    /// Sends one command and reads the whole answer, packet by packet, as
    /// far as the tracker says it goes. Returns the answer's payloads.
    fn run(&mut self, command: &[u8]) -> Vec<Vec<u8>> {
        let n = self.tracker.client_prefix_needed(command.len());
        assert_eq!(
            self.tracker.on_client_packet(command.len(), &command[..n]),
            ClientPacket::Forward
        );
        write_packet(&mut self.s, 0, command);
        let mut answer = Vec::new();
        let mut expect_seq = 1u8;
        loop {
            let p = read_packet(&mut self.s).unwrap_or_else(|e| {
                panic!(
                    "the tracker waits for more ({:?}) but the server sent nothing: {e}; got {answer:?}",
                    self.tracker.state()
                )
            });
            assert_eq!(p.seq, expect_seq);
            expect_seq = expect_seq.wrapping_add(1);
            let first = p.payload.first().copied().unwrap_or(0);
            let view = if self.tracker.backend_needs_whole(p.payload.len(), first) {
                &p.payload[..]
            } else {
                &p.payload[..1.min(p.payload.len())]
            };
            let step = self
                .tracker
                .on_backend_packet(p.payload.len(), view)
                .unwrap_or_else(|e| panic!("{e} after {answer:?}"));
            answer.push(p.payload);
            match step {
                BackendPacket::Progress => {}
                BackendPacket::Done { .. } => break,
                BackendPacket::AwaitClient => panic!("no command here waits for the client"),
            }
        }
        assert!(self.tracker.is_idle());
        self.assert_nothing_left();
        answer
    }

    /// The tracker ended the answer where the server did: no byte is
    /// pending, and a COM_PING gets its OK (sequence 1) first.
    fn assert_nothing_left(&mut self) {
        self.s
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        match self.s.peek(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("bytes left after the tracker's end of the answer: {other:?}"),
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let ping = self.run_quiet(&[0x0e]);
        assert_eq!(ping.len(), 1);
        assert_eq!(ping[0][0], 0, "COM_PING's OK");
    }

    /// `run` without the trailing check (used by the check itself).
    fn run_quiet(&mut self, command: &[u8]) -> Vec<Vec<u8>> {
        let n = self.tracker.client_prefix_needed(command.len());
        self.tracker.on_client_packet(command.len(), &command[..n]);
        write_packet(&mut self.s, 0, command);
        let p = read_packet(&mut self.s).expect("answer");
        assert_eq!(p.seq, 1);
        let step = self
            .tracker
            .on_backend_packet(p.payload.len(), &p.payload)
            .unwrap();
        assert_eq!(step, BackendPacket::Done { ok: true });
        vec![p.payload]
    }

    fn query(&mut self, sql: &str) -> Vec<Vec<u8>> {
        let mut c = vec![0x03];
        c.extend_from_slice(sql.as_bytes());
        let answer = self.run(&c);
        assert_ne!(
            answer.last().unwrap()[0],
            0xff,
            "{sql}: {}",
            String::from_utf8_lossy(answer.last().unwrap())
        );
        answer
    }

    fn prepare(&mut self, sql: &str) -> PrepareOk {
        let mut c = vec![0x16];
        c.extend_from_slice(sql.as_bytes());
        let answer = self.run(&c);
        PrepareOk::parse(&answer[0]).expect("prepare ok")
    }

    fn ok_status(&self) -> StatusFlags {
        self.tracker.status()
    }
}

fn read_packet(s: &mut TcpStream) -> std::io::Result<Packet> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok(Packet { seq: h[3], payload })
}

fn write_packet(s: &mut TcpStream, seq: u8, payload: &[u8]) {
    let mut b = BytesMut::new();
    tiproxy_core::packet::write_packet(&mut b, seq, payload);
    s.write_all(&b).expect("write");
}

fn execute(id: u32) -> Vec<u8> {
    let mut c = vec![0x17];
    c.extend_from_slice(&id.to_le_bytes());
    c.push(0); // no cursor
    c.extend_from_slice(&1u32.to_le_bytes()); // iteration count
    c
}

#[test]
fn greeting_offers_the_extended_capabilities() {
    let raw = Raw::connect(true, MariaDbCapabilities::empty());
    let offered = raw.greeting.mariadb_capabilities;
    for flag in [
        MariaDbCapabilities::PROGRESS,
        MariaDbCapabilities::STMT_BULK_OPERATIONS,
        MariaDbCapabilities::EXTENDED_METADATA,
        MariaDbCapabilities::CACHE_METADATA,
    ] {
        assert!(offered.contains(flag), "{flag:?} missing from {offered:?}");
    }
}

/// (a) EXTENDED_METADATA: the JSON column's definition says format=json;
/// the tracker follows the result as any other.
#[test]
fn extended_metadata_json_column() {
    for deprecate in [false, true] {
        let mut raw = Raw::connect(deprecate, MariaDbCapabilities::EXTENDED_METADATA);
        let answer = raw.query("SELECT JSON_OBJECT('a',1)");
        // column count, one definition, [EOF], one row, terminator.
        assert_eq!(answer.len(), if deprecate { 4 } else { 5 });
        let def = &answer[1];
        assert!(
            def.windows(6).any(|w| w == b"\x01\x04json"),
            "format=json in {def:?}"
        );
        assert!(raw.ok_status().contains(StatusFlags::AUTOCOMMIT));
        // Without the flag the same column has no extended information.
        let mut plain = Raw::connect(deprecate, MariaDbCapabilities::empty());
        let answer = plain.query("SELECT JSON_OBJECT('a',1)");
        assert!(!answer[1].windows(6).any(|w| w == b"\x01\x04json"));
    }
}

/// (b) CACHE_METADATA: executes of a prepared statement skip the column
/// definitions the prepare response already gave (metadata follows = 0;
/// MariaDB 10.11 skips them from the first execute on), while the EOF
/// that ends them stays without DEPRECATE_EOF; text results carry the
/// flag set to 1. The same statements without the flag carry the
/// definitions: the answers differ by exactly those.
#[test]
fn cache_metadata_executes_skip_definitions() {
    for deprecate in [false, true] {
        let mut raw = Raw::connect(deprecate, MariaDbCapabilities::CACHE_METADATA);
        let text = raw.query("SELECT 1 AS a, 'x' AS b");
        assert_eq!(
            text[0],
            [2, 1],
            "text column count carries metadata follows = 1"
        );
        let stmt = raw.prepare("SELECT 1 AS a, 'x' AS b");
        assert_eq!(stmt.columns, 2);
        let first = raw.run(&execute(stmt.statement_id));
        let second = raw.run(&execute(stmt.statement_id));
        for answer in [&first, &second] {
            assert_eq!(answer[0], [2, 0], "metadata skipped: {answer:?}");
        }
        assert_eq!(first, second);
        assert!(raw.tracker.prepared().contains_key(&stmt.statement_id));

        let mut plain = Raw::connect(deprecate, MariaDbCapabilities::empty());
        let stmt = plain.prepare("SELECT 1 AS a, 'x' AS b");
        let full = plain.run(&execute(stmt.statement_id));
        assert_eq!(full[0], [2]);
        assert_eq!(full.len(), first.len() + 2, "{full:?} vs {first:?}");
        // Same rows and terminator after the (skipped) definitions.
        assert_eq!(full[full.len() - 2..], first[first.len() - 2..]);
    }
}

/// (c) PROGRESS: an ALTER TABLE that copies rows for a few seconds with
/// `progress_report_time=1` sends progress reports before its OK; the
/// tracker forwards them and ends at the OK.
#[test]
fn progress_reports_during_alter_table() {
    progress_reports(mariadb().addr(), "big");
}

/// The progress scenario on `addr`, with its own table.
fn progress_reports(addr: SocketAddr, big: &str) {
    let mut raw = Raw::connect_to(addr, false, MariaDbCapabilities::PROGRESS);
    raw.query(&format!(
        "CREATE TABLE {big} (id INT PRIMARY KEY, pad CHAR(200)) ENGINE=InnoDB"
    ));
    raw.query(&format!(
        "INSERT INTO {big} SELECT seq, REPEAT('x', 200) FROM seq_1_to_600000"
    ));
    raw.query("SET SESSION progress_report_time = 1");
    let started = Instant::now();
    let answer = raw.query(&format!(
        "ALTER TABLE {big} ADD COLUMN c INT, ALGORITHM=COPY"
    ));
    let took = started.elapsed();
    let reports = answer.iter().filter(|p| is_progress_report(p)).count();
    eprintln!("ALTER TABLE took {took:?} and sent {reports} progress reports");
    assert!(
        reports >= 1,
        "no progress report in {took:?} ({} packets)",
        answer.len()
    );
    assert_eq!(answer.len(), reports + 1, "reports, then one OK");
    assert_eq!(answer.last().unwrap()[0], 0);
    assert_eq!(raw.tracker.state(), State::Idle);
    raw.query(&format!("DROP TABLE {big}"));
}

/// COM_STMT_BULK_EXECUTE: one OK for an array of parameter sets, or a
/// result set with a row per set for `INSERT ... RETURNING` (MariaDB 10.11
/// does not offer BULK_UNIT_RESULTS, which adds the same shape for plain
/// inserts).
#[test]
fn bulk_execute_ok_and_returning() {
    bulk_execute(mariadb().addr(), "bulk");
}

/// The bulk scenario on `addr`, with tables named from `prefix`.
fn bulk_execute(addr: SocketAddr, prefix: &str) {
    for deprecate in [false, true] {
        let mut raw = Raw::connect_to(addr, deprecate, MariaDbCapabilities::STMT_BULK_OPERATIONS);
        let table = format!("{prefix}_{}", u8::from(deprecate));
        raw.query(&format!(
            "CREATE TABLE {table} (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
        ));
        for (sql, returning) in [
            (format!("INSERT INTO {table} (v) VALUES (?)"), false),
            (
                format!("INSERT INTO {table} (v) VALUES (?) RETURNING id, v"),
                true,
            ),
        ] {
            let stmt = raw.prepare(&sql);
            let mut c = vec![0xfa];
            c.extend_from_slice(&stmt.statement_id.to_le_bytes());
            c.extend_from_slice(&0x80u16.to_le_bytes()); // types are sent
            c.extend_from_slice(&[3, 0]); // MYSQL_TYPE_LONG, signed
            for v in [10i32, 20, 30] {
                c.push(0); // indicator: a value follows
                c.extend_from_slice(&v.to_le_bytes());
            }
            let answer = raw.run(&c);
            let last = answer.last().unwrap();
            assert_ne!(last[0], 0xff, "{}", String::from_utf8_lossy(last));
            if returning {
                // count, 2 definitions, [EOF], 3 rows, terminator.
                let rows = answer.len() - 1 - 2 - usize::from(!deprecate) - 1;
                assert_eq!(rows, 3, "a row per parameter set: {answer:?}");
            } else {
                assert_eq!(answer.len(), 1, "one OK: {answer:?}");
            }
        }
        let rows = raw.query(&format!("SELECT COUNT(*) FROM {table}"));
        assert!(
            rows.iter().any(|p| p == b"\x016"),
            "6 rows inserted: {rows:?}"
        );
    }
}

// ------------------------------------------------------ through the proxy

/// The proxy greets like MariaDB: CLIENT_MYSQL clear, the extended word
/// MariaDB offers within what the proxy relays.
#[test]
fn the_proxy_announces_the_extended_capabilities() {
    let direct = Raw::connect(true, MariaDbCapabilities::empty());
    let proxied = Raw::connect_to(proxy(), true, MariaDbCapabilities::empty());
    assert!(proxied.greeting.capabilities.has_mariadb_extension());
    assert_eq!(
        proxied.greeting.mariadb_capabilities,
        direct.greeting.mariadb_capabilities & MariaDbCapabilities::PROXY_SUPPORTED
    );
}

/// EXTENDED_METADATA through the proxy: the JSON column's definition says
/// format=json, byte for byte as MariaDB sends it directly.
#[test]
fn extended_metadata_json_column_through_the_proxy() {
    for deprecate in [false, true] {
        let want = MariaDbCapabilities::EXTENDED_METADATA;
        let direct = Raw::connect(deprecate, want).query("SELECT JSON_OBJECT('a',1)");
        let mut raw = Raw::connect_to(proxy(), deprecate, want);
        let proxied = raw.query("SELECT JSON_OBJECT('a',1)");
        assert!(
            proxied[1].windows(6).any(|w| w == b"\x01\x04json"),
            "format=json in {:?}",
            proxied[1]
        );
        assert_eq!(proxied, direct, "deprecate_eof={deprecate}");
    }
}

/// CACHE_METADATA through the proxy: executes come without column
/// definitions, as directly, and the proxy ends each where MariaDB did
/// (the raw client's tracker and the COM_PING after each answer check it).
#[test]
fn cache_metadata_executes_through_the_proxy() {
    for deprecate in [false, true] {
        let want = MariaDbCapabilities::CACHE_METADATA;
        let sql = "SELECT 1 AS a, 'x' AS b UNION SELECT 2, 'y'";
        let mut answers = Vec::new();
        for addr in [mariadb().addr(), proxy()] {
            let mut raw = Raw::connect_to(addr, deprecate, want);
            let text = raw.query(sql);
            assert_eq!(text[0], [2, 1], "text results carry metadata follows = 1");
            let stmt = raw.prepare(sql);
            let first = raw.run(&execute(stmt.statement_id));
            let second = raw.run(&execute(stmt.statement_id));
            for answer in [&first, &second] {
                assert_eq!(answer[0], [2, 0], "metadata skipped: {answer:?}");
            }
            // A statement run after the executes is answered in full.
            let after = raw.query("SELECT 3");
            answers.push((text, first, second, after));
        }
        assert_eq!(
            answers[1], answers[0],
            "proxied vs direct, deprecate_eof={deprecate}"
        );
    }
}

/// PROGRESS through the proxy: the client receives the 0xFFFF reports,
/// then the OK.
#[test]
fn progress_reports_through_the_proxy() {
    progress_reports(proxy(), "big_through_proxy");
}

/// COM_STMT_BULK_EXECUTE through the proxy.
#[test]
fn bulk_execute_through_the_proxy() {
    bulk_execute(proxy(), "bulk_through_proxy");
}

/// The `mariadb` client with `--column-type-info` shows a JSON column's
/// format through the proxy as it does directly.
#[test]
fn mariadb_cli_shows_format_json() {
    let run = |addr: SocketAddr| {
        let out = std::process::Command::new(client_binary())
            .arg("--no-defaults")
            .arg(format!("-h{}", addr.ip()))
            .arg(format!("-P{}", addr.port()))
            .arg(format!("-u{RAW_USER}"))
            .arg(format!("-D{DB}"))
            .args([
                "--table",
                "--column-type-info",
                "-e",
                "SELECT JSON_OBJECT('a',1) AS j",
            ])
            .output()
            .expect("running the mariadb client");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let direct = run(mariadb().addr());
    assert!(direct.contains(JSON_FORMAT), "direct: {direct}");
    let proxied = run(proxy());
    assert_eq!(proxied, direct, "left proxied, right direct");
}
