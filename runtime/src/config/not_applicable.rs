//! TiProxy keys this build accepts but does not act on: each is reported
//! at start-up, when set, with the reason (the drop-in test holds every one).

use super::Config;

impl Config {
    /// TiProxy keys that do not apply to this build, each with the reason
    /// the user sees at start-up when it is set.
    pub(super) fn not_applicable(&self, file: &str, warnings: &mut Vec<String>) {
        if !self.proxy.backend_clusters.is_empty() {
            warnings.push(format!(
                "{file}: proxy.backend-clusters is not implemented and is ignored: \
                 this build serves the one TiDB cluster of proxy.pd-addrs (or \
                 proxy.backend-addrs), with the system's DNS resolver; run one proxy \
                 per cluster"
            ));
        }
        let set = [
            (
                !self.proxy.public_endpoints.is_empty(),
                "proxy.public-endpoints",
                "it tells TiDB Cloud's traffic metering which clients are public; \
                 there is no metering here",
            ),
            (
                !self.metering.is_empty(),
                "[metering]",
                "TiDB Cloud's usage metering; there is no metering here",
            ),
            (
                !self.balance.routing_rule.is_empty(),
                "balance.routing-rule",
                "it picks one of proxy.backend-clusters by client or proxy address or port; \
                 this build serves one cluster",
            ),
            (
                self.log.simple,
                "log.simple",
                "TiProxy's tiproxyctl-style short lines; log.encoder chooses the format here",
            ),
        ];
        for (_, key, why) in set.into_iter().filter(|(on, _, _)| *on) {
            warnings.push(format!(
                "{file}: {key} does not apply here and is ignored: {why}"
            ));
        }
    }
}
