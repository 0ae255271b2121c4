//! Registration in PD, as TiDB does it: `/topology/tidb/<ip:port>/info`
//! (JSON) and `/topology/tidb/<ip:port>/ttl` (a timestamp) under a lease that
//! a live server keeps alive. A graceful shutdown deletes both keys at its
//! end; a crash leaves them to expire with the lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tiproxy_runtime::pd::{PdClient, PdConnector};
use tokio_rustls::rustls::ClientConfig;

/// What an instance registers.
#[derive(Debug, Clone)]
pub struct Registration {
    /// PD (etcd) endpoints.
    pub pd: Vec<String>,
    /// SQL address (`ip:port`), the key.
    pub sql: String,
    /// Status port.
    pub status_port: u16,
    /// Server version.
    pub version: String,
    /// Labels (e.g. `zone`).
    pub labels: BTreeMap<String, String>,
    /// Lease TTL.
    pub ttl: Duration,
    /// TLS towards PD (TiDB's `cluster-ssl-*`); `None`: plain.
    pub tls: Option<Arc<ClientConfig>>,
}

impl Registration {
    fn key(&self, suffix: &str) -> String {
        format!("/topology/tidb/{}/{suffix}", self.sql)
    }

    /// Registers and keeps the lease alive until the task is aborted
    /// (a crash: the keys expire) or fails; retries with a pause.
    pub async fn keep_registered<P: PdConnector>(self, pd: P) {
        loop {
            if let Err(e) = self.register_once(&pd).await {
                tracing::warn!(sql = %self.sql, "PD registration failed (will retry): {e}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn register_once<P: PdConnector>(&self, pd: &P) -> Result<(), String> {
        let mut c = pd.connect(&self.pd, self.tls.clone()).await?;
        let ttl = self.ttl.as_secs().max(1) as i64;
        let lease = c.grant_lease(ttl).await?;
        let ip = self
            .sql
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.sql);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let info = serde_json::json!({
            "version": self.version,
            "git_hash": "tidb-double",
            "ip": ip,
            "status_port": self.status_port,
            "deploy_path": "/tidb-double",
            "start_timestamp": now.as_secs(),
            "labels": self.labels,
        });
        c.put(&self.key("info"), info.to_string(), lease).await?;
        c.put(&self.key("ttl"), now.as_nanos().to_string(), lease)
            .await?;
        tracing::info!(sql = %self.sql, "registered in PD");
        // A third of the TTL, as etcd's session keep-alive (what TiDB uses)
        // sends them. Whole seconds made it 1 s for a 1 s TTL, so a
        // keep-alive a millisecond late let the lease expire under a live
        // TiDB (simulation seed 22601).
        let every = Duration::from_secs(ttl as u64) / 3;
        loop {
            tokio::time::sleep(every).await;
            if c.keep_alive(lease).await? <= 0 {
                return Err("lease expired".into());
            }
        }
    }

    /// Deletes the keys (the end of a graceful shutdown).
    pub async fn deregister<P: PdConnector>(&self, pd: &P) -> Result<(), String> {
        let mut c = pd.connect(&self.pd, self.tls.clone()).await?;
        c.delete(&self.key("info")).await?;
        c.delete(&self.key("ttl")).await?;
        Ok(())
    }
}
