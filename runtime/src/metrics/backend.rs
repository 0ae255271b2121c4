//! One backend's series, resolved once: a [`crate::router::Backend`] holds
//! its [`BackendMetrics`], so a connection counts a command or its traffic
//! without looking a label up. And [`PendingMove`], a move under way as
//! `tiproxy_balance_pending_migrate` counts it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{Histogram, IntCounter, IntGauge};
use tiproxy_core::Command;

use super::{COMMAND_SLOTS, Metrics, clock_us, cmd_type, metrics};

/// The handles of one backend's series. Per-command series are created on
/// a command's first use, as TiProxy does: a scrape lists the commands a
/// backend served, not 32 empty histograms per backend.
#[derive(Debug)]
pub struct BackendMetrics {
    addr: String,
    queries: [OnceLock<(IntCounter, Histogram)>; COMMAND_SLOTS],
    in_bytes: IntCounter,
    in_packets: IntCounter,
    out_bytes: IntCounter,
    out_packets: IntCounter,
    /// Whether the backend is outside the proxy's zone (kept by the
    /// balance loop, which knows both zones).
    cross_location: AtomicBool,
}

impl BackendMetrics {
    pub(super) fn new(m: &Metrics, addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            queries: std::array::from_fn(|_| OnceLock::new()),
            in_bytes: m.inbound_bytes.with_label_values(&[addr]),
            in_packets: m.inbound_packets.with_label_values(&[addr]),
            out_bytes: m.outbound_bytes.with_label_values(&[addr]),
            out_packets: m.outbound_packets.with_label_values(&[addr]),
            cross_location: AtomicBool::new(false),
        }
    }

    /// Counts one finished command and its latency.
    #[inline]
    pub fn query(&self, cmd: Command, seconds: f64) {
        let series = || {
            let m = metrics();
            let t = cmd_type(cmd);
            (
                m.query_total.with_label_values(&[&self.addr, t]),
                m.query_duration.with_label_values(&[&self.addr, t]),
            )
        };
        let fresh;
        let (c, h) = match self.queries.get(usize::from(cmd.to_byte())) {
            Some(slot) => slot.get_or_init(series),
            None => {
                fresh = series();
                &fresh
            }
        };
        c.inc();
        h.observe(seconds);
    }

    /// A client's handshake through this backend ended after `seconds`.
    pub fn handshake(&self, seconds: f64) {
        metrics()
            .handshake_duration
            .with_label_values(&[&self.addr])
            .observe(seconds);
    }

    /// Counts bytes and packets read from the backend.
    #[inline]
    pub fn inbound(&self, bytes: usize, packets: u64) {
        self.in_bytes.inc_by(bytes as u64);
        if packets > 0 {
            self.in_packets.inc_by(packets);
        }
        self.cross_location(bytes);
    }

    /// Counts bytes and packets written to the backend.
    #[inline]
    pub fn outbound(&self, bytes: usize, packets: u64) {
        self.out_bytes.inc_by(bytes as u64);
        if packets > 0 {
            self.out_packets.inc_by(packets);
        }
        self.cross_location(bytes);
    }

    #[inline]
    fn cross_location(&self, bytes: usize) {
        if self.cross_location.load(Ordering::Relaxed) {
            metrics().cross_location_bytes.inc_by(bytes as u64);
        }
    }

    /// Whether the backend is outside the proxy's zone.
    pub fn set_cross_location(&self, cross: bool) {
        self.cross_location.store(cross, Ordering::Relaxed);
    }
}

/// A move a session accepted and has not finished: one in
/// `tiproxy_balance_pending_migrate{from, to, reason}` while it lives (the
/// gauge drops when it does, however the move or the session ends).
#[derive(Debug)]
pub struct PendingMove {
    from: String,
    to: String,
    reason: &'static str,
    started_us: u64,
    gauge: IntGauge,
}

impl PendingMove {
    /// A move from `from` to `to` for `reason` (a balance factor's name, or
    /// `api` for `/api/debug/redirect`) starts now.
    pub fn start(from: &str, to: &str, reason: &'static str) -> Self {
        let gauge = metrics()
            .pending_migrate
            .with_label_values(&[from, to, reason]);
        gauge.inc();
        Self {
            from: from.to_string(),
            to: to.to_string(),
            reason,
            started_us: clock_us(),
            gauge,
        }
    }

    /// Why the move was asked.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The move ended (`succeeded` or not): counted with its duration.
    pub fn finish(self, succeeded: bool) {
        let res = if succeeded { "succeed" } else { "fail" };
        let m = metrics();
        m.migrate
            .with_label_values(&[&self.from, &self.to, self.reason, res])
            .inc();
        let seconds = clock_us().saturating_sub(self.started_us) as f64 / 1e6;
        m.migrate_duration
            .with_label_values(&[&self.from, &self.to, res])
            .observe(seconds);
    }
}

impl Drop for PendingMove {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
