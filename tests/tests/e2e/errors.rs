//! Every error row of SPEC §4, each from a real request through Envoy.

use serde_json::{json, Value};
use signet_e2e::payloads::{
    exchange_body, invoice_arguments, invoice_tool_call, sample_invoice, SOURCE_TYPE, TARGET_TYPE,
};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY, DEMO_TENANT, OTHER_KEY, OTHER_TENANT};
use signet_e2e::{Stack, StackOptions, Storage};

use crate::{assert_error, assert_ok};

fn headers<'a>(api_key: &'a str, idempotency_key: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("X-SIGNET-API-Key", api_key),
        ("X-SIGNET-Idempotency-Key", idempotency_key),
    ]
}

fn valid_body() -> Vec<u8> {
    exchange_body(sample_invoice()).to_string().into_bytes()
}

/// 400, 401, 403 (HEL), 413 and 422: answered before anything is stored, on one stack.
#[test]
fn request_errors_are_answered_with_their_spec_code() {
    let stack = Stack::start(Storage::Sqlite);
    let key = new_idempotency_key;

    // 400: not JSON; no idempotency key; a bad trace id (header or body).
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), b"{\"payload_type\": ");
    assert_error(&stack, &r, 400, "MALFORMED_JSON");
    let r = stack.exchange_with(&[("X-SIGNET-API-Key", DEMO_KEY)], &valid_body());
    assert_error(&stack, &r, 400, "MISSING_IDEMPOTENCY_KEY");
    let k = key();
    let mut with_trace = headers(DEMO_KEY, &k);
    with_trace.push(("X-SIGNET-Trace", "not a trace id!"));
    let r = stack.exchange_with(&with_trace, &valid_body());
    assert_error(&stack, &r, 400, "BAD_TRACE_ID");
    let mut body = exchange_body(sample_invoice());
    body["trace_id"] = json!("x".repeat(129));
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), body.to_string().as_bytes());
    assert_error(&stack, &r, 400, "BAD_TRACE_ID");

    // 401: no key; a key the control plane does not know.
    let r = stack.exchange_with(&[("X-SIGNET-Idempotency-Key", &key())], &valid_body());
    assert_error(&stack, &r, 401, "MISSING_API_KEY");
    let r = stack.exchange_with(&headers("not-a-key", &key()), &valid_body());
    assert_error(&stack, &r, 401, "UNKNOWN_API_KEY");

    // 403: the HEL egress policy denies the forward_url.
    for (url, reason) in [
        ("http://api.example.com/invoices", "HEL_SCHEME_NOT_HTTPS"),
        ("https://api.evil.test/invoices", "HEL_HOST_NOT_ALLOWED"),
        ("https://user:pw@api.example.com/", "HEL_BAD_URL"),
    ] {
        let mut body = exchange_body(sample_invoice());
        body["forward_url"] = json!(url);
        let r = stack.exchange_with(&headers(DEMO_KEY, &key()), body.to_string().as_bytes());
        assert_error(&stack, &r, 403, reason);
    }

    // 413: over the route's body_limit_bytes (exchange: the 1 MiB default; inline: 64 KiB).
    let mut big = exchange_body(sample_invoice());
    big["padding"] = json!("x".repeat(1024 * 1024 + 1));
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), big.to_string().as_bytes());
    assert_error(&stack, &r, 413, "BODY_TOO_LARGE");
    // Above Envoy's own buffer limit (2 MiB) too: the filter still answers first, in JSON.
    big["padding"] = json!("x".repeat(3 * 1024 * 1024));
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), big.to_string().as_bytes());
    assert_error(&stack, &r, 413, "BODY_TOO_LARGE");
    let mut big_inline = sample_invoice();
    big_inline["padding"] = json!("x".repeat(64 * 1024));
    let r = stack.post(
        "/invoices",
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("content-type", "application/json"),
        ],
        big_inline.to_string().as_bytes(),
    );
    assert_error(&stack, &r, 413, "BODY_TOO_LARGE");

    // 422: I-JSON, schema, transform, registry.
    let r = stack.exchange_with(
        &headers(DEMO_KEY, &key()),
        exchange_body(json!({"no_tool_calls": true}))
            .to_string()
            .as_bytes(),
    );
    assert_error(&stack, &r, 422, "SCHEMA_INVALID");
    // EUR has two decimals: 12.345 cannot be expressed in minor units.
    let r = stack.exchange_with(
        &headers(DEMO_KEY, &key()),
        exchange_body(invoice_tool_call(&invoice_arguments(
            "INV-2",
            json!("12.345"),
            "EUR",
        )))
        .to_string()
        .as_bytes(),
    );
    assert_error(&stack, &r, 422, "TRANSFORM_FAILED");
    let mut unknown = exchange_body(sample_invoice());
    unknown["target_type"] = json!("no.such.type.v1");
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), unknown.to_string().as_bytes());
    assert_error(&stack, &r, 422, "UNKNOWN_TYPE");

    // I-JSON (RFC 7493): duplicate member names are refused, never resolved by last-wins.
    let duplicate = format!(
        r#"{{"payload_type":"{SOURCE_TYPE}","payload_type":"{SOURCE_TYPE}","target_type":"{TARGET_TYPE}","payload":{}}}"#,
        sample_invoice()
    );
    let r = stack.exchange_with(&headers(DEMO_KEY, &key()), duplicate.as_bytes());
    assert_error(&stack, &r, 422, "DUPLICATE_KEY");

    // An integer beyond 2^53 would be altered by any double-based reader: refused, not rounded.
    let mut unsafe_integer = exchange_body(sample_invoice());
    unsafe_integer["payload"]["tool_calls"][0]["index"] = json!(9007199254740993u64);
    let r = stack.exchange_with(
        &headers(DEMO_KEY, &key()),
        unsafe_integer.to_string().as_bytes(),
    );
    assert_error(&stack, &r, 422, "UNSAFE_INTEGER");

    // None of these stored anything.
    assert_eq!(stack.vex_count(DEMO_TENANT), 0);
}

