//! [`TurmoilNet`]: the proxy's (and the TiDB double's) network seam over
//! turmoil's simulated TCP, so the real runtime runs inside a simulation.
//!
//! Every call must happen on a turmoil host (turmoil panics otherwise).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tiproxy_runtime::net::Network;
use turmoil::net::{TcpListener, TcpStream};

/// turmoil's network as seen from one host.
#[derive(Debug, Clone)]
pub struct TurmoilNet {
    /// The host's name: listeners bound to `0.0.0.0` report its address.
    host: Arc<str>,
    /// Seed handed to the proxy for its randomness.
    rng_seed: Option<u64>,
}

impl TurmoilNet {
    /// The network of host `host` (the name given to `Sim::host`).
    pub fn new(host: &str) -> Self {
        Self {
            host: host.into(),
            rng_seed: None,
        }
    }

    /// Also seeds the proxy's randomness (salts, tie-breaks).
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }
}

impl Network for TurmoilNet {
    type Stream = TcpStream;
    type Listener = TcpListener;
    type Pd = crate::pd::SimPd;

    fn pd(&self) -> crate::pd::SimPd {
        crate::pd::SimPd
    }

    async fn bind(&self, addr: &str) -> io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }

    async fn accept(&self, l: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
        l.accept().await
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

    async fn connect(&self, addr: &str) -> io::Result<TcpStream> {
        TcpStream::connect(addr).await
    }

    fn local_addr(&self, s: &TcpStream) -> Option<SocketAddr> {
        s.local_addr().ok()
    }

    fn rng_seed(&self) -> Option<u64> {
        self.rng_seed
    }
}
