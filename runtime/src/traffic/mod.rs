//! Traffic capture and replay in TiProxy's native format
//! (`/api/traffic/*`, `tiproxyctl traffic ...`): the jobs and their
//! history (`traffic show`), the per-connection tap and the capture job
//! (`capture`), the replay job (`replay`), its MySQL client (`client`) and
//! its report on the target (`report`), what it reads from statement texts
//! (`statement`), the record format (`format`) and the files (`store`).
//!
//! Facts come from TiProxy's `pkg/sqlreplay/{capture,cmd,store,manager,replay,conn,report}`
//! and `pkg/server/api/traffic.go`; the code is this project's own.

pub mod capture;
mod client;
pub mod format;
pub mod replay;
mod report;
mod statement;
pub mod store;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

pub use capture::{CaptureConfig, ConnTap};
pub use replay::{PsClose, ReplayConfig};

/// Jobs kept for `traffic show`, as TiProxy keeps its history.
const HISTORY: usize = 10;

/// A capture or a replay.
enum Job {
    Capture(Arc<capture::CaptureJob>),
    Replay(Arc<replay::ReplayJob>),
}

impl Job {
    fn running(&self) -> bool {
        match self {
            Job::Capture(j) => j.running(),
            Job::Replay(j) => j.running(),
        }
    }

    fn show(&self) -> serde_json::Value {
        match self {
            Job::Capture(j) => j.show(),
            Job::Replay(j) => j.show(),
        }
    }
}

/// The jobs of this process.
#[derive(Default)]
struct Jobs {
    history: Vec<Job>,
}

impl Jobs {
    fn check_idle(&self) -> Result<(), String> {
        match self.history.iter().find(|x| x.running()) {
            Some(running) => Err(format!(
                "a job is running: {}",
                serde_json::to_string(&running.show()).unwrap_or_default()
            )),
            None => Ok(()),
        }
    }

    fn push(&mut self, job: Job) {
        self.history.push(job);
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }
}

fn jobs() -> &'static Mutex<Jobs> {
    static JOBS: OnceLock<Mutex<Jobs>> = OnceLock::new();
    JOBS.get_or_init(Default::default)
}

/// Starts a capture unless a job runs.
pub fn start_capture(cfg: CaptureConfig) -> Result<(), String> {
    let mut j = jobs().lock().expect("jobs lock");
    j.check_idle()?;
    let job = capture::start(cfg)?;
    j.push(Job::Capture(job));
    Ok(())
}

/// Starts a replay unless a job runs.
pub fn start_replay(cfg: ReplayConfig) -> Result<(), String> {
    let mut j = jobs().lock().expect("jobs lock");
    j.check_idle()?;
    let job = replay::start(cfg)?;
    j.push(Job::Replay(job));
    Ok(())
}

/// Stops the running job.
pub fn cancel() -> Result<String, String> {
    let j = jobs().lock().expect("jobs lock");
    match j.history.iter().find(|x| x.running()) {
        Some(Job::Capture(job)) => {
            job.fail("manually stopped", "canceled");
            Ok("stopped".into())
        }
        Some(Job::Replay(job)) => {
            job.fail("manually stopped");
            Ok("stopped".into())
        }
        None => Err("no job running".into()),
    }
}

/// `traffic show`: the jobs, oldest first.
pub fn show() -> serde_json::Value {
    let j = jobs().lock().expect("jobs lock");
    serde_json::Value::Array(j.history.iter().map(|x| x.show()).collect())
}

/// RFC 3339 (UTC, seconds).
fn rfc3339(t: SystemTime) -> String {
    let d = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

/// Go's `time.Duration.String()` for whole milliseconds and up:
/// `1h2m3s`, `15s`, `1.5s`, `500ms`.
pub fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let total = d.as_secs();
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    let ms = d.subsec_millis();
    let secs = if ms == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{ms:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// Parses Go's `time.ParseDuration` units (`ns` ... `h`, fractions and
/// sequences such as `1m30s`).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration \"{s}\"");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * unit;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_go_duration("10 parsecs").is_err());
        assert!(parse_go_duration("").is_err());
        assert_eq!(go_duration(Duration::from_secs(15)), "15s");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }
}
