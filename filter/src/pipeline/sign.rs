//! The receipt, signed on a trace head; the SPEC §4 200 body it answers with; the commit that
//! stores both.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use signet_protocol::internal::{Commit, Head};
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{time, ApiError};

use super::actions::CommitJson;
use super::headers::receipt_headers;
use super::request::Request;
use super::verify::Verified;
use crate::config::Config;
use crate::host::Host;
use crate::route::{Mode, RouteSettings};

/// What a receipt is signed over; the same when it is re-signed on another head.
pub struct Subject<'a> {
    pub tenant: &'a str,
    pub idempotency_key: &'a str,
    pub request: &'a Request,
    pub verified: &'a Verified,
    /// The first delivery attempt's outcome, when the request had a `forward_url`.
    pub forwarded: Option<&'a Value>,
}

/// A signed receipt's answer, kept until commit stores it.
pub struct Signed {
    /// The 200 body, as it went in the commit: serialized once, never echoed back.
    pub response: Box<RawValue>,
    pub headers: Vec<(String, String)>,
    /// The trace's head once the receipt is stored.
    pub head: Head,
}

/// The receipt on `head` (hop 1 without one), signed: the commit to queue and the answer to
/// give once it is stored.
pub fn sign(
    host: &mut dyn Host,
    config: &Config,
    route: &RouteSettings,
    subject: &Subject,
    head: Option<Head>,
) -> Result<(CommitJson, Signed), ApiError> {
    let Subject {
        tenant,
        idempotency_key,
        request,
        verified,
        forwarded,
    } = subject;
    let policy = Policy {
        engine: "HEL".into(),
        allowed: true,
        reason: if forwarded.is_some() {
            "ok"
        } else {
            "no_forward"
        }
        .into(),
    };
    // one clock reading: the receipt's ts and the commit's deadline agree
    let now = host.now_millis();
    let mut extensions = Map::new();
    extensions.insert("payload_type".into(), request.payload_type.clone().into());
    extensions.insert("target_type".into(), request.target_type.clone().into());
    if let Some(forwarded) = forwarded {
        extensions.insert("forwarded".into(), (*forwarded).clone());
    }
    if let Some(fu) = verified.fallback_fu {
        extensions.insert("fallback_used".into(), true.into());
        extensions.insert("fu_tokens".into(), fu.into());
    }
    let draft = ReceiptDraft {
        trace_id: verified.trace_id.clone(),
        hop: head.as_ref().map_or(1, |h| h.hop.saturating_add(1)),
        ts: time::rfc3339_millis(now),
        tenant: (*tenant).to_owned(),
        cid: verified.cid.clone(),
        canon: route.keep_canon.then(|| verified.canon.clone()),
        prev_receipt_hash: head.map(|h| h.receipt_hash),
        policy: policy.clone(),
        extensions,
    };
    let receipt = receipt::sign(&draft, &config.signing_key)
        .map_err(|e| internal(format!("cannot sign the receipt: {e}")))?;
    // inline routes that drop `canon` for privacy do not store the payload either
    let normalized =
        (route.mode == Mode::Exchange || route.keep_canon).then(|| verified.normalized.clone());
    let mut response = exchange_response(&receipt, normalized, &policy)?;
    if let (Some(forwarded), Value::Object(body)) = (forwarded, &mut response) {
        body.insert("forwarded".into(), (*forwarded).clone());
    }
    let headers = receipt_headers(&response);
    let response = serde_json::value::to_raw_value(&response).map_err(internal)?;
    let head = Head {
        hop: draft.hop,
        receipt_hash: receipt
            .get("receipt_hash")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    // the tenant as the receipt stores it (NFC), which the control plane checks it against
    let receipt_tenant = receipt.get("tenant").and_then(Value::as_str);
    let receipt_tenant = receipt_tenant.unwrap_or(tenant).to_owned();
    // the filter waits for its batch at most the callout timeout after this (commit_queue.rs)
    let deadline_ms = now.saturating_add(config.control_plane.timeout_ms);
    let commit = Commit {
        tenant: receipt_tenant.into(),
        idempotency_key: (*idempotency_key).into(),
        fingerprint: request.fingerprint.as_str().into(),
        receipt: Value::Object(receipt),
        response: &response,
        // what the receipt states; metered by the repair callout, not by the commit
        fu_tokens: verified.fallback_fu.unwrap_or(0),
        deadline_ms: Some(deadline_ms),
    }
    .to_json()
    .map_err(internal)?;
    let commit = CommitJson(commit, deadline_ms);
    let signed = Signed {
        response,
        headers,
        head,
    };
    Ok((commit, signed))
}

/// The SPEC §4 200 body of an exchange: `{"trace_id","normalized","policy","receipt":{…}}`
/// (`normalized` left out when the route keeps no payload).
pub fn exchange_response(
    receipt: &Map<String, Value>,
    normalized: Option<Value>,
    policy: &Policy,
) -> Result<Value, ApiError> {
    let summary: Map<String, Value> = [
        "ts",
        "cid",
        "receipt_hash",
        "prev_receipt_hash",
        "hop",
        "kid",
        "sig",
    ]
    .iter()
    .filter_map(|&k| receipt.get(k).map(|v| (k.to_owned(), v.clone())))
    .collect();
    let mut response = Map::new();
    if let Some(trace_id) = receipt.get("trace_id") {
        response.insert("trace_id".into(), trace_id.clone());
    }
    if let Some(normalized) = normalized {
        response.insert("normalized".into(), normalized);
    }
    response.insert(
        "policy".into(),
        serde_json::to_value(policy).map_err(internal)?,
    );
    response.insert("receipt".into(), Value::Object(summary));
    Ok(Value::Object(response))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "INTERNAL", e.to_string())
}
