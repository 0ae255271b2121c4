//! Crash protection: the copy of a session's state that lets it outlive
//! its TiDB, and the restore that uses it.
//!
//! # The mechanism, and why
//!
//! TiDB hands out a session's state only through `SHOW SESSION_STATES`
//! (one row: the state JSON and a session token), and another TiDB of the
//! cluster admits a session only with a token signed by the cluster's
//! `security.session-token-signing-cert` key and younger than TiDB's token
//! lifetime (one minute, `tokenLifetime` in TiDB's `sessionstates`
//! package). Two ways to hold what a restore needs without ever learning a
//! password:
//!
//! - re-export the state in the background while the session is idle,
//!   after every statement that may have changed it, and again before the
//!   token ages out (the client's next command waits for the export, as it
//!   does during a move);
//! - mint tokens in the proxy from the signing key.
//!
//! The proxy re-exports. Minting would spare the renewals but needs the
//! cluster's private signing key on every proxy host (a key that lets its
//! holder log in as any user of the cluster), and it would still need a
//! fresh copy of the state after every change, which only TiDB can give.
//! Re-exporting needs nothing beyond what moves already need, and its cost
//! is bounded: at most one `SHOW SESSION_STATES` per state-changing
//! statement, plus one per idle session every [`ProtectConfig::renew_after`].
//!
//! # The quiet period
//!
//! Exporting right after every change cost a round trip per change, and
//! the client's next command waited for it: 1.34x the proxy's CPU per
//! client command in sysbench with a `SET` per transaction (CPU per
//! command sent to TiDB was no higher: the cost is the extra command, not
//! the parsing). So a change only marks the copy stale (unusable at once:
//! a restore never uses a copy older than the last change), and the
//! export runs once the session has stayed idle for
//! [`ProtectConfig::delay_ms`] (`proxy.session-protection-delay`, 200 ms)
//! after its last command. A session sending statements back to back
//! exports nothing; a session that goes idle, as pooled connections do
//! between requests (pools keep connections idle for seconds to minutes),
//! is protected again 200 ms later. What is given up: a session whose
//! TiDB dies within the delay after a change is closed as the server
//! closed it, as it would be without protection. The delay is counted in
//! the driver's time (the `now` of every input, like renewals); the timer
//! is armed only while the session is at a safe point with nothing held,
//! the only time the export could start.
//!
//! # What counts as a state change
//!
//! A statement is read-only for this purpose when it is a ping, a
//! statistics request, the execution or fetch of a prepared statement that
//! answered with rows, or a `COM_QUERY` answered with rows whose whole text
//! the proxy saw (at most [`SCAN_LIMIT`] bytes) and which neither assigns
//! (`:=`) nor holds a second statement (`;`). Everything else marks the
//! copy stale. The copy therefore lags only in what such reads change on
//! their own: `FOUND_ROWS()` and the warnings of the last read, and user
//! variables assigned inside a prepared `SELECT` (documented in README).
//!
//! # Never replay
//!
//! A restore runs only when the session is at a safe point (no statement
//! in flight, no transaction, cursor or long data) and its copy is clean
//! and younger than [`ProtectConfig::max_age`]. Client bytes that waited
//! while the backend died never reached it, so they run after the restore.
//! Anything else closes as the server closed it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::migration::{Migration, MigrationFailure, StatesProgress, StatesReader};
use super::output::RestoreOutcome;
use super::{Action, Event, Phase, PlantedBug, Session};
use crate::command::Command;
use crate::error::ProxyError;
use crate::flags::CapabilityFlags;

/// Longest COM_QUERY whose text is scanned to tell a read from a change.
pub const SCAN_LIMIT: usize = 256;

/// Default quiet period before a re-export ([`ProtectConfig::delay_ms`]).
pub const DEFAULT_DELAY_MS: u16 = 200;

/// Crash-protection settings of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtectConfig {
    /// Keep a state copy at all (`proxy.session-protection`).
    pub enabled: bool,
    /// Largest state copy kept (states plus token) in bytes; a session
    /// whose state is larger is unprotected (`proxy.session-state-cap`).
    pub state_cap: u32,
    /// Renew an unchanged copy (for its token) once it is this many
    /// seconds old.
    pub renew_after_secs: u32,
    /// A copy older than this many seconds is not used: its token would be
    /// refused (TiDB's token lifetime minus a margin for clock skew and the
    /// time a restore takes). Compact fields keep every session small.
    pub max_age_secs: u32,
    /// After a state change, re-export only once the session has been idle
    /// this many milliseconds (`proxy.session-protection-delay`); 0: at
    /// once. See the module documentation.
    /// (At most 65 s: a compact field keeps every session small.)
    pub delay_ms: u16,
}

impl ProtectConfig {
    fn renew_after(&self) -> Duration {
        Duration::from_secs(self.renew_after_secs.into())
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_secs.into())
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.into())
    }
}

