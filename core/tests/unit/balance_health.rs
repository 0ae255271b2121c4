//! Unit tests of `core::balance::health` (included with `#[path]`).
use super::*;

/// Any instant: the tests only use offsets from it.
#[allow(clippy::disallowed_methods)]
fn t0() -> Instant {
    Instant::now()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A read with PD counters `pd` (failed, ok) and TiKV counters `kv`.
fn read(pd: (f64, f64), kv: (f64, f64)) -> HealthReading {
    HealthReading([(Some(pd.0), Some(pd.1)), (Some(kv.0), Some(kv.1))])
}

#[test]
fn parses_tidbs_series() {
    let text = b"pd_client_cmd_handle_failed_cmds_duration_seconds_count{type=\"tso\"} 4\n\
pd_client_cmd_handle_cmds_duration_seconds_count{type=\"tso\"} 40\n\
pd_client_cmd_handle_cmds_duration_seconds_count{type=\"get_region\"} 1000\n\
tidb_tikvclient_backoff_seconds_count{type=\"tikvRPC\"} 2\n\
tidb_tikvclient_backoff_seconds_count{type=\"regionMiss\"} 50\n\
tidb_tikvclient_request_seconds_count{store=\"1\",type=\"Get\"} 7\n\
tidb_tikvclient_request_seconds_count{store=\"2\",type=\"Cop\"} 3\n";
    assert_eq!(HealthReading::parse(text), read((4.0, 40.0), (2.0, 10.0)));
    assert!(HealthReading::parse(b"process_cpu_seconds_total 1\n").is_empty());
}

#[test]
fn levels_follow_tiproxys_thresholds() {
    let t0 = t0();
    let level = |pd_fail: f64, pd_ok: f64, kv_fail: f64, kv_total: f64| {
        let mut m = HealthMeter::default();
        m.record(read((0.0, 0.0), (0.0, 0.0)), t0);
        m.record(read((pd_fail, pd_ok), (kv_fail, kv_total)), t0 + secs(15));
        m.level(t0 + secs(15))
    };
    assert_eq!(level(0.0, 100.0, 0.0, 100.0), HealthLevel::Normal);
    assert_eq!(
        level(10.0, 100.0, 0.0, 100.0),
        HealthLevel::Normal,
        "0.1 recovers"
    );
    assert_eq!(level(20.0, 100.0, 0.0, 100.0), HealthLevel::Degraded);
    assert_eq!(level(50.0, 100.0, 0.0, 100.0), HealthLevel::Failing);
    assert_eq!(
        level(0.0, 100.0, 30.0, 100.0),
        HealthLevel::Failing,
        "TiKV fails at 0.3"
    );
    assert_eq!(level(0.0, 100.0, 29.0, 100.0), HealthLevel::Degraded);
    assert_eq!(
        level(3.0, 0.0, 0.0, 0.0),
        HealthLevel::Failing,
        "failures and no successes"
    );
    assert_eq!(level(0.0, 0.0, 0.0, 0.0), HealthLevel::Normal, "idle");
}

#[test]
fn only_the_last_two_minutes_count_and_stale_reads_are_normal() {
    let t0 = t0();
    let mut m = HealthMeter::default();
    m.record(read((0.0, 0.0), (0.0, 0.0)), t0);
    assert_eq!(m.level(t0), HealthLevel::Normal, "one read is no increase");
    m.record(read((100.0, 10.0), (0.0, 0.0)), t0 + secs(10));
    let j = m.judge(t0 + secs(10));
    assert_eq!(j.level, HealthLevel::Failing);
    assert_eq!(j.indicator, Some("failure_pd"));
    assert_eq!((j.failures, j.total), (100.0, 10.0));
    // It recovers: only successes from here on. Once the failing burst has
    // left the window, the level is normal again.
    for s in (20..=140).step_by(10) {
        m.record(
            read((100.0, 10.0 + s as f64 * 10.0), (0.0, 0.0)),
            t0 + secs(s),
        );
    }
    assert_eq!(m.level(t0 + secs(140)), HealthLevel::Normal);
    // Failing again, then the metrics stop: after a minute it is normal.
    m.record(read((1000.0, 1410.0), (0.0, 0.0)), t0 + secs(150));
    assert_eq!(m.level(t0 + secs(150)), HealthLevel::Failing);
    assert_eq!(m.level(t0 + secs(211)), HealthLevel::Normal);
}

#[test]
fn a_restart_resets_nothing_into_failure() {
    let t0 = t0();
    let mut m = HealthMeter::default();
    m.record(read((500.0, 1000.0), (0.0, 0.0)), t0);
    m.record(read((0.0, 5.0), (0.0, 0.0)), t0 + secs(10));
    assert_eq!(
        m.level(t0 + secs(10)),
        HealthLevel::Normal,
        "counters went back"
    );
}

#[test]
fn readings_are_bounded() {
    let t0 = t0();
    let mut m = HealthMeter::default();
    for i in 0..1000u64 {
        m.record(
            read((0.0, i as f64), (0.0, 0.0)),
            t0 + Duration::from_millis(i),
        );
    }
    assert!(m.readings.len() <= MAX_READINGS);
}
