//! The pipeline driven through a mock host and an in-memory control plane that behaves like the
//! internal API of docs/ARCHITECTURE.md (idempotency, chain heads, receipt verification).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::value::RawValue;
use serde_json::{json, Value};
use signet_protocol::internal::tenant::{self, KEY_HASH_HEADER};
use signet_protocol::internal::{
    commit, decide, forward, idempotency, repair, Candidate, Code, Commit, CommitBatch,
    CommitReply, CommitResult, CommitResults, Decision, ErrorReply, Grant, Head, Record,
    TraceState, FILTER_TOKEN_HEADER,
};
use signet_protocol::{cid, receipt, Jwks};

use super::tenant_cache;
use super::*;
use crate::commit_queue::CommitQueue;
use crate::config::tests::env;
use crate::config::Config;
use crate::host::testing::MockHost;
use crate::route::{CachedRoute, RawRouteSettings, RouteSettings};
use crate::worker::WorkerState;

const KEY: &str = "demo-key";
const TOOL_CALL: &str = r#"{"tool_calls":[{"type":"function","function":{"name":"create_invoice","arguments":"{\"invoice_id\":\"INV-1\",\"amount\":123.45,\"currency\":\"USD\",\"customer_name\":\"Acme\",\"description\":\"Services\"}"}}]}"#;

