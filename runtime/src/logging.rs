//! Logging from `[log]`: the encoders (`tidb`, TiDB's unified log format and
//! the default; `json`; `console`), the output (stderr, or a file rotated by
//! size, age and count as TiProxy's lumberjack does), and the live parts a
//! reload may change (level and file).
//!
//! Owns the global tracing subscriber. It never decides what is logged; the
//! rule for the rest of the runtime is that a healthy, idle proxy is quiet at
//! `info`, and a client's own SQL error is a metric, not a log line.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use time::{OffsetDateTime, UtcOffset};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFile};

/// TiProxy's default for `max-size = 0`: 300 MB.
const DEFAULT_MAX_SIZE_MB: u64 = 300;

/// The local UTC offset, read once at start (reading it later is unsound on
/// Linux once threads run, so a DST change shows after a restart).
fn local_offset() -> UtcOffset {
    static OFFSET: OnceLock<UtcOffset> = OnceLock::new();
    *OFFSET.get_or_init(|| UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC))
}

fn now_local() -> OffsetDateTime {
    OffsetDateTime::now_utc().to_offset(local_offset())
}

// ------------------------------------------------------------ tidb encoder

/// TiDB's unified log format:
/// `[2024/01/02 15:04:05.000 +08:00] [INFO] [proxy.rs:12] ["a message"] [key=value]`.
/// The message, keys and values are quoted only when they hold blanks,
/// control characters or one of `\ " [ ] =`, as TiDB and TiProxy do.
#[derive(Debug, Clone, Copy, Default)]
pub struct TidbFormat;

impl<S, N> FormatEvent<S, N> for TidbFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let m = event.metadata();
        let line = tidb_line(
            now_local(),
            m.level(),
            m.file(),
            m.line(),
            &fields.message,
            &fields.pairs,
        );
        w.write_str(&line)
    }
}

/// One event's message and fields, as text.
#[derive(Debug, Default)]
struct EventFields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.pairs.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.pairs.push((field.name(), format!("{value:?}")));
        }
    }
}

/// One line in TiDB's format, newline included.
pub fn tidb_line(
    at: OffsetDateTime,
    level: &Level,
    file: Option<&str>,
    line: Option<u32>,
    message: &str,
    fields: &[(&str, String)],
) -> String {
    let mut out = String::with_capacity(96 + message.len());
    let (oh, om, _) = at.offset().as_hms();
    let sign = if at.offset().is_negative() { '-' } else { '+' };
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "[{:04}/{:02}/{:02} {:02}:{:02}:{:02}.{:03} {sign}{:02}:{:02}] [{}]",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond(),
        oh.unsigned_abs(),
        om.unsigned_abs(),
        level.as_str(),
    );
    if let Some(f) = file {
        let base = f.rsplit(['/', '\\']).next().unwrap_or(f);
        let _ = write!(out, " [{base}:{}]", line.unwrap_or(0));
    }
    out.push_str(" [");
    push_tidb_string(&mut out, message);
    out.push(']');
    for (k, v) in fields {
        out.push_str(" [");
        push_tidb_string(&mut out, k);
        out.push('=');
        push_tidb_string(&mut out, v);
        out.push(']');
    }
    out.push('\n');
    out
}

/// TiDB's rule for a string in a log line: quoted when it holds a blank, a
/// control character or one of `\ " [ ] =`; `"` and control characters
/// escaped inside.
fn push_tidb_string(out: &mut String, s: &str) {
    let quote = s
        .chars()
        .any(|c| c <= ' ' || matches!(c, '\\' | '"' | '[' | ']' | '='));
    if quote {
        out.push('"');
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    if quote {
        out.push('"');
    }
}

// ------------------------------------------------------------ rotation

/// A log file rotated as TiProxy (lumberjack) does: when a write would take
/// it past `max-size`, it is renamed to `<name>-<local time>.<ext>`
/// (`tiproxy-2024-01-02T15-04-05.000.log`) and a new one is started; then
/// rotated files beyond `max-backups` (newest kept) or older than
/// `max-days` are deleted. 0 means no limit for both.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_backups: usize,
    max_age: Option<Duration>,
}

