//! Crash protection: the background state copy, its renewal, the restore
//! on another backend when the backend dies under an idle session, and
//! the never-replay rules.

use super::*;
use crate::session::protect::{ProtectConfig, Unprotected};

fn protected_cfg() -> SessionConfig {
    SessionConfig {
        protect: ProtectConfig {
            enabled: true,
            // Export at once; the quiet period's own tests set a delay.
            delay_ms: 0,
            ..ProtectConfig::default()
        },
        ..cfg()
    }
}

/// Answers the background SHOW SESSION_STATES; the client sees nothing.
fn answer_refresh(h: &mut Harness, states: &[u8]) {
    let q = h.recv_one(Leg::Backend);
    assert_eq!((q.seq, &q.data[..]), (0, &b"\x03SHOW SESSION_STATES"[..]));
    for (i, p) in states_result(states, TOKEN).iter().enumerate() {
        h.send(Leg::Backend, (i + 1) as u8, p);
    }
    assert!(
        h.recv(Leg::Client).is_empty(),
        "the copy is the proxy's own"
    );
}

/// An established, protected session (its first copy taken at login).
fn protected() -> Harness {
    let mut h = Harness::established(protected_cfg(), CLIENT_CAPS);
    assert!(!h.s.is_protected(h.now), "no copy before the first export");
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
    h
}

fn restore_outcomes(events: &[Event]) -> Vec<RestoreOutcome> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Restore { outcome } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

/// The restore's handshake and SET SESSION_STATES on the new backend.
fn restore_on_new_backend(h: &mut Harness) {
    assert!(
        h.take_actions()
            .iter()
            .any(|a| matches!(a, Action::PickRestoreTarget { .. })),
        "the driver is asked for another backend"
    );
    h.s.handle_restore_target(h.now, Some("tidb-2:4000".into()));
    h.pump();
    new_backend_handshake(h);
    h.send(Leg::NewBackend, 2, &ok(StatusFlags::AUTOCOMMIT));
    let set = h.recv_one(Leg::NewBackend);
    let expected = crate::migration::set_session_states_query(STATES, false);
    assert_eq!(&set.data[..], &expected[..], "the copy is imported");
    h.send(Leg::NewBackend, 1, &ok(StatusFlags::AUTOCOMMIT));
    assert!(h.actions.contains(&Action::SwapBackends {
        farewell: Bytes::new()
    }));
}

#[test]
fn an_idle_protected_session_is_restored_without_the_client_noticing() {
    let mut h = protected();
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "connection reset");
    h.pump();
    assert!(!h.s.is_closed());
    restore_on_new_backend(&mut h);
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Restored]
    );
    assert!(h.recv(Leg::Client).is_empty(), "the client hears nothing");
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

#[test]
fn a_command_that_waited_for_the_dead_backend_runs_after_the_restore() {
    let mut h = protected();
    // A renewal is under way when the client sends its next query.
    h.now += Duration::from_secs(31);
    h.s.handle_timeout(h.now);
    h.pump();
    let q = h.recv_one(Leg::Backend);
    assert_eq!(&q.data[..], b"\x03SHOW SESSION_STATES");
    h.send(Leg::Client, 0, b"\x03select 1");
    assert!(h.recv(Leg::Backend).is_empty(), "the query waits");
    h.s.handle_closed(h.now, Leg::Backend, "EOF");
    h.pump();
    restore_on_new_backend(&mut h);
    // The held query never reached the dead backend: it runs now, once.
    let got = h.recv_one(Leg::Backend);
    assert_eq!(&got.data[..], b"\x03select 1");
}

#[test]
fn a_state_change_is_copied_before_the_next_command() {
    let mut h = protected();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    assert!(!h.s.is_protected(h.now), "the copy is stale");
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
    // A plain read needs no new copy.
    h.send(Leg::Client, 0, b"\x03select 1");
    h.recv_one(Leg::Backend);
    for (i, p) in result_set(1).iter().enumerate() {
        h.send(Leg::Backend, (i + 1) as u8, p);
    }
    h.recv(Leg::Client);
    assert!(h.recv(Leg::Backend).is_empty(), "no export after a read");
    assert!(h.s.is_protected(h.now));
    // A read that assigns is a change.
    h.send(Leg::Client, 0, b"\x03select @b := 2");
    h.recv_one(Leg::Backend);
    for (i, p) in result_set(1).iter().enumerate() {
        h.send(Leg::Backend, (i + 1) as u8, p);
    }
    h.recv(Leg::Client);
    answer_refresh(&mut h, STATES);
}

fn result_set(rows: usize) -> Vec<Vec<u8>> {
    let mut v = vec![
        vec![1],
        b"\x03def\x00\x00\x00\x011\x00".to_vec(),
        eof(StatusFlags::AUTOCOMMIT),
    ];
    for _ in 0..rows {
        v.push(b"\x011".to_vec());
    }
    v.push(eof(StatusFlags::AUTOCOMMIT));
    v
}

