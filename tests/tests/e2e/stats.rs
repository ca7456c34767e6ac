//! The filter's stats, read from Envoy's admin `/stats/prometheus` with the labels that
//! `stats_config.stats_tags` extracts from the dotted names.

use serde_json::json;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY};
use signet_e2e::{Stack, Storage};

use crate::assert_ok;

#[test]
fn stats_are_labelled_prometheus_series() {
    let stack = Stack::start(Storage::Sqlite);
    let json_headers = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("content-type", "application/json"),
    ];

    // 2 exchanges (one replayed once), 1 inline exchange, 2 malformed, 1 HEL denial.
    let key = new_idempotency_key();
    let body = exchange_body(sample_invoice()).to_string();
    let idempotent = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", key.as_str()),
    ];
    assert_ok(&stack, &stack.exchange_with(&idempotent, body.as_bytes()));
    assert_ok(&stack, &stack.exchange_with(&idempotent, body.as_bytes()));
    assert_ok(&stack, &stack.exchange(&exchange_body(sample_invoice())));
    assert_ok(
        &stack,
        &stack.post(
            "/invoices",
            &json_headers,
            sample_invoice().to_string().as_bytes(),
        ),
    );
    for _ in 0..2 {
        let r = stack.exchange_with(
            &[
                ("X-SIGNET-API-Key", DEMO_KEY),
                ("X-SIGNET-Idempotency-Key", &new_idempotency_key()),
            ],
            b"{",
        );
        assert_eq!(r.status, 400);
    }
    let mut denied = exchange_body(sample_invoice());
    denied["forward_url"] = json!("https://api.evil.test/");
    assert_eq!(stack.exchange(&denied).status, 403);
    // Not counted anywhere: the filter is disabled on this route.
    assert_eq!(stack.post("/passthrough", &[], b"{").status, 200);

    let requests_on_signet_routes = 7.0;
    let stats = stack.envoy.wait_for_stat(
        "signet_exchange_latency_ms_count",
        &[],
        requests_on_signet_routes,
    );
    let value = |name: &str, labels: &[(&str, &str)]| stats.value(name, labels);
    assert_eq!(
        value("signet_exchanges", &[("signet_mode", "exchange")]),
        2.0
    );
    assert_eq!(value("signet_exchanges", &[("signet_mode", "inline")]), 1.0);
    assert_eq!(value("signet_idempotent_hits", &[]), 1.0);
    assert_eq!(
        value("signet_errors", &[("signet_code", "MALFORMED_JSON")]),
        2.0
    );
    assert_eq!(
        value("signet_errors", &[("signet_code", "HEL_HOST_NOT_ALLOWED")]),
        1.0
    );
    assert_eq!(
        value(
            "signet_denials",
            &[("signet_reason", "HEL_HOST_NOT_ALLOWED")]
        ),
        1.0
    );
    assert_eq!(value("signet_repairs", &[]), 0.0);
    // The labels replace the dotted parts: no series keeps them in its name.
    assert!(
        !stats
            .samples
            .iter()
            .any(|s| s.name.starts_with("signet_exchanges_mode")
                || s.name.starts_with("signet_errors_code")),
        "untagged series: {:?}",
        stats
            .samples
            .iter()
            .filter(|s| s.name.starts_with("signet_"))
            .collect::<Vec<_>>()
    );
}
