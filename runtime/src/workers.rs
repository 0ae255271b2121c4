//! Connection worker threads: one single-threaded tokio runtime per thread,
//! where each connection lives, and where it should live.
//!
//! A proxy that shares its cores with the database or the clients (a
//! TiProxy next to TiDB, a benchmark on one box) does less work per query
//! on fewer threads: one busy thread takes many sockets' events per
//! `epoll_wait` and sleeps less, so it pays fewer wake-ups and context
//! switches (HAProxy `nbthread 1` beats `nbthread 2` on two cores for the
//! same reason). A proxy with more work than a core needs every thread.
//! So connections are *packed*: a new one goes to the lowest-numbered
//! worker that is not busy, and a monitor, once a second, reads how busy
//! each worker was ([`tokio::runtime::RuntimeMetrics`]) and decides:
//! - **spread**: a worker busier than [`Policy::hot`] while another is
//!   below half of that sends part of its connections there;
//! - **pack**: when all workers together are busy less than
//!   [`Policy::pack_below`] of one thread, the highest-numbered worker that
//!   holds connections sends them all to the lowest.
//!
//! Both also look at what else runs ([`room`]): a second thread only helps
//! when a core is free for it. With less than [`Policy::spread_spare`]
//! cores idle (host idle time, capped by the cgroup's CPU quota) a hot
//! worker does not spread unless the proxy uses more than
//! [`Policy::saturated_used`] cores; with less than [`Policy::contended_spare`] idle
//! and the proxy using under [`Policy::pack_used`] cores (one thread can
//! carry it), the workers pack and new connections go to the lowest one,
//! however busy tokio says it is (tokio counts a thread waiting for a CPU
//! as busy). This is HAProxy `nbthread 1`'s advantage on a shared 2-core
//! machine, taken automatically; on a machine with idle cores nothing
//! changes.
//!
//! The monitor only posts how many connections should leave a worker and
//! where to; each connection checks that count when a command ends (one
//! relaxed atomic load) and, when it takes one, moves itself: its sockets
//! leave this thread's reactor and join the target's, its session goes
//! along untouched (`conn`'s `rehome`). Connections with TLS, a dial or a
//! handshake in progress stay where they are.

pub mod room;

use std::future::Future;

use futures_util::FutureExt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use room::Room;

thread_local! {
    /// The worker this thread runs, if it is one.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Thresholds of the placement policy, as busy fractions of one thread.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A new connection goes to the lowest worker busy less than this.
    pub place_below: f64,
    /// A worker busier than this sheds connections to an idle one.
    pub hot: f64,
    /// All workers together busy less than this: gather on the lowest.
    pub pack_below: f64,
    /// Spread only with at least this many cores idle.
    pub spread_spare: f64,
    /// With fewer cores idle than this, the CPU is contended: gather on
    /// the lowest worker if the proxy uses under `pack_used` cores.
    pub contended_spare: f64,
    /// The most the proxy may use (cores) and still be gathered on one
    /// thread when the CPU is contended.
    pub pack_used: f64,
    /// Using more than this (cores), one thread cannot carry the proxy: a
    /// hot worker spreads even without idle cores (another thread wins
    /// the proxy a larger share of the contended CPU).
    pub saturated_used: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            place_below: 0.7,
            hot: 0.85,
            pack_below: 0.5,
            spread_spare: 0.5,
            contended_spare: 0.25,
            pack_used: 0.75,
            saturated_used: 0.9,
        }
    }
}

/// One monitor decision: `count` connections should leave `from` for `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The worker to leave.
    pub from: usize,
    /// The worker to join.
    pub to: usize,
    /// How many connections.
    pub count: usize,
}

impl Policy {
    /// Whether the CPU is contended and one thread can carry the proxy.
    pub fn contended(&self, room: Option<Room>) -> bool {
        room.is_some_and(|r| r.spare < self.contended_spare && r.used < self.pack_used)
    }

