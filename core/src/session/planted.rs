//! The bugs the simulation's mutation test may plant in a session.

/// A deliberate bug the simulation plants in a session to prove that its
/// seed sweeps catch it (mutation testing). Planting needs the
/// `sim-mutations` feature; without it nothing can plant one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A pending move does not wait for the transaction to end: at the
    /// client's next statement the proxy commits the open transaction
    /// behind its back and moves (TiProxy's BEGIN trick applied to any
    /// statement). TiDB refuses to export a session inside a transaction,
    /// so ending it first is the only way a proxy can get this wrong.
    MoveInsideTransaction,
    /// `SET SESSION_STATES` loses the session's first user variable.
    ForgetUserVariable,
    /// Crash protection copies the state only when the token needs
    /// renewing, not after a change, and restores from whatever copy it
    /// holds: a restored session loses its recent changes.
    RestoreStaleCopy,
    /// A restore does not wait for the statement in flight: when the
    /// backend dies mid-statement outside a transaction, the proxy
    /// restores the session anyway and sends the statement again on the
    /// new backend, though the lost one may have executed it.
    ResendInFlight,
}
