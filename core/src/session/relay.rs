//! The relay: what the session does to bytes on their way between legs.
//! Per-leg receive framing (a packet's header and the prefix the session
//! must see, then pass-through of the rest), sequence-id rewrite,
//! compression staging, the transmit buffers the driver drains, client
//! bytes parked while the session cannot take them, and the read budget
//! computed from all of these. It never decides what a packet means: that
//! is the command phase's, the backend handshake's and the move's job.

use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::backend::Expect;
use super::command::BEGIN_PREFIX;
use super::{Action, Leg, Phase, PlantedBug, Session};
use crate::Command;
use crate::compress::{Algorithm, CompressedFraming};
use crate::error::ProxyError;
use crate::packet::{HEADER_LEN, MAX_PAYLOAD, PacketHeader, write_packet};

/// Buffers larger than this are released once drained, so idle sessions
/// stay small.
pub(super) const RELEASE_CAPACITY: usize = 16 * 1024;

/// A transmit buffer compacts (moves its unwritten bytes to the front)
/// once this many written bytes sit before them and they are at least
/// half the buffer.
const COMPACT_AT: usize = 64 * 1024;

/// What to do with a packet after looking at its header and prefix.
pub(super) enum Disposition {
    /// Write header (sequence id rewritten) and prefix to the leg, and pass
    /// the rest of the packet to it.
    Forward(Leg),
    /// The packet was consumed by the proxy; skip any rest of it.
    Consumed,
}

/// Receive-side framing state of a leg.
#[derive(Debug, Default)]
pub(super) struct Rx {
    /// An incomplete header and payload prefix.
    pub(super) stash: BytesMut,
    /// Payload bytes of the current packet still to pass through.
    pub(super) pass: usize,
    /// Where they go (`None`: dropped).
    pub(super) pass_to: Option<Leg>,
}

/// Bytes for a leg's socket. The driver's writes advance a read offset;
/// the buffer is cleared (or released) when drained and compacted when the
/// written part dominates, so acknowledging a write never splits the
/// buffer (no shared-buffer reference counting on the hot path).
#[derive(Debug, Default)]
pub(super) struct Transmit {
    buf: BytesMut,
    read: usize,
}

impl Transmit {
    /// The bytes not yet written.
    pub(super) fn pending(&self) -> &[u8] {
        &self.buf[self.read..]
    }

    /// How many bytes are not yet written.
    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.read
    }

    /// Marks `n` bytes as written.
    pub(super) fn advance(&mut self, n: usize) {
        self.read += n.min(self.len());
        if self.read == self.buf.len() {
            self.clear();
        } else if self.read >= COMPACT_AT && self.read * 2 >= self.buf.len() {
            let len = self.buf.len();
            self.buf.copy_within(self.read..len, 0);
            self.buf.truncate(len - self.read);
            self.read = 0;
        }
    }

    /// Drops every unwritten byte.
    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.read = 0;
        if self.buf.capacity() > RELEASE_CAPACITY {
            self.buf = BytesMut::new();
        }
    }

    /// Appends bytes.
    pub(super) fn put(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// The buffer to append to.
    pub(super) fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Takes the unwritten bytes out.
    pub(super) fn take(&mut self) -> BytesMut {
        let mut b = std::mem::take(&mut self.buf);
        b.advance(std::mem::take(&mut self.read));
        b
    }

    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Gives the allocation back when nothing is left to write.
    fn release_if_empty(&mut self) {
        if self.len() == 0 && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
            self.read = 0;
        }
    }
}

/// A compressed leg's framing, the plain bytes staged for it and its
/// decompression buffer, in one allocation: a plain leg (nearly every one)
/// carries none of them inline.
#[derive(Debug)]
pub(super) struct Compressed {
    pub(super) framing: CompressedFraming,
    /// Plain bytes waiting to be compressed.
    pub(super) staging: BytesMut,
    /// Decompressed bytes of the frame being processed, reused.
    plain: BytesMut,
}

