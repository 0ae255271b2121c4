//! The loops that feed and apply balancing: [`metrics_loop`] reads each
//! TiDB's CPU and memory use and its error counters (the health factor),
//! [`balance_loop`] plans every tick's moves
//! with the core and asks the chosen sessions to move. Decisions are the
//! core's ([`tiproxy_core::balance::plan`], the move ledger); these loops
//! only gather inputs and apply outcomes.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::conn::{Control, Mailbox};
use crate::http_client::http_get;
use crate::net::Network;
use crate::router::MetricsReading;
use crate::state::State;

/// Every `[health-check] metrics-interval`: each TiDB's `/metrics` on its
/// status port, for CPU and memory use and the error counters towards PD
/// and TiKV (what the `resource` and `location`
/// policies rank by). A backend without the metrics (not a TiDB, or an
/// unreachable status port) is simply not ranked by them; its health is
/// `probe_loop`'s business, so failures here are logged at debug only.
pub(super) async fn metrics_loop<N: Network>(st: Arc<State<N>>) {
    let mut generation = u64::MAX;
    let mut hc = crate::config::HealthCheckConfig::default();
    let mut d = hc.durations();
    loop {
        if st.config_generation() != generation {
            generation = st.config_generation();
            let cfg = st.live_config();
            hc = cfg.health_check;
            d = hc.durations();
        }
        let wanted = hc.enable
            && st.live_config().balance.policy() != tiproxy_core::balance::Policy::Connection;
        if wanted {
            for b in st.shared.router.backends() {
                let Some(status) = &b.status_addr else {
                    continue;
                };
                let m = crate::metrics::metrics();
                let tls = st.cluster_tls.get();
                match http_get(&st.shared.net, tls, status, "/metrics", d.metrics_timeout).await {
                    Ok((200, body)) => {
                        let now = tokio::time::Instant::now();
                        b.record_metrics(MetricsReading::parse(&body), now);
                        let (cpu, memory) = b.resources(now);
                        for (what, v) in [("cpu", cpu.map(|c| c.usage)), ("memory", memory)] {
                            if let Some(v) = v {
                                m.backend_metric.with_label_values(&[&b.addr, what]).set(v);
                            }
                        }
                        report_health(&b, now);
                    }
                    Ok((code, _)) => {
                        m.server_error(crate::metrics::err_type::BACKEND_METRICS);
                        debug!(backend = %b.addr, "/metrics answered {code}")
                    }
                    Err(e) => {
                        m.server_error(crate::metrics::err_type::BACKEND_METRICS);
                        debug!(backend = %b.addr, "cannot read /metrics: {e}")
                    }
                }
            }
        }
        tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep(d.metrics_interval) => {}
        }
    }
}

/// Every 100 ms: snapshot the backends, plan the tick's moves with
/// [`tiproxy_core::balance::plan_grouped`] (inside each routing group:
/// evacuate draining and removed backends,
/// then even out the rest with hysteresis), and ask the chosen sessions to
/// move. The move ledger ([`tiproxy_core::balance::MoveLedger`]) says which
/// sessions may be asked (not moving, not cooling down after a failed
/// move), how many moves may start, and which backends cannot export.
/// Closes the sessions still on a backend in `proxy.fail-backend-list`
/// once its `failover-timeout` elapsed (TiProxy's
/// `CloseTimedOutFailoverConnections`), one warning per backend and pass.
fn close_after_failover_timeout<N: Network>(st: &State<N>) {
    for b in st.shared.router.failover_expired() {
        let mut closed = 0;
        for (_, m) in st.sessions() {
            if m.backend().is_some_and(|x| Arc::ptr_eq(&x, &b)) {
                m.send(Control::Close(
                    "its backend is in proxy.fail-backend-list and failover-timeout elapsed",
                ));
                closed += 1;
            }
        }
        if closed > 0 {
            warn!(
                backend = %b.addr,
                closed,
                "closed the sessions still on a backend in proxy.fail-backend-list after failover-timeout"
            );
        }
    }
}

/// The health factor's series (TiProxy's `failure_pd`, `total_pd`, ...
/// of `tiproxy_backend_backend_metric`) and one log line when a backend's
/// level changes: a failing TiDB is loud, its recovery is not.
fn report_health(b: &crate::router::Backend, now: tokio::time::Instant) {
    use tiproxy_core::balance::{HEALTH_INDICATORS, HealthLevel};
    let m = crate::metrics::metrics();
    let (j, increases, changed) = b.health_report(now);
    for (ind, inc) in HEALTH_INDICATORS.iter().zip(increases) {
        let Some((failures, total)) = inc else {
            continue;
        };
        let total_key = ind.name.replace("failure_", "total_");
        m.backend_metric
            .with_label_values(&[&b.addr, ind.name])
            .set(failures);
        m.backend_metric
            .with_label_values(&[&b.addr, &total_key])
            .set(total);
    }
    if !changed {
        return;
    }
    match j.level {
        HealthLevel::Failing => warn!(
            backend = %b.addr,
            indicator = j.indicator.unwrap_or(""),
            failures = j.failures,
            total = j.total,
            "TiDB fails towards PD or TiKV: its sessions move to healthy TiDBs"
        ),
        HealthLevel::Degraded => info!(
            backend = %b.addr,
            indicator = j.indicator.unwrap_or(""),
            failures = j.failures,
            total = j.total,
            "TiDB reports errors towards PD or TiKV: new connections prefer other TiDBs"
        ),
        HealthLevel::Normal => info!(backend = %b.addr, "TiDB's error rates are back to normal"),
    }
}

