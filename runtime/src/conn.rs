//! One client connection: a task that drives a core [`Session`].
//!
//! The driver is mechanical: it moves bytes between sockets and the
//! session, carries out the session's actions (dial, TLS upgrade, swap,
//! close), arms the one timer the session asks for, and reports events to
//! metrics, logs and the router. It reads into a per-thread scratch buffer,
//! so an idle connection owns no read buffer at all. Dialling lives in
//! `dial`, the connection's part in a takeover by a new process in
//! `handover`.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tiproxy_core::error::ProxyError;
use tiproxy_core::proxy_protocol::ProxyHeader;
use tiproxy_core::session::{Action, Leg, Session, SessionConfig};
use tokio::io::ReadBuf;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::metrics::{LegTraffic, PendingMove, metrics};
use crate::net::Network;
use crate::proxy_header::HeaderSniff;
use crate::router::{BackendProfile, Lease, Router};

mod client_header;
mod dial;
mod events;
mod handover;
mod mailbox;
mod restore;
mod socket;
mod tls_stream;

use self::dial::ConnectError;
use self::events::counted;
pub use self::handover::{HandOverTx, Handover, Imported, Offer, import};
pub use self::mailbox::{Control, DescribeReply, Mailbox, SessionInfo, uptime_ms};
use self::socket::{Io, write_all};
use self::tls_stream::ServerTlsStream;
use tiproxy_core::balance::MoveOutcome;

/// What every connection shares.
pub struct Shared<N: Network> {
    /// The network.
    pub net: N,
    /// Backends.
    pub router: Arc<Router>,
    /// TLS towards clients.
    pub server_tls: crate::tls::Live<tokio_rustls::TlsAcceptor>,
    /// TLS towards backends.
    pub backend_tls: crate::tls::Live<tokio_rustls::TlsConnector>,
    /// `security.require-backend-tls`.
    pub require_backend_tls: bool,
    /// Accept PROXY v2 headers (optional) and write them to backends;
    /// reloadable (TiProxy's), read by each new connection.
    pub proxy_protocol: std::sync::atomic::AtomicBool,
    /// TCP keepalive profiles (reloadable).
    pub keepalive: crate::keepalive::Profiles,
    /// Bytes buffered towards a slow peer before reading pauses.
    pub buffer_limit: usize,
    /// Crash protection of sessions (`proxy.session-protection`).
    pub protect: tiproxy_core::session::protect::ProtectConfig,
    /// Dial timeout.
    pub dial_timeout: Duration,
    /// Time allowed for the client handshake.
    pub handshake_timeout: Duration,
}

