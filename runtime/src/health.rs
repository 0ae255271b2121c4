//! Health checks: the loop that checks every backend's status port and SQL
//! port as `[health-check]` says, and feeds the answers to the router,
//! where each backend's [`tiproxy_core::health::BackendHealth`] applies
//! the rules. This module gathers inputs and logs the transitions the
//! core reports; it decides nothing itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tiproxy_core::handshake::InitialHandshake;
use tiproxy_core::health::{CheckFailure, LocalExhaustion, Transition};
use tiproxy_core::packet::PacketDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::http_client::{HttpError, http_status};
use crate::net::Network;
use crate::router::BackendProfile;
use crate::state::State;

/// Health checks, as `[health-check]` sets them (re-read when the
/// configuration changes). Every `status-interval`: the TiDB status port of
/// backends that have one (`GET /status`; 500 means draining). Every
/// `interval`: the SQL port's greeting. A backend that fails
/// `failure-threshold` checks in a row gets no new connections; a draining
/// one also has its sessions moved away by `balance_loop`.
pub(crate) async fn probe_loop<N: Network>(st: Arc<State<N>>) {
    let mut generation = u64::MAX;
    let mut hc = crate::config::HealthCheckConfig::default();
    let mut d = hc.durations();
    let mut next_probe = tokio::time::Instant::now();
    let mut checks = JoinSet::new();
    let mut in_flight: BTreeMap<String, tokio::task::Id> = BTreeMap::new();
    let streaks = Arc::new(ProbeStreaks::default());
    loop {
        if st.config_generation() != generation {
            generation = st.config_generation();
            hc = st.live_config().health_check;
            d = hc.durations();
            st.shared.router.set_failure_threshold(hc.failure_threshold);
        }
        // Until some backend has greeted the proxy, clients are greeted
        // with the conservative default profile: probe at once, not a
        // whole interval after backends appear (from PD, say).
        let probe_due =
            tokio::time::Instant::now() >= next_probe || !st.shared.router.has_profile();
        if probe_due {
            next_probe = tokio::time::Instant::now() + d.interval;
        }
        // Each backend on its own: one that does not answer (a partition, a
        // dead host) must not delay the checks of the others by its
        // timeouts; its next round starts when its last one ended. Found by
        // simulation seed 2224: while a partitioned TiDB's checks timed
        // out, the proxy missed another TiDB's drain for longer than its
        // graceful wait, and that TiDB closed a session.
        while let Some(done) = checks.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            };
            in_flight.retain(|_, v| *v != id);
        }
        if hc.enable {
            let backends = st.shared.router.backends();
            streaks.retain(|addr| backends.iter().any(|b| b.addr == addr));
            for b in backends {
                if in_flight.contains_key(&b.addr) {
                    continue;
                }
                let addr = b.addr.clone();
                let h = crate::task::spawn_in(
                    &mut checks,
                    check_backend(st.clone(), b, d, probe_due, streaks.clone()),
                );
                in_flight.insert(addr, h.id());
            }
        }
        tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep(d.status_interval) => {}
        }
    }
}

/// One round of [`probe_loop`]'s checks of `b`: gathers the answers, feeds
/// them to the backend's health (`tiproxy_core::health`, where the rules
/// are) and logs the transitions it reports.
async fn check_backend<N: Network>(
    st: Arc<State<N>>,
    b: Arc<crate::router::Backend>,
    d: crate::config::HealthCheckDurations,
    probe_due: bool,
    streaks: Arc<ProbeStreaks>,
) {
    let started = tokio::time::Instant::now();
    if check_backend_once(&st, &b, d, probe_due, &streaks).await {
        crate::metrics::metrics()
            .health_check_seconds
            .set(started.elapsed().as_secs_f64());
    }
}

