//! tiproxy-conformance: mysql_async scenarios run directly against a real
//! server and through the proxy, with results compared.
//!
//! Not built yet. What is missing (issue 3): the MariaDB harness and the
//! scenarios. The core's golden tests (`core/tests/golden.rs`) already replay
//! real MariaDB 10.11 sessions through the session state machine.
