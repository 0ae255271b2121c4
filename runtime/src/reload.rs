//! Hot reload: watches the `--config` file and the TLS files it names, and
//! hands changes to [`State::patch_config`] and [`State::reload_tls`], the
//! same path `PUT /api/admin/config` takes.
//!
//! The rule between the file and the API is TiProxy's: when the file's
//! contents change, the file is applied as a patch over the configuration in
//! effect, exactly as if its whole text were PUT. A change made through the
//! API therefore holds until the file changes again, and then every key the
//! file names wins. A file that does not parse or validate is logged (file
//! and key) and nothing of it is applied.
//!
//! Changes are seen through inotify (`notify`, watching the directories, so
//! files replaced by rename are seen too) and, as a safety net for
//! filesystems without it, by polling. Nothing here logs unless something
//! changed or failed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::net::Network;
use crate::proxy::State;

/// Wait after a file event before reading, so a write in several steps is
/// read once it is complete.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Polling interval while inotify works (a safety net) and when it does not.
const POLL_WATCHED: Duration = Duration::from_secs(5);
const POLL_UNWATCHED: Duration = Duration::from_secs(1);

/// Keys that apply without a restart (a key, or every key below it).
const RELOADABLE: &[&str] = &[
    "proxy.max-connections",
    "proxy.graceful-wait-before-shutdown",
    "proxy.graceful-close-conn-timeout",
    "log.level",
    "log.log-file",
    "balance",
    "health-check",
    // The location factor's zone (the balance loop re-reads it).
    "labels.zone",
    "security.server-tls",
    "security.server-http-tls",
    "security.sql-tls",
];

/// Keys accepted for TiProxy compatibility that do nothing in this build:
/// a change is neither applied nor in need of a restart.
const NOT_IMPLEMENTED: &[&str] = &[
    "proxy.port-range",
    "proxy.high-memory-usage-reject-threshold",
    "proxy.public-endpoints",
    "proxy.backend-clusters",
    "proxy.fail-backend-list",
    "proxy.failover-timeout",
    "proxy.frontend-keepalive",
    "proxy.backend-healthy-keepalive",
    "proxy.backend-unhealthy-keepalive",
    "enable-traffic-replay",
    "ha",
    "metering",
    "log.simple",
    "security.encryption-key-path",
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
            && !crate::config::RESTART_REQUIRED
                .iter()
                .any(|p| under(&key, p))
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

/// The TLS files in use, with what identifies their contents on disk.
fn tls_stamp(cfg: &Config) -> Vec<(String, Option<(std::time::SystemTime, u64)>)> {
    let s = &cfg.security;
    [&s.server_tls, &s.server_http_tls, &s.sql_tls]
        .into_iter()
        .flat_map(|t| [&t.cert, &t.key, &t.ca])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let m = std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p.clone(), m)
        })
        .collect()
}

/// Directories to watch: the config file's and the TLS files'.
fn dirs(path: &Path, cfg: &Config) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut set: BTreeSet<PathBuf> = tls_stamp(cfg)
        .into_iter()
        .map(|(p, _)| parent(Path::new(&p)))
        .collect();
    set.insert(parent(path));
    set
}

/// Watches `path` (whose contents at start were `loaded`) and the TLS files
/// until the task is dropped.
pub async fn watch<N: Network>(st: Arc<State<N>>, path: PathBuf, loaded: Vec<u8>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            debug!("no file notifications ({e}); polling the config every {POLL_UNWATCHED:?}");
            None
        }
    };
    let mut watched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut last = loaded;
    let mut read_error: Option<String> = None;
    let mut stamp = tls_stamp(&st.live_config());
    let file = path.display().to_string();
    loop {
        // Keep watching the directories of every file in use.
        if let Some(w) = watcher.as_mut() {
            use notify::Watcher as _;
            let want = dirs(&path, &st.live_config());
            for d in want.difference(&watched) {
                if let Err(e) = w.watch(d, notify::RecursiveMode::NonRecursive) {
                    debug!(dir = %d.display(), "cannot watch: {e}");
                }
            }
            for d in watched.difference(&want) {
                let _ = w.unwatch(d);
            }
            watched = want;
        }
        let poll = if watcher.is_some() {
            POLL_WATCHED
        } else {
            POLL_UNWATCHED
        };
        tokio::select! {
            ev = rx.recv() => {
                if ev.is_none() {
                    watcher = None;
                }
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(poll) => {}
        }
        match std::fs::read(&path) {
            Err(e) => {
                let msg = e.to_string();
                if read_error.as_ref() != Some(&msg) {
                    error!(
                        "{file}: cannot read the configuration ({msg}); keeping the configuration in effect"
                    );
                    read_error = Some(msg);
                }
            }
            Ok(bytes) => {
                read_error = None;
                if bytes != last {
                    last = bytes;
                    apply_file(&st, &file, &last);
                    // TLS files named by the new config were just loaded.
                    stamp = tls_stamp(&st.live_config());
                }
            }
        }
        let now = tls_stamp(&st.live_config());
        if now != stamp {
            stamp = now;
            match st.reload_tls() {
                Ok(()) => info!("TLS certificates reloaded from their files"),
                Err(e) => error!(
                    "cannot reload TLS certificates: security.{e}; the previous certificates stay in use"
                ),
            }
        }
    }
}

fn apply_file<N: Network>(st: &State<N>, file: &str, bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        error!("{file}: the file is not UTF-8 TOML; keeping the configuration in effect");
        return;
    };
    match st.patch_config(text, file) {
        Ok((applied, warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            for key in &applied.restart_required {
                warn!(key = %key, "{file}: {key} changed; it takes effect after a restart");
            }
            if !applied.applied.is_empty() {
                info!(keys = ?applied.applied, "{file}: configuration reloaded");
            }
        }
        Err(e) => {
            error!("cannot reload the configuration: {e}; keeping the configuration in effect")
        }
    }
}

#[cfg(test)]
mod tests {
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
