//! The router: the set of backends, their health and connection counts,
//! and the choice of a backend for a new connection.
//!
//! Discovery (static list here; PD in a later issue) replaces the set with
//! [`Router::set_backends`]; health probes and failed dials mark backends
//! down; sessions hold a [`Lease`] on their backend so counts stay exact.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tiproxy_core::CapabilityFlags;
use tokio::time::Instant;

use crate::metrics::metrics;

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// `host:port` of its SQL port.
    pub addr: String,
    conns: AtomicI64,
    healthy: AtomicBool,
    /// When a failed backend may be tried again.
    retry_at: Mutex<Option<Instant>>,
    /// Removed from the set (its sessions should move or end).
    removed: AtomicBool,
}

impl Backend {
    fn new(addr: String) -> Self {
        metrics().backend_status.with_label_values(&[&addr]).set(1);
        Self {
            addr,
            conns: AtomicI64::new(0),
            healthy: AtomicBool::new(true),
            retry_at: Mutex::new(None),
            removed: AtomicBool::new(false),
        }
    }

    /// Sessions on this backend.
    pub fn connections(&self) -> i64 {
        self.conns.load(Ordering::Relaxed)
    }

    /// Whether the backend takes new connections.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.removed.load(Ordering::Relaxed)
    }
}

/// A session's claim on a backend; the count drops when the lease does.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    /// Takes a lease.
    pub fn new(backend: Arc<Backend>) -> Self {
        let n = backend.conns.fetch_add(1, Ordering::Relaxed) + 1;
        metrics()
            .backend_conn
            .with_label_values(&[&backend.addr])
            .set(n);
        Self { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let n = self.backend.conns.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics()
            .backend_conn
            .with_label_values(&[&self.backend.addr])
            .set(n);
    }
}

/// What backends said about themselves in their greetings.
#[derive(Debug, Clone)]
pub struct BackendProfile {
    /// Server version shown to clients.
    pub server_version: Bytes,
    /// Capabilities.
    pub capabilities: CapabilityFlags,
    /// Default collation.
    pub charset: u8,
}

impl Default for BackendProfile {
    fn default() -> Self {
        Self {
            server_version: Bytes::from_static(b"8.0.11-TiDB-v8.5.0"),
            capabilities: CapabilityFlags::PROXY_SUPPORTED,
            charset: 46,
        }
    }
}

/// The backend set.
#[derive(Debug, Default)]
pub struct Router {
    backends: RwLock<Vec<Arc<Backend>>>,
    profile: RwLock<Option<BackendProfile>>,
}

/// How long a backend that failed a dial gets no new connections.
pub const FAILED_BACKEND_PAUSE: Duration = Duration::from_secs(3);

impl Router {
    /// A router over `addrs`.
    pub fn new(addrs: &[String]) -> Self {
        let r = Self::default();
        r.set_backends(addrs);
        r
    }

    /// Replaces the set, keeping the state of backends that stay.
    pub fn set_backends(&self, addrs: &[String]) {
        let mut list = self.backends.write().expect("router lock");
        for b in list.iter() {
            if !addrs.contains(&b.addr) {
                b.removed.store(true, Ordering::Relaxed);
                metrics()
                    .backend_status
                    .with_label_values(&[&b.addr])
                    .set(0);
            }
        }
        let mut next = Vec::with_capacity(addrs.len());
        for a in addrs {
            match list.iter().find(|b| &b.addr == a) {
                Some(b) => next.push(b.clone()),
                None => next.push(Arc::new(Backend::new(a.clone()))),
            }
        }
        *list = next;
    }

    /// Every backend.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().expect("router lock").clone()
    }

    /// Whether any backend can take a connection now.
    pub fn has_healthy(&self) -> bool {
        let now = Instant::now();
        self.backends().iter().any(|b| self.usable(b, now))
    }

    fn usable(&self, b: &Backend, now: Instant) -> bool {
        if !b.is_healthy() {
            return false;
        }
        match *b.retry_at.lock().expect("backend lock") {
            Some(t) => now >= t,
            None => true,
        }
    }

    /// The healthy backend with the fewest connections (ties broken at
    /// random), skipping `exclude`.
    pub fn pick(&self, exclude: &[String]) -> Option<Arc<Backend>> {
        let now = Instant::now();
        let list = self.backends.read().expect("router lock");
        let mut best: Vec<&Arc<Backend>> = Vec::new();
        let mut min = i64::MAX;
        for b in list
            .iter()
            .filter(|b| !exclude.contains(&b.addr) && self.usable(b, now))
        {
            let c = b.connections();
            if c < min {
                min = c;
                best.clear();
            }
            if c == min {
                best.push(b);
            }
        }
        match best.len() {
            0 => None,
            1 => Some(best[0].clone()),
            n => Some(best[rand::rng().random_range(0..n)].clone()),
        }
    }

    /// A dial or handshake to `addr` failed: no new connections for a while.
    pub fn mark_failed(&self, addr: &str) {
        if let Some(b) = self.backends().iter().find(|b| b.addr == addr) {
            *b.retry_at.lock().expect("backend lock") = Some(Instant::now() + FAILED_BACKEND_PAUSE);
            metrics().backend_status.with_label_values(&[addr]).set(0);
        }
    }

    /// A probe or session reached `addr`.
    pub fn mark_ok(&self, addr: &str) {
        if let Some(b) = self.backends().iter().find(|b| b.addr == addr) {
            let mut r = b.retry_at.lock().expect("backend lock");
            if r.is_some() {
                *r = None;
                metrics().backend_status.with_label_values(&[addr]).set(1);
            }
        }
    }

    /// Records what a backend announced.
    pub fn set_profile(&self, p: BackendProfile) {
        *self.profile.write().expect("router lock") = Some(p);
    }

    /// What backends announced, or TiDB defaults before any was seen.
    pub fn profile(&self) -> BackendProfile {
        self.profile
            .read()
            .expect("router lock")
            .clone()
            .unwrap_or_default()
    }

    /// Whether a backend has announced itself yet.
    pub fn has_profile(&self) -> bool {
        self.profile.read().expect("router lock").is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn picks_least_connections_and_skips_failed() {
        let r = Router::new(&["a:1".into(), "b:1".into()]);
        let a = r.pick(&[]).unwrap();
        let _lease = Lease::new(a.clone());
        let b = r.pick(&[]).unwrap();
        assert_ne!(a.addr, b.addr, "the idle backend is chosen");
        r.mark_failed(&b.addr);
        assert_eq!(r.pick(&[]).unwrap().addr, a.addr);
        r.mark_failed(&a.addr);
        assert!(r.pick(&[]).is_none());
        assert!(!r.has_healthy());
        r.mark_ok(&a.addr);
        assert!(r.has_healthy());
    }

    #[tokio::test]
    async fn removed_backends_take_no_connections() {
        let r = Router::new(&["a:1".into(), "b:1".into()]);
        let a = r.backends()[0].clone();
        r.set_backends(&["b:1".into()]);
        assert!(!a.is_healthy());
        assert_eq!(r.pick(&[]).unwrap().addr, "b:1");
    }
}
