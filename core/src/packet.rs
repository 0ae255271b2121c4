//! Packet framing: a 3-byte little-endian payload length and a 1-byte
//! sequence id before every payload. Payloads of 16 MiB - 1 or more are split
//! across packets; a packet of exactly `MAX_PAYLOAD` bytes says "more
//! follows", so a payload that is a multiple of it ends with an empty packet.

use bytes::{BufMut, BytesMut};

/// The largest payload one packet carries (16 MiB - 1).
pub const MAX_PAYLOAD: usize = 0xff_ffff;

/// Size of a packet header.
pub const HEADER_LEN: usize = 4;

/// A packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// Payload length of this packet (at most [`MAX_PAYLOAD`]).
    pub len: usize,
    /// Sequence id.
    pub seq: u8,
}

impl PacketHeader {
    /// Parses the first four bytes of `buf`, if present.
    #[inline]
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        Some(Self {
            len: usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16,
            seq: buf[3],
        })
    }

    /// The header's wire bytes.
    #[inline]
    pub fn to_bytes(self) -> [u8; 4] {
        debug_assert!(self.len <= MAX_PAYLOAD);
        let l = self.len as u32;
        [l as u8, (l >> 8) as u8, (l >> 16) as u8, self.seq]
    }

    /// Whether another packet continues this payload.
    #[inline]
    pub fn continues(self) -> bool {
        self.len == MAX_PAYLOAD
    }
}

/// Appends `payload` as one or more packets starting at sequence id `seq`.
/// Returns the sequence id after the last packet written.
pub fn write_packet(out: &mut BytesMut, mut seq: u8, payload: &[u8]) -> u8 {
    out.reserve(payload.len() + HEADER_LEN * (payload.len() / MAX_PAYLOAD + 1));
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_PAYLOAD);
        out.put_slice(&PacketHeader { len: n, seq }.to_bytes());
        out.put_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_PAYLOAD {
            return seq;
        }
    }
}

/// Why framing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A packet's sequence id was not the one expected.
    #[error("packet sequence id {got} out of order (expected {expected})")]
    OutOfOrder {
        /// The id the proxy expected.
        expected: u8,
        /// The id received.
        got: u8,
    },
    /// A logical payload exceeded the size allowed at this point.
    #[error("packet of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The payload length announced so far.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// Reassembles whole logical payloads (joined across 16 MiB continuations)
/// from a byte stream delivered in arbitrary chunks.
///
/// The proxy's hot path does not use this (it streams packets through
/// without joining them); this decoder serves handshakes, proxy-owned
/// exchanges, tests and the TiDB double.
#[derive(Debug, Default)]
pub struct PacketDecoder {
    buf: BytesMut,
    payload: BytesMut,
    first_seq: Option<u8>,
    next_seq: Option<u8>,
    limit: Option<usize>,
}

/// One logical payload and the sequence id of its first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Sequence id of the first packet.
    pub seq: u8,
    /// Sequence id of the last packet (differs for joined payloads).
    pub last_seq: u8,
    /// The joined payload.
    pub data: BytesMut,
}

impl PacketDecoder {
    /// A decoder that rejects logical payloads over `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: Some(limit),
            ..Self::default()
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Expects the next packet to carry sequence id `seq` (checked once;
    /// packets continuing a payload are always checked).
    pub fn expect_seq(&mut self, seq: u8) {
        self.next_seq = Some(seq);
    }

    /// Bytes received but not yet returned as a payload.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.payload.len()
    }

    /// Takes back unconsumed raw bytes (used when framing changes mid-stream).
    pub fn take_raw(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }

    /// The next complete payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<Payload>, FramingError> {
        loop {
            let Some(h) = PacketHeader::parse(&self.buf) else {
                return Ok(None);
            };
            if let Some(expected) = self.next_seq
                && expected != h.seq
            {
                return Err(FramingError::OutOfOrder {
                    expected,
                    got: h.seq,
                });
            }
            let total = self.payload.len() + h.len;
            if let Some(limit) = self.limit
                && total > limit
            {
                return Err(FramingError::TooLarge { len: total, limit });
            }
            if self.buf.len() < HEADER_LEN + h.len {
                return Ok(None);
            }
            let _ = self.buf.split_to(HEADER_LEN);
            let body = self.buf.split_to(h.len);
            if self.payload.is_empty() && self.first_seq.is_none() {
                self.first_seq = Some(h.seq);
                self.payload = body;
            } else {
                self.payload.extend_from_slice(&body);
            }
            self.next_seq = h.continues().then(|| h.seq.wrapping_add(1));
            if !h.continues() {
                let seq = self.first_seq.take().unwrap_or(h.seq);
                return Ok(Some(Payload {
                    seq,
                    last_seq: h.seq,
                    data: std::mem::take(&mut self.payload),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips() {
        let h = PacketHeader {
            len: 0x12_3456,
            seq: 7,
        };
        assert_eq!(PacketHeader::parse(&h.to_bytes()), Some(h));
        assert_eq!(PacketHeader::parse(&[1, 2, 3]), None);
    }

    #[test]
    fn exact_multiple_of_max_payload_ends_with_empty_packet() {
        let payload = vec![0x61; MAX_PAYLOAD];
        let mut out = BytesMut::new();
        let next = write_packet(&mut out, 3, &payload);
        assert_eq!(next, 5);
        assert_eq!(out.len(), MAX_PAYLOAD + 8);
        assert_eq!(&out[MAX_PAYLOAD + 4..], &[0, 0, 0, 4]);
        let mut d = PacketDecoder::default();
        d.extend(&out);
        let p = d.next_payload().unwrap().unwrap();
        assert_eq!((p.seq, p.last_seq, p.data.len()), (3, 4, MAX_PAYLOAD));
    }

    #[test]
    fn large_payload_splits_and_joins() {
        let payload: Vec<u8> = (0..MAX_PAYLOAD * 2 + 10).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        assert_eq!(write_packet(&mut out, 0, &payload), 3);
        let mut d = PacketDecoder::default();
        // Feed in odd-sized pieces.
        for chunk in out.chunks(1_000_003) {
            d.extend(chunk);
        }
        let p = d.next_payload().unwrap().unwrap();
        assert_eq!(&p.data[..], &payload[..]);
        assert!(d.next_payload().unwrap().is_none());
    }

    #[test]
    fn out_of_order_and_oversize_are_errors() {
        let mut out = BytesMut::new();
        write_packet(&mut out, 5, b"abc");
        let mut d = PacketDecoder::default();
        d.expect_seq(4);
        d.extend(&out);
        assert_eq!(
            d.next_payload(),
            Err(FramingError::OutOfOrder {
                expected: 4,
                got: 5
            })
        );
        // The limit applies as soon as the header announces the length.
        let mut d = PacketDecoder::with_limit(2);
        d.extend(&out[..4]);
        assert_eq!(
            d.next_payload(),
            Err(FramingError::TooLarge { len: 3, limit: 2 })
        );
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_payloads(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let mut wire = BytesMut::new();
            let mut seq = 0;
            for p in &payloads {
                seq = write_packet(&mut wire, seq, p);
            }
            let mut d = PacketDecoder::default();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - pos);
                d.extend(&wire[pos..pos + n]);
                pos += n;
                i += 1;
                while let Some(p) = d.next_payload().unwrap() {
                    got.push(p.data.to_vec());
                }
            }
            prop_assert_eq!(got, payloads);
        }
    }
}
