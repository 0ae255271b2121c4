//! Backend health: whether a TiDB takes new sessions, as a pure function of
//! what its checks and dials said and when.
//!
//! [`BackendHealth`] owns one backend's health state. The runtime feeds it
//! the answers of the status port (`GET /status`), of the SQL-port probe
//! (a greeting) and of session dials, each with the time it arrived, and
//! applies the [`Outcome`]s (log a transition, set a metric, probe now).
//! It never reads a clock and never blocks.
//!
//! It also classifies the proxy's own resource exhaustion
//! ([`LocalExhaustion`]): a dial that failed because the proxy is out of
//! file descriptors says nothing about the backend, so it changes nothing
//! here; and [`ExhaustionLog`] turns a flood of such refusals into at most
//! one warning a second.
//!
//! The rules were taught by the simulation (seeds in `sim/README.md`):
//! - seed 27: a status port that stops answering marks the backend failed;
//! - seed 88: a failing status port is not overruled by a SQL probe or a
//!   successful dial: only `/status` says whether the TiDB drains;
//! - seed 1603: a status port that answers while the probe is failing asks
//!   for a probe at once, not an interval later;
//! - seed 2957: a backend discovery added is not known until its status
//!   port answered (it takes moves only when known).

use std::fmt;
use std::time::{Duration, Instant};

/// How long a backend that failed (a dial, or `failure_threshold` checks in
/// a row) gets no new sessions.
pub const FAILED_BACKEND_PAUSE: Duration = Duration::from_secs(3);

/// The knobs of the rules (`[health-check]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Checks of one kind that must fail in a row before the backend is
    /// marked failed.
    pub failure_threshold: u32,
    /// How long a failed backend gets no new sessions.
    pub failed_pause: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        // `[health-check] failure-threshold` defaults to 1, as TiProxy's.
        Self {
            failure_threshold: 1,
            failed_pause: FAILED_BACKEND_PAUSE,
        }
    }
}

/// What a dial of the backend's SQL port gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// The connection was made.
    Connected,
    /// The backend could not be reached (refused, reset, timed out).
    Failed,
    /// The proxy itself is out of a resource: nothing is learnt about the
    /// backend.
    Local(LocalExhaustion),
}

/// A health check that did not get an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFailure {
    /// The backend did not answer (refused, reset, timed out, garbage).
    Backend,
    /// The proxy could not even try: it is out of a resource.
    Local(LocalExhaustion),
}

/// A change worth one log line (and a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The status port said it shuts down (HTTP status other than 200).
    DrainStarted {
        /// The HTTP status.
        code: u16,
    },
    /// The status port says 200 again.
    DrainEnded,
    /// The status port failed `failure_threshold` times in a row while the
    /// backend took sessions.
    StatusUnreachable,
    /// The SQL probe failed `failure_threshold` times in a row while the
    /// backend was not draining.
    ProbeFailed,
    /// A failed backend was cleared (by a probe, a dial or `/status`).
    Recovered,
    /// A dial failed: no new sessions for the pause.
    Paused,
}

/// What the runtime must do after an input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Outcome {
    /// What changed, for the log and metrics.
    pub transition: Option<Transition>,
    /// Probe the SQL port now rather than at the next interval.
    pub probe_now: bool,
}

/// Why a backend does not take new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAccepting {
    /// Removed from the backend set.
    Removed,
    /// Its status port says it shuts down.
    Draining,
    /// An operator drained it.
    ManuallyDrained,
    /// It is in `proxy.fail-backend-list`.
    FailBackendList,
    /// It failed a dial or its checks, until this instant.
    Failed {
        /// When it may be tried again.
        until: Instant,
    },
    /// Its status port never answered yet (discovery just added it).
    Unknown,
}

impl fmt::Display for NotAccepting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Removed => f.write_str("removed from the backend list"),
            Self::Draining => f.write_str("its status port says it is shutting down"),
            Self::ManuallyDrained => f.write_str("drained by an operator"),
            Self::FailBackendList => f.write_str("it is in proxy.fail-backend-list"),
            Self::Failed { .. } => f.write_str("it failed recent connects or health checks"),
            Self::Unknown => f.write_str("its status port has not answered yet"),
        }
    }
}

