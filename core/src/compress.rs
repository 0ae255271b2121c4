//! The compressed protocol: a framing layer under the packet layer, switched
//! on per leg after authentication when `CLIENT_COMPRESS` (zlib) or
//! `CLIENT_ZSTD_COMPRESSION_ALGORITHM` was negotiated.
//!
//! Each frame has a 7-byte header: 3-byte compressed length, 1-byte
//! compressed sequence id, 3-byte uncompressed length (0 = stored as is).
//! The compressed sequence id is shared by both directions of one exchange
//! and restarts at 0 with each command, like the plain one; the sequence ids
//! of the packets inside are not checked on compressed legs (servers
//! resynchronise them with the compressed id).

use bytes::{BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::packet::MAX_PAYLOAD;
use crate::wire::{Reader, StateError, WireError};

/// Frames shorter than this are sent uncompressed (as servers do).
pub const MIN_COMPRESS_LEN: usize = 50;

/// Size of a compressed frame header.
pub const FRAME_HEADER_LEN: usize = 7;

/// Which compression a leg uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// zlib (`CLIENT_COMPRESS`).
    Zlib,
    /// zstd at the given level (`CLIENT_ZSTD_COMPRESSION_ALGORITHM`).
    Zstd(u8),
}

/// Why a compressed frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    /// A frame's sequence id was not the expected one.
    #[error("compressed packet sequence id {got} out of order (expected {expected})")]
    OutOfOrder {
        /// Expected id.
        expected: u8,
        /// Received id.
        got: u8,
    },
    /// The frame did not decompress to the announced length.
    #[error("compressed frame is corrupt: {0}")]
    Corrupt(String),
}

/// Compressed framing state of one leg.
pub struct CompressedFraming {
    algorithm: Algorithm,
    seq: u8,
    partial: BytesMut,
    zlib_in: Decompress,
    zlib_out: Compress,
    zstd_in: Option<zstd::bulk::Decompressor<'static>>,
    zstd_out: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for CompressedFraming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressedFraming")
            .field("algorithm", &self.algorithm)
            .field("seq", &self.seq)
            .field("partial", &self.partial.len())
            .finish()
    }
}

impl CompressedFraming {
    /// Framing with the given algorithm, sequence id at 0.
    pub fn new(algorithm: Algorithm) -> Self {
        Self {
            algorithm,
            seq: 0,
            partial: BytesMut::new(),
            zlib_in: Decompress::new(true),
            zlib_out: Compress::new(Compression::default(), true),
            zstd_in: None,
            zstd_out: None,
            scratch: Vec::new(),
        }
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Restarts the compressed sequence (at each new command).
    pub fn reset_seq(&mut self) {
        self.seq = 0;
    }

    /// Sets the next compressed sequence id (to follow a peer's sequence).
    pub fn set_seq(&mut self, seq: u8) {
        self.seq = seq;
    }

    /// The next compressed sequence id.
    pub fn seq(&self) -> u8 {
        self.seq
    }

    /// Bytes of an incomplete frame held back.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Decodes every complete frame in `input` (plus any held partial frame)
    /// and appends the plain bytes to `out`.
    pub fn decode(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), CompressError> {
        while !input.is_empty() {
            let (used, _) = self.decode_one(input, out)?;
            input = &input[used..];
        }
        Ok(())
    }

    /// Decodes at most one frame. Returns how many bytes of `input` it used
    /// (an incomplete frame is held, and all of `input` counts as used) and
    /// whether a frame was completed. Callers that must act between frames
    /// (a new command restarts the compressed sequence) decode one at a time.
    pub fn decode_one(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
    ) -> Result<(usize, bool), CompressError> {
        if self.partial.is_empty() {
            if let Some(len) = frame_len(input)
                && input.len() >= len
            {
                self.decode_frame(&input[..len], out)?;
                return Ok((len, true));
            }
            self.partial.extend_from_slice(input);
            return Ok((input.len(), false));
        }
        // Complete the held frame from `input`.
        let mut used = 0;
        if self.partial.len() < FRAME_HEADER_LEN {
            let n = (FRAME_HEADER_LEN - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..n]);
            used = n;
        }
        let Some(len) = frame_len(&self.partial) else {
            return Ok((used, false));
        };
        let n = (len - self.partial.len()).min(input.len() - used);
        self.partial.extend_from_slice(&input[used..used + n]);
        used += n;
        if self.partial.len() < len {
            return Ok((used, false));
        }
        let frame = std::mem::take(&mut self.partial);
        self.decode_frame(&frame, out)?;
        Ok((used, true))
    }

