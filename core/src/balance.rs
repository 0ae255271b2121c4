//! Balancing math: where a new connection goes, and which sessions one
//! rebalance tick moves where. Pure functions of a snapshot of the backends;
//! the runtime takes the snapshot, applies the plan, and repeats.
//!
//! Backends are ranked by factors, in the order of TiProxy's `[balance]
//! policy` (lower ranks first):
//! - `resource` (the default): health, memory risk, CPU use, location, load;
//! - `location`: location, health, memory risk, CPU use, load;
//! - `connection`: load only.
//!
//! Health is TiDB's error rate towards PD and TiKV ([`HealthMeter`]): 0
//! normal, 1 in between, 2 failing. Load is sessions plus sessions on their
//! way. Memory risk is 0 below 60%
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
//!   for the first factor where they differ enough: a failing backend
//!   next to a normal one (all its sessions within 60 s, or at
//!   `[balance.health] migrations-per-second`), any memory-risk
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
//! CPU use between metric reads is estimated from the last read
//! ([`CpuMeter`]) and the sessions that arrived or left since, at the
//! cluster's average CPU per session (at least 0.1%), as TiProxy does.
//!
//! The move ledger ([`MoveLedger`]) keeps what moves are under way, which
//! sessions cool down after a failed move and which backends cannot export
//! sessions; the per-second rates of `[balance.<factor>]` and their
//! defaults ([`Rates`]) become one tick's budgets in [`BalanceConfig::new`].
//!
//! Where a new connection goes is [`route`], by TiProxy's `[balance]
//! routing-policy` ([`Routing`]).
//!
//! TiDBs are balanced inside their group (`[balance] routing-rule`,
//! [`Groups`]): [`plan_grouped`] plans each group on its own, so no move
//! ever leaves a group.

mod cpu;
mod group;
mod health;
mod ledger;
mod route;

pub use cpu::{CPU_METRICS_EXPIRY, CPU_MIN_READ_INTERVAL, CpuMeter};
pub use group::{
    CIDR_LABEL, ClientInfo, GroupEvent, GroupId, Groups, NoGroup, PORT_LABEL, RoutingRule,
};
pub use health::{
    HEALTH_INDICATORS, HEALTH_METRICS_EXPIRY, HEALTH_WINDOW, HealthLevel, HealthMeter,
    HealthReading, Indicator, Judgement,
};
pub use ledger::{
    ER_CANNOT_EXPORT_NOW, FAILED_MOVE_COOLDOWN, MAX_MOVES_IN_FLIGHT, MoveLedger, MoveOutcome,
    Resolved,
};
pub use route::{Routing, route};

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
            Policy::Resource => &[Health, Memory, Cpu, Location, Load],
            Policy::Location => &[Location, Health, Memory, Cpu, Load],
            Policy::Connection => &[Load],
        }
    }
}

/// Why a session is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Factor {
    /// Its backend is draining, removed or unhealthy.
    Evacuate,
    /// Its backend fails towards PD or TiKV (TiDB's error rates).
    Health,
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
            Factor::Health => "health",
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
    /// Its health from TiDB's error rates ([`HealthMeter`]); normal when
    /// unknown, as TiProxy takes a backend without metrics.
    pub health: HealthLevel,
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
            health: HealthLevel::Normal,
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
    /// Most moves per tick away from a failing backend (`health`); `None`
    /// paces as TiProxy does (all its sessions within 60 s).
    pub health_budget: Option<u32>,
    /// Imbalance that triggers moves between accepting backends (busiest
    /// over idlest); TiProxy's `conn-count.count-ratio-threshold`.
    pub count_ratio_threshold: f64,
    /// Which factors rank backends.
    pub policy: Policy,
    /// Seconds between ticks (to pace memory moves).
    pub tick_secs: f64,
}

impl Default for BalanceConfig {
    /// TiProxy's defaults: [`Rates::default`] under the `resource` policy.
    fn default() -> Self {
        Self::new(Policy::Resource, &Rates::default())
    }
}

