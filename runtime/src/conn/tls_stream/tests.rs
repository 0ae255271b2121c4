//! The record handling of [`ServerTlsStream`], driven by hand: a buffered
//! rustls client on one side, a scripted socket on the other (reads capped
//! per call, writes capped to make them partial), both TLS versions.

use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;

use rustls::crypto::ring::cipher_suite as cs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite, SupportedProtocolVersion,
};

/// One side of the scripted socket, shared with the test.
#[derive(Default)]
struct Wire {
    /// Bytes the server will read.
    inbound: VecDeque<u8>,
    /// At most this many bytes per read (0: no cap).
    read_cap: usize,
    /// The client closed: reads past `inbound` answer end of stream.
    eof: bool,
    /// Bytes the server wrote.
    outbound: Vec<u8>,
    /// Bytes the socket still takes before writes are pending.
    write_room: usize,
}

#[derive(Clone)]
struct Socket(Arc<Mutex<Wire>>);

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut w = self.0.lock().unwrap();
        if w.inbound.is_empty() {
            return if w.eof {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let mut n = buf.remaining().min(w.inbound.len());
        if w.read_cap > 0 {
            n = n.min(w.read_cap);
        }
        let bytes: Vec<u8> = w.inbound.drain(..n).collect();
        buf.put_slice(&bytes);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut w = self.0.lock().unwrap();
        let n = data.len().min(w.write_room);
        if n == 0 {
            return Poll::Pending;
        }
        w.write_room -= n;
        w.outbound.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// A client and the server stream under test, handshake done.
struct Pair {
    client: ClientConnection,
    server: ServerTlsStream<Socket>,
    wire: Arc<Mutex<Wire>>,
}

fn configs(version: &'static SupportedProtocolVersion) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs_with(version, None)
}

/// A server config as the proxy builds it (all suites, keys extractable)
/// and a client config offering only `suite` when given.
fn configs_with(
    version: &'static SupportedProtocolVersion,
    suite: Option<SupportedCipherSuite>,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["tiproxy".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client_provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        client_provider.cipher_suites = vec![suite];
    }
    let mut client = ClientConfig::builder_with_provider(Arc::new(client_provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

const VERSIONS: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS12, &rustls::version::TLS13];

impl Pair {
    /// Handshakes; the first `early` bytes of the ClientHello are handed
    /// over as read before the upgrade (the MySQL SSL request's reader).
    fn new(version: &'static SupportedProtocolVersion, early: usize) -> Pair {
        Pair::with(version, None, early)
    }

    /// Handshakes with a client offering only `suite` (when given).
    fn with(
        version: &'static SupportedProtocolVersion,
        suite: Option<SupportedCipherSuite>,
        early: usize,
    ) -> Pair {
        let (server_cfg, client_cfg) = configs_with(version, suite);
        let mut client =
            ClientConnection::new(client_cfg, ServerName::try_from("tiproxy").unwrap()).unwrap();
        let hello = tls_out(&mut client);
        let early = early.min(hello.len());
        let wire = Arc::new(Mutex::new(Wire {
            write_room: usize::MAX,
            ..Wire::default()
        }));
        wire.lock().unwrap().inbound.extend(&hello[early..]);
        let server =
            ServerTlsStream::new(server_cfg, &hello[..early], Socket(wire.clone())).unwrap();
        let mut pair = Pair {
            client,
            server,
            wire,
        };
        for _ in 0..10 {
            let done = pair.server.poll_handshake(&mut cx());
            let _ = pair.deliver_to_client();
            pair.deliver_to_server();
            if let Poll::Ready(r) = done {
                r.unwrap();
                if !pair.client.is_handshaking() {
                    let (v, negotiated) = pair.server.negotiated().unwrap();
                    assert_eq!(v, version.version);
                    if let Some(suite) = suite {
                        assert_eq!(negotiated, suite.suite());
                    }
                    assert_eq!(
                        pair.client.negotiated_cipher_suite().map(|s| s.suite()),
                        Some(negotiated)
                    );
                    return pair;
                }
            }
        }
        panic!("handshake did not finish");
    }

    /// What the server wrote, into the client; the plaintext that came.
    fn deliver_to_client(&mut self) -> Vec<u8> {
        use std::io::Read;
        let out = std::mem::take(&mut self.wire.lock().unwrap().outbound);
        let mut rd = &out[..];
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // Drained as it goes: the client buffers little of either.
            self.client.process_new_packets().unwrap();
            loop {
                match self.client.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
            if rd.is_empty() {
                return got;
            }
            self.client.read_tls(&mut rd).unwrap();
        }
    }

    /// What the client has to send, onto the wire.
    fn deliver_to_server(&mut self) {
        let out = tls_out(&mut self.client);
        self.wire.lock().unwrap().inbound.extend(out);
    }

    /// The client's records for `data`, not yet on the wire.
    fn records(&mut self, data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        // The client buffers at most 64 KiB of plaintext: take its records
        // as it goes.
        let mut out = Vec::new();
        for part in data.chunks(16 << 10) {
            self.client.writer().write_all(part).unwrap();
            out.extend(tls_out(&mut self.client));
        }
        out
    }

    fn feed(&self, bytes: &[u8]) {
        self.wire.lock().unwrap().inbound.extend(bytes);
    }

    /// Reads with room for `room` bytes at a time until the server has
    /// nothing more; what came and whether the stream ended.
    fn read_all(&mut self, room: usize) -> io::Result<(Vec<u8>, bool)> {
        read_all(&mut self.server, room)
    }

    /// The client leaves rustls too: its records are built by hand.
    fn into_raw(self) -> Raw {
        let suite = self.client.negotiated_cipher_suite().unwrap();
        let tls13 = self.client.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        #[allow(deprecated)]
        let secrets = self.client.dangerous_extract_secrets().unwrap();
        Raw {
            records: Records::from_parts(tls13, suite, secrets, None).unwrap(),
            server: self.server,
            wire: self.wire,
        }
    }

    /// Writes all of `data` through the server stream (flushing between
    /// pending writes by giving the socket `room` more bytes).
    fn server_writes(&mut self, data: &[u8], room: usize) -> Vec<u8> {
        let mut at = 0;
        let mut got = Vec::new();
        while at < data.len() {
            match self.server.poll_write(&mut cx(), &data[at..]) {
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(e)) => panic!("server write: {e}"),
                Poll::Pending => {
                    {
                        let mut w = self.wire.lock().unwrap();
                        w.write_room = w.write_room.saturating_add(room);
                    }
                    got.extend(self.deliver_to_client());
                }
            }
        }
        loop {
            {
                let mut w = self.wire.lock().unwrap();
                w.write_room = w.write_room.saturating_add(room);
            }
            if let Poll::Ready(r) = self.server.poll_flush(&mut cx()) {
                r.unwrap();
                break;
            }
            got.extend(self.deliver_to_client());
        }
        got.extend(self.deliver_to_client());
        got
    }
}

fn read_all(server: &mut ServerTlsStream<Socket>, room: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut got = Vec::new();
    let mut buf = vec![0; room];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match server.poll_read(&mut cx(), &mut rb) {
            Poll::Pending => return Ok((got, false)),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Ok((got, true)),
            Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
        }
    }
}

/// A client sealing records by hand with its keys taken out of rustls:
/// what a misbehaving client would send.
struct Raw {
    records: Records,
    server: ServerTlsStream<Socket>,
    wire: Arc<Mutex<Wire>>,
}

impl Raw {
    /// Seals one record of type `typ` (the inner type on TLS 1.3) onto
    /// the wire.
    fn send(&mut self, typ: u8, data: &[u8]) {
        let mut out = Vec::new();
        self.records.seal_raw(typ, data, &mut out);
        self.wire.lock().unwrap().inbound.extend(out);
    }

    /// Opens what the server wrote: its data and, if it sent one, its
    /// alert (as the error text the record layer gives it).
    fn received(&mut self) -> (Vec<u8>, Option<String>) {
        let mut out = std::mem::take(&mut self.wire.lock().unwrap().outbound);
        let mut data = Vec::new();
        let mut at = 0;
        loop {
            match self.records.open(&mut out[at..]) {
                Ok(None) => return (data, None),
                Ok(Some((n, Opened::Data(r)))) => {
                    data.extend_from_slice(&out[at..at + n][r]);
                    at += n;
                }
                Ok(Some((n, Opened::Nothing))) => at += n,
                Ok(Some((_, Opened::Closed))) => return (data, Some("close_notify".into())),
                Err(f) => return (data, Some(f.error.to_string())),
            }
        }
    }
}

fn tls_out(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).unwrap();
    }
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn a_record_split_at_every_byte_boundary_reads_whole() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        let msg = b"SELECT 1 /* split me anywhere */";
        let first = p.records(msg);
        let len = first.len();
        p.feed(&first);
        assert_eq!(p.read_all(100).unwrap().0, msg);
        for cut in 0..=len {
            // The records are built fresh for each cut (new sequence
            // numbers), always of the same length.
            let rec = p.records(msg);
            assert_eq!(rec.len(), len);
            p.feed(&rec[..cut]);
            let (first, _) = p.read_all(64 << 10).unwrap();
            if cut < len {
                assert!(
                    first.is_empty(),
                    "{version:?} cut {cut}: plaintext before the record ended"
                );
                assert_eq!(
                    p.server.incoming.len(),
                    cut,
                    "{version:?} cut {cut}: partial kept"
                );
            }
            p.feed(&rec[cut..]);
            let (rest, closed) = p.read_all(64 << 10).unwrap();
            assert!(!closed);
            assert_eq!([first, rest].concat(), msg, "{version:?} cut {cut}");
            assert_eq!(
                p.server.held(),
                0,
                "{version:?} cut {cut}: a buffer left behind"
            );
        }
    }
}

