//! The move sequence: a session waits for a safe point, exports its state
//! from the old backend (`SHOW SESSION_STATES`), authenticates on the new
//! backend with the session token (the shared backend handshake in
//! `backend`), imports the state (`SET SESSION_STATES`) and swaps the legs.
//! Every stage owns the data it needs; the target is the driver's opaque
//! handle `T`. The SESSION_STATES data transformations live in `states`.

use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::backend::Expect;
use super::output::RestoreOutcome;
use super::{Action, Event, Leg, Phase, Session};
use crate::command::Command;
use crate::error::{ProxyError, SessionError, UnexpectedPacket};
use crate::flags::{CapabilityFlags, StatusFlags};
use crate::packet::write_packet;
use crate::response::{ERR_HEADER, ErrPacket, OK_HEADER, OkPacket};

#[cfg(feature = "sim-mutations")]
pub use super::states::forget_first_user_variable;
pub use super::states::{
    ExportedSession, MigrationFailure, SHOW_SESSION_STATES, StatesProgress, StatesReader,
    set_session_states_query,
};

/// The stage of a move.
#[derive(Debug)]
pub(super) enum Migration<T> {
    /// No move asked for.
    None,
    /// Requested; waiting for a safe point.
    Pending {
        /// Where to.
        target: T,
    },
    /// Under way: client input waits.
    Running(Move<T>),
    /// Crash protection's export ([`super::protect`]): SHOW SESSION_STATES
    /// sent while the session is idle; client input waits. A move asked
    /// for meanwhile starts after it (`then`).
    /// Traffic capture's start of a session that existed before the
    /// capture (`capture`, [`super::capture`]) uses the same exchange.
    Refresh {
        reader: StatesReader,
        deadline: Instant,
        then: Option<T>,
        capture: bool,
    },
    /// The backend died under a protected session: the driver is asked for
    /// another backend ([`Action::PickRestoreTarget`]); client input waits.
    AwaitTarget {
        states: Bytes,
        token: Bytes,
        deadline: Instant,
        /// Targets a restore already failed on (a dial that failed, a
        /// TiDB that refused the token while shutting down).
        failed: u8,
    },
}

/// Backends a restore tries before the session closes: the first pick and
/// two more when a dial or handshake fails.
pub const RESTORE_TARGETS: usize = 3;

/// A move under way.
#[derive(Debug)]
pub(super) struct Move<T> {
    target: T,
    /// The move fails (or, still on the old backend, the session closes)
    /// at this instant.
    deadline: Instant,
    stage: Stage,
    /// A restore after the old backend died, not a move.
    restore: bool,
    /// For a restore: how many targets it failed on before this one.
    failed: u8,
}

#[derive(Debug)]
enum Stage {
    /// The client sent BEGIN inside a transaction while a move was pending:
    /// its implicit commit was sent as a COMMIT of the proxy's own; the
    /// BEGIN (`begin_len` bytes at the front of the held bytes) runs after
    /// the move.
    HiddenCommit { begin_len: usize },
    /// SHOW SESSION_STATES sent to the old backend.
    Export { reader: StatesReader },
    /// The new backend's handshake, authenticating with `token`.
    Handshake {
        expect: Expect,
        states: Bytes,
        token: Bytes,
        /// The old backend was lost; the move finishes without it.
        old_lost: bool,
    },
    /// SET SESSION_STATES sent; expecting OK. The state and token stay
    /// until then: if the old backend is lost and this target fails, the
    /// session is restored with them on another one.
    Import {
        states: Bytes,
        token: Bytes,
        old_lost: bool,
    },
}

impl<T> Migration<T> {
    /// A restore onto `target` with a state copy: the target's handshake
    /// first, the old backend already gone.
    pub(super) fn restore(
        target: T,
        deadline: Instant,
        states: Bytes,
        token: Bytes,
        failed: u8,
    ) -> Self {
        Migration::Running(Move {
            target,
            deadline,
            stage: Stage::Handshake {
                expect: Expect::Connect,
                states,
                token,
                old_lost: true,
            },
            restore: true,
            failed,
        })
    }

    /// The target of a pending or running move.
    pub(super) fn target(&self) -> Option<&T> {
        match self {
            Migration::None | Migration::AwaitTarget { .. } => None,
            Migration::Pending { target } | Migration::Running(Move { target, .. }) => Some(target),
            Migration::Refresh { then, .. } => then.as_ref(),
        }
    }

