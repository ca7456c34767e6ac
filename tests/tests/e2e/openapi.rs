//! docs/openapi.json against the real stack: every status documented for `POST /v1/exchange`
//! is produced through Envoy, and every answer seen here (exchange, receipts, keys, health,
//! metrics, admin) has a documented status whose schema its body matches. The document lists
//! exactly the routes the control plane's public and admin routers serve.

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Value};
use signet_e2e::binaries;
use signet_e2e::http::Response;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, ADMIN_KEY, DEMO_KEY};
use signet_e2e::{Stack, StackOptions, Storage};

fn document() -> Value {
    let path = binaries::workspace_root().join("docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("read docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// The document's response schemas, compiled with boon (OpenAPI 3.1 schemas are JSON Schema
/// 2020-12), and the statuses each operation documents.
struct Contract {
    doc: Value,
    schemas: boon::Schemas,
    compiled: HashMap<String, boon::SchemaIndex>,
    /// (path, method) → statuses seen answered
    seen: HashMap<(String, String), BTreeSet<u16>>,
}

const BASE: &str = "file:///openapi.json";

fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Contract {
    fn load() -> Contract {
        Contract {
            doc: document(),
            schemas: boon::Schemas::new(),
            compiled: HashMap::new(),
            seen: HashMap::new(),
        }
    }

    /// `response` is a documented answer of `method path` (a template such as
    /// `/v1/receipts/chain/{trace_id}`), and its JSON body matches the documented schema.
    #[track_caller]
    fn check(&mut self, method: &str, path: &str, response: &Response) {
        let status = response.status.to_string();
        let operation = &self.doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        let documented = &operation["responses"][&status];
        assert!(
            documented.is_object(),
            "{method} {path} answered {status}, which is not documented: {}",
            response.text()
        );
        self.seen
            .entry((path.to_owned(), method.to_owned()))
            .or_default()
            .insert(response.status);
        if documented["content"]["application/json"].is_null() {
            return;
        }
        let location = format!(
            "{BASE}#/paths/{}/{method}/responses/{status}/content/{}/schema",
            pointer_token(path),
            pointer_token("application/json")
        );
        let index = match self.compiled.get(&location) {
            Some(index) => *index,
            None => {
                let mut compiler = boon::Compiler::new();
                compiler.set_default_draft(boon::Draft::V2020_12);
                compiler.enable_format_assertions();
                compiler
                    .add_resource(BASE, self.doc.clone())
                    .expect("add the document");
                let index = compiler
                    .compile(&location, &mut self.schemas)
                    .unwrap_or_else(|e| panic!("compile {location}: {e:#}"));
                self.compiled.insert(location.clone(), index);
                index
            }
        };
        let body = response.json();
        if let Err(e) = self.schemas.validate(&body, index) {
            panic!("{method} {path} {status}: the body does not match the document: {e:#}\n{body}");
        }
    }

    fn statuses_documented(&self, path: &str, method: &str) -> BTreeSet<u16> {
        self.doc["paths"][path][method]["responses"]
            .as_object()
            .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default()
    }
}

fn headers<'a>(key: &'a str, idempotency_key: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("X-SIGNET-API-Key", key),
        ("X-SIGNET-Idempotency-Key", idempotency_key),
    ]
}

