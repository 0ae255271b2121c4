//! Export and import of an idle session: everything a fresh [`Session`]
//! needs to continue byte for byte on the same client and backend
//! connections (handed over with the bytes, e.g. to a new proxy process).
//!
//! A session is exportable when it is idle at a point where a move would
//! be allowed, and quiet on the wire:
//! - authenticated, not closing, no move pending or running, no
//!   COM_CHANGE_USER in flight;
//! - the tracker is at a safe point (no exchange, no transaction, no open
//!   cursor, no pending long data);
//! - no client bytes parked, no partial packet or compressed frame read,
//!   nothing queued or staged for any socket, no TLS upgrade pending.
//!
//! # Format (version 1)
//!
//! `"TPXS"`, version byte, then: connection id (u32), salt (20 bytes),
//! client capabilities (u32), backend capabilities (u32), MariaDB extended
//! capabilities agreed with the client (u32) and with the backend (u32), the
//! client's handshake response as sent on the wire (length-encoded), user
//! (length-encoded), database (flag byte, then length-encoded), the
//! tracker's own export (length-encoded, [`CommandTracker::export`]), then
//! the client and backend legs: flags (TLS, compression on, restart the
//! compressed sequence), packet sequence id, compression (0 none, 1 zlib,
//! 2 zstd) with its level, and when compression is on the framing's own
//! export (length-encoded, [`CompressedFraming::export`]). Integers are
//! little-endian. The sub-machines' exports carry their own versions.
//!
//! # The protection copy
//!
//! Crash protection's state copy ([`super::protect`]) is not part of the
//! bytes: it is a TiDB-issued blob with an age, which the carrier hands
//! over next to them when it has one ([`Session::protection_copy`],
//! [`Session::adopt_protection_copy`]), so that a carrier without it (an
//! older peer) still moves sessions; the imported session then takes its
//! own copy at its next boundary, one `SHOW SESSION_STATES` more.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::migration::Migration;
use super::relay::{Compressed, LegState, Relay};
use super::{Leg, Phase, Session, SessionConfig};
use crate::compress::{Algorithm, CompressedFraming};
use crate::flags::{CapabilityFlags, MariaDbCapabilities};
use crate::handshake::{ClientHello, HandshakeResponse};
use crate::tracker::CommandTracker;
use crate::wire::{Reader, StateError, WireError, put_lenenc_bytes};

/// The first bytes of an exported session.
pub const EXPORT_MAGIC: &[u8; 4] = b"TPXS";

/// The format version this build writes and reads.
pub const EXPORT_VERSION: u8 = 1;

/// Crash protection's state copy of a session, as carried next to its
/// export (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionCopy {
    /// `SHOW SESSION_STATES`' state JSON.
    pub states: Bytes,
    /// Its session token.
    pub token: Bytes,
    /// How long ago the backend gave it.
    pub age: Duration,
}

/// Why a session cannot be exported now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The session is not at an exportable point (see the module docs);
    /// the reason names what stands in the way.
    #[error("session is not idle at a safe point: {0}")]
    NotIdle(&'static str),
}