    /// What the monitor asks for, given each worker's busy fraction over
    /// the last interval, its connection count and, when known, the CPU
    /// room.
    pub fn decide(&self, busy: &[f64], conns: &[usize], room: Option<Room>) -> Option<Move> {
        let n = busy.len().min(conns.len());
        if n < 2 {
            return None;
        }
        let total: f64 = busy[..n].iter().sum();
        let holding: Vec<usize> = (0..n).filter(|&w| conns[w] > 0).collect();
        if (total < self.pack_below || self.contended(room)) && holding.len() > 1 {
            let to = holding[0];
            let from = *holding.last().expect("two workers hold connections");
            return Some(Move {
                from,
                to,
                count: conns[from],
            });
        }
        if room.is_some_and(|r| r.spare < self.spread_spare && r.used <= self.saturated_used) {
            // No core for another thread to run on, and one carries us.
            return None;
        }
        let hot = (0..n)
            .filter(|&w| busy[w] > self.hot && conns[w] > 1)
            .max_by(|&a, &b| busy[a].total_cmp(&busy[b]))?;
        let cold = (0..n)
            .filter(|&w| busy[w] < self.hot / 2.0)
            .min_by(|&a, &b| busy[a].total_cmp(&busy[b]))?;
        // Move half the difference, by connection count: the next interval
        // corrects what connections of unequal weight get wrong.
        let share = (busy[hot] - busy[cold]) / (2.0 * busy[hot]);
        let count = ((conns[hot] as f64 * share).round() as usize).clamp(1, conns[hot] - 1);
        Some(Move {
            from: hot,
            to: cold,
            count,
        })
    }

    /// Where a new connection goes: the lowest worker not busy, or, when
    /// the CPU is contended, the lowest.
    pub fn place(&self, busy: &[f64], contended: bool) -> usize {
        if contended {
            return 0;
        }
        (0..busy.len())
            .find(|&w| busy[w] < self.place_below)
            .or_else(|| (0..busy.len()).min_by(|&a, &b| busy[a].total_cmp(&busy[b])))
            .unwrap_or(0)
    }
}

/// One worker's shared counters.
#[derive(Debug, Default)]
struct Slot {
    /// Connections running here.
    conns: AtomicUsize,
    /// Busy fraction over the last interval, in thousandths.
    busy_milli: AtomicU32,
    /// Connections asked to leave (the monitor sets it; leavers take one).
    leave: AtomicI64,
    /// Where leavers go.
    leave_to: AtomicUsize,
}

/// The worker threads and their placement.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    slots: Vec<Slot>,
    policy: Policy,
    /// The monitor found the CPU contended: new connections go to the
    /// lowest worker.
    contended: AtomicBool,
    /// Place new connections round-robin instead (`TIPROXY_WORKER_PLACEMENT
    /// = round-robin`; the monitor still packs and spreads).
    round_robin: Option<AtomicUsize>,
}

/// A snapshot of one worker for `/api/debug/workers`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerInfo {
    /// Its index.
    pub worker: usize,
    /// Connections on it.
    pub connections: usize,
    /// Busy fraction over the last second.
    pub busy: f64,
}

