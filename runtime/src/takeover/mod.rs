//! The proxy's own restart or upgrade without dropping a connection:
//! `tiproxy --config FILE --takeover` starts a process that takes over
//! from the one serving the same `workdir`.
//!
//! Every running proxy serves the Unix socket `<workdir>/takeover.sock`.
//! The new process connects and both send a versioned [`wire::Hello`]
//! (format version, binary version, listener addresses, what the config
//! implies for backends); either side refuses an unknown format or an
//! incompatible configuration, saying why, and the old process keeps
//! serving.
//!
//! 1. Listeners. The old process stops accepting (waiting until its accept
//!    tasks have ended, so that every connection it accepted is in its
//!    table and is handed over like the others) and passes its listening
//!    sockets (SQL and API) by descriptor over SCM_RIGHTS. Not
//!    SO_REUSEPORT: with one accept queue, a client queued in the backlog
//!    during the switch is accepted by the new process instead of being
//!    reset when the old one closes its socket. Once the new process says
//!    it serves them, the old one stops its API too.
//! 2. Sessions. Each connection is asked to hand over at its next
//!    exportable point (idle, at a safe point: an open transaction hands
//!    over when it ends). It sends its exported state and duplicates of
//!    its client and backend sockets, then waits, reading neither socket.
//!    The new process imports the state, acknowledges, and runs the
//!    session on the same sockets: no re-authentication, nothing sent to
//!    the backend, the connection ids unchanged. An `Ack` makes the old
//!    process close its copies without `shutdown()`; a `Nack`, EOF (the
//!    new process died) or silence resumes the session in the old one
//!    ([`ledger`] has the rules and their property test). With crash
//!    protection on, the session's state copy rides along (an optional
//!    field: peers without it still hand sessions over).
//! 3. Sessions that cannot move (TLS on either leg: the record layer's
//!    state lives in this process and there is no kernel TLS) stay with
//!    the old process, which drains them as a graceful shutdown does
//!    (closed at a transaction boundary, bounded by
//!    `graceful-close-conn-timeout`) and exits once it holds nothing.
//!
//! If the new process dies before the old one finished, the old one keeps
//! every session it still runs, accepts again on its copies of the
//! listeners and serves the takeover socket again. Either way the old
//! process ends an attempt with one line saying how many sessions it
//! kept, how many were in flight (resumed) and how many it handed over,
//! and counts the attempt in `tiproxy_takeovers_total{result}`.

pub mod ledger;
pub mod wire;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use self::ledger::{OldLedger, Verdict};
use self::wire::{Hello, Msg, SessionMsg};
use crate::config::{Config, split_list};
use crate::conn::{Control, Handover, Mailbox};
use crate::metrics::metrics;
use crate::net::TokioNet;
use crate::state::State;

/// How long the other side may stay silent at a step that needs its answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The takeover socket of a configuration.
pub fn socket_path(config: &Config) -> PathBuf {
    config.workdir().join("takeover.sock")
}

/// The version this binary reports in the hello: the build's, or
/// `TIPROXY_VERSION_OVERRIDE` (tests stand in another build with it).
pub fn version() -> String {
    std::env::var("TIPROXY_VERSION_OVERRIDE").unwrap_or_else(|_| crate::VERSION.to_string())
}

