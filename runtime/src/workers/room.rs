//! How much CPU the machine has to spare, and how much the proxy uses: the
//! placement monitor's view of "what else runs".
//!
//! A second busy worker thread only helps when there is a core for it to
//! run on. On a machine the proxy shares with the database or the clients
//! and that has no idle CPU (the benchmark's 2 cores under sysbench, a
//! TiProxy beside a saturated TiDB), two threads compete with the work
//! they serve and pay more wake-ups per query than one (HAProxy
//! `nbthread 1` against `nbthread 2`), and tokio's busy time counts a
//! thread waiting for a CPU as busy, so a worker looks hot exactly when
//! spreading cannot help.
//!
//! Spare CPU is the host's idle time (`/proc/stat`, idle + iowait), and
//! when the proxy's cgroup has a CPU quota (v2 `cpu.max`, v1
//! `cpu.cfs_quota_us`), no more than the quota's headroom. The proxy's own
//! use is its process CPU clock. Elsewhere than Linux nothing is read and
//! the policy goes by busy time alone.

use std::time::{Duration, Instant};

/// CPU over one monitor interval, in cores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    /// Cores idle that this process could have used.
    pub spare: f64,
    /// Cores this process used.
    pub used: f64,
}

/// Counters read at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    at: Instant,
    /// This process's CPU time.
    used: Duration,
    /// Host: (idle ticks, all ticks, CPUs).
    host: Option<(u64, u64, usize)>,
    /// Cgroup: (usage in µs, quota in cores).
    cgroup: Option<(u64, f64)>,
}

impl Sample {
    /// Reads the counters now.
    pub(crate) fn now() -> Self {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        let used = Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        );
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let host = read("/proc/stat").as_deref().and_then(host_ticks);
        let cgroup = read("/proc/self/cgroup")
            .as_deref()
            .and_then(|c| cgroup_cpu(c, read));
        Self {
            at: Instant::now(),
            used,
            host,
            cgroup,
        }
    }

    /// The room between an earlier sample and this one; `None` when the
    /// host's counters cannot be read.
    pub(crate) fn since(&self, earlier: &Sample) -> Option<Room> {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let used = self.used.saturating_sub(earlier.used).as_secs_f64() / wall;
        let (idle1, all1, cpus) = self.host?;
        let (idle0, all0, _) = earlier.host?;
        let all = all1.saturating_sub(all0);
        if all == 0 {
            return None;
        }
        let mut spare = idle1.saturating_sub(idle0) as f64 / all as f64 * cpus as f64;
        if let (Some((u1, quota)), Some((u0, _))) = (self.cgroup, earlier.cgroup) {
            let cgroup_used = u1.saturating_sub(u0) as f64 / 1e6 / wall;
            spare = spare.min((quota - cgroup_used).max(0.0));
        }
        Some(Room { spare, used })
    }
}

/// Idle (idle + iowait) and all ticks of the `cpu` line of `/proc/stat`,
/// and how many CPUs it sums.
fn host_ticks(stat: &str) -> Option<(u64, u64, usize)> {
    let mut lines = stat.lines();
    let total = lines.next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user and nice).
    let v: Vec<u64> = total
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((v[3] + v[4], v.iter().sum(), cpus.max(1)))
}

