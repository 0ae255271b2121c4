//! Registration in PD, as TiDB does it: `/topology/tidb/<ip:port>/info`
//! (JSON) and `/topology/tidb/<ip:port>/ttl` (a timestamp) under a lease that
//! a live server keeps alive. A graceful shutdown deletes both keys at its
//! end; a crash leaves them to expire with the lease.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, PutOptions};

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
}

impl Registration {
    fn key(&self, suffix: &str) -> String {
        format!("/topology/tidb/{}/{suffix}", self.sql)
    }

    fn endpoints(&self) -> Vec<String> {
        self.pd
            .iter()
            .map(|a| {
                if a.contains("://") {
                    a.clone()
                } else {
                    format!("http://{a}")
                }
            })
            .collect()
    }

    /// Registers and keeps the lease alive until the task is aborted
    /// (a crash: the keys expire) or fails; retries with a pause.
    pub async fn keep_registered(self) {
        loop {
            if let Err(e) = self.register_once().await {
                tracing::warn!(sql = %self.sql, "PD registration failed (will retry): {e}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn register_once(&self) -> Result<(), String> {
        let mut c = Client::connect(self.endpoints(), None)
            .await
            .map_err(|e| e.to_string())?;
        let ttl = self.ttl.as_secs().max(1) as i64;
        let lease = c
            .lease_grant(ttl, None)
            .await
            .map_err(|e| e.to_string())?
            .id();
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
        let opts = || Some(PutOptions::new().with_lease(lease));
        c.put(self.key("info"), info.to_string(), opts())
            .await
            .map_err(|e| e.to_string())?;
        c.put(self.key("ttl"), now.as_nanos().to_string(), opts())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(sql = %self.sql, "registered in PD");
        let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
        let every = Duration::from_secs((ttl as u64 / 3).max(1));
        loop {
            tokio::time::sleep(every).await;
            keeper.keep_alive().await.map_err(|e| e.to_string())?;
            match acks.message().await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(_) => return Err("lease expired".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Deletes the keys (the end of a graceful shutdown).
    pub async fn deregister(&self) -> Result<(), String> {
        let mut c = Client::connect(self.endpoints(), None)
            .await
            .map_err(|e| e.to_string())?;
        c.delete(self.key("info"), None)
            .await
            .map_err(|e| e.to_string())?;
        c.delete(self.key("ttl"), None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
