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

/// The issue's quota test through Envoy: a limit that fits N repairs, 4N concurrent fallback
/// exchanges spread by Envoy over two control planes on one PostgreSQL. Exactly N succeed (the
/// fake reports each call at exactly the estimate E reserved for it, so N calls fill the month
/// and a refusal means N others hold or used E), the month never passes the limit, the other
/// 3N are 429 `FU_QUOTA_EXCEEDED` and the provider never sees them.
#[test]
fn two_control_planes_over_one_postgresql_never_exceed_the_monthly_limit() {
    use signet_e2e::control_plane::ControlPlane;
    use signet_e2e::postgres::TestDatabase;
    use signet_e2e::stack::{TestKey, ADMIN_KEY};

    const N: u64 = 3;
    let p = provider();
    p.fake.repair_with(REPAIRED);
    let database = TestDatabase::create();
    let key = TestKey::generate();
    let filter_token = format!("e2e-filter-token-{}", signet_e2e::random_hex(16));
    // `cal` measures the estimate first; `demo` gets its limit once E is known
    let api_keys = |limit: Option<u64>| {
        json!({
            DEMO_KEY: {"tenant": DEMO_TENANT, "allowlist": [], "fallback_enabled": true,
                       "fu_monthly_limit": limit},
            OTHER_KEY: {"tenant": "cal", "allowlist": [], "fallback_enabled": true},
        })
    };
    let shared = vec![
        ("SP_PRIVATE_KEY_B64", key.seed_b64url.clone()),
        ("SP_KID", key.kid.clone()),
        ("SP_FILTER_TOKEN", filter_token.clone()),
        ("SP_ADMIN_KEY", ADMIN_KEY.to_owned()),
        ("SP_API_KEYS", api_keys(Some(0)).to_string()),
        ("SP_STORAGE", "postgres".to_owned()),
        ("SP_POSTGRES_URL", database.url()),
        ("SP_OPENAI_BASE_URL", p.fake.base_url.clone()),
        ("SP_OPENAI_API_KEY", OPENAI_KEY.to_owned()),
        ("SP_OPENAI_MODEL", MODEL.to_owned()),
        ("SP_OPENAI_TIMEOUT_MS", "10000".to_owned()),
    ];
    let env: Vec<(String, String)> = shared.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let second_dir = tempfile::tempdir().unwrap();
    let second = ControlPlane::start(second_dir.path(), env.clone());
    let endpoint = "                    socket_address: { address: ${CONTROL_PLANE_HOST}, port_value: ${CONTROL_PLANE_INTERNAL_PORT} }";
    let both = format!(
        "{endpoint}\n              - endpoint:\n                  address:\n                    socket_address: {{ address: 127.0.0.1, port_value: {} }}",
        second.internal_port
    );
    let stack = Stack::with_options(StackOptions {
        storage: Storage::Sqlite,
        control_plane_env: env,
        envoy_env: vec![
            ("SP_PRIVATE_KEY_B64".into(), key.seed_b64url.clone()),
            ("SP_KID".into(), key.kid.clone()),
            ("SP_FILTER_TOKEN".into(), filter_token.clone()),
        ],
        envoy_template_edits: vec![(endpoint.to_owned(), both)],
        ..StackOptions::default()
    });
    let instances = [&stack.control_plane, &second];

    // E: what one repair of BROKEN reserves (the same prompt for every tenant)
    assert_ok(&stack, &post(&stack, OTHER_KEY, &new_idempotency_key()));
    let e: f64 = instances
        .iter()
        .map(|cp| {
            cp.metrics().value(
                "signet_fallback_estimated_tokens_sum",
                &[("method", "tokenizer")],
            )
        })
        .sum();
    let e = e as u64;
    assert!(e > 0);
    let limit = N * e + e / 2;
    let reload = json!({"api_keys": api_keys(Some(limit))}).to_string();
    for cp in instances {
        let r = stack.client.post(
            &cp.admin_url("/v1/admin/reload"),
            &[
                ("X-SIGNET-Admin-Key", ADMIN_KEY),
                ("content-type", "application/json"),
            ],
            reload.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    p.fake.tokens(e - 1, 1);
    p.fake.delay(std::time::Duration::from_millis(500));
    let calls_before = p.fake.calls();

    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4 * N)
            .map(|_| {
                scope.spawn(|| {
                    let r = post(&stack, DEMO_KEY, &new_idempotency_key());
                    let code = r.json()["code"].as_str().unwrap_or("").to_owned();
                    (r.status, code)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|(s, _)| *s == 200).count() as u64;
    let denied = answers
        .iter()
        .filter(|(s, c)| *s == 429 && c == "FU_QUOTA_EXCEEDED")
        .count() as u64;
    assert_eq!((ok, denied), (N, 3 * N), "{answers:?}\n{}", stack.logs());
    assert_eq!(
        p.fake.calls() - calls_before,
        N,
        "no provider call for a denied repair"
    );
    let fu = fu(&stack);
    assert_eq!(fu, N * e);
    assert!(fu <= limit);
    assert_eq!(stack.vex_count(DEMO_TENANT), N);
    // Envoy spread the repairs over both instances, and each denied some or repaired some
    for cp in instances {
        let m = cp.metrics();
        let seen = m.value("signet_fu_quota_denials_total", &[("tenant", DEMO_TENANT)])
            + m.value("signet_fu_tokens_total", &[("tenant", DEMO_TENANT)]);
        assert!(seen >= 1.0, "an instance saw no repair of demo");
    }
    drop(stack);
    drop(second);
    drop(database);
}