/// Ticks of the rebalance loop per second.
pub const TICKS_PER_SECOND: u32 = 10;
/// Seconds between two ticks of the rebalance loop.
pub const TICK_SECS: f64 = 1.0 / TICKS_PER_SECOND as f64;
/// Default of `[balance.status] migrations-per-second`: move requests per
/// second evacuating draining or removed backends (TiProxy: 5000).
pub const EVACUATION_RATE: f64 = 5000.0;
/// Default of `[balance.conn-count] migrations-per-second`: move requests
/// per second evening out session counts (TiProxy: 100).
pub const REBALANCE_RATE: f64 = 100.0;
/// Default of `[balance.cpu] migrations-per-second`. TiProxy paces CPU
/// moves at `1 / cpu-per-session / 600` per second, at most 1.7/s (its
/// floor of 0.1% CPU per session); 20/s (2 per tick) keeps that order of
/// magnitude while letting a small cluster settle in seconds.
pub const CPU_RATE: f64 = 20.0;
/// Default of `[balance.location] migrations-per-second`. TiProxy moves one
/// session per second; here the floor is one per tick, 10/s.
pub const LOCATION_RATE: f64 = 10.0;
/// Default of `[balance.conn-count] count-ratio-threshold` (TiProxy: 1.2).
pub const COUNT_RATIO_THRESHOLD: f64 = 1.2;

/// The per-second rates of TiProxy's `[balance.<factor>]` sections; a rate
/// of 0 (TiProxy's "unset") means the default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// `[balance.status] migrations-per-second`.
    pub evacuation: f64,
    /// `[balance.conn-count] migrations-per-second`.
    pub rebalance: f64,
    /// `[balance.cpu] migrations-per-second`.
    pub cpu: f64,
    /// `[balance.memory] migrations-per-second`; `None`: TiProxy's pace
    /// (see the module documentation).
    pub memory: Option<f64>,
    /// `[balance.location] migrations-per-second`.
    pub location: f64,
    /// `[balance.health] migrations-per-second`; `None` (or 0): TiProxy's
    /// pace (see the module documentation).
    pub health: Option<f64>,
    /// `[balance.conn-count] count-ratio-threshold`.
    pub count_ratio_threshold: f64,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            evacuation: EVACUATION_RATE,
            rebalance: REBALANCE_RATE,
            cpu: CPU_RATE,
            memory: None,
            location: LOCATION_RATE,
            health: None,
            count_ratio_threshold: COUNT_RATIO_THRESHOLD,
        }
    }
}

impl BalanceConfig {
    /// The knobs of one [`TICK_SECS`] tick from per-second rates: each rate
    /// is spread over the ticks of a second, at least one move per tick.
    pub fn new(policy: Policy, rates: &Rates) -> Self {
        let or = |r: f64, default: f64| if r > 0.0 { r } else { default };
        let per_tick = |rate: f64| ((rate / f64::from(TICKS_PER_SECOND)).ceil() as u32).max(1);
        let evacuation = per_tick(or(rates.evacuation, EVACUATION_RATE));
        let rebalance = per_tick(or(rates.rebalance, REBALANCE_RATE));
        Self {
            budget: evacuation.max(rebalance),
            rebalance_budget: rebalance,
            cpu_budget: per_tick(or(rates.cpu, CPU_RATE)),
            memory_budget: rates.memory.filter(|r| *r > 0.0).map(per_tick),
            location_budget: per_tick(or(rates.location, LOCATION_RATE)),
            health_budget: rates.health.filter(|r| *r > 0.0).map(per_tick),
            count_ratio_threshold: if rates.count_ratio_threshold > 1.0 {
                rates.count_ratio_threshold
            } else {
                COUNT_RATIO_THRESHOLD
            },
            policy,
            tick_secs: TICK_SECS,
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
            Factor::Health => self.bs[i].health as u64,
            Factor::Memory => self.memory_level(i),
            Factor::Cpu if self.use_cpu => self.cpu(i).map_or(0, cpu_step),
            Factor::Location => u64::from(!self.bs[i].local),
            Factor::Load => self.load[i],
            Factor::Cpu | Factor::Evacuate => 0,
        }
    }