/// One backend's health.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    /// It has a status port: only that says whether it drains.
    has_status_port: bool,
    /// Its state is known (see [`BackendHealth::is_known`]).
    known: bool,
    /// The status port's last answer was not 200.
    draining: bool,
    manual_drain: bool,
    /// Since when it is in `proxy.fail-backend-list` (then it takes no
    /// sessions, its sessions move away, and those still on it after
    /// `failover-timeout` are closed).
    failover_since: Option<Instant>,
    removed: bool,
    /// Failed: no new sessions before this instant; `Some` until cleared.
    failed_until: Option<Instant>,
    /// Consecutive failures of the status port.
    status_failures: u32,
    /// Consecutive failures of the SQL probe.
    probe_failures: u32,
}

impl BackendHealth {
    /// A backend just learnt of. With a status port its state is unknown
    /// until that answers; without one there is nothing more to learn.
    pub fn new(has_status_port: bool) -> Self {
        Self {
            has_status_port,
            known: !has_status_port,
            draining: false,
            manual_drain: false,
            failover_since: None,
            removed: false,
            failed_until: None,
            status_failures: 0,
            probe_failures: 0,
        }
    }

    /// A backend from the configuration the proxy started with: assumed up
    /// and known, so the proxy serves at once.
    pub fn configured(has_status_port: bool) -> Self {
        Self {
            known: true,
            ..Self::new(has_status_port)
        }
    }

    /// The status port answered `Ok(http status)` or failed, at `now`.
    pub fn handle_status(
        &mut self,
        now: Instant,
        answer: Result<u16, CheckFailure>,
        cfg: &HealthConfig,
    ) -> Outcome {
        let mut out = Outcome::default();
        match answer {
            Ok(code) => {
                self.status_failures = 0;
                self.known = true;
                if self.probe_failures == 0 {
                    if self.clear_failure() {
                        out.transition = Some(Transition::Recovered);
                    }
                } else {
                    // Answering again (a restart): check its SQL port now,
                    // not an interval later (seed 1603).
                    out.probe_now = true;
                }
                let draining = code != 200;
                if draining != self.draining {
                    self.draining = draining;
                    out.transition = Some(if draining {
                        Transition::DrainStarted { code }
                    } else {
                        Transition::DrainEnded
                    });
                }
            }
            Err(CheckFailure::Local(_)) => {}
            Err(CheckFailure::Backend) => {
                // A TiDB whose status port stopped answering is down
                // (crashed, host gone): no new sessions or moves to it until
                // it answers again (seed 27).
                self.status_failures = self.status_failures.saturating_add(1);
                if self.status_failures >= cfg.failure_threshold {
                    if self.accepts(now) {
                        out.transition = Some(Transition::StatusUnreachable);
                    }
                    self.fail(now, cfg);
                }
            }
        }
        out
    }

    /// The SQL-port probe got a greeting (`Ok`) or failed, at `now`.
    pub fn handle_probe(
        &mut self,
        now: Instant,
        answer: Result<(), CheckFailure>,
        cfg: &HealthConfig,
    ) -> Outcome {
        let mut out = Outcome::default();
        match answer {
            Ok(()) => {
                self.probe_failures = 0;
                if self.reached() {
                    out.transition = Some(Transition::Recovered);
                }
            }
            Err(CheckFailure::Local(_)) => {}
            Err(CheckFailure::Backend) => {
                self.probe_failures = self.probe_failures.saturating_add(1);
                if self.probe_failures >= cfg.failure_threshold {
                    if !self.draining
                        && !self.manual_drain
                        && self.failover_since.is_none()
                        && !self.removed
                    {
                        out.transition = Some(Transition::ProbeFailed);
                    }
                    self.fail(now, cfg);
                }
            }
        }
        out
    }

    /// A session's dial of the SQL port ended, at `now`. One failed dial
    /// pauses the backend (a client is waiting: no threshold).
    pub fn handle_dial(&mut self, now: Instant, dial: Dial, cfg: &HealthConfig) -> Outcome {
        let mut out = Outcome::default();
        match dial {
            Dial::Connected => {
                if self.reached() {
                    out.transition = Some(Transition::Recovered);
                }
            }
            Dial::Failed => {
                let was = self.failed_until.is_some();
                self.fail(now, cfg);
                if !was {
                    out.transition = Some(Transition::Paused);
                }
            }
            // The proxy's own condition: the backend is as healthy as it was.
            Dial::Local(_) => {}
        }
        out
    }

