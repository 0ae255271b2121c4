//! A run's every parameter, derived from one `u64` seed (swarm testing:
//! which features and faults a run has is itself drawn from the seed, so a
//! sweep covers runs with few kinds of traffic as well as mixed ones).

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long after the last fault every session must be on a live TiDB and
/// the spread balanced (the liveness bound, in simulated time).
pub const LIVENESS_BOUND: Duration = Duration::from_secs(12);

/// How long after PD is reachable again the proxy may take to read it: its
/// retry backoff (up to 5 s) plus a connect.
pub const PD_RECONNECT: Duration = Duration::from_secs(6);

/// What happens to a TiDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// TiDB's graceful shutdown (`/status` 500 for `graceful_wait`, then
    /// idle sessions are closed); deregistered from PD when it ends.
    GracefulShutdown {
        /// `graceful-wait-before-shutdown`.
        graceful_wait: Duration,
        /// Starts again (same addresses, same store) this long after the
        /// shutdown ended, and registers again: a rolling restart.
        restart_after: Option<Duration>,
    },
    /// Killed: every socket dropped at once; PD forgets it when its lease
    /// expires.
    Crash {
        /// Its PD lease's TTL (whole seconds, as etcd's): PD forgets it
        /// between two thirds of this (it renews every third) and all of
        /// it after the crash.
        lease: Duration,
        /// Starts again (same addresses, same store) this long after the
        /// crash, and registers again.
        restart_after: Option<Duration>,
        /// It dies in the middle of a statement: the first write outside a
        /// transaction it runs after `at` (within [`MID_STATEMENT_WAIT`];
        /// see `TidbHandle::crash_after_next_statement`) is applied and
        /// never answered, then it is killed. Otherwise it dies at `at`,
        /// whatever its sessions are doing.
        mid_statement: bool,
    },
}

/// How long a crash in the middle of a statement waits for one
/// ([`FaultKind::Crash::mid_statement`]) before it kills the TiDB anyway.
pub const MID_STATEMENT_WAIT: Duration = Duration::from_secs(2);

/// One fault, at a simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// When (simulated time since the start).
    pub at: Duration,
    /// Which TiDB (index; host `tidb-<i>`).
    pub tidb: usize,
    /// What.
    pub kind: FaultKind,
}

impl Fault {
    /// When its effect on sessions is over: the TiDB closes its sessions
    /// (graceful) or dies (crash).
    pub fn settled_at(&self) -> Duration {
        match self.kind {
            // A restart comes after the shutdown ends, which idle sessions
            // make quick; a second covers the rest.
            FaultKind::GracefulShutdown {
                graceful_wait,
                restart_after,
            } => {
                self.at
                    + graceful_wait
                    + restart_after.map_or(Duration::ZERO, |r| r + Duration::from_secs(1))
            }
            FaultKind::Crash {
                restart_after,
                mid_statement,
                ..
            } => {
                self.at
                    + if mid_statement {
                        MID_STATEMENT_WAIT
                    } else {
                        Duration::ZERO
                    }
                    + restart_after.map_or(Duration::ZERO, |r| r + Duration::from_secs(1))
            }
        }
    }

    /// Whether sessions on the TiDB may see errors: a crash, or a graceful
    /// shutdown that closes idle sessions at once (no graceful wait gives
    /// the proxy no time to move them).
    pub fn breaks_sessions(&self) -> bool {
        match self.kind {
            FaultKind::GracefulShutdown { graceful_wait, .. } => graceful_wait.is_zero(),
            FaultKind::Crash { .. } => true,
        }
    }
}

/// A held link between the proxy and a TiDB: every message either way
/// waits, then all arrive in order when it is released. This is what TCP
/// makes of a network partition shorter than its retransmission timeout:
/// nothing is lost, so no client may see an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLink {
    /// Which TiDB (index; host `tidb-<i>`).
    pub tidb: usize,
    /// When it is held.
    pub at: Duration,
    /// How long until it is released.
    pub len: Duration,
}

/// How long a partition lasts before TCP gives up on the connections
/// across it and resets them (retransmissions or keep-alives exhausted;
/// minutes in production, compressed here so runs stay short).
pub const TCP_GIVES_UP: Duration = Duration::from_secs(5);

