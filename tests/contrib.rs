//! The shipped dashboard (contrib/grafana/ferry.json) and alert rules
//! (contrib/prometheus/ferry-rules.yml) against the real thing: every metric name their
//! PromQL uses must be exported by a live `ferry run` or a live `ferry route` (with the
//! suffixes Prometheus gives OpenMetrics families: `_total` for counters, `_bucket`,
//! `_count`, `_sum` for histograms), every label they match on must exist; and Debian's
//! promtool must accept the rules, pass their unit tests and parse the dashboard's queries.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::nodes::{get, start_router, tool};
use common::*;

const DASHBOARD: &str = include_str!("../contrib/grafana/ferry.json");
const RULES: &str = include_str!("../contrib/prometheus/ferry-rules.yml");

fn contrib(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(rel)
}

/// One selector in a PromQL expression: the metric name and its label matchers
/// (label, operator, value).
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OPERATORS: [&str; 6] = ["and", "or", "unless", "bool", "offset", "atan2"];
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The index just past the bracket matching the one at `open` (`(`/`)` or `[`/`]`),
/// stepping over string literals.
fn past_matching(b: &[u8], open: usize, close: u8) -> usize {
    let (o, mut depth, mut i) = (b[open], 0usize, open);
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => i = past_string(b, i, q) - 1,
            c if c == o => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!(
        "unbalanced {:?} in {:?}",
        o as char,
        String::from_utf8_lossy(b)
    );
}

fn past_string(b: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < b.len() && b[i] != quote {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    assert!(
        i < b.len(),
        "unterminated string in {:?}",
        String::from_utf8_lossy(b)
    );
    i + 1
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}
fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Label matchers inside `{...}`: `label op "value"`, comma-separated.
fn matchers(inner: &str) -> Vec<(String, String, String)> {
    let b = inner.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let label = inner[s..i].to_string();
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        let s = i;
        while matches!(b[i], b'=' | b'!' | b'~') {
            i += 1;
        }
        let op = inner[s..i].to_string();
        while b[i].is_ascii_whitespace() {
            i += 1;
        }
        let end = past_string(b, i, b[i]);
        let value = inner[i + 1..end - 1].to_string();
        i = end;
        assert!(
            !label.is_empty() && !op.is_empty(),
            "bad matchers {inner:?}"
        );
        out.push((label, op, value));
    }
    out
}

/// Every metric selector in a PromQL expression. Function and aggregation names (followed
/// by `(` or a grouping clause), keywords, grouping label lists, range and subquery
/// durations, numbers, strings and Grafana's `$variables` are not metric names.
fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if matches!(c, b'"' | b'\'' | b'`') {
            i = past_string(b, i, c);
        } else if c == b'[' {
            i = past_matching(b, i, b']');
        } else if c == b'{' {
            let end = past_string_aware_brace(b, i);
            let m = matchers(&expr[i + 1..end - 1]);
            // Attached to the name just before it, else a selector with no name.
            match out.last_mut() {
                Some(s) if s.matchers.is_empty() && expr[..i].trim_end().ends_with(&s.name) => {
                    s.matchers = m
                }
                _ => panic!("a selector without a metric name in {expr:?}"),
            }
            i = end;
        } else if c == b'$' {
            i += 1;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            // A number (1e-9, 0.99) or a duration (5m, 1h30m).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                if matches!(b[i], b'e' | b'E') && matches!(b.get(i + 1), Some(b'+' | b'-')) {
                    i += 1;
                }
                i += 1;
            }
        } else if is_ident_start(c) {
            let s = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[s..i];
            let n = next_non_space(i);
            let next = b.get(n).copied();
            if GROUPING.contains(&word) {
                if next == Some(b'(') {
                    i = past_matching(b, n, b')');
                }
            } else if OPERATORS.contains(&word) || next == Some(b'(') {
                // A keyword, or a function or aggregation call.
            } else if AGGREGATIONS.contains(&word) && {
                let rest = &expr[n..];
                rest.starts_with("by") || rest.starts_with("without")
            } {
                // `sum by (x) (...)`.
            } else {
                out.push(Selector {
                    name: word.to_string(),
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

fn past_string_aware_brace(b: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => i = past_string(b, i, q),
            b'}' => return i + 1,
            _ => i += 1,
        }
    }
    panic!("unbalanced {{ in {:?}", String::from_utf8_lossy(b));
}

#[test]
fn the_promql_reader_finds_metric_names_and_nothing_else() {
    let s = selectors(
        r#"sum by (instance, le) (rate(ferry_upload_seconds_bucket{instance=~"$instance", x!="a,b}"}[$__rate_interval] offset 5m)) / on (instance) group_left (state) clamp_min(ferry_files{state="failed"}, 1e-9) > 15 * 60 and max without (class) (ferry_x_total) or label_replace(up, "a", "$1", "b", "(.*)")"#,
    );
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ferry_upload_seconds_bucket",
            "ferry_files",
            "ferry_x_total",
            "up"
        ]
    );
    assert_eq!(
        s[0].matchers,
        [
            ("instance".into(), "=~".into(), "$instance".into()),
            ("x".into(), "!=".into(), "a,b}".into())
        ]
    );
    assert_eq!(
        s[1].matchers,
        [("state".into(), "=".into(), "failed".into())]
    );
}

