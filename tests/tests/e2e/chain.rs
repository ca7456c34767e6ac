//! A two-hop chain through Envoy, exported by the control plane and verified by the real CLI.

use serde_json::Value;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY};
use signet_e2e::{Stack, Storage};

use crate::assert_ok;

fn two_hop_chain_verifies_offline(storage: Storage) {
    let stack = Stack::start(storage);

    let first = stack.exchange(&exchange_body(sample_invoice()));
    let first_body = assert_ok(&stack, &first);
    let trace_id = first_body["trace_id"]
        .as_str()
        .expect("trace_id")
        .to_owned();
    let first_receipt = &first_body["receipt"];
    assert_eq!(first_receipt["hop"], 1);
    assert_eq!(first_receipt["prev_receipt_hash"], Value::Null);
    assert_eq!(first_receipt["kid"], stack.key.kid.as_str());
    assert_eq!(first.header("X-SIGNET-Trace"), Some(trace_id.as_str()));
    assert_eq!(first.header("X-SIGNET-Hop"), Some("1"));
    assert_eq!(
        first.header("X-SIGNET-Receipt-Hash"),
        first_receipt["receipt_hash"].as_str()
    );
    assert_eq!(first.header("X-SIGNET-CID"), first_receipt["cid"].as_str());
    // The normalized payload is the target type: the amount in minor units, the customer nested.
    let normalized = &first_body["normalized"];
    assert_eq!(normalized["invoice_id"], "INV-2026-0042");
    assert_eq!(normalized["amount_minor"], 123450);
    assert_eq!(normalized["currency"], "EUR");
    assert_eq!(normalized["customer"]["name"], "ACME Robotics GmbH");
    assert_eq!(first_body["policy"]["allowed"], true);

    // Hop 2 continues the trace named in X-SIGNET-Trace.
    let idempotency_key = new_idempotency_key();
    let second = stack.exchange_with(
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("X-SIGNET-Idempotency-Key", &idempotency_key),
            ("X-SIGNET-Trace", &trace_id),
        ],
        exchange_body(sample_invoice()).to_string().as_bytes(),
    );
    let second_body = assert_ok(&stack, &second);
    assert_eq!(second_body["trace_id"], trace_id.as_str());
    assert_eq!(second_body["receipt"]["hop"], 2);
    assert_eq!(
        second_body["receipt"]["prev_receipt_hash"],
        first_receipt["receipt_hash"]
    );
    assert_eq!(second.header("X-SIGNET-Hop"), Some("2"));

    // The control plane stored exactly these two receipts.
    let export = stack.export_bundle(&trace_id);
    let bundle = assert_ok(&stack, &export);
    let chain = bundle["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), 2, "{bundle}");
    assert_eq!(chain[0]["receipt_hash"], first_receipt["receipt_hash"]);
    assert_eq!(
        chain[1]["receipt_hash"],
        second_body["receipt"]["receipt_hash"]
    );
    assert_eq!(chain[0]["sig"], first_receipt["sig"]);
    assert_eq!(
        export.header("X-SIGNET-Response-CID"),
        bundle["bundle_cid"].as_str()
    );

    // The real CLI verifies it against the control plane's JWKS...
    let verified = stack.verify_bundle_with_cli(&export.body);
    assert!(
        verified.status.success(),
        "signet verify bundle failed:\n{}\n{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // ...and refuses the same bundle with one receipt altered.
    let mut tampered = bundle.clone();
    tampered["chain"][0]["ts"] = Value::String("2000-01-01T00:00:00.000Z".to_owned());
    let refused = stack.verify_bundle_with_cli(tampered.to_string().as_bytes());
    assert!(
        !refused.status.success(),
        "a tampered bundle verified:\n{}",
        String::from_utf8_lossy(&refused.stdout)
    );
}

#[test]
fn two_hop_chain_verifies_offline_sqlite() {
    two_hop_chain_verifies_offline(Storage::Sqlite);
}

#[test]
fn two_hop_chain_verifies_offline_postgres() {
    two_hop_chain_verifies_offline(Storage::Postgres);
}