#[test]
fn bytes_arriving_one_at_a_time_read_whole() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        p.wire.lock().unwrap().read_cap = 1;
        let msg = pattern(3000);
        let rec = p.records(&msg);
        p.feed(&rec);
        let (got, _) = p.read_all(64 << 10).unwrap();
        assert_eq!(got, msg);
        assert_eq!(p.server.held(), 0);
    }
}

#[test]
fn several_records_in_one_read_all_come_out() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 0..5u8 {
            let msg = vec![b'a' + i; 100 + i as usize];
            wire.extend(p.records(&msg));
            want.extend(msg);
        }
        p.feed(&wire);
        let mut buf = vec![0; 64 << 10];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(p.server.poll_read(&mut cx(), &mut rb).is_ready());
        assert_eq!(
            rb.filled(),
            &want[..],
            "{version:?}: one read returns all five"
        );
        assert_eq!(p.server.held(), 0);
    }
}

#[test]
fn a_large_result_goes_both_ways() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        // Client to server, read through a room smaller than a record:
        // the rest of a record waits in `plaintext`, then is freed.
        let msg = pattern(200_000);
        let rec = p.records(&msg);
        p.feed(&rec);
        let (got, _) = p.read_all(1000).unwrap();
        assert!(got == msg, "{version:?}: upload differs");
        assert_eq!(p.server.held(), 0);
        // Server to client, the socket taking 3,000 bytes at a time.
        let msg = pattern(300_000);
        p.wire.lock().unwrap().write_room = 0;
        let got = p.server_writes(&msg, 3000);
        assert!(got == msg, "{version:?}: download differs");
        assert_eq!(p.server.held(), 0, "{version:?}: written records kept");
    }
}

