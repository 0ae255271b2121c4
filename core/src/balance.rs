//! Balancing math: where a new connection goes, and which sessions one
//! rebalance tick moves where. Pure functions of a snapshot of the backends;
//! the runtime takes the snapshot, applies the plan, and repeats.
//!
//! Policy (connection count, TiProxy's `conn-count` factor):
//! - backends that are draining, removed or unhealthy are evacuated first;
//! - among the rest, when the busiest has more than `count_ratio_threshold`
//!   times the sessions of the idlest (and at least two more), sessions
//!   move from the busiest to the idlest;
//! - a plan never moves more than the tick's budget, never targets a backend
//!   that cannot take sessions, and never moves so many that a source ends
//!   up below its target: sessions never ping-pong.

/// What the planner knows of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendLoad {
    /// Sessions on it now.
    pub sessions: u32,
    /// Sessions asked to move to it that have not arrived.
    pub incoming: u32,
    /// Sessions on it that can be asked to move now (not already moving,
    /// not cooling down after a failed move).
    pub movable: u32,
    /// It may take sessions: healthy, not draining, matching labels.
    pub accepts: bool,
    /// Its sessions must leave (draining, removed, unhealthy).
    pub evacuate: bool,
}

impl BackendLoad {
    fn load(&self) -> u64 {
        u64::from(self.sessions) + u64::from(self.incoming)
    }
}

/// Knobs of one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceConfig {
    /// Most move requests per tick.
    pub budget: u32,
    /// Most of those spent on balancing accepting backends (the rest is
    /// for evacuations, which are urgent).
    pub rebalance_budget: u32,
    /// Imbalance that triggers moves between accepting backends (busiest
    /// over idlest); TiProxy's `conn-count.count-ratio-threshold`.
    pub count_ratio_threshold: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            budget: 100,
            rebalance_budget: 100,
            count_ratio_threshold: 1.2,
        }
    }
}

/// Move `count` sessions from backend `from` to backend `to` (indexes into
/// the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Source backend.
    pub from: usize,
    /// Target backend.
    pub to: usize,
    /// How many sessions.
    pub count: u32,
}

/// The backend for a new connection: the accepting backend with the least
/// load; `tie` (random) breaks ties.
pub fn choose(backends: &[BackendLoad], tie: u64) -> Option<usize> {
    let min = backends
        .iter()
        .filter(|b| b.accepts)
        .map(BackendLoad::load)
        .min()?;
    let ties: Vec<usize> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.accepts && b.load() == min)
        .map(|(i, _)| i)
        .collect();
    Some(ties[(tie % ties.len() as u64) as usize])
}

