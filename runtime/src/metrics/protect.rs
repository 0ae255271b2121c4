//! Crash protection's families (our own, TiProxy has no such feature):
//! `tiproxy_session_restore_total{result}`, what happened to each
//! established session whose backend was lost while protection was on,
//! and `tiproxy_session_protected`, the sessions that hold a state copy a
//! restore could use now.

use prometheus::{IntCounterVec, IntGauge};

use super::Registrar;

/// The handles of crash protection's families.
#[derive(Debug, Clone)]
pub struct ProtectMetrics {
    /// Backend losses under a session, by `result`: `ok`, `failed`, or
    /// `unprotected_<why>` (busy, stale, expired, too_large, off).
    pub restore: IntCounterVec,
    /// Sessions holding a usable state copy.
    pub protected: IntGauge,
}

impl ProtectMetrics {
    pub(super) fn register(r: &mut Registrar) -> Self {
        Self {
            restore: r.counter_vec(
                "tiproxy_session_restore_total",
                "Sessions whose backend was lost with crash protection on, by what happened: ok (continued on another backend), failed (a restore was tried and failed), unprotected_* (closed as the server closed it, and why).",
                &["result"],
            ),
            protected: r.int_gauge(
                "tiproxy_session_protected",
                "Sessions holding a state copy that would let them survive their TiDB's crash.",
            ),
        }
    }
}
