//! `[ha]`: TiProxy's virtual IP failover (v1.2): the address the elected
//! proxy holds, the interface it is added to, and how many gratuitous ARP
//! packets announce a takeover. Names and defaults are TiProxy's
//! (`lib/config/proxy.go`). Applied by [`crate::ha`]; a change needs a
//! restart (TiProxy: `reloadable:"false"`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// `[ha]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct HaConfig {
    /// The floating address, `A.B.C.D/prefix` (TiProxy advises a host route
    /// such as `/32` so only the owner answers for it). Empty: off.
    pub virtual_ip: String,
    /// The interface the owner adds the address to and sends ARP from.
    pub interface: String,
    /// Gratuitous ARP packets sent at once when this proxy takes the
    /// address (0 means 1, as in TiProxy).
    pub garp_burst_count: i64,
    /// Follow-up bursts, one a second, after a takeover: they refresh
    /// neighbour caches that missed the first one.
    pub garp_refresh_count: i64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            virtual_ip: String::new(),
            interface: String::new(),
            garp_burst_count: 5,
            garp_refresh_count: 30,
        }
    }
}

/// A checked `[ha]`: what [`crate::ha`] runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualIp {
    /// The address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The interface it goes on.
    pub interface: String,
    /// Packets per gratuitous ARP burst (at least 1).
    pub garp_burst: u32,
    /// Follow-up bursts after a takeover.
    pub garp_refresh: u32,
}

impl HaConfig {
    /// The virtual IP to manage, `None` when `[ha]` is off. As in TiProxy,
    /// only one of `virtual-ip` and `interface` set turns it off with a
    /// warning. `Err` is (key, message).
    pub fn virtual_ip(&self) -> Result<Option<VirtualIp>, (&'static str, String)> {
        if self.garp_burst_count < 0 {
            return Err(("ha.garp-burst-count", "must be 0 or more".into()));
        }
        if self.garp_refresh_count < 0 {
            return Err(("ha.garp-refresh-count", "must be 0 or more".into()));
        }
        let (vip, interface) = (self.virtual_ip.trim(), self.interface.trim());
        if vip.is_empty() || interface.is_empty() {
            return Ok(None);
        }
        let (addr, prefix) = vip.split_once('/').ok_or((
            "ha.virtual-ip",
            format!("\"{vip}\" has no prefix length; write it as A.B.C.D/32"),
        ))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            (
                "ha.virtual-ip",
                format!("\"{vip}\": \"{addr}\" is not an IPv4 address"),
            )
        })?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or((
            "ha.virtual-ip",
            format!("\"{vip}\": the prefix length must be 0 to 32"),
        ))?;
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err((
                "ha.virtual-ip",
                format!("\"{vip}\" is not a unicast address"),
            ));
        }
        Ok(Some(VirtualIp {
            addr,
            prefix,
            interface: interface.to_string(),
            garp_burst: self.garp_burst_count.clamp(1, u32::MAX as i64) as u32,
            garp_refresh: self.garp_refresh_count.min(u32::MAX as i64) as u32,
        }))
    }

    /// Whether exactly one of `virtual-ip` and `interface` is set (TiProxy
    /// then runs without a virtual IP and says so).
    pub fn half_set(&self) -> bool {
        self.virtual_ip.trim().is_empty() != self.interface.trim().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ha(vip: &str, interface: &str) -> HaConfig {
        HaConfig {
            virtual_ip: vip.into(),
            interface: interface.into(),
            ..HaConfig::default()
        }
    }

    #[test]
    fn defaults_are_tiproxys_and_off() {
        let d = HaConfig::default();
        assert_eq!((d.garp_burst_count, d.garp_refresh_count), (5, 30));
        assert_eq!(d.virtual_ip(), Ok(None));
    }

    #[test]
    fn a_full_section_is_parsed() {
        let v = ha("10.0.0.9/32", "eth0").virtual_ip().unwrap().unwrap();
        assert_eq!(v.addr, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!((v.prefix, v.interface.as_str()), (32, "eth0"));
        assert_eq!((v.garp_burst, v.garp_refresh), (5, 30));
        let zero = HaConfig {
            garp_burst_count: 0,
            ..ha("10.0.0.9/24", "eth0")
        };
        assert_eq!(zero.virtual_ip().unwrap().unwrap().garp_burst, 1);
    }

    #[test]
    fn half_a_section_is_off() {
        assert_eq!(ha("10.0.0.9/32", "").virtual_ip(), Ok(None));
        assert!(ha("10.0.0.9/32", "").half_set());
        assert!(!ha("", "").half_set());
    }

    #[test]
    fn a_change_needs_a_restart() {
        let old = crate::config::Config::default();
        let mut new = old.clone();
        new.ha = ha("10.0.0.9/32", "eth0");
        let (live, restart) = crate::config::classify(&old, &new, true);
        assert!(live.is_empty(), "{live:?}");
        assert_eq!(restart, ["ha.interface", "ha.virtual-ip"]);
    }

    #[test]
    fn bad_values_name_the_key() {
        for bad in [
            "10.0.0.9",
            "10.0.0/32",
            "10.0.0.9/33",
            "fe80::1/64",
            "0.0.0.0/32",
        ] {
            let e = ha(bad, "eth0").virtual_ip().unwrap_err();
            assert_eq!(e.0, "ha.virtual-ip", "{bad}: {}", e.1);
        }
        let neg = HaConfig {
            garp_refresh_count: -1,
            ..HaConfig::default()
        };
        assert_eq!(neg.virtual_ip().unwrap_err().0, "ha.garp-refresh-count");
    }
}
