//! Forwarding's endpoints (SPEC §5; the work is `crate::forward`'s):
//! - internal `POST /v1/internal/forward`: the first attempt of an exchange's delivery;
//! - public `GET /v1/forward/deliveries/{trace_id}`: a tenant's deliveries of a trace with
//!   every attempt (the tenant's API key, or the admin key with `?tenant=`);
//! - admin `POST /v1/admin/forward/redrive`: dead letters made due again.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use signet_protocol::internal::forward::{ForwardRequest, Forwarded};
use signet_protocol::internal::Code;

use super::extract::{AdminAuth, Body, ChainReader, FilterAuth, Parsed, TraceId};
use super::{HttpError, State as AppState};
use crate::storage::forward::{Attempt, Delivery, Redrive};

/// Deliveries answered per trace.
pub const DELIVERIES_MAX: usize = 1000;

pub async fn forward(
    State(cp): AppState,
    _: FilterAuth,
    body: Body,
) -> Result<Response, HttpError> {
    let request: ForwardRequest = body.parse()?;
    let allowlist = cp
        .tenants()
        .allowlist_of_tenant(&request.tenant)
        .ok_or_else(|| HttpError::new(Code::UnknownTenant, "unknown tenant"))?;
    let reply = cp
        .forward
        .forwarder
        .forward(request, &allowlist)
        .await
        .map_err(|(code, detail)| HttpError::new(code, detail))?;
    Ok(Json(reply).into_response())
}

#[derive(Deserialize)]
pub struct DeliveriesQuery {
    tenant: Option<String>,
}

pub async fn deliveries(
    State(cp): AppState,
    TraceId(trace_id): TraceId,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<DeliveriesQuery>>,
) -> Result<Response, HttpError> {
    let tenant = match reader {
        ChainReader::Tenant(tenant) => tenant,
        ChainReader::Auditor => query.tenant.ok_or_else(|| {
            HttpError::new(Code::BadRequest, "?tenant= is required with the admin key")
        })?,
    };
    let deliveries = cp
        .storage
        .forward_deliveries(&tenant, &trace_id, DELIVERIES_MAX)
        .await
        .map_err(HttpError::storage)?;
    let deliveries: Vec<Value> = deliveries
        .iter()
        .map(|(d, a)| delivery_json(d, a))
        .collect();
    Ok(
        Json(json!({"trace_id": trace_id, "tenant": tenant, "deliveries": deliveries}))
            .into_response(),
    )
}

fn delivery_json(d: &Delivery, attempts: &[Attempt]) -> Value {
    let first: Option<Forwarded> = d
        .first_outcome
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok());
    json!({
        "delivery_id": d.id,
        "state": d.state,
        "url": d.url,
        "host": d.host,
        "hop": d.hop,
        "cid": d.cid,
        "prev_receipt_hash": d.prev_receipt_hash,
        "receipt_hash": d.receipt_hash,
        "idempotency_key": d.idempotency_key,
        "forwarded": first,
        "attempts_started": d.attempts,
        "next_attempt_ms": (d.state == "pending").then_some(d.next_attempt_ms),
        "last_error": d.last_error,
        "created_ms": d.created_ms,
        "updated_ms": d.updated_ms,
        "attempts": attempts.iter().map(|a| json!({
            "attempt": a.attempt,
            "started_ms": a.started_ms,
            "duration_ms": a.duration_ms,
            "status_code": a.status_code,
            "pinned_ip": a.pinned_ip,
            "response_size": a.response_size,
            "error": a.error,
        })).collect::<Vec<_>>(),
    })
}

/// `{"tenant"}` (every dead letter of the tenant) or `{"tenant","delivery_id"}`.
#[derive(Deserialize)]
struct RedriveRequest {
    tenant: String,
    #[serde(default)]
    delivery_id: Option<String>,
}

pub async fn redrive(State(cp): AppState, _: AdminAuth, body: Body) -> Result<Response, HttpError> {
    let request: RedriveRequest = body.parse()?;
    let which = match request.delivery_id {
        Some(id) => Redrive::One {
            tenant: request.tenant,
            id,
        },
        None => Redrive::Tenant(request.tenant),
    };
    let n = cp
        .storage
        .forward_redrive(which, crate::now_ms())
        .await
        .map_err(HttpError::storage)?;
    Ok(Json(json!({"redriven": n})).into_response())
}
