use super::*;
use proptest::prelude::*;

fn b(sessions: u32, accepts: bool, evacuate: bool) -> BackendLoad {
    BackendLoad {
        accepts,
        evacuate,
        ..BackendLoad::with_sessions(sessions)
    }
}

/// A TiDB whose CPU is `background` plus `per_session` for each
/// session, read now.
fn tidb(sessions: u32, background: f64, per_session: f64, memory: f64) -> BackendLoad {
    BackendLoad {
        cpu: Some(CpuSample {
            usage: (background + f64::from(sessions) * per_session).min(1.0),
            sessions,
        }),
        memory: Some(memory),
        ..BackendLoad::with_sessions(sessions)
    }
}

fn apply(backends: &mut [BackendLoad], moves: &[Move]) {
    for m in moves {
        backends[m.from].sessions -= m.count;
        backends[m.from].movable -= m.count;
        backends[m.to].sessions += m.count;
        backends[m.to].movable += m.count;
    }
}

/// The metrics of a cluster whose CPU is `background[i]` plus
/// `per_session` per session, re-read after moves.
fn reread(bs: &mut [BackendLoad], background: &[f64], per_session: f64) {
    for (b, bg) in bs.iter_mut().zip(background) {
        if b.cpu.is_some() {
            b.cpu = Some(CpuSample {
                usage: (bg + f64::from(b.sessions) * per_session).min(1.0),
                sessions: b.sessions,
            });
        }
    }
}

fn total(p: &[Move]) -> u32 {
    p.iter().map(|m| m.count).sum()
}

#[test]
fn new_connections_go_to_the_idlest_accepting_backend() {
    let bs = [b(5, true, false), b(2, true, false), b(0, false, false)];
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(1));
    let ties = [b(1, true, false), b(1, true, false)];
    assert_eq!(choose(&ties, Policy::Resource, 0), Some(0));
    assert_eq!(choose(&ties, Policy::Resource, 1), Some(1));
    assert_eq!(choose(&[b(0, false, false)], Policy::Resource, 0), None);
}

#[test]
fn new_connections_avoid_busy_cpu_memory_risk_and_other_zones() {
    // B has more sessions but A's CPU is pegged.
    let bs = [tidb(2, 0.9, 0.01, 0.1), tidb(10, 0.0, 0.01, 0.1)];
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(1));
    assert_eq!(choose(&bs, Policy::Connection, 0), Some(0));
    // A is at OOM risk.
    let bs = [tidb(0, 0.0, 0.01, 0.8), tidb(10, 0.0, 0.01, 0.1)];
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(1));
    // A is in another zone.
    let mut bs = [b(0, true, false), b(10, true, false)];
    bs[0].local = false;
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(1));
    assert_eq!(choose(&bs, Policy::Location, 0), Some(1));
    assert_eq!(choose(&bs, Policy::Connection, 0), Some(0));
}

#[test]
fn a_factor_some_backend_lacks_is_left_out() {
    // A fresh TiDB with no metrics yet: CPU is not compared, load is.
    let mut bs = [tidb(5, 0.9, 0.01, 0.1), b(6, true, false)];
    bs[1].memory = Some(0.1);
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(0));
}

#[test]
fn draining_backend_is_emptied_over_several_targets() {
    let mut bs = vec![b(10, false, true), b(0, true, false), b(0, true, false)];
    let p = plan(&bs, &BalanceConfig::default());
    assert_eq!(total(&p), 10);
    assert_eq!(p.len(), 2, "spread over both targets: {p:?}");
    assert!(p.iter().all(|m| m.factor == Factor::Evacuate));
    apply(&mut bs, &p);
    assert_eq!((bs[1].sessions, bs[2].sessions), (5, 5));
}

