//! tiproxy-sim: the proxy's world in miniature.
//!
//! Built so far: [`tidb`], the TiDB double (runs on real TCP and on any
//! [`tiproxy_runtime::net::Network`]). Still missing: the PD double,
//! seed-derived turmoil scenarios and invariant checks.

pub mod tidb;
