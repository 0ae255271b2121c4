//! Traffic capture: the tap every connection feeds (through a bounded
//! queue, never waiting) and the capture job that encodes what it gets and
//! hands full buffers to a writer thread (another bounded queue). When
//! either queue is full the capture stops with an error and
//! `tiproxy_traffic_capture_stopped_total` counts it; clients are never
//! slowed. The shape follows TiProxy's `pkg/sqlreplay/capture/capture.go`:
//! 16 Ki pending commands, buffers flushed at 12 MiB, 10 buffers queued.
//!
//! Where each session's capture begins is the core's decision
//! (`tiproxy_core::session::capture`): the tap gets `Event::CaptureStart`
//! before a session's first command and records it as TiProxy does. A
//! session that logs in during the capture starts from its database
//! (COM_INIT_DB, TiProxy's `InitConn`). A session that existed before starts
//! from its exported state on TiDB (`SET SESSION_STATES '...'`, TiProxy's
//! `initForCapture`; the texts of its prepared statements are taken from
//! that state so their executions carry them, as TiProxy's
//! `ExtractPreparedStmtTextsFromSetSessionStatesSQL` does), elsewhere from
//! what the proxy tracks: its database, and `SET autocommit=0` when it had
//! turned autocommit off. User variables, other session variables and
//! statements prepared before the capture are not carried on MariaDB:
//! their executions are captured without a text and fail in replay.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tiproxy_core::digest::ResultDigest;
use tiproxy_core::flags::StatusFlags;
use tiproxy_core::session::Session;
use tiproxy_core::session::migration::set_session_states_query;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info};

use super::format::{self, Record};
use super::store::{self, Meta, RotateWriter};
use crate::metrics::metrics;

const MAX_PENDING: usize = 1 << 14;
const FLUSH_AT: usize = 12 << 20;
const MAX_BUFFERS: usize = 10;
/// How often the capture job drains the connections' queue: at this pace
/// [`MAX_PENDING`] holds over 3 million commands a second.
const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// One finished command from a connection.
#[derive(Debug)]
pub struct Item {
    conn_id: u64,
    start: SystemTime,
    payload: Bytes,
    ok: bool,
    stmt_id: u32,
    digest: Option<ResultDigest>,
    /// A session's start from its exported state: the texts of the
    /// statements it had prepared, by id.
    prepared: Option<HashMap<u32, String>>,
}

/// A command a session finished (its `Event::Captured`).
#[derive(Debug)]
pub struct Finished {
    /// The command byte, then the payload.
    pub payload: Bytes,
    /// False when the server answered ERR.
    pub ok: bool,
    /// From its first byte to its last response byte.
    pub elapsed: Duration,
    /// For COM_STMT_PREPARE, the statement id the server gave.
    pub stmt_id: u32,
    /// With `--compare`: what it got back.
    pub digest: Option<Box<ResultDigest>>,
}

type Running = (mpsc::Sender<Item>, Arc<CaptureJob>);

/// The process-wide tap.
struct Tap {
    /// Bumped when a capture starts or stops; connections compare it with
    /// theirs before every read from the client (one atomic load).
    generation: AtomicU64,
    running: Mutex<Option<Running>>,
}

fn tap() -> &'static Tap {
    static TAP: OnceLock<Tap> = OnceLock::new();
    TAP.get_or_init(|| Tap {
        generation: AtomicU64::new(0),
        running: Mutex::new(None),
    })
}

fn set_running(r: Option<Running>) {
    let t = tap();
    *t.running.lock().expect("tap lock") = r;
    t.generation.fetch_add(1, Ordering::AcqRel);
}

/// A connection's end of the tap.
#[derive(Debug, Default)]
pub struct ConnTap {
    generation: u64,
    running: Option<Running>,
}

impl ConnTap {
    /// Follows a capture starting or stopping: turns the session's tap on
    /// or off. Cheap when nothing changed.
    pub fn sync<T: Clone>(&mut self, session: &mut Session<T>) {
        let t = tap();
        let g = t.generation.load(Ordering::Acquire);
        if g == self.generation {
            return;
        }
        self.generation = g;
        self.running = t.running.lock().expect("tap lock").clone();
        let compare = self
            .running
            .as_ref()
            .is_some_and(|(_, job)| job.cfg.compare);
        session.set_capture_compare(self.running.is_some(), compare);
    }

