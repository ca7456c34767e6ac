//! HTTP routes: `internal` (the filter), `public` (health, metrics, JWKS, chains, exports) and
//! `admin` (tenant reload, usage). Every error body is the SPEC §4 `{"detail","code"}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use signet_protocol::error::ApiError;

use crate::storage::StoreError;
use crate::ControlPlane;
use signet_protocol::internal::{Head, Rejection};

mod admin;
mod internal;
mod public;

pub type State = axum::extract::State<Arc<ControlPlane>>;

pub fn router(state: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v1/internal/tenant", get(internal::tenant))
        .route("/v1/internal/commits", post(internal::commits))
        .route("/healthz", get(public::healthz))
        .route("/metrics", get(public::metrics))
        .route("/.well-known/jwks.json", get(public::jwks))
        .route("/.well-known/signet-jwks.json", get(public::jwks))
        .route("/v1/receipts/chain/{trace_id}", get(public::chain))
        .route("/v1/receipts/export/{trace_id}", get(public::export))
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/admin/usage/{tenant}", get(admin::usage))
        .fallback(|| async { HttpError::new(404, "NOT_FOUND", "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A SPEC §4 error response; a chain conflict also carries the current head.
#[derive(Debug)]
pub struct HttpError {
    error: ApiError,
    head: Option<Option<Head>>,
}

impl HttpError {
    pub fn new(status: u16, code: &str, detail: impl Into<String>) -> Self {
        HttpError {
            error: ApiError::new(status, code, detail),
            head: None,
        }
    }

    pub fn code(&self) -> &str {
        &self.error.code
    }

    pub fn status(&self) -> u16 {
        self.error.status
    }

    /// The SPEC §4 body (with the head of a chain conflict).
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({"detail": self.error.detail, "code": self.error.code});
        if let Some(head) = &self.head {
            body["head"] = serde_json::json!(head);
        }
        body
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(400, code, detail)
    }

    pub fn storage(e: StoreError) -> Self {
        tracing::error!("storage failure: {e}");
        Self::new(
            503,
            "STORAGE_UNAVAILABLE",
            "the receipt store is unavailable",
        )
    }

    pub fn rejection(r: Rejection) -> Self {
        match r {
            Rejection::KeyReused => Self::new(
                422,
                "IDEMPOTENCY_KEY_REUSED",
                "the idempotency key was used with a different request body",
            ),
            Rejection::TraceForbidden => Self::new(
                403,
                "TRACE_FORBIDDEN",
                "the trace belongs to another tenant",
            ),
            Rejection::ChainFull => Self::new(
                409,
                "CHAIN_FULL",
                "the trace has reached its maximum length",
            ),
            Rejection::ChainConflict { head } => HttpError {
                error: ApiError::new(
                    409,
                    "CHAIN_CONFLICT",
                    "chain conflict: the receipt does not extend the current head",
                ),
                head: Some(head),
            },
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, self.to_json().to_string())
    }
}

pub fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A request body as extracted, so that an oversized or unreadable one still gets a SPEC §4
/// error body.
pub type RawBody = Result<Bytes, BytesRejection>;

/// The largest request body accepted: a receipt and a response, each holding a normalized
/// payload that the filter's route already limited.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Parses a JSON request body: 400 `BAD_REQUEST` with the reason, or 413 `BODY_TOO_LARGE`.
pub fn parse_body<T: DeserializeOwned>(body: &RawBody) -> Result<T, HttpError> {
    let bytes = body.as_ref().map_err(|rejection| {
        let status = rejection.status().as_u16();
        let code = if status == 413 {
            "BODY_TOO_LARGE"
        } else {
            "BAD_REQUEST"
        };
        HttpError::new(status, code, rejection.body_text())
    })?;
    serde_json::from_slice(bytes)
        .map_err(|e| HttpError::bad_request("BAD_REQUEST", format!("invalid request body: {e}")))
}

/// The first present header of `names`, as text.
pub fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(*n))
        .and_then(|v| v.to_str().ok())
}
