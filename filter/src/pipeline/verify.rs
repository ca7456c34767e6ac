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
}

/// Verifies the request's payload (taking it out of `request`).
pub fn verify(
    host: &mut dyn Host,
    config: &Config,
    grant: &Grant,
    request: &mut Request,
) -> Result<Verified, ApiError> {
    let mut payload = std::mem::take(&mut request.payload);
    sanitize(&mut payload);
    // An LLM-fallback repair slots in inside normalize: when deterministic repair fails (and
    // the grant has `fallback_enabled`), the exchange enters a repair stage whose callout's
    // answer resumes at transform (see `Stage` in exchange.rs).
    let normalized =
        config
            .registry
            .normalize(&request.payload_type, &request.target_type, payload)?;
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
    Ok(Verified {
        trace_id,
        cid: cid::cid(canon.as_bytes()),
        canon,
        normalized: normalized.value,
        forward,
    })
}
