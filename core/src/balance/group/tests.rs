use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::super::{BackendLoad, BalanceConfig, plan_grouped};
use super::*;

fn labels(k: &str, v: &str) -> BTreeMap<String, String> {
    [(k.to_string(), v.to_string())].into()
}

fn client(addr: &str) -> ClientInfo {
    ClientInfo {
        client: Some(addr.parse().unwrap()),
        proxy: None,
        listener_port: None,
    }
}

fn cidr_groups(tidbs: &[(&str, &str)]) -> Groups<String> {
    let mut g = Groups::new(RoutingRule::ClientCidr);
    let listed: Vec<(String, Vec<String>)> = tidbs
        .iter()
        .map(|(k, c)| {
            let v = RoutingRule::ClientCidr.values(&labels(CIDR_LABEL, c), "");
            (k.to_string(), v)
        })
        .collect();
    g.update(&listed);
    g
}

#[test]
fn the_rule_parses_tiprox_values_only() {
    for (s, r) in [
        ("", RoutingRule::All),
        ("client_cidr", RoutingRule::ClientCidr),
        ("proxy_cidr", RoutingRule::ProxyCidr),
        ("port", RoutingRule::Port),
    ] {
        assert_eq!(RoutingRule::parse(s), Some(r));
        assert_eq!(r.name(), s);
    }
    assert_eq!(RoutingRule::parse("Port"), None);
    assert_eq!(RoutingRule::parse("username"), None);
}

#[test]
fn the_cidr_label_is_a_trimmed_comma_list() {
    let v = RoutingRule::ClientCidr.values(&labels(CIDR_LABEL, " 10.0.0.0/8 ,,192.168.1.0/24"), "");
    assert_eq!(v, ["10.0.0.0/8", "192.168.1.0/24"]);
    let p = RoutingRule::Port.values(&labels(PORT_LABEL, " 6001 "), "east");
    assert_eq!(p, ["east:6001"]);
    assert!(
        RoutingRule::Port
            .values(&labels("zone", "a"), "")
            .is_empty()
    );
}

#[test]
fn tidbs_sharing_a_cidr_form_one_group_and_clients_match_by_address() {
    let g = cidr_groups(&[
        ("a", "127.0.0.1/32"),
        ("b", "127.0.0.1/32,10.0.0.0/8"),
        ("c", "127.0.0.2/32"),
        ("d", ""),
    ]);
    let (a, b, c) = (
        g.group_of(&"a".into()),
        g.group_of(&"b".into()),
        g.group_of(&"c".into()),
    );
    assert!(a.is_some() && a == b, "a and b share 127.0.0.1/32");
    assert!(c.is_some() && c != a);
    assert_eq!(g.group_of(&"d".into()), None, "unlabelled: no group");
    assert_eq!(g.route(&client("127.0.0.1")), Ok(a.unwrap()));
    // The group's CIDRs are the union of its members' lists.
    assert_eq!(g.route(&client("10.1.2.3")), Ok(a.unwrap()));
    assert_eq!(g.route(&client("127.0.0.2")), Ok(c.unwrap()));
    // An IPv4 client seen on an IPv6 socket.
    assert_eq!(g.route(&client("::ffff:127.0.0.2")), Ok(c.unwrap()));
    let err = g.route(&client("127.0.0.3")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no TiDB serves client address 127.0.0.3: balance.routing-rule = \"client_cidr\" and no \
         TiDB's `cidr` label contains it"
    );
}

#[test]
fn proxy_cidr_matches_the_tcp_peer_and_falls_back_to_the_client() {
    let mut g = Groups::new(RoutingRule::ProxyCidr);
    let v = |c: &str| RoutingRule::ProxyCidr.values(&labels(CIDR_LABEL, c), "");
    g.update(&[("a", v("10.0.0.0/8")), ("b", v("192.168.0.0/16"))]);
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let behind_lb = ClientInfo {
        client: ip("192.168.1.1"),
        proxy: ip("10.0.0.5"),
        listener_port: None,
    };
    assert_eq!(g.route(&behind_lb), Ok(g.group_of(&"a").unwrap()));
    let direct = ClientInfo {
        client: ip("192.168.1.1"),
        proxy: None,
        listener_port: None,
    };
    assert_eq!(g.route(&direct), Ok(g.group_of(&"b").unwrap()));
}

#[test]
fn a_tidb_keeps_its_group_when_its_label_changes_until_it_leaves() {
    let mut g = cidr_groups(&[("a", "127.0.0.1/32"), ("b", "127.0.0.2/32")]);
    let first = g.group_of(&"a".to_string()).unwrap();
    let v = |c: &str| RoutingRule::ClientCidr.values(&labels(CIDR_LABEL, c), "");
    let ev = g.update(&[
        ("a".into(), v("127.0.0.2/32")),
        ("b".into(), v("127.0.0.2/32")),
    ]);
    assert_eq!(g.group_of(&"a".to_string()), Some(first), "sticky");
    assert!(ev.contains(&GroupEvent::Changed("a".into(), v("127.0.0.2/32"))));
    // Said once, not every listing.
    let ev = g.update(&[
        ("a".into(), v("127.0.0.2/32")),
        ("b".into(), v("127.0.0.2/32")),
    ]);
    assert!(ev.is_empty(), "{ev:?}");
    // Gone and back: a new server, grouped by its new label.
    g.update(&[("b".into(), v("127.0.0.2/32"))]);
    let b = g.group_of(&"b".to_string()).unwrap();
    assert!(g.update(&[]).contains(&GroupEvent::Ended(b)));
    let ev = g.update(&[
        ("a".into(), v("127.0.0.2/32")),
        ("b".into(), v("127.0.0.2/32")),
    ]);
    assert_eq!(g.group_of(&"a".to_string()), g.group_of(&"b".to_string()));
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, GroupEvent::Created(..)))
            .count(),
        1
    );
    assert_eq!(
        g.route(&client("127.0.0.1")),
        Err(NoGroup::Address {
            rule: RoutingRule::ClientCidr,
            addr: Some("127.0.0.1".parse().unwrap())
        })
    );
}