#[test]
fn a_session_that_changed_since_its_copy_closes_as_the_server_did() {
    let mut h = protected();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    // The backend dies before the new copy arrives.
    h.recv_one(Leg::Backend);
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed());
    assert!(h.recv(Leg::Client).is_empty(), "nothing invented");
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Unprotected(Unprotected::Stale)]
    );
}

#[test]
fn a_statement_in_flight_is_never_replayed() {
    let mut h = protected();
    h.send(Leg::Client, 0, b"\x03update t set v = v + 1");
    h.recv_one(Leg::Backend);
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed());
    assert!(!h.take_actions().iter().any(|a| matches!(
        a,
        Action::PickRestoreTarget { .. } | Action::ConnectNewBackend { .. }
    )));
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Unprotected(Unprotected::Busy)]
    );
}

#[test]
fn a_session_in_a_transaction_is_not_restored() {
    let mut h = protected();
    h.query_ok("begin", StatusFlags::AUTOCOMMIT | StatusFlags::IN_TRANS);
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed());
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Unprotected(Unprotected::Busy)]
    );
}

#[test]
fn an_old_copy_is_renewed_and_an_expired_one_not_used() {
    let mut h = protected();
    let wake = h.s.poll_timeout().expect("renewal timer");
    assert_eq!(wake, h.now + Duration::from_secs(30));
    // In a transaction at renewal time: no export, the copy ages out.
    h.query_ok("begin", StatusFlags::AUTOCOMMIT | StatusFlags::IN_TRANS);
    assert!(
        h.recv(Leg::Backend).is_empty(),
        "no export inside a transaction"
    );
    h.query_ok(
        "insert into t values (1)",
        StatusFlags::AUTOCOMMIT | StatusFlags::IN_TRANS,
    );
    h.now += Duration::from_secs(51);
    h.s.handle_timeout(h.now);
    h.pump();
    assert!(h.recv(Leg::Backend).is_empty());
    assert!(!h.s.is_protected(h.now), "the copy aged out");
    h.query_ok("commit", StatusFlags::AUTOCOMMIT);
    // The commit is a change: a new copy at once.
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
}

#[test]
fn a_backend_that_cannot_export_is_never_asked_again() {
    let mut h = Harness::established(protected_cfg(), CLIENT_CAPS);
    h.recv_one(Leg::Backend);
    h.send(
        Leg::Backend,
        1,
        &err(1064, "You have an error in your SQL syntax"),
    );
    assert!(h.recv(Leg::Client).is_empty());
    assert!(h.take_events().iter().any(|e| matches!(
        e,
        Event::Unexportable {
            permanent: true,
            ..
        }
    )));
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    assert!(h.recv(Leg::Backend).is_empty(), "no second export");
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed());
}

#[test]
fn a_state_over_the_cap_is_unprotected() {
    let mut cfg = protected_cfg();
    cfg.protect.state_cap = 64;
    let mut h = Harness::established(cfg, CLIENT_CAPS);
    answer_refresh(&mut h, STATES);
    assert!(!h.s.is_protected(h.now));
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed());
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Unprotected(Unprotected::TooLarge)]
    );
}

#[test]
fn no_other_backend_closes_the_session() {
    let mut h = protected();
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    h.s.handle_restore_target(h.now, None);
    h.pump();
    assert!(h.s.is_closed());
    assert!(h.recv(Leg::Client).is_empty());
    assert!(matches!(
        restore_outcomes(&h.take_events())[..],
        [RestoreOutcome::Failed(_)]
    ));
}

#[test]
fn a_move_asked_during_a_renewal_starts_after_it() {
    let mut h = protected();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    assert!(h.s.handle_redirect(h.now, "tidb-2:4000"));
    h.pump();
    answer_refresh(&mut h, STATES);
    full_move(&mut h);
    assert!(h.take_events().contains(&Event::Migrated {
        target: "tidb-2:4000".into()
    }));
}

