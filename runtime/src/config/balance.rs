//! `[balance]` and its `[balance.<factor>]` sections, typed: each key with
//! its default, its meaning and its reload class. The defaults of the rates
//! are the core's ([`tiproxy_core::balance::Rates::default`]), so the
//! planner and the file agree by construction.
//!
//! Reload class: every key here applies on the balance loop's next tick,
//! except those in [`RESTART_REQUIRED`].

use serde::{Deserialize, Serialize};
use tiproxy_core::balance::{
    COUNT_RATIO_THRESHOLD, CPU_RATE, EVACUATION_RATE, LOCATION_RATE, Policy, REBALANCE_RATE, Rates,
    Routing, RoutingRule,
};

use super::ConfigError;

/// Keys of `[balance]` that take effect only after a restart (the label
/// also picks the TiDBs PD discovery uses; the routing rule forms the
/// groups sessions live in, not reloadable in TiProxy either). Every other
/// key is reloadable.
pub const RESTART_REQUIRED: &[&str] = &["balance.label-name", "balance.routing-rule"];

/// `[balance]`: TiProxy's policy, routing rule and policy, label matching
/// and per-factor rates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct BalanceConfig {
    /// Label used to match backends to this proxy. Restart required.
    pub label_name: String,
    /// How TiDBs form groups that sessions never leave: `""` (one group),
    /// `client_cidr` or `proxy_cidr` (by the TiDBs' `cidr` label and the
    /// connection's source), `port` (by their `tiproxy-port` label and the
    /// listener port). Restart required.
    pub routing_rule: String,
    /// `resource`, `location` or `connection`. Reloadable.
    pub policy: String,
    /// How a new connection picks among the ranked backends: `prefer-idle`
    /// (at random among those the balancer would not move sessions away
    /// from) or `random` (among all, the best slightly favoured).
    /// Reloadable.
    pub routing_policy: String,
    /// `[balance.status]`: evacuating draining or removed TiDBs.
    pub status: StatusFactor,
    /// `[balance.health]`: TiDB's error rates towards PD and TiKV.
    pub health: HealthFactor,
    /// `[balance.memory]`: moves away from a TiDB at memory risk.
    pub memory: MemoryFactor,
    /// `[balance.cpu]`: moves away from a TiDB busier on CPU.
    pub cpu: CpuFactor,
    /// `[balance.location]`: moves into this proxy's zone.
    pub location: LocationFactor,
    /// `[balance.conn-count]`: moves evening out session counts.
    pub conn_count: ConnCountFactor,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            label_name: String::new(),
            routing_rule: String::new(),
            policy: "resource".into(),
            routing_policy: "prefer-idle".into(),
            status: StatusFactor::default(),
            health: HealthFactor::default(),
            memory: MemoryFactor::default(),
            cpu: CpuFactor::default(),
            location: LocationFactor::default(),
            conn_count: ConnCountFactor::default(),
        }
    }
}

/// `[balance.status]`. Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct StatusFactor {
    /// Move requests per second away from a draining or removed TiDB;
    /// 0 means the default, 5000.
    pub migrations_per_second: f64,
}

impl Default for StatusFactor {
    fn default() -> Self {
        Self {
            migrations_per_second: EVACUATION_RATE,
        }
    }
}

/// `[balance.health]`: sessions leave a TiDB whose requests to PD or TiKV
/// fail (see [`tiproxy_core::balance::HealthMeter`]). Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct HealthFactor {
    /// Whether the factor is used (accepted; always on).
    pub enabled: bool,
    /// Move requests per second away from a failing TiDB; 0 means
    /// TiProxy's pace, all its sessions within 60 s.
    pub migrations_per_second: f64,
}

impl Default for HealthFactor {
    fn default() -> Self {
        Self {
            enabled: true,
            migrations_per_second: 0.0,
        }
    }
}

/// `[balance.memory]`. Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct MemoryFactor {
    /// Whether the factor is used (accepted; always on).
    pub enabled: bool,
    /// Move requests per second away from a TiDB at memory risk. Unset (or
    /// 0): TiProxy's pace, all its sessions within 10 s at OOM risk (75% of
    /// its memory quota), within 60 s from 60%.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrations_per_second: Option<f64>,
}

impl Default for MemoryFactor {
    fn default() -> Self {
        Self {
            enabled: true,
            migrations_per_second: None,
        }
    }
}

/// `[balance.cpu]`. Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct CpuFactor {
    /// Whether the factor is used (accepted; always on).
    pub enabled: bool,
    /// Move requests per second away from a TiDB busier on CPU (two 5%
    /// steps and 20% more); 0 means the default, 20.
    pub migrations_per_second: f64,
}

impl Default for CpuFactor {
    fn default() -> Self {
        Self {
            enabled: true,
            migrations_per_second: CPU_RATE,
        }
    }
}

/// `[balance.location]`. Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct LocationFactor {
    /// Whether the factor is used (accepted; always on).
    pub enabled: bool,
    /// Move requests per second into this proxy's zone; 0 means the
    /// default, 10 (the planner's floor is one per 100 ms tick).
    pub migrations_per_second: f64,
}