impl Compressed {
    pub(super) fn new(framing: CompressedFraming) -> Box<Self> {
        Box::new(Self {
            framing,
            staging: BytesMut::new(),
            plain: BytesMut::new(),
        })
    }
}

impl std::ops::Deref for Compressed {
    type Target = CompressedFraming;

    fn deref(&self) -> &CompressedFraming {
        &self.framing
    }
}

impl std::ops::DerefMut for Compressed {
    fn deref_mut(&mut self) -> &mut CompressedFraming {
        &mut self.framing
    }
}

/// One leg's framing, sequence and output state.
#[derive(Debug, Default)]
pub(super) struct LegState {
    /// Bytes ready for the socket.
    pub(super) out: Transmit,
    /// Compressed framing and its staging buffer, once switched on.
    pub(super) framing: Option<Box<Compressed>>,
    /// Compression negotiated, to switch on after authentication.
    pub(super) compression: Option<Algorithm>,
    /// Restart the compressed sequence before encoding `staging`.
    pub(super) reset_out_seq: bool,
    pub(super) rx: Rx,
    /// Next packet sequence id on this leg.
    pub(super) seq: u8,
    /// Whether the leg is TLS.
    pub(super) tls: bool,
}

impl LegState {
    /// The sequence id for the next packet written to this leg. On a
    /// compressed leg, a packet that opens a frame and ends in it takes the
    /// frame's compressed sequence id, as servers do (they resynchronise the
    /// two counters whenever they flush) and as clients expect after a
    /// result set with MORE_RESULTS_EXISTS; a packet that continues into
    /// later frames keeps the running count, which clients check when its
    /// last byte arrives. `whole`: the packet is written now, all of it, and
    /// fits in one frame.
    pub(super) fn next_seq(&mut self, whole: bool) -> u8 {
        if let Some(f) = &self.framing
            && f.staging.is_empty()
            && whole
        {
            self.seq = if self.reset_out_seq { 0 } else { f.seq() };
        }
        let seq = self.seq;
        self.seq = seq.wrapping_add(1);
        seq
    }

    pub(super) fn writer(&mut self) -> &mut BytesMut {
        match &mut self.framing {
            Some(f) => &mut f.staging,
            None => self.out.buf_mut(),
        }
    }

    /// Writes a whole packet payload with the leg's next sequence id.
    pub(super) fn send(&mut self, payload: &[u8]) {
        let seq = self.next_seq(payload.len() + HEADER_LEN <= MAX_PAYLOAD);
        self.seq = write_packet(self.writer(), seq, payload);
    }

    /// Bytes queued towards this leg's socket, compressed or not yet.
    fn queued(&self) -> usize {
        self.out.len() + self.framing.as_ref().map_or(0, |f| f.staging.len())
    }
}

/// The three legs' state, indexed by [`Leg::idx`]. The new backend's leg is
/// used only while a move runs, so it lives in its own allocation, made on
/// first use and given back by [`Relay::release_idle`]: an idle session
/// does not carry a third leg's buffers and framing inline (issue 15).
#[derive(Debug, Default)]
pub(super) struct Legs {
    main: [LegState; 2],
    new: Option<Box<LegState>>,
}

/// What an absent new-backend leg reads as: a leg with nothing on it.
static NO_LEG: std::sync::LazyLock<LegState> = std::sync::LazyLock::new(LegState::default);

impl Legs {
    /// Every leg that exists.
    pub(super) fn iter(&self) -> impl Iterator<Item = &LegState> {
        self.main.iter().chain(self.new.as_deref())
    }

    /// Whether the new backend's leg is allocated.
    #[cfg(test)]
    pub(super) fn has_new(&self) -> bool {
        self.new.is_some()
    }

    /// Drops the new backend's leg when it holds nothing: no bytes, no
    /// framing. Only called while no move runs, when it is at its default.
    fn release_new(&mut self) {
        if let Some(l) = &self.new
            && l.queued() == 0
            && l.rx.stash.is_empty()
            && l.rx.pass == 0
            && l.framing.is_none()
        {
            self.new = None;
        }
    }
}

