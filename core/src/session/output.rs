//! What a session hands its driver: actions to carry out (connects, TLS
//! upgrades, closes, the swap of backends) and events to report (for the
//! router, metrics and logs). `T` is the driver's handle for a move target.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::migration::MigrationFailure;
use super::protect::Unprotected;
use super::{Leg, Phase, Session};
use crate::command::Command;
use crate::error::SessionError;
use crate::flags::{CapabilityFlags, MariaDbCapabilities};

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<T = String> {
    /// Connect the session's first backend (the driver's router picks it),
    /// then call [`Session::handle_connected`](super::Session::handle_connected) or
    /// [`Session::handle_connect_failed`](super::Session::handle_connect_failed) with [`Leg::Backend`].
    ConnectBackend,
    /// Connect the backend the session moves to, then report on
    /// [`Leg::NewBackend`].
    ConnectNewBackend {
        /// The backend chosen by [`Session::handle_redirect`](super::Session::handle_redirect).
        target: T,
    },
    /// Upgrade a leg to TLS (server side on the client leg, client side on
    /// backend legs): first write what [`Session::transmit`](super::Session::transmit) holds for the
    /// leg (the SSL request), then run the TLS handshake using `early_data`
    /// as the first bytes read, then call [`Session::handle_tls_established`](super::Session::handle_tls_established).
    StartTls {
        /// The leg to upgrade.
        leg: Leg,
        /// Bytes already read that belong to the TLS stream.
        early_data: Bytes,
    },
    /// Write what is pending on this leg, then close it.
    CloseLeg(Leg),
    /// The new backend becomes the backend. Write `farewell` to the old
    /// backend's socket (best effort) and close it.
    SwapBackends {
        /// Last bytes for the old backend (COM_QUIT).
        farewell: Bytes,
    },
    /// Write what is pending to the client, then close every leg.
    Close,
    /// The backend died under a protected session: pick another backend
    /// (not the lost one) and call
    /// [`Session::handle_restore_target`](super::Session::handle_restore_target).
    PickRestoreTarget {
        /// How the backend was lost (for logs).
        reason: String,
        /// How many targets this restore already failed on. The driver
        /// does not pick them again (nor the lost backend): 0 starts a
        /// new list.
        failed: u8,
        /// A move's target that failed after the move lost its old
        /// backend: the restore that takes over starts a new list without
        /// it.
        exclude: Option<T>,
    },
}

/// How crash protection ended for a session whose backend was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The session continues on another backend.
    Restored,
    /// A restore was tried and failed; the session closed.
    Failed(String),
    /// The session could not be saved; it closed as the server closed it.
    Unprotected(Unprotected),
}

impl RestoreOutcome {
    /// The `result` label of `tiproxy_session_restore_total`.
    pub fn label(&self) -> &'static str {
        match self {
            RestoreOutcome::Restored => "ok",
            RestoreOutcome::Failed(_) => "failed",
            RestoreOutcome::Unprotected(u) => u.label(),
        }
    }
}

/// Something the router, metrics or logs may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<T = String> {
    /// The client authenticated through the backend.
    Authenticated {
        /// User name.
        user: Bytes,
    },
    /// A backend greeted the proxy: what it is and what it supports. The
    /// driver uses it to greet later clients like its backends would.
    BackendGreeting {
        /// Server version string.
        server_version: Bytes,
        /// Capabilities.
        capabilities: CapabilityFlags,
        /// MariaDB extended capabilities (empty unless `CLIENT_MYSQL` is
        /// clear in `capabilities`).
        mariadb_capabilities: MariaDbCapabilities,
        /// Default collation.
        charset: u8,
    },
    /// A command finished.
    CommandDone {
        /// The command.
        command: Command,
        /// False when the backend answered with ERR.
        ok: bool,
        /// Time from the command's first byte to its last response byte.
        elapsed: Duration,
    },
    /// With the capture tap on ([`Session::set_capture`]): a finished
    /// command's bytes, for traffic capture.
    Captured {
        /// The command's payload, the command byte first.
        payload: Bytes,
        /// False when the backend answered with ERR.
        ok: bool,
        /// Time from the command's first byte to its last response byte.
        elapsed: Duration,
        /// For COM_STMT_PREPARE, the statement id the backend assigned.
        stmt_id: u32,
        /// With result comparison on: what the command got back.
        digest: Option<Box<crate::digest::ResultDigest>>,
    },
    /// With the capture tap on: the session's capture begins (before its
    /// first [`Event::Captured`]); `states` is the state the backend
    /// exported (TiDB's `SHOW SESSION_STATES` JSON) when the session
    /// already ran before the capture and the backend could export it.
    /// `None`: start from what the proxy tracks (database, status flags).
    CaptureStart {
        /// The exported state.
        states: Option<Bytes>,
        /// How long the first command took, as in its [`Event::Captured`].
        elapsed: Duration,
    },
    /// A session that was waiting to move or close reached a safe point.
    SafePoint,
    /// The session began to move.
    MigrationStarted {
        /// Where to.
        target: T,
    },
    /// The session now runs on `target`.
    Migrated {
        /// The new backend.
        target: T,
    },
    /// A move failed; the session stays where it was (unless it is closed
    /// with [`Event::Closed`]).
    MigrationFailed {
        /// Where it tried to go.
        target: T,
        /// Why.
        reason: MigrationFailure,
    },
    /// The backend was lost under an established session with crash
    /// protection on: restored, or why not.
    Restore {
        /// What happened.
        outcome: RestoreOutcome,
    },
    /// The backend refused to export the session for crash protection.
    Unexportable {
        /// Why.
        reason: MigrationFailure,
        /// It never will (not TiDB, no signing cert).
        permanent: bool,
    },
    /// The session ended.
    Closed {
        /// Why.
        reason: SessionError,
    },
}

/// The outputs: drain them after every input, in this order: actions,
/// events, bytes to write per leg, then the one timer to arm.
impl<T: Clone> Session<T> {
    /// The next action for the driver.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action<T>> {
        let a = self.actions.pop_front();
        if a.is_none() && self.actions.capacity() > 0 && self.phase == Phase::Command {
            // Established sessions rarely act: give the memory back.
            self.actions = VecDeque::new();
        }
        a
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if self.events.capacity() > 0 && self.phase == Phase::Command {
            // Established sessions rarely have events besides finished
            // commands (which use a slot): give the memory back.
            self.events = VecDeque::new();
        }
        self.command_done.take()
    }

    /// When [`Session::handle_timeout`] must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.handshake_deadline,
            self.migration.deadline(),
            self.protect_wake(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Bytes to write to `leg`.
    #[must_use]
    pub fn transmit(&self, leg: Leg) -> &[u8] {
        self.relay.legs[leg.idx()].out.pending()
    }

    /// Marks `n` bytes of [`Session::transmit`] as written.
    pub fn advance_transmit(&mut self, leg: Leg, n: usize) {
        self.relay.legs[leg.idx()].out.advance(n);
        // The last byte of an exchange is out and no command runs: the
        // session goes idle, and idle sessions keep no buffer space.
        if self.relay.legs[leg.idx()].out.len() == 0
            && self.client_starts_command()
            && !self.migration.active()
            && self.relay.all_written()
        {
            self.relay.release_idle();
        }
    }

    /// Bytes held in the session's buffers (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.relay.buffered()
    }
}
