//! What the hosts of one run share: the event trace and its hash, the
//! invariant violations found so far, the ledger of what clients were told,
//! and handles on the proxy and the TiDBs for
//! the checks.
//!
//! Everything runs on turmoil's one thread; the locks are only there
//! because the proxy's and the double's types must be `Send`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tiproxy_runtime::router::FAILED_BACKEND_PAUSE;
use tiproxy_runtime::state::State;

use crate::net::{Links, TurmoilNet};
use crate::scenario::{PD_RECONNECT, Scenario};
use crate::tidb::{Cluster, TidbHandle};

/// The invariants, each a named check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// 1. No client sees an error (or a hang) unless the TiDB holding its
    ///    session crashed or closed it without a graceful wait.
    NoClientError,
    /// 2. Every commit a client was told succeeded is in the store exactly
    ///    once; nothing reported failed is applied.
    CommitsExactlyOnce,
    /// 3. A transaction never spans two TiDBs.
    TxnOnOneTidb,
    /// 4. A session's variables, database and prepared statements survive
    ///    every move.
    SessionStateKept,
    /// 5. After the last fault, every session is on a live TiDB and the
    ///    spread is balanced, within the liveness bound.
    Liveness,
    /// 6. At the end, client connections equal backend connections, and
    ///    nothing is left once clients leave.
    NoLeaks,
    /// 7. With crash protection on, a session the proxy held a usable state
    ///    copy for when its TiDB crashed (or closed it without a graceful
    ///    wait) carries on without an error: only a statement that raced
    ///    the crash, or no TiDB to restore on, excuses one. "Usable" is the
    ///    proxy's own verdict: a copy taken after the session's last state
    ///    change (one changed within `proxy.session-protection-delay` is
    ///    not protected) and young enough for its token.
    ProtectedSurvives,
    /// The simulation itself failed (a host panicked, or it ran too long).
    Simulation,
}

impl Invariant {
    /// The check's name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::NoClientError => "no-client-error",
            Invariant::CommitsExactlyOnce => "commits-exactly-once",
            Invariant::TxnOnOneTidb => "txn-on-one-tidb",
            Invariant::SessionStateKept => "session-state-kept",
            Invariant::Liveness => "liveness",
            Invariant::NoLeaks => "no-leaks",
            Invariant::ProtectedSurvives => "protected-survives-crash",
            Invariant::Simulation => "simulation",
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// Simulated time it was seen.
    pub at: Duration,
    /// What was seen.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at {}ms: {}",
            self.invariant.name(),
            self.at.as_millis(),
            self.message
        )
    }
}

/// FNV-1a, 64 bit: stable across platforms and Rust versions.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What the clients were told about their writes.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Keys of inserts reported committed.
    pub committed: BTreeSet<i64>,
    /// Keys of inserts reported failed or rolled back.
    pub failed: BTreeSet<i64>,
    /// Keys whose outcome the client cannot know (the connection broke
    /// during the commit).
    pub unknown: BTreeSet<i64>,
    /// Per session: increments reported done, and increments of unknown
    /// outcome.
    pub increments: BTreeMap<usize, (i64, i64)>,
}

