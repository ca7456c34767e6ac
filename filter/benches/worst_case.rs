//! Worst-case cost of the filter's text and value passes at the route's limits (#13 item 1):
//! V8 gives a Wasm filter no deadline, so each pass must be linear in its input. For growing
//! input sizes up to the default route limit (1 MiB) and beyond, this prints the time per run
//! and per input byte; a linear pass keeps ns/byte flat as the size grows by 4×.
//!
//! `cargo bench -p signet-filter --bench worst_case` (natively; V8 runs the .wasm slower, the
//! shape is the same).

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use signet_filter::registry::{nesting_depth, RawRegistry, Registry};
use signet_filter::repair::repair;
use signet_filter::sanitize::{sanitize, sanitize_str};

const SIZES: [usize; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// Median time of one run of `f`, over enough runs to fill ~200 ms (at least 3).
fn time(mut f: impl FnMut()) -> Duration {
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < 3
        || (started.elapsed() < Duration::from_millis(200) && samples.len() < 50)
    {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

/// `SIGNET_BENCH_MAX_KIB` caps the sizes (to time a quadratic version without waiting hours).
fn sizes() -> impl Iterator<Item = usize> {
    let max = std::env::var("SIGNET_BENCH_MAX_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(usize::MAX, |k| k << 10);
    SIZES.into_iter().filter(move |&s| s <= max)
}

fn report<'a>(name: &str, make: impl Fn(usize) -> Box<dyn FnMut() + 'a>) {
    println!("{name}");
    let mut first: Option<f64> = None;
    for size in sizes() {
        let mut run = make(size);
        let t = time(&mut run);
        let per_byte = t.as_nanos() as f64 / size as f64;
        let ratio = per_byte / *first.get_or_insert(per_byte);
        println!(
            "  {:>5} KiB  {:>10.3} ms  {:>7.2} ns/byte  (×{ratio:.2} of the smallest per byte)",
            size >> 10,
            t.as_secs_f64() * 1e3,
            per_byte
        );
    }
}

/// The text repair sees: `n` bytes of `unit` repeated, after `prefix`.
fn text(prefix: &str, unit: &str, n: usize) -> String {
    let mut s = String::with_capacity(n + prefix.len());
    s.push_str(prefix);
    while s.len() < n {
        s.push_str(unit);
    }
    s
}

fn main() {
    println!("signet-filter worst cases (time per run; ns/byte flat = linear)\n");

    report(
        "repair: open brackets only ([[[[…, closed at the end)",
        |n| {
            let t = text("", "[", n);
            Box::new(move || {
                black_box(repair(black_box(&t)));
            })
        },
    );
    report("repair: mismatched closers ([[[[… then }}}}…)", |n| {
        let t = format!("{}{}", "[".repeat(n / 2), "}".repeat(n / 2));
        Box::new(move || {
            black_box(repair(black_box(&t)));
        })
    });
    report(
        "repair: interleaved {[ opened, each closer skips a level ({[{[… ]]]]…)",
        |n| {
            let t = format!("{}{}", "{[".repeat(n / 4), "]".repeat(n / 2));
            Box::new(move || {
                black_box(repair(black_box(&t)));
            })
        },
    );
    report(
        "repair: a string of control characters (\"\\x01\\x01…)",
        |n| {
            let t = text("\"", "\u{1}", n);
            Box::new(move || {
                black_box(repair(black_box(&t)));
            })
        },
    );
    report(
        "repair: bare words with long whitespace lookahead ({a    a    …)",
        |n| {
            let t = text("{", "a        ", n);
            Box::new(move || {
                black_box(repair(black_box(&t)));
            })
        },
    );
    report(
        "sanitize_str: control characters and zero-width spaces",
        |n| {
            let t = text("", "\u{1}\u{200b}x", n);
            Box::new(move || {
                black_box(sanitize_str(black_box(&t)));
            })
        },
    );
    report("sanitize: an array of short strings", |n| {
        let v = Value::Array(vec![json!("ab\u{1}cd"); n / 8]);
        Box::new(move || {
            let mut v = v.clone();
            sanitize(black_box(&mut v));
            black_box(v);
        })
    });
    report(
        "nesting_depth: 64 levels of [[…]] repeated side by side",
        |n| {
            let mut deep = json!([]);
            for _ in 0..63 {
                deep = json!([deep]);
            }
            let v = Value::Array(vec![deep; n / 130]);
            Box::new(move || {
                black_box(nesting_depth(black_box(&v)));
            })
        },
    );
    let registry = Registry::compile(&RawRegistry::builtin().expect("builtin")).expect("compile");
    report(
        "normalize (repair, schema, JMESPath, money): 16 tool calls, n/16 bytes each",
        |n| {
            let description = "x".repeat(n / 16 - 200);
            let arguments = format!(
                "{{invoice_id: 'INV-1', amount: 123.45, currency: 'USD', customer_name: 'Acme', description: '{description}',}}"
            );
            let call = json!({"type":"function","function":{"name":"create_invoice","arguments":arguments}});
            let payload = json!({"tool_calls": vec![call; 16]});
            let registry = &registry;
            Box::new(move || {
                let result = registry.normalize(
                    "openai.tooluse.invoice.v1",
                    "invoice.iso20022.v1",
                    payload.clone(),
                );
                black_box(result.is_ok());
            })
        },
    );
    let outcome = registry
        .normalize(
            "openai.tooluse.invoice.v1",
            "invoice.iso20022.v1",
            json!({"tool_calls": vec![json!({"type":"function","function":{"name":"create_invoice","arguments":format!("{{invoice_id: 'INV-1', amount: 1, currency: 'USD', customer_name: 'A', description: '{}'}}", "x".repeat(65_000))}}); 16]}),
        )
        .map(|_| "ok".to_owned())
        .unwrap_or_else(|e| e.code);
    println!("  (16 × 64 KB tool calls normalize to: {outcome})");
}
