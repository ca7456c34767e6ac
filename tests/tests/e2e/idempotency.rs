//! Idempotent replay: the same key and body give the stored response, counted once.

use serde_json::json;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY, DEMO_TENANT};
use signet_e2e::{Stack, StackOptions, Storage};

use crate::{assert_error, assert_ok};

fn replay_returns_the_stored_response_and_counts_once(storage: Storage) {
    let stack = Stack::start(storage);
    let key = new_idempotency_key();
    let body = exchange_body(sample_invoice()).to_string();
    let headers = [
        ("X-SIGNET-API-Key", DEMO_KEY),
        ("X-SIGNET-Idempotency-Key", key.as_str()),
    ];

    let first = stack.exchange_with(&headers, body.as_bytes());
    assert_ok(&stack, &first);
    assert_eq!(first.header("X-SIGNET-Idempotency-Hit"), None);

    let replay = stack.exchange_with(&headers, body.as_bytes());
    assert_ok(&stack, &replay);
    assert_eq!(replay.header("X-SIGNET-Idempotency-Hit"), Some("1"));
    assert_eq!(replay.json(), first.json(), "the stored response");
    for header in [
        "X-SIGNET-Trace",
        "X-SIGNET-Receipt-Hash",
        "X-SIGNET-Hop",
        "X-SIGNET-CID",
    ] {
        assert_eq!(replay.header(header), first.header(header), "{header}");
    }
    // The X-ODIN-* aliases name the same key.
    let alias = stack.exchange_with(
        &[
            ("X-ODIN-API-Key", DEMO_KEY),
            ("X-ODIN-Idempotency-Key", key.as_str()),
        ],
        body.as_bytes(),
    );
    assert_ok(&stack, &alias);
    assert_eq!(alias.header("X-SIGNET-Idempotency-Hit"), Some("1"));
    assert_eq!(alias.json(), first.json());

    // One VEx: in the persistent usage counter, the control plane's /metrics and Envoy's stats.
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);
    let metrics = stack.control_plane.metrics();
    assert_eq!(
        metrics.value("signet_cp_vex_total", &[]),
        1.0,
        "{:?}",
        metrics.samples
    );
    let stats = stack.envoy.stats();
    assert_eq!(
        stats.value("signet_exchanges", &[("signet_mode", "exchange")]),
        1.0
    );
    assert_eq!(stats.value("signet_idempotent_hits", &[]), 2.0);
    // And one receipt in the trace.
    let trace_id = first.json()["trace_id"].as_str().unwrap().to_owned();
    let chain = stack.chain(&trace_id);
    assert_eq!(chain.len(), 1);
}

#[test]
fn replay_returns_the_stored_response_and_counts_once_sqlite() {
    replay_returns_the_stored_response_and_counts_once(Storage::Sqlite);
}

#[test]
fn replay_returns_the_stored_response_and_counts_once_postgres() {
    replay_returns_the_stored_response_and_counts_once(Storage::Postgres);
}

/// Requests racing with one key: one receipt; each answer is that receipt or "in flight".
#[test]
fn concurrent_requests_with_one_key_store_one_receipt() {
    let stack = Stack::start(Storage::Postgres);
    let key = new_idempotency_key();
    let body = exchange_body(sample_invoice()).to_string();
    let responses: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    stack.exchange_with(
                        &[
                            ("X-SIGNET-API-Key", DEMO_KEY),
                            ("X-SIGNET-Idempotency-Key", key.as_str()),
                        ],
                        body.as_bytes(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let receipts: Vec<_> = responses
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.json()["receipt"]["receipt_hash"].clone())
        .collect();
    assert!(
        !receipts.is_empty(),
        "no request succeeded:\n{}",
        stack.logs()
    );
    assert!(receipts.iter().all(|h| *h == receipts[0]), "{receipts:?}");
    for r in responses.iter().filter(|r| r.status != 200) {
        assert_error(&stack, r, 409, "IDEMPOTENCY_IN_FLIGHT");
    }
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);
}

/// SPEC §4: a replay gets its stored response even when the pipeline refuses the request now
/// (here the route's rate is spent), and a reused key is 422 `IDEMPOTENCY_KEY_REUSED` even when
/// the new body is not JSON at all; a key nobody stored keeps the pipeline's own error.
#[test]
fn a_stored_request_is_replayed_even_when_the_pipeline_refuses_it_now() {
    let stack = Stack::with_options(StackOptions {
        envoy_template_edits: vec![(
            "signet: { mode: exchange }".into(),
            "signet: { mode: exchange, tenant_requests_per_second: 1 }".into(),
        )],
        ..StackOptions::default()
    });
    let body = exchange_body(sample_invoice()).to_string();
    let with_key = |key: &str| {
        vec![
            ("X-SIGNET-API-Key".to_owned(), DEMO_KEY.to_owned()),
            ("X-SIGNET-Idempotency-Key".to_owned(), key.to_owned()),
        ]
    };
    let send = |key: &str, body: &[u8]| {
        let headers = with_key(key);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        stack.exchange_with(&headers, body)
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    };
    // The tenant lookup is cached first; then, in one fresh wall-clock second (Envoy's rate
    // windows are whole seconds): a stored request, its replay over the rate, a new one refused.
    assert_ok(&stack, &send(&new_idempotency_key(), body.as_bytes()));
    let mut fitted = false;
    for _ in 0..5 {
        let into_second = now().subsec_millis();
        std::thread::sleep(std::time::Duration::from_millis(
            u64::from(1_000 - into_second) + 20,
        ));
        let started = now().as_secs();
        let key = new_idempotency_key();
        let first = send(&key, body.as_bytes());
        let replay = send(&key, body.as_bytes());
        let refused = send(&new_idempotency_key(), body.as_bytes());
        if now().as_secs() != started {
            continue;
        }
        assert_ok(&stack, &first);
        assert_error(&stack, &refused, 429, "RATE_LIMITED");
        assert_ok(&stack, &replay);
        assert_eq!(replay.header("X-SIGNET-Idempotency-Hit"), Some("1"));
        assert_eq!(replay.json(), first.json(), "the stored response");
        assert_eq!(
            replay.header("X-SIGNET-Receipt-Hash"),
            first.header("X-SIGNET-Receipt-Hash")
        );

        // a reused key: 422 reused, whatever the new body (in a later second: not rate limited)
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        assert_error(
            &stack,
            &send(&key, b"not json"),
            422,
            "IDEMPOTENCY_KEY_REUSED",
        );
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let other = exchange_body(json!({"tool_calls": 3})).to_string();
        assert_error(
            &stack,
            &send(&key, other.as_bytes()),
            422,
            "IDEMPOTENCY_KEY_REUSED",
        );
        fitted = true;
        break;
    }
    assert!(
        fitted,
        "no three requests fitted in one second\n{}",
        stack.logs()
    );
    // a key nobody stored: the pipeline's own refusal
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let r = send(&new_idempotency_key(), b"not json");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_ne!(r.json()["code"], "IDEMPOTENCY_KEY_REUSED");

    let stats = stack.envoy.stats();
    assert_eq!(
        stats.value("signet_callout_failures", &[("signet_call", "idempotency")]),
        0.0
    );
    assert!(stats.value("signet_idempotent_hits", &[]) >= 1.0);
}