    /// A move is under way (client input waits).
    pub(super) fn active(&self) -> bool {
        matches!(
            self,
            Migration::Running(_) | Migration::Refresh { .. } | Migration::AwaitTarget { .. }
        )
    }

    /// When the running move times out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Migration::Running(m) => Some(m.deadline),
            Migration::Refresh { deadline, .. } | Migration::AwaitTarget { deadline, .. } => {
                Some(*deadline)
            }
            _ => None,
        }
    }

    /// The move is talking to the old backend (its replies belong to the
    /// proxy, whole packets).
    pub(super) fn on_old_backend(&self) -> bool {
        matches!(
            self,
            Migration::Running(Move {
                stage: Stage::HiddenCommit { .. } | Stage::Export { .. },
                ..
            }) | Migration::Refresh { .. }
        )
    }

    /// Whether the proxy's own COMMIT (before a held BEGIN) is in flight.
    pub(super) fn hidden_commit(&self) -> bool {
        matches!(
            self,
            Migration::Running(Move {
                stage: Stage::HiddenCommit { .. },
                ..
            })
        )
    }

    /// The new backend's handshake stage, if the move is in it.
    pub(super) fn handshake_mut(&mut self) -> Option<&mut Expect> {
        match self {
            Migration::Running(Move {
                stage: Stage::Handshake { expect, .. },
                ..
            }) => Some(expect),
            _ => None,
        }
    }

    /// The session token, during the new backend's handshake.
    pub(super) fn token(&self) -> Option<&Bytes> {
        match self {
            Migration::Running(Move {
                stage: Stage::Handshake { token, .. },
                ..
            }) => Some(token),
            _ => None,
        }
    }

    /// A new backend leg is open.
    fn has_new_leg(&self) -> bool {
        matches!(
            self,
            Migration::Running(Move {
                stage: Stage::Handshake { .. } | Stage::Import { .. },
                ..
            })
        )
    }
}

impl<T: Clone> Session<T> {
    /// Called whenever an exchange ends: starts a pending move or closes a
    /// session waiting for its safe point.
    pub(super) fn at_boundary(&mut self, now: Instant) {
        if self.phase != Phase::Command || !self.tracker.at_safe_point() || self.migration.active()
        {
            return;
        }
        if self.close_at_safe_point {
            self.events.push_back(Event::SafePoint);
            self.close(SessionError::Closed("graceful shutdown".into()));
            return;
        }
        if let Migration::Pending { target } = &self.migration {
            let target = target.clone();
            self.events.push_back(Event::SafePoint);
            self.start_migration(now, target);
            return;
        }
        let stale_ok = self.planted(super::PlantedBug::RestoreStaleCopy);
        if self.relay.held.is_empty()
            && self
                .protect
                .export_due(&self.cfg.protect, now, stale_ok, self.command_started)
        {
            self.start_refresh(now, false);
        }
    }

    /// Whether a BEGIN from the client now would get TiProxy's treatment:
    /// a move is pending and only the open transaction stands in its way.
    pub(super) fn begin_trick_applies(&self) -> bool {
        matches!(self.migration, Migration::Pending { .. })
            && self.tracker.is_idle()
            && self.tracker.in_transaction()
            && self.tracker.cursors().is_empty()
            && self.tracker.long_data().is_empty()
            && !self.close_at_safe_point
    }

    /// TiProxy's BEGIN trick: the client's BEGIN (`payload`) would commit
    /// the open transaction anyway, so commit it now, move, and run BEGIN
    /// on the new backend; a session that chains transactions with BEGIN
    /// would otherwise never reach a safe point.
    pub(super) fn start_hidden_commit(&mut self, now: Instant, payload: &[u8]) {
        let Migration::Pending { target } = std::mem::replace(&mut self.migration, Migration::None)
        else {
            return;
        };
        let begin_len = self.relay.hold_in_front(payload);
        self.migration = Migration::Running(Move {
            target,
            deadline: now + self.cfg.migration_timeout,
            stage: Stage::HiddenCommit { begin_len },
            restore: false,
            failed: 0,
        });
        self.relay.legs[1].seq = 0;
        self.relay.legs[1].reset_out_seq = true;
        self.send(Leg::Backend, b"\x03COMMIT");
    }

