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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rand_core::RngCore;

use crate::command::Command;
use crate::compress::{Algorithm, CompressedFraming};
use crate::error::{ProxyError, SessionError};
use crate::flags::{CapabilityFlags, StatusFlags};
use crate::handshake::{
    ChangeUser, ClientHello, HandshakeResponse, InitialHandshake, SslRequest, plugin,
};
use crate::migration::{
    ExportedSession, MigrationFailure, SHOW_SESSION_STATES, StatesProgress, StatesReader,
};
use crate::packet::{HEADER_LEN, MAX_PAYLOAD, PacketHeader, write_packet};
use crate::proxy_protocol::ProxyHeader;
use crate::response::{ERR_HEADER, ErrPacket, OK_HEADER, OkPacket};
use crate::tracker::{BackendPacket, ClientPacket, CommandTracker};

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

/// When the proxy uses TLS towards backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendTls {
    /// Never.
    #[default]
    Off,
    /// When the client used TLS and the backend offers it (TiProxy's default).
    MatchClient,
    /// Always; a backend without TLS is an error (`require-backend-tls`).
    Required,
}

/// Settings of one session, fixed at creation.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Connection id shown to the client (allocated by the proxy).
    pub connection_id: u32,
    /// Server version announced to the client; taken from a backend.
    pub server_version: Bytes,
    /// Capabilities announced to the client. Intersected with
    /// [`CapabilityFlags::PROXY_SUPPORTED`]; the driver removes what the
    /// backends lack (learned from their greetings) and `SSL` when no server
    /// certificate is configured.
    pub capabilities: CapabilityFlags,
    /// Collation announced in the greeting.
    pub charset: u8,
    /// Whether the client may upgrade to TLS.
    pub server_tls: bool,
    /// TLS towards backends.
    pub backend_tls: BackendTls,
    /// PROXY v2 header written before every backend handshake.
    pub proxy_header: Option<ProxyHeader>,
    /// Largest handshake packet accepted from a client.
    pub max_handshake_len: usize,
    /// Time allowed from accept to an authenticated session.
    pub handshake_timeout: Duration,
    /// Time allowed for one move.
    pub migration_timeout: Duration,
    /// Use zlib compression towards backends that support it.
    pub compress_backend: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            connection_id: 1,
            server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED - CapabilityFlags::SSL,
            charset: 46,
            server_tls: false,
            backend_tls: BackendTls::Off,
            proxy_header: None,
            max_handshake_len: 64 * 1024,
            handshake_timeout: Duration::from_secs(15),
            migration_timeout: Duration::from_secs(10),
            compress_backend: false,
        }
    }
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Connect the session's first backend (the driver's router picks it),
    /// then call [`Session::handle_connected`] or
    /// [`Session::handle_connect_failed`] with [`Leg::Backend`].
    ConnectBackend,
    /// Connect the backend the session moves to, then report on
    /// [`Leg::NewBackend`].
    ConnectNewBackend {
        /// The backend chosen by [`Session::handle_redirect`].
        target: String,
    },
    /// Upgrade a leg to TLS (server side on the client leg, client side on
    /// backend legs): first write what [`Session::transmit`] holds for the
    /// leg (the SSL request), then run the TLS handshake using `early_data`
    /// as the first bytes read, then call [`Session::handle_tls_established`].
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
}

/// Something the router, metrics or logs may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
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
    /// A session that was waiting to move or close reached a safe point.
    SafePoint,
    /// The session began to move.
    MigrationStarted {
        /// Where to.
        target: String,
    },
    /// The session now runs on `target`.
    Migrated {
        /// The new backend.
        target: String,
    },
    /// A move failed; the session stays where it was (unless it is closed
    /// with [`Event::Closed`]).
    MigrationFailed {
        /// Where it tried to go.
        target: String,
        /// Why.
        reason: MigrationFailure,
    },
    /// The session ended.
    Closed {
        /// Why.
        reason: SessionError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting sent; expecting an SSL request or a handshake response.
    ClientHello,
    /// Waiting for the driver to finish TLS with the client.
    ClientTls,
    /// Waiting for the driver to connect the first backend.
    ConnectingBackend,
    /// Expecting the backend's greeting.
    BackendGreeting,
    /// Waiting for the driver to finish TLS with the backend.
    BackendTls,
    /// Relaying authentication between client and backend.
    Auth,
    /// Command phase.
    Command,
    /// Closed.
    Closed,
}

/// The stage of a move.
#[derive(Debug)]
enum Migration {
    None,
    /// Requested; waiting for a safe point.
    Pending {
        target: String,
    },
    /// The client sent BEGIN inside a transaction while a move was pending:
    /// its implicit commit was sent as a COMMIT of the proxy's own; the
    /// BEGIN (`begin_len` bytes at the front of `held`) runs after the move.
    HiddenCommit {
        target: String,
        begin_len: usize,
    },
    /// SHOW SESSION_STATES sent to the old backend.
    Export {
        target: String,
        reader: StatesReader,
    },
    /// Waiting for the driver to connect the new backend.
    Connecting {
        target: String,
        session: ExportedSession,
    },
    /// Expecting the new backend's greeting.
    Greeting {
        target: String,
        session: ExportedSession,
    },
    /// Waiting for TLS on the new backend.
    Tls {
        target: String,
        session: ExportedSession,
    },
    /// Token sent; expecting OK.
    Auth {
        target: String,
        session: ExportedSession,
    },
    /// SET SESSION_STATES sent; expecting OK.
    Import {
        target: String,
    },
}

impl Migration {
    fn target(&self) -> Option<&str> {
        match self {
            Migration::None => None,
            Migration::Pending { target }
            | Migration::HiddenCommit { target, .. }
            | Migration::Export { target, .. }
            | Migration::Connecting { target, .. }
            | Migration::Greeting { target, .. }
            | Migration::Tls { target, .. }
            | Migration::Auth { target, .. }
            | Migration::Import { target } => Some(target),
        }
    }

    /// A move is under way (client input waits).
    fn active(&self) -> bool {
        !matches!(self, Migration::None | Migration::Pending { .. })
    }
}

/// What to do with a packet after looking at its header and prefix.
enum Disposition {
    /// Write header (sequence id rewritten) and prefix to the leg, and pass
    /// the rest of the packet to it.
    Forward(Leg),
    /// The packet was consumed by the proxy; skip any rest of it.
    Consumed,
}

/// Receive-side framing state of a leg.
#[derive(Debug, Default)]
struct Rx {
    /// An incomplete header and payload prefix.
    stash: BytesMut,
    /// Payload bytes of the current packet still to pass through.
    pass: usize,
    /// Where they go (`None`: dropped).
    pass_to: Option<Leg>,
}

