//! The read budget end to end: a client that pipelines commands behind a
//! slow one and never reads cannot grow the proxy's memory. Directly,
//! MariaDB accepts what fits in the kernel's socket buffers and then stops
//! reading; through the proxy it must be the same: the proxy holds at most
//! `conn-buffer-size` towards the backend, leaves the client unread, and
//! TCP pushes back.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tiproxy_core::CapabilityFlags as C;
use tiproxy_core::MariaDbCapabilities;
use tiproxy_core::compress::{Algorithm, CompressedFraming};
use tiproxy_core::handshake::HandshakeResponse;
use tiproxy_core::packet::write_packet;
use tiproxy_tests::{ProxyProcess, TidbDouble, mariadb};

/// A user without a password: a raw client can log in without scrambling.
const USER: &str = "pipeliner";

/// What one writer tries to send before giving up: 1 GiB.
const ATTEMPT: u64 = 1 << 30;

/// One pipelined COM_QUERY: 64 KiB.
const PACKET: usize = 64 * 1024;

/// A write blocked this long means the proxy stopped reading.
const BLOCKED: Duration = Duration::from_secs(2);

fn create_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        mariadb()
            .run_sql(&format!(
                "CREATE USER IF NOT EXISTS '{USER}'@'%';
                 GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%';"
            ))
            .expect("create the pipelining user");
    });
}

/// A client connection: plain TCP or TLS over it.
trait Wire: Read + Write + Send {}
impl<S: Read + Write + Send> Wire for S {}

/// How a raw client talks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Compressed,
    Tls,
}

fn tls_over(s: TcpStream) -> Box<dyn Wire> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(tiproxy_tests::AnyCert))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("TLS client");
    Box::new(rustls::StreamOwned::new(conn, s))
}

fn read_packet(s: &mut dyn Wire) -> (u8, Vec<u8>) {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).expect("packet header");
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    let mut p = vec![0; len];
    s.read_exact(&mut p).expect("packet payload");
    (h[3], p)
}

/// A raw client, logged in through the proxy; with `compress`, the
/// command phase uses the zlib compressed protocol.
struct RawClient {
    s: Box<dyn Wire>,
    /// The TCP socket under `s`, for its write timeout.
    sock: TcpStream,
    framing: Option<CompressedFraming>,
}

impl RawClient {
    fn login(addr: SocketAddr, mode: Mode) -> RawClient {
        RawClient::login_as(addr, mode, USER)
    }

    /// Logs in as `user`, who has no password.
    fn login_as(addr: SocketAddr, mode: Mode, user: &'static str) -> RawClient {
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        tcp.set_nodelay(true).ok();
        let sock = tcp.try_clone().expect("clone the socket");
        let (_, greeting) = read_packet(&mut tcp);
        assert_eq!(greeting[0], 10, "a v10 greeting");
        let mut caps = C::LONG_PASSWORD
            | C::PROTOCOL_41
            | C::SECURE_CONNECTION
            | C::PLUGIN_AUTH
            | C::TRANSACTIONS
            | C::MULTI_RESULTS;
        let mut seq = 1;
        let mut s: Box<dyn Wire> = Box::new(tcp);
        if mode == Mode::Compressed {
            caps |= C::COMPRESS;
        }
        if mode == Mode::Tls {
            caps |= C::SSL;
            let mut req = BytesMut::new();
            tiproxy_core::handshake::SslRequest {
                capabilities: caps,
                max_packet_size: 16 * 1024 * 1024,
                charset: 45,
                mariadb_capabilities: MariaDbCapabilities::empty(),
            }
            .write(&mut req);
            let mut pkt = BytesMut::new();
            write_packet(&mut pkt, seq, &req);
            s.write_all(&pkt).expect("SSL request");
            seq += 1;
            s = tls_over(sock.try_clone().expect("clone the socket"));
        }
        let mut resp = BytesMut::new();
        HandshakeResponse {
            capabilities: caps,
            max_packet_size: 16 * 1024 * 1024,
            charset: 45,
            filler: [0; 23],
            username: bytes::Bytes::from_static(user.as_bytes()),
            auth_response: bytes::Bytes::new(),
            database: None,
            auth_plugin: Some(bytes::Bytes::from_static(b"mysql_native_password")),
            attributes: Default::default(),
            zstd_level: None,
            mariadb_capabilities: MariaDbCapabilities::empty(),
        }
        .write(&mut resp);
        let mut pkt = BytesMut::new();
        write_packet(&mut pkt, seq, &resp);
        s.write_all(&pkt).expect("handshake response");
        s.flush().expect("flush");
        loop {
            let (seq, p) = read_packet(&mut *s);
            match p.first() {
                Some(0x00) => break,
                // Auth switch: an empty password scrambles to nothing.
                Some(0xfe) => {
                    let mut pkt = BytesMut::new();
                    write_packet(&mut pkt, seq.wrapping_add(1), &[]);
                    s.write_all(&pkt).expect("auth switch answer");
                    s.flush().expect("flush");
                }
                _ => panic!("login failed: {:?}", String::from_utf8_lossy(&p)),
            }
        }
        RawClient {
            s,
            sock,
            framing: (mode == Mode::Compressed).then(|| CompressedFraming::new(Algorithm::Zlib)),
        }
    }