#[test]
fn the_bytes_read_before_the_upgrade_start_the_handshake() {
    for version in VERSIONS {
        for early in [1, 5, 6, 100, usize::MAX] {
            let mut p = Pair::new(version, early);
            let rec = p.records(b"ping");
            p.feed(&rec);
            assert_eq!(p.read_all(100).unwrap().0, b"ping");
        }
    }
}

#[test]
fn data_right_behind_the_clients_finished_is_read() {
    // TLS 1.2's client sends its Finished first and may write data right
    // behind it in the same flight.
    let (server_cfg, client_cfg) = configs(&rustls::version::TLS12);
    let mut client =
        ClientConnection::new(client_cfg, ServerName::try_from("tiproxy").unwrap()).unwrap();
    let wire = Arc::new(Mutex::new(Wire {
        write_room: usize::MAX,
        ..Wire::default()
    }));
    let mut server = ServerTlsStream::new(server_cfg, &[], Socket(wire.clone())).unwrap();
    let mut sent = false;
    for _ in 0..10 {
        let done = server.poll_handshake(&mut cx());
        let out = std::mem::take(&mut wire.lock().unwrap().outbound);
        client.read_tls(&mut &out[..]).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !sent {
            use std::io::Write;
            client.writer().write_all(b"first command").unwrap();
            sent = true;
        }
        wire.lock().unwrap().inbound.extend(tls_out(&mut client));
        if done.is_ready() {
            break;
        }
    }
    let mut buf = [0u8; 100];
    let mut rb = ReadBuf::new(&mut buf);
    assert!(server.poll_read(&mut cx(), &mut rb).is_ready());
    assert_eq!(rb.filled(), b"first command");
}

