//! Public endpoints: health, metrics, JWKS, and the chain and signed export of a trace for its
//! owner (the tenant's API key) or an auditor (the admin key), as [`ChainReader`] checks.

use axum::extract::{Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use signet_protocol::internal::Code;
use signet_protocol::{bundle, time};

use super::extract::{ChainReader, Parsed, TraceId};
use super::{HttpError, State as AppState};
use crate::storage::StoredChain;
use crate::{now_ms, ControlPlane};

/// 200 when the database answers and every storage worker runs; else 503 with the reason.
pub async fn healthz(State(cp): AppState) -> Response {
    let timer = cp.metrics.time("ping");
    let ping = cp.storage.ping().await;
    timer.done();
    let storage = cp.storage.kind();
    match ping {
        Ok(()) => Json(json!({"status": "ok", "storage": storage, "database": "reachable"}))
            .into_response(),
        Err(e) => {
            tracing::warn!("health check: {e}");
            let body = json!({"status": "unavailable", "storage": storage,
                              "database": "unreachable", "reason": e.to_string()});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
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
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        cp.keys.jwks_json().to_owned(),
    )
        .into_response()
}

/// `?tenant=`: whose trace an auditor reads (a trace id names a chain within its tenant).
#[derive(Deserialize)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// The receipts of the reader's trace: a tenant reads its own (`?tenant=`, if given, must be
/// itself), an auditor names the tenant. Another tenant's trace of that id is another chain,
/// never this one.
async fn readable_chain(
    cp: &ControlPlane,
    reader: &ChainReader,
    tenant: Option<String>,
    trace_id: &str,
) -> Result<StoredChain, HttpError> {
    let not_found = || HttpError::new(Code::TraceNotFound, "no such trace");
    let tenant = match (reader, tenant) {
        (ChainReader::Tenant(own), None) => own.clone(),
        (ChainReader::Tenant(own), Some(named)) if *own == named => named,
        (ChainReader::Tenant(_), Some(_)) => return Err(not_found()),
        (ChainReader::Auditor, Some(named)) => named,
        (ChainReader::Auditor, None) => {
            return Err(HttpError::new(
                Code::BadRequest,
                "an auditor names the trace's tenant: ?tenant=",
            ))
        }
    };
    let timer = cp.metrics.time("chain");
    let chain = cp.storage.chain(&tenant, trace_id).await;
    timer.done();
    chain.map_err(HttpError::storage)?.ok_or_else(not_found)
}

pub async fn chain(
    State(cp): AppState,
    TraceId(trace_id): TraceId,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<TenantQuery>>,
) -> Result<Response, HttpError> {
    let chain = readable_chain(&cp, &reader, query.tenant, &trace_id).await?;
    Ok(Json(Value::Array(chain.receipts)).into_response())
}

pub async fn export(
    State(cp): AppState,
    TraceId(trace_id): TraceId,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<TenantQuery>>,
) -> Result<Response, HttpError> {
    let chain = readable_chain(&cp, &reader, query.tenant, &trace_id).await?;
    let exported_at = time::rfc3339_millis(now_ms().max(0) as u64);
    let bundle = bundle::export(
        &trace_id,
        chain.receipts,
        &exported_at,
        cp.keys.signing_key(),
    )
    .map_err(|e| {
        // Stored receipts were verified on the way in, so this is not expected.
        tracing::error!(trace_id, "export failed: {e}");
        HttpError::new(Code::ExportFailed, "the chain could not be exported")
    })?;
    let signed_headers = [
        (
            "bundle_cid",
            ["x-signet-response-cid", "x-odin-response-cid"],
        ),
        ("signature", ["x-signet-signature", "x-odin-signature"]),
        ("kid", ["x-signet-kid", "x-odin-kid"]),
    ];
    let mut response = Json(&bundle).into_response();
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
    Ok(response)
}
