//! The client leg's TLS: rustls' unbuffered API for the handshake, then a
//! record layer of our own; an idle connection keeps no buffer and no
//! rustls connection (issue 15).
//!
//! rustls' buffered `ServerConnection` keeps a 4 KiB read buffer per
//! connection after its first read, and tokio-rustls wraps it in more
//! state. Here records are read into a thread-local scratch and decrypted
//! in place; the plaintext goes straight to the caller. rustls'
//! `UnbufferedServerConnection` (about 2 KB with its deframer state and
//! queues) runs the handshake only: once it is done, the traffic keys are
//! taken out of it (`dangerous_into_kernel_connection`) and [`records`]
//! seals and opens records with ring, as rustls would; TLS 1.3 keeps
//! rustls' small `KernelConnection` to derive the keys of a key update.
//! A connection keeps bytes only while they are in flight:
//! - `incoming`: the ciphertext of a record not yet complete (at most one
//!   record; during the handshake, one handshake message, see
//!   [`SCRATCH_LEN`]);
//! - `plaintext`: decrypted bytes the reader had no room for;
//! - `outgoing`: encrypted bytes the socket did not take yet (at most one
//!   write's worth; a write waits until it is gone).
//!
//! Each is freed once empty. This module never interprets the plaintext.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

mod records;

use records::{Opened, Records};

/// Largest TLS record on the wire: 2^14 plaintext bytes plus TLS 1.2's
/// allowance of 2048 for expansion, plus the 5-byte header.
const MAX_RECORD: usize = 5 + (1 << 14) + 2048;

/// Plaintext encrypted per write: four full records.
const WRITE_CHUNK: usize = 4 << 14;

/// Room for what one read may hold: a partial post-handshake message (a
/// handshake message may span records up to rustls' 64 KiB limit) plus one
/// more record, and for one write's records with their overhead.
const SCRATCH_LEN: usize = (64 << 10) + 2 * MAX_RECORD;

const _: () = assert!(Records::sealed_len(WRITE_CHUNK) <= SCRATCH_LEN);

/// Room for the records sealed outside a write (an alert, a KeyUpdate;
/// each may follow a KeyUpdate at the record limit).
const SMALL_RECORDS: usize = 4 * (records::RECORD_OVERHEAD + 8);

thread_local! {
    /// Ciphertext in or out; never held across a return.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);
}

/// Who handles records.
// `Records` is inline on purpose: the stream is boxed already, and an idle
// connection keeps one allocation rather than two. rustls' connection is
// boxed so that it is freed after the handshake.
#[allow(clippy::large_enum_variant)]
enum Tls {
    /// rustls, during the handshake.
    Handshake(Box<UnbufferedServerConnection>),
    /// [`Records`], after it.
    Records(Records),
    /// A fatal error happened; nothing more is read or written.
    Failed,
}

/// A server-side TLS stream over `S` holding no buffer while idle.
pub(crate) struct ServerTlsStream<S> {
    tls: Tls,
    io: S,
    /// Ciphertext received but not yet a complete record.
    incoming: Vec<u8>,
    /// Whether `incoming` may hold records not yet run through rustls (the
    /// bytes read before the upgrade).
    unprocessed: bool,
    /// Decrypted bytes not yet handed to a reader, from `plaintext_at`.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// Encrypted bytes not yet written, from `outgoing_at`.
    outgoing: Vec<u8>,
    outgoing_at: usize,
    /// The peer's close_notify came: reads answer end of stream.
    peer_closed: bool,
    /// Our close_notify is queued.
    closing: bool,
}

/// What processing buffered input ended on.
enum Processed {
    /// Everything complete was processed; more input is needed.
    NeedInput,
    /// The peer sent close_notify.
    PeerClosed,
}

