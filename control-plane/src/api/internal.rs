//! `/v1/internal/*`: the filter's callouts (docs/ARCHITECTURE.md, internal API), their messages
//! those of `signet_protocol::internal`. Every call presents the filter token ([`FilterAuth`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use signet_protocol::internal::tenant::KEY_HASH_HEADER;
use signet_protocol::internal::{
    idempotency, repair, Code, Commit, CommitBatch, CommitReply, CommitResult, CommitResults,
    ErrorReply,
};
use signet_protocol::{cid, receipt, time, trace};

use super::extract::{header, Body, FilterAuth};
use super::{HttpError, State as AppState};
use crate::billing::MAX_FU_TOKENS;
use crate::storage::{CommitOutcome, CommitRequest, StoreError};
use crate::{now_ms, strict_json, ControlPlane};

/// `GET /v1/internal/health`: the public `/healthz`, for the filter's own view (`/healthz`
/// through Envoy): that it reaches this listener with a token this control plane accepts.
pub async fn health(state: AppState, _: FilterAuth) -> Response {
    super::public::healthz(state).await
}

/// `GET /v1/internal/tenant`: the `Grant` of the API key whose hash the filter sends.
pub async fn tenant(
    State(cp): AppState,
    _: FilterAuth,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let grant = header(&headers, &[KEY_HASH_HEADER])
        .and_then(|h| cp.tenants().grant_for_key_hash(h.trim()));
    match grant {
        Some(grant) => Ok(Json(&*grant).into_response()),
        None => Err(HttpError::new(Code::UnknownApiKey, "unknown API key")),
    }
}

/// `POST /v1/internal/idempotency`: the stored answer of a committed (tenant, key), so that the
/// filter answers a replay with it even when it would refuse the request now (SPEC §4); 404
/// `IDEMPOTENCY_KEY_UNKNOWN` for a key never committed or past the retention.
pub async fn idempotency(
    State(cp): AppState,
    _: FilterAuth,
    body: Body,
) -> Result<Response, HttpError> {
    let lookup: idempotency::Lookup = body.parse()?;
    let timer = cp.metrics.time("idempotency");
    let record = cp
        .storage
        .idempotency_record(&lookup.tenant, &lookup.idempotency_key)
        .await;
    timer.done();
    let record = record.map_err(HttpError::storage)?.ok_or_else(|| {
        HttpError::new(
            Code::IdempotencyKeyUnknown,
            "no committed request has this idempotency key",
        )
    })?;
    let response: Box<RawValue> = serde_json::from_str(&record.response)
        .map_err(|e| HttpError::storage(StoreError::Corrupt(format!("response: {e}"))))?;
    let stored = idempotency::Stored {
        fingerprint: record.fingerprint.into(),
        response: &response,
    };
    Ok(Json(stored).into_response())
}

/// `POST /v1/internal/repair`: the LLM fallback (`crate::fallback`).
pub async fn repair(State(cp): AppState, _: FilterAuth, body: Body) -> Result<Response, HttpError> {
    let request: repair::RepairRequest = body.parse()?;
    let request = repair::RepairRequest {
        tenant: request.tenant.into_owned().into(),
        idempotency_key: request.idempotency_key.into_owned().into(),
        payload_type: request.payload_type.into_owned().into(),
        location: request.location.into_owned().into(),
        text: request.text.into_owned().into(),
        schema: request.schema,
    };
    let repaired = crate::fallback::repair(cp, request).await?;
    Ok(Json(repaired).into_response())
}

/// `POST /v1/internal/commits`: each commit of the batch is decided on its own, as if it came
/// alone; they run concurrently so that storage writes them in one transaction. The answer
/// lists each commit's status and body in order.
pub async fn commits(
    State(cp): AppState,
    _: FilterAuth,
    body: Body,
) -> Result<Response, HttpError> {
    let batch: CommitBatch = body.parse_envelope()?;
    if batch.commits.is_empty() {
        return Err(HttpError::new(
            Code::BadRequest,
            "commits must not be empty",
        ));
    }
    cp.metrics
        .commit_batch_size
        .observe(batch.commits.len() as f64);
    // Every commit is checked (the CPU: parse, verify) before any reaches storage, so that
    // their writes arrive together and storage groups them into one transaction; checking
    // each just before its write let the SQLite writer start a transaction per commit.
    let prepared: Vec<_> = batch
        .commits
        .iter()
        .map(|item| prepare(&cp, item))
        .collect();
    let outcomes = futures_util::future::join_all(
        prepared
            .into_iter()
            .map(|prepared| async { store(&cp, prepared?).await }),
    )
    .await;
    let results = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(accepted) => CommitResult {
                status: 200,
                body: Answer::Reply(accepted.reply()),
            },
            Err(e) => {
                // inside a 200 answer: the middleware does not see it
                cp.metrics.error(e.code());
                CommitResult {
                    status: e.code().status(),
                    body: Answer::Error(e.reply()),
                }
            }
        })
        .collect();
    Ok(Json(CommitResults { results }).into_response())
}

