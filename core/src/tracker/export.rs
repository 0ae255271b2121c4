//! Export and import of an idle [`CommandTracker`]: everything it keeps
//! between commands (options, status flags, prepared statements with their
//! shapes, the statement prepared last, open cursors, pending long data) as
//! a versioned byte string. Used by session export (proxy upgrade, crash
//! protection); nothing in flight is ever exported.
//!
//! Layout, little-endian, version 1:
//! `version:u8, flags:u8 (bit 0 deprecate_eof, bit 1 multi_statements,
//! bit 2 last_prepared present), mariadb:u32, status:u16, last_prepared:u32,
//! prepared count:u32 then (id:u32, params:u16, columns:u16)*, cursors
//! count:u32 then id:u32*, long data count:u32 then id:u32*`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, BytesMut};

use super::{CommandTracker, PreparedStatement, State, TrackerOptions};
use crate::flags::{MariaDbCapabilities, StatusFlags};
use crate::wire::{Reader, StateError, WireError};

const VERSION: u8 = 1;
const MACHINE: &str = "command tracker";

const DEPRECATE_EOF: u8 = 1;
const MULTI_STATEMENTS: u8 = 1 << 1;
const HAS_LAST_PREPARED: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = DEPRECATE_EOF | MULTI_STATEMENTS | HAS_LAST_PREPARED;

/// Bytes one prepared statement takes.
const PREPARED_LEN: usize = 8;

impl CommandTracker {
    /// Appends the tracker's state to `out`. Only an idle tracker (no
    /// command in flight, no half-sent packet on either side) exports.
    pub fn export(&self, out: &mut BytesMut) -> Result<(), StateError> {
        let busy = |why| {
            Err(StateError::Busy {
                machine: MACHINE,
                why,
            })
        };
        if self.state != State::Idle {
            return busy("a command is in flight");
        }
        if self.client_continues || self.backend_continues {
            return busy("a packet longer than 16 MiB is half sent");
        }
        let o = &self.options;
        let mut flags = 0;
        if o.deprecate_eof {
            flags |= DEPRECATE_EOF;
        }
        if o.multi_statements {
            flags |= MULTI_STATEMENTS;
        }
        if self.last_prepared.is_some() {
            flags |= HAS_LAST_PREPARED;
        }
        out.reserve(
            16 + self.prepared.len() * PREPARED_LEN
                + 4 * self.cursors.len()
                + 4 * self.long_data.len(),
        );
        out.put_u8(VERSION);
        out.put_u8(flags);
        out.put_u32_le(o.mariadb.bits());
        out.put_u16_le(self.status.bits());
        out.put_u32_le(self.last_prepared.unwrap_or(0));
        out.put_u32_le(len_u32(self.prepared.len()));
        for (id, p) in &self.prepared {
            out.put_u32_le(*id);
            out.put_u16_le(p.params);
            out.put_u16_le(p.columns);
        }
        for set in [&self.cursors, &self.long_data] {
            out.put_u32_le(len_u32(set.len()));
            for id in set {
                out.put_u32_le(*id);
            }
        }
        Ok(())
    }

    /// Reads a tracker exported by [`CommandTracker::export`] from the front
    /// of `input` and advances `input` past it. The imported tracker is
    /// idle and continues exactly where the exported one stood.
    pub fn import(input: &mut &[u8]) -> Result<CommandTracker, StateError> {
        let malformed = |source| StateError::Malformed {
            machine: MACHINE,
            source,
        };
        let mut r = Reader::new(input);
        let version = r.u8("version").map_err(malformed)?;
        if version != VERSION {
            return Err(StateError::Version {
                machine: MACHINE,
                got: version,
                expected: VERSION,
            });
        }
        let t = read_v1(&mut r).map_err(malformed)?;
        *input = r.rest();
        Ok(t)
    }
}

fn read_v1(r: &mut Reader<'_>) -> Result<CommandTracker, WireError> {
    let flags = r.u8("flags")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::Invalid {
            field: "flags",
            detail: "unknown flag bits",
        });
    }
    let options = TrackerOptions {
        deprecate_eof: flags & DEPRECATE_EOF != 0,
        multi_statements: flags & MULTI_STATEMENTS != 0,
        mariadb: MariaDbCapabilities::from_bits_retain(r.u32("mariadb capabilities")?),
    };
    let status = StatusFlags::from_bits_retain(r.u16("status flags")?);
    let last = r.u32("last prepared statement")?;
    let mut t = CommandTracker::with_options(options, status);
    t.last_prepared = (flags & HAS_LAST_PREPARED != 0).then_some(last);
    if t.last_prepared.is_none() && last != 0 {
        return Err(WireError::Invalid {
            field: "last prepared statement",
            detail: "set without its flag",
        });
    }
    let n = count(r, PREPARED_LEN, "prepared statement count")?;
    let mut prepared = BTreeMap::new();
    let mut prev = None;
    for _ in 0..n {
        let id = ascending(
            r.u32("prepared statement id")?,
            &mut prev,
            "prepared statement id",
        )?;
        let p = PreparedStatement {
            params: r.u16("parameter count")?,
            columns: r.u16("column count")?,
        };
        prepared.insert(id, p);
    }
    t.prepared = prepared;
    t.cursors = id_set(r, "cursor")?;
    t.long_data = id_set(r, "long data")?;
    Ok(t)
}

/// Reads an element count and checks the input can hold that many
/// elements of `each` bytes, so a hostile count never allocates.
fn count(r: &mut Reader<'_>, each: usize, field: &'static str) -> Result<usize, WireError> {
    let n = usize::try_from(r.u32(field)?).map_err(|_| WireError::Truncated { field })?;
    if n.checked_mul(each)
        .is_none_or(|bytes| bytes > r.remaining())
    {
        return Err(WireError::Truncated { field });
    }
    Ok(n)
}

fn id_set(r: &mut Reader<'_>, field: &'static str) -> Result<BTreeSet<u32>, WireError> {
    let n = count(r, 4, field)?;
    let mut set = BTreeSet::new();
    let mut prev = None;
    for _ in 0..n {
        set.insert(ascending(r.u32(field)?, &mut prev, field)?);
    }
    Ok(set)
}

/// Ids are written in ascending order; anything else was not written by
/// [`CommandTracker::export`] (so one state has exactly one encoding).
fn ascending(id: u32, prev: &mut Option<u32>, field: &'static str) -> Result<u32, WireError> {
    if prev.is_some_and(|p| id <= p) {
        return Err(WireError::Invalid {
            field,
            detail: "statement ids out of order",
        });
    }
    *prev = Some(id);
    Ok(id)
}

/// Collections here are bounded by u32 statement ids.
fn len_u32(n: usize) -> u32 {
    // A set of u32 ids has at most 2^32 elements; that many would not fit
    // in memory anyway.
    u32::try_from(n).expect("fewer than 2^32 statements")
}

#[cfg(test)]
mod tests;
