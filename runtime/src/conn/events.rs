//! What a connection reports of its session's events: metrics, logs, the
//! router's backend profile and the move ledger.

use std::sync::Arc;

use tiproxy_core::balance::{MoveOutcome, Resolved};
use tiproxy_core::error::{ProxyError, SessionError};
use tiproxy_core::session::Event;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Driver, uptime_ms};
use crate::metrics::{LegTraffic, PendingMove, clock_us, metrics};
use crate::net::Network;
use crate::router::{Backend, BackendProfile, Lease};

/// Connections that fail together (a TiDB died under them, no TiDB can take
/// them, no routing group matches them) log one line a second with a count.
static CONNECTIONS_FAILED: crate::flood::Flood =
    crate::flood::Flood::new(std::time::Duration::from_secs(1));
use tiproxy_core::session::Leg;

impl<N: Network> Driver<N> {
    pub(super) fn on_event(&mut self, e: Event<Arc<Backend>>) {
        let conn_id = self.conn_id;
        match e {
            Event::CommandDone {
                command,
                ok,
                elapsed,
            } => {
                if let Some(l) = &self.lease {
                    l.backend().metrics.query(command, elapsed.as_secs_f64());
                }
                if !ok {
                    metrics().query_error(command);
                }
                let started = clock_us().saturating_sub(elapsed.as_micros() as u64);
                metrics()
                    .query_time_since_conn_creation
                    .observe(started.saturating_sub(self.created_us) as f64 / 1e6);
                self.commands = self.commands.wrapping_add(1);
                self.last_command_ms = uptime_ms();
                self.may_rehome = true;
            }
            Event::BackendGreeting {
                server_version,
                capabilities,
                mariadb_capabilities,
                charset,
            } => {
                if !self.shared.router.has_profile() {
                    self.shared.router.set_profile(BackendProfile {
                        server_version,
                        capabilities,
                        mariadb_capabilities,
                        charset,
                    });
                }
            }
            Event::Authenticated { user } => {
                debug!(conn_id, peer = %self.peer(), user = %String::from_utf8_lossy(&user), "authenticated");
                if let Some(l) = &self.lease {
                    let took = clock_us().saturating_sub(self.created_us);
                    l.backend().metrics.handshake(took as f64 / 1e6);
                }
            }
            Event::Captured {
                payload,
                ok,
                elapsed,
                stmt_id,
                digest,
            } => {
                let cmd = crate::traffic::capture::Finished {
                    payload,
                    ok,
                    elapsed,
                    stmt_id,
                    digest,
                };
                self.tap.captured(conn_id, cmd);
            }
            Event::CaptureStart { states, elapsed } => {
                let (db, status) = (self.session.database(), self.session.status());
                self.tap.started(conn_id, db, status, states, elapsed);
            }
            Event::SafePoint | Event::MigrationStarted { .. } => {}
            Event::Migrated { target } => {
                self.move_resolved(MoveOutcome::Moved);
                let from = self
                    .moved_from
                    .take()
                    .map(|b| b.addr.clone())
                    .unwrap_or_default();
                self.move_counted(&from, &target.addr, true);
                debug!(conn_id, to = %target.addr, "session moved");
            }
            Event::MigrationFailed { target, reason } => {
                let resolved = self.move_resolved(MoveOutcome::of_failure(&reason));
                if resolved.source_cannot_export
                    && let Some(lease) = &self.lease
                {
                    warn!(
                        backend = %lease.backend().addr,
                        "backend cannot export sessions ({reason}); its sessions will not be moved. Is it TiDB with security.session-token-signing-cert set?"
                    );
                }
                let from = self
                    .lease
                    .as_ref()
                    .map(|l| l.backend().addr.clone())
                    .unwrap_or_default();
                self.move_counted(&from, &target.addr, false);
                info!(conn_id, to = %target.addr, "session move failed, staying: {reason}");
            }
            Event::Restore { outcome } => self.restore_done(outcome),
            Event::Unexportable { reason, permanent } => {
                debug!(conn_id, permanent, "session not protected: {reason}");
            }
            Event::Closed { reason } => {
                let backend = self
                    .lease
                    .as_ref()
                    .map(|l| l.backend().addr.as_str())
                    .unwrap_or("-");
                let kind = match &reason {
                    SessionError::ClientQuit => "success",
                    SessionError::ClientClosed => "client network break",
                    SessionError::ClientProtocol(_) => "malformed packet",
                    SessionError::Refused(ProxyError::NoBackend(_)) => "get backend fail",
                    SessionError::Refused(ProxyError::HandshakeTimeout(_)) => {
                        "client handshake fail"
                    }
                    SessionError::Refused(_) => "proxy error",
                    SessionError::AuthFailed { .. } => "auth fail",
                    SessionError::BackendLost(_) => "backend network break",
                    SessionError::BackendProtocol(_) => "backend handshake fail",
                    SessionError::Closed(_) => "proxy shutdown",
                };
                metrics().disconnection.with_label_values(&[kind]).inc();
                match &reason {
                    SessionError::ClientQuit
                    | SessionError::ClientClosed
                    | SessionError::Closed(_) => {
                        debug!(conn_id, peer = %self.peer(), backend, "connection closed: {reason}")
                    }
                    SessionError::AuthFailed { .. } => {
                        debug!(conn_id, peer = %self.peer(), backend, "{reason}")
                    }
                    SessionError::Refused(ProxyError::NoBackend(_))
                    | SessionError::BackendLost(_) => match CONNECTIONS_FAILED.admit() {
                        Some(0) => {
                            warn!(conn_id, peer = %self.peer(), backend, "connection failed: {reason}")
                        }
                        Some(n) => warn!(
                            conn_id,
                            peer = %self.peer(),
                            backend,
                            failed_since_last_line = n,
                            "connection failed: {reason}"
                        ),
                        None => {
                            debug!(conn_id, peer = %self.peer(), backend, "connection failed: {reason}")
                        }
                    },
                    _ => {
                        info!(conn_id, peer = %self.peer(), backend, "connection failed: {reason}")
                    }
                }
            }
        }
    }

