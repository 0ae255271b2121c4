//! One client session: the frontend handshake (the proxy as server), the
//! backend handshake (the proxy as client), the command phase with its
//! tracker, and live migration to another backend.
//!
//! # Driving a session
//!
//! A session has up to three legs ([`Leg`]): the client, the current
//! backend, and during a move the new backend. The driver:
//!
//! 1. feeds input with the `handle_*` methods: bytes read from a leg
//!    ([`Session::handle_data`]), a finished connect or TLS upgrade, a closed
//!    socket, an expired timer, or an operator command such as a redirect;
//! 2. after every input, drains the outputs: [`Session::poll_action`] until
//!    `None` (connects, TLS upgrades, closes), [`Session::poll_event`] until
//!    `None` (notifications for the router and metrics),
//!    [`Session::transmit`] for each leg (bytes to write; acknowledge with
//!    [`Session::advance_transmit`]) and [`Session::poll_timeout`] (the one
//!    timer to arm).
//!
//! The session never blocks, never reads a clock and never touches a socket.
//! Bytes between client and backend flow through without being joined into
//! whole packets unless the proxy must look inside them.
//!
//! # Read budget
//!
//! The driver reads a leg only while [`Session::wants_read`] says so: once
//! what the session holds towards the other side (client bytes parked while
//! a response or a move runs, bytes queued for the destination's socket,
//! bytes staged for compression) reaches [`SessionConfig::buffer_limit`],
//! the leg is left unread and TCP pushes back on its peer. The driver
//! re-asks after every input and every write, so a parked client resumes as
//! soon as the held bytes drain.
//!
//! # Layout
//!
//! `Session` is an orchestrator over sub-machines that own their state:
//! - `config`: [`SessionConfig`], the settings a session is created with;
//! - `relay`: per-leg framing, sequence rewrite, compression staging,
//!   transmit buffers and the read budget;
//! - `backend`: the one backend handshake (proxy as client), used for the
//!   first backend (credentials relayed from the client) and for a move
//!   target (a session token);
//! - `command`: the client's commands and the backend's responses in the
//!   command phase;
//! - [`migration`]: the move sequence and the SESSION_STATES data it carries;
//! - `export`: [`Session::export`] and [`Session::import`] of an idle
//!   session, a versioned byte string;
//! - [`protect`]: crash protection, the state copy of an idle session and
//!   its restore on another backend when the backend dies;
//! - `planted`: the bugs the simulation's mutation test plants;
//! - `output`: the [`Action`]s and [`Event`]s handed to the driver.
//!
//! The session is generic over `T`, the driver's handle for a backend it
//! asks the session to move to; the session only clones it into actions
//! and events.

mod backend;
mod capture;
mod command;
mod config;
mod export;
pub mod migration;
mod output;
mod planted;
pub mod protect;
mod relay;
mod states;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use self::backend::Expect;
pub use self::config::{BackendTls, SessionConfig};
pub use self::export::{EXPORT_MAGIC, EXPORT_VERSION, ExportError, ImportError, ProtectionCopy};
use self::migration::{Migration, MigrationFailure};
pub use self::output::{Action, Event, RestoreOutcome};
pub use self::planted::PlantedBug;
use self::protect::Protection;
use self::relay::Relay;
use crate::command::Command;
use crate::error::{ProxyError, SessionError};
use crate::flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
use crate::handshake::{HandshakeResponse, InitialHandshake, plugin};
use crate::proxy_protocol::ProxyHeader;
use crate::response::ERR_HEADER;
use crate::tracker::CommandTracker;

/// A connection of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// The client.
    Client,
    /// The backend currently serving the session.
    Backend,
    /// The backend the session is moving to.
    NewBackend,
}

impl Leg {
    fn idx(self) -> usize {
        match self {
            Leg::Client => 0,
            Leg::Backend => 1,
            Leg::NewBackend => 2,
        }
    }
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Leg::Client => "client",
            Leg::Backend => "backend",
            Leg::NewBackend => "new backend",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting sent; expecting an SSL request or a handshake response.
    ClientHello,
    /// Waiting for the driver to finish TLS with the client.
    ClientTls,
    /// The handshake with the first backend; in
    /// [`Expect::AuthResult`] the client's auth packets are relayed.
    Backend(Expect),
    /// Command phase.
    Command,
    /// Closed.
    Closed,
}