    /// A packet from the old backend while the move talks to it.
    pub(super) fn on_old_backend_packet(&mut self, now: Instant, payload: &[u8]) {
        if matches!(self.migration, Migration::AwaitTarget { .. }) {
            // Already restoring: a second report of the same loss.
            return;
        }
        if matches!(self.migration, Migration::Refresh { .. }) {
            return self.on_refresh_packet(now, payload);
        }
        let Migration::Running(m) = &mut self.migration else {
            return;
        };
        match &mut m.stage {
            Stage::HiddenCommit { begin_len } => {
                let begin_len = *begin_len;
                self.on_hidden_commit_reply(now, begin_len, payload)
            }
            Stage::Export { reader } => match reader.feed(payload) {
                StatesProgress::More => {}
                StatesProgress::Failed(reason) => self.fail_migration(now, reason),
                StatesProgress::Done(exported) => {
                    self.actions.push_back(Action::ConnectNewBackend {
                        target: m.target.clone(),
                    });
                    m.stage = Stage::Handshake {
                        expect: Expect::Connect,
                        states: exported.states,
                        token: exported.token,
                        old_lost: false,
                    };
                }
            },
            _ => {}
        }
    }

    /// The old backend answered the proxy's COMMIT.
    fn on_hidden_commit_reply(&mut self, now: Instant, begin_len: usize, payload: &[u8]) {
        let Migration::Running(m) = std::mem::replace(&mut self.migration, Migration::None) else {
            return;
        };
        self.migration = Migration::Pending { target: m.target };
        match payload.first().copied() {
            Some(OK_HEADER) => {
                if let Ok(status) = OkPacket::status_of(payload) {
                    self.tracker.set_status(status);
                }
                self.at_boundary(now);
            }
            _ => {
                // The commit failed: that is the client's BEGIN's answer (its
                // implicit commit failed), and the BEGIN does not run.
                let n = begin_len.min(self.relay.held.len());
                self.relay.held.advance(n);
                self.relay.legs[0].seq = 1;
                if payload.first() == Some(&ERR_HEADER) {
                    self.send(Leg::Client, payload);
                } else {
                    let e = UnexpectedPacket::new(Leg::Backend, "the reply to COMMIT", payload);
                    self.send_error(Leg::Client, &ProxyError::BackendProtocol(e.to_string()));
                }
                self.at_boundary(now);
                self.drain_held(now);
            }
        }
    }

    fn start_migration(&mut self, now: Instant, target: T) {
        self.events.push_back(Event::MigrationStarted {
            target: target.clone(),
        });
        let deprecate_eof = self.backend_caps.contains(CapabilityFlags::DEPRECATE_EOF);
        self.migration = Migration::Running(Move {
            target,
            deadline: now + self.cfg.migration_timeout,
            stage: Stage::Export {
                reader: StatesReader::new(deprecate_eof),
            },
            restore: false,
            failed: 0,
        });
        self.send_show_session_states();
    }

    /// Asks the backend for its session state (a move's export, or the
    /// state copy's refresh): a new command, so sequence ids restart.
    pub(super) fn send_show_session_states(&mut self) {
        self.relay.legs[1].seq = 0;
        self.relay.legs[1].reset_out_seq = true;
        let mut q = BytesMut::with_capacity(1 + SHOW_SESSION_STATES.len());
        q.put_u8(Command::Query.to_byte());
        q.put_slice(SHOW_SESSION_STATES.as_bytes());
        self.send(Leg::Backend, &q);
    }

    /// The new backend accepted the token (its OK's `payload`): send the
    /// session's state.
    pub(super) fn start_import(&mut self, payload: &[u8]) {
        let Migration::Running(m) = &mut self.migration else {
            return;
        };
        let Stage::Handshake {
            states,
            token,
            old_lost,
            ..
        } = &mut m.stage
        else {
            return;
        };
        let states = std::mem::take(states);
        m.stage = Stage::Import {
            states: states.clone(),
            token: std::mem::take(token),
            old_lost: *old_lost,
        };
        self.switch_on_compression(Leg::NewBackend);
        self.relay.legs[2].seq = 0;
        self.relay.legs[2].reset_out_seq = true;
        // The literal is parsed by the new session, under its own sql_mode
        // (the global default), which its OK reports.
        let no_backslash = OkPacket::status_of(payload)
            .map(|s| s.contains(StatusFlags::NO_BACKSLASH_ESCAPES))
            .unwrap_or(false);
        #[cfg(feature = "sim-mutations")]
        let states = if self.planted(super::PlantedBug::ForgetUserVariable) {
            forget_first_user_variable(&states)
        } else {
            states
        };
        let q = set_session_states_query(&states, no_backslash);
        self.send(Leg::NewBackend, &q);
    }

