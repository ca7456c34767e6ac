//! CPU cost of one verified exchange inside the filter (natively; V8 runs the .wasm slower),
//! next to a baseline measured in the same run: parsing and re-serializing the same request
//! body with serde_json, the least any JSON-aware filter does.
//!
//! `cargo bench -p signet-filter --bench pipeline`

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use signet_filter::config::Config;
use signet_filter::host::{Host, LogLevel};
use signet_filter::pipeline::{Action, CalloutResponse, CommitJson, Exchange, Headers};
use signet_filter::registry::{RawRegistry, Registry};
use signet_filter::route::{CachedRoute, RawRouteSettings, RouteSettings};
use signet_filter::worker::WorkerState;

const BODY: &str = r#"{"payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","payload":{"tool_calls":[{"type":"function","function":{"name":"create_invoice","arguments":"{invoice_id: 'INV-1', amount: 123.45, currency: 'USD', customer_name: 'Acme', description: 'Services',}"}}]}}"#;

#[derive(Default)]
struct BenchHost {
    shared: HashMap<String, Vec<u8>>,
    n: u64,
}

impl Host for BenchHost {
    fn now_millis(&self) -> u64 {
        1_764_090_000_000
    }
    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.get(key).cloned()
    }
    fn shared_set(&mut self, key: &str, value: &[u8]) {
        self.shared.insert(key.to_owned(), value.to_vec());
    }
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        (self.shared_get(key), 0)
    }
    fn shared_set_cas(&mut self, key: &str, value: &[u8], _cas: u32) -> bool {
        self.shared_set(key, value);
        true
    }
    fn random_hex(&mut self, bytes: usize) -> String {
        self.n += 1;
        format!("{:0width$x}", self.n, width = bytes * 2)
    }
    fn count(&mut self, _stat: &str) {}
    fn record(&mut self, _stat: &str, _value: u64) {}
    fn log(&mut self, _level: LogLevel, _message: &str) {}
}

fn ok(body: Value) -> CalloutResponse {
    CalloutResponse {
        status: Some(200),
        body: body.to_string().into_bytes(),
    }
}

/// One exchange with an answering control plane; returns the response size.
fn exchange(config: &Rc<Config>, route: &CachedRoute, host: &mut BenchHost) -> usize {
    let worker = Rc::new(RefCell::new(WorkerState::default()));
    let mut ex = Exchange::new(Rc::clone(config), route.clone(), worker, 0);
    let headers = Headers::from(
        &[
            ("x-signet-api-key", "demo-key"),
            ("x-signet-idempotency-key", "k"),
        ][..],
    );
    let mut action = ex.on_request_headers(host, &headers, false);
    if let Action::Call(_) = action {
        action = ex.on_callout_response(host, ok(json!({"tenant":"demo","allowlist":[]})));
    }
    assert_eq!(action, Action::Pause);
    let mut action = ex.on_request_body(host, BODY.len(), true, &mut || BODY.as_bytes().to_vec());
    loop {
        action = match action {
            Action::Commit(CommitJson(commit, _)) => {
                // the control plane reads the commit, stores it and says so
                let _: Value = serde_json::from_str(commit.get()).unwrap();
                ex.on_callout_response(host, ok(json!({"outcome":"committed"})))
            }
            Action::Respond(r) => {
                assert_eq!(r.status, 200);
                return r.body.len();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn measure(name: &str, mut f: impl FnMut() -> usize) -> Duration {
    for _ in 0..200 {
        black_box(f());
    }
    let rounds = 3000;
    let start = Instant::now();
    for _ in 0..rounds {
        black_box(f());
    }
    let per = start.elapsed() / rounds;
    println!("{name:<48} {:>9.1} µs/op", per.as_secs_f64() * 1e6);
    per
}

fn main() {
    let env = |name: &str| match name {
        "SP_PRIVATE_KEY_B64" => Some("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A".to_owned()),
        "SP_KID" => Some("bench".to_owned()),
        "SP_FILTER_TOKEN" => Some("token".to_owned()),
        _ => None,
    };
    let config = Rc::new(Config::load(br#"{"control_plane":{"cluster":"cp"}}"#, &env).unwrap());
    let route: CachedRoute = RouteSettings::compile(
        "bench",
        &RawRouteSettings::default(),
        &RawRouteSettings::default(),
        &config.registry,
    )
    .map(Rc::new)
    .map_err(Rc::from);
    let registry = Registry::compile(&RawRegistry::builtin().unwrap()).unwrap();
    let payload: Value = serde_json::from_str::<Value>(BODY).unwrap()["payload"].clone();
    let mut host = BenchHost::default();

    println!(
        "one exchange of the seed invoice ({} bytes, arguments needing repair)",
        BODY.len()
    );
    let baseline = measure("baseline: serde_json parse + serialize", || {
        let v: Value = serde_json::from_slice(BODY.as_bytes()).unwrap();
        serde_json::to_vec(&v).unwrap().len()
    });
    measure("registry.normalize (validate/repair/map/validate)", || {
        registry
            .normalize(
                "openai.tooluse.invoice.v1",
                "invoice.iso20022.v1",
                payload.clone(),
            )
            .map(|n| n.repairs as usize)
            .unwrap()
    });
    let draft = signet_protocol::receipt::ReceiptDraft {
        trace_id: "t".into(),
        hop: 1,
        ts: "2026-01-01T00:00:00.000Z".into(),
        tenant: "demo".into(),
        cid: signet_protocol::cid::cid(b"{}"),
        canon: Some("{}".into()),
        prev_receipt_hash: None,
        policy: signet_protocol::receipt::Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "no_forward".into(),
        },
        extensions: Default::default(),
    };
    measure("receipt::sign (protocol crate, Ed25519)", || {
        signet_protocol::receipt::sign(&draft, &config.signing_key)
            .unwrap()
            .len()
    });
    measure("Ed25519 signature alone (ed25519-dalek)", || {
        config.signing_key.sign(BODY.as_bytes()).len()
    });
    // includes the stand-in control plane parsing the commit body
    let full = measure("whole pipeline incl. Ed25519 signing", || {
        exchange(&config, &route, &mut host)
    });
    println!(
        "whole pipeline / baseline: {:.1}x",
        full.as_secs_f64() / baseline.as_secs_f64()
    );
}
