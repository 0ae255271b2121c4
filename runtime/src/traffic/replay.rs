//! Traffic replay: reads a capture directory and sends every captured
//! command again, one connection per captured connection, at the captured
//! times scaled by `speed`. Names and semantics are TiProxy's
//! (`pkg/sqlreplay/replay/replay.go`, `conn/conn.go`, `report/`).
//!
//! Where it connects: the proxy's own SQL listener unless `addr` says
//! otherwise. TiProxy dials the backends through its router; going through
//! the listener gets the same routing, balancing and backend TLS with no
//! second path to keep, and the replay's sessions show in the proxy's
//! metrics like any other.
//!
//! Bounded everywhere: the file reader runs at most [`READ_AHEAD`] records
//! ahead of the clock, each connection queues at most [`CONN_QUEUE`]
//! commands (a slow one holds the reader back rather than growing), and at
//! most [`MAX_FAILURE_KINDS`] distinct failures are kept (later ones are
//! counted). A file that cannot be read further ends the replay after the
//! intact part with an error naming the file and offset.
//!
//! A failure is a command that succeeded in the capture and fails now;
//! a command that failed in the capture too is not one. Failures and other
//! errors are written to the target's `tiproxy_traffic_replay` tables
//! (`report`) when the replay ends, if the target accepts them.
//!
//! Result comparison (beyond TiProxy): a capture taken with `--compare`
//! holds a digest of each command's result; replay digests what the target
//! answers the same way and reports every command whose result differs
//! (`differed_cmds`, grouped like failures, in `traffic show` and the
//! target's `tiproxy_traffic_replay.result_diff`). Rows are compared in
//! order only when the statement has `ORDER BY`. A command that fails now
//! but succeeded in the capture is a failure, not also a difference.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tiproxy_core::digest::ResultDigest;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::client::{ClientError, Outcome, ReplayConn};
use super::format::{self, Decoder, Record};
use super::statement::{digest, has_order_by, is_read_only, statement};
use super::{report, store};

/// TiProxy's bounds of `speed`.
pub const MIN_SPEED: f64 = 0.1;
/// See [`MIN_SPEED`].
pub const MAX_SPEED: f64 = 10.0;
/// Records read ahead of the dispatcher.
const READ_AHEAD: usize = 1024;
/// Commands queued per connection.
const CONN_QUEUE: usize = 256;
/// Distinct failures (command type, digest) kept with a sample.
const MAX_FAILURE_KINDS: usize = 1024;
/// Failures `traffic show` lists.
const SHOW_FAILURES: usize = 10;
/// How long writing the report to the target may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// When prepared statements are closed (TiProxy's `ps-close`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsClose {
    /// When the capture closed them.
    Directed,
    /// Right after each execution (re-prepared for the next).
    Always,
    /// Never (reused when executed again).
    Never,
}

impl PsClose {
    /// Parses TiProxy's names; empty is `directed`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "directed" => Ok(PsClose::Directed),
            "always" => Ok(PsClose::Always),
            "never" => Ok(PsClose::Never),
            other => Err(format!(
                "invalid ps-close {other}: directed, always or never"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            PsClose::Directed => "directed",
            PsClose::Always => "always",
            PsClose::Never => "never",
        }
    }
}

/// What a replay was asked for.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The capture directory.
    pub input: PathBuf,
    /// The user replay logs in as.
    pub username: String,
    /// Its password.
    pub password: String,
    /// 1 replays at the captured pace, 2 twice as fast.
    pub speed: f64,
    /// Only replay statements that do not write.
    pub read_only: bool,
    /// When prepared statements are closed.
    pub ps_close: PsClose,
    /// `security.encryption-key-path`.
    pub key_path: String,
    /// Where to connect (`host:port`).
    pub addr: String,
}