/// A client session. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Session<T = String> {
    cfg: SessionConfig,
    phase: Phase,
    salt: [u8; 20],
    /// Framing, sequence ids, transmit buffers and parked client bytes.
    relay: Relay,
    /// The client's handshake response, kept to re-authenticate on moves
    /// (empty until the client sends it).
    hello: HandshakeResponse,
    /// Capabilities agreed with the client.
    client_caps: CapabilityFlags,
    /// Capabilities sent to the backend (without SSL and compression).
    backend_caps: CapabilityFlags,
    /// MariaDB extended capabilities agreed with the client.
    client_mariadb: MariaDbCapabilities,
    /// Those in effect with the backend (within the first one's offer).
    backend_mariadb: MariaDbCapabilities,
    /// What the move target's greeting offered.
    target_mariadb: MariaDbCapabilities,
    user: Bytes,
    database: Option<Bytes>,
    /// COM_CHANGE_USER in flight: the user and database it asked for.
    /// Boxed: rare, and the session stays small.
    pending_user: Option<Box<(Bytes, Bytes)>>,
    tracker: CommandTracker,
    /// The move sequence; owns its target, deadline and exported state.
    migration: Migration<T>,
    /// Crash protection's state copy.
    protect: Protection,
    close_at_safe_point: bool,
    /// Whether any byte of the current response reached the client.
    response_started: bool,
    command_started: Option<Instant>,
    handshake_deadline: Option<Instant>,
    /// A TLS upgrade to request once the current input stops.
    tls_request: Option<Leg>,
    /// A response just ended: act on the boundary once it is forwarded.
    boundary_pending: bool,
    actions: VecDeque<Action<T>>,
    events: VecDeque<Event<T>>,
    /// The last finished command, not yet polled.
    command_done: Option<Event<T>>,
    /// Traffic capture's copy of the running command.
    tap: capture::Tap,
    /// The bug planted by the simulation's mutation test.
    #[cfg(feature = "sim-mutations")]
    planted: Option<PlantedBug>,
    /// With `ResendInFlight` planted: the running command's packet.
    #[cfg(feature = "sim-mutations")]
    in_flight: Option<Bytes>,
}

/// The handshake response slot before the client sent one.
fn no_hello() -> HandshakeResponse {
    HandshakeResponse {
        capabilities: CapabilityFlags::empty(),
        max_packet_size: 0,
        charset: 0,
        filler: [0; 23],
        mariadb_capabilities: Default::default(),
        username: Bytes::new(),
        auth_response: Bytes::new(),
        database: None,
        auth_plugin: None,
        attributes: Default::default(),
        zstd_level: None,
    }
}

impl<T: Clone> Session<T> {
    /// A session in `phase` with nothing negotiated, tracked or queued yet:
    /// what [`Session::new`] and an import start from.
    fn blank(cfg: SessionConfig, phase: Phase, salt: [u8; 20], relay: Relay) -> Self {
        Self {
            phase,
            salt,
            relay,
            hello: no_hello(),
            client_caps: CapabilityFlags::empty(),
            backend_caps: CapabilityFlags::empty(),
            client_mariadb: MariaDbCapabilities::empty(),
            backend_mariadb: MariaDbCapabilities::empty(),
            target_mariadb: MariaDbCapabilities::empty(),
            user: Bytes::new(),
            database: None,
            pending_user: None,
            tracker: CommandTracker::new(false, StatusFlags::AUTOCOMMIT),
            migration: Migration::None,
            protect: Protection::new(),
            close_at_safe_point: false,
            response_started: false,
            command_started: None,
            handshake_deadline: None,
            tls_request: None,
            boundary_pending: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            command_done: None,
            tap: capture::Tap::default(),
            #[cfg(feature = "sim-mutations")]
            planted: None,
            #[cfg(feature = "sim-mutations")]
            in_flight: None,
            cfg,
        }
    }