/// A partition that loses messages, between the proxy and a TiDB (or PD),
/// outlasting [`TCP_GIVES_UP`]: it is a held link until then; then every
/// connection across it is reset at both ends; connections made later wait
/// for the link like any segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Which TiDB (index), or `None` for PD.
    pub tidb: Option<usize>,
    /// When it starts.
    pub at: Duration,
    /// How long it lasts (more than [`TCP_GIVES_UP`]).
    pub len: Duration,
}

impl Partition {
    /// When TCP gives up and resets the connections across it.
    pub fn cut_at(&self) -> Duration {
        self.at + TCP_GIVES_UP
    }
}

/// Relative weights of a session's operations (0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Autocommit `INSERT` of a unique key.
    pub insert: u32,
    /// Autocommit `UPDATE counters SET n = n + 1` (not idempotent: a
    /// statement run twice shows).
    pub increment: u32,
    /// `BEGIN`, identity, inserts, a read of its own write, identity,
    /// `COMMIT` or `ROLLBACK`.
    pub transaction: u32,
    /// `SET @v = ...`.
    pub user_var: u32,
    /// Reads and compares the whole session state.
    pub state_check: u32,
    /// Executes the binary prepared statement.
    pub prepared: u32,
    /// Sleeps, idle, for up to two seconds.
    pub idle: u32,
    /// Reads back all of its own keys (a long result set) and checks that
    /// every commit it was told of is there and nothing it was told failed.
    pub scan: u32,
    /// Quits and connects again, setting its state up anew (a pool
    /// recycling its connections): new sessions arrive during faults.
    pub reconnect: u32,
}

impl Mix {
    fn derive(rng: &mut StdRng, later: &mut StdRng) -> Self {
        // Swarm: each kind is off in about a third of the sessions.
        let mut w = |base: u32| {
            if rng.random_bool(0.35) {
                0
            } else {
                rng.random_range(1..=base)
            }
        };
        let mut m = Mix {
            insert: w(10),
            increment: w(6),
            transaction: w(8),
            user_var: w(4),
            state_check: w(4),
            prepared: w(4),
            idle: w(3),
            scan: 0,
            reconnect: 0,
        };
        m.scan = if later.random_bool(0.35) {
            0
        } else {
            later.random_range(1..=2)
        };
        m.reconnect = u32::from(later.random_bool(0.5));
        if m.total() == 0 {
            m.insert = 1;
        }
        m
    }

    /// Sum of the weights.
    pub fn total(&self) -> u32 {
        self.insert
            + self.increment
            + self.transaction
            + self.user_var
            + self.state_check
            + self.prepared
            + self.idle
            + self.scan
            + self.reconnect
    }
}

/// One client session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPlan {
    /// Session number (key space, expected state).
    pub id: usize,
    /// Client host it runs on.
    pub host: usize,
    /// `app` (mysql_native_password) or `sha2user` (caching_sha2_password).
    pub user: &'static str,
    /// Negotiates CLIENT_DEPRECATE_EOF.
    pub deprecate_eof: bool,
    /// Starts in the `sim` database (`USE`) rather than `test`.
    pub use_db: bool,
    /// Operation weights.
    pub mix: Mix,
    /// Most think time between operations.
    pub think_max: Duration,
    /// When it connects.
    pub start: Duration,
}

/// Everything a run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The seed everything here comes from.
    pub seed: u64,
    /// TiDBs up from the start (`tidb-0` ..).
    pub initial_tidbs: usize,
    /// A TiDB that joins later (index `initial_tidbs`), and when.
    pub added_tidb: Option<Duration>,
    /// Faults, in time order; never all TiDBs.
    pub faults: Vec<Fault>,
    /// Largest one-way message latency.
    pub max_latency: Duration,
    /// turmoil's step: every host runs this much simulated time per step
    /// (finer steps interleave hosts more finely; coarser runs faster).
    pub tick: Duration,
    /// How long PD takes to tell a watcher about a change.
    pub pd_delay: Duration,
    /// PD's host is down from `.0` for `.1`, then comes back with its data
    /// (TiDBs register again, leases get a full TTL): the proxy keeps
    /// serving on the last backend list it saw.
    pub pd_outage: Option<(Duration, Duration)>,
    /// The link between the proxy and PD is held from `.0` for `.1`: the
    /// proxy's watch hears nothing, gives up after its keep-alive silence
    /// and cannot connect again until the link is released.
    pub pd_held: Option<(Duration, Duration)>,
    /// Partitions long enough that TCP resets the connections across them.
    pub partitions: Vec<Partition>,
    /// Links between the proxy and a TiDB held for a while, in time order.
    pub held_links: Vec<HeldLink>,
    /// Client hosts.
    pub client_hosts: usize,
    /// Sessions.
    pub sessions: Vec<SessionPlan>,
    /// When sessions stop their workloads and check liveness.
    pub workload_end: Duration,
    /// The proxy runs with `proxy.session-protection = true`: idle
    /// sessions on a crashed TiDB are restored on another one.
    pub protection: bool,
    /// Its `proxy.session-protection-delay`, in milliseconds.
    pub protection_delay_ms: u32,
}