/// The CPU cgroup's usage (µs) and quota (cores), v2 (`0::/path`,
/// `cpu.max` and `cpu.stat`) or v1 (`N:cpu,cpuacct:/path`); `None`
/// without a quota.
fn cgroup_cpu(proc_self_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<(u64, f64)> {
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_end_matches('/');
        if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            // "max 100000": no quota.
            let max = read(&format!("{dir}/cpu.max"))?;
            let mut f = max.split_whitespace();
            let quota: f64 = f.next()?.parse().ok()?;
            let period: f64 = f.next()?.parse().ok()?;
            let stat = read(&format!("{dir}/cpu.stat"))?;
            let usage = stat.lines().find_map(|l| {
                l.strip_prefix("usage_usec ")
                    .and_then(|v| v.trim().parse().ok())
            })?;
            return (period > 0.0).then_some((usage, quota / period));
        } else if controllers.split(',').any(|c| c == "cpu") {
            let dir = format!("/sys/fs/cgroup/{controllers}{path}");
            let num =
                |file: &str| -> Option<f64> { read(&format!("{dir}/{file}"))?.trim().parse().ok() };
            let quota = num("cpu.cfs_quota_us")?; // -1: no quota
            let period = num("cpu.cfs_period_us")?;
            let usage_ns = read(&format!("{dir}/cpuacct.usage"))
                .or_else(|| read(&format!("/sys/fs/cgroup/cpuacct{path}/cpuacct.usage")))?;
            let usage_ns: u64 = usage_ns.trim().parse().ok()?;
            return (quota > 0.0 && period > 0.0).then_some((usage_ns / 1000, quota / period));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_idle_counts_idle_and_iowait_over_all_cpus() {
        let stat = "cpu  100 5 50 800 20 1 2 3 7 0\ncpu0 50 2 25 400 10 0 1 1 0 0\ncpu1 50 3 25 400 10 1 1 2 0 0\nintr 1\n";
        assert_eq!(host_ticks(stat), Some((820, 981, 2)));
        assert_eq!(host_ticks("intr 1\n"), None);
        assert_eq!(host_ticks("cpu  x y\n"), None);
    }

    #[test]
    fn a_cgroup_quota_is_read_in_cores() {
        let files = |path: &str| -> Option<String> {
            Some(
                match path {
                    "/sys/fs/cgroup/k8s/cpu.max" => "150000 100000\n",
                    "/sys/fs/cgroup/k8s/cpu.stat" => "usage_usec 42\nuser_usec 40\n",
                    "/sys/fs/cgroup/free/cpu.max" => "max 100000\n",
                    "/sys/fs/cgroup/free/cpu.stat" => "usage_usec 42\n",
                    "/sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_quota_us" => "200000\n",
                    "/sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_period_us" => "100000\n",
                    "/sys/fs/cgroup/cpu,cpuacct/app/cpuacct.usage" => "5000000\n",
                    "/sys/fs/cgroup/cpu,cpuacct/open/cpu.cfs_quota_us" => "-1\n",
                    "/sys/fs/cgroup/cpu,cpuacct/open/cpu.cfs_period_us" => "100000\n",
                    "/sys/fs/cgroup/cpu,cpuacct/open/cpuacct.usage" => "1\n",
                    _ => return None,
                }
                .into(),
            )
        };
        assert_eq!(cgroup_cpu("0::/k8s\n", files), Some((42, 1.5)));
        assert_eq!(cgroup_cpu("0::/free\n", files), None, "cpu.max = max");
        assert_eq!(
            cgroup_cpu("4:cpu,cpuacct:/app\n0::/\n", files),
            Some((5000, 2.0))
        );
        assert_eq!(cgroup_cpu("4:cpu,cpuacct:/open\n", files), None, "quota -1");
        assert_eq!(cgroup_cpu("0::/none\n", files), None);
    }

    #[test]
    fn room_is_host_idle_capped_by_the_quota_headroom() {
        let t = Instant::now();
        let at = |secs: u64, used_ms: u64, idle: u64, all: u64, cg: Option<(u64, f64)>| Sample {
            at: t + Duration::from_secs(secs),
            used: Duration::from_millis(used_ms),
            host: Some((idle, all, 4)),
            cgroup: cg,
        };
        // 4 CPUs, half idle over 1 s: 2 cores spare; the process used 0.3.
        let r = at(1, 400, 600, 1400, None)
            .since(&at(0, 100, 400, 1000, None))
            .unwrap();
        assert!(
            (r.spare - 2.0).abs() < 1e-9 && (r.used - 0.3).abs() < 1e-9,
            "{r:?}"
        );
        // A 1.5-core quota with 1.2 used leaves 0.3, whatever the host has.
        let r = at(1, 400, 600, 1400, Some((1_200_000, 1.5)))
            .since(&at(0, 100, 400, 1000, Some((0, 1.5))))
            .unwrap();
        assert!((r.spare - 0.3).abs() < 1e-9, "{r:?}");
        // Unreadable host counters: no room known.
        let mut blind = at(1, 400, 0, 0, None);
        blind.host = None;
        assert_eq!(blind.since(&at(0, 100, 400, 1000, None)), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let a = Sample::now();
        let b = Sample::now();
        if cfg!(target_os = "linux") {
            assert!(a.host.is_some(), "/proc/stat is readable on Linux");
        }
        assert!(b.used >= a.used);
    }
}