pub(super) async fn balance_loop<N: Network>(st: Arc<State<N>>) {
    use tiproxy_core::balance::{BackendLoad, BalanceConfig, plan_grouped};
    let tick = Duration::from_millis(1000 / u64::from(tiproxy_core::balance::TICKS_PER_SECOND));
    // `[balance]` is reloadable: re-read when the configuration changed.
    let mut generation = st.config_generation();
    let mut cfg = st.live_config().balance.plan_config();
    let fail_list = |st: &State<N>| {
        let live = st.live_config();
        st.shared
            .router
            .set_fail_list(&live.proxy.fail_backend_list, live.proxy.failover_timeout);
    };
    fail_list(&st);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        if st.config_generation() != generation {
            generation = st.config_generation();
            let live = st.live_config();
            cfg = live.balance.plan_config();
            st.shared
                .router
                .set_balance(crate::router::RoutingSettings::from_config(&live));
            drop(live);
            fail_list(&st);
        }
        let router = &st.shared.router;
        router.update_failover();
        close_after_failover_timeout(&st);
        let backends = router.backends();
        ticks += 1;
        if ticks >= tiproxy_core::balance::TICKS_PER_SECOND {
            ticks = 0;
            let now = tokio::time::Instant::now();
            let loads: Vec<BackendLoad> = backends.iter().map(|b| router.load_of(b, now)).collect();
            record_scores(&backends, &loads, cfg.policy);
        }
        if backends.len() < 2 && !backends.iter().any(|b| b.should_evacuate()) {
            continue;
        }
        let now = tokio::time::Instant::now();
        // Movable sessions per backend, by the ledger.
        let sessions: Vec<(u32, Arc<Mailbox>, usize)> = st
            .sessions()
            .into_iter()
            .filter_map(|(id, m)| {
                let b = m.backend()?;
                let i = backends.iter().position(|x| Arc::ptr_eq(x, &b))?;
                Some((id, m, i))
            })
            .collect();
        let mut on: Vec<Vec<(u32, Arc<Mailbox>)>> = vec![Vec::new(); backends.len()];
        let (room, exports) = router.with_moves(|l| {
            l.expire(now.into_std());
            for (id, m, i) in sessions {
                if l.can_move(id, now.into_std()) {
                    on[i].push((id, m));
                }
            }
            let exports: Vec<bool> = backends.iter().map(|b| l.can_export(&b.addr)).collect();
            (l.room(), exports)
        });
        let snapshot: Vec<BackendLoad> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendLoad {
                movable: if exports[i] { on[i].len() as u32 } else { 0 },
                evacuate: b.should_evacuate()
                    && !router.planted(crate::router::PlantedBug::NoEvacuation),
                ..router.load_of(b, now)
            })
            .collect();
        // Moves in flight hold a third socket each and compete with the
        // sessions' own traffic: keep their number bounded.
        if room == 0 {
            continue;
        }
        let cfg = BalanceConfig {
            budget: cfg.budget.min(room),
            ..cfg
        };
        // Moves stay inside each TiDB's group (`balance.routing-rule`).
        let groups = router.group_ids(&backends);
        for m in plan_grouped(&snapshot, &groups, &cfg) {
            let n = (m.count as usize).min(on[m.from].len());
            for (id, mb) in on[m.from].drain(..n) {
                mb.request_move(router, id, &backends[m.to], m.factor.name());
            }
        }
    }
}

/// Once a second: `tiproxy_balance_b_score` (each backend's rank by each
/// factor of the policy) and whether each backend is outside the proxy's zone (for
/// `tiproxy_traffic_cross_location_bytes`).
fn record_scores(
    backends: &[Arc<crate::router::Backend>],
    loads: &[tiproxy_core::balance::BackendLoad],
    policy: tiproxy_core::balance::Policy,
) {
    let m = crate::metrics::metrics();
    let scores = tiproxy_core::balance::scores(loads, policy);
    for ((b, load), score) in backends.iter().zip(loads).zip(&scores) {
        b.metrics.set_cross_location(!load.local);
        for (factor, v) in score {
            m.backend_score
                .with_label_values(&[&b.addr, factor.name()])
                .set(*v as f64);
        }
    }
}
