//! The simulation is worth something only if it catches bugs: each bug
//! planted in the proxy (`Router::plant`, feature `sim-mutations`) must make
//! a seed of a short sweep fail, on the invariant that bug breaks.

use tiproxy_runtime::router::PlantedBug;
use tiproxy_sim::run::{RunOptions, run};
use tiproxy_sim::scenario::Scenario;
use tiproxy_sim::world::Invariant;

/// Seeds a planted bug may survive before the sweep is judged blind to it.
/// Most are caught by seed 0; a move inside a transaction needs a move
/// requested while a transaction is open (seed 11 is the first).
const BOUND: u64 = 20;

/// Routing to a draining TiDB strands sessions there; since half the
/// seeds run with session protection, which restores sessions whose TiDB
/// went away, most of them are rescued and the first seed that still fails
/// is 31 (`.ci/run` sweeps the same range). A direct invariant (no move
/// targets a TiDB the proxy knows is draining) would catch it sooner.
const ROUTE_TO_DRAINING_BOUND: u64 = 50;

/// The first seed below `bound` that fails with `bug` planted, and the
/// invariants it broke.
fn first_catch(bug: PlantedBug, bound: u64) -> Option<(u64, Vec<Invariant>)> {
    (0..bound).find_map(|seed| {
        let o = run(
            &Scenario::from_seed(seed),
            &RunOptions {
                verbose: false,
                plant: Some(bug),
                trace_dir: None,
            },
        );
        (!o.passed()).then(|| (seed, o.violations.iter().map(|v| v.invariant).collect()))
    })
}

fn assert_caught(bug: PlantedBug, by: &[Invariant]) {
    let bound = match bug {
        PlantedBug::RouteToDraining => ROUTE_TO_DRAINING_BOUND,
        _ => BOUND,
    };
    let Some((seed, broke)) = first_catch(bug, bound) else {
        panic!("{bug:?} survived seeds 0..{bound}: the simulation does not catch it");
    };
    assert!(
        broke.iter().any(|i| by.contains(i)),
        "{bug:?} was caught by seed {seed}, but on {broke:?}, not on {by:?}"
    );
}

#[test]
fn routing_to_a_draining_tidb_is_caught() {
    assert_caught(
        PlantedBug::RouteToDraining,
        &[Invariant::NoClientError, Invariant::Liveness],
    );
}

#[test]
fn not_evacuating_a_draining_tidb_is_caught() {
    assert_caught(
        PlantedBug::NoEvacuation,
        &[Invariant::NoClientError, Invariant::Liveness],
    );
}

#[test]
fn leaking_a_lease_on_a_move_is_caught() {
    assert_caught(PlantedBug::LeakLeaseOnMove, &[Invariant::NoLeaks]);
}

#[test]
fn moving_a_session_inside_a_transaction_is_caught() {
    assert_caught(
        PlantedBug::MoveInsideTransaction,
        &[Invariant::TxnOnOneTidb, Invariant::CommitsExactlyOnce],
    );
}

#[test]
fn forgetting_a_user_variable_is_caught() {
    assert_caught(
        PlantedBug::ForgetUserVariable,
        &[Invariant::SessionStateKept],
    );
}

#[test]
fn restoring_from_a_stale_copy_is_caught() {
    assert_caught(PlantedBug::RestoreStaleCopy, &[Invariant::SessionStateKept]);
}

/// Re-sending the statement in flight after a restore shows when a TiDB
/// dies after applying a write and before answering it: crashes in the
/// middle of a write (`FaultKind::Crash::mid_statement`) make that happen,
/// first at seed 12 (`commits-exactly-once`).
#[test]
fn resending_the_statement_in_flight_is_caught() {
    assert_caught(
        PlantedBug::ResendInFlight,
        &[
            Invariant::NoClientError,
            Invariant::CommitsExactlyOnce,
            Invariant::SessionStateKept,
        ],
    );
}
