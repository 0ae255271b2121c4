//! The replay's report on the target: failures and other errors in
//! TiProxy's `tiproxy_traffic_replay.fail` and `.other_errors` tables
//! (pingcap/tiproxy `pkg/sqlreplay/report/tables.go`: the same columns and
//! keys, so TiProxy's tooling reads them). Differing results (`--compare`,
//! ours) go to `result_diff`, shaped like `fail`; its `sample_err_msg`
//! says what was captured and what was replayed. Values go in as hex literals,
//! safe under any SQL mode and character set; times in UTC.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::client::{Outcome, ReplayConn};
use super::format;
use super::replay::{Failure, OtherError, ReplayConfig};

/// Writes the failures and other errors to the target's
/// `tiproxy_traffic_replay` tables (TiProxy's `report/tables.go`).
pub async fn write(
    cfg: &ReplayConfig,
    replay_start: SystemTime,
    failures: &[Failure],
    differences: &[Failure],
    other: &BTreeMap<String, OtherError>,
) -> Result<(), String> {
    if failures.is_empty() && differences.is_empty() && other.is_empty() {
        return Ok(());
    }
    let mut c = ReplayConn::connect(&cfg.addr, &cfg.username, &cfg.password)
        .await
        .map_err(|e| e.to_string())?;
    let start = ts(replay_start);
    let mut stmts = vec![
        "set time_zone = '+00:00'".to_string(),
        "create database if not exists tiproxy_traffic_replay".to_string(),
        CREATE_FAIL.to_string(),
        CREATE_OTHER.to_string(),
    ];
    if !differences.is_empty() {
        stmts.push(CREATE_FAIL.replace(".fail(", ".result_diff("));
    }
    let tables = failures
        .iter()
        .map(|f| ("fail", f))
        .chain(differences.iter().map(|f| ("result_diff", f)));
    for (table, f) in tables {
        stmts.push(format!(
            "insert into tiproxy_traffic_replay.{table}(replay_start_time, cmd_type, digest, \
             sample_stmt, sample_err_msg, sample_conn_id, sample_filename, sample_fileline, \
             sample_capture_time, sample_replay_time, count) \
             values('{start}', {}, {}, {}, {}, {}, {}, {}, '{}', '{}', {}) \
             on duplicate key update count = count + {}",
            hex(f.cmd_type),
            hex(&f.digest),
            hex(&f.sample_stmt),
            hex(&f.sample_err_msg),
            f.sample_conn_id,
            hex(&f.sample_filename),
            f.sample_fileline,
            ts(f.sample_capture_time),
            ts(f.sample_replay_time),
            f.count,
            f.count
        ));
    }
    for (kind, o) in other {
        stmts.push(format!(
            "insert into tiproxy_traffic_replay.other_errors(replay_start_time, err_type, \
             sample_err_msg, sample_replay_time, count) values('{start}', {}, {}, '{}', {}) \
             on duplicate key update count = count + {}",
            hex(kind),
            hex(&o.sample_err_msg),
            ts(o.sample_replay_time),
            o.count,
            o.count
        ));
    }
    for s in stmts {
        let mut p = Vec::with_capacity(s.len() + 1);
        p.push(format::COM_QUERY);
        p.extend_from_slice(s.as_bytes());
        match c.execute(&p).await.map_err(|e| e.to_string())? {
            Some(Outcome::Err { code, message }) => {
                return Err(format!("ERROR {code}: {message}"));
            }
            _ => continue,
        }
    }
    c.quit().await;
    Ok(())
}

const CREATE_FAIL: &str = "create table if not exists tiproxy_traffic_replay.fail(
    replay_start_time timestamp,
    cmd_type varchar(32),
    digest varchar(128),
    sample_stmt text,
    sample_err_msg text,
    sample_conn_id bigint,
    sample_filename text,
    sample_fileline int,
    sample_capture_time timestamp,
    sample_replay_time timestamp,
    count bigint,
    primary key(replay_start_time, cmd_type, digest))";

const CREATE_OTHER: &str = "create table if not exists tiproxy_traffic_replay.other_errors(
    replay_start_time timestamp,
    err_type varchar(256),
    sample_err_msg text,
    sample_replay_time timestamp,
    count bigint,
    primary key(replay_start_time, err_type))";

/// A string as a hex literal: safe under any SQL mode and charset.
fn hex(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let mut out = String::with_capacity(3 + s.len() * 2);
    out.push_str("X'");
    for b in s.as_bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('\'');
    out
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` in UTC.
fn ts(t: SystemTime) -> String {
    let d = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
        d.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals() {
        assert_eq!(hex("a'b"), "X'612762'");
        assert_eq!(hex(""), "''");
    }
}
