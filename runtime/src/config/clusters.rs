//! `proxy.backend-clusters`: TiProxy's list of TiDB clusters, each found
//! through its own PD. This module owns the key's shape, its validation (the
//! errors TiProxy gives) and the effective cluster list: the configured
//! clusters, else one cluster named `default` from `proxy.pd-addrs`.

use serde::{Deserialize, Serialize};

use super::{ProxyConfig, split_list};

/// TiProxy's name of the cluster made from `proxy.pd-addrs`.
pub const DEFAULT_CLUSTER: &str = "default";

/// One `[[proxy.backend-clusters]]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "kebab-case")]
pub struct BackendCluster {
    /// Unique name of the cluster.
    pub name: String,
    /// Its PD endpoints, comma separated.
    pub pd_addrs: String,
    /// TiDB Cloud's per-cluster DNS servers (`host` or `host:port`):
    /// validated, not used here (start-up says so).
    pub ns_servers: Vec<String>,
}

impl BackendCluster {
    /// The cluster with its name trimmed and its PD list split, trimmed and
    /// sorted: two entries with the same normal form are the same cluster
    /// (a reload keeps its discovery running, as TiProxy reuses it).
    pub fn normal(&self) -> (String, Vec<String>, Vec<String>) {
        let mut pd = split_list(&self.pd_addrs);
        pd.sort();
        let mut ns = self.ns_servers.clone();
        ns.sort();
        (self.name.trim().to_string(), pd, ns)
    }
}

impl ProxyConfig {
    /// The clusters in effect (TiProxy's `GetBackendClusters`):
    /// `backend-clusters` when set, else one cluster `default` of
    /// `pd-addrs`, else none (static backends).
    pub fn clusters(&self) -> Vec<BackendCluster> {
        if !self.backend_clusters.is_empty() {
            return self
                .backend_clusters
                .iter()
                .map(|c| BackendCluster {
                    name: c.name.trim().to_string(),
                    ..c.clone()
                })
                .collect();
        }
        let pd = self.effective_pd_addrs();
        if pd.is_empty() {
            return Vec::new();
        }
        vec![BackendCluster {
            name: DEFAULT_CLUSTER.into(),
            pd_addrs: pd.join(","),
            ns_servers: Vec::new(),
        }]
    }

    /// TiProxy's checks of `backend-clusters`: `(key, message)` of the
    /// first problem.
    pub(super) fn check_clusters(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.backend_clusters.iter().enumerate() {
            let name = c.name.trim();
            if name.is_empty() {
                return Err((
                    format!("proxy.backend-clusters[{i}].name"),
                    "is empty; every cluster needs a unique name".into(),
                ));
            }
            if !names.insert(name) {
                return Err((
                    "proxy.backend-clusters.name".into(),
                    format!("duplicate name \"{name}\""),
                ));
            }
            let key = format!("proxy.backend-clusters[{name}].pd-addrs");
            let pd = split_list(&c.pd_addrs);
            if pd.is_empty() {
                return Err((key, "is empty; give the cluster's PD as host:port".into()));
            }
            for a in pd {
                let hp = a
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                super::check_host_port(hp).map_err(|m| (key.clone(), m))?;
            }
            for s in &c.ns_servers {
                normal_ns_server(s).map_err(|m| {
                    (
                        format!("proxy.backend-clusters[{name}].ns-servers"),
                        format!("\"{s}\": {m}"),
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// TiProxy's reading of one `ns-servers` entry: `host:port` with a port in
/// 1..=65535, or a bare host (port 53).
fn normal_ns_server(s: &str) -> Result<String, &'static str> {
    if let Some((host, port)) = s.rsplit_once(':')
        && (!host.contains(':') || host.starts_with('['))
    {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("host is empty");
        }
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(format!("{host}:{p}")),
            _ => Err("port is invalid"),
        };
    }
    if s.is_empty() {
        return Err("host is empty");
    }
    if s.contains(['[', ']']) {
        return Err("host is invalid");
    }
    Ok(format!("{s}:53"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(clusters: &str) -> Result<ProxyConfig, String> {
        let text = format!("[proxy]\n{clusters}");
        let (c, _) = crate::config::Config::from_toml(&text, std::path::Path::new("t.toml"))
            .map_err(|e| e.to_string())?;
        Ok(c.proxy)
    }

    #[test]
    fn tiproxy_errors() {
        let cases = [
            (
                "[[proxy.backend-clusters]]\npd-addrs = \"a:1\"",
                "proxy.backend-clusters[0].name: is empty",
            ),
            (
                "[[proxy.backend-clusters]]\nname = \"c1\"",
                "proxy.backend-clusters[c1].pd-addrs: is empty",
            ),
            (
                "[[proxy.backend-clusters]]\nname = \"c1\"\npd-addrs = \"127.0.0.1\"",
                "proxy.backend-clusters[c1].pd-addrs: \"127.0.0.1\" is not host:port",
            ),
            (
                "[[proxy.backend-clusters]]\nname = \"c1\"\npd-addrs = \"a:1\"\n\
                 [[proxy.backend-clusters]]\nname = \" c1 \"\npd-addrs = \"b:1\"",
                "proxy.backend-clusters.name: duplicate name \"c1\"",
            ),
            (
                "[[proxy.backend-clusters]]\nname = \"c1\"\npd-addrs = \"a:1\"\n\
                 ns-servers = [\"10.0.0.1:abc\"]",
                "proxy.backend-clusters[c1].ns-servers: \"10.0.0.1:abc\": port is invalid",
            ),
        ];
        for (text, want) in cases {
            let got = with(text).expect_err(text);
            assert!(got.contains(want), "{text}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn ns_servers_as_tiproxy_reads_them() {
        assert_eq!(normal_ns_server("10.0.0.1").unwrap(), "10.0.0.1:53");
        assert_eq!(normal_ns_server("dns:5353").unwrap(), "dns:5353");
        assert_eq!(normal_ns_server("[::1]:53").unwrap(), "::1:53");
        assert!(normal_ns_server(":53").is_err());
        assert!(normal_ns_server("a:0").is_err());
        assert!(normal_ns_server("[x").is_err());
    }

    #[test]
    fn effective_clusters() {
        let p = with("pd-addrs = \"a:1, b:2\"").unwrap();
        assert_eq!(
            p.clusters(),
            vec![BackendCluster {
                name: "default".into(),
                pd_addrs: "a:1,b:2".into(),
                ns_servers: vec![]
            }]
        );
        let p = with("pd-addrs = \"\"").unwrap();
        assert!(p.clusters().is_empty());
        let p = with(
            "pd-addrs = \"x:1\"\n[[proxy.backend-clusters]]\nname = \" c1 \"\npd-addrs = \"a:1\"",
        )
        .unwrap();
        let c = p.clusters();
        assert_eq!((c.len(), c[0].name.as_str()), (1, "c1"));
        let a = BackendCluster {
            name: "c".into(),
            pd_addrs: "b:1, a:1".into(),
            ns_servers: vec![],
        };
        let b = BackendCluster {
            pd_addrs: "a:1,b:1".into(),
            ..a.clone()
        };
        assert_eq!(a.normal(), b.normal());
    }
}
