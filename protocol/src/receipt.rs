//! SR-1 receipts with an Ed25519 signature (SPEC §2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::canonical::{self, CanonError, Profile};
use crate::cid::{self, cid};
use crate::error::{Rule, VerifyError};
use crate::keys::{Jwks, SigningKey};
use crate::time;
use crate::trace::is_valid_trace_id;

/// The HEL egress decision recorded in a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub engine: String,
    pub allowed: bool,
    /// `"ok"`, or `"no_forward"` when the exchange had nothing to forward.
    pub reason: String,
}

/// Every member of a receipt that the signer chooses; `algo`, `kid`, `sig` and `receipt_hash` are
/// added by [`sign`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptDraft {
    pub trace_id: String,
    pub hop: u64,
    pub ts: String,
    pub tenant: String,
    pub cid: String,
    /// The canonical payload; `None` when the route opts out for privacy.
    pub canon: Option<String>,
    /// `None` for hop 1.
    pub prev_receipt_hash: Option<String>,
    pub policy: Policy,
    /// Optional SR-1 extensions: `payload_type`, `target_type`, `fallback_used`, `fu_tokens`,
    /// `forwarded`. Names of core members are refused.
    pub extensions: Map<String, Value>,
}

/// Members defined by the receipt format itself; an extension may not set them.
const CORE_MEMBERS: [&str; 12] = [
    "trace_id",
    "hop",
    "ts",
    "tenant",
    "cid",
    "canon",
    "algo",
    "prev_receipt_hash",
    "policy",
    "kid",
    "sig",
    "receipt_hash",
];

/// Builds and signs a receipt in the SPEC §2 order: every member except `sig` and
/// `receipt_hash`; `sig` over its canonical bytes; then `receipt_hash` over everything but itself.
///
/// Strings are stored in NFC, so the receipt hashes the same under `signet-jcs` and plain RFC 8785
/// and any SR-1 verifier agrees with it.
pub fn sign(draft: &ReceiptDraft, key: &SigningKey) -> Result<Map<String, Value>, CanonError> {
    let mut receipt = Map::new();
    for (name, value) in &draft.extensions {
        if CORE_MEMBERS.contains(&name.as_str()) {
            return Err(CanonError::reserved_member(name));
        }
        receipt.insert(name.clone(), value.clone());
    }
    receipt.insert("trace_id".into(), draft.trace_id.clone().into());
    receipt.insert("hop".into(), draft.hop.into());
    receipt.insert("ts".into(), draft.ts.clone().into());
    receipt.insert("tenant".into(), draft.tenant.clone().into());
    receipt.insert("cid".into(), draft.cid.clone().into());
    if let Some(canon) = &draft.canon {
        receipt.insert("canon".into(), canon.clone().into());
    }
    receipt.insert("algo".into(), ALGO.into());
    receipt.insert(
        "prev_receipt_hash".into(),
        draft
            .prev_receipt_hash
            .clone()
            .map_or(Value::Null, Value::String),
    );
    receipt.insert(
        "policy".into(),
        Value::Object(Map::from_iter([
            ("engine".to_owned(), draft.policy.engine.clone().into()),
            ("allowed".to_owned(), draft.policy.allowed.into()),
            ("reason".to_owned(), draft.policy.reason.clone().into()),
        ])),
    );
    receipt.insert("kid".into(), key.kid().into());
    canonical::normalize_object(&mut receipt)?;

    // Every string is in NFC now, so plain RFC 8785 writes the same bytes as `signet-jcs`
    // without checking each string again. The signed object and the hashed one differ only by
    // `sig`, a member whose canonical text is known: write the members sorting before and after
    // it once, and splice it in for the hash instead of writing the receipt a second time.
    let (before, after) = (
        canonical::to_canonical_subset(&receipt, sorts_before_sig, Profile::Rfc8785)?,
        canonical::to_canonical_subset(&receipt, |n| !sorts_before_sig(n), Profile::Rfc8785)?,
    );
    let (before, after) = (members_of(&before), members_of(&after));
    let sig = key.sign(object_pieces(&[before, after]).concat().as_bytes());
    // base64 needs no escaping
    let sig_member = format!("\"sig\":\"{sig}\"");
    let hash = cid::cid_of_parts(&object_pieces(&[before, &sig_member, after]));
    receipt.insert("sig".into(), sig.into());
    receipt.insert("receipt_hash".into(), hash.into());
    Ok(receipt)
}