/// The handover format this process announces: [`wire::FORMAT`], or
/// `TIPROXY_TAKEOVER_FORMAT` (tests stand in a build with another format).
fn format() -> u32 {
    std::env::var("TIPROXY_TAKEOVER_FORMAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(wire::FORMAT)
}

/// This process's hello.
pub fn hello(config: &Config) -> Hello {
    let pd = !config.proxy.clusters().is_empty();
    let tls = config.security.require_backend_tls || config.security.sql_tls.client_enabled();
    Hello {
        format: format(),
        version: version(),
        sql: split_list(&config.proxy.addr),
        api: config.api.addr.clone(),
        backends: format!(
            "{} discovery, {} backends",
            if pd { "PD" } else { "static" },
            if tls { "TLS" } else { "plain" }
        ),
    }
}

/// Why two hellos cannot make a takeover; `None`: they can.
pub fn incompatible(ours: &Hello, theirs: &Hello) -> Option<String> {
    if theirs.format != ours.format {
        return Some(format!(
            "the other process speaks takeover format {} (version {}), this one {} (version {})",
            theirs.format, theirs.version, ours.format, ours.version
        ));
    }
    if theirs.sql != ours.sql {
        return Some(format!(
            "proxy.addr differs: {:?} there, {:?} here",
            theirs.sql, ours.sql
        ));
    }
    if theirs.api != ours.api {
        return Some(format!(
            "api.addr differs: {:?} there, {:?} here",
            theirs.api, ours.api
        ));
    }
    if theirs.backends != ours.backends {
        return Some(format!(
            "the backends differ: {} there, {} here",
            theirs.backends, ours.backends
        ));
    }
    None
}

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// No proxy answers on the socket.
    #[error("no running proxy answers on {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// One side refused.
    #[error("takeover refused: {0}")]
    Refused(String),
    /// The socket broke or a message was unexpected.
    #[error("takeover failed: {0}")]
    Protocol(String),
    /// The new process was lost while sessions were moving: what each
    /// process holds now.
    #[error(
        "takeover failed while handing over sessions: {why}; {kept} sessions kept here \
         ({in_flight} of them were in flight and resumed), {handed_over} handed over \
         (they belong to the new process and ended with it if it died)"
    )]
    Abandoned {
        /// What went wrong.
        why: String,
        /// Sessions this process still runs.
        kept: usize,
        /// Sessions waiting for an answer when the socket was lost.
        in_flight: usize,
        /// Sessions the new process acknowledged.
        handed_over: usize,
    },
}

fn proto(e: impl std::fmt::Display) -> TakeoverError {
    TakeoverError::Protocol(e.to_string())
}

/// What the new process received: the listeners and the socket on which
/// sessions follow.
#[derive(Debug)]
pub struct Inherited {
    /// SQL listeners, in `proxy.addr` order.
    pub sql: Vec<std::net::TcpListener>,
    /// The API listener.
    pub api: std::net::TcpListener,
    /// The first connection id to give out.
    pub next_id: u32,
    /// The old process's version.
    pub old_version: String,
    pub(crate) conn: UnixStream,
}

async fn recv_within(s: &UnixStream) -> Result<(Msg, Vec<OwnedFd>), TakeoverError> {
    match tokio::time::timeout(STEP_TIMEOUT, wire::recv(s)).await {
        Err(_) => Err(proto("the other process did not answer in time")),
        Ok(Err(e)) => Err(proto(e)),
        Ok(Ok(None)) => Err(proto("the other process closed the takeover socket")),
        Ok(Ok(Some(x))) => Ok(x),
    }
}

/// New process: asks the proxy serving `config`'s workdir for its
/// listeners.
pub async fn connect(config: &Config) -> Result<Inherited, TakeoverError> {
    let path = socket_path(config);
    let s = UnixStream::connect(&path)
        .await
        .map_err(|source| TakeoverError::Connect {
            path: path.clone(),
            source,
        })?;
    let ours = hello(config);
    wire::send(&s, &Msg::Hello(ours.clone()), &[])
        .await
        .map_err(proto)?;
    let theirs = match recv_within(&s).await? {
        (Msg::Hello(h), _) => h,
        (Msg::Refused { reason }, _) => return Err(TakeoverError::Refused(reason)),
        (m, _) => return Err(proto(format!("unexpected {m:?}"))),
    };
    refuse_if_incompatible(&s, &ours, &theirs).await?;
    let (names, next_id, fds) = match recv_within(&s).await? {
        (Msg::Listeners { names, next_id }, fds) => (names, next_id, fds),
        (Msg::Refused { reason }, _) => return Err(TakeoverError::Refused(reason)),
        (m, _) => return Err(proto(format!("unexpected {m:?}"))),
    };
    if names.len() != fds.len() || names.len() != ours.sql.len() + 1 {
        return Err(proto(format!(
            "{} listeners named, {} descriptors received",
            names.len(),
            fds.len()
        )));
    }
    let mut sql = Vec::new();
    let mut api = None;
    for (name, fd) in names.iter().zip(fds) {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).map_err(proto)?;
        if name.starts_with("api ") {
            api = Some(l);
        } else {
            sql.push(l);
        }
    }
    let api = api.ok_or_else(|| proto("no API listener received"))?;
    info!(old = %theirs.version, new = %ours.version, "took over the listeners");
    Ok(Inherited {
        sql,
        api,
        next_id,
        old_version: theirs.version,
        conn: s,
    })
}

/// The listening sockets a process holds copies of, and the tasks
/// accepting on them: what it hands over, and resumes after a failed
/// takeover.
#[derive(Debug)]
pub struct Listening {
    sql: Vec<(String, OwnedFd)>,
    api: (String, OwnedFd),
    accepting: Mutex<Vec<AbortHandle>>,
    api_task: Mutex<Option<AbortHandle>>,
}

