//! What a connection reports of its session's events: metrics, logs, the
//! router's backend profile and the move ledger.

use std::sync::Arc;

use tiproxy_core::balance::{MoveOutcome, Resolved};
use tiproxy_core::error::{ProxyError, SessionError};
use tiproxy_core::session::Event;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Driver, uptime_ms};
use crate::metrics::metrics;
use crate::net::Network;
use crate::router::{Backend, BackendProfile};

impl<N: Network> Driver<N> {
    pub(super) fn on_event(&mut self, e: Event<Arc<Backend>>) {
        let conn_id = self.conn_id;
        match e {
            Event::CommandDone {
                command,
                ok,
                elapsed,
            } => {
                metrics().query(command, elapsed.as_secs_f64());
                if !ok {
                    metrics().query_error(command);
                }
                self.commands = self.commands.wrapping_add(1);
                self.last_command_ms = uptime_ms();
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
                debug!(conn_id, peer = %self.peer, user = %String::from_utf8_lossy(&user), "authenticated");
                let _ = user;
            }
            Event::SafePoint | Event::MigrationStarted { .. } => {}
            Event::Migrated { target } => {
                self.move_resolved(MoveOutcome::Moved);
                let from = self
                    .moved_from
                    .take()
                    .map(|b| b.addr.clone())
                    .unwrap_or_default();
                metrics()
                    .migrate
                    .with_label_values(&[&from, &target.addr, "", "succeed"])
                    .inc();
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
                metrics()
                    .migrate
                    .with_label_values(&[&from, &target.addr, "", "fail"])
                    .inc();
                info!(conn_id, to = %target.addr, "session move failed, staying: {reason}");
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
                        debug!(conn_id, peer = %self.peer, backend, "connection closed: {reason}")
                    }
                    SessionError::AuthFailed { .. } => {
                        debug!(conn_id, peer = %self.peer, backend, "{reason}")
                    }
                    SessionError::Refused(ProxyError::NoBackend(_))
                    | SessionError::BackendLost(_) => {
                        warn!(conn_id, peer = %self.peer, backend, "connection failed: {reason}")
                    }
                    _ => info!(conn_id, peer = %self.peer, backend, "connection failed: {reason}"),
                }
            }
        }
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
