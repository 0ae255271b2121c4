//! Where a new connection goes: TiProxy's `[balance] routing-policy`.
//!
//! Always going to the single best-ranked backend works badly for short
//! connections: a little jitter sends a whole second's connections to one
//! TiDB, and after a scale-out every new connection lands on the new one.
//! So, as TiProxy:
//! - `prefer-idle` (the default) picks at random among the best-ranked
//!   backend and every backend the balancer would not move sessions away
//!   from towards it;
//! - `random` picks at random among all backends that accept, the
//!   best-ranked one a little more often (11 in 10N+1, the others 10 in
//!   10N+1), so counts still catch up.
//!
//! The randomness is a number the caller draws.

use super::{BackendLoad, Policy, Ranking};

/// TiProxy's `[balance] routing-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Random among the backends that would not be balanced away from.
    #[default]
    PreferIdle,
    /// Random among all, the best-ranked slightly favoured.
    Random,
    /// Always the best-ranked (ties at random). TiProxy has it internally
    /// and its config refuses it; here too: tests and tools use it.
    Idlest,
}

impl Routing {
    /// Parses the values TiProxy's config accepts (`""` is the default,
    /// `prefer-idle`).
    pub fn parse(s: &str) -> Option<Routing> {
        match s {
            "" | "prefer-idle" => Some(Routing::PreferIdle),
            "random" => Some(Routing::Random),
            _ => None,
        }
    }

    /// The config's name.
    pub fn name(self) -> &'static str {
        match self {
            Routing::PreferIdle => "prefer-idle",
            Routing::Random => "random",
            Routing::Idlest => "idlest",
        }
    }
}

/// The backend for a new connection under `policy` and `routing`; `ratio`
/// is the balancer's `count-ratio-threshold` (what "would be balanced
/// away" means for load) and `rand` a random draw.
pub fn route(
    backends: &[BackendLoad],
    policy: Policy,
    routing: Routing,
    ratio: f64,
    rand: u64,
) -> Option<usize> {
    let r = Ranking::new(backends, policy);
    let best = r.best(|_| true)?;
    let mut ranked: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].accepts)
        .collect();
    ranked.sort_by_key(|&i| (r.key(i), i));
    let pick = |c: &[usize]| c[(rand % c.len() as u64) as usize];
    match routing {
        Routing::Idlest => {
            let key = r.key(best);
            let ties: Vec<usize> = ranked.into_iter().filter(|&i| r.key(i) == key).collect();
            Some(pick(&ties))
        }
        Routing::Random => {
            let n = ranked.len() as u64;
            Some(ranked[((rand % (n * 10 + 1)) % n) as usize])
        }
        Routing::PreferIdle => {
            let ok: Vec<usize> = ranked
                .into_iter()
                .filter(|&i| i == best || r.reason(i, best, ratio).is_none())
                .collect();
            Some(pick(&ok))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CpuSample, HealthLevel};
    use super::*;

    fn b(sessions: u32) -> BackendLoad {
        BackendLoad::with_sessions(sessions)
    }

    /// Which backends `route` reaches over many draws, and how often.
    fn spread(bs: &[BackendLoad], policy: Policy, routing: Routing) -> Vec<u32> {
        let mut n = vec![0; bs.len()];
        for rand in 0..1000u64 {
            // A cheap mix so consecutive draws are not consecutive numbers.
            let rand = rand.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7;
            n[route(bs, policy, routing, 1.2, rand).unwrap()] += 1;
        }
        n
    }

    #[test]
    fn prefer_idle_spreads_over_backends_that_would_not_be_balanced() {
        // Next to an empty backend, 10 and 11 sessions are over the 1.2
        // ratio: the balancer would move them, so only it takes
        // connections.
        let n = spread(&[b(10), b(11), b(0)], Policy::Resource, Routing::PreferIdle);
        assert_eq!(n, vec![0, 0, 1000]);
        // 10, 11, 10: nothing to balance, all three take connections.
        let n = spread(
            &[b(10), b(11), b(10)],
            Policy::Resource,
            Routing::PreferIdle,
        );
        assert!(
            n.iter().all(|&c| c > 200),
            "all three take connections: {n:?}"
        );
        // 11 next to 9 would be balanced.
        let n = spread(&[b(9), b(11)], Policy::Resource, Routing::PreferIdle);
        assert_eq!(n, vec![1000, 0]);
        // A backend at memory risk is one the balancer would empty.
        let mut risky = b(0);
        risky.memory = Some(0.8);
        let mut fine = b(5);
        fine.memory = Some(0.1);
        let n = spread(&[risky, fine], Policy::Resource, Routing::PreferIdle);
        assert_eq!(n, vec![0, 1000]);
    }

    #[test]
    fn prefer_idle_skips_a_failing_backend_but_not_a_degraded_one() {
        let mut failing = b(0);
        failing.health = HealthLevel::Failing;
        let mut degraded = b(0);
        degraded.health = HealthLevel::Degraded;
        let n = spread(&[failing, b(3)], Policy::Resource, Routing::PreferIdle);
        assert_eq!(n, vec![0, 1000]);
        let n = spread(&[degraded, b(1)], Policy::Resource, Routing::PreferIdle);
        assert!(n[0] > 300 && n[1] > 300, "{n:?}");
        // Under the connection policy health is not a factor.
        let n = spread(&[failing, b(3)], Policy::Connection, Routing::Idlest);
        assert_eq!(n, vec![1000, 0]);
    }

    #[test]
    fn random_reaches_every_accepting_backend_and_favours_the_best() {
        let mut closed = b(0);
        closed.accepts = false;
        let bs = [b(50), b(10), closed, b(30)];
        let n = spread(&bs, Policy::Resource, Routing::Random);
        assert_eq!(n[2], 0);
        assert!(n[0] > 200 && n[3] > 200, "{n:?}");
        assert!(
            n[1] > n[0] && n[1] > n[3],
            "the idlest a little more: {n:?}"
        );
        // Exactly TiProxy's share: 11 of the 31 residues go to the best.
        let hits = (0..31u64)
            .filter(|&r| route(&bs, Policy::Resource, Routing::Random, 1.2, r) == Some(1))
            .count();
        assert_eq!(hits, 11);
    }

    #[test]
    fn idlest_is_the_best_ranked_with_ties_at_random() {
        let mut busy = b(0);
        busy.cpu = Some(CpuSample {
            usage: 0.9,
            sessions: 0,
        });
        let mut calm = b(4);
        calm.cpu = Some(CpuSample {
            usage: 0.1,
            sessions: 4,
        });
        assert_eq!(
            route(&[busy, calm], Policy::Resource, Routing::Idlest, 1.2, 0),
            Some(1)
        );
        assert_eq!(
            spread(&[b(1), b(1)], Policy::Resource, Routing::Idlest)
                .iter()
                .filter(|&&c| c > 0)
                .count(),
            2
        );
        assert_eq!(
            route(&[], Policy::Resource, Routing::PreferIdle, 1.2, 0),
            None
        );
    }

    #[test]
    fn config_names() {
        assert_eq!(Routing::parse(""), Some(Routing::PreferIdle));
        assert_eq!(Routing::parse("random"), Some(Routing::Random));
        assert_eq!(
            Routing::parse("idlest"),
            None,
            "TiProxy's config refuses it"
        );
        assert_eq!(Routing::PreferIdle.name(), "prefer-idle");
    }
}
