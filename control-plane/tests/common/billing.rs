//! What the billing tests share: the enterprise tenant (a reservation and three tiers per meter,
//! each tier its own Stripe meter), exchanges in bulk (VEx by their commits, FU by the LLM-fallback
//! repairs before them, against a fake provider), waiting for the reporter to settle, and the
//! exact comparison of what the fake Stripe holds with the local overage per band.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::fake_openai::{Behaviour, FakeOpenAi, MODEL, OPENAI_KEY};
use super::fake_stripe::{FakeStripe, STRIPE_KEY};
use super::*;

pub const ACME_KEY: &str = "acme-key-0123";
pub const FREE_KEY: &str = "free-key-0123";
pub const VEX_RESERVED: u64 = 100;
pub const VEX_THRESHOLDS: [u64; 3] = [300, 700, 1_000_000];
pub const FU_RESERVED: u64 = 5_000;
pub const FU_THRESHOLDS: [u64; 3] = [10_000, 20_000, 1_000_000_000];

pub fn acme_keys() -> String {
    json!({
        ACME_KEY: {"tenant": "acme", "allowlist": [], "stripe_customer": "cus_acme",
                   "fallback_enabled": true},
        FREE_KEY: {"tenant": "free", "allowlist": [], "fallback_enabled": true},
    })
    .to_string()
}

/// The enterprise tenant: a reservation and three tiers per meter, each its own meter.
pub fn acme_reserved() -> String {
    json!({"acme": {
        "vex_reserved": VEX_RESERVED,
        "vex_overage_tiers": [
            {"threshold": VEX_THRESHOLDS[0], "price_per_unit": "0.01", "stripe_item": "vex_t1"},
            {"threshold": VEX_THRESHOLDS[1], "price_per_unit": "0.005", "stripe_item": "vex_t2"},
            {"threshold": VEX_THRESHOLDS[2], "price_per_unit": "0.001", "stripe_item": "vex_t3"}],
        "fu_reserved": FU_RESERVED,
        "fu_overage_tiers": [
            {"threshold": FU_THRESHOLDS[0], "price_per_unit": "0.0002", "stripe_item": "fu_t1"},
            {"threshold": FU_THRESHOLDS[1], "price_per_unit": "0.0001", "stripe_item": "fu_t2"},
            {"threshold": FU_THRESHOLDS[2], "price_per_unit": "0.00005", "stripe_item": "fu_t3"}]
    }})
    .to_string()
}

/// The LLM fallback against a fake provider that meters what each repair asks ([`exchanges`]);
/// the fake must live as long as the control plane.
pub async fn fallback_env(db: &mut TestDb) -> FakeOpenAi {
    let openai = FakeOpenAi::start().await;
    openai.answer(Behaviour::Metered);
    db.set("SP_OPENAI_BASE_URL", &openai.base_url);
    db.set("SP_OPENAI_API_KEY", OPENAI_KEY);
    db.set("SP_OPENAI_MODEL", MODEL);
    openai
}

/// Reporting to `stripe_url` with short windows, intervals, timeouts and retries, and the
/// fallback of [`fallback_env`] (keep what it returns alive).
pub async fn billing_env(db: &mut TestDb, stripe_url: &str) -> FakeOpenAi {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("signet_control_plane=info")
        .try_init();
    db.set("SP_API_KEYS", &acme_keys());
    db.set("SP_RESERVED_CONFIG", &acme_reserved());
    db.set("SP_STRIPE_API_KEY", STRIPE_KEY);
    db.set("SP_STRIPE_BASE_URL", stripe_url);
    db.set("SP_BILLING_WINDOW_SECS", "1");
    db.set("SP_BILLING_REPORT_INTERVAL_MS", "100");
    db.set("SP_STRIPE_TIMEOUT_SECS", "1");
    db.set("SP_BILLING_RETRY_BASE_MS", "20");
    fallback_env(db).await
}

/// Units per band for `used` units over `reserved` with these tier thresholds (SPEC §6,
/// worked out here on its own rather than with the crate's tier math).
pub fn expected_bands(used: u64, reserved: u64, thresholds: &[u64]) -> Vec<u64> {
    let over = used.saturating_sub(reserved);
    let mut low = 0;
    thresholds
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let high = if i + 1 == thresholds.len() {
                u64::MAX
            } else {
                *t
            };
            let units = over.min(high).saturating_sub(low);
            low = high;
            units
        })
        .collect()
}

/// Fallback units of exchange `i`: every tenth exchange needed the LLM fallback (a repair, two
/// transactions, is dearer than a commit in a batch), with 0 to 600 tokens.
pub fn fu_of(i: u64) -> u64 {
    if i.is_multiple_of(10) {
        (i * 37) % 601
    } else {
        0
    }
}

