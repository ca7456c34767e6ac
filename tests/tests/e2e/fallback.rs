//! The LLM fallback through the real Envoy: a payload only the LLM can fix is answered 200
//! with a receipt that says `fallback_used`, its FU metered exactly once (the fake provider's
//! own count), the bundle verifies; a replay calls nothing and meters nothing; a repair that
//! changes the amount is 422 and still metered; a tenant without the fallback is 422 as before.

#[path = "../../../control-plane/tests/common/fake_openai.rs"]
mod fake_openai;

use fake_openai::{FakeOpenAi, MODEL, OPENAI_KEY};
use serde_json::json;
use signet_e2e::payloads::{exchange_body, invoice_tool_call_raw};
use signet_e2e::stack::{new_idempotency_key, StackOptions, DEMO_KEY, DEMO_TENANT, OTHER_KEY};
use signet_e2e::{Stack, Storage};

use crate::{assert_error, assert_ok};

/// A lost quote in the middle of a value: deterministic repair cannot fix it.
const BROKEN: &str =
    r#"{"invoice_id": "INV-77", "amount": 12.5, "currency": EUR", "customer_name": "Acme"}"#;
const REPAIRED: &str =
    r#"{"invoice_id":"INV-77","amount":12.5,"currency":"EUR","customer_name":"Acme"}"#;

struct Provider {
    fake: FakeOpenAi,
    _runtime: tokio::runtime::Runtime,
}

fn provider() -> Provider {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let fake = runtime.block_on(FakeOpenAi::start());
    Provider {
        fake,
        _runtime: runtime,
    }
}

fn stack(storage: Storage, fake: &FakeOpenAi) -> Stack {
    let api_keys = json!({
        DEMO_KEY: {"tenant": DEMO_TENANT, "allowlist": ["*.example.com"],
                   "fallback_enabled": true, "fu_monthly_limit": 1_000_000},
        OTHER_KEY: {"tenant": "other", "allowlist": []},
    });
    let env = [
        ("SP_API_KEYS", api_keys.to_string()),
        ("SP_OPENAI_BASE_URL", fake.base_url.clone()),
        ("SP_OPENAI_API_KEY", OPENAI_KEY.to_owned()),
        ("SP_OPENAI_MODEL", MODEL.to_owned()),
        ("SP_OPENAI_TIMEOUT_MS", "5000".to_owned()),
    ];
    Stack::with_options(StackOptions {
        storage,
        control_plane_env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..StackOptions::default()
    })
}

fn post(stack: &Stack, api_key: &str, idempotency_key: &str) -> signet_e2e::http::Response {
    let body = exchange_body(invoice_tool_call_raw(BROKEN));
    stack.exchange_with(
        &[
            ("X-SIGNET-API-Key", api_key),
            ("X-SIGNET-Idempotency-Key", idempotency_key),
        ],
        body.to_string().as_bytes(),
    )
}

fn fu(stack: &Stack) -> u64 {
    stack.usage(DEMO_TENANT)["fu"].as_u64().unwrap()
}

fn a_payload_only_the_llm_can_fix_is_verified_and_metered_once(storage: Storage) {
    let p = provider();
    p.fake.repair_with(REPAIRED);
    p.fake.tokens(120, 31);
    let stack = stack(storage, &p.fake);

    let key = new_idempotency_key();
    let body = assert_ok(&stack, &post(&stack, DEMO_KEY, &key));
    assert_eq!(body["normalized"]["amount_minor"], 1250);
    assert_eq!(body["normalized"]["invoice_id"], "INV-77");
    assert_eq!(p.fake.calls(), 1);
    assert_eq!(p.fake.problems(), Vec::<String>::new());
    let trace = body["trace_id"].as_str().unwrap();
    let chain = stack.chain(trace);
    assert_eq!(
        (&chain[0]["fallback_used"], &chain[0]["fu_tokens"]),
        (&json!(true), &json!(151))
    );
    // metered once: by the repair, not again by the commit
    assert_eq!(fu(&stack), 151);
    assert_eq!(stack.vex_count(DEMO_TENANT), 1);
    let bundle = stack.export_bundle(trace);
    assert_eq!(bundle.status, 200, "{}", bundle.text());
    let verified = stack.verify_bundle_with_cli(bundle.text().as_bytes());
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // the replay: the stored answer, no provider call, nothing metered
    let again = post(&stack, DEMO_KEY, &key);
    assert_eq!(assert_ok(&stack, &again), body);
    assert_eq!(again.header("x-signet-idempotency-hit"), Some("1"));
    assert_eq!(p.fake.calls(), 1);
    assert_eq!((fu(&stack), stack.vex_count(DEMO_TENANT)), (151, 1));
    let stats = stack.envoy.stats();
    assert_eq!(
        stats.value("signet_fallbacks", &[("signet_outcome", "used")]),
        1.0
    );
    let metrics = stack.control_plane.metrics();
    assert_eq!(
        metrics.value("signet_fu_tokens_total", &[("tenant", DEMO_TENANT)]),
        151.0
    );
}

#[test]
fn a_payload_only_the_llm_can_fix_is_verified_and_metered_once_sqlite() {
    a_payload_only_the_llm_can_fix_is_verified_and_metered_once(Storage::Sqlite);
}

#[test]
fn a_payload_only_the_llm_can_fix_is_verified_and_metered_once_postgres() {
    a_payload_only_the_llm_can_fix_is_verified_and_metered_once(Storage::Postgres);
}

#[test]
fn a_repair_that_changes_the_amount_is_422_and_still_metered() {
    let p = provider();
    p.fake.repair_with(
        r#"{"invoice_id":"INV-77","amount":125,"currency":"EUR","customer_name":"Acme"}"#,
    );
    p.fake.tokens(100, 9);
    let stack = stack(Storage::Sqlite, &p.fake);
    let r = post(&stack, DEMO_KEY, &new_idempotency_key());
    assert_error(&stack, &r, 422, "FALLBACK_INVARIANT_FAILED");
    assert_eq!(p.fake.calls(), 1);
    assert_eq!(fu(&stack), 109, "the provider was paid");
    assert_eq!(stack.vex_count(DEMO_TENANT), 0);

    // a tenant without the fallback: deterministic repair's 422, no provider call
    let r = post(&stack, OTHER_KEY, &new_idempotency_key());
    assert_error(&stack, &r, 422, "REPAIR_FAILED");
    assert_eq!(p.fake.calls(), 1);
}
