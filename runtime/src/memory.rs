//! `proxy.high-memory-usage-reject-threshold`: new clients are refused
//! while the memory in use reaches that share of the limit, so a proxy near
//! its limit is not OOM-killed with every session on it (TiProxy's
//! `pkg/manager/memory`, default 0.9, 0 = off, values under 0.5 raised to
//! 0.5).
//!
//! What counts, as TiProxy (through TiDB's `util/memory`) measures it: the
//! limit is the proxy's memory cgroup limit when it has one below the
//! host's memory, else the host's `MemTotal`; in use is the cgroup's usage
//! without its inactive file cache (the kernel reclaims that before it
//! OOM-kills; what the kubelet calls the working set), else `MemTotal -
//! MemAvailable`. Sampled every [`REFRESH`]; each session accepted since
//! adds an estimate of its buffers, so a burst is refused before the next
//! sample. A sample older than [`EXPIRE`] (the host cannot be read) lets
//! everyone in: the check fails open, as TiProxy's does.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tiproxy_core::health::LocalExhaustion;

/// How often the memory in use is read (TiProxy: 5 s).
pub const REFRESH: Duration = Duration::from_secs(5);
/// A sample older than this is not used (TiProxy: three refreshes).
pub const EXPIRE: Duration = Duration::from_secs(15);

/// Memory in use and its limit, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// In use.
    pub used: u64,
    /// The limit.
    pub limit: u64,
}

/// The threshold in effect and the last sample.
#[derive(Debug)]
pub struct MemoryGuard {
    /// The threshold in thousandths of the limit; 0 = off.
    threshold_permille: AtomicU64,
    sample: Mutex<Option<(Usage, Instant)>>,
    /// Bytes sessions accepted since the last sample are estimated to hold.
    since_sample: AtomicI64,
}

impl MemoryGuard {
    /// A guard with `threshold` (the configuration's value) and no sample.
    pub fn new(threshold: f64) -> Self {
        let g = Self {
            threshold_permille: AtomicU64::new(0),
            sample: Mutex::new(None),
            since_sample: AtomicI64::new(0),
        };
        g.set_threshold(threshold);
        g
    }

    /// Applies a (reloaded) threshold: 0 turns the check off, (0, 0.5) is
    /// raised to 0.5 as TiProxy does; the configuration check has refused
    /// values outside [0, 1].
    pub fn set_threshold(&self, threshold: f64) {
        let t = if threshold <= 0.0 {
            0.0
        } else {
            threshold.clamp(0.5, 1.0)
        };
        self.threshold_permille
            .store((t * 1000.0).round() as u64, Ordering::Relaxed);
    }

    /// Records a sample taken at `now`.
    pub fn record(&self, usage: Usage, now: Instant) {
        *self.sample.lock().expect("memory sample") = Some((usage, now));
        self.since_sample.store(0, Ordering::Relaxed);
    }

    /// A session was accepted (`bytes` > 0) or ended (< 0) since the last
    /// sample.
    pub fn session_delta(&self, bytes: i64) {
        self.since_sample.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Why a new client must be refused at `now`, if it must.
    pub fn refusal(&self, now: Instant) -> Option<LocalExhaustion> {
        let permille = self.threshold_permille.load(Ordering::Relaxed);
        if permille == 0 {
            return None;
        }
        let (usage, at) = (*self.sample.lock().expect("memory sample"))?;
        if now.saturating_duration_since(at) > EXPIRE || usage.limit == 0 {
            return None;
        }
        let used = usage
            .used
            .saturating_add_signed(self.since_sample.load(Ordering::Relaxed));
        // used / limit >= permille / 1000, in integers.
        (u128::from(used) * 1000 >= u128::from(usage.limit) * u128::from(permille)).then_some(
            LocalExhaustion::MemoryThreshold {
                used,
                limit: usage.limit,
                threshold_pct: (permille / 10) as u8,
            },
        )
    }
}

/// Reads this process's memory limit and use (see the module docs); `None`
/// when neither a cgroup nor `/proc/meminfo` can be read.
pub fn read() -> Option<Usage> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let host = meminfo.as_deref().and_then(host_usage);
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = cgroup_usage(&cgroups, |path| std::fs::read_to_string(path).ok());
    pick(host, cgroup)
}

/// The cgroup's numbers when it limits below the host's memory, else the
/// host's.
fn pick(host: Option<Usage>, cgroup: Option<Usage>) -> Option<Usage> {
    match (host, cgroup) {
        (Some(h), Some(c)) if c.limit < h.limit => Some(c),
        (None, Some(c)) => Some(c),
        (h, _) => h,
    }
}