#[test]
fn a_bad_label_is_reported_once_and_joins_nothing() {
    let mut g: Groups<&str> = Groups::new(RoutingRule::ClientCidr);
    let bad = vec!["10.0.0.0/99".to_string()];
    let ev = g.update(&[("a", bad.clone())]);
    assert_eq!(ev, [GroupEvent::BadLabel("a", "10.0.0.0/99".into())]);
    assert!(g.update(&[("a", bad)]).is_empty());
    assert_eq!(g.group_of(&"a"), None);
    assert_eq!(g.route(&client("10.0.0.1")).map_err(|_| ()), Err(()));
    let mut p: Groups<&str> = Groups::new(RoutingRule::Port);
    let ev = p.update(&[("a", vec!["x:http".into()])]);
    assert_eq!(ev, [GroupEvent::BadLabel("a", "x:http".into())]);
}

#[test]
fn the_port_rule_routes_by_listener_port_and_refuses_a_port_two_clusters_claim() {
    let mut g: Groups<&str> = Groups::new(RoutingRule::Port);
    let v =
        |port: &str, cluster: &str| RoutingRule::Port.values(&labels(PORT_LABEL, port), cluster);
    g.update(&[
        ("a1", v("6001", "east")),
        ("a2", v("6001", "east")),
        ("b", v("6002", "east")),
        ("c", v("6002", "west")),
        ("d", v("6003", "west")),
    ]);
    let at = |port| ClientInfo {
        listener_port: Some(port),
        ..ClientInfo::default()
    };
    assert_eq!(g.group_of(&"a1"), g.group_of(&"a2"));
    assert_eq!(g.route(&at(6001)), Ok(g.group_of(&"a1").unwrap()));
    assert_eq!(g.route(&at(6003)), Ok(g.group_of(&"d").unwrap()));
    assert_eq!(g.route(&at(6002)), Err(NoGroup::PortConflict(6002)));
    assert_eq!(
        NoGroup::PortConflict(6002).to_string(),
        "listener port 6002 is claimed by multiple backend clusters"
    );
    assert_eq!(g.route(&at(6009)), Err(NoGroup::Port(Some(6009))));
}

#[test]
fn the_default_rule_is_one_group_of_every_tidb() {
    let mut g: Groups<&str> = Groups::new(RoutingRule::All);
    assert_eq!(g.route(&client("1.2.3.4")), Err(NoGroup::Empty));
    g.update(&[("a", vec![]), ("b", vec![])]);
    assert!(g.group_of(&"a").is_some() && g.group_of(&"a") == g.group_of(&"b"));
    assert_eq!(
        g.route(&ClientInfo::default()),
        Ok(g.group_of(&"a").unwrap())
    );
}

#[test]
fn a_draining_tidb_is_evacuated_only_inside_its_group() {
    // Group 0: a (draining, 6 sessions) and b; group 1: c and d, idle.
    let mut bs = vec![BackendLoad::with_sessions(6); 4];
    bs[0].evacuate = true;
    bs[0].accepts = false;
    bs[1].sessions = 3;
    bs[1].movable = 3;
    bs[2].sessions = 0;
    bs[3].sessions = 0;
    let groups = [
        Some(GroupId(0)),
        Some(GroupId(0)),
        Some(GroupId(1)),
        Some(GroupId(1)),
    ];
    let moves = plan_grouped(&bs, &groups, &BalanceConfig::default());
    assert_eq!(moves.iter().map(|m| m.count).sum::<u32>(), 6, "{moves:?}");
    assert!(moves.iter().all(|m| m.from == 0 && m.to == 1), "{moves:?}");
}

proptest! {
    /// Whatever the loads and groups, no move leaves its group, and a
    /// backend without a group is never a source or a target.
    #[test]
    fn no_move_crosses_a_group(
        tidbs in prop::collection::vec(
            (0u32..40, any::<bool>(), any::<bool>(), prop::option::of(0u32..3)),
            1..10,
        ),
        budget in 1u32..50,
    ) {
        let bs: Vec<BackendLoad> = tidbs
            .iter()
            .map(|&(n, accepts, evacuate, _)| BackendLoad {
                accepts,
                evacuate,
                ..BackendLoad::with_sessions(n)
            })
            .collect();
        let groups: Vec<Option<GroupId>> = tidbs.iter().map(|t| t.3.map(GroupId)).collect();
        let cfg = BalanceConfig { budget, ..BalanceConfig::default() };
        let moves = plan_grouped(&bs, &groups, &cfg);
        prop_assert!(moves.iter().map(|m| m.count).sum::<u32>() <= budget);
        for m in &moves {
            prop_assert!(groups[m.from].is_some());
            prop_assert_eq!(groups[m.from], groups[m.to]);
            prop_assert!(bs[m.to].accepts);
        }
    }
}
