//! The client's optional PROXY header: with `proxy-protocol = "v2"` a
//! connection's first client bytes are read through [`HeaderSniff`] until
//! they are a header (the session then names its source to backends) or
//! plain MySQL (handed to the session as read).

use std::task::{Context, Poll, ready};

use tiproxy_core::proxy_protocol::ProxyHeader;
use tiproxy_core::session::Leg;
use tokio::io::ReadBuf;
use tokio::time::Instant;
use tracing::info;

use super::Driver;
use crate::net::Network;
use crate::proxy_header::Sniffed;

impl<N: Network> Driver<N> {
    /// Reads the client's first bytes while they may be a PROXY header
    /// (TiProxy's rule: optional, told apart by its signature); ready when
    /// the session got input or the header was decided.
    pub(super) fn poll_read_proxy_header(
        &mut self,
        cx: &mut Context<'_>,
        budget: usize,
    ) -> Poll<()> {
        let Some(sniff) = self.sniff.as_mut() else {
            return Poll::Pending;
        };
        let mut chunk = [0u8; 512];
        let n = budget.min(sniff.want()).min(chunk.len());
        let mut rb = ReadBuf::new(&mut chunk[..n]);
        let res = ready!(self.client.poll_read(cx, &mut rb));
        let now = Instant::now().into_std();
        let read = match res {
            Err(e) => {
                self.sniff = None;
                self.session.handle_closed(now, Leg::Client, &e.to_string());
                return Poll::Ready(());
            }
            Ok(()) => rb.filled(),
        };
        if read.is_empty() {
            let early = sniff.finish();
            self.sniff = None;
            if !early.is_empty() {
                self.session.handle_data(now, Leg::Client, &early);
            }
            self.session
                .handle_closed(now, Leg::Client, "connection closed by peer");
            return Poll::Ready(());
        }
        let early = match sniff.feed(read) {
            Sniffed::NeedMore => return Poll::Ready(()),
            Sniffed::Plain(b) => b,
            Sniffed::Header(h, rest) => {
                if let ProxyHeader::Proxy { source, .. } = h {
                    *self.ctl.client.lock().expect("mailbox lock") = Some(source);
                    // Backends hear of the original client; the address it
                    // reached stays this proxy's own, as without a header.
                    let local = self
                        .client
                        .stream()
                        .and_then(|s| self.shared.net.local_addr(s));
                    if let Some(destination) = local {
                        self.session.handle_proxy_header(ProxyHeader::Proxy {
                            source,
                            destination,
                        });
                    }
                }
                rest
            }
            Sniffed::Invalid(e) => {
                self.sniff = None;
                info!(conn_id = self.conn_id, peer = %self.peer(), "closing connection: bad PROXY protocol header: {e}");
                self.session
                    .handle_close("the PROXY protocol header cannot be used");
                return Poll::Ready(());
            }
        };
        self.sniff = None;
        if !early.is_empty() {
            self.session.handle_data(now, Leg::Client, &early);
        }
        Poll::Ready(())
    }
}