impl Default for ProtectConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            state_cap: 64 * 1024,
            renew_after_secs: 30,
            max_age_secs: 50,
            delay_ms: DEFAULT_DELAY_MS,
        }
    }
}

/// A state copy: what `SHOW SESSION_STATES` returned, and when.
#[derive(Debug, Clone)]
pub(super) struct StateCopy {
    pub(super) states: Bytes,
    pub(super) token: Bytes,
    pub(super) taken: Instant,
}

/// Why a lost backend's session could not be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprotected {
    /// Protection is off, or the backend cannot export sessions.
    Off,
    /// A statement, transaction, cursor or long data was in flight.
    Busy,
    /// The session changed since its last copy, or never had one.
    Stale,
    /// The copy's token is too old to be accepted.
    Expired,
    /// The state is larger than the cap.
    TooLarge,
}

impl Unprotected {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Unprotected::Off => "unprotected_off",
            Unprotected::Busy => "unprotected_busy",
            Unprotected::Stale => "unprotected_stale",
            Unprotected::Expired => "unprotected_expired",
            Unprotected::TooLarge => "unprotected_too_large",
        }
    }
}

/// The session's crash-protection bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Protection {
    /// The last usable copy.
    /// Boxed: most sessions hold none, and the session stays small.
    pub(super) copy: Option<Box<StateCopy>>,
    /// Something changed since `copy` was taken (or there is none yet).
    pub(super) dirty: bool,
    /// The last export was larger than the cap.
    pub(super) too_large: bool,
    /// The backend cannot export (not TiDB, or no signing cert).
    pub(super) cannot_export: bool,
    /// The running command's text was seen whole and is a plain read.
    pub(super) read_only_text: bool,
    /// A renewal timer is armed (at the copy's age `renew_after`).
    pub(super) wake_armed: bool,
    /// How long after its start (`Session::command_started`, the login
    /// before any command) the last command ended, in milliseconds: the
    /// quiet period runs from there. An offset keeps every session small.
    pub(super) done_ms: u32,
}

impl Protection {
    pub(super) fn new() -> Self {
        Self {
            dirty: true,
            ..Self::default()
        }
    }

    /// When the renewal timer fires, if armed.
    pub(super) fn wake(&self, cfg: &ProtectConfig) -> Option<Instant> {
        match &self.copy {
            Some(c) if self.wake_armed => Some(c.taken + cfg.renew_after()),
            _ => None,
        }
    }

    /// Whether the copy is stale and a re-export wanted (once the session
    /// is quiet).
    fn stale_export_wanted(&self, cfg: &ProtectConfig, stale_ok: bool) -> bool {
        cfg.enabled && !self.cannot_export && self.dirty && !(stale_ok && self.copy.is_some())
    }

    /// When a stale copy's re-export falls due: the end of the quiet
    /// period after the last command, which started at `started` (`None`:
    /// no export wanted). A session that never ran a command nor logged in
    /// here (an imported one) is due at once.
    pub(super) fn quiet_due(
        &self,
        cfg: &ProtectConfig,
        stale_ok: bool,
        started: Option<Instant>,
    ) -> Option<Option<Instant>> {
        self.stale_export_wanted(cfg, stale_ok)
            .then(|| started.map(|s| s + Duration::from_millis(self.done_ms.into()) + cfg.delay()))
    }

    /// A command starts: remember whether its text is a plain read.
    pub(super) fn on_command(&mut self, payload: &[u8], len: usize) {
        self.read_only_text = payload.first() == Some(&Command::Query.to_byte())
            && payload.len() == len
            && len <= SCAN_LIMIT
            && is_plain_read(&payload[1..]);
    }

    /// A command finished `elapsed` after it started; `rows`: its response
    /// carried a result set.
    pub(super) fn on_done(
        &mut self,
        elapsed: Duration,
        command: Option<Command>,
        ok: bool,
        rows: bool,
    ) {
        self.done_ms = elapsed.as_millis().min(u32::MAX.into()) as u32;
        let read = match command {
            Some(Command::Ping | Command::Statistics) => ok,
            Some(Command::StmtExecute | Command::StmtFetch) => ok && rows,
            Some(Command::Query) => ok && rows && self.read_only_text,
            _ => false,
        };
        if !read {
            self.dirty = true;
        }
        self.read_only_text = false;
    }

    /// Whether the copy would serve a restore at `now`.
    pub(super) fn usable(
        &self,
        cfg: &ProtectConfig,
        now: Instant,
    ) -> Result<&StateCopy, Unprotected> {
        self.usable_unless(cfg, now, false)
    }

