//! One base URL: a client written against the Signet API reaches all of its public part
//! through Envoy (exchange by the filter; chains, exports and keys from the control plane's
//! public listener), and `/healthz` there is the filter's view of the control plane.

use serde_json::Value;
use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, signet, DEMO_KEY};
use signet_e2e::{Stack, StackOptions, Storage};

use crate::assert_ok;

#[test]
fn one_base_url_round_trips_exchange_chain_export_and_offline_verify() {
    let mut stack = Stack::start(Storage::Sqlite);
    let base = stack.envoy.url("");
    let get =
        |path: &str, headers: &[(&str, &str)]| stack.client.get(&format!("{base}{path}"), headers);
    let tenant = [("X-SIGNET-API-Key", DEMO_KEY)];

    let key = new_idempotency_key();
    let body = exchange_body(sample_invoice()).to_string();
    let first = stack.exchange_with(
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("X-SIGNET-Idempotency-Key", &key),
        ],
        body.as_bytes(),
    );
    let first = assert_ok(&stack, &first);
    let trace_id = first["trace_id"].as_str().expect("trace_id").to_owned();

    let chain = get(&format!("/v1/receipts/chain/{trace_id}"), &tenant);
    assert_eq!(chain.status, 200, "{}", chain.text());
    let Value::Array(receipts) = chain.json() else {
        panic!("the chain is not an array: {}", chain.text())
    };
    assert_eq!(receipts.len(), 1);
    assert_eq!(
        receipts[0]["receipt_hash"],
        first["receipt"]["receipt_hash"]
    );

    let export = get(&format!("/v1/receipts/export/{trace_id}"), &tenant);
    assert_eq!(export.status, 200, "{}", export.text());
    assert_eq!(
        export.header("X-SIGNET-Response-CID"),
        export.json()["bundle_cid"].as_str()
    );
    // the tenant's deliveries of the trace (none: no forward_url) and its month
    let deliveries = get(&format!("/v1/forward/deliveries/{trace_id}"), &tenant);
    assert_eq!(deliveries.status, 200, "{}", deliveries.text());
    assert_eq!(deliveries.json()["trace_id"], trace_id.as_str());
    assert_eq!(deliveries.json()["deliveries"], serde_json::json!([]));
    let usage = get("/v1/usage", &tenant);
    assert_eq!(usage.status, 200, "{}", usage.text());
    assert_eq!(usage.json()["tenant"], "demo");
    assert!(usage.json()["vex"].as_u64() >= Some(1), "{}", usage.text());
    assert!(usage.json().get("billing_queue").is_none());
    assert_eq!(get("/v1/usage", &[]).status, 401);
    for path in ["/.well-known/jwks.json", "/.well-known/signet-jwks.json"] {
        let jwks = get(path, &[]);
        assert_eq!(jwks.status, 200, "{path}");
        assert_eq!(
            jwks.json()["keys"][0]["kid"],
            stack.key.kid.as_str(),
            "{path}"
        );
    }
    // offline verification with nothing but the one base URL
    let bundle_path = stack.dir.path().join("bundle-one-address.json");
    std::fs::write(&bundle_path, &export.body).expect("write the bundle");
    let jwks_url = format!("{base}/.well-known/jwks.json");
    let verified = signet(&[
        "verify",
        "bundle",
        bundle_path.to_str().expect("utf-8 path"),
        "--jwks",
        &jwks_url,
    ]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // health as the filter sees it
    let health = get("/healthz", &[]);
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["filter"]["control_plane"], "reachable");
    assert_eq!(health.json()["control_plane"]["storage"], "sqlite");

    // never the internal or admin API, nor the control plane's metrics
    for path in [
        "/v1/internal/tenant",
        "/v1/internal/health",
        "/v1/admin/usage/demo",
        "/metrics",
    ] {
        assert_eq!(get(path, &[]).status, 404, "{path} through Envoy");
    }

    // the control plane gone: 503, and why
    stack.control_plane.stop();
    let health = stack.client.get(&format!("{base}/healthz"), &[]);
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.json()["status"], "unavailable");
    assert_eq!(health.json()["filter"]["control_plane"], "unreachable");
}

/// A filter token the control plane refuses: its own `/healthz` is green, and only the
/// filter's view shows that no exchange can succeed.
#[test]
fn health_through_envoy_shows_a_filter_token_the_control_plane_refuses() {
    let stack = Stack::with_options(StackOptions {
        envoy_env: vec![("SP_FILTER_TOKEN".into(), "not-the-filter-token-0123".into())],
        ..StackOptions::default()
    });
    let own = stack.client.get(&stack.control_plane.url("/healthz"), &[]);
    assert_eq!(own.status, 200);
    let health = stack.client.get(&stack.envoy.url("/healthz"), &[]);
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(
        health.json()["filter"]["control_plane"],
        "rejects the filter token"
    );
}
