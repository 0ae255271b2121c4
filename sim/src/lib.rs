//! tiproxy-sim: the turmoil simulation of the whole proxy.
//!
//! Not built yet. What is missing (issues 4 and 6): the TiDB double, the PD
//! double, seed-derived swarm scenarios and the invariant checks. Nothing in
//! this crate is exercised by CI until then.
