//! Embeds how the binaries were built, for `--version` (and the git hash
//! for PD registration): the git commit, the build time, the rustc version,
//! the target and the glibc baseline.
//!
//! `TIPROXY_GLIBC_BASELINE` is set by `scripts/dist.sh` to the glibc
//! version it links against (cargo-zigbuild's `<target>.2.17`); any other
//! build is linked against the build machine's glibc ("host").
//! `SOURCE_DATE_EPOCH` (the reproducible-builds convention) fixes the build
//! time.
use std::process::Command;

fn main() {
    let git = |args: &[&str]| -> Option<String> {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let hash = git(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // A new commit or checkout changes HEAD or the branch it names. Paths
    // asked of git, because in a worktree `.git` is a file, not the
    // directory. Only existing paths: cargo reruns the script on every build
    // for a missing one. A branch still packed (a fresh clone) is watched
    // through its directory, where a commit writes it.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"]
        .iter()
        .copied()
        .chain(branch.as_deref())
    {
        let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name]) else {
            continue;
        };
        let path = std::path::PathBuf::from(path);
        let existing = if path.exists() {
            Some(path.as_path())
        } else if name.starts_with("refs/") {
            path.parent().filter(|p| p.exists())
        } else {
            None
        };
        if let Some(p) = existing {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }

    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    let glibc = match std::env::var("TIPROXY_GLIBC_BASELINE") {
        Ok(v) if !v.is_empty() => v,
        _ if target.ends_with("-gnu") => "host".into(),
        _ => "none".into(),
    };

    println!("cargo:rustc-env=TIPROXY_GIT_HASH={hash}");
    println!("cargo:rustc-env=TIPROXY_BUILD_TIME={}", utc(seconds));
    println!("cargo:rustc-env=TIPROXY_RUSTC_VERSION={rustc_version}");
    println!("cargo:rustc-env=TIPROXY_TARGET={target}");
    println!("cargo:rustc-env=TIPROXY_GLIBC={glibc}");
    println!("cargo:rerun-if-env-changed=TIPROXY_GLIBC_BASELINE");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
}

/// `seconds` since the epoch as `YYYY-MM-DD hh:mm:ss UTC` (the civil-date
/// conversion of Howard Hinnant's `civil_from_days`; not worth a crate).
fn utc(seconds: i64) -> String {
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}
