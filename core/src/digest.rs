//! Result digests for traffic replay's `--compare`: a fixed-size summary of
//! what one command got back (its rows, affected rows and error code),
//! computed as the response streams past, without holding any row.
//!
//! The capture computes it in the session's relay, replay from the target's
//! answer, both with [`DigestBuilder`], so the two agree byte for byte when
//! the results do. Rows are hashed twice: summed (the same rows in any
//! order give the same value, for statements without `ORDER BY`) and
//! chained (order counts). Column definitions, warnings, status flags and
//! last insert ids are left out: they describe the server, not the result.

use crate::packet::MAX_PAYLOAD;
use crate::response::{ERR_HEADER, OK_HEADER, is_progress_report, is_row_terminator};
use crate::tracker::{CommandTracker, State};
use crate::wire::Reader;

/// What one command got back, in 34 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResultDigest {
    /// Rows returned (all result sets).
    pub rows: u64,
    /// Sum of the rows' hashes: independent of their order.
    pub unordered: u64,
    /// The rows' hashes chained in order.
    pub ordered: u64,
    /// Affected rows, summed over the OK packets of the response.
    pub affected: u64,
    /// The error code of an ERR answer, or 0.
    pub error: u16,
}

impl ResultDigest {
    /// Whether `other` is the same outcome; `ordered` when the statement
    /// fixes the order of its rows (it has `ORDER BY`).
    pub fn same_as(&self, other: &ResultDigest, ordered: bool) -> bool {
        self.rows == other.rows
            && self.affected == other.affected
            && self.error == other.error
            && self.unordered == other.unordered
            && (!ordered || self.ordered == other.ordered)
    }

    /// The text form kept in a capture: `rows affected error unordered
    /// ordered`, the hashes in hex.
    pub fn to_text(&self) -> String {
        format!(
            "{} {} {} {:016x} {:016x}",
            self.rows, self.affected, self.error, self.unordered, self.ordered
        )
    }

    /// Reads [`Self::to_text`]'s form.
    pub fn from_text(s: &str) -> Option<Self> {
        let mut it = s.split(' ');
        let d = ResultDigest {
            rows: it.next()?.parse().ok()?,
            affected: it.next()?.parse().ok()?,
            error: it.next()?.parse().ok()?,
            unordered: u64::from_str_radix(it.next()?, 16).ok()?,
            ordered: u64::from_str_radix(it.next()?, 16).ok()?,
        };
        it.next().is_none().then_some(d)
    }