#[test]
fn close_notify_ends_the_stream_and_a_bare_close_too() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        let mut rec = p.records(b"last words");
        p.client.send_close_notify();
        rec.extend(tls_out(&mut p.client));
        p.feed(&rec);
        assert_eq!(p.read_all(100).unwrap(), (b"last words".to_vec(), true));
        // The end stays the end.
        assert_eq!(p.read_all(100).unwrap(), (Vec::new(), true));

        let mut p = Pair::new(version, 0);
        p.wire.lock().unwrap().eof = true;
        assert_eq!(p.read_all(100).unwrap(), (Vec::new(), true));

        let mut p = Pair::new(version, 0);
        let rec = p.records(b"cut short");
        p.feed(&rec[..rec.len() - 1]);
        p.wire.lock().unwrap().eof = true;
        let e = p.read_all(100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}

#[test]
fn garbage_after_the_handshake_is_a_clear_error() {
    for version in VERSIONS {
        for garbage in [
            &b"\x17\x03\x03\x00\x10not a real record"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            &[0x16, 0x03, 0x03, 0xff, 0xff][..],
        ] {
            let mut p = Pair::new(version, 0);
            p.feed(garbage);
            let e = p.read_all(100).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().starts_with("TLS: "), "{e}");
            // The client is told with an alert, not just a closed socket.
            let out = std::mem::take(&mut p.wire.lock().unwrap().outbound);
            p.client.read_tls(&mut &out[..]).unwrap();
            let e = p.client.process_new_packets().unwrap_err();
            assert!(
                matches!(e, rustls::Error::AlertReceived(_)),
                "{version:?}: {e}"
            );
        }
    }
}

#[test]
fn a_refused_handshake_tells_the_client_why() {
    // A server for TLS 1.3 only (`min-tls-version`), a client for 1.2 only.
    let (server_cfg, _) = configs(&rustls::version::TLS13);
    let (_, client_cfg) = configs(&rustls::version::TLS12);
    let mut client =
        ClientConnection::new(client_cfg, ServerName::try_from("tiproxy").unwrap()).unwrap();
    let wire = Arc::new(Mutex::new(Wire {
        write_room: usize::MAX,
        ..Wire::default()
    }));
    wire.lock().unwrap().inbound.extend(tls_out(&mut client));
    let mut server = ServerTlsStream::new(server_cfg, &[], Socket(wire.clone())).unwrap();
    let Poll::Ready(Err(e)) = server.poll_handshake(&mut cx()) else {
        panic!("the handshake went on");
    };
    assert!(e.to_string().starts_with("TLS: "), "{e}");
    let out = std::mem::take(&mut wire.lock().unwrap().outbound);
    client.read_tls(&mut &out[..]).unwrap();
    let e = client.process_new_packets().unwrap_err();
    assert_eq!(
        e,
        rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
    );
}

#[test]
fn a_fatal_alert_from_the_client_is_a_clear_error() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        // A fatal alert, the client's way of refusing: record type 21.
        // Sent as plaintext once keys are on, which rustls refuses too.
        p.feed(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
        let e = p.read_all(100).unwrap_err();
        assert!(e.to_string().starts_with("TLS: "), "{e}");
    }
}

#[test]
fn a_key_update_is_answered_and_traffic_continues() {
    let mut p = Pair::new(&rustls::version::TLS13, 0);
    p.client.refresh_traffic_keys().unwrap();
    let rec = p.records(b"after the update");
    p.feed(&rec);
    assert_eq!(p.read_all(100).unwrap().0, b"after the update");
    // The server's reply follows its own KeyUpdate; the client reads it.
    assert_eq!(p.server_writes(b"reply", 1 << 20), b"reply");
    // Traffic from the client goes on under its new keys.
    let rec = p.records(b"again");
    p.feed(&rec);
    assert_eq!(p.read_all(100).unwrap().0, b"again");
}