/// 422 IDEMPOTENCY_KEY_REUSED: the same key with another body.
#[test]
fn idempotency_key_reused_with_another_body_is_422() {
    let stack = Stack::start(Storage::Sqlite);
    let key = new_idempotency_key();
    assert_ok(
        &stack,
        &stack.exchange_with(&headers(DEMO_KEY, &key), &valid_body()),
    );
    let other = exchange_body(invoice_tool_call(&invoice_arguments(
        "INV-9",
        json!(1),
        "EUR",
    )));
    let r = stack.exchange_with(&headers(DEMO_KEY, &key), other.to_string().as_bytes());
    assert_error(&stack, &r, 422, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);
}

/// SPEC §2: a trace id names a chain within its tenant. Another tenant sending the same trace
/// id opens its own chain at hop 1 and learns nothing of the first tenant's.
#[test]
fn another_tenants_trace_of_the_same_id_is_another_chain() {
    let stack = Stack::start(Storage::Sqlite);
    let first = assert_ok(&stack, &stack.exchange(&exchange_body(sample_invoice())));
    let trace_id = first["trace_id"].as_str().expect("trace_id");
    let mut body = exchange_body(sample_invoice());
    body["trace_id"] = json!(trace_id);
    let r = stack.exchange_with(
        &headers(OTHER_KEY, &new_idempotency_key()),
        body.to_string().as_bytes(),
    );
    let theirs = assert_ok(&stack, &r);
    assert_eq!(theirs["trace_id"], json!(trace_id));
    assert_eq!(theirs["receipt"]["hop"], json!(1));
    assert_eq!(theirs["receipt"]["prev_receipt_hash"], Value::Null);
    assert_eq!(stack.vex_count(OTHER_TENANT), 1);
    let chain = stack.chain(trace_id);
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0]["tenant"], json!(DEMO_TENANT));
}

/// 409 IDEMPOTENCY_IN_FLIGHT: a request with the same key is still being processed (held open
/// mid-body); once it completes, the key answers with its stored response.
#[test]
fn idempotency_key_in_flight_is_409() {
    let stack = Stack::start(Storage::Sqlite);
    // the tenant lookup is cached, so the held request is admitted from its headers alone
    assert_ok(&stack, &stack.exchange(&exchange_body(sample_invoice())));
    let key = new_idempotency_key();
    let body = valid_body();
    let mut held_headers = headers(DEMO_KEY, &key);
    held_headers.push(("content-type", "application/json"));
    let held = stack.hold_request("/v1/exchange", &held_headers, &body);

    let r = stack.exchange_with(&headers(DEMO_KEY, &key), &body);
    assert_error(&stack, &r, 409, "IDEMPOTENCY_IN_FLIGHT");
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);

    let first = held.finish();
    let receipt = assert_ok(&stack, &first)["receipt"].clone();
    assert_eq!(stack.vex_count(DEMO_TENANT), 2);
    let again = stack.exchange_with(&headers(DEMO_KEY, &key), &body);
    assert_eq!(assert_ok(&stack, &again)["receipt"], receipt);
    assert_eq!(again.header("X-SIGNET-Idempotency-Hit"), Some("1"));
}

/// 409 CHAIN_FULL: the trace reached the control plane's cap (`SP_CHAIN_MAX`).
#[test]
fn full_chain_is_409() {
    let stack = Stack::with_options(StackOptions {
        control_plane_env: vec![("SP_CHAIN_MAX".into(), "2".into())],
        ..StackOptions::default()
    });
    let first = assert_ok(&stack, &stack.exchange(&exchange_body(sample_invoice())));
    let mut body = exchange_body(sample_invoice());
    body["trace_id"] = first["trace_id"].clone();
    assert_ok(&stack, &stack.exchange(&body));
    let r = stack.exchange(&body);
    assert_error(&stack, &r, 409, "CHAIN_FULL");
    assert_eq!(stack.vex_count(DEMO_TENANT), 2);
}