impl Listening {
    /// Copies of the listeners (`None` when they are not TCP sockets,
    /// e.g. in the simulation).
    pub fn capture<L: 'static>(sql: &[L], api: &L) -> Option<Listening> {
        let dup = |l: &L| -> Option<(String, OwnedFd)> {
            let t = (l as &dyn std::any::Any).downcast_ref::<tokio::net::TcpListener>()?;
            let addr = t.local_addr().ok()?;
            Some((addr.to_string(), t.as_fd().try_clone_to_owned().ok()?))
        };
        let sql = sql
            .iter()
            .map(|l| dup(l).map(|(a, f)| (format!("sql {a}"), f)))
            .collect::<Option<Vec<_>>>()?;
        let (a, f) = dup(api)?;
        Some(Listening {
            sql,
            api: (format!("api {a}"), f),
            accepting: Mutex::new(Vec::new()),
            api_task: Mutex::new(None),
        })
    }

    /// The tasks accepting on the SQL listeners and serving the API.
    pub fn set_tasks(&self, accepting: Vec<AbortHandle>, api: AbortHandle) {
        *self.accepting.lock().expect("listening") = accepting;
        *self.api_task.lock().expect("listening") = Some(api);
    }

    /// A graceful shutdown (not one after a takeover, where the new process
    /// accepts on these very sockets): the SQL listening sockets stop
    /// listening. The accept loops have returned, but these copies would
    /// keep the sockets open, and a new client would wait in the backlog
    /// until the process exits instead of being refused at once.
    pub fn stop_listening(&self) {
        for (name, fd) in &self.sql {
            if let Err(e) = rustix::net::shutdown(fd, rustix::net::Shutdown::Both) {
                debug!("{name}: shutting the listening socket down: {e}");
            }
        }
    }

    /// Stops accepting and waits until the accept tasks have ended: a
    /// task busy between `accept()` and registering its connection runs
    /// on until its next await, so only then are the connection table and
    /// the next id final (a connection registered later would be missed
    /// by the takeover and closed by the drain, or its id given twice).
    async fn stop_sql(&self) {
        let tasks: Vec<AbortHandle> = self
            .accepting
            .lock()
            .expect("listening")
            .drain(..)
            .collect();
        for h in &tasks {
            h.abort();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !tasks.iter().all(AbortHandle::is_finished) {
            if tokio::time::Instant::now() > deadline {
                warn!("an accept task did not stop within 1s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn stop_api(&self) {
        if let Some(h) = self.api_task.lock().expect("listening").take() {
            h.abort();
        }
    }

    /// Accepts again on this process's copies (after a failed takeover).
    fn resume(&self, st: &Arc<State<TokioNet>>) {
        let mut accepting = self.accepting.lock().expect("listening");
        if accepting.is_empty() {
            for (name, fd) in &self.sql {
                match fd
                    .try_clone()
                    .and_then(|f| tokio::net::TcpListener::from_std(f.into()))
                {
                    Ok(l) => accepting.push(
                        crate::task::spawn(crate::proxy::accept_loop(st.clone(), l)).abort_handle(),
                    ),
                    Err(e) => warn!("cannot accept again on {name}: {e}"),
                }
            }
        }
        let mut api = self.api_task.lock().expect("listening");
        if api.is_none() {
            match self
                .api
                .1
                .try_clone()
                .and_then(|f| tokio::net::TcpListener::from_std(f.into()))
            {
                Ok(l) => {
                    *api = Some(crate::task::spawn(crate::api::serve(st.clone(), l)).abort_handle())
                }
                Err(e) => warn!("cannot serve the API again on {}: {e}", self.api.0),
            }
        }
    }
}

/// Binds the takeover socket, unless another live proxy serves it (after
/// a takeover, the old process, whose socket this one replaces).
async fn bind(config: &Config, replace: bool) -> Option<UnixListener> {
    let path = socket_path(config);
    if !replace && UnixStream::connect(&path).await.is_ok() {
        warn!(
            path = %path.display(),
            "another running proxy serves this workdir's takeover socket; this one cannot be taken over (give it its own workdir)"
        );
        return None;
    }
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match UnixListener::bind(&path) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(path = %path.display(), "cannot serve the takeover socket: {e}");
            None
        }
    }
}

/// Runs a process's part: first, with `inherited`, receives the sessions
/// of the process it took over from; then serves the takeover socket until
/// another process took this one over (returns then: shut down, keeping
/// Both sides' check of the other's hello: an incompatible one is told why
/// (best effort) and the takeover ends with that reason.
async fn refuse_if_incompatible(
    s: &UnixStream,
    ours: &Hello,
    theirs: &Hello,
) -> Result<(), TakeoverError> {
    let Some(why) = incompatible(ours, theirs) else {
        return Ok(());
    };
    let _ = wire::send(
        s,
        &Msg::Refused {
            reason: why.clone(),
        },
        &[],
    )
    .await;
    Err(TakeoverError::Refused(why))
}

/// only what could not move).
pub async fn run(
    st: Arc<State<TokioNet>>,
    listening: Arc<Listening>,
    inherited: Option<UnixStream>,
) {
    let replace = inherited.is_some();
    if let Some(conn) = inherited {
        adopt(&st, conn).await;
    }
    let Some(server) = bind(&st.config, replace).await else {
        return std::future::pending().await;
    };
    loop {
        let Ok((s, _)) = server.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let result = hand_over(&st, &listening, s).await;
        let label = match &result {
            Ok(()) => "done",
            Err(TakeoverError::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        metrics().takeovers.with_label_values(&[label]).inc();
        match result {
            Ok(()) => return,
            Err(e) => {
                warn!("{e}; this process keeps serving");
                listening.resume(&st);
            }
        }
    }
}

/// New process: receives sessions until the old process is done.
async fn adopt(st: &Arc<State<TokioNet>>, s: UnixStream) {
    if let Err(e) = wire::send(&s, &Msg::ListenersTaken, &[]).await {
        warn!("the old process is gone before sending sessions: {e}");
        return;
    }
    let m = metrics();
    let mut adopted = 0u64;
    loop {
        let (msg, fds) = match wire::recv(&s).await {
            Ok(Some(x)) => x,
            Ok(None) => {
                warn!("the old process closed the takeover socket before it was done");
                break;
            }
            Err(e) => {
                warn!("takeover socket: {e}");
                break;
            }
        };
        match msg {
            Msg::Session(sm) => {
                let id = sm.id;
                let answer = match adopt_one(st, sm, fds) {
                    Ok(start) => {
                        let written = wire::send(&s, &Msg::Ack { id }, &[]).await.is_ok();
                        if ledger::after_ack(written) == Verdict::Release {
                            start();
                            adopted += 1;
                            m.takeover_sessions.with_label_values(&["adopted"]).inc();
                        }
                        continue;
                    }
                    Err(reason) => {
                        warn!(
                            conn_id = id,
                            "cannot adopt the session (the old process keeps it): {reason}"
                        );
                        Msg::Nack { id, reason }
                    }
                };
                if wire::send(&s, &answer, &[]).await.is_err() {
                    break;
                }
            }
            Msg::Done { kept } => {
                info!(
                    adopted,
                    kept, "takeover done: the old process keeps only sessions that could not move"
                );
                break;
            }
            other => {
                warn!("unexpected takeover message {other:?}");
                break;
            }
        }
    }
}

/// Imports a session: on success, what starts it (after the `Ack` went).
fn adopt_one(
    st: &Arc<State<TokioNet>>,
    sm: SessionMsg,
    fds: Vec<OwnedFd>,
) -> Result<impl FnOnce() + use<>, String> {
    let [client_fd, backend_fd]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|f: Vec<_>| format!("{} descriptors instead of 2", f.len()))?;
    let peer = sm
        .client
        .parse()
        .map_err(|_| format!("bad client address {:?}", sm.client))?;
    let protect = sm.protect.map(|p| tiproxy_core::session::ProtectionCopy {
        states: p.states.into(),
        token: p.token.into(),
        age: Duration::from_millis(p.age_ms),
    });
    let imported = crate::conn::import(&st.shared, sm.id, peer, &sm.backend, &sm.state, protect)?;
    let client = std::net::TcpStream::from(client_fd);
    let backend = std::net::TcpStream::from(backend_fd);
    client.set_nonblocking(true).map_err(|e| e.to_string())?;
    backend.set_nonblocking(true).map_err(|e| e.to_string())?;
    let client = tokio::net::TcpStream::from_std(client).map_err(|e| e.to_string())?;
    let st = st.clone();
    let id = sm.id;
    Ok(move || {
        let rx = crate::proxy::register(&st, id);
        let st2 = st.clone();
        crate::net::Network::spawn_connection(&st.shared.net, client, move |client| async move {
            match tokio::net::TcpStream::from_std(backend) {
                Ok(b) => imported.serve(client, b, rx).await,
                Err(e) => warn!(conn_id = id, "cannot resume the backend socket: {e}"),
            }
            crate::proxy::unregister(&st2, id);
        });
    })
}

/// Old process: one takeover attempt on an accepted socket. `Ok`: the new
/// process runs the listeners and every session that could move.
async fn hand_over(
    st: &Arc<State<TokioNet>>,
    listening: &Listening,
    s: UnixStream,
) -> Result<(), TakeoverError> {
    let ours = hello(&st.config);
    let theirs = match recv_within(&s).await? {
        (Msg::Hello(h), _) => h,
        (m, _) => return Err(proto(format!("unexpected {m:?}"))),
    };
    refuse_if_incompatible(&s, &ours, &theirs).await?;
    wire::send(&s, &Msg::Hello(ours.clone()), &[])
        .await
        .map_err(proto)?;
    // Stop accepting first: the ids given out so far are final.
    listening.stop_sql().await;
    let mut names: Vec<String> = listening.sql.iter().map(|(n, _)| n.clone()).collect();
    names.push(listening.api.0.clone());
    let mut fds: Vec<_> = listening.sql.iter().map(|(_, f)| f.as_fd()).collect();
    fds.push(listening.api.1.as_fd());
    let next_id = st.next_id.load(std::sync::atomic::Ordering::Relaxed);
    wire::send(&s, &Msg::Listeners { names, next_id }, &fds)
        .await
        .map_err(proto)?;
    match recv_within(&s).await? {
        (Msg::ListenersTaken, _) => {}
        (Msg::Refused { reason }, _) => return Err(TakeoverError::Refused(reason)),
        (m, _) => return Err(proto(format!("unexpected {m:?}"))),
    }
    listening.stop_api();
    info!(new = %theirs.version, "the new process serves the listeners; handing over sessions");
    sessions(st, s).await
}

/// Old process: hands over every session that can move.
async fn sessions(st: &Arc<State<TokioNet>>, s: UnixStream) -> Result<(), TakeoverError> {
    let m = metrics();
    // One reader task: receiving is not cancel-safe, the loop below selects.
    let s = Arc::new(s);
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let reader = {
        let s = s.clone();
        crate::task::spawn(async move {
            loop {
                let r = wire::recv(&s).await;
                let end = !matches!(r, Ok(Some(_)));
                if answers_tx.send(r.map(|o| o.map(|(msg, _)| msg))).is_err() || end {
                    return;
                }
            }
        })
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Handover>();
    let mut ledger = OldLedger::default();
    let mailboxes: Vec<(u32, Arc<Mailbox>)> = st
        .conns
        .lock()
        .expect("conn table")
        .iter()
        .map(|(id, mb)| (*id, mb.clone()))
        .collect();
    for (id, mb) in &mailboxes {
        ledger.track(*id);
        mb.send(Control::HandOver(tx.clone()));
    }
    drop(tx);
    let mut waiting: HashMap<u32, (oneshot::Sender<bool>, tokio::time::Instant)> = HashMap::new();
    let mut kept = 0u32;
    let live = st.live_config();
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(live.proxy.graceful_close_conn_timeout.max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let failure: Option<String> = loop {
        let unresolved = mailboxes
            .iter()
            .filter(|(id, _)| ledger.runs(*id) && ledger.get(*id) == Some(ledger::Held::Running))
            .count();
        if unresolved == 0 && waiting.is_empty() {
            break None;
        }
        tokio::select! {
            offer = rx.recv() => match offer {
                Some(Handover::Ready(o)) => {
                    if !ledger.may_offer(o.id) {
                        let _ = o.verdict.send(false);
                        continue;
                    }
                    let msg = Msg::Session(SessionMsg {
                        id: o.id,
                        client: o.client.to_string(),
                        backend: o.backend.clone(),
                        state: o.state.to_vec(),
                        protect: o.protect.as_ref().and_then(|c| {
                            // Not UTF-8 (TiDB writes JSON): not carried, the
                            // new process exports once more.
                            Some(wire::ProtectMsg {
                                states: String::from_utf8(c.states.to_vec()).ok()?,
                                token: String::from_utf8(c.token.to_vec()).ok()?,
                                age_ms: c.age.as_millis() as u64,
                            })
                        }),
                    });
                    let fds = [o.client_fd.as_fd(), o.backend_fd.as_fd()];
                    ledger.handle_offered(o.id);
                    waiting.insert(o.id, (o.verdict, tokio::time::Instant::now()));
                    if let Err(e) = wire::send(&s, &msg, &fds).await {
                        break Some(format!("sending a session: {e}"));
                    }
                }
                Some(Handover::Kept { id, why }) => {
                    debug!(conn_id = id, "session stays with this process: {why}");
                    kept += 1;
                    ledger.handle_ended(id);
                    m.takeover_sessions.with_label_values(&["kept"]).inc();
                }
                None => {
                    // Every connection task ended or answered.
                    for (id, _) in &mailboxes {
                        if ledger.get(*id) == Some(ledger::Held::Running) {
                            ledger.handle_ended(*id);
                        }
                    }
                }
            },
            r = answers.recv() => match r {
                Some(Ok(Some(Msg::Ack { id }))) if waiting.contains_key(&id) => {
                    answer(&mut ledger, &mut waiting, id, true);
                }
                Some(Ok(Some(Msg::Nack { id, reason }))) if waiting.contains_key(&id) => {
                    warn!(conn_id = id, "the new process refused the session; it stays here: {reason}");
                    answer(&mut ledger, &mut waiting, id, false);
                }
                Some(Ok(Some(other))) => break Some(format!("unexpected {other:?}")),
                Some(Ok(None)) | None => break Some("the new process closed the takeover socket".into()),
                Some(Err(e)) => break Some(e.to_string()),
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                if waiting.values().any(|(_, at)| now.duration_since(*at) > STEP_TIMEOUT) {
                    break Some("the new process did not answer for a session in time".into());
                }
                let table = st.conns.lock().expect("conn table");
                for (id, _) in &mailboxes {
                    if ledger.get(*id) == Some(ledger::Held::Running) && !table.contains_key(id) {
                        ledger.handle_ended(*id);
                    }
                }
                drop(table);
                if now >= deadline && waiting.is_empty() {
                    // Busy past graceful-close-conn-timeout: they stay and
                    // are drained; their later offers find no taker.
                    break None;
                }
            }
        }
    };
    match failure {
        None => {
            drop(rx);
            let kept_now = kept
                + mailboxes
                    .iter()
                    .filter(|(id, _)| ledger.get(*id) == Some(ledger::Held::Running))
                    .count() as u32;
            let _ = wire::send(&s, &Msg::Done { kept: kept_now }, &[]).await;
            reader.abort();
            let handed_over = ledger.released();
            info!(
                "takeover done: {kept_now} sessions kept here, {handed_over} handed over; \
                 this process exits once it holds nothing"
            );
            Ok(())
        }
        Some(why) => {
            // Shut the socket down both ways, then honour what was already
            // written: an Ack sent before this point counts, a later one
            // fails in the new process (ledger module docs).
            let _ = socket2::SockRef::from(&*s).shutdown(std::net::Shutdown::Both);
            while let Ok(Some(Ok(Some(msg)))) =
                tokio::time::timeout(Duration::from_secs(1), answers.recv()).await
            {
                match msg {
                    Msg::Ack { id } if waiting.contains_key(&id) => {
                        answer(&mut ledger, &mut waiting, id, true)
                    }
                    Msg::Nack { id, .. } if waiting.contains_key(&id) => {
                        answer(&mut ledger, &mut waiting, id, false)
                    }
                    _ => {}
                }
            }
            reader.abort();
            let back = ledger.handle_lost();
            for id in &back {
                if let Some((v, _)) = waiting.remove(id) {
                    let _ = v.send(false);
                }
                m.takeover_sessions.with_label_values(&["resumed"]).inc();
            }
            let running = mailboxes.iter().filter(|(id, _)| ledger.runs(*id)).count();
            Err(TakeoverError::Abandoned {
                why,
                kept: kept as usize + running,
                in_flight: back.len(),
                handed_over: ledger.released(),
            })
        }
    }
}

fn answer(
    ledger: &mut OldLedger,
    waiting: &mut HashMap<u32, (oneshot::Sender<bool>, tokio::time::Instant)>,
    id: u32,
    acked: bool,
) {
    let Some((v, _)) = waiting.remove(&id) else {
        return;
    };
    let released = ledger.handle_answer(id, acked) == Ok(Verdict::Release);
    let _ = v.send(released);
    let label = if released { "handed_over" } else { "resumed" };
    metrics()
        .takeover_sessions
        .with_label_values(&[label])
        .inc();
}