    /// The bytes of one command (a new command: sequence 0).
    fn command(&mut self, payload: &[u8]) -> BytesMut {
        let mut plain = BytesMut::new();
        write_packet(&mut plain, 0, payload);
        match self.framing.as_mut() {
            None => plain,
            Some(f) => {
                f.reset_seq();
                let mut out = BytesMut::new();
                f.encode(&plain, &mut out);
                out
            }
        }
    }

    /// The whole answer to a command that returns one row of one column.
    fn query_scalar(&mut self, sql: &str) -> Duration {
        assert!(self.framing.is_none(), "plain clients only");
        let mut q = vec![0x03];
        q.extend_from_slice(sql.as_bytes());
        let wire = self.command(&q);
        let start = Instant::now();
        self.s.write_all(&wire).expect("query");
        self.s.flush().expect("flush");
        // Column count, column, EOF, row, EOF.
        for _ in 0..5 {
            let (_, p) = read_packet(&mut *self.s);
            assert_ne!(p.first(), Some(&0xff), "{}", String::from_utf8_lossy(&p));
        }
        start.elapsed()
    }

    /// Sends `sql` and, without reading, pipelines 64 KiB COM_QUERY
    /// packets until 1 GiB went out or a write blocked for [`BLOCKED`].
    /// Returns the bytes written.
    fn pipeline_behind(mut self, sql: &str) -> (u64, RawClient) {
        let mut q = vec![0x03];
        q.extend_from_slice(sql.as_bytes());
        let first = self.command(&q);
        self.s.write_all(&first).expect("slow query");
        self.s.flush().expect("flush");
        let mut filler = vec![b' '; PACKET];
        filler[0] = 0x03;
        filler[1..5].copy_from_slice(b"DO 1");
        let wire = self.command(&filler);
        self.sock.set_write_timeout(Some(BLOCKED)).ok();
        let mut sent = 0u64;
        'send: while sent < ATTEMPT {
            let mut at = 0;
            while at < wire.len() {
                let began = Instant::now();
                match self.s.write(&wire[at..]) {
                    Ok(0) => break 'send,
                    Ok(n) => {
                        at += n;
                        sent += n as u64;
                        // A timed-out write returns what it got out.
                        if began.elapsed() >= BLOCKED {
                            break 'send;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break 'send;
                    }
                    Err(e) => panic!("write failed: {e}"),
                }
            }
        }
        (sent, self)
    }
}

fn proxy(conn_buffer_size: usize) -> ProxyProcess {
    create_user();
    ProxyProcess::start(
        &[mariadb().addr()],
        &format!(
            "conn-buffer-size = {conn_buffer_size}\n[security]\nserver-tls = {{ auto-certs = true }}"
        ),
    )
}

/// RSS noise a quiet proxy shows between two reads (allocator arenas of
/// the worker threads, their 64 KiB read scratch buffers, tokio's task
/// bookkeeping), measured on this machine well under this.
const NOISE_KIB: u64 = 1024;

fn one_client_is_bounded(mode: Mode) {
    let limit = 256 * 1024;
    let p = proxy(limit);
    // Warm up: every worker thread has served a connection.
    for _ in 0..4 {
        let mut c = RawClient::login(p.sql, Mode::Plain);
        c.query_scalar("SELECT 1");
    }
    let c = RawClient::login(p.sql, mode);
    let before = p.rss_kib();
    let (sent, _c) = c.pipeline_behind("SELECT SLEEP(5)");
    let grown = p.rss_kib().saturating_sub(before);
    let bound = (2 * limit as u64 + (1 << 20)) / 1024 + NOISE_KIB;
    eprintln!(
        "{mode:?}: the client got {} KiB out before blocking; proxy RSS grew {grown} KiB (bound {bound} KiB)",
        sent / 1024
    );
    assert!(
        sent < ATTEMPT,
        "the proxy kept reading: {sent} bytes accepted"
    );
    assert!(
        grown <= bound,
        "proxy RSS grew {grown} KiB, more than 2 x conn-buffer-size + 1 MiB"
    );
}

#[test]
fn a_client_pipelining_behind_a_slow_query_cannot_grow_the_proxy() {
    one_client_is_bounded(Mode::Plain);
}