fn exchange_body(extra: Value) -> Vec<u8> {
    let mut body = json!({
        "payload_type": "openai.tooluse.invoice.v1",
        "target_type": "invoice.iso20022.v1",
        "payload": serde_json::from_str::<Value>(TOOL_CALL).unwrap(),
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string().into_bytes()
}

// ---- an in-memory control plane ----------------------------------------------------------------

/// The chain limit of the fake: more hops than any test makes.
const CHAIN_MAX: u64 = 1_000;

struct FakeControlPlane {
    jwks: Jwks,
    tenants: HashMap<String, Grant>,
    /// Done idempotency keys: (tenant, key) → fingerprint and stored response.
    slots: HashMap<(String, String), Record>,
    chains: HashMap<String, Vec<Value>>,
    owners: HashMap<String, String>,
    calls: Vec<Call>,
    /// Answer every call with this (status, body) instead; `None` status = no response.
    outage: Option<(Option<u16>, Vec<u8>)>,
    /// Override the answer of the tenant lookup, or of each commit in a batch.
    scripted: HashMap<&'static str, (u16, Value)>,
    /// Before each of the next N commits another writer extends the chain.
    racing_writers: u32,
    /// The control plane's clock (Unix ms); 0: it never finds a commit late.
    clock_ms: u64,
    /// LLM-fallback repair requests received.
    repairs: Vec<Value>,
    signer: signet_protocol::SigningKey,
    /// Every forward request received.
    forwards: Vec<forward::ForwardRequest>,
}

impl FakeControlPlane {
    fn new(config: &Config) -> Self {
        let signer =
            signet_protocol::SigningKey::from_seed_b64url(crate::config::tests::SEED, "k1")
                .unwrap();
        Self {
            jwks: [config.signing_key.public_jwk()].into_iter().collect(),
            tenants: HashMap::from([(
                cid::sha256_hex(KEY.as_bytes()),
                grant("demo", &["*.example.com"]),
            )]),
            slots: HashMap::new(),
            chains: HashMap::new(),
            owners: HashMap::new(),
            calls: Vec::new(),
            outage: None,
            scripted: HashMap::new(),
            racing_writers: 0,
            clock_ms: 0,
            repairs: Vec::new(),
            signer,
            forwards: Vec::new(),
        }
    }

    fn handle(&mut self, callout: &Callout) -> CalloutResponse {
        self.calls.push(callout.call);
        let header = |n: &str| {
            callout
                .headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(FILTER_TOKEN_HEADER).as_deref(), Some("tok"));
        assert_eq!(header(":authority").as_deref(), Some("control-plane"));
        assert_eq!(callout.cluster, "signet_cp");
        if let Some((status, body)) = &self.outage {
            return CalloutResponse {
                status: *status,
                body: body.clone(),
            };
        }
        if let (Call::Tenant, Some((status, body))) = (callout.call, self.scripted.get("tenant")) {
            return reply(*status, body.clone());
        }
        if let (Call::Idempotency, Some((status, body))) =
            (callout.call, self.scripted.get("idempotency"))
        {
            return reply(*status, body.clone());
        }
        match callout.call {
            Call::Tenant => {
                assert_eq!(header(":path").as_deref(), Some(tenant::PATH));
                match self.tenants.get(&header(KEY_HASH_HEADER).unwrap()) {
                    Some(t) => reply(200, serde_json::to_value(t).unwrap()),
                    None => error(401, "UNKNOWN_API_KEY", "unknown API key"),
                }
            }
            Call::Commit => {
                assert_eq!(header(":path").as_deref(), Some(commit::PATH));
                let body = callout.body.as_deref().unwrap();
                let batch: CommitBatch = serde_json::from_slice(body).unwrap();
                let answers: Vec<CalloutResponse> = batch
                    .commits
                    .iter()
                    .map(|c| match self.scripted.get("commit") {
                        Some((status, body)) => reply(*status, body.clone()),
                        None => self.commit(&serde_json::from_str(c.get()).unwrap()),
                    })
                    .collect();
                let bodies: Vec<Box<RawValue>> = answers
                    .iter()
                    .map(|a| {
                        RawValue::from_string(String::from_utf8(a.body.clone()).unwrap()).unwrap()
                    })
                    .collect();
                let results = CommitResults {
                    results: answers
                        .iter()
                        .zip(&bodies)
                        .map(|(a, body)| CommitResult {
                            status: a.status.unwrap(),
                            body: body.as_ref(),
                        })
                        .collect(),
                };
                CalloutResponse {
                    status: Some(200),
                    body: serde_json::to_vec(&results).unwrap(),
                }
            }
            Call::Health => {
                assert_eq!(header(":path").as_deref(), Some("/v1/internal/health"));
                assert_eq!(header(":method").as_deref(), Some("GET"));
                reply(
                    200,
                    json!({"status":"ok","storage":"sqlite","database":"reachable"}),
                )
            }
            Call::Forward => {
                assert_eq!(header(":path").as_deref(), Some(forward::PATH));
                assert_eq!(callout.timeout_ms, 15_000);
                let request: forward::ForwardRequest =
                    serde_json::from_slice(callout.body.as_deref().unwrap()).unwrap();
                self.forwards.push(request.clone());
                match self.scripted.get("forward") {
                    Some((status, body)) => reply(*status, body.clone()),
                    None => reply(
                        200,
                        json!({"delivery_id": "dlv_test", "replay": false, "forwarded": {
                            "url": request.url, "status_code": 200, "host": "api.example.com",
                            "pinned_ip": "203.0.113.7", "response_size": 2}}),
                    ),
                }
            }
            Call::Repair => {
                assert_eq!(header(":path").as_deref(), Some(repair::PATH));
                assert_eq!(
                    callout.timeout_ms, 25_000,
                    "control_plane.repair_timeout_ms"
                );
                let body: Value = serde_json::from_slice(callout.body.as_deref().unwrap()).unwrap();
                self.repairs.push(body);
                match self.scripted.get("repair") {
                    Some((status, body)) => reply(*status, body.clone()),
                    None => error(503, "FALLBACK_UNAVAILABLE", "no provider"),
                }
            }
            Call::Idempotency => {
                assert_eq!(header(":path").as_deref(), Some(idempotency::PATH));
                assert_eq!(header(":method").as_deref(), Some("POST"));
                let body = callout.body.as_deref().unwrap();
                let lookup: idempotency::Lookup = serde_json::from_slice(body).unwrap();
                let slot = (
                    lookup.tenant.into_owned(),
                    lookup.idempotency_key.into_owned(),
                );
                match self.slots.get(&slot) {
                    Some(record) => {
                        let response = RawValue::from_string(record.response.to_string()).unwrap();
                        let stored = idempotency::Stored {
                            fingerprint: record.fingerprint.as_str().into(),
                            response: &response,
                        };
                        raw_reply(200, &stored)
                    }
                    None => error(
                        404,
                        "IDEMPOTENCY_KEY_UNKNOWN",
                        "no committed request has this idempotency key",
                    ),
                }
            }
        }
    }

    /// The stored state of `trace`: its owner and last receipt.
    fn trace(&self, trace: &str) -> Option<TraceState> {
        let chain = self.chains.get(trace);
        let tenant = self.owners.get(trace).cloned().or_else(|| {
            let first = chain?.first()?;
            first["tenant"].as_str().map(str::to_owned)
        })?;
        let head = match chain.and_then(|c| c.last()) {
            Some(r) => Head {
                hop: r["hop"].as_u64().unwrap(),
                receipt_hash: r["receipt_hash"].as_str().unwrap().to_owned(),
            },
            None => Head {
                hop: 0,
                receipt_hash: String::new(),
            },
        };
        Some(TraceState { tenant, head })
    }

    /// One transaction, as the real control plane runs it: the receipt verifies, then
    /// [`decide`] says what to write.
    fn commit(&mut self, commit: &Commit) -> CalloutResponse {
        let r = &commit.receipt;
        if commit.deadline_ms.is_some_and(|d| self.clock_ms > d) {
            return error(
                504,
                "COMMIT_EXPIRED",
                "the commit arrived after its deadline",
            );
        }
        if receipt::verify(r, Some(&self.jwks), true).is_err() {
            return error(400, "RECEIPT_INVALID", "receipt does not verify");
        }
        let slot = (
            commit.tenant.to_string(),
            commit.idempotency_key.to_string(),
        );
        let trace = r["trace_id"].as_str().unwrap().to_owned();
        if self.racing_writers > 0 && !self.slots.contains_key(&slot) {
            self.racing_writers -= 1;
            self.append_foreign(&trace);
        }
        let candidate = Candidate {
            tenant: &commit.tenant,
            fingerprint: &commit.fingerprint,
            hop: r["hop"].as_u64().unwrap(),
            prev_receipt_hash: r["prev_receipt_hash"].as_str(),
            chain_max: CHAIN_MAX,
        };
        let state = self.trace(&trace);
        match decide(self.slots.get(&slot), state.as_ref(), &candidate) {
            Decision::Append => {
                self.chains
                    .entry(trace.clone())
                    .or_default()
                    .push(r.clone());
                self.owners.entry(trace).or_insert(slot.0.clone());
                let record = Record {
                    fingerprint: commit.fingerprint.to_string(),
                    response: commit.response.get().into(),
                };
                self.slots.insert(slot, record);
                raw_reply(200, &CommitReply::committed())
            }
            Decision::Replay(stored) => {
                let stored = RawValue::from_string(stored.to_string()).unwrap();
                raw_reply(200, &CommitReply::replay(&stored))
            }
            Decision::Reject(rejection) => raw_reply(rejection.code().status(), &rejection.reply()),
        }
    }

    /// Another filter appends to `trace` (a valid, signed receipt).
    fn append_foreign(&mut self, trace: &str) {
        let head = self.trace(trace).map(|t| t.head);
        let draft = receipt::ReceiptDraft {
            trace_id: trace.to_owned(),
            hop: head.as_ref().map_or(0, |h| h.hop) + 1,
            ts: "2026-01-01T00:00:00.000Z".into(),
            tenant: "demo".into(),
            cid: cid::cid(b"{}"),
            canon: Some("{}".into()),
            prev_receipt_hash: head.map(|h| h.receipt_hash),
            policy: receipt::Policy {
                engine: "HEL".into(),
                allowed: true,
                reason: "no_forward".into(),
            },
            extensions: Default::default(),
        };
        let signed = receipt::sign(&draft, &self.signer).unwrap();
        self.chains
            .entry(trace.to_owned())
            .or_default()
            .push(Value::Object(signed));
    }
}

fn grant(tenant: &str, allowlist: &[&str]) -> Grant {
    Grant {
        tenant: tenant.into(),
        allowlist: allowlist.iter().map(|h| h.to_string()).collect(),
        fallback_enabled: false,
        fu_monthly_limit: None,
    }
}

fn raw_reply(status: u16, body: &impl serde::Serialize) -> CalloutResponse {
    CalloutResponse {
        status: Some(status),
        body: serde_json::to_vec(body).unwrap(),
    }
}

fn reply(status: u16, body: Value) -> CalloutResponse {
    raw_reply(status, &body)
}

fn error(status: u16, code: &str, detail: &str) -> CalloutResponse {
    let code = Code::parse(code).unwrap();
    assert_eq!(code.status(), status);
    raw_reply(status, &ErrorReply::new(code, detail))
}

// ---- harness -----------------------------------------------------------------------------------

struct Harness {
    host: MockHost,
    config: Rc<Config>,
    cp: FakeControlPlane,
    /// The Envoy worker the requests run on.
    worker: Rc<RefCell<WorkerState>>,
}

impl Harness {
    fn new() -> Self {
        let plugin = br#"{"control_plane":{"cluster":"signet_cp","authority":"control-plane"},"tenant_cache_ttl_s":60,"global_allowlist":["global.example.org"]}"#;
        let config = Rc::new(Config::load(plugin, &env).unwrap());
        let cp = FakeControlPlane::new(&config);
        let host = MockHost {
            now: 1_764_090_000_000,
            ..Default::default()
        };
        Self {
            host,
            config,
            cp,
            worker: Rc::default(),
        }
    }

    fn new_exchange(&self, route: CachedRoute) -> Exchange {
        let worker = Rc::clone(&self.worker);
        Exchange::new(Rc::clone(&self.config), route, worker, self.host.now)
    }

    fn route(&self, metadata: Value) -> CachedRoute {
        let raw: RawRouteSettings = serde_json::from_value(metadata).unwrap();
        RouteSettings::compile(
            "r",
            &self.config.route_defaults,
            &raw,
            &self.config.registry,
        )
        .map(Rc::new)
        .map_err(Rc::from)
    }

    /// Answers the exchange's callouts until it acts otherwise; commits travel as the worker
    /// sends them, in (here one-member) batches of a real [`CommitQueue`].
    fn drive(&mut self, ex: &mut Exchange, mut action: Action) -> Action {
        loop {
            let response = match action {
                Action::Call(callout) => self.cp.handle(&callout),
                Action::Commit(CommitJson(commit, deadline_ms)) => {
                    let mut queue = CommitQueue::default();
                    queue.push(1, commit, deadline_ms).unwrap();
                    let batch = queue.next_batch().unwrap();
                    let callout = callout(&self.config, Call::Commit, Some(batch.body), vec![]);
                    let answer = self.cp.handle(&callout);
                    queue.complete(answer).pop().unwrap().1
                }
                other => return other,
            };
            self.host.now += 3; // each callout takes 3 ms
            action = ex.on_callout_response(&mut self.host, response);
        }
    }

    fn send_on(
        &mut self,
        route: CachedRoute,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (Action, Exchange) {
        let mut ex = self.new_exchange(route);
        let first = ex.on_request_headers(&mut self.host, &Headers::from(headers), body.is_empty());
        let action = self.drive(&mut ex, first);
        if action != Action::Pause || body.is_empty() {
            return (action, ex);
        }
        let body = body.to_vec();
        let partial = ex.on_request_body(
            &mut self.host,
            body.len() / 2,
            false,
            &mut || unreachable!(),
        );
        assert_eq!(partial, Action::Pause);
        let next = ex.on_request_body(&mut self.host, body.len(), true, &mut || body.clone());
        (self.drive(&mut ex, next), ex)
    }

    fn exchange(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Action {
        let route = self.route(json!({"mode":"exchange"}));
        self.send_on(route, headers, body).0
    }

    fn post(&mut self, idempotency_key: &str, body: &[u8]) -> Action {
        self.exchange(
            &[
                ("x-signet-api-key", KEY),
                ("x-signet-idempotency-key", idempotency_key),
            ],
            body,
        )
    }
}

fn respond(action: &Action) -> (u16, Value, HashMap<String, String>) {
    let Action::Respond(r) = action else {
        panic!("expected a local response, got {action:?}")
    };
    let headers = r.headers.iter().cloned().collect();
    (r.status, serde_json::from_slice(&r.body).unwrap(), headers)
}

fn error_of(action: &Action) -> (u16, String) {
    let (status, body, headers) = respond(action);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    (status, body["code"].as_str().unwrap().to_owned())
}

// ---- the happy path ----------------------------------------------------------------------------

#[test]
fn exchange_answers_with_a_signed_committed_receipt() {
    let mut h = Harness::new();
    let action = h.post("k-1", &exchange_body(json!({})));
    let (status, body, headers) = respond(&action);
    assert_eq!(status, 200);
    assert_eq!(
        body["normalized"],
        json!({"invoice_id":"INV-1","amount_minor":12345,"currency":"USD","customer":{"name":"Acme"},"description":"Services"})
    );
    assert_eq!(
        body["policy"],
        json!({"engine":"HEL","allowed":true,"reason":"no_forward"})
    );
    let trace = body["trace_id"].as_str().unwrap();
    assert!(trace.starts_with("sig-") && trace.len() == 20, "{trace}");
    let r = &body["receipt"];
    assert_eq!(
        (r["hop"].clone(), r["prev_receipt_hash"].clone()),
        (json!(1), Value::Null)
    );
    assert_eq!(r["kid"], "k1");
    assert_eq!(headers["x-signet-trace"], trace);
    assert_eq!(
        headers["x-signet-receipt-hash"],
        r["receipt_hash"].as_str().unwrap()
    );
    assert_eq!(headers["x-signet-hop"], "1");
    assert_eq!(headers["x-signet-cid"], r["cid"].as_str().unwrap());
    assert!(!headers.contains_key("x-signet-idempotency-hit"));

    // the stored receipt verifies and commits to the canonical normalized payload
    let stored = &h.cp.chains[trace][0];
    receipt::verify(stored, Some(&h.cp.jwks), true).unwrap();
    let canon = stored["canon"].as_str().unwrap();
    assert_eq!(
        canon,
        r#"{"amount_minor":12345,"currency":"USD","customer":{"name":"Acme"},"description":"Services","invoice_id":"INV-1"}"#
    );
    assert_eq!(stored["cid"], cid::cid(canon.as_bytes()));
    assert_eq!(stored["ts"], "2025-11-25T17:00:00.003Z"); // signed after the tenant lookup
    assert_eq!(
        (stored["payload_type"].as_str(), stored["tenant"].as_str()),
        (Some("openai.tooluse.invoice.v1"), Some("demo"))
    );

    // one callout per exchange once the tenant is known
    assert_eq!(h.cp.calls, vec![Call::Tenant, Call::Commit]);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 1);
    assert_eq!(h.host.histograms["signet.exchange_latency_ms"], vec![6]);
    assert!(h.worker.borrow().in_flight.is_empty());
}

#[test]
fn a_second_exchange_on_the_trace_links_to_the_first() {
    let mut h = Harness::new();
    let first = respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-1"})))).1;
    let (_, second, headers) = respond(&h.exchange(
        &[
            ("x-odin-api-key", KEY),
            ("x-odin-idempotency-key", "k-2"),
            ("x-signet-trace", "t-1"),
        ],
        &exchange_body(json!({})),
    ));
    assert_eq!(second["trace_id"], "t-1");
    assert_eq!(second["receipt"]["hop"], 2);
    assert_eq!(
        second["receipt"]["prev_receipt_hash"],
        first["receipt"]["receipt_hash"]
    );
    assert_eq!(headers["x-signet-hop"], "2");
    // the tenant lookup was cached, the head known: one commit each
    assert_eq!(h.cp.calls, vec![Call::Tenant, Call::Commit, Call::Commit]);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 2);
}

#[test]
fn replay_returns_the_stored_response_and_counts_nothing() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    let (_, first, _) = respond(&h.post("k-1", &body));
    let (status, again, headers) = respond(&h.post("k-1", &body));
    assert_eq!((status, &again), (200, &first));
    assert_eq!(headers["x-signet-idempotency-hit"], "1");
    assert_eq!(
        headers["x-signet-receipt-hash"],
        first["receipt"]["receipt_hash"].as_str().unwrap()
    );
    assert_eq!(h.host.counter("signet.idempotent_hits"), 1);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 1);
    assert_eq!(h.cp.chains.values().map(Vec::len).sum::<usize>(), 1);
}