impl Legs {
    /// Leg `i` if it exists (never makes the new backend's).
    fn get_mut(&mut self, i: usize) -> Option<&mut LegState> {
        match i {
            0 | 1 => Some(&mut self.main[i]),
            _ => self.new.as_deref_mut(),
        }
    }
}

impl std::ops::Index<usize> for Legs {
    type Output = LegState;

    fn index(&self, i: usize) -> &LegState {
        match i {
            0 | 1 => &self.main[i],
            _ => self.new.as_deref().unwrap_or(&NO_LEG),
        }
    }
}

impl std::ops::IndexMut<usize> for Legs {
    fn index_mut(&mut self, i: usize) -> &mut LegState {
        match i {
            0 | 1 => &mut self.main[i],
            _ => self.new.get_or_insert_with(Box::default),
        }
    }
}

impl<'a> IntoIterator for &'a mut Legs {
    type Item = &'a mut LegState;
    type IntoIter = std::iter::Chain<
        std::slice::IterMut<'a, LegState>,
        std::option::IntoIter<&'a mut LegState>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.main.iter_mut().chain(self.new.as_deref_mut())
    }
}

/// The relay's state: three legs and parked client bytes.
#[derive(Debug, Default)]
pub(super) struct Relay {
    pub(super) legs: Legs,
    /// Client bytes (plain) waiting until the session can take them.
    pub(super) held: BytesMut,
    /// Held bytes are being processed: bytes that must wait again stay in
    /// the buffer being drained instead of being copied back.
    pub(super) draining: bool,
}

impl Relay {
    /// What the session holds towards the other side of `leg`: the read
    /// budget's measure. Client bytes go to the backend (or wait, parked);
    /// backend bytes go to the client. A new backend only handshakes with
    /// the proxy, so it is measured like the backend.
    pub(super) fn held_towards(&self, leg: Leg) -> usize {
        match leg {
            Leg::Client => self.held.len() + self.legs[1].queued(),
            Leg::Backend | Leg::NewBackend => self.legs[0].queued(),
        }
    }

    /// Puts the command `payload` (one whole packet, sequence 0) in front
    /// of the held client bytes, to run before them; returns its length
    /// with the header.
    pub(super) fn hold_in_front(&mut self, payload: &[u8]) -> usize {
        let mut held = BytesMut::with_capacity(HEADER_LEN + payload.len() + self.held.len());
        write_packet(&mut held, 0, payload);
        let len = held.len();
        held.extend_from_slice(&self.held);
        self.held = held;
        len
    }

    /// Capacity of every buffer (memory accounting).
    pub(super) fn buffered(&self) -> usize {
        self.held.capacity()
            + self
                .legs
                .iter()
                .map(|l| {
                    l.out.capacity()
                        + l.framing
                            .as_ref()
                            .map_or(0, |f| f.staging.capacity() + f.plain.capacity())
                        + l.rx.stash.capacity()
                })
                .sum::<usize>()
    }

    /// Gives back the allocation of every buffer that holds nothing: an
    /// idle session owns no buffer space (the next command allocates again,
    /// a small allocation per leg, where keeping them cost every idle
    /// connection what its last exchange left, up to [`RELEASE_CAPACITY`]
    /// per buffer), nor a new backend's leg. Called only while no move runs.
    pub(super) fn release_idle(&mut self) {
        self.legs.release_new();
        fn release(b: &mut BytesMut) {
            if b.is_empty() && b.capacity() > 0 {
                *b = BytesMut::new();
            }
        }
        for l in &mut self.legs {
            l.out.release_if_empty();
            if let Some(f) = &mut l.framing {
                release(&mut f.staging);
                release(&mut f.plain);
            }
            release(&mut l.rx.stash);
        }
        release(&mut self.held);
    }

    /// Whether every leg's output is written.
    pub(super) fn all_written(&self) -> bool {
        self.legs.iter().all(|l| l.queued() == 0)
    }

