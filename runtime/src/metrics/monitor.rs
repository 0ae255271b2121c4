//! The process monitor behind `tiproxy_monitor_*` (TiProxy's system time
//! monitor): every 100 ms it compares the wall clock with its last reading
//! and counts a jump backwards (which confuses logs, certificates and
//! leases); every 5 s it counts that the process is alive.

use std::time::{Duration, SystemTime};

use tracing::error;

use super::metrics;

/// Ticks between two counts of `tiproxy_monitor_keep_alive_total`.
const KEEP_ALIVE_TICKS: u32 = 50;

/// Runs until the task is aborted (at shutdown).
pub async fn monitor_loop() {
    let tick = Duration::from_millis(100);
    let mut ticks = 0u32;
    loop {
        let last = SystemTime::now();
        tokio::time::sleep(tick).await;
        let now = SystemTime::now();
        if let Err(back) = now.duration_since(last) {
            metrics().time_jump_back.inc();
            error!(
                jumped_back = ?back.duration(),
                "system time jumped backward: timestamps in logs and leases may be wrong"
            );
        }
        ticks += 1;
        if ticks >= KEEP_ALIVE_TICKS {
            ticks = 0;
            metrics().keep_alive.inc();
        }
    }
}
