use super::*;

#[tokio::test]
async fn picks_least_connections_and_skips_failed() {
    let r = Router::new(&["a:1".into(), "b:1".into()]);
    let a = r.pick(&[], Scope::Every).unwrap();
    let _lease = Lease::new(a.clone());
    let b = r.pick(&[], Scope::Every).unwrap();
    assert_ne!(a.addr, b.addr, "the idle backend is chosen");
    let _ = r.handle_dial(&b, Dial::Failed);
    assert_eq!(r.pick(&[], Scope::Every).unwrap().addr, a.addr);
    let _ = r.handle_dial(&a, Dial::Failed);
    assert!(r.pick(&[], Scope::Every).is_none());
    assert!(!r.has_healthy());
    let _ = r.handle_dial(&a, Dial::Connected);
    assert!(r.has_healthy());
}

#[tokio::test]
async fn removed_backends_take_no_connections() {
    let r = Router::new(&["a:1".into(), "b:1".into()]);
    let a = r.backends()[0].clone();
    let _lease = Lease::new(a.clone());
    r.set_backends(&["b:1".into()]);
    assert!(!a.is_healthy() && a.should_evacuate());
    assert_eq!(r.pick(&[], Scope::Every).unwrap().addr, "b:1");
    // Still listed while a session is on it, so it can be evacuated.
    assert_eq!(r.backends().len(), 2);
}

#[tokio::test]
async fn a_dial_leases_only_the_listed_entry() {
    let r = Router::new(&["a:1".into(), "b:1".into()]);
    let a = r.find("a:1").unwrap();
    // A failed check does not refuse a dial that got through.
    let _ = r.handle_dial(&a, Dial::Failed);
    let held = r.lease(&a).expect("listed: leased");
    // Removed while a session is on it: listed, but left the set.
    r.set_backends(&["b:1".into()]);
    assert!(r.lease(&a).is_none(), "a backend that left is not leased");
    drop(held);
    // Dropped from the list, then back as a new entry: a dial begun on
    // the old entry must not count there.
    r.set_backends(&["b:1".into()]);
    r.set_backends(&["a:1".into(), "b:1".into()]);
    assert!(r.lease(&a).is_none(), "the old entry is not leased");
    let now = r.find("a:1").unwrap();
    let _l = r.lease(&now).expect("the new entry is leased");
    assert_eq!((now.connections(), a.connections()), (1, 0));
}

#[tokio::test]
async fn draining_backends_take_no_connections_and_targets_count_incoming() {
    let r = Router::new(&["a:1".into(), "b:1".into(), "c:1".into()]);
    let a = r.find("a:1").unwrap();
    let _ = r.handle_status(&a, Ok(500));
    r.with_moves(|l| (0..5).for_each(|c| l.requested(c, "b:1".into())));
    assert_eq!(r.pick(&[], Scope::Every).unwrap().addr, "c:1");
    assert_eq!(r.pick(&["c:1".into()], Scope::Every).unwrap().addr, "b:1");
}

fn labelled(addr: &str, key: &str, value: &str) -> BackendEntry {
    BackendEntry::Full {
        addr: addr.into(),
        status_addr: None,
        labels: [(key.to_string(), value.to_string())].into(),
    }
}

#[tokio::test]
async fn a_client_is_given_only_tidbs_of_its_group() {
    let r = Router::with_rule(
        &[
            labelled("a:1", "cidr", "127.0.0.1/32"),
            labelled("b:1", "cidr", "127.0.0.1/32"),
            labelled("c:1", "cidr", "127.0.0.2/32"),
            "d:1".into(),
        ],
        RoutingRule::ClientCidr,
    );
    let from = |ip: &str| {
        client_info(
            format!("{ip}:5000").parse().unwrap(),
            format!("{ip}:5000").parse().unwrap(),
            None,
        )
    };
    let one = r.scope_for(&from("127.0.0.1")).unwrap();
    let two = r.scope_for(&from("127.0.0.2")).unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let b = r.pick(&[], one).unwrap();
        seen.push(b.addr.clone());
        let _keep = Lease::new(b);
    }
    assert!(seen.iter().all(|a| a == "a:1" || a == "b:1"), "{seen:?}");
    assert_eq!(r.pick(&[], two).unwrap().addr, "c:1");
    // The group's last TiDB excluded: nothing, never a TiDB of the other.
    assert!(r.pick(&["c:1".into()], two).is_none());
    let e = r.scope_for(&from("127.0.0.3")).unwrap_err();
    assert!(e.to_string().contains("127.0.0.3"), "{e}");
    // A session on c stays in c's group; d, unlabelled, has none.
    assert_eq!(r.scope_of(&r.find("c:1").unwrap()), Some(two));
    assert_eq!(r.scope_of(&r.find("d:1").unwrap()), None);
    let ids = r.group_ids(&r.backends());
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert_eq!(ids[3], None);
}

#[tokio::test]
async fn a_removed_tidb_keeps_its_group_while_sessions_remain() {
    let r = Router::with_rule(
        &[
            labelled("a:1", "cidr", "10.0.0.0/8"),
            labelled("b:1", "cidr", "10.0.0.0/8"),
        ],
        RoutingRule::ClientCidr,
    );
    let a = r.find("a:1").unwrap();
    let _lease = Lease::new(a.clone());
    let before = r.scope_of(&a);
    r.set_backends(&[labelled("b:1", "cidr", "10.0.0.0/8")]);
    assert_eq!(
        r.scope_of(&a),
        before,
        "still grouped: its sessions move inside the group"
    );
    assert!(before.is_some());
}
