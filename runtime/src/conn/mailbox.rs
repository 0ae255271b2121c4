//! A connection's mailbox: how the router, the API and shutdown reach a
//! connection task (a queue and a waker, cheaper than a channel), and what a
//! session listing shows of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Context;

use crate::router::Router;

/// A connection's mailbox: requests from the router, the API and shutdown.
/// Cheaper than a channel (an idle connection holds one of these).
#[derive(Debug, Default)]
pub struct Mailbox {
    /// The client's address.
    pub(super) client: std::sync::Mutex<Option<SocketAddr>>,
    /// The backend the session is on (set by the connection).
    pub(super) backend: std::sync::Mutex<Option<Arc<crate::router::Backend>>>,
    /// The connection ended: no move may be recorded for it any more (set
    /// under the move ledger's lock, so a request racing the end leaves no
    /// entry behind).
    pub(super) closed: std::sync::atomic::AtomicBool,
    pub(super) waker: atomic_waker::AtomicWaker,
    /// Set when `queue` may be non-empty: the hot path checks this flag, not
    /// the lock.
    pub(super) pending: std::sync::atomic::AtomicBool,
    pub(super) queue: std::sync::Mutex<Vec<Control>>,
    /// The session holds a state copy that would serve a restore (kept by
    /// the connection with `tiproxy_session_protected`).
    pub(super) protected: std::sync::atomic::AtomicBool,
}

/// What a listing shows of a session. A connection answers
/// [`Control::Describe`] with it: nothing is kept per idle connection for
/// listings.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    /// Connection id.
    pub connection_id: u32,
    /// Client address (from the PROXY header when there is one).
    pub client: String,
    /// The backend it is on.
    pub backend: Option<String>,
    /// Authenticated user.
    pub user: String,
    /// Database chosen at connect or by COM_CHANGE_USER.
    pub db: String,
    /// Whether it is inside a transaction.
    pub in_transaction: bool,
    /// Milliseconds since its last command finished (or since it connected).
    pub idle_ms: u64,
    /// Commands it finished (the status page turns this into per-backend QPS).
    pub commands: u64,
}

/// Where a connection sends its [`SessionInfo`] (taken once).
pub type DescribeReply = Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<SessionInfo>>>>;

/// Milliseconds since the process started (monotonic).
pub fn uptime_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Mailbox {
    /// The client address, as set by the connection (for the simulation's
    /// bookkeeping).
    pub fn client(&self) -> Option<SocketAddr> {
        *self.client.lock().expect("mailbox lock")
    }

    /// Whether the session holds a usable state copy now (for the
    /// simulation's "a protected session outlives its TiDB's crash").
    pub fn protected(&self) -> bool {
        self.protected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The backend the session is on.
    pub fn backend(&self) -> Option<Arc<crate::router::Backend>> {
        self.backend.lock().expect("mailbox lock").clone()
    }

    pub(super) fn set_backend(&self, b: Option<Arc<crate::router::Backend>>) {
        *self.backend.lock().expect("mailbox lock") = b;
    }

    /// Asks session `conn` (this mailbox's) to move to `target` at its
    /// next safe point for `reason` (a balance factor's name, or `api`),
    /// and records the move in the router's ledger.
    pub fn request_move(
        &self,
        router: &Router,
        conn: u32,
        target: &Arc<crate::router::Backend>,
        reason: &'static str,
    ) {
        router.with_moves(|l| {
            if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            l.requested(conn, target.addr.clone());
            self.send(Control::Redirect(target.clone(), reason));
        });
    }

    /// Session `conn` (this mailbox's) ended: its moves leave the ledger,
    /// and none may be recorded for it from now on.
    pub(super) fn close_moves(&self, router: &Router, conn: u32) {
        router.with_moves(|l| {
            self.closed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            l.closed(conn);
        });
    }

    /// Queues a request and wakes the connection.
    pub fn send(&self, c: Control) {
        self.queue.lock().expect("mailbox lock").push(c);
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    pub(super) fn poll_take(&self, cx: &mut Context<'_>) -> Option<Control> {
        use std::sync::atomic::Ordering;
        self.waker.register(cx.waker());
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock().expect("mailbox lock");
        if q.len() <= 1 {
            self.pending.store(false, Ordering::Release);
        }
        if q.is_empty() {
            return None;
        }
        let c = q.remove(0);
        if q.is_empty() {
            *q = Vec::new();
        }
        Some(c)
    }
}

/// An operator's or the router's request to a connection.
#[derive(Debug, Clone)]
pub enum Control {
    /// Move to this backend at the next safe point, for this reason
    /// (`tiproxy_balance_migrate_total`'s `reason`).
    Redirect(Arc<crate::router::Backend>, &'static str),
    /// Close at the next safe point (graceful shutdown).
    CloseAtSafePoint,
    /// Close now.
    Close(&'static str),
    /// Report what a session listing shows.
    Describe(DescribeReply),
    /// Re-apply the keepalive profiles: they changed, or the backend's
    /// health did ([`crate::keepalive`]).
    Keepalive,
    /// Hand the session to a new process at its next exportable point
    /// ([`crate::takeover`]).
    HandOver(super::handover::HandOverTx),
}

#[cfg(test)]
mod move_tests {
    use super::*;

    #[test]
    fn a_move_requested_after_the_end_leaves_nothing_behind() {
        let router = Router::new(&["a:1".into(), "b:1".into()]);
        let b = router.find("b:1").unwrap();
        let mb = Mailbox::default();
        mb.request_move(&router, 7, &b, "conn");
        assert_eq!(router.incoming(&b), 1);
        assert!(
            matches!(mb.queue.lock().unwrap().as_slice(), [Control::Redirect(t, _)] if t.addr == "b:1")
        );
        mb.close_moves(&router, 7);
        assert_eq!(router.incoming(&b), 0, "the end resolves the move");
        // The balance loop still held the mailbox: its request is dropped.
        mb.request_move(&router, 7, &b, "conn");
        assert_eq!(router.incoming(&b), 0);
        assert_eq!(router.with_moves(|l| l.in_flight()), 0);
    }
}
