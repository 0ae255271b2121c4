//! The network seam: the proxy listens and dials through [`Network`], so
//! the simulation can run the same code over turmoil's network.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream the proxy can drive.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Listening and dialing.
pub trait Network: Clone + Send + Sync + 'static {
    /// A connection.
    type Stream: Stream;
    /// A listening socket.
    type Listener: Send + Sync + 'static;
    /// How PD (etcd) is reached.
    type Pd: crate::pd::PdConnector;

    /// The PD connector.
    fn pd(&self) -> Self::Pd;

    /// Binds a listener.
    fn bind(&self, addr: &str) -> impl Future<Output = io::Result<Self::Listener>> + Send;
    /// Accepts one connection.
    fn accept(
        &self,
        l: &Self::Listener,
    ) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// The address a listener is bound to.
    fn listener_addr(&self, l: &Self::Listener) -> io::Result<SocketAddr>;
    /// Dials `addr` (`host:port`).
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// The local address of a connection.
    fn local_addr(&self, s: &Self::Stream) -> Option<SocketAddr>;

    /// The address a connection came from (the TCP peer, which a PROXY
    /// header does not change: `balance.routing-rule = "proxy_cidr"`).
    /// `None` by default: the address `accept` returned stands for it.
    fn peer_addr(&self, s: &Self::Stream) -> Option<SocketAddr> {
        let _ = s;
        None
    }

    /// Whether connections have TCP keepalive options
    /// ([`Network::set_keepalive`] does something). By default not: the
    /// simulated network has none, and no keepalive loop runs there.
    fn has_keepalive(&self) -> bool {
        false
    }

    /// Sets TCP keepalive and the user timeout on a connection as `k` says
    /// ([`crate::keepalive::apply`]). By default nothing.
    fn set_keepalive(&self, s: &Self::Stream, k: &crate::config::Keepalive) -> io::Result<()> {
        let _ = (s, k);
        Ok(())
    }

    /// Seed for the proxy's randomness (greeting salts, tie-breaks between
    /// equally loaded backends). `None`, the default, draws from the OS; the
    /// simulation seeds it so a run replays exactly.
    fn rng_seed(&self) -> Option<u64> {
        None
    }

    /// How many sessions this process's file descriptors hold, measured
    /// when the proxy starts accepting ([`session_fd_budget`]); `None`
    /// (the default, and the simulation) sets no such bound.
    fn session_fd_budget(&self) -> Option<usize> {
        None
    }

    /// The memory in use and its limit where the proxy runs
    /// ([`crate::memory::read`]); `None` (the default, and the simulation)
    /// never refuses a client for memory.
    fn host_memory(&self) -> Option<crate::memory::Usage> {
        None
    }

    /// Each connection worker thread's load (`GET /api/debug/workers`);
    /// `None` (the default) without worker threads.
    fn workers_info(&self) -> Option<Vec<crate::workers::WorkerInfo>> {
        None
    }

    /// At a point where a connection may move to another thread: the
    /// worker it should move to (`crate::workers`). By default never.
    fn rehome_target(&self) -> Option<usize> {
        None
    }

    /// Moves a connection's `streams` to worker `to` and runs `cont` with
    /// them there; completes when `cont` does. By default `cont` runs here.
    fn rehome<F, Fut>(
        &self,
        to: usize,
        streams: Vec<Self::Stream>,
        cont: F,
    ) -> impl Future<Output = ()> + Send
    where
        F: FnOnce(Vec<Self::Stream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let _ = to;
        cont(streams)
    }

    /// Runs an accepted connection's task. By default on the current runtime.
    fn spawn_connection<F, Fut>(&self, stream: Self::Stream, serve: F)
    where
        F: FnOnce(Self::Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        crate::task::spawn(serve(stream));
    }
}

/// The real network, through tokio.
///
/// With [`TokioNet::with_placement`], connections run on single-threaded
/// runtimes, one per thread (`crate::workers`): a connection's client and
/// backend sockets are driven by one thread, with no cross-thread wake-ups
/// or work stealing on the hot path (as HAProxy runs), and connections
/// gather on few threads while the load is light.
#[derive(Debug, Clone, Default)]
pub struct TokioNet {
    workers: Option<Arc<crate::workers::Workers>>,
}