/// The members of a canonical object: `{…}` → `…` (empty for `{}`).
fn members_of(object: &str) -> &str {
    object
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'))
        .unwrap_or_default()
}

/// The text of an object made of the non-empty member lists `parts`, in order, as pieces.
fn object_pieces<'a>(parts: &[&'a str]) -> Vec<&'a str> {
    let mut pieces = vec!["{"];
    for part in parts.iter().filter(|p| !p.is_empty()) {
        if pieces.len() > 1 {
            pieces.push(",");
        }
        pieces.push(part);
    }
    pieces.push("}");
    pieces
}

/// Whether a member name comes before `sig` in RFC 8785 order.
fn sorts_before_sig(name: &str) -> bool {
    canonical::cmp_utf16(name, "sig") == std::cmp::Ordering::Less
}

/// `algo` of every receipt.
const ALGO: &str = "sha256";

/// CID of the canonical form (`signet-jcs`) of `receipt` without its `receipt_hash`.
pub fn receipt_hash(receipt: &Map<String, Value>) -> Result<String, CanonError> {
    hash_in(receipt, Profile::Signet)
}

fn hash_in(receipt: &Map<String, Value>, profile: Profile) -> Result<String, CanonError> {
    let bytes = canonical::to_canonical_subset(receipt, |name| name != "receipt_hash", profile)?;
    Ok(cid(bytes.as_bytes()))
}

/// Checks one receipt: its shape, `receipt_hash`, `cid` against `canon` (when present) and `sig`
/// with the JWKS key named by `kid`.
///
/// Without a JWKS a signature cannot be checked: then only the hashes are, unless `require_sig`.
/// `require_sig` also makes a receipt without `sig` fail. Hashes are recomputed in `signet-jcs`;
/// a receipt from an implementation without the NFC step (plain RFC 8785) is accepted when its
/// hash matches that form, and its signature is then checked over the same form.
pub fn verify(receipt: &Value, jwks: Option<&Jwks>, require_sig: bool) -> Result<(), VerifyError> {
    let hop = receipt.get("hop").and_then(Value::as_u64);
    verify_fields(receipt, jwks, require_sig).map_err(|mut e| {
        e.hop = e.hop.or(hop);
        e
    })
}

fn verify_fields(
    receipt: &Value,
    jwks: Option<&Jwks>,
    require_sig: bool,
) -> Result<(), VerifyError> {
    let receipt = receipt
        .as_object()
        .ok_or_else(|| malformed("receipt is not a JSON object"))?;
    let trace_id = string_member(receipt, "trace_id")?;
    if !is_valid_trace_id(trace_id) {
        return Err(malformed(
            "trace_id is not 1..128 characters of [A-Za-z0-9._:-]",
        ));
    }
    if !matches!(receipt.get("hop").and_then(Value::as_u64), Some(hop) if hop >= 1) {
        return Err(malformed("hop is not an integer >= 1"));
    }
    let claimed_cid = string_member(receipt, "cid")?;
    let claimed_hash = string_member(receipt, "receipt_hash")?;
    check_formats(receipt)?;

    let profile =
        matching_profile(claimed_hash, |profile| hash_in(receipt, profile))?.ok_or_else(|| {
            VerifyError::new(
                Rule::ReceiptHash,
                format!("receipt_hash {claimed_hash} is not the hash of the receipt"),
            )
        })?;

    if let Some(canon) = receipt.get("canon") {
        let canon = canon
            .as_str()
            .ok_or_else(|| malformed("canon is not a string"))?;
        if cid(canon.as_bytes()) != claimed_cid {
            return Err(VerifyError::new(Rule::Cid, "cid is not the CID of canon"));
        }
    }

    let Some(sig) = receipt.get("sig") else {
        return if require_sig {
            Err(VerifyError::new(
                Rule::MissingSignature,
                "receipt has no sig and a signature is required",
            ))
        } else {
            Ok(())
        };
    };
    let sig = sig
        .as_str()
        .ok_or_else(|| malformed("sig is not a string"))?;
    let kid = string_member(receipt, "kid")?;
    let Some(jwks) = jwks else {
        return if require_sig {
            Err(VerifyError::new(
                Rule::UnknownKid,
                format!("no JWKS to check the signature of kid {kid:?} with"),
            ))
        } else {
            Ok(())
        };
    };
    let signed_bytes = canonical::to_canonical_subset(
        receipt,
        |name| name != "sig" && name != "receipt_hash",
        profile,
    )
    .map_err(not_canonicalizable)?;
    jwks.verify(kid, signed_bytes.as_bytes(), sig)
}