    /// Takes `leg`'s decompression buffer, reused across reads.
    pub(super) fn take_plain(&mut self, leg: Leg) -> BytesMut {
        self.legs
            .get_mut(leg.idx())
            .and_then(|l| l.framing.as_mut())
            .map(|f| std::mem::take(&mut f.plain))
            .unwrap_or_default()
    }

    /// Takes back `leg`'s decompression buffer (released when it grew
    /// large, or when the leg is gone or no longer compressed).
    pub(super) fn keep_plain(&mut self, leg: Leg, plain: BytesMut) {
        if plain.capacity() <= RELEASE_CAPACITY
            && let Some(f) = self
                .legs
                .get_mut(leg.idx())
                .and_then(|l| l.framing.as_mut())
        {
            f.plain = plain;
        }
    }

    /// Puts back what is left of drained held bytes. Anything held while
    /// draining (the BEGIN trick's BEGIN) goes first.
    pub(super) fn rehold(&mut self, rest: BytesMut) {
        if !self.held.is_empty() {
            self.held.extend_from_slice(&rest);
        } else if !rest.is_empty() || rest.capacity() <= RELEASE_CAPACITY {
            // Drained (or not): the allocation is kept unless it grew large.
            self.held = rest;
        }
    }
}

impl<T: Clone> Session<T> {
    // ----------------------------------------------------------------
    // Packet stream
    // ----------------------------------------------------------------

    /// Whether a client packet may be processed now.
    pub(super) fn client_packet_allowed(&self) -> bool {
        match self.phase {
            Phase::ClientHello | Phase::Backend(Expect::AuthResult) => true,
            Phase::Command => !self.migration.active() && self.tracker.accepts_client_packet(),
            _ => false,
        }
    }

    pub(super) fn client_starts_command(&self) -> bool {
        self.phase == Phase::Command && self.tracker.is_idle() && self.relay.held.is_empty()
    }