impl RotatingFile {
    /// Opens (appending to) the file of `[log.log-file]`.
    pub fn open(cfg: &LogFile) -> io::Result<Self> {
        let mb = if cfg.max_size == 0 {
            DEFAULT_MAX_SIZE_MB
        } else {
            cfg.max_size
        };
        Self::with_limits(
            Path::new(&cfg.filename),
            mb.saturating_mul(1024 * 1024),
            cfg.max_backups as usize,
            (cfg.max_days > 0).then(|| Duration::from_secs(cfg.max_days.saturating_mul(86_400))),
        )
    }

    /// Opens `path` with limits in bytes, files and age.
    pub fn with_limits(
        path: &Path,
        max_size: u64,
        max_backups: usize,
        max_age: Option<Duration>,
    ) -> io::Result<Self> {
        if path.is_dir() {
            return Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let f = Self {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1),
            max_backups,
            max_age,
        };
        f.remove_old();
        Ok(f)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name_parts(&self) -> (String, String) {
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = self
            .path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        (stem, ext)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let (stem, ext) = self.name_parts();
        let dir = self.path.parent().unwrap_or(Path::new(""));
        let mut at = now_local();
        let backup = loop {
            let name = format!(
                "{stem}-{:04}-{:02}-{:02}T{:02}-{:02}-{:02}.{:03}{ext}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second(),
                at.millisecond()
            );
            let p = dir.join(name);
            if !p.exists() {
                break p;
            }
            // Two rotations in one millisecond: the later gets the next one.
            at += time::Duration::milliseconds(1);
        };
        std::fs::rename(&self.path, &backup)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        self.remove_old();
        Ok(())
    }

    /// Rotated files, newest first.
    pub fn backups(&self) -> Vec<PathBuf> {
        let (stem, ext) = self.name_parts();
        let prefix = format!("{stem}-");
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut list: Vec<(String, PathBuf)> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let stamp = name.strip_prefix(&prefix)?.strip_suffix(&ext)?;
                is_backup_stamp(stamp).then(|| (stamp.to_string(), e.path()))
            })
            .collect();
        // The stamp sorts as the time it names.
        list.sort_by(|a, b| b.0.cmp(&a.0));
        list.into_iter().map(|(_, p)| p).collect()
    }

    fn remove_old(&self) {
        let now = SystemTime::now();
        for (i, p) in self.backups().into_iter().enumerate() {
            let too_many = self.max_backups > 0 && i >= self.max_backups;
            let too_old = self.max_age.is_some_and(|age| {
                std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|d| d > age)
            });
            if too_many || too_old {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// `2006-01-02T15-04-05.000`: digits where the digits go.
fn is_backup_stamp(s: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd-dd-dd.ddd";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE).all(|(c, want)| match want {
            b'd' => c.is_ascii_digit(),
            w => c == *w,
        })
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

// ------------------------------------------------------------ the subscriber

/// Where lines go; swapped by a reload of `[log.log-file]`.
#[derive(Debug)]
enum Output {
    Stderr,
    File(RotatingFile),
}

/// The shared output behind the subscriber's writer.
#[derive(Debug)]
pub struct Sink(Mutex<Output>);

impl Write for &Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Output::Stderr => io::stderr().write(buf),
            Output::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Output::Stderr => io::stderr().flush(),
            Output::File(f) => f.flush(),
        }
    }
}

/// Hands the subscriber the shared sink.
#[derive(Debug, Clone)]
struct SinkWriter(Arc<Sink>);

