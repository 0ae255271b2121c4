//! [`TurmoilNet`]: the proxy's (and the TiDB double's) network seam over
//! turmoil's simulated TCP, so the real runtime runs inside a simulation.
//!
//! Every call must happen on a turmoil host (turmoil panics otherwise).
//!
//! **Lossy partitions.** turmoil's TCP never retransmits nor resets: a
//! segment lost to `turmoil::partition` stalls its connection forever,
//! which is neither what TCP makes of a short partition (it retransmits:
//! modelled by `turmoil::hold`, everything arrives late) nor of a long one
//! (retransmissions or keep-alives give up and the connection is reset).
//! [`Links`] models the second: a partition is a hold, and once it has
//! lasted the modelled TCP timeout, [`Links::cut`] resets every connection
//! across it, at both ends ([`SimStream`] then fails every read and write
//! with `ConnectionReset`). Connections made after the cut are not
//! affected (their handshake waits on the hold like any other segment).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tiproxy_runtime::net::Network;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use turmoil::net::{TcpListener, TcpStream};

type Pair = (IpAddr, IpAddr);

fn pair(a: IpAddr, b: IpAddr) -> Pair {
    if a <= b { (a, b) } else { (b, a) }
}

/// The run's links between hosts, for resetting connections across a
/// partition that outlasted TCP's patience.
#[derive(Debug, Default)]
pub struct Links {
    inner: Mutex<LinksInner>,
}

#[derive(Debug, Default)]
struct LinksInner {
    /// Cuts so far per pair of hosts: a stream made before the last cut of
    /// its pair is reset.
    cuts: BTreeMap<Pair, u64>,
    /// Tasks waiting on a stream: (stream id, write side) -> waker.
    /// Ordered, so a cut wakes them in the same order on every replay.
    parked: BTreeMap<(u64, bool), (Pair, Waker)>,
    next_id: u64,
}

impl Links {
    /// Shared links for one run.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinksInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, p: Pair) -> (u64, u64) {
        let mut g = self.lock();
        g.next_id += 1;
        (g.next_id, g.cuts.get(&p).copied().unwrap_or(0))
    }

    /// Resets every connection between hosts `a` and `b` open now.
    pub fn cut(&self, a: IpAddr, b: IpAddr) {
        let p = pair(a, b);
        let wake: Vec<Waker> = {
            let mut g = self.lock();
            *g.cuts.entry(p).or_default() += 1;
            let ids: Vec<(u64, bool)> = g
                .parked
                .iter()
                .filter(|(_, (q, _))| *q == p)
                .map(|(k, _)| *k)
                .collect();
            ids.iter()
                .filter_map(|k| g.parked.remove(k).map(|(_, w)| w))
                .collect()
        };
        for w in wake {
            w.wake();
        }
    }

    fn is_cut(&self, p: Pair, born: u64) -> bool {
        self.lock().cuts.get(&p).copied().unwrap_or(0) != born
    }

    fn park(&self, id: u64, write: bool, p: Pair, w: &Waker) {
        self.lock().parked.insert((id, write), (p, w.clone()));
    }

    fn forget(&self, id: u64) {
        let mut g = self.lock();
        g.parked.remove(&(id, false));
        g.parked.remove(&(id, true));
    }
}

/// A turmoil connection that a [`Links::cut`] resets.
#[derive(Debug)]
pub struct SimStream {
    inner: TcpStream,
    links: Option<(Arc<Links>, u64, Pair, u64)>,
}

