//! `/v1/internal/*`: the filter's callouts (docs/ARCHITECTURE.md, internal API). Every call
//! presents `X-SIGNET-Filter-Token`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use signet_protocol::{receipt, time, trace};

use super::{header, parse_body, HttpError, RawBody, State as AppState};
use crate::storage::{BeginOutcome, BeginRequest, CommitOutcome, CommitRequest};
use crate::{now_ms, ControlPlane};

fn authorize(cp: &ControlPlane, headers: &HeaderMap) -> Result<(), HttpError> {
    match header(headers, &["x-signet-filter-token"]) {
        Some(token) if cp.is_filter_token(token) => Ok(()),
        _ => Err(HttpError::new(
            401,
            "FILTER_UNAUTHORIZED",
            "missing or wrong filter token",
        )),
    }
}

/// Records the error in the metrics on its way out.
fn fail(cp: &ControlPlane, e: HttpError) -> Response {
    cp.metrics.error(e.code());
    if e.code() == "CHAIN_CONFLICT" {
        cp.metrics.chain_conflicts.inc();
    }
    e.into_response()
}

pub async fn tenant(State(cp): AppState, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&cp, &headers) {
        return fail(&cp, e);
    }
    let grant = header(&headers, &["x-signet-key-hash"])
        .and_then(|h| cp.tenants().grant_for_key_hash(h.trim()));
    match grant {
        Some(g) => Json(json!({
            "tenant": g.tenant,
            "allowlist": g.allowlist,
            "fallback_enabled": g.fallback_enabled,
            "fu_monthly_limit": g.fu_monthly_limit,
        }))
        .into_response(),
        None => fail(
            &cp,
            HttpError::new(401, "UNKNOWN_API_KEY", "unknown API key"),
        ),
    }
}

#[derive(Deserialize)]
struct KeyRef {
    tenant: String,
    idempotency_key: String,
    fingerprint: String,
}