#[test]
fn a_compressed_client_pipelining_behind_a_slow_query_cannot_grow_the_proxy() {
    one_client_is_bounded(Mode::Compressed);
}

#[test]
fn a_tls_client_pipelining_behind_a_slow_query_cannot_grow_the_proxy() {
    one_client_is_bounded(Mode::Tls);
}

#[test]
fn two_hundred_such_clients_stay_bounded_and_others_are_served() {
    let limit = 32 * 1024;
    let clients = 200;
    let p = proxy(limit);
    for _ in 0..4 {
        RawClient::login(p.sql, Mode::Plain).query_scalar("SELECT 1");
    }
    let logged_in: Vec<RawClient> = (0..clients)
        .map(|_| RawClient::login(p.sql, Mode::Plain))
        .collect();
    let before = p.rss_kib();
    let start = Instant::now();
    let writers: Vec<_> = logged_in
        .into_iter()
        .map(|c| std::thread::spawn(move || c.pipeline_behind("SELECT SLEEP(15)")))
        .collect();
    let done: Vec<(u64, RawClient)> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    let grown = p.rss_kib().saturating_sub(before);
    let bound = (clients as u64 * 2 * limit as u64 + (1 << 20)) / 1024 + NOISE_KIB;
    let sent: u64 = done.iter().map(|(n, _)| n).sum();
    eprintln!(
        "{clients} clients got {} MiB out in {:?}; proxy RSS grew {grown} KiB (bound {bound} KiB)",
        sent >> 20,
        start.elapsed()
    );
    assert!(done.iter().all(|(n, _)| *n < ATTEMPT));
    assert!(
        grown <= bound,
        "proxy RSS grew {grown} KiB for {clients} clients"
    );
    // Everyone else is still served at once.
    let mut fresh = RawClient::login(p.sql, Mode::Plain);
    let took = fresh.query_scalar("SELECT 1");
    assert!(
        took < Duration::from_millis(100),
        "SELECT 1 took {took:?} next to {clients} blocked clients"
    );
    assert!(start.elapsed() < Duration::from_secs(15), "still sleeping");
}

/// What the client pipelines behind the slow statement during a move.
const MOVE_PIPELINE: u64 = 64 << 20;

/// The peak RSS of `p` until `stop` is set, sampled every 10 ms.
fn watch_rss(p: &ProxyProcess, stop: &AtomicBool) -> u64 {
    let mut peak = 0;
    while !stop.load(Ordering::Relaxed) {
        peak = peak.max(p.rss_kib());
        std::thread::sleep(Duration::from_millis(10));
    }
    peak
}

/// The TiDB instance (index) holding exactly one connection, the others none.
fn the_one_holding_the_session(tidb: &TidbDouble) -> Option<usize> {
    let all = tidb.instances();
    let busy: Vec<_> = all.iter().filter(|i| i.connections > 0).collect();
    match busy.as_slice() {
        [one] if one.connections == 1 => Some(one.index),
        _ => None,
    }
}

fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A session asked to move while its client has 64 MiB pipelined behind a
/// slow statement: the proxy keeps holding at most its read budget (the
/// client is left unread, TCP pushes back), the move waits for the
/// statement, and then every pipelined command is answered, in order, and
/// the session (with its user variable) ends up on the other TiDB.
#[test]
fn a_session_asked_to_move_behind_a_pipeline_stays_bounded_and_answers_all_in_order() {
    let limit = 256 * 1024;
    let tidb = TidbDouble::start(2, 0, &[]);
    let backends: Vec<String> = tidb
        .instances()
        .iter()
        .map(TidbDouble::backend_entry)
        .collect();
    let p = ProxyProcess::start_with_backends(&backends, &format!("conn-buffer-size = {limit}"));
    // Warm up: every worker thread has served a connection.
    for _ in 0..4 {
        RawClient::login_as(p.sql, Mode::Plain, "root").query_scalar("SELECT 1");
    }
    wait_until(
        "warm-up connections closed",
        Duration::from_secs(10),
        || {
            tidb.instances()
                .iter()
                .all(|i| i.connections == 0)
                .then_some(())
        },
    );
    let c = RawClient::login_as(p.sql, Mode::Plain, "root");
    let from = wait_until("the session on one TiDB", Duration::from_secs(10), || {
        the_one_holding_the_session(&tidb)
    });
    let to = tidb.instances()[1 - from].sql;

    let mut reader = c.sock.try_clone().expect("clone the socket");
    reader.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut writer = c.sock.try_clone().expect("clone the socket");
    let commands = (MOVE_PIPELINE / PACKET as u64) as usize;
    // The slow statement, then commands padded to 64 KiB, i = 1..=commands:
    // `SET @n = i` for odd i (an OK), `SELECT i` for even i (a row
    // showing i, so the order of the answers shows).
    let mut pipeline = Vec::with_capacity(commands);
    let mut q = vec![0x03];
    q.extend_from_slice(b"SELECT SLEEP(5)");
    let mut first = BytesMut::new();
    write_packet(&mut first, 0, &q);
    for i in 1..=commands {
        let mut sql = vec![b' '; PACKET];
        sql[0] = 0x03;
        let stmt = if i % 2 == 1 {
            format!("SET @n = {i}")
        } else {
            format!("SELECT {i}")
        };
        sql[1..1 + stmt.len()].copy_from_slice(stmt.as_bytes());
        let mut pkt = BytesMut::new();
        write_packet(&mut pkt, 0, &sql);
        pipeline.push(pkt);
    }

    let before = p.rss_kib();
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let start = Instant::now();
    let (peak, answers, last) = std::thread::scope(|t| {
        let rss = t.spawn(|| watch_rss(&p, &stop));
        let w = t.spawn(|| {
            writer.write_all(&first).expect("slow statement");
            for pkt in &pipeline {
                writer.write_all(pkt).expect("pipelined command");
                sent.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
            writer
                .write_all(&{
                    let mut b = BytesMut::new();
                    write_packet(&mut b, 0, b"\x03SELECT @n");
                    b
                })
                .expect("last query");
        });
        // The client is blocked: its writes stopped progressing.
        let mut last_sent = u64::MAX;
        wait_until(
            "the client's writes blocked",
            Duration::from_secs(4),
            || {
                std::thread::sleep(Duration::from_millis(300));
                let now = sent.load(Ordering::Relaxed);
                let blocked = now == last_sent;
                last_sent = now;
                blocked.then_some(())
            },
        );
        let blocked_at = sent.load(Ordering::Relaxed);
        assert!(
            blocked_at < MOVE_PIPELINE / 4,
            "the proxy kept reading behind the slow statement: {blocked_at} bytes"
        );
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "the statement ended too soon"
        );
        let r = tiproxy_tests::http_exchange(
            p.api,
            "POST",
            &format!("/api/debug/redirect?to={to}"),
            "",
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // Column count, column, EOF, row, EOF of the slow statement.
        for _ in 0..5 {
            let (_, a) = read_packet(&mut reader);
            assert_ne!(a.first(), Some(&0xff), "{}", String::from_utf8_lossy(&a));
        }
        let slept = start.elapsed();
        let mut answers = 0usize;
        for i in 1..=commands {
            let (_, a) = read_packet(&mut reader);
            if i % 2 == 1 {
                assert_eq!(
                    a.first(),
                    Some(&0x00),
                    "answer {i}: {}",
                    String::from_utf8_lossy(&a)
                );
            } else {
                assert_eq!(a, [1], "answer {i}: a one-column result set");
                // Column, EOF, row, EOF.
                let set: Vec<Vec<u8>> = (0..4).map(|_| read_packet(&mut reader).1).collect();
                assert_eq!(
                    &set[2][1..],
                    i.to_string().as_bytes(),
                    "answer {i} out of order: {}",
                    String::from_utf8_lossy(&set[2])
                );
            }
            answers += 1;
        }
        // SELECT @n: the last value set, after the move.
        let mut rows = Vec::new();
        for _ in 0..5 {
            rows.push(read_packet(&mut reader).1);
        }
        w.join().expect("writer");
        stop.store(true, Ordering::Relaxed);
        let peak = rss.join().expect("rss watcher");
        eprintln!(
            "client blocked after {} KiB; statement answered after {slept:?}; {answers} answers in {:?}",
            blocked_at / 1024,
            start.elapsed()
        );
        (peak, answers, rows)
    });
    assert_eq!(answers, commands, "every pipelined command answered");
    let row = &last[3];
    let last_set = if commands % 2 == 1 {
        commands
    } else {
        commands - 1
    };
    assert_eq!(
        &row[1..],
        last_set.to_string().as_bytes(),
        "SELECT @n after the pipeline: {}",
        String::from_utf8_lossy(row)
    );
    let grown = peak.saturating_sub(before);
    let bound = (2 * limit as u64 + (2 << 20)) / 1024;
    eprintln!("proxy RSS peak grew {grown} KiB over {before} KiB (bound {bound} KiB)");
    assert!(
        grown <= bound,
        "proxy RSS grew {grown} KiB during the move, more than 2 x conn-buffer-size + 2 MiB"
    );
    let now = wait_until("the session moved", Duration::from_secs(10), || {
        the_one_holding_the_session(&tidb)
    });
    assert_eq!(now, 1 - from, "the session is on the other TiDB");
}
