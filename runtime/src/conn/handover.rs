//! A connection's part in the proxy's own takeover ([`crate::takeover`]):
//! offering its session at the next exportable point, waiting for the
//! verdict without touching its sockets, and, in the new process,
//! continuing an imported session.

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use tiproxy_core::session::{ProtectionCopy, Session};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::socket::Io;
use super::{Driver, Mailbox, Shared, session_config, uptime_ms};
use crate::metrics::metrics;
use crate::net::Network;

/// Where connections send their offers during a takeover.
pub type HandOverTx = mpsc::UnboundedSender<Handover>;

/// A connection's answer to [`super::Control::HandOver`].
#[derive(Debug)]
pub enum Handover {
    /// The session, exported, with duplicates of its sockets.
    Ready(Offer),
    /// The session cannot be handed over (it stays here until it ends).
    Kept {
        /// Connection id.
        id: u32,
        /// Why, for the log.
        why: &'static str,
    },
}

/// One session offered to the new process.
#[derive(Debug)]
pub struct Offer {
    /// Connection id.
    pub id: u32,
    /// The client's address.
    pub client: SocketAddr,
    /// The backend's address.
    pub backend: String,
    /// [`Session::export`]'s bytes.
    pub state: Bytes,
    /// Crash protection's state copy, when the session holds a clean one.
    pub protect: Option<ProtectionCopy>,
    /// A duplicate of the client socket.
    pub client_fd: OwnedFd,
    /// A duplicate of the backend socket.
    pub backend_fd: OwnedFd,
    /// `true`: the new process runs it (release); `false` or dropped:
    /// resume here.
    pub verdict: oneshot::Sender<bool>,
}

/// How an offer ended for the connection.
pub(super) enum Outcome {
    /// Not at an exportable point yet (or nothing asked).
    NotYet,
    /// Handed over: forget the session, close without shutdown().
    Gone,
}

/// The TCP socket under a plain leg; `None` under TLS (no kernel TLS: the
/// record layer's state lives in this process).
fn plain_tcp<S: 'static>(io: &Io<S>) -> Option<&tokio::net::TcpStream> {
    match io {
        Io::Plain(s) => (s as &dyn Any).downcast_ref::<tokio::net::TcpStream>(),
        _ => None,
    }
}

impl<N: Network> Driver<N> {
    /// With a takeover asked: offers the session once it can be exported,
    /// then waits for the verdict (reading neither socket meanwhile).
    pub(super) async fn offer(&mut self) -> Outcome {
        let Some(tx) = self.handover.as_ref() else {
            return Outcome::NotYet;
        };
        let kept = |tx: &HandOverTx, id, why| {
            let _ = tx.send(Handover::Kept { id, why });
        };
        if !matches!(self.client, Io::Plain(_)) {
            kept(tx, self.conn_id, "the client uses TLS");
            self.handover = None;
            return Outcome::NotYet;
        }
        if matches!(self.backend, Some(Io::ClientTls(_))) {
            kept(tx, self.conn_id, "the backend connection uses TLS");
            self.handover = None;
            return Outcome::NotYet;
        }
        if !self.may_offer() {
            return Outcome::NotYet;
        }
        let (Some(client), Some(backend), Some(lease)) = (
            plain_tcp(&self.client),
            self.backend.as_ref().and_then(plain_tcp),
            self.lease.as_ref(),
        ) else {
            kept(tx, self.conn_id, "not on a TCP socket");
            self.handover = None;
            return Outcome::NotYet;
        };
        let Ok(state) = self.session.export() else {
            return Outcome::NotYet;
        };
        let fds = client
            .as_fd()
            .try_clone_to_owned()
            .and_then(|c| Ok((c, backend.as_fd().try_clone_to_owned()?)));
        let (client_fd, backend_fd) = match fds {
            Ok(x) => x,
            Err(_) => {
                kept(tx, self.conn_id, "out of descriptors");
                self.handover = None;
                return Outcome::NotYet;
            }
        };
        let (verdict, answer) = oneshot::channel();
        let offer = Offer {
            id: self.conn_id,
            client: self.peer(),
            backend: lease.backend().addr.clone(),
            state,
            protect: self.session.protection_copy(Instant::now().into_std()),
            client_fd,
            backend_fd,
            verdict,
        };
        let sent = tx.send(Handover::Ready(offer)).is_ok();
        // One offer per takeover: a session that comes back stays here.
        self.handover = None;
        if sent && answer.await == Ok(true) {
            self.forget();
            return Outcome::Gone;
        }
        Outcome::NotYet
    }