#[derive(Debug, Default)]
struct Inner {
    hash: Fnv,
    events: u64,
    /// The trace's lines, when kept (`RunOptions::trace_dir`).
    lines: Option<String>,
    violations: Vec<Violation>,
    proxy: Option<Arc<State<TurmoilNet>>>,
    tidbs: BTreeMap<usize, TidbHandle>,
    tidb_ips: BTreeMap<IpAddr, usize>,
    /// TiDBs down or going down after their fault (not valid final homes);
    /// a restarted one leaves the set.
    faulted: BTreeSet<usize>,
    /// Since when the proxy can know each TiDB's current run: its start if
    /// PD still listed it then, else its first registration after it (a
    /// TiDB that starts while PD is down registers only when PD is back:
    /// seed 20702). Unset until then.
    known_from: BTreeMap<usize, Duration>,
    /// TiDBs whose `/topology/tidb/.../info` key is in PD now.
    listed: BTreeSet<usize>,
    /// Proxy connection ids of the sessions that were on a TiDB when it
    /// broke.
    broken: BTreeSet<u32>,
    /// When each fault that breaks sessions happened.
    breaking_faults: Vec<Duration>,
    /// Sessions the proxy held a usable state copy for when their TiDB
    /// broke (crash protection on): proxy connection id, the TiDB and
    /// when. They must be restored, not broken.
    protected_at: BTreeMap<u32, (usize, Duration)>,
    /// Sessions (proxy connection ids) whose client is in an operation:
    /// a statement of theirs may be in flight.
    in_op: BTreeSet<u32>,
    ledger: Ledger,
    /// Where each session was last seen at the end of its workload.
    finals: BTreeMap<usize, IpAddr>,
    setup_done: bool,
    moves_seen: u64,
    allowed_errors: u64,
    ops: u64,
}

/// How long after a TiDB breaks a protected session's statement may still
/// have been on its way to it: the proxy hears of the crash one link
/// latency later (at most 25 ms), and a statement sent meanwhile was in
/// flight, which is never replayed.
pub const PROTECTED_RACE: Duration = Duration::from_millis(100);

/// How long a restore may take before its failure says nothing about the
/// proxy: the sim's move timeout (dials and the handshake on the target).
pub const RESTORE_WINDOW: Duration = Duration::from_secs(5);

/// How long after a session-breaking fault a failed connect is forgiven:
/// a handshake in flight on the TiDB when it broke.
pub const CONNECT_GRACE: Duration = Duration::from_secs(2);

/// How long after a held link is released the proxy may still refuse the
/// TiDB behind it: its checks failed during the hold, and a failed backend
/// is paused for [`FAILED_BACKEND_PAUSE`] plus about one probe interval.
pub const HELD_LINK_RECOVERY: Duration = Duration::from_secs(FAILED_BACKEND_PAUSE.as_secs() + 1);

/// How long after a TiDB starts (besides PD's own delay) the proxy may not
/// know it yet: its registration, the proxy's read of PD, and the first
/// answer of its status port (every second).
pub const JOIN_RECOGNITION: Duration = Duration::from_secs(2);

/// The shared state of one run.
#[derive(Debug)]
pub struct World {
    /// The run's parameters.
    pub scenario: Scenario,
    /// The TiDB cluster (shared store).
    pub cluster: Arc<Cluster>,
    /// Print every trace event.
    pub verbose: bool,
    /// The links partitions cut.
    pub links: Arc<Links>,
    inner: Mutex<Inner>,
}

/// Simulated time on the current host.
pub fn now() -> Duration {
    turmoil::elapsed()
}