impl Scenario {
    /// The run of `seed`.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Options added later draw from their own stream, so the options
        // that existed before (and the seeds quoted in bug reports) stay.
        let mut later = StdRng::seed_from_u64(seed ^ 0x6c61_7465_725f_7631);
        let initial_tidbs = rng.random_range(2..=3);
        let added_tidb = rng
            .random_bool(0.3)
            .then(|| Duration::from_millis(rng.random_range(2_000..12_000)));
        let total = initial_tidbs + usize::from(added_tidb.is_some());
        // At most all but one TiDB fault, and the one left is up from the
        // start, so some TiDB always serves.
        let n_faults = rng.random_range(0..=(initial_tidbs - 1).min(2));
        let mut candidates: Vec<usize> = (0..total).collect();
        // Crash protection, from a stream of its own (half the seeds); of
        // those, half export at once after a change (quiet period 0), half
        // wait the default 200 ms of idleness.
        let mut protect_rng = StdRng::seed_from_u64(seed ^ 0x7072_6f74_6563_7431);
        let protection = protect_rng.random_bool(0.5);
        let protection_delay_ms = if protect_rng.random_bool(0.5) { 0 } else { 200 };
        // Crash restarts came later: a stream of their own; crashes in the
        // middle of a statement later still, another. With protection on,
        // most faults are crashes (drawn from that stream too): the
        // protection is what they test.
        let mut restarts = StdRng::seed_from_u64(seed ^ 0x6372_6173_685f_7273);
        let mut mid = StdRng::seed_from_u64(seed ^ 0x6d69_645f_7374_6d74);
        let mut faults = Vec::new();
        for _ in 0..n_faults {
            let tidb = candidates.remove(rng.random_range(0..candidates.len()));
            let mut at = Duration::from_millis(rng.random_range(3_000..15_000));
            if tidb == initial_tidbs
                && let Some(t) = added_tidb
            {
                at = at.max(t + Duration::from_secs(2));
            }
            let crash = rng.random_bool(0.3);
            let kind = if crash || (protection && mid.random_bool(0.6)) {
                FaultKind::Crash {
                    lease: Duration::from_secs(
                        Duration::from_millis(rng.random_range(1_000..10_000))
                            .as_secs()
                            .max(1),
                    ),
                    restart_after: restarts
                        .random_bool(0.5)
                        .then(|| Duration::from_millis(restarts.random_range(500..8_000))),
                    mid_statement: mid.random_bool(0.5),
                }
            } else {
                FaultKind::GracefulShutdown {
                    graceful_wait: match rng.random_range(0..4) {
                        0 => Duration::ZERO,
                        _ => Duration::from_secs(rng.random_range(1..=4)),
                    },
                    restart_after: later
                        .random_bool(0.5)
                        .then(|| Duration::from_millis(later.random_range(500..5_000))),
                }
            };
            faults.push(Fault { at, tidb, kind });
        }
        faults.sort_by_key(|f| (f.at, f.tidb));
        let max_latency = Duration::from_millis(match rng.random_range(0..4) {
            0 => 1,
            1 => 5,
            2 => 10,
            _ => 25,
        });
        let tick = Duration::from_millis(match rng.random_range(0..10) {
            0 => 1,
            1..=3 => 2,
            _ => 5,
        });
        let pd_delay = Duration::from_millis(rng.random_range(100..2_000));
        let pd_outage = later.random_bool(0.25).then(|| {
            (
                Duration::from_millis(later.random_range(2_000..15_000)),
                Duration::from_millis(later.random_range(1_000..8_000)),
            )
        });
        // Network faults draw from a stream of their own (added later still).
        let mut netr = StdRng::seed_from_u64(seed ^ 0x6e65_745f_6661_756c);
        let mut held_links: Vec<HeldLink> = (0..netr
            .random_range(0..=2usize)
            .saturating_sub(usize::from(netr.random_bool(0.4))))
            .map(|_| {
                let tidb = netr.random_range(0..total);
                let mut at = Duration::from_millis(netr.random_range(2_000..15_000));
                if tidb == initial_tidbs
                    && let Some(t) = added_tidb
                {
                    at = at.max(t + Duration::from_secs(1));
                }
                HeldLink {
                    tidb,
                    at,
                    len: Duration::from_millis(netr.random_range(200..4_000)),
                }
            })
            .collect();
        held_links.sort_by_key(|h| (h.at, h.tidb));
        // PD's own links, from a stream of their own too.
        let mut pdr = StdRng::seed_from_u64(seed ^ 0x0070_645f_6865_6c64);
        let pd_held = pdr.random_bool(0.3).then(|| {
            (
                Duration::from_millis(pdr.random_range(2_000..15_000)),
                Duration::from_millis(pdr.random_range(500..10_000)),
            )
        });
        // Partitions, from a stream of their own.
        let mut partr = StdRng::seed_from_u64(seed ^ 0x7061_7274_6974_696f);
        let partitions: Vec<Partition> = partr
            .random_bool(0.3)
            .then(|| {
                let tidb = partr
                    .random_bool(0.75)
                    .then(|| partr.random_range(0..total));
                let mut at = Duration::from_millis(partr.random_range(2_000..15_000));
                if tidb == Some(initial_tidbs)
                    && let Some(t) = added_tidb
                {
                    at = at.max(t + Duration::from_secs(1));
                }
                Partition {
                    tidb,
                    at,
                    len: TCP_GIVES_UP + Duration::from_millis(partr.random_range(500..7_000)),
                }
            })
            .into_iter()
            .collect();
        let n_sessions = rng.random_range(3..=10);
        let client_hosts = rng.random_range(1..=3usize).min(n_sessions);
        let sessions = (0..n_sessions)
            .map(|id| SessionPlan {
                id,
                host: id % client_hosts,
                user: if rng.random_bool(0.3) {
                    "sha2user"
                } else {
                    "app"
                },
                deprecate_eof: rng.random_bool(0.5),
                use_db: rng.random_bool(0.5),
                mix: Mix::derive(&mut rng, &mut later),
                think_max: Duration::from_millis(rng.random_range(1..200)),
                start: Duration::from_millis(rng.random_range(500..3_000)),
            })
            .collect();
        let last = faults
            .iter()
            .map(Fault::settled_at)
            .chain(added_tidb)
            .chain(pd_outage.map(|(at, len)| at + len + pd_delay + PD_RECONNECT))
            .chain(pd_held.map(|(at, len)| at + len + pd_delay + PD_RECONNECT))
            .chain(held_links.iter().map(|h| h.at + h.len))
            .chain(partitions.iter().map(|p| {
                p.at + p.len
                    + if p.tidb.is_none() {
                        pd_delay + PD_RECONNECT
                    } else {
                        Duration::ZERO
                    }
            }))
            .max()
            .unwrap_or(Duration::from_secs(5));
        Scenario {
            seed,
            protection,
            protection_delay_ms,
            initial_tidbs,
            added_tidb,
            faults,
            max_latency,
            tick,
            pd_delay,
            pd_outage,
            pd_held,
            partitions,
            held_links,
            client_hosts,
            sessions,
            workload_end: last.max(Duration::from_secs(5)) + LIVENESS_BOUND,
        }
    }

    /// Every TiDB, started late or not.
    pub fn total_tidbs(&self) -> usize {
        self.initial_tidbs + usize::from(self.added_tidb.is_some())
    }

    /// The fault of TiDB `i`, if it has one.
    pub fn fault_of(&self, i: usize) -> Option<&Fault> {
        self.faults.iter().find(|f| f.tidb == i)
    }

    /// Whether sessions on the TiDB of fault `f` may see errors: the
    /// fault's own kind says so ([`Fault::breaks_sessions`]), or its
    /// graceful wait overlaps a held link between the proxy and any TiDB.
    /// Until its checks time out, the proxy cannot tell a held TiDB from a
    /// slow one: it may not learn that the TiDB is draining, or may move
    /// its sessions toward a held one, and the moves then cannot finish
    /// before the graceful wait ends and the TiDB closes them.
    pub fn fault_breaks_sessions(&self, f: &Fault) -> bool {
        match f.kind {
            FaultKind::GracefulShutdown { graceful_wait, .. } => {
                f.breaks_sessions()
                    || self
                        .held_links
                        .iter()
                        .any(|h| h.at <= f.at + graceful_wait && f.at <= h.at + h.len)
                    || self.partitions.iter().any(|p| {
                        p.tidb.is_some() && p.at <= f.at + graceful_wait && f.at <= p.at + p.len
                    })
            }
            FaultKind::Crash { .. } => true,
        }
    }

    /// Host name of TiDB `i`.
    pub fn tidb_host(i: usize) -> String {
        format!("tidb-{i}")
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {}", self.seed)?;
        writeln!(
            f,
            "  tidbs: {} from the start{}",
            self.initial_tidbs,
            match self.added_tidb {
                Some(t) => format!(", tidb-{} joins at {}ms", self.initial_tidbs, ms(t)),
                None => String::new(),
            }
        )?;
        if self.protection {
            writeln!(
                f,
                "  proxy: session-protection on, delay {}ms",
                self.protection_delay_ms
            )?;
        }
        if self.faults.is_empty() {
            writeln!(f, "  faults: none")?;
        }
        for x in &self.faults {
            match x.kind {
                FaultKind::GracefulShutdown {
                    graceful_wait,
                    restart_after,
                } => writeln!(
                    f,
                    "  fault: tidb-{} graceful shutdown at {}ms, graceful-wait {}ms{}",
                    x.tidb,
                    ms(x.at),
                    ms(graceful_wait),
                    match restart_after {
                        Some(r) => format!(", restarts {}ms after it ends", ms(r)),
                        None => String::new(),
                    }
                )?,
                FaultKind::Crash {
                    lease,
                    restart_after,
                    mid_statement,
                } => writeln!(
                    f,
                    "  fault: tidb-{} crashes at {}ms{}, its PD lease TTL {}s{}",
                    x.tidb,
                    ms(x.at),
                    if mid_statement {
                        " (after its next write)"
                    } else {
                        ""
                    },
                    lease.as_secs(),
                    match restart_after {
                        Some(r) => format!(", restarts {}ms later", ms(r)),
                        None => String::new(),
                    }
                )?,
            }
        }
        writeln!(
            f,
            "  network: latency up to {}ms, steps of {}ms; PD tells watchers {}ms after a change",
            ms(self.max_latency),
            ms(self.tick),
            ms(self.pd_delay)
        )?;
        if let Some((at, len)) = self.pd_outage {
            writeln!(f, "  pd outage: down from {}ms for {}ms", ms(at), ms(len))?;
        }
        if let Some((at, len)) = self.pd_held {
            writeln!(
                f,
                "  held link: proxy <-> pd from {}ms for {}ms",
                ms(at),
                ms(len)
            )?;
        }
        for p in &self.partitions {
            writeln!(
                f,
                "  partition: proxy <-> {} from {}ms for {}ms (connections across it reset at {}ms)",
                p.tidb.map_or("pd".to_string(), Self::tidb_host),
                ms(p.at),
                ms(p.len),
                ms(p.cut_at())
            )?;
        }
        for h in &self.held_links {
            writeln!(
                f,
                "  held link: proxy <-> tidb-{} from {}ms for {}ms",
                h.tidb,
                ms(h.at),
                ms(h.len)
            )?;
        }
        writeln!(
            f,
            "  clients: {} sessions on {} hosts; workloads end at {}ms",
            self.sessions.len(),
            self.client_hosts,
            ms(self.workload_end)
        )?;
        for s in &self.sessions {
            let m = s.mix;
            writeln!(
                f,
                "    s{} host client-{} user {} deprecate_eof={} use_db={} start {}ms think<{}ms mix insert={} increment={} txn={} uservar={} check={} prepared={} idle={} scan={} reconnect={}",
                s.id,
                s.host,
                s.user,
                s.deprecate_eof,
                s.use_db,
                ms(s.start),
                ms(s.think_max),
                m.insert,
                m.increment,
                m.transaction,
                m.user_var,
                m.state_check,
                m.prepared,
                m.idle,
                m.scan,
                m.reconnect
            )?;
        }
        Ok(())
    }
}