#[test]
fn evacuations_between_ticks_are_the_plans_first_step_only() {
    // A draining, B and C accepting but uneven: a tick evacuates A and
    // evens B and C out; a refill between ticks only evacuates.
    let bs = vec![b(10, false, true), b(0, true, false), b(30, true, false)];
    let cfg = BalanceConfig {
        budget: 6,
        ..BalanceConfig::default()
    };
    let tick = plan(&bs, &cfg);
    let refill = plan_evacuations(&bs, &cfg);
    assert_eq!(total(&refill), 6, "the whole budget: {refill:?}");
    assert!(refill.iter().all(|m| m.factor == Factor::Evacuate));
    let evacuations: Vec<Move> = tick
        .iter()
        .copied()
        .filter(|m| m.factor == Factor::Evacuate)
        .collect();
    assert_eq!(refill, evacuations);
    // Nothing to evacuate: no refill, though the tick would even out.
    let even = vec![b(0, true, false), b(30, true, false)];
    assert!(plan_evacuations(&even, &cfg).is_empty());
    assert!(!plan(&even, &cfg).is_empty());
    // Grouped: the same, group by group.
    let groups = [Some(GroupId(0)), Some(GroupId(0)), Some(GroupId(0))];
    assert_eq!(plan_evacuations_grouped(&bs, &groups, &cfg), refill);
}

#[test]
fn scale_out_spreads_two_sessions() {
    // The seed experiment: two clients on one TiDB, a second TiDB joins.
    let mut bs = vec![b(2, true, false), b(0, true, false)];
    let p = plan(&bs, &BalanceConfig::default());
    assert_eq!(
        p,
        vec![Move {
            from: 0,
            to: 1,
            count: 1,
            factor: Factor::Load,
        }]
    );
    apply(&mut bs, &p);
    assert!(
        plan(&bs, &BalanceConfig::default()).is_empty(),
        "1/1 is balanced"
    );
}

#[test]
fn small_imbalances_are_left_alone() {
    let bs = [b(11, true, false), b(10, true, false)];
    assert!(plan(&bs, &BalanceConfig::default()).is_empty());
    let bs = [b(2, true, false), b(1, true, false)];
    assert!(plan(&bs, &BalanceConfig::default()).is_empty());
    // CPU within two steps: load decides.
    let bs = [tidb(10, 0.07, 0.0, 0.1), tidb(10, 0.0, 0.0, 0.1)];
    assert!(plan(&bs, &BalanceConfig::default()).is_empty());
}

#[test]
fn cpu_moves_sessions_off_a_pegged_tidb_and_stays_put() {
    let background = [0.8, 0.0];
    let mut bs = vec![tidb(20, 0.8, 0.01, 0.1), tidb(20, 0.0, 0.01, 0.1)];
    let cfg = BalanceConfig::default();
    let mut moved = 0;
    for _ in 0..200 {
        let p = plan(&bs, &cfg);
        assert!(
            p.iter().all(|m| m.from == 0 && m.factor == Factor::Cpu),
            "{p:?}"
        );
        moved += total(&p);
        apply(&mut bs, &p);
        reread(&mut bs, &background, 0.01);
    }
    assert!(moved >= 15, "moved {moved}: {bs:?}");
    assert!(plan(&bs, &cfg).is_empty(), "settled: {bs:?}");
    assert_eq!(choose(&bs, Policy::Resource, 0), Some(1));
}

#[test]
fn memory_risk_empties_a_backend_at_tiproxys_pace() {
    let mut bs = vec![tidb(100, 0.0, 0.0, 0.8), tidb(0, 0.0, 0.0, 0.2)];
    let p = plan(&bs, &BalanceConfig::default());
    // OOM risk: everything within 10 s, i.e. a hundredth per 0.1 s tick.
    assert_eq!(total(&p), 1, "{p:?}");
    assert_eq!(p[0].factor, Factor::Memory);
    for _ in 0..150 {
        let p = plan(&bs, &BalanceConfig::default());
        apply(&mut bs, &p);
    }
    assert_eq!(bs[0].sessions, 0, "{bs:?}");
    assert!(
        plan(&bs, &BalanceConfig::default()).is_empty(),
        "no move back"
    );
}