impl Workers {
    /// Starts `n` worker threads (at least one) and, with more than one,
    /// the monitor.
    pub fn start(n: usize, policy: Policy, round_robin: bool) -> io::Result<Arc<Self>> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("tiproxy-worker-{i}"))
                .spawn(move || {
                    WORKER.set(Some(i));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    // Drive this runtime's connections for the life of the process.
                    rt.block_on(std::future::pending::<()>());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("worker thread died"))??;
            handles.push(handle);
        }
        let slots = handles.iter().map(|_| Slot::default()).collect();
        let w = Arc::new(Self {
            handles,
            slots,
            policy,
            contended: AtomicBool::new(false),
            round_robin: round_robin.then(AtomicUsize::default),
        });
        if w.handles.len() > 1 {
            let weak = Arc::downgrade(&w);
            std::thread::Builder::new()
                .name("tiproxy-placement".into())
                .spawn(move || monitor(weak))?;
        }
        Ok(w)
    }

    fn busy(&self) -> Vec<f64> {
        self.slots
            .iter()
            .map(|s| f64::from(s.busy_milli.load(Ordering::Relaxed)) / 1000.0)
            .collect()
    }

    /// The worker for a new connection.
    pub fn place(&self) -> usize {
        match &self.round_robin {
            Some(next) => next.fetch_add(1, Ordering::Relaxed) % self.handles.len(),
            None => self
                .policy
                .place(&self.busy(), self.contended.load(Ordering::Relaxed)),
        }
    }

    /// Runs the future `task` makes, a connection's task, on worker `i`;
    /// the task counts as one of its connections until it ends.
    ///
    /// A maker and combinators, not an `async` block: a block keeps what it
    /// captured beside the future it awaits, for the connection's life (a
    /// captured future was held twice, ~500 bytes on every idle
    /// connection).
    pub fn spawn<F, Fut>(self: &Arc<Self>, i: usize, task: F) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        struct Count(Arc<Workers>, usize);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.slots[self.1].conns.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.slots[i].conns.fetch_add(1, Ordering::Relaxed);
        let count = Count(self.clone(), i);
        self.handles[i].spawn(
            futures_util::future::lazy(move |_| task())
                .flatten()
                .map(move |()| drop(count)),
        )
    }

    /// Called by a connection on a worker thread at a point where it may
    /// move: the worker to move to, when this worker should shed one.
    pub fn should_leave(&self) -> Option<usize> {
        let i = WORKER.get()?;
        let slot = self.slots.get(i)?;
        if slot.leave.load(Ordering::Relaxed) <= 0 {
            return None;
        }
        if slot.leave.fetch_sub(1, Ordering::Relaxed) <= 0 {
            return None;
        }
        let to = slot.leave_to.load(Ordering::Relaxed);
        (to != i && to < self.handles.len()).then_some(to)
    }

    /// The connection on this thread's worker moved away (its task stays
    /// to await the move).
    pub(crate) fn left_here(&self) {
        if let Some(slot) = WORKER.get().and_then(|i| self.slots.get(i)) {
            slot.conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The connection that moved away ended: its waiting task ends too,
    /// and its count goes with it.
    pub(crate) fn returned_here(&self) {
        if let Some(slot) = WORKER.get().and_then(|i| self.slots.get(i)) {
            slot.conns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Per-worker connections and busy fractions.
    pub fn info(&self) -> Vec<WorkerInfo> {
        self.slots
            .iter()
            .enumerate()
            .map(|(worker, s)| WorkerInfo {
                worker,
                connections: s.conns.load(Ordering::Relaxed),
                busy: f64::from(s.busy_milli.load(Ordering::Relaxed)) / 1000.0,
            })
            .collect()
    }
}

/// Once a second: measure, then post the policy's decision (replacing any
/// earlier one not yet carried out). Ends with the workers.
fn monitor(w: std::sync::Weak<Workers>) {
    let mut last: Option<(Instant, Vec<Duration>)> = None;
    let mut last_cpu = room::Sample::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(w) = w.upgrade() else { return };
        let now = Instant::now();
        let cpu = room::Sample::now();
        let room = cpu.since(&last_cpu);
        last_cpu = cpu;
        w.contended
            .store(w.policy.contended(room), Ordering::Relaxed);
        let busy_total: Vec<Duration> = w
            .handles
            .iter()
            .map(|h| h.metrics().worker_total_busy_duration(0))
            .collect();
        if let Some((then, prev)) = &last {
            let span = now.duration_since(*then).as_secs_f64().max(1e-3);
            for (i, slot) in w.slots.iter().enumerate() {
                let busy = busy_total[i].saturating_sub(prev[i]).as_secs_f64() / span;
                slot.busy_milli
                    .store((busy.min(1.0) * 1000.0) as u32, Ordering::Relaxed);
            }
            let conns: Vec<usize> = w
                .slots
                .iter()
                .map(|s| s.conns.load(Ordering::Relaxed))
                .collect();
            for s in &w.slots {
                s.leave.store(0, Ordering::Relaxed);
            }
            if let Some(m) = w.policy.decide(&w.busy(), &conns, room) {
                tracing::debug!(?m, busy = ?w.busy(), ?conns, ?room, "moving connections between workers");
                let slot = &w.slots[m.from];
                slot.leave_to.store(m.to, Ordering::Relaxed);
                slot.leave.store(m.count as i64, Ordering::Relaxed);
            }
        }
        last = Some((now, busy_total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_light_load_gathers_on_the_lowest_worker() {
        let p = Policy::default();
        assert_eq!(
            p.decide(&[0.1, 0.2], &[5, 7], None),
            Some(Move {
                from: 1,
                to: 0,
                count: 7
            })
        );
        // Already packed: nothing to do.
        assert_eq!(p.decide(&[0.3, 0.0], &[12, 0], None), None);
        // Busy enough that one thread would be stretched: stay.
        assert_eq!(p.decide(&[0.4, 0.4], &[6, 6], None), None);
    }

    #[test]
    fn a_hot_worker_sheds_to_an_idle_one() {
        let p = Policy::default();
        let m = p.decide(&[0.95, 0.05], &[16, 0], None).unwrap();
        assert_eq!((m.from, m.to), (0, 1));
        assert_eq!(m.count, 8, "half the busy difference, by count");
        // One connection cannot be split.
        assert_eq!(p.decide(&[0.99, 0.0], &[1, 0], None), None);
        // Both busy: nowhere better to go.
        assert_eq!(p.decide(&[0.9, 0.8], &[8, 8], None), None);
    }

    #[test]
    fn new_connections_fill_the_lowest_worker_first() {
        let p = Policy::default();
        assert_eq!(p.place(&[0.2, 0.0], false), 0);
        assert_eq!(p.place(&[0.75, 0.1], false), 1);
        assert_eq!(p.place(&[0.9, 0.8], false), 1);
        // Contended: the lowest, however busy it looks.
        assert_eq!(p.place(&[0.9, 0.1], true), 0);
    }

    #[test]
    fn a_contended_cpu_gathers_the_workers_unless_one_thread_cannot_carry_them() {
        let p = Policy::default();
        let room = |spare, used| Some(Room { spare, used });
        // The 2-core benchmark under sysbench: no idle CPU, the proxy uses
        // half a core, tokio calls both workers busy (waiting for a CPU
        // counts): gather.
        assert_eq!(
            p.decide(&[0.55, 0.47], &[8, 8], room(0.0, 0.5)),
            Some(Move {
                from: 1,
                to: 0,
                count: 8
            })
        );
        assert!(p.contended(room(0.1, 0.5)));
        // Gathered and "hot": no core to spread to, so stay.
        assert_eq!(p.decide(&[0.95, 0.0], &[16, 0], room(0.0, 0.6)), None);
        // The same with idle cores: spread, as without room.
        assert_eq!(
            p.decide(&[0.95, 0.0], &[16, 0], room(1.0, 0.6)),
            p.decide(&[0.95, 0.0], &[16, 0], None)
        );
        // One thread saturated (the proxy uses more than 0.9 cores): spread
        // even on a contended machine, and do not gather back.
        assert_eq!(
            p.decide(&[1.0, 0.0], &[16, 0], room(0.0, 0.95))
                .map(|m| (m.from, m.to)),
            Some((0, 1))
        );
        assert_eq!(p.decide(&[0.9, 0.6], &[8, 8], room(0.0, 1.3)), None);
        assert!(!p.contended(room(0.0, 0.8)));
        // Between pack_used and saturated_used: neither (hysteresis).
        assert_eq!(p.decide(&[0.95, 0.0], &[16, 0], room(0.0, 0.8)), None);
        assert_eq!(p.decide(&[0.9, 0.5], &[8, 8], room(0.0, 0.8)), None);
    }
}
