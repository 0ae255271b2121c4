//! Unit tests of `core::balance::ledger` (included with `#[path]`).
use super::*;

/// Any instant: the tests only use offsets from it.
#[allow(clippy::disallowed_methods)]
fn t0() -> Instant {
    Instant::now()
}

fn ledger() -> MoveLedger<&'static str> {
    MoveLedger::new()
}

#[test]
fn a_requested_move_is_in_flight_until_it_resolves() {
    let t0 = t0();
    let mut l = ledger();
    assert!(l.can_move(1, t0));
    l.requested(1, "b");
    assert!(!l.can_move(1, t0), "not asked twice");
    assert_eq!((l.incoming(&"b"), l.in_flight()), (1, 1));
    assert_eq!(l.room() as usize, MAX_MOVES_IN_FLIGHT - 1);
    assert_eq!(
        l.resolved(1, &"a", MoveOutcome::Moved, t0),
        Resolved::default()
    );
    assert!(l.can_move(1, t0), "a moved session may move again");
    assert_eq!((l.incoming(&"b"), l.in_flight()), (0, 0));
}

#[test]
fn a_failed_move_cools_the_session_down() {
    let t0 = t0();
    let mut l = ledger();
    l.requested(1, "b");
    l.resolved(1, &"a", MoveOutcome::Failed, t0);
    assert_eq!(l.incoming(&"b"), 0);
    assert!(!l.can_move(1, t0 + FAILED_MOVE_COOLDOWN - Duration::from_millis(1)));
    assert!(l.can_move(1, t0 + FAILED_MOVE_COOLDOWN));
    assert!(l.can_move(2, t0), "other sessions are not affected");
}

#[test]
fn an_unreachable_target_means_no_cooldown() {
    // Simulation seed 72.
    let t0 = t0();
    let mut l = ledger();
    l.requested(1, "b");
    l.resolved(1, &"a", MoveOutcome::TargetUnreachable, t0);
    assert!(l.can_move(1, t0));
    assert_eq!(l.incoming(&"b"), 0);
}

#[test]
fn error_8146_is_temporary_anything_else_means_never_again() {
    let t0 = t0();
    let refused = |code| MigrationFailure::StatesRefused {
        code,
        message: String::new(),
    };
    assert_eq!(MoveOutcome::of_failure(&refused(8146)), MoveOutcome::Failed);
    assert_eq!(
        MoveOutcome::of_failure(&refused(1064)),
        MoveOutcome::SourceCannotExport
    );
    assert_eq!(
        MoveOutcome::of_failure(&MigrationFailure::Connect("refused".into())),
        MoveOutcome::TargetUnreachable
    );
    // The target went away in the middle of the move: its fault too.
    assert_eq!(
        MoveOutcome::of_failure(&MigrationFailure::NewBackendLost("closed".into())),
        MoveOutcome::TargetUnreachable
    );
    assert_eq!(
        MoveOutcome::of_failure(&MigrationFailure::NoToken),
        MoveOutcome::Failed
    );
    let mut l = ledger();
    l.requested(1, "b");
    let r = l.resolved(1, &"a", MoveOutcome::Failed, t0);
    assert!(!r.source_cannot_export);
    assert!(l.can_export(&"a"));
    l.requested(2, "b");
    let r = l.resolved(2, &"a", MoveOutcome::SourceCannotExport, t0);
    assert!(r.source_cannot_export, "said once");
    assert!(!l.can_export(&"a"));
    assert!(l.can_export(&"b"));
    l.requested(3, "b");
    let r = l.resolved(3, &"a", MoveOutcome::SourceCannotExport, t0);
    assert!(!r.source_cannot_export, "not said twice");
    // A new server at the same address gets a fresh chance.
    l.forget_backend(&"a");
    assert!(l.can_export(&"a"));
}

#[test]
fn a_new_request_replaces_the_one_under_way() {
    let mut l = ledger();
    l.requested(1, "b");
    l.requested(1, "c");
    assert_eq!((l.incoming(&"b"), l.incoming(&"c")), (0, 1));
    assert_eq!(l.in_flight(), 1);
}

#[test]
fn a_closed_session_leaves_nothing_behind() {
    let t0 = t0();
    let mut l = ledger();
    l.requested(1, "b");
    l.requested(2, "b");
    l.resolved(2, &"a", MoveOutcome::Failed, t0);
    l.closed(1);
    l.closed(2);
    assert_eq!((l.incoming(&"b"), l.in_flight()), (0, 0));
    assert!(l.cooldown.is_empty());
    // A report after the close (the connection's last event) is harmless.
    l.resolved(1, &"a", MoveOutcome::Dropped, t0);
    assert_eq!(l.incoming(&"b"), 0);
}

#[test]
fn room_is_bounded_by_moves_in_flight() {
    let mut l = ledger();
    for c in 0..MAX_MOVES_IN_FLIGHT as u32 + 5 {
        l.requested(c, "b");
    }
    assert_eq!(l.room(), 0);
    assert_eq!(l.incoming(&"b") as usize, MAX_MOVES_IN_FLIGHT + 5);
}

#[test]
fn expired_cooldowns_are_dropped() {
    let t0 = t0();
    let mut l = ledger();
    l.resolved(1, &"a", MoveOutcome::Failed, t0);
    l.expire(t0 + Duration::from_secs(1));
    assert_eq!(l.cooldown.len(), 1);
    l.expire(t0 + FAILED_MOVE_COOLDOWN);
    assert!(l.cooldown.is_empty());
    assert!(l.can_move(1, t0));
}
