//! TiProxy's backend groups, `[balance] routing-rule`: which TiDBs form a
//! group, and which group a new connection belongs to. Balancing never
//! crosses a group: a new session is routed inside its group and a
//! rebalance plan moves sessions only between TiDBs of one group
//! ([`super::plan_grouped`]).
//!
//! As TiProxy (`pkg/balance/router/group.go`, `router_score.go`):
//! - `""` (the default): every TiDB is in one group;
//! - `client_cidr` / `proxy_cidr`: a TiDB's `cidr` label (a comma list of
//!   CIDRs) says which clients it serves; TiDBs whose lists share a CIDR
//!   form one group, whose CIDRs are the union of its members' lists. A
//!   connection goes to the first group containing the client's address
//!   (`client_cidr`) or the address the TCP connection came from
//!   (`proxy_cidr`: the proxy in front, when a PROXY header named another
//!   client; without one it is the client's);
//! - `port`: a TiDB's `tiproxy-port` label names the listener port of this
//!   proxy that serves it (per backend cluster: the same port claimed by
//!   two clusters routes nobody, TiProxy's port conflict).
//!
//! A TiDB without the label joins no group and gets no session. A TiDB
//! keeps its group while it is listed, even if its labels change (logged),
//! so its sessions never find themselves in another group; a group ends
//! with its last TiDB.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// The TiDB label the CIDR rules read.
pub const CIDR_LABEL: &str = "cidr";
/// The TiDB label the port rule reads.
pub const PORT_LABEL: &str = "tiproxy-port";

/// TiProxy's `[balance] routing-rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutingRule {
    /// `""`: one group of every TiDB.
    #[default]
    All,
    /// `client_cidr`: by the client's address.
    ClientCidr,
    /// `proxy_cidr`: by the address the TCP connection came from.
    ProxyCidr,
    /// `port`: by the listener port the connection came in on.
    Port,
}

impl RoutingRule {
    /// Parses the values TiProxy's config accepts.
    pub fn parse(s: &str) -> Option<RoutingRule> {
        match s {
            "" => Some(RoutingRule::All),
            "client_cidr" => Some(RoutingRule::ClientCidr),
            "proxy_cidr" => Some(RoutingRule::ProxyCidr),
            "port" => Some(RoutingRule::Port),
            _ => None,
        }
    }

    /// The config's name.
    pub fn name(self) -> &'static str {
        match self {
            RoutingRule::All => "",
            RoutingRule::ClientCidr => "client_cidr",
            RoutingRule::ProxyCidr => "proxy_cidr",
            RoutingRule::Port => "port",
        }
    }

    /// The label this rule reads, if any.
    pub fn label(self) -> Option<&'static str> {
        match self {
            RoutingRule::All => None,
            RoutingRule::ClientCidr | RoutingRule::ProxyCidr => Some(CIDR_LABEL),
            RoutingRule::Port => Some(PORT_LABEL),
        }
    }

    /// What a TiDB of `cluster` with `labels` is grouped by: its CIDRs, or
    /// `cluster:port` (`port` alone for an unnamed cluster); empty when the
    /// label is missing (or for the one-group rule).
    pub fn values(self, labels: &BTreeMap<String, String>, cluster: &str) -> Vec<String> {
        let Some(v) = self.label().and_then(|l| labels.get(l)) else {
            return Vec::new();
        };
        match self {
            RoutingRule::All => Vec::new(),
            RoutingRule::ClientCidr | RoutingRule::ProxyCidr => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            RoutingRule::Port => match v.trim() {
                "" => Vec::new(),
                p if cluster.is_empty() => vec![p.to_string()],
                p => vec![format!("{cluster}:{p}")],
            },
        }
    }
}

/// What is known of a new connection when it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientInfo {
    /// The client's address (from the PROXY header when one came).
    pub client: Option<IpAddr>,
    /// The address the TCP connection came from.
    pub proxy: Option<IpAddr>,
    /// The port of this proxy's listener it came in on.
    pub listener_port: Option<u16>,
}

/// A group, unique for the life of a [`Groups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

/// Why a connection has no group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoGroup {
    /// No TiDB is grouped yet.
    Empty,
    /// No group's CIDRs contain the address.
    Address {
        /// The rule.
        rule: RoutingRule,
        /// The address matched (`None`: not known).
        addr: Option<IpAddr>,
    },
    /// No TiDB is labelled with the listener port.
    Port(Option<u16>),
    /// TiDBs of two backend clusters claim the listener port.
    PortConflict(u16),
}

