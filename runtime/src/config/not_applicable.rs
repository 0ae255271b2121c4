//! TiProxy keys this build accepts but does not act on: each is reported
//! at start-up, when set, with the reason (the drop-in test holds every one).

use super::Config;

impl Config {
    /// TiProxy keys that do not apply to this build, each with the reason
    /// the user sees at start-up when it is set.
    pub(super) fn not_applicable(&self, file: &str, warnings: &mut Vec<String>) {
        for c in self
            .proxy
            .backend_clusters
            .iter()
            .filter(|c| !c.ns_servers.is_empty())
        {
            warnings.push(format!(
                "{file}: proxy.backend-clusters[{}].ns-servers does not apply here and is \
                 ignored: it names TiDB Cloud's per-cluster DNS servers for its tenants' \
                 private names; this build resolves PD and TiDB names with the system's \
                 resolver for every cluster",
                c.name.trim()
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
