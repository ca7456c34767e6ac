//! Admin endpoints, authenticated with `X-SIGNET-Admin-Key` (`SP_ADMIN_KEY`).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_response, parse_body, HttpError, RawBody, State as AppState};
use crate::tenants::TenantDirectory;
use crate::{now_ms, ControlPlane};

fn authorize(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), HttpError> {
    match super::header(headers, &["x-signet-admin-key"]) {
        Some(k) if cp.is_admin_key(k) => Ok(()),
        Some(_) => Err(HttpError::new(
            401,
            "UNKNOWN_ADMIN_KEY",
            "unknown admin key",
        )),
        None => Err(HttpError::new(
            401,
            "MISSING_ADMIN_KEY",
            "missing X-SIGNET-Admin-Key header",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {
    /// Same form as `SP_API_KEYS`.
    api_keys: Value,
    /// Same form as `SP_RESERVED_CONFIG`; absent means no reserved capacity.
    #[serde(default)]
    reserved_config: Option<Value>,
}

/// `POST /v1/admin/reload`: replaces the whole tenant configuration (API keys and reserved
/// capacity) with the body's, validated like the environment at start. On any error nothing
/// changes. The global allowlist stays `SP_HEL_ALLOWLIST`.
pub async fn reload(State(cp): AppState, headers: HeaderMap, body: RawBody) -> Response {
    let result = (|| {
        authorize(&cp, &headers)?;
        let body: ReloadBody = parse_body(&body)?;
        let reserved = body.reserved_config.unwrap_or_else(|| json!({}));
        let directory = TenantDirectory::parse(
            &body.api_keys.to_string(),
            &reserved.to_string(),
            &cp.global_allowlist,
        )
        .map_err(|e| HttpError::bad_request("CONFIG_INVALID", e.to_string()))?;
        let counts =
            json!({"api_keys": directory.key_count(), "tenants": directory.tenant_count()});
        cp.replace_tenants(directory);
        Ok::<_, HttpError>(counts)
    })();
    match result {
        Ok(counts) => {
            tracing::info!(%counts, "tenants reloaded");
            json_response(StatusCode::OK, counts.to_string())
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct MonthQuery {
    month: Option<String>,
}

/// `GET /v1/admin/usage/{tenant}?month=YYYY-MM`: month-to-date counters and the billing queue.
pub async fn usage(
    State(cp): AppState,
    Path(tenant): Path<String>,
    Query(query): Query<MonthQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&cp, &headers) {
        return e.into_response();
    }
    let month = query.month.unwrap_or_else(|| {
        signet_protocol::time::rfc3339_millis(now_ms().max(0) as u64)[..7].to_owned()
    });
    let usage = cp.storage.usage(&tenant, &month).await;
    let queue = cp.storage.billing_queue(&tenant).await;
    match (usage, queue) {
        (Ok(usage), Ok(queue)) => {
            let rows: Vec<Value> = queue
                .into_iter()
                .filter(|r| r.month == month)
                .map(|r| {
                    json!({
                        "meter": r.meter, "band": r.band, "units": r.units,
                        "stripe_item": r.stripe_item, "price_per_unit": r.price_per_unit,
                        "amount": r.amount, "idempotency_key": r.idempotency_key, "state": r.state,
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({"tenant": tenant, "month": month, "vex": usage.vex, "fu": usage.fu, "billing_queue": rows})
                    .to_string(),
            )
        }
        (Err(e), _) | (_, Err(e)) => HttpError::storage(e).into_response(),
    }
}
