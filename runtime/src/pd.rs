//! The PD seam: discovery and registration talk to PD's etcd through
//! [`PdConnector`], so the simulation runs the same discovery code against
//! a PD double on its own simulated host. [`EtcdPd`] is the real one.
//!
//! The seam is the few etcd calls the proxy and TiDB make: a prefix read
//! with its revision, a prefix watch from a revision, leases, puts and
//! deletes. Errors are strings: every caller logs them and retries.
//!
//! With `security.cluster-tls` the connection is TLS made here with the
//! proxy's own rustls config ([`crate::tls::cluster_config`]), under
//! etcd-client's gRPC channel: the same checks as towards TiDB status
//! ports, which etcd-client's built-in TLS cannot express.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder,
    SortTarget, WatchOptions, WatchStream, Watcher,
};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A prefix read: the store's revision and the keys with their values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// The revision the read saw.
    pub revision: i64,
    /// Keys and values.
    pub kvs: Vec<(String, Vec<u8>)>,
}

/// What a watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchNews {
    /// Keys under the prefix changed.
    Changed,
    /// Nothing changed (a progress notice or keep-alive).
    Quiet,
}

/// Makes connections to PD.
pub trait PdConnector: Clone + Send + Sync + 'static {
    /// One connection.
    type Client: PdClient;
    /// Connects to one of `endpoints` (`host:port` or `http://host:port`),
    /// over TLS with `tls` (`security.cluster-tls`).
    fn connect(
        &self,
        endpoints: &[String],
        tls: Option<Arc<ClientConfig>>,
    ) -> impl Future<Output = Result<Self::Client, String>> + Send;
}

