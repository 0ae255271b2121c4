//! The proxy under test, started in-process on loopback for one scenario
//! run and shut down after it.
//!
//! With the `proxy` feature this is `tiproxy_runtime::start` with a config
//! naming the test MariaDB as its only static backend. Without it, a plain
//! TCP relay stands in: scenarios then check the harness itself (two paths
//! that forward the same bytes must compare equal), not the proxy.

use std::net::SocketAddr;

/// What the proxy's config turns on for a scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Clients may use TLS to the proxy (`server-tls = { auto-certs = true }`).
    pub client_tls: bool,
    /// The proxy must use TLS to the backend (`sql-tls = { skip-ca = true }`,
    /// `require-backend-tls = true`).
    pub backend_tls: bool,
}

impl ProxyOptions {
    /// The proxy's TOML config for one backend; generated files (the
    /// auto-certs) go to `workdir`.
    pub fn config_toml(&self, backend: SocketAddr, workdir: &std::path::Path) -> String {
        let mut toml = format!(
            "workdir = {workdir:?}\n\n[proxy]\naddr = \"127.0.0.1:0\"\npd-addrs = \"\"\nbackend-addrs = [\"{backend}\"]\n\n\
             [api]\naddr = \"127.0.0.1:0\"\n"
        );
        if self.client_tls || self.backend_tls {
            toml += "\n[security]\n";
        }
        if self.client_tls {
            toml += "server-tls = { auto-certs = true }\n";
        }
        if self.backend_tls {
            toml += "sql-tls = { skip-ca = true }\nrequire-backend-tls = true\n";
        }
        toml
    }
}

/// True when scenarios run through the real proxy, not the stand-in relay.
pub const REAL_PROXY: bool = cfg!(feature = "proxy");

/// A running proxy (or the stand-in relay).
#[derive(Debug)]
pub struct Proxy {
    inner: Inner,
    /// The proxy's workdir, removed after shutdown.
    _workdir: tempfile::TempDir,
}

#[cfg(feature = "proxy")]
type Inner = tiproxy_runtime::Proxy;

#[cfg(not(feature = "proxy"))]
type Inner = relay::Relay;

impl Proxy {
    /// Starts a proxy in front of `backend`; returns once it listens.
    pub async fn start(backend: SocketAddr, options: ProxyOptions) -> Result<Proxy, ProxyError> {
        let workdir = tempfile::Builder::new()
            .prefix("tiproxy-conformance-proxy-")
            .tempdir()
            .map_err(|err| ProxyError::Start(format!("creating a workdir: {err}")))?;
        #[cfg(feature = "proxy")]
        {
            let toml = options.config_toml(backend, workdir.path());
            let (config, warnings) = tiproxy_runtime::config::Config::from_toml(
                &toml,
                std::path::Path::new("conformance.toml"),
            )
            .map_err(|err| ProxyError::Config(err.to_string()))?;
            if !warnings.is_empty() {
                return Err(ProxyError::Config(format!(
                    "unexpected config warnings: {warnings:?}"
                )));
            }
            let inner = tiproxy_runtime::start(config)
                .await
                .map_err(|err| ProxyError::Start(err.to_string()))?;
            Ok(Proxy {
                inner,
                _workdir: workdir,
            })
        }
        #[cfg(not(feature = "proxy"))]
        {
            let _ = options;
            let inner = relay::Relay::start(backend)
                .await
                .map_err(|err| ProxyError::Start(err.to_string()))?;
            Ok(Proxy {
                inner,
                _workdir: workdir,
            })
        }
    }

    /// Where clients connect.
    pub fn sql_addr(&self) -> SocketAddr {
        self.inner.sql_addr()
    }

    /// Stops listening and closes every connection.
    pub async fn shutdown(self) {
        self.inner.shutdown().await;
    }
}

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The generated config was rejected or produced warnings.
    #[error("proxy config: {0}")]
    Config(String),
    /// The proxy failed to start.
    #[error("starting the proxy: {0}")]
    Start(String),
}

#[cfg(not(feature = "proxy"))]
mod relay {
    //! A byte relay: one backend connection per client connection, bytes
    //! copied both ways unchanged.

    use std::net::SocketAddr;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    #[derive(Debug)]
    pub struct Relay {
        addr: SocketAddr,
        accept: JoinHandle<()>,
    }

    impl Relay {
        pub async fn start(backend: SocketAddr) -> std::io::Result<Relay> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let accept = tokio::spawn(async move {
                // Connection tasks live in this set so that aborting the
                // accept task closes them all.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    connections.spawn(async move {
                        let Ok(mut server) = TcpStream::connect(backend).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                    while connections.try_join_next().is_some() {}
                }
            });
            Ok(Relay { addr, accept })
        }

        pub fn sql_addr(&self) -> SocketAddr {
            self.addr
        }

        pub async fn shutdown(self) {
            self.accept.abort();
            let _ = self.accept.await;
        }
    }
}