    /// A session's capture begins (`Event::CaptureStart`): records where
    /// it starts from, `states` (exported by TiDB) or what the proxy tracks.
    pub fn started(
        &mut self,
        conn_id: u32,
        db: Option<&[u8]>,
        status: StatusFlags,
        states: Option<Bytes>,
        elapsed: Duration,
    ) {
        if self.running.is_none() {
            return;
        }
        // The time of the first command: a record never precedes it.
        let start = SystemTime::now()
            .checked_sub(elapsed)
            .unwrap_or_else(SystemTime::now);
        let item = |payload: Bytes, prepared| Item {
            conn_id: u64::from(conn_id),
            start,
            payload,
            ok: true,
            stmt_id: 0,
            digest: None,
            prepared,
        };
        match states {
            Some(states) => {
                let prepared = prepared_texts(&states);
                // Backslash escapes, as TiProxy writes it.
                let q = set_session_states_query(&states, false).freeze();
                self.send(item(q, prepared));
            }
            None => {
                if let Some(db) = db.filter(|d| !d.is_empty()) {
                    let mut p = Vec::with_capacity(db.len() + 1);
                    p.push(0x02);
                    p.extend_from_slice(db);
                    self.send(item(p.into(), None));
                }
                if !status.contains(StatusFlags::AUTOCOMMIT) {
                    self.send(item(Bytes::from_static(b"\x03SET autocommit=0"), None));
                }
            }
        }
    }

    /// A captured command (`Event::Captured`).
    pub fn captured(&mut self, conn_id: u32, cmd: Finished) {
        let Finished {
            payload,
            ok,
            elapsed,
            stmt_id,
            digest,
        } = cmd;
        let start = SystemTime::now()
            .checked_sub(elapsed)
            .unwrap_or_else(SystemTime::now);
        self.send(Item {
            conn_id: u64::from(conn_id),
            start,
            payload,
            ok,
            stmt_id,
            digest: digest.map(|d| *d),
            prepared: None,
        });
    }

    /// Queues an item for the capture job without waiting: a full queue
    /// stops the capture.
    fn send(&mut self, item: Item) {
        let Some((tx, job)) = &self.running else {
            return;
        };
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                job.fail("encoding traffic is too slow, buffer is full", "queue_full");
                self.running = None;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.running = None,
        }
    }
}

/// The prepared statements' texts in TiDB's exported session state
/// (`prepared-stmts`: id -> `{"text": ...}`, TiDB's
/// `sessionstates.PreparedStmtInfo`); `None` when it has none or is not
/// the JSON expected (best effort, as TiProxy's reading of it).
pub(super) fn prepared_texts(states: &[u8]) -> Option<HashMap<u32, String>> {
    #[derive(serde::Deserialize)]
    struct States {
        #[serde(rename = "prepared-stmts", default)]
        prepared: HashMap<u32, Stmt>,
    }
    #[derive(serde::Deserialize)]
    struct Stmt {
        #[serde(default)]
        text: String,
    }
    let s: States = serde_json::from_slice(states).ok()?;
    let m: HashMap<u32, String> = s
        .prepared
        .into_iter()
        .filter(|(_, st)| !st.text.is_empty())
        .map(|(id, st)| (id, st.text))
        .collect();
    (!m.is_empty()).then_some(m)
}

/// What a capture was asked for.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The directory.
    pub output: PathBuf,
    /// How long.
    pub duration: Duration,
    /// gzip the files.
    pub compress: bool,
    /// `aes256-ctr` or empty.
    pub encryption_method: String,
    /// `security.encryption-key-path`.
    pub key_path: String,
    /// Bytes of records per file.
    pub file_size: u64,
    /// Keep a digest of each command's result (`--compare`).
    pub compare: bool,
}

#[derive(Debug, Default)]
struct JobState {
    done: bool,
    err: Option<String>,
    end: Option<SystemTime>,
    cmds: u64,
    filtered: u64,
}

/// One capture, for `traffic show`.
#[derive(Debug)]
pub struct CaptureJob {
    /// What was asked.
    pub cfg: CaptureConfig,
    /// When it started.
    pub start: SystemTime,
    st: Mutex<JobState>,
    stop: Notify,
}

impl CaptureJob {
    /// Stops the capture with an error (the first one wins).
    pub fn fail(&self, err: &str, reason: &'static str) {
        let mut st = self.st.lock().expect("job lock");
        if st.err.is_none() && !st.done {
            st.err = Some(err.to_string());
            metrics()
                .traffic_capture_stopped
                .with_label_values(&[reason])
                .inc();
            self.stop.notify_one();
        }
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        !self.st.lock().expect("job lock").done
    }