#[test]
fn the_running_stack_answers_as_the_openapi_document_says() {
    let mut contract = Contract::load();
    let mut stack = Stack::start(Storage::Sqlite);
    let base = stack.envoy.url("");
    let key = new_idempotency_key;
    let body = exchange_body(sample_invoice()).to_string().into_bytes();
    let exchange = "/v1/exchange";

    // 200, and its replay
    let k = key();
    let first = stack.exchange_with(&headers(DEMO_KEY, &k), &body);
    contract.check("post", exchange, &first);
    assert_eq!(first.status, 200, "{}", first.text());
    let replay = stack.exchange_with(&headers(DEMO_KEY, &k), &body);
    contract.check("post", exchange, &replay);
    let trace_id = first.json()["trace_id"].as_str().expect("trace").to_owned();

    // 400, 401, 403, 413, 415, 422
    let not_json = stack.exchange_with(&headers(DEMO_KEY, &key()), b"{\"payload_type\": ");
    assert_eq!(not_json.status, 400);
    contract.check("post", exchange, &not_json);
    let no_key = stack.exchange_with(&[("X-SIGNET-Idempotency-Key", &key())], &body);
    assert_eq!(no_key.status, 401);
    contract.check("post", exchange, &no_key);
    let mut denied = exchange_body(sample_invoice());
    denied["forward_url"] = json!("https://evil.test/hook");
    let denied = stack.exchange_with(&headers(DEMO_KEY, &key()), denied.to_string().as_bytes());
    assert_eq!(denied.status, 403);
    contract.check("post", exchange, &denied);
    let mut big = exchange_body(sample_invoice());
    big["padding"] = json!("x".repeat(1024 * 1024 + 1));
    let big = stack.exchange_with(&headers(DEMO_KEY, &key()), big.to_string().as_bytes());
    assert_eq!(big.status, 413);
    contract.check("post", exchange, &big);
    let k415 = key();
    let mut gzip = headers(DEMO_KEY, &k415);
    gzip.push(("Content-Encoding", "gzip"));
    let gzip = stack.exchange_with(&gzip, &body);
    assert_eq!(gzip.status, 415);
    contract.check("post", exchange, &gzip);
    let invalid = exchange_body(json!({"tool_calls": 3})).to_string();
    let invalid = stack.exchange_with(&headers(DEMO_KEY, &key()), invalid.as_bytes());
    assert_eq!(invalid.status, 422);
    contract.check("post", exchange, &invalid);

    // 409: the same key while the first request is still in flight
    let k409 = key();
    let mut held_headers = headers(DEMO_KEY, &k409);
    held_headers.push(("content-type", "application/json"));
    let held = stack.hold_request(exchange, &held_headers, &body);
    let twin = stack.exchange_with(&headers(DEMO_KEY, &k409), &body);
    assert_eq!(twin.status, 409, "{}", twin.text());
    contract.check("post", exchange, &twin);
    contract.check("post", exchange, &held.finish());

    // receipts, keys and this document, through Envoy's one address
    let tenant = [("X-SIGNET-API-Key", DEMO_KEY)];
    let get = |path: &str, h: &[(&str, &str)]| stack.client.get(&format!("{base}{path}"), h);
    let chain_path = "/v1/receipts/chain/{trace_id}";
    let export_path = "/v1/receipts/export/{trace_id}";
    for (template, path) in [
        (chain_path, format!("/v1/receipts/chain/{trace_id}")),
        (chain_path, format!("/v1/receipts/chain/{trace_id}?limit=1")),
        (chain_path, "/v1/receipts/chain/no-such-trace".to_owned()),
        (export_path, format!("/v1/receipts/export/{trace_id}")),
        (export_path, "/v1/receipts/export/no-such-trace".to_owned()),
    ] {
        contract.check("get", template, &get(&path, &tenant));
    }
    contract.check(
        "get",
        chain_path,
        &get(&format!("/v1/receipts/chain/{trace_id}"), &[]),
    );
    let deliveries = "/v1/forward/deliveries/{trace_id}";
    let own = format!("/v1/forward/deliveries/{trace_id}");
    contract.check("get", deliveries, &get(&own, &tenant));
    contract.check("get", deliveries, &get(&own, &[]));
    for path in [
        "/v1/usage",
        "/v1/usage?month=2026-1",
        "/v1/usage?tenant=other",
    ] {
        contract.check("get", "/v1/usage", &get(path, &tenant));
    }
    for path in [
        "/.well-known/jwks.json",
        "/.well-known/signet-jwks.json",
        "/openapi.json",
        "/healthz",
    ] {
        let r = get(path, &[]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        contract.check("get", path, &r);
    }
    let served = get("/openapi.json", &[]).json();
    assert_eq!(
        served, contract.doc,
        "the served document is docs/openapi.json"
    );
    let cp = |path: &str| stack.client.get(&stack.control_plane.url(path), &[]);
    contract.check("get", "/healthz", &cp("/healthz"));
    contract.check("get", "/metrics", &cp("/metrics"));

    // admin
    let admin = [("X-SIGNET-Admin-Key", ADMIN_KEY)];
    let usage = stack.client.get(
        &stack.control_plane.admin_url("/v1/admin/usage/demo"),
        &admin,
    );
    contract.check("get", "/v1/admin/usage/{tenant}", &usage);
    let unauthorized = stack
        .client
        .get(&stack.control_plane.admin_url("/v1/admin/usage/demo"), &[]);
    contract.check("get", "/v1/admin/usage/{tenant}", &unauthorized);
    let redrive_url = stack.control_plane.admin_url("/v1/admin/forward/redrive");
    let redrive = stack.client.post(
        &redrive_url,
        &[admin[0], ("content-type", "application/json")],
        br#"{"tenant":"demo"}"#,
    );
    assert_eq!(redrive.status, 200, "{}", redrive.text());
    assert_eq!(redrive.json()["redriven"], 0);
    contract.check("post", "/v1/admin/forward/redrive", &redrive);
    let no_tenant = stack.client.post(
        &redrive_url,
        &[admin[0], ("content-type", "application/json")],
        b"{}",
    );
    contract.check("post", "/v1/admin/forward/redrive", &no_tenant);
    let reload_url = stack.control_plane.admin_url("/v1/admin/reload");
    let keys = signet_e2e::stack::api_keys().to_string();
    let reload_body = format!(r#"{{"api_keys":{keys}}}"#);
    let json_type = ("content-type", "application/json");
    let reload = stack
        .client
        .post(&reload_url, &[admin[0], json_type], reload_body.as_bytes());
    assert_eq!(reload.status, 200, "{}", reload.text());
    contract.check("post", "/v1/admin/reload", &reload);
    let bad = stack
        .client
        .post(&reload_url, &[admin[0], json_type], br#"{"api_keys":3}"#);
    contract.check("post", "/v1/admin/reload", &bad);

    // 503: the control plane gone (the filter's health, and an exchange)
    stack.control_plane.stop();
    let down = stack.exchange_with(&headers(DEMO_KEY, &key()), &body);
    assert_eq!(down.status, 503);
    contract.check("post", exchange, &down);
    contract.check("get", "/healthz", &get("/healthz", &[]));
    drop(stack);

    // 429 (the route's rate) and 500 (a control plane that refuses the filter's token)
    let limited = Stack::with_options(StackOptions {
        envoy_template_edits: vec![(
            "signet: { mode: exchange }".into(),
            "signet: { mode: exchange, tenant_requests_per_second: 1 }".into(),
        )],
        ..StackOptions::default()
    });
    let answers: Vec<Response> = (0..4)
        .map(|_| limited.exchange_with(&headers(DEMO_KEY, &key()), &body))
        .collect();
    assert!(
        answers.iter().any(|r| r.status == 429),
        "no 429 in a burst of 4"
    );
    for r in &answers {
        contract.check("post", exchange, r);
    }
    drop(limited);
    let refused = Stack::with_options(StackOptions {
        envoy_env: vec![("SP_FILTER_TOKEN".into(), "not-the-filter-token-0123".into())],
        ..StackOptions::default()
    });
    let misconfigured = refused.exchange_with(&headers(DEMO_KEY, &key()), &body);
    assert_eq!(misconfigured.status, 500);
    contract.check("post", exchange, &misconfigured);

    // every status the exchange documents was produced by the real thing
    let produced = contract.seen[&(exchange.to_owned(), "post".to_owned())].clone();
    assert_eq!(
        produced,
        contract.statuses_documented(exchange, "post"),
        "documented statuses of POST /v1/exchange not produced"
    );
}

/// The paths of a router in control-plane/src/api/mod.rs (`let public = Router::new() … ;`).
fn routes_of(source: &str, router: &str) -> BTreeSet<String> {
    let start = source
        .find(&format!("let {router} = Router::new()"))
        .unwrap_or_else(|| panic!("no {router} router in api/mod.rs"));
    let block = &source[start..];
    let block = &block[..block.find(';').expect("the router's end")];
    block
        .split(".route(")
        .skip(1)
        .map(|r| {
            let r = r.trim_start();
            // a path constant would hide the route from this check: the router names literals
            assert!(
                r.starts_with('"'),
                "a {router} route that is not a literal path: {r}"
            );
            r.split('"').nth(1).expect("the path literal").to_owned()
        })
        .collect()
}

#[test]
fn the_document_lists_every_public_and_admin_route_and_no_internal_one() {
    let doc = document();
    let source =
        std::fs::read_to_string(binaries::workspace_root().join("control-plane/src/api/mod.rs"))
            .expect("read api/mod.rs");
    let mut served = routes_of(&source, "public");
    served.extend(routes_of(&source, "admin"));
    served.insert("/v1/exchange".to_owned()); // the filter's, in Envoy
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    assert_eq!(documented, served);
    assert!(documented.iter().all(|p| !p.starts_with("/v1/internal/")));
    assert_eq!(doc["openapi"], "3.1.0");
}
