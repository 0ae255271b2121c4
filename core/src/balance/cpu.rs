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

#[cfg(test)]
mod tests {
    use super::*;

    /// Any instant: the tests only use offsets from it.
    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn use_is_counter_growth_over_time_and_processors() {
        let t0 = t0();
        let mut m = CpuMeter::default();
        m.record(100.0, 4.0, 3, t0);
        assert_eq!(m.sample(t0), None, "one read is no rate");
        // Too soon: no sample, and the first point is kept.
        m.record(100.1, 4.0, 3, t0 + Duration::from_millis(500));
        assert_eq!(m.sample(t0), None);
        // 2 CPU-seconds over 2 s on 4 processors: 25%.
        m.record(102.0, 4.0, 5, t0 + Duration::from_secs(2));
        let s = m.sample(t0 + Duration::from_secs(2)).unwrap();
        assert!((s.usage - 0.25).abs() < 1e-9, "{s:?}");
        assert_eq!(s.sessions, 5);
    }

    #[test]
    fn a_restart_starts_over_and_old_samples_expire() {
        let t0 = t0();
        let mut m = CpuMeter::default();
        m.record(100.0, 1.0, 1, t0);
        m.record(101.0, 1.0, 1, t0 + Duration::from_secs(1));
        assert!(m.sample(t0 + Duration::from_secs(1)).is_some());
        // The counter went back: a new interval starts; the old sample stays
        // until it expires.
        m.record(1.0, 1.0, 1, t0 + Duration::from_secs(2));
        m.record(1.5, 1.0, 1, t0 + Duration::from_secs(3));
        let s = m.sample(t0 + Duration::from_secs(3)).unwrap();
        assert!((s.usage - 0.5).abs() < 1e-9, "{s:?}");
        let late = t0 + Duration::from_secs(3) + CPU_METRICS_EXPIRY + Duration::from_secs(1);
        assert_eq!(m.sample(late), None);
        // Use is clamped to the processors there are.
        m.record(1000.0, 1.0, 1, late + Duration::from_secs(1));
        assert_eq!(m.sample(late + Duration::from_secs(1)).unwrap().usage, 1.0);
    }
}
