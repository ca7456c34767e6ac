//! HTTP routes. Every error body is the SPEC §4 `{"detail","code"}`.
//!
//! - `internal`: the filter's callouts (`signet_protocol::internal`).
//! - `public`: health, metrics, JWKS, the OpenAPI document (docs/openapi.json), a trace's chain
//!   and signed export.
//!
//! Every route is documented in docs/openapi.json (`tests/tests/e2e/openapi.rs` checks both ways).
//! - `admin`: tenant reload, usage.
//!
//! Each of `internal`, `public` and `admin` is its own [`Router`] ([`Routers`]), served on its
//! own listener (`crate::server`).
//! - `extract`: who calls and what the request holds, checked before a handler runs.
//! - `error`: [`HttpError`], the one error answer, and the middleware that counts them.
//!
//! A new internal endpoint: its messages in `protocol/src/internal/`, its handler in
//! `internal.rs`, its route here.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use signet_protocol::internal::forward as forward_message;
use signet_protocol::internal::{commit, health, idempotency, repair, tenant, Code};

use crate::ControlPlane;

mod admin;
mod error;
mod extract;
mod forward;
mod internal;
mod public;

pub use error::HttpError;

pub type State = axum::extract::State<Arc<ControlPlane>>;

/// The three APIs, each for its own listener (`config::Listeners`): a path of another API is
/// 404 `NOT_FOUND` here, as any unknown path.
pub struct Routers {
    pub public: Router,
    pub internal: Router,
    pub admin: Router,
}

impl Routers {
    pub fn new(state: Arc<ControlPlane>) -> Routers {
        let internal = Router::new()
            .route(tenant::PATH, get(internal::tenant))
            .route(commit::PATH, post(internal::commits))
            .route(idempotency::PATH, post(internal::idempotency))
            .route(health::PATH, get(internal::health))
            .route(forward_message::PATH, post(forward::forward))
            .route(repair::PATH, post(internal::repair));
        let public = Router::new()
            .route("/healthz", get(public::healthz))
            .route("/metrics", get(public::metrics))
            .route("/.well-known/jwks.json", get(public::jwks))
            .route("/.well-known/signet-jwks.json", get(public::jwks))
            .route("/openapi.json", get(public::openapi))
            .route("/v1/receipts/chain/{trace_id}", get(public::chain))
            .route("/v1/receipts/export/{trace_id}", get(public::export))
            .route(
                "/v1/forward/deliveries/{trace_id}",
                get(forward::deliveries),
            )
            .route("/v1/usage", get(public::usage));
        let admin = Router::new()
            .route("/v1/admin/reload", post(admin::reload))
            .route("/v1/admin/usage/{tenant}", get(admin::usage))
            .route("/v1/admin/forward/redrive", post(forward::redrive));
        Routers {
            public: finish(public, &state),
            internal: finish(internal, &state),
            admin: finish(admin, &state),
        }
    }
}

/// What every API has: the 404 fallback, the request timeout, error counting, the body limit.
fn finish(routes: Router<Arc<ControlPlane>>, state: &Arc<ControlPlane>) -> Router {
    routes
        .fallback(|| async { HttpError::new(Code::NotFound, "no such endpoint") })
        .layer(middleware::from_fn_with_state(
            state.request_timeout,
            time_limit,
        ))
        .layer(middleware::map_response_with_state(
            state.clone(),
            error::count_errors,
        ))
        .layer(DefaultBodyLimit::max(commit::MAX_BODY_BYTES))
        .with_state(state.clone())
}

/// `SP_REQUEST_TIMEOUT_SECS`: a request whose body or handler takes longer is answered 503
/// and its handler dropped, so a slow client or a stuck database holds no task for ever. (A
/// commit cut here may still be written by storage: its deadline, shorter, is what decides.)
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => HttpError::new(
            Code::StorageUnavailable,
            format!(
                "the request took longer than {} s (SP_REQUEST_TIMEOUT_SECS)",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}
