//! Per-exchange CPU of the filter's logic, stage by stage, built for wasm32-wasip1 and run under
//! V8 (node) by `scripts/wasm-bench/run.sh`, which also runs it natively and against a baseline
//! revision in the same invocation. Not part of `make test`; the `--check` run (one exchange,
//! output checked) is what `cargo test` may use.
//!
//! The exchange is the one `make bench` sends: `scripts/payloads/invoice-toolcall.json` in an
//! `openai.tooluse.invoice.v1` → `invoice.iso20022.v1` envelope, with the filter's default
//! registry. It drives the modules the pipeline uses (not the exchange's state machine itself):
//!   parse      canonical::parse of the request body, envelope members, body fingerprint
//!   sanitize   sanitize::sanitize of the payload
//!   normalize  Registry::normalize (validate, decode/repair, invariants, transform, validate)
//!   canon+cid  canonical::to_canonical of the normalized payload and its CID
//!   sign       receipt::sign (Ed25519 over the canonical receipt, receipt_hash)
//!   response   the 200 body (`pipeline::exchange_response`) and the commit as JSON text
//!              (`signet_protocol::internal::Commit::to_json`, as the filter writes it)
//! and, apart, Ed25519 sign and verify of a receipt-sized message and receipt::verify (what the
//! control plane does with every commit).
//!
//! `wasm_bench [--json] [--check] [--rounds N] [--per-round N] [--warmup N] [--only-exchanges N]`
//! (`--only-exchanges N`: N exchanges and nothing else, for a profiler such as `node --cpu-prof`
//! on a build with `CARGO_PROFILE_WASM_STRIP=false`, or `perf` on the native one).

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use signet_filter::pipeline;
use signet_filter::registry::{parse_options, RawRegistry, Registry};
use signet_filter::sanitize::sanitize;
use signet_protocol::canonical::{self, Profile};
use signet_protocol::internal::Commit;
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{cid, time, Jwks, SigningKey};

const PAYLOAD: &str = include_str!("../../scripts/payloads/invoice-toolcall.json");
const FROM: &str = "openai.tooluse.invoice.v1";
const TO: &str = "invoice.iso20022.v1";
/// RFC 8032 §7.1 test 1 seed: any key signs in the same time.
const SEED: [u8; 32] = [
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
];

const STAGES: [&str; 6] = [
    "parse",
    "sanitize",
    "normalize",
    "canon+cid",
    "sign",
    "response",
];

struct Bench {
    body: Vec<u8>,
    registry: Registry,
    key: SigningKey,
}

