//! Signed export bundles (SPEC §3).

use serde_json::{Map, Value};

use crate::canonical::{self, CanonError};
use crate::chain;
use crate::cid::cid;
use crate::error::{Rule, VerifyError};
use crate::keys::{Jwks, SigningKey};
use crate::receipt::{malformed, matching_profile, string_member};

/// The members covered by `bundle_cid`.
const SIGNED_MEMBERS: [&str; 3] = ["trace_id", "chain", "exported_at"];

/// `{"trace_id","chain","exported_at","bundle_cid","signature","kid"}`: `bundle_cid` is the CID of
/// the canonical `{"trace_id","chain","exported_at"}`, `signature` the standard base64 Ed25519
/// signature of the `bundle_cid` string's UTF-8 bytes.
///
/// `bundle_cid` is computed in `signet-jcs`; receipts made by [`crate::receipt::sign`] hold only
/// NFC strings, so a plain RFC 8785 verifier computes the same CID.
pub fn export(
    trace_id: &str,
    chain: Vec<Value>,
    exported_at: &str,
    key: &SigningKey,
) -> Result<Value, CanonError> {
    let mut bundle = Map::new();
    bundle.insert("trace_id".into(), trace_id.into());
    bundle.insert("chain".into(), Value::Array(chain));
    bundle.insert("exported_at".into(), exported_at.into());
    let bundle_cid = signed_cid(&bundle, canonical::Profile::Signet)?;
    bundle.insert("signature".into(), key.sign(bundle_cid.as_bytes()).into());
    bundle.insert("bundle_cid".into(), bundle_cid.into());
    bundle.insert("kid".into(), key.kid().into());
    Ok(Value::Object(bundle))
}

fn signed_cid(
    bundle: &Map<String, Value>,
    profile: canonical::Profile,
) -> Result<String, CanonError> {
    let bytes =
        canonical::to_canonical_subset(bundle, |name| SIGNED_MEMBERS.contains(&name), profile)?;
    Ok(cid(bytes.as_bytes()))
}

/// Checks `bundle_cid`, the signature with the JWKS key named by `kid` (skipped without a JWKS
/// unless `require_sig`), that the receipts belong to the bundle's trace, and the chain itself
/// ([`chain::verify`]).
pub fn verify(bundle: &Value, jwks: Option<&Jwks>, require_sig: bool) -> Result<(), VerifyError> {
    let bundle = bundle
        .as_object()
        .ok_or_else(|| malformed("bundle is not a JSON object"))?;
    let trace_id = string_member(bundle, "trace_id")?;
    let receipts = bundle
        .get("chain")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("chain is missing or not an array"))?;
    string_member(bundle, "exported_at")?;
    let claimed_cid = string_member(bundle, "bundle_cid")?;
    let signature = string_member(bundle, "signature")?;
    let kid = string_member(bundle, "kid")?;

    if matching_profile(claimed_cid, |profile| signed_cid(bundle, profile))?.is_none() {
        return Err(VerifyError::new(
            Rule::BundleCid,
            "bundle_cid is not the CID of {trace_id, chain, exported_at}",
        ));
    }
    match jwks {
        Some(jwks) => jwks
            .verify(kid, claimed_cid.as_bytes(), signature)
            .map_err(|e| VerifyError::new(e.rule, format!("bundle signature: {}", e.detail)))?,
        None if require_sig => {
            return Err(VerifyError::new(
                Rule::UnknownKid,
                format!("no JWKS to check the bundle signature of kid {kid:?} with"),
            ))
        }
        None => {}
    }
    if let Some((index, receipt)) = receipts
        .iter()
        .enumerate()
        .find(|(_, receipt)| receipt.get("trace_id").and_then(Value::as_str) != Some(trace_id))
    {
        let hop = receipt.get("hop").and_then(Value::as_u64);
        return Err(VerifyError::new(
            Rule::BundleTraceId,
            format!("trace_id differs from the bundle's {trace_id:?}"),
        )
        .at(index, hop));
    }
    chain::verify(receipts, jwks, require_sig)
}