impl<'a> MakeWriter<'a> for SinkWriter {
    type Writer = &'a Sink;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

type Base = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// What a reload can change after start.
#[derive(Debug)]
struct Live {
    filter: reload::Handle<EnvFilter, Registry>,
    sink: Arc<Sink>,
}

static LIVE: OnceLock<Live> = OnceLock::new();

fn filter_for(level: &str) -> EnvFilter {
    let level = match level.to_lowercase().as_str() {
        "fatal" => "error".to_string(),
        l => l.to_string(),
    };
    EnvFilter::new(format!("{level},hyper=warn,rustls=warn,h2=warn,tower=warn"))
}

fn open_output(cfg: &LogFile) -> Result<Output, String> {
    if cfg.filename.is_empty() {
        return Ok(Output::Stderr);
    }
    RotatingFile::open(cfg)
        .map(Output::File)
        .map_err(|e| format!("log.log-file.filename: cannot open {}: {e}", cfg.filename))
}

/// Installs the global subscriber. `RUST_LOG`, when set, replaces
/// `log.level` at start; a `log.level` changed later (file or API) replaces
/// it in turn.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    local_offset();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| filter_for(&cfg.level));
    let sink = Arc::new(Sink(Mutex::new(open_output(&cfg.log_file)?)));
    let to_terminal =
        cfg.log_file.filename.is_empty() && io::IsTerminal::is_terminal(&io::stderr());
    let writer = SinkWriter(sink.clone());
    let fmt: Box<dyn Layer<Base> + Send + Sync> = match cfg.encoder.as_str() {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_file(true)
            .with_line_number(true)
            .with_writer(writer)
            .boxed(),
        "console" => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(to_terminal)
            .with_writer(writer)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .event_format(TidbFormat)
            .with_writer(writer)
            .boxed(),
    };
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| e.to_string())?;
    let _ = LIVE.set(Live {
        filter: handle,
        sink,
    });
    Ok(())
}

/// A checked change of the live logging settings, not yet in effect.
#[derive(Debug, Default)]
#[must_use = "a prepared change does nothing until committed"]
pub struct Prepared {
    filter: Option<EnvFilter>,
    output: Option<Output>,
}

/// Checks what changes from `old` to `new` (level, log file) and prepares
/// it; nothing changes until [`Prepared::commit`]. The encoder needs a
/// restart and is left to the caller to report.
pub fn prepare(old: &LogConfig, new: &LogConfig) -> Result<Prepared, String> {
    let mut p = Prepared::default();
    if LIVE.get().is_none() {
        return Ok(p);
    }
    if old.level != new.level {
        p.filter = Some(filter_for(&new.level));
    }
    if old.log_file != new.log_file {
        p.output = Some(open_output(&new.log_file)?);
    }
    Ok(p)
}