    /// [`Protection::usable`]; with `stale_ok` (a planted bug only) a copy
    /// older than the last change still serves.
    pub(super) fn usable_unless(
        &self,
        cfg: &ProtectConfig,
        now: Instant,
        stale_ok: bool,
    ) -> Result<&StateCopy, Unprotected> {
        if !cfg.enabled || self.cannot_export {
            return Err(Unprotected::Off);
        }
        if self.dirty && !(stale_ok && self.copy.is_some()) {
            return Err(if self.too_large {
                Unprotected::TooLarge
            } else {
                Unprotected::Stale
            });
        }
        match &self.copy {
            None if self.too_large => Err(Unprotected::TooLarge),
            None => Err(Unprotected::Stale),
            Some(c) if now.saturating_duration_since(c.taken) >= cfg.max_age() => {
                Err(Unprotected::Expired)
            }
            Some(c) => Ok(c),
        }
    }

    /// Whether a new export is due at `now` (the session being at a safe
    /// point). A stale copy is re-exported only once the session has been
    /// quiet for [`ProtectConfig::delay_ms`] since its last command;
    /// before that the quiet-period timer is armed.
    pub(super) fn export_due(
        &self,
        cfg: &ProtectConfig,
        now: Instant,
        stale_ok: bool,
        started: Option<Instant>,
    ) -> bool {
        if !cfg.enabled || self.cannot_export {
            return false;
        }
        if let Some(due) = self.quiet_due(cfg, stale_ok, started) {
            return due.is_none_or(|d| now >= d);
        }
        self.copy
            .as_ref()
            .is_some_and(|c| now.saturating_duration_since(c.taken) >= cfg.renew_after())
    }

    /// An export finished: keep it unless it is over the cap.
    pub(super) fn store(&mut self, cfg: &ProtectConfig, now: Instant, states: Bytes, token: Bytes) {
        self.dirty = false;
        if states.len() + token.len() > cfg.state_cap as usize {
            self.copy = None;
            self.too_large = true;
            self.wake_armed = false;
        } else {
            self.too_large = false;
            self.copy = Some(Box::new(StateCopy {
                states,
                token,
                taken: now,
            }));
            self.wake_armed = true;
        }
    }

    /// An export was refused: no copy until the next state change; never
    /// again when the backend cannot export at all (`permanent`).
    pub(super) fn refused(&mut self, permanent: bool) {
        self.copy = None;
        self.dirty = false;
        self.wake_armed = false;
        self.cannot_export |= permanent;
    }
}

/// Whether a statement's text (after the command byte) reads without
/// assigning: no `:=`, no second statement.
fn is_plain_read(sql: &[u8]) -> bool {
    let trimmed = {
        let mut end = sql.len();
        while end > 0 && matches!(sql[end - 1], b' ' | b'\t' | b'\r' | b'\n' | b';') {
            end -= 1;
        }
        &sql[..end]
    };
    !trimmed.contains(&b';') && !trimmed.windows(2).any(|w| w == b":=")
}

impl<T: Clone> Session<T> {
    /// Sends SHOW SESSION_STATES to refresh the state copy (or, with
    /// `capture`, to start a session's capture from its state); its answer
    /// goes to [`Session::on_refresh_packet`], client input waits meanwhile.
    /// A move asked for and waiting starts after it.
    pub(super) fn start_refresh(&mut self, now: Instant, capture: bool) {
        let deprecate_eof = self.backend_caps.contains(CapabilityFlags::DEPRECATE_EOF);
        self.protect.wake_armed = false;
        let then = match std::mem::replace(&mut self.migration, Migration::None) {
            Migration::Pending { target } => Some(target),
            _ => None,
        };
        self.migration = Migration::Refresh {
            reader: StatesReader::new(deprecate_eof),
            deadline: now + self.cfg.migration_timeout,
            then,
            capture,
        };
        self.send_show_session_states();
    }

    /// A packet of the refresh's SHOW SESSION_STATES answer.
    pub(super) fn on_refresh_packet(&mut self, now: Instant, payload: &[u8]) {
        let Migration::Refresh {
            reader, capture, ..
        } = &mut self.migration
        else {
            return;
        };
        let capture = *capture;
        let progress = reader.feed(payload);
        let done = |s: &mut Self| {
            let Migration::Refresh { then, .. } =
                std::mem::replace(&mut s.migration, Migration::None)
            else {
                return;
            };
            if let Some(target) = then {
                s.migration = Migration::Pending { target };
            }
        };
        // A capture's export also serves protection, when it is on.
        let for_protection = !capture || self.cfg.protect.enabled;
        match progress {
            StatesProgress::More => return,
            StatesProgress::Done(exported) => {
                done(self);
                if capture {
                    self.tap_started(Some(exported.states.clone()));
                }
                if for_protection {
                    self.protect
                        .store(&self.cfg.protect, now, exported.states, exported.token);
                }
            }
            StatesProgress::Failed(reason) => {
                done(self);
                if capture {
                    self.tap_started(None);
                }
                // A backend that does not know the statement (MariaDB,
                // MySQL: parse error 1064) or hands out no token never
                // will; TiDB's refusals (8146: temporary tables, locks)
                // last only until the session changes.
                let permanent = match &reason {
                    MigrationFailure::StatesRefused { code, .. } => *code == 1064,
                    _ => true,
                };
                self.protect.refused(permanent);
                if for_protection {
                    self.events
                        .push_back(Event::Unexportable { reason, permanent });
                }
            }
        }
        self.at_boundary(now);
        self.drain_held(now);
    }

