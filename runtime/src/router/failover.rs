//! `proxy.fail-backend-list` and `proxy.failover-timeout`, as TiProxy's
//! router group has them (`pkg/balance/router/group.go`): a TiDB named in
//! the list (by `host:port`, or by host, which for a TiDB in Kubernetes is
//! its pod's name) takes no new sessions, its sessions move away as from a
//! draining TiDB, and those still on it `failover-timeout` seconds after it
//! entered the list are closed (0: at once). A list that would leave no
//! other TiDB to route to is ignored, with a warning, until one can take
//! sessions. Both keys are reloadable.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Backend, Router};

/// The list in effect.
#[derive(Debug, Default)]
pub(super) struct FailList {
    names: Vec<String>,
    timeout: Duration,
    /// The list names every TiDB that could take sessions: ignored.
    ignored: bool,
    /// Some backend is in failover (a pass is needed to take it out).
    active: bool,
}

impl Backend {
    /// Since when it is in `proxy.fail-backend-list`, if it is.
    pub fn failover_since(&self) -> Option<std::time::Instant> {
        self.health().failover_since()
    }

    fn listed(&self, names: &[String]) -> bool {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        names.iter().any(|n| *n == self.addr || *n == host)
    }
}

impl Router {
    /// Applies `proxy.fail-backend-list` and `proxy.failover-timeout`.
    pub fn set_fail_list(&self, names: &[String], timeout_secs: u64) {
        {
            let mut f = self.fail_list.lock().expect("fail list");
            f.names = names.to_vec();
            f.timeout = Duration::from_secs(timeout_secs);
        }
        self.update_failover();
    }

    /// Puts the backends in the list into failover and takes the others
    /// out; call it when the list or the backend set changed (the balance
    /// loop does every tick).
    pub fn update_failover(&self) {
        let mut f = self.fail_list.lock().expect("fail list");
        if f.names.is_empty() && !f.active {
            return;
        }
        let now = Instant::now().into_std();
        let backends = self.backends();
        let listed: Vec<bool> = backends.iter().map(|b| b.listed(&f.names)).collect();
        let other_can_take = backends.iter().zip(&listed).any(|(b, l)| {
            let h = b.health();
            !l && !h.is_removed() && !h.is_draining() && !h.is_manually_drained()
        });
        let ignore = listed.iter().any(|l| *l) && !other_can_take;
        if ignore != f.ignored {
            if ignore {
                warn!(
                    list = ?f.names,
                    "proxy.fail-backend-list would leave no TiDB to route to: ignored until another can take sessions"
                );
            } else {
                info!(list = ?f.names, "proxy.fail-backend-list applies again");
            }
            f.ignored = ignore;
        }
        let mut active = false;
        for (b, l) in backends.iter().zip(listed) {
            let on = l && !ignore;
            active |= on;
            let changed = b
                .health
                .lock()
                .expect("backend lock")
                .set_failover(on.then_some(now));
            if changed && on {
                warn!(
                    backend = %b.addr,
                    sessions = b.connections(),
                    failover_timeout = ?f.timeout,
                    "backend enters failover (proxy.fail-backend-list): its sessions move away; those still on it after failover-timeout are closed"
                );
            } else if changed {
                info!(backend = %b.addr, "backend exits failover");
            }
        }
        f.active = active;
    }

    /// The backends in failover for longer than `failover-timeout`: the
    /// sessions still on them are to be closed.
    pub fn failover_expired(&self) -> Vec<Arc<Backend>> {
        let timeout = {
            let f = self.fail_list.lock().expect("fail list");
            if !f.active {
                return Vec::new();
            }
            f.timeout
        };
        let now = Instant::now().into_std();
        self.backends()
            .into_iter()
            .filter(|b| {
                b.failover_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn listed_backends_stop_taking_sessions_and_expire_and_a_list_of_all_is_ignored() {
        let r = Router::new(&["10.0.0.1:4000".into(), "tidb-1:4000".into(), "c:1".into()]);
        r.set_fail_list(&["10.0.0.1:4000".into(), "tidb-1".into()], 2);
        let a = r.find("10.0.0.1:4000").unwrap();
        let b = r.find("tidb-1:4000").unwrap();
        let c = r.find("c:1").unwrap();
        assert!(!r.accepts(&a) && !r.accepts(&b) && r.accepts(&c));
        assert!(a.should_evacuate() && a.is_draining() && !c.should_evacuate());
        assert!(r.failover_expired().is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let expired: Vec<String> = r
            .failover_expired()
            .iter()
            .map(|b| b.addr.clone())
            .collect();
        assert_eq!(expired, ["10.0.0.1:4000", "tidb-1:4000"]);

        // The only other TiDB drains: the list would leave none, so it is
        // ignored; back once c can take sessions again.
        c.set_manual_drain(true);
        r.update_failover();
        assert!(r.accepts(&a) && r.accepts(&b) && a.failover_since().is_none());
        assert!(r.failover_expired().is_empty());
        c.set_manual_drain(false);
        r.update_failover();
        assert!(!r.accepts(&a) && a.failover_since().is_some());

        // An emptied list takes them out.
        r.set_fail_list(&[], 60);
        assert!(r.accepts(&a) && r.accepts(&b) && !a.should_evacuate());
    }
}
