//! Public endpoints: health, metrics, JWKS, the OpenAPI document, and the chain and signed export of a trace for its
//! owner (the tenant's API key) or an auditor (the admin key), as [`ChainReader`] checks.

use axum::extract::{Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use signet_protocol::internal::health::Health;
use signet_protocol::internal::Code;
use signet_protocol::{bundle, time};

use super::extract::{ChainReader, Parsed, TraceId};
use super::{HttpError, State as AppState};
use crate::storage::{ChainPage, StoredChain};
use crate::{now_ms, ControlPlane};

/// 200 when the database answers and every storage worker (and the forward outbox worker)
/// runs; else 503 with the reason.
pub async fn healthz(State(cp): AppState) -> Response {
    let timer = cp.metrics.time("ping");
    let ping = match cp.forward.check() {
        Ok(()) => cp.storage.ping().await,
        Err(e) => Err(e),
    };
    timer.done();
    let storage = cp.storage.kind().into();
    match ping {
        Ok(()) => match cp.billing.check() {
            Ok(()) => Json(Health {
                status: "ok".into(),
                storage,
                database: "reachable".into(),
                reason: None,
            })
            .into_response(),
            Err(reason) => {
                tracing::warn!("health check: {reason}");
                let body = Health {
                    status: "unavailable".into(),
                    storage,
                    database: "reachable".into(),
                    reason: Some(reason.into()),
                };
                (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
            }
        },
        Err(e) => {
            tracing::warn!("health check: {e}");
            let body = Health {
                status: "unavailable".into(),
                storage,
                database: "unreachable".into(),
                reason: Some(e.to_string().into()),
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// The OpenAPI 3.1 document of the public and admin APIs (docs/openapi.json, built in).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

pub async fn openapi() -> Response {
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
        OPENAPI,
    )
        .into_response()
}

pub async fn metrics(State(cp): AppState) -> Response {
    let mut text = cp.metrics.encode();
    crate::billing::usage::append_metrics(&cp, &mut text).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
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

/// `GET /v1/usage?month=YYYY-MM`: the caller's own month (its API key), as the admin sees it
/// (`GET /v1/admin/usage/{tenant}`) less the raw queue. An auditor (the admin key) names the
/// tenant with `?tenant=`.
pub async fn usage(
    State(cp): AppState,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<UsageQuery>>,
) -> Result<Json<Value>, HttpError> {
    let tenant = match (reader, query.tenant) {
        (ChainReader::Tenant(own), None) => own,
        (ChainReader::Tenant(own), Some(named)) if own == named => own,
        (ChainReader::Tenant(_), Some(_)) => {
            return Err(HttpError::new(
                Code::UnknownApiKey,
                "a tenant reads its own usage only",
            ))
        }
        (ChainReader::Auditor, Some(named)) => named,
        (ChainReader::Auditor, None) => {
            return Err(HttpError::new(
                Code::BadRequest,
                "an auditor names the tenant: ?tenant=",
            ))
        }
    };
    let month = query
        .month
        .unwrap_or_else(crate::billing::usage::current_month);
    let well_formed = month.len() == 7
        && month.as_bytes()[4] == b'-'
        && month
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 4 || b.is_ascii_digit());
    if !well_formed {
        return Err(HttpError::new(Code::BadRequest, "month must be YYYY-MM"));
    }
    let body = crate::billing::usage::month(&cp, &tenant, &month)
        .await
        .map_err(HttpError::storage)?;
    Ok(Json(body))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    tenant: Option<String>,
    month: Option<String>,
}

/// `?tenant=`: whose trace an auditor reads (a trace id names a chain within its tenant);
/// for the chain, `?after_hop=` and `?limit=` too.
#[derive(Deserialize)]
pub struct ChainQuery {
    tenant: Option<String>,
    #[serde(default)]
    after_hop: u64,
    limit: Option<usize>,
}

/// Receipts per chain page: `?limit=` (default 100, at most 1000), and at most 8 MiB of
/// receipts (always at least one). When receipts follow, the answer's `X-SIGNET-Next-After-Hop`
/// header is the `?after_hop=` of the next page.
pub const CHAIN_PAGE_DEFAULT: usize = 100;
pub const CHAIN_PAGE_MAX: usize = 1000;
pub const CHAIN_PAGE_MAX_BYTES: usize = 8 << 20;
/// An export signs the whole chain in one bundle, up to this many bytes of receipts; a larger
/// chain is 413 `BODY_TOO_LARGE` (read it page by page from the chain endpoint).
pub const EXPORT_MAX_BYTES: usize = 32 << 20;
const NEXT_AFTER_HOP: HeaderName = HeaderName::from_static("x-signet-next-after-hop");

/// The receipts of the reader's trace: a tenant reads its own (`?tenant=`, if given, must be
/// itself), an auditor names the tenant. Another tenant's trace of that id is another chain,
/// never this one.
async fn readable_chain(
    cp: &ControlPlane,
    reader: &ChainReader,
    tenant: Option<String>,
    trace_id: &str,
    page: ChainPage,
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
    let chain = cp.storage.chain(&tenant, trace_id, page).await;
    timer.done();
    chain.map_err(HttpError::storage)?.ok_or_else(not_found)
}

pub async fn chain(
    State(cp): AppState,
    TraceId(trace_id): TraceId,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<ChainQuery>>,
) -> Result<Response, HttpError> {
    let limit = query.limit.unwrap_or(CHAIN_PAGE_DEFAULT);
    if !(1..=CHAIN_PAGE_MAX).contains(&limit) {
        return Err(HttpError::new(
            Code::BadRequest,
            format!("limit must be 1 to {CHAIN_PAGE_MAX}"),
        ));
    }
    let page = ChainPage {
        after_hop: query.after_hop,
        limit,
        max_bytes: CHAIN_PAGE_MAX_BYTES,
    };
    let chain = readable_chain(&cp, &reader, query.tenant, &trace_id, page).await?;
    let next = chain
        .more
        .then(|| chain.receipts.last().and_then(|r| r["hop"].as_u64()))
        .flatten();
    let mut response = Json(Value::Array(chain.receipts)).into_response();
    if let Some(hop) = next {
        response
            .headers_mut()
            .insert(NEXT_AFTER_HOP, HeaderValue::from(hop));
    }
    Ok(response)
}

pub async fn export(
    State(cp): AppState,
    TraceId(trace_id): TraceId,
    reader: ChainReader,
    Parsed(Query(query)): Parsed<Query<ChainQuery>>,
) -> Result<Response, HttpError> {
    let page = ChainPage {
        max_bytes: EXPORT_MAX_BYTES,
        ..ChainPage::ALL
    };
    let chain = readable_chain(&cp, &reader, query.tenant, &trace_id, page).await?;
    if chain.more {
        return Err(HttpError::new(
            Code::BodyTooLarge,
            format!(
                "the chain is over the export limit of {} MiB; read it page by page from /v1/receipts/chain",
                EXPORT_MAX_BYTES >> 20
            ),
        ));
    }
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
