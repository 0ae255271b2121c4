//! MySQL wire primitives: fixed-width little-endian integers, length-encoded
//! integers and strings, NUL-terminated strings. Reading never panics: every
//! short or malformed input is a [`WireError`].

use bytes::BufMut;

/// Why a packet payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The payload ended before a field was complete.
    #[error("packet truncated while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A NUL-terminated string had no terminator.
    #[error("string field {field} is not NUL-terminated")]
    Unterminated {
        /// The field being read.
        field: &'static str,
    },
    /// A length-encoded integer used a reserved first byte (0xFB null or 0xFF).
    #[error("invalid length-encoded integer prefix 0x{prefix:02x} in {field}")]
    BadLenEnc {
        /// The offending first byte.
        prefix: u8,
        /// The field being read.
        field: &'static str,
    },
    /// A field had a value the protocol does not allow.
    #[error("invalid value in {field}: {detail}")]
    Invalid {
        /// The field being read.
        field: &'static str,
        /// What was wrong.
        detail: &'static str,
    },
}

/// Why a sub-machine's state (tracker, compressed framing) could not be
/// exported, or an exported byte string could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Export was asked for in the middle of an exchange: only an idle
    /// state is complete without the bytes in flight.
    #[error("cannot export the {machine} state: {why}")]
    Busy {
        /// Which sub-machine.
        machine: &'static str,
        /// What is in progress.
        why: &'static str,
    },
    /// The byte string was written by another format version.
    #[error("{machine} state version {got} is not supported (expected {expected})")]
    Version {
        /// Which sub-machine.
        machine: &'static str,
        /// Version found.
        got: u8,
        /// Version this build reads.
        expected: u8,
    },
    /// The byte string is truncated or a field does not decode.
    #[error("{machine} state is malformed: {source}")]
    Malformed {
        /// Which sub-machine.
        machine: &'static str,
        /// The decoding error.
        source: WireError,
    },
}

/// A cursor over a packet payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// True when everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next byte without consuming it.
    pub fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Reads one byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    /// Reads a little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Reads a little-endian u24.
    pub fn u24(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(3, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a length-encoded integer.
    pub fn lenenc_int(&mut self, field: &'static str) -> Result<u64, WireError> {
        let first = self.u8(field)?;
        match first {
            0..=0xfa => Ok(u64::from(first)),
            0xfc => Ok(u64::from(self.u16(field)?)),
            0xfd => Ok(u64::from(self.u24(field)?)),
            0xfe => {
                let b = self.take(8, field)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(u64::from_le_bytes(a))
            }
            prefix => Err(WireError::BadLenEnc { prefix, field }),
        }
    }

    /// Reads a length-encoded string.
    pub fn lenenc_bytes(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.lenenc_int(field)?;
        let len = usize::try_from(len).map_err(|_| WireError::Truncated { field })?;
        self.take(len, field)
    }

    /// Reads a length-encoded string that may be SQL NULL (0xFB).
    pub fn lenenc_nullable(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, WireError> {
        if self.peek() == Some(0xfb) {
            self.buf = &self.buf[1..];
            return Ok(None);
        }
        self.lenenc_bytes(field).map(Some)
    }

    /// Reads a NUL-terminated string (the NUL is consumed, not returned).
    pub fn nul_bytes(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let Some(pos) = self.buf.iter().position(|&b| b == 0) else {
            return Err(WireError::Unterminated { field });
        };
        let s = &self.buf[..pos];
        self.buf = &self.buf[pos + 1..];
        Ok(s)
    }

    /// Reads a NUL-terminated string, or the rest of the payload if the NUL is
    /// missing (servers omit the final NUL of some trailing fields).
    pub fn nul_or_rest(&mut self) -> &'a [u8] {
        match self.buf.iter().position(|&b| b == 0) {
            Some(pos) => {
                let s = &self.buf[..pos];
                self.buf = &self.buf[pos + 1..];
                s
            }
            None => self.rest(),
        }
    }
}

/// Length of the length-encoded form of `v`.
pub fn lenenc_int_len(v: u64) -> usize {
    match v {
        0..=0xfa => 1,
        0xfb..=0xffff => 3,
        0x1_0000..=0xff_ffff => 4,
        _ => 9,
    }
}

/// Writes a length-encoded integer.
pub fn put_lenenc_int(out: &mut impl BufMut, v: u64) {
    match v {
        0..=0xfa => out.put_u8(v as u8),
        0xfb..=0xffff => {
            out.put_u8(0xfc);
            out.put_u16_le(v as u16);
        }
        0x1_0000..=0xff_ffff => {
            out.put_u8(0xfd);
            out.put_uint_le(v, 3);
        }
        _ => {
            out.put_u8(0xfe);
            out.put_u64_le(v);
        }
    }
}

/// Writes a length-encoded string.
pub fn put_lenenc_bytes(out: &mut impl BufMut, s: &[u8]) {
    put_lenenc_int(out, s.len() as u64);
    out.put_slice(s);
}

/// Writes a NUL-terminated string.
pub fn put_nul_bytes(out: &mut impl BufMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lenenc_int_round_trips(v in any::<u64>()) {
            let mut out = Vec::new();
            put_lenenc_int(&mut out, v);
            prop_assert_eq!(out.len(), lenenc_int_len(v));
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.lenenc_int("v").unwrap(), v);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            let _ = r.lenenc_bytes("a");
            let _ = r.nul_bytes("b");
            let _ = r.lenenc_nullable("c");
            let _ = r.u32("d");
        }
    }

    #[test]
    fn reserved_lenenc_prefix_is_an_error() {
        assert_eq!(
            Reader::new(&[0xff]).lenenc_int("x"),
            Err(WireError::BadLenEnc {
                prefix: 0xff,
                field: "x"
            })
        );
        assert_eq!(
            Reader::new(&[0xfd, 1]).lenenc_int("x"),
            Err(WireError::Truncated { field: "x" })
        );
    }
}