#[test]
fn a_replay_answered_by_commit_also_counts_nothing() {
    let mut h = Harness::new();
    let stored =
        json!({"trace_id":"t","receipt":{"hop":4,"receipt_hash":"sha256:aa","cid":"sha256:bb"}});
    h.cp.scripted.insert(
        "commit",
        (200, json!({"outcome":"replay","response":stored})),
    );
    let (status, body, headers) = respond(&h.post("k-1", &exchange_body(json!({}))));
    assert_eq!((status, body), (200, stored));
    assert_eq!(
        (
            headers["x-signet-hop"].as_str(),
            headers["x-signet-idempotency-hit"].as_str()
        ),
        ("4", "1")
    );
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 0);
}

#[test]
fn repaired_arguments_are_counted() {
    let mut h = Harness::new();
    let payload = json!({"tool_calls":[{"type":"function","function":{"name":"create_invoice",
        "arguments":"```json\n{invoice_id: 'INV-9', amount: 10, currency: 'EUR', customer_name: 'Acme',}\n```"}}]});
    let (status, body, _) = respond(&h.post("k-1", &exchange_body(json!({"payload": payload}))));
    assert_eq!(status, 200);
    assert_eq!(body["normalized"]["amount_minor"], 1000);
    assert_eq!(h.host.counter("signet.repairs"), 1);
}

// ---- the LLM fallback --------------------------------------------------------------------------

/// Arguments deterministic repair cannot fix (a lost quote in the middle), and their repair.
const BROKEN_ARGUMENTS: &str =
    r#"{"invoice_id": "INV-7", "amount": 12.5, "currency": EUR", "customer_name": "Acme"}"#;
const REPAIRED_ARGUMENTS: &str =
    r#"{"invoice_id":"INV-7","amount":12.5,"currency":"EUR","customer_name":"Acme"}"#;

fn broken_exchange() -> Vec<u8> {
    let payload = json!({"tool_calls":[{"type":"function","function":{"name":"create_invoice",
        "arguments": BROKEN_ARGUMENTS}}]});
    exchange_body(json!({ "payload": payload }))
}

fn with_fallback(h: &mut Harness) {
    let mut g = grant("demo", &["*.example.com"]);
    g.fallback_enabled = true;
    h.cp.tenants.insert(cid::sha256_hex(KEY.as_bytes()), g);
}

#[test]
fn the_fallback_repairs_what_deterministic_repair_cannot_and_the_receipt_says_so() {
    let mut h = Harness::new();
    with_fallback(&mut h);
    h.cp.scripted.insert(
        "repair",
        (
            200,
            json!({"repaired": REPAIRED_ARGUMENTS, "fu_tokens": 77}),
        ),
    );
    let (status, body, _) = respond(&h.post("k-1", &broken_exchange()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["normalized"]["amount_minor"], 1250);
    assert_eq!(body["normalized"]["currency"], "EUR");
    let sent = &h.cp.repairs[0];
    assert_eq!(
        (&sent["tenant"], &sent["idempotency_key"], &sent["text"]),
        (
            &json!("demo"),
            &json!("k-1#/tool_calls/0/function/arguments"),
            &json!(BROKEN_ARGUMENTS)
        )
    );
    assert_eq!(sent["payload_type"], "openai.tooluse.invoice.v1");
    assert_eq!(sent["schema"]["required"][0], "invoice_id");
    let trace = body["trace_id"].as_str().unwrap();
    let stored = &h.cp.chains[trace][0];
    assert_eq!(
        (&stored["fallback_used"], &stored["fu_tokens"]),
        (&json!(true), &json!(77))
    );
    receipt::verify(stored, Some(&h.cp.jwks), true).unwrap();
    assert_eq!(h.host.counter("signet.fallbacks.outcome.used"), 1);
    // without a repair the receipt has neither member
    let (_, plain, _) = respond(&h.post("k-2", &exchange_body(json!({}))));
    let plain = &h.cp.chains[plain["trace_id"].as_str().unwrap()][0];
    assert!(plain.get("fallback_used").is_none() && plain.get("fu_tokens").is_none());
    assert_eq!(h.cp.repairs.len(), 1);
}

#[test]
fn a_repair_that_changes_an_amount_currency_or_id_is_422() {
    for changed in [
        r#"{"invoice_id":"INV-7","amount":125,"currency":"EUR","customer_name":"Acme"}"#,
        r#"{"invoice_id":"INV-7","amount":12.5,"currency":"USD","customer_name":"Acme"}"#,
        r#"{"invoice_id":"INV-8","amount":12.5,"currency":"EUR","customer_name":"Acme"}"#,
        r#"{"invoice_id":"INV-7","amount":12.5,"customer_name":"Acme"}"#,
        "not json",
    ] {
        let mut h = Harness::new();
        with_fallback(&mut h);
        h.cp.scripted.insert(
            "repair",
            (200, json!({"repaired": changed, "fu_tokens": 5})),
        );
        let action = h.post("k-1", &broken_exchange());
        let (status, body, _) = respond(&action);
        assert_eq!(
            (status, body["code"].as_str()),
            (422, Some("FALLBACK_INVARIANT_FAILED")),
            "{changed}: {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("5 FU metered"),
            "{body}"
        );
        assert!(h.cp.chains.is_empty(), "nothing committed");
        assert_eq!(
            h.host.counter("signet.fallbacks.outcome.invariant_failed"),
            1
        );
    }
}

#[test]
fn without_fallback_a_broken_text_is_422_as_before_and_no_repair_is_asked() {
    let mut h = Harness::new();
    assert_eq!(
        error_of(&h.post("k-1", &broken_exchange())),
        (422, "REPAIR_FAILED".into())
    );
    assert!(h.cp.repairs.is_empty());
    assert!(!h.cp.calls.contains(&Call::Repair));
}

#[test]
fn the_fallbacks_errors_reach_the_client_with_their_codes() {
    for (status, code) in [
        (429, "FU_QUOTA_EXCEEDED"),
        (504, "FALLBACK_TIMEOUT"),
        (502, "FALLBACK_PROVIDER_ERROR"),
        (422, "FALLBACK_REFUSED"),
    ] {
        let mut h = Harness::new();
        with_fallback(&mut h);
        h.cp.scripted
            .insert("repair", (status, json!({"detail": "d", "code": code})));
        assert_eq!(
            error_of(&h.post("k-1", &broken_exchange())),
            (status, code.into())
        );
        assert!(h.cp.chains.is_empty());
    }
    // no answer at all: the control plane is unavailable
    let mut h = Harness::new();
    with_fallback(&mut h);
    h.cp.scripted.insert("repair", (500, json!("oops")));
    assert_eq!(
        error_of(&h.post("k-1", &broken_exchange())),
        (503, "CONTROL_PLANE_UNAVAILABLE".into())
    );
    assert_eq!(h.host.counter("signet.callout_failures.call.repair"), 1);
}

// ---- chain conflicts ---------------------------------------------------------------------------

#[test]
fn a_chain_conflict_is_re_signed_on_the_new_head_once() {
    let mut h = Harness::new();
    respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-1"}))));
    h.cp.racing_writers = 1;
    let (status, body, _) = respond(&h.post("k-2", &exchange_body(json!({"trace_id":"t-1"}))));
    assert_eq!(status, 200);
    assert_eq!(body["receipt"]["hop"], 3);
    let chain = &h.cp.chains["t-1"];
    assert_eq!(
        body["receipt"]["prev_receipt_hash"],
        chain[1]["receipt_hash"]
    );
    assert_eq!(h.cp.calls.iter().filter(|c| **c == Call::Commit).count(), 3);
    signet_protocol::chain::verify(chain, Some(&h.cp.jwks), true).unwrap();
}

#[test]
fn a_trace_the_control_plane_lost_is_opened_anew_at_hop_1() {
    let mut h = Harness::new();
    respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-1"}))));
    respond(&h.post("k-2", &exchange_body(json!({"trace_id":"t-1"}))));
    // the control plane's storage rolled back (a power cut): it has no t-1 any more, while
    // this worker remembers hop 2
    h.cp.chains.clear();
    h.cp.owners.clear();
    h.cp.slots.clear();
    let commits = h.cp.calls.len();
    let (status, body, headers) =
        respond(&h.post("k-3", &exchange_body(json!({"trace_id":"t-1"}))));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipt"]["hop"], 1);
    assert_eq!(headers["x-signet-hop"], "1");
    assert_eq!(h.cp.calls.len() - commits, 2, "one conflict, one re-sign");
    assert_eq!(h.cp.chains["t-1"].len(), 1);
    // the worker follows the control plane's chain from now on
    let (_, next, _) = respond(&h.post("k-4", &exchange_body(json!({"trace_id":"t-1"}))));
    assert_eq!(next["receipt"]["hop"], 2);
    signet_protocol::chain::verify(&h.cp.chains["t-1"], Some(&h.cp.jwks), true).unwrap();
}

#[test]
fn a_lost_trace_that_keeps_conflicting_is_a_409_and_the_cache_is_dropped() {
    let mut h = Harness::new();
    respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-1"}))));
    h.cp.chains.clear();
    h.cp.owners.clear();
    // the control plane answers every commit with a conflict and no head
    let conflict = ErrorReply::conflict("chain conflict", None);
    h.cp.scripted
        .insert("commit", (409, serde_json::to_value(&conflict).unwrap()));
    let action = h.post("k-2", &exchange_body(json!({"trace_id":"t-1"})));
    assert_eq!(error_of(&action), (409, "CHAIN_CONFLICT".into()));
    assert_eq!(h.cp.calls.iter().filter(|c| **c == Call::Commit).count(), 3);
    assert_eq!(h.worker.borrow().heads.get("demo", "t-1"), None);
}

#[test]
fn a_second_conflict_is_a_409_and_the_key_stays_free() {
    let mut h = Harness::new();
    respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-1"}))));
    h.cp.racing_writers = 2;
    let body = exchange_body(json!({"trace_id":"t-1"}));
    let action = h.post("k-2", &body);
    assert_eq!(error_of(&action), (409, "CHAIN_CONFLICT".into()));
    assert_eq!(h.cp.calls.iter().filter(|c| **c == Call::Commit).count(), 3);
    assert_eq!(h.host.counter("signet.errors.code.CHAIN_CONFLICT"), 1);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 1);
    // nothing was stored for k-2: the client's retry goes through
    assert_eq!(respond(&h.post("k-2", &body)).0, 200);
}

