//! End-to-end tests: each test starts its own stack (the real Envoy 1.40 with the built
//! `signet_filter.wasm`, the real control plane, the demo upstream) and talks to it over HTTP.
//! Build everything first: `make test` (or see the harness's messages for single commands).

mod chain;
mod commits;
mod config;
mod errors;
mod fallback;
mod forward;
mod hostile;
mod idempotency;
mod one_address;
mod openapi;
mod ops;
mod routes;
mod shipped;
mod stats;

use signet_e2e::http::Response;
use signet_e2e::Stack;

/// Asserts a SPEC §4 error answer: status, JSON `{"detail","code"}`, and its content type.
#[track_caller]
fn assert_error(stack: &Stack, response: &Response, status: u16, code: &str) {
    assert!(
        response.status == status
            && response.header("content-type") == Some("application/json")
            && response.json()["code"] == code
            && response.json()["detail"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
        "expected {status} {code}, got {} {:?}: {}\n{}",
        response.status,
        response.header("content-type"),
        response.text(),
        stack.logs()
    );
}

/// Asserts a 200 answer, with the stack's logs if not.
#[track_caller]
fn assert_ok(stack: &Stack, response: &Response) -> serde_json::Value {
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.text(),
        stack.logs()
    );
    response.json()
}
