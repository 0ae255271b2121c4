//! Dialling: a backend for a new client or a move, and TLS upgrades on
//! either leg.

use std::sync::Arc;

use bytes::Bytes;
use tiproxy_core::health::{Dial, LocalExhaustion};
use tiproxy_core::session::Leg;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::warn;

use super::socket::Io;
use super::tls_stream::ServerTlsStream;
use super::{Driver, Op, events};
use crate::metrics::metrics;
use crate::net::Network;
use crate::tls;

/// Why a backend dial found no backend.
pub(super) enum ConnectError {
    /// No backend could be reached: what the last attempt said.
    Unreachable(String),
    /// The proxy itself is out of descriptors or memory.
    Local(LocalExhaustion),
}

impl<N: Network> Driver<N> {
    /// What `balance.routing-rule` routes this connection by.
    pub(super) fn client_info(&self) -> tiproxy_core::balance::ClientInfo {
        let stream = self.client.stream();
        let tcp_peer = stream.and_then(|s| self.shared.net.peer_addr(s));
        let local = stream.and_then(|s| self.shared.net.local_addr(s));
        crate::router::client_info(self.peer(), tcp_peer.unwrap_or(self.peer()), local)
    }

    pub(super) fn start_connect(&mut self, leg: Leg, target: Option<Arc<crate::router::Backend>>) {
        let shared = self.shared.clone();
        let new_client = target.is_none();
        // Only a new client is routed by it (a move's target is given).
        let client = if new_client {
            self.client_info()
        } else {
            Default::default()
        };
        let dial = async move {
            let mut tried: Vec<String> = Vec::new();
            let mut last_err = match shared.router.backends().len() {
                0 => String::from("no backend is configured"),
                n => format!(
                    "none of the {n} backends is reachable now (they failed recent connects or probes)"
                ),
            };
            loop {
                let backend = match &target {
                    Some(t) => {
                        if !tried.is_empty() {
                            return Err(ConnectError::Unreachable(last_err));
                        }
                        // Chosen when the move was asked, maybe long ago
                        // (the session waited for its safe point): a target
                        // that began to drain, failed or left since is not
                        // dialled (seed 26189 moved two sessions onto a
                        // draining TiDB). The move fails without a cool-down
                        // and the balance loop picks again.
                        if !shared.router.accepts(t) {
                            let why = t.health().why_not(Instant::now().into_std()).map_or_else(
                                || "it takes no sessions now".to_string(),
                                |w| w.to_string(),
                            );
                            return Err(ConnectError::Unreachable(format!(
                                "backend {} cannot take the session: {why}",
                                t.addr
                            )));
                        }
                        t.clone()
                    }
                    // Its group is asked again at each try: TiDBs come and
                    // go, and with them groups (TiProxy's `routeOnce`).
                    None => match shared.router.scope_for(&client) {
                        Err(no_group) => {
                            return Err(ConnectError::Unreachable(no_group.to_string()));
                        }
                        Ok(scope) => match shared.router.pick(&tried, scope) {
                            Some(b) => b,
                            None => return Err(ConnectError::Unreachable(last_err)),
                        },
                    },
                };
                tried.push(backend.addr.clone());
                let dial = match tokio::time::timeout(
                    shared.dial_timeout,
                    shared.net.connect(&backend.addr),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = shared.router.handle_dial(&backend, Dial::Connected);
                        match shared.router.lease(&backend) {
                            Some(lease) => return Ok((s, lease)),
                            // Not a failure of the backend: the socket closes
                            // and a new client tries another; a move fails
                            // without a cool-down and the balance loop picks
                            // again.
                            None => {
                                last_err = format!(
                                    "backend {} left the backend set while it was dialled",
                                    backend.addr
                                );
                                continue;
                            }
                        }
                    }
                    // Out of descriptors: the proxy's condition, not the
                    // backend's; other backends would fail the same way.
                    Ok(Err(e)) => match crate::net::local_exhaustion(&e) {
                        Some(what) => {
                            let _ = shared.router.handle_dial(&backend, Dial::Local(what));
                            return Err(ConnectError::Local(what));
                        }
                        None => format!("cannot connect to {}: {e}", backend.addr),
                    },
                    Err(_) => format!(
                        "cannot connect to {}: timed out after {:?}",
                        backend.addr, shared.dial_timeout
                    ),
                };
                let _ = shared.router.handle_dial(&backend, Dial::Failed);
                metrics()
                    .dial_backend_fail
                    .with_label_values(&[&backend.addr])
                    .inc();
                warn!("{dial}");
                last_err = dial;
            }
        };
        self.op = Some(Box::new(Op::Connect {
            leg,
            fut: Box::pin(events::timed_get_backend(dial, new_client)),
        }));
    }

    pub(super) fn start_tls(&mut self, leg: Leg, early: Bytes) {
        let now = Instant::now().into_std();
        match leg {
            Leg::Client => {
                let Some(acceptor) = self.shared.server_tls.get() else {
                    self.session
                        .handle_close("TLS requested without server TLS");
                    return;
                };
                let Io::Plain(s) = std::mem::replace(&mut self.client, Io::Upgrading) else {
                    self.session.handle_close("TLS requested twice");
                    return;
                };
                let config = acceptor.config().clone();
                self.op = Some(Box::new(Op::AcceptTls(Box::pin(async move {
                    let mut tls = Box::new(ServerTlsStream::new(config, &early, s)?);
                    tls.handshake().await?;
                    Ok(tls)
                }))));
            }
            Leg::Backend | Leg::NewBackend => {
                let taken = if leg == Leg::Backend {
                    self.backend.take()
                } else {
                    self.new_backend.take().map(|b| *b)
                };
                let (Some(connector), Some(Io::Plain(s))) = (self.shared.backend_tls.get(), taken)
                else {
                    let reason = "security.sql-tls is not configured";
                    if leg == Leg::Backend {
                        self.session.handle_connect_failed(now, leg, reason);
                    } else {
                        self.session.handle_closed(now, leg, reason);
                    }
                    return;
                };
                if leg == Leg::Backend {
                    self.backend = Some(Io::Upgrading);
                } else {
                    self.new_backend = Some(Box::new(Io::Upgrading));
                }
                let lease = if leg == Leg::Backend {
                    &self.lease
                } else {
                    &self.new_lease
                };
                let name = tls::server_name(
                    lease
                        .as_ref()
                        .map(|l| l.backend().addr.as_str())
                        .unwrap_or("tidb"),
                );
                // The SSL request is still queued: it must reach the backend
                // before the TLS ClientHello.
                let pending = Bytes::copy_from_slice(self.session.transmit(leg));
                self.session.advance_transmit(leg, pending.len());
                self.op = Some(Box::new(Op::ConnectTls {
                    leg,
                    fut: Box::pin(async move {
                        let mut s = s;
                        s.write_all(&pending).await?;
                        connector.connect(name, s).await
                    }),
                }));
            }
        }
    }
}