impl fmt::Display for NoGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoGroup::Empty => write!(f, "no TiDB is in a routing group yet"),
            NoGroup::Address { rule, addr } => {
                let which = match rule {
                    RoutingRule::ProxyCidr => "proxy",
                    _ => "client",
                };
                let addr = addr.map_or_else(|| "unknown".to_string(), |a| a.to_string());
                write!(
                    f,
                    "no TiDB serves {which} address {addr}: balance.routing-rule = \"{}\" and no \
                     TiDB's `{CIDR_LABEL}` label contains it",
                    rule.name()
                )
            }
            NoGroup::Port(p) => {
                let p = p.map_or_else(|| "unknown".to_string(), |p| p.to_string());
                write!(
                    f,
                    "no TiDB serves listener port {p}: balance.routing-rule = \"port\" and no \
                     TiDB's `{PORT_LABEL}` label names it"
                )
            }
            NoGroup::PortConflict(p) => {
                write!(
                    f,
                    "listener port {p} is claimed by multiple backend clusters"
                )
            }
        }
    }
}

/// Something a [`Groups::update`] did that the operator should hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent<K> {
    /// A group was formed with these values.
    Created(GroupId, Vec<String>),
    /// A group lost its last TiDB.
    Ended(GroupId),
    /// A TiDB appeared without the rule's label: it gets no session.
    Unlabelled(K),
    /// A TiDB's label cannot be read (a bad CIDR or port): it gets no
    /// session until it is fixed.
    BadLabel(K, String),
    /// A grouped TiDB's label changed; it stays in its group until it
    /// leaves the backend set.
    Changed(K, Vec<String>),
}

#[derive(Debug, Clone)]
struct Group {
    id: GroupId,
    values: Vec<String>,
    cidrs: Vec<IpNetwork>,
}

#[derive(Debug, Clone)]
struct Member {
    group: Option<GroupId>,
    /// Its values when last listed.
    seen: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum PortRoute {
    Group(GroupId),
    Conflict,
}

/// The groups of the listed TiDBs, keyed by `K` (the runtime's address).
#[derive(Debug, Clone)]
pub struct Groups<K> {
    rule: RoutingRule,
    next: u32,
    groups: Vec<Group>,
    members: BTreeMap<K, Member>,
    ports: BTreeMap<u16, PortRoute>,
}

fn parse_cidrs(values: &[String]) -> Result<Vec<IpNetwork>, String> {
    values
        .iter()
        .map(|v| v.parse::<IpNetwork>().map_err(|_| v.clone()))
        .collect()
}

/// The port of a port rule value (`cluster:port` or `port`).
fn port_of(value: &str) -> Option<u16> {
    value
        .rsplit_once(':')
        .map_or(value, |(_, p)| p)
        .parse()
        .ok()
}

impl<K: Ord + Clone> Default for Groups<K> {
    /// The default rule, one group of every TiDB.
    fn default() -> Self {
        Self::new(RoutingRule::All)
    }
}

impl<K: Ord + Clone> Groups<K> {
    /// No TiDB yet.
    pub fn new(rule: RoutingRule) -> Self {
        Self {
            rule,
            next: 0,
            groups: Vec::new(),
            members: BTreeMap::new(),
            ports: BTreeMap::new(),
        }
    }

    /// The rule.
    pub fn rule(&self) -> RoutingRule {
        self.rule
    }

    /// Makes `listed` (each TiDB with its [`RoutingRule::values`]) the
    /// members: a new TiDB joins the first group it shares a value with,
    /// or forms one; a listed TiDB keeps its group; an unlisted one leaves.
    pub fn update(&mut self, listed: &[(K, Vec<String>)]) -> Vec<GroupEvent<K>> {
        let mut events = Vec::new();
        self.members
            .retain(|k, _| listed.iter().any(|(l, _)| l == k));
        for (key, values) in listed {
            let was = self.members.get(key).cloned();
            if let Some(m) = &was
                && m.group.is_some()
            {
                if m.seen != *values {
                    events.push(GroupEvent::Changed(key.clone(), values.clone()));
                    self.members.get_mut(key).expect("listed").seen = values.clone();
                }
                continue;
            }
            let fresh = was.as_ref().is_none_or(|m| m.seen != *values);
            let group = self.join(key, values, fresh, &mut events);
            self.members.insert(
                key.clone(),
                Member {
                    group,
                    seen: values.clone(),
                },
            );
        }
        let members = &self.members;
        self.groups.retain(|g| {
            let live = members.values().any(|m| m.group == Some(g.id));
            if !live {
                events.push(GroupEvent::Ended(g.id));
            }
            live
        });
        self.refresh();
        events
    }

