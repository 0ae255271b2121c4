//! TCP keepalive and `TCP_USER_TIMEOUT` on the proxy's sockets, from the
//! three `[proxy]` profiles with TiProxy's meaning: `frontend-keepalive` on
//! client connections, `backend-healthy-keepalive` on connections to a
//! healthy TiDB, and `backend-unhealthy-keepalive` (aggressive: such a TiDB
//! may stop at any time) once its checks or dials fail, its status port
//! says it is shutting down, or it left the backend set.
//!
//! An idle connection to a peer that vanished behind a silent network is
//! found within `idle + cnt * intvl`; one with data waiting for an
//! acknowledgement within `timeout`. A 0 means the system's default
//! (`net.ipv4.tcp_keepalive_*`; no user timeout), also after a switch from
//! a profile that set it.
//!
//! This module owns the profiles in effect ([`Profiles`]), the socket
//! options ([`apply`], used by [`crate::net::TokioNet`]) and
//! [`keepalive_loop`], which tells sessions when their backend's health or
//! the profiles change. Sessions re-apply on [`Control::Keepalive`]; the
//! loop never touches a socket itself.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{debug, warn};

use crate::config::{Keepalive, ProxyConfig};
use crate::conn::Control;
use crate::net::Network;
use crate::router::Backend;
use crate::state::State;

/// The three profiles, as configured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProfileSet {
    /// `proxy.frontend-keepalive`.
    pub frontend: Keepalive,
    /// `proxy.backend-healthy-keepalive`.
    pub healthy: Keepalive,
    /// `proxy.backend-unhealthy-keepalive`.
    pub unhealthy: Keepalive,
}

impl ProfileSet {
    /// The profiles of `[proxy]`.
    pub fn from_config(p: &ProxyConfig) -> Self {
        Self {
            frontend: p.frontend_keepalive.clone(),
            healthy: p.backend_healthy_keepalive.clone(),
            unhealthy: p.backend_unhealthy_keepalive.clone(),
        }
    }

    /// The profile for a connection to `b` now.
    pub fn backend(&self, b: &Backend) -> &Keepalive {
        if backend_unhealthy(b) {
            &self.unhealthy
        } else {
            &self.healthy
        }
    }
}

/// The profiles in effect (the keys reload live: a change reaches every
/// open connection).
#[derive(Debug, Default)]
pub struct Profiles(RwLock<Arc<ProfileSet>>);

impl Profiles {
    /// Profiles in effect from the start.
    pub fn new(set: ProfileSet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    /// The profiles in effect.
    pub fn get(&self) -> Arc<ProfileSet> {
        self.0.read().expect("keepalive lock").clone()
    }

    /// Replaces them; whether anything changed.
    pub fn set(&self, set: ProfileSet) -> bool {
        let mut cur = self.0.write().expect("keepalive lock");
        if **cur == set {
            return false;
        }
        *cur = Arc::new(set);
        true
    }
}

/// Whether connections to `b` use the unhealthy profile: its checks or a
/// dial failed, its status port reports a shutdown, or it was removed
/// (TiProxy's "unhealthy"). An operator's drain is not: that TiDB is fine.
pub fn backend_unhealthy(b: &Backend) -> bool {
    let h = b.health();
    h.is_failed() || h.is_draining() || h.is_removed()
}

/// The system's keepalive defaults, what a 0 in a profile stands for.
#[derive(Debug, Clone, Copy)]
struct SystemDefaults {
    time: u64,
    interval: u64,
    probes: u32,
}

fn system_defaults() -> SystemDefaults {
    static D: std::sync::OnceLock<SystemDefaults> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        let read = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        // Linux's compiled-in defaults when /proc cannot be read.
        SystemDefaults {
            time: read("tcp_keepalive_time", 7200),
            interval: read("tcp_keepalive_intvl", 75),
            probes: read("tcp_keepalive_probes", 9) as u32,
        }
    })
}

/// Sets SO_KEEPALIVE with idle, interval and count, and TCP_USER_TIMEOUT,
/// on a TCP socket as `k` says. The user timeout is set whether keepalive
/// is on or not (as TiProxy does).
pub fn apply(socket: &impl std::os::fd::AsFd, k: &Keepalive) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    if k.enabled {
        let d = system_defaults();
        let or = |v: u64, default: u64| Duration::from_secs(if v > 0 { v } else { default });
        let params = socket2::TcpKeepalive::new()
            .with_time(or(k.idle, d.time))
            .with_interval(or(k.intvl, d.interval))
            .with_retries(if k.cnt > 0 { k.cnt } else { d.probes });
        s.set_tcp_keepalive(&params)?;
    } else {
        s.set_keepalive(false)?;
    }
    s.set_tcp_user_timeout((k.timeout > 0).then(|| Duration::from_secs(k.timeout)))
}

