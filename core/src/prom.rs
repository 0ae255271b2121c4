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
    labeled_sample(line).map(|(name, _, value)| (name, value))
}

/// The sum of the samples of `name` whose label `label` is present and,
/// unless `value` is empty, equal to `value` (TiProxy's way of reading a
/// counter by its `type`); `None` when no such sample has a number.
pub fn sum_by_label(text: &[u8], name: &str, label: &str, value: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.split(|&b| b == b'\n') {
        let Some((n, labels, v)) = labeled_sample(line) else {
            continue;
        };
        if n != name.as_bytes() || !v.is_finite() {
            continue;
        }
        match label_value(labels, label) {
            Some(l) if value.is_empty() || l == value.as_bytes() => {
                *sum.get_or_insert(0.0) += v;
            }
            _ => {}
        }
    }
    sum
}

/// The raw value of label `name` in a `{a="x",b="y"}` block (escapes left
/// as they are: the names compared here have none).
fn label_value<'a>(labels: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut rest = labels.strip_prefix(b"{")?;
    loop {
        let rest_start = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace() && *b != b',')?;
        rest = &rest[rest_start..];
        let eq = rest.iter().position(|&b| b == b'=')?;
        let key = rest[..eq].trim_ascii();
        let after = rest[eq + 1..].trim_ascii_start().strip_prefix(b"\"")?;
        let mut escaped = false;
        let end = after.iter().position(|&b| {
            let stop = !escaped && b == b'"';
            escaped = !escaped && b == b'\\';
            stop
        })?;
        if key == name.as_bytes() {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
}

/// A sample line: its name, its label block (empty or `{...}`) and value.
fn labeled_sample(line: &[u8]) -> Option<(&[u8], &[u8], f64)> {
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
    let mut labels: &[u8] = &[];
    if rest.first() == Some(&b'{') {
        let end = labels_end(rest)?;
        labels = &rest[..end];
        rest = &rest[end..];
    }
    let value = rest
        .split(|b| b.is_ascii_whitespace())
        .find(|t| !t.is_empty())?;
    let value: f64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some((name, labels, value))
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
    fn sums_counters_by_type_label() {
        let text = b"pd_client_cmd_handle_failed_cmds_duration_seconds_count{type=\"tso\"} 3\n\
pd_client_cmd_handle_failed_cmds_duration_seconds_count{type=\"get_region\"} 9\n\
tidb_tikvclient_request_seconds_count{scope=\"g\",store=\"1\",type=\"Get\"} 10\n\
tidb_tikvclient_request_seconds_count{ scope=\"a,\\\"b\", type=\"Commit\"} 5\n\
tidb_tikvclient_request_seconds_count{scope=\"g\"} 100\n";
        let f = "pd_client_cmd_handle_failed_cmds_duration_seconds_count";
        assert_eq!(sum_by_label(text, f, "type", "tso"), Some(3.0));
        assert_eq!(sum_by_label(text, f, "type", "tikvRPC"), None);
        let t = "tidb_tikvclient_request_seconds_count";
        assert_eq!(
            sum_by_label(text, t, "type", ""),
            Some(15.0),
            "any type, quoted commas and escapes, series without the label left out"
        );
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
