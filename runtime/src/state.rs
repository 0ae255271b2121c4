//! What the proxy's tasks share: the connection table, the configuration
//! in effect and how it changes (hot reload and the API apply through
//! [`State::apply_config`]), drain state and operator overrides. The
//! composition root ([`crate::proxy`]) builds it; the API, the reload
//! watcher, the health and balance loops read it. It imports none of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::Config;
use crate::conn::{Control, Mailbox, Shared};
use crate::net::Network;
use crate::router::Router;
use crate::tls;

/// State shared by the accept loops, the API and shutdown.
#[derive(Debug)]
pub struct State<N: Network> {
    pub(crate) shared: Arc<Shared<N>>,
    /// Sessions by connection id; ordered, so moves pick sessions in the
    /// same order on every run (the simulation replays).
    pub(crate) conns: Mutex<BTreeMap<u32, Arc<Mailbox>>>,
    pub(crate) count: AtomicU64,
    pub(crate) next_id: AtomicU32,
    pub(crate) draining: AtomicBool,
    pub(crate) stop_accepting: Notify,
    pub(crate) stopped: Notify,
    pub(crate) max_connections: AtomicU64,
    /// `proxy.high-memory-usage-reject-threshold` and the memory in use.
    pub(crate) memory: crate::memory::MemoryGuard,
    /// Operator override of the health answer (`PUT /api/debug/health`).
    pub manual_unhealthy: Mutex<Option<String>>,
    /// The configuration in effect: the file's at start, then as changed
    /// by the file (hot reload) and `PUT /api/admin/config`.
    pub live_config: std::sync::RwLock<Config>,
    /// Bumped by every applied change, so loops can tell cheaply whether to
    /// re-read [`State::live_config`].
    pub(crate) config_gen: AtomicU64,
    /// One configuration change at a time (file and API).
    pub(crate) apply_lock: Mutex<()>,
    /// PD discovery status.
    pub discovery: crate::discovery::StatusCell,
    /// The virtual IP election (`[ha]`), `None` inside when off.
    pub ha: crate::ha::StatusCell,
    /// The configuration at start (listeners, PD, registration).
    pub config: Config,
    /// TLS of the HTTP API (`security.server-http-tls`); `None`: plain HTTP.
    pub(crate) api_tls: tls::Live<tokio_rustls::TlsAcceptor>,
    /// Refused API clients' certificates, logged without flooding.
    pub(crate) api_refusals: tls::RefusalLog,
    /// TLS towards PD and TiDB status ports (`security.cluster-tls`);
    /// `None`: plain. Shared with the PD tasks.
    pub(crate) cluster_tls: Arc<tls::Live<Arc<rustls::ClientConfig>>>,
    /// `proxy.backend-clusters` (or `pd-addrs`): each cluster's discovery
    /// and registration.
    pub(crate) clusters: crate::discovery::Clusters,
    /// What the cluster tasks need, set once at start.
    pub(crate) cluster_context: std::sync::OnceLock<crate::discovery::Context>,
}

/// What a configuration change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changed keys now in effect.
    pub applied: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub restart_required: Vec<String>,
}