    /// An operator drained (or undrained) it.
    pub fn set_manual_drain(&mut self, on: bool) {
        self.manual_drain = on;
    }

    /// Puts it in failover from `now` (it is in `proxy.fail-backend-list`),
    /// keeping an earlier start, or takes it out (`None`). True when that
    /// changed whether it is in failover.
    pub fn set_failover(&mut self, now: Option<Instant>) -> bool {
        let was = self.failover_since.is_some();
        match now {
            Some(t) => {
                self.failover_since.get_or_insert(t);
            }
            None => self.failover_since = None,
        }
        was != self.failover_since.is_some()
    }

    /// Since when it is in failover, if it is.
    pub fn failover_since(&self) -> Option<Instant> {
        self.failover_since
    }

    /// Discovery removed it from (or put it back in) the backend set.
    pub fn set_removed(&mut self, on: bool) {
        self.removed = on;
    }

    /// Marks it known without a status answer (the configured set).
    pub fn set_known(&mut self) {
        self.known = true;
    }

    /// Whether it takes new sessions now: known and [`Self::reachable`].
    pub fn accepts(&self, now: Instant) -> bool {
        self.why_not(now).is_none()
    }

    /// Whether it would take new sessions now if its state were known: a
    /// backend discovery just added is better than none at all.
    pub fn reachable(&self, now: Instant) -> bool {
        matches!(self.why_not(now), None | Some(NotAccepting::Unknown))
    }

    /// Why it takes no new sessions now (`None`: it does). The most
    /// lasting reason first.
    pub fn why_not(&self, now: Instant) -> Option<NotAccepting> {
        if self.removed {
            return Some(NotAccepting::Removed);
        }
        if self.draining {
            return Some(NotAccepting::Draining);
        }
        if self.manual_drain {
            return Some(NotAccepting::ManuallyDrained);
        }
        if self.failover_since.is_some() {
            return Some(NotAccepting::FailBackendList);
        }
        if let Some(until) = self.paused_until(now) {
            return Some(NotAccepting::Failed { until });
        }
        if !self.known {
            return Some(NotAccepting::Unknown);
        }
        None
    }

    /// When a failed backend may be tried again, if that is later than
    /// `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.failed_until.filter(|t| now < *t)
    }

    /// Whether its state is known: its status port answered at least once,
    /// it has none, or it was configured. Until then it takes no moves, and
    /// new sessions only when no known backend can (seed 2957).
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// Whether its status port says it shuts down.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Whether an operator drained it.
    pub fn is_manually_drained(&self) -> bool {
        self.manual_drain
    }

    /// Whether it was removed from the set.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Whether it is marked failed (a pause may have run out, but nothing
    /// has cleared it yet).
    pub fn is_failed(&self) -> bool {
        self.failed_until.is_some()
    }

    fn fail(&mut self, now: Instant, cfg: &HealthConfig) {
        self.failed_until = Some(now + cfg.failed_pause);
    }

    /// The SQL port was reached (a probe or a dial). A backend whose status
    /// port is failing stays failed: only `/status` says whether it drains
    /// (seed 88: a partition hid a graceful shutdown; when it healed a held
    /// probe got through first and a session was moved onto the TiDB just
    /// before it closed its connections). True when that cleared a failure.
    fn reached(&mut self) -> bool {
        if self.has_status_port && self.status_failures > 0 {
            return false;
        }
        self.clear_failure()
    }

    fn clear_failure(&mut self) -> bool {
        self.failed_until.take().is_some()
    }
}

/// The proxy itself ran out of a resource an accept or a dial needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalExhaustion {
    /// This process reached its file descriptor limit (EMFILE).
    ProcessFds {
        /// `RLIMIT_NOFILE` (soft), when known.
        limit: Option<u64>,
    },
    /// The system's file table is full (ENFILE).
    SystemFds,
    /// The kernel is out of socket buffers or memory (ENOBUFS, ENOMEM).
    Memory,
    /// The memory in use on the proxy's host (or in its cgroup) reached
    /// `proxy.high-memory-usage-reject-threshold` of the limit: new clients
    /// are refused before the proxy is OOM-killed with every session on it.
    MemoryThreshold {
        /// Bytes in use when last measured, plus what sessions accepted
        /// since are estimated to hold.
        used: u64,
        /// The limit: the cgroup's, else the host's total memory.
        limit: u64,
        /// The threshold, in percent of `limit`.
        threshold_pct: u8,
    },
}

