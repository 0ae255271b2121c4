//! Balancing math: where a new connection goes, and which sessions one
//! rebalance tick moves where. Pure functions of a snapshot of the backends;
//! the runtime takes the snapshot, applies the plan, and repeats.
//!
//! Backends are ranked by factors, in the order of TiProxy's `[balance]
//! policy` (lower ranks first):
//! - `resource` (the default): memory risk, CPU use, location, load;
//! - `location`: location, memory risk, CPU use, load;
//! - `connection`: load only.
//!
//! Load is sessions plus sessions on their way. Memory risk is 0 below 60%
//! of the memory quota, 1 from 60%, 2 from 75% (TiProxy's OOM-risk levels);
//! CPU use is compared in 5% steps; location is whether the backend is in
//! this proxy's zone. A factor whose data some accepting backend lacks (no
//! metrics yet, not a TiDB) is left out for every backend, so a fresh
//! backend is never judged on numbers the others have and it has not.
//!
//! Each tick:
//! - backends that are draining, removed or unhealthy are evacuated first,
//!   one session at a time to the best-ranked target;
//! - then the worst-ranked backend gives sessions to the best-ranked one,
//!   for the first factor where they differ enough: any memory-risk
//!   difference (at TiProxy's pace: all sessions of a backend at OOM risk
//!   within 10 s, at high memory within 60 s), a CPU difference of at
//!   least two steps and 20%, a backend outside the zone when one inside
//!   has room, or more than `count_ratio_threshold` times the sessions
//!   (and at least two more);
//! - a move never makes the target worse than the source on the factor
//!   that decided it or on CPU, so sessions never ping-pong;
//! - a plan never moves more than the tick's budgets and never targets a
//!   backend that cannot take sessions.
//!
//! CPU use between metric reads is estimated from the last read and the
//! sessions that arrived or left since, at the cluster's average CPU per
//! session (at least 0.1%), as TiProxy does.

/// TiProxy's `[balance] policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Memory risk, CPU use, location, then load.
    #[default]
    Resource,
    /// Location, memory risk, CPU use, then load.
    Location,
    /// Load only.
    Connection,
}

impl Policy {
    /// Parses TiProxy's names (`""` is the default, `resource`).
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "" | "resource" => Some(Policy::Resource),
            "location" => Some(Policy::Location),
            "connection" => Some(Policy::Connection),
            _ => None,
        }
    }

    fn factors(self) -> &'static [Factor] {
        use Factor::*;
        match self {
            Policy::Resource => &[Memory, Cpu, Location, Load],
            Policy::Location => &[Location, Memory, Cpu, Load],
            Policy::Connection => &[Load],
        }
    }
}

/// Why a session is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Factor {
    /// Its backend is draining, removed or unhealthy.
    Evacuate,
    /// Its backend is at a higher memory risk.
    Memory,
    /// Its backend is busier on CPU.
    Cpu,
    /// Its backend is outside this proxy's zone.
    Location,
    /// Its backend has more sessions.
    Load,
}

impl Factor {
    /// The name TiProxy's metrics and config use.
    pub fn name(self) -> &'static str {
        match self {
            Factor::Evacuate => "status",
            Factor::Memory => "memory",
            Factor::Cpu => "cpu",
            Factor::Location => "location",
            Factor::Load => "conn",
        }
    }
}

/// A backend's CPU use at its last metrics read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// Use, 0.0-1.0 of its processors.
    pub usage: f64,
    /// Sessions it had when it was read.
    pub sessions: u32,
}

/// What the planner knows of one backend.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// CPU use from its metrics; `None` when unknown or stale.
    pub cpu: Option<CpuSample>,
    /// Memory use, 0.0-1.0 of its memory quota; `None` when unknown.
    pub memory: Option<f64>,
    /// In this proxy's zone (true when no zone is configured).
    pub local: bool,
}

impl BackendLoad {
    /// A healthy local backend with `sessions` sessions, all movable, no
    /// metrics.
    pub fn with_sessions(sessions: u32) -> Self {
        Self {
            sessions,
            incoming: 0,
            movable: sessions,
            accepts: true,
            evacuate: false,
            cpu: None,
            memory: None,
            local: true,
        }
    }