#[test]
fn a_renewal_that_hangs_restores_the_session_elsewhere() {
    let mut h = protected();
    h.now += Duration::from_secs(30);
    h.s.handle_timeout(h.now);
    h.pump();
    let q = h.recv_one(Leg::Backend);
    assert_eq!(&q.data[..], b"\x03SHOW SESSION_STATES");
    // The TiDB's network is cut: no answer within the migration timeout.
    h.now += Duration::from_secs(10);
    h.s.handle_timeout(h.now);
    h.pump();
    assert!(!h.s.is_closed());
    restore_on_new_backend(&mut h);
    // The copy is 40 s old: the new TiDB is asked for a fresh one at once.
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

#[test]
fn an_export_after_a_change_that_hangs_closes_the_session() {
    let mut h = protected();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    h.recv_one(Leg::Backend);
    h.now += Duration::from_secs(10);
    h.s.handle_timeout(h.now);
    h.pump();
    assert!(
        h.s.is_closed(),
        "the copy is stale: nothing to restore from"
    );
}

#[test]
fn a_restore_whose_dial_fails_tries_other_backends_then_gives_up() {
    let mut h = protected();
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "connection reset");
    h.pump();
    assert!(h.take_actions().contains(&Action::PickRestoreTarget {
        reason: "connection reset".into(),
        failed: 0,
        exclude: None,
    }));
    // The first pick cannot be reached: the driver is asked again, told
    // which backend failed.
    h.s.handle_restore_target(h.now, Some("tidb-3:4000".into()));
    h.pump();
    h.s.handle_connect_failed(h.now, Leg::NewBackend, "connection refused");
    h.pump();
    assert!(!h.s.is_closed(), "one failed dial does not end the session");
    let picks: Vec<u8> = h
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::PickRestoreTarget { failed, .. } => Some(failed),
            _ => None,
        })
        .collect();
    assert_eq!(picks, vec![1], "asked again, one target failed");
    assert!(
        restore_outcomes(&h.take_events()).is_empty(),
        "not counted until it ends"
    );
    // The second pick works: restored, the client notices nothing.
    h.s.handle_restore_target(h.now, Some("tidb-2:4000".into()));
    h.pump();
    new_backend_handshake(&mut h);
    h.send(Leg::NewBackend, 2, &ok(StatusFlags::AUTOCOMMIT));
    h.recv_one(Leg::NewBackend);
    h.send(Leg::NewBackend, 1, &ok(StatusFlags::AUTOCOMMIT));
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Restored]
    );
    assert!(h.recv(Leg::Client).is_empty(), "the client hears nothing");
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

#[test]
fn a_restore_gives_up_after_three_failed_targets() {
    // Every pick fails; after three the session closes, as the server
    // closed it, with one outcome counted.
    let mut h = protected();
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "EOF");
    h.pump();
    for target in ["tidb-4:4000", "tidb-5:4000", "tidb-6:4000"] {
        assert!(
            h.take_actions()
                .iter()
                .any(|a| matches!(a, Action::PickRestoreTarget { .. })),
            "asked for a target before {target}"
        );
        h.s.handle_restore_target(h.now, Some(target.into()));
        h.pump();
        h.s.handle_connect_failed(h.now, Leg::NewBackend, "timed out");
        h.pump();
    }
    assert!(h.s.is_closed(), "three failed targets close the session");
    assert!(
        !h.take_actions()
            .iter()
            .any(|a| matches!(a, Action::PickRestoreTarget { .. })),
        "no fourth pick"
    );
    let outcomes = restore_outcomes(&h.take_events());
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert!(matches!(outcomes[0], RestoreOutcome::Failed(_)));
}

#[test]
fn no_target_left_after_a_failed_attempt_closes_with_a_clear_reason() {
    let mut h = protected();
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "connection reset");
    h.pump();
    h.take_actions();
    h.s.handle_restore_target(h.now, Some("tidb-3:4000".into()));
    h.pump();
    h.s.handle_connect_failed(h.now, Leg::NewBackend, "connection refused");
    h.pump();
    h.s.handle_restore_target(h.now, None);
    h.pump();
    assert!(h.s.is_closed());
    let outcomes = restore_outcomes(&h.take_events());
    let [RestoreOutcome::Failed(why)] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert!(why.contains("failed on 1 other backend"), "{why}");
}

#[test]
fn a_backend_that_dies_while_a_move_exports_is_restored_from_the_copy() {
    let mut h = protected();
    // The balancer moves the session off a TiDB that stopped answering:
    // the export is sent and never answered; then the connection dies.
    assert!(h.s.handle_redirect(h.now, "tidb-2:4000"));
    h.pump();
    let q = h.recv_one(Leg::Backend);
    assert_eq!(&q.data[..], b"\x03SHOW SESSION_STATES");
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "keepalive timeout");
    h.pump();
    assert!(
        !h.s.is_closed(),
        "only the proxy's own export was in flight"
    );
    let events = h.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::MigrationFailed { .. })),
        "the move is reported failed: {events:?}"
    );
    restore_on_new_backend(&mut h);
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Restored]
    );
    assert!(h.recv(Leg::Client).is_empty(), "the client hears nothing");
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

// ---------------------------------------------------------------------
// The quiet period (`proxy.session-protection-delay`): a stale copy is
// re-exported only once the session has been idle for the delay.
// ---------------------------------------------------------------------

const DELAY: Duration = Duration::from_millis(200);