/// Why bytes could not be imported as a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The bytes are not an exported session.
    #[error("not an exported tiproxy session (bad magic)")]
    BadMagic,
    /// An exported session in a format this build does not know.
    #[error(
        "exported session format version {0} is not supported (this build reads {EXPORT_VERSION})"
    )]
    UnknownVersion(u8),
    /// The bytes end early or a field is malformed.
    #[error("malformed exported session: {0}")]
    Malformed(#[from] WireError),
    /// A field holds a value no exporter writes.
    #[error("malformed exported session: invalid {0}")]
    Invalid(&'static str),
    /// A sub-machine's state (tracker, compressed framing) is unusable.
    #[error("malformed exported session: {0}")]
    State(#[from] StateError),
    /// Bytes follow the last field.
    #[error("malformed exported session: {0} bytes after the end")]
    Trailing(usize),
}

impl<T: Clone> Session<T> {
    /// An established session rebuilt from an export.
    fn resumed(cfg: SessionConfig, salt: [u8; 20], relay: Relay, r: Resumed) -> Self {
        Self {
            hello: r.hello,
            client_caps: r.client_caps,
            backend_caps: r.backend_caps,
            client_mariadb: r.client_mariadb,
            backend_mariadb: r.backend_mariadb,
            user: r.user,
            database: r.database,
            tracker: r.tracker,
            ..Self::blank(cfg, Phase::Command, salt, relay)
        }
    }

    /// Why the session cannot be exported now, if it cannot.
    fn export_blocker(&self) -> Option<&'static str> {
        let quiet = |l: &LegState| {
            l.out.len() == 0
                && l.rx.stash.is_empty()
                && l.rx.pass == 0
                && l.framing
                    .as_ref()
                    .is_none_or(|f| f.buffered() == 0 && f.staging.is_empty())
        };
        Some(if self.phase != Phase::Command {
            "not authenticated, or closed"
        } else if !matches!(self.migration, Migration::None) {
            "a move is pending or running"
        } else if self.close_at_safe_point {
            "closing"
        } else if self.pending_user.is_some() || !self.tracker.is_idle() {
            "a command is in flight"
        } else if !self.tracker.at_safe_point() {
            "in a transaction, or a cursor or long data is open"
        } else if !self.relay.held.is_empty() || self.boundary_pending {
            "client bytes are waiting"
        } else if self.tls_request.is_some() {
            "a TLS upgrade is pending"
        } else if !self.relay.legs.iter().all(quiet) {
            "bytes are buffered on a leg"
        } else {
            return None;
        })
    }

    /// Whether [`Session::export`] would succeed now.
    pub fn may_export(&self) -> bool {
        self.export_blocker().is_none()
    }

    /// The session's state as versioned bytes (see the module docs for
    /// when a session can be exported and the format).
    pub fn export(&self) -> Result<Bytes, ExportError> {
        if let Some(why) = self.export_blocker() {
            return Err(ExportError::NotIdle(why));
        }
        let mut b = BytesMut::with_capacity(256);
        b.put_slice(EXPORT_MAGIC);
        b.put_u8(EXPORT_VERSION);
        b.put_u32_le(self.cfg.connection_id);
        b.put_slice(&self.salt);
        b.put_u32_le(self.client_caps.bits());
        b.put_u32_le(self.backend_caps.bits());
        b.put_u32_le(self.client_mariadb.bits());
        b.put_u32_le(self.backend_mariadb.bits());
        let mut hello = BytesMut::new();
        self.hello.write(&mut hello);
        put_lenenc_bytes(&mut b, &hello);
        put_lenenc_bytes(&mut b, &self.user);
        match &self.database {
            None => b.put_u8(0),
            Some(db) => {
                b.put_u8(1);
                put_lenenc_bytes(&mut b, db);
            }
        }
        let mut sub = BytesMut::new();
        self.tracker.export(&mut sub).map_err(busy)?;
        put_lenenc_bytes(&mut b, &sub);
        for leg in [Leg::Client, Leg::Backend] {
            put_leg(&mut b, &self.relay.legs[leg.idx()])?;
        }
        Ok(b.freeze())
    }

    /// The state copy a restore could use, with its age at `now`: only a
    /// clean one (taken after the last state change), with protection on.
    pub fn protection_copy(&self, now: Instant) -> Option<ProtectionCopy> {
        if !self.cfg.protect.enabled || self.protect.dirty || self.protect.cannot_export {
            return None;
        }
        let c = self.protect.copy.as_ref()?;
        Some(ProtectionCopy {
            states: c.states.clone(),
            token: c.token.clone(),
            age: now.saturating_duration_since(c.taken),
        })
    }

    /// An imported session takes the copy exported with it (made by
    /// [`Session::protection_copy`] from the same session): it is protected
    /// at once and exports again only when the copy is due for renewal.
    /// Returns false, keeping no copy, when protection is off here or the
    /// copy is too old for its token to be accepted.
    pub fn adopt_protection_copy(&mut self, copy: ProtectionCopy, now: Instant) -> bool {
        let max_age = Duration::from_secs(self.cfg.protect.max_age_secs.into());
        if !self.cfg.protect.enabled || copy.age >= max_age {
            return false;
        }
        let Some(taken) = now.checked_sub(copy.age) else {
            return false;
        };
        self.protect
            .store(&self.cfg.protect, taken, copy.states, copy.token);
        self.protect.copy.is_some()
    }

    /// A session continuing from `bytes` (made by [`Session::export`]) on
    /// the same connections. `cfg` is this process's configuration; the
    /// connection id is the exported one.
    pub fn import(mut cfg: SessionConfig, bytes: &[u8], now: Instant) -> Result<Self, ImportError> {
        let _ = now;
        let mut r = Reader::new(bytes);
        if r.take(4, "magic").ok() != Some(&EXPORT_MAGIC[..]) {
            return Err(ImportError::BadMagic);
        }
        let version = r.u8("version")?;
        if version != EXPORT_VERSION {
            return Err(ImportError::UnknownVersion(version));
        }
        cfg.connection_id = r.u32("connection id")?;
        let mut salt = [0u8; 20];
        salt.copy_from_slice(r.take(20, "salt")?);
        let client_caps = CapabilityFlags::from_bits_retain(r.u32("client capabilities")?);
        let backend_caps = CapabilityFlags::from_bits_retain(r.u32("backend capabilities")?);
        let client_mariadb = MariaDbCapabilities::from_bits(r.u32("client MariaDB capabilities")?)
            .ok_or(ImportError::Invalid("client MariaDB capabilities"))?;
        let backend_mariadb =
            MariaDbCapabilities::from_bits(r.u32("backend MariaDB capabilities")?)
                .ok_or(ImportError::Invalid("backend MariaDB capabilities"))?;
        let hello = match ClientHello::parse(r.lenenc_bytes("handshake response")?)? {
            ClientHello::Response(h) => h,
            ClientHello::Ssl(_) => return Err(ImportError::Invalid("handshake response")),
        };
        let user = Bytes::copy_from_slice(r.lenenc_bytes("user")?);
        let database = match r.u8("database flag")? {
            0 => None,
            1 => Some(Bytes::copy_from_slice(r.lenenc_bytes("database")?)),
            _ => return Err(ImportError::Invalid("database flag")),
        };
        let mut sub = r.lenenc_bytes("tracker")?;
        let tracker = CommandTracker::import(&mut sub)?;
        if !sub.is_empty() {
            return Err(ImportError::Trailing(sub.len()));
        }
        let mut relay = Relay::default();
        for leg in [Leg::Client, Leg::Backend] {
            relay.legs[leg.idx()] = take_leg(&mut r)?;
        }
        if !r.is_empty() {
            return Err(ImportError::Trailing(r.remaining()));
        }
        Ok(Self::resumed(
            cfg,
            salt,
            relay,
            Resumed {
                hello,
                client_caps,
                backend_caps,
                client_mariadb,
                backend_mariadb,
                user,
                database,
                tracker,
            },
        ))
    }
}

/// The handshake outcome an imported session resumes with.
pub(super) struct Resumed {
    pub(super) hello: HandshakeResponse,
    pub(super) client_caps: CapabilityFlags,
    pub(super) backend_caps: CapabilityFlags,
    pub(super) client_mariadb: MariaDbCapabilities,
    pub(super) backend_mariadb: MariaDbCapabilities,
    pub(super) user: Bytes,
    pub(super) database: Option<Bytes>,
    pub(super) tracker: CommandTracker,
}

const LEG_TLS: u8 = 1;
const LEG_FRAMING: u8 = 2;
const LEG_RESET_OUT_SEQ: u8 = 4;

fn put_leg(b: &mut BytesMut, l: &LegState) -> Result<(), ExportError> {
    let mut flags = 0;
    if l.tls {
        flags |= LEG_TLS;
    }
    if l.framing.is_some() {
        flags |= LEG_FRAMING;
    }
    if l.reset_out_seq {
        flags |= LEG_RESET_OUT_SEQ;
    }
    b.put_u8(flags);
    b.put_u8(l.seq);
    match l.compression {
        None => b.put_slice(&[0, 0]),
        Some(Algorithm::Zlib) => b.put_slice(&[1, 0]),
        Some(Algorithm::Zstd(level)) => b.put_slice(&[2, level]),
    }
    if let Some(f) = &l.framing {
        let mut sub = BytesMut::new();
        f.export(&mut sub).map_err(busy)?;
        put_lenenc_bytes(b, &sub);
    }
    Ok(())
}

fn take_leg(r: &mut Reader<'_>) -> Result<LegState, ImportError> {
    let flags = r.u8("leg flags")?;
    if flags & !(LEG_TLS | LEG_FRAMING | LEG_RESET_OUT_SEQ) != 0 {
        return Err(ImportError::Invalid("leg flags"));
    }
    let seq = r.u8("leg sequence")?;
    let compression = match (r.u8("compression")?, r.u8("compression level")?) {
        (0, _) => None,
        (1, _) => Some(Algorithm::Zlib),
        (2, level) => Some(Algorithm::Zstd(level)),
        _ => return Err(ImportError::Invalid("compression")),
    };
    let framing = if flags & LEG_FRAMING != 0 {
        let mut sub = r.lenenc_bytes("compressed framing")?;
        let f = CompressedFraming::import(&mut sub)?;
        if !sub.is_empty() {
            return Err(ImportError::Trailing(sub.len()));
        }
        if compression != Some(f.algorithm()) {
            return Err(ImportError::Invalid("compressed framing algorithm"));
        }
        Some(Compressed::new(f))
    } else {
        None
    };
    Ok(LegState {
        framing,
        compression,
        reset_out_seq: flags & LEG_RESET_OUT_SEQ != 0,
        seq,
        tls: flags & LEG_TLS != 0,
        ..LegState::default()
    })
}

/// A sub-machine refused to export: the session's own check let a busy
/// state through, which it must not.
fn busy(e: StateError) -> ExportError {
    match e {
        StateError::Busy { why, .. } => ExportError::NotIdle(why),
        // Exporting writes, never reads: only `Busy` can come back.
        other => unreachable!("export cannot fail with {other}"),
    }
}