#[test]
fn a_trace_this_worker_has_not_seen_is_linked_after_one_conflict() {
    let mut h = Harness::new();
    // another worker (or Envoy) wrote hops 1 and 2
    h.cp.append_foreign("t-elsewhere");
    h.cp.append_foreign("t-elsewhere");
    h.cp.owners.insert("t-elsewhere".into(), "demo".into());
    // the guess (hop 1) conflicts, and then a real writer races: still within the retries
    h.cp.racing_writers = 2;
    let (status, body, _) =
        respond(&h.post("k-1", &exchange_body(json!({"trace_id":"t-elsewhere"}))));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipt"]["hop"], 5);
    let chain = &h.cp.chains["t-elsewhere"];
    signet_protocol::chain::verify(chain, Some(&h.cp.jwks), true).unwrap();
    // the worker knows the head now: the next hop needs one commit
    let commits = h.cp.calls.len();
    let (_, next, _) = respond(&h.post("k-2", &exchange_body(json!({"trace_id":"t-elsewhere"}))));
    assert_eq!(next["receipt"]["hop"], 6);
    assert_eq!(h.cp.calls[commits..], [Call::Commit]);
}

// ---- every error row of SPEC §4 --------------------------------------------------------------

#[test]
fn status_400_rows() {
    let mut h = Harness::new();
    assert_eq!(
        error_of(&h.post("k-1", b"{not json")),
        (400, "MALFORMED_JSON".into())
    );
    assert_eq!(
        error_of(&h.exchange(&[("x-signet-api-key", KEY)], &exchange_body(json!({})))),
        (400, "MISSING_IDEMPOTENCY_KEY".into())
    );
    assert_eq!(
        error_of(&h.post("k-2", &exchange_body(json!({"trace_id":"bad trace"})))),
        (400, "BAD_TRACE_ID".into())
    );
    assert_eq!(
        error_of(&h.post("k-3", &exchange_body(json!({"trace_id": 7})))),
        (400, "BAD_TRACE_ID".into())
    );
    let long = "t".repeat(129);
    assert_eq!(
        error_of(&h.exchange(
            &[
                ("x-signet-api-key", KEY),
                ("x-signet-idempotency-key", "k-4"),
                ("x-signet-trace", &long)
            ],
            &exchange_body(json!({})),
        )),
        (400, "BAD_TRACE_ID".into())
    );
    assert_eq!(
        error_of(&h.post("k-5", b"")),
        (400, "MALFORMED_JSON".into())
    );
    assert_eq!(h.host.counter("signet.errors.code.BAD_TRACE_ID"), 3);
    assert!(!h.cp.calls.contains(&Call::Commit));
    assert!(h.worker.borrow().in_flight.is_empty());
}

#[test]
fn status_401_rows() {
    let mut h = Harness::new();
    assert_eq!(
        error_of(&h.exchange(
            &[("x-signet-idempotency-key", "k")],
            &exchange_body(json!({}))
        )),
        (401, "MISSING_API_KEY".into())
    );
    assert!(h.cp.calls.is_empty());
    assert_eq!(
        error_of(&h.exchange(
            &[
                ("x-signet-api-key", "nope"),
                ("x-signet-idempotency-key", "k")
            ],
            &exchange_body(json!({}))
        )),
        (401, "UNKNOWN_API_KEY".into())
    );
    assert_eq!(h.cp.calls, vec![Call::Tenant]);
    // auth comes before idempotency: an unknown key without an idempotency key is still 401
    assert_eq!(
        error_of(&h.exchange(&[("x-signet-api-key", "nope")], &exchange_body(json!({})))),
        (401, "UNKNOWN_API_KEY".into())
    );
}

#[test]
fn status_403_hel_denials_and_trace_ownership() {
    let mut h = Harness::new();
    for (url, reason) in [
        ("https://evil.test/x", "HEL_HOST_NOT_ALLOWED"),
        ("http://api.example.com/x", "HEL_SCHEME_NOT_HTTPS"),
        ("https://u:p@api.example.com/", "HEL_BAD_URL"),
        ("::nonsense", "HEL_BAD_URL"),
    ] {
        let action = h.post(url, &exchange_body(json!({"forward_url": url})));
        assert_eq!(error_of(&action), (403, reason.to_owned()), "{url}");
    }
    assert!(!h.cp.calls.contains(&Call::Commit), "denied before signing");
    assert_eq!(h.host.counter("signet.denials.reason.HEL_BAD_URL"), 2);
    assert_eq!(h.host.counter("signet.errors.code.HEL_HOST_NOT_ALLOWED"), 1);

    h.cp.owners.insert("theirs".into(), "other-tenant".into());
    assert_eq!(
        error_of(&h.post("k-t", &exchange_body(json!({"trace_id":"theirs"})))),
        (403, "TRACE_FORBIDDEN".into())
    );
}

#[test]
fn an_allowed_forward_url_is_delivered_before_signing_and_its_outcome_is_signed() {
    let mut h = Harness::new();
    let url = "https://API.example.com./hook#frag";
    let (status, body, _) = respond(&h.post("k-f", &exchange_body(json!({"forward_url": url}))));
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.cp.calls, vec![Call::Tenant, Call::Forward, Call::Commit]);
    let asked = &h.cp.forwards[0];
    assert_eq!(
        asked.url, "https://api.example.com./hook#frag",
        "as HEL parsed it"
    );
    assert_eq!(
        (asked.tenant.as_str(), asked.idempotency_key.as_str()),
        ("demo", "k-f")
    );
    assert_eq!((asked.hop, asked.prev_receipt_hash.as_deref()), (1, None));
    assert_eq!(asked.cid, cid::cid(asked.canon.as_bytes()));
    let forwarded = json!({"url": asked.url, "status_code": 200, "host": "api.example.com",
                           "pinned_ip": "203.0.113.7", "response_size": 2});
    assert_eq!(body["forwarded"], forwarded);
    assert_eq!(body["policy"]["reason"], "ok");
    let trace = body["trace_id"].as_str().unwrap().to_owned();
    let stored = h.cp.chains[&trace][0].clone();
    assert_eq!(
        stored["forwarded"], forwarded,
        "the signed receipt holds the outcome"
    );
    assert_eq!(stored["policy"]["reason"], "ok");
    assert_eq!(stored["cid"].as_str(), Some(asked.cid.as_str()));
    // the next exchange on the trace tells the control plane which head it signs on
    let next =
        exchange_body(json!({"forward_url": "https://api.example.com/2", "trace_id": trace}));
    assert_eq!(respond(&h.post("k-g", &next)).0, 200);
    let second = &h.cp.forwards[1];
    assert_eq!(second.hop, 2);
    assert_eq!(
        second.prev_receipt_hash.as_deref(),
        stored["receipt_hash"].as_str()
    );
    // without forward_url: no callout, reason no_forward
    let (_, plain, _) = respond(&h.post("k-h", &exchange_body(json!({}))));
    assert_eq!(plain["policy"]["reason"], "no_forward");
    assert!(plain.get("forwarded").is_none());
    assert_eq!(h.cp.forwards.len(), 2);
}

