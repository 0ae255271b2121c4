//! The PD double: the part of PD's etcd that TiDB and the proxy use (prefix
//! reads with a revision, prefix watches from a revision, leases, puts and
//! deletes), served on its own simulated host, and [`SimPd`], the
//! [`PdConnector`] that reaches it over turmoil's network. The proxy's real
//! discovery and registration code (`tiproxy_runtime::discovery`) and the
//! TiDB doubles' registration (`tidb::pd`) talk to it.
//!
//! The store outlives the host: a crashed PD comes back with its keys and
//! leases, and, as an etcd leader does when elected, gives every lease a
//! full TTL again. Leases expire only while PD runs.
//!
//! Wire format: one JSON object per line. A connection carries requests
//! and their answers in turn, or, after a `watch` request, the watch's
//! notices: `changed` when keys under the prefix changed (`delay` after the
//! change, PD's own lag), `progress` every second otherwise. A client that
//! hears nothing for [`WATCH_SILENCE`] gives the watch up, as etcd's
//! HTTP/2 keep-alive does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;
use turmoil::net::{TcpListener, TcpStream};

use tiproxy_runtime::pd::{Listing, PdClient, PdConnector, PdWatch, WatchNews};

use crate::net::{Links, SimStream};

/// PD's client port.
pub const PD_PORT: u16 = 2379;
/// How long a client waits to connect (etcd-client's option in the proxy).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a watch says it is alive.
pub const WATCH_PROGRESS: Duration = Duration::from_secs(1);
/// Silence after which a client gives a watch up (keep-alive 10 s + 3 s
/// in the proxy's etcd options; shorter here, so runs stay short).
pub const WATCH_SILENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Get {
        prefix: String,
    },
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    Grant {
        ttl: i64,
    },
    KeepAlive {
        lease: i64,
    },
    Watch {
        prefix: String,
        revision: i64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
enum Reply {
    Listing {
        revision: i64,
        kvs: Vec<(String, String)>,
    },
    Done,
    Lease {
        id: i64,
        ttl: i64,
    },
    Changed,
    Progress,
    Error {
        message: String,
    },
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    revision: i64,
    kvs: BTreeMap<String, (String, i64)>,
    /// Every change: (revision, key).
    history: Vec<(i64, String)>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
}

/// Reports a change to the run's trace.
pub type OnEvent = Box<dyn Fn(Duration, String) + Send + Sync>;

/// PD's data: outlives the host that serves it.
pub struct PdStore {
    inner: Mutex<Inner>,
    /// Wakes watchers on every change. Not a `tokio::sync::watch`: its
    /// waiters sit in randomly chosen shards, so their wake order (and a
    /// seed's trace) would differ from run to run.
    changes: Notify,
    on_event: OnEvent,
}

impl std::fmt::Debug for PdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl PdStore {
    /// An empty store; `on_event` hears every registration change.
    pub fn new(on_event: OnEvent) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                revision: 1,
                next_lease: 1,
                ..Inner::default()
            }),
            changes: Notify::new(),
            on_event,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("pd store lock")
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<String> {
        self.lock().kvs.get(key).map(|v| v.0.clone())
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn changed(&self, g: &mut Inner, key: &str, what: &str) {
        g.revision += 1;
        g.history.push((g.revision, key.to_string()));
        self.changes.notify_waiters();
        // Only registration keys make the trace: the TTL refreshes carry
        // wall-clock stamps and the proxy's own key its binary's path.
        if key.ends_with("/info") {
            (self.on_event)(now(), format!("pd: {what} {key} (revision {})", g.revision));
        }
    }

    fn apply(&self, req: Request) -> Reply {
        let mut g = self.lock();
        let at = now();
        match req {
            Request::Get { prefix } => Reply::Listing {
                revision: g.revision,
                kvs: g
                    .kvs
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
            },
            Request::Put { key, value, lease } => {
                if lease != 0 && !g.leases.contains_key(&lease) {
                    return Reply::Error {
                        message: format!("etcdserver: requested lease not found ({lease})"),
                    };
                }
                g.kvs.insert(key.clone(), (value, lease));
                self.changed(&mut g, &key, "put");
                Reply::Done
            }
            Request::Delete { key } => {
                if g.kvs.remove(&key).is_some() {
                    self.changed(&mut g, &key, "deleted");
                }
                Reply::Done
            }
            Request::Grant { ttl } => {
                let id = g.next_lease;
                g.next_lease += 1;
                let ttl = Duration::from_secs(ttl.max(1) as u64);
                g.leases.insert(
                    id,
                    Lease {
                        ttl,
                        deadline: at + ttl,
                    },
                );
                Reply::Lease {
                    id,
                    ttl: ttl.as_secs() as i64,
                }
            }
            Request::KeepAlive { lease } => match g.leases.get_mut(&lease) {
                Some(l) => {
                    l.deadline = at + l.ttl;
                    Reply::Lease {
                        id: lease,
                        ttl: l.ttl.as_secs() as i64,
                    }
                }
                None => Reply::Lease { id: lease, ttl: 0 },
            },
            Request::Watch { .. } => Reply::Error {
                message: "a watch takes its own connection".into(),
            },
        }
    }

    /// Ends the leases whose deadline passed, with their keys.
    fn expire(&self) {
        let at = now();
        let mut g = self.lock();
        let dead: Vec<i64> = g
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= at)
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            g.leases.remove(id);
            let keys: Vec<String> = g
                .kvs
                .iter()
                .filter(|(_, v)| v.1 == *id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                g.kvs.remove(&k);
                self.changed(&mut g, &k, &format!("lease {id} expired:"));
            }
        }
    }

    /// Whether anything under `prefix` changed after revision `seen`.
    fn changed_since(&self, prefix: &str, seen: i64) -> bool {
        self.lock()
            .history
            .iter()
            .rev()
            .take_while(|(r, _)| *r > seen)
            .any(|(_, k)| k.starts_with(prefix))
    }
}

