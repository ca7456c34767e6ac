//! The one error type of the handlers and extractors, and the one place errors are counted.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use signet_protocol::internal::{Code, ErrorReply, Rejection};

use crate::storage::StoreError;
use crate::ControlPlane;

/// An error answer: its [`Code`] (which gives the status) and the SPEC §4 body.
#[derive(Debug)]
pub struct HttpError {
    code: Code,
    reply: ErrorReply,
}

impl HttpError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        HttpError {
            code,
            reply: ErrorReply::new(code, detail),
        }
    }

    pub fn storage(e: StoreError) -> Self {
        tracing::error!("storage failure: {e}");
        Self::new(Code::StorageUnavailable, "the receipt store is unavailable")
    }

    pub fn code(&self) -> Code {
        self.code
    }

    /// The body (with the head of a chain conflict).
    pub fn reply(&self) -> &ErrorReply {
        &self.reply
    }
}

impl From<Rejection> for HttpError {
    fn from(r: Rejection) -> Self {
        HttpError {
            code: r.code(),
            reply: r.reply(),
        }
    }
}

/// The response carries its code as an extension, for [`count_errors`].
impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let json = HeaderValue::from_static("application/json");
        let mut response =
            (status, [(header::CONTENT_TYPE, json)], self.reply.to_json()).into_response();
        response.extensions_mut().insert(self.code);
        response
    }
}

/// Middleware: counts every error response (a handler's, an extractor's rejection, the
/// fallback's) by its code. The errors of single commits inside a 200 batch answer are counted
/// where they are decided.
pub async fn count_errors(State(cp): State<Arc<ControlPlane>>, response: Response) -> Response {
    if let Some(&code) = response.extensions().get::<Code>() {
        cp.metrics.error(code);
    }
    response
}
