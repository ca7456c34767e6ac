//! Idempotent replay: the same key and body give the stored response, counted once.

use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY, DEMO_TENANT};
use signet_e2e::{Stack, Storage};

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