/// A command that succeeded in the capture and failed in the replay,
/// grouped by command type and statement digest (TiProxy's `fail` table).
#[derive(Debug, Clone)]
pub struct Failure {
    /// TiProxy's command name.
    pub cmd_type: &'static str,
    /// The normalized statement's SHA-256.
    pub digest: String,
    /// The first such statement.
    pub sample_stmt: String,
    /// Its error.
    pub sample_err_msg: String,
    /// Its captured connection.
    pub sample_conn_id: u64,
    /// Its file.
    pub sample_filename: String,
    /// Its line in the (plain) file.
    pub sample_fileline: usize,
    /// When it was captured.
    pub sample_capture_time: SystemTime,
    /// When it was replayed.
    pub sample_replay_time: SystemTime,
    /// How many.
    pub count: u64,
}

/// Errors that are not a command's (TiProxy's `other_errors` table).
#[derive(Debug, Clone)]
pub struct OtherError {
    /// The first one's message.
    pub sample_err_msg: String,
    /// When it happened.
    pub sample_replay_time: SystemTime,
    /// How many.
    pub count: u64,
}

#[derive(Debug, Default)]
struct ReplayState {
    done: bool,
    err: Option<String>,
    end: Option<SystemTime>,
    /// Commands in the capture (`meta`), for progress.
    total: u64,
    /// Commands read from the files.
    decoded: u64,
    replayed: u64,
    filtered: u64,
    failed: u64,
    /// Commands whose result differs from the captured one.
    differed: u64,
    /// Whether any command carried a captured digest.
    compared: bool,
    last_cmd_ts: Option<SystemTime>,
    failures: BTreeMap<(&'static str, String), Failure>,
    differences: BTreeMap<(&'static str, String), Failure>,
    other: BTreeMap<String, OtherError>,
}

/// One replay, for `traffic show` and `traffic cancel`.
#[derive(Debug)]
pub struct ReplayJob {
    /// What was asked.
    pub cfg: ReplayConfig,
    /// When it started.
    pub start: SystemTime,
    st: Mutex<ReplayState>,
    stop: watch::Sender<bool>,
}

impl ReplayJob {
    /// Whether it still runs.
    pub fn running(&self) -> bool {
        !self.st.lock().expect("job lock").done
    }

    /// Stops it with an error (the first one wins).
    pub fn fail(&self, err: &str) {
        let mut st = self.st.lock().expect("job lock");
        if st.err.is_none() && !st.done {
            st.err = Some(err.to_string());
        }
        drop(st);
        self.stop.send_replace(true);
    }

    /// The failures so far, most frequent first.
    pub fn failures(&self) -> Vec<Failure> {
        let st = self.st.lock().expect("job lock");
        let mut v: Vec<Failure> = st.failures.values().cloned().collect();
        v.sort_by_key(|f| std::cmp::Reverse(f.count));
        v
    }

    /// The commands whose result differs, grouped like failures (the
    /// sample's `sample_err_msg` says captured vs replayed), most frequent
    /// first.
    pub fn differences(&self) -> Vec<Failure> {
        let st = self.st.lock().expect("job lock");
        let mut v: Vec<Failure> = st.differences.values().cloned().collect();
        v.sort_by_key(|f| std::cmp::Reverse(f.count));
        v
    }

    /// `traffic show`'s entry: TiProxy's fields
    /// (`pkg/sqlreplay/manager/job.go`), then counts and the first
    /// failures.
    pub fn show(&self) -> serde_json::Value {
        let failures = self.failures();
        let differences = self.differences();
        let st = self.st.lock().expect("job lock");
        let progress = if st.done && st.err.is_none() {
            1.0
        } else if st.total > 0 {
            (st.decoded as f64 / st.total as f64).min(1.0)
        } else {
            0.0
        };
        let status = match (&st.err, st.done) {
            (_, false) => "running",
            (Some(_), true) => "canceled",
            (None, true) => "done",
        };
        let mut v = serde_json::json!({
            "type": "replay",
            "status": status,
            "start_time": super::rfc3339(self.start),
            "progress": format!("{}%", (progress * 100.0) as u32),
            "input": self.cfg.input.display().to_string(),
            "username": self.cfg.username,
            "speed": self.cfg.speed,
            "ps-close": self.cfg.ps_close.name(),
            "replayed_cmds": st.replayed,
            "filtered_cmds": st.filtered,
            "failed_cmds": st.failed,
            "other_errors": st.other.values().map(|o| o.count).sum::<u64>(),
            "failures": failures.iter().take(SHOW_FAILURES).map(|f| serde_json::json!({
                "cmd_type": f.cmd_type,
                "digest": f.digest,
                "sample_stmt": f.sample_stmt,
                "sample_err_msg": f.sample_err_msg,
                "sample_conn_id": f.sample_conn_id,
                "sample_filename": f.sample_filename,
                "sample_fileline": f.sample_fileline,
                "count": f.count,
            })).collect::<Vec<_>>(),
        });
        if st.compared {
            v["differed_cmds"] = st.differed.into();
            v["differences"] = differences
                .iter()
                .take(SHOW_FAILURES)
                .map(|f| {
                    serde_json::json!({
                        "cmd_type": f.cmd_type,
                        "digest": f.digest,
                        "sample_stmt": f.sample_stmt,
                        "sample_diff": f.sample_err_msg,
                        "sample_conn_id": f.sample_conn_id,
                        "sample_filename": f.sample_filename,
                        "sample_fileline": f.sample_fileline,
                        "count": f.count,
                    })
                })
                .collect::<Vec<_>>()
                .into();
        }
        if self.cfg.read_only {
            v["readonly"] = true.into();
        }
        if let Some(t) = st.last_cmd_ts {
            let mut b = Vec::new();
            format::write_rfc3339_nano(t, &mut b);
            v["last_cmd_ts"] = String::from_utf8_lossy(&b).into_owned().into();
        }
        if let Some(end) = st.end {
            v["end_time"] = super::rfc3339(end).into();
        }
        if let Some(e) = &st.err {
            v["error"] = e.clone().into();
        }
        v
    }

    fn other_error(&self, kind: &str, msg: String) {
        let mut st = self.st.lock().expect("job lock");
        let e = st.other.entry(kind.to_string()).or_insert(OtherError {
            sample_err_msg: msg,
            sample_replay_time: SystemTime::now(),
            count: 0,
        });
        e.count += 1;
    }
}

/// One command to replay, with where it came from.
#[derive(Debug)]
struct Cmd {
    rec: Record,
    file: Arc<str>,
    line: usize,
}

/// What the file reader hands over.
enum Read {
    Cmd(Cmd),
    /// The files cannot be read further (file, offset, why).
    Broken(String),
}

/// Starts a replay (the caller made sure no job runs).
pub fn start(cfg: ReplayConfig) -> Result<Arc<ReplayJob>, String> {
    if cfg.input.as_os_str().is_empty() {
        return Err("input is required".into());
    }
    if cfg.username.is_empty() {
        return Err("username is required".into());
    }
    if !(MIN_SPEED..=MAX_SPEED).contains(&cfg.speed) {
        return Err(format!(
            "speed should be between {MIN_SPEED} and {MAX_SPEED}, got {}",
            cfg.speed
        ));
    }
    // TiProxy replays without meta too (it only logs); the encryption
    // method is then unknown, so such a capture must be plain.
    let meta = match store::read_meta(&cfg.input) {
        Ok(m) => m,
        Err(e) => {
            warn!("traffic replay: {e}; replaying as unencrypted");
            store::Meta::default()
        }
    };
    let key = store::load_key(&meta.encrypt_method, &cfg.key_path)
        .map_err(|e| format!("failed to load encryption key: {e}"))?;
    let files = store::list_files(&cfg.input)
        .map_err(|e| format!("cannot read {}: {e}", cfg.input.display()))?;
    if files.is_empty() {
        return Err(format!("no traffic files in {}", cfg.input.display()));
    }
    let (stop, _) = watch::channel(false);
    let job = Arc::new(ReplayJob {
        cfg,
        start: SystemTime::now(),
        st: Mutex::new(ReplayState {
            total: meta.cmds,
            ..Default::default()
        }),
        stop,
    });
    info!(input = %job.cfg.input.display(), speed = job.cfg.speed, "traffic replay started");
    crate::task::spawn(run(job.clone(), files, key));
    Ok(job)
}

/// Reads every file in order; stops at the first that cannot be read
/// further (after handing over its intact records).
fn read_files(files: Vec<PathBuf>, key: Option<[u8; 32]>, tx: mpsc::Sender<Read>) {
    for path in files {
        let name: Arc<str> = path.display().to_string().into();
        let r = match store::open_file(&path, key.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Read::Broken(format!("{name}, offset 0: {e}")));
                return;
            }
        };
        let mut dec = Decoder::new(r, name.to_string());
        loop {
            let line = dec.line() + 1;
            let item = match dec.next_record() {
                Ok(Some(rec)) => Read::Cmd(Cmd {
                    rec,
                    file: name.clone(),
                    line,
                }),
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.blocking_send(Read::Broken(e.to_string()));
                    return;
                }
            };
            if tx.blocking_send(item).is_err() {
                return; // The replay stopped.
            }
        }
    }
}