/// Serves `store` on this host's PD port until the host goes down.
/// `delay` is PD's lag in telling watchers about a change.
pub async fn serve(store: Arc<PdStore>, delay: Duration) -> turmoil::Result {
    {
        // A new leader gives every lease a full TTL.
        let at = now();
        for l in store.lock().leases.values_mut() {
            l.deadline = at + l.ttl;
        }
    }
    let listener = TcpListener::bind(("0.0.0.0", PD_PORT)).await?;
    let expiry = store.clone();
    tiproxy_runtime::task::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            expiry.expire();
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let store = store.clone();
        tiproxy_runtime::task::spawn(async move {
            let _ = serve_conn(store, stream, delay).await;
        });
    }
}

async fn write_line(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

async fn serve_conn(
    store: Arc<PdStore>,
    stream: TcpStream,
    delay: Duration,
) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("bad request: {e}");
                write_line(&mut w, &Reply::Error { message }).await?;
                continue;
            }
        };
        if let Request::Watch { prefix, revision } = req {
            let mut seen = revision - 1;
            let mut progress_at = tokio::time::Instant::now() + WATCH_PROGRESS;
            loop {
                // Registered before the check: no change slips between.
                let notified = store.changes.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if store.changed_since(&prefix, seen) {
                    tokio::time::sleep(delay).await;
                    seen = store.lock().revision;
                    write_line(&mut w, &Reply::Changed).await?;
                    continue;
                }
                seen = store.lock().revision;
                tokio::select! {
                    biased;
                    _ = &mut notified => {}
                    l = lines.next_line() => {
                        // The client went away (or broke the protocol).
                        if !matches!(l, Ok(Some(_))) {
                            return Ok(());
                        }
                    }
                    _ = tokio::time::sleep_until(progress_at) => {
                        progress_at += WATCH_PROGRESS;
                        write_line(&mut w, &Reply::Progress).await?;
                    }
                }
            }
        }
        let reply = store.apply(req);
        write_line(&mut w, &reply).await?;
    }
    Ok(())
}

/// Reaches the PD double over turmoil's network.
#[derive(Debug, Clone, Default)]
pub struct SimPd {
    links: Option<Arc<Links>>,
}

impl SimPd {
    /// With `links`, partitions reset this client's connections too.
    pub fn new(links: Option<Arc<Links>>) -> Self {
        Self { links }
    }
}