    /// A short description for reports: `2 rows, 0 affected` or
    /// `ERROR 1146`.
    pub fn describe(&self) -> String {
        if self.error != 0 {
            format!("ERROR {}", self.error)
        } else {
            format!("{} rows, {} affected", self.rows, self.affected)
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// splitmix64's finaliser: spreads a row's hash over all bits so that sums
/// of hashes do not collide by carries.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds a [`ResultDigest`] from a response seen packet by packet: call
/// [`Self::packet`] with each packet's length and the bytes known of it
/// *before* the tracker sees it, then [`Self::feed`] with its payload bytes
/// (all at once or in pieces).
#[derive(Debug, Default, Clone)]
pub struct DigestBuilder {
    d: ResultDigest,
    /// FNV-1a state of the row being read.
    row: u64,
    /// Payload bytes of the current row packet still to hash.
    left: usize,
    /// The current row packet is 16 MiB - 1 long: the row goes on in the
    /// next packet.
    continues: bool,
}

impl DigestBuilder {
    /// A response packet of `len` payload bytes starts; `prefix` holds its
    /// first bytes (all of them for OK and ERR packets) and `tracker` is in
    /// the state before the packet.
    pub fn packet(&mut self, tracker: &CommandTracker, len: usize, prefix: &[u8]) {
        if self.continues {
            self.start_row(len, false);
            return;
        }
        let Some(&first) = prefix.first() else {
            return;
        };
        let rows = matches!(tracker.state(), State::Rows | State::FetchRows);
        if first == ERR_HEADER {
            if !is_progress_report(prefix) && prefix.len() >= 3 {
                self.d.error = u16::from_le_bytes([prefix[1], prefix[2]]);
            }
        } else if rows {
            if !is_row_terminator(first, len, tracker.options().deprecate_eof) {
                self.start_row(len, true);
            }
        } else if first == OK_HEADER && matches!(tracker.state(), State::Result { .. }) {
            let mut r = Reader::new(prefix);
            let _ = r.u8("ok header");
            if let Ok(n) = r.lenenc_int("affected rows") {
                self.d.affected = self.d.affected.wrapping_add(n);
            }
        }
    }

    fn start_row(&mut self, len: usize, fresh: bool) {
        if fresh {
            self.row = FNV_OFFSET;
        }
        self.continues = len == MAX_PAYLOAD;
        self.left = len;
        if len == 0 {
            self.end_packet();
        }
    }

    /// Whether payload bytes of a row are awaited.
    #[inline]
    pub fn in_row(&self) -> bool {
        self.left > 0
    }

    /// Hashes the next payload bytes of the current row packet (bytes past
    /// its end are ignored).
    pub fn feed(&mut self, bytes: &[u8]) {
        let n = self.left.min(bytes.len());
        if n == 0 {
            return;
        }
        let mut h = self.row;
        for &b in &bytes[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.row = h;
        self.left -= n;
        if self.left == 0 {
            self.end_packet();
        }
    }

    fn end_packet(&mut self) {
        if self.continues {
            return;
        }
        let h = mix(self.row);
        let d = &mut self.d;
        d.rows += 1;
        d.unordered = d.unordered.wrapping_add(h);
        d.ordered = mix(d.ordered ^ h.rotate_left(17)).wrapping_add(d.rows);
    }

    /// The digest of what was seen; the builder starts over.
    pub fn finish(&mut self) -> ResultDigest {
        std::mem::take(self).d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StatusFlags;

    /// Feeds a text-protocol result set of `rows` (one column each) to a
    /// builder as a relay would, whole packets or split in two.
    fn digest_of(rows: &[&[u8]], split: bool) -> ResultDigest {
        let mut t = CommandTracker::new(true, StatusFlags::empty());
        let mut b = DigestBuilder::default();
        let mut packets: Vec<Vec<u8>> = vec![vec![1]];
        packets.push(
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x21\x00\x0b\x00\x00\x00\xfd\x00\x00\x00\x00\x00"
                .to_vec(),
        );
        for r in rows {
            let mut p = vec![r.len() as u8];
            p.extend_from_slice(r);
            packets.push(p);
        }
        packets.push(vec![0xfe, 0, 0, 2, 0, 0, 0]);
        let _ = t.on_client_packet(9, b"\x03select 1");
        for p in packets {
            let prefix = if t.backend_needs_whole(p.len(), p[0]) {
                &p[..]
            } else {
                &p[..1]
            };
            b.packet(&t, p.len(), prefix);
            if split && p.len() > 1 {
                b.feed(&p[..1]);
                b.feed(&p[1..]);
            } else {
                b.feed(&p);
            }
            t.on_backend_packet(p.len(), prefix)
                .expect("valid response");
        }
        b.finish()
    }

    #[test]
    fn rows_in_another_order_differ_only_in_order() {
        let a = digest_of(&[b"1", b"2", b"3"], false);
        let b = digest_of(&[b"3", b"1", b"2"], true);
        assert_eq!(a.rows, 3);
        assert!(a.same_as(&b, false));
        assert!(!a.same_as(&b, true));
        assert_eq!(a, digest_of(&[b"1", b"2", b"3"], true));
    }

    #[test]
    fn a_changed_row_differs() {
        let a = digest_of(&[b"1", b"2", b"3"], false);
        let b = digest_of(&[b"1", b"5", b"3"], false);
        assert!(!a.same_as(&b, false));
        assert_eq!(ResultDigest::from_text(&a.to_text()), Some(a));
    }

    #[test]
    fn ok_and_err_are_summarised() {
        let mut t = CommandTracker::new(true, StatusFlags::empty());
        let mut b = DigestBuilder::default();
        let _ = t.on_client_packet(9, b"\x03update t");
        let ok = [0u8, 5, 0, 2, 0, 0, 0];
        b.packet(&t, ok.len(), &ok);
        t.on_backend_packet(ok.len(), &ok).expect("ok");
        assert_eq!(b.finish().affected, 5);
        let _ = t.on_client_packet(9, b"\x03select x");
        let err = b"\xff\x7a\x04#42S02no such table";
        b.packet(&t, err.len(), err);
        assert_eq!(b.finish().error, 1146);
    }
}