/// The work of one exchange; `lap(i)` is called when stage `i` ends.
fn exchange(b: &Bench, lap: &mut impl FnMut(usize)) -> Value {
    // parse
    let Ok(Value::Object(mut envelope)) = canonical::parse(&b.body, &parse_options()) else {
        panic!("the request body parses");
    };
    let mut text = |name: &str| match envelope.remove(name) {
        Some(Value::String(s)) => s,
        other => panic!("{name}: {other:?}"),
    };
    let (payload_type, target_type) = (text("payload_type"), text("target_type"));
    let mut payload = envelope.remove("payload").unwrap_or_default();
    let fingerprint = format!("sha256:{}", cid::sha256_hex(&b.body));
    lap(0);

    sanitize(&mut payload);
    lap(1);

    let normalized = b
        .registry
        .normalize(&payload_type, &target_type, payload)
        .unwrap_or_else(|e| panic!("normalize: {e:?}"));
    lap(2);

    let canon = canonical::to_canonical(&normalized.value, Profile::Signet).unwrap();
    let payload_cid = cid::cid(canon.as_bytes());
    lap(3);

    let policy = Policy {
        engine: "HEL".into(),
        allowed: true,
        reason: "no_forward".into(),
    };
    let mut extensions = Map::new();
    extensions.insert("payload_type".into(), payload_type.into());
    extensions.insert("target_type".into(), target_type.into());
    let draft = ReceiptDraft {
        trace_id: "sig-00000000000000a1".into(),
        hop: 1,
        ts: time::rfc3339_millis(1_764_090_000_123),
        tenant: "demo".into(),
        cid: payload_cid,
        canon: Some(canon),
        prev_receipt_hash: None,
        policy: policy.clone(),
        extensions,
    };
    let receipt = receipt::sign(&draft, &b.key).unwrap();
    lap(4);

    // the response and commit writers the pipeline uses
    let response = pipeline::exchange_response(&receipt, Some(normalized.value), &policy).unwrap();
    let body = serde_json::value::to_raw_value(&response).unwrap();
    let commit = Commit {
        tenant: "demo".into(),
        idempotency_key: "bench-key".into(),
        fingerprint: fingerprint.into(),
        receipt: Value::Object(receipt),
        response: &body,
        fu_tokens: 0,
        deadline_ms: None,
    }
    .to_json()
    .unwrap();
    black_box((commit.get().len(), body.get().len()));
    lap(5);
    serde_json::from_str(commit.get()).unwrap()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median µs per call of `f` over `rounds` rounds of `per_round` calls.
fn time_us<R>(rounds: usize, per_round: usize, mut f: impl FnMut() -> R) -> f64 {
    median(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..per_round {
                    black_box(f());
                }
                start.elapsed().as_secs_f64() * 1e6 / per_round as f64
            })
            .collect(),
    )
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let payload: Value = serde_json::from_str(PAYLOAD).expect("the payload file is JSON");
    // Compact, as scripts/bench.sh sends it.
    let body = format!(
        r#"{{"payload_type":"{FROM}","target_type":"{TO}","payload":{}}}"#,
        serde_json::to_string(&payload).unwrap()
    )
    .into_bytes();
    let bench = Bench {
        body,
        registry: Registry::compile(&RawRegistry::builtin().unwrap()).unwrap(),
        key: SigningKey::from_seed(SEED, "bench"),
    };

    let commit = exchange(&bench, &mut |_| {});
    let jwks: Jwks = [bench.key.public_jwk()].into_iter().collect();
    receipt::verify(&commit["receipt"], Some(&jwks), true).expect("the receipt verifies");
    assert_eq!(
        commit["response"]["normalized"],
        json!({"invoice_id":"INV-2026-0042","amount_minor":123450,"currency":"EUR",
               "customer":{"name":"ACME Robotics GmbH"},
               "description":"Envoy filter rollout across three clusters, receipt storage sizing and key rotation runbook (Nov 2026)"})
    );
    if args.iter().any(|a| a == "--check") {
        println!("ok: {} bytes of commit", commit.to_string().len());
        return;
    }
    // For a profiler: only exchanges, no timers.
    let only = arg(&args, "--only-exchanges", 0);
    if only > 0 {
        for _ in 0..only {
            black_box(exchange(&bench, &mut |_| {}));
        }
        return;
    }

    let rounds = arg(&args, "--rounds", 15);
    let per_round = arg(&args, "--per-round", 200);
    // V8 runs new code in Liftoff and tiers hot functions up to TurboFan: warm up first.
    for _ in 0..arg(&args, "--warmup", 3000) {
        black_box(exchange(&bench, &mut |_| {}));
    }

    // Per stage: median over rounds of the mean per exchange within a round.
    let mut per_stage: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    for _ in 0..rounds {
        let mut sums = [Duration::ZERO; STAGES.len()];
        for _ in 0..per_round {
            let mut last = Instant::now();
            black_box(exchange(&bench, &mut |i| {
                let now = Instant::now();
                sums[i] += now - last;
                last = now;
            }));
        }
        for (stage, sum) in per_stage.iter_mut().zip(sums) {
            stage.push(sum.as_secs_f64() * 1e6 / per_round as f64);
        }
    }
    let mut figures: Vec<(String, f64)> = STAGES
        .iter()
        .zip(per_stage)
        .map(|(name, samples)| (name.to_string(), median(samples)))
        .collect();
    let stage_sum: f64 = figures.iter().map(|(_, us)| us).sum();
    figures.push(("sum of stages".into(), stage_sum));
    // The whole exchange without the clock reads between stages.
    let total = time_us(rounds, per_round, || exchange(&bench, &mut |_| {}));
    figures.push(("exchange (no lap timers)".into(), total));

    // Apart: the Ed25519 primitives on a receipt-sized message, and a full receipt check.
    let receipt = &commit["receipt"];
    let msg = canonical::to_canonical(receipt, Profile::Signet).unwrap();
    let sig = bench.key.sign(msg.as_bytes());
    let micro = (rounds, per_round * 2);
    figures.push((
        "ed25519 sign (receipt-sized msg)".into(),
        time_us(micro.0, micro.1, || bench.key.sign(msg.as_bytes())),
    ));
    figures.push((
        "ed25519 verify (receipt-sized msg)".into(),
        time_us(micro.0, micro.1, || {
            jwks.verify("bench", msg.as_bytes(), &sig).is_ok()
        }),
    ));
    figures.push((
        "receipt::verify (control plane)".into(),
        time_us(micro.0, micro.1, || {
            receipt::verify(receipt, Some(&jwks), true).is_ok()
        }),
    ));

    if args.iter().any(|a| a == "--json") {
        // [[name, µs], …] in the order above
        let pairs: Vec<Value> = figures
            .iter()
            .map(|(name, us)| json!([name, (us * 100.0).round() / 100.0]))
            .collect();
        println!("{}", Value::Array(pairs));
    } else {
        for (name, us) in &figures {
            println!("{name:<36} {us:>9.1} µs");
        }
    }
}
