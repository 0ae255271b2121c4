//! The capture tap: with traffic capture on, the session keeps a copy of
//! each command's bytes and reports it with its outcome as
//! [`Event::Captured`] when the command finishes. Off (the default) it
//! costs one branch per command; on, one copy of the command's first packet.
//!
//! With result comparison on as well, the tap digests each response as the
//! relay forwards it ([`DigestBuilder`]: a few words, no row is held) and
//! hands the digest over with the command. The relay asks
//! [`Session::tap_in_row`] per forwarded backend packet: one branch when
//! comparison is off.

use std::time::Duration;

use bytes::Bytes;

use super::{Event, Session};
use crate::digest::DigestBuilder;

/// COM_STMT_PREPARE: its OK response carries the new statement id.
const COM_STMT_PREPARE: u8 = 0x16;

/// The tap's state inside a session: one pointer, `None` while capture is
/// off (every session holds one; most never capture).
#[derive(Debug, Default)]
pub(super) struct Tap {
    cur: Option<Box<TapCmd>>,
}

/// The running command, while capture is on.
#[derive(Debug, Default)]
struct TapCmd {
    /// Its bytes (the command byte first).
    payload: Option<Bytes>,
    /// The statement id a COM_STMT_PREPARE's response named.
    stmt_id: u32,
    /// With result comparison on: its result's digest so far.
    digest: Option<DigestBuilder>,
}

impl<T: Clone> Session<T> {
    /// Turns the capture tap on or off; from the next command on, every
    /// finished command is also reported as [`Event::Captured`].
    pub fn set_capture(&mut self, on: bool) {
        self.set_capture_compare(on, false);
    }

    /// [`Self::set_capture`], and with `compare` each captured command also
    /// carries a digest of its result.
    pub fn set_capture_compare(&mut self, on: bool, compare: bool) {
        if !on {
            self.tap.cur = None;
            return;
        }
        let c = self.tap.cur.get_or_insert_with(Box::default);
        if compare != c.digest.is_some() {
            c.digest = compare.then(DigestBuilder::default);
        }
    }

    /// Whether the relay must hand the session a whole client packet: a
    /// new command while the tap is on. Commands of more than one packet
    /// (16 MiB and more) are not captured; the stash such a packet fills
    /// is bounded by the packet size.
    pub(super) fn tap_wants_whole(&self, len: usize) -> bool {
        self.tap.cur.is_some() && self.tracker.is_idle() && len < crate::packet::MAX_PAYLOAD
    }

    /// A command starts: keep its bytes if the tap is on. A command larger
    /// than one packet (16 MiB) is not whole: it is skipped.
    pub(super) fn tap_command(&mut self, payload: &[u8], whole: bool) {
        if let Some(c) = &mut self.tap.cur {
            c.stmt_id = 0;
            c.payload = whole.then(|| Bytes::copy_from_slice(payload));
            if let Some(d) = &mut c.digest {
                d.finish();
            }
        }
    }

    /// A response packet of `len` bytes arrives (`prefix` holds the bytes
    /// asked for; the tracker has not seen it yet): a COM_STMT_PREPARE's
    /// first one names the statement; the digest notes what it is.
    pub(super) fn tap_response(&mut self, len: usize, prefix: &[u8]) {
        let Some(c) = &mut self.tap.cur else {
            return;
        };
        let Some(p) = &c.payload else {
            return;
        };
        if let Some(d) = &mut c.digest {
            d.packet(&self.tracker, len, prefix);
        }
        if p.first() == Some(&COM_STMT_PREPARE)
            && c.stmt_id == 0
            && prefix.first() == Some(&0)
            && prefix.len() >= 5
        {
            c.stmt_id = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        }
    }

    /// Whether the bytes the relay forwards from the backend now belong to
    /// a row being digested.
    #[inline]
    pub(super) fn tap_in_row(&self) -> bool {
        self.tap
            .cur
            .as_ref()
            .is_some_and(|c| c.digest.as_ref().is_some_and(DigestBuilder::in_row))
    }

    /// Payload bytes of the row being digested (the relay calls this only
    /// when [`Self::tap_in_row`]).
    pub(super) fn tap_feed(&mut self, bytes: &[u8]) {
        if let Some(d) = self.tap.cur.as_mut().and_then(|c| c.digest.as_mut()) {
            d.feed(bytes);
        }
    }

    /// The command finished: report it.
    pub(super) fn tap_done(&mut self, ok: bool, elapsed: Duration) {
        let Some(c) = &mut self.tap.cur else {
            return;
        };
        if let Some(payload) = c.payload.take() {
            let digest = c.digest.as_mut().map(|d| Box::new(d.finish()));
            self.events.push_back(Event::Captured {
                payload,
                ok,
                elapsed,
                stmt_id: c.stmt_id,
                digest,
            });
        }
    }

    /// COM_QUIT: the session ends without a response.
    pub(super) fn tap_quit(&mut self) {
        if self.tap.cur.is_some() {
            self.events.push_back(Event::Captured {
                payload: Bytes::from_static(&[0x01]),
                ok: true,
                elapsed: Duration::ZERO,
                stmt_id: 0,
                digest: None,
            });
        }
    }
}
