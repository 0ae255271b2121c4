//! The network seam: the proxy listens and dials through [`Network`], so
//! the simulation can run the same code over turmoil's network.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
}

/// The real network, through tokio.
#[derive(Debug, Clone, Default)]
pub struct TokioNet;

impl Network for TokioNet {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
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

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn local_addr(&self, s: &Self::Stream) -> Option<SocketAddr> {
        s.local_addr().ok()
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
