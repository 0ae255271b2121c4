//! A backend's health from its own error counters, TiProxy's `health`
//! factor: how often TiDB fails towards PD (TSO requests) and towards TiKV
//! (RPC backoffs), over the last two minutes of `/metrics` reads.
//!
//! For each indicator the increase of the failure counter over the window
//! is compared with the increase of its total counter. A ratio at or below
//! the recover threshold is normal, at or above the fail threshold failing,
//! between the two "in between" (TiProxy's value ranges). Failures with no
//! successes at all count as failing. The backend's level is the worst of
//! its indicators. Readings older than a minute are not used: a backend
//! whose metrics stopped is taken as normal, as TiProxy does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window over which counters increase (TiProxy: `[2m]`).
pub const HEALTH_WINDOW: Duration = Duration::from_secs(120);

/// A level whose newest reading is older than this is not used (TiProxy's
/// `errMetricExpDuration`).
pub const HEALTH_METRICS_EXPIRY: Duration = Duration::from_secs(60);

/// Readings kept per backend at most (a read per second fills the window
/// 1.07 times over); older ones are dropped first.
const MAX_READINGS: usize = 128;

/// One error indicator: a failure counter over a total counter, each a
/// TiDB series summed over the samples whose `type` label matches (any
/// `type` when empty).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Indicator {
    /// TiProxy's name for it (`failure_pd`, `failure_tikv`), for logs.
    pub name: &'static str,
    /// The failure counter and its `type`.
    pub failure: (&'static str, &'static str),
    /// The total counter and its `type`.
    pub total: (&'static str, &'static str),
    /// Failures over total at or above which the backend is failing.
    pub fail_threshold: f64,
    /// Failures over total at or below which the backend is normal.
    pub recover_threshold: f64,
}

/// TiProxy's indicators (`pkg/balance/factor/factor_health.go`).
pub const HEALTH_INDICATORS: [Indicator; 2] = [
    // Lost contact with PD: failed TSO requests over successful ones.
    Indicator {
        name: "failure_pd",
        failure: (
            "pd_client_cmd_handle_failed_cmds_duration_seconds_count",
            "tso",
        ),
        total: ("pd_client_cmd_handle_cmds_duration_seconds_count", "tso"),
        fail_threshold: 0.5,
        recover_threshold: 0.1,
    },
    // Lost contact with TiKV: RPC backoffs over requests.
    Indicator {
        name: "failure_tikv",
        failure: ("tidb_tikvclient_backoff_seconds_count", "tikvRPC"),
        total: ("tidb_tikvclient_request_seconds_count", ""),
        fail_threshold: 0.3,
        recover_threshold: 0.1,
    },
];

/// A backend's health, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum HealthLevel {
    /// No indicator above its recover threshold (or no data).
    #[default]
    Normal = 0,
    /// Some indicator between its thresholds.
    Degraded = 1,
    /// Some indicator at or above its fail threshold.
    Failing = 2,
}

/// The counters of one `/metrics` read, in [`HEALTH_INDICATORS`] order:
/// `(failures, total)`, each `None` when the series is absent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HealthReading(pub [(Option<f64>, Option<f64>); 2]);

impl HealthReading {
    /// Reads the counters from a Prometheus text exposition.
    pub fn parse(text: &[u8]) -> Self {
        let read = |(name, ty): (&str, &str)| {
            crate::prom::sum_by_label(text, name, "type", ty).filter(|v| *v >= 0.0)
        };
        Self(HEALTH_INDICATORS.map(|i| (read(i.failure), read(i.total))))
    }

    /// Whether any indicator's counters are present.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|(f, t)| f.is_none() || t.is_none())
    }
}

/// See the module documentation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthMeter {
    readings: VecDeque<(Instant, HealthReading)>,
}

/// What an indicator says: its level and the increases it judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// The worst level over the indicators.
    pub level: HealthLevel,
    /// The indicator that decided it (`None` when normal).
    pub indicator: Option<&'static str>,
    /// Its failures and total over the window.
    pub failures: f64,
    /// See `failures`.
    pub total: f64,
}

impl HealthMeter {
    /// Records a read at `now`; reads without any indicator are ignored.
    pub fn record(&mut self, r: HealthReading, now: Instant) {
        if r.is_empty() {
            return;
        }
        self.readings.push_back((now, r));
        while self.readings.len() > MAX_READINGS
            || self
                .readings
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > HEALTH_WINDOW)
        {
            self.readings.pop_front();
        }
    }

    /// The level at `now` (normal when the newest read is stale).
    pub fn level(&self, now: Instant) -> HealthLevel {
        self.judge(now).level
    }

    /// The level at `now` with what decided it.
    pub fn judge(&self, now: Instant) -> Judgement {
        let normal = Judgement {
            level: HealthLevel::Normal,
            indicator: None,
            failures: 0.0,
            total: 0.0,
        };
        let Some((last_at, _)) = self.readings.back() else {
            return normal;
        };
        if now.saturating_duration_since(*last_at) > HEALTH_METRICS_EXPIRY {
            return normal;
        }
        let mut worst = normal;
        for (k, ind) in HEALTH_INDICATORS.iter().enumerate() {
            let Some((failures, total)) = self.increase(k, now) else {
                continue;
            };
            let level = value_range(failures, total, ind);
            if level > worst.level {
                worst = Judgement {
                    level,
                    indicator: Some(ind.name),
                    failures,
                    total,
                };
            }
        }
        worst
    }

    /// Each indicator's failures and total over the window at `now` (what
    /// TiProxy exports as `failure_pd`, `total_pd`, ...).
    pub fn increases(&self, now: Instant) -> [Option<(f64, f64)>; 2] {
        [self.increase(0, now), self.increase(1, now)]
    }

    /// The growth of indicator `k`'s two counters between the oldest and
    /// the newest read in the window; `None` with fewer than two reads or
    /// when a counter went back (the TiDB restarted).
    fn increase(&self, k: usize, now: Instant) -> Option<(f64, f64)> {
        let mut inside = self
            .readings
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= HEALTH_WINDOW)
            .filter_map(|(_, r)| match r.0[k] {
                (Some(f), Some(t)) => Some((f, t)),
                _ => None,
            });
        let first = inside.next()?;
        let last = inside.next_back()?;
        let (f, t) = (last.0 - first.0, last.1 - first.1);
        (f >= 0.0 && t >= 0.0).then_some((f, t))
    }
}

/// TiProxy's `calcValueRange`.
fn value_range(failures: f64, total: f64, ind: &Indicator) -> HealthLevel {
    if failures == 0.0 {
        return HealthLevel::Normal;
    }
    if total == 0.0 {
        return HealthLevel::Failing;
    }
    let ratio = failures / total;
    if ratio <= ind.recover_threshold {
        HealthLevel::Normal
    } else if ratio >= ind.fail_threshold {
        HealthLevel::Failing
    } else {
        HealthLevel::Degraded
    }
}

// The tests read the clock (for a base instant), so they live outside
// core/src, which must not.
#[cfg(test)]
#[path = "../../tests/unit/balance_health.rs"]
mod tests;