/// What a `/metrics` exposition offers a query: every series name (with the suffixes
/// Prometheus stores for each OpenMetrics family type) and, per series name, the labels
/// and label values its samples carry.
#[derive(Default, Debug)]
struct Exposition {
    names: BTreeSet<String>,
    labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exposition {
    fn add(&mut self, text: &str) {
        assert!(
            text.trim_end().ends_with("# EOF"),
            "OpenMetrics ends with # EOF"
        );
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_count", "_sum", "_created"],
                    "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
                    "summary" => &["", "_count", "_sum", "_created"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                for s in suffixes {
                    self.names.insert(format!("{name}{s}"));
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let head = line.rsplit_once(' ').expect("name value").0;
                let (name, labels) = match head.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (head, ""),
                };
                assert!(
                    self.names.contains(name),
                    "sample {name} without its # TYPE"
                );
                let entry = self.labels.entry(name.to_string()).or_default();
                for (label, _, value) in matchers(labels) {
                    entry.entry(label).or_default().insert(value);
                }
            }
        }
    }
}

/// Labels whose every value is always exported, so a value a query matches on must be one.
const CLOSED_LABELS: [&str; 1] = ["state"];

/// The metric-name problems of one expression, against the exposition.
fn problems(expr: &str, what: &str, exp: &Exposition) -> Vec<String> {
    let mut out = Vec::new();
    let sels = selectors(expr);
    if sels.is_empty() {
        out.push(format!("{what}: no metric in {expr:?}"));
    }
    for s in sels {
        if !exp.names.contains(&s.name) {
            out.push(format!("{what}: {} is not exported (in {expr:?})", s.name));
            continue;
        }
        let Some(labels) = exp.labels.get(&s.name) else {
            continue; // A family with no samples yet: its labels cannot be known.
        };
        for (label, op, value) in &s.matchers {
            // Added by Prometheus to every scraped series.
            if label == "instance" || label == "job" {
                continue;
            }
            let Some(values) = labels.get(label) else {
                out.push(format!("{what}: {} has no label {label:?}", s.name));
                continue;
            };
            if CLOSED_LABELS.contains(&label.as_str()) && (op == "=" || op == "=~") {
                for v in value.split('|') {
                    if !values.contains(v) {
                        out.push(format!("{what}: {}{{{label}}} is never {v:?}", s.name));
                    }
                }
            }
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets, and the metric of each
/// `label_values(...)` variable.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(e)) => out.push((format!("panel {title:?}"), e.into())),
                        ("query" | "definition", Some(q)) if q.starts_with("label_values(") => {
                            let inner = &q["label_values(".len()..];
                            let metric = inner.rsplit_once(',').map_or(inner, |(m, _)| m);
                            out.push((format!("variable query {q:?}"), metric.into()));
                        }
                        _ => walk(v, title, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    walk(&d, "", &mut out);
    out
}

/// Every rule's `expr:` (the file keeps each on one line; promtool's rule count checks
/// that none was missed).
fn rule_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in RULES.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("- alert:").or(t.strip_prefix("- record:")) {
            alert = a.trim().to_string();
        }
        if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            assert!(
                !matches!(e.chars().next(), Some('|' | '>') | None),
                "{alert}: keep expr on one line"
            );
            out.push((format!("rule {alert}"), e.trim_matches('\'').to_string()));
        }
    }
    out
}

fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let r = get(addr, "metrics", path);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.text()
}

#[test]
fn dashboard_and_rules_use_only_metrics_a_live_ferry_and_router_export() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let node = env.spawn(&["run"]);
    let addr = node.addr();
    // Move what moves, so labelled families have samples to check labels against.
    env.drop_file("c.jpg", b"contrib");
    wait_for(Duration::from_secs(30), "archived", || {
        env.count("archived") == 1
    });
    assert_eq!(raw_request(addr, "GET", b"/static/c.jpg", &[]).status, 302);
    let node_text = scrape(addr, "/metrics");

    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(rdir.path(), &[format!("http://{addr}")], &[]);
    let mut router_text = String::new();
    wait_for(
        Duration::from_secs(10),
        "the router's backend metric",
        || {
            router_text = scrape(router.addr, "/-/router/metrics");
            router_text.contains("ferry_router_backend_up{")
        },
    );
    // A router has no spool and no queue: exporting them (as 0) would fire the polling
    // alert for every router, and put a fake queue on the dashboard.
    for absent in [
        "ferry_spool_watched",
        "ferry_queue_bytes",
        "ferry_queue_oldest_seconds",
    ] {
        assert!(!router_text.contains(absent), "router exports {absent}");
        assert!(node_text.contains(absent), "ferry run exports {absent}");
    }

    let mut exp = Exposition::default();
    exp.add(&node_text);
    exp.add(&router_text);
    let dash = dashboard_exprs();
    let rules = rule_exprs();
    assert!(
        dash.len() >= 20 && rules.len() == 6,
        "{} {}",
        dash.len(),
        rules.len()
    );
    let mut used = BTreeSet::new();
    let mut bad = Vec::new();
    for (what, expr) in dash.iter().chain(&rules) {
        used.extend(selectors(expr).into_iter().map(|s| s.name));
        bad.extend(problems(expr, what, &exp));
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    eprintln!("metric names checked: {used:?}");
    // The issue's list: each of these is on the dashboard.
    for want in [
        "ferry_files",
        "ferry_queue_oldest_seconds",
        "ferry_queue_bytes",
        "ferry_uploads_total",
        "ferry_upload_bytes_total",
        "ferry_upload_failures_total",
        "ferry_archive_failures_total",
        "ferry_verify_failures_total",
        "ferry_http_requests_total",
        "ferry_http_request_seconds_bucket",
        "ferry_cache_hits_total",
        "ferry_cache_bytes",
        "ferry_router_backend_up",
        "ferry_spool_watched",
        "ferry_lease_fallbacks_total",
    ] {
        assert!(
            dash.iter().any(|(_, e)| e.contains(want)),
            "{want} is not on the dashboard"
        );
    }
}

/// promtool (Debian's prometheus package) on the rules: they load, every rule was seen by
/// `rule_exprs`, their unit tests pass; and the dashboard's queries parse as PromQL (as
/// recording rules, Grafana's variables replaced by values).
#[test]
fn promtool_accepts_the_rules_their_tests_and_the_dashboard_queries() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let run = |args: &[&str], dir: &Path| {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let dir = contrib("prometheus");
    let checked = run(&["check", "rules", "ferry-rules.yml"], &dir);
    let n = rule_exprs().len();
    assert!(
        checked.contains(&format!("SUCCESS: {n} rules found")),
        "promtool saw other rules than the {n} read here:\n{checked}"
    );
    run(&["test", "rules", "ferry-rules.test.yml"], &dir);

    let t = tempfile::tempdir().unwrap();
    let mut y = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in dashboard_exprs().iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        y.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: '{}'\n",
            e.replace('\'', "''")
        ));
    }
    std::fs::write(t.path().join("dash.yml"), y).unwrap();
    run(&["check", "rules", "dash.yml"], t.path());
}