#[test]
fn location_moves_into_the_zone_unless_it_is_busy() {
    let mut bs = vec![b(10, true, false), b(0, true, false)];
    bs[0].local = false;
    let cfg = BalanceConfig {
        policy: Policy::Location,
        location_budget: 100,
        ..BalanceConfig::default()
    };
    let p = plan(&bs, &cfg);
    assert_eq!(total(&p), 10);
    assert!(p.iter().all(|m| m.factor == Factor::Location && m.to == 1));
    // The zone's TiDB is at memory risk: stay.
    bs[0].memory = Some(0.1);
    bs[1].memory = Some(0.7);
    assert!(plan(&bs, &cfg).is_empty());
}

#[test]
fn a_failing_tidb_is_emptied_within_a_minute_and_a_degraded_one_kept() {
    let mut failing = b(600, true, false);
    failing.health = HealthLevel::Failing;
    let bs = [failing, b(600, true, false)];
    let p = plan(&bs, &BalanceConfig::default());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].factor, Factor::Health);
    assert_eq!((p[0].from, p[0].to), (0, 1));
    assert_eq!(p[0].count, 1, "600 sessions over 60 s: one per 100 ms tick");
    // `[balance.health] migrations-per-second` overrides the pace.
    let fast = BalanceConfig::new(
        Policy::Resource,
        &Rates {
            health: Some(50.0),
            ..Rates::default()
        },
    );
    assert_eq!(plan(&bs, &fast)[0].count, 5);
    // One level apart is not enough (TiProxy moves only failing to normal).
    let mut degraded = b(600, true, false);
    degraded.health = HealthLevel::Degraded;
    assert!(plan(&[degraded, b(600, true, false)], &BalanceConfig::default()).is_empty());
    // Health is ranked before memory, CPU and load.
    let mut calm = tidb(0, 0.0, 0.001, 0.1);
    calm.health = HealthLevel::Failing;
    let busy = tidb(50, 0.5, 0.001, 0.7);
    assert_eq!(choose(&[calm, busy], Policy::Resource, 0), Some(1));
    assert_eq!(choose(&[calm, busy], Policy::Connection, 0), Some(0));
    let s = scores(&[calm, busy], Policy::Resource);
    assert_eq!(s[0][0], (Factor::Health, 2));
}

fn arb_backends() -> impl Strategy<Value = Vec<BackendLoad>> {
    proptest::collection::vec(
        (
            (
                0u32..200,
                0u32..20,
                any::<bool>(),
                any::<bool>(),
                0u32..=100,
            ),
            (
                proptest::option::of(0.0f64..1.0),
                proptest::option::of(0.0f64..1.0),
                any::<bool>(),
                prop_oneof![
                    Just(HealthLevel::Normal),
                    Just(HealthLevel::Degraded),
                    Just(HealthLevel::Failing)
                ],
            ),
        )
            .prop_map(
                |((sessions, incoming, accepts, evacuate, pct), (cpu, memory, local, health))| {
                    BackendLoad {
                        sessions,
                        incoming,
                        movable: sessions * pct / 100,
                        accepts: accepts && !evacuate,
                        evacuate,
                        cpu: cpu.map(|usage| CpuSample { usage, sessions }),
                        memory,
                        local,
                        health,
                    }
                },
            ),
        1..8,
    )
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Resource),
        Just(Policy::Location),
        Just(Policy::Connection)
    ]
}

