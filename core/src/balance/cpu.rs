//! A backend's CPU use from its `/metrics` counters: the growth of
//! `process_cpu_seconds_total` between two reads over its processors
//! (`tidb_server_maxprocs`), with the sessions it had then, so the planner
//! can estimate its use between reads (see [`super::plan`]).

use std::time::{Duration, Instant};

use super::CpuSample;

/// CPU use older than this is not used (TiProxy's expiry).
pub const CPU_METRICS_EXPIRY: Duration = Duration::from_secs(120);

/// Reads closer together than this do not make a sample: the counter's
/// resolution would make the use jump.
pub const CPU_MIN_READ_INTERVAL: Duration = Duration::from_secs(1);

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuMeter {
    /// The counter at the last read that started an interval, and when.
    total: Option<(f64, Instant)>,
    /// The use over the last interval, and when it was computed.
    sample: Option<(CpuSample, Instant)>,
}

impl CpuMeter {
    /// Records a read at `now`: `cpu_seconds` of the counter, `maxprocs`
    /// processors, `sessions` sessions on the backend.
    pub fn record(&mut self, cpu_seconds: f64, maxprocs: f64, sessions: u32, now: Instant) {
        match self.total {
            Some((prev, at)) if cpu_seconds >= prev && now >= at + CPU_MIN_READ_INTERVAL => {
                let secs = (now - at).as_secs_f64();
                let usage = ((cpu_seconds - prev) / secs / maxprocs).clamp(0.0, 1.0);
                self.sample = Some((CpuSample { usage, sessions }, now));
                self.total = Some((cpu_seconds, now));
            }
            // Too soon to tell: keep the older point.
            Some((prev, _)) if cpu_seconds >= prev => {}
            // First read, or the counter went back (a restart).
            _ => self.total = Some((cpu_seconds, now)),
        }
    }

    /// The last sample, unless older than [`CPU_METRICS_EXPIRY`] at `now`.
    pub fn sample(&self, now: Instant) -> Option<CpuSample> {
        self.sample
            .filter(|(_, at)| now.saturating_duration_since(*at) <= CPU_METRICS_EXPIRY)
            .map(|(c, _)| c)
    }
}

// The tests read the clock (for a base instant), so they live outside
// core/src, which must not.
#[cfg(test)]
#[path = "../../tests/unit/balance_cpu.rs"]
mod tests;