/// [`check_backend`]'s work; false when there was nothing to check.
async fn check_backend_once<N: Network>(
    st: &State<N>,
    b: &Arc<crate::router::Backend>,
    d: crate::config::HealthCheckDurations,
    mut probe_due: bool,
    streaks: &ProbeStreaks,
) -> bool {
    let router = &st.shared.router;
    if let Some(status) = &b.status_addr {
        let tls = st.cluster_tls.get();
        let answer = http_status(&st.shared.net, tls, status, "/status", d.dial_timeout).await;
        // Out of descriptors is the proxy's own state, not the backend's.
        let failure = |e: &HttpError| match e {
            HttpError::Connect(io) => {
                crate::net::local_exhaustion(io).map_or(CheckFailure::Backend, CheckFailure::Local)
            }
            _ => CheckFailure::Backend,
        };
        let out = router.handle_status(b, answer.as_ref().map(|c| *c).map_err(failure));
        probe_due |= out.probe_now;
        match (out.transition, &answer) {
            (Some(Transition::DrainEnded), _) => {
                info!(backend = %b.addr, "backend is serving again (status 200)");
            }
            (Some(Transition::DrainStarted { code }), _) => {
                info!(backend = %b.addr, connections = b.connections(), "backend is draining (status {code}): moving its sessions");
            }
            (Some(Transition::StatusUnreachable), Err(e)) => {
                warn!(backend = %b.addr, "status port unreachable: {e}");
            }
            _ => {}
        }
    }
    if !probe_due {
        return b.status_addr.is_some();
    }
    let probe_started = tokio::time::Instant::now();
    let answer = probe(st, &b.addr, d.dial_timeout).await;
    if answer.is_ok() {
        crate::metrics::metrics()
            .ping_duration
            .with_label_values(&[&b.addr])
            .set(probe_started.elapsed().as_secs_f64());
    }
    let out = router.handle_probe(
        b,
        match &answer {
            Ok(_) => Ok(()),
            Err(ProbeError::Local(what)) => Err(CheckFailure::Local(*what)),
            Err(ProbeError::Backend(_)) => Err(CheckFailure::Backend),
        },
    );
    let now = tokio::time::Instant::now().into_std();
    match answer {
        Ok(profile) => {
            router.set_profile(profile);
            if let Some(n) = streaks.ended(&b.addr) {
                info!(backend = %b.addr, failed_probes = n, "backend probe succeeds again");
            }
        }
        Err(ProbeError::Backend(e)) if out.transition == Some(Transition::ProbeFailed) => {
            match streaks.failed(&b.addr, now) {
                StreakLine::First => {
                    warn!(backend = %b.addr, "backend probe failed: {e}; no new connections go there until a probe succeeds");
                }
                StreakLine::Still { failed, for_ } => {
                    warn!(backend = %b.addr, failed_probes = failed, "backend probe still failing after {for_:?}: {e}");
                }
                StreakLine::Quiet => {}
            }
        }
        Err(_) => {}
    }
    true
}

/// How often a backend whose probes keep failing is logged again.
const STILL_FAILING_EVERY: Duration = Duration::from_secs(60);

/// Runs of failed probes per backend, so an unreachable backend is logged
/// once when its probes start failing, then once a minute with a count,
/// and once when a probe succeeds again (not at every probe).
#[derive(Debug, Default)]
struct ProbeStreaks(Mutex<BTreeMap<String, Streak>>);

/// One backend's run of failed probes.
#[derive(Debug)]
struct Streak {
    since: std::time::Instant,
    failed: u64,
    logged: std::time::Instant,
}

/// What to log for a failed probe.
#[derive(Debug, PartialEq)]
enum StreakLine {
    /// The run begins.
    First,
    /// The run goes on: `failed` probes over `for_`.
    Still { failed: u64, for_: Duration },
    /// Logged recently.
    Quiet,
}

impl ProbeStreaks {
    fn runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Streak>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A probe of `addr` failed at `now`.
    fn failed(&self, addr: &str, now: std::time::Instant) -> StreakLine {
        let mut runs = self.runs();
        let Some(s) = runs.get_mut(addr) else {
            runs.insert(
                addr.to_string(),
                Streak {
                    since: now,
                    failed: 1,
                    logged: now,
                },
            );
            return StreakLine::First;
        };
        s.failed += 1;
        if now.saturating_duration_since(s.logged) < STILL_FAILING_EVERY {
            return StreakLine::Quiet;
        }
        s.logged = now;
        StreakLine::Still {
            failed: s.failed,
            for_: now.saturating_duration_since(s.since),
        }
    }

