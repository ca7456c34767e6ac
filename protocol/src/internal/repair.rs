//! `POST /v1/internal/repair`: the LLM fallback (SPEC §4 "LLM fallback when the tenant enables
//! it"). The filter sends the embedded JSON text that deterministic repair could not fix, with
//! the JSON Schema its value must satisfy; the control plane reserves an estimate of the tokens
//! against the tenant's monthly FU quota, asks the provider, meters the tokens it reports
//! (`usage.total_tokens`) and answers the repaired text.
//!
//! FU are metered here and only here: a commit's `fu_tokens` is what the receipt states, never
//! counted a second time. A second call with the same (tenant, idempotency key) and the same
//! request answers the stored result and meters nothing (`replay: true`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cid;

pub const PATH: &str = "/v1/internal/repair";

/// The longest `text` the control plane accepts (bytes): an embedded tool-call argument, not a
/// document. Longer is 413 `BODY_TOO_LARGE`.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The request: `{"tenant","idempotency_key","payload_type","location","text","schema"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairRequest<'a> {
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    /// The exchange's idempotency key: a replay of the exchange meters nothing again.
    #[serde(borrow)]
    pub idempotency_key: Cow<'a, str>,
    /// The exchange's source type (for the prompt and the logs).
    #[serde(borrow)]
    pub payload_type: Cow<'a, str>,
    /// Where the text sits in the payload, a JSON pointer (`/arguments`).
    #[serde(borrow, default)]
    pub location: Cow<'a, str>,
    /// The broken JSON text, after sanitize.
    #[serde(borrow)]
    pub text: Cow<'a, str>,
    /// The JSON Schema the repaired value must satisfy; `null` when the type has none.
    #[serde(default)]
    pub schema: Option<Value>,
}

impl RepairRequest<'_> {
    /// What tells a replay from a reuse of the key: `sha256:` + hex SHA-256 over the type, the
    /// location, the text and the schema's JSON, each followed by a NUL.
    pub fn fingerprint(&self) -> String {
        let schema = self
            .schema
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_default();
        let mut bytes = Vec::with_capacity(
            self.payload_type.len() + self.location.len() + self.text.len() + schema.len() + 4,
        );
        for part in [
            self.payload_type.as_bytes(),
            self.location.as_bytes(),
            self.text.as_bytes(),
            schema.as_bytes(),
        ] {
            bytes.extend_from_slice(part);
            bytes.push(0);
        }
        cid::cid(&bytes)
    }
}

/// The 200 answer: `{"repaired","fu_tokens","usage_estimated","replay"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repaired {
    /// The repaired JSON text (it parses; the filter checks the schema and the invariants).
    pub repaired: String,
    /// FU metered for this repair: the provider's `usage.total_tokens`.
    pub fu_tokens: u64,
    /// The provider answered without `usage`: `fu_tokens` is the control plane's estimate.
    #[serde(default)]
    pub usage_estimated: bool,
    /// The stored answer of an earlier call with this key: nothing metered now.
    #[serde(default)]
    pub replay: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> RepairRequest<'_> {
        RepairRequest {
            tenant: "t".into(),
            idempotency_key: "k".into(),
            payload_type: "openai.tool_call.v1".into(),
            location: "/arguments".into(),
            text: text.into(),
            schema: Some(serde_json::json!({"type":"object"})),
        }
    }

    #[test]
    fn a_request_reads_what_it_writes_and_its_fingerprint_covers_text_and_schema() {
        let r = request("{amount: 12,, }");
        let text = serde_json::to_string(&r).unwrap();
        let back: RepairRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.text, r.text);
        assert_eq!(back.fingerprint(), r.fingerprint());
        assert_ne!(request("{amount: 13,, }").fingerprint(), r.fingerprint());
        let no_schema = RepairRequest {
            schema: None,
            ..request("{amount: 12,, }")
        };
        assert_ne!(no_schema.fingerprint(), r.fingerprint());
        // the NUL separators keep parts apart: moving a byte from one part to the next counts
        let shifted = RepairRequest {
            location: "/argument".into(),
            text: "s{amount: 12,, }".into(),
            ..request("")
        };
        assert_ne!(shifted.fingerprint(), r.fingerprint());
        let bare: RepairRequest = serde_json::from_str(
            r#"{"tenant":"t","idempotency_key":"k","payload_type":"p","text":"x"}"#,
        )
        .unwrap();
        assert_eq!((bare.location.as_ref(), bare.schema), ("", None));
    }

    #[test]
    fn an_answer_defaults_its_flags() {
        let a: Repaired = serde_json::from_str(r#"{"repaired":"{}","fu_tokens":7}"#).unwrap();
        assert_eq!(
            a,
            Repaired {
                repaired: "{}".into(),
                fu_tokens: 7,
                usage_estimated: false,
                replay: false
            }
        );
    }
}
