//! tiproxy-runtime: drives [`tiproxy_core`] sessions over real (or
//! simulated) sockets, and ships the `tiproxy` and `tiproxyctl` binaries.
//!
//! The runtime is generic over the network ([`net::Network`]) so the
//! simulation runs this same code over turmoil. Time comes from tokio's
//! clock, which turmoil drives in simulation.

pub mod api;
pub mod balance;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod flood;
pub mod ha;
pub mod health;
pub mod http_client;
pub mod keepalive;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod pd;
pub mod proxy;
pub mod proxy_header;
pub mod reload;
pub mod router;
pub mod state;
pub mod takeover;
pub mod task;
pub mod tls;
pub mod traffic;
pub mod workers;

pub use proxy::{Proxy, StartError, start, start_on, start_takeover};

/// `<version> (git <hash>)` of this build.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TIPROXY_GIT_HASH"),
    ")"
);

/// What `--version` prints after the binary's name: [`VERSION`], then how
/// the binary was built, one fact a line (see `build.rs`). `glibc` is the
/// oldest glibc it runs on: `2.17` for `make dist`, `host` (the build
/// machine's) otherwise.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TIPROXY_GIT_HASH"),
    ")\nbuild time: ",
    env!("TIPROXY_BUILD_TIME"),
    "\nrustc:      ",
    env!("TIPROXY_RUSTC_VERSION"),
    "\ntarget:     ",
    env!("TIPROXY_TARGET"),
    "\nglibc:      ",
    env!("TIPROXY_GLIBC"),
);
