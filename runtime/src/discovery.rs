//! Where backends come from: the static list, or PD (etcd), watched.
//!
//! PD: TiDB servers register `/topology/tidb/<ip:port>/info` (JSON) and
//! `/topology/tidb/<ip:port>/ttl` under a lease; keyspace deployments use
//! `/keyspaces/tidb/<keyspace>/topology/tidb/...`. A TiDB counts only while
//! both keys exist. The proxy reads both prefixes once, then watches them
//! (no polling); any change re-reads the set. Lost watches, compaction and
//! etcd restarts lead to a re-read and a new watch, with backoff. While PD
//! is unreachable the last known set keeps serving (health-checked
//! directly), and the proxy says so in its health output.
//!
//! PD is reached through [`crate::pd::PdConnector`]: etcd for real, a PD
//! double in the simulation.
//!
//! The proxy also registers itself as TiProxy does:
//! `/topology/tiproxy/<addr>/info` and `/ttl` under a 45 s lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::{BackendEntry, Config};
use crate::pd::{PdClient, PdConnector, PdWatch, WatchNews};
use crate::router::Router;

mod clusters;

pub use clusters::{Clusters, Context};

/// Where one cluster's discovery puts its TiDB list.
#[derive(Debug)]
pub struct Sink {
    /// The cluster's name.
    pub cluster: String,
    merge: Arc<clusters::Merge>,
}

impl Sink {
    fn new(cluster: String, merge: Arc<clusters::Merge>) -> Self {
        Self { cluster, merge }
    }

    /// The router the lists end up in.
    fn router(&self) -> &Router {
        self.merge.router()
    }
}

/// `security.cluster-tls` as in effect at each connection to PD.
pub type ClusterTls = Arc<crate::tls::Live<Arc<rustls::ClientConfig>>>;

/// TiDB topology prefix.
pub const TIDB_TOPOLOGY: &str = "/topology/tidb/";
/// Keyspace topology prefix.
pub const KEYSPACE_TOPOLOGY: &str = "/keyspaces/tidb/";
/// TiProxy topology prefix.
pub const TIPROXY_TOPOLOGY: &str = "/topology/tiproxy";
/// Lease TTL of the proxy's own registration (TiProxy's value).
pub const REGISTRATION_TTL: i64 = 45;

/// What discovery knows right now, for the health output.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryStatus {
    /// PD is configured.
    pub pd: bool,
    /// The last PD error, if PD is unreachable now.
    pub pd_error: Option<String>,
    /// PD answered at least once.
    pub pd_seen: bool,
}

/// Shared discovery status.
pub type StatusCell = Arc<Mutex<DiscoveryStatus>>;

/// TiDB's `/info` JSON (the fields the proxy uses).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TidbInfo {
    /// Server version.
    #[serde(default)]
    pub version: String,
    /// Git hash.
    #[serde(default)]
    pub git_hash: String,
    /// IP.
    #[serde(default)]
    pub ip: String,
    /// Status port.
    #[serde(default)]
    pub status_port: u32,
    /// Deploy path.
    #[serde(default)]
    pub deploy_path: String,
    /// Start time (unix seconds).
    #[serde(default)]
    pub start_timestamp: i64,
    /// Labels (e.g. `zone`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One TiDB found in PD.
#[derive(Debug, Clone, PartialEq)]
pub struct TidbInstance {
    /// SQL address (`ip:port` from the key).
    pub addr: String,
    /// Keyspace, for keyspace deployments.
    pub keyspace: Option<String>,
    /// Its info.
    pub info: TidbInfo,
}

/// Parses a topology listing: instances that have both `info` and `ttl`.
pub fn parse_topology<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<TidbInstance> {
    let mut infos: BTreeMap<String, TidbInstance> = BTreeMap::new();
    let mut ttls = std::collections::BTreeSet::new();
    for (key, value) in kvs {
        let (keyspace, rest) = if let Some(k) = key.strip_prefix(KEYSPACE_TOPOLOGY) {
            let Some((ks, rest)) = k.split_once('/') else {
                continue;
            };
            let Some(rest) = format!("/{rest}")
                .strip_prefix(TIDB_TOPOLOGY)
                .map(String::from)
            else {
                continue;
            };
            (Some(ks.to_string()), rest)
        } else if let Some(rest) = key.strip_prefix(TIDB_TOPOLOGY) {
            (None, rest.to_string())
        } else {
            continue;
        };
        if let Some(addr) = rest.strip_suffix("/ttl") {
            ttls.insert(addr.to_string());
        } else if let Some(addr) = rest.strip_suffix("/info") {
            match serde_json::from_slice::<TidbInfo>(value) {
                Ok(info) => {
                    infos.insert(
                        addr.to_string(),
                        TidbInstance {
                            addr: addr.to_string(),
                            keyspace,
                            info,
                        },
                    );
                }
                Err(e) => warn!(key, "ignoring a TiDB with unreadable topology info: {e}"),
            }
        }
    }
    infos
        .into_values()
        .filter(|i| ttls.contains(&i.addr))
        .collect()
}

