//! The forward stage (SPEC §5): after HEL allows `forward_url` and before the receipt is signed,
//! the control plane delivers the normalized payload (`POST /v1/internal/forward`) and answers
//! the first attempt's outcome, which goes into the receipt's `forwarded` member and the 200
//! body. A refusal after resolution (`HEL_RESOLVED_*`, `HEL_NO_RESOLUTION`,
//! `HEL_RESOLUTION_FAILED`) is the exchange's 403; a failed attempt is not (the control plane
//! retries it; the receipt says how the first attempt went).

use serde_json::Value;
use signet_protocol::internal::forward::{ForwardReply, ForwardRequest};
use signet_protocol::internal::{Code, Head};
use signet_protocol::{canonical, ApiError};

use super::actions::{callout, Call, Callout};
use super::reply::{control_plane_error, Reply};
use super::verify::Verified;
use crate::config::Config;
use crate::host::{stats, Host};
use crate::policy::Allowed;

/// What the exchange knows when it asks for the delivery.
pub struct Ask<'a> {
    pub tenant: &'a str,
    pub idempotency_key: &'a str,
    pub fingerprint: &'a str,
    pub verified: &'a Verified,
    pub allowed: &'a Allowed,
    /// The head the receipt will be signed on, as this worker knows it.
    pub head: Option<&'a Head>,
    pub now_ms: u64,
}

/// The forward callout, or why there can be none.
pub fn ask(config: &Config, ask: &Ask) -> Result<Callout, ApiError> {
    let request = ForwardRequest {
        // the tenant as receipts (and deliveries) name it
        tenant: canonical::nfc(ask.tenant).into_owned(),
        idempotency_key: ask.idempotency_key.to_owned(),
        fingerprint: ask.fingerprint.to_owned(),
        url: ask.allowed.url.clone(),
        trace_id: ask.verified.trace_id.clone(),
        hop: ask.head.map_or(1, |h| h.hop.saturating_add(1)),
        prev_receipt_hash: ask.head.map(|h| h.receipt_hash.clone()),
        cid: ask.verified.cid.clone(),
        canon: ask.verified.canon.clone(),
        deadline_ms: Some(
            ask.now_ms
                .saturating_add(config.control_plane.forward_timeout_ms),
        ),
    };
    let body = serde_json::to_vec(&request)
        .map_err(|e| ApiError::new(500, "INTERNAL", format!("forward request: {e}")))?;
    Ok(callout(config, Call::Forward, Some(body), Vec::new()))
}

/// The receipt's `forwarded` from the control plane's answer.
pub fn outcome(host: &mut dyn Host, reply: Reply) -> Result<Value, ApiError> {
    match reply {
        Reply::Ok(body) => {
            let reply: ForwardReply = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    502,
                    "FORWARD_FAILED",
                    format!("forward answer unreadable: {e}"),
                )
            })?;
            serde_json::to_value(&reply.forwarded)
                .map_err(|e| ApiError::new(500, "INTERNAL", e.to_string()))
        }
        Reply::Error(status, e) => {
            let denial = Code::parse(&e.code).is_some_and(|c| c.as_str().starts_with("HEL_"));
            if denial {
                host.count(&stats::denials(&e.code));
            }
            Err(control_plane_error(host, status, e))
        }
    }
}