    /// The new backend answered SET SESSION_STATES.
    pub(super) fn on_import_reply(&mut self, now: Instant, payload: &[u8]) {
        match payload.first().copied() {
            Some(OK_HEADER) => self.finish_migration(now),
            Some(ERR_HEADER) => {
                let (code, message) = ErrPacket::parse(payload)
                    .map(|e| (e.code, e.message_text()))
                    .unwrap_or((0, String::new()));
                self.fail_migration(now, MigrationFailure::SetStatesRefused { code, message });
            }
            _ => {
                let e = UnexpectedPacket::new(
                    Leg::NewBackend,
                    "the reply to SET SESSION_STATES",
                    payload,
                );
                self.fail_migration(now, MigrationFailure::Handshake(e.to_string()));
            }
        }
    }

    /// Whether the move is importing (the new backend's replies go to
    /// [`Session::on_import_reply`]).
    pub(super) fn importing(&self) -> bool {
        matches!(
            self.migration,
            Migration::Running(Move {
                stage: Stage::Import { .. },
                ..
            })
        )
    }

    fn finish_migration(&mut self, now: Instant) {
        let Migration::Running(m) = std::mem::replace(&mut self.migration, Migration::None) else {
            return;
        };
        let old_lost = matches!(m.stage, Stage::Import { old_lost: true, .. });
        let mut farewell = self.relay.legs[1].out.take();
        if old_lost {
            farewell.clear();
        } else {
            // Tell the old backend the session is over, so it frees it at once.
            let mut quit = BytesMut::with_capacity(5);
            write_packet(&mut quit, 0, &[Command::Quit.to_byte()]);
            if let Some(f) = self.relay.legs[1].framing.as_mut() {
                f.reset_seq();
                f.encode(&quit, &mut farewell);
            } else {
                farewell.extend_from_slice(&quit);
            }
        }
        let new = std::mem::take(&mut self.relay.legs[2]);
        self.relay.legs[1] = new;
        self.actions.push_back(Action::SwapBackends {
            farewell: farewell.freeze(),
        });
        if m.restore {
            self.events.push_back(Event::Restore {
                outcome: RestoreOutcome::Restored,
            });
        } else {
            self.events.push_back(Event::Migrated { target: m.target });
        }
        self.at_boundary(now);
        self.drain_held(now);
    }

    pub(super) fn fail_migration(&mut self, now: Instant, reason: MigrationFailure) {
        let had_new_leg = self.migration.has_new_leg();
        let old_lost = matches!(
            self.migration,
            Migration::Running(Move {
                stage: Stage::Handshake { old_lost: true, .. }
                    | Stage::Import { old_lost: true, .. },
                ..
            })
        );
        let Migration::Running(m) = std::mem::replace(&mut self.migration, Migration::None) else {
            return;
        };
        if had_new_leg {
            self.relay.legs[2] = Default::default();
            self.actions.push_back(Action::CloseLeg(Leg::NewBackend));
        }
        let Some(m) = self.retry_restore(now, m, &reason) else {
            return;
        };
        if m.restore {
            self.events.push_back(Event::Restore {
                outcome: RestoreOutcome::Failed(reason.to_string()),
            });
        } else {
            self.events.push_back(Event::MigrationFailed {
                target: m.target,
                reason: reason.clone(),
            });
        }
        if old_lost {
            // Nowhere left to run the session. What the proxy held never
            // reached a server.
            self.close_client_with(ProxyError::HeldNotRun(reason.to_string()));
            return;
        }
        self.at_boundary(now);
        self.drain_held(now);
    }