#[test]
fn a_failed_first_attempt_is_signed_as_it_was() {
    let mut h = Harness::new();
    let failed = json!({"url": "https://api.example.com/hook", "host": "api.example.com",
                        "error": "connect: connection refused"});
    h.cp.scripted.insert(
        "forward",
        (
            200,
            json!({"delivery_id": "dlv_x", "replay": false, "forwarded": failed}),
        ),
    );
    let (status, body, _) = respond(&h.post(
        "k-f",
        &exchange_body(json!({"forward_url": "https://api.example.com/hook"})),
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["forwarded"], failed);
    let trace = body["trace_id"].as_str().unwrap();
    assert_eq!(h.cp.chains[trace][0]["forwarded"], failed);
}

#[test]
fn a_refusal_after_resolution_is_the_exchange_s_403_and_nothing_is_signed() {
    let mut h = Harness::new();
    h.cp.scripted.insert(
        "forward",
        (
            403,
            json!({"detail": "resolves to 127.0.0.1", "code": "HEL_RESOLVED_LOOPBACK"}),
        ),
    );
    let action = h.post(
        "k-f",
        &exchange_body(json!({"forward_url": "https://api.example.com/hook"})),
    );
    assert_eq!(error_of(&action), (403, "HEL_RESOLVED_LOOPBACK".into()));
    assert!(!h.cp.calls.contains(&Call::Commit));
    assert_eq!(
        h.host
            .counter("signet.denials.reason.HEL_RESOLVED_LOOPBACK"),
        1
    );
    assert!(
        h.worker.borrow().in_flight.is_empty(),
        "the key is free again"
    );
    // no answer at all: the control plane is unavailable
    h.cp.scripted.remove("forward");
    h.cp.outage = Some((None, Vec::new()));
    let action = h.post(
        "k-g",
        &exchange_body(json!({"forward_url": "https://api.example.com/hook"})),
    );
    assert_eq!(error_of(&action).0, 503);
}

/// Headers of a request that stays open (its body has not arrived).
fn open_request(h: &mut Harness, key: &str) -> Exchange {
    let route = h.route(json!({"mode":"exchange"}));
    let mut ex = h.new_exchange(route);
    let headers = [("x-signet-api-key", KEY), ("x-signet-idempotency-key", key)];
    let first = ex.on_request_headers(&mut h.host, &Headers::from(&headers[..]), false);
    assert_eq!(h.drive(&mut ex, first), Action::Pause);
    ex
}

#[test]
fn status_409_in_flight() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    let mut open = open_request(&mut h, "k-1");
    assert_eq!(
        error_of(&h.post("k-1", &body)),
        (409, "IDEMPOTENCY_IN_FLIGHT".into())
    );
    assert!(!h.cp.calls.contains(&Call::Commit));
    // another tenant's key of the same name is not this one
    h.cp.tenants
        .insert(cid::sha256_hex(b"other-key"), grant("other", &[]));
    let other = h.exchange(
        &[
            ("x-signet-api-key", "other-key"),
            ("x-signet-idempotency-key", "k-1"),
        ],
        &body,
    );
    assert_eq!(respond(&other).0, 200);
    // the open request completes, then its key is free again (and done: a replay)
    let next = open.on_request_body(&mut h.host, body.len(), true, &mut || body.clone());
    assert_eq!(respond(&h.drive(&mut open, next)).0, 200);
    let (status, _, headers) = respond(&h.post("k-1", &body));
    assert_eq!(
        (status, headers["x-signet-idempotency-hit"].as_str()),
        (200, "1")
    );
}

#[test]
fn a_request_reset_before_its_answer_frees_its_key() {
    let mut h = Harness::new();
    drop(open_request(&mut h, "k-1"));
    assert!(h.worker.borrow().in_flight.is_empty());
    assert_eq!(respond(&h.post("k-1", &exchange_body(json!({})))).0, 200);
}

#[test]
fn twins_on_two_workers_store_one_receipt() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    let mut first = open_request(&mut h, "k-1");
    // the twin runs on another worker: no local in-flight entry there
    let this_worker = std::mem::take(&mut h.worker);
    let (status, twin, _) = respond(&h.post("k-1", &body));
    assert_eq!(status, 200);
    h.worker = this_worker;
    let next = first.on_request_body(&mut h.host, body.len(), true, &mut || body.clone());
    let (status, replayed, headers) = respond(&h.drive(&mut first, next));
    assert_eq!((status, &replayed), (200, &twin));
    assert_eq!(headers["x-signet-idempotency-hit"], "1");
    assert_eq!(h.cp.chains.values().map(Vec::len).sum::<usize>(), 1);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 1);
}

#[test]
fn status_413_over_the_route_limit() {
    let mut h = Harness::new();
    let route = h.route(json!({"body_limit_bytes": 100}));
    let body = exchange_body(json!({}));
    let mut ex = h.new_exchange(route);
    let headers = [("x-signet-api-key", KEY), ("x-signet-idempotency-key", "k")];
    let first = ex.on_request_headers(&mut h.host, &Headers::from(&headers[..]), false);
    assert!(matches!(
        first,
        Action::Call(Callout {
            call: Call::Tenant,
            ..
        })
    ));
    // the body outgrows the limit while the tenant lookup is still in flight
    assert_eq!(
        ex.on_request_body(&mut h.host, 60, false, &mut Vec::new),
        Action::Pause
    );
    let action = ex.on_request_body(&mut h.host, body.len(), false, &mut Vec::new);
    assert_eq!(error_of(&action), (413, "BODY_TOO_LARGE".into()));
    // the late tenant answer is ignored
    assert_eq!(
        ex.on_callout_response(&mut h.host, reply(200, json!({"tenant":"demo"}))),
        Action::Pause
    );
}

#[test]
fn status_413_from_the_declared_length() {
    let mut h = Harness::new();
    let route = h.route(json!({"body_limit_bytes": 100}));
    let action = h
        .send_on(
            route,
            &[
                ("x-signet-api-key", KEY),
                ("x-signet-idempotency-key", "k"),
                ("content-length", "101"),
            ],
            b"",
        )
        .0;
    assert_eq!(error_of(&action), (413, "BODY_TOO_LARGE".into()));
    assert!(h.cp.calls.is_empty());
}

#[test]
fn status_422_rows() {
    let mut h = Harness::new();
    let bad_payload = |args: &str| {
        exchange_body(
            json!({"payload": {"tool_calls":[{"type":"function","function":{"name":"create_invoice","arguments":args}}]}}),
        )
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            exchange_body(json!({"payload": {"tool_calls": 3}})),
            "SCHEMA_INVALID",
        ),
        (bad_payload("{{{"), "REPAIR_FAILED"),
        (
            bad_payload(r#"{"invoice_id":"I","amount":-1,"currency":"USD","customer_name":"A"}"#),
            "INVARIANT_FAILED",
        ),
        (
            bad_payload(
                r#"{"invoice_id":"I","amount":1.001,"currency":"USD","customer_name":"A"}"#,
            ),
            "TRANSFORM_FAILED",
        ),
        (
            bad_payload(&format!(
                r#"{{"invoice_id":"{}","amount":1,"currency":"USD","customer_name":"A"}}"#,
                "x".repeat(40)
            )),
            "TARGET_SCHEMA_INVALID",
        ),
        (
            exchange_body(json!({"payload_type": "nope.v1"})),
            "UNKNOWN_TYPE",
        ),
        (
            exchange_body(
                json!({"target_type": "openai.tooluse.invoice.v1", "payload_type": "invoice.iso20022.v1"}),
            ),
            "NO_MAPPING",
        ),
        (exchange_body(json!({"payload_type": 5})), "INVALID_REQUEST"),
        (br#"[1,2]"#.to_vec(), "INVALID_REQUEST"),
        (
            br#"{"payload_type":"a","target_type":"b"}"#.to_vec(),
            "INVALID_REQUEST",
        ),
        (
            br#"{"payload_type":"a","target_type":"b","payload":{"n":9007199254740993}}"#.to_vec(),
            "UNSAFE_INTEGER",
        ),
        (
            br#"{"payload_type":"a","payload_type":"b"}"#.to_vec(),
            "DUPLICATE_KEY",
        ),
    ];
    for (i, (body, code)) in cases.into_iter().enumerate() {
        let action = h.post(&format!("k-{i}"), &body);
        assert_eq!(error_of(&action), (422, code.to_owned()), "case {i}");
    }
    // refused before signing: each asked only whether its key had a stored answer
    let lookups = vec![Call::Idempotency; h.cp.calls.len() - 1];
    assert_eq!(h.cp.calls, [vec![Call::Tenant], lookups.clone()].concat());
    assert_eq!(lookups.len(), 12);
    assert!(h.worker.borrow().in_flight.is_empty());
    // nothing was stored: a corrected retry with the same key works
    assert_eq!(respond(&h.post("k-0", &exchange_body(json!({})))).0, 200);

    // same key, other body
    assert_eq!(
        error_of(&h.post("k-0", &exchange_body(json!({"trace_id":"x"})))),
        (422, "IDEMPOTENCY_KEY_REUSED".into())
    );
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 1);
}

#[test]
fn status_429_and_other_control_plane_errors_pass_through() {
    let mut h = Harness::new();
    h.cp.scripted.insert(
        "commit",
        (
            429,
            json!({"detail":"FU quota exceeded","code":"FU_QUOTA_EXCEEDED"}),
        ),
    );
    let (status, body, _) = respond(&h.post("k-1", &exchange_body(json!({}))));
    assert_eq!(
        (status, body),
        (
            429,
            json!({"detail":"FU quota exceeded","code":"FU_QUOTA_EXCEEDED"})
        )
    );
    h.cp.scripted.insert(
        "commit",
        (409, json!({"detail":"chain is full","code":"CHAIN_FULL"})),
    );
    assert_eq!(
        error_of(&h.post("k-2", &exchange_body(json!({})))),
        (409, "CHAIN_FULL".into())
    );
}

