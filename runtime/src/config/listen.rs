//! Which SQL addresses the proxy listens on: `proxy.addr` (a comma list)
//! and TiProxy's `proxy.port-range` (one host, one listener per port).
//! Owns the rules only; binding is the proxy's.

use super::{ProxyConfig, check_host_port, split_list};

impl ProxyConfig {
    /// The SQL listen addresses, as TiProxy's `GetSQLAddrs`: without
    /// `port-range`, every entry of `addr`; with it, `addr` must be one
    /// `host:port` and its port is replaced by each port of the inclusive
    /// range. Errors name the key at fault and say what to fix.
    pub fn sql_addrs(&self) -> Result<Vec<String>, (&'static str, String)> {
        let addrs = split_list(&self.addr);
        if addrs.is_empty() {
            return Err((
                "proxy.addr",
                "must name at least one host:port to listen on".into(),
            ));
        }
        for a in &addrs {
            check_host_port(a).map_err(|m| ("proxy.addr", m))?;
        }
        if self.port_range.is_empty() {
            return Ok(addrs);
        }
        let [start, end] = self.port_range[..] else {
            return Err((
                "proxy.port-range",
                format!(
                    "{:?} must hold exactly two ports, the first and the last (e.g. [6000, 6009])",
                    self.port_range
                ),
            ));
        };
        if !(1..=65535).contains(&start) || !(1..=65535).contains(&end) || start > end {
            return Err((
                "proxy.port-range",
                format!(
                    "[{start}, {end}] is not a range of ports; use 1 <= first <= last <= 65535"
                ),
            ));
        }
        let [addr] = &addrs[..] else {
            return Err((
                "proxy.addr",
                format!(
                    "\"{}\" names {} addresses; with proxy.port-range it must name exactly one host",
                    self.addr,
                    addrs.len()
                ),
            ));
        };
        // check_host_port accepted it, so it has a `:port` to cut.
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        Ok((start..=end).map(|p| format!("{host}:{p}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::ProxyConfig;

    fn cfg(addr: &str, range: &[i64]) -> ProxyConfig {
        ProxyConfig {
            addr: addr.into(),
            port_range: range.to_vec(),
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn port_range_gives_one_address_per_port_on_the_one_host() {
        assert_eq!(
            cfg("127.0.0.1:6000", &[7000, 7002]).sql_addrs().unwrap(),
            ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
        );
        assert_eq!(
            cfg("[::1]:6000", &[7000, 7000]).sql_addrs().unwrap(),
            ["[::1]:7000"]
        );
        assert_eq!(cfg(" a:1 , b:2 ", &[]).sql_addrs().unwrap(), ["a:1", "b:2"]);
    }

    #[test]
    fn bad_port_ranges_name_the_key_at_fault() {
        for (addr, range, key) in [
            ("127.0.0.1:6000", &[7000][..], "proxy.port-range"),
            (
                "127.0.0.1:6000",
                &[7000, 7001, 7002][..],
                "proxy.port-range",
            ),
            ("127.0.0.1:6000", &[7001, 7000][..], "proxy.port-range"),
            ("127.0.0.1:6000", &[0, 7000][..], "proxy.port-range"),
            ("127.0.0.1:6000", &[7000, 70000][..], "proxy.port-range"),
            ("a:1,b:2", &[7000, 7001][..], "proxy.addr"),
            ("", &[7000, 7001][..], "proxy.addr"),
            ("nohost", &[][..], "proxy.addr"),
        ] {
            let e = cfg(addr, range).sql_addrs().unwrap_err();
            assert_eq!(e.0, key, "{addr} {range:?}: {}", e.1);
        }
    }
}