impl Prepared {
    /// Puts the change in effect.
    pub fn commit(self) {
        let Some(live) = LIVE.get() else { return };
        if let Some(f) = self.filter
            && let Err(e) = live.filter.reload(f)
        {
            tracing::error!("cannot change the log level: {e}");
        }
        if let Some(o) = self.output {
            *live.sink.0.lock().unwrap_or_else(|e| e.into_inner()) = o;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidb_line_has_tidbs_shape() {
        let at = time::macros::datetime!(2024-01-02 15:04:05.007 +08:00);
        let l = tidb_line(
            at,
            &Level::INFO,
            Some("runtime/src/proxy.rs"),
            Some(12),
            "tiproxy started",
            &[
                ("api", "127.0.0.1:3080".into()),
                ("sql", "[127.0.0.1:6000]".into()),
            ],
        );
        assert_eq!(
            l,
            "[2024/01/02 15:04:05.007 +08:00] [INFO] [proxy.rs:12] [\"tiproxy started\"] [api=127.0.0.1:3080] [sql=\"[127.0.0.1:6000]\"]\n"
        );
        let at = time::macros::datetime!(2024-12-31 23:59:59.999 -03:30);
        let l = tidb_line(at, &Level::WARN, None, None, "ok", &[]);
        assert_eq!(l, "[2024/12/31 23:59:59.999 -03:30] [WARN] [ok]\n");
    }

    #[test]
    fn tidb_strings_quote_and_escape_as_tidb() {
        let s = |v: &str| {
            let mut o = String::new();
            push_tidb_string(&mut o, v);
            o
        };
        assert_eq!(s("plain"), "plain");
        assert_eq!(s(""), "");
        assert_eq!(s("\n\r\""), "\"\\n\\r\\\"\"");
        for c in ['\\', '"', '[', ']', '=', ' '] {
            let esc = if c == '"' { "\\\"" } else { "" };
            let want = if c == '"' {
                format!("\"ff{esc}\"")
            } else {
                format!("\"ff{c}\"")
            };
            assert_eq!(s(&format!("ff{c}")), want, "{c:?}");
        }
        assert_eq!(s("a\u{1}b"), "\"a\\u0001b\"");
        assert_eq!(s("日本"), "日本");
    }

    /// The encoder as the subscriber uses it: fields, message and caller.
    #[test]
    fn tidb_format_through_a_subscriber() {
        let buf = Arc::new(Sink(Mutex::new(Output::Stderr)));
        let dir = tempdir();
        let path = dir.join("t.log");
        *buf.0.lock().unwrap() =
            Output::File(RotatingFile::with_limits(&path, 1 << 20, 0, None).expect("open"));
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(TidbFormat)
                .with_writer(SinkWriter(buf.clone())),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(backend = %"10.0.0.1:4000", connections = 3, "backend is draining");
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let line = text.lines().next().expect("a line");
        let (stamp, rest) = line.split_once("] ").expect("stamp");
        assert_eq!(
            stamp.len(),
            "[2024/01/02 15:04:05.000 +08:00".len(),
            "{line}"
        );
        assert!(rest.starts_with("[WARN] [logging.rs:"), "{line}");
        assert!(
            rest.ends_with("] [\"backend is draining\"] [backend=10.0.0.1:4000] [connections=3]"),
            "{line}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "tiproxy-logging-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn rotates_at_max_size_and_keeps_max_backups() {
        let dir = tempdir();
        let path = dir.join("tiproxy.log");
        let mut f = RotatingFile::with_limits(&path, 100, 2, None).expect("open");
        let line = [b'x'; 40];
        // 40 + 40 fit; the third write rotates: 5 rotations over 12 writes.
        for _ in 0..12 {
            f.write_all(&line).expect("write");
        }
        let backups = f.backups();
        assert_eq!(backups.len(), 2, "max-backups = 2: {backups:?}");
        for b in &backups {
            let name = b.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.starts_with("tiproxy-") && name.ends_with(".log"),
                "{name}"
            );
            assert_eq!(std::fs::metadata(b).unwrap().len(), 80, "{name}");
        }
        assert!(backups[0] > backups[1], "newest first: {backups:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 80);
        // Unrelated files in the directory are never touched.
        std::fs::write(dir.join("tiproxy-notes.log"), "keep").unwrap();
        std::fs::write(dir.join("other.log"), "keep").unwrap();
        for _ in 0..4 {
            f.write_all(&line).expect("write");
        }
        assert!(dir.join("tiproxy-notes.log").exists());
        assert!(dir.join("other.log").exists());
        assert_eq!(f.backups().len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reopening_appends_and_counts_the_existing_size() {
        let dir = tempdir();
        let path = dir.join("a.log");
        std::fs::write(&path, [b'y'; 90]).unwrap();
        let mut f = RotatingFile::with_limits(&path, 100, 0, None).expect("open");
        f.write_all(b"0123456789").unwrap();
        assert!(f.backups().is_empty(), "90 + 10 fits exactly");
        f.write_all(b"z").unwrap();
        assert_eq!(f.backups().len(), 1, "the 101st byte rotates");
        assert_eq!(std::fs::read(&path).unwrap(), b"z");
        // max-backups = 0 keeps every backup.
        for _ in 0..3 {
            f.write_all(&[b'q'; 100]).unwrap();
        }
        assert_eq!(f.backups().len(), 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn old_backups_go_after_max_days() {
        let dir = tempdir();
        let path = dir.join("p.log");
        let old = dir.join("p-2020-01-01T00-00-00.000.log");
        std::fs::write(&old, "old").unwrap();
        let week_ago = SystemTime::now() - Duration::from_secs(7 * 86_400);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(week_ago)
            .unwrap();
        let recent = dir.join("p-2099-01-01T00-00-00.000.log");
        std::fs::write(&recent, "recent").unwrap();
        let cfg = LogFile {
            filename: path.display().to_string(),
            max_size: 1,
            max_days: 3,
            max_backups: 0,
        };
        let f = RotatingFile::open(&cfg).expect("open");
        assert!(
            !old.exists(),
            "a week-old backup is removed with max-days = 3"
        );
        assert!(recent.exists());
        assert_eq!(f.backups(), vec![recent]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_directory_is_not_a_log_file() {
        let dir = tempdir();
        let e = RotatingFile::with_limits(&dir, 10, 0, None).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
