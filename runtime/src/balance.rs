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

/// Every 100 ms: snapshot the backends, plan the tick's moves with
/// [`tiproxy_core::balance::plan_grouped`] (inside each routing group:
/// evacuate draining and removed backends,
/// then even out the rest with hysteresis), and ask the chosen sessions to
/// move. The move ledger ([`tiproxy_core::balance::MoveLedger`]) says which
/// sessions may be asked (not moving, not cooling down after a failed
/// move), how many moves may start, and which backends cannot export.
/// Between ticks, when the bound on moves in flight
/// ([`tiproxy_core::balance::MAX_MOVES_IN_FLIGHT`]) stopped a plan with
/// sessions left to evacuate, each end of a move lets it plan evacuations
/// again ([`tiproxy_core::balance::plan_evacuations_grouped`]) from what
/// the tick's budget has left.
pub(super) async fn balance_loop<N: Network>(st: Arc<State<N>>) {
    use tiproxy_core::balance::{
        BackendLoad, BalanceConfig, Factor, plan_evacuations_grouped, plan_grouped,
    };
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
    let mut next_tick = tokio::time::Instant::now() + tick;
    // Move requests made since the tick began: refills between ticks use
    // what the tick's budget has left, so `migrations-per-second` holds.
    let mut spent = 0u32;
    // Whether the last plan stopped at the bound on moves in flight with
    // sessions still to evacuate: then each end of a move lets the loop
    // plan evacuations again before the next tick. A drain then runs at
    // its budget (5,000 moves a second by default) instead of at most
    // MAX_MOVES_IN_FLIGHT per tick.
    let mut refill = false;
    loop {
        let router = &st.shared.router;
        let full_tick = tokio::select! {
            biased;
            _ = st.stopped.notified() => return,
            _ = tokio::time::sleep_until(next_tick) => true,
            _ = router.moves_ended(), if refill => false,
        };
        if full_tick {
            next_tick = tokio::time::Instant::now() + tick;
            spent = 0;
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
            router.update_failover();
            close_after_failover_timeout(&st);
        } else {
            // Let more moves end, so one plan starts a batch of them.
            tokio::time::sleep(REFILL_PAUSE).await;
        }
        refill = false;
        let backends = router.backends();
        if full_tick {
            ticks += 1;
            if ticks >= tiproxy_core::balance::TICKS_PER_SECOND {
                ticks = 0;
                let now = tokio::time::Instant::now();
                let loads: Vec<BackendLoad> =
                    backends.iter().map(|b| router.load_of(b, now)).collect();
                record_scores(&backends, &loads, cfg.policy);
            }
        }
        if backends.len() < 2 && !backends.iter().any(|b| b.should_evacuate()) {
            continue;
        }
        let now = tokio::time::Instant::now();
        // Movable sessions per backend, by the ledger.
        let sessions = st.sessions();
        let mut on: Vec<Vec<(u32, Arc<Mailbox>)>> = vec![Vec::new(); backends.len()];
        let (room, exports) = router.with_moves(|l| {
            l.expire(now.into_std());
            for (id, m) in sessions {
                if !l.can_move(id, now.into_std()) {
                    continue;
                }
                // Read under the ledger's lock: a session whose move just
                // ended shows its new backend by now (its driver sets it
                // before it tells the ledger). Read before, it could still
                // show the old one, and be sent where it already was.
                let Some(b) = m.backend() else {
                    continue;
                };
                if let Some(i) = backends.iter().position(|x| Arc::ptr_eq(x, &b)) {
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
        let to_evacuate: u32 = snapshot
            .iter()
            .filter(|b| b.evacuate)
            .map(|b| b.movable)
            .sum();
        // Moves in flight hold a third socket each and compete with the
        // sessions' own traffic: keep their number bounded.
        let budget = cfg.budget.saturating_sub(spent).min(room);
        if budget == 0 {
            refill = room == 0 && to_evacuate > 0 && spent < cfg.budget;
            continue;
        }
        let tick_cfg = BalanceConfig { budget, ..cfg };
        // Moves stay inside each TiDB's group (`balance.routing-rule`).
        let groups = router.group_ids(&backends);
        let plan = if full_tick {
            plan_grouped(&snapshot, &groups, &tick_cfg)
        } else {
            plan_evacuations_grouped(&snapshot, &groups, &tick_cfg)
        };
        let mut evacuated = 0;
        for m in plan {
            let n = (m.count as usize).min(on[m.from].len());
            for (id, mb) in on[m.from].drain(..n) {
                mb.request_move(router, id, &backends[m.to], m.factor.name());
            }
            spent += n as u32;
            if m.factor == Factor::Evacuate {
                evacuated += n as u32;
            }
        }
        refill = to_evacuate > evacuated && spent < cfg.budget;
    }
}

/// How long the balance loop waits, after a move under way ended, before
/// it plans more evacuations: moves end in bursts, and one plan (a pass
/// over every session) then starts a batch.
const REFILL_PAUSE: Duration = Duration::from_millis(10);

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
