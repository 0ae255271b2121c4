//! tiproxy-tests: end-to-end scenarios with real processes.
//!
//! Not built yet. What is missing (issues 3 to 5): the proxy binary, TiDB
//! doubles and real etcd driven by scenarios.
