//! Errors shared by the crates: the SPEC §4 API error body and receipt/chain/bundle verification.

use std::fmt;

use serde::Serialize;

use crate::canonical::CanonError;

/// An HTTP error with the SPEC §4 body `{"detail": <sentence>, "code": <UPPER_SNAKE>}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: u16, code: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            detail: detail.into(),
        }
    }

    /// The response body, `{"detail":…,"code":…}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            detail: &'a str,
            code: &'a str,
        }
        let body = Body {
            detail: &self.detail,
            code: &self.code,
        };
        // Serializing two strings cannot fail; keep a valid body even if it somehow did.
        serde_json::to_string(&body)
            .unwrap_or_else(|_| String::from(r#"{"detail":"internal error","code":"INTERNAL"}"#))
    }
}

/// A request body that is not acceptable JSON: 400 `MALFORMED_JSON` when it is not JSON at all
/// (syntax, UTF-8), 422 with the [`CanonError::code`] when it is JSON but not I-JSON or beyond
/// the limits (SPEC §4).
impl From<&CanonError> for ApiError {
    fn from(err: &CanonError) -> Self {
        match err.code() {
            "INVALID_JSON" | "INVALID_UTF8" => ApiError::new(
                400,
                "MALFORMED_JSON",
                format!("request body is not valid JSON: {err}"),
            ),
            code => ApiError::new(422, code, format!("request body is not I-JSON: {err}")),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl std::error::Error for ApiError {}

/// The verification rule that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Not the documented shape: not an object, a member missing or of the wrong type.
    Malformed,
    /// Values that have no canonical form (e.g. names that collide after NFC).
    NotCanonicalizable,
    /// `receipt_hash` is not the hash of the receipt.
    ReceiptHash,
    /// `cid` is not the CID of `canon`.
    Cid,
    /// `kid` is not in the JWKS, or there is no JWKS to check a required signature with.
    UnknownKid,
    /// The Ed25519 signature does not verify.
    Signature,
    /// A signature is required but absent.
    MissingSignature,
    /// A chain without receipts.
    EmptyChain,
    /// SR-1 §4: the first receipt has hop 1 and `prev_receipt_hash: null`.
    ChainStart,
    /// SR-1 §4: each receipt has the previous hop + 1.
    HopSequence,
    /// SR-1 §4: `prev_receipt_hash` is the previous receipt's `receipt_hash`.
    Linkage,
    /// SR-1 §4: every receipt has the chain's trace_id.
    TraceId,
    /// SR-1 §4: every receipt belongs to the tenant that opened the trace.
    Tenant,
    /// SPEC §3: `bundle_cid` is not the CID of `{trace_id, chain, exported_at}`.
    BundleCid,
    /// SPEC §3: the bundle's trace_id differs from its receipts'.
    BundleTraceId,
}

impl Rule {
    /// Stable UPPER_SNAKE name of the rule.
    pub fn code(self) -> &'static str {
        match self {
            Rule::Malformed => "MALFORMED",
            Rule::NotCanonicalizable => "NOT_CANONICALIZABLE",
            Rule::ReceiptHash => "RECEIPT_HASH",
            Rule::Cid => "CID",
            Rule::UnknownKid => "UNKNOWN_KID",
            Rule::Signature => "SIGNATURE",
            Rule::MissingSignature => "MISSING_SIGNATURE",
            Rule::EmptyChain => "EMPTY_CHAIN",
            Rule::ChainStart => "CHAIN_START",
            Rule::HopSequence => "HOP_SEQUENCE",
            Rule::Linkage => "LINKAGE",
            Rule::TraceId => "TRACE_ID",
            Rule::Tenant => "TENANT",
            Rule::BundleCid => "BUNDLE_CID",
            Rule::BundleTraceId => "BUNDLE_TRACE_ID",
        }
    }
}

/// A failed verification of a receipt, chain or bundle.
///
/// Display: `receipt 2 (hop 3): prev_receipt_hash does not match receipt 1's receipt_hash
/// [LINKAGE]`. The receipt number is its 0-based position in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub rule: Rule,
    pub detail: String,
    /// Position of the failing receipt in its chain, when there is a chain.
    pub receipt_index: Option<usize>,
    /// `hop` of the failing receipt, when it has a readable one.
    pub hop: Option<u64>,
}

impl VerifyError {
    pub fn new(rule: Rule, detail: impl Into<String>) -> Self {
        VerifyError {
            rule,
            detail: detail.into(),
            receipt_index: None,
            hop: None,
        }
    }

    /// Names the receipt the error is about.
    pub fn at(mut self, receipt_index: usize, hop: Option<u64>) -> Self {
        self.receipt_index = Some(receipt_index);
        self.hop = self.hop.or(hop);
        self
    }

    /// Stable code of the failed rule.
    pub fn code(&self) -> &'static str {
        self.rule.code()
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.receipt_index, self.hop) {
            (Some(index), Some(hop)) => write!(f, "receipt {index} (hop {hop}): ")?,
            (Some(index), None) => write!(f, "receipt {index}: ")?,
            (None, Some(hop)) => write!(f, "receipt (hop {hop}): ")?,
            (None, None) => {}
        }
        write!(f, "{} [{}]", self.detail, self.rule.code())
    }
}

impl std::error::Error for VerifyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_body_has_detail_then_code() {
        let err = ApiError::new(409, "CHAIN_CONFLICT", "chain \"conflict\"");
        assert_eq!(
            err.to_json(),
            r#"{"detail":"chain \"conflict\"","code":"CHAIN_CONFLICT"}"#
        );
    }

    #[test]
    fn canon_errors_map_to_400_or_422() {
        use crate::canonical::{canonicalize, Profile};
        let status = |input: &[u8]| {
            let err = canonicalize(input, Profile::Signet).unwrap_err();
            let api = ApiError::from(&err);
            (api.status, api.code)
        };
        assert_eq!(status(b"{"), (400, "MALFORMED_JSON".into()));
        assert_eq!(status(b"\xff"), (400, "MALFORMED_JSON".into()));
        assert_eq!(status(br#"{"a":1,"a":1}"#), (422, "DUPLICATE_KEY".into()));
        assert_eq!(status(b"1e400").0, 422);
    }

    #[test]
    fn verify_error_names_receipt_hop_and_rule() {
        let err = VerifyError::new(
            Rule::Linkage,
            "prev_receipt_hash does not match receipt 1's receipt_hash",
        )
        .at(2, Some(3));
        assert_eq!(
            err.to_string(),
            "receipt 2 (hop 3): prev_receipt_hash does not match receipt 1's receipt_hash [LINKAGE]"
        );
    }
}
