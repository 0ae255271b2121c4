//! tiproxy-sim: the proxy's world in miniature.
//!
//! - [`tidb`]: the TiDB double (runs on real TCP and on any
//!   [`tiproxy_runtime::net::Network`]).
//! - [`net::TurmoilNet`]: the network seam over turmoil, so the real proxy
//!   runtime runs in a deterministic simulation.
//! - [`pd`]: the PD double, on its own host, and the proxy's way to it.
//! - [`scenario`], [`run`], [`workload`], [`world`]: seed-derived runs of
//!   the whole proxy with TiDB doubles, faults and client workloads,
//!   checked against named invariants (`cargo run -p tiproxy-sim -- --seed N`).

pub mod ha;
pub mod net;
pub mod pd;
pub mod run;
pub mod scenario;
pub mod tidb;
pub mod workload;
pub mod world;
