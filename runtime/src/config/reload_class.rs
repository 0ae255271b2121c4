//! Which configuration keys apply live and which need a restart: the
//! reload class of every key, in one place, for the file watcher and
//! `PUT /api/admin/config` alike.

use std::collections::BTreeSet;

use super::Config;

/// Keys that apply without a restart (a key, or every key below it).
const RELOADABLE: &[&str] = &[
    "proxy.max-connections",
    "proxy.high-memory-usage-reject-threshold",
    "proxy.fail-backend-list",
    "proxy.failover-timeout",
    "proxy.graceful-wait-before-shutdown",
    "proxy.graceful-close-conn-timeout",
    // TiProxy's reloadable: each new connection reads it.
    "proxy.proxy-protocol",
    "log.level",
    "log.log-file",
    "balance",
    "health-check",
    // The location factor's zone (the balance loop re-reads it).
    "labels.zone",
    "security.server-tls",
    "security.server-http-tls",
    // Read by each `POST /api/traffic/capture`.
    "enable-traffic-replay",
    "security.encryption-key-path",
    "security.sql-tls",
    // Every open connection re-applies them (`keepalive`).
    "proxy.frontend-keepalive",
    "proxy.backend-healthy-keepalive",
    "proxy.backend-unhealthy-keepalive",
    "security.cluster-tls",
    // Each cluster's discovery starts, restarts or stops (`discovery::Clusters`).
    "proxy.backend-clusters",
];

/// Keys accepted for TiProxy compatibility that do nothing in this build:
/// a change is neither applied nor in need of a restart.
const NOT_IMPLEMENTED: &[&str] = &[
    "proxy.port-range",
    "proxy.public-endpoints",
    "metering",
    "log.simple",
];

fn under(key: &str, prefix: &str) -> bool {
    key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The changed keys from `old` to `new`, split into those that apply live
/// and those that need a restart. `pd` says whether PD discovery is on (then
/// `proxy.backend-addrs` is only the start-up list and needs a restart).
pub fn classify(old: &Config, new: &Config, pd: bool) -> (Vec<String>, Vec<String>) {
    let (mut live, mut restart) = (Vec::new(), Vec::new());
    for key in changed_keys(old, new) {
        if NOT_IMPLEMENTED.iter().any(|p| under(&key, p)) {
            continue;
        }
        // With `label-name = "zone"` the zone also picks the TiDBs PD
        // discovery uses: that needs a restart.
        let zone_matches = under(&key, "labels.zone") && new.balance.label_name == "zone";
        let reloadable = (RELOADABLE.iter().any(|p| under(&key, p))
            && !super::RESTART_REQUIRED.iter().any(|p| under(&key, p))
            && !zone_matches)
            || (!pd && under(&key, "proxy.backend-addrs"));
        if reloadable {
            live.push(key);
        } else {
            restart.push(key);
        }
    }
    (live, restart)
}

/// Dotted keys whose values differ (arrays compare whole).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    fn flat(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => flat(&key, inner, out),
                v => {
                    out.insert(key, v.to_string());
                }
            }
        }
    }
    let table = |c: &Config| toml::Table::try_from(c).unwrap_or_default();
    let (mut a, mut b) = (Default::default(), Default::default());
    flat("", &table(old), &mut a);
    flat("", &table(new), &mut b);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml(text, Path::new("t.toml"))
            .expect("valid")
            .0
    }

    #[test]
    fn classifies_each_changed_key() {
        let old = cfg("[proxy]\npd-addrs = \"\"\nbackend-addrs = [\"a:1\"]\n");
        let new = cfg(
            "[proxy]\npd-addrs = \"\"\nbackend-addrs = [\"b:1\"]\nmax-connections = 5\naddr = \"127.0.0.1:1\"\n\
             [log]\nlevel = \"debug\"\nencoder = \"json\"\n[balance]\nlabel-name = \"zone\"\n\
             [balance.conn-count]\ncount-ratio-threshold = 2.0\n[api]\naddr = \"127.0.0.1:2\"\n",
        );
        let (live, restart) = classify(&old, &new, false);
        assert_eq!(
            live,
            [
                "balance.conn-count.count-ratio-threshold",
                "log.level",
                "proxy.backend-addrs",
                "proxy.max-connections"
            ]
        );
        assert_eq!(
            restart,
            [
                "api.addr",
                "balance.label-name",
                "log.encoder",
                "proxy.addr"
            ]
        );
        // With PD, the static list is only the start-up list.
        let (live, restart) = classify(&old, &new, true);
        assert!(!live.contains(&"proxy.backend-addrs".to_string()));
        assert!(restart.contains(&"proxy.backend-addrs".to_string()));
        assert_eq!(classify(&old, &old, false), (vec![], vec![]));
        let hc = cfg("[health-check]\ninterval = \"5s\"\n");
        assert_eq!(
            classify(&Config::default(), &hc, true),
            (vec!["health-check.interval".to_string()], vec![])
        );
        // The location factor's zone applies live, unless it also picks
        // which TiDBs are used.
        let zone = cfg("[labels]\nzone = \"east\"\nrack = \"r1\"\n");
        assert_eq!(
            classify(&Config::default(), &zone, true),
            (
                vec!["labels.zone".to_string()],
                vec!["labels.rack".to_string()]
            )
        );
        let matched = cfg("[labels]\nzone = \"east\"\n[balance]\nlabel-name = \"zone\"\n");
        let (live, restart) = classify(&Config::default(), &matched, true);
        assert!(live.is_empty(), "{live:?}");
        assert_eq!(restart, ["balance.label-name", "labels.zone"]);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("log.log-file.max-size", "log.log-file"));
        assert!(under("balance", "balance"));
        assert!(!under("log.levelx", "log.level"));
    }
}