/// `MemTotal` and `MemTotal - MemAvailable` from `/proc/meminfo` (kB).
fn host_usage(meminfo: &str) -> Option<Usage> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim_start_matches(':')
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    Some(Usage {
        used: total.saturating_sub(available),
        limit: total,
    })
}

/// The memory cgroup's limit and working set, v2 (`0::/path`) or v1
/// (`N:memory:/path`), at the usual mount points; `None` without a limit.
fn cgroup_usage(proc_self_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<Usage> {
    let stat_field = |stat: &str, name: &str| -> u64 {
        stat.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0)
    };
    let num = |s: Option<String>| -> Option<u64> { s?.trim().parse().ok() };
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_end_matches('/');
        if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let dir = format!("{root}{path}");
                // "max" (no limit) does not parse: no cgroup limit.
                let Some(limit) = num(read(&format!("{dir}/memory.max"))) else {
                    continue;
                };
                let current = num(read(&format!("{dir}/memory.current")))?;
                let stat = read(&format!("{dir}/memory.stat")).unwrap_or_default();
                let inactive = stat_field(&stat, "inactive_file");
                return Some(Usage {
                    used: current.saturating_sub(inactive),
                    limit,
                });
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            let limit = num(read(&format!("{dir}/memory.limit_in_bytes")))?;
            let usage = num(read(&format!("{dir}/memory.usage_in_bytes")))?;
            let stat = read(&format!("{dir}/memory.stat")).unwrap_or_default();
            let inactive = stat_field(&stat, "total_inactive_file");
            return Some(Usage {
                used: usage.saturating_sub(inactive),
                limit,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn host_and_cgroup_numbers_are_read_as_tidb_counts_them() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   18000000 kB\n";
        let host = host_usage(meminfo).expect("meminfo");
        assert_eq!(host.limit, 24_000_000 * 1024);
        assert_eq!(host.used, 6_000_000 * 1024);

        let files = |p: &str| -> Option<String> {
            match p {
                "/sys/fs/cgroup/memory/app/memory.limit_in_bytes" => Some("1073741824\n".into()),
                "/sys/fs/cgroup/memory/app/memory.usage_in_bytes" => Some("838860800\n".into()),
                "/sys/fs/cgroup/memory/app/memory.stat" => {
                    Some("cache 10\ntotal_inactive_file 104857600\n".into())
                }
                "/sys/fs/cgroup/k8s/memory.max" => Some("536870912\n".into()),
                "/sys/fs/cgroup/k8s/memory.current" => Some("314572800\n".into()),
                "/sys/fs/cgroup/k8s/memory.stat" => Some("anon 1\ninactive_file 52428800\n".into()),
                "/sys/fs/cgroup/free/memory.max" => Some("max\n".into()),
                _ => None,
            }
        };
        let v1 = cgroup_usage("5:devices:/\n4:memory:/app\n0::/", files).expect("v1");
        assert_eq!((v1.used, v1.limit), (700 * MIB, 1024 * MIB));
        let v2 = cgroup_usage("0::/k8s\n", files).expect("v2");
        assert_eq!((v2.used, v2.limit), (250 * MIB, 512 * MIB));
        assert_eq!(cgroup_usage("0::/free\n", files), None, "memory.max = max");

        // A cgroup limit above the host's memory is no limit.
        assert_eq!(pick(Some(host), Some(v1)), Some(v1));
        let huge = Usage {
            used: 1,
            limit: u64::MAX / 2,
        };
        assert_eq!(pick(Some(host), Some(huge)), Some(host));
        assert_eq!(pick(None, Some(v2)), Some(v2));
    }

    #[test]
    fn refuses_over_the_threshold_counts_new_sessions_and_fails_open() {
        let t0 = Instant::now();
        let g = MemoryGuard::new(0.9);
        assert_eq!(g.refusal(t0), None, "no sample yet");
        g.record(
            Usage {
                used: 890 * MIB,
                limit: 1000 * MIB,
            },
            t0,
        );
        assert_eq!(g.refusal(t0), None);
        // Sessions accepted since the sample push it over.
        g.session_delta(20 * MIB as i64);
        assert_eq!(
            g.refusal(t0),
            Some(LocalExhaustion::MemoryThreshold {
                used: 910 * MIB,
                limit: 1000 * MIB,
                threshold_pct: 90,
            })
        );
        // A stale sample lets everyone in.
        assert_eq!(g.refusal(t0 + EXPIRE + Duration::from_secs(1)), None);
        // Off, and raised to 50%.
        g.set_threshold(0.0);
        assert_eq!(g.refusal(t0), None);
        g.set_threshold(0.2);
        g.record(
            Usage {
                used: 500 * MIB,
                limit: 1000 * MIB,
            },
            t0,
        );
        assert!(g.refusal(t0).is_some(), "0.2 is raised to 0.5");
    }
}