impl SimStream {
    /// Wraps `inner`; with `links`, a cut between its two hosts resets it.
    pub fn new(inner: TcpStream, links: Option<&Arc<Links>>) -> Self {
        let links = links.and_then(|l| {
            let (a, b) = (inner.local_addr().ok()?, inner.peer_addr().ok()?);
            let p = pair(a.ip(), b.ip());
            let (id, born) = l.register(p);
            Some((l.clone(), id, p, born))
        });
        Self { inner, links }
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn check(&self) -> io::Result<()> {
        match &self.links {
            Some((l, _, p, born)) if l.is_cut(*p, *born) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset: the network between the hosts was partitioned for longer than TCP's timeout",
            )),
            _ => Ok(()),
        }
    }

    fn parked<T>(&self, write: bool, cx: &Context<'_>, r: Poll<T>) -> Poll<T> {
        if r.is_pending()
            && let Some((l, id, p, _)) = &self.links
        {
            l.park(*id, write, *p, cx.waker());
        }
        r
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if let Some((l, id, _, _)) = &self.links {
            l.forget(*id);
        }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.parked(false, cx, r)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.parked(true, cx, r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.parked(true, cx, r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// turmoil's network as seen from one host.
#[derive(Debug, Clone)]
pub struct TurmoilNet {
    /// The host's name: listeners bound to `0.0.0.0` report its address.
    host: Arc<str>,
    /// Seed handed to the proxy for its randomness.
    rng_seed: Option<u64>,
    /// The run's links, if partitions can reset connections.
    links: Option<Arc<Links>>,
}

impl TurmoilNet {
    /// The network of host `host` (the name given to `Sim::host`).
    pub fn new(host: &str) -> Self {
        Self {
            host: host.into(),
            rng_seed: None,
            links: None,
        }
    }

    /// Connections made and accepted here are reset by cuts of `links`.
    pub fn with_links(mut self, links: Arc<Links>) -> Self {
        self.links = Some(links);
        self
    }

    /// Also seeds the proxy's randomness (salts, tie-breaks).
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }
}

impl Network for TurmoilNet {
    type Stream = SimStream;
    type Listener = TcpListener;
    type Pd = crate::pd::SimPd;

    fn pd(&self) -> crate::pd::SimPd {
        crate::pd::SimPd::new(self.links.clone())
    }

    async fn bind(&self, addr: &str) -> io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }

    async fn accept(&self, l: &TcpListener) -> io::Result<(SimStream, SocketAddr)> {
        let (s, a) = l.accept().await?;
        Ok((SimStream::new(s, self.links.as_ref()), a))
    }

    fn listener_addr(&self, l: &TcpListener) -> io::Result<SocketAddr> {
        let mut a = l.local_addr()?;
        // turmoil only binds the unspecified address; report the host's own,
        // as a server bound to its interface would (TiDB's @@hostname).
        if a.ip().is_unspecified() {
            a.set_ip(turmoil::lookup(&*self.host));
        }
        Ok(a)
    }

    async fn connect(&self, addr: &str) -> io::Result<SimStream> {
        let s = TcpStream::connect(addr).await?;
        Ok(SimStream::new(s, self.links.as_ref()))
    }

    fn local_addr(&self, s: &SimStream) -> Option<SocketAddr> {
        s.local_addr().ok()
    }

    fn rng_seed(&self) -> Option<u64> {
        self.rng_seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A cut resets the connections open across it, at both ends, wakes
    /// a reader parked on one, and leaves later connections alone.
    #[test]
    fn a_cut_resets_open_connections_at_both_ends() {
        let mut sim = turmoil::Builder::new().build();
        let links = Links::new();
        {
            let links = links.clone();
            sim.host("server", move || {
                let net = TurmoilNet::new("server").with_links(links.clone());
                async move {
                    let l = net.bind("0.0.0.0:9000").await?;
                    // First connection: a parked read that the cut ends.
                    let (mut s, _) = net.accept(&l).await?;
                    let mut b = [0u8; 1];
                    let e = s.read(&mut b).await.expect_err("reset by the cut");
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
                    // Second one, after the cut: works.
                    let (mut s, _) = net.accept(&l).await?;
                    s.read_exact(&mut b).await?;
                    s.write_all(&b).await?;
                    Ok(())
                }
            });
        }
        let cl = links.clone();
        sim.client("client", async move {
            let net = TurmoilNet::new("client").with_links(cl.clone());
            let mut s = net.connect("server:9000").await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            cl.cut(turmoil::lookup("client"), turmoil::lookup("server"));
            let e = s.write_all(b"x").await.expect_err("reset by the cut");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
            let mut s = net.connect("server:9000").await?;
            s.write_all(b"y").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            assert_eq!(&b, b"y");
            Ok(())
        });
        sim.run().unwrap();
    }
}