    /// The session accepted a move to `to` for `reason`: it is pending
    /// (`tiproxy_balance_pending_migrate`) until it ends.
    pub(super) fn move_started(&mut self, to: &str, reason: &'static str) {
        let from = self
            .lease
            .as_ref()
            .map_or("", |l| l.backend().addr.as_str());
        // A move replacing another: the other one is over.
        self.pending_move = Some(Box::new(PendingMove::start(from, to, reason)));
    }

    /// A move ended: counted with its reason and duration. A move nobody
    /// asked for (the session restored itself after its backend died) is
    /// the backend's status (TiProxy's `status` factor).
    fn move_counted(&mut self, from: &str, to: &str, succeeded: bool) {
        match self.pending_move.take() {
            Some(p) => p.finish(succeeded),
            None => {
                let res = if succeeded { "succeed" } else { "fail" };
                metrics()
                    .migrate
                    .with_label_values(&[from, to, "status", res])
                    .inc();
            }
        }
    }

    /// A backend leg connected: its traffic is framed from here, past the
    /// PROXY header (all the session has queued on it yet), if any.
    pub(super) fn leg_connected(&mut self, leg: Leg) {
        let header = if self.backend_header {
            self.session.transmit(leg).len()
        } else {
            0
        };
        self.traffic[usize::from(leg == Leg::NewBackend)] = LegTraffic::after_header(header);
    }

    /// The connection ended: its lifetime is counted, a move under way is
    /// no longer pending.
    pub(super) fn ended(&mut self) {
        let lived = clock_us().saturating_sub(self.created_us);
        metrics().conn_lifetime.observe(lived as f64 / 1e6);
        self.pending_move = None;
    }

    /// A requested move ended: the ledger learns how.
    pub(super) fn move_resolved(&mut self, outcome: MoveOutcome) -> Resolved {
        let source = self
            .lease
            .as_ref()
            .map(|l| l.backend().addr.clone())
            .unwrap_or_default();
        let now = Instant::now().into_std();
        self.shared
            .router
            .with_moves(|l| l.resolved(self.conn_id, &source, outcome, now))
    }
}

/// The lease and traffic framing that count what moves on `leg` (none for
/// the client leg, or before a backend is dialled).
pub(super) fn counted<'a>(
    leg: Leg,
    lease: &'a Option<Lease>,
    new_lease: &'a Option<Lease>,
    traffic: &'a mut [LegTraffic; 2],
) -> Option<(&'a Lease, &'a mut LegTraffic)> {
    let [backend, new_backend] = traffic;
    match leg {
        Leg::Client => None,
        Leg::Backend => lease.as_ref().map(|l| (l, backend)),
        Leg::NewBackend => new_lease.as_ref().map(|l| (l, new_backend)),
    }
}

/// A new client's search for a backend, timed and counted
/// (`tiproxy_backend_get_backend*`); a move's dial is the move's business.
pub(super) async fn timed_get_backend<T, E>(
    dial: impl std::future::Future<Output = Result<T, E>>,
    new_client: bool,
) -> Result<T, E> {
    let started = Instant::now();
    let res = dial.await;
    if new_client {
        let m = metrics();
        m.get_backend_duration
            .observe(started.elapsed().as_secs_f64());
        let what = if res.is_ok() { "succeed" } else { "fail" };
        m.get_backend.with_label_values(&[what]).inc();
    }
    res
}
