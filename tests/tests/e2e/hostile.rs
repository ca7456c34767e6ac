//! A hostile corpus fired at the real Envoy (#13): header bytes that are not UTF-8 or not
//! visible ASCII, repeated credentials, lying lengths and encodings, integers beyond 2^53 and
//! over-deep payloads, in both modes and over HTTP/1.1 and HTTP/2. Each gets its SPEC §4 JSON
//! error, and afterwards the worker's one Wasm VM is the one it started with and still answers.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use signet_e2e::http::Response;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::raw::{Protocol, RawRequest};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY};
use signet_e2e::{Stack, Storage};

const PROTOCOLS: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];
const API_KEY_HEADERS: [&str; 2] = ["x-signet-api-key", "x-odin-api-key"];
const IDEMPOTENCY_HEADERS: [&str; 2] = ["x-signet-idempotency-key", "x-odin-idempotency-key"];

/// Values that must never authenticate or identify anything: bytes that are not UTF-8, and
/// UTF-8 that is not visible ASCII (which `str::trim` would have trimmed away).
fn hostile_suffixes() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("0xFF", b"\xff"),
        ("Latin-1 e-acute", b"\xe9"),
        ("0x85", b"\x85"),
        ("overlong slash", b"\xc0\xaf"),
        ("lone continuation", b"\x80"),
        ("U+2028", "\u{2028}".as_bytes()),
        ("U+0085", "\u{85}".as_bytes()),
        ("U+3000", "\u{3000}".as_bytes()),
        ("NBSP", "\u{a0}".as_bytes()),
        ("U+00E9", "\u{e9}".as_bytes()),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Exchange,
    Inline,
}

impl Mode {
    fn path(self) -> &'static str {
        match self {
            Mode::Exchange => "/v1/exchange",
            Mode::Inline => "/invoices",
        }
    }

    fn body(self) -> Vec<u8> {
        match self {
            Mode::Exchange => exchange_body(sample_invoice()).to_string().into_bytes(),
            Mode::Inline => sample_invoice().to_string().into_bytes(),
        }
    }

    /// A request that would succeed, before the corpus spoils one part of it.
    fn valid(self) -> RawRequest {
        let request = RawRequest::post(self.path(), &self.body());
        let request = request.header("x-signet-api-key", DEMO_KEY.as_bytes());
        match self {
            Mode::Exchange => {
                request.header("x-signet-idempotency-key", new_idempotency_key().as_bytes())
            }
            Mode::Inline => request,
        }
    }
}

struct Case {
    what: String,
    protocol: Protocol,
    request: RawRequest,
    status: u16,
    code: &'static str,
}

fn without(request: RawRequest, name: &str) -> RawRequest {
    RawRequest {
        headers: request
            .headers
            .into_iter()
            .filter(|(n, _)| n != name.as_bytes())
            .collect(),
        ..request
    }
}

fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |what: String, request: RawRequest, status: u16, code: &'static str| {
        for protocol in PROTOCOLS {
            cases.push(Case {
                what: format!("{what} over {protocol:?}"),
                protocol,
                request: request.clone(),
                status,
                code,
            });
        }
    };
    for mode in [Mode::Exchange, Mode::Inline] {
        for (label, bytes) in hostile_suffixes() {
            for position in ["after", "inside"] {
                let spoil = |value: &str| -> Vec<u8> {
                    let (head, tail) = value.split_at(value.len() / 2);
                    match position {
                        "after" => [value.as_bytes(), bytes].concat(),
                        _ => [head.as_bytes(), bytes, tail.as_bytes()].concat(),
                    }
                };
                for name in API_KEY_HEADERS {
                    let request =
                        without(mode.valid(), "x-signet-api-key").header(name, &spoil(DEMO_KEY));
                    add(
                        format!("{mode:?}: {name} with {label} {position}"),
                        request,
                        401,
                        "INVALID_API_KEY",
                    );
                }
                for name in IDEMPOTENCY_HEADERS {
                    let key = new_idempotency_key();
                    let request = without(mode.valid(), "x-signet-idempotency-key")
                        .header(name, &spoil(&key));
                    add(
                        format!("{mode:?}: {name} with {label} {position}"),
                        request,
                        400,
                        "IDEMPOTENCY_KEY_INVALID",
                    );
                }
                let request = mode.valid().header("x-signet-trace", &spoil("order-42"));
                add(
                    format!("{mode:?}: x-signet-trace with {label} {position}"),
                    request,
                    400,
                    "BAD_TRACE_ID",
                );
            }
        }
        // repeated credentials and ids: never "the first one wins"
        for (name, first, second) in [
            ("x-signet-api-key", DEMO_KEY, "evil-key"),
            ("x-signet-api-key", DEMO_KEY, DEMO_KEY),
            ("x-odin-api-key", DEMO_KEY, "evil-key"),
            ("x-signet-idempotency-key", "k-1", "k-2"),
            ("x-signet-trace", "order-1", "order-2"),
        ] {
            let request = without(mode.valid(), name)
                .header(name, first.as_bytes())
                .header(name, second.as_bytes());
            add(
                format!("{mode:?}: {name} twice ({first}, {second})"),
                request,
                400,
                "DUPLICATE_HEADER",
            );
        }
        let aliases = mode.valid().header("x-odin-api-key", b"evil-key");
        add(
            format!("{mode:?}: X-SIGNET- and X-ODIN-API-Key disagree"),
            aliases,
            400,
            "DUPLICATE_HEADER",
        );
        // an encoding the filter does not decode is never signed as if it were the payload
        for encoding in ["gzip", "br", "gzip, deflate", "deflate", "x-custom"] {
            let request = mode.valid().header("content-encoding", encoding.as_bytes());
            add(
                format!("{mode:?}: content-encoding {encoding}"),
                request,
                415,
                "UNSUPPORTED_CONTENT_ENCODING",
            );
        }
        // integers beyond 2^53, whatever the notation, in the payload and around it
        for literal in [
            "9007199254740994",
            "18446744073709551616",
            "-18446744073709551616",
            "1e21",
            "9.007199254740994e15",
        ] {
            let mut payload = sample_invoice().to_string();
            payload.insert_str(1, &format!("\"n\":{literal},"));
            let body = match mode {
                Mode::Exchange => format!(
                    r#"{{"payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","payload":{payload}}}"#
                ),
                Mode::Inline => payload,
            };
            let mut request = mode.valid();
            request.body = body.into_bytes();
            add(
                format!("{mode:?}: integer {literal} in the payload"),
                request,
                422,
                "UNSAFE_INTEGER",
            );
        }
        // 65 levels whose innermost container is empty (the limit is 64)
        let mut deep = json!([]);
        for _ in 0..64 {
            deep = json!([deep]);
        }
        let mut request = mode.valid();
        request.body = match mode {
            Mode::Exchange => exchange_body(deep.clone()).to_string().into_bytes(),
            Mode::Inline => deep.to_string().into_bytes(),
        };
        add(
            format!("{mode:?}: 65 levels, innermost empty"),
            request,
            422,
            "TOO_DEEP",
        );
    }
    cases
}

fn is_spec_error(response: &Response, status: u16, code: &str) -> bool {
    response.status == status
        && response.header("content-type") == Some("application/json")
        && serde_json::from_slice::<Value>(&response.body).is_ok_and(|body| {
            body["code"] == code && body["detail"].as_str().is_some_and(|d| !d.is_empty())
        })
}

/// The Wasm VMs Envoy created and has active: a VM that panicked is replaced or stays dead.
fn vm_counters(stack: &Stack) -> (f64, f64) {
    let stats = stack.envoy.stats();
    (
        stats.value("envoy_wasm_envoy_wasm_runtime_v8_created", &[]),
        stats.value("envoy_wasm_envoy_wasm_runtime_v8_active", &[]),
    )
}

fn assert_still_verifies(stack: &Stack, when: &str) {
    for protocol in PROTOCOLS {
        for mode in [Mode::Exchange, Mode::Inline] {
            let response = mode
                .valid()
                .send(protocol, stack.envoy.port, Duration::from_secs(10))
                .unwrap_or_else(|| {
                    panic!("{when}: no answer to a valid {mode:?} over {protocol:?}")
                });
            assert_eq!(
                response.status,
                200,
                "{when}: a valid {mode:?} over {protocol:?}: {}\n{}",
                response.text(),
                stack.logs()
            );
        }
    }
}