type Lines = tokio::io::Lines<BufReader<tokio::io::ReadHalf<SimStream>>>;

/// One connection to the PD double.
#[derive(Debug)]
pub struct SimPdClient {
    addr: String,
    lines: Lines,
    w: tokio::io::WriteHalf<SimStream>,
    links: Option<Arc<Links>>,
}

/// A watch on the PD double.
#[derive(Debug)]
pub struct SimPdWatch {
    lines: Lines,
    // Kept open: dropping it tells PD the watch is over.
    _w: tokio::io::WriteHalf<SimStream>,
}

async fn dial(
    addr: &str,
    links: Option<&Arc<Links>>,
) -> Result<(Lines, tokio::io::WriteHalf<SimStream>), String> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to PD at {addr} timed out"))?
        .map_err(|e| format!("connecting to PD at {addr}: {e}"))?;
    let (r, w) = tokio::io::split(SimStream::new(s, links));
    Ok((BufReader::new(r).lines(), w))
}

async fn read_reply(lines: &mut Lines, timeout: Duration) -> Result<Reply, String> {
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .map_err(|_| format!("PD did not answer within {timeout:?}"))?
        .map_err(|e| format!("PD connection: {e}"))?
        .ok_or("PD closed the connection")?;
    match serde_json::from_str(&line) {
        Ok(Reply::Error { message }) => Err(message),
        Ok(r) => Ok(r),
        Err(e) => Err(format!("unreadable answer from PD: {e}")),
    }
}

impl PdConnector for SimPd {
    type Client = SimPdClient;

    async fn connect(
        &self,
        endpoints: &[String],
        tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> Result<SimPdClient, String> {
        // The simulated network carries no TLS; a run that configured
        // cluster-tls is told so rather than silently served in plain.
        if tls.is_some() {
            return Err("the simulated PD speaks no TLS (unset security.cluster-tls)".into());
        }
        let mut last = "no PD endpoint".to_string();
        for e in endpoints {
            let addr = e.rsplit("://").next().unwrap_or(e).to_string();
            match dial(&addr, self.links.as_ref()).await {
                Ok((lines, w)) => {
                    return Ok(SimPdClient {
                        addr,
                        lines,
                        w,
                        links: self.links.clone(),
                    });
                }
                Err(err) => last = err,
            }
        }
        Err(last)
    }
}

impl SimPdClient {
    async fn call(&mut self, req: &Request) -> Result<Reply, String> {
        write_line(&mut self.w, req)
            .await
            .map_err(|e| format!("PD connection: {e}"))?;
        read_reply(&mut self.lines, REQUEST_TIMEOUT).await
    }
}

fn unexpected(r: Reply) -> String {
    format!("unexpected answer from PD: {r:?}")
}

impl PdClient for SimPdClient {
    type Watch = SimPdWatch;

    async fn get_prefix(&mut self, prefix: &str) -> Result<Listing, String> {
        match self
            .call(&Request::Get {
                prefix: prefix.into(),
            })
            .await?
        {
            Reply::Listing { revision, kvs } => Ok(Listing {
                revision,
                kvs: kvs.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
            }),
            r => Err(unexpected(r)),
        }
    }

    async fn watch_prefix(&mut self, prefix: &str, revision: i64) -> Result<SimPdWatch, String> {
        // Its own connection, as a gRPC stream is its own HTTP/2 stream.
        let (lines, mut w) = dial(&self.addr, self.links.as_ref()).await?;
        let req = Request::Watch {
            prefix: prefix.into(),
            revision,
        };
        write_line(&mut w, &req)
            .await
            .map_err(|e| format!("PD connection: {e}"))?;
        Ok(SimPdWatch { lines, _w: w })
    }

    async fn grant_lease(&mut self, ttl: i64) -> Result<i64, String> {
        match self.call(&Request::Grant { ttl }).await? {
            Reply::Lease { id, .. } => Ok(id),
            r => Err(unexpected(r)),
        }
    }

