//! One test per rule, with time passed in.
#![allow(clippy::disallowed_methods)] // tests play the driver: they own the clock

use std::time::{Duration, Instant};

use super::*;

const CFG: HealthConfig = HealthConfig {
    failure_threshold: 3,
    failed_pause: FAILED_BACKEND_PAUSE,
};
const DOWN: Result<u16, CheckFailure> = Err(CheckFailure::Backend);
const PROBE_DOWN: Result<(), CheckFailure> = Err(CheckFailure::Backend);
const EMFILE: LocalExhaustion = LocalExhaustion::ProcessFds { limit: Some(64) };

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A TiDB whose status port answered 200 once.
fn serving(t0: Instant) -> BackendHealth {
    let mut h = BackendHealth::new(true);
    let _ = h.handle_status(t0, Ok(200), &CFG);
    assert!(h.accepts(t0));
    h
}

#[test]
fn a_discovered_backend_is_unknown_until_its_status_port_answers() {
    // Seed 2957: a TiDB announced late, already draining, was a move target.
    let t0 = Instant::now();
    let mut h = BackendHealth::new(true);
    assert!(!h.is_known());
    assert_eq!(h.why_not(t0), Some(NotAccepting::Unknown));
    assert!(h.reachable(t0), "better than no backend at all");
    let _ = h.handle_status(t0, Ok(500), &CFG);
    assert!(h.is_known());
    assert_eq!(h.why_not(t0), Some(NotAccepting::Draining));
    assert!(!h.reachable(t0));
}

#[test]
fn configured_backends_and_backends_without_status_port_are_known() {
    let t0 = Instant::now();
    assert!(BackendHealth::configured(true).accepts(t0));
    assert!(BackendHealth::new(false).accepts(t0));
}

#[test]
fn status_other_than_200_drains_and_200_ends_it_with_one_transition_each() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    let o = h.handle_status(t0, Ok(500), &CFG);
    assert_eq!(o.transition, Some(Transition::DrainStarted { code: 500 }));
    assert!(h.is_draining() && !h.accepts(t0));
    assert_eq!(h.handle_status(t0 + ms(10), Ok(500), &CFG).transition, None);
    let o = h.handle_status(t0 + ms(20), Ok(200), &CFG);
    assert_eq!(o.transition, Some(Transition::DrainEnded));
    assert!(h.accepts(t0 + ms(20)));
}

#[test]
fn an_unreachable_status_port_fails_the_backend_at_the_threshold() {
    // Seed 27: a drain moved sessions to a TiDB that had crashed.
    let t0 = Instant::now();
    let mut h = serving(t0);
    assert_eq!(h.handle_status(t0, DOWN, &CFG).transition, None);
    assert_eq!(h.handle_status(t0, DOWN, &CFG).transition, None);
    assert!(h.accepts(t0), "two failures are below the threshold");
    let o = h.handle_status(t0, DOWN, &CFG);
    assert_eq!(o.transition, Some(Transition::StatusUnreachable));
    assert!(matches!(h.why_not(t0), Some(NotAccepting::Failed { .. })));
    // Told once: the next failure extends the pause silently.
    assert_eq!(h.handle_status(t0 + ms(100), DOWN, &CFG).transition, None);
    assert!(!h.accepts(t0 + ms(100) + FAILED_BACKEND_PAUSE - ms(1)));
}

#[test]
fn a_failed_backend_is_tried_again_after_the_pause() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    let _ = h.handle_dial(t0, Dial::Failed, &CFG);
    assert!(!h.accepts(t0 + FAILED_BACKEND_PAUSE - ms(1)));
    assert!(h.accepts(t0 + FAILED_BACKEND_PAUSE));
    assert!(h.is_failed(), "still failed until something clears it");
}

#[test]
fn a_failed_dial_pauses_at_once_and_a_successful_one_clears() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    let o = h.handle_dial(t0, Dial::Failed, &CFG);
    assert_eq!(o.transition, Some(Transition::Paused));
    assert!(!h.accepts(t0));
    let o = h.handle_dial(t0 + ms(5), Dial::Connected, &CFG);
    assert_eq!(o.transition, Some(Transition::Recovered));
    assert!(h.accepts(t0 + ms(5)));
}

#[test]
fn the_probe_fails_the_backend_at_the_threshold_and_a_greeting_clears_it() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    let _ = h.handle_probe(t0, PROBE_DOWN, &CFG);
    let _ = h.handle_probe(t0, PROBE_DOWN, &CFG);
    assert!(h.accepts(t0));
    let o = h.handle_probe(t0, PROBE_DOWN, &CFG);
    assert_eq!(o.transition, Some(Transition::ProbeFailed));
    assert!(!h.accepts(t0));
    let o = h.handle_probe(t0 + ms(1), Ok(()), &CFG);
    assert_eq!(o.transition, Some(Transition::Recovered));
    assert!(h.accepts(t0 + ms(1)));
}

#[test]
fn a_probe_failure_of_a_draining_backend_is_not_announced() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    let _ = h.handle_status(t0, Ok(500), &CFG);
    for _ in 0..2 {
        let _ = h.handle_probe(t0, PROBE_DOWN, &CFG);
    }
    assert_eq!(h.handle_probe(t0, PROBE_DOWN, &CFG).transition, None);
    assert!(h.is_failed());
}

