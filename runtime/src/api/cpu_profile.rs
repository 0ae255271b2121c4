//! `GET /api/debug/pprof/profile?seconds=N`: a CPU profile of the whole
//! process in pprof's format (gzip-compressed `profile.proto`, as Go's
//! `net/http/pprof` serves it), what TiProxy users attach to bug reports
//! and open with `go tool pprof`. Sampled at 100 Hz by the `pprof` crate
//! (SIGPROF and stack unwinding); one profile at a time.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use pprof::protos::Message;
use tracing::info;

use super::{Resp, error};

/// The longest profile asked for (seconds).
pub const MAX_SECONDS: u64 = 120;
/// Without `seconds=`, as Go's pprof handler.
const DEFAULT_SECONDS: u64 = 30;
/// Samples per second of CPU time (Go's default).
const FREQUENCY: i32 = 100;

/// A profile is being taken (the profiler is process-wide).
static BUSY: AtomicBool = AtomicBool::new(false);

/// Clears [`BUSY`] when the profile ends, however it ends.
struct Busy;

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.store(false, Ordering::Release);
    }
}

/// Takes a CPU profile for `seconds` (the query parameter, if given).
pub(super) async fn profile(seconds: Option<String>) -> Resp {
    let seconds = match seconds.as_deref() {
        None => DEFAULT_SECONDS,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if (1..=MAX_SECONDS).contains(&n) => n,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("seconds must be a whole number from 1 to {MAX_SECONDS}, not {s:?}"),
                );
            }
        },
    };
    if BUSY
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return error(
            StatusCode::CONFLICT,
            "a CPU profile is already being taken; ask again when it ends",
        );
    }
    let busy = Busy;
    info!(seconds, "taking a CPU profile");
    // On a blocking thread: the profile is mostly waiting, then symbolising
    // (CPU-heavy), neither of which may hold a worker of the proxy. The
    // flag clears when the profile ends, even if the client left.
    let taken = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        take(Duration::from_secs(seconds))
    })
    .await;
    match taken {
        Ok(Ok(body)) => Response::builder()
            .header("content-type", "application/octet-stream")
            .header("content-disposition", "attachment; filename=\"profile\"")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts"),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot take a CPU profile: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the CPU profile was lost: {e}"),
        ),
    }
}

/// Profiles the process for `length`; returns the gzip-compressed
/// `profile.proto`.
fn take(length: Duration) -> Result<Vec<u8>, String> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        // Unwinding through these from a signal handler is not safe.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(length);
    let report = guard.report().build().map_err(|e| e.to_string())?;
    drop(guard);
    let profile = report.pprof().map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    gz.write_all(&profile.encode_to_vec())
        .expect("compress to memory");
    Ok(gz.finish().expect("compress to memory"))
}
