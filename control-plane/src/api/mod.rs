//! HTTP routes. Every error body is the SPEC §4 `{"detail","code"}`.
//!
//! - `internal`: the filter's callouts (`signet_protocol::internal`).
//! - `public`: health, metrics, JWKS, a trace's chain and signed export.
//! - `admin`: tenant reload, usage.
//! - `extract`: who calls and what the request holds, checked before a handler runs.
//! - `error`: [`HttpError`], the one error answer, and the middleware that counts them.
//!
//! A new internal endpoint: its messages in `protocol/src/internal/`, its handler in
//! `internal.rs`, its route here.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use signet_protocol::internal::{commit, idempotency, tenant, Code};

use crate::ControlPlane;

mod admin;
mod error;
mod extract;
mod internal;
mod public;

pub use error::HttpError;

pub type State = axum::extract::State<Arc<ControlPlane>>;

pub fn router(state: Arc<ControlPlane>) -> Router {
    Router::new()
        .route(tenant::PATH, get(internal::tenant))
        .route(commit::PATH, post(internal::commits))
        .route(idempotency::PATH, post(internal::idempotency))
        .route("/healthz", get(public::healthz))
        .route("/metrics", get(public::metrics))
        .route("/.well-known/jwks.json", get(public::jwks))
        .route("/.well-known/signet-jwks.json", get(public::jwks))
        .route("/v1/receipts/chain/{trace_id}", get(public::chain))
        .route("/v1/receipts/export/{trace_id}", get(public::export))
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/admin/usage/{tenant}", get(admin::usage))
        .fallback(|| async { HttpError::new(Code::NotFound, "no such endpoint") })
        .layer(middleware::map_response_with_state(
            state.clone(),
            error::count_errors,
        ))
        .layer(DefaultBodyLimit::max(commit::MAX_BODY_BYTES))
        .with_state(state)
}
