//! The LLM-fallback repair stage's work: the `POST /v1/internal/repair` callout for an embedded
//! text deterministic repair could not fix, and what its answer must pass before the pipeline
//! goes on: strict I-JSON, then the type's semantic invariants against the broken text
//! ([`crate::semantic`]). The schemas are checked by the pipeline itself, which verifies the
//! payload again with the repaired value.
//!
//! The control plane meters the provider's tokens (FU) when it answers; a repair this stage
//! refuses is still metered (the provider was paid), and the receipt of an exchange that used
//! the fallback states `fallback_used: true` and its `fu_tokens`.

use signet_protocol::internal::repair::{RepairRequest, Repaired};
use signet_protocol::internal::{Code, ErrorReply};
use signet_protocol::{canonical, cid, ApiError};

use super::actions::{callout, Call, Callout, CalloutResponse};
use super::reply::control_plane_error;
use crate::config::Config;
use crate::host::Host;
use crate::registry::{nesting_depth, parse_options, FallbackNeed, Fix, MAX_PAYLOAD_DEPTH};
use crate::sanitize::sanitize;
use crate::semantic;

/// Fallback repairs one exchange may ask for (one per broken embedded text).
pub const MAX_REPAIRS: u8 = 4;

/// Envoy stat of each outcome: `signet.fallbacks.outcome.<outcome>`.
pub fn outcome_stat(outcome: &str) -> String {
    format!("signet.fallbacks.outcome.{outcome}")
}

/// The repair's idempotency key: the exchange's key and the text's location, so that a replay
/// of the exchange replays each repair (and meters nothing again); hashed when longer than the
/// control plane accepts.
pub fn repair_key(exchange_key: &str, location: &str) -> String {
    let key = format!("{exchange_key}#{location}");
    if key.len() <= 256 {
        key
    } else {
        cid::cid(key.as_bytes())
    }
}

/// The callout for `need`.
pub fn repair_callout(
    config: &Config,
    tenant: &str,
    exchange_key: &str,
    payload_type: &str,
    need: &FallbackNeed,
) -> Result<Callout, ApiError> {
    let request = RepairRequest {
        tenant: tenant.into(),
        idempotency_key: repair_key(exchange_key, &need.location).into(),
        payload_type: payload_type.into(),
        location: need.location.as_str().into(),
        text: need.text.as_str().into(),
        schema: need.schema.clone(),
    };
    let body = serde_json::to_vec(&request)
        .map_err(|e| ApiError::new(500, "INTERNAL", format!("repair request: {e}")))?;
    Ok(callout(config, Call::Repair, Some(body), Vec::new()))
}

/// Why a repair answer does not go on.
pub enum Refusal {
    /// Answer the client with this (the control plane's code, or the invariants').
    Error(ApiError),
    /// The control plane cannot be used (no answer, not its error body).
    Unavailable(String),
}

/// The repair's answer: the fix and its FU, or why not.
pub fn on_repaired(
    host: &mut dyn Host,
    response: CalloutResponse,
    need: &FallbackNeed,
) -> Result<(Fix, u64), Refusal> {
    let Some(status) = response.status else {
        return Err(Refusal::Unavailable(
            "no response (connection failure or reset)".into(),
        ));
    };
    if status != 200 {
        // the fallback's own errors (429 quota, 502/503/504 provider, 422 unusable) are the
        // client's answer, as the control plane words them
        return match serde_json::from_slice::<ErrorReply>(&response.body) {
            Ok(e) if (400..600).contains(&status) && Code::parse(&e.code).is_some() => {
                host.count(&outcome_stat(&e.code.to_ascii_lowercase()));
                Err(Refusal::Error(control_plane_error(host, status, e)))
            }
            _ => Err(Refusal::Unavailable(format!("repair answered {status}"))),
        };
    }
    let repaired: Repaired = serde_json::from_slice(&response.body)
        .map_err(|e| Refusal::Unavailable(format!("repair answer unreadable: {e}")))?;
    let fu = repaired.fu_tokens;
    let invalid = |host: &mut dyn Host, detail: String| {
        host.count(&outcome_stat("invariant_failed"));
        Refusal::Error(ApiError::new(
            422,
            "FALLBACK_INVARIANT_FAILED",
            format!(
                "the LLM repair of {} is refused: {detail} ({fu} FU metered)",
                need.location
            ),
        ))
    };
    let mut value = match canonical::parse(repaired.repaired.as_bytes(), &parse_options()) {
        Ok(value) => value,
        Err(e) => return Err(invalid(host, format!("not strict JSON: {e}"))),
    };
    if nesting_depth(&value) > MAX_PAYLOAD_DEPTH {
        return Err(invalid(
            host,
            format!("nests deeper than {MAX_PAYLOAD_DEPTH} levels"),
        ));
    }
    sanitize(&mut value);
    if let Err(detail) = semantic::check(&need.text, &value, need.invariants.as_deref()) {
        return Err(invalid(host, detail));
    }
    host.count(&outcome_stat(if repaired.replay {
        "replay"
    } else {
        "used"
    }));
    let fix = Fix {
        location: need.location.clone(),
        value,
    };
    Ok((fix, fu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repair_key_names_the_exchange_and_the_place_and_stays_within_256_bytes() {
        assert_eq!(
            repair_key("k-1", "/tool_calls/0/function/arguments"),
            "k-1#/tool_calls/0/function/arguments"
        );
        let long = "k".repeat(256);
        let hashed = repair_key(&long, "/a");
        assert!(hashed.starts_with("sha256:") && hashed.len() <= 256);
        assert_ne!(hashed, repair_key(&long, "/b"));
    }
}