impl TokioNet {
    /// Serves connections on `n` worker threads (at least one); with
    /// `round_robin`, new connections are placed in turn instead of on the
    /// first worker that is not busy (the monitor still gathers and spreads
    /// them).
    pub fn with_placement(n: usize, round_robin: bool) -> io::Result<Self> {
        let w = crate::workers::Workers::start(n, Default::default(), round_robin)?;
        Ok(Self { workers: Some(w) })
    }
}

/// The listen backlog asked for; the kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels). Go's `net.Listen`, so
/// TiDB and TiProxy, asks for somaxconn too. `TcpListener::bind` asks for
/// 128 (the standard library's value): a burst of more connects than that
/// (9,000 clients reconnecting, a drain's moves landing on one TiDB) lost
/// SYNs to a full accept queue, and each lost SYN waits the kernel's
/// one-second retransmission.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds a listener to `addr` (`host:port`, the first address that binds)
/// with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`, as `TcpListener::bind` sets.
pub async fn bind_listener(addr: &str) -> io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

impl Network for TokioNet {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;
    type Pd = crate::pd::EtcdPd;

    fn pd(&self) -> crate::pd::EtcdPd {
        crate::pd::EtcdPd
    }

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        bind_listener(addr).await
    }

    async fn accept(&self, l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (s, a) = l.accept().await?;
        // Small request/response packets: never wait for Nagle.
        let _ = s.set_nodelay(true);
        Ok((s, a))
    }

    fn listener_addr(&self, l: &Self::Listener) -> io::Result<SocketAddr> {
        l.local_addr()
    }

    fn session_fd_budget(&self) -> Option<usize> {
        session_fd_budget()
    }

    fn host_memory(&self) -> Option<crate::memory::Usage> {
        crate::memory::read()
    }

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn local_addr(&self, s: &Self::Stream) -> Option<SocketAddr> {
        s.local_addr().ok()
    }

    fn peer_addr(&self, s: &Self::Stream) -> Option<SocketAddr> {
        s.peer_addr().ok()
    }

    fn has_keepalive(&self) -> bool {
        true
    }

    fn set_keepalive(&self, s: &Self::Stream, k: &crate::config::Keepalive) -> io::Result<()> {
        crate::keepalive::apply(s, k)
    }

    fn spawn_connection<F, Fut>(&self, stream: Self::Stream, serve: F)
    where
        F: FnOnce(Self::Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(w) = &self.workers else {
            crate::task::spawn(serve(stream));
            return;
        };
        // Move the socket to the worker's reactor.
        match stream.into_std() {
            Ok(std) => {
                // No `async` block: the task holds the connection's future
                // and nothing captured beside it.
                w.spawn(w.place(), move || {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(s) => futures_util::future::Either::Left(serve(s)),
                        Err(e) => {
                            tracing::warn!("cannot register an accepted connection: {e}");
                            futures_util::future::Either::Right(std::future::ready(()))
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("cannot hand an accepted connection to a worker: {e}"),
        }
    }

    fn workers_info(&self) -> Option<Vec<crate::workers::WorkerInfo>> {
        Some(self.workers.as_ref()?.info())
    }

    fn rehome_target(&self) -> Option<usize> {
        self.workers.as_ref()?.should_leave()
    }

    async fn rehome<F, Fut>(&self, to: usize, streams: Vec<Self::Stream>, cont: F)
    where
        F: FnOnce(Vec<Self::Stream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(w) = &self.workers else {
            return cont(streams).await;
        };
        // Out of this thread's reactor: the kernel keeps whatever the
        // sockets hold meanwhile.
        let mut std = Vec::with_capacity(streams.len());
        for s in streams {
            match s.into_std() {
                Ok(s) => std.push(s),
                Err(e) => {
                    tracing::warn!(
                        "cannot move a connection between worker threads, closing it: {e}"
                    );
                    return;
                }
            }
        }
        let moved = w.spawn(to, move || async move {
            let mut streams = Vec::with_capacity(std.len());
            for s in std {
                match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => streams.push(s),
                    Err(e) => {
                        tracing::warn!("cannot register a moved connection, closing it: {e}");
                        return;
                    }
                }
            }
            cont(streams).await
        });
        // This task stays until the connection ends (whoever spawned it
        // awaits it), but no longer counts as this worker's connection.
        w.left_here();
        let _ = moved.await;
        w.returned_here();
    }
}

/// A stream that yields `prefix` before the inner stream's bytes: bytes
/// read ahead of a TLS upgrade belong to the TLS handshake.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The proxy's own resource exhaustion behind `e` (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM), if that is what it is: then the failure says nothing about the
/// peer.
pub fn local_exhaustion(e: &io::Error) -> Option<tiproxy_core::health::LocalExhaustion> {
    tiproxy_core::health::LocalExhaustion::from_errno(e.raw_os_error()?, fd_limit())
}

/// This process's soft `RLIMIT_NOFILE`, read once from `/proc/self/limits`
/// (call it at start: once out of descriptors the file cannot be opened).
pub fn fd_limit() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The sessions that fit in the descriptors left now: each holds two (its
/// client and its backend), and a headroom of an eighth of the limit, 8 to
/// 64 descriptors, stays free for what the proxy opens besides: health probes, API
/// clients, PD, a moving session's second backend, the config file. A
/// client beyond it is refused with 1040 while a descriptor is still free
/// to say so; without it the accept itself fails, and telling that client
/// anything depends on the reserve below. `None` when the limit or the
/// open descriptors cannot be read.
pub fn session_fd_budget() -> Option<usize> {
    let limit = usize::try_from(fd_limit()?).ok()?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let headroom = (limit / 8).clamp(8, 64);
    Some(limit.saturating_sub(open + headroom) / 2)
}

/// One file descriptor kept in reserve (an open `/dev/null`). Out of
/// descriptors, `accept` fails and leaves the connection in the backlog,
/// so the listener stays readable and the accept loop would spin; closing
/// the reserve lets the proxy accept that connection, tell the client why
/// (1040), close it, and take the reserve back. The reserve comes before
/// new sessions: another task may take the descriptor it freed (a health
/// probe, the config poll) and sessions may fill the rest, so while it is
/// missing every accepted connection is refused and its descriptor, once
/// closed, becomes the reserve again.
#[derive(Debug)]
pub struct SpareFd(Option<std::fs::File>);

impl SpareFd {
    /// Opens the reserve.
    pub fn new() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the reserve; false if there was none to close.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the reserve back (once a descriptor is free again). The error
    /// says why it could not be (EMFILE: still out of descriptors).
    pub fn restore(&mut self) -> io::Result<()> {
        if self.0.is_none() {
            self.0 = Some(std::fs::File::open("/dev/null")?);
        }
        Ok(())
    }
}

impl Default for SpareFd {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiproxy_core::health::LocalExhaustion;

    #[tokio::test]
    async fn a_burst_of_connects_beyond_128_waits_for_no_retransmission() {
        // Nobody accepts: every connection waits in the accept queue. With
        // the standard library's backlog (128) the 130th SYN is dropped and
        // its connect takes the kernel's one-second retransmission.
        let l = bind_listener("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut open = Vec::new();
        for i in 0..200 {
            let c = tokio::time::timeout(
                std::time::Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            match c {
                Ok(Ok(s)) => open.push(s),
                Ok(Err(e)) => panic!("connect {i}: {e}"),
                Err(_) => panic!("connect {i} waited for a SYN retransmission"),
            }
        }
        assert_eq!(open.len(), 200);
    }

    #[test]
    fn os_errors_of_the_proxy_itself_are_told_apart_from_the_peers() {
        let e = io::Error::from_raw_os_error(24);
        assert!(matches!(
            local_exhaustion(&e),
            Some(LocalExhaustion::ProcessFds { .. })
        ));
        assert_eq!(local_exhaustion(&io::Error::from_raw_os_error(111)), None);
        assert_eq!(
            local_exhaustion(&io::Error::other("no answer within 2s")),
            None
        );
        assert_eq!(
            local_exhaustion(&io::Error::from_raw_os_error(23)),
            Some(LocalExhaustion::SystemFds)
        );
        assert!(fd_limit().is_some_and(|n| n > 0));
    }
}