/// One connection to PD's etcd.
pub trait PdClient: Send + 'static {
    /// A watch on a prefix.
    type Watch: PdWatch;
    /// Reads every key under `prefix`.
    fn get_prefix(&mut self, prefix: &str) -> impl Future<Output = Result<Listing, String>> + Send;
    /// Watches `prefix` from `revision` (inclusive).
    fn watch_prefix(
        &mut self,
        prefix: &str,
        revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, String>> + Send;
    /// Grants a lease of `ttl` seconds; returns its id.
    fn grant_lease(&mut self, ttl: i64) -> impl Future<Output = Result<i64, String>> + Send;
    /// Renews `lease`; returns its TTL (0: it had expired).
    fn keep_alive(&mut self, lease: i64) -> impl Future<Output = Result<i64, String>> + Send;
    /// Puts `key` under `lease` (0: none).
    fn put(
        &mut self,
        key: &str,
        value: String,
        lease: i64,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Deletes `key`.
    fn delete(&mut self, key: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// The key under `prefix` created first and its value: an etcd
    /// election's owner ([`crate::ha`]). A PD double without elections
    /// answers an error.
    fn first_created(
        &mut self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<(String, Vec<u8>)>, String>> + Send {
        let _ = prefix;
        async { Err("this PD has no elections".to_string()) }
    }
    /// Revokes `lease` now, deleting its keys (a resignation).
    fn revoke_lease(&mut self, lease: i64) -> impl Future<Output = Result<(), String>> + Send {
        let _ = lease;
        async { Err("this PD has no elections".to_string()) }
    }
}

/// A watch stream. An error ends it (cancelled, compacted, connection
/// lost): the caller reads again and watches anew.
pub trait PdWatch: Send + 'static {
    /// The next notice.
    fn next(&mut self) -> impl Future<Output = Result<WatchNews, String>> + Send;
}

/// `http://` in front of endpoints given as `host:port`.
pub fn endpoints(pd: &[String]) -> Vec<String> {
    pd.iter()
        .map(|a| {
            if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            }
        })
        .collect()
}

/// PD's etcd through `etcd-client`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdPd;

/// A connection through `etcd-client`.
pub struct EtcdClient {
    client: Client,
    keepers: HashMap<i64, (LeaseKeeper, LeaseKeepAliveStream)>,
    tls_failure: TlsFailure,
}

/// A watch through `etcd-client`.
pub struct EtcdWatch {
    // Dropping the watcher cancels the watch.
    _watcher: Watcher,
    stream: WatchStream,
    tls_failure: TlsFailure,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("leases", &self.keepers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EtcdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatch").finish_non_exhaustive()
    }
}

/// How long a connection to PD may take, TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request to PD may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings: a PD behind a partition that drops packets answers
/// nothing, not even a reset; pings find out (etcd accepts pings every 5 s
/// or slower).
const PING_EVERY: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

impl PdConnector for EtcdPd {
    type Client = EtcdClient;

    async fn connect(
        &self,
        pd: &[String],
        tls: Option<Arc<ClientConfig>>,
    ) -> Result<EtcdClient, String> {
        let tls_failure = TlsFailure::default();
        let client = match tls {
            Some(tls) => connect_tls(pd, tls, &tls_failure).await?,
            None => {
                if let Some(e) = pd.iter().find(|e| e.starts_with("https://")) {
                    return Err(format!(
                        "PD address {e} asks for TLS: set security.cluster-tls (ca, or skip-ca)"
                    ));
                }
                let opts = ConnectOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_keep_alive(PING_EVERY, PING_TIMEOUT)
                    .with_keep_alive_while_idle(true);
                Client::connect(endpoints(pd), Some(opts))
                    .await
                    .map_err(|e| error_chain(&e))?
            }
        };
        Ok(EtcdClient {
            client,
            keepers: HashMap::new(),
            tls_failure,
        })
    }
}

/// Connects to the first of `pd` that answers, over TLS with `tls`. One
/// endpoint at a time (etcd-client balances only over its own
/// connections); a broken one makes the caller connect anew.
async fn connect_tls(
    pd: &[String],
    tls: Arc<ClientConfig>,
    failure: &TlsFailure,
) -> Result<Client, String> {
    // etcd serves gRPC on HTTP/2, which over TLS needs ALPN.
    let mut h2 = (*tls).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(h2));
    let mut last = "no PD address".to_string();
    for e in pd {
        let addr = e.rsplit("://").next().unwrap_or(e).to_string();
        // The connector makes the TLS itself: the URI says plain HTTP so
        // tonic adds none of its own.
        let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
            Ok(ep) => ep,
            Err(err) => {
                last = format!("PD address {e}: {err}");
                continue;
            }
        }
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true);
        let (connector, target, noted) = (connector.clone(), addr.clone(), failure.clone());
        let dial = tower::service_fn(move |_: hyper::Uri| {
            let (connector, addr, failure) = (connector.clone(), target.clone(), noted.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                let s = connector
                    .connect(crate::tls::server_name(&addr), tcp)
                    .await
                    .map_err(|e| match crate::tls::handshake_failure(&e) {
                        Some(why) => std::io::Error::new(
                            e.kind(),
                            format!("TLS handshake with PD {addr} failed: {why}"),
                        ),
                        None => e,
                    })?;
                Ok::<_, std::io::Error>(TokioIo::new(Noted {
                    inner: s,
                    failure,
                    addr,
                    heard: false,
                }))
            }
        });
        match endpoint.connect_with_connector(dial).await {
            Ok(channel) => {
                return Client::from_channel(etcd_client::Channel::Tonic(channel), None)
                    .await
                    .map_err(|e| failure.explain(&e));
            }
            Err(err) => last = failure.explain(&err),
        }
    }
    Err(last)
}

/// The last TLS failure on a PD connection, for its error messages. After
/// a TLS 1.3 handshake, PD's refusal of the proxy's certificate (etcd's
/// `--client-cert-auth`) arrives as an alert on the first read, which
/// tonic reports only as a cancelled request. (When a write fails first,
/// on the connection PD closed, the alert is never read and the error says
/// only that.)
#[derive(Debug, Clone, Default)]
struct TlsFailure(Arc<Mutex<Option<String>>>);

impl TlsFailure {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `e` if it is a TLS failure on the connection to `addr`.
    fn note(&self, addr: &str, e: &std::io::Error) {
        if let Some(why) = crate::tls::handshake_failure(e) {
            *self.slot() = Some(format!("TLS with PD {addr} failed: {why}"));
        }
    }

