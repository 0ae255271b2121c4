//! The driver's part of crash protection (the decisions are the core's,
//! `tiproxy_core::session::protect`): picking the backend a session whose
//! TiDB died is restored on, and keeping `tiproxy_session_protected` and
//! `tiproxy_session_restore_total` current.

use std::sync::Arc;

use tiproxy_core::balance::MoveOutcome;
use tiproxy_core::session::RestoreOutcome;
use tokio::time::Instant;
use tracing::{debug, info};

use super::Driver;
use crate::metrics::metrics;
use crate::net::Network;
use crate::router::Backend;

impl<N: Network> Driver<N> {
    /// The backend died under a protected session: restore it on another
    /// one the router would give a new client, never the lost one nor one
    /// this restore already failed on (`failed` of them: the last picks,
    /// or `exclude`, the target of a move that lost its old backend).
    pub(super) fn pick_restore_target(
        &mut self,
        reason: &str,
        failed: u8,
        exclude: Option<Arc<Backend>>,
    ) {
        // The lost socket is of no more use (it would answer EOF forever).
        self.backend = None;
        // A move that was pending will not happen: the restore replaces it.
        if self.pending_move.take().is_some() {
            self.move_resolved(MoveOutcome::Dropped);
        }
        let lost: Vec<String> = self
            .lease
            .as_ref()
            .map(|l| l.backend().addr.clone())
            .into_iter()
            .collect();
        let tried = self.restore_tried.get_or_insert_with(Box::default);
        if failed == 0 || exclude.is_some() {
            tried.clear();
        }
        tried.extend(exclude.map(|b| b.addr.clone()));
        let lost: Vec<String> = lost.into_iter().chain(tried.iter().cloned()).collect();
        // Never outside the session's group (`balance.routing-rule`).
        let router = &self.shared.router;
        let scope = match self.lease.as_ref() {
            Some(l) => router.scope_of(l.backend()),
            None => router.scope_for(&self.client_info()).ok(),
        };
        let target = scope.and_then(|s| router.pick(&lost, s));
        if let Some(t) = &target {
            self.restore_tried
                .get_or_insert_with(Box::default)
                .push(t.addr.clone());
        }
        debug!(
            conn_id = self.conn_id,
            from = lost.first().map(String::as_str).unwrap_or("-"),
            to = target.as_ref().map(|b| b.addr.as_str()).unwrap_or("-"),
            "backend lost under an idle session ({reason}); restoring it"
        );
        let now = Instant::now().into_std();
        self.session.handle_restore_target(now, target);
    }

    /// Counts what happened to a session whose backend was lost.
    pub(super) fn restore_done(&mut self, outcome: RestoreOutcome) {
        metrics()
            .protect
            .restore
            .with_label_values(&[outcome.label()])
            .inc();
        let conn_id = self.conn_id;
        match outcome {
            RestoreOutcome::Restored => {
                // The lost backend's lease ends here, as after a move.
                let from = self.moved_from.take().map(|b| b.addr.clone());
                let to = self.lease.as_ref().map(|l| l.backend().addr.clone());
                debug!(conn_id, from, to, "session restored on another backend");
            }
            RestoreOutcome::Failed(why) => {
                info!(conn_id, "session could not be restored: {why}");
            }
            RestoreOutcome::Unprotected(why) => {
                debug!(
                    conn_id,
                    why = why.label(),
                    "backend lost under an unprotected session"
                );
            }
        }
    }

    /// Keeps `tiproxy_session_protected` in step with the session.
    pub(super) fn update_protected(&mut self) {
        let now = Instant::now().into_std();
        let p = self.session.is_protected(now);
        if p != self.protected {
            self.protected = p;
            self.ctl
                .protected
                .store(p, std::sync::atomic::Ordering::Relaxed);
            if p {
                metrics().protect.protected.inc();
            } else {
                metrics().protect.protected.dec();
            }
        }
    }
}
