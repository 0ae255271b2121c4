//! tiproxy-conformance: mysql_async workloads run directly against a real
//! MariaDB and through the proxy, with everything a client can observe
//! compared.
//!
//! - [`mariadb`]: a throwaway MariaDB server (installed if missing, own
//!   datadir, port and TLS certificates, killed and removed on drop).
//! - [`certs`]: the test CA and server certificate it serves.
//! - [`proxy`]: the proxy under test, started in-process per scenario.
//! - [`outcome`]: what one client action produced (result sets, column
//!   metadata, OK fields, warnings, errors) and a readable diff of two runs.
//! - [`session`]: a recording client; scenarios are written against it.
//! - [`differential`]: runs one scenario directly and through the proxy,
//!   each on a fresh database, and fails with the first difference.
//!
//! Nothing here may change what the proxy sees beyond what a real client
//! sends: the comparison is only as good as the workload is ordinary.

pub mod certs;
pub mod differential;
pub mod mariadb;
pub mod outcome;
pub mod proxy;
pub mod session;

pub use differential::{Scenario, Side, Target, compare};
pub use mariadb::MariaDb;
pub use outcome::{Outcome, Step, Transcript};
pub use proxy::{Proxy, ProxyOptions};
pub use session::Session;