    /// Rank key: lower is better.
    fn key(&self, i: usize) -> [u64; 5] {
        let mut k = [0; 5];
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
                Factor::Health => {
                    // TiProxy moves only from failing to normal; one level
                    // apart leaves the decision to the next factors.
                    let (a, b) = (self.bs[from].health as u64, self.bs[to].health as u64);
                    if a < b {
                        return None;
                    }
                    if a >= b + 2 {
                        return Some(Factor::Health);
                    }
                }
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

/// A failing backend's sessions all leave within this many seconds
/// (TiProxy's `balanceSeconds4Health`: slow, since metrics lag).
pub const HEALTH_BALANCE_SECS: f64 = 60.0;

/// Whether CPU use `a` exceeds `b` by enough to move sessions: two steps
/// and [`CPU_IMBALANCE_RATIO`].
fn cpu_imbalanced(a: f64, b: f64) -> bool {
    cpu_step(a) >= cpu_step(b) + 2 && a > CPU_IMBALANCE_RATIO * b
}

/// The backend for a new connection: the best-ranked accepting backend
/// under `policy`; `tie` (random) breaks ties ([`Routing::Idlest`]).
pub fn choose(backends: &[BackendLoad], policy: Policy, tie: u64) -> Option<usize> {
    route(
        backends,
        policy,
        Routing::Idlest,
        COUNT_RATIO_THRESHOLD,
        tie,
    )
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
    plan_steps(backends, cfg, false)
}

/// Only the evacuations [`plan`] would start (its first step), within
/// `cfg.budget`: what the runtime asks for between two ticks when moves
/// under way end and draining backends still hold sessions, so a drain
/// runs at the rate of its budget rather than at the pace of the ticks.
pub fn plan_evacuations(backends: &[BackendLoad], cfg: &BalanceConfig) -> Vec<Move> {
    plan_steps(backends, cfg, true)
}

fn plan_steps(backends: &[BackendLoad], cfg: &BalanceConfig, evacuations_only: bool) -> Vec<Move> {
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
    if evacuations_only {
        return moves;
    }
    // 2. Balance among accepting backends: the worst-ranked gives to the
    //    best-ranked, for the first factor that says so.
    let pace = |from: usize, secs: f64| -> u32 {
        ((f64::from(backends[from].sessions) * cfg.tick_secs / secs).ceil() as u32).max(1)
    };
    let memory_pace = |from: usize| -> u32 {
        match backends[from].memory.map(memory_level) {
            Some(2) => pace(from, 10.0),
            _ => pace(from, 60.0),
        }
    };
    let mut left_load = cfg.rebalance_budget;
    let mut left_cpu = cfg.cpu_budget;
    let mut left_location = cfg.location_budget;
    let mut left_memory: Vec<Option<u32>> = vec![None; backends.len()];
    let mut left_health: Vec<Option<u32>> = vec![None; backends.len()];
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
            Factor::Health => left_health[from].get_or_insert_with(|| {
                cfg.health_budget
                    .unwrap_or_else(|| pace(from, HEALTH_BALANCE_SECS))
            }),
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

/// The moves of one tick when backends are grouped: `groups[i]` is
/// backend `i`'s group. Each group is planned on its own ([`plan`]), so a
/// move's source and target are always in one group; a backend without a
/// group is in no plan (it never gets sessions). The groups share the
/// tick's budget.
pub fn plan_grouped(
    backends: &[BackendLoad],
    groups: &[Option<GroupId>],
    cfg: &BalanceConfig,
) -> Vec<Move> {
    grouped(backends, groups, cfg, plan)
}

/// [`plan_evacuations`] inside each group, as [`plan_grouped`] plans.
pub fn plan_evacuations_grouped(
    backends: &[BackendLoad],
    groups: &[Option<GroupId>],
    cfg: &BalanceConfig,
) -> Vec<Move> {
    grouped(backends, groups, cfg, plan_evacuations)
}

fn grouped(
    backends: &[BackendLoad],
    groups: &[Option<GroupId>],
    cfg: &BalanceConfig,
    plan: fn(&[BackendLoad], &BalanceConfig) -> Vec<Move>,
) -> Vec<Move> {
    let mut ids: Vec<GroupId> = groups.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut left = cfg.budget;
    let mut moves = Vec::new();
    for id in ids {
        if left == 0 {
            break;
        }
        let members: Vec<usize> = (0..backends.len())
            .filter(|&i| groups.get(i).copied().flatten() == Some(id))
            .collect();
        let sub: Vec<BackendLoad> = members.iter().map(|&i| backends[i]).collect();
        let cfg = BalanceConfig {
            budget: left,
            ..*cfg
        };
        for m in plan(&sub, &cfg) {
            left = left.saturating_sub(m.count);
            moves.push(Move {
                from: members[m.from],
                to: members[m.to],
                ..m
            });
        }
    }
    moves
}

#[cfg(test)]
mod tests;
