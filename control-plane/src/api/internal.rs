//! `/v1/internal/*`: the filter's callouts (docs/ARCHITECTURE.md, internal API). Every call
//! presents `X-SIGNET-Filter-Token`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use signet_protocol::{receipt, time, trace};

use super::{header, json_response, parse_body, HttpError, RawBody, State as AppState};
use crate::storage::{CommitOutcome, CommitRequest};
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
    count_error(cp, &e);
    e.into_response()
}

fn count_error(cp: &ControlPlane, e: &HttpError) {
    cp.metrics.error(e.code());
    if e.code() == "CHAIN_CONFLICT" {
        cp.metrics.chain_conflicts.inc();
    }
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

/// One commit as the filter sends it. The response is kept as the JSON text it came in: it is
/// stored and answered verbatim, never rebuilt as a tree (it holds the normalized payload).
#[derive(Deserialize)]
struct CommitBody {
    tenant: String,
    idempotency_key: String,
    fingerprint: String,
    receipt: Value,
    response: Box<RawValue>,
    #[serde(default)]
    fu_tokens: u64,
}

impl CommitBody {
    /// The tenant must exist and the key, fingerprint and response be well-formed.
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
        // Valid JSON (the parser checked), so an object is exactly what starts with '{'.
        if !self.response.get().starts_with('{') {
            return Err(HttpError::bad_request(
                "BAD_REQUEST",
                "response must be a JSON object",
            ));
        }
        Ok(())
    }
}

fn receipt_invalid(detail: impl std::fmt::Display) -> HttpError {
    HttpError::bad_request("RECEIPT_INVALID", format!("receipt rejected: {detail}"))
}

/// A batch of commits from one filter worker (its exchanges of one round trip). Each commit is
/// parsed on its own, so that a malformed one fails alone.
#[derive(Deserialize)]
struct CommitBatch {
    commits: Vec<Box<RawValue>>,
}

/// `POST /v1/internal/commits`: each commit is decided on its own, as if it came alone; they
/// run concurrently so that storage writes them in one transaction. The answer lists each
/// commit's status and body in order.
pub async fn commits(State(cp): AppState, headers: HeaderMap, body: RawBody) -> Response {
    let batch = authorize(&cp, &headers).and_then(|()| parse_body::<CommitBatch>(&body));
    let batch = match batch {
        Ok(b) if !b.commits.is_empty() => b,
        Ok(_) => {
            let e = HttpError::bad_request("BAD_REQUEST", "commits must not be empty");
            return fail(&cp, e);
        }
        Err(e) => return fail(&cp, e),
    };
    cp.metrics
        .commit_batch_size
        .observe(batch.commits.len() as f64);
    let results = futures_util::future::join_all(batch.commits.iter().map(|item| {
        let cp = &cp;
        async move {
            let req = serde_json::from_str::<CommitBody>(item.get())
                .map_err(|e| HttpError::bad_request("BAD_REQUEST", format!("invalid commit: {e}")));
            let outcome = match req {
                Ok(req) => commit_one(cp, req).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(reply) => (200, reply),
                Err(e) => {
                    count_error(cp, &e);
                    (e.status(), e.to_json().to_string())
                }
            }
        }
    }))
    .await;
    // Written by hand: every body is already JSON text.
    let mut out = String::from(r#"{"results":["#);
    for (i, (status, body)) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"status":{status},"body":{body}}}"#));
    }
    out.push_str("]}");
    json_response(StatusCode::OK, out)
}

/// One commit: validated, its receipt verified, then stored (or replayed, or rejected). The
/// answer is the 200 body as JSON text.
async fn commit_one(cp: &ControlPlane, req: CommitBody) -> Result<String, HttpError> {
    req.validate(cp)?;
    let r = req
        .receipt
        .as_object()
        .ok_or_else(|| receipt_invalid("not an object"))?;
    let text = |name: &str| r.get(name).and_then(Value::as_str);
    let trace_id = text("trace_id")
        .filter(|t| trace::is_valid_trace_id(t))
        .ok_or_else(|| {
            HttpError::bad_request(
                "TRACE_ID_INVALID",
                "the receipt's trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
            )
        })?
        .to_owned();
    // Hash, signature (kid in our JWKS), cid/canon and shape, by the protocol crate.
    receipt::verify(&req.receipt, Some(cp.keys.jwks()), true).map_err(receipt_invalid)?;
    if text("tenant") != Some(req.tenant.as_str()) {
        return Err(receipt_invalid("its tenant is not the caller's tenant"));
    }
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
    let plan = cp.tenants().plan(&req.tenant).unwrap_or_default();

    let now = now_ms();
    let month = time::rfc3339_millis(now.max(0) as u64)[..7].to_owned();
    let fu_tokens = req.fu_tokens;
    let response: Arc<str> = Arc::from(Box::<str>::from(req.response));
    let timer = cp.metrics.time("commit");
    let outcome = cp
        .storage
        .commit(CommitRequest {
            tenant: req.tenant,
            idempotency_key: req.idempotency_key,
            fingerprint: req.fingerprint,
            trace_id,
            hop,
            receipt_hash,
            prev_receipt_hash,
            receipt: req.receipt.to_string(),
            response,
            fu_tokens,
            month,
            now_ms: now,
            chain_max: cp.chain_max,
            plan,
        })
        .await;
    timer.done();
    match outcome.map_err(HttpError::storage)? {
        CommitOutcome::Committed => {
            cp.metrics.commits.inc();
            cp.metrics.vex.inc();
            cp.metrics.fu.inc_by(fu_tokens);
            // the filter answers with the response it sent: no need to echo it
            Ok(r#"{"outcome":"committed"}"#.to_owned())
        }
        CommitOutcome::Replay { response } => {
            cp.metrics.idempotent_hits.inc();
            Ok(format!(r#"{{"outcome":"replay","response":{response}}}"#))
        }
        CommitOutcome::Rejected(r) => Err(HttpError::rejection(r)),
    }
}