/// A socket option could not be set: loud once, then at debug (the same
/// cause would otherwise log once per connection).
pub(crate) fn report_failure(what: &str, e: &io::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            "cannot set TCP keepalive on a {what} connection: {e} (further failures are logged at debug)"
        );
    } else {
        debug!("cannot set TCP keepalive on a {what} connection: {e}");
    }
}

/// How often backend health and the configuration are looked at. The
/// status checks run every 500 ms by default: a switch lags them by at most
/// this much.
const TICK: Duration = Duration::from_millis(200);

/// Tells sessions to re-apply their keepalive profiles: all of them when the
/// profiles changed (a reload), those on a backend whose health changed
/// between healthy and unhealthy otherwise. Runs until the proxy stops.
pub(crate) async fn keepalive_loop<N: Network>(st: Arc<State<N>>) {
    let mut generation = st.config_generation();
    // Each backend's last state, by address, with its handle: sessions on a
    // backend that left the set still need to hear of it.
    let mut last: HashMap<String, (Arc<Backend>, bool)> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        if st.config_generation() != generation {
            generation = st.config_generation();
            let set = ProfileSet::from_config(&st.live_config().proxy);
            if st.shared.keepalive.set(set) {
                debug!("keepalive profiles changed: every connection re-applies them");
                st.broadcast(Control::Keepalive);
            }
        }
        let backends = st.shared.router.backends();
        let mut changed: Vec<Arc<Backend>> = Vec::new();
        for b in &backends {
            let unhealthy = backend_unhealthy(b);
            if let Some((_, was)) = last.insert(b.addr.clone(), (b.clone(), unhealthy))
                && was != unhealthy
            {
                changed.push(b.clone());
            }
        }
        last.retain(|addr, (b, was)| {
            let kept = backends.iter().any(|x| &x.addr == addr);
            // Removed: unhealthy from now on.
            if !kept && !*was {
                changed.push(b.clone());
            }
            kept
        });
        if changed.is_empty() {
            continue;
        }
        for b in &changed {
            debug!(backend = %b.addr, unhealthy = backend_unhealthy(b), "backend health changed: its connections switch keepalive profile");
        }
        for (_, m) in st.sessions() {
            if let Some(b) = m.backend()
                && changed.iter().any(|c| Arc::ptr_eq(c, &b))
            {
                m.send(Control::Keepalive);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiproxy_core::health::CheckFailure;

    use crate::router::Router;

    fn profile(enabled: bool, idle: u64, intvl: u64, cnt: u32, timeout: u64) -> Keepalive {
        Keepalive {
            enabled,
            idle,
            intvl,
            cnt,
            timeout,
        }
    }

    #[test]
    fn a_profile_sets_every_option_and_zero_means_the_system_default() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let check = socket2::SockRef::from(&s);
        apply(&s, &profile(true, 7, 2, 3, 4)).unwrap();
        assert!(check.keepalive().unwrap());
        assert_eq!(check.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            check.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(check.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            check.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(4))
        );
        // Switching to a profile of zeros restores the system's values.
        apply(&s, &profile(true, 0, 0, 0, 0)).unwrap();
        let d = system_defaults();
        assert_eq!(
            check.tcp_keepalive_time().unwrap(),
            Duration::from_secs(d.time)
        );
        assert_eq!(
            check.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(d.interval)
        );
        assert_eq!(check.tcp_keepalive_retries().unwrap(), d.probes);
        assert_eq!(check.tcp_user_timeout().unwrap(), None);
        // Disabled: no keepalive, the user timeout still applies.
        apply(&s, &profile(false, 7, 2, 3, 5)).unwrap();
        assert!(!check.keepalive().unwrap());
        assert_eq!(
            check.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_backend_gets_the_unhealthy_profile_while_it_fails_and_after_it_left() {
        let set = ProfileSet::from_config(&ProxyConfig::default());
        assert_eq!(
            (set.healthy.idle, set.unhealthy.idle),
            (60, 10),
            "TiProxy's defaults"
        );
        let router = Router::new(&["a:1".into(), "b:1".into()]);
        let a = router.find("a:1").unwrap();
        assert_eq!(set.backend(&a), &set.healthy);
        let _ = router.handle_probe(&a, Err(CheckFailure::Backend));
        assert!(backend_unhealthy(&a));
        assert_eq!(set.backend(&a), &set.unhealthy);
        let _ = router.handle_probe(&a, Ok(()));
        assert_eq!(set.backend(&a), &set.healthy);
        // An operator's drain leaves a working TiDB: still healthy.
        a.set_manual_drain(true);
        assert_eq!(set.backend(&a), &set.healthy);
        router.set_backends(&["b:1".into()]);
        assert_eq!(set.backend(&a), &set.unhealthy, "removed");
    }

    #[test]
    fn profiles_report_whether_a_reload_changed_them() {
        let p = Profiles::new(ProfileSet::default());
        assert!(!p.set(ProfileSet::default()));
        let mut changed = ProfileSet::default();
        changed.frontend.idle = 30;
        assert!(p.set(changed.clone()));
        assert_eq!(*p.get(), changed);
    }
}
