//! A connection's sockets: plain, or upgraded to TLS on either side.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::tls_stream::ServerTlsStream;

/// A socket, possibly upgraded to TLS.
pub(super) enum Io<S> {
    Plain(S),
    ServerTls(Box<ServerTlsStream<S>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<S>>),
    /// Moved into a TLS handshake in progress.
    Upgrading,
}

impl<S> Io<S> {
    /// The TCP stream under any TLS (for socket options).
    pub(super) fn stream(&self) -> Option<&S> {
        match self {
            Io::Plain(s) => Some(s),
            Io::ServerTls(s) => Some(s.get_ref()),
            Io::ClientTls(s) => Some(s.get_ref().0),
            Io::Upgrading => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::ServerTls(s) => s.poll_read(cx, buf),
            Io::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Upgrading => Poll::Pending,
        }
    }

    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::ServerTls(s) => s.poll_write(cx, buf),
            Io::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Upgrading => Poll::Pending,
        }
    }

    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Plain(_) => Poll::Ready(Ok(())),
            Io::ServerTls(s) => s.poll_flush(cx),
            Io::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Upgrading => Poll::Pending,
        }
    }

    pub(super) async fn shutdown(&mut self) {
        let _ = match self {
            Io::Plain(s) => s.shutdown().await,
            Io::ServerTls(s) => s.shutdown().await,
            Io::ClientTls(s) => s.shutdown().await,
            Io::Upgrading => Ok(()),
        };
    }
}

pub(super) async fn write_all<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    mut data: &[u8],
) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| io.poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    poll_fn(|cx| io.poll_flush(cx)).await
}
