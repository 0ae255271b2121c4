//! tiproxy-core: the sans-IO heart of tiproxy-rs.
//!
//! Bytes and time go in, bytes, actions and events come out. Nothing in this
//! crate opens a socket, reads a clock or draws OS randomness: the driver
//! (`tiproxy-runtime` on tokio, or the turmoil simulation) passes `now` and
//! a seeded RNG in and carries out the [`session::Action`]s it is handed.

pub mod balance;
pub mod command;
pub mod compress;
pub mod digest;
pub mod error;
pub mod flags;
pub mod handshake;
pub mod health;
pub mod packet;
pub mod prom;
pub mod proxy_protocol;
pub mod response;
pub mod tracker;
pub mod wire;

pub use command::Command;
pub use flags::{CapabilityFlags, MariaDbCapabilities, StatusFlags};
pub mod session;

/// The move sequence's data: [`session::migration`] under its old path.
pub use session::migration;