impl<N: Network> std::fmt::Debug for Shared<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("server_tls", &self.server_tls.is_some())
            .field("backend_tls", &self.backend_tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// Reads land here and go straight into the session: connections own
    /// no read buffers.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The one asynchronous operation a connection may have in flight.
enum Op<S> {
    Connect {
        leg: Leg,
        fut: BoxFut<Result<(S, Lease), ConnectError>>,
    },
    AcceptTls(BoxFut<io::Result<Box<ServerTlsStream<S>>>>),
    ConnectTls {
        leg: Leg,
        fut: BoxFut<io::Result<tokio_rustls::client::TlsStream<S>>>,
    },
}

struct Driver<N: Network> {
    shared: Arc<Shared<N>>,
    /// The session; a move target is the backend's handle.
    session: Session<Arc<crate::router::Backend>>,
    client: Io<N::Stream>,
    backend: Option<Io<N::Stream>>,
    /// The move target's socket (boxed, like the other move-only and
    /// set-up-only state below: an idle connection carries a pointer, not
    /// the socket's registration handle; issue 15).
    new_backend: Option<Box<Io<N::Stream>>>,
    lease: Option<Lease>,
    new_lease: Option<Lease>,
    op: Option<Box<Op<N::Stream>>>,
    timer: Option<Pin<Box<Sleep>>>,
    ctl: Arc<Mailbox>,
    conn_id: u32,
    closing: bool,
    /// The backend a session just left (for metrics).
    moved_from: Option<Arc<crate::router::Backend>>,
    /// When the last command finished, ms since the process started.
    last_command_ms: u64,
    /// Commands finished: a plain count in the connection's own state, so
    /// per-backend QPS costs the hot path no shared atomic.
    commands: u64,
    /// When the connection was accepted ([`crate::metrics::clock_us`]).
    created_us: u64,
    /// The move under way, for `tiproxy_balance_*` (boxed: rare).
    pending_move: Option<Box<PendingMove>>,
    /// Packet framing of the backend and new-backend legs' traffic.
    traffic: [LegTraffic; 2],
    /// With `proxy-protocol`: looking for a PROXY header in the client's
    /// first bytes (they come after the greeting).
    sniff: Option<Box<HeaderSniff>>,
    /// A PROXY header goes first on each backend leg (`proxy-protocol` as
    /// it was when the connection came).
    backend_header: bool,
    /// Counted in `tiproxy_session_protected`.
    protected: bool,
    /// Targets the restore under way picked and failed on (boxed: only a
    /// restore uses it, and a box is 8 bytes inline where a `Vec` is 24).
    #[allow(clippy::box_collection)]
    restore_tried: Option<Box<Vec<String>>>,
    /// Traffic capture's tap (`crate::traffic`).
    tap: crate::traffic::ConnTap,
    /// A takeover asked for the session (`handover`).
    handover: Option<HandOverTx>,
    /// A command just ended: a moment to ask whether this connection
    /// should move to another worker thread (`crate::workers`).
    may_rehome: bool,
}

/// Serves one accepted client connection to its end: sets the connection
/// up now and returns the future that drives it.
///
/// Not an `async fn`: its arguments would stay in the task's future for
/// the connection's whole life, dead once moved into the driver (an
/// `async` state machine keeps its captured values beside what it awaits).
pub fn serve<N: Network>(
    shared: Arc<Shared<N>>,
    stream: N::Stream,
    peer: SocketAddr,
    conn_id: u32,
    ctl: Arc<Mailbox>,
) -> impl Future<Output = ()> + Send {
    let local = shared.net.local_addr(&stream);
    if let Err(e) = shared
        .net
        .set_keepalive(&stream, &shared.keepalive.get().frontend)
    {
        crate::keepalive::report_failure("client", &e);
    }
    // With `proxy-protocol`, a PROXY header in the client's first bytes
    // may name another source later (`client_header`).
    let source = peer;
    let sniff = shared
        .proxy_protocol
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(Box::<HeaderSniff>::default);
    let profile = shared.router.profile();
    let cfg = session_config(&shared, conn_id, &profile, source, local);
    let backend_header = cfg.proxy_header.is_some();
    let now = Instant::now().into_std();
    #[cfg_attr(not(feature = "sim-mutations"), allow(unused_mut))]
    let mut session = shared
        .router
        .with_rng(|mut rng| Session::new(cfg, now, &mut rng));
    #[cfg(feature = "sim-mutations")]
    if let Some(bug) = shared.router.planted_bug().and_then(|b| b.in_session()) {
        session.plant(bug);
    }
    let d = Box::new(Driver {
        shared,
        session,
        client: Io::Plain(stream),
        backend: None,
        new_backend: None,
        lease: None,
        new_lease: None,
        op: None,
        timer: None,
        ctl,
        conn_id,
        closing: false,
        moved_from: None,
        last_command_ms: uptime_ms(),
        commands: 0,
        created_us: crate::metrics::clock_us(),
        pending_move: None,
        traffic: Default::default(),
        sniff,
        backend_header,
        protected: false,
        restore_tried: None,
        tap: Default::default(),
        handover: None,
        may_rehome: false,
    });
    *d.ctl.client.lock().expect("mailbox lock") = Some(source);
    // The driver lives on the heap, once: the task's future stays a few
    // pointers wide however large the session state is.
    d.run()
}

fn session_config<N: Network>(
    shared: &Shared<N>,
    conn_id: u32,
    profile: &BackendProfile,
    source: SocketAddr,
    local: Option<SocketAddr>,
) -> SessionConfig {
    use tiproxy_core::CapabilityFlags as C;
    // Greet clients with what the backends support; compression and TLS are
    // terminated by the proxy, so they depend on the proxy alone.
    let mut caps = (profile.capabilities | C::PER_LEG | C::LONG_PASSWORD) & C::PROXY_SUPPORTED;
    if shared.server_tls.is_none() {
        caps -= C::SSL;
    }
    let backend_tls = if shared.require_backend_tls {
        tiproxy_core::session::BackendTls::Required
    } else if shared.backend_tls.is_some() {
        tiproxy_core::session::BackendTls::MatchClient
    } else {
        tiproxy_core::session::BackendTls::Off
    };
    SessionConfig {
        connection_id: conn_id,
        server_version: profile.server_version.clone(),
        capabilities: caps,
        // The core clears CLIENT_MYSQL in the greeting when any remain.
        mariadb_capabilities: profile.mariadb_capabilities,
        charset: profile.charset,
        server_tls: shared.server_tls.is_some(),
        backend_tls,
        proxy_header: match (
            shared
                .proxy_protocol
                .load(std::sync::atomic::Ordering::Relaxed),
            local,
        ) {
            (true, Some(destination)) => Some(Box::new(ProxyHeader::Proxy {
                source,
                destination,
            })),
            _ => None,
        },
        handshake_timeout: shared.handshake_timeout,
        buffer_limit: shared.buffer_limit,
        protect: shared.protect,
        ..SessionConfig::default()
    }
}

/// What woke the driver.
enum Wake {
    Progress,
}

impl<N: Network> Driver<N> {
    async fn run(mut self: Box<Self>) {
        loop {
            self.apply_outputs();
            if self.closing {
                break;
            }
            // Boxed: only a takeover offers, and an idle connection's task
            // should not carry the offer's state.
            if self.handover.is_some()
                && matches!(Box::pin(self.offer()).await, handover::Outcome::Gone)
            {
                return;
            }
            if std::mem::take(&mut self.may_rehome)
                && self.movable()
                && let Some(to) = self.shared.net.rehome_target()
            {
                return self.rehome(to).await;
            }
            let Wake::Progress = poll_fn(|cx| self.poll_io(cx)).await;
        }
        Box::pin(self.finish()).await;
    }

    /// Whether the connection can move to another thread now: plain
    /// sockets only, and nothing in flight that belongs to this thread's
    /// runtime (a dial, a TLS handshake, a takeover's offer).
    fn movable(&self) -> bool {
        self.op.is_none()
            && self.new_backend.is_none()
            && self.handover.is_none()
            && matches!(self.client, Io::Plain(_))
            && matches!(self.backend, Some(Io::Plain(_)))
    }

    /// Moves this connection, sockets and session, to worker `to`; ends
    /// when the connection does.
    fn rehome(mut self: Box<Self>, to: usize) -> BoxFut<()> {
        let (Io::Plain(client), Some(Io::Plain(backend))) = (
            std::mem::replace(&mut self.client, Io::Upgrading),
            self.backend.take(),
        ) else {
            unreachable!("movable() checked both sockets are plain");
        };
        // The timer belongs to this thread's runtime; the loop re-arms it.
        self.timer = None;
        let net = self.shared.net.clone();
        Box::pin(async move {
            net.rehome(to, vec![client, backend], move |mut streams| async move {
                let (Some(backend), Some(client)) = (streams.pop(), streams.pop()) else {
                    return;
                };
                self.client = Io::Plain(client);
                self.backend = Some(Io::Plain(backend));
                Box::pin(self.run()).await
            })
            .await
        })
    }

    /// Carries out actions and reports events.
    fn apply_outputs(&mut self) {
        while let Some(a) = self.session.poll_action() {
            match a {
                Action::ConnectBackend => self.start_connect(Leg::Backend, None),
                Action::ConnectNewBackend { target } => {
                    self.start_connect(Leg::NewBackend, Some(target))
                }
                Action::StartTls { leg, early_data } => self.start_tls(leg, early_data),
                Action::CloseLeg(Leg::NewBackend) => {
                    self.new_backend = None;
                    self.new_lease = None;
                    if matches!(
                        self.op.as_deref(),
                        Some(Op::Connect {
                            leg: Leg::NewBackend,
                            ..
                        }) | Some(Op::ConnectTls {
                            leg: Leg::NewBackend,
                            ..
                        })
                    ) {
                        self.op = None;
                    }
                }
                Action::CloseLeg(_) => {}
                Action::SwapBackends { farewell } => {
                    let old =
                        std::mem::replace(&mut self.backend, self.new_backend.take().map(|b| *b));
                    self.traffic = [self.traffic[1], LegTraffic::default()];
                    self.moved_from = self.lease.as_ref().map(|l| l.backend().clone());
                    let left = std::mem::replace(&mut self.lease, self.new_lease.take());
                    if self
                        .shared
                        .router
                        .planted(crate::router::PlantedBug::LeakLeaseOnMove)
                    {
                        std::mem::forget(left);
                    }
                    self.ctl
                        .set_backend(self.lease.as_ref().map(|l| l.backend().clone()));
                    if let Some(mut old) = old {
                        crate::task::spawn(async move {
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                if !farewell.is_empty() {
                                    let _ = write_all(&mut old, &farewell).await;
                                }
                                old.shutdown().await;
                            })
                            .await;
                        });
                    }
                }
                Action::Close => self.closing = true,
                Action::PickRestoreTarget {
                    reason,
                    failed,
                    exclude,
                } => self.pick_restore_target(&reason, failed, exclude),
            }
        }
        while let Some(e) = self.session.poll_event() {
            self.on_event(e);
        }
        if self.shared.protect.enabled {
            self.update_protected();
        }
    }

    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(op) = self.op.as_mut() else {
            return Poll::Pending;
        };
        let now = Instant::now().into_std();
        match &mut **op {
            Op::Connect { leg, fut } => {
                let leg = *leg;
                let res = ready!(fut.as_mut().poll(cx));
                self.op = None;
                match res {
                    Ok((s, lease)) => {
                        let profiles = self.shared.keepalive.get();
                        if let Err(e) = self
                            .shared
                            .net
                            .set_keepalive(&s, profiles.backend(lease.backend()))
                        {
                            crate::keepalive::report_failure("backend", &e);
                        }
                        if leg == Leg::Backend {
                            self.backend = Some(Io::Plain(s));
                            self.ctl.set_backend(Some(lease.backend().clone()));
                            self.lease = Some(lease);
                        } else {
                            self.new_backend = Some(Box::new(Io::Plain(s)));
                            self.new_lease = Some(lease);
                        }
                        self.session.handle_connected(now, leg);
                        self.leg_connected(leg);
                    }
                    Err(ConnectError::Unreachable(e)) => {
                        self.session.handle_connect_failed(now, leg, &e)
                    }
                    Err(ConnectError::Local(what)) => {
                        // A client refused (a move that could not dial just
                        // fails and is retried later).
                        if leg == Leg::Backend {
                            self.shared.router.refused_locally(what);
                        }
                        let err = ProxyError::LocalExhaustion(what);
                        self.session.handle_connect_refused(now, leg, err)
                    }
                }
            }
            Op::AcceptTls(fut) => {
                let res = ready!(fut.as_mut().poll(cx));
                self.op = None;
                match res {
                    Ok(s) => {
                        self.client = Io::ServerTls(s);
                        self.session.handle_tls_established(now, Leg::Client);
                    }
                    Err(e) => {
                        debug!(conn_id = self.conn_id, peer = %self.peer(), "client TLS handshake failed: {e}");
                        self.session.handle_closed(now, Leg::Client, &e.to_string());
                    }
                }
            }
            Op::ConnectTls { leg, fut } => {
                let leg = *leg;
                let res = ready!(fut.as_mut().poll(cx));
                self.op = None;
                match res {
                    Ok(s) => {
                        let io = Io::ClientTls(Box::new(s));
                        if leg == Leg::Backend {
                            self.backend = Some(io)
                        } else {
                            self.new_backend = Some(Box::new(io))
                        }
                        self.session.handle_tls_established(now, leg);
                    }
                    Err(e) => {
                        let reason = format!("TLS handshake with the backend failed: {e}");
                        if leg == Leg::Backend {
                            self.backend = None;
                            self.session.handle_closed(now, leg, &reason);
                        } else {
                            self.new_backend = None;
                            self.session.handle_closed(now, leg, &reason);
                        }
                    }
                }
            }
        }
        Poll::Ready(())
    }

    /// Polls every source once; ready when the session got input.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        // Writes first: they free buffer space that lets reads resume.
        for leg in [Leg::Client, Leg::Backend, Leg::NewBackend] {
            if let Err(e) = self.poll_write_leg(cx, leg) {
                let now = Instant::now().into_std();
                self.session.handle_closed(now, leg, &e.to_string());
                return Poll::Ready(Wake::Progress);
            }
        }
        // A takeover waits for the point where the last reply is written.
        if self.handover.is_some() && self.may_offer() {
            return Poll::Ready(Wake::Progress);
        }
        if self.poll_op(cx).is_ready() {
            return Poll::Ready(Wake::Progress);
        }
        if let Some(msg) = self.ctl.poll_take(cx) {
            let now = Instant::now().into_std();
            match msg {
                Control::Redirect(target, reason) => {
                    let to = target.addr.clone();
                    if self.session.handle_redirect(now, target) {
                        self.move_started(&to, reason);
                    } else {
                        self.move_resolved(MoveOutcome::Dropped);
                    }
                }
                Control::CloseAtSafePoint => self.session.handle_close_at_safe_point(now),
                Control::Keepalive => self.apply_keepalive(),
                Control::HandOver(tx) => self.handover = Some(tx),
                Control::Close(why) => self.session.handle_close(why),
                Control::Describe(reply) => {
                    let Some(reply) = reply.lock().expect("reply lock").take() else {
                        return Poll::Ready(Wake::Progress);
                    };
                    let _ = reply.send(SessionInfo {
                        connection_id: self.conn_id,
                        client: self.peer().to_string(),
                        backend: self.lease.as_ref().map(|l| l.backend().addr.clone()),
                        user: String::from_utf8_lossy(self.session.user()).into_owned(),
                        db: self
                            .session
                            .database()
                            .map(|d| String::from_utf8_lossy(d).into_owned())
                            .unwrap_or_default(),
                        in_transaction: self.session.in_transaction(),
                        idle_ms: uptime_ms().saturating_sub(self.last_command_ms),
                        commands: self.commands,
                    });
                }
            }
            return Poll::Ready(Wake::Progress);
        }
        // Timer. One due no later than the session asks for is kept: it
        // fires, the session finds nothing due (every deadline it checks is
        // `now >= d`) and asks again. With crash protection on, one is kept
        // even while the session asks for none (a command runs). Moving
        // the timer to each later deadline, or dropping it for each command,
        // cost a timer-wheel update, an allocation and a clock read per
        // command, since the quiet period restarts at every command (issue
        // 13's 1.03x CPU target). Without protection an idle connection
        // holds no timer.
        let want = self.session.poll_timeout().map(Instant::from_std);
        match (want, self.timer.as_mut()) {
            (Some(at), Some(s)) if s.deadline() > at => s.as_mut().reset(at),
            (Some(at), None) => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            (None, Some(_)) if !self.shared.protect.enabled => self.timer = None,
            _ => {}
        }
        if let Some(s) = self.timer.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            self.timer = None;
            if want.is_some() {
                self.session.handle_timeout(Instant::now().into_std());
                return Poll::Ready(Wake::Progress);
            }
        }
        // Reads, within the session's read budget: a leg left unread makes
        // TCP push back on its peer. The budget is asked again after every
        // input (this function returns) and every write (above).
        for leg in [Leg::Client, Leg::Backend, Leg::NewBackend] {
            let budget = self.session.read_budget(leg);
            if budget == 0 {
                continue;
            }
            if leg == Leg::Client && self.sniff.is_some() {
                if self.poll_read_proxy_header(cx, budget).is_ready() {
                    return Poll::Ready(Wake::Progress);
                }
                continue;
            }
            if let Poll::Ready(closed) = self.poll_read_leg(cx, leg, budget) {
                // A backend socket that hit its end is of no more use: keep
                // polling it and it answers EOF forever, a busy loop (found
                // by simulation: the old TiDB closed a session whose move was
                // under way). The session has been told.
                if closed {
                    match leg {
                        Leg::Backend => self.backend = None,
                        Leg::NewBackend => self.new_backend = None,
                        Leg::Client => {}
                    }
                }
                return Poll::Ready(Wake::Progress);
            }
        }
        Poll::Pending
    }

    /// Re-applies the keepalive profiles to every socket: the frontend's to
    /// the client, and to each backend the one its health calls for now.
    fn apply_keepalive(&self) {
        let profiles = self.shared.keepalive.get();
        let net = &self.shared.net;
        if let Some(s) = self.client.stream()
            && let Err(e) = net.set_keepalive(s, &profiles.frontend)
        {
            crate::keepalive::report_failure("client", &e);
        }
        for (io, lease) in [
            (self.backend.as_ref(), &self.lease),
            (self.new_backend.as_deref(), &self.new_lease),
        ] {
            if let (Some(s), Some(lease)) = (io.and_then(|io| io.stream()), lease)
                && let Err(e) = net.set_keepalive(s, profiles.backend(lease.backend()))
            {
                crate::keepalive::report_failure("backend", &e);
            }
        }
    }

    fn poll_write_leg(&mut self, cx: &mut Context<'_>, leg: Leg) -> io::Result<()> {
        let io = match leg {
            Leg::Client => &mut self.client,
            Leg::Backend => match self.backend.as_mut() {
                Some(io) => io,
                None => return Ok(()),
            },
            Leg::NewBackend => match self.new_backend.as_deref_mut() {
                Some(io) => io,
                None => return Ok(()),
            },
        };
        let session = &mut self.session;
        let mut counted = counted(leg, &self.lease, &self.new_lease, &mut self.traffic);
        loop {
            let buf = session.transmit(leg);
            if buf.is_empty() {
                break;
            }
            match io.poll_write(cx, buf) {
                Poll::Ready(Ok(0)) => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed"));
                }
                Poll::Ready(Ok(n)) => {
                    if let Some((lease, t)) = counted.as_mut() {
                        t.written(&lease.backend().metrics, &buf[..n]);
                    }
                    session.advance_transmit(leg, n)
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        match io.poll_flush(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads once from `leg` into the session, at most `budget` bytes;
    /// ready with whether the leg reached its end (EOF or an error).
    fn poll_read_leg(&mut self, cx: &mut Context<'_>, leg: Leg, budget: usize) -> Poll<bool> {
        if leg == Leg::Client {
            self.tap.sync(&mut self.session);
        }
        let Some(io) = (match leg {
            Leg::Client => Some(&mut self.client),
            Leg::Backend => self.backend.as_mut(),
            Leg::NewBackend => self.new_backend.as_deref_mut(),
        }) else {
            return Poll::Pending;
        };
        let session = &mut self.session;
        let counted = counted(leg, &self.lease, &self.new_lease, &mut self.traffic);
        SCRATCH.with_borrow_mut(|scratch| {
            let n = budget.min(scratch.len());
            let mut rb = ReadBuf::new(&mut scratch[..n]);
            match io.poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let now = Instant::now().into_std();
                    let n = rb.filled().len();
                    if n == 0 {
                        session.handle_closed(now, leg, "connection closed by peer");
                    } else {
                        if let Some((lease, t)) = counted {
                            t.read(&lease.backend().metrics, &scratch[..n]);
                        }
                        session.handle_data(now, leg, &scratch[..n]);
                    }
                    Poll::Ready(n == 0)
                }
                Poll::Ready(Err(e)) => {
                    session.handle_closed(Instant::now().into_std(), leg, &e.to_string());
                    Poll::Ready(true)
                }
            }
        })
    }

    /// The client's address (the PROXY header's source when one came).
    /// The mailbox holds it for the API; the driver keeps no second copy
    /// (32 bytes of every idle connection, issue 15).
    fn peer(&self) -> SocketAddr {
        self.ctl
            .client
            .lock()
            .expect("mailbox lock")
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Flushes what the client is owed, then closes every socket.
    async fn finish(mut self: Box<Self>) {
        self.ended();
        if self.protected {
            metrics().protect.protected.dec();
        }
        self.ctl.close_moves(&self.shared.router, self.conn_id);
        self.ctl.set_backend(None);
        let pending = Bytes::copy_from_slice(self.session.transmit(Leg::Client));
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if !pending.is_empty() {
                let _ = write_all(&mut self.client, &pending).await;
            }
            self.client.shutdown().await;
        })
        .await;
        if let Some(mut b) = self.backend.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), b.shutdown()).await;
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::net::TokioNet;

    #[tokio::test]
    async fn future_sizes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let shared = Arc::new(Shared {
            net: TokioNet::default(),
            router: Arc::new(Router::default()),
            server_tls: crate::tls::Live::new(None),
            backend_tls: crate::tls::Live::new(None),
            require_backend_tls: false,
            proxy_protocol: Default::default(),
            keepalive: Default::default(),
            buffer_limit: 1,
            protect: Default::default(),
            dial_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
        });
        let f = serve(
            shared,
            s,
            "127.0.0.1:1".parse().unwrap(),
            1,
            Arc::new(Mailbox::default()),
        );
        let (fut, driver) = (
            std::mem::size_of_val(&f),
            std::mem::size_of::<Driver<TokioNet>>(),
        );
        eprintln!(
            "serve future {fut} Driver {driver} Session {}",
            std::mem::size_of::<Session>()
        );
        // Issue 15's idle budget (3 KB of RSS per connection, two 256-byte
        // socket registrations and a tokio task included, met at 1,400
        // bytes with ~150 bytes to spare): the task's future is the
        // driver's pointer and its loop (a takeover's offer and the finish
        // are boxed), the driver holds the session; what only a move, a
        // restore, a dial or the PROXY-header sniff uses is boxed.
        assert!(fut <= 64, "the connection's future grew to {fut} bytes");
        assert!(driver <= 1408, "the driver grew to {driver} bytes");
    }
}
