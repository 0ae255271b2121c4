//! Starting and stopping the proxy: listeners (bound, or inherited from
//! the process taken over, [`crate::takeover`]), the accept loop with
//! `max-connections` (and refusals when out of descriptors), the HTTP API,
//! graceful shutdown. Backend health checks live in [`crate::health`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tiproxy_core::error::ProxyError;
use tiproxy_core::health::LocalExhaustion;
use tiproxy_core::packet::write_packet;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::conn::{self, Control, Mailbox, Shared};
use crate::metrics::metrics;
use crate::net::{Network, TokioNet};
use crate::router::Router;
use crate::state::State;
use crate::tls;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS file or setting is unusable.
    #[error("security.{0}")]
    Tls(#[from] tls::TlsError),
    /// A listener could not be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Listen {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The SQL listen addresses are not usable (a config built without
    /// `Config::from_toml`'s checks).
    #[error("{0}: {1}")]
    SqlAddrs(&'static str, String),
    /// `[ha] interface` is unusable.
    #[error("ha.interface: {0}")]
    Ha(crate::ha::LinkError),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy<N: Network = TokioNet> {
    state: Arc<State<N>>,
    sql_addrs: Vec<SocketAddr>,
    api_addr: SocketAddr,
    tasks: JoinSet<()>,
    /// Ends the virtual IP election first on shutdown (`[ha]`).
    ha: Option<crate::ha::Resign>,
    /// Copies of the listeners for a takeover (`None` in the simulation).
    listening: Option<Arc<crate::takeover::Listening>>,
    /// Started with `--takeover`: where the old process sends sessions.
    adopting: Option<tokio::net::UnixStream>,
}

/// Listeners inherited from the process taken over.
struct Inherit<L> {
    sql: Vec<L>,
    api: L,
    next_id: u32,
}

/// Starts the proxy on the real network. Listeners are bound when this
/// returns.
pub async fn start(config: Config) -> Result<Proxy, StartError> {
    start_on(TokioNet::default(), config).await
}

/// Starts the proxy on `net`.
pub async fn start_on<N: Network>(net: N, config: Config) -> Result<Proxy<N>, StartError> {
    start_inner(net, config, None).await
}

/// Starts the proxy on the listeners taken over from a running one
/// ([`crate::takeover::connect`]); [`Proxy::serve_takeover`] then
/// receives its sessions.
pub async fn start_takeover(
    net: TokioNet,
    config: Config,
    inherited: crate::takeover::Inherited,
) -> Result<Proxy, StartError> {
    let listen = |key: &'static str, l: std::net::TcpListener| {
        tokio::net::TcpListener::from_std(l).map_err(|source| StartError::Listen {
            key,
            addr: String::from("(inherited)"),
            source,
        })
    };
    let crate::takeover::Inherited {
        sql,
        api,
        next_id,
        conn,
        ..
    } = inherited;
    let sql = sql
        .into_iter()
        .map(|l| listen("proxy.addr", l))
        .collect::<Result<Vec<_>, _>>()?;
    let api = listen("api.addr", api)?;
    let mut proxy = start_inner(net, config, Some(Inherit { sql, api, next_id })).await?;
    proxy.adopting = Some(conn);
    Ok(proxy)
}

async fn start_inner<N: Network>(
    net: N,
    config: Config,
    inherit: Option<Inherit<N::Listener>>,
) -> Result<Proxy<N>, StartError> {
    let workdir = config.workdir();
    let server_tls = tls::server_config(&config.security.server_tls, "server-tls", &workdir)?;
    let api_tls = tls::server_config(
        &config.security.server_http_tls,
        "server-http-tls",
        &workdir,
    )?;
    if config.security.require_backend_tls && !config.security.sql_tls.client_enabled() {
        warn!(
            "security.require-backend-tls is set without security.sql-tls: backends are not verified (skip-ca)"
        );
    }
    let backend_tls = tls::backend_config(&config)?;
    let cluster_tls = Arc::new(tls::Live::new(tls::cluster_config(
        &config.security.cluster_tls,
    )?));
    let clusters = config.proxy.clusters();
    let statics = &config.proxy.backend_addrs;
    if !clusters.is_empty() && !statics.is_empty() {
        info!("serving proxy.backend-addrs until PD answers; then PD's TiDB list replaces it");
    }
    let router = Arc::new(Router::with_rule(statics, config.balance.rule()));
    router.set_balance(crate::router::RoutingSettings::from_config(&config));
    if let Some(seed) = net.rng_seed() {
        router.seed_rng(seed);
    }
    let discovery_status: crate::discovery::StatusCell =
        Arc::new(Mutex::new(crate::discovery::DiscoveryStatus {
            pd: !clusters.is_empty(),
            ..Default::default()
        }));
    let shared = Arc::new(Shared {
        net: net.clone(),
        router: router.clone(),
        server_tls: tls::Live::new(server_tls.map(tokio_rustls::TlsAcceptor::from)),
        backend_tls: tls::Live::new(backend_tls.map(tokio_rustls::TlsConnector::from)),
        require_backend_tls: config.security.require_backend_tls,
        proxy_protocol: AtomicBool::new(config.proxy.proxy_protocol == "v2"),
        keepalive: crate::keepalive::Profiles::new(crate::keepalive::ProfileSet::from_config(
            &config.proxy,
        )),
        buffer_limit: config.proxy.buffer_limit(),
        protect: config.proxy.protect(),
        dial_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(15),
    });
    let (listeners, api_listener, next_id) = match inherit {
        Some(i) => (i.sql, i.api, i.next_id),
        None => {
            let key = if config.proxy.port_range.is_empty() {
                "proxy.addr"
            } else {
                "proxy.port-range"
            };
            let sql_addrs = config
                .proxy
                .sql_addrs()
                .map_err(|(key, m)| StartError::SqlAddrs(key, m))?;
            let mut listeners = Vec::new();
            for addr in sql_addrs {
                let l = net.bind(&addr).await.map_err(|source| StartError::Listen {
                    key,
                    addr: addr.clone(),
                    source,
                })?;
                listeners.push(l);
            }
            let api = net
                .bind(&config.api.addr)
                .await
                .map_err(|source| StartError::Listen {
                    key: "api.addr",
                    addr: config.api.addr.clone(),
                    source,
                })?;
            (listeners, api, 1)
        }
    };
    let listening = crate::takeover::Listening::capture(&listeners, &api_listener).map(Arc::new);
    let sql_addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| net.listener_addr(l).ok())
        .collect();
    let api_addr = net
        .listener_addr(&api_listener)
        .map_err(|source| StartError::Listen {
            key: "api.addr",
            addr: config.api.addr.clone(),
            source,
        })?;
    let state = Arc::new(State {
        shared,
        conns: Mutex::new(BTreeMap::new()),
        count: AtomicU64::new(0),
        next_id: AtomicU32::new(next_id.max(1)),
        draining: AtomicBool::new(false),
        stop_accepting: Notify::new(),
        stopped: Notify::new(),
        max_connections: AtomicU64::new(config.proxy.max_connections),
        memory: crate::memory::MemoryGuard::new(config.proxy.high_memory_usage_reject_threshold),
        manual_unhealthy: Mutex::new(None),
        live_config: std::sync::RwLock::new(config.clone()),
        config_gen: AtomicU64::new(0),
        apply_lock: Mutex::new(()),
        discovery: discovery_status.clone(),
        ha: Default::default(),
        config,
        api_tls: tls::Live::new(api_tls.map(tokio_rustls::TlsAcceptor::from)),
        api_refusals: tls::RefusalLog::default(),
        cluster_tls: cluster_tls.clone(),
        clusters: crate::discovery::Clusters::new(router.clone()),
        cluster_context: OnceLock::new(),
    });
    let mut tasks = JoinSet::new();
    let accepting = listeners
        .into_iter()
        .map(|l| crate::task::spawn_in(&mut tasks, accept_loop(state.clone(), l)))
        .collect();
    let api_task =
        crate::task::spawn_in(&mut tasks, crate::api::serve(state.clone(), api_listener));
    if let Some(l) = &listening {
        l.set_tasks(accepting, api_task);
    }
    crate::task::spawn_in(&mut tasks, memory_loop(state.clone()));
    crate::task::spawn_in(&mut tasks, crate::health::probe_loop(state.clone()));
    crate::task::spawn_in(&mut tasks, crate::balance::metrics_loop(state.clone()));
    crate::task::spawn_in(&mut tasks, crate::balance::balance_loop(state.clone()));
    if net.has_keepalive() {
        crate::task::spawn_in(&mut tasks, crate::keepalive::keepalive_loop(state.clone()));
    }
    let sec = &state.config.security;
    if sec.server_tls.auto_certs || sec.server_http_tls.auto_certs {
        crate::task::spawn_in(&mut tasks, tls::renew_loop(state.clone()));
    }
    let advertise = advertise_addr(&state.config.proxy.advertise_addr, sql_addrs[0]);
    // TiProxy's virtual IP is elected in the one cluster's PD: with several
    // clusters (or none) it is off.
    let pd = match clusters.as_slice() {
        [one] => one.normal().1,
        _ => Vec::new(),
    };
    if clusters.len() > 1 && state.config.ha.virtual_ip().is_ok_and(|v| v.is_some()) {
        warn!(
            "[ha] virtual-ip needs exactly one backend cluster to elect an owner in; the virtual IP is off"
        );
    }
    let ha = match clusters.len() {
        0 | 1 => start_ha(&net, &state, &pd, &cluster_tls, &advertise, &mut tasks).await?,
        _ => None,
    };
    let ctx = crate::discovery::Context {
        tls: cluster_tls,
        status: discovery_status,
        advertise,
        api_port: api_addr.port(),
    };
    state
        .clusters
        .sync(&net.pd(), &clusters, &state.config, &ctx);
    let _ = state.cluster_context.set(ctx);
    metrics().server_event.with_label_values(&["start"]).inc();
    info!(sql = ?sql_addrs, api = %api_addr, backends = ?router.backends().iter().map(|b| b.addr.clone()).collect::<Vec<_>>(), "tiproxy started");
    Ok(Proxy {
        state,
        sql_addrs,
        api_addr,
        tasks,
        ha,
        listening,
        adopting: None,
    })
}

