//! The record handling of [`ServerTlsStream`], driven by hand: a buffered
//! rustls client on one side, a scripted socket on the other (reads capped
//! per call, writes capped to make them partial), both TLS versions.

use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Waker;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};

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
    let cert = rcgen::generate_simple_self_signed(vec!["tiproxy".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

const VERSIONS: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS12, &rustls::version::TLS13];

impl Pair {
    /// Handshakes; the first `early` bytes of the ClientHello are handed
    /// over as read before the upgrade (the MySQL SSL request's reader).
    fn new(version: &'static SupportedProtocolVersion, early: usize) -> Pair {
        let (server_cfg, client_cfg) = configs(version);
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
                    assert_eq!(
                        pair.server.common().protocol_version(),
                        Some(version.version)
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
        let mut got = Vec::new();
        let mut buf = vec![0; room];
        loop {
            let mut rb = ReadBuf::new(&mut buf);
            match self.server.poll_read(&mut cx(), &mut rb) {
                Poll::Pending => return Ok((got, false)),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Ok((got, true)),
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
            }
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