    /// PD answered on a new connection: earlier failures are history.
    fn clear(&self) {
        *self.slot() = None;
    }

    /// `e` in words, led by the TLS failure under it, if any.
    fn explain(&self, e: &dyn std::error::Error) -> String {
        let chain = error_chain(e);
        match self.slot().as_ref() {
            Some(tls) if !chain.contains(tls.as_str()) => format!("{tls} ({chain})"),
            _ => chain,
        }
    }
}

/// A PD connection's TLS stream that notes TLS failures in [`TlsFailure`],
/// and clears them once PD has sent data (so it accepted the proxy's
/// certificate: a TLS 1.3 client finishes its handshake before the server
/// has judged it).
struct Noted<S> {
    inner: S,
    failure: TlsFailure,
    addr: String,
    heard: bool,
}

impl<S> Noted<S> {
    fn note<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            self.failure.note(&self.addr, e);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Noted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.heard && matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.heard = true;
            self.failure.clear();
        }
        self.note(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Noted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }
}

/// An error with its causes: etcd-client's and tonic's top-level messages
/// ("transport error") leave out what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl PdClient for EtcdClient {
    type Watch = EtcdWatch;

    async fn get_prefix(&mut self, prefix: &str) -> Result<Listing, String> {
        let r = self
            .client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(Listing {
            revision: r.header().map(|h| h.revision()).unwrap_or(0),
            kvs: r
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    )
                })
                .collect(),
        })
    }

    async fn watch_prefix(&mut self, prefix: &str, revision: i64) -> Result<EtcdWatch, String> {
        let (watcher, stream) = self
            .client
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision),
                ),
            )
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(EtcdWatch {
            _watcher: watcher,
            stream,
            tls_failure: self.tls_failure.clone(),
        })
    }

    async fn grant_lease(&mut self, ttl: i64) -> Result<i64, String> {
        Ok(self
            .client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.tls_failure.explain(&e))?
            .id())
    }

    async fn keep_alive(&mut self, lease: i64) -> Result<i64, String> {
        if !self.keepers.contains_key(&lease) {
            let k = self
                .client
                .lease_keep_alive(lease)
                .await
                .map_err(|e| self.tls_failure.explain(&e))?;
            self.keepers.insert(lease, k);
        }
        let Some((keeper, acks)) = self.keepers.get_mut(&lease) else {
            return Err("lease keeper lost".into());
        };
        keeper
            .keep_alive()
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        match acks.message().await {
            Ok(Some(r)) => Ok(r.ttl()),
            Ok(None) => Err("lease keep-alive stream ended".into()),
            Err(e) => Err(self.tls_failure.explain(&e)),
        }
    }

    async fn put(&mut self, key: &str, value: String, lease: i64) -> Result<(), String> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        self.client
            .put(key, value, opts)
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(())
    }

    async fn delete(&mut self, key: &str) -> Result<(), String> {
        self.client
            .delete(key, None)
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(())
    }

    async fn first_created(&mut self, prefix: &str) -> Result<Option<(String, Vec<u8>)>, String> {
        // etcd's own election reads the owner the same way
        // (clientv3.WithFirstCreate: sort by create revision, limit 1).
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let r = self
            .client
            .get(prefix, Some(opts))
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(r.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        }))
    }

    async fn revoke_lease(&mut self, lease: i64) -> Result<(), String> {
        self.keepers.remove(&lease);
        self.client
            .lease_revoke(lease)
            .await
            .map_err(|e| self.tls_failure.explain(&e))?;
        Ok(())
    }
}

impl PdWatch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchNews, String> {
        match self.stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() || resp.compact_revision() > 0 {
                    Err(format!(
                        "watch canceled (compacted at {})",
                        resp.compact_revision()
                    ))
                } else if resp.events().is_empty() {
                    Ok(WatchNews::Quiet)
                } else {
                    Ok(WatchNews::Changed)
                }
            }
            Ok(None) => Err("watch stream ended".into()),
            Err(e) => Err(self.tls_failure.explain(&e)),
        }
    }
}