    fn load(&self) -> u64 {
        u64::from(self.sessions) + u64::from(self.incoming)
    }
}

/// Memory use from which a backend is at risk (level 1).
pub const MEMORY_HIGH: f64 = 0.6;
/// Memory use from which a backend is at risk of OOM (level 2).
pub const MEMORY_OOM_RISK: f64 = 0.75;
/// CPU use is compared in steps of this size.
pub const CPU_STEP: f64 = 0.05;
/// CPU moves need the source to exceed the target by this ratio too.
pub const CPU_IMBALANCE_RATIO: f64 = 1.2;
/// Smallest CPU use assumed per session.
pub const CPU_MIN_PER_SESSION: f64 = 0.001;
/// Sessions do not move into the zone onto a backend this busy.
pub const LOCATION_MAX_TARGET_CPU: f64 = 0.8;

fn memory_level(m: f64) -> u64 {
    if m >= MEMORY_OOM_RISK {
        2
    } else if m >= MEMORY_HIGH {
        1
    } else {
        0
    }
}

fn cpu_step(c: f64) -> u64 {
    (c.clamp(0.0, 1.0) / CPU_STEP + 1e-9).floor() as u64
}

/// Knobs of one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceConfig {
    /// Most move requests per tick, all factors together.
    pub budget: u32,
    /// Most moves per tick to even out load (`conn-count`).
    pub rebalance_budget: u32,
    /// Most moves per tick for CPU (`cpu`).
    pub cpu_budget: u32,
    /// Most moves per tick for memory risk (`memory`); `None` paces as
    /// TiProxy does (see the module documentation).
    pub memory_budget: Option<u32>,
    /// Most moves per tick into the zone (`location`).
    pub location_budget: u32,
    /// Imbalance that triggers moves between accepting backends (busiest
    /// over idlest); TiProxy's `conn-count.count-ratio-threshold`.
    pub count_ratio_threshold: f64,
    /// Which factors rank backends.
    pub policy: Policy,
    /// Seconds between ticks (to pace memory moves).
    pub tick_secs: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            budget: 100,
            rebalance_budget: 100,
            cpu_budget: 10,
            memory_budget: None,
            location_budget: 1,
            count_ratio_threshold: 1.2,
            policy: Policy::Resource,
            tick_secs: 0.1,
        }
    }
}

/// Move `count` sessions from backend `from` to backend `to` (indexes into
/// the snapshot) because of `factor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Source backend.
    pub from: usize,
    /// Target backend.
    pub to: usize,
    /// How many sessions.
    pub count: u32,
    /// Why.
    pub factor: Factor,
}

/// The ranking state of a snapshot while a plan moves sessions in it.
struct Ranking<'a> {
    bs: &'a [BackendLoad],
    policy: Policy,
    load: Vec<u64>,
    use_cpu: bool,
    use_memory: bool,
    per_session: f64,
}

impl<'a> Ranking<'a> {
    fn new(bs: &'a [BackendLoad], policy: Policy) -> Self {
        let active = policy != Policy::Connection;
        let accepting = || bs.iter().filter(|b| b.accepts);
        let use_cpu = active && accepting().all(|b| b.cpu.is_some());
        let use_memory = active && accepting().all(|b| b.memory.is_some());
        let (usage, sessions) = bs
            .iter()
            .filter_map(|b| b.cpu)
            .fold((0.0, 0u64), |(u, s), c| {
                (u + c.usage.clamp(0.0, 1.0), s + u64::from(c.sessions))
            });
        let per_session = if sessions == 0 {
            CPU_MIN_PER_SESSION
        } else {
            (usage / sessions as f64).max(CPU_MIN_PER_SESSION)
        };
        Self {
            bs,
            policy,
            load: bs.iter().map(BackendLoad::load).collect(),
            use_cpu,
            use_memory,
            per_session,
        }
    }

    /// Estimated CPU use of backend `i` with its current (planned) load.
    fn cpu(&self, i: usize) -> Option<f64> {
        let c = self.bs[i].cpu?;
        let delta = self.load[i] as f64 - f64::from(c.sessions);
        Some((c.usage + delta * self.per_session).clamp(0.0, 1.0))
    }

