//! sanitize → normalize (validate, repair, invariants, transform, validate) → HEL → canonical
//! form: what the receipt commits to.

use serde_json::Value;
use signet_protocol::canonical::{self, Profile};
use signet_protocol::internal::Grant;
use signet_protocol::{cid, ApiError};

use super::request::Request;
use crate::config::Config;
use crate::host::{stats, Host};
use crate::policy;
use crate::registry::{FallbackNeed, Fix, Outcome};
use crate::sanitize::sanitize;

/// The verified payload; kept to re-sign on a chain conflict and for an inline route's body.
pub struct Verified {
    pub trace_id: String,
    pub normalized: Value,
    pub canon: String,
    pub cid: String,
    /// The `forward_url` HEL allowed: the exchange delivers before it signs
    /// (`pipeline/forward.rs`).
    pub forward: Option<policy::Allowed>,
    /// FU of the LLM-fallback repairs it needed (`None`: none was needed).
    pub fallback_fu: Option<u64>,
}

/// What [`verify_with`] ends with.
pub enum Verdict {
    Verified(Verified),
    /// An embedded text needs the LLM fallback; the request holds its payload again.
    NeedsFallback(Box<FallbackNeed>),
}

/// Verifies the request's payload (taking it out of `request`), with the LLM fallback's
/// `fixes` so far; with `fallback` (the grant's
/// `fallback_enabled`), an embedded text that neither deterministic repair nor `fixes` repairs
/// is answered as [`Verdict::NeedsFallback`] (the exchange's repair stage asks the control
/// plane, then verifies again with the fix).
pub fn verify_with(
    host: &mut dyn Host,
    config: &Config,
    grant: &Grant,
    request: &mut Request,
    fixes: &[Fix],
    fallback: bool,
) -> Result<Verdict, ApiError> {
    let mut payload = std::mem::take(&mut request.payload);
    sanitize(&mut payload);
    // kept to verify again once the fallback answers (sanitize is idempotent)
    let kept = fallback.then(|| payload.clone());
    let outcome = config.registry.normalize_with(
        &request.payload_type,
        &request.target_type,
        payload,
        fixes,
        fallback,
    )?;
    let normalized = match outcome {
        Outcome::Normalized(normalized) => normalized,
        Outcome::NeedsFallback(need) => {
            request.payload = kept.unwrap_or_default();
            return Ok(Verdict::NeedsFallback(need));
        }
    };
    for _ in 0..normalized.repairs {
        host.count(stats::REPAIRS);
    }
    let forward = match &request.forward_url {
        None => None,
        Some(url) => match policy::evaluate(url, &grant.allowlist, &config.global_allowlist) {
            Err(denial) => {
                host.count(&stats::denials(denial.reason()));
                return Err(ApiError::new(403, denial.reason(), denial.detail()));
            }
            // delivered by the control plane before signing (Stage::Forwarding)
            Ok(allowed) => Some(allowed),
        },
    };
    let canon = canonical::to_canonical(&normalized.value, Profile::Signet)
        .map_err(|e| ApiError::new(500, "INTERNAL", format!("cannot canonicalize: {e}")))?;
    let trace_id = match &request.trace_id {
        Some(t) => t.clone(),
        None => format!("sig-{}", host.random_hex(8)),
    };
    Ok(Verdict::Verified(Verified {
        trace_id,
        cid: cid::cid(canon.as_bytes()),
        canon,
        normalized: normalized.value,
        forward,
        fallback_fu: None,
    }))
}