    /// Processes plain bytes read from `leg`. Returns how many bytes at
    /// the end were left for the caller: only while draining held bytes,
    /// when the session cannot take them yet.
    pub(super) fn process(&mut self, now: Instant, leg: Leg, mut data: &[u8]) -> usize {
        let i = leg.idx();
        while !data.is_empty() {
            if self.phase == Phase::Closed {
                return 0;
            }
            // Pass through the rest of the current packet.
            if self.relay.legs[i].rx.pass > 0 {
                let n = self.relay.legs[i].rx.pass.min(data.len());
                if let Some(to) = self.relay.legs[i].rx.pass_to {
                    self.relay.legs[to.idx()]
                        .writer()
                        .extend_from_slice(&data[..n]);
                    if leg == Leg::Backend && self.tap_in_row() {
                        self.tap_feed(&data[..n]);
                    }
                }
                self.relay.legs[i].rx.pass -= n;
                data = &data[n..];
                continue;
            }
            if self.boundary_pending && leg == Leg::Backend {
                self.boundary_pending = false;
                self.at_boundary(now);
                self.drain_held(now);
                continue;
            }
            if self.tls_request.is_some() {
                break;
            }
            if leg == Leg::Client
                && self.relay.legs[i].rx.stash.is_empty()
                && !self.client_packet_allowed()
            {
                if self.relay.draining {
                    return data.len();
                }
                self.relay.held.extend_from_slice(data);
                return 0;
            }
            // Header and first payload byte.
            let stash_len = self.relay.legs[i].rx.stash.len();
            let avail = stash_len + data.len();
            if avail < HEADER_LEN {
                self.relay.legs[i].rx.stash.extend_from_slice(data);
                return 0;
            }
            let header = if stash_len >= HEADER_LEN {
                PacketHeader::parse(&self.relay.legs[i].rx.stash)
            } else {
                let mut h = [0u8; HEADER_LEN];
                h[..stash_len].copy_from_slice(&self.relay.legs[i].rx.stash);
                h[stash_len..].copy_from_slice(&data[..HEADER_LEN - stash_len]);
                PacketHeader::parse(&h)
            };
            // Four bytes are present.
            let header = header.expect("four header bytes");
            if let Err(e) = self.check_size(leg, header) {
                self.refuse(e);
                return 0;
            }
            let first = if header.len == 0 {
                None
            } else if avail > HEADER_LEN {
                Some(if stash_len > HEADER_LEN {
                    self.relay.legs[i].rx.stash[HEADER_LEN]
                } else {
                    data[HEADER_LEN - stash_len]
                })
            } else {
                self.relay.legs[i].rx.stash.extend_from_slice(data);
                return 0;
            };
            let need = self.prefix_needed(leg, header, first).min(header.len);
            let want = HEADER_LEN + need;
            let disposition;
            if stash_len == 0 && data.len() >= want {
                // Fast path: the header and prefix are contiguous in the input.
                let (pkt, rest) = data.split_at(want);
                disposition = self.on_packet(now, leg, header, &pkt[HEADER_LEN..]);
                if let Disposition::Forward(to) = disposition
                    && data.len() >= HEADER_LEN + header.len
                {
                    // The whole packet is here: one copy, sequence id patched.
                    let whole = HEADER_LEN + header.len;
                    let l = &mut self.relay.legs[to.idx()];
                    let seq = l.next_seq(whole <= MAX_PAYLOAD);
                    let w = l.writer();
                    let at = w.len();
                    w.extend_from_slice(&data[..whole]);
                    w[at + 3] = seq;
                    if leg == Leg::Backend && self.tap_in_row() {
                        self.tap_feed(&data[HEADER_LEN..whole]);
                    }
                    data = &data[whole..];
                    continue;
                }
                self.emit(leg, header, pkt, disposition, need);
                data = rest;
            } else {
                let take = (want - stash_len).min(data.len());
                self.relay.legs[i].rx.stash.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.relay.legs[i].rx.stash.len() < want {
                    return 0;
                }
                let pkt = std::mem::take(&mut self.relay.legs[i].rx.stash);
                disposition = self.on_packet(now, leg, header, &pkt[HEADER_LEN..]);
                self.emit(leg, header, &pkt, disposition, need);
                let mut pkt = pkt;
                pkt.clear();
                if pkt.capacity() <= RELEASE_CAPACITY {
                    self.relay.legs[i].rx.stash = pkt;
                }
            }
        }
        if self.boundary_pending && leg == Leg::Backend && self.relay.legs[i].rx.pass == 0 {
            self.boundary_pending = false;
            self.at_boundary(now);
            self.drain_held(now);
        }
        if let Some(tls_leg) = self.tls_request.take() {
            // Whatever follows the SSL request is the start of the TLS stream.
            self.actions.push_back(Action::StartTls {
                leg: tls_leg,
                early_data: Bytes::copy_from_slice(data),
            });
        }
        0
    }

    /// Writes a forwarded packet's header and prefix and sets up the pass
    /// through of its remainder.
    fn emit(
        &mut self,
        from: Leg,
        header: PacketHeader,
        pkt: &[u8],
        disposition: Disposition,
        need: usize,
    ) {
        let rest = header.len - need;
        match disposition {
            Disposition::Forward(to) => {
                let seq = self.relay.legs[to.idx()].next_seq(rest == 0 && pkt.len() <= MAX_PAYLOAD);
                let w = self.relay.legs[to.idx()].writer();
                w.reserve(pkt.len());
                w.put_slice(
                    &PacketHeader {
                        len: header.len,
                        seq,
                    }
                    .to_bytes(),
                );
                w.put_slice(&pkt[HEADER_LEN..]);
                if from == Leg::Backend && self.tap_in_row() {
                    self.tap_feed(&pkt[HEADER_LEN..]);
                }
                let rx = &mut self.relay.legs[from.idx()].rx;
                rx.pass = rest;
                rx.pass_to = Some(to);
            }
            Disposition::Consumed => {
                let rx = &mut self.relay.legs[from.idx()].rx;
                rx.pass = rest;
                rx.pass_to = None;
            }
        }
    }

