//! `cargo bench -p signet-protocol`: canonicalize, CID, sign and verify on a 1 KB and a 64 KB
//! payload, against `serde_json` serialization of the same value measured in the same run.
//! Prints each figure, the ratio to the baseline and whether the targets are met:
//! canonicalize ≤ 3× serde_json, CID + sign of 1 KB ≤ 40 µs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use signet_protocol::canonical::{canonicalize, to_canonical, Profile};
use signet_protocol::cid::cid;
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{Jwks, SigningKey};

/// How many calls of `f` take about 20 ms.
fn calls_per_sample<R>(f: &mut impl FnMut() -> R) -> u32 {
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < Duration::from_millis(20) {
        black_box(f());
        calls += 1;
    }
    calls
}

fn sample<R>(f: &mut impl FnMut() -> R, calls: u32) -> Duration {
    let start = Instant::now();
    for _ in 0..calls {
        black_box(f());
    }
    start.elapsed() / calls
}

fn median<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values[values.len() / 2]
}

/// Median time of one call of `f`, over 9 samples.
fn time<R>(mut f: impl FnMut() -> R) -> Duration {
    let calls = calls_per_sample(&mut f);
    median((0..9).map(|_| sample(&mut f, calls)).collect())
}

/// Median time of one call of `f` and median ratio to `baseline`, sampling the two alternately
/// so that a busy machine slows both alike.
fn time_against<R, S>(
    mut baseline: impl FnMut() -> S,
    mut f: impl FnMut() -> R,
) -> (Duration, f64) {
    let (base_calls, calls) = (calls_per_sample(&mut baseline), calls_per_sample(&mut f));
    let (times, ratios) = (0..9)
        .map(|_| {
            let base = sample(&mut baseline, base_calls);
            let t = sample(&mut f, calls);
            (t, t.as_secs_f64() / base.as_secs_f64())
        })
        .unzip();
    (median(times), median(ratios))
}

/// An invoice-like document of about `target` canonical bytes: nested objects, arrays, decimals,
/// integers and some non-ASCII text (the NFC check sees real work).
fn payload(target: usize) -> Value {
    let mut lines = Vec::new();
    let mut value = json!({});
    for i in 0.. {
        lines.push(json!({
            "sku": format!("SKU-{i:05}"),
            "description": format!("Widget Größe {} – café edition", i % 7),
            "qty": i % 9 + 1,
            "unit_price": 19.99 + f64::from(i % 13) * 0.25,
            "tax_rate": 0.19,
            "tags": ["blue", "large", i % 3 == 0],
        }));
        value = json!({
            "invoice_id": "INV-2026-000123",
            "currency": "EUR",
            "customer": {"name": "Jürgen Müller", "email": "jm@example.com", "vip": false},
            "issued_at": "2026-11-25T17:00:00.123Z",
            "lines": lines,
            "total_minor": 123_456_789,
            "notes": null,
        });
        if serde_json::to_string(&value).map_or(0, |s| s.len()) >= target {
            break;
        }
    }
    value
}

fn micros(d: Duration) -> String {
    format!("{:>10.2} µs", d.as_secs_f64() * 1e6)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT MET"
    }
}

fn main() {
    let key = SigningKey::from_seed([42; 32], "bench");
    let jwks: Jwks = [key.public_jwk()].into_iter().collect();
    let mut all_met = true;

    for (label, size) in [("1 KB", 1024), ("64 KB", 64 * 1024)] {
        let value = payload(size);
        let canon = to_canonical(&value, Profile::Signet).unwrap_or_default();
        let text = serde_json::to_string(&value).unwrap_or_default();
        println!("\npayload {label}: {} canonical bytes", canon.len());

        let baseline = || serde_json::to_string(black_box(&value));
        println!(
            "  {:<44}{}   (baseline)",
            "serde_json::to_string",
            micros(time(baseline))
        );

        for (name, profile) in [
            ("to_canonical signet-jcs", Profile::Signet),
            ("to_canonical rfc8785", Profile::Rfc8785),
        ] {
            let (t, ratio) = time_against(baseline, || to_canonical(black_box(&value), profile));
            let met = ratio <= 3.0;
            all_met &= met;
            println!(
                "  {name:<44}{}   {ratio:>5.2}× baseline   target ≤ 3×: {}",
                micros(t),
                verdict(met)
            );
        }

        // Bytes in, canonical bytes out, against serde_json's own round trip (informational).
        let (ours, ratio) = time_against(
            || serde_json::from_str::<Value>(black_box(&text)).map(|v| serde_json::to_string(&v)),
            || canonicalize(black_box(text.as_bytes()), Profile::Signet),
        );
        println!(
            "  {:<44}{}   {ratio:>5.2}× serde_json from_str + to_string",
            "canonicalize bytes (parse + write)",
            micros(ours),
        );

        let t_cid = time(|| cid(black_box(canon.as_bytes())));
        println!("  {:<44}{}", "cid", micros(t_cid));
        let t_sign = time(|| key.sign(black_box(canon.as_bytes())));
        println!("  {:<44}{}", "sign (Ed25519)", micros(t_sign));
        let t_cid_sign = time(|| {
            let id = cid(black_box(canon.as_bytes()));
            (key.sign(canon.as_bytes()), id)
        });
        if size == 1024 {
            let met = t_cid_sign <= Duration::from_micros(40);
            all_met &= met;
            println!(
                "  {:<44}{}   target ≤ 40 µs: {}",
                "cid + sign",
                micros(t_cid_sign),
                verdict(met)
            );
        } else {
            println!("  {:<44}{}", "cid + sign", micros(t_cid_sign));
        }
        let sig = key.sign(canon.as_bytes());
        let t_verify = time(|| jwks.verify("bench", black_box(canon.as_bytes()), &sig));
        println!(
            "  {:<44}{}",
            "verify (Ed25519, JWKS lookup)",
            micros(t_verify)
        );

        // The whole receipt step of the pipeline for this payload.
        let draft = ReceiptDraft {
            trace_id: "bench-trace".into(),
            hop: 2,
            ts: "2026-11-25T17:00:00.123Z".into(),
            tenant: "acme".into(),
            cid: cid(canon.as_bytes()),
            canon: Some(canon.clone()),
            prev_receipt_hash: Some(cid(b"previous")),
            policy: Policy {
                engine: "HEL".into(),
                allowed: true,
                reason: "ok".into(),
            },
            extensions: Default::default(),
        };
        let t_receipt_sign = time(|| receipt::sign(black_box(&draft), &key));
        println!(
            "  {:<44}{}",
            "receipt::sign (payload canon included)",
            micros(t_receipt_sign)
        );
        let signed = receipt::sign(&draft, &key)
            .map(Value::Object)
            .unwrap_or_default();
        let t_receipt_verify = time(|| receipt::verify(black_box(&signed), Some(&jwks), true));
        println!(
            "  {:<44}{}",
            "receipt::verify (hash, cid, signature)",
            micros(t_receipt_verify)
        );
    }
    println!("\nall targets: {}", if all_met { "met" } else { "NOT MET" });
}