    /// The backend died: restores the session elsewhere if it is protected
    /// (returns true), or reports why not (returns false: the caller closes
    /// it as the server closed it).
    pub(super) fn try_restore(&mut self, now: Instant, reason: &str) -> bool {
        #[cfg(feature = "sim-mutations")]
        self.plant_resend();
        let busy = !self.tracker.at_safe_point()
            || !matches!(self.migration, Migration::None | Migration::Pending { .. })
            || self.close_at_safe_point;
        let verdict = if busy {
            Err(Unprotected::Busy)
        } else {
            let stale_ok = self.planted(PlantedBug::RestoreStaleCopy);
            self.protect
                .usable_unless(&self.cfg.protect, now, stale_ok)
                .cloned()
        };
        let copy = match verdict {
            Ok(c) => c,
            Err(why) => {
                if self.cfg.protect.enabled {
                    self.events.push_back(Event::Restore {
                        outcome: RestoreOutcome::Unprotected(why),
                    });
                }
                return false;
            }
        };
        self.relay.legs[1].out.clear();
        self.migration = Migration::AwaitTarget {
            states: copy.states,
            token: copy.token,
            deadline: now + self.cfg.migration_timeout,
            failed: 0,
        };
        self.actions.push_back(Action::PickRestoreTarget {
            reason: reason.to_string(),
            failed: 0,
            exclude: None,
        });
        true
    }

    /// When crash protection needs [`Session::handle_timeout`]: the copy's
    /// renewal, or the end of the quiet period after a change while the
    /// session could export (armed only then, so a timer never fires for
    /// an export that could not start).
    pub(super) fn protect_wake(&self) -> Option<Instant> {
        let cfg = &self.cfg.protect;
        let renew = self.protect.wake(cfg);
        let could_export = self.phase == Phase::Command
            && self.tracker.at_safe_point()
            && !self.migration.active()
            && self.relay.held.is_empty()
            && !self.close_at_safe_point;
        let stale_ok = self.planted(PlantedBug::RestoreStaleCopy);
        let quiet = self
            .protect
            .quiet_due(cfg, stale_ok, self.command_started)
            .flatten()
            .filter(|_| could_export);
        match (renew, quiet) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The driver's answer to [`Action::PickRestoreTarget`]: the backend to
    /// restore on, or `None` when there is none (the session closes as the
    /// server closed it).
    pub fn handle_restore_target(&mut self, now: Instant, target: Option<T>) {
        let Migration::AwaitTarget {
            states,
            token,
            deadline,
            failed,
        } = std::mem::replace(&mut self.migration, Migration::None)
        else {
            return;
        };
        match target {
            Some(target) => {
                self.actions.push_back(Action::ConnectNewBackend {
                    target: target.clone(),
                });
                self.migration = Migration::restore(target, deadline, states, token, failed);
            }
            None => {
                let why = if failed == 0 {
                    "no other backend is available".to_string()
                } else {
                    format!(
                        "restores failed on {} other backend(s) and no further one is available",
                        failed
                    )
                };
                self.events.push_back(Event::Restore {
                    outcome: RestoreOutcome::Failed(why.clone()),
                });
                self.close_client_with(ProxyError::HeldNotRun(format!(
                    "the backend was lost: {why}"
                )));
            }
        }
        let _ = now;
        self.flush();
    }

    /// The planted `ResendInFlight`: a statement in flight outside a
    /// transaction is forgotten by the tracker and queued to run again
    /// after the restore.
    #[cfg(feature = "sim-mutations")]
    fn plant_resend(&mut self) {
        if !self.planted(PlantedBug::ResendInFlight)
            || self.tracker.is_idle()
            || self.tracker.in_transaction()
        {
            return;
        }
        let Some(cmd) = self.in_flight.take() else {
            return;
        };
        self.tracker.abandon_exchange();
        self.relay.hold_in_front(&cmd);
    }

    /// Whether the session holds a state copy that would serve a restore
    /// at `now` (for the protected-sessions gauge).
    pub fn is_protected(&self, now: Instant) -> bool {
        self.phase == Phase::Command && self.protect.usable(&self.cfg.protect, now).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // the test plays the driver: it owns the clock
#[path = "../../tests/unit/session_protect_copy.rs"]
mod tests;
