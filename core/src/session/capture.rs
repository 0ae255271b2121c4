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
//!
//! # Where a session's capture begins
//!
//! Replay recreates each session from its first captured command, so the
//! capture first says what the session was at that point
//! ([`Event::CaptureStart`], right before its first [`Event::Captured`] and
//! with the same timing, so the records stay in time order):
//! - a session whose login ends after the tap was turned on begins with its
//!   first command, from its login (the driver records its database);
//! - a session that already ran begins at its first command at a safe
//!   point (no transaction, cursor or long data: a replay cannot start in
//!   the middle of a transaction; its commands until then are left out, as
//!   TiProxy leaves them out). The command waits while the proxy asks the
//!   backend for the session's state (`SHOW SESSION_STATES`, as for a
//!   move); TiDB's answer rides in the event, and the capture records it as
//!   `SET SESSION_STATES '...'` (TiProxy's `initForCapture`,
//!   `pkg/proxy/backend/backend_conn_mgr.go`). A backend that cannot export
//!   (MariaDB, MySQL: 1064; TiDB without a signing cert) or refuses (8146)
//!   gives `None`: the driver records what the proxy tracks (database,
//!   autocommit). A backend known not to export is not asked again. A
//!   session that quits before its capture began leaves nothing.

use std::time::Duration;

use bytes::Bytes;

use super::migration::Migration;
use super::{Event, Phase, Session};
use crate::digest::DigestBuilder;

/// COM_STMT_PREPARE: its OK response carries the new statement id.
const COM_STMT_PREPARE: u8 = 0x16;

/// The tap's state inside a session: one pointer, `None` while capture is
/// off (every session holds one; most never capture).
#[derive(Debug, Default)]
pub(super) struct Tap {
    cur: Option<Box<TapCmd>>,
}

/// Where a session's capture stands (see the module documentation).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Start {
    /// Begun: every command is captured.
    #[default]
    Begun,
    /// Begun with the running command, from this exported state: reported
    /// ([`Event::CaptureStart`]) with the command, which gives it its time.
    Begins(Option<Bytes>),
    /// Turned on before the login ended: begins at the first command.
    New,
    /// Turned on for a session that already ran: begins at its first
    /// command at a safe point, from its exported state.
    Existing,
}

/// What the tap makes of a command that starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TapBegin {
    /// Capture it (if it is whole).
    Capture,
    /// Leave it out: the session's capture has not begun.
    Skip,
    /// Hold it: the session's state is exported first.
    Hold,
}

/// The running command, while capture is on.
#[derive(Debug, Default)]
struct TapCmd {
    /// Where the session's capture stands.
    start: Start,
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
        let start = if self.phase == Phase::Command {
            Start::Existing
        } else {
            Start::New
        };
        let c = self.tap.cur.get_or_insert_with(|| {
            Box::new(TapCmd {
                start,
                ..TapCmd::default()
            })
        });
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

    /// A command starts (`whole`: its bytes are all here; `quit`: it is
    /// COM_QUIT): whether the tap captures it, leaves it out, or holds it
    /// while the session's state is exported ([`Self::tap_hold`]).
    pub(super) fn tap_begin(&mut self, whole: bool, quit: bool) -> TapBegin {
        let Some(c) = &mut self.tap.cur else {
            return TapBegin::Capture;
        };
        match c.start {
            Start::Begun | Start::Begins(_) => return TapBegin::Capture,
            Start::New => {}
            Start::Existing => {
                if quit || !self.tracker.at_safe_point() {
                    return TapBegin::Skip;
                }
                if whole
                    && !self.protect.cannot_export
                    && matches!(self.migration, Migration::None | Migration::Pending { .. })
                {
                    return TapBegin::Hold;
                }
            }
        }
        self.tap_started(None);
        TapBegin::Capture
    }

    /// Holds the command `payload` (a whole packet, sequence 0) and asks the
    /// backend for the session's state; the command runs once the answer
    /// is in ([`Self::tap_started`]).
    pub(super) fn tap_hold(&mut self, now: std::time::Instant, payload: &[u8]) {
        self.relay.hold_in_front(payload);
        self.start_refresh(now, true);
    }

    /// The session's capture begins, from `states` (TiDB's exported state)
    /// or from what the proxy tracks.
    pub(super) fn tap_started(&mut self, states: Option<Bytes>) {
        if let Some(c) = &mut self.tap.cur {
            c.start = Start::Begins(states);
        }
    }

    /// Reports where the session's capture began, with the command it
    /// began with (which took `elapsed`).
    fn tap_report_start(&mut self, elapsed: Duration) {
        if let Some(c) = &mut self.tap.cur
            && let Start::Begins(states) = &mut c.start
        {
            let states = states.take();
            c.start = Start::Begun;
            self.events
                .push_back(Event::CaptureStart { states, elapsed });
        }
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
        self.tap_report_start(elapsed);
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
        if self
            .tap
            .cur
            .as_ref()
            .is_some_and(|c| c.start == Start::Begun)
        {
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
