//! `conf/grafana-tiproxy.json` cannot drift from the metrics: every PromQL
//! expression in it parses, and every metric and label it names is one the
//! proxy registers (read from the same registry `/api/metrics` serves).

use std::collections::{BTreeMap, BTreeSet};

use prometheus::proto::MetricType;
use promql_parser::label::Matchers;
use promql_parser::parser::{self, Expr, LabelModifier};
use serde_json::Value;
use tiproxy_tests::workspace;

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Metric name -> label names.
type Exported = BTreeMap<String, BTreeSet<String>>;

/// The metrics this build exports. A histogram `h` is listed as it is
/// scraped: `h_bucket` (with `le`), `h_sum` and `h_count`.
fn exported() -> Exported {
    let m = tiproxy_runtime::metrics::metrics();
    // Per-backend histograms have no samples before a backend exists.
    let histograms: BTreeSet<String> = m
        .gather()
        .iter()
        .filter(|f| f.get_field_type() == MetricType::HISTOGRAM)
        .map(|f| f.name().to_string())
        .chain(m.histograms().iter().cloned())
        .collect();
    let mut out = BTreeMap::new();
    for (name, labels) in m.families() {
        let labels: BTreeSet<String> = labels
            .into_iter()
            .chain(TARGET_LABELS.iter().map(|l| l.to_string()))
            .collect();
        if histograms.contains(&name) {
            let mut with_le = labels.clone();
            with_le.insert("le".into());
            out.insert(format!("{name}_bucket"), with_le);
            out.insert(format!("{name}_sum"), labels.clone());
            out.insert(format!("{name}_count"), labels);
        } else {
            out.insert(name, labels);
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets (rows nest
/// panels) and `label_values(metric, label)` template queries.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("query" | "definition", Value::String(q)) => {
                        if let Some(args) = q
                            .strip_prefix("label_values(")
                            .and_then(|r| r.strip_suffix(')'))
                        {
                            // label_values(selector, label): check both as
                            // `max by (label) (selector)`.
                            if let Some((sel, label)) = args.rsplit_once(',') {
                                out.push(format!("max by ({}) ({sel})", label.trim()));
                            }
                        }
                    }
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

/// Grafana's interval variables, replaced so the expression parses.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// The problems of one expression: unknown metrics and labels. Returns the
/// labels the expression's series can carry (for the enclosing `by`).
fn check(e: &Expr, exported: &Exported, problems: &mut Vec<String>) -> BTreeSet<String> {
    let selector = |name: &Option<String>, m: &Matchers, problems: &mut Vec<String>| {
        let Some(name) = name else {
            problems.push("a selector without a metric name".into());
            return BTreeSet::new();
        };
        let Some(labels) = exported.get(name) else {
            problems.push(format!("{name} is not exported"));
            return BTreeSet::new();
        };
        for matcher in m.matchers.iter().chain(m.or_matchers.iter().flatten()) {
            if !labels.contains(&matcher.name) {
                problems.push(format!("{name} has no label {}", matcher.name));
            }
        }
        labels.clone()
    };
    match e {
        Expr::VectorSelector(v) => selector(&v.name, &v.matchers, problems),
        Expr::MatrixSelector(m) => selector(&m.vs.name, &m.vs.matchers, problems),
        Expr::Aggregate(a) => {
            let inner = check(&a.expr, exported, problems);
            if let Some(p) = &a.param {
                check(p, exported, problems);
            }
            match &a.modifier {
                Some(LabelModifier::Include(by)) => {
                    for l in &by.labels {
                        if !inner.contains(l) {
                            problems.push(format!("`by ({l})`: no such label in {}", a.expr));
                        }
                    }
                    by.labels.iter().cloned().collect()
                }
                _ => inner,
            }
        }
        Expr::Binary(b) => {
            let mut l = check(&b.lhs, exported, problems);
            l.extend(check(&b.rhs, exported, problems));
            l
        }
        Expr::Paren(p) => check(&p.expr, exported, problems),
        Expr::Unary(u) => check(&u.expr, exported, problems),
        Expr::Subquery(s) => check(&s.expr, exported, problems),
        Expr::Call(c) => {
            let mut labels = BTreeSet::new();
            for a in &c.args.args {
                labels.extend(check(a, exported, problems));
            }
            labels
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
    }
}

/// Every problem of the expression, parse errors included.
fn problems(expr: &str, exported: &Exported) -> Vec<String> {
    match parser::parse(&substitute(expr)) {
        Ok(e) => {
            let mut p = Vec::new();
            check(&e, exported, &mut p);
            p
        }
        Err(e) => vec![format!("does not parse: {e}")],
    }
}

#[test]
fn every_metric_and_label_in_the_dashboard_is_exported() {
    let path = workspace().join("conf/grafana-tiproxy.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    expressions(&dash, &mut exprs);
    assert!(exprs.len() >= 15, "too few expressions found: {exprs:?}");

    let exported = exported();
    let mut bad = Vec::new();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for p in problems(e, &exported) {
            bad.push(format!("{e}\n    {p}"));
        }
        used.extend(exported.keys().filter(|n| e.contains(n.as_str())).cloned());
    }
    assert!(
        bad.is_empty(),
        "{}:\n  {}",
        path.display(),
        bad.join("\n  ")
    );

    // The dashboard shows every family the proxy exports.
    let unused: Vec<&String> = exported
        .keys()
        .filter(|n| !n.ends_with("_sum") && !n.ends_with("_count") && !used.contains(*n))
        .collect();
    assert!(
        unused.is_empty(),
        "metrics the dashboard does not show: {unused:?}; add a panel for them to {}",
        path.display()
    );
}

#[test]
fn the_check_catches_drift() {
    let exported = exported();
    assert!(problems("sum(rate(tiproxy_session_query_total[1m]))", &exported).is_empty());
    let cases = [
        ("rate(tiproxy_session_queries_total[1m])", "not exported"),
        (
            "sum by (migrate_res) (rate(tiproxy_session_query_total[1m]))",
            "no such label",
        ),
        ("tiproxy_server_connections{cmd_type=\"Query\"}", "no label"),
        ("rate(tiproxy_server_connections[5m]", "does not parse"),
        (
            "histogram_quantile(0.9, sum by (le) (rate(tiproxy_session_query_duration_seconds[1m])))",
            "not exported",
        ),
    ];
    for (expr, want) in cases {
        let p = problems(expr, &exported);
        assert!(
            p.iter().any(|p| p.contains(want)),
            "{expr}: expected a problem with {want:?}, got {p:?}"
        );
    }
}
