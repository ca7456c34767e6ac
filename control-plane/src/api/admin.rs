//! Admin endpoints, for the operator ([`AdminAuth`]: `X-SIGNET-Admin-Key` is `SP_ADMIN_KEY`).

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use signet_protocol::internal::Code;

use super::extract::{AdminAuth, Body, Parsed};
use super::{HttpError, State as AppState};
use crate::now_ms;
use crate::tenants::TenantDirectory;

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
pub async fn reload(
    State(cp): AppState,
    _: AdminAuth,
    body: Body,
) -> Result<Json<Value>, HttpError> {
    let body: ReloadBody = body.parse()?;
    let reserved = body.reserved_config.unwrap_or_else(|| json!({}));
    let directory = TenantDirectory::parse(
        &body.api_keys.to_string(),
        &reserved.to_string(),
        &cp.global_allowlist,
    )
    .map_err(|e| HttpError::new(Code::ConfigInvalid, e.to_string()))?;
    crate::billing::settings::check_tenants(&directory, cp.billing.settings.stripe.is_some())
        .map_err(|e| HttpError::new(Code::ConfigInvalid, e.to_string()))?;
    let counts = json!({"api_keys": directory.key_count(), "tenants": directory.tenant_count()});
    cp.replace_tenants(directory);
    tracing::info!(%counts, "tenants reloaded");
    Ok(Json(counts))
}

#[derive(Deserialize)]
pub struct MonthQuery {
    month: Option<String>,
}

/// `GET /v1/admin/usage/{tenant}?month=YYYY-MM`: month-to-date counters and the billing queue.
pub async fn usage(
    State(cp): AppState,
    _: AdminAuth,
    Parsed(Path(tenant)): Parsed<Path<String>>,
    Parsed(Query(query)): Parsed<Query<MonthQuery>>,
) -> Result<Json<Value>, HttpError> {
    let month = query.month.unwrap_or_else(|| {
        signet_protocol::time::rfc3339_millis(now_ms().max(0) as u64)[..7].to_owned()
    });
    let usage = cp.storage.usage(&tenant, &month).await;
    let queue = cp.storage.billing_queue(&tenant).await;
    let billing = crate::billing::usage::month(&cp, &tenant, &month).await;
    let (usage, queue, billing) = (
        usage.map_err(HttpError::storage)?,
        queue.map_err(HttpError::storage)?,
        billing.map_err(HttpError::storage)?,
    );
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
    Ok(Json(
        json!({"tenant": tenant, "month": month, "vex": usage.vex, "fu": usage.fu, "billing_queue": rows,
               "billing": billing["billing"], "stripe_customer": billing["stripe_customer"]}),
    ))
}
