//! `[proxy.frontend-keepalive]`, `[proxy.backend-healthy-keepalive]` and
//! `[proxy.backend-unhealthy-keepalive]`: the three keepalive profiles with
//! TiProxy's defaults, and how their tables are read (seconds or Go
//! durations; keys left out keep the profile's default).

use serde::{Deserialize, Serialize};

use super::parse_duration;

/// TCP keepalive settings, in seconds: an integer, or a Go duration string
/// as TiProxy writes them (`"60s"`, `"1m"`; a fraction of a second rounds
/// up). Keys a table leaves out keep that profile's default, as TiProxy
/// decodes onto its defaults. Applied by [`crate::keepalive`].
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Keepalive {
    /// Whether keepalive is on.
    pub enabled: bool,
    /// Idle time before the first probe; 0 = system default.
    pub idle: u64,
    /// Probes before giving up; 0 = system default.
    pub cnt: u32,
    /// Interval between probes; 0 = system default.
    pub intvl: u64,
    /// TCP user timeout: how long sent data may stay unacknowledged; 0 =
    /// system default.
    pub timeout: u64,
}

/// A keepalive table as written: what it leaves out is `None`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KeepaliveTable {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "some_seconds")]
    idle: Option<u64>,
    cnt: Option<u32>,
    #[serde(default, deserialize_with = "some_seconds")]
    intvl: Option<u64>,
    #[serde(default, deserialize_with = "some_seconds")]
    timeout: Option<u64>,
}

impl Keepalive {
    /// TiProxy's `backend-healthy-keepalive`: conservative, to save CPU and
    /// ride out network hiccups.
    pub fn backend_healthy() -> Self {
        Self {
            enabled: true,
            idle: 60,
            cnt: 5,
            intvl: 3,
            timeout: 15,
        }
    }

    /// TiProxy's `backend-unhealthy-keepalive`: aggressive, such a TiDB may
    /// stop at any time.
    pub fn backend_unhealthy() -> Self {
        Self {
            enabled: true,
            idle: 10,
            cnt: 5,
            intvl: 1,
            timeout: 5,
        }
    }

    fn over<'de, D: serde::Deserializer<'de>>(d: D, base: Self) -> Result<Self, D::Error> {
        let t = KeepaliveTable::deserialize(d)?;
        Ok(Self {
            enabled: t.enabled.unwrap_or(base.enabled),
            idle: t.idle.unwrap_or(base.idle),
            cnt: t.cnt.unwrap_or(base.cnt),
            intvl: t.intvl.unwrap_or(base.intvl),
            timeout: t.timeout.unwrap_or(base.timeout),
        })
    }

    pub(super) fn frontend_over<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(d, Self::default())
    }

    pub(super) fn healthy_over<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(d, Self::backend_healthy())
    }

    pub(super) fn unhealthy_over<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::over(d, Self::backend_unhealthy())
    }
}

fn some_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    seconds(d).map(Some)
}

/// Whole seconds from an integer or a Go duration string (rounded up).
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Seconds;
    impl serde::de::Visitor<'_> for Seconds {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("seconds, as an integer or a duration like \"60s\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            let d = parse_duration(v).map_err(E::custom)?;
            Ok(d.as_secs() + u64::from(d.subsec_nanos() > 0))
        }
    }
    d.deserialize_any(Seconds)
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            enabled: true,
            idle: 0,
            cnt: 0,
            intvl: 0,
            timeout: 0,
        }
    }
}