impl<N: Network> State<N> {
    /// Why the proxy should not get traffic, if it should not.
    pub fn unhealthy_reason(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("tiproxy is shutting down".into());
        }
        if let Some(r) = self.manual_unhealthy.lock().expect("health lock").clone() {
            return Some(format!("set unhealthy by an operator: {r}"));
        }
        if self.shared.router.backends().is_empty() {
            let d = self.discovery.lock().expect("status lock");
            return Some(match (&d.pd_error, d.pd) {
                (Some(e), true) => format!("no backend: PD is unreachable ({e})"),
                (None, true) => "no TiDB is registered in PD".into(),
                _ => "no backend is configured (set proxy.backend-addrs, or proxy.pd-addrs)".into(),
            });
        }
        if !self.shared.router.has_healthy() {
            return Some("no backend is reachable".into());
        }
        None
    }

    /// Every session's mailbox, by connection id (for listings).
    pub fn sessions(&self) -> Vec<(u32, Arc<Mailbox>)> {
        let mut v: Vec<(u32, Arc<Mailbox>)> = self
            .conns
            .lock()
            .expect("conn table")
            .iter()
            .map(|(k, m)| (*k, m.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// The router.
    pub fn router(&self) -> &Arc<Router> {
        &self.shared.router
    }

    /// A copy of the configuration in effect.
    pub fn live_config(&self) -> Config {
        self.live_config.read().expect("config lock").clone()
    }

    /// Changes with every applied configuration change.
    pub fn config_generation(&self) -> u64 {
        self.config_gen.load(Ordering::Acquire)
    }

    /// Patches the configuration in effect with `text` (TOML, possibly
    /// partial) and applies it: the path of both `PUT /api/admin/config`
    /// and a changed config file (`source` names which, in errors). Returns
    /// what changed and the warnings (unknown keys); on error nothing
    /// changed.
    pub fn patch_config(
        &self,
        text: &str,
        source: &str,
    ) -> Result<(Applied, Vec<String>), crate::config::ConfigError> {
        let _one = self.apply_lock.lock().expect("apply lock");
        let (new, warnings) = self
            .live_config()
            .patch(text, std::path::Path::new(source))?;
        Ok((self.apply_config(new, source)?, warnings))
    }

    /// Applies a whole new configuration. Everything that can fail (TLS
    /// files, the log file) is prepared first, so a failure changes
    /// nothing; then the live keys take effect together. Keys that need a
    /// restart are recorded in the configuration in effect and returned.
    pub fn apply_config(
        &self,
        new: Config,
        source: &str,
    ) -> Result<Applied, crate::config::ConfigError> {
        let err = |e: tls::TlsError| crate::config::ConfigError {
            file: source.to_string(),
            key: format!("security.{}", e.key),
            message: e.message,
        };
        let old = self.live_config();
        let pd = self.discovery.lock().expect("status lock").pd;
        let (applied, restart_required) = crate::config::classify(&old, &new, pd);
        let log = crate::logging::prepare(&old.log, &new.log).map_err(|m| {
            let (key, message) = m.split_once(": ").unwrap_or(("log", &m));
            crate::config::ConfigError {
                file: source.to_string(),
                key: key.to_string(),
                message: message.to_string(),
            }
        })?;
        let server_tls = (new.security.server_tls != old.security.server_tls)
            .then(|| tls::server_config(&new.security.server_tls, "server-tls", &new.workdir()))
            .transpose()
            .map_err(err)?;
        let backend_tls = (new.security.sql_tls != old.security.sql_tls)
            .then(|| tls::backend_config(&new))
            .transpose()
            .map_err(err)?;
        let api_tls = (new.security.server_http_tls != old.security.server_http_tls)
            .then(|| {
                tls::server_config(
                    &new.security.server_http_tls,
                    "server-http-tls",
                    &new.workdir(),
                )
            })
            .transpose()
            .map_err(err)?;
        let cluster_tls = (new.security.cluster_tls != old.security.cluster_tls)
            .then(|| tls::cluster_config(&new.security.cluster_tls))
            .transpose()
            .map_err(err)?;
        // Nothing below fails.
        self.max_connections
            .store(new.proxy.max_connections, Ordering::Relaxed);
        self.memory
            .set_threshold(new.proxy.high_memory_usage_reject_threshold);
        self.shared
            .proxy_protocol
            .store(new.proxy.proxy_protocol == "v2", Ordering::Relaxed);
        if !pd && new.proxy.backend_addrs != old.proxy.backend_addrs {
            self.shared.router.set_backends(&new.proxy.backend_addrs);
        }
        if new.proxy.backend_clusters != old.proxy.backend_clusters
            && let Some(ctx) = self.cluster_context.get()
        {
            let want = new.proxy.clusters();
            self.clusters.sync(&self.shared.net.pd(), &want, &new, ctx);
        }
        if let Some(c) = server_tls {
            self.shared
                .server_tls
                .set(c.map(tokio_rustls::TlsAcceptor::from));
        }
        if let Some(c) = backend_tls {
            self.shared
                .backend_tls
                .set(c.map(tokio_rustls::TlsConnector::from));
        }
        if let Some(c) = api_tls {
            self.api_tls.set(c.map(tokio_rustls::TlsAcceptor::from));
        }
        if let Some(c) = cluster_tls {
            self.cluster_tls.set(c);
        }
        log.commit();
        *self.live_config.write().expect("config lock") = new;
        self.config_gen.fetch_add(1, Ordering::AcqRel);
        Ok(Applied {
            applied,
            restart_required,
        })
    }

    /// Re-reads the TLS files of the configuration in effect (rotated
    /// certificates): new handshakes use them; on error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        let cfg = self.live_config();
        let server = if cfg.security.server_tls.cert.is_empty() {
            None
        } else {
            Some(tls::server_config(
                &cfg.security.server_tls,
                "server-tls",
                &cfg.workdir(),
            )?)
        };
        let backend = tls::backend_config(&cfg)?;
        let cluster = tls::cluster_config(&cfg.security.cluster_tls)?;
        // Auto-certs are not re-generated: only files are re-read.
        let api = if cfg.security.server_http_tls.cert.is_empty() {
            None
        } else {
            Some(tls::server_config(
                &cfg.security.server_http_tls,
                "server-http-tls",
                &cfg.workdir(),
            )?)
        };
        if let Some(c) = server {
            self.shared
                .server_tls
                .set(c.map(tokio_rustls::TlsAcceptor::from));
        }
        if let Some(c) = api {
            self.api_tls.set(c.map(tokio_rustls::TlsAcceptor::from));
        }
        self.shared
            .backend_tls
            .set(backend.map(tokio_rustls::TlsConnector::from));
        self.cluster_tls.set(cluster);
        Ok(())
    }

    /// Open client connections.
    pub fn connections(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Asks sessions on `from` (all sessions when `None`) to move to `to`
    /// (or the least-loaded other backend) at their next safe point.
    /// Returns how many were asked.
    pub fn redirect(&self, from: Option<&str>, to: Option<&str>) -> Result<usize, String> {
        let router = &self.shared.router;
        let fixed = match to {
            Some(t) => Some(
                router
                    .find(t)
                    .ok_or_else(|| format!("unknown backend {t}"))?,
            ),
            None => None,
        };
        if let Some(f) = from
            && router.find(f).is_none()
        {
            return Err(format!("unknown backend {f}"));
        }
        let mut n = 0;
        for (id, m) in self.sessions() {
            let Some(b) = m.backend() else { continue };
            if from.is_some_and(|f| f != b.addr) {
                continue;
            }
            // A session stays in its group (`balance.routing-rule`).
            let Some(scope) = router.scope_of(&b) else {
                continue;
            };
            let target = match &fixed {
                Some(t) if t.addr != b.addr && router.in_scope(t, scope) => t.clone(),
                Some(_) => continue,
                None => match router.pick(std::slice::from_ref(&b.addr), scope) {
                    Some(t) => t,
                    None => continue,
                },
            };
            m.request_move(router, id, &target, "api");
            n += 1;
        }
        Ok(n)
    }

    pub(crate) fn broadcast(&self, c: Control) {
        for tx in self.conns.lock().expect("conn table").values() {
            tx.send(c.clone());
        }
    }
}
