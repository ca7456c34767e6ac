//! Public endpoints: health, metrics, JWKS, and the chain and signed export of a trace for its
//! owner (the tenant's API key) or an auditor (the admin key).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use signet_protocol::{bundle, time, trace};

use super::{json_response, HttpError, State as AppState};
use crate::storage::StoredChain;
use crate::{now_ms, tenants, ControlPlane};

pub async fn healthz(State(cp): AppState) -> Response {
    let timer = cp.metrics.time("ping");
    let ping = cp.storage.ping().await;
    timer.done();
    let storage = cp.storage.kind();
    match ping {
        Ok(()) => json_response(
            StatusCode::OK,
            json!({"status": "ok", "storage": storage, "database": "reachable"}).to_string(),
        ),
        Err(e) => {
            tracing::warn!("health check: {e}");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "storage": storage, "database": "unreachable"})
                    .to_string(),
            )
        }
    }
}

pub async fn metrics(State(cp): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        cp.metrics.encode(),
    )
        .into_response()
}

pub async fn jwks(State(cp): AppState) -> Response {
    let mut response = json_response(StatusCode::OK, cp.keys.jwks_json().to_owned());
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// The trace's receipts if the caller may read them: the owning tenant's API key
/// (`X-SIGNET-API-Key` / `X-ODIN-API-Key`) or the admin key (`X-SIGNET-Admin-Key`). A trace of
/// another tenant is reported as not found, so its existence does not leak.
async fn readable_chain(
    cp: &ControlPlane,
    headers: &HeaderMap,
    trace_id: &str,
) -> Result<StoredChain, HttpError> {
    if !trace::is_valid_trace_id(trace_id) {
        return Err(HttpError::bad_request(
            "TRACE_ID_INVALID",
            "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
        ));
    }
    let admin = super::header(headers, &["x-signet-admin-key"]);
    let api_key = super::header(headers, &["x-signet-api-key", "x-odin-api-key"]);
    let tenant = match (admin, api_key) {
        (Some(k), _) if cp.is_admin_key(k) => None,
        (Some(_), _) => {
            return Err(HttpError::new(
                401,
                "UNKNOWN_ADMIN_KEY",
                "unknown admin key",
            ))
        }
        (None, Some(k)) => match cp.tenants().grant_for_key_hash(&tenants::api_key_hash(k)) {
            Some(grant) => Some(grant.tenant.clone()),
            None => return Err(HttpError::new(401, "UNKNOWN_API_KEY", "unknown API key")),
        },
        (None, None) => {
            return Err(HttpError::new(
                401,
                "MISSING_API_KEY",
                "missing X-SIGNET-API-Key header",
            ))
        }
    };
    let timer = cp.metrics.time("chain");
    let chain = cp.storage.chain(trace_id).await;
    timer.done();
    match chain.map_err(HttpError::storage)? {
        Some(chain) if tenant.as_deref().is_none_or(|t| t == chain.tenant) => Ok(chain),
        _ => Err(HttpError::new(404, "TRACE_NOT_FOUND", "no such trace")),
    }
}

pub async fn chain(
    State(cp): AppState,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match readable_chain(&cp, &headers, &trace_id).await {
        Ok(chain) => json_response(StatusCode::OK, Value::Array(chain.receipts).to_string()),
        Err(e) => {
            cp.metrics.error(e.code());
            e.into_response()
        }
    }
}

pub async fn export(
    State(cp): AppState,
    Path(trace_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let chain = match readable_chain(&cp, &headers, &trace_id).await {
        Ok(chain) => chain,
        Err(e) => {
            cp.metrics.error(e.code());
            return e.into_response();
        }
    };
    let exported_at = time::rfc3339_millis(now_ms().max(0) as u64);
    let bundle = match bundle::export(
        &trace_id,
        chain.receipts,
        &exported_at,
        cp.keys.signing_key(),
    ) {
        Ok(b) => b,
        Err(e) => {
            // Stored receipts were verified on the way in, so this is not expected.
            tracing::error!(trace_id, "export failed: {e}");
            return HttpError::new(500, "EXPORT_FAILED", "the chain could not be exported")
                .into_response();
        }
    };
    let mut response = json_response(StatusCode::OK, bundle.to_string());
    let signed_headers = [
        (
            "bundle_cid",
            ["x-signet-response-cid", "x-odin-response-cid"],
        ),
        ("signature", ["x-signet-signature", "x-odin-signature"]),
        ("kid", ["x-signet-kid", "x-odin-kid"]),
    ];
    for (member, names) in signed_headers {
        let value = bundle
            .get(member)
            .and_then(Value::as_str)
            .and_then(|v| HeaderValue::from_str(v).ok());
        if let Some(value) = value {
            for name in names {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value.clone());
            }
        }
    }
    response
}
