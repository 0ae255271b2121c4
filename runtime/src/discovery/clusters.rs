//! TiProxy's backend clusters: one discovery (watch) and one registration
//! task per cluster's PD, started, replaced and stopped as the
//! configuration changes, and the merge of every cluster's TiDBs into the
//! router's one backend set.
//!
//! As in TiProxy, with `balance.routing-rule` unset the TiDBs of every
//! cluster form one group: a new session goes to the best TiDB of any
//! cluster. Under a rule, TiDBs are grouped by their labels (the router's
//! `group`); the port rule's groups are per cluster, so each TiDB is
//! handed over with its cluster's name.
//! Removing a cluster removes its TiDBs as a scale-in does: their sessions
//! move to the remaining TiDBs, exactly as for a TiDB gone from PD. The router keys TiDBs by address: a TiDB address listed by two
//! clusters is used once, for the first cluster by name (logged).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{ClusterTls, StatusCell};
use crate::config::{BackendCluster, BackendEntry, Config};
use crate::pd::PdConnector;
use crate::router::Router;

/// Every cluster's last known TiDBs, merged into the router.
#[derive(Debug)]
pub struct Merge {
    router: Arc<Router>,
    sets: Mutex<BTreeMap<String, Vec<BackendEntry>>>,
}

impl Merge {
    /// A merge into `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Self {
            router,
            sets: Mutex::new(BTreeMap::new()),
        }
    }

    /// The router the lists end up in.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Installs `cluster`'s TiDB list; returns whether it changed.
    pub fn install(&self, cluster: &str, entries: Vec<BackendEntry>) -> bool {
        let mut sets = self.sets.lock().expect("clusters lock");
        let changed = sets.get(cluster) != Some(&entries);
        sets.insert(cluster.to_string(), entries);
        self.apply(&sets);
        changed
    }

    /// Forgets `cluster`'s TiDBs (the cluster was removed).
    fn remove(&self, cluster: &str) {
        let mut sets = self.sets.lock().expect("clusters lock");
        if sets.remove(cluster).is_some() {
            self.apply(&sets);
        }
    }

    /// The cluster of the TiDB at `addr`, when a cluster lists it.
    pub fn cluster_of(&self, addr: &str) -> Option<String> {
        let sets = self.sets.lock().expect("clusters lock");
        sets.iter()
            .find(|(_, list)| list.iter().any(|e| e.addr() == addr))
            .map(|(name, _)| name.clone())
    }

    fn apply(&self, sets: &BTreeMap<String, Vec<BackendEntry>>) {
        let mut merged: Vec<BackendEntry> = Vec::new();
        let mut clusters: Vec<&str> = Vec::new();
        for (name, list) in sets {
            for e in list {
                if merged.iter().any(|m| m.addr() == e.addr()) {
                    warn!(
                        cluster = %name,
                        addr = e.addr(),
                        "a TiDB address listed by two backend clusters is used once, for the first cluster"
                    );
                } else {
                    merged.push(e.clone());
                    clusters.push(name);
                }
            }
        }
        self.router.set_cluster_backends(&merged, &clusters);
    }
}

/// What a cluster's tasks need besides the cluster itself.
#[derive(Debug, Clone)]
pub struct Context {
    /// `security.cluster-tls`, shared by every cluster.
    pub tls: ClusterTls,
    /// The discovery status of the health output.
    pub status: StatusCell,
    /// The address the proxy registers in each cluster's PD.
    pub advertise: String,
    /// The API port it registers.
    pub api_port: u16,
}

/// One cluster's running tasks; dropping it stops them.
#[derive(Debug)]
struct Running {
    normal: (String, Vec<String>, Vec<String>),
    tasks: Vec<AbortHandle>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The running clusters (TiProxy's backend-cluster manager).
#[derive(Debug)]
pub struct Clusters {
    merge: Arc<Merge>,
    running: Mutex<BTreeMap<String, Running>>,
}

impl Clusters {
    /// No cluster yet; discovery results go to `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Self {
            merge: Arc::new(Merge::new(router)),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// The cluster of the TiDB at `addr`, when a cluster lists it.
    pub fn cluster_of(&self, addr: &str) -> Option<String> {
        self.merge.cluster_of(addr)
    }

    /// The names of the running clusters.
    pub fn names(&self) -> Vec<String> {
        self.running
            .lock()
            .expect("clusters lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Makes the running clusters those of `want` (TiProxy's
    /// `syncClusters`): an unchanged cluster keeps its tasks, a changed one
    /// is restarted, a new one started, a removed one stopped and its TiDBs
    /// removed from the router. Must run inside the runtime.
    pub fn sync<P: PdConnector>(
        &self,
        connector: &P,
        want: &[BackendCluster],
        cfg: &Config,
        ctx: &Context,
    ) {
        let mut running = self.running.lock().expect("clusters lock");
        let mut removed = Vec::new();
        running.retain(|name, r| {
            let keep = want.iter().any(|c| c.normal() == r.normal);
            if !keep {
                removed.push(name.clone());
            }
            keep
        });
        for name in &removed {
            if !want.iter().any(|c| c.normal().0 == *name) {
                info!(cluster = %name, "removed backend cluster: its TiDBs are drained");
                self.merge.remove(name);
            }
        }
        for c in want {
            let normal = c.normal();
            if running.contains_key(&normal.0) {
                continue;
            }
            let pd = normal.1.clone();
            let name = normal.0.clone();
            if removed.contains(&name) {
                info!(cluster = %name, pd = ?pd, "updated backend cluster");
            } else if want.len() > 1 || name != crate::config::DEFAULT_CLUSTER {
                info!(cluster = %name, pd = ?pd, "added backend cluster");
            }
            let watch = crate::task::spawn(super::watch_pd(
                connector.clone(),
                pd.clone(),
                ctx.tls.clone(),
                cfg.clone(),
                super::Sink::new(name.clone(), self.merge.clone()),
                ctx.status.clone(),
            ));
            let register = crate::task::spawn(super::register(
                connector.clone(),
                pd,
                ctx.tls.clone(),
                ctx.advertise.clone(),
                ctx.api_port,
            ));
            running.insert(
                name,
                Running {
                    normal,
                    tasks: vec![watch.abort_handle(), register.abort_handle()],
                },
            );
        }
        ctx.status.lock().expect("status lock").pd = !running.is_empty();
    }

    /// Stops every cluster's tasks (shutdown); the router keeps its set.
    pub fn stop(&self) {
        self.running.lock().expect("clusters lock").clear();
    }
}