/// The backend entries for `instances`, keeping only those whose label
/// `label_name` equals this proxy's (when a label name is configured).
pub fn backends_for(instances: &[TidbInstance], cfg: &Config) -> Vec<BackendEntry> {
    let wanted = (!cfg.balance.label_name.is_empty())
        .then(|| cfg.labels.get(&cfg.balance.label_name))
        .flatten();
    instances
        .iter()
        .filter(|i| match wanted {
            Some(v) => i.info.labels.get(&cfg.balance.label_name) == Some(v),
            None => true,
        })
        .map(|i| {
            let host = i.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&i.addr);
            BackendEntry::Full {
                addr: i.addr.clone(),
                status_addr: (i.info.status_port > 0)
                    .then(|| format!("{host}:{}", i.info.status_port)),
                labels: i.info.labels.clone(),
            }
        })
        .collect()
}

/// Runs PD discovery until the task is aborted.
pub async fn watch_pd<P: PdConnector>(
    connector: P,
    pd: Vec<String>,
    tls: ClusterTls,
    cfg: Config,
    sink: Sink,
    status: StatusCell,
) {
    let router = sink.router();
    let mut backoff = Duration::from_millis(200);
    let mut outage_logged = false;
    loop {
        match watch_once(&connector, &pd, tls.get(), &cfg, &sink, &status).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                crate::metrics::metrics()
                    .server_error(crate::metrics::err_type::FETCH_BACKEND_LIST);
                let mut s = status.lock().expect("status lock");
                s.pd_error = Some(e.clone());
                drop(s);
                if !outage_logged {
                    warn!(cluster = %sink.cluster, pd = ?pd, backends = router.backends().len(), "PD unreachable, serving the last known backends: {e}");
                    outage_logged = true;
                } else {
                    debug!("PD still unreachable: {e}");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if status.lock().expect("status lock").pd_error.is_none() {
            outage_logged = false;
        }
    }
}

/// One connection to PD: list, then watch until something breaks.
async fn watch_once<P: PdConnector>(
    connector: &P,
    pd: &[String],
    tls: Option<Arc<rustls::ClientConfig>>,
    cfg: &Config,
    sink: &Sink,
    status: &StatusCell,
) -> Result<(), String> {
    let mut client = connector.connect(pd, tls).await?;
    let rev = list(&mut client, cfg, sink, status).await?;
    let mut w1 = client.watch_prefix(TIDB_TOPOLOGY, rev + 1).await?;
    let mut w2 = client.watch_prefix(KEYSPACE_TOPOLOGY, rev + 1).await?;
    loop {
        // Biased: the simulation replays a seed only if every choice is.
        let news = tokio::select! {
            biased;
            m = w1.next() => m?,
            m = w2.next() => m?,
        };
        if news == WatchNews::Changed {
            list(&mut client, cfg, sink, status).await?;
        }
    }
}

/// Reads the whole topology and installs it; returns the revision from
/// which a watch sees every later change.
async fn list<C: PdClient>(
    client: &mut C,
    cfg: &Config,
    sink: &Sink,
    status: &StatusCell,
) -> Result<i64, String> {
    let a = client.get_prefix(TIDB_TOPOLOGY).await?;
    let b = client.get_prefix(KEYSPACE_TOPOLOGY).await?;
    // The two reads are two revisions: watch from the older one, so a TiDB
    // registering between them is seen (a change seen twice only re-lists).
    // Taking the newer one lost such a TiDB until its next change: the
    // flaky "both TiDBs known" in tests/tests/seeds.rs.
    let rev = a.revision.min(b.revision);
    let instances = parse_topology(
        a.kvs
            .iter()
            .chain(&b.kvs)
            .map(|(k, v)| (k.as_str(), v.as_slice())),
    );
    let entries = backends_for(&instances, cfg);
    let after: Vec<String> = entries.iter().map(|e| e.addr().to_string()).collect();
    if sink.merge.install(&sink.cluster, entries) {
        info!(cluster = %sink.cluster, backends = ?after, "backends from PD");
    }
    let mut s = status.lock().expect("status lock");
    if s.pd_error.is_some() {
        info!("PD reachable again");
    }
    s.pd_error = None;
    s.pd_seen = true;
    Ok(rev)
}

/// The proxy's own entry, as TiProxy writes it.
#[derive(Debug, Clone, Serialize)]
struct ProxyInfo {
    version: String,
    git_hash: String,
    ip: String,
    port: String,
    status_port: String,
    deploy_path: String,
    start_timestamp: i64,
}

/// Registers the proxy in PD and keeps the registration alive until the
/// task is aborted.
pub async fn register<P: PdConnector>(
    connector: P,
    pd: Vec<String>,
    tls: ClusterTls,
    sql_addr: String,
    api_port: u16,
) {
    let (ip, port) = sql_addr
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap_or_default();
    let info = ProxyInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        git_hash: env!("TIPROXY_GIT_HASH").into(),
        ip,
        port,
        status_port: api_port.to_string(),
        deploy_path: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        start_timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    let key = format!("{TIPROXY_TOPOLOGY}/{sql_addr}");
    let mut logged = false;
    loop {
        if let Err(e) = register_once(&connector, &pd, tls.get(), &key, &info).await {
            crate::metrics::metrics().server_error(crate::metrics::err_type::INFO_SYNCER);
            if !logged {
                warn!("cannot register tiproxy in PD (will retry): {e}");
                logged = true;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn register_once<P: PdConnector>(
    connector: &P,
    pd: &[String],
    tls: Option<Arc<rustls::ClientConfig>>,
    key: &str,
    info: &ProxyInfo,
) -> Result<(), String> {
    let mut client = connector.connect(pd, tls).await?;
    let lease = client.grant_lease(REGISTRATION_TTL).await?;
    let body = serde_json::to_string(info).map_err(|e| e.to_string())?;
    loop {
        client
            .put(&format!("{key}/info"), body.clone(), lease)
            .await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        client
            .put(&format!("{key}/ttl"), now.to_string(), lease)
            .await?;
        for _ in 0..3 {
            if client.keep_alive(lease).await? <= 0 {
                return Err("lease expired".into());
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_needs_info_and_ttl_and_reads_keyspaces() {
        let info = br#"{"version":"8.5.0","git_hash":"x","ip":"10.0.0.1","status_port":10080,"labels":{"zone":"a"}}"#;
        let kvs: Vec<(&str, &[u8])> = vec![
            ("/topology/tidb/10.0.0.1:4000/info", info),
            ("/topology/tidb/10.0.0.1:4000/ttl", b"1"),
            ("/topology/tidb/10.0.0.2:4000/info", info), // no ttl: down
            ("/keyspaces/tidb/ks1/topology/tidb/10.0.0.3:4000/info", info),
            ("/keyspaces/tidb/ks1/topology/tidb/10.0.0.3:4000/ttl", b"1"),
            ("/topology/tidb/10.0.0.4:4000/ttl", b"1"), // no info
        ];
        let got = parse_topology(kvs);
        let addrs: Vec<&str> = got.iter().map(|i| i.addr.as_str()).collect();
        assert_eq!(addrs, vec!["10.0.0.1:4000", "10.0.0.3:4000"]);
        assert_eq!(got[1].keyspace.as_deref(), Some("ks1"));
        let cfg = Config::default();
        let entries = backends_for(&got, &cfg);
        assert_eq!(entries[0].status_addr(), Some("10.0.0.1:10080"));
    }

    #[test]
    fn label_mismatch_is_never_used() {
        let mk = |addr: &str, zone: &str| TidbInstance {
            addr: addr.into(),
            keyspace: None,
            info: TidbInfo {
                labels: [("zone".to_string(), zone.to_string())].into(),
                ..Default::default()
            },
        };
        let mut cfg = Config::default();
        cfg.balance.label_name = "zone".into();
        cfg.labels.insert("zone".into(), "east".into());
        let got = backends_for(&[mk("a:1", "east"), mk("b:1", "west")], &cfg);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].addr(), "a:1");
    }
}