    /// A move or restore whose old backend is gone and whose target failed
    /// (its dial, its handshake, or SET SESSION_STATES) tries another
    /// backend with the state it already holds, up to [`RESTORE_TARGETS`]
    /// in all: nothing of the client's ran on the failed one (held bytes
    /// are sent only once the import is done), so nothing can run twice.
    /// A move that lost its old backend turns into a restore here, with a
    /// deadline of its own (the move's has often passed: a dial that timed
    /// out used it up); a restore keeps its deadline. Gives the move back
    /// when it is not retried.
    fn retry_restore(
        &mut self,
        now: Instant,
        m: Move<T>,
        reason: &MigrationFailure,
    ) -> Option<Move<T>> {
        let (states, token) = match &m.stage {
            Stage::Handshake {
                states,
                token,
                old_lost: true,
                ..
            }
            | Stage::Import {
                states,
                token,
                old_lost: true,
            } => (states.clone(), token.clone()),
            _ => return Some(m),
        };
        let failed = if m.restore { m.failed + 1 } else { 1 };
        if usize::from(failed) >= RESTORE_TARGETS || (m.restore && now >= m.deadline) {
            return Some(m);
        }
        let Move {
            target,
            deadline,
            restore,
            ..
        } = m;
        let (deadline, exclude) = if restore {
            (deadline, None)
        } else {
            self.events.push_back(Event::MigrationFailed {
                target: target.clone(),
                reason: reason.clone(),
            });
            (now + self.cfg.migration_timeout, Some(target))
        };
        self.migration = Migration::AwaitTarget {
            states,
            token,
            deadline,
            failed,
        };
        self.actions.push_back(Action::PickRestoreTarget {
            reason: format!("a restore attempt failed: {reason}"),
            failed,
            exclude,
        });
        None
    }

    /// The old backend's connection ended (EOF or reset). What the backend
    /// sent has been relayed; the client connection closes as the server's
    /// did. Nothing is invented for a command in flight.
    pub(super) fn backend_lost(&mut self, now: Instant, reason: &str) {
        if matches!(self.migration, Migration::Refresh { .. }) {
            // A renewal's export died with the backend; the copy it would
            // have replaced still serves if nothing changed since.
            self.migration = Migration::None;
        }
        // A move past its export finishes below without the old backend;
        // a restore would only report it busy.
        if self.phase == Phase::Command
            && !self.migration.has_new_leg()
            && self.try_restore(now, reason)
        {
            return;
        }
        let mut commit_unknown = false;
        if let Migration::Running(m) = &mut self.migration {
            match &mut m.stage {
                Stage::Handshake { old_lost, .. } | Stage::Import { old_lost, .. } => {
                    // The session's state is already exported: finish the
                    // move without the old backend.
                    *old_lost = true;
                    self.relay.legs[1].out.clear();
                    return;
                }
                Stage::Export { .. } | Stage::HiddenCommit { .. } => {
                    let Migration::Running(m) =
                        std::mem::replace(&mut self.migration, Migration::None)
                    else {
                        return;
                    };
                    let exporting = matches!(m.stage, Stage::Export { .. });
                    self.events.push_back(Event::MigrationFailed {
                        target: m.target,
                        reason: MigrationFailure::OldBackendLost(reason.to_string()),
                    });
                    // Only the proxy's own SHOW SESSION_STATES was in
                    // flight (a TiDB that stopped answering is often being
                    // moved away from when its connections die): the
                    // session is as idle as before the move, so its state
                    // copy still serves. A hidden COMMIT's outcome is
                    // unknown: that one closes.
                    if exporting && self.phase == Phase::Command && self.try_restore(now, reason) {
                        return;
                    }
                    commit_unknown = !exporting;
                }
            }
        }
        match self.phase {
            Phase::Backend(_) => self.refuse(ProxyError::NoBackend(format!(
                "backend closed the connection during the handshake: {reason}"
            ))),
            // Client bytes the proxy held while a move ran never reached a
            // server: the client hears they did not run. A command that
            // did reach the backend gets what the backend sent, nothing
            // more: the connection then closes as the server's did.
            Phase::Command if self.tracker.is_idle() && !self.relay.held.is_empty() => {
                let reason = reason.to_string();
                self.close_client_with(if commit_unknown {
                    // The held BEGIN's implicit commit was in flight.
                    ProxyError::BackendLost(reason)
                } else {
                    ProxyError::HeldNotRun(reason)
                })
            }
            _ => self.close(SessionError::BackendLost(reason.to_string())),
        }
    }
}