proptest! {
    #[test]
    fn plans_respect_budget_targets_and_sources(
        bs in arb_backends(),
        budget in 0u32..300,
        factor_budget in 0u32..50,
        policy in arb_policy(),
    ) {
        let cfg = BalanceConfig {
            budget,
            cpu_budget: factor_budget,
            location_budget: factor_budget,
            rebalance_budget: factor_budget,
            policy,
            ..BalanceConfig::default()
        };
        let p = plan(&bs, &cfg);
        prop_assert!(total(&p) <= budget);
        let by = |f: Factor| p.iter().filter(|m| m.factor == f).map(|m| m.count).sum::<u32>();
        prop_assert!(by(Factor::Cpu) <= factor_budget);
        prop_assert!(by(Factor::Location) <= factor_budget);
        prop_assert!(by(Factor::Load) <= factor_budget);
        if policy == Policy::Connection {
            prop_assert_eq!(by(Factor::Cpu) + by(Factor::Memory) + by(Factor::Location), 0);
            prop_assert_eq!(by(Factor::Health), 0, "health is not a factor of `connection`");
        }
        for m in p.iter().filter(|m| m.factor == Factor::Health) {
            prop_assert_eq!(bs[m.from].health, HealthLevel::Failing);
            prop_assert_eq!(bs[m.to].health, HealthLevel::Normal);
        }
        for m in &p {
            prop_assert!(bs[m.to].accepts, "never targets a backend that cannot take sessions");
            prop_assert!(m.from != m.to);
            prop_assert!(m.count > 0);
            prop_assert!((m.factor == Factor::Evacuate) == bs[m.from].evacuate);
        }
        for (i, be) in bs.iter().enumerate() {
            let out: u32 = p.iter().filter(|m| m.from == i).map(|m| m.count).sum();
            prop_assert!(out <= be.movable, "moves only movable sessions");
            let inn = p.iter().any(|m| m.to == i);
            prop_assert!(!(out > 0 && inn), "a backend is never source and target at once");
        }
        if let Some(i) = choose(&bs, policy, 7) {
            prop_assert!(bs[i].accepts);
        }
        for routing in [Routing::PreferIdle, Routing::Random] {
            let r = route(&bs, policy, routing, 1.2, u64::from(budget));
            prop_assert_eq!(r.is_some(), bs.iter().any(|b| b.accepts));
            prop_assert!(r.is_none_or(|i| bs[i].accepts));
        }
    }

    #[test]
    fn repeated_ticks_converge(sessions in proptest::collection::vec(0u32..300, 2..6), drain in any::<bool>()) {
        let mut bs: Vec<BackendLoad> = sessions.iter().map(|&s| b(s, true, false)).collect();
        if drain {
            bs[0].accepts = false;
            bs[0].evacuate = true;
        }
        let cfg = BalanceConfig { budget: 50, ..BalanceConfig::default() };
        let mut ticks = 0;
        loop {
            let p = plan(&bs, &cfg);
            if p.is_empty() {
                break;
            }
            apply(&mut bs, &p);
            ticks += 1;
            prop_assert!(ticks < 100, "no convergence: {bs:?}");
        }
        if drain {
            prop_assert_eq!(bs[0].sessions, 0);
        }
        let acc: Vec<u32> = bs.iter().filter(|b| b.accepts).map(|b| b.sessions).collect();
        let (max, min) = (*acc.iter().max().unwrap(), *acc.iter().min().unwrap());
        prop_assert!(max < min + 2 || f64::from(max) <= 1.2 * f64::from(min.max(1)), "spread {acc:?}");
    }

    /// With CPU, memory and zones in play, and metrics re-read after
    /// every tick as a cluster whose CPU grows with its sessions would
    /// report them, the plans settle: no session ping-pongs.
    #[test]
    fn resource_balancing_settles(
        tidbs in proptest::collection::vec((0u32..150, 0.0f64..0.9, 0.0f64..0.9, any::<bool>()), 2..5),
        per_session in 0.0005f64..0.02,
        policy in arb_policy(),
    ) {
        let background: Vec<f64> = tidbs.iter().map(|t| t.1).collect();
        let mut bs: Vec<BackendLoad> = tidbs
            .iter()
            .map(|&(s, bg, mem, local)| BackendLoad { local, ..tidb(s, bg, per_session, mem) })
            .collect();
        let cfg = BalanceConfig {
            budget: 100,
            rebalance_budget: 20,
            cpu_budget: 20,
            memory_budget: Some(20),
            location_budget: 20,
            policy,
            ..BalanceConfig::default()
        };
        let total_sessions: u32 = bs.iter().map(|b| b.sessions).sum();
        let mut ticks = 0;
        loop {
            let p = plan(&bs, &cfg);
            if p.is_empty() {
                break;
            }
            apply(&mut bs, &p);
            reread(&mut bs, &background, per_session);
            ticks += 1;
            prop_assert!(ticks < 400, "no convergence after {ticks} ticks: {bs:?}");
        }
        prop_assert_eq!(bs.iter().map(|b| b.sessions).sum::<u32>(), total_sessions);
    }
}