/// The SR-1 member formats (SPEC §2) beyond the hashes: a receipt whose members are of the wrong
/// form does not verify, even when its hash and signature match.
fn check_formats(receipt: &Map<String, Value>) -> Result<(), VerifyError> {
    let ts = string_member(receipt, "ts")?;
    if time::parse_rfc3339_utc(ts).is_none() {
        return Err(malformed(format!(
            "ts {ts:?} is not an RFC 3339 UTC timestamp"
        )));
    }
    if string_member(receipt, "tenant")?.is_empty() {
        return Err(malformed("tenant is empty"));
    }
    for name in ["cid", "receipt_hash"] {
        if !cid::is_cid(string_member(receipt, name)?) {
            return Err(malformed(format!(
                "{name} is not sha256: and 64 lowercase hex digits"
            )));
        }
    }
    // whether hop 1 links to nothing is a chain rule (CHAIN_START), checked by `chain::verify`
    match receipt.get("prev_receipt_hash") {
        Some(Value::Null) => {}
        Some(Value::String(prev)) if cid::is_cid(prev) => {}
        _ => return Err(malformed("prev_receipt_hash is not null or a sha256: hash")),
    }
    if receipt.get("algo").and_then(Value::as_str) != Some(ALGO) {
        return Err(malformed("algo is not \"sha256\""));
    }
    let policy = receipt.get("policy").and_then(Value::as_object);
    let policy_ok = policy.is_some_and(|p| {
        p.get("engine").and_then(Value::as_str) == Some("HEL")
            && p.get("allowed") == Some(&Value::Bool(true))
            && matches!(
                p.get("reason").and_then(Value::as_str),
                Some("ok" | "no_forward")
            )
    });
    if !policy_ok {
        return Err(malformed(
            r#"policy is not {"engine":"HEL","allowed":true,"reason":"ok"|"no_forward"}"#,
        ));
    }
    if receipt.get("kid").is_some() && string_member(receipt, "kid")?.is_empty() {
        return Err(malformed("kid is empty"));
    }
    for name in ["payload_type", "target_type"] {
        if receipt.get(name).is_some() {
            string_member(receipt, name)?;
        }
    }
    let typed = |name: &str, ok: fn(&Value) -> bool, what: &str| match receipt.get(name) {
        Some(v) if !ok(v) => Err(malformed(format!("{name} is not {what}"))),
        _ => Ok(()),
    };
    typed("fallback_used", Value::is_boolean, "a boolean")?;
    typed("fu_tokens", Value::is_u64, "a non-negative integer")?;
    typed("forwarded", Value::is_object, "an object")?;
    Ok(())
}

/// The profile in which `compute` yields `claimed`: `signet-jcs` first, then plain RFC 8785 for
/// data from implementations without the NFC step. `None` when neither matches.
pub(crate) fn matching_profile(
    claimed: &str,
    compute: impl Fn(Profile) -> Result<String, CanonError>,
) -> Result<Option<Profile>, VerifyError> {
    let signet = compute(Profile::Signet);
    if signet.as_deref().is_ok_and(|computed| computed == claimed) {
        return Ok(Some(Profile::Signet));
    }
    let plain = compute(Profile::Rfc8785).map_err(not_canonicalizable)?;
    Ok((plain == claimed).then_some(Profile::Rfc8785))
}

pub(crate) fn malformed(detail: impl Into<String>) -> VerifyError {
    VerifyError::new(Rule::Malformed, detail)
}

pub(crate) fn not_canonicalizable(err: CanonError) -> VerifyError {
    VerifyError::new(Rule::NotCanonicalizable, err.to_string())
}

pub(crate) fn string_member<'a>(
    object: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a str, VerifyError> {
    match object.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(malformed(format!("{name} is not a string"))),
        None => Err(malformed(format!("{name} is missing"))),
    }
}