    /// A new session for a client that just connected: the greeting is
    /// queued on the client leg. The salt comes from `rng`.
    pub fn new(cfg: SessionConfig, now: Instant, rng: &mut impl RngCore) -> Self {
        let mut salt = [0u8; 20];
        rng.fill_bytes(&mut salt);
        // Printable ASCII without '$', as MySQL servers generate: no NUL can
        // end the salt early and every client parses it.
        for b in &mut salt {
            *b = 0x21 + (*b % 0x5e);
            if *b == b'$' {
                *b = b'%';
            }
        }
        let deadline = now + cfg.handshake_timeout;
        let mut s = Self::blank(cfg, Phase::ClientHello, salt, Relay::default());
        s.handshake_deadline = Some(deadline);
        s.cfg.capabilities &= CapabilityFlags::PROXY_SUPPORTED;
        if !s.cfg.server_tls {
            s.cfg.capabilities -= CapabilityFlags::SSL;
        }
        s.cfg.mariadb_capabilities &= MariaDbCapabilities::PROXY_SUPPORTED;
        if !s.cfg.mariadb_capabilities.is_empty() {
            // MariaDB clients read the extended word only when CLIENT_MYSQL
            // is clear, as MariaDB's own greeting has it.
            s.cfg.capabilities -= CapabilityFlags::CLIENT_MYSQL;
        }
        let greeting = InitialHandshake {
            server_version: s.cfg.server_version.clone(),
            connection_id: s.cfg.connection_id,
            auth_data: Bytes::copy_from_slice(&s.salt),
            capabilities: s.cfg.capabilities,
            charset: s.cfg.charset,
            status: StatusFlags::AUTOCOMMIT,
            reserved: [0; 10],
            mariadb_capabilities: s.cfg.mariadb_capabilities,
            auth_plugin: Bytes::from_static(plugin::NATIVE_PASSWORD.as_bytes()),
        };
        let mut payload = BytesMut::with_capacity(96);
        greeting.write(&mut payload);
        s.send(Leg::Client, &payload);
        s
    }

    // ----------------------------------------------------------------
    // Queries
    // ----------------------------------------------------------------

    /// Whether the session is authenticated and in the command phase.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Command
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The authenticated user (after COM_CHANGE_USER, the new one).
    pub fn user(&self) -> &[u8] {
        &self.user
    }

    /// The database named at connect, by COM_INIT_DB or COM_CHANGE_USER.
    pub fn database(&self) -> Option<&[u8]> {
        self.database.as_deref()
    }

    /// [`Session::database`] as a shared buffer (no copy).
    pub fn database_bytes(&self) -> Option<Bytes> {
        self.database.clone()
    }

    /// Last known server status flags.
    pub fn status(&self) -> StatusFlags {
        self.tracker.status()
    }

    /// Plants `bug` (the simulation's mutation test).
    #[cfg(feature = "sim-mutations")]
    pub fn plant(&mut self, bug: PlantedBug) {
        self.planted = Some(bug);
    }

    /// Whether `bug` was planted; always false without `sim-mutations`.
    #[inline]
    fn planted(&self, bug: PlantedBug) -> bool {
        #[cfg(feature = "sim-mutations")]
        {
            self.planted == Some(bug)
        }
        #[cfg(not(feature = "sim-mutations"))]
        {
            let _ = bug;
            false
        }
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.tracker.in_transaction()
    }

    /// The command tracker (prepared statements, cursors, state).
    pub fn tracker(&self) -> &CommandTracker {
        &self.tracker
    }

    /// Capabilities agreed with the client.
    pub fn client_capabilities(&self) -> CapabilityFlags {
        self.client_caps
    }

    /// Whether the session could move right now: authenticated, no
    /// exchange in progress, not in a transaction, no open cursor, no
    /// pending long data, no move already under way.
    pub fn may_migrate(&self) -> bool {
        self.phase == Phase::Command
            && self.tracker.at_safe_point()
            && !self.migration.active()
            && self.relay.held.is_empty()
            && !self.close_at_safe_point
    }

    /// The target of a pending or running move.
    pub fn migration_target(&self) -> Option<&T> {
        self.migration.target()
    }

    /// Whether the driver may read `leg` now (the read budget): false once
    /// what the session holds towards the other side of `leg` reaches
    /// [`SessionConfig::buffer_limit`]. Ask again after every input and
    /// every write.
    #[must_use]
    pub fn wants_read(&self, leg: Leg) -> bool {
        self.read_budget(leg) > 0
    }