impl World {
    /// A world for `scenario`.
    /// `keep_lines`: keep the trace's text for [`World::trace_lines`].
    pub fn new(
        scenario: Scenario,
        cluster: Arc<Cluster>,
        verbose: bool,
        keep_lines: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            scenario,
            cluster,
            verbose,
            links: Links::new(),
            inner: Mutex::new(Inner {
                lines: keep_lines.then(String::new),
                ..Inner::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event to the trace (and prints it when verbose).
    pub fn event(&self, at: Duration, what: impl fmt::Display) {
        let line = format!("{:>7} {what}", at.as_millis());
        if self.verbose {
            println!("{line}");
        }
        let mut g = self.lock();
        g.hash.write(line.as_bytes());
        g.hash.write(b"\n");
        g.events += 1;
        if let Some(lines) = &mut g.lines {
            lines.push_str(&line);
            lines.push('\n');
        }
    }

    /// Records a broken invariant (also a trace event).
    pub fn violation(&self, invariant: Invariant, at: Duration, message: impl Into<String>) {
        let v = Violation {
            invariant,
            at,
            message: message.into(),
        };
        self.event(at, format_args!("VIOLATION {v}"));
        self.lock().violations.push(v);
    }

    /// Violations so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }

    /// Whether any invariant broke.
    pub fn failed(&self) -> bool {
        !self.lock().violations.is_empty()
    }

    /// The trace's text so far (empty unless kept).
    pub fn trace_lines(&self) -> String {
        self.lock().lines.clone().unwrap_or_default()
    }

    /// The trace hash and event count so far.
    pub fn trace(&self) -> (u64, u64) {
        let g = self.lock();
        (g.hash.0, g.events)
    }

    /// The proxy started.
    pub fn set_proxy(&self, st: Arc<State<TurmoilNet>>) {
        self.lock().proxy = Some(st);
    }

    /// The proxy's state, once started.
    pub fn proxy(&self) -> Option<Arc<State<TurmoilNet>>> {
        self.lock().proxy.clone()
    }

    /// TiDB `i` started, at `ip`.
    pub fn tidb_started(&self, i: usize, h: TidbHandle, ip: IpAddr) {
        let mut g = self.lock();
        if g.listed.contains(&i) {
            g.known_from.insert(i, now());
        } else {
            g.known_from.remove(&i);
        }
        g.tidbs.insert(i, h);
        g.tidb_ips.insert(ip, i);
    }

    /// A PD change (the PD double's trace line, `pd: put <key> ...`,
    /// `pd: deleted <key> ...`, `pd: lease N expired: <key> ...`): keeps
    /// track of which TiDBs PD lists, and when each was first listed
    /// since it started.
    pub fn pd_changed(&self, at: Duration, what: &str) {
        let Some(rest) = what.split("/topology/tidb/").nth(1) else {
            return;
        };
        let Some(i) = rest
            .split(':')
            .next()
            .and_then(|host| host.strip_prefix("tidb-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return;
        };
        let mut g = self.lock();
        if what.starts_with("pd: put ") {
            g.listed.insert(i);
            g.known_from.entry(i).or_insert(at);
        } else {
            g.listed.remove(&i);
        }
    }

    /// TiDB `i` serves again after its fault (a restart).
    pub fn tidb_restarted(&self, i: usize) {
        self.lock().faulted.remove(&i);
    }

    /// Every started TiDB.
    pub fn tidbs(&self) -> Vec<(usize, TidbHandle)> {
        self.lock()
            .tidbs
            .iter()
            .map(|(i, h)| (*i, h.clone()))
            .collect()
    }

    /// The TiDB at `ip`.
    pub fn tidb_at(&self, ip: IpAddr) -> Option<usize> {
        self.lock().tidb_ips.get(&ip).copied()
    }

    /// Whether TiDB `i` had its fault and did not restart.
    pub fn is_faulted(&self, i: usize) -> bool {
        self.lock().faulted.contains(&i)
    }

    /// The proxy connection ids of the sessions the proxy has on TiDB `i`.
    fn sessions_on(&self, i: usize) -> Vec<u32> {
        let addr = format!("{}:4000", Scenario::tidb_host(i));
        self.proxy()
            .map(|st| {
                st.sessions()
                    .into_iter()
                    .filter(|(_, mb)| mb.backend().is_some_and(|b| b.addr == addr))
                    .map(|(id, _)| id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Something broke the sessions on TiDB `i` at `at`: their errors, and
    /// connects racing it, are unavoidable. Returns how many there were.
    fn sessions_broken(&self, i: usize, at: Duration, restorable: bool) -> usize {
        let on_it = self.sessions_on(i);
        // With crash protection, the sessions holding a usable copy now
        // are expected to be restored (a lossy partition is not counted:
        // its hold lets the copies age and the moves off it race).
        let in_op = self.lock().in_op.clone();
        let protected: BTreeSet<u32> = if restorable && self.scenario.protection {
            self.proxy()
                .map(|st| {
                    st.sessions()
                        .into_iter()
                        .filter(|(id, mb)| {
                            on_it.contains(id) && mb.protected() && !in_op.contains(id)
                        })
                        .map(|(id, _)| id)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        // Behind a held link the proxy hears of it only once the link is
        // released (seed 21465: a handshake in flight to a TiDB that
        // crashed during the hold failed 3.4 s after the crash, as the
        // hold ended): the grace for connects runs from then too.
        let heard = self
            .scenario
            .held_links
            .iter()
            .filter(|h| h.tidb == i && h.at <= at && at <= h.at + h.len)
            .map(|h| h.at + h.len)
            .max();
        let mut g = self.lock();
        g.breaking_faults.push(at);
        g.breaking_faults.extend(heard);
        for c in &on_it {
            if protected.contains(c) {
                g.protected_at.insert(*c, (i, at));
            } else {
                g.protected_at.remove(c);
                g.broken.insert(*c);
            }
        }
        on_it.len()
    }

    /// TiDB `i`'s fault begins. When it `breaks` sessions (a crash, or a
    /// shutdown without graceful wait), the sessions the proxy has on it
    /// now are marked: their errors are unavoidable.
    pub fn fault_begins(&self, i: usize, breaks: bool, at: Duration) {
        self.lock().faulted.insert(i);
        let (n, what) = if breaks {
            (self.sessions_broken(i, at, true), "may see errors")
        } else {
            (self.sessions_on(i).len(), "must move")
        };
        self.event(
            at,
            format_args!("fault begins on tidb-{i}: {n} session(s) on it {what}"),
        );
    }

    /// TCP gave up on the partition between the proxy and TiDB `i`: every
    /// connection across it is reset now, so the sessions the proxy has on
    /// it may see errors (their state is on the other side).
    pub fn partition_cut(&self, i: usize, at: Duration) {
        let n = self.sessions_broken(i, at, false);
        self.event(
            at,
            format_args!("net: proxy <-> tidb-{i} cut: {n} session(s) on it may see errors"),
        );
    }

    /// Whether an error on the session with proxy connection id `conn`
    /// (the id in the proxy's greeting; `None` for a connect) at `at` is one
    /// the scenario makes unavoidable.
    pub fn error_allowed(&self, conn: Option<u32>, at: Duration) -> bool {
        // Hosts' clocks agree only to a step: within one, a client may see
        // the effect of a fault stamped a little later than its own now.
        let at = at + self.scenario.tick;
        let g = self.lock();
        if let Some(c) = conn
            && g.broken.contains(&c)
        {
            return true;
        }
        // A connect (or a session just connected) racing the fault.
        if g.breaking_faults
            .iter()
            .any(|t| *t <= at && at <= *t + CONNECT_GRACE)
        {
            return true;
        }
        // A connect while no TiDB could take it.
        conn.is_none() && self.no_tidb_could_take(&g, at)
    }

    /// Session `conn`'s client starts (`true`) or ends an operation.
    pub fn op_running(&self, conn: Option<u32>, running: bool) {
        let Some(c) = conn else { return };
        let mut g = self.lock();
        if running {
            g.in_op.insert(c);
        } else {
            g.in_op.remove(&c);
        }
    }

    /// For a session that was protected when its TiDB broke: whether its
    /// error (at `at`, in an operation that began at `op_started`) is
    /// excused. `None` for every other session (then
    /// [`World::error_allowed`] decides).
    pub fn protected_error_allowed(
        &self,
        conn: Option<u32>,
        at: Duration,
        op_started: Duration,
    ) -> Option<bool> {
        let g = self.lock();
        let (i, broke) = *g.protected_at.get(&conn?)?;
        // The operation's statement may have raced the crash.
        if op_started <= broke + PROTECTED_RACE + self.scenario.tick {
            return Some(true);
        }
        // Another fault broke it later, or one racing the restore.
        let at = at + self.scenario.tick;
        if g.breaking_faults
            .iter()
            .any(|t| *t != broke && *t <= at && at <= *t + CONNECT_GRACE)
        {
            return Some(true);
        }
        Some(self.restore_impossible(&g, i, broke))
    }

    /// Whether a session lost with TiDB `i` at `broke` could not have been
    /// restored: no other TiDB could take it at some point of the restore's
    /// window, or a link was held or cut then (the target the proxy picked
    /// may be behind it, or the crash heard late).
    fn restore_impossible(&self, g: &Inner, i: usize, broke: Duration) -> bool {
        let (from, to) = (
            broke.saturating_sub(HELD_LINK_RECOVERY),
            broke + RESTORE_WINDOW,
        );
        let s = &self.scenario;
        if s.held_links
            .iter()
            .any(|h| h.at <= to && from <= h.at + h.len)
            || s.partitions
                .iter()
                .any(|p| p.at <= to && from <= p.at + p.len)
        {
            return true;
        }
        let mut t = broke;
        while t <= to {
            let none = (0..s.total_tidbs()).filter(|j| *j != i).all(|j| {
                g.faulted.contains(&j)
                    || g.known_from
                        .get(&j)
                        .is_none_or(|k| t <= self.recognised_by(*k))
            });
            if none {
                return true;
            }
            t += Duration::from_millis(100);
        }
        false
    }

    /// Whether a connect that began at `started` could not have succeeded:
    /// no TiDB could take it then. The proxy picks one backend at the
    /// start and waits for that dial (up to its dial timeout) before it
    /// picks again, so a TiDB that becomes usable meanwhile does not save
    /// it (seed 551460: a client reconnected while its TiDB had shut down
    /// and the other was behind a held link; the dial to the held one timed
    /// out 5 s later, when the first TiDB was back).
    pub fn connect_was_doomed(&self, started: Duration) -> bool {
        let g = self.lock();
        self.no_tidb_could_take(&g, started + self.scenario.tick)
    }

    /// Whether no TiDB could take a session at `at`: each one is down after
    /// its fault, not started (or registered in PD since it started) yet or
    /// so recently that the proxy cannot know it yet, or behind a held link
    /// or partition (or was, so recently that the proxy still pauses it).
    fn no_tidb_could_take(&self, g: &Inner, at: Duration) -> bool {
        (0..self.scenario.total_tidbs()).all(|i| {
            g.faulted.contains(&i)
                || g.known_from
                    .get(&i)
                    .is_none_or(|t| at <= self.recognised_by(*t))
                || self
                    .scenario
                    .held_links
                    .iter()
                    .any(|h| h.tidb == i && h.at <= at && at <= h.at + h.len + HELD_LINK_RECOVERY)
                || self.scenario.partitions.iter().any(|p| {
                    p.tidb == Some(i) && p.at <= at && at <= p.at + p.len + HELD_LINK_RECOVERY
                })
        })
    }

    /// TiDB `i` ended its graceful shutdown. Sessions still on it had to
    /// move during its graceful wait; if at its end no other TiDB could take
    /// them (seed 25333: the only other TiDB was behind held links for the
    /// whole wait, so the move could not connect), or its own link was cut
    /// off, their errors are unavoidable. Otherwise they stay a failure to
    /// evacuate.
    pub fn tidb_shut_down(&self, i: usize, at: Duration) {
        let n = self.strand(i, at);
        if n > 0 {
            self.event(
                at,
                format_args!("tidb-{i} shut down: {n} session(s) on it had nowhere to go"),
            );
        } else {
            self.event(at, format_args!("tidb-{i} shut down"));
        }
    }

    /// TiDB `i`'s graceful wait ends: from now it closes every session not
    /// in a transaction, so the rule of [`World::tidb_shut_down`] applies
    /// now, before those closes reach any client (seed 499830: a client's
    /// session reached the TiDB just after its drain began, while the only
    /// other TiDB was partitioned; it was closed when the wait ended, 46 ms
    /// before the shutdown finished and the checker used to look).
    pub fn tidb_wait_ended(&self, i: usize, at: Duration) {
        let n = self.strand(i, at);
        if n > 0 {
            self.event(
                at,
                format_args!(
                    "tidb-{i} ends its graceful wait: {n} session(s) on it had nowhere to go"
                ),
            );
        }
    }

    /// Marks the sessions on TiDB `i` as unavoidably broken when at `at`
    /// no other TiDB could take them or its own link is cut off; how many.
    fn strand(&self, i: usize, at: Duration) -> usize {
        // Or its own link was held or partitioned: a move needs the old
        // TiDB to answer SHOW SESSION_STATES (seed 26189: its link was held
        // from before its shutdown until after it), and after the link is
        // back the proxy learns of the drain only from its next checks of a
        // backend it had marked failed (seed 553115: the hold began 4 ms
        // into a 3 s wait and ended 218 ms before it, and a connect held
        // all along had just landed there).
        let cut_off = self
            .scenario
            .held_links
            .iter()
            .any(|h| h.tidb == i && h.at <= at && at <= h.at + h.len + HELD_LINK_RECOVERY)
            || self.scenario.partitions.iter().any(|p| {
                p.tidb == Some(i) && p.at <= at && at <= p.at + p.len + HELD_LINK_RECOVERY
            });
        let nowhere = cut_off || self.no_tidb_could_take(&self.lock(), at);
        let stranded = if nowhere {
            self.sessions_on(i)
        } else {
            Vec::new()
        };
        let n = stranded.len();
        self.lock().broken.extend(stranded);
        n
    }

    /// When the proxy can have taken in a TiDB that PD listed at `t`: PD's
    /// watchers hear of it `pd_delay` later, unless the proxy's link to PD
    /// is held or partitioned then; it hears once the link is back and its
    /// watch reconnected (seeds 22856 and 23109: a TiDB registered during a
    /// held proxy <-> PD link while the only other TiDB was partitioned),
    /// or PD goes down before it tells them (seed 544025: tidb-0 registered
    /// 204 ms before a PD outage, with watchers told 999 ms after a change).
    fn recognised_by(&self, t: Duration) -> Duration {
        let heard = t + self.scenario.pd_delay;
        let pd_cut = self
            .scenario
            .pd_held
            .into_iter()
            .chain(self.scenario.pd_outage)
            .chain(
                self.scenario
                    .partitions
                    .iter()
                    .filter(|p| p.tidb.is_none())
                    .map(|p| (p.at, p.len)),
            )
            .filter(|(from, len)| *from <= heard && heard <= *from + *len)
            .map(|(from, len)| from + len + PD_RECONNECT)
            .max();
        pd_cut.unwrap_or(heard) + JOIN_RECOGNITION
    }

    /// The schema exists.
    pub fn setup_finished(&self) {
        self.lock().setup_done = true;
    }

    /// Whether the schema exists.
    pub fn is_set_up(&self) -> bool {
        self.lock().setup_done
    }

    /// Runs `f` on the ledger.
    pub fn ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.lock().ledger)
    }

    /// A session saw its identity change: it moved.
    pub fn moved(&self) {
        self.lock().moves_seen += 1;
    }

    /// An unavoidable error happened.
    pub fn allowed_error(&self) {
        self.lock().allowed_errors += 1;
    }

    /// A client operation ran.
    pub fn op(&self) {
        self.lock().ops += 1;
    }

    /// Session `s` ended its workload on the TiDB at `ip`.
    pub fn final_home(&self, s: usize, ip: IpAddr) {
        self.lock().finals.insert(s, ip);
    }

    /// Where each session ended its workload.
    pub fn finals(&self) -> BTreeMap<usize, IpAddr> {
        self.lock().finals.clone()
    }

    /// Counters for the report.
    pub fn stats(&self) -> Stats {
        let g = self.lock();
        Stats {
            ops: g.ops,
            moves_seen: g.moves_seen,
            allowed_errors: g.allowed_errors,
            committed_keys: g.ledger.committed.len() as u64,
        }
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client operations.
    pub ops: u64,
    /// Moves the clients noticed (their TiDB identity changed).
    pub moves_seen: u64,
    /// Errors the scenario made unavoidable.
    pub allowed_errors: u64,
    /// Inserted keys reported committed.
    pub committed_keys: u64,
}
