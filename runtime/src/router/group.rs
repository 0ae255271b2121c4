//! The router's side of `[balance] routing-rule`: it keeps the core's
//! [`Groups`] in step with the backend set (each TiDB's labels, and its
//! backend cluster for the port rule), resolves a new connection's group,
//! and says which group a backend is in, so a new session, a restore or a
//! move is only ever given a TiDB of its own group.

use std::net::SocketAddr;
use std::sync::Arc;

use tiproxy_core::balance::{ClientInfo, GroupEvent, GroupId, NoGroup, RoutingRule};
use tracing::{info, warn};

use super::{Backend, Router};
use crate::config::BackendEntry;

/// Where a backend may be picked from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Any backend (the default rule: one group of every TiDB).
    Every,
    /// Only the TiDBs of this group.
    Group(GroupId),
}

/// What a new connection is routed by: its client's address (after a
/// PROXY header), the TCP peer's, and the local address it reached.
pub fn client_info(
    client: SocketAddr,
    tcp_peer: SocketAddr,
    local: Option<SocketAddr>,
) -> ClientInfo {
    ClientInfo {
        client: Some(client.ip()),
        proxy: Some(tcp_peer.ip()),
        listener_port: local.map(|l| l.port()),
    }
}

impl Router {
    /// The routing rule.
    pub fn rule(&self) -> RoutingRule {
        self.groups.lock().expect("groups lock").rule()
    }

    /// The scope of a new connection from `client`; under a rule, the
    /// reason it has none (the client's error).
    pub fn scope_for(&self, client: &ClientInfo) -> Result<Scope, NoGroup> {
        let groups = self.groups.lock().expect("groups lock");
        if groups.rule() == RoutingRule::All {
            return Ok(Scope::Every);
        }
        groups.route(client).map(Scope::Group)
    }

    /// The scope a session on `b` stays in (a restore, an operator's
    /// move); `None`: `b` is in no group, so no other backend is its peer.
    pub fn scope_of(&self, b: &Backend) -> Option<Scope> {
        let groups = self.groups.lock().expect("groups lock");
        if groups.rule() == RoutingRule::All {
            return Some(Scope::Every);
        }
        groups.group_of(&b.addr).map(Scope::Group)
    }

    /// Whether `b` is in `scope`.
    pub fn in_scope(&self, b: &Backend, scope: Scope) -> bool {
        match scope {
            Scope::Every => true,
            Scope::Group(g) => {
                self.groups.lock().expect("groups lock").group_of(&b.addr) == Some(g)
            }
        }
    }

    /// What `b`'s group is keyed by (its CIDRs or `cluster:port`), for the
    /// API: `None` under the default rule (one group of every TiDB) or
    /// when `b` is in no group (an empty list).
    pub fn group_values(&self, b: &Backend) -> Option<Vec<String>> {
        let groups = self.groups.lock().expect("groups lock");
        if groups.rule() == RoutingRule::All {
            return None;
        }
        let g = groups.group_of(&b.addr);
        Some(
            groups
                .groups()
                .find(|(id, _)| Some(*id) == g)
                .map(|(_, v)| v.to_vec())
                .unwrap_or_default(),
        )
    }

    /// Each backend's group, for the balance loop (every backend is in the
    /// one group under the default rule).
    pub fn group_ids(&self, backends: &[Arc<Backend>]) -> Vec<Option<GroupId>> {
        let groups = self.groups.lock().expect("groups lock");
        backends.iter().map(|b| groups.group_of(&b.addr)).collect()
    }

    /// The group of each listed backend: `entries[i]` (of backend cluster
    /// `clusters[i]`, `""` when unnamed) by its labels, a backend kept only
    /// for its sessions by what it had. Logs what the operator should
    /// hear: a group formed or ended, a TiDB without the label, a label
    /// that cannot be read or that changed.
    pub(super) fn regroup(
        &self,
        next: &[Arc<Backend>],
        entries: &[BackendEntry],
        clusters: &[&str],
    ) {
        let mut groups = self.groups.lock().expect("groups lock");
        let rule = groups.rule();
        let listed: Vec<(String, Vec<String>)> = next
            .iter()
            .map(|b| {
                let values = match entries.iter().position(|e| e.addr() == b.addr) {
                    Some(i) => {
                        let labels = match &entries[i] {
                            BackendEntry::Full { labels, .. } => labels.clone(),
                            BackendEntry::Addr(_) => Default::default(),
                        };
                        rule.values(&labels, clusters.get(i).copied().unwrap_or(""))
                    }
                    None => groups
                        .values_of(&b.addr)
                        .map(<[_]>::to_vec)
                        .unwrap_or_default(),
                };
                (b.addr.clone(), values)
            })
            .collect();
        let label = rule.label().unwrap_or("");
        for e in groups.update(&listed) {
            match e {
                GroupEvent::Created(g, values) if rule != RoutingRule::All => {
                    info!(group = g.0, ?values, "routing group formed");
                }
                GroupEvent::Ended(g) if rule != RoutingRule::All => {
                    info!(group = g.0, "routing group ended: its last TiDB left");
                }
                GroupEvent::Created(..) | GroupEvent::Ended(_) => {}
                GroupEvent::Unlabelled(addr) => warn!(
                    backend = %addr,
                    "TiDB has no `{label}` label: with balance.routing-rule = \"{}\" it gets no sessions",
                    rule.name()
                ),
                GroupEvent::BadLabel(addr, value) => warn!(
                    backend = %addr,
                    "TiDB's `{label}` label holds {value:?}, not a {}: it gets no sessions until it is fixed",
                    if label == tiproxy_core::balance::PORT_LABEL { "port" } else { "CIDR" }
                ),
                GroupEvent::Changed(addr, values) => warn!(
                    backend = %addr,
                    ?values,
                    "backend routing values changed, keep the existing group until it is removed"
                ),
            }
        }
    }
}