    fn memory_level(&self, i: usize) -> u64 {
        match self.bs[i].memory {
            Some(m) if self.use_memory => memory_level(m),
            _ => 0,
        }
    }

    fn score(&self, i: usize, f: Factor) -> u64 {
        match f {
            Factor::Memory => self.memory_level(i),
            Factor::Cpu if self.use_cpu => self.cpu(i).map_or(0, cpu_step),
            Factor::Location => u64::from(!self.bs[i].local),
            Factor::Load => self.load[i],
            Factor::Cpu | Factor::Evacuate => 0,
        }
    }

    /// Rank key: lower is better.
    fn key(&self, i: usize) -> [u64; 4] {
        let mut k = [0; 4];
        for (slot, f) in k.iter_mut().zip(self.policy.factors()) {
            *slot = self.score(i, *f);
        }
        k
    }

    /// The best-ranked accepting backend that `ok` allows (lowest index
    /// among equals).
    fn best(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        (0..self.bs.len())
            .filter(|&i| self.bs[i].accepts && ok(i))
            .min_by_key(|&i| (self.key(i), i))
    }

    /// Whether moving a session `from` -> `to` would leave `to` busier on
    /// CPU than `from` by enough to move it back.
    fn cpu_would_flip(&self, from: usize, to: usize) -> bool {
        if !self.use_cpu {
            return false;
        }
        let (Some(f), Some(t)) = (self.cpu(from), self.cpu(to)) else {
            return false;
        };
        let (f, t) = (
            (f - self.per_session).max(0.0),
            (t + self.per_session).min(1.0),
        );
        cpu_imbalanced(t, f)
    }

    /// The factor that justifies moving one session `from` -> `to`, if
    /// any.
    fn reason(&self, from: usize, to: usize, ratio: f64) -> Option<Factor> {
        for &f in self.policy.factors() {
            match f {
                Factor::Memory => {
                    let (a, b) = (self.memory_level(from), self.memory_level(to));
                    if a != b {
                        return (a > b).then_some(Factor::Memory);
                    }
                }
                Factor::Cpu => {
                    if !self.use_cpu {
                        continue;
                    }
                    let (Some(a), Some(b)) = (self.cpu(from), self.cpu(to)) else {
                        continue;
                    };
                    if cpu_step(a) < cpu_step(b) {
                        return None;
                    }
                    // Move only while the source stays at least as busy as
                    // the target after the move.
                    if cpu_imbalanced(a, b) && a - b >= 2.0 * self.per_session {
                        return Some(Factor::Cpu);
                    }
                }
                Factor::Location => {
                    let (a, b) = (self.bs[from].local, self.bs[to].local);
                    if a != b {
                        if a {
                            return None;
                        }
                        let busy = self.memory_level(to) > 0
                            || (self.use_cpu
                                && self.cpu(to).is_some_and(|c| c >= LOCATION_MAX_TARGET_CPU));
                        return (!busy && !self.cpu_would_flip(from, to))
                            .then_some(Factor::Location);
                    }
                }
                Factor::Load => {
                    let (hi, lo) = (self.load[from], self.load[to]);
                    // Moving one session must leave the source at least as
                    // loaded as the target (hi - 1 >= lo + 1), and the
                    // imbalance must exceed the threshold: that is the
                    // hysteresis that stops ping-pong.
                    let over = (hi as f64) > ratio * (lo.max(1) as f64);
                    return (hi >= lo + 2 && over && !self.cpu_would_flip(from, to))
                        .then_some(Factor::Load);
                }
                Factor::Evacuate => {}
            }
        }
        None
    }
}

/// Whether CPU use `a` exceeds `b` by enough to move sessions: two steps
/// and [`CPU_IMBALANCE_RATIO`].
fn cpu_imbalanced(a: f64, b: f64) -> bool {
    cpu_step(a) >= cpu_step(b) + 2 && a > CPU_IMBALANCE_RATIO * b
}

/// The backend for a new connection: the best-ranked accepting backend
/// under `policy`; `tie` (random) breaks ties.
pub fn choose(backends: &[BackendLoad], policy: Policy, tie: u64) -> Option<usize> {
    let r = Ranking::new(backends, policy);
    let best = r.best(|_| true)?;
    let key = r.key(best);
    let ties: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].accepts && r.key(i) == key)
        .collect();
    Some(ties[(tie % ties.len() as u64) as usize])
}

