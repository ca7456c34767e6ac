//! What a handler takes from the request, checked before it runs: who calls (the filter, a
//! chain reader, the admin), the trace id of the path and the body. Each rejects with an
//! [`HttpError`], so even a refused request gets a SPEC §4 body and is counted.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde::Deserialize;
use signet_protocol::internal::{Code, FILTER_TOKEN_HEADER};
use signet_protocol::trace;

use super::HttpError;
use crate::{strict_json, tenants, ControlPlane};

const ADMIN_KEY_HEADER: &str = "x-signet-admin-key";
/// A tenant's API key, under its current name or the ODIN one.
const API_KEY_HEADERS: [&str; 2] = ["x-signet-api-key", "x-odin-api-key"];

/// The first present header of `names`, as text.
pub fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(*n))
        .and_then(|v| v.to_str().ok())
}

/// The caller is the filter: `X-SIGNET-Filter-Token` is `SP_FILTER_TOKEN`.
pub struct FilterAuth;

impl FromRequestParts<Arc<ControlPlane>> for FilterAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, HttpError> {
        match header(&parts.headers, &[FILTER_TOKEN_HEADER]) {
            Some(token) if cp.is_filter_token(token) => Ok(FilterAuth),
            _ => Err(HttpError::new(
                Code::FilterUnauthorized,
                "missing or wrong filter token",
            )),
        }
    }
}

/// The caller is the operator: `X-SIGNET-Admin-Key` is `SP_ADMIN_KEY`.
pub struct AdminAuth;

impl AdminAuth {
    /// `None` when the request has no admin key.
    fn check(cp: &ControlPlane, headers: &HeaderMap) -> Option<Result<AdminAuth, HttpError>> {
        let key = header(headers, &[ADMIN_KEY_HEADER])?;
        Some(if cp.is_admin_key(key) {
            Ok(AdminAuth)
        } else {
            Err(HttpError::new(Code::UnknownAdminKey, "unknown admin key"))
        })
    }
}

impl FromRequestParts<Arc<ControlPlane>> for AdminAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, HttpError> {
        AdminAuth::check(cp, &parts.headers).unwrap_or_else(|| {
            Err(HttpError::new(
                Code::MissingAdminKey,
                "missing X-SIGNET-Admin-Key header",
            ))
        })
    }
}

/// Who may read a trace's receipts: an auditor (the admin key, which wins when present) or a
/// tenant (its API key), who reads only its own traces.
pub enum ChainReader {
    Auditor,
    Tenant(String),
}

impl FromRequestParts<Arc<ControlPlane>> for ChainReader {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, HttpError> {
        if let Some(admin) = AdminAuth::check(cp, &parts.headers) {
            return admin.map(|AdminAuth| ChainReader::Auditor);
        }
        let key = header(&parts.headers, &API_KEY_HEADERS).ok_or_else(|| {
            HttpError::new(Code::MissingApiKey, "missing X-SIGNET-API-Key header")
        })?;
        match cp.tenants().grant_for_key_hash(&tenants::api_key_hash(key)) {
            Some(grant) => Ok(ChainReader::Tenant(grant.tenant.clone())),
            None => Err(HttpError::new(Code::UnknownApiKey, "unknown API key")),
        }
    }
}

/// The `{trace_id}` of the path, valid (SPEC §2: 1 to 128 of `[A-Za-z0-9._:-]`).
pub struct TraceId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TraceId {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) if trace::is_valid_trace_id(&id) => Ok(TraceId(id)),
            _ => Err(HttpError::new(
                Code::BadTraceId,
                "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
            )),
        }
    }
}

/// An extractor of axum's (`Path`, `Query`) whose rejection is a 400 `BAD_REQUEST`.
pub struct Parsed<E>(pub E);

impl<S, E> FromRequestParts<S> for Parsed<E>
where
    S: Send + Sync,
    E: FromRequestParts<S>,
    E::Rejection: std::fmt::Display,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        E::from_request_parts(parts, state)
            .await
            .map(Parsed)
            .map_err(|rejection| HttpError::new(Code::BadRequest, rejection.to_string()))
    }
}

/// The request body, read whole (up to the router's limit); parsed by the handler, since what
/// it parses may borrow from it.
pub struct Body(Bytes);

impl Body {
    /// The body as JSON of `T`, read strictly ([`crate::strict_json`]): 400 `BAD_REQUEST` with the
    /// reason.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, HttpError> {
        // the code and offset only: the member name may be an API key (an admin reload)
        strict_json(&self.0).map_err(|e| {
            let at = e.offset().unwrap_or(0);
            HttpError::new(
                Code::BadRequest,
                format!("invalid request body: {} at byte {at}", e.code()),
            )
        })?;
        serde_json::from_slice(&self.0)
            .map_err(|e| HttpError::new(Code::BadRequest, format!("invalid request body: {e}")))
    }

    /// The body as JSON of `T`, read by serde alone: for a commit batch, whose envelope is a
    /// struct (serde refuses a duplicate member of a struct) and whose commits are each read
    /// strictly on their own, so that a bad one fails alone.
    pub fn parse_envelope<'a, T: Deserialize<'a>>(&'a self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.0)
            .map_err(|e| HttpError::new(Code::BadRequest, format!("invalid request body: {e}")))
    }
}

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                let code = if rejection.status().as_u16() == Code::BodyTooLarge.status() {
                    Code::BodyTooLarge
                } else {
                    Code::BadRequest
                };
                HttpError::new(code, rejection.body_text())
            })
    }
}