    /// The group a TiDB without one joins, if any.
    fn join(
        &mut self,
        key: &K,
        values: &[String],
        fresh: bool,
        events: &mut Vec<GroupEvent<K>>,
    ) -> Option<GroupId> {
        if self.rule == RoutingRule::All {
            if self.groups.is_empty() {
                self.create(Vec::new(), Vec::new(), events);
            }
            return Some(self.groups[0].id);
        }
        if values.is_empty() {
            if fresh {
                events.push(GroupEvent::Unlabelled(key.clone()));
            }
            return None;
        }
        let cidrs = match self.rule {
            RoutingRule::ClientCidr | RoutingRule::ProxyCidr => match parse_cidrs(values) {
                Ok(c) => c,
                Err(bad) => {
                    if fresh {
                        events.push(GroupEvent::BadLabel(key.clone(), bad));
                    }
                    return None;
                }
            },
            _ => {
                if let Some(bad) = values.iter().find(|v| port_of(v).is_none()) {
                    if fresh {
                        events.push(GroupEvent::BadLabel(key.clone(), bad.clone()));
                    }
                    return None;
                }
                Vec::new()
            }
        };
        if let Some(g) = self
            .groups
            .iter()
            .find(|g| g.values.iter().any(|v| values.contains(v)))
        {
            return Some(g.id);
        }
        Some(self.create(values.to_vec(), cidrs, events))
    }

    fn create(
        &mut self,
        values: Vec<String>,
        cidrs: Vec<IpNetwork>,
        events: &mut Vec<GroupEvent<K>>,
    ) -> GroupId {
        let id = GroupId(self.next);
        self.next += 1;
        events.push(GroupEvent::Created(id, values.clone()));
        self.groups.push(Group { id, values, cidrs });
        id
    }

    /// A CIDR group's values become the union of its members' current
    /// CIDRs (TiProxy's `RefreshCidr`: a TiDB's endpoints may grow or
    /// shrink); the port routes are rebuilt.
    fn refresh(&mut self) {
        if matches!(self.rule, RoutingRule::ClientCidr | RoutingRule::ProxyCidr) {
            for g in &mut self.groups {
                let mut values: Vec<String> = Vec::new();
                for m in self.members.values().filter(|m| m.group == Some(g.id)) {
                    for v in &m.seen {
                        if !values.contains(v) {
                            values.push(v.clone());
                        }
                    }
                }
                // A value that no longer parses is left out, the rest kept.
                g.cidrs = values.iter().filter_map(|v| v.parse().ok()).collect();
                g.values = values;
            }
        }
        self.ports.clear();
        if self.rule == RoutingRule::Port {
            // Which cluster claims each port; two clusters: conflict.
            let mut owner: BTreeMap<u16, &str> = BTreeMap::new();
            for g in &self.groups {
                for v in &g.values {
                    let Some(port) = port_of(v) else { continue };
                    let cluster = v.rsplit_once(':').map_or("", |(c, _)| c);
                    match owner.get(&port) {
                        Some(c) if *c != cluster => {
                            self.ports.insert(port, PortRoute::Conflict);
                        }
                        Some(_) => {}
                        None => {
                            owner.insert(port, cluster);
                            self.ports.insert(port, PortRoute::Group(g.id));
                        }
                    }
                }
            }
        }
    }

    /// What the TiDB `key` was grouped by when last listed.
    pub fn values_of(&self, key: &K) -> Option<&[String]> {
        self.members.get(key).map(|m| m.seen.as_slice())
    }

    /// The group of the TiDB `key`, if it has one.
    pub fn group_of(&self, key: &K) -> Option<GroupId> {
        self.members.get(key).and_then(|m| m.group)
    }

    /// Each group with its values (CIDRs or ports; empty for the one
    /// group of every TiDB).
    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &[String])> {
        self.groups.iter().map(|g| (g.id, g.values.as_slice()))
    }

    /// The group a new connection from `client` belongs to.
    pub fn route(&self, client: &ClientInfo) -> Result<GroupId, NoGroup> {
        match self.rule {
            RoutingRule::All => self.groups.first().map(|g| g.id).ok_or(NoGroup::Empty),
            RoutingRule::ClientCidr | RoutingRule::ProxyCidr => {
                let addr = if self.rule == RoutingRule::ClientCidr {
                    client.client
                } else {
                    client.proxy.or(client.client)
                };
                let no = NoGroup::Address {
                    rule: self.rule,
                    addr,
                };
                let ip = addr.ok_or_else(|| no.clone())?;
                // An IPv4 client on an IPv6 socket is matched as IPv4.
                let ip = match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                };
                self.groups
                    .iter()
                    .find(|g| g.cidrs.iter().any(|c| c.contains(ip)))
                    .map(|g| g.id)
                    .ok_or(no)
            }
            RoutingRule::Port => {
                let port = client.listener_port.ok_or(NoGroup::Port(None))?;
                match self.ports.get(&port) {
                    Some(PortRoute::Group(g)) => Ok(*g),
                    Some(PortRoute::Conflict) => Err(NoGroup::PortConflict(port)),
                    None => Err(NoGroup::Port(Some(port))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