#[derive(Debug, Default)]
struct LegState {
    /// Bytes ready for the socket.
    out: BytesMut,
    /// Plain bytes waiting to be compressed (compressed legs only).
    staging: BytesMut,
    /// Compressed framing, once switched on.
    framing: Option<Box<CompressedFraming>>,
    /// Compression negotiated, to switch on after authentication.
    compression: Option<Algorithm>,
    /// Restart the compressed sequence before encoding `staging`.
    reset_out_seq: bool,
    rx: Rx,
    /// Next packet sequence id on this leg.
    seq: u8,
    /// Whether the leg is TLS.
    tls: bool,
}

impl LegState {
    /// The sequence id for the next packet written to this leg. On a
    /// compressed leg, a packet that opens a frame and ends in it takes the
    /// frame's compressed sequence id, as servers do (they resynchronise the
    /// two counters whenever they flush) and as clients expect after a
    /// result set with MORE_RESULTS_EXISTS; a packet that continues into
    /// later frames keeps the running count, which clients check when its
    /// last byte arrives. `whole`: the packet is written now, all of it, and
    /// fits in one frame.
    fn next_seq(&mut self, whole: bool) -> u8 {
        if let Some(f) = &self.framing
            && self.staging.is_empty()
            && whole
        {
            self.seq = if self.reset_out_seq { 0 } else { f.seq() };
        }
        let seq = self.seq;
        self.seq = seq.wrapping_add(1);
        seq
    }

    fn writer(&mut self) -> &mut BytesMut {
        if self.framing.is_some() {
            &mut self.staging
        } else {
            &mut self.out
        }
    }
}

/// Buffers larger than this are released once drained, so idle sessions
/// stay small.
const RELEASE_CAPACITY: usize = 16 * 1024;

/// A client session. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    salt: [u8; 20],
    legs: [LegState; 3],
    /// The client's handshake response, kept to re-authenticate on moves.
    hello: Option<HandshakeResponse>,
    /// Capabilities agreed with the client.
    client_caps: CapabilityFlags,
    /// Capabilities sent to the backend (without SSL and compression).
    backend_caps: CapabilityFlags,
    user: Bytes,
    database: Option<Bytes>,
    /// COM_CHANGE_USER in flight: the user and database it asked for.
    pending_user: Option<(Bytes, Bytes)>,
    tracker: CommandTracker,
    migration: Migration,
    close_at_safe_point: bool,
    /// The old backend was lost while a move was under way.
    old_backend_lost: bool,
    /// Client bytes (plain) waiting until the session can take them.
    held: BytesMut,
    /// Whether any byte of the current response reached the client.
    response_started: bool,
    command_started: Option<Instant>,
    handshake_deadline: Option<Instant>,
    migration_deadline: Option<Instant>,
    /// A TLS upgrade to request once the current input stops.
    tls_request: Option<Leg>,
    /// A response just ended: act on the boundary once it is forwarded.
    boundary_pending: bool,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    /// The last finished command, not yet polled.
    command_done: Option<Event>,
    /// The bug planted by the simulation's mutation test.
    #[cfg(feature = "sim-mutations")]
    planted: Option<PlantedBug>,
}

/// A deliberate bug the simulation plants in a session to prove that its
/// seed sweeps catch it (mutation testing). Planting needs the
/// `sim-mutations` feature; without it nothing can plant one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A pending move does not wait for the transaction to end: at the
    /// client's next statement the proxy commits the open transaction
    /// behind its back and moves (TiProxy's BEGIN trick applied to any
    /// statement). TiDB refuses to export a session inside a transaction,
    /// so ending it first is the only way a proxy can get this wrong.
    MoveInsideTransaction,
    /// `SET SESSION_STATES` loses the session's first user variable.
    ForgetUserVariable,
}

impl Session {
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
        let mut s = Self {
            phase: Phase::ClientHello,
            salt,
            legs: Default::default(),
            hello: None,
            client_caps: CapabilityFlags::empty(),
            backend_caps: CapabilityFlags::empty(),
            user: Bytes::new(),
            database: None,
            pending_user: None,
            tracker: CommandTracker::new(false, StatusFlags::AUTOCOMMIT),
            migration: Migration::None,
            close_at_safe_point: false,
            old_backend_lost: false,
            held: BytesMut::new(),
            response_started: false,
            command_started: None,
            handshake_deadline: Some(now + cfg.handshake_timeout),
            migration_deadline: None,
            tls_request: None,
            boundary_pending: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            command_done: None,
            #[cfg(feature = "sim-mutations")]
            planted: None,
            cfg,
        };
        s.cfg.capabilities &= CapabilityFlags::PROXY_SUPPORTED;
        if !s.cfg.server_tls {
            s.cfg.capabilities -= CapabilityFlags::SSL;
        }
        let greeting = InitialHandshake {
            server_version: s.cfg.server_version.clone(),
            connection_id: s.cfg.connection_id,
            auth_data: Bytes::copy_from_slice(&s.salt),
            capabilities: s.cfg.capabilities,
            charset: s.cfg.charset,
            status: StatusFlags::AUTOCOMMIT,
            reserved: [0; 10],
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
            && self.held.is_empty()
            && !self.close_at_safe_point
    }

    /// The target of a pending or running move.
    pub fn migration_target(&self) -> Option<&str> {
        self.migration.target()
    }

    // ----------------------------------------------------------------
    // Outputs
    // ----------------------------------------------------------------

    /// The next action for the driver.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        let a = self.actions.pop_front();
        if a.is_none() && self.actions.capacity() > 0 && self.phase == Phase::Command {
            // Established sessions rarely act: give the memory back.
            self.actions = VecDeque::new();
        }
        a
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
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
        match (self.handshake_deadline, self.migration_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes to write to `leg`.
    #[must_use]
    pub fn transmit(&self, leg: Leg) -> &[u8] {
        &self.legs[leg.idx()].out
    }

    /// Marks `n` bytes of [`Session::transmit`] as written.
    pub fn advance_transmit(&mut self, leg: Leg, n: usize) {
        let out = &mut self.legs[leg.idx()].out;
        let _ = out.split_to(n.min(out.len()));
        if out.is_empty() && out.capacity() > RELEASE_CAPACITY {
            *out = BytesMut::new();
        }
    }

    /// Bytes held in the session's buffers (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.held.capacity()
            + self
                .legs
                .iter()
                .map(|l| l.out.capacity() + l.staging.capacity() + l.rx.stash.capacity())
                .sum::<usize>()
    }

    // ----------------------------------------------------------------
    // Inputs
    // ----------------------------------------------------------------