    /// Decodes one whole frame.
    fn decode_frame(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<(), CompressError> {
        let seq = frame[3];
        let ulen = usize::from(frame[4]) | usize::from(frame[5]) << 8 | usize::from(frame[6]) << 16;
        // A frame numbered 0 restarts the sequence: a client that sends its
        // next command before the proxy saw the previous exchange end (a
        // pipelined command) numbers it from 0 again.
        if seq == 0 && self.seq != 0 {
            self.seq = 0;
        }
        if seq != self.seq {
            return Err(CompressError::OutOfOrder {
                expected: self.seq,
                got: seq,
            });
        }
        self.seq = self.seq.wrapping_add(1);
        let body = &frame[FRAME_HEADER_LEN..];
        if ulen == 0 {
            out.extend_from_slice(body);
            Ok(())
        } else {
            self.inflate(body, ulen, out)
        }
    }

    fn inflate(
        &mut self,
        body: &[u8],
        ulen: usize,
        out: &mut BytesMut,
    ) -> Result<(), CompressError> {
        match self.algorithm {
            Algorithm::Zlib => {
                self.scratch.clear();
                self.scratch.reserve(ulen);
                self.zlib_in.reset(true);
                let status = self
                    .zlib_in
                    .decompress_vec(body, &mut self.scratch, FlushDecompress::Finish)
                    .map_err(|e| CompressError::Corrupt(e.to_string()))?;
                if status != Status::StreamEnd || self.scratch.len() != ulen {
                    return Err(CompressError::Corrupt(format!(
                        "zlib frame announced {ulen} bytes, produced {}",
                        self.scratch.len()
                    )));
                }
                out.extend_from_slice(&self.scratch);
            }
            Algorithm::Zstd(_) => {
                if self.zstd_in.is_none() {
                    self.zstd_in = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| CompressError::Corrupt(e.to_string()))?,
                    );
                }
                // The decompressor was set just above.
                let d = self
                    .zstd_in
                    .as_mut()
                    .expect("zstd decompressor initialised");
                let plain = d
                    .decompress(body, ulen)
                    .map_err(|e| CompressError::Corrupt(e.to_string()))?;
                if plain.len() != ulen {
                    return Err(CompressError::Corrupt(format!(
                        "zstd frame announced {ulen} bytes, produced {}",
                        plain.len()
                    )));
                }
                out.extend_from_slice(&plain);
            }
        }
        Ok(())
    }

    /// Frames `plain` (whole packets) into compressed frames appended to `out`.
    pub fn encode(&mut self, plain: &[u8], out: &mut BytesMut) {
        for chunk in plain.chunks(MAX_PAYLOAD) {
            let compressed = if chunk.len() >= MIN_COMPRESS_LEN {
                self.deflate(chunk)
            } else {
                false
            };
            if compressed {
                put_u24(out, self.scratch.len());
                out.put_u8(self.seq);
                put_u24(out, chunk.len());
                out.put_slice(&self.scratch);
            } else {
                put_u24(out, chunk.len());
                out.put_u8(self.seq);
                put_u24(out, 0);
                out.put_slice(chunk);
            }
            self.seq = self.seq.wrapping_add(1);
        }
    }

    /// Compresses `chunk` into `self.scratch`; false when compression would
    /// not make it smaller (or failed), so the chunk goes out stored.
    fn deflate(&mut self, chunk: &[u8]) -> bool {
        self.scratch.clear();
        match self.algorithm {
            Algorithm::Zlib => {
                self.scratch.reserve(chunk.len() + 64);
                self.zlib_out.reset();
                let ok = matches!(
                    self.zlib_out
                        .compress_vec(chunk, &mut self.scratch, FlushCompress::Finish),
                    Ok(Status::StreamEnd)
                );
                ok && self.scratch.len() < chunk.len()
            }
            Algorithm::Zstd(level) => {
                if self.zstd_out.is_none() {
                    match zstd::bulk::Compressor::new(i32::from(level)) {
                        Ok(c) => self.zstd_out = Some(c),
                        Err(_) => return false,
                    }
                }
                // The compressor was set just above.
                let c = self.zstd_out.as_mut().expect("zstd compressor initialised");
                match c.compress(chunk) {
                    Ok(v) if v.len() < chunk.len() => {
                        self.scratch = v;
                        true
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Export format version of [`CompressedFraming`].
const EXPORT_VERSION: u8 = 1;
const MACHINE: &str = "compressed framing";
const TAG_ZLIB: u8 = 0;
const TAG_ZSTD: u8 = 1;

impl CompressedFraming {
    /// Appends this leg's framing state to `out`: algorithm, zstd level and
    /// the next compressed sequence id (version 1: `version:u8, tag:u8
    /// (0 zlib, 1 zstd), level:u8, seq:u8`). The (de)compressors restart
    /// with every frame, so nothing else carries over; a half-received
    /// frame does, which is why it refuses to export then.
    pub fn export(&self, out: &mut BytesMut) -> Result<(), StateError> {
        if !self.partial.is_empty() {
            return Err(StateError::Busy {
                machine: MACHINE,
                why: "part of a frame is buffered",
            });
        }
        let (tag, level) = match self.algorithm {
            Algorithm::Zlib => (TAG_ZLIB, 0),
            Algorithm::Zstd(level) => (TAG_ZSTD, level),
        };
        out.put_u8(EXPORT_VERSION);
        out.put_u8(tag);
        out.put_u8(level);
        out.put_u8(self.seq);
        Ok(())
    }

    /// Reads framing exported by [`CompressedFraming::export`] from the
    /// front of `input` and advances `input` past it.
    pub fn import(input: &mut &[u8]) -> Result<CompressedFraming, StateError> {
        let malformed = |source| StateError::Malformed {
            machine: MACHINE,
            source,
        };
        let mut r = Reader::new(input);
        let version = r.u8("version").map_err(malformed)?;
        if version != EXPORT_VERSION {
            return Err(StateError::Version {
                machine: MACHINE,
                got: version,
                expected: EXPORT_VERSION,
            });
        }
        let tag = r.u8("algorithm").map_err(malformed)?;
        let level = r.u8("zstd level").map_err(malformed)?;
        let seq = r.u8("sequence id").map_err(malformed)?;
        let algorithm = match (tag, level) {
            (TAG_ZLIB, 0) => Algorithm::Zlib,
            (TAG_ZSTD, level) => Algorithm::Zstd(level),
            _ => {
                return Err(malformed(WireError::Invalid {
                    field: "algorithm",
                    detail: "expected 0 (zlib, level 0) or 1 (zstd)",
                }));
            }
        };
        let mut f = CompressedFraming::new(algorithm);
        f.seq = seq;
        *input = r.rest();
        Ok(f)
    }
}

/// Total length of the frame that starts `buf`, once its header is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < FRAME_HEADER_LEN {
        return None;
    }
    Some(
        FRAME_HEADER_LEN
            + (usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16),
    )
}

fn put_u24(out: &mut BytesMut, v: usize) {
    out.put_uint_le(v as u64, 3);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{PacketDecoder, write_packet};
    use proptest::prelude::*;

    fn round_trip(alg: Algorithm, payloads: &[Vec<u8>], cut: usize) {
        let mut plain = BytesMut::new();
        let mut seq = 0;
        for p in payloads {
            seq = write_packet(&mut plain, seq, p);
        }
        let mut enc = CompressedFraming::new(alg);
        let mut wire = BytesMut::new();
        enc.encode(&plain, &mut wire);
        let mut dec = CompressedFraming::new(alg);
        let mut out = BytesMut::new();
        for c in wire.chunks(cut.max(1)) {
            dec.decode(c, &mut out).unwrap();
        }
        assert_eq!(dec.buffered(), 0);
        assert_eq!(&out[..], &plain[..]);
        let mut d = PacketDecoder::default();
        d.extend(&out);
        for p in payloads {
            assert_eq!(&d.next_payload().unwrap().unwrap().data[..], &p[..]);
        }
    }

    #[test]
    fn zlib_and_zstd_round_trip_large_and_small() {
        let big = vec![b'x'; 100_000];
        for alg in [Algorithm::Zlib, Algorithm::Zstd(3)] {
            round_trip(alg, &[b"\x03select 1".to_vec(), big.clone(), vec![]], 777);
        }
    }

    #[test]
    fn frames_are_compressed_when_it_helps() {
        let mut enc = CompressedFraming::new(Algorithm::Zlib);
        let mut wire = BytesMut::new();
        enc.encode(&[b'a'; 1000], &mut wire);
        assert!(
            wire.len() < 100,
            "1000 repeated bytes compress: {}",
            wire.len()
        );
        assert_eq!(&wire[4..7], &[0xe8, 0x03, 0x00]);
    }

    #[test]
    fn sequence_and_corruption_are_errors() {
        let mut enc = CompressedFraming::new(Algorithm::Zlib);
        let mut wire = BytesMut::new();
        enc.encode(&[b'a'; 1000], &mut wire);
        let mut enc3 = CompressedFraming::new(Algorithm::Zlib);
        enc3.set_seq(3);
        let mut wire3 = BytesMut::new();
        enc3.encode(&[b'a'; 1000], &mut wire3);
        let mut dec = CompressedFraming::new(Algorithm::Zlib);
        dec.seq = 5;
        assert!(matches!(
            dec.decode(&wire3, &mut BytesMut::new()),
            Err(CompressError::OutOfOrder {
                expected: 5,
                got: 3
            })
        ));
        // A frame numbered 0 restarts the sequence (a pipelined command).
        let mut dec = CompressedFraming::new(Algorithm::Zlib);
        dec.seq = 5;
        dec.decode(&wire, &mut BytesMut::new()).unwrap();
        assert_eq!(dec.seq(), 1);
        let mut bad = wire.clone();
        let n = bad.len();
        bad[n - 3] ^= 0xff;
        let mut dec = CompressedFraming::new(Algorithm::Zlib);
        assert!(dec.decode(&bad, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn export_refuses_a_half_received_frame() {
        let mut enc = CompressedFraming::new(Algorithm::Zlib);
        let mut wire = BytesMut::new();
        enc.encode(&[b'a'; 1000], &mut wire);
        let mut dec = CompressedFraming::new(Algorithm::Zlib);
        dec.decode(&wire[..5], &mut BytesMut::new()).unwrap();
        assert!(matches!(
            dec.export(&mut BytesMut::new()),
            Err(StateError::Busy { .. })
        ));
        dec.decode(&wire[5..], &mut BytesMut::new()).unwrap();
        let mut out = BytesMut::new();
        dec.export(&mut out).unwrap();
        assert_eq!(&out[..], &[EXPORT_VERSION, TAG_ZLIB, 0, 1]);
    }

    #[test]
    fn import_rejects_bad_input() {
        assert!(matches!(
            CompressedFraming::import(&mut &[2u8, 0, 0, 0][..]),
            Err(StateError::Version { got: 2, .. })
        ));
        assert!(matches!(
            CompressedFraming::import(&mut &[1u8, 7, 0, 0][..]),
            Err(StateError::Malformed { .. })
        ));
        assert!(matches!(
            CompressedFraming::import(&mut &[1u8, 0, 0][..]),
            Err(StateError::Malformed { .. })
        ));
    }

    proptest! {
        /// export -> import -> export is identical, and the imported framing
        /// encodes and decodes the rest of a stream exactly like the
        /// original (same frames, same sequence ids).
        #[test]
        fn imported_framing_continues_identically(
            zstd in any::<bool>(),
            level in 1u8..6,
            before in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..300), 0..4),
            after in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..300), 1..4),
        ) {
            let alg = if zstd { Algorithm::Zstd(level) } else { Algorithm::Zlib };
            let mut enc = CompressedFraming::new(alg);
            let mut dec = CompressedFraming::new(alg);
            let mut wire = BytesMut::new();
            for p in &before {
                enc.encode(p, &mut wire);
            }
            dec.decode(&wire, &mut BytesMut::new()).unwrap();
            let mut a = BytesMut::new();
            enc.export(&mut a).unwrap();
            let d_at = a.len();
            dec.export(&mut a).unwrap();
            let mut input = &a[..];
            let mut enc2 = CompressedFraming::import(&mut input).unwrap();
            let mut dec2 = CompressedFraming::import(&mut input).unwrap();
            prop_assert!(input.is_empty());
            let mut b = BytesMut::new();
            enc2.export(&mut b).unwrap();
            dec2.export(&mut b).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a[..d_at], &a[d_at..]);
            for p in &after {
                let (mut w1, mut w2) = (BytesMut::new(), BytesMut::new());
                enc.encode(p, &mut w1);
                enc2.encode(p, &mut w2);
                prop_assert_eq!(&w1, &w2);
                let (mut o1, mut o2) = (BytesMut::new(), BytesMut::new());
                dec.decode(&w1, &mut o1).unwrap();
                dec2.decode(&w2, &mut o2).unwrap();
                prop_assert_eq!(&o1, &o2);
                prop_assert_eq!(&o1[..], &p[..]);
            }
        }

        #[test]
        fn any_chunking_round_trips(
            payloads in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..400), 1..6),
            cut in 1usize..100,
            zstd in any::<bool>(),
        ) {
            let alg = if zstd { Algorithm::Zstd(1) } else { Algorithm::Zlib };
            round_trip(alg, &payloads, cut);
        }

        #[test]
        fn hostile_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), zstd in any::<bool>()) {
            let alg = if zstd { Algorithm::Zstd(1) } else { Algorithm::Zlib };
            let mut dec = CompressedFraming::new(alg);
            dec.seq = bytes.get(3).copied().unwrap_or(0);
            let _ = dec.decode(&bytes, &mut BytesMut::new());
        }
    }
}