/// The moves of one tick.
pub fn plan(backends: &[BackendLoad], cfg: &BalanceConfig) -> Vec<Move> {
    let mut load: Vec<u64> = backends.iter().map(BackendLoad::load).collect();
    let mut movable: Vec<u32> = backends.iter().map(|b| b.movable.min(b.sessions)).collect();
    let mut budget = cfg.budget;
    let mut moves: Vec<Move> = Vec::new();
    let add = |moves: &mut Vec<Move>, from: usize, to: usize| match moves
        .iter_mut()
        .find(|m| m.from == from && m.to == to)
    {
        Some(m) => m.count += 1,
        None => moves.push(Move { from, to, count: 1 }),
    };
    let idlest = |load: &[u64], skip: Option<usize>| {
        backends
            .iter()
            .enumerate()
            .filter(|(i, b)| b.accepts && Some(*i) != skip)
            .min_by_key(|(i, _)| (load[*i], *i))
            .map(|(i, _)| i)
    };
    // 1. Evacuation, one session at a time to the idlest target, so moves
    //    spread over several targets.
    for from in 0..backends.len() {
        if !backends[from].evacuate {
            continue;
        }
        while budget > 0 && movable[from] > 0 {
            let Some(to) = idlest(&load, Some(from)) else {
                break;
            };
            add(&mut moves, from, to);
            movable[from] -= 1;
            load[from] -= 1;
            load[to] += 1;
            budget -= 1;
        }
    }
    // 2. Balance among accepting backends, with hysteresis.
    let mut budget = budget.min(cfg.rebalance_budget);
    while budget > 0 {
        let Some((from, _)) = backends
            .iter()
            .enumerate()
            .filter(|(i, b)| b.accepts && !b.evacuate && movable[*i] > 0)
            .max_by_key(|(i, _)| (load[*i], std::cmp::Reverse(*i)))
        else {
            break;
        };
        let Some(to) = idlest(&load, Some(from)) else {
            break;
        };
        let (hi, lo) = (load[from], load[to]);
        // Moving one session must leave the source at least as loaded as
        // the target (hi - 1 >= lo + 1), and the imbalance must exceed the
        // threshold: that is the hysteresis that stops ping-pong.
        let over = (hi as f64) > cfg.count_ratio_threshold * (lo.max(1) as f64);
        if hi < lo + 2 || !over {
            break;
        }
        add(&mut moves, from, to);
        movable[from] -= 1;
        load[from] -= 1;
        load[to] += 1;
        budget -= 1;
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(sessions: u32, accepts: bool, evacuate: bool) -> BackendLoad {
        BackendLoad {
            sessions,
            incoming: 0,
            movable: sessions,
            accepts,
            evacuate,
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

    #[test]
    fn new_connections_go_to_the_idlest_accepting_backend() {
        let bs = [b(5, true, false), b(2, true, false), b(0, false, false)];
        assert_eq!(choose(&bs, 0), Some(1));
        let ties = [b(1, true, false), b(1, true, false)];
        assert_eq!(choose(&ties, 0), Some(0));
        assert_eq!(choose(&ties, 1), Some(1));
        assert_eq!(choose(&[b(0, false, false)], 0), None);
    }

    #[test]
    fn draining_backend_is_emptied_over_several_targets() {
        let mut bs = vec![b(10, false, true), b(0, true, false), b(0, true, false)];
        let p = plan(&bs, &BalanceConfig::default());
        assert_eq!(p.iter().map(|m| m.count).sum::<u32>(), 10);
        assert_eq!(p.len(), 2, "spread over both targets: {p:?}");
        apply(&mut bs, &p);
        assert_eq!((bs[1].sessions, bs[2].sessions), (5, 5));
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
                count: 1
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
    }

    fn arb_backends() -> impl Strategy<Value = Vec<BackendLoad>> {
        proptest::collection::vec(
            (
                0u32..200,
                0u32..20,
                any::<bool>(),
                any::<bool>(),
                0u32..=100,
            )
                .prop_map(|(sessions, incoming, accepts, evacuate, movable_pct)| {
                    BackendLoad {
                        sessions,
                        incoming,
                        movable: sessions * movable_pct / 100,
                        accepts: accepts && !evacuate,
                        evacuate,
                    }
                }),
            1..8,
        )
    }

    proptest! {
        #[test]
        fn plans_respect_budget_targets_and_sources(bs in arb_backends(), budget in 0u32..300) {
            let cfg = BalanceConfig { budget, ..BalanceConfig::default() };
            let p = plan(&bs, &cfg);
            prop_assert!(p.iter().map(|m| m.count).sum::<u32>() <= budget);
            for m in &p {
                prop_assert!(bs[m.to].accepts, "never targets a backend that cannot take sessions");
                prop_assert!(m.from != m.to);
                prop_assert!(m.count > 0);
            }
            for (i, be) in bs.iter().enumerate() {
                let out: u32 = p.iter().filter(|m| m.from == i).map(|m| m.count).sum();
                prop_assert!(out <= be.movable, "moves only movable sessions");
                let inn = p.iter().any(|m| m.to == i);
                prop_assert!(!(out > 0 && inn), "a backend is never source and target at once");
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
    }
}