impl Default for LocationFactor {
    fn default() -> Self {
        Self {
            enabled: true,
            migrations_per_second: LOCATION_RATE,
        }
    }
}

/// `[balance.conn-count]`. Reloadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case")]
pub struct ConnCountFactor {
    /// Sessions move from the busiest to the idlest TiDB when the busiest
    /// has more than this many times the sessions of the idlest (and two
    /// more); above 1, or 0 for the default, 1.2.
    pub count_ratio_threshold: f64,
    /// Move requests per second when balancing; 0 means the default, 100.
    pub migrations_per_second: f64,
}

impl Default for ConnCountFactor {
    fn default() -> Self {
        Self {
            count_ratio_threshold: COUNT_RATIO_THRESHOLD,
            migrations_per_second: REBALANCE_RATE,
        }
    }
}

impl BalanceConfig {
    /// The policy in effect (validated at load).
    pub fn policy(&self) -> Policy {
        Policy::parse(&self.policy).unwrap_or_default()
    }

    /// The routing policy in effect (validated at load).
    pub fn routing(&self) -> Routing {
        Routing::parse(&self.routing_policy).unwrap_or_default()
    }

    /// The routing rule in effect (validated at load).
    pub fn rule(&self) -> RoutingRule {
        RoutingRule::parse(&self.routing_rule).unwrap_or_default()
    }

    /// The per-second rates, for [`tiproxy_core::balance::BalanceConfig::new`].
    pub fn rates(&self) -> Rates {
        Rates {
            evacuation: self.status.migrations_per_second,
            rebalance: self.conn_count.migrations_per_second,
            cpu: self.cpu.migrations_per_second,
            memory: self.memory.migrations_per_second,
            location: self.location.migrations_per_second,
            health: Some(self.health.migrations_per_second).filter(|r| *r > 0.0),
            count_ratio_threshold: self.conn_count.count_ratio_threshold,
        }
    }

    /// The balance loop's knobs for one tick.
    pub fn plan_config(&self) -> tiproxy_core::balance::BalanceConfig {
        tiproxy_core::balance::BalanceConfig::new(self.policy(), &self.rates())
    }

