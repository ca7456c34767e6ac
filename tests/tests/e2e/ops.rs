//! The ops kit (ops/): every series the Grafana dashboard and the Prometheus alert rules use
//! exists in a live scrape of the stack, with the labels they group by. (promtool checks and
//! unit-tests the rules themselves in `make test`.)

use std::collections::BTreeSet;

use serde_json::{json, Value};
use signet_e2e::binaries;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY};
use signet_e2e::{Stack, Storage};

fn read(path: &str) -> String {
    let path = binaries::workspace_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&read("ops/grafana/signet-dashboard.json")).expect("dashboard JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

/// The `expr:` of every rule in alerts.yml (one line, or a `|` block of deeper lines).
fn rule_exprs() -> Vec<String> {
    let text = read("ops/prometheus/alerts.yml");
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(at) = line.find("expr:") else {
            continue;
        };
        let rest = line[at + 5..].trim();
        if rest != "|" {
            exprs.push(rest.to_owned());
            continue;
        }
        let indent = at;
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .copied()
            .collect();
        exprs.push(block.join("\n"));
    }
    exprs
}

/// The metric names an expression reads: identifiers that are not functions, keywords,
/// label names inside `{…}`/`by (…)`, strings or ranges.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 12] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "le",
    ];
    let mut text = String::new();
    let mut depth_braces = 0;
    let mut in_string = false;
    let mut in_range = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => in_range = true,
            ']' => in_range = false,
            _ if depth_braces > 0 || in_range => {}
            c => text.push(c),
        }
    }
    // `by (a, b)` and `without (…)` list labels, not metrics
    let mut names = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            if word == "by" || word == "without" {
                skip_group = true;
                continue;
            }
            // a function or an aggregation (`sum(…)`, `sum by (…) (…)`)
            let aggregation =
                rest.starts_with("by ") || rest.starts_with("by(") || rest.starts_with("without");
            if rest.starts_with('(') || aggregation || KEYWORDS.contains(&word.as_str()) {
                continue;
            }
            names.insert(word);
            continue;
        }
        if c == '(' && skip_group {
            // skip to the closing parenthesis
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    names
}

#[test]
fn the_name_parser_finds_metrics_only() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, op) (rate(signet_cp_storage_seconds_bucket{op="commit"}[5m]))) > 0.05"#
        ),
        BTreeSet::from(["signet_cp_storage_seconds_bucket".to_owned()])
    );
    assert_eq!(
        metric_names(
            "sum(rate(a_total[$__rate_interval])) / (sum by (instance) (rate(b[5m])) + c)"
        ),
        BTreeSet::from(["a_total".to_owned(), "b".to_owned(), "c".to_owned()])
    );
}

#[test]
fn every_series_of_the_dashboard_and_the_alerts_exists_in_a_live_scrape() {
    let exprs: Vec<String> = dashboard_exprs().into_iter().chain(rule_exprs()).collect();
    assert!(exprs.len() >= 14, "{exprs:?}");
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // traffic that touches every series: exchanges, a replay, errors, a denial, a failed callout
    let mut stack = Stack::start(Storage::Sqlite);
    let body = exchange_body(sample_invoice()).to_string();
    let key = new_idempotency_key();
    let headers = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", key.as_str()),
    ];
    for _ in 0..2 {
        assert_eq!(stack.exchange_with(&headers, body.as_bytes()).status, 200);
    }
    let invalid = exchange_body(json!({"tool_calls": 3})).to_string();
    let other_key = new_idempotency_key();
    let other = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", other_key.as_str()),
    ];
    assert_eq!(stack.exchange_with(&other, invalid.as_bytes()).status, 422);
    let mut denied = exchange_body(sample_invoice());
    denied["forward_url"] = json!("https://evil.test/x");
    let third_key = new_idempotency_key();
    let third = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", third_key.as_str()),
    ];
    assert_eq!(
        stack
            .exchange_with(&third, denied.to_string().as_bytes())
            .status,
        403
    );
    let unauthorized = stack.client.get(
        &stack.control_plane.internal_url("/v1/internal/tenant"),
        &[],
    );
    assert_eq!(
        unauthorized.status, 401,
        "a control-plane error, counted by code"
    );
    let control_plane = stack.control_plane.metrics();
    stack.control_plane.stop();
    let fourth_key = new_idempotency_key();
    let fourth = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", fourth_key.as_str()),
    ];
    assert_eq!(stack.exchange_with(&fourth, body.as_bytes()).status, 503);
    let envoy = stack.envoy.stats_after_flush();

    let scraped: BTreeSet<String> = envoy
        .samples
        .iter()
        .chain(&control_plane.samples)
        .map(|s| s.name.clone())
        .chain(["up".to_owned()]) // Prometheus' own series of every scrape
        .collect();
    let missing: Vec<&String> = used.difference(&scraped).collect();
    assert!(
        missing.is_empty(),
        "the ops kit uses series no scrape has: {missing:?}\nscraped: {:?}",
        scraped
            .iter()
            .filter(|n| n.starts_with("signet"))
            .collect::<Vec<_>>()
    );
    // and the labels it groups by are on them
    for (name, label) in [
        ("signet_exchanges", "signet_mode"),
        ("signet_errors", "signet_code"),
        ("signet_denials", "signet_reason"),
        ("signet_callout_failures", "signet_call"),
        ("signet_cp_storage_seconds_bucket", "op"),
        ("signet_cp_errors_total", "code"),
        ("signet_forward_total", "outcome"),
        ("signet_billing_reports", "state"),
        ("signet_fallback_errors_total", "kind"),
    ] {
        assert!(
            envoy
                .samples
                .iter()
                .chain(&control_plane.samples)
                .any(|s| s.name == name && s.labels.iter().any(|(k, _)| k == label)),
            "{name} has no {label} label"
        );
    }
}