    /// A probe of `addr` succeeded: the number of failed probes before it,
    /// if it had been failing.
    fn ended(&self, addr: &str) -> Option<u64> {
        self.runs().remove(addr).map(|s| s.failed)
    }

    /// Forgets backends that left the set.
    fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.runs().retain(|a, _| keep(a));
    }
}

/// Why a probe got no greeting.
#[derive(Debug)]
enum ProbeError {
    /// The backend did not greet (refused, closed, timed out, an ERR).
    Backend(String),
    /// The proxy could not dial: out of descriptors or memory.
    Local(LocalExhaustion),
}

impl From<String> for ProbeError {
    fn from(e: String) -> Self {
        Self::Backend(e)
    }
}

/// Dials `addr`'s SQL port and reads its greeting.
async fn probe<N: Network>(
    st: &State<N>,
    addr: &str,
    timeout: Duration,
) -> Result<BackendProfile, ProbeError> {
    let work = async {
        let mut s = st.shared.net.connect(addr).await.map_err(|e| {
            match crate::net::local_exhaustion(&e) {
                Some(what) => ProbeError::Local(what),
                None => ProbeError::Backend(e.to_string()),
            }
        })?;
        if st
            .shared
            .proxy_protocol
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Backends that expect PROXY headers expect them on every
            // connection; a probe is the proxy's own (LOCAL).
            let mut h = BytesMut::new();
            tiproxy_core::proxy_protocol::ProxyHeader::Local.write(&mut h);
            s.write_all(&h).await.map_err(|e| e.to_string())?;
        }
        let mut d = PacketDecoder::with_limit(64 * 1024);
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before greeting".to_string().into());
            }
            d.extend(&buf[..n]);
            if let Some(p) = d.next_payload().map_err(|e| e.to_string())? {
                if p.data.first() == Some(&0xff) {
                    let e = tiproxy_core::response::ErrPacket::parse(&p.data)
                        .map_err(|e| e.to_string())?;
                    return Err(format!("backend refused: {} {}", e.code, e.message_text()).into());
                }
                let g = InitialHandshake::parse(&p.data).map_err(|e| e.to_string())?;
                let _ = s.shutdown().await;
                return Ok(BackendProfile {
                    server_version: g.server_version,
                    capabilities: g.capabilities,
                    mariadb_capabilities: g.mariadb_capabilities,
                    charset: g.charset,
                });
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Backend(format!("no greeting within {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{ProbeStreaks, STILL_FAILING_EVERY, StreakLine};

    #[test]
    fn a_failing_backend_is_logged_once_then_once_a_minute_with_a_count() {
        let s = ProbeStreaks::default();
        let t0 = Instant::now();
        let every = Duration::from_millis(500);
        assert_eq!(s.failed("a:1", t0), StreakLine::First);
        let mut lines = Vec::new();
        // Two minutes of probes every 0.5 s.
        for i in 1..=240u32 {
            match s.failed("a:1", t0 + every * i) {
                StreakLine::Quiet => {}
                l => lines.push(l),
            }
        }
        assert_eq!(
            lines,
            [
                StreakLine::Still {
                    failed: 121,
                    for_: STILL_FAILING_EVERY
                },
                StreakLine::Still {
                    failed: 241,
                    for_: STILL_FAILING_EVERY * 2
                },
            ]
        );
        // Another backend has its own run; success ends a run with its count.
        assert_eq!(s.failed("b:1", t0), StreakLine::First);
        assert_eq!(s.ended("a:1"), Some(241));
        assert_eq!(s.ended("a:1"), None);
        assert_eq!(s.failed("a:1", t0 + every * 300), StreakLine::First);
        s.retain(|a| a != "b:1");
        assert_eq!(s.ended("b:1"), None);
    }
}