/// Starts the virtual IP election when `[ha]` is set: it needs PD and the
/// interface (a missing one stops start-up, as a bad listener does).
async fn start_ha<N: Network>(
    net: &N,
    state: &Arc<State<N>>,
    pd: &[String],
    cluster_tls: &crate::discovery::ClusterTls,
    advertise: &str,
    tasks: &mut JoinSet<()>,
) -> Result<Option<crate::ha::Resign>, StartError> {
    let Ok(Some(vip)) = state.config.ha.virtual_ip() else {
        return Ok(None);
    };
    if pd.is_empty() {
        warn!("[ha] virtual-ip needs PD to elect an owner (proxy.pd-addrs); the virtual IP is off");
        return Ok(None);
    }
    let link = crate::ha::Link::open(&vip).await.map_err(StartError::Ha)?;
    let (resign, stop, done) = crate::ha::resign_pair();
    let election = crate::ha::Election {
        id: advertise.to_string(),
        vip,
        address: link,
        status: state.ha.clone(),
    };
    crate::task::spawn_in(
        tasks,
        crate::ha::run(
            net.pd(),
            pd.to_vec(),
            cluster_tls.clone(),
            election,
            stop,
            done,
        ),
    );
    Ok(Some(resign))
}

/// The `host:port` registered in PD. TiProxy's `advertise-addr` is a host
/// (a DNS name in Kubernetes, as certificates name it) and the port is the
/// SQL listener's; a `host:port` is taken whole. Unset: the listener's
/// address.
fn advertise_addr(configured: &str, sql: SocketAddr) -> String {
    let configured = configured.trim();
    if configured.is_empty() {
        return sql.to_string();
    }
    let has_port = configured.parse::<SocketAddr>().is_ok()
        || configured
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !h.contains(':') && p.parse::<u16>().is_ok());
    if has_port {
        configured.to_string()
    } else if configured.contains(':') {
        // A bare IPv6 address.
        format!("[{}]:{}", configured.trim_matches(['[', ']']), sql.port())
    } else {
        format!("{configured}:{}", sql.port())
    }
}

