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
use crate::state::State;

/// Wait after a file event before reading, so a write in several steps is
/// read once it is complete.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Polling interval while inotify works (a safety net) and when it does not.
const POLL_WATCHED: Duration = Duration::from_secs(5);
const POLL_UNWATCHED: Duration = Duration::from_secs(1);

/// The TLS files in use, with what identifies their contents on disk.
fn tls_stamp(cfg: &Config) -> Vec<(String, Option<(std::time::SystemTime, u64)>)> {
    let s = &cfg.security;
    [
        &s.server_tls,
        &s.server_http_tls,
        &s.sql_tls,
        &s.cluster_tls,
    ]
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
                Err(e) => {
                    crate::metrics::metrics().server_error(crate::metrics::err_type::LOAD_CERT);
                    error!(
                        "cannot reload TLS certificates: security.{e}; the previous certificates stay in use"
                    )
                }
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