#[test]
fn a_hostile_corpus_gets_spec_errors_and_leaves_the_vm_alive() {
    let stack = Stack::start(Storage::Sqlite);
    assert_still_verifies(&stack, "before the corpus");
    let vms = vm_counters(&stack);
    assert!(vms.0 >= 1.0, "no Wasm VM stats: {vms:?}");

    let cases = corpus();
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let mut unexpected = Vec::new();
    for case in &cases {
        let response = case
            .request
            .send(case.protocol, stack.envoy.port, Duration::from_secs(10));
        match response {
            Some(r) if is_spec_error(&r, case.status, case.code) => {}
            Some(r) => unexpected.push(format!(
                "{}: expected {} {}, got {} {}",
                case.what,
                case.status,
                case.code,
                r.status,
                r.text()
            )),
            None => unexpected.push(format!("{}: no answer", case.what)),
        }
    }
    assert!(
        unexpected.is_empty(),
        "{} of {} cases unexpected:\n{}\n{}",
        unexpected.len(),
        cases.len(),
        unexpected.join("\n"),
        stack.logs()
    );

    assert_still_verifies(&stack, "after the corpus");
    assert_eq!(vm_counters(&stack), vms, "the Wasm VM was replaced or lost");
    let log = stack.envoy.service.log();
    assert!(!log.contains("panicked"), "a panic in Envoy's log:\n{log}");
}

/// A declared length of 2^32 or more with a short body is refused at once (it was parsed as a
/// 32-bit `usize` in Wasm, and the request hung until the client gave up).
#[test]
fn a_declared_length_beyond_32_bits_is_refused_at_once() {
    let stack = Stack::start(Storage::Sqlite);
    for mode in [Mode::Exchange, Mode::Inline] {
        for length in [u64::from(u32::MAX), 1 << 32, (1 << 32) + 10, u64::MAX] {
            let mut request = mode.valid();
            request.declared_length = Some(length);
            request.body.truncate(10);
            let started = Instant::now();
            let response = request
                .send(Protocol::Http1, stack.envoy.port, Duration::from_secs(5))
                .unwrap_or_else(|| {
                    panic!("{mode:?}: no answer within 5 s to content-length {length}")
                });
            assert!(
                is_spec_error(&response, 413, "BODY_TOO_LARGE"),
                "{mode:?}, content-length {length}: {} {}",
                response.status,
                response.text()
            );
            assert!(started.elapsed() < Duration::from_secs(2));
        }
    }
}

/// Only ASCII optional whitespace (RFC 9110 OWS) around a key is trimmed.
#[test]
fn ascii_whitespace_around_a_key_is_trimmed_and_nothing_else() {
    let stack = Stack::start(Storage::Sqlite);
    for protocol in PROTOCOLS {
        let padded = without(Mode::Exchange.valid(), "x-signet-api-key")
            .header("x-signet-api-key", b" \tdemo-key\t ");
        let response = padded
            .send(protocol, stack.envoy.port, Duration::from_secs(10))
            .expect("answer");
        assert_eq!(response.status, 200, "{protocol:?}: {}", response.text());
    }
    // K and K+U+3000 are two keys: the second is refused, it does not collide with the first
    let key = new_idempotency_key();
    let first = without(Mode::Exchange.valid(), "x-signet-idempotency-key")
        .header("x-signet-idempotency-key", key.as_bytes());
    let response = first
        .send(Protocol::Http1, stack.envoy.port, Duration::from_secs(10))
        .expect("answer");
    assert_eq!(response.status, 200, "{}", response.text());
    let mut changed = sample_invoice();
    changed["note"] = json!("another request");
    let mut second = without(Mode::Exchange.valid(), "x-signet-idempotency-key").header(
        "x-signet-idempotency-key",
        format!("{key}\u{3000}").as_bytes(),
    );
    second.body = exchange_body(changed).to_string().into_bytes();
    let response = second
        .send(Protocol::Http1, stack.envoy.port, Duration::from_secs(10))
        .expect("answer");
    assert!(
        is_spec_error(&response, 400, "IDEMPOTENCY_KEY_INVALID"),
        "{} {}",
        response.status,
        response.text()
    );
}