/// Each backend's rank under `policy`: the score of each factor in the
/// policy's order (lower ranks first; what `GET /api/backends` shows).
pub fn scores(backends: &[BackendLoad], policy: Policy) -> Vec<Vec<(Factor, u64)>> {
    let r = Ranking::new(backends, policy);
    (0..backends.len())
        .map(|i| {
            policy
                .factors()
                .iter()
                .map(|&f| (f, r.score(i, f)))
                .collect()
        })
        .collect()
}

/// The moves of one tick.
pub fn plan(backends: &[BackendLoad], cfg: &BalanceConfig) -> Vec<Move> {
    let mut r = Ranking::new(backends, cfg.policy);
    let mut movable: Vec<u32> = backends.iter().map(|b| b.movable.min(b.sessions)).collect();
    let mut budget = cfg.budget;
    let mut moves: Vec<Move> = Vec::new();
    let add = |moves: &mut Vec<Move>, from: usize, to: usize, factor: Factor| match moves
        .iter_mut()
        .find(|m| m.from == from && m.to == to && m.factor == factor)
    {
        Some(m) => m.count += 1,
        None => moves.push(Move {
            from,
            to,
            count: 1,
            factor,
        }),
    };
    // 1. Evacuation, one session at a time to the best target, so moves
    //    spread over several targets.
    for from in 0..backends.len() {
        if !backends[from].evacuate {
            continue;
        }
        while budget > 0 && movable[from] > 0 {
            let Some(to) = r.best(|i| i != from) else {
                break;
            };
            add(&mut moves, from, to, Factor::Evacuate);
            movable[from] -= 1;
            r.load[from] -= 1;
            r.load[to] += 1;
            budget -= 1;
        }
    }
    // 2. Balance among accepting backends: the worst-ranked gives to the
    //    best-ranked, for the first factor that says so.
    let memory_pace = |from: usize| -> u32 {
        let b = &backends[from];
        let secs = match b.memory.map(memory_level) {
            Some(2) => 10.0,
            _ => 60.0,
        };
        ((f64::from(b.sessions) * cfg.tick_secs / secs).ceil() as u32).max(1)
    };
    let mut left_load = cfg.rebalance_budget;
    let mut left_cpu = cfg.cpu_budget;
    let mut left_location = cfg.location_budget;
    let mut left_memory: Vec<Option<u32>> = vec![None; backends.len()];
    // A backend is a source or a target within one tick, never both.
    let target = |moves: &[Move], i: usize| moves.iter().any(|m| m.to == i);
    let source = |moves: &[Move], i: usize| moves.iter().any(|m| m.from == i);
    while budget > 0 {
        let Some(from) = (0..backends.len())
            .filter(|&i| {
                backends[i].accepts && !backends[i].evacuate && movable[i] > 0 && !target(&moves, i)
            })
            .max_by_key(|&i| (r.key(i), std::cmp::Reverse(i)))
        else {
            break;
        };
        let Some(to) = r.best(|i| i != from && !source(&moves, i)) else {
            break;
        };
        let Some(factor) = r.reason(from, to, cfg.count_ratio_threshold) else {
            break;
        };
        let left = match factor {
            Factor::Memory => left_memory[from]
                .get_or_insert_with(|| cfg.memory_budget.unwrap_or_else(|| memory_pace(from))),
            Factor::Cpu => &mut left_cpu,
            Factor::Location => &mut left_location,
            Factor::Load | Factor::Evacuate => &mut left_load,
        };
        if *left == 0 {
            break;
        }
        *left -= 1;
        add(&mut moves, from, to, factor);
        movable[from] -= 1;
        r.load[from] -= 1;
        r.load[to] += 1;
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
                ),
            )
                .prop_map(
                    |((sessions, incoming, accepts, evacuate, pct), (cpu, memory, local))| {
                        BackendLoad {
                            sessions,
                            incoming,
                            movable: sessions * pct / 100,
                            accepts: accepts && !evacuate,
                            evacuate,
                            cpu: cpu.map(|usage| CpuSample { usage, sessions }),
                            memory,
                            local,
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
}