    /// How many bytes the driver may read from `leg` now: what is left of
    /// [`SessionConfig::buffer_limit`] (0: do not read). Reading no more
    /// than this keeps what the session holds within the limit (a
    /// compressed frame may still decompress to more).
    #[must_use]
    pub fn read_budget(&self, leg: Leg) -> usize {
        if self.phase == Phase::Closed {
            return 0;
        }
        self.cfg
            .buffer_limit
            .max(1)
            .saturating_sub(self.relay.held_towards(leg))
    }

    // ----------------------------------------------------------------
    // Inputs
    // ----------------------------------------------------------------

    /// Bytes read from `leg` (after TLS).
    pub fn handle_data(&mut self, now: Instant, leg: Leg, data: &[u8]) {
        if self.phase == Phase::Closed || data.is_empty() {
            return;
        }
        if self.relay.legs[leg.idx()].framing.is_some() {
            // One frame at a time: a client may send several commands in one
            // write (COM_STMT_SEND_LONG_DATA then COM_STMT_EXECUTE), and each
            // new command restarts the compressed sequence at 0.
            let mut input = data;
            // One decompression buffer per compressed leg, reused across reads.
            let mut plain = self.relay.take_plain(leg);
            while !input.is_empty() && self.phase != Phase::Closed {
                let starts = leg == Leg::Client && self.client_starts_command();
                let Some(f) = self.relay.legs[leg.idx()].framing.as_mut() else {
                    break;
                };
                if starts && f.buffered() == 0 {
                    f.reset_seq();
                }
                match f.decode_one(input, &mut plain) {
                    Ok((used, _)) => {
                        input = &input[used..];
                        if !plain.is_empty() {
                            self.process(now, leg, &plain);
                            plain.clear();
                        }
                    }
                    Err(e) => {
                        self.protocol_error(leg, e.to_string());
                        break;
                    }
                }
            }
            plain.clear();
            self.relay.keep_plain(leg, plain);
        } else {
            self.process(now, leg, data);
        }
        self.flush();
    }

    /// The driver connected `leg` ([`Leg::Backend`] or [`Leg::NewBackend`]).
    pub fn handle_connected(&mut self, now: Instant, leg: Leg) {
        let _ = now;
        if let Some(expect) = self.backend_handshake(leg)
            && *expect == Expect::Connect
        {
            *expect = Expect::Greeting;
            if let Some(h) = &self.cfg.proxy_header {
                let mut b = BytesMut::with_capacity(52);
                h.write(&mut b);
                self.relay.legs[leg.idx()].out.put(&b);
            }
        }
        self.flush();
    }

    /// The client's PROXY header, found in its first bytes after the
    /// greeting went out (the header is optional, so it cannot be waited
    /// for): backend handshakes from now on open with `header` instead of
    /// the configured one.
    pub fn handle_proxy_header(&mut self, header: ProxyHeader) {
        self.cfg.proxy_header = Some(Box::new(header));
    }

    /// The driver could not connect `leg`.
    pub fn handle_connect_failed(&mut self, now: Instant, leg: Leg, reason: &str) {
        if self
            .backend_handshake(leg)
            .is_some_and(|e| *e == Expect::Connect)
        {
            match leg {
                Leg::NewBackend => {
                    self.fail_migration(now, MigrationFailure::Connect(reason.to_string()))
                }
                _ => self.refuse(ProxyError::NoBackend(reason.to_string())),
            }
        }
        self.flush();
    }

    /// Like [`Session::handle_connect_failed`], when the proxy itself could
    /// not dial (out of file descriptors, say): the client of a first
    /// backend dial is refused with `err` (1040), not told that no backend
    /// is available.
    pub fn handle_connect_refused(&mut self, now: Instant, leg: Leg, err: ProxyError) {
        if leg == Leg::NewBackend {
            return self.handle_connect_failed(now, leg, &err.to_string());
        }
        if self
            .backend_handshake(leg)
            .is_some_and(|e| *e == Expect::Connect)
        {
            self.refuse(err);
        }
        self.flush();
    }