/// Appends the record `e` holds to `out`.
fn encode(e: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) {
    let at = out.len();
    let mut need = 512;
    loop {
        out.resize(at + need, 0);
        match e.encode(&mut out[at..]) {
            Ok(n) => return out.truncate(at + n),
            Err(EncodeError::InsufficientSize(s)) => need = s.required_size,
            Err(EncodeError::AlreadyEncoded) => return out.truncate(at),
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl<S> ServerTlsStream<S> {
    /// A stream over `io`; `early` are bytes already read from it (the
    /// start of the ClientHello, read with the SSL request).
    pub(crate) fn new(config: Arc<ServerConfig>, early: &[u8], io: S) -> io::Result<Self> {
        if !config.enable_secret_extraction {
            // The record layer needs the keys after the handshake.
            return Err(io::Error::other(
                "TLS: the server config must set enable_secret_extraction",
            ));
        }
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(Self {
            tls: Tls::Handshake(Box::new(conn)),
            io,
            incoming: early.to_vec(),
            unprocessed: !early.is_empty(),
            plaintext: Vec::new(),
            plaintext_at: 0,
            outgoing: Vec::new(),
            outgoing_at: 0,
            peer_closed: false,
            closing: false,
        })
    }

    /// The socket under TLS.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The negotiated version and cipher suite, once the handshake is
    /// done.
    #[cfg(test)]
    pub(crate) fn negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        match &self.tls {
            Tls::Records(r) => Some((r.protocol_version(), r.cipher_suite())),
            _ => None,
        }
    }

    #[cfg(test)]
    fn records(&mut self) -> &mut Records {
        match &mut self.tls {
            Tls::Records(r) => r,
            _ => panic!("the handshake is not done"),
        }
    }

    fn failed() -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "TLS: the connection failed earlier",
        )
    }

    /// Leaves rustls once the handshake is done: the record layer takes
    /// its keys and sequence numbers.
    fn leave_rustls(&mut self) -> io::Result<()> {
        let Tls::Handshake(conn) = std::mem::replace(&mut self.tls, Tls::Failed) else {
            return Ok(());
        };
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
        let records = Records::new(secrets, kernel).map_err(|f| f.error)?;
        tracing::debug!(
            version = ?records.protocol_version(),
            suite = ?records.cipher_suite(),
            "client TLS handshake done"
        );
        self.tls = Tls::Records(records);
        // A partial record behind the handshake is ours to open now.
        self.unprocessed = !self.incoming.is_empty();
        Ok(())
    }

    /// Bytes this connection holds in its own buffers (for tests: an idle
    /// connection holds none).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// Runs `input` through rustls until it needs more: plaintext goes to
    /// `out`, what does not fit to `self.plaintext`; records rustls wants
    /// sent go to `self.outgoing`. Returns how many bytes of `input` were
    /// consumed and what processing ended on.
    fn process(
        &mut self,
        input: &mut [u8],
        out: &mut ReadBuf<'_>,
    ) -> io::Result<(usize, Processed)> {
        let Tls::Handshake(conn) = &mut self.tls else {
            return Err(Self::failed());
        };
        let mut consumed = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut input[consumed..]);
            let state = state.map_err(tls_error)?;
            let outcome = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let n = record.payload.len().min(out.remaining());
                        out.put_slice(&record.payload[..n]);
                        self.plaintext.extend_from_slice(&record.payload[n..]);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, &mut self.outgoing);
                    None
                }
                // Queued in `outgoing`, which is written before any later
                // record.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    Some(Processed::PeerClosed)
                }
                ConnectionState::ReadEarlyData(_) => {
                    // The config accepts no early data; rustls refuses it.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS: unexpected early data",
                    ));
                }
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    Some(Processed::NeedInput)
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS: unexpected connection state",
                    ));
                }
            };
            consumed += discard;
            if let Some(o) = outcome {
                return Ok((consumed, o));
            }
        }
    }

    /// Opens the records of `input`: plaintext goes to `out`, what does
    /// not fit to `self.plaintext`. Returns how many bytes of `input` were
    /// consumed and what opening ended on. On an error the alert is queued
    /// in `outgoing` and the stream is failed.
    fn open_records(
        &mut self,
        input: &mut [u8],
        out: &mut ReadBuf<'_>,
    ) -> io::Result<(usize, Processed)> {
        let Tls::Records(records) = &mut self.tls else {
            return Err(Self::failed());
        };
        let mut at = 0;
        let outcome = loop {
            match records.open(&mut input[at..]) {
                Ok(None) => break Ok(Processed::NeedInput),
                Ok(Some((n, opened))) => {
                    let record = &input[at..at + n];
                    at += n;
                    match opened {
                        Opened::Data(range) => {
                            let data = &record[range];
                            let k = data.len().min(out.remaining());
                            out.put_slice(&data[..k]);
                            self.plaintext.extend_from_slice(&data[k..]);
                        }
                        Opened::Nothing => {}
                        Opened::Closed => break Ok(Processed::PeerClosed),
                    }
                }
                Err(fatal) => {
                    if let Some(alert) = fatal.alert {
                        let mut buf = [0; SMALL_RECORDS];
                        if let Ok(n) = records.seal_alert(alert, &mut buf) {
                            self.outgoing.extend_from_slice(&buf[..n]);
                        }
                    }
                    break Err(fatal.error);
                }
            }
        };
        match outcome {
            Ok(o) => {
                // A KeyUpdate or warning owed to the client goes behind
                // what is queued, only when nothing is: a client repeating
                // requests while not reading cannot grow `outgoing`.
                if records.has_due() && self.outgoing.is_empty() {
                    let mut buf = [0; SMALL_RECORDS];
                    match records.seal_due(&mut buf) {
                        Ok(n) => self.outgoing.extend_from_slice(&buf[..n]),
                        Err(fatal) => {
                            self.tls = Tls::Failed;
                            return Err(fatal.error);
                        }
                    }
                }
                Ok((at, o))
            }
            Err(e) => {
                self.tls = Tls::Failed;
                Err(e)
            }
        }
    }

    /// Moves the alert rustls queued on an error into `outgoing`.
    fn queue_alerts(&mut self) {
        let Tls::Handshake(conn) = &mut self.tls else {
            return;
        };
        // rustls hands out what it queued before it looks at input again
        // (where it would repeat the error).
        for _ in 0..4 {
            match conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, &mut self.outgoing),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }

    /// Hands out decrypted bytes kept from an earlier read; frees the
    /// buffer once they are gone.
    fn take_plaintext(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.plaintext.is_empty() {
            return false;
        }
        let rest = &self.plaintext[self.plaintext_at..];
        let n = rest.len().min(out.remaining());
        out.put_slice(&rest[..n]);
        self.plaintext_at += n;
        if self.plaintext_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_at = 0;
        }
        true
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerTlsStream<S> {
    /// Runs the handshake; ready once it is complete and our last flight
    /// is written.
    pub(crate) async fn handshake(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_handshake(cx)).await
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_outgoing(cx))?;
            match &self.tls {
                Tls::Handshake(conn) if !conn.is_handshaking() => {
                    return Poll::Ready(self.leave_rustls());
                }
                Tls::Handshake(_) => {}
                Tls::Records(_) => return Poll::Ready(Ok(())),
                Tls::Failed => return Poll::Ready(Err(Self::failed())),
            }
            // Application data right behind the client's Finished is kept
            // in `plaintext` for the first read.
            let mut none = ReadBuf::new(&mut []);
            ready!(self.poll_input(cx, &mut none))?;
            if self.peer_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: the client closed during the handshake",
                )));
            }
        }
    }

    /// Reads once from the socket (after anything unprocessed) and runs it
    /// through rustls. Ready when something came: bytes in `out` or kept,
    /// the peer's close, or the end of the stream (`peer_closed` set).
    fn poll_input(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let held = self.incoming.len();
            scratch[..held].copy_from_slice(&self.incoming);
            let mut end = held;
            if self.unprocessed {
                self.unprocessed = false;
            } else {
                // Read what the reader has room for, at least one record;
                // more only to complete a message larger than that.
                let want = out.remaining().max(MAX_RECORD);
                let limit = if held < want { want } else { SCRATCH_LEN };
                let limit = limit.min(SCRATCH_LEN);
                if held == limit {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS: a record or message larger than the limit",
                    )));
                }
                let mut rb = ReadBuf::new(&mut scratch[held..limit]);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    self.peer_closed = true;
                    if held > 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "TLS: the peer closed in the middle of a record",
                        )));
                    }
                    return Poll::Ready(Ok(()));
                }
                end += n;
            }
            let input = &mut scratch[..end];
            let processed = match self.tls {
                Tls::Handshake(_) => self.process(input, out),
                _ => self.open_records(input, out),
            };
            let (consumed, outcome) = match processed {
                Ok(r) => r,
                Err(e) => {
                    // Tell the peer why (the alert is queued), as far as
                    // the socket takes it now.
                    self.queue_alerts();
                    let _ = self.poll_write_outgoing(cx);
                    return Poll::Ready(Err(e));
                }
            };
            if let Processed::PeerClosed = outcome {
                self.peer_closed = true;
            }
            // Keep only the incomplete tail; free the buffer when there is
            // none.
            let tail = &scratch[consumed..end];
            if tail.is_empty() || self.peer_closed {
                self.incoming = Vec::new();
            } else {
                self.incoming.clear();
                self.incoming.extend_from_slice(tail);
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Writes what is queued in `outgoing`; ready once it is all written.
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_at < self.outgoing.len() {
            let n =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.outgoing_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_at += n;
        }
        if !self.outgoing.is_empty() {
            self.outgoing = Vec::new();
            self.outgoing_at = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads decrypted bytes into `buf`; nothing added means the end of
    /// the stream (close_notify, or the socket's end).
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.take_plaintext(buf) || self.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            ready!(self.poll_input(cx, buf))?;
            // Records owed to the client (our KeyUpdate, an alert) go out now; a
            // socket that cannot take them gets them at the next flush.
            if let Poll::Ready(Err(e)) = self.poll_write_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before || !self.plaintext.is_empty() || self.peer_closed {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Encrypts and writes up to [`WRITE_CHUNK`] bytes of `data`; what the
    /// socket does not take is kept and written before anything else.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_write_outgoing(cx))?;
        if self.closing {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: write after close_notify",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        SCRATCH.with_borrow_mut(|scratch| {
            let Tls::Records(records) = &mut self.tls else {
                return Poll::Ready(Err(Self::failed()));
            };
            let n = match records.seal_data(data, scratch) {
                Ok(n) => n,
                Err(fatal) => {
                    self.tls = Tls::Failed;
                    return Poll::Ready(Err(fatal.error));
                }
            };
            self.send_or_keep(cx, &scratch[..n])?;
            Poll::Ready(Ok(data.len()))
        })
    }

    /// Writes `records` behind anything queued; keeps what the socket does
    /// not take.
    fn send_or_keep(&mut self, cx: &mut Context<'_>, records: &[u8]) -> io::Result<()> {
        let mut at = 0;
        if self.outgoing.is_empty() {
            while at < records.len() {
                match Pin::new(&mut self.io).poll_write(cx, &records[at..]) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => at += n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
        }
        self.outgoing.extend_from_slice(&records[at..]);
        Ok(())
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_outgoing(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends close_notify (once) and shuts the socket's write side.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        if !self.closing {
            self.closing = true;
            let mut alert = [0u8; SMALL_RECORDS];
            // A failed connection (or one still in its handshake) gets no
            // close_notify; the socket is shut all the same.
            if let Tls::Records(records) = &mut self.tls
                && let Ok(n) = records.seal_alert(records::CLOSE_NOTIFY, &mut alert)
            {
                self.outgoing.extend_from_slice(&alert[..n]);
            }
        }
        let sent = poll_fn(|cx| self.poll_write_outgoing(cx)).await;
        let shut = self.io.shutdown().await;
        sent.and(shut)
    }
}

#[cfg(test)]
mod tests;