async fn run(job: Arc<ReplayJob>, files: Vec<PathBuf>, key: Option<[u8; 32]>) {
    let (tx, mut rx) = mpsc::channel(READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || read_files(files, key, tx));
    let mut stop = job.stop.subscribe();
    let t0 = tokio::time::Instant::now();
    let mut first: Option<SystemTime> = None;
    let mut conns: HashMap<u64, mpsc::Sender<Cmd>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut broken = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            item = rx.recv() => item,
        };
        let cmd = match item {
            None => break,
            Some(Read::Broken(e)) => {
                warn!("traffic replay: {e}");
                // The intact part is replayed to its end first.
                broken = Some(e);
                break;
            }
            Some(Read::Cmd(c)) => c,
        };
        let t = *first.get_or_insert(cmd.rec.start);
        let offset = cmd.rec.start.duration_since(t).unwrap_or_default();
        let at = t0 + offset.div_f64(job.cfg.speed);
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(at) => {}
        }
        {
            let mut st = job.st.lock().expect("job lock");
            st.decoded += 1;
            st.last_cmd_ts = Some(cmd.rec.start);
        }
        let conn_id = cmd.rec.conn_id;
        let quit = cmd.rec.payload.first() == Some(&0x01);
        let sender = conns.entry(conn_id).or_insert_with(|| {
            let (ctx, crx) = mpsc::channel(CONN_QUEUE);
            crate::task::spawn_in(&mut tasks, replay_conn(job.clone(), conn_id, crx));
            ctx
        });
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = sender.send(cmd) => { let _ = r; }
        }
        if quit {
            conns.remove(&conn_id);
        }
    }
    drop(rx);
    drop(conns);
    while tasks.join_next().await.is_some() {}
    let _ = reader.await;
    let (failures, differences, other) = {
        let st = job.st.lock().expect("job lock");
        (
            st.failures.values().cloned().collect::<Vec<_>>(),
            st.differences.values().cloned().collect::<Vec<_>>(),
            st.other.clone(),
        )
    };
    let outcome = tokio::time::timeout(
        REPORT_TIMEOUT,
        report::write(&job.cfg, job.start, &failures, &differences, &other),
    )
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("traffic replay: the target does not take the report: {e}"),
        Err(_) => warn!("traffic replay: writing the report took over {REPORT_TIMEOUT:?}"),
    }
    let mut st = job.st.lock().expect("job lock");
    if let Some(e) = broken {
        st.err.get_or_insert(e);
    }
    st.done = true;
    st.end = Some(SystemTime::now());
    let kinds = st.failures.len();
    match &st.err {
        Some(e) => warn!(
            replayed = st.replayed,
            failed = st.failed,
            "traffic replay stopped: {e}"
        ),
        None => info!(
            replayed = st.replayed,
            failed = st.failed,
            differed = st.differed,
            kinds,
            "traffic replay finished"
        ),
    }
}