    /// Bytes read from `leg` (after TLS).
    pub fn handle_data(&mut self, now: Instant, leg: Leg, data: &[u8]) {
        if self.phase == Phase::Closed || data.is_empty() {
            return;
        }
        if self.legs[leg.idx()].framing.is_some() {
            // One frame at a time: a client may send several commands in one
            // write (COM_STMT_SEND_LONG_DATA then COM_STMT_EXECUTE), and each
            // new command restarts the compressed sequence at 0.
            let mut input = data;
            let mut plain = BytesMut::new();
            while !input.is_empty() && self.phase != Phase::Closed {
                let starts = leg == Leg::Client && self.client_starts_command();
                let Some(f) = self.legs[leg.idx()].framing.as_mut() else {
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
        } else {
            self.process(now, leg, data);
        }
        self.flush();
    }

    /// The driver connected `leg` ([`Leg::Backend`] or [`Leg::NewBackend`]).
    pub fn handle_connected(&mut self, now: Instant, leg: Leg) {
        let _ = now;
        if let Some(h) = self.cfg.proxy_header {
            let mut b = BytesMut::with_capacity(52);
            h.write(&mut b);
            self.legs[leg.idx()].out.extend_from_slice(&b);
        }
        match (leg, &self.migration) {
            (Leg::Backend, _) if self.phase == Phase::ConnectingBackend => {
                self.phase = Phase::BackendGreeting
            }
            (Leg::NewBackend, Migration::Connecting { .. }) => {
                let Migration::Connecting { target, session } =
                    std::mem::replace(&mut self.migration, Migration::None)
                else {
                    unreachable!("matched above")
                };
                self.migration = Migration::Greeting { target, session };
            }
            _ => {}
        }
        self.flush();
    }

    /// The driver could not connect `leg`.
    pub fn handle_connect_failed(&mut self, now: Instant, leg: Leg, reason: &str) {
        match leg {
            Leg::Backend if self.phase == Phase::ConnectingBackend => {
                self.refuse(ProxyError::NoBackend(reason.to_string()));
            }
            Leg::NewBackend if matches!(self.migration, Migration::Connecting { .. }) => {
                self.fail_migration(now, MigrationFailure::Connect(reason.to_string()));
            }
            _ => {}
        }
        self.flush();
    }

    /// Like [`Session::handle_connect_failed`], when the proxy itself could
    /// not dial (out of file descriptors, say): the client of a first
    /// backend dial is refused with `err` (1040), not told that no backend
    /// is available.
    pub fn handle_connect_refused(&mut self, now: Instant, leg: Leg, err: ProxyError) {
        match leg {
            Leg::Backend if self.phase == Phase::ConnectingBackend => self.refuse(err),
            _ => return self.handle_connect_failed(now, leg, &err.to_string()),
        }
        self.flush();
    }

    /// The driver finished the TLS upgrade requested by [`Action::StartTls`].
    pub fn handle_tls_established(&mut self, now: Instant, leg: Leg) {
        self.legs[leg.idx()].tls = true;
        match leg {
            Leg::Client if self.phase == Phase::ClientTls => {
                self.phase = Phase::ClientHello;
                self.drain_held(now);
            }
            Leg::Backend if self.phase == Phase::BackendTls => self.send_handshake_response(),
            Leg::NewBackend if matches!(self.migration, Migration::Tls { .. }) => {
                self.send_token_response()
            }
            _ => {}
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
        if let Some(d) = self.migration_deadline
            && now >= d
        {
            self.migration_deadline = None;
            if matches!(
                self.migration,
                Migration::Export { .. } | Migration::HiddenCommit { .. }
            ) {
                // The old backend is not answering its own session: its reply
                // may still come and could not be told apart from the next
                // response, so the session cannot continue there.
                self.migration = Migration::None;
                self.close_client_with(ProxyError::BackendLost(
                    "TiDB did not answer SHOW SESSION_STATES".into(),
                ));
            } else if self.migration.active() {
                self.fail_migration(now, MigrationFailure::TimedOut);
            }
        }
        self.flush();
    }

    /// Asks the session to move to `target` at its next safe point. Returns
    /// false when a move is already under way.
    pub fn handle_redirect(&mut self, now: Instant, target: impl Into<String>) -> bool {
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
        if matches!(self.migration, Migration::Pending { .. }) {
            self.migration = Migration::None;
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
    // Packet stream
    // ----------------------------------------------------------------

    /// Whether a client packet may be processed now.
    fn client_packet_allowed(&self) -> bool {
        match self.phase {
            Phase::ClientHello | Phase::Auth => true,
            Phase::Command => !self.migration.active() && self.tracker.accepts_client_packet(),
            _ => false,
        }
    }

    fn client_starts_command(&self) -> bool {
        self.phase == Phase::Command && self.tracker.is_idle() && self.held.is_empty()
    }

    /// Processes plain bytes read from `leg`.
    fn process(&mut self, now: Instant, leg: Leg, mut data: &[u8]) {
        let i = leg.idx();
        while !data.is_empty() {
            if self.phase == Phase::Closed {
                return;
            }
            // Pass through the rest of the current packet.
            if self.legs[i].rx.pass > 0 {
                let n = self.legs[i].rx.pass.min(data.len());
                if let Some(to) = self.legs[i].rx.pass_to {
                    self.legs[to.idx()].writer().extend_from_slice(&data[..n]);
                }
                self.legs[i].rx.pass -= n;
                data = &data[n..];
                continue;
            }
            if self.boundary_pending && leg == Leg::Backend {
                self.boundary_pending = false;
                self.at_boundary(now);
                self.drain_held(now);
                continue;
            }
            if self.tls_request.is_some() {
                break;
            }
            if leg == Leg::Client
                && self.legs[i].rx.stash.is_empty()
                && !self.client_packet_allowed()
            {
                self.held.extend_from_slice(data);
                return;
            }
            // Header and first payload byte.
            let stash_len = self.legs[i].rx.stash.len();
            let avail = stash_len + data.len();
            if avail < HEADER_LEN {
                self.legs[i].rx.stash.extend_from_slice(data);
                return;
            }
            let header = if stash_len >= HEADER_LEN {
                PacketHeader::parse(&self.legs[i].rx.stash)
            } else {
                let mut h = [0u8; HEADER_LEN];
                h[..stash_len].copy_from_slice(&self.legs[i].rx.stash);
                h[stash_len..].copy_from_slice(&data[..HEADER_LEN - stash_len]);
                PacketHeader::parse(&h)
            };
            // Four bytes are present.
            let header = header.expect("four header bytes");
            if let Err(e) = self.check_size(leg, header) {
                self.refuse(e);
                return;
            }
            let first = if header.len == 0 {
                None
            } else if avail > HEADER_LEN {
                Some(if stash_len > HEADER_LEN {
                    self.legs[i].rx.stash[HEADER_LEN]
                } else {
                    data[HEADER_LEN - stash_len]
                })
            } else {
                self.legs[i].rx.stash.extend_from_slice(data);
                return;
            };
            let need = self.prefix_needed(leg, header, first).min(header.len);
            let want = HEADER_LEN + need;
            let disposition;
            if stash_len == 0 && data.len() >= want {
                // Fast path: the header and prefix are contiguous in the input.
                let (pkt, rest) = data.split_at(want);
                disposition = self.on_packet(now, leg, header, &pkt[HEADER_LEN..]);
                if let Disposition::Forward(to) = disposition
                    && data.len() >= HEADER_LEN + header.len
                {
                    // The whole packet is here: one copy, sequence id patched.
                    let whole = HEADER_LEN + header.len;
                    let l = &mut self.legs[to.idx()];
                    let seq = l.next_seq(whole <= MAX_PAYLOAD);
                    let w = l.writer();
                    let at = w.len();
                    w.extend_from_slice(&data[..whole]);
                    w[at + 3] = seq;
                    data = &data[whole..];
                    continue;
                }
                self.emit(leg, header, pkt, disposition, need);
                data = rest;
            } else {
                let take = (want - stash_len).min(data.len());
                self.legs[i].rx.stash.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.legs[i].rx.stash.len() < want {
                    return;
                }
                let pkt = std::mem::take(&mut self.legs[i].rx.stash);
                disposition = self.on_packet(now, leg, header, &pkt[HEADER_LEN..]);
                self.emit(leg, header, &pkt, disposition, need);
                let mut pkt = pkt;
                pkt.clear();
                if pkt.capacity() <= RELEASE_CAPACITY {
                    self.legs[i].rx.stash = pkt;
                }
            }
        }
        if self.boundary_pending && leg == Leg::Backend && self.legs[i].rx.pass == 0 {
            self.boundary_pending = false;
            self.at_boundary(now);
            self.drain_held(now);
        }
        if let Some(tls_leg) = self.tls_request.take() {
            // Whatever follows the SSL request is the start of the TLS stream.
            self.actions.push_back(Action::StartTls {
                leg: tls_leg,
                early_data: Bytes::copy_from_slice(data),
            });
        }
    }

    /// Writes a forwarded packet's header and prefix and sets up the pass
    /// through of its remainder.
    fn emit(
        &mut self,
        from: Leg,
        header: PacketHeader,
        pkt: &[u8],
        disposition: Disposition,
        need: usize,
    ) {
        let rest = header.len - need;
        match disposition {
            Disposition::Forward(to) => {
                let seq = self.legs[to.idx()].next_seq(rest == 0 && pkt.len() <= MAX_PAYLOAD);
                let w = self.legs[to.idx()].writer();
                w.reserve(pkt.len());
                w.put_slice(
                    &PacketHeader {
                        len: header.len,
                        seq,
                    }
                    .to_bytes(),
                );
                w.put_slice(&pkt[HEADER_LEN..]);
                let rx = &mut self.legs[from.idx()].rx;
                rx.pass = rest;
                rx.pass_to = Some(to);
            }
            Disposition::Consumed => {
                let rx = &mut self.legs[from.idx()].rx;
                rx.pass = rest;
                rx.pass_to = None;
            }
        }
    }

    fn check_size(&self, leg: Leg, header: PacketHeader) -> Result<(), ProxyError> {
        let handshaking = matches!(self.phase, Phase::ClientHello | Phase::Auth);
        if leg == Leg::Client && handshaking && header.len > self.cfg.max_handshake_len {
            return Err(ProxyError::HandshakeTooLarge {
                len: header.len,
                limit: self.cfg.max_handshake_len,
            });
        }
        Ok(())
    }

    /// How many payload bytes of a packet the session must see.
    fn prefix_needed(&self, leg: Leg, header: PacketHeader, first: Option<u8>) -> usize {
        let whole = header.len;
        if leg == Leg::NewBackend || self.phase != Phase::Command {
            return whole;
        }
        if leg == Leg::Backend {
            if matches!(
                self.migration,
                Migration::Export { .. } | Migration::HiddenCommit { .. }
            ) {
                return whole;
            }
            return match first {
                Some(b) if self.tracker.backend_needs_whole(header.len, b) => whole,
                Some(_) => 1,
                None => 0,
            };
        }
        // Client, command phase.
        if self.begin_trick_applies()
            && first == Some(Command::Query.to_byte())
            && (header.len <= BEGIN_PREFIX
                || (self.planted(PlantedBug::MoveInsideTransaction) && header.len < MAX_PAYLOAD))
        {
            return whole;
        }
        if self.tracker.is_idle()
            && first == Some(Command::ChangeUser.to_byte())
            && header.len < MAX_PAYLOAD
        {
            return whole;
        }
        self.tracker.client_prefix_needed(header.len)
    }

    /// Handles one packet (`prefix` holds the bytes asked for).
    fn on_packet(
        &mut self,
        now: Instant,
        leg: Leg,
        header: PacketHeader,
        prefix: &[u8],
    ) -> Disposition {
        match leg {
            Leg::Client => self.on_client_packet(now, header, prefix),
            Leg::Backend => self.on_backend_packet(now, header, prefix),
            Leg::NewBackend => {
                self.on_new_backend_packet(now, header, prefix);
                Disposition::Consumed
            }
        }
    }

    /// Checks the sequence id of a packet read from `leg` and advances it.
    fn check_seq(&mut self, leg: Leg, header: PacketHeader) -> bool {
        let l = &mut self.legs[leg.idx()];
        // Servers resynchronise packet ids with compressed ids, so they are
        // only checked on plain legs.
        let ok = l.framing.is_some() || l.seq == header.seq;
        l.seq = header.seq.wrapping_add(1);
        ok
    }

    // ----------------------------------------------------------------
    // Client packets
    // ----------------------------------------------------------------

    fn on_client_packet(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        if self.phase == Phase::Command && self.tracker.is_idle() {
            // A new command: both legs restart their sequences.
            self.legs[0].seq = 0;
            self.legs[1].seq = 0;
            self.legs[1].reset_out_seq = true;
            self.response_started = false;
            self.command_started = Some(now);
        }
        let expected = self.legs[0].seq;
        if !self.check_seq(Leg::Client, header) {
            self.refuse(ProxyError::OutOfOrder(
                crate::packet::FramingError::OutOfOrder {
                    expected,
                    got: header.seq,
                },
            ));
            return Disposition::Consumed;
        }
        match self.phase {
            Phase::ClientHello => {
                self.on_client_hello(payload);
                Disposition::Consumed
            }
            Phase::Auth => Disposition::Forward(Leg::Backend),
            Phase::Command => self.on_client_command(now, header, payload),
            _ => Disposition::Consumed,
        }
    }

    fn on_client_hello(&mut self, payload: &[u8]) {
        let caps = match crate::handshake::client_capabilities(payload) {
            Ok(c) => c,
            Err(e) => return self.refuse(e.into()),
        };
        if !caps.contains(CapabilityFlags::PROTOCOL_41) {
            return self.refuse(ProxyError::ClientTooOld);
        }
        match ClientHello::parse(payload) {
            Err(e) => self.refuse(e.into()),
            Ok(ClientHello::Ssl(_)) => {
                if !self.cfg.server_tls || self.legs[0].tls {
                    return self.refuse(ProxyError::TlsNotConfigured);
                }
                self.phase = Phase::ClientTls;
                self.tls_request = Some(Leg::Client);
            }
            Ok(ClientHello::Response(resp)) => {
                if !resp.capabilities.contains(CapabilityFlags::PLUGIN_AUTH) {
                    return self.refuse(ProxyError::Incompatible(
                        "the client does not support pluggable authentication (CLIENT_PLUGIN_AUTH)"
                            .into(),
                    ));
                }
                self.client_caps = resp.capabilities & self.cfg.capabilities;
                self.user = resp.username.clone();
                self.database = resp.database.clone().filter(|d| !d.is_empty());
                self.hello = Some(resp);
                self.phase = Phase::ConnectingBackend;
                self.actions.push_back(Action::ConnectBackend);
            }
        }
    }

    fn on_client_command(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        let starting = self.tracker.is_idle();
        if self.begin_trick_applies()
            && payload.len() == header.len
            && (is_begin(payload) || self.planted(PlantedBug::MoveInsideTransaction))
        {
            // TiProxy's trick: BEGIN would commit the open transaction
            // anyway, so commit it now, move, and run BEGIN on the new
            // backend; a session that chains transactions with BEGIN would
            // otherwise never reach a safe point.
            let Migration::Pending { target } =
                std::mem::replace(&mut self.migration, Migration::None)
            else {
                unreachable!("begin_trick_applies checked the stage")
            };
            let mut begin = BytesMut::with_capacity(HEADER_LEN + payload.len());
            write_packet(&mut begin, 0, payload);
            let begin_len = begin.len();
            let mut held = begin;
            held.extend_from_slice(&self.held);
            self.held = held;
            self.migration = Migration::HiddenCommit { target, begin_len };
            self.migration_deadline = Some(now + self.cfg.migration_timeout);
            self.legs[1].seq = 0;
            self.legs[1].reset_out_seq = true;
            self.send(Leg::Backend, b"\x03COMMIT");
            return Disposition::Consumed;
        }
        match self.tracker.on_client_packet(header.len, payload) {
            ClientPacket::Forward => Disposition::Forward(Leg::Backend),
            ClientPacket::ForwardNoResponse => {
                self.command_done(now, true);
                Disposition::Forward(Leg::Backend)
            }
            ClientPacket::Quit => {
                self.close(SessionError::ClientQuit);
                Disposition::Consumed
            }
            ClientPacket::Unsupported(cmd) => {
                self.send_error(Leg::Client, &ProxyError::UnsupportedCommand(cmd.name()));
                Disposition::Consumed
            }
            ClientPacket::ChangeUser => {
                debug_assert!(starting);
                match ChangeUser::parse(payload, self.client_caps) {
                    Ok(mut cu) => {
                        // Same trick as the first handshake: the client computed
                        // its auth data from the proxy's salt, so name a plugin the
                        // backend does not have; it answers with an auth switch
                        // carrying its own salt, which the client answers.
                        self.pending_user = Some((cu.username.clone(), cu.database.clone()));
                        cu.auth_response = Bytes::new();
                        if self.client_caps.contains(CapabilityFlags::PLUGIN_AUTH) {
                            cu.auth_plugin =
                                Some(Bytes::from_static(plugin::FORCE_SWITCH.as_bytes()));
                        }
                        let mut b = BytesMut::new();
                        cu.write(&mut b, self.backend_caps);
                        self.send(Leg::Backend, &b);
                        Disposition::Consumed
                    }
                    Err(e) => {
                        self.close_client_with(ProxyError::BadHandshake(e));
                        Disposition::Consumed
                    }
                }
            }
        }
    }

    // ----------------------------------------------------------------
    // Backend packets
    // ----------------------------------------------------------------

    fn on_backend_packet(
        &mut self,
        now: Instant,
        header: PacketHeader,
        payload: &[u8],
    ) -> Disposition {
        if !self.check_seq(Leg::Backend, header) {
            self.backend_protocol_error(format!("packet sequence id {} out of order", header.seq));
            return Disposition::Consumed;
        }
        match self.phase {
            Phase::BackendGreeting => {
                self.on_backend_greeting(payload);
                Disposition::Consumed
            }
            Phase::Auth => self.on_backend_auth(now, payload),
            Phase::Command => {
                if matches!(self.migration, Migration::Export { .. }) {
                    self.on_exported_packet(now, payload);
                    return Disposition::Consumed;
                }
                if matches!(self.migration, Migration::HiddenCommit { .. }) {
                    self.on_hidden_commit_reply(now, payload);
                    return Disposition::Consumed;
                }
                if self.migration.active() && self.tracker.is_idle() {
                    // The old backend is quiet during a move; anything it says
                    // now is unexpected but harmless to drop.
                    return Disposition::Consumed;
                }
                self.on_backend_response(now, header, payload)
            }
            _ => Disposition::Consumed,
        }
    }

    fn on_backend_greeting(&mut self, payload: &[u8]) {
        if payload.first() == Some(&ERR_HEADER) {
            // The backend refused the connection (too many connections,
            // host blocked): relay its error.
            let msg = ErrPacket::parse(payload)
                .map(|e| e.message_text())
                .unwrap_or_default();
            self.refuse(ProxyError::NoBackend(format!(
                "backend refused the connection: {msg}"
            )));
            return;
        }
        let greeting = match InitialHandshake::parse(payload) {
            Ok(g) => g,
            Err(e) => {
                return self.refuse(ProxyError::BackendProtocol(format!("bad greeting: {e}")));
            }
        };
        self.events.push_back(Event::BackendGreeting {
            server_version: greeting.server_version.clone(),
            capabilities: greeting.capabilities,
            charset: greeting.charset,
        });
        let missing = (self.client_caps & CapabilityFlags::SHAPE) - greeting.capabilities;
        if !missing.is_empty() {
            return self.refuse(ProxyError::Incompatible(format!(
                "the backend lacks capabilities the client negotiated: {missing:?}"
            )));
        }
        let mut caps = (self.client_caps - CapabilityFlags::PER_LEG) & greeting.capabilities;
        // TiDB reads length-encoded auth data without announcing it; keep
        // what the client used.
        caps |= self.client_caps & CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA;
        if self.cfg.compress_backend && greeting.capabilities.contains(CapabilityFlags::COMPRESS) {
            caps |= CapabilityFlags::COMPRESS;
            self.legs[1].compression = Some(Algorithm::Zlib);
        }
        if self.client_caps.contains(CapabilityFlags::COMPRESS) {
            self.legs[0].compression = Some(Algorithm::Zlib);
        } else if self
            .client_caps
            .contains(CapabilityFlags::ZSTD_COMPRESSION_ALGORITHM)
        {
            let level = self.hello.as_ref().and_then(|h| h.zstd_level).unwrap_or(3);
            self.legs[0].compression = Some(Algorithm::Zstd(level));
        }
        self.backend_caps = caps;
        let use_tls = match self.cfg.backend_tls {
            BackendTls::Off => false,
            BackendTls::MatchClient => {
                self.legs[0].tls && greeting.capabilities.contains(CapabilityFlags::SSL)
            }
            BackendTls::Required => {
                if !greeting.capabilities.contains(CapabilityFlags::SSL) {
                    return self.refuse(ProxyError::BackendTlsRequired(
                        String::from_utf8_lossy(&greeting.server_version).into_owned(),
                    ));
                }
                true
            }
        };
        if use_tls {
            self.send_ssl_request(Leg::Backend);
            self.phase = Phase::BackendTls;
            self.tls_request = Some(Leg::Backend);
        } else {
            self.send_handshake_response();
        }
    }

    fn send_ssl_request(&mut self, leg: Leg) {
        let hello = self
            .hello
            .as_ref()
            .expect("handshake response stored before backend connect");
        let req = SslRequest {
            capabilities: self.backend_caps | CapabilityFlags::SSL,
            max_packet_size: hello.max_packet_size,
            charset: hello.charset,
        };
        let mut b = BytesMut::with_capacity(SslRequest::LEN);
        req.write(&mut b);
        self.send(leg, &b);
    }

    /// The handshake response relayed to the first backend.
    fn send_handshake_response(&mut self) {
        // Stored when the client's response arrived, before any backend.
        let hello = self
            .hello
            .as_ref()
            .expect("handshake response stored before backend connect");
        let mut caps = self.backend_caps;
        if self.legs[1].tls {
            caps |= CapabilityFlags::SSL;
        }
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: hello.max_packet_size,
            charset: hello.charset,
            filler: [0; 23],
            username: hello.username.clone(),
            auth_response: Bytes::new(),
            database: hello.database.clone(),
            auth_plugin: Some(Bytes::from_static(plugin::FORCE_SWITCH.as_bytes())),
            attributes: hello.attributes.clone(),
            zstd_level: None,
        };
        let mut b = BytesMut::with_capacity(128);
        resp.write(&mut b);
        self.send(Leg::Backend, &b);
        self.phase = Phase::Auth;
    }

    fn on_backend_auth(&mut self, now: Instant, payload: &[u8]) -> Disposition {
        match payload.first().copied() {
            Some(OK_HEADER) => {
                let status = OkPacket::status_of(payload).unwrap_or(StatusFlags::AUTOCOMMIT);
                self.tracker = CommandTracker::new(
                    self.client_caps.contains(CapabilityFlags::DEPRECATE_EOF),
                    status,
                );
                self.phase = Phase::Command;
                self.handshake_deadline = None;
                self.events.push_back(Event::Authenticated {
                    user: self.user.clone(),
                });
                // The OK itself goes out uncompressed; compression starts after.
                self.forward_now(Leg::Client, payload);
                self.switch_on_compression(Leg::Client);
                self.switch_on_compression(Leg::Backend);
                self.at_boundary(now);
                Disposition::Consumed
            }
            Some(ERR_HEADER) => {
                let (code, message) = ErrPacket::parse(payload)
                    .map(|e| (e.code, e.message_text()))
                    .unwrap_or((0, String::new()));
                self.forward_now(Leg::Client, payload);
                self.close(SessionError::AuthFailed { code, message });
                Disposition::Consumed
            }
            Some(0xfe) | Some(0x01) => Disposition::Forward(Leg::Client),
            _ => {
                self.backend_protocol_error("unexpected packet during authentication".into());
                Disposition::Consumed
            }
        }
    }

    fn on_backend_response(
        &mut self,
        now: Instant,
        header: PacketHeader,
        prefix: &[u8],
    ) -> Disposition {
        match self.tracker.on_backend_packet(header.len, prefix) {
            Err(e) => {
                self.backend_protocol_error(e.to_string());
                Disposition::Consumed
            }
            Ok(BackendPacket::Progress) | Ok(BackendPacket::AwaitClient) => {
                self.response_started = true;
                Disposition::Forward(Leg::Client)
            }
            Ok(BackendPacket::Done { ok }) => {
                if let Some((user, db)) = self.pending_user.take()
                    && ok
                {
                    self.user = user;
                    self.database = Some(db).filter(|d| !d.is_empty());
                }
                self.command_done(now, ok);
                // Act on the boundary once this packet is fully forwarded.
                self.boundary_pending = true;
                Disposition::Forward(Leg::Client)
            }
        }
    }

    // ----------------------------------------------------------------
    // Migration
    // ----------------------------------------------------------------

    /// Called whenever an exchange ends: starts a pending move or closes a
    /// session waiting for its safe point.
    fn at_boundary(&mut self, now: Instant) {
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
        }
    }

    /// Whether a BEGIN from the client now would get TiProxy's treatment:
    /// a move is pending and only the open transaction stands in its way.
    fn begin_trick_applies(&self) -> bool {
        matches!(self.migration, Migration::Pending { .. })
            && self.tracker.is_idle()
            && self.tracker.in_transaction()
            && self.tracker.cursors().is_empty()
            && self.tracker.long_data().is_empty()
            && !self.close_at_safe_point
    }

    /// The old backend answered the proxy's COMMIT.
    fn on_hidden_commit_reply(&mut self, now: Instant, payload: &[u8]) {
        let Migration::HiddenCommit { target, begin_len } =
            std::mem::replace(&mut self.migration, Migration::None)
        else {
            return;
        };
        self.migration_deadline = None;
        match payload.first().copied() {
            Some(OK_HEADER) => {
                if let Ok(status) = OkPacket::status_of(payload) {
                    self.tracker.set_status(status);
                }
                self.migration = Migration::Pending { target };
                self.at_boundary(now);
            }
            _ => {
                // The commit failed: that is the client's BEGIN's answer (its
                // implicit commit failed), and the BEGIN does not run.
                let _ = self.held.split_to(begin_len.min(self.held.len()));
                self.legs[0].seq = 1;
                if payload.first() == Some(&ERR_HEADER) {
                    self.send(Leg::Client, payload);
                } else {
                    self.send_error(
                        Leg::Client,
                        &ProxyError::BackendProtocol("unexpected reply to COMMIT".into()),
                    );
                }
                self.migration = Migration::Pending { target };
                self.at_boundary(now);
                self.drain_held(now);
            }
        }
    }

    fn start_migration(&mut self, now: Instant, target: String) {
        self.events.push_back(Event::MigrationStarted {
            target: target.clone(),
        });
        let deprecate_eof = self.backend_caps.contains(CapabilityFlags::DEPRECATE_EOF);
        self.migration = Migration::Export {
            target,
            reader: StatesReader::new(deprecate_eof),
        };
        self.migration_deadline = Some(now + self.cfg.migration_timeout);
        self.legs[1].seq = 0;
        self.legs[1].reset_out_seq = true;
        let mut q = BytesMut::with_capacity(1 + SHOW_SESSION_STATES.len());
        q.put_u8(Command::Query.to_byte());
        q.put_slice(SHOW_SESSION_STATES.as_bytes());
        self.send(Leg::Backend, &q);
    }

    fn on_exported_packet(&mut self, now: Instant, payload: &[u8]) {
        let Migration::Export { reader, .. } = &mut self.migration else {
            return;
        };
        match reader.feed(payload) {
            StatesProgress::More => {}
            StatesProgress::Failed(reason) => self.fail_migration(now, reason),
            StatesProgress::Done(session) => {
                let Migration::Export { target, .. } =
                    std::mem::replace(&mut self.migration, Migration::None)
                else {
                    unreachable!("matched above")
                };
                self.actions.push_back(Action::ConnectNewBackend {
                    target: target.clone(),
                });
                self.migration = Migration::Connecting { target, session };
            }
        }
    }

    fn on_new_backend_packet(&mut self, now: Instant, header: PacketHeader, payload: &[u8]) {
        if !self.check_seq(Leg::NewBackend, header) {
            return self.fail_migration(
                now,
                MigrationFailure::Handshake("packet out of order".into()),
            );
        }
        let migration = std::mem::replace(&mut self.migration, Migration::None);
        match migration {
            Migration::Greeting { target, session } => {
                let greeting = match InitialHandshake::parse(payload) {
                    Ok(g) => g,
                    Err(e) => {
                        self.migration = Migration::Greeting { target, session };
                        return self.fail_migration(
                            now,
                            MigrationFailure::Handshake(format!("bad greeting: {e}")),
                        );
                    }
                };
                let missing = (self.client_caps & CapabilityFlags::SHAPE) - greeting.capabilities;
                let use_tls = match self.cfg.backend_tls {
                    BackendTls::Off => false,
                    BackendTls::MatchClient => {
                        self.legs[0].tls && greeting.capabilities.contains(CapabilityFlags::SSL)
                    }
                    BackendTls::Required => true,
                };
                if !missing.is_empty() {
                    self.migration = Migration::Greeting { target, session };
                    return self.fail_migration(
                        now,
                        MigrationFailure::Handshake(format!("new backend lacks {missing:?}")),
                    );
                }
                if use_tls && !greeting.capabilities.contains(CapabilityFlags::SSL) {
                    self.migration = Migration::Greeting { target, session };
                    return self.fail_migration(
                        now,
                        MigrationFailure::Handshake(
                            "new backend has no TLS but require-backend-tls is set".into(),
                        ),
                    );
                }
                if self.legs[1].compression.is_some()
                    && greeting.capabilities.contains(CapabilityFlags::COMPRESS)
                {
                    self.legs[2].compression = Some(Algorithm::Zlib);
                }
                if use_tls {
                    self.send_ssl_request(Leg::NewBackend);
                    self.migration = Migration::Tls { target, session };
                    self.tls_request = Some(Leg::NewBackend);
                } else {
                    self.migration = Migration::Tls { target, session };
                    self.send_token_response();
                }
            }
            Migration::Auth { target, session } => match payload.first().copied() {
                Some(OK_HEADER) => {
                    self.switch_on_compression(Leg::NewBackend);
                    self.legs[2].seq = 0;
                    self.legs[2].reset_out_seq = true;
                    // The literal is parsed by the new session, under its own
                    // sql_mode (the global default), which its OK reports.
                    let no_backslash = OkPacket::status_of(payload)
                        .map(|s| s.contains(StatusFlags::NO_BACKSLASH_ESCAPES))
                        .unwrap_or(false);
                    #[cfg(feature = "sim-mutations")]
                    let session = if self.planted(PlantedBug::ForgetUserVariable) {
                        crate::migration::ExportedSession {
                            states: crate::migration::forget_first_user_variable(&session.states),
                            token: session.token,
                        }
                    } else {
                        session
                    };
                    let q =
                        crate::migration::set_session_states_query(&session.states, no_backslash);
                    self.send(Leg::NewBackend, &q);
                    self.migration = Migration::Import { target };
                }
                _ => {
                    let why = describe_failure(payload);
                    self.migration = Migration::Auth { target, session };
                    self.fail_migration(now, MigrationFailure::Handshake(why));
                }
            },
            Migration::Import { target } => match payload.first().copied() {
                Some(OK_HEADER) => self.finish_migration(now, target),
                Some(ERR_HEADER) => {
                    let (code, message) = ErrPacket::parse(payload)
                        .map(|e| (e.code, e.message_text()))
                        .unwrap_or((0, String::new()));
                    self.migration = Migration::Import { target };
                    self.fail_migration(now, MigrationFailure::SetStatesRefused { code, message });
                }
                _ => {
                    self.migration = Migration::Import { target };
                    self.fail_migration(
                        now,
                        MigrationFailure::Handshake(
                            "unexpected reply to SET SESSION_STATES".into(),
                        ),
                    );
                }
            },
            other => {
                // Bytes from a new backend that is not in a handshake stage.
                self.migration = other;
            }
        }
    }

    /// The handshake response carrying the session token.
    fn send_token_response(&mut self) {
        let Migration::Tls { target, session } =
            std::mem::replace(&mut self.migration, Migration::None)
        else {
            return;
        };
        // Stored at the first handshake; a move needs an established session.
        let hello = self
            .hello
            .as_ref()
            .expect("established session has a handshake response");
        let mut caps = (self.backend_caps
            | CapabilityFlags::PLUGIN_AUTH
            | CapabilityFlags::PLUGIN_AUTH_LENENC_CLIENT_DATA)
            - CapabilityFlags::CONNECT_WITH_DB;
        if self.legs[2].compression.is_none() {
            caps -= CapabilityFlags::COMPRESS;
        }
        if self.legs[2].tls {
            caps |= CapabilityFlags::SSL;
        }
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet_size: hello.max_packet_size,
            charset: hello.charset,
            filler: [0; 23],
            username: self.user.clone(),
            auth_response: session.token.clone(),
            database: None,
            auth_plugin: Some(Bytes::from_static(plugin::TIDB_SESSION_TOKEN.as_bytes())),
            attributes: hello.attributes.clone(),
            zstd_level: None,
        };
        let mut b = BytesMut::with_capacity(256 + session.token.len());
        resp.write(&mut b);
        self.send(Leg::NewBackend, &b);
        self.migration = Migration::Auth { target, session };
    }

    fn finish_migration(&mut self, now: Instant, target: String) {
        self.migration_deadline = None;
        self.migration = Migration::None;
        let mut farewell = std::mem::take(&mut self.legs[1].out);
        if !self.old_backend_lost {
            // Tell the old backend the session is over, so it frees it at once.
            let mut quit = BytesMut::with_capacity(5);
            write_packet(&mut quit, 0, &[Command::Quit.to_byte()]);
            if let Some(f) = self.legs[1].framing.as_mut() {
                f.reset_seq();
                f.encode(&quit, &mut farewell);
            } else {
                farewell.extend_from_slice(&quit);
            }
        }
        if self.old_backend_lost {
            farewell.clear();
        }
        let new = std::mem::take(&mut self.legs[2]);
        self.legs[1] = new;
        self.old_backend_lost = false;
        self.actions.push_back(Action::SwapBackends {
            farewell: farewell.freeze(),
        });
        self.events.push_back(Event::Migrated { target });
        self.at_boundary(now);
        self.drain_held(now);
    }

    fn fail_migration(&mut self, now: Instant, reason: MigrationFailure) {
        let target = self.migration.target().unwrap_or_default().to_string();
        let had_new_leg = matches!(
            self.migration,
            Migration::Connecting { .. }
                | Migration::Greeting { .. }
                | Migration::Tls { .. }
                | Migration::Auth { .. }
                | Migration::Import { .. }
        );
        self.migration = Migration::None;
        self.migration_deadline = None;
        if had_new_leg {
            self.legs[2] = LegState::default();
            self.actions.push_back(Action::CloseLeg(Leg::NewBackend));
        }
        self.events.push_back(Event::MigrationFailed {
            target,
            reason: reason.clone(),
        });
        if self.old_backend_lost {
            // Nowhere left to run the session.
            self.close_client_with(ProxyError::BackendLost(reason.to_string()));
            return;
        }
        self.at_boundary(now);
        self.drain_held(now);
    }

    fn backend_lost(&mut self, now: Instant, reason: &str) {
        match &self.migration {
            Migration::Connecting { .. }
            | Migration::Greeting { .. }
            | Migration::Tls { .. }
            | Migration::Auth { .. }
            | Migration::Import { .. } => {
                // The session's state is already exported: finish the move
                // without the old backend.
                self.old_backend_lost = true;
                self.legs[1].out.clear();
                return;
            }
            Migration::Export { .. } | Migration::HiddenCommit { .. } => {
                self.migration = Migration::None;
                self.migration_deadline = None;
                self.events.push_back(Event::MigrationFailed {
                    target: String::new(),
                    reason: MigrationFailure::OldBackendLost(reason.to_string()),
                });
            }
            _ => {}
        }
        let _ = now;
        match self.phase {
            Phase::ConnectingBackend | Phase::BackendGreeting | Phase::BackendTls | Phase::Auth => {
                self.refuse(ProxyError::NoBackend(format!(
                    "backend closed the connection during the handshake: {reason}"
                )))
            }
            Phase::Command if !self.tracker.is_idle() && !self.response_started => {
                self.close_client_with(ProxyError::BackendLost(reason.to_string()))
            }
            Phase::Command if !self.held.is_empty() => {
                self.close_client_with(ProxyError::BackendLost(reason.to_string()))
            }
            _ => self.close(SessionError::BackendLost(reason.to_string())),
        }
    }

    // ----------------------------------------------------------------
    // Helpers
    // ----------------------------------------------------------------

    /// Processes client bytes that waited.
    fn drain_held(&mut self, now: Instant) {
        if self.held.is_empty() || !self.client_packet_allowed() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.process(now, Leg::Client, &held);
        if self.held.capacity() == 0 && held.capacity() <= RELEASE_CAPACITY {
            // Reuse the allocation when nothing new was held.
            let mut h = held;
            h.clear();
            if self.held.is_empty() {
                self.held = h;
            }
        }
    }

    fn command_done(&mut self, now: Instant, ok: bool) {
        if let (Some(cmd), Some(start)) = (self.tracker.command(), self.command_started) {
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
        let l = &mut self.legs[leg.idx()];
        let seq = l.next_seq(payload.len() + HEADER_LEN <= MAX_PAYLOAD);
        l.seq = write_packet(l.writer(), seq, payload);
    }

    /// Forwards a whole packet that was consumed (to rewrite it or to act
    /// after it) with the destination's next sequence id.
    fn forward_now(&mut self, to: Leg, payload: &[u8]) {
        self.send(to, payload);
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
            if self.tracker.is_idle() && self.held.is_empty() {
                // No command is waiting for an answer: an error now would be
                // read as the answer to the next one. Just close.
                self.close(SessionError::BackendLost(err.to_string()));
                return;
            }
            if self.tracker.is_idle() {
                // The error answers the held command.
                self.legs[0].seq = 1;
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
        self.migration_deadline = None;
        self.held = BytesMut::new();
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

    fn switch_on_compression(&mut self, leg: Leg) {
        let l = &mut self.legs[leg.idx()];
        if let Some(alg) = l.compression
            && l.framing.is_none()
        {
            l.framing = Some(Box::new(CompressedFraming::new(alg)));
        }
    }

    /// Compresses staged bytes on compressed legs.
    fn flush(&mut self) {
        for l in &mut self.legs {
            if let Some(f) = l.framing.as_mut()
                && !l.staging.is_empty()
            {
                if std::mem::take(&mut l.reset_out_seq) {
                    f.reset_seq();
                }
                f.encode(&l.staging, &mut l.out);
                l.staging.clear();
                if l.staging.capacity() > RELEASE_CAPACITY {
                    l.staging = BytesMut::new();
                }
            }
        }
    }
}

/// Longest COM_QUERY inspected for the BEGIN trick.
const BEGIN_PREFIX: usize = 64;

/// Whether a COM_QUERY payload is `BEGIN` or `START TRANSACTION` (any case,
/// surrounding blanks and a trailing `;` allowed). Variants such as
/// `START TRANSACTION READ ONLY` or `WITH CONSISTENT SNAPSHOT` are left
/// alone: moving them would change what they mean.
fn is_begin(payload: &[u8]) -> bool {
    let Some(sql) = payload.get(1..) else {
        return false;
    };
    let text = String::from_utf8_lossy(sql);
    let norm: Vec<String> = text
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    matches!(
        norm.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["BEGIN"] | ["BEGIN", "WORK"] | ["START", "TRANSACTION"]
    )
}

/// Describes a non-OK reply during the token handshake.
fn describe_failure(payload: &[u8]) -> String {
    match payload.first().copied() {
        Some(ERR_HEADER) => match ErrPacket::parse(payload) {
            Ok(e) => format!("{} {}", e.code, e.message_text()),
            Err(e) => e.to_string(),
        },
        Some(0xfe) => {
            "the backend asked for another auth method (does it support tidb_session_token?)".into()
        }
        _ => "unexpected packet".into(),
    }
}

// The unit tests read the clock (they play the driver), so they live
// outside core/src, which must not.
#[cfg(test)]
#[path = "../tests/unit/session.rs"]
mod tests;