impl<N: Network> Proxy<N> {
    /// The first SQL listener's address.
    pub fn sql_addr(&self) -> SocketAddr {
        self.sql_addrs[0]
    }

    /// The API listener's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Shared state (connections, health, router).
    pub fn state(&self) -> &Arc<State<N>> {
        &self.state
    }

    /// Graceful shutdown: report unhealthy, wait
    /// `graceful-wait-before-shutdown`, stop accepting, close each session at
    /// its next safe point within `graceful-close-conn-timeout`, then close
    /// the rest.
    pub async fn shutdown(self) {
        self.stop(true).await
    }

    /// After a takeover: the new process serves the listeners, so no
    /// unhealthy period. The sessions that could not move (TLS, or busy
    /// through the handover) are served on until they end, for up to
    /// `graceful-close-conn-timeout`; then the rest close at their next
    /// safe point, as in a graceful shutdown.
    pub async fn shutdown_after_takeover(self) {
        let st = self.state.clone();
        let timeout = Duration::from_secs(st.live_config().proxy.graceful_close_conn_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        while st.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop(false).await
    }

    async fn stop(mut self, report_unhealthy: bool) {
        if let Some(ha) = self.ha.take() {
            // Before anything closes: the address moves while this proxy
            // still accepts, so no client is refused.
            ha.resign().await;
        }
        let st = self.state.clone();
        st.draining.store(true, Ordering::Relaxed);
        let live = st.live_config();
        let wait = Duration::from_secs(live.proxy.graceful_wait_before_shutdown);
        if report_unhealthy && !wait.is_zero() {
            info!(
                "shutting down: reporting unhealthy for {wait:?} (graceful-wait-before-shutdown)"
            );
            tokio::time::sleep(wait).await;
        }
        st.stop_accepting.notify_waiters();
        if report_unhealthy && let Some(l) = &self.listening {
            l.stop_listening();
        }
        let open = st.connections();
        if open > 0 {
            info!(
                connections = open,
                "closing sessions at their next transaction boundary"
            );
        }
        st.broadcast(Control::CloseAtSafePoint);
        let timeout = Duration::from_secs(live.proxy.graceful_close_conn_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        while st.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if st.connections() > 0 {
            warn!(
                connections = st.connections(),
                "closing sessions still busy after graceful-close-conn-timeout"
            );
            st.broadcast(Control::Close("graceful-close-conn-timeout elapsed"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while st.connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        st.stopped.notify_waiters();
        self.tasks.abort_all();
        st.clusters.stop();
        while self.tasks.join_next().await.is_some() {}
        metrics().server_event.with_label_values(&["close"]).inc();
        info!("tiproxy stopped");
    }
}

impl Proxy<TokioNet> {
    /// Receives the sessions of the process taken over (when started by
    /// [`start_takeover`]), then serves the takeover socket; resolves once
    /// another process took this one over (shut down then with
    /// [`Proxy::shutdown_after_takeover`]).
    pub fn serve_takeover(&mut self) -> tokio::task::JoinHandle<()> {
        let st = self.state.clone();
        let adopting = self.adopting.take();
        match self.listening.clone() {
            Some(l) => crate::task::spawn(crate::takeover::run(st, l, adopting)),
            None => crate::task::spawn(std::future::pending()),
        }
    }
}

/// Enters a connection in the table (and the counts) under `id`.
pub(crate) fn register<N: Network>(st: &State<N>, id: u32) -> Arc<Mailbox> {
    let tx = Arc::new(Mailbox::default());
    st.conns.lock().expect("conn table").insert(id, tx.clone());
    st.count.fetch_add(1, Ordering::Relaxed);
    // What a session's buffers may take, counted against the memory
    // threshold until the next sample sees it (TiProxy: both buffers).
    st.memory.session_delta(2 * st.shared.buffer_limit as i64);
    metrics().connections.inc();
    tx
}

/// Removes a connection [`register`] entered.
pub(crate) fn unregister<N: Network>(st: &State<N>, id: u32) {
    st.conns.lock().expect("conn table").remove(&id);
    st.count.fetch_sub(1, Ordering::Relaxed);
    st.memory.session_delta(-2 * st.shared.buffer_limit as i64);
    metrics().connections.dec();
}

/// Samples the memory in use for `high-memory-usage-reject-threshold`.
async fn memory_loop<N: Network>(st: Arc<State<N>>) {
    let net = st.shared.net.clone();
    loop {
        match net.host_memory() {
            Some(usage) => st.memory.record(usage, std::time::Instant::now()),
            None => return,
        }
        tokio::time::sleep(crate::memory::REFRESH).await;
    }
}

pub(crate) async fn accept_loop<N: Network>(st: Arc<State<N>>, listener: N::Listener) {
    let net = st.shared.net.clone();
    // Read while descriptors are free: the refusal message names the limit.
    let _ = crate::net::fd_limit();
    let mut spare = crate::net::SpareFd::new();
    let fd_budget = net.session_fd_budget();
    if let Some(budget) = fd_budget {
        let max = st.max_connections.load(Ordering::Relaxed) as usize;
        let limit = crate::net::fd_limit().unwrap_or_default();
        if max > budget {
            warn!(
                "proxy.max-connections is {max} but RLIMIT_NOFILE {limit} leaves descriptors for \
                 {budget} sessions; more clients get 1040 (raise ulimit -n / LimitNOFILE)"
            );
        } else {
            debug!("RLIMIT_NOFILE {limit} leaves descriptors for {budget} sessions");
        }
    }
    loop {
        // Biased: a fixed polling order keeps simulated runs replayable.
        let accepted = tokio::select! {
            biased;
            _ = st.stop_accepting.notified() => return,
            r = net.accept(&listener) => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                match crate::net::local_exhaustion(&e) {
                    Some(what) => refuse_exhausted(&st, &listener, &mut spare, what).await,
                    None => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                continue;
            }
        };
        // The reserve was taken by another task while released: get it
        // back before admitting anyone, or refuse this client (its
        // descriptor becomes the reserve once closed).
        if let Err(e) = spare.restore() {
            let what = crate::net::local_exhaustion(&e).unwrap_or(LocalExhaustion::ProcessFds {
                limit: crate::net::fd_limit(),
            });
            st.shared.router.refused_locally(what);
            refuse(stream, ProxyError::LocalExhaustion(what)).await;
            continue;
        }
        if st.draining.load(Ordering::Relaxed) {
            crate::task::spawn(refuse(stream, ProxyError::ShuttingDown));
            continue;
        }
        let max = st.max_connections.load(Ordering::Relaxed);
        if max > 0 && st.count.load(Ordering::Relaxed) >= max {
            metrics().reject_max_connections.inc();
            debug!(%peer, "refusing connection: max-connections reached");
            crate::task::spawn(refuse(stream, ProxyError::TooManyConnections(max)));
            continue;
        }
        if let Some(what) = st.memory.refusal(std::time::Instant::now()) {
            metrics().reject_memory.inc();
            st.shared.router.refused_locally(what);
            crate::task::spawn(refuse(stream, ProxyError::LocalExhaustion(what)));
            continue;
        }
        if fd_budget.is_some_and(|b| st.count.load(Ordering::Relaxed) as usize >= b) {
            let what = LocalExhaustion::ProcessFds {
                limit: crate::net::fd_limit(),
            };
            st.shared.router.refused_locally(what);
            crate::task::spawn(refuse(stream, ProxyError::LocalExhaustion(what)));
            continue;
        }
        let id = loop {
            let id = st.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        let rx = register(&st, id);
        metrics().create_connection.inc();
        let st2 = st.clone();
        // A combinator, not an `async` block, which would keep its
        // captured arguments beside the driver's future for the
        // connection's life.
        net.spawn_connection(stream, move |stream| {
            futures_util::FutureExt::map(
                conn::serve(st2.shared.clone(), stream, peer, id, rx),
                move |()| unregister(&st2, id),
            )
        });
    }
}

/// `accept` failed for lack of descriptors or memory: the connection is
/// still in the backlog. With the reserve descriptor closed, accept it,
/// tell the client why (1040) and close it, then take the reserve back;
/// without a reserve, wait a little rather than spin on a readable
/// listener. Logged at most once a second, with a count.
async fn refuse_exhausted<N: Network>(
    st: &State<N>,
    listener: &N::Listener,
    spare: &mut crate::net::SpareFd,
    what: LocalExhaustion,
) {
    if spare.release() {
        let net = &st.shared.net;
        if let Ok(Ok((s, _))) =
            tokio::time::timeout(Duration::from_millis(10), net.accept(listener)).await
        {
            st.shared.router.refused_locally(what);
            refuse(s, ProxyError::LocalExhaustion(what)).await;
        }
        let _ = spare.restore();
    } else if spare.restore().is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a MySQL error as the first packet and closes.
async fn refuse<S: crate::net::Stream>(mut s: S, err: ProxyError) {
    let mut payload = BytesMut::new();
    err.write_pre_handshake(&mut payload);
    let mut pkt = BytesMut::new();
    write_packet(&mut pkt, 0, &payload);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.write_all(&pkt).await;
        let _ = s.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::advertise_addr;

    #[test]
    fn advertise_addr_is_a_host_with_the_sql_port_as_in_tiproxy() {
        let sql = "0.0.0.0:6000".parse().unwrap();
        assert_eq!(advertise_addr("", sql), "0.0.0.0:6000");
        assert_eq!(
            advertise_addr("tiproxy-0.tiproxy-peer", sql),
            "tiproxy-0.tiproxy-peer:6000"
        );
        assert_eq!(advertise_addr("10.0.0.7", sql), "10.0.0.7:6000");
        assert_eq!(advertise_addr("fd00::7", sql), "[fd00::7]:6000");
        assert_eq!(advertise_addr("10.0.0.7:7000", sql), "10.0.0.7:7000");
        assert_eq!(advertise_addr("[fd00::7]:7000", sql), "[fd00::7]:7000");
    }
}