/// One captured connection's commands, in order, on one connection.
async fn replay_conn(job: Arc<ReplayJob>, conn_id: u64, mut rx: mpsc::Receiver<Cmd>) {
    let mut stop = job.stop.subscribe();
    let mut conn: Option<ReplayConn> = None;
    // Captured statement id -> replayed statement id.
    let mut ps: HashMap<u32, u32> = HashMap::new();
    loop {
        let cmd = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        let code = cmd.rec.payload.first().copied().unwrap_or(0);
        if job.cfg.read_only && !is_read_only(&cmd.rec, &ps) {
            job.st.lock().expect("job lock").filtered += 1;
            continue;
        }
        if code == 0x01 {
            job.st.lock().expect("job lock").replayed += 1;
            break;
        }
        if conn.is_none() {
            let c = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                c = ReplayConn::connect(&job.cfg.addr, &job.cfg.username, &job.cfg.password) => c,
            };
            match c {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    job.other_error("connection", e.to_string());
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        if cmd.rec.digest.is_some() {
            c.set_compare();
        }
        let res = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            r = execute(c, &cmd, &mut ps, job.cfg.ps_close) => r,
        };
        match res {
            Ok(Some(Outcome::Err { code, message })) if cmd.rec.success => {
                record_failure(&job, &cmd, format!("ERROR {code}: {message}"));
            }
            Ok(Some(_)) => {
                if let (Some(want), Some(got)) = (
                    cmd.rec.digest,
                    conn.as_ref().and_then(ReplayConn::last_digest),
                ) {
                    compare(&job, &cmd, want, got);
                }
            }
            Ok(None) => {}
            Err(ClientError::Prepare(msg)) if cmd.rec.success => record_failure(&job, &cmd, msg),
            Err(ClientError::Prepare(_)) => {} // It failed in the capture too.
            Err(e) => {
                // TiProxy reconnects for the next command; the server's
                // statements are gone with the connection.
                job.other_error("disconnection", format!("connection {conn_id}: {e}"));
                conn = None;
                ps.clear();
            }
        }
        job.st.lock().expect("job lock").replayed += 1;
    }
    if let Some(c) = conn {
        c.quit().await;
    }
}