    async fn keep_alive(&mut self, lease: i64) -> Result<i64, String> {
        match self.call(&Request::KeepAlive { lease }).await? {
            Reply::Lease { ttl, .. } => Ok(ttl),
            r => Err(unexpected(r)),
        }
    }

    async fn put(&mut self, key: &str, value: String, lease: i64) -> Result<(), String> {
        match self
            .call(&Request::Put {
                key: key.into(),
                value,
                lease,
            })
            .await?
        {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    async fn delete(&mut self, key: &str) -> Result<(), String> {
        match self.call(&Request::Delete { key: key.into() }).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }
}

impl PdWatch for SimPdWatch {
    async fn next(&mut self) -> Result<WatchNews, String> {
        match read_reply(&mut self.lines, WATCH_SILENCE).await? {
            Reply::Changed => Ok(WatchNews::Changed),
            Reply::Progress => Ok(WatchNews::Quiet),
            r => Err(unexpected(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists, watches, leases and expiry, over turmoil, as the proxy and
    /// the TiDBs use them; and the data survives the host's crash.
    #[test]
    fn leases_watches_and_a_crash() {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(60))
            .build();
        let events = Arc::new(Mutex::new(Vec::new()));
        let store = {
            let events = events.clone();
            PdStore::new(Box::new(move |_, e| events.lock().unwrap().push(e)))
        };
        {
            let store = store.clone();
            sim.host("pd", move || {
                serve(store.clone(), Duration::from_millis(100))
            });
        }
        let eps = vec!["pd:2379".to_string()];
        sim.client("tidb", {
            let eps = eps.clone();
            async move {
                let mut c = SimPd::default().connect(&eps, None).await?;
                let lease = c.grant_lease(3).await?;
                c.put("/topology/tidb/a:4000/info", "{}".into(), lease)
                    .await?;
                c.put("/topology/tidb/a:4000/ttl", "1".into(), lease)
                    .await?;
                // Kept alive for 5 s, then left to expire.
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    assert_eq!(c.keep_alive(lease).await?, 3);
                }
                // A put under an unknown lease is refused.
                assert!(c.put("/x", "y".into(), 999).await.is_err());
                Ok(())
            }
        });
        sim.client("watcher", {
            let store = store.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut c = SimPd::default().connect(&eps, None).await?;
                let l = c.get_prefix("/topology/tidb/").await?;
                assert_eq!(l.kvs.len(), 2, "{l:?}");
                let mut w = c.watch_prefix("/topology/tidb/", l.revision + 1).await?;
                // Quiet while the lease is kept alive (progress notices).
                let t0 = tokio::time::Instant::now();
                let mut quiet = 0;
                while w.next().await? == WatchNews::Quiet {
                    quiet += 1;
                }
                assert!(quiet >= 4, "{quiet} progress notices");
                // Expired between 5 s (last renewal) + 3 s TTL, after it.
                let waited = t0.elapsed();
                assert!(waited >= Duration::from_secs(7), "{waited:?}");
                assert!(c.get_prefix("/topology/tidb/").await?.kvs.is_empty());
                assert!(store.keys("/topology/tidb/").is_empty());
                Ok(())
            }
        });
        sim.run().unwrap();
        let ev = events.lock().unwrap().clone();
        assert!(ev.iter().any(|e| e.contains("expired")), "{ev:?}");

        // Data outlives a crash of the PD host.
        let mut sim = turmoil::Builder::new().build();
        let store = PdStore::new(Box::new(|_, _| {}));
        {
            let store = store.clone();
            sim.host("pd", move || serve(store.clone(), Duration::ZERO));
        }
        sim.client("c", async move {
            let mut c = SimPd::default()
                .connect(&["pd:2379".to_string()], None)
                .await?;
            c.put("/k", "v".into(), 0).await?;
            Ok(())
        });
        sim.run().unwrap();
        sim.crash("pd");
        sim.bounce("pd");
        sim.client("d", async move {
            let mut c = SimPd::default()
                .connect(&["http://pd:2379".to_string()], None)
                .await?;
            let l = c.get_prefix("/k").await?;
            assert_eq!(l.kvs, vec![("/k".to_string(), b"v".to_vec())]);
            Ok(())
        });
        sim.run().unwrap();
    }
}