#[test]
fn shutdown_sends_close_notify() {
    for version in VERSIONS {
        let mut p = Pair::new(version, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(p.server.shutdown()).unwrap();
        let _ = p.deliver_to_client();
        assert!(p.client.process_new_packets().unwrap().peer_has_closed());
        let e = p
            .server
            .poll_write(&mut cx(), b"late")
            .map(|r| r.unwrap_err());
        assert!(matches!(e, Poll::Ready(ref e) if e.kind() == io::ErrorKind::BrokenPipe));
    }
}

/// Over a real async pipe with tokio-rustls as the client: wake-ups work.
#[tokio::test]
async fn echo_over_a_pipe_with_tokio_rustls() {
    use tokio::io::AsyncReadExt;
    for version in VERSIONS {
        let (server_cfg, client_cfg) = configs(version);
        let (a, b) = tokio::io::duplex(1000);
        let server = async move {
            let mut s = ServerTlsStream::new(server_cfg, &[], b)?;
            s.handshake().await?;
            let mut buf = vec![0u8; 7000];
            loop {
                let mut rb = ReadBuf::new(&mut buf);
                poll_fn(|cx| s.poll_read(cx, &mut rb)).await?;
                let n = rb.filled().len();
                if n == 0 {
                    break;
                }
                let mut at = 0;
                while at < n {
                    at += poll_fn(|cx| s.poll_write(cx, &buf[at..n])).await?;
                }
                poll_fn(|cx| s.poll_flush(cx)).await?;
            }
            s.shutdown().await?;
            io::Result::Ok(s.held())
        };
        let client = async move {
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let c = connector
                .connect(ServerName::try_from("tiproxy").unwrap(), a)
                .await?;
            let msg = pattern(100_000);
            let (mut rd, mut wr) = tokio::io::split(c);
            let writer = async {
                wr.write_all(&msg).await?;
                wr.shutdown().await?;
                io::Result::Ok(wr)
            };
            let reader = async {
                let mut got = Vec::new();
                rd.read_to_end(&mut got).await?;
                io::Result::Ok(got)
            };
            let (_, got) = tokio::try_join!(writer, reader)?;
            io::Result::Ok(got == msg)
        };
        let (held, same) = tokio::try_join!(server, client).unwrap();
        assert!(same, "{version:?}: echo differs");
        assert_eq!(held, 0);
    }
}

/// Every suite the ring provider offers, with its version.
fn suites() -> Vec<(&'static SupportedProtocolVersion, SupportedCipherSuite)> {
    let v12 = &rustls::version::TLS12;
    let v13 = &rustls::version::TLS13;
    vec![
        (v12, cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (v12, cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        (v12, cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
        (v13, cs::TLS13_AES_128_GCM_SHA256),
        (v13, cs::TLS13_AES_256_GCM_SHA384),
        (v13, cs::TLS13_CHACHA20_POLY1305_SHA256),
    ]
}

/// The client's error once it reads what the server wrote.
fn client_error(p: &mut Pair) -> rustls::Error {
    let out = std::mem::take(&mut p.wire.lock().unwrap().outbound);
    p.client.read_tls(&mut &out[..]).unwrap();
    p.client.process_new_packets().unwrap_err()
}

#[test]
fn every_suite_carries_a_megabyte_each_way_split_anywhere() {
    for (version, suite) in suites() {
        let mut p = Pair::with(version, Some(suite), 0);
        let msg = b"SELECT 1 /* split */";
        let rec = p.records(msg);
        let len = rec.len();
        p.feed(&rec);
        assert_eq!(p.read_all(100).unwrap().0, msg);
        for cut in 0..=len {
            let rec = p.records(msg);
            p.feed(&rec[..cut]);
            let (first, _) = p.read_all(100).unwrap();
            p.feed(&rec[cut..]);
            let (rest, _) = p.read_all(100).unwrap();
            assert_eq!([first, rest].concat(), msg, "{suite:?} cut {cut}");
        }
        // 1.2 MB up, read 7,001 bytes at a time (records cut everywhere)
        // into a room of 5,000.
        p.wire.lock().unwrap().read_cap = 7001;
        let up = pattern(1_200_000);
        let rec = p.records(&up);
        p.feed(&rec);
        let (got, _) = p.read_all(5000).unwrap();
        assert!(got == up, "{suite:?}: upload differs");
        assert_eq!(p.server.held(), 0);
        // 1.1 MB down, the socket taking 3,001 bytes at a time.
        p.wire.lock().unwrap().write_room = 0;
        let down = pattern(1_100_000);
        let got = p.server_writes(&down, 3001);
        assert!(got == down, "{suite:?}: download differs");
        assert_eq!(p.server.held(), 0);
    }
}

#[test]
fn key_updates_both_ways_on_every_tls13_suite() {
    for (version, suite) in suites() {
        if version.version != rustls::ProtocolVersion::TLSv1_3 {
            continue;
        }
        let mut p = Pair::with(version, Some(suite), 0);
        assert!(p.server.records().tx_seq() > 0, "tickets were sent");
        // The client's KeyUpdate asks for ours: the server switches both.
        p.client.refresh_traffic_keys().unwrap();
        let rec = p.records(b"after the update");
        p.feed(&rec);
        assert_eq!(p.read_all(100).unwrap().0, b"after the update");
        assert_eq!(p.server.records().tx_seq(), 0, "{suite:?}: answered");
        assert_eq!(p.server_writes(b"reply", 1 << 20), b"reply");
        // The server's own, at its record limit: three records per key.
        p.server.records().set_tx_limit(3);
        let big = pattern(300_000);
        assert!(p.server_writes(&big, 1 << 20) == big, "{suite:?}");
        assert!(p.server.records().tx_seq() < 3);
        // The client's traffic goes on under its keys.
        let rec = p.records(b"again");
        p.feed(&rec);
        assert_eq!(p.read_all(100).unwrap().0, b"again");
    }
}

#[test]
fn tls12_at_the_record_limit_stops_with_an_error() {
    let mut p = Pair::new(&rustls::version::TLS12, 0);
    let limit = p.server.records().tx_seq() + 3;
    p.server.records().set_tx_limit(limit);
    let data = pattern(1 << 14);
    let mut writes = 0;
    let e = loop {
        match p.server.poll_write(&mut cx(), &data) {
            Poll::Ready(Ok(_)) => writes += 1,
            Poll::Ready(Err(e)) => break e,
            Poll::Pending => panic!("the socket has room"),
        }
        assert!(writes < 10, "the limit did not stop writes");
    };
    assert!(e.to_string().contains("record limit"), "{e}");
    assert_eq!(writes, 2);
    assert_eq!(p.deliver_to_client().len(), 2 << 14);
}

#[test]
fn too_many_key_updates_without_data_is_an_error() {
    let mut p = Pair::new(&rustls::version::TLS13, 0);
    for _ in 0..33 {
        p.client.refresh_traffic_keys().unwrap();
        p.deliver_to_server();
    }
    let e = p.read_all(100).unwrap_err();
    assert!(e.to_string().contains("too many KeyUpdates"), "{e}");
}

#[test]
fn tampered_ciphertext_is_bad_record_mac() {
    for (version, suite) in suites() {
        let len = Pair::with(version, Some(suite), 0)
            .records(b"do not touch")
            .len();
        // The header (authenticated), the first byte after it (TLS 1.2
        // GCM: the explicit nonce), the middle, the tag's last byte.
        for at in [2, 5, len / 2, len - 1] {
            let mut p = Pair::with(version, Some(suite), 0);
            let mut rec = p.records(b"do not touch");
            let good = rec.clone();
            rec[at] ^= 1;
            p.feed(&rec);
            let e = p.read_all(100).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(
                e.to_string().contains("bad_record_mac"),
                "{suite:?} {at}: {e}"
            );
            assert_eq!(
                client_error(&mut p),
                rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
            );
            // The stream stays failed.
            p.feed(&good);
            let e = p.read_all(100).unwrap_err();
            assert!(e.to_string().contains("failed earlier"), "{e}");
        }
    }
}

#[test]
fn an_oversized_record_is_record_overflow() {
    for version in VERSIONS {
        let max = if version.version == rustls::ProtocolVersion::TLSv1_3 {
            (1 << 14) + 256
        } else {
            (1 << 14) + 2048
        };
        // Refused on its header: the rest never needs to come.
        let mut p = Pair::new(version, 0);
        let len = (max + 1) as u16;
        p.feed(&[0x17, 3, 3, (len >> 8) as u8, len as u8]);
        let e = p.read_all(100).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert_eq!(
            client_error(&mut p),
            rustls::Error::AlertReceived(rustls::AlertDescription::RecordOverflow)
        );
        // A record that decrypts to more than 16 KiB.
        let mut raw = Pair::new(version, 0).into_raw();
        raw.send(23, &vec![7; (1 << 14) + 1]);
        let e = read_all(&mut raw.server, 100).unwrap_err();
        assert!(e.to_string().contains("over 16 KiB"), "{e}");
        let (_, alert) = raw.received();
        assert!(alert.unwrap().contains("RecordOverflow"));
    }
}

#[test]
fn what_a_tls13_client_may_not_send_after_the_handshake() {
    let cases: [(u8, &[u8], &str); 7] = [
        (22, &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0], "not alone"),
        (22, &[24, 0, 0, 1, 2], "malformed KeyUpdate"),
        (22, &[24, 0, 0, 1], "not alone"),
        (22, &[20, 0, 0, 1, 0], "handshake message 20"),
        (0, &[0, 0, 0], "without a content type"),
        (21, &[2, 40], "HandshakeFailure"),
        (21, &[1, 90], "UserCanceled"),
    ];
    for (typ, body, want) in cases {
        let mut raw = Pair::new(&rustls::version::TLS13, 0).into_raw();
        raw.send(23, b"fine");
        raw.send(typ, body);
        let e = read_all(&mut raw.server, 100).unwrap_err();
        assert!(e.to_string().starts_with("TLS: "), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    // A ChangeCipherSpec after the handshake.
    let mut p = Pair::new(&rustls::version::TLS13, 0);
    p.feed(&[20, 3, 3, 0, 1, 1]);
    let e = p.read_all(100).unwrap_err();
    assert!(e.to_string().contains("ChangeCipherSpec"), "{e}");
    assert_eq!(
        client_error(&mut p),
        rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage)
    );
}

#[test]
fn tls12_renegotiation_is_refused_with_a_warning_then_fatally() {
    let mut raw = Pair::new(&rustls::version::TLS12, 0).into_raw();
    // A ClientHello split over two records: refused once, skipped whole.
    raw.send(22, &[1, 0, 0, 6, 3, 3]);
    raw.send(22, &[0, 0, 0, 0]);
    raw.send(23, b"still here");
    assert_eq!(read_all(&mut raw.server, 100).unwrap().0, b"still here");
    let (_, alert) = raw.received();
    assert!(alert.unwrap().contains("NoRenegotiation"));
    // A second attempt ends the connection.
    raw.send(22, &[1, 0, 0, 2, 3, 3]);
    let e = read_all(&mut raw.server, 100).unwrap_err();
    assert!(e.to_string().contains("second renegotiation"), "{e}");
    let (_, alert) = raw.received();
    assert!(alert.unwrap().contains("UnexpectedMessage"));
}

#[test]
fn a_record_cut_by_the_end_of_the_handshake_is_opened_after_it() {
    // The client's first record comes right behind its Finished, cut
    // short: rustls runs the handshake, the record layer opens the record
    // once the rest arrives. TLS 1.3 only: a TLS 1.2 client finishes after
    // the server, so its data never shares a read with the handshake's
    // end (without False Start, which rustls does not do).
    for version in [&rustls::version::TLS13] {
        let (server_cfg, client_cfg) = configs(version);
        let mut client =
            ClientConnection::new(client_cfg, ServerName::try_from("tiproxy").unwrap()).unwrap();
        let wire = Arc::new(Mutex::new(Wire {
            write_room: usize::MAX,
            ..Wire::default()
        }));
        let mut server = ServerTlsStream::new(server_cfg, &[], Socket(wire.clone())).unwrap();
        let mut rest = Vec::new();
        let mut done = false;
        for _ in 0..10 {
            done = server.poll_handshake(&mut cx()).is_ready();
            let out = std::mem::take(&mut wire.lock().unwrap().outbound);
            client.read_tls(&mut &out[..]).unwrap();
            client.process_new_packets().unwrap();
            let mut flight = tls_out(&mut client);
            if !client.is_handshaking() && rest.is_empty() && !done {
                use std::io::Write;
                client.writer().write_all(b"first command").unwrap();
                let rec = tls_out(&mut client);
                flight.extend_from_slice(&rec[..7]);
                rest = rec[7..].to_vec();
            }
            wire.lock().unwrap().inbound.extend(flight);
            if done {
                break;
            }
        }
        assert!(done, "{version:?}: the handshake did not finish");
        assert!(!rest.is_empty(), "{version:?}: the record was not cut");
        assert_eq!(read_all(&mut server, 100).unwrap().0, b"");
        wire.lock().unwrap().inbound.extend(rest);
        assert_eq!(read_all(&mut server, 100).unwrap().0, b"first command");
        assert_eq!(server.held(), 0);
    }
}