/// Runs one command: statement ids mapped, statements (re)prepared from
/// the captured text when missing, `ps-close` applied.
async fn execute(
    c: &mut ReplayConn,
    cmd: &Cmd,
    ps: &mut HashMap<u32, u32>,
    ps_close: PsClose,
) -> Result<Option<Outcome>, ClientError> {
    let rec = &cmd.rec;
    let code = rec.payload[0];
    match code {
        // COM_STMT_PREPARE.
        0x16 => {
            let out = c.execute(&rec.payload).await?;
            if let Some(Outcome::Ok { prepared: Some(id) }) = out {
                ps.insert(rec.ps_id, id);
            }
            Ok(out)
        }
        // Execute, send long data, close, reset, fetch.
        0x17..=0x1a | 0x1c => {
            let captured = rec.ps_id;
            // `never` keeps statements open; under `always` a captured
            // close finds its statement closed already.
            if code == 0x19
                && (ps_close == PsClose::Never
                    || (ps_close == PsClose::Always && !ps.contains_key(&captured)))
            {
                return Ok(None);
            }
            if !ps.contains_key(&captured) && code == 0x17 && !rec.prepared_stmt.is_empty() {
                // Prepared before the capture began, or closed by
                // `ps-close always`: prepare it on demand, as TiProxy does.
                let mut p = Vec::with_capacity(rec.prepared_stmt.len() + 1);
                p.push(0x16);
                p.extend_from_slice(rec.prepared_stmt.as_bytes());
                match c.execute(&p).await? {
                    Some(Outcome::Ok { prepared: Some(id) }) => {
                        ps.insert(captured, id);
                    }
                    Some(Outcome::Err { code, message }) => {
                        return Err(ClientError::Prepare(format!(
                            "re-preparing the statement failed: ERROR {code}: {message}"
                        )));
                    }
                    _ => {}
                }
            }
            let Some(&id) = ps.get(&captured) else {
                return Err(ClientError::Prepare(format!(
                    "prepared statement ID {captured} in {} not found",
                    format::command_name(code).unwrap_or("?")
                )));
            };
            let mut p = rec.payload.clone();
            if p.len() >= 5 {
                p[1..5].copy_from_slice(&id.to_le_bytes());
            }
            let out = c.execute(&p).await?;
            if code == 0x19 {
                ps.remove(&captured);
            } else if code == 0x17 && ps_close == PsClose::Always {
                let mut close = vec![0x19];
                close.extend_from_slice(&id.to_le_bytes());
                c.execute(&close).await?;
                ps.remove(&captured);
            }
            Ok(out)
        }
        // COM_RESET_CONNECTION forgets the statements.
        0x1f => {
            ps.clear();
            c.execute(&rec.payload).await
        }
        _ => c.execute(&rec.payload).await,
    }
}