/// 503 when the control plane is down (fail closed): nothing is signed, stored or counted, and
/// the same request succeeds once it is back.
#[test]
fn control_plane_down_is_503_and_counts_nothing() {
    let mut stack = Stack::start(Storage::Sqlite);
    assert_ok(&stack, &stack.exchange(&exchange_body(sample_invoice())));
    stack.control_plane.stop();

    let key = new_idempotency_key();
    let r = stack.exchange_with(&headers(DEMO_KEY, &key), &valid_body());
    assert_error(&stack, &r, 503, "CONTROL_PLANE_UNAVAILABLE");
    assert!(r.header("X-SIGNET-Receipt-Hash").is_none());
    // The inline route does not reach its upstream either.
    let r = stack.post_invoice();
    assert_error(&stack, &r, 503, "CONTROL_PLANE_UNAVAILABLE");
    let stats = stack.envoy.stats();
    // The tenant lookup is cached from the first request; the commit is what fails.
    assert!(stats.value("signet_callout_failures", &[("signet_call", "commit")]) >= 1.0);
    assert_eq!(
        stats.value(
            "signet_errors",
            &[("signet_code", "CONTROL_PLANE_UNAVAILABLE")]
        ),
        2.0
    );
    assert_eq!(
        stats.value("signet_exchanges", &[("signet_mode", "exchange")]),
        1.0
    );

    stack.control_plane.restart();
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);
    // Nothing was reserved for the failed request: the same key and body now go through.
    let r = stack.exchange_with(&headers(DEMO_KEY, &key), &valid_body());
    assert_ok(&stack, &r);
    assert_eq!(stack.vex_count(DEMO_TENANT), 2);
}

/// A route with `fail_open: true` lets requests through, unreceipted, while the control plane is
/// down; every other error is still answered.
#[test]
fn fail_open_route_passes_through_when_the_control_plane_is_down() {
    let mut stack = Stack::with_options(StackOptions {
        envoy_template_edits: vec![("fail_open: false ".into(), "fail_open: true ".into())],
        ..StackOptions::default()
    });
    stack.control_plane.stop();
    let invoice = sample_invoice().to_string();
    let r = stack.post(
        "/invoices",
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("content-type", "application/json"),
        ],
        invoice.as_bytes(),
    );
    let echo: Value = assert_ok(&stack, &r);
    assert_eq!(echo["path"], "/invoices");
    assert_eq!(
        echo["body"],
        sample_invoice(),
        "the original body, unmodified"
    );
    assert_eq!(
        echo["signet_headers"]
            .as_object()
            .map(|h| h.contains_key("x-signet-receipt-hash")),
        Some(false)
    );
    assert!(r.header("X-SIGNET-Receipt-Hash").is_none());
}

/// 429 RATE_LIMITED: the exchange route caps each tenant at 2 requests per second
/// (`tenant_requests_per_second` in the route metadata); a refused request counts nothing (its
/// only callout asks whether its key holds a stored answer), and the other tenant keeps its own
/// budget.
#[test]
fn tenant_over_the_route_rate_is_429() {
    let stack = Stack::with_options(StackOptions {
        envoy_template_edits: vec![(
            "signet: { mode: exchange }".into(),
            "signet: { mode: exchange, tenant_requests_per_second: 2 }".into(),
        )],
        ..StackOptions::default()
    });
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    };
    // the tenant lookup is cached first, so that a burst is only the exchanges themselves
    assert_ok(
        &stack,
        &stack.exchange_with(&headers(DEMO_KEY, &new_idempotency_key()), &valid_body()),
    );
    let mut admitted_total = 1;
    // A concurrent burst of 4 at the start of a fresh wall-clock second (Envoy's windows are
    // whole seconds); a burst that straddles a boundary is counted and sent again.
    for attempt in 0.. {
        assert!(
            attempt < 5,
            "no burst fitted in one second\n{}",
            stack.logs()
        );
        let into_second = now().subsec_millis();
        std::thread::sleep(std::time::Duration::from_millis(
            u64::from(1_000 - into_second) + 20,
        ));
        let started = now().as_secs();
        let responses: Vec<_> = std::thread::scope(|scope| {
            let burst: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        stack.exchange_with(
                            &headers(DEMO_KEY, &new_idempotency_key()),
                            &valid_body(),
                        )
                    })
                })
                .collect();
            burst.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let admitted = responses.iter().filter(|r| r.status == 200).count();
        admitted_total += admitted;
        if now().as_secs() != started {
            continue;
        }
        assert_eq!(admitted, 2, "{}", stack.logs());
        for r in responses.iter().filter(|r| r.status != 200) {
            assert_error(&stack, r, 429, "RATE_LIMITED");
        }
        break;
    }
    assert_eq!(stack.vex_count(DEMO_TENANT) as usize, admitted_total);
    // the other tenant is not limited by the demo tenant's burst
    let other = stack.exchange_with(&headers(OTHER_KEY, &new_idempotency_key()), &valid_body());
    assert_ok(&stack, &other);
    let stats = stack.envoy.stats();
    assert!(stats.value("signet_errors", &[("signet_code", "RATE_LIMITED")]) >= 2.0);
}