    /// `traffic show`'s entry, TiProxy's fields
    /// (`pkg/sqlreplay/manager/job.go`).
    pub fn show(&self) -> serde_json::Value {
        let st = self.st.lock().expect("job lock");
        let progress = if st.done && st.err.is_none() {
            1.0
        } else {
            let end = st.end.unwrap_or_else(SystemTime::now);
            let ran = end.duration_since(self.start).unwrap_or_default();
            (ran.as_secs_f64() / self.cfg.duration.as_secs_f64().max(1e-9)).min(1.0)
        };
        let status = match (&st.err, st.done) {
            (Some(_), _) => "canceled",
            (None, true) => "done",
            (None, false) => "running",
        };
        let mut v = serde_json::json!({
            "type": "capture",
            "status": status,
            "start_time": super::rfc3339(self.start),
            "progress": format!("{}%", (progress * 100.0) as u32),
            "output": self.cfg.output.display().to_string(),
            "duration": super::go_duration(self.cfg.duration),
            "cmds": st.cmds,
        });
        if let Some(end) = st.end {
            v["end_time"] = super::rfc3339(end).into();
        }
        if let Some(e) = &st.err {
            v["error"] = e.clone().into();
        }
        if self.cfg.compress {
            v["compress"] = true.into();
        }
        if !self.cfg.encryption_method.is_empty() {
            v["encryption-method"] = self.cfg.encryption_method.clone().into();
        }
        if self.cfg.compare {
            v["compare"] = true.into();
        }
        v
    }
}

/// Starts a capture (the caller made sure none runs).
pub fn start(cfg: CaptureConfig) -> Result<Arc<CaptureJob>, String> {
    if cfg.output.as_os_str().is_empty() {
        return Err("output is required".into());
    }
    if cfg.duration.is_zero() {
        return Err("duration is required".into());
    }
    if cfg.output.join(store::META).exists() {
        return Err(format!(
            "file {} already exists, please remove it before capture",
            cfg.output.join(store::META).display()
        ));
    }
    let key = store::load_key(&cfg.encryption_method, &cfg.key_path)
        .map_err(|e| format!("failed to load encryption key: {e}"))?;
    let writer = RotateWriter::new(&cfg.output, cfg.file_size, cfg.compress, key)
        .map_err(|e| format!("cannot write to {}: {e}", cfg.output.display()))?;
    let job = Arc::new(CaptureJob {
        cfg,
        start: SystemTime::now(),
        st: Mutex::new(JobState::default()),
        stop: Notify::new(),
    });
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    set_running(Some((tx, job.clone())));
    info!(output = %job.cfg.output.display(), duration = ?job.cfg.duration, "traffic capture started");
    crate::task::spawn(run(job.clone(), rx, writer));
    Ok(job)
}

/// Encodes items into records: keeps each connection's prepared
/// statements so executions carry their text, as TiProxy's capture does.
#[derive(Default)]
struct Encoder {
    conns: HashMap<u64, HashMap<u32, String>>,
    buf: Vec<u8>,
    cmds: u64,
    filtered: u64,
}

impl Encoder {
    fn encode(&mut self, it: Item) {
        let Some(&cmd) = it.payload.first() else {
            return;
        };
        if let Some(prepared) = it.prepared {
            self.conns.insert(it.conn_id, prepared);
        }
        let stmts = self.conns.entry(it.conn_id).or_default();
        let mut rec = Record {
            start: it.start,
            conn_id: it.conn_id,
            payload: it.payload.to_vec(),
            success: it.ok,
            ps_id: 0,
            prepared_stmt: String::new(),
            digest: it.digest,
        };
        let id_in_payload = || {
            it.payload
                .get(1..5)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match cmd {
            format::COM_QUERY if is_sensitive(&it.payload[1..]) => {
                self.filtered += 1;
                return;
            }
            0x01 => {
                self.conns.remove(&it.conn_id);
            }
            // COM_STMT_PREPARE: keep the text under the id the server gave.
            0x16 => {
                if it.stmt_id == 0 {
                    // Failed: TiProxy leaves failed prepares out.
                    return;
                }
                stmts.insert(
                    it.stmt_id,
                    String::from_utf8_lossy(&it.payload[1..]).into_owned(),
                );
                rec.ps_id = it.stmt_id;
            }
            // Execute, send long data, close, reset, fetch.
            0x17..=0x1a | 0x1c => {
                if let Some(id) = id_in_payload() {
                    rec.ps_id = id;
                    if cmd == 0x17 {
                        rec.prepared_stmt = stmts.get(&id).cloned().unwrap_or_default();
                    }
                    if cmd == 0x19 {
                        stmts.remove(&id);
                    }
                }
            }
            // COM_CHANGE_USER (it holds credentials) is recorded as
            // COM_RESET_CONNECTION, as TiProxy does.
            0x11 | 0x1f => {
                stmts.clear();
                rec.payload = vec![0x1f];
            }
            _ => {}
        }
        format::encode(&rec, &mut self.buf);
        self.cmds += 1;
    }
}

/// TiProxy's `lex.IsSensitiveSQL` (`pkg/util/lex/filter.go`): statements
/// that may carry passwords or storage URLs are left out.
fn is_sensitive(sql: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&sql[..sql.len().min(64)]);
    let mut words = text
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_uppercase());
    let (a, b) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    matches!(
        (a.as_str(), b.as_str()),
        ("CREATE", "USER")
            | ("ALTER", "USER")
            | ("SET", "PASSWORD")
            | ("GRANT", _)
            | ("BACKUP", _)
            | ("RESTORE", _)
            | ("IMPORT", _)
            | ("LOAD", "DATA")
    )
}

