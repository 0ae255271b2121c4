//! Unit tests of `core::balance::cpu` (included with `#[path]`).
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