/// An established session with the default quiet period, its first copy
/// taken once the login was followed by the delay's silence.
fn protected_with_delay() -> Harness {
    let mut cfg = protected_cfg();
    cfg.protect.delay_ms = DELAY.as_millis() as u16;
    let mut h = Harness::established(cfg, CLIENT_CAPS);
    assert!(h.recv(Leg::Backend).is_empty(), "no export right at login");
    assert_eq!(h.s.poll_timeout(), Some(h.now + DELAY));
    h.now += DELAY;
    h.s.handle_timeout(h.now);
    h.pump();
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
    h
}

#[test]
fn a_state_change_is_copied_only_after_the_quiet_period() {
    let mut h = protected_with_delay();
    let t0 = h.now;
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    assert!(!h.s.is_protected(h.now), "the copy is stale at once");
    assert!(h.recv(Leg::Backend).is_empty(), "no export yet");
    assert_eq!(h.s.poll_timeout(), Some(t0 + DELAY));
    // Just before the period ends: still nothing.
    h.now = t0 + DELAY - Duration::from_millis(1);
    h.s.handle_timeout(h.now);
    h.pump();
    assert!(h.recv(Leg::Backend).is_empty());
    h.now = t0 + DELAY;
    h.s.handle_timeout(h.now);
    h.pump();
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
    assert!(h.recv(Leg::Client).is_empty(), "the client sees nothing");
}

#[test]
fn commands_within_the_quiet_period_postpone_the_export() {
    let mut h = protected_with_delay();
    let t0 = h.now;
    // A busy session: a change, then a command every 100 ms for a second.
    // Not one export reaches the backend: every packet it gets is the
    // client's own (query_ok asserts exactly one per command).
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    for i in 1..=10u32 {
        h.now = t0 + Duration::from_millis(100) * i;
        // The quiet period runs from the last command's end.
        assert_eq!(h.s.poll_timeout(), Some(h.now + DELAY / 2));
        h.s.handle_timeout(h.now);
        h.pump();
        assert!(h.recv(Leg::Backend).is_empty(), "no export at {i}");
        h.send(Leg::Client, 0, format!("\x03SET @a = {i}").as_bytes());
        h.recv_one(Leg::Backend);
        // No quiet-period timer while the statement runs: only the
        // renewal of the copy taken at t0.
        assert_eq!(h.s.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        h.send(Leg::Backend, 1, &ok(StatusFlags::AUTOCOMMIT));
        h.recv_one(Leg::Client);
        assert!(!h.s.is_protected(h.now));
    }
    let last = h.now;
    assert_eq!(h.s.poll_timeout(), Some(last + DELAY));
    h.now = last + DELAY;
    h.s.handle_timeout(h.now);
    h.pump();
    answer_refresh(&mut h, STATES);
    assert!(h.s.is_protected(h.now));
}

#[test]
fn a_crash_inside_the_quiet_period_closes_as_the_server_did() {
    let mut h = protected_with_delay();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    h.now += DELAY / 2;
    h.take_events();
    h.s.handle_closed(h.now, Leg::Backend, "reset");
    h.pump();
    assert!(h.s.is_closed(), "never restored from the stale copy");
    assert!(!h.take_actions().iter().any(|a| matches!(
        a,
        Action::PickRestoreTarget { .. } | Action::ConnectNewBackend { .. }
    )));
    assert!(h.recv(Leg::Client).is_empty(), "nothing invented");
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Unprotected(Unprotected::Stale)]
    );
}

#[test]
fn a_crash_after_the_quiet_period_is_restored_from_the_new_copy() {
    let mut h = protected_with_delay();
    h.query_ok("SET @a = 1", StatusFlags::AUTOCOMMIT);
    h.now += DELAY;
    h.s.handle_timeout(h.now);
    h.pump();
    answer_refresh(&mut h, STATES);
    h.take_events();
    h.take_actions();
    h.now += Duration::from_secs(5);
    h.s.handle_closed(h.now, Leg::Backend, "connection reset");
    h.pump();
    assert!(!h.s.is_closed());
    restore_on_new_backend(&mut h);
    assert_eq!(
        restore_outcomes(&h.take_events()),
        vec![RestoreOutcome::Restored]
    );
    assert!(h.recv(Leg::Client).is_empty(), "the client hears nothing");
    h.query_ok("select 1", StatusFlags::AUTOCOMMIT);
}

#[test]
fn a_read_after_a_fresh_copy_arms_no_quiet_period() {
    let mut h = protected_with_delay();
    h.send(Leg::Client, 0, b"\x03select 1");
    h.recv_one(Leg::Backend);
    for (i, p) in result_set(1).iter().enumerate() {
        h.send(Leg::Backend, (i + 1) as u8, p);
    }
    h.recv(Leg::Client);
    assert!(h.s.is_protected(h.now));
    // Only the renewal timer remains.
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(30)));
}
