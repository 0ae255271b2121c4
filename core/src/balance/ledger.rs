//! The move ledger: which sessions were asked to move where and have not
//! arrived, which sessions are cooling down after a failed move, and which
//! backends cannot export sessions at all.
//!
//! A pure structure: time enters as `now`, sessions are named by their
//! connection id and backends by a key the caller chooses (the runtime uses
//! the SQL address). The runtime's balance loop asks it which sessions may
//! move and how many moves are under way, records the requests it sends,
//! and the connections report how each move ended. It never decides where
//! a session goes: that is [`super::plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::migration::MigrationFailure;

/// How long a session whose move failed is left alone.
pub const FAILED_MOVE_COOLDOWN: Duration = Duration::from_secs(3);

/// Most moves under way at once: each holds a third socket and competes
/// with the sessions' own traffic.
pub const MAX_MOVES_IN_FLIGHT: usize = 256;

/// TiDB's "this session cannot be exported now" (a transaction, temporary
/// tables, table or advisory locks): the session may try again later.
pub const ER_CANNOT_EXPORT_NOW: u16 = 8146;

/// How a requested move ended, as the connection saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    /// The session is on its new backend.
    Moved,
    /// The session never started the move (it was closing, or already on
    /// the target) or closed before the move finished.
    Dropped,
    /// The target could not be reached, or its connection closed during
    /// the move. The target's fault, not the session's: no cool-down, it
    /// may move elsewhere at once (simulation seed 72: a cool-down
    /// outlasted a short graceful wait when a drain began just after
    /// another TiDB crashed; seed 9106844: the same after the target shut
    /// down in the middle of the move).
    TargetUnreachable,
    /// The source backend refused to export sessions with an error other
    /// than [`ER_CANNOT_EXPORT_NOW`]: it cannot export sessions at all
    /// (not TiDB, or no session token certificate).
    SourceCannotExport,
    /// Any other failure: the session stays and cools down.
    Failed,
}

impl MoveOutcome {
    /// The outcome a failed migration stands for.
    pub fn of_failure(f: &MigrationFailure) -> Self {
        match f {
            MigrationFailure::Connect(_) | MigrationFailure::NewBackendLost(_) => {
                MoveOutcome::TargetUnreachable
            }
            MigrationFailure::StatesRefused { code, .. } if *code != ER_CANNOT_EXPORT_NOW => {
                MoveOutcome::SourceCannotExport
            }
            _ => MoveOutcome::Failed,
        }
    }
}

/// What a resolved move changed that the caller may want to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resolved {
    /// The source backend was just found unable to export sessions (true
    /// once per backend: log it once).
    pub source_cannot_export: bool,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct MoveLedger<B> {
    /// Sessions asked to move, by connection id: the target.
    in_flight: BTreeMap<u32, B>,
    /// Sessions that may not be asked again before the instant.
    cooldown: BTreeMap<u32, Instant>,
    /// Sessions asked to move, per target.
    incoming: BTreeMap<B, u32>,
    /// Backends whose sessions cannot be exported.
    cannot_export: BTreeSet<B>,
}

impl<B> Default for MoveLedger<B> {
    fn default() -> Self {
        Self {
            in_flight: BTreeMap::new(),
            cooldown: BTreeMap::new(),
            incoming: BTreeMap::new(),
            cannot_export: BTreeSet::new(),
        }
    }
}

impl<B: Ord + Clone> MoveLedger<B> {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether session `conn` may be asked to move at `now`: no move of it
    /// is under way and it is not cooling down after a failed one.
    pub fn can_move(&self, conn: u32, now: Instant) -> bool {
        !self.in_flight.contains_key(&conn) && self.cooldown.get(&conn).is_none_or(|t| now >= *t)
    }

    /// Whether sessions on `backend` can be moved at all.
    pub fn can_export(&self, backend: &B) -> bool {
        !self.cannot_export.contains(backend)
    }

    /// Sessions asked to move to `backend` that have not arrived.
    pub fn incoming(&self, backend: &B) -> u32 {
        self.incoming.get(backend).copied().unwrap_or(0)
    }

    /// Moves under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// How many more moves may be requested now
    /// ([`MAX_MOVES_IN_FLIGHT`] minus those under way).
    pub fn room(&self) -> u32 {
        MAX_MOVES_IN_FLIGHT.saturating_sub(self.in_flight.len()) as u32
    }

    /// Session `conn` was asked to move to `target`. A request replacing
    /// one still under way takes its place (the session follows the last).
    pub fn requested(&mut self, conn: u32, target: B) {
        if let Some(old) = self.in_flight.insert(conn, target.clone()) {
            self.leave(&old);
        }
        *self.incoming.entry(target).or_insert(0) += 1;
    }

    /// Session `conn`, on `source`, reports how its move ended. A report
    /// without a move under way (a session that was never asked) changes
    /// nothing but the source's export capability.
    pub fn resolved(
        &mut self,
        conn: u32,
        source: &B,
        outcome: MoveOutcome,
        now: Instant,
    ) -> Resolved {
        if let Some(target) = self.in_flight.remove(&conn) {
            self.leave(&target);
        }
        let mut r = Resolved::default();
        match outcome {
            MoveOutcome::Moved | MoveOutcome::Dropped | MoveOutcome::TargetUnreachable => {}
            MoveOutcome::Failed => {
                self.cooldown.insert(conn, now + FAILED_MOVE_COOLDOWN);
            }
            MoveOutcome::SourceCannotExport => {
                self.cooldown.insert(conn, now + FAILED_MOVE_COOLDOWN);
                r.source_cannot_export = self.cannot_export.insert(source.clone());
            }
        }
        r
    }

    /// Session `conn` ended: whatever it had under way is dropped and its
    /// cool-down forgotten.
    pub fn closed(&mut self, conn: u32) {
        if let Some(target) = self.in_flight.remove(&conn) {
            self.leave(&target);
        }
        self.cooldown.remove(&conn);
    }

    /// `backend` left the backend set: if a server comes back at its
    /// address, it is a new one and gets a fresh chance to export sessions.
    /// (Moves to it still under way resolve as usual.)
    pub fn forget_backend(&mut self, backend: &B) {
        self.cannot_export.remove(backend);
    }

    /// Drops cool-downs that ended before `now` (call now and then: they
    /// are the only entries that outlive nothing else).
    pub fn expire(&mut self, now: Instant) {
        self.cooldown.retain(|_, t| *t > now);
    }

    fn leave(&mut self, target: &B) {
        if let Some(n) = self.incoming.get_mut(target) {
            *n -= 1;
            if *n == 0 {
                self.incoming.remove(target);
            }
        }
    }
}

// The tests read the clock (for a base instant), so they live outside
// core/src, which must not.
#[cfg(test)]
#[path = "../../tests/unit/balance_ledger.rs"]
mod tests;
