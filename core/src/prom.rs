//! Reads the few values the balancer needs from a Prometheus text
//! exposition (TiDB's `/metrics` on its status port). The bytes come from
//! the network: anything malformed is skipped, never trusted.

/// The value of the first sample of each of `names` in `text` (any labels),
/// as TiProxy takes the first series of a family. `None` where a name has
/// no sample with a readable value.
pub fn first_values(text: &[u8], names: &[&str]) -> Vec<Option<f64>> {
    let mut out = vec![None; names.len()];
    let mut left = names.len();
    for line in text.split(|&b| b == b'\n') {
        if left == 0 {
            break;
        }
        let Some((name, value)) = sample(line) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| n.as_bytes() == name)
            && out[i].is_none()
        {
            out[i] = Some(value);
            left -= 1;
        }
    }
    out
}

/// `name{labels} value [timestamp]` or `name value [timestamp]`.
fn sample(line: &[u8]) -> Option<(&[u8], f64)> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let start = line.iter().position(|b| !b.is_ascii_whitespace())?;
    let line = &line[start..];
    if line.first() == Some(&b'#') {
        return None;
    }
    let name_end = line
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
        .unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() {
        return None;
    }
    if rest.first() == Some(&b'{') {
        rest = &rest[labels_end(rest)?..];
    }
    let value = rest
        .split(|b| b.is_ascii_whitespace())
        .find(|t| !t.is_empty())?;
    let value: f64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some((name, value))
}

/// The index just past the `}` closing the label set `rest` opens,
/// honouring quoted values with backslash escapes.
fn labels_end(rest: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in rest.iter().enumerate().skip(1) {
        match (quoted, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => quoted = false,
            (false, _, b'"') => quoted = true,
            (false, _, b'}') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_first_samples_of_tidb_metrics() {
        let text = b"# HELP process_cpu_seconds_total Total user and system CPU time.\n\
# TYPE process_cpu_seconds_total counter\n\
process_cpu_seconds_total 12.5\n\
tidb_server_maxprocs{instance=\"a}b\",k=\"q\\\"}\"} 8\n\
tidb_server_maxprocs 16\n\
process_resident_memory_bytes 1.2e+09 1700000000000\r\n\
go_gc_duration_seconds{quantile=\"0\"} NaN\n";
        let v = first_values(
            text,
            &[
                "process_cpu_seconds_total",
                "tidb_server_maxprocs",
                "process_resident_memory_bytes",
                "tidb_server_memory_quota_bytes",
                "go_gc_duration_seconds",
            ],
        );
        assert_eq!(v[0], Some(12.5));
        assert_eq!(
            v[1],
            Some(8.0),
            "first series, labels with quotes and braces"
        );
        assert_eq!(v[2], Some(1.2e9), "exponent, timestamp and CRLF");
        assert_eq!(v[3], None);
        assert!(v[4].is_some_and(f64::is_nan));
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = b"process_cpu_seconds_total\nprocess_cpu_seconds_total{a=\"x\" 3\n\
process_cpu_seconds_total{a=\"x\"} abc\n{} 4\nprocess_cpu_seconds_total 7\n";
        assert_eq!(
            first_values(text, &["process_cpu_seconds_total"]),
            vec![Some(7.0)]
        );
        assert_eq!(first_values(b"", &["x"]), vec![None]);
    }
}