#[test]
fn status_429_when_a_tenant_exceeds_the_route_rate() {
    let mut h = Harness::new();
    let route = h.route(json!({"mode":"exchange","tenant_requests_per_second":2}));
    let send = |h: &mut Harness, key: &str| {
        let headers = [("x-signet-api-key", KEY), ("x-signet-idempotency-key", key)];
        h.send_on(route.clone(), &headers, &exchange_body(json!({})))
            .0
    };
    assert_eq!(respond(&send(&mut h, "k-1")).0, 200);
    assert_eq!(respond(&send(&mut h, "k-2")).0, 200);
    let calls_before = h.cp.calls.len();
    assert_eq!(error_of(&send(&mut h, "k-3")), (429, "RATE_LIMITED".into()));
    // refused before the pipeline: only its key was looked up, nothing counted
    assert_eq!(&h.cp.calls[calls_before..], &[Call::Idempotency]);
    assert_eq!(h.host.counter("signet.errors.code.RATE_LIMITED"), 1);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 2);
    assert!(h.worker.borrow().in_flight.is_empty());
    // a replay of a stored request is answered with its stored response, over the rate too
    let (status, _, headers) = respond(&send(&mut h, "k-1"));
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-signet-idempotency-hit").map(String::as_str),
        Some("1")
    );
    h.host.now += 1_000;
    assert_eq!(respond(&send(&mut h, "k-3")).0, 200);
}