async fn run(job: Arc<CaptureJob>, mut rx: mpsc::Receiver<Item>, writer: RotateWriter) {
    let (wtx, wrx) = std::sync::mpsc::sync_channel::<Vec<u8>>(MAX_BUFFERS);
    let wjob = job.clone();
    let thread = std::thread::Builder::new()
        .name("traffic-writer".into())
        .spawn(move || {
            let mut writer = writer;
            for buf in wrx {
                if let Err(e) = writer.write(&buf) {
                    wjob.fail(
                        &format!("failed to flush traffic to disk: {e}"),
                        "write_error",
                    );
                    return;
                }
            }
            if let Err(e) = writer.finish() {
                wjob.fail(
                    &format!("failed to flush traffic to disk: {e}"),
                    "write_error",
                );
            }
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            set_running(None);
            job.fail(&format!("cannot start the writer: {e}"), "write_error");
            finish(&job, &Encoder::default());
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + job.cfg.duration;
    let mut enc = Encoder::default();
    // The queue is drained on a tick rather than awaited: a receiver parked
    // in `recv` is woken by every send, one task wake-up per client
    // command, which was most of the capture's cost per command.
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = job.stop.notified() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {}
        }
        let mut closed = false;
        loop {
            match rx.try_recv() {
                Ok(it) => enc.encode(it),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            break;
        }
        if enc.buf.len() >= FLUSH_AT {
            let buf = std::mem::take(&mut enc.buf);
            if let Err(std::sync::mpsc::TrySendError::Full(_)) = wtx.try_send(buf) {
                job.fail(
                    "flushing traffic to disk is too slow, buffer is full",
                    "disk_slow",
                );
                break;
            }
        }
    }
    set_running(None);
    // What connections queued before the stop (the queue is drained on a
    // tick, so a cancel can find commands there that were sent before it).
    while let Ok(it) = rx.try_recv() {
        enc.encode(it);
    }
    drop(rx);
    let rest = std::mem::take(&mut enc.buf);
    let _ = tokio::task::spawn_blocking(move || {
        if !rest.is_empty() {
            let _ = wtx.send(rest);
        }
        drop(wtx);
        let _ = thread.join();
    })
    .await;
    finish(&job, &enc);
}

fn finish(job: &CaptureJob, enc: &Encoder) {
    let end = SystemTime::now();
    let meta = Meta {
        version: "v1".into(),
        duration: end.duration_since(job.start).unwrap_or_default().as_nanos() as u64,
        cmds: enc.cmds,
        filtered_cmds: enc.filtered,
        encrypt_method: job.cfg.encryption_method.to_ascii_lowercase(),
    };
    if let Err(e) = store::write_meta(&job.cfg.output, &meta) {
        job.fail(&format!("failed to write meta: {e}"), "write_error");
    }
    let mut st = job.st.lock().expect("job lock");
    st.done = true;
    st.end = Some(end);
    st.cmds = enc.cmds;
    st.filtered = enc.filtered;
    match &st.err {
        Some(e) => error!(cmds = enc.cmds, "traffic capture failed: {e}"),
        None => info!(
            cmds = enc.cmds,
            filtered = enc.filtered,
            "traffic capture finished"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_statements_are_left_out() {
        assert!(is_sensitive(b"create user u identified by 'x'"));
        assert!(is_sensitive(b"  GRANT all on *.* to u"));
        assert!(is_sensitive(b"SET PASSWORD = 'x'"));
        assert!(!is_sensitive(b"SET @a = 1"));
        assert!(!is_sensitive(b"select 'create user'"));
    }
}