/// A commit answered 200.
enum Accepted {
    Committed,
    /// The stored response of the key's earlier commit.
    Replay(Box<RawValue>),
}

impl Accepted {
    fn reply(&self) -> CommitReply<'_> {
        match self {
            // the filter answers with the response it sent: no need to echo it
            Accepted::Committed => CommitReply::committed(),
            Accepted::Replay(response) => CommitReply::replay(response),
        }
    }
}

/// A commit's body in the batch answer.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer<'a> {
    Reply(CommitReply<'a>),
    Error(&'a ErrorReply),
}

/// A commit that passed every check that needs no stored state: what storage decides on.
struct Prepared {
    request: CommitRequest,
    /// A forwarded exchange: its delivery's retries carry the committed receipt.
    forwarded: bool,
}

/// One commit parsed, validated and its receipt verified: ready for [`store`].
fn prepare(cp: &ControlPlane, item: &RawValue) -> Result<Prepared, HttpError> {
    let invalid_commit = |e: &dyn std::fmt::Display| {
        HttpError::new(Code::BadRequest, format!("invalid commit: {e}"))
    };
    strict_json(item.get().as_bytes()).map_err(|e| invalid_commit(&e))?;
    let commit: Commit = serde_json::from_str(item.get()).map_err(|e| invalid_commit(&e))?;
    // The filter has answered its client with an error by now: storing the receipt would
    // leave a VEx for a request the client saw fail.
    if commit
        .deadline_ms
        .is_some_and(|deadline| now_ms().max(0) as u64 > deadline)
    {
        return Err(HttpError::new(
            Code::CommitExpired,
            "the commit arrived after its deadline_ms; nothing was stored",
        ));
    }
    validate(cp, &commit)?;
    let r = commit
        .receipt
        .as_object()
        .ok_or_else(|| receipt_invalid("not an object"))?;
    let text = |name: &str| r.get(name).and_then(Value::as_str);
    let trace_id = text("trace_id")
        .filter(|t| trace::is_valid_trace_id(t))
        .ok_or_else(|| {
            HttpError::new(
                Code::BadTraceId,
                "the receipt's trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
            )
        })?
        .to_owned();
    // Hash, signature (kid in our JWKS), cid/canon and the SR-1 member formats (ts, tenant,
    // cid and hash forms, algo, policy, typed extensions), by the protocol crate.
    receipt::verify(&commit.receipt, Some(cp.keys.jwks()), true).map_err(receipt_invalid)?;
    if text("tenant") != Some(&*commit.tenant) {
        return Err(receipt_invalid("its tenant is not the caller's tenant"));
    }
    let hop = r.get("hop").and_then(Value::as_u64).filter(|h| *h >= 1);
    let hop = hop.ok_or_else(|| receipt_invalid("hop is not an integer >= 1"))?;
    may_commit(cp, r, hop, commit.fu_tokens)?;
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
    let plan = cp.tenants().plan(&commit.tenant).unwrap_or_default();

    let now = now_ms();
    let month = time::rfc3339_millis(now.max(0) as u64)[..7].to_owned();
    let forwarded = r.contains_key("forwarded");
    Ok(Prepared {
        request: CommitRequest {
            tenant: commit.tenant.into_owned(),
            idempotency_key: commit.idempotency_key.into_owned(),
            fingerprint: commit.fingerprint.into_owned(),
            trace_id,
            hop,
            receipt_hash,
            prev_receipt_hash,
            receipt: commit.receipt.to_string(),
            response: Arc::from(commit.response.get()),
            // FU are metered by /v1/internal/repair, once per provider call; the receipt's
            // fu_tokens states them and counts nothing a second time here.
            fu_tokens: 0,
            month,
            now_ms: now,
            deadline_ms: commit.deadline_ms,
            chain_max: cp.chain_max,
            plan,
        },
        forwarded,
    })
}

/// A prepared commit stored (or replayed, or rejected by what is stored).
async fn store(cp: &ControlPlane, prepared: Prepared) -> Result<Accepted, HttpError> {
    let Prepared { request, forwarded } = prepared;
    // what linking the delivery needs, kept before storage takes the request
    let link = forwarded.then(|| {
        let r = &request;
        (
            r.tenant.clone(),
            r.idempotency_key.clone(),
            r.hop,
            r.receipt_hash.clone(),
        )
    });
    let timer = cp.metrics.time("commit");
    let outcome = cp.storage.commit(request).await;
    timer.done();
    match outcome.map_err(HttpError::storage)? {
        CommitOutcome::Committed => {
            if let Some((tenant, key, hop, hash)) = link {
                if let Err(e) = cp
                    .storage
                    .forward_link_receipt(&tenant, &key, hop, &hash)
                    .await
                {
                    tracing::warn!("linking a delivery to its receipt: {e}");
                }
            }
            cp.metrics.commits.inc();
            cp.metrics.vex.inc();
            Ok(Accepted::Committed)
        }
        CommitOutcome::Replay { response } => {
            cp.metrics.idempotent_hits.inc();
            let response = serde_json::from_str(&response)
                .map_err(|e| HttpError::storage(StoreError::Corrupt(format!("response: {e}"))))?;
            Ok(Accepted::Replay(response))
        }
        CommitOutcome::Rejected(r) => Err(r.into()),
        CommitOutcome::Expired => Err(HttpError::new(
            Code::CommitExpired,
            "the commit arrived after its deadline; nothing was stored",
        )),
        CommitOutcome::CounterOverflow => Err(HttpError::new(
            Code::BadRequest,
            "fu_tokens would overflow the month's counters; nothing was stored",
        )),
    }
}

/// The tenant must exist and the key, fingerprint and response be well-formed.
fn validate(cp: &ControlPlane, commit: &Commit) -> Result<(), HttpError> {
    if cp.tenants().plan(&commit.tenant).is_none() {
        return Err(HttpError::new(Code::UnknownTenant, "unknown tenant"));
    }
    if commit.idempotency_key.is_empty() || commit.idempotency_key.len() > 256 {
        return Err(HttpError::new(
            Code::IdempotencyKeyInvalid,
            "the idempotency key must be 1 to 256 bytes",
        ));
    }
    if !cid::is_cid(&commit.fingerprint) {
        return Err(HttpError::new(
            Code::FingerprintInvalid,
            "the fingerprint must be sha256: and 64 lowercase hex digits",
        ));
    }
    // Valid JSON (the parser checked), so an object is exactly what starts with '{'.
    if !commit.response.get().starts_with('{') {
        return Err(HttpError::new(
            Code::BadRequest,
            "response must be a JSON object",
        ));
    }
    Ok(())
}

/// What the verifier cannot know: whether this receipt may be committed *now*. Signed with the
/// current kid (earlier kids stay in the JWKS to verify old receipts, never to sign new ones),
/// `ts` within `SP_RECEIPT_MAX_SKEW_SECS` of this clock, `hop` within `SP_CHAIN_MAX` (the one
/// past it is left to the decision, which answers `CHAIN_FULL`), fallback units within
/// [`MAX_FU_TOKENS`] (so that no counter or amount of billing can overflow).
fn may_commit(
    cp: &ControlPlane,
    r: &serde_json::Map<String, Value>,
    hop: u64,
    fu_tokens: u64,
) -> Result<(), HttpError> {
    let current = cp.keys.signing_key().kid();
    let kid = r.get("kid").and_then(Value::as_str).unwrap_or_default();
    if kid != current {
        return Err(receipt_invalid(format!(
            "kid {kid:?} is not the current signing key {current:?}; earlier kids only verify receipts signed before"
        )));
    }
    let ts = r.get("ts").and_then(Value::as_str).unwrap_or_default();
    let skew = cp.receipt_max_skew.as_millis() as u64;
    let now = now_ms().max(0) as u64;
    match time::parse_rfc3339_utc(ts) {
        Some(at) if at.abs_diff(now) <= skew => {}
        _ => {
            return Err(receipt_invalid(format!(
            "ts {ts:?} is more than {} s from the control plane's clock (SP_RECEIPT_MAX_SKEW_SECS)",
            skew / 1000
        )))
        }
    }
    if hop > cp.chain_max.saturating_add(1) {
        return Err(receipt_invalid(format!(
            "hop {hop} is beyond SP_CHAIN_MAX ({})",
            cp.chain_max
        )));
    }
    let signed_fu = r.get("fu_tokens").and_then(Value::as_u64).unwrap_or(0);
    if fu_tokens > MAX_FU_TOKENS || signed_fu > MAX_FU_TOKENS {
        return Err(receipt_invalid(format!(
            "fu_tokens above {MAX_FU_TOKENS}, the bound of one exchange"
        )));
    }
    Ok(())
}

fn receipt_invalid(detail: impl std::fmt::Display) -> HttpError {
    HttpError::new(Code::ReceiptInvalid, format!("receipt rejected: {detail}"))
}