/// SPEC §4: a replay returns the stored response even when the pipeline would refuse the
/// request now, and a reused key is 422 `IDEMPOTENCY_KEY_REUSED` even when the new body is
/// invalid; a key nobody stored leaves the pipeline's refusal.
#[test]
fn a_refused_request_is_answered_from_its_key_when_it_was_stored() {
    let mut h = Harness::new();
    let body = exchange_body(json!({"trace_id": "order-7"}));
    let (status, first, _) = respond(&h.post("k-1", &body));
    assert_eq!(status, 200);

    // A request stored when the pipeline took it, which it refuses now (a changed allowlist
    // or registry; here its forward_url's host is not allowed): the stored answer, replayed.
    let refused_now = exchange_body(json!({"forward_url": "https://evil.test/in"}));
    assert_eq!(error_of(&h.post("k-0", &refused_now)).0, 403);
    let response = respond(&h.post("k-setup", &exchange_body(json!({})))).1;
    h.cp.slots.insert(
        ("demo".into(), "k-2".into()),
        Record {
            fingerprint: idempotency::fingerprint(&refused_now, None),
            response: response.to_string().into(),
        },
    );
    let (status, replayed, headers) = respond(&h.post("k-2", &refused_now));
    assert_eq!((status, &replayed), (200, &response));
    assert_eq!(
        headers.get("x-signet-idempotency-hit").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        headers.get("x-signet-receipt-hash").map(String::as_str),
        response["receipt"]["receipt_hash"].as_str()
    );
    assert_eq!(h.host.counter("signet.idempotent_hits"), 1);

    // a reused key with an invalid body: 422 reused, not the body's own error
    assert_eq!(
        error_of(&h.post("k-1", br#"{"payload_type":5}"#)),
        (422, "IDEMPOTENCY_KEY_REUSED".into())
    );
    assert_eq!(
        error_of(&h.post("k-1", b"not json")),
        (422, "IDEMPOTENCY_KEY_REUSED".into())
    );
    // a key nobody stored: the pipeline's refusal, and the key stays free
    assert_eq!(
        error_of(&h.post("k-new", br#"{"payload_type":5}"#)),
        (422, "INVALID_REQUEST".into())
    );
    assert_eq!(error_of(&h.post("k-new", &refused_now)).0, 403);
    assert!(h.worker.borrow().in_flight.is_empty());
    let vex = h.host.counter("signet.exchanges.mode.exchange");
    assert_eq!(vex, 2, "replays and refusals count nothing");
    assert_eq!(first["trace_id"], "order-7");
}

/// The lookup cannot be made or answered: the client gets the pipeline's refusal, never a 503
/// (nor a fail-open pass-through), and the failure is counted.
#[test]
fn a_failed_lookup_leaves_the_refusal() {
    let mut h = Harness::new();
    h.cp.scripted.insert(
        "idempotency",
        (500, json!({"detail":"x","code":"STORAGE_UNAVAILABLE"})),
    );
    assert_eq!(
        error_of(&h.post("k-1", br#"{"payload_type":5}"#)),
        (422, "INVALID_REQUEST".into())
    );
    h.cp.scripted.insert(
        "idempotency",
        (401, json!({"detail":"x","code":"FILTER_UNAUTHORIZED"})),
    );
    assert_eq!(
        error_of(&h.post("k-2", br#"{"payload_type":5}"#)),
        (422, "INVALID_REQUEST".into())
    );
    assert_eq!(
        h.host.counter("signet.callout_failures.call.idempotency"),
        2
    );
}

/// An inline request without an idempotency key gets a fresh one: no stored answer can exist,
/// so a refusal is answered at once.
#[test]
fn an_inline_request_without_a_key_is_refused_without_a_lookup() {
    let mut h = Harness::new();
    let route = inline_route(&h, json!({}));
    let (action, _) = h.send_on(route, &[("x-signet-api-key", KEY)], b"[1]");
    assert_eq!(error_of(&action).0, 422);
    assert_eq!(h.cp.calls, vec![Call::Tenant]);
}

#[test]
fn control_plane_rejecting_the_filter_is_a_500() {
    let mut h = Harness::new();
    h.cp.jwks = Jwks::default(); // the control plane does not know the filter's kid
    assert_eq!(
        error_of(&h.post("k-1", &exchange_body(json!({})))),
        (500, "RECEIPT_INVALID".into())
    );
    h.cp.scripted.insert(
        "tenant",
        (
            401,
            json!({"detail":"bad token","code":"FILTER_UNAUTHORIZED"}),
        ),
    );
    let mut fresh = Harness::new();
    fresh.cp.scripted = h.cp.scripted.clone();
    assert_eq!(
        error_of(&fresh.post("k-1", &exchange_body(json!({})))),
        (500, "FILTER_UNAUTHORIZED".into())
    );
}

#[test]
fn status_503_when_the_control_plane_is_down_or_slow() {
    for (outage, call) in [
        ((None, Vec::new()), "tenant"),
        ((Some(504), b"upstream request timeout".to_vec()), "tenant"),
        ((Some(503), Vec::new()), "tenant"),
        ((Some(200), b"not json".to_vec()), "tenant"),
        ((Some(404), b"no route".to_vec()), "tenant"),
    ] {
        let mut h = Harness::new();
        h.cp.outage = Some(outage.clone());
        let action = h.post("k-1", &exchange_body(json!({})));
        assert_eq!(
            error_of(&action),
            (503, "CONTROL_PLANE_UNAVAILABLE".into()),
            "{outage:?}"
        );
        assert_eq!(
            h.host
                .counter(&format!("signet.callout_failures.call.{call}")),
            1
        );
        assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 0);
    }
}

#[test]
fn commit_failure_is_503_without_a_vex() {
    let mut h = Harness::new();
    h.cp.scripted.insert("commit", (500, json!({})));
    assert_eq!(
        error_of(&h.post("k-1", &exchange_body(json!({})))),
        (503, "CONTROL_PLANE_UNAVAILABLE".into())
    );
    assert_eq!(h.host.counter("signet.callout_failures.call.commit"), 1);
    assert_eq!(h.host.counter("signet.exchanges.mode.exchange"), 0);
}

#[test]
fn fail_open_routes_pass_through_untouched() {
    let mut h = Harness::new();
    h.cp.outage = Some((None, Vec::new()));
    let route = h.route(json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","fail_open":true}));
    let (action, ex) = h.send_on(route, &[("x-signet-api-key", KEY)], TOOL_CALL.as_bytes());
    assert_eq!(
        action,
        Action::Continue(Forward {
            set_headers: vec![],
            remove_headers: vec![
                "x-signet-api-key",
                "x-odin-api-key",
                "x-signet-receipt-hash",
                "x-signet-hop",
                "x-signet-cid",
                "x-signet-idempotency-hit"
            ],
            body: None,
        })
    );
    assert!(ex.response_headers().is_empty());
    assert_eq!(h.host.counter("signet.callout_failures.call.tenant"), 1);
    assert_eq!(
        h.host
            .counter("signet.errors.code.CONTROL_PLANE_UNAVAILABLE"),
        0
    );
    // fail-open does not excuse a bad request
    h.cp.outage = None;
    let route = h.route(json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","fail_open":true}));
    let (action, _) = h.send_on(route, &[("x-signet-api-key", KEY)], br#"{"tool_calls":[]}"#);
    assert_eq!(error_of(&action), (422, "SCHEMA_INVALID".into()));
}

#[test]
fn tenant_cache_expires() {
    let mut h = Harness::new();
    respond(&h.post("k-1", &exchange_body(json!({}))));
    respond(&h.post("k-2", &exchange_body(json!({}))));
    h.host.now += 61_000;
    respond(&h.post("k-3", &exchange_body(json!({}))));
    assert_eq!(h.cp.calls.iter().filter(|c| **c == Call::Tenant).count(), 2);
}

#[test]
fn invalid_route_settings_are_a_500() {
    let mut h = Harness::new();
    let route = h.route(json!({"mode":"inline"}));
    let (action, _) = h.send_on(route, &[("x-signet-api-key", KEY)], b"{}");
    assert_eq!(error_of(&action), (500, "ROUTE_CONFIG_INVALID".into()));
}

// ---- inline mode -------------------------------------------------------------------------------

fn inline_route(h: &Harness, extra: Value) -> CachedRoute {
    let mut m = json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1"});
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    h.route(m)
}

#[test]
fn inline_forwards_the_normalized_body_with_receipt_headers() {
    let mut h = Harness::new();
    let route = inline_route(&h, json!({}));
    let (action, ex) = h.send_on(
        route,
        &[("x-signet-api-key", KEY), ("x-signet-trace", "t-9")],
        TOOL_CALL.as_bytes(),
    );
    let Action::Continue(forward) = action else {
        panic!("{action:?}")
    };
    let body = forward.body.unwrap();
    let set: HashMap<_, _> = forward.set_headers.into_iter().collect();
    assert_eq!(
        String::from_utf8(body.clone()).unwrap(),
        r#"{"amount_minor":12345,"currency":"USD","customer":{"name":"Acme"},"description":"Services","invoice_id":"INV-1"}"#
    );
    assert_eq!(set["content-length"], body.len().to_string());
    assert_eq!(set["x-signet-trace"], "t-9");
    assert_eq!(set["x-signet-hop"], "1");
    assert_eq!(set["x-signet-cid"], cid::cid(&body));
    assert_eq!(
        forward.remove_headers,
        vec![
            "x-signet-api-key",
            "x-odin-api-key",
            "x-signet-receipt-hash",
            "x-signet-hop",
            "x-signet-cid",
            "x-signet-idempotency-hit"
        ]
    );
    // the upstream's response gets the same receipt headers
    let response: HashMap<_, _> = ex.response_headers().iter().cloned().collect();
    assert_eq!(
        response["x-signet-receipt-hash"],
        set["x-signet-receipt-hash"]
    );
    assert_eq!(h.host.counter("signet.exchanges.mode.inline"), 1);
    // without an idempotency key each request is its own exchange
    let route = inline_route(&h, json!({}));
    let (again, _) = h.send_on(
        route,
        &[("x-signet-api-key", KEY), ("x-signet-trace", "t-9")],
        TOOL_CALL.as_bytes(),
    );
    let Action::Continue(again) = again else {
        panic!()
    };
    assert!(again
        .set_headers
        .contains(&("x-signet-hop".into(), "2".into())));
}

#[test]
fn inline_original_body_and_dropped_canon() {
    let mut h = Harness::new();
    let route = inline_route(&h, json!({"inline_body":"original","receipt_canon":"drop"}));
    let (action, _) = h.send_on(
        route,
        &[("x-signet-api-key", KEY), ("x-signet-trace", "t-1")],
        TOOL_CALL.as_bytes(),
    );
    let Action::Continue(forward) = action else {
        panic!("{action:?}")
    };
    assert_eq!(forward.body, None);
    assert!(!forward
        .set_headers
        .iter()
        .any(|(k, _)| k == "content-length"));
    let stored = &h.cp.chains["t-1"][0];
    assert!(stored.get("canon").is_none());
    receipt::verify(stored, Some(&h.cp.jwks), true).unwrap();
    // the stored response does not keep the payload either
    let Some(record) = h.cp.slots.values().next() else {
        panic!()
    };
    let response: Value = serde_json::from_str(&record.response).unwrap();
    assert!(response.get("normalized").is_none());
}

#[test]
fn inline_replay_forwards_again_with_the_stored_receipt() {
    let mut h = Harness::new();
    let headers = [
        ("x-signet-api-key", KEY),
        ("x-signet-idempotency-key", "i-1"),
    ];
    let route = inline_route(&h, json!({}));
    let (Action::Continue(first), _) = h.send_on(route.clone(), &headers, TOOL_CALL.as_bytes())
    else {
        panic!()
    };
    let (Action::Continue(again), ex) = h.send_on(route, &headers, TOOL_CALL.as_bytes()) else {
        panic!()
    };
    assert_eq!(again.body, first.body);
    assert!(again
        .set_headers
        .contains(&("x-signet-idempotency-hit".into(), "1".into())));
    let hash = |f: &Forward| {
        f.set_headers
            .iter()
            .find(|(k, _)| k == "x-signet-receipt-hash")
            .cloned()
    };
    assert_eq!(hash(&again), hash(&first));
    assert!(ex
        .response_headers()
        .contains(&("x-signet-idempotency-hit".into(), "1".into())));
    assert_eq!(h.host.counter("signet.exchanges.mode.inline"), 1);
}

#[test]
fn body_arriving_before_the_tenant_answer() {
    let mut h = Harness::new();
    let route = h.route(json!({}));
    let mut ex = h.new_exchange(route);
    let headers =
        Headers::from(&[("x-signet-api-key", KEY), ("x-signet-idempotency-key", "k")][..]);
    let Action::Call(tenant_call) = ex.on_request_headers(&mut h.host, &headers, false) else {
        panic!()
    };
    let body = exchange_body(json!({}));
    assert_eq!(
        ex.on_request_body(&mut h.host, body.len(), true, &mut || body.clone()),
        Action::Pause
    );
    let response = h.cp.handle(&tenant_call);
    let next = ex.on_callout_response(&mut h.host, response);
    assert!(matches!(next, Action::Commit(_)));
    assert_eq!(respond(&h.drive(&mut ex, next)).0, 200);
}

// ---- hostile headers and bodies (#13 item 0) ----------------------------------------------------

/// Headers with raw byte values, as the host hands them over.
fn raw_headers(pairs: &[(&str, &[u8])]) -> Headers {
    Headers::new(
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect(),
    )
}

fn send_raw(h: &mut Harness, route: CachedRoute, headers: &Headers, body: &[u8]) -> Action {
    let mut ex = h.new_exchange(route);
    let first = ex.on_request_headers(&mut h.host, headers, false);
    let action = h.drive(&mut ex, first);
    if action != Action::Pause {
        return action;
    }
    let next = ex.on_request_body(&mut h.host, body.len(), true, &mut || body.to_vec());
    h.drive(&mut ex, next)
}

#[test]
fn header_values_are_bytes_and_only_visible_ascii_identifies() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    let exchange = h.route(json!({"mode":"exchange"}));
    let inline = h.route(json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1"}));
    for suffix in [
        &b"\xff"[..],
        b"\xe9",
        b"\xc0\xaf",
        "\u{2028}".as_bytes(),
        "\u{3000}".as_bytes(),
        "\u{a0}".as_bytes(),
    ] {
        let key = [KEY.as_bytes(), suffix].concat();
        for name in ["x-signet-api-key", "x-odin-api-key"] {
            let headers = raw_headers(&[(name, &key), ("x-signet-idempotency-key", b"k-1")]);
            let action = send_raw(&mut h, exchange.clone(), &headers, &body);
            assert_eq!(
                error_of(&action),
                (401, "INVALID_API_KEY".into()),
                "{suffix:?}"
            );
        }
        let idem = [b"k-1".as_slice(), suffix].concat();
        for route in [&exchange, &inline] {
            let headers = raw_headers(&[
                ("x-signet-api-key", KEY.as_bytes()),
                ("x-odin-idempotency-key", &idem),
            ]);
            let action = send_raw(&mut h, route.clone(), &headers, &body);
            assert_eq!(
                error_of(&action),
                (400, "IDEMPOTENCY_KEY_INVALID".into()),
                "{suffix:?}"
            );
        }
        let trace = [b"order-1".as_slice(), suffix].concat();
        let headers = raw_headers(&[
            ("x-signet-api-key", KEY.as_bytes()),
            ("x-signet-idempotency-key", b"k-1"),
            ("x-signet-trace", &trace),
        ]);
        let action = send_raw(&mut h, exchange.clone(), &headers, &body);
        assert_eq!(
            error_of(&action),
            (400, "BAD_TRACE_ID".into()),
            "{suffix:?}"
        );
    }
    let long = "k".repeat(257);
    let action = h.exchange(
        &[
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", &long),
        ],
        &body,
    );
    assert_eq!(error_of(&action), (400, "IDEMPOTENCY_KEY_INVALID".into()));
    // an invalid idempotency key waits for the API key: auth comes first
    let action = h.exchange(
        &[
            ("x-signet-api-key", "unknown"),
            ("x-signet-idempotency-key", &long),
        ],
        &body,
    );
    assert_eq!(error_of(&action).0, 401);
    assert!(h.cp.chains.is_empty());
    // ASCII whitespace around a key is not part of it
    let action = h.exchange(
        &[
            ("x-signet-api-key", " \tdemo-key\t "),
            ("x-signet-idempotency-key", "\tk-1 "),
        ],
        &body,
    );
    assert_eq!(respond(&action).0, 200);
    let (status, _, headers) = respond(&h.post("k-1", &body));
    assert_eq!(
        (status, headers["x-signet-idempotency-hit"].as_str()),
        (200, "1")
    );
}

#[test]
fn repeated_credentials_and_ids_are_400() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    for headers in [
        vec![
            ("x-signet-api-key", KEY),
            ("x-signet-api-key", "evil-key"),
            ("x-signet-idempotency-key", "k"),
        ],
        vec![
            ("x-signet-api-key", KEY),
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
        ],
        vec![
            ("x-signet-api-key", KEY),
            ("x-odin-api-key", "evil-key"),
            ("x-signet-idempotency-key", "k"),
        ],
        vec![
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
            ("x-signet-idempotency-key", "j"),
        ],
        vec![
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
            ("x-odin-idempotency-key", "j"),
        ],
        vec![
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
            ("x-signet-trace", "a"),
            ("x-signet-trace", "b"),
        ],
    ] {
        let action = h.exchange(&headers, &body);
        assert_eq!(
            error_of(&action),
            (400, "DUPLICATE_HEADER".into()),
            "{headers:?}"
        );
    }
    assert!(h.cp.calls.is_empty(), "refused before any callout");
    // aliases that agree are one key
    let action = h.exchange(
        &[
            ("x-signet-api-key", KEY),
            ("x-odin-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
        ],
        &body,
    );
    assert_eq!(respond(&action).0, 200);
}

#[test]
fn an_encoded_body_is_415_and_identity_passes() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    for encoding in ["gzip", "br", "gzip, deflate", "x-custom", "identity, gzip"] {
        let action = h.exchange(
            &[
                ("x-signet-api-key", KEY),
                ("x-signet-idempotency-key", "k"),
                ("content-encoding", encoding),
            ],
            &body,
        );
        assert_eq!(
            error_of(&action),
            (415, "UNSUPPORTED_CONTENT_ENCODING".into()),
            "{encoding}"
        );
    }
    let action = h.exchange(
        &[
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k"),
            ("content-encoding", "Identity"),
        ],
        &body,
    );
    assert_eq!(respond(&action).0, 200);
}

#[test]
fn a_declared_length_beyond_32_bits_is_413_at_once() {
    let mut h = Harness::new();
    for length in [u64::from(u32::MAX), 1 << 32, u64::MAX] {
        let route = h.route(json!({"mode":"exchange"}));
        let mut ex = h.new_exchange(route);
        let length = length.to_string();
        let headers = Headers::from(
            &[
                ("x-signet-api-key", KEY),
                ("x-signet-idempotency-key", "k"),
                ("content-length", length.as_str()),
            ][..],
        );
        let action = ex.on_request_headers(&mut h.host, &headers, false);
        assert_eq!(
            error_of(&action),
            (413, "BODY_TOO_LARGE".into()),
            "{length}"
        );
    }
    assert!(h.cp.calls.is_empty());
}

#[test]
fn integers_beyond_2_pow_53_are_422_everywhere() {
    let mut h = Harness::new();
    let inline = h.route(json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1"}));
    for literal in [
        "9007199254740994",
        "18446744073709551616",
        "-18446744073709551616",
        "1e21",
    ] {
        let envelope = format!(
            r#"{{"n":{literal},"payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","payload":{TOOL_CALL}}}"#
        );
        let action = h.post("k", envelope.as_bytes());
        assert_eq!(
            error_of(&action),
            (422, "UNSAFE_INTEGER".into()),
            "envelope {literal}"
        );
        let payload = format!(r#"{{"n":{literal},{}"#, &TOOL_CALL[1..]);
        let envelope = format!(
            r#"{{"payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1","payload":{payload}}}"#
        );
        let action = h.post("k", envelope.as_bytes());
        assert_eq!(
            error_of(&action),
            (422, "UNSAFE_INTEGER".into()),
            "payload {literal}"
        );
        let (action, _) = h.send_on(
            inline.clone(),
            &[("x-signet-api-key", KEY)],
            payload.as_bytes(),
        );
        assert_eq!(
            error_of(&action),
            (422, "UNSAFE_INTEGER".into()),
            "inline {literal}"
        );
    }
    assert!(h.cp.chains.is_empty());
}

#[test]
fn fail_open_never_forwards_the_api_key() {
    let mut h = Harness::new();
    h.cp.outage = Some((Some(503), Vec::new()));
    let route = h.route(json!({"mode":"exchange","fail_open":true}));
    let (action, _) = h.send_on(
        route,
        &[("x-odin-api-key", KEY), ("x-signet-idempotency-key", "k")],
        &exchange_body(json!({})),
    );
    let Action::Continue(forward) = action else {
        panic!("{action:?}")
    };
    for name in [
        "x-signet-api-key",
        "x-odin-api-key",
        "x-signet-receipt-hash",
    ] {
        assert!(forward.remove_headers.contains(&name), "{name}");
    }
}

// ---- commit deadlines (#13 item 3) --------------------------------------------------------------

#[test]
fn a_commit_carries_its_deadline_and_a_late_one_is_503_with_nothing_stored() {
    let mut h = Harness::new();
    let timeout = h.config.control_plane.timeout_ms;
    let signed_at = h.host.now;
    // the control plane sees the commit at its deadline: stored
    h.cp.clock_ms = signed_at + timeout;
    assert_eq!(respond(&h.post("k-1", &exchange_body(json!({})))).0, 200);
    assert_eq!(h.cp.slots.len(), 1);
    // one millisecond later: refused, nothing stored, and the client gets a 503
    h.cp.clock_ms = h.host.now + timeout + 1;
    let action = h.post("k-2", &exchange_body(json!({})));
    assert_eq!(error_of(&action), (503, "CONTROL_PLANE_UNAVAILABLE".into()));
    assert_eq!(h.cp.slots.len(), 1);
    assert_eq!(h.host.counter("signet.callout_failures.call.commit"), 1);
    assert!(h
        .host
        .logs
        .iter()
        .any(|(_, l)| l.contains("COMMIT_EXPIRED")));
    // a commit that expired in the worker's queue is answered the same way
    let route = h.route(json!({"mode":"exchange"}));
    let mut ex = h.new_exchange(route);
    let headers = Headers::from(
        &[
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k-3"),
        ][..],
    );
    let first = ex.on_request_headers(&mut h.host, &headers, false);
    assert_eq!(h.drive(&mut ex, first), Action::Pause);
    let body = exchange_body(json!({}));
    let Action::Commit(CommitJson(commit, deadline_ms)) =
        ex.on_request_body(&mut h.host, body.len(), true, &mut || body.clone())
    else {
        panic!("no commit")
    };
    assert_eq!(deadline_ms, h.host.now + timeout);
    let sent: Value = serde_json::from_str(commit.get()).unwrap();
    assert_eq!(sent["deadline_ms"], deadline_ms);
    let action = ex.on_callout_response(&mut h.host, expired_commit());
    assert_eq!(error_of(&action), (503, "CONTROL_PLANE_UNAVAILABLE".into()));
}

// ---- the request fingerprint (#13 item 12) ------------------------------------------------------

#[test]
fn one_key_with_another_trace_header_is_another_request() {
    let mut h = Harness::new();
    let route = h.route(json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1","target_type":"invoice.iso20022.v1"}));
    let send = |h: &mut Harness, trace: &str| {
        let headers = [
            ("x-signet-api-key", KEY),
            ("x-signet-idempotency-key", "k-1"),
            ("x-signet-trace", trace),
        ];
        let (action, ex) = h.send_on(route.clone(), &headers, TOOL_CALL.as_bytes());
        (action, ex.response_headers().to_vec())
    };
    let (action, _) = send(&mut h, "order-1");
    assert!(matches!(action, Action::Continue(_)), "{action:?}");
    // the same body and key on another trace is not a replay of the first
    let (action, _) = send(&mut h, "order-2");
    assert_eq!(error_of(&action), (422, "IDEMPOTENCY_KEY_REUSED".into()));
    assert!(!h.cp.chains.contains_key("order-2"));
    // and the same trace is
    let (action, headers) = send(&mut h, "order-1");
    assert!(matches!(action, Action::Continue(_)), "{action:?}");
    assert!(headers.contains(&("x-signet-idempotency-hit".into(), "1".into())));
}

// ---- unknown API keys (#13 item 4) ----------------------------------------------------------------

#[test]
fn an_unknown_key_is_remembered_for_five_seconds() {
    let mut h = Harness::new();
    let body = exchange_body(json!({}));
    let wrong = [
        ("x-signet-api-key", "wrong-key"),
        ("x-signet-idempotency-key", "k"),
    ];
    for _ in 0..3 {
        assert_eq!(
            error_of(&h.exchange(&wrong, &body)),
            (401, "UNKNOWN_API_KEY".into())
        );
    }
    assert_eq!(h.cp.calls, vec![Call::Tenant], "one lookup");
    // the key is created; it is recognised once the negative answer expires
    h.cp.tenants
        .insert(cid::sha256_hex(b"wrong-key"), grant("late", &[]));
    h.host.now += tenant_cache::UNKNOWN_TTL_MS;
    assert_eq!(respond(&h.exchange(&wrong, &body)).0, 200);
}

/// A `health` route needs no API key: it answers with the control plane's health as the
/// filter reaches it, and 503 when it cannot.
#[test]
fn a_health_route_answers_the_control_planes_health_as_the_filter_sees_it() {
    let mut h = Harness::new();
    let route = h.route(json!({"mode":"health"}));
    let (action, _) = h.send_on(route.clone(), &[], b"");
    let (status, body, headers) = respond(&action);
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    assert_eq!(body["control_plane"]["storage"], "sqlite");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(h.cp.calls, vec![Call::Health]);
    h.cp.outage = Some((None, Vec::new()));
    let (status, body, _) = respond(&h.send_on(route, &[], b"").0);
    assert_eq!(status, 503);
    assert_eq!(body["filter"]["control_plane"], "unreachable");
    assert_eq!(h.host.counter("signet.exchanges.mode.health"), 0);
}