    fn check_size(&self, leg: Leg, header: PacketHeader) -> Result<(), ProxyError> {
        let handshaking = matches!(
            self.phase,
            Phase::ClientHello | Phase::Backend(Expect::AuthResult)
        );
        if leg == Leg::Client && handshaking && header.len > self.cfg.max_handshake_len {
            return Err(ProxyError::HandshakeTooLarge {
                len: header.len,
                limit: self.cfg.max_handshake_len,
            });
        }
        Ok(())
    }

    /// How many payload bytes of a packet the session must see.
    fn prefix_needed(&self, leg: Leg, header: PacketHeader, first: Option<u8>) -> usize {
        let whole = header.len;
        if leg == Leg::NewBackend || self.phase != Phase::Command {
            return whole;
        }
        if leg == Leg::Backend {
            if self.migration.on_old_backend() {
                return whole;
            }
            return match first {
                Some(b) if self.tracker.backend_needs_whole(header.len, b) => whole,
                Some(_) => 1,
                None => 0,
            };
        }
        // Client, command phase.
        if self.begin_trick_applies()
            && first == Some(Command::Query.to_byte())
            && (header.len <= BEGIN_PREFIX
                || (self.planted(PlantedBug::MoveInsideTransaction) && header.len < MAX_PAYLOAD))
        {
            return whole;
        }
        // COM_CHANGE_USER is read whole to rewrite it; one larger than a
        // handshake may be is refused by its first bytes, never buffered.
        if self.tracker.is_idle()
            && first == Some(Command::ChangeUser.to_byte())
            && header.len <= self.cfg.max_handshake_len
        {
            return whole;
        }
        // Crash protection reads a short statement whole to tell a read
        // from a state change.
        if self.cfg.protect.enabled
            && self.tracker.is_idle()
            && first == Some(Command::Query.to_byte())
            && header.len <= super::protect::SCAN_LIMIT
        {
            return whole;
        }
        // Traffic capture records a command's bytes (one packet at most).
        if self.tap_wants_whole(header.len) {
            return whole;
        }
        self.tracker.client_prefix_needed(header.len)
    }

    /// Handles one packet (`prefix` holds the bytes asked for).
    fn on_packet(
        &mut self,
        now: Instant,
        leg: Leg,
        header: PacketHeader,
        prefix: &[u8],
    ) -> Disposition {
        match leg {
            Leg::Client => self.on_client_packet(now, header, prefix),
            Leg::Backend => self.on_backend_packet(now, header, prefix),
            Leg::NewBackend => {
                self.on_new_backend_packet(now, header, prefix);
                Disposition::Consumed
            }
        }
    }

    /// Checks the sequence id of a packet read from `leg` and advances it.
    pub(super) fn check_seq(&mut self, leg: Leg, header: PacketHeader) -> bool {
        let l = &mut self.relay.legs[leg.idx()];
        // Servers resynchronise packet ids with compressed ids, so they are
        // only checked on plain legs.
        let ok = l.framing.is_some() || l.seq == header.seq;
        l.seq = header.seq.wrapping_add(1);
        ok
    }

    pub(super) fn switch_on_compression(&mut self, leg: Leg) {
        let l = &mut self.relay.legs[leg.idx()];
        if let Some(alg) = l.compression
            && l.framing.is_none()
        {
            l.framing = Some(Compressed::new(CompressedFraming::new(alg)));
        }
    }

    /// Compresses staged bytes on compressed legs.
    pub(super) fn flush(&mut self) {
        for l in &mut self.relay.legs {
            if let Some(c) = l.framing.as_mut()
                && !c.staging.is_empty()
            {
                let Compressed {
                    framing, staging, ..
                } = &mut **c;
                if std::mem::take(&mut l.reset_out_seq) {
                    framing.reset_seq();
                }
                framing.encode(staging, l.out.buf_mut());
                staging.clear();
                if staging.capacity() > RELEASE_CAPACITY {
                    *staging = BytesMut::new();
                }
            }
        }
    }
}