/// Repairs in flight per client. Every repair of a tenant takes the lock of its month row twice
/// (reserve, settle) while holding a pooled connection; more at once than the pool has
/// connections (16) queue for one, and on a loaded machine past the pool's 2 s wait: a 503, as
/// it should be under overload, but not the load these tests are about.
const REPAIR_WAVE: usize = 8;

/// Exchanges `range` of `tenant` (one new trace each), as the filter makes them: first the
/// LLM-fallback repair of each exchange with FU (`fu_of`, metered by the repair),
/// [`REPAIR_WAVE`] at a time, then the commits (VEx), 50 to a batch, 4 batches at a time; every
/// one must succeed.
pub async fn exchanges(client: &Client, tenant: &str, range: std::ops::Range<u64>) {
    let key = signing_key();
    let ids: Vec<u64> = range.collect();
    let metered: Vec<u64> = ids.iter().copied().filter(|i| fu_of(*i) > 0).collect();
    for wave in metered.chunks(REPAIR_WAVE) {
        let repairs = wave.iter().map(|i| async move {
            let request = json!({"tenant": tenant, "idempotency_key": format!("k-{tenant}-{i}"),
                                 "payload_type": "invoice.v1", "location": "/arguments",
                                 "text": format!("{{fu={}", fu_of(*i)), "schema": null});
            (*i, client.internal("repair", &request).await)
        });
        for (i, reply) in futures_util::future::join_all(repairs).await {
            assert_eq!(reply.status, 200, "repair {i}: {}", reply.body);
            assert_eq!(reply.body["fu_tokens"], fu_of(i), "{}", reply.body);
        }
    }
    for wave in ids.chunks(200) {
        let mut bodies = Vec::new();
        for batch in wave.chunks(50) {
            let commits: Vec<Value> = batch
                .iter()
                .map(|i| {
                    let trace = format!("t-{tenant}-{i}");
                    let receipt = sign_receipt(&key, &trace, 1, None, tenant);
                    let k = format!("k-{tenant}-{i}");
                    json!({"tenant": tenant, "idempotency_key": k,
                           "fingerprint": fingerprint(k.as_bytes()), "receipt": receipt,
                           "response": response_for(&receipt), "fu_tokens": fu_of(*i)})
                })
                .collect();
            bodies.push(json!({ "commits": commits }));
        }
        let calls = bodies.iter().map(|b| client.internal("commits", b));
        for reply in futures_util::future::join_all(calls).await {
            assert_eq!(reply.status, 200, "{}", reply.body);
            for result in reply.body["results"].as_array().unwrap() {
                assert_eq!(result["status"], 200, "{result}");
                assert_eq!(result["body"]["outcome"], "committed");
            }
        }
    }
}

/// The admin's view of `tenant`'s month once nothing is queued or being sent any more.
pub async fn settled(client: &Client, tenant: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let usage = client.usage(tenant).await;
        let tiers = |m: &str| {
            usage["billing"]["meters"][m]["tiers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let open: u64 = tiers("vex")
            .iter()
            .chain(tiers("fu").iter())
            .map(|t| {
                t["stripe"]["pending"].as_u64().unwrap() + t["stripe"]["sending"].as_u64().unwrap()
            })
            .sum();
        if open == 0 {
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {}",
            usage["billing"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stripe holds exactly the local overage of each band, on the band's meter, for the
/// tenant's customer; every tier's units are reported.
pub fn assert_exact(fake: &FakeStripe, usage: &Value, exchanges: u64) {
    let fu_used: u64 = (0..exchanges).map(fu_of).sum();
    assert_eq!(usage["vex"].as_u64(), Some(exchanges));
    assert_eq!(usage["fu"].as_u64(), Some(fu_used));
    let sums = fake.sums();
    let cases = [
        ("vex", exchanges, VEX_RESERVED, &VEX_THRESHOLDS),
        ("fu", fu_used, FU_RESERVED, &FU_THRESHOLDS),
    ];
    for (meter, used, reserved, thresholds) in cases {
        let expected = expected_bands(used, reserved, thresholds);
        assert!(
            expected.iter().all(|u| *u > 0),
            "every band is exercised: {expected:?}"
        );
        for (band, units) in expected.iter().enumerate() {
            let event_name = format!("{meter}_t{}", band + 1);
            assert_eq!(
                sums.get(&event_name).copied().unwrap_or(0),
                *units,
                "{event_name}: {sums:?}"
            );
            let tier = &usage["billing"]["meters"][meter]["tiers"][band];
            assert_eq!(tier["units"].as_u64(), Some(*units), "{tier}");
            assert_eq!(tier["stripe"]["reported"].as_u64(), Some(*units), "{tier}");
        }
    }
    assert!(fake.events().iter().all(|e| e.customer == "cus_acme"));
    assert_eq!(
        fake.counts(|c| (
            c.idempotency_errors,
            c.duplicate_identifiers,
            c.unauthorized,
            c.invalid
        )),
        (0, 0, 0, 0)
    );
}

/// A metric's value in the OpenMetrics text (`name` with its labels, as written).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