#[test]
fn a_probe_or_dial_does_not_overrule_a_failing_status_port() {
    // Seed 88: a partition hid a graceful shutdown; a held probe got
    // through first when it healed.
    let t0 = Instant::now();
    let mut h = serving(t0);
    for _ in 0..3 {
        let _ = h.handle_status(t0, DOWN, &CFG);
    }
    assert_eq!(h.handle_probe(t0 + ms(1), Ok(()), &CFG).transition, None);
    assert_eq!(
        h.handle_dial(t0 + ms(2), Dial::Connected, &CFG).transition,
        None
    );
    assert!(!h.accepts(t0 + ms(2)));
    assert!(h.is_failed());
    // Only /status brings it back.
    let o = h.handle_status(t0 + ms(3), Ok(200), &CFG);
    assert_eq!(o.transition, Some(Transition::Recovered));
    assert!(h.accepts(t0 + ms(3)));
}

#[test]
fn without_a_status_port_a_probe_brings_a_backend_back() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(false);
    let _ = h.handle_dial(t0, Dial::Failed, &CFG);
    let o = h.handle_probe(t0 + ms(1), Ok(()), &CFG);
    assert_eq!(o.transition, Some(Transition::Recovered));
}

#[test]
fn a_status_answer_while_the_probe_fails_asks_for_a_probe_now() {
    // Seed 1603: a restarted TiDB waited up to a probe interval.
    let t0 = Instant::now();
    let mut h = serving(t0);
    for _ in 0..3 {
        let _ = h.handle_status(t0, DOWN, &CFG);
        let _ = h.handle_probe(t0, PROBE_DOWN, &CFG);
    }
    let o = h.handle_status(t0 + ms(500), Ok(200), &CFG);
    assert!(o.probe_now);
    assert_eq!(o.transition, None, "not back before its SQL port answers");
    assert!(!h.accepts(t0 + ms(500)));
    let o = h.handle_probe(t0 + ms(501), Ok(()), &CFG);
    assert_eq!(o.transition, Some(Transition::Recovered));
    assert!(h.accepts(t0 + ms(501)));
}

#[test]
fn a_status_answer_with_a_passing_probe_asks_for_no_probe() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    assert!(!h.handle_status(t0, Ok(200), &CFG).probe_now);
}

#[test]
fn local_exhaustion_changes_nothing() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    for _ in 0..10 {
        assert_eq!(
            h.handle_dial(t0, Dial::Local(EMFILE), &CFG),
            Outcome::default()
        );
        let o = h.handle_status(t0, Err(CheckFailure::Local(EMFILE)), &CFG);
        assert_eq!(o, Outcome::default());
        let o = h.handle_probe(t0, Err(CheckFailure::Local(EMFILE)), &CFG);
        assert_eq!(o, Outcome::default());
    }
    assert!(h.accepts(t0) && !h.is_failed());
    // Nor does it count towards the threshold of real failures.
    let _ = h.handle_status(t0, DOWN, &CFG);
    let _ = h.handle_status(t0, DOWN, &CFG);
    assert!(h.accepts(t0));
}

#[test]
fn operator_drain_and_removal_stop_new_sessions() {
    let t0 = Instant::now();
    let mut h = serving(t0);
    h.set_manual_drain(true);
    assert_eq!(h.why_not(t0), Some(NotAccepting::ManuallyDrained));
    h.set_manual_drain(false);
    h.set_removed(true);
    assert_eq!(h.why_not(t0), Some(NotAccepting::Removed));
    h.set_removed(false);
    assert!(h.accepts(t0));
}

#[test]
fn errno_classification() {
    let lim = Some(1024);
    assert_eq!(
        LocalExhaustion::from_errno(24, lim),
        Some(LocalExhaustion::ProcessFds { limit: lim })
    );
    assert_eq!(
        LocalExhaustion::from_errno(23, lim),
        Some(LocalExhaustion::SystemFds)
    );
    assert_eq!(
        LocalExhaustion::from_errno(105, lim),
        Some(LocalExhaustion::Memory)
    );
    assert_eq!(
        LocalExhaustion::from_errno(12, lim),
        Some(LocalExhaustion::Memory)
    );
    // ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH: the backend's business.
    for e in [111, 110, 113] {
        assert_eq!(LocalExhaustion::from_errno(e, lim), None);
    }
    let m = LocalExhaustion::ProcessFds { limit: lim }.to_string();
    assert!(
        m.contains("file descriptors") && m.contains("RLIMIT_NOFILE 1024"),
        "{m}"
    );
}

#[test]
fn a_flood_of_refusals_is_one_line_a_second_with_a_count() {
    let t0 = Instant::now();
    let mut log = ExhaustionLog::default();
    assert_eq!(
        log.refused(t0, EMFILE),
        Some((1, EMFILE)),
        "the first at once"
    );
    assert_eq!(log.next_due(), None, "nothing unreported");
    let mut lines = 0;
    let mut counted = 1;
    for i in 1..3500u64 {
        // 3499 more refusals over 3.5 s.
        if let Some((n, _)) = log.refused(t0 + ms(i), EMFILE) {
            lines += 1;
            counted += n;
        }
    }
    assert_eq!(lines, 3, "at 1, 2 and 3 s");
    assert_eq!(
        log.next_due(),
        Some(t0 + ms(4000)),
        "the rest a second after the last line"
    );
    assert_eq!(log.poll(t0 + ms(3999)), None);
    let rest = log.poll(t0 + ms(4000)).map_or(0, |(n, _)| n);
    assert_eq!(rest, 499);
    assert_eq!(counted + rest, 3500, "every refusal counted once");
    assert_eq!(log.poll(t0 + ms(9000)), None, "nothing left to say");
}