    /// Checks the values (TiProxy's rules: rates are not negative, a
    /// threshold is 0 or above 1); a factor switched off is warned about,
    /// since every factor is always on here.
    pub(super) fn validate(
        &self,
        file: &str,
        warnings: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_string(),
            key: format!("balance.{key}"),
            message,
        };
        if Policy::parse(&self.policy).is_none() {
            return Err(err(
                "policy",
                format!(
                    "\"{}\" is not one of resource, location, connection",
                    self.policy
                ),
            ));
        }
        if Routing::parse(&self.routing_policy).is_none() {
            return Err(err(
                "routing-policy",
                format!(
                    "\"{}\" is not one of prefer-idle, random",
                    self.routing_policy
                ),
            ));
        }
        if RoutingRule::parse(&self.routing_rule).is_none() {
            // TiProxy: "invalid balance.routing-rule".
            return Err(err(
                "routing-rule",
                format!(
                    "invalid balance.routing-rule: \"{}\" is not one of client_cidr, \
                     proxy_cidr, port, or \"\" (one group of every TiDB)",
                    self.routing_rule
                ),
            ));
        }
        let rates = [
            ("status", Some(self.status.migrations_per_second)),
            ("health", Some(self.health.migrations_per_second)),
            ("memory", self.memory.migrations_per_second),
            ("cpu", Some(self.cpu.migrations_per_second)),
            ("location", Some(self.location.migrations_per_second)),
            ("conn-count", Some(self.conn_count.migrations_per_second)),
        ];
        for (factor, rate) in rates {
            if let Some(r) = rate
                && !(r.is_finite() && r >= 0.0)
            {
                return Err(err(
                    &format!("{factor}.migrations-per-second"),
                    format!("{r} is not a rate; use 0 (the default) or a positive number"),
                ));
            }
        }
        let t = self.conn_count.count_ratio_threshold;
        if !(t == 0.0 || (t.is_finite() && t > 1.0)) {
            return Err(err(
                "conn-count.count-ratio-threshold",
                format!("{t} is out of range; use a number above 1, or 0 for 1.2"),
            ));
        }
        for (factor, enabled) in [
            ("health", self.health.enabled),
            ("memory", self.memory.enabled),
            ("cpu", self.cpu.enabled),
            ("location", self.location.enabled),
        ] {
            if !enabled {
                warnings.push(format!(
                    "{file}: balance.{factor}.enabled = false is not implemented and is ignored"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        Config::from_toml(text, Path::new("proxy.toml"))
    }

    #[test]
    fn defaults_are_the_cores() {
        let (c, w) = parse("").unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            c.balance.plan_config(),
            tiproxy_core::balance::BalanceConfig::default()
        );
        // TiProxy's "0 means the default".
        let (c, _) = parse(
            "[balance.cpu]\nmigrations-per-second = 0\n[balance.conn-count]\n\
             count-ratio-threshold = 0\nmigrations-per-second = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.balance.plan_config(),
            tiproxy_core::balance::BalanceConfig::default()
        );
    }

    #[test]
    fn rates_become_per_tick_budgets() {
        let (c, _) = parse(
            "[balance]\npolicy = \"connection\"\n[balance.cpu]\nmigrations-per-second = 35\n\
             [balance.memory]\nmigrations-per-second = 1\n[balance.status]\nmigrations-per-second = 50\n\
             [balance.conn-count]\nmigrations-per-second = 200\ncount-ratio-threshold = 2\n",
        )
        .unwrap();
        let p = c.balance.plan_config();
        assert_eq!(p.policy, Policy::Connection);
        assert_eq!(p.cpu_budget, 4);
        assert_eq!(p.memory_budget, Some(1), "at least one per tick");
        assert_eq!(p.rebalance_budget, 20);
        assert_eq!(p.budget, 20, "the larger of evacuation and rebalance");
        assert_eq!(p.count_ratio_threshold, 2.0);
    }

    #[test]
    fn routing_policy_and_health_rate() {
        let (c, _) = parse("").unwrap();
        assert_eq!(c.balance.routing(), Routing::PreferIdle);
        assert_eq!(
            c.balance.plan_config().health_budget,
            None,
            "TiProxy's pace"
        );
        let (c, _) = parse(
            "[balance]\nrouting-policy = \"random\"\n[balance.health]\nmigrations-per-second = 30\n",
        )
        .unwrap();
        assert_eq!(c.balance.routing(), Routing::Random);
        assert_eq!(c.balance.plan_config().health_budget, Some(3));
        let e = parse("[balance]\nrouting-policy = \"idlest\"\n").unwrap_err();
        assert_eq!(e.key, "balance.routing-policy");
        assert!(e.to_string().contains("prefer-idle, random"), "{e}");
    }

    #[test]
    fn routing_rule_takes_tiproxy_values_and_needs_a_restart() {
        let (c, _) = parse("").unwrap();
        assert_eq!(c.balance.rule(), RoutingRule::All);
        for (v, r) in [
            ("client_cidr", RoutingRule::ClientCidr),
            ("proxy_cidr", RoutingRule::ProxyCidr),
            ("port", RoutingRule::Port),
        ] {
            let (c, w) = parse(&format!("[balance]\nrouting-rule = \"{v}\"\n")).unwrap();
            assert_eq!(c.balance.rule(), r);
            assert!(w.is_empty(), "acted on, not reported: {w:?}");
        }
        let e = parse("[balance]\nrouting-rule = \"username\"\n").unwrap_err();
        assert_eq!(e.key, "balance.routing-rule");
        assert!(
            e.to_string().contains("invalid balance.routing-rule"),
            "{e}"
        );
        let (old, _) = parse("").unwrap();
        let (new, _) = parse("[balance]\nrouting-rule = \"port\"\n").unwrap();
        let (live, restart) = crate::config::classify(&old, &new, true);
        assert!(live.is_empty(), "{live:?}");
        assert_eq!(restart, ["balance.routing-rule"]);
    }

    #[test]
    fn bad_rates_name_the_key() {
        let e = parse("[balance.cpu]\nmigrations-per-second = -1\n").unwrap_err();
        assert_eq!(e.key, "balance.cpu.migrations-per-second");
        assert!(e.to_string().contains("proxy.toml"), "{e}");
        let e = parse("[balance.memory]\nmigrations-per-second = nan\n").unwrap_err();
        assert_eq!(e.key, "balance.memory.migrations-per-second");
        let e = parse("[balance.conn-count]\ncount-ratio-threshold = 0.5\n").unwrap_err();
        assert_eq!(e.key, "balance.conn-count.count-ratio-threshold");
        let e = parse("[balance.location]\nmigrations-per-second = \"fast\"\n").unwrap_err();
        assert!(e.to_string().contains("migrations-per-second"), "{e}");
    }

    #[test]
    fn unknown_and_unimplemented_keys_warn() {
        let (_, w) =
            parse("[balance.cpu]\nmigrations-per-secnd = 3\n[balance.health]\nenabled = false\n")
                .unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter()
                .any(|w| w.contains("balance.cpu.migrations-per-secnd")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("balance.health.enabled")),
            "{w:?}"
        );
    }

    #[test]
    fn a_patch_keeps_the_other_factors() {
        let (base, _) = parse("[balance.cpu]\nmigrations-per-second = 7\n").unwrap();
        let (c, _) = base
            .patch(
                "[balance.location]\nmigrations-per-second = 3\n",
                Path::new("p"),
            )
            .unwrap();
        assert_eq!(c.balance.cpu.migrations_per_second, 7.0);
        assert_eq!(c.balance.location.migrations_per_second, 3.0);
        assert_eq!(c.balance.memory.migrations_per_second, None);
    }
}
