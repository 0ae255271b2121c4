//! The capture tap: with traffic capture on, the session keeps a copy of
//! each command's bytes and reports it with its outcome as
//! [`Event::Captured`] when the command finishes. Off (the default) it
//! costs one branch per command; on, one copy of the command's first packet.

use std::time::Duration;

use bytes::Bytes;

use super::{Event, Session};

/// COM_STMT_PREPARE: its OK response carries the new statement id.
const COM_STMT_PREPARE: u8 = 0x16;

/// The tap's state inside a session.
#[derive(Debug, Default)]
pub(super) struct Tap {
    on: bool,
    /// The running command's bytes (the command byte first).
    payload: Option<Bytes>,
    /// The statement id a COM_STMT_PREPARE's response named.
    stmt_id: u32,
}

impl<T: Clone> Session<T> {
    /// Turns the capture tap on or off; from the next command on, every
    /// finished command is also reported as [`Event::Captured`].
    pub fn set_capture(&mut self, on: bool) {
        self.tap.on = on;
        if !on {
            self.tap.payload = None;
        }
    }

    /// Whether the relay must hand the session a whole client packet: a
    /// new command while the tap is on. Commands of more than one packet
    /// (16 MiB and more) are not captured; the stash such a packet fills
    /// is bounded by the packet size.
    pub(super) fn tap_wants_whole(&self, len: usize) -> bool {
        self.tap.on && self.tracker.is_idle() && len < crate::packet::MAX_PAYLOAD
    }

    /// A command starts: keep its bytes if the tap is on. A command larger
    /// than one packet (16 MiB) is not whole: it is skipped.
    pub(super) fn tap_command(&mut self, payload: &[u8], whole: bool) {
        if self.tap.on {
            self.tap.stmt_id = 0;
            self.tap.payload = whole.then(|| Bytes::copy_from_slice(payload));
        }
    }

    /// A response packet arrives before the command finished: a
    /// COM_STMT_PREPARE's first one names the statement.
    pub(super) fn tap_response(&mut self, prefix: &[u8]) {
        if let Some(p) = &self.tap.payload
            && p.first() == Some(&COM_STMT_PREPARE)
            && self.tap.stmt_id == 0
            && prefix.first() == Some(&0)
            && prefix.len() >= 5
        {
            self.tap.stmt_id = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        }
    }

    /// The command finished: report it.
    pub(super) fn tap_done(&mut self, ok: bool, elapsed: Duration) {
        if let Some(payload) = self.tap.payload.take() {
            self.events.push_back(Event::Captured {
                payload,
                ok,
                elapsed,
                stmt_id: self.tap.stmt_id,
            });
        }
    }

    /// COM_QUIT: the session ends without a response.
    pub(super) fn tap_quit(&mut self) {
        if self.tap.on {
            self.events.push_back(Event::Captured {
                payload: Bytes::from_static(&[0x01]),
                ok: true,
                elapsed: Duration::ZERO,
                stmt_id: 0,
            });
        }
    }
}