    /// The driver finished the TLS upgrade requested by [`Action::StartTls`].
    pub fn handle_tls_established(&mut self, now: Instant, leg: Leg) {
        self.relay.legs[leg.idx()].tls = true;
        if leg == Leg::Client {
            if self.phase == Phase::ClientTls {
                self.phase = Phase::ClientHello;
                self.drain_held(now);
            }
        } else if self
            .backend_handshake(leg)
            .is_some_and(|e| *e == Expect::Tls)
        {
            self.send_backend_response(leg);
        }
        self.flush();
    }

    /// `leg`'s socket closed or failed (`reason` for logs).
    pub fn handle_closed(&mut self, now: Instant, leg: Leg, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        match leg {
            Leg::Client => self.close(SessionError::ClientClosed),
            Leg::Backend => self.backend_lost(now, reason),
            Leg::NewBackend => {
                if self.migration.active() {
                    self.fail_migration(now, MigrationFailure::NewBackendLost(reason.to_string()));
                }
            }
        }
        self.flush();
    }

    /// A timer armed from [`Session::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.handshake_deadline
            && now >= d
        {
            self.handshake_deadline = None;
            if self.phase != Phase::Command && self.phase != Phase::Closed {
                self.refuse(ProxyError::HandshakeTimeout(
                    self.cfg.handshake_timeout.as_millis() as u64,
                ));
            }
        }
        if let Some(w) = self.protect_wake()
            && now >= w
        {
            if self
                .protect
                .wake(&self.cfg.protect)
                .is_some_and(|r| now >= r)
            {
                // The copy's token nears its end: renew it now if the
                // session is idle, else at its next safe point.
                self.protect.wake_armed = false;
            }
            // A quiet period that ended: the export starts.
            self.at_boundary(now);
        }
        if let Some(d) = self.migration.deadline()
            && now >= d
        {
            if self.migration.on_old_backend() {
                // The old backend is not answering its own session: its reply
                // may still come and could not be told apart from the next
                // response, so the session cannot continue there.
                // A renewal that hangs (a TiDB whose network is cut) leaves
                // the copy it would have replaced: the session is restored
                // elsewhere if that copy still serves.
                let renewal = matches!(self.migration, Migration::Refresh { .. });
                let commit = self.migration.hidden_commit();
                self.migration = Migration::None;
                if commit {
                    // The held BEGIN's implicit commit got no answer.
                    self.close_client_with(ProxyError::BackendLost(
                        "TiDB did not answer the COMMIT before BEGIN".into(),
                    ));
                } else {
                    let why = "TiDB did not answer SHOW SESSION_STATES";
                    if !(renewal && self.try_restore(now, why)) {
                        self.close_client_with(ProxyError::HeldNotRun(why.into()));
                    }
                }
            } else if matches!(self.migration, Migration::AwaitTarget { .. }) {
                // The driver never named a backend to restore on.
                self.handle_restore_target(now, None);
            } else if self.migration.active() {
                self.fail_migration(now, MigrationFailure::TimedOut);
            }
        }
        self.flush();
    }

    /// Asks the session to move to `target` at its next safe point. Returns
    /// false when a move is already under way.
    pub fn handle_redirect(&mut self, now: Instant, target: impl Into<T>) -> bool {
        if let Migration::Refresh { then, .. } = &mut self.migration {
            // The move starts once the state copy is taken.
            *then = Some(target.into());
            return true;
        }
        if self.migration.active() || self.phase == Phase::Closed {
            return false;
        }
        self.migration = Migration::Pending {
            target: target.into(),
        };
        self.at_boundary(now);
        self.flush();
        true
    }

    /// Withdraws a pending move (one not yet started).
    pub fn handle_cancel_redirect(&mut self) {
        match &mut self.migration {
            Migration::Pending { .. } => self.migration = Migration::None,
            Migration::Refresh { then, .. } => *then = None,
            _ => {}
        }
    }

    /// Closes the session at its next safe point (graceful shutdown).
    pub fn handle_close_at_safe_point(&mut self, now: Instant) {
        self.close_at_safe_point = true;
        if self.phase != Phase::Command {
            // Not authenticated yet: nothing to protect.
            self.refuse(ProxyError::ShuttingDown);
        } else {
            self.at_boundary(now);
        }
        self.flush();
    }

    /// Closes the session now (operator, forced shutdown).
    pub fn handle_close(&mut self, reason: &str) {
        self.close(SessionError::Closed(reason.to_string()));
    }

    // ----------------------------------------------------------------
    // Helpers
    // ----------------------------------------------------------------

    /// Processes client bytes that waited. Bytes that must wait again stay
    /// where they are (parked bytes are copied once, on arrival).
    fn drain_held(&mut self, now: Instant) {
        if self.relay.draining || self.relay.held.is_empty() || !self.client_packet_allowed() {
            return;
        }
        let mut held = std::mem::take(&mut self.relay.held);
        self.relay.draining = true;
        let left = self.process(now, Leg::Client, &held);
        self.relay.draining = false;
        held.advance(held.len() - left);
        self.relay.rehold(held);
    }

    fn command_done(&mut self, now: Instant, ok: bool) {
        self.command_done_as(now, ok, self.tracker.command());
    }

    /// Reports a finished command; `command` when the tracker does not
    /// record it (commands without a response).
    fn command_done_as(&mut self, now: Instant, ok: bool, command: Option<Command>) {
        if self.cfg.protect.enabled {
            let elapsed = self
                .command_started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
            self.protect
                .on_done(elapsed, command, ok, self.response_started);
        }
        if let Some(start) = self.command_started {
            self.tap_done(ok, now.saturating_duration_since(start));
        }
        if let (Some(cmd), Some(start)) = (command, self.command_started) {
            let done = Event::CommandDone {
                command: cmd,
                ok,
                elapsed: now.saturating_duration_since(start),
            };
            // One slot for the common case keeps the event queue (and its
            // allocation) for rare events only.
            if let Some(older) = self.command_done.replace(done) {
                self.events.push_back(older);
            }
        }
    }

    /// Writes a whole packet payload to `leg` with the leg's next sequence id.
    fn send(&mut self, leg: Leg, payload: &[u8]) {
        self.relay.legs[leg.idx()].send(payload);
    }

    fn send_error(&mut self, leg: Leg, err: &ProxyError) {
        let mut b = BytesMut::with_capacity(128);
        if self.client_caps.contains(CapabilityFlags::PROTOCOL_41)
            || self.phase != Phase::ClientHello
        {
            err.write(&mut b);
        } else {
            // Pre-4.1 clients read no SQL state.
            let e = err.to_err_packet();
            b.put_u8(ERR_HEADER);
            b.put_u16_le(e.code);
            b.put_slice(&e.message);
        }
        self.send(leg, &b);
    }

    /// Refuses the client during the handshake: ERR, then close.
    fn refuse(&mut self, err: ProxyError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.send_error(Leg::Client, &err);
        self.close(SessionError::Refused(err));
    }

    /// Sends the client an error for its pending command and closes.
    fn close_client_with(&mut self, err: ProxyError) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::Command {
            if self.tracker.is_idle() && self.relay.held.is_empty() {
                // No command is waiting for an answer: an error now would be
                // read as the answer to the next one. Just close.
                self.close(SessionError::BackendLost(err.to_string()));
                return;
            }
            if self.tracker.is_idle() {
                // The error answers the held command.
                self.relay.legs[0].seq = 1;
            }
        }
        self.send_error(Leg::Client, &err);
        self.close(SessionError::Refused(err));
    }

    fn close(&mut self, reason: SessionError) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.handshake_deadline = None;
        self.migration = Migration::None;
        self.relay.held = BytesMut::new();
        self.events.push_back(Event::Closed { reason });
        self.actions.push_back(Action::Close);
        self.flush();
    }

    fn protocol_error(&mut self, leg: Leg, why: String) {
        match leg {
            Leg::Client => self.close(SessionError::ClientProtocol(why)),
            Leg::Backend => self.backend_protocol_error(why),
            Leg::NewBackend => {}
        }
    }

    fn backend_protocol_error(&mut self, why: String) {
        if self.phase == Phase::Command && !self.response_started {
            self.close_client_with(ProxyError::BackendProtocol(why));
        } else if self.phase != Phase::Command {
            self.refuse(ProxyError::BackendProtocol(why));
        } else {
            self.close(SessionError::BackendProtocol(why));
        }
    }
}

// outside core/src, which must not.
#[cfg(test)]
#[path = "../../tests/unit/session.rs"]
mod tests;