/// Compares a command's captured result with the replayed one.
fn compare(job: &ReplayJob, cmd: &Cmd, want: ResultDigest, got: ResultDigest) {
    let ordered = has_order_by(&statement(&cmd.rec));
    job.st.lock().expect("job lock").compared = true;
    if want.same_as(&got, ordered) {
        return;
    }
    let what = if want.describe() != got.describe() {
        format!("captured {}, replayed {}", want.describe(), got.describe())
    } else if want.unordered == got.unordered {
        format!(
            "captured {}, replayed the same rows in another order",
            want.describe()
        )
    } else {
        format!(
            "captured {}, replayed as many rows with other values",
            want.describe()
        )
    };
    record(job, cmd, what, true);
}

fn record_failure(job: &ReplayJob, cmd: &Cmd, err: String) {
    record(job, cmd, err, false);
}

/// Counts a failure (or, with `diff`, a differing result) and keeps the
/// first sample of its kind.
fn record(job: &ReplayJob, cmd: &Cmd, err: String, diff: bool) {
    let rec = &cmd.rec;
    let code = rec.payload[0];
    let stmt = statement(rec);
    let cmd_type = format::command_name(code).unwrap_or("Sleep");
    let key = (cmd_type, digest(&stmt));
    let mut guard = job.st.lock().expect("job lock");
    let st = &mut *guard;
    let kinds = if diff {
        st.differed += 1;
        &mut st.differences
    } else {
        st.failed += 1;
        &mut st.failures
    };
    if let Some(f) = kinds.get_mut(&key) {
        f.count += 1;
        return;
    }
    if kinds.len() >= MAX_FAILURE_KINDS {
        return; // Counted in `failed` or `differed`.
    }
    let f = Failure {
        cmd_type,
        digest: key.1.clone(),
        sample_stmt: stmt.chars().take(4096).collect(),
        sample_err_msg: err,
        sample_conn_id: rec.conn_id,
        sample_filename: cmd.file.to_string(),
        sample_fileline: cmd.line,
        sample_capture_time: rec.start,
        sample_replay_time: SystemTime::now(),
        count: 1,
    };
    kinds.insert(key, f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_close_names() {
        assert_eq!(PsClose::parse(""), Ok(PsClose::Directed));
        assert_eq!(PsClose::parse("always"), Ok(PsClose::Always));
        assert!(PsClose::parse("sometimes").is_err());
    }
}