impl LocalExhaustion {
    /// Classifies a Linux `errno` (`io::Error::raw_os_error`): EMFILE (24),
    /// ENFILE (23), ENOBUFS (105), ENOMEM (12). Anything else is not the
    /// proxy's own condition.
    pub fn from_errno(errno: i32, fd_limit: Option<u64>) -> Option<Self> {
        match errno {
            24 => Some(Self::ProcessFds { limit: fd_limit }),
            23 => Some(Self::SystemFds),
            105 | 12 => Some(Self::Memory),
            _ => None,
        }
    }

    /// What to raise or lower.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::ProcessFds { .. } => {
                "raise the limit (ulimit -n / LimitNOFILE) or lower proxy.max-connections"
            }
            Self::SystemFds => "raise fs.file-max or lower proxy.max-connections",
            Self::Memory => "free memory on the tiproxy host or lower proxy.max-connections",
            Self::MemoryThreshold { .. } => {
                "free memory on the tiproxy host, raise its memory limit, or raise \
                 proxy.high-memory-usage-reject-threshold (0 turns the check off)"
            }
        }
    }
}

impl fmt::Display for LocalExhaustion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ProcessFds { limit: Some(n) } => {
                write!(f, "out of file descriptors (RLIMIT_NOFILE {n})")
            }
            Self::ProcessFds { limit: None } => {
                f.write_str("out of file descriptors (RLIMIT_NOFILE)")
            }
            Self::SystemFds => f.write_str("the system is out of file descriptors (fs.file-max)"),
            Self::Memory => f.write_str("the host is out of socket memory"),
            Self::MemoryThreshold {
                used,
                limit,
                threshold_pct,
            } => {
                const MIB: u64 = 1 << 20;
                write!(
                    f,
                    "memory in use {} MiB of {} MiB ({}%) is over \
                     proxy.high-memory-usage-reject-threshold ({threshold_pct}%)",
                    used / MIB,
                    limit / MIB,
                    used.saturating_mul(100) / (*limit).max(1)
                )
            }
        }
    }
}

/// A flood of refusals for local exhaustion, as log lines: the first
/// refusal of an episode at once, then at most one line a second with how
/// many were refused since the last line.
#[derive(Debug, Clone, Default)]
pub struct ExhaustionLog {
    /// When the last line was written.
    last_line: Option<Instant>,
    /// Refusals since then.
    unreported: u64,
    /// The last kind seen.
    last: Option<LocalExhaustion>,
}

/// How often [`ExhaustionLog`] writes at most.
pub const EXHAUSTION_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl ExhaustionLog {
    /// One connection was refused at `now`; `Some((count, kind))` when a
    /// line should be written now, saying `count` were refused.
    #[must_use]
    pub fn refused(
        &mut self,
        now: Instant,
        what: LocalExhaustion,
    ) -> Option<(u64, LocalExhaustion)> {
        self.unreported += 1;
        self.last = Some(what);
        self.poll(now)
    }

    /// When refusals not yet reported are due for a line (call
    /// [`ExhaustionLog::poll`] then); `None` when there are none.
    pub fn next_due(&self) -> Option<Instant> {
        if self.unreported == 0 {
            return None;
        }
        self.last_line.map(|t| t + EXHAUSTION_LOG_INTERVAL)
    }

    /// Time passed: `Some((count, kind))` when refusals are still
    /// unreported and a line is due.
    #[must_use]
    pub fn poll(&mut self, now: Instant) -> Option<(u64, LocalExhaustion)> {
        if self.unreported == 0 {
            return None;
        }
        let due = self
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= EXHAUSTION_LOG_INTERVAL);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        let n = std::mem::take(&mut self.unreported);
        // `last` is set by every `refused`, which `unreported > 0` implies.
        self.last.map(|w| (n, w))
    }
}

// The unit tests read the clock (they play the driver), so they live
// outside core/src, which must not.
#[cfg(test)]
#[path = "../tests/unit/health.rs"]
mod tests;
