//! Per-route enablement: the inline route runs the pipeline in front of its upstream, the
//! passthrough route to the same upstream is untouched.

use serde_json::json;
use signet_e2e::payloads::sample_invoice;
use signet_e2e::stack::DEMO_KEY;
use signet_e2e::{Stack, Storage};

use crate::{assert_error, assert_ok};

#[test]
fn inline_route_sends_the_normalized_invoice_upstream_with_receipt_headers() {
    let stack = Stack::start(Storage::Sqlite);
    let response = stack.post_invoice();
    let echo = assert_ok(&stack, &response);

    // What the upstream received: the normalized invoice and the receipt headers, no API key.
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/invoices");
    assert_eq!(echo["body"]["amount_minor"], 123450);
    assert_eq!(echo["body"]["customer"]["name"], "ACME Robotics GmbH");
    let upstream_headers = echo["signet_headers"].as_object().expect("headers");
    assert!(
        !upstream_headers.contains_key("x-signet-api-key"),
        "{upstream_headers:?}"
    );
    assert_eq!(upstream_headers["x-signet-hop"], "1");
    let receipt_hash = upstream_headers["x-signet-receipt-hash"]
        .as_str()
        .expect("receipt hash");
    let trace_id = upstream_headers["x-signet-trace"].as_str().expect("trace");

    // The client gets the same receipt headers on the upstream's answer.
    assert_eq!(response.header("X-SIGNET-Receipt-Hash"), Some(receipt_hash));
    assert_eq!(response.header("X-SIGNET-Trace"), Some(trace_id));
    assert_eq!(
        response.header("X-SIGNET-CID"),
        upstream_headers["x-signet-cid"].as_str()
    );

    // The receipt is stored, and commits to the normalized body the upstream received.
    let chain = stack.chain(trace_id);
    assert_eq!(chain[0]["receipt_hash"], receipt_hash);
    let canon = chain[0]["canon"]
        .as_str()
        .expect("canon kept on this route");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(canon).unwrap(),
        echo["body"]
    );
    assert_eq!(
        stack
            .envoy
            .stats()
            .value("signet_exchanges", &[("signet_mode", "inline")]),
        1.0
    );

    // An invalid invoice never reaches the upstream.
    let r = stack.post(
        "/invoices",
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("content-type", "application/json"),
        ],
        json!({"tool_calls": "nope"}).to_string().as_bytes(),
    );
    assert_error(&stack, &r, 422, "SCHEMA_INVALID");
    let r = stack.post("/invoices", &[], sample_invoice().to_string().as_bytes());
    assert_error(&stack, &r, 401, "MISSING_API_KEY");
}

#[test]
fn passthrough_route_is_untouched() {
    let stack = Stack::start(Storage::Sqlite);
    // Neither JSON nor authenticated: the filter would refuse it; this route must not care.
    let body = b"not json at all \x01";
    let response = stack.post(
        "/passthrough/invoices",
        &[("X-SIGNET-Trace", "t-1"), ("content-type", "text/plain")],
        body,
    );
    let echo = assert_ok(&stack, &response);
    assert_eq!(echo["path"], "/passthrough/invoices");
    assert_eq!(echo["body"], String::from_utf8_lossy(body).as_ref());
    // Only the client's own header, nothing the filter adds.
    assert_eq!(echo["signet_headers"], json!({"x-signet-trace": "t-1"}));
    assert!(response.header("X-SIGNET-Receipt-Hash").is_none());

    // The filter did not run at all: no latency sample, no error counted.
    let stats = stack.envoy.stats_after_flush();
    assert_eq!(stats.value("signet_exchange_latency_ms_count", &[]), 0.0);
    assert!(
        !stats
            .samples
            .iter()
            .any(|s| s.name == "signet_errors" && s.value > 0.0),
        "{:?}",
        stats
            .samples
            .iter()
            .filter(|s| s.name.starts_with("signet_"))
            .collect::<Vec<_>>()
    );
}

/// Inline replay: the same idempotency key and body go upstream again with the stored receipt's
/// headers and `X-SIGNET-Idempotency-Hit: 1`; nothing new is signed or counted.
#[test]
fn inline_replay_resends_with_the_stored_receipt() {
    let stack = Stack::start(Storage::Sqlite);
    let key = signet_e2e::stack::new_idempotency_key();
    let headers = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", key.as_str()),
        ("content-type", "application/json"),
    ];
    let body = sample_invoice().to_string();
    let first = assert_ok(&stack, &stack.post("/invoices", &headers, body.as_bytes()));
    let replay = assert_ok(&stack, &stack.post("/invoices", &headers, body.as_bytes()));
    let (first_headers, replay_headers) = (&first["signet_headers"], &replay["signet_headers"]);
    assert_eq!(replay_headers["x-signet-idempotency-hit"], "1");
    assert_eq!(
        replay_headers["x-signet-receipt-hash"],
        first_headers["x-signet-receipt-hash"]
    );
    assert_eq!(replay["body"], first["body"]);
    assert_eq!(stack.vex_count(signet_e2e::stack::DEMO_TENANT), 1);
}

/// `receipt_canon: drop`: the receipt leaves out the canonical payload (its CID still commits to
/// it) and still verifies offline.
#[test]
fn receipt_without_canon_still_verifies() {
    let stack = Stack::with_options(signet_e2e::StackOptions {
        envoy_template_edits: vec![("receipt_canon: keep".into(), "receipt_canon: drop".into())],
        ..Default::default()
    });
    let response = stack.post_invoice();
    let echo = assert_ok(&stack, &response);
    let trace_id = response.header("X-SIGNET-Trace").expect("trace").to_owned();
    let chain = stack.chain(&trace_id);
    assert!(chain[0].get("canon").is_none(), "{}", chain[0]);
    assert_eq!(
        chain[0]["cid"].as_str(),
        echo["signet_headers"]["x-signet-cid"].as_str()
    );
    let export = stack.export_bundle(&trace_id);
    let verified = stack.verify_bundle_with_cli(&export.body);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}