    /// Whether the session is at a point it can be offered: exportable,
    /// and no dial or TLS handshake under way.
    pub(super) fn may_offer(&self) -> bool {
        self.op.is_none() && self.new_backend.is_none() && self.session.may_export()
    }

    /// The new process runs the session: leave every shared table without
    /// counting a closed session. The sockets close (not shut down) when
    /// the driver drops.
    fn forget(&mut self) {
        if self.protected {
            metrics().protect.protected.dec();
            self.protected = false;
        }
        self.ctl.close_moves(&self.shared.router, self.conn_id);
        self.ctl.set_backend(None);
    }
}

/// A session imported from an old process, not yet on its sockets.
pub struct Imported<N: Network> {
    shared: Arc<Shared<N>>,
    session: Session<Arc<crate::router::Backend>>,
    lease: crate::router::Lease,
    peer: SocketAddr,
    conn_id: u32,
}

impl<N: Network> std::fmt::Debug for Imported<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("conn_id", &self.conn_id)
            .finish_non_exhaustive()
    }
}

/// Rebuilds an exported session for this process, with its protection
/// copy when one came (not kept when protection is off here or it is too
/// old); `Err` says why not.
pub fn import<N: Network>(
    shared: &Arc<Shared<N>>,
    conn_id: u32,
    peer: SocketAddr,
    backend: &str,
    state: &[u8],
    protect: Option<ProtectionCopy>,
) -> Result<Box<Imported<N>>, String> {
    let b = shared
        .router
        .find(backend)
        .ok_or_else(|| format!("backend {backend} is not in this process's backend set"))?;
    let lease = shared
        .router
        .lease(&b)
        .ok_or_else(|| format!("backend {backend} takes no sessions here"))?;
    let profile = shared.router.profile();
    let cfg = session_config(shared, conn_id, &profile, peer, None);
    let now = Instant::now().into_std();
    let mut session = Session::import(cfg, state, now).map_err(|e| e.to_string())?;
    if let Some(copy) = protect {
        session.adopt_protection_copy(copy, now);
    }
    // Boxed: the connection's task captures it until the driver takes the
    // session, and keeps the space it held for the task's life.
    Ok(Box::new(Imported {
        shared: shared.clone(),
        session,
        lease,
        peer,
        conn_id,
    }))
}

impl<N: Network> Imported<N> {
    /// Serves the session on its sockets to its end: the driver is built
    /// now, and the future returned runs it (not an `async fn`, which would
    /// keep this session's bytes, moved out, in the task for its life).
    pub fn serve(
        self: Box<Self>,
        client: N::Stream,
        backend: N::Stream,
        ctl: Arc<Mailbox>,
    ) -> impl Future<Output = ()> + Send {
        *ctl.client.lock().expect("mailbox lock") = Some(self.peer);
        ctl.set_backend(Some(self.lease.backend().clone()));
        let d = Box::new(Driver {
            shared: self.shared,
            session: self.session,
            client: Io::Plain(client),
            backend: Some(Io::Plain(backend)),
            new_backend: None,
            lease: Some(self.lease),
            new_lease: None,
            op: None,
            timer: None,
            ctl,
            conn_id: self.conn_id,
            closing: false,
            moved_from: None,
            last_command_ms: uptime_ms(),
            commands: 0,
            created_us: crate::metrics::clock_us(),
            pending_move: None,
            traffic: Default::default(),
            sniff: None,
            // An adopted session's backend connection is already open.
            backend_header: false,
            protected: false,
            restore_tried: None,
            tap: Default::default(),
            handover: None,
            may_rehome: false,
        });
        d.run()
    }
}
