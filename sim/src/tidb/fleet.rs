//! A cluster and its instances in one process: what the `tidb-double`
//! binary serves, and what tests start in-process.

use std::io;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tiproxy_runtime::net::Network;

use super::cluster::Cluster;
use super::server::{Phase, TidbHandle, TidbOptions, TidbServer};

/// One instance as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// Position in the cluster (stable across restarts).
    pub index: usize,
    /// SQL address.
    pub sql: String,
    /// Status address.
    pub status: String,
    /// Phase.
    pub state: Phase,
    /// Authenticated sessions.
    pub connections: usize,
}

/// A cluster with instances that share its store.
#[derive(Debug)]
pub struct LocalCluster<N: Network> {
    net: N,
    cluster: Arc<Cluster>,
    opts: TidbOptions,
    instances: Mutex<Vec<TidbHandle>>,
}

fn info(index: usize, h: &TidbHandle) -> InstanceInfo {
    InstanceInfo {
        index,
        sql: h.sql_addr().to_string(),
        status: h.status_addr().to_string(),
        state: h.phase(),
        connections: h.connection_count(),
    }
}

impl<N: Network> LocalCluster<N> {
    /// A cluster with no instances yet; new instances get `opts`.
    pub fn new(net: N, cluster: Arc<Cluster>, opts: TidbOptions) -> Self {
        Self {
            net,
            cluster,
            opts,
            instances: Mutex::new(Vec::new()),
        }
    }

    /// The shared cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TidbHandle>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one more instance (port 0 picks a free port).
    pub async fn start_instance(
        &self,
        sql_addr: &str,
        status_addr: &str,
    ) -> io::Result<InstanceInfo> {
        let h = TidbServer::start(
            self.net.clone(),
            Arc::clone(&self.cluster),
            sql_addr,
            status_addr,
            self.opts.clone(),
        )
        .await?;
        let mut v = self.lock();
        v.push(h);
        let i = v.len() - 1;
        Ok(info(i, &v[i]))
    }

    /// Starts a stopped or killed instance again on its addresses.
    pub async fn restart(&self, index: usize) -> io::Result<InstanceInfo> {
        let old = self
            .instance(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such instance"))?;
        if old.phase() < Phase::Stopped {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "the instance is still running: shut it down or kill it first",
            ));
        }
        old.stopped().await;
        let h = TidbServer::start(
            self.net.clone(),
            Arc::clone(&self.cluster),
            &old.sql_addr().to_string(),
            &old.status_addr().to_string(),
            self.opts.clone(),
        )
        .await?;
        let mut v = self.lock();
        v[index] = h;
        Ok(info(index, &v[index]))
    }

    /// The handle of instance `index`.
    pub fn instance(&self, index: usize) -> Option<TidbHandle> {
        self.lock().get(index).cloned()
    }

    /// Every instance, in index order.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        self.lock()
            .iter()
            .enumerate()
            .map(|(i, h)| info(i, h))
            .collect()
    }

    /// Kills every instance and waits for them to stop.
    pub async fn kill_all(&self) {
        let all: Vec<TidbHandle> = self.lock().clone();
        for h in &all {
            h.kill();
        }
        for h in &all {
            h.stopped().await;
        }
    }
}