impl KeyRef {
    /// The tenant must exist and the key and fingerprint be well-formed.
    fn validate(&self, cp: &ControlPlane) -> Result<(), HttpError> {
        if cp.tenants().plan(&self.tenant).is_none() {
            return Err(HttpError::new(403, "UNKNOWN_TENANT", "unknown tenant"));
        }
        if self.idempotency_key.is_empty() || self.idempotency_key.len() > 256 {
            return Err(HttpError::bad_request(
                "IDEMPOTENCY_KEY_INVALID",
                "the idempotency key must be 1 to 256 bytes",
            ));
        }
        let hex = self.fingerprint.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(HttpError::bad_request(
                "FINGERPRINT_INVALID",
                "the fingerprint must be sha256: and 64 lowercase hex digits",
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct BeginBody {
    #[serde(flatten)]
    key: KeyRef,
    #[serde(default)]
    trace_id: Option<String>,
}

pub async fn begin(State(cp): AppState, headers: HeaderMap, body: RawBody) -> Response {
    match begin_inner(&cp, &headers, &body).await {
        Ok(r) => r,
        Err(e) => fail(&cp, e),
    }
}

async fn begin_inner(
    cp: &ControlPlane,
    headers: &HeaderMap,
    body: &RawBody,
) -> Result<Response, HttpError> {
    authorize(cp, headers)?;
    let req: BeginBody = parse_body(body)?;
    req.key.validate(cp)?;
    if let Some(t) = &req.trace_id {
        if !trace::is_valid_trace_id(t) {
            return Err(HttpError::bad_request(
                "TRACE_ID_INVALID",
                "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
            ));
        }
    }
    let timer = cp.metrics.time("begin");
    let outcome = cp
        .storage
        .begin(BeginRequest {
            tenant: req.key.tenant,
            idempotency_key: req.key.idempotency_key,
            fingerprint: req.key.fingerprint,
            trace_id: req.trace_id,
            now_ms: now_ms(),
            lease_ms: cp.lease_ms,
            chain_max: cp.chain_max,
        })
        .await;
    timer.done();
    match outcome.map_err(HttpError::storage)? {
        BeginOutcome::Proceed { head } => {
            Ok(Json(json!({"outcome": "proceed", "head": head})).into_response())
        }
        BeginOutcome::Replay { response } => Ok(replay(cp, "begin", response)),
        BeginOutcome::Rejected(r) => Err(HttpError::rejection(r)),
    }
}

#[derive(Deserialize)]
struct CommitBody {
    #[serde(flatten)]
    key: KeyRef,
    receipt: Value,
    response: Value,
    #[serde(default)]
    fu_tokens: u64,
}

pub async fn commit(State(cp): AppState, headers: HeaderMap, body: RawBody) -> Response {
    match commit_inner(&cp, &headers, &body).await {
        Ok(r) => r,
        Err(e) => fail(&cp, e),
    }
}

fn receipt_invalid(detail: impl std::fmt::Display) -> HttpError {
    HttpError::bad_request("RECEIPT_INVALID", format!("receipt rejected: {detail}"))
}

async fn commit_inner(
    cp: &ControlPlane,
    headers: &HeaderMap,
    body: &RawBody,
) -> Result<Response, HttpError> {
    authorize(cp, headers)?;
    let req: CommitBody = parse_body(body)?;
    req.key.validate(cp)?;
    if !req.response.is_object() {
        return Err(HttpError::bad_request(
            "BAD_REQUEST",
            "response must be a JSON object",
        ));
    }
    // Hash, signature (kid in our JWKS), cid/canon and shape, by the protocol crate.
    receipt::verify(&req.receipt, Some(cp.keys.jwks()), true).map_err(receipt_invalid)?;
    let r = req
        .receipt
        .as_object()
        .ok_or_else(|| receipt_invalid("not an object"))?;
    let text = |name: &str| r.get(name).and_then(Value::as_str);
    if text("tenant") != Some(req.key.tenant.as_str()) {
        return Err(receipt_invalid("its tenant is not the caller's tenant"));
    }
    let trace_id = text("trace_id").filter(|t| trace::is_valid_trace_id(t));
    let trace_id = trace_id
        .ok_or_else(|| receipt_invalid("trace_id is not valid"))?
        .to_owned();
    let hop = r.get("hop").and_then(Value::as_u64).filter(|h| *h >= 1);
    let hop = hop.ok_or_else(|| receipt_invalid("hop is not an integer >= 1"))?;
    let prev_receipt_hash = match r.get("prev_receipt_hash") {
        Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        _ => {
            return Err(receipt_invalid(
                "prev_receipt_hash is neither null nor a string",
            ))
        }
    };
    let receipt_hash = text("receipt_hash")
        .ok_or_else(|| receipt_invalid("receipt_hash missing"))?
        .to_owned();
    let plan = cp.tenants().plan(&req.key.tenant).unwrap_or_default();

    let now = now_ms();
    let month = time::rfc3339_millis(now.max(0) as u64)[..7].to_owned();
    let fu_tokens = req.fu_tokens;
    let timer = cp.metrics.time("commit");
    let outcome = cp
        .storage
        .commit(CommitRequest {
            tenant: req.key.tenant,
            idempotency_key: req.key.idempotency_key,
            fingerprint: req.key.fingerprint,
            trace_id,
            hop,
            receipt_hash,
            prev_receipt_hash,
            receipt: req.receipt.to_string(),
            response_json: req.response.to_string(),
            response: req.response,
            fu_tokens,
            month,
            now_ms: now,
            chain_max: cp.chain_max,
            plan,
        })
        .await;
    timer.done();
    match outcome.map_err(HttpError::storage)? {
        CommitOutcome::Committed { response } => {
            cp.metrics.commits.inc();
            cp.metrics.vex.inc();
            cp.metrics.fu.inc_by(fu_tokens);
            Ok(Json(json!({"outcome": "committed", "response": response})).into_response())
        }
        CommitOutcome::Replay { response } => Ok(replay(cp, "commit", response)),
        CommitOutcome::Rejected(r) => Err(HttpError::rejection(r)),
    }
}

/// The stored response of an idempotency key already done; counted as a hit of `call`.
fn replay(cp: &ControlPlane, call: &'static str, response: Value) -> Response {
    cp.metrics
        .idempotent_hits
        .get_or_create(&crate::metrics::CallLabels { call })
        .inc();
    Json(json!({"outcome": "replay", "response": response})).into_response()
}

pub async fn release(State(cp): AppState, headers: HeaderMap, body: RawBody) -> Response {
    let result = async {
        authorize(&cp, &headers)?;
        let req: KeyRef = parse_body(&body)?;
        req.validate(&cp)?;
        let timer = cp.metrics.time("release");
        let released = cp
            .storage
            .release(&req.tenant, &req.idempotency_key, &req.fingerprint)
            .await;
        timer.done();
        released.map_err(HttpError::storage)
    }
    .await;
    match result {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => fail(&cp, e),
    }
}
