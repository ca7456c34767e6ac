//! `POST /v1/internal/forward`: the filter asks the control plane to deliver an exchange's
//! normalized payload to its `forward_url` (SPEC §5), after HEL allowed the URL and before it
//! signs the receipt, whose `forwarded` member is the answer's [`Forwarded`].
//!
//! The control plane checks the URL again (HEL with its own allowlists), resolves the host
//! once, refuses any address that is not globally routable (403 `HEL_RESOLVED_*`,
//! `HEL_NO_RESOLUTION`, `HEL_RESOLUTION_FAILED`), delivers to the pinned address and answers
//! the outcome of that first attempt. A failed attempt is retried by its outbox later; those
//! attempts are delivery records, not receipts. Deliveries are keyed by (tenant, idempotency
//! key): the same key again answers the stored outcome and never delivers twice (a different
//! `fingerprint` under the key is 422 `IDEMPOTENCY_KEY_REUSED`).

use serde::{Deserialize, Serialize};

pub const PATH: &str = "/v1/internal/forward";

/// The request: what is delivered and what the delivery's signed headers say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub tenant: String,
    pub idempotency_key: String,
    /// The exchange's request fingerprint (`idempotency::fingerprint`).
    pub fingerprint: String,
    /// The `forward_url` HEL allowed.
    pub url: String,
    pub trace_id: String,
    /// The hop the filter signs the receipt at, and the receipt it signs on (`None` at hop 1).
    /// A chain conflict may make the committed receipt another hop: retries after the commit
    /// carry the committed receipt's hop and hash.
    pub hop: u64,
    #[serde(default)]
    pub prev_receipt_hash: Option<String>,
    /// The receipt's `cid`: the CID of `canon`.
    pub cid: String,
    /// The normalized payload's canonical JSON (the receipt's `canon`): the delivered body,
    /// byte for byte, so that its SHA-256 is `cid`.
    pub canon: String,
    /// Unix ms after which the filter no longer waits: the first attempt gives up by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// The receipt's `forwarded` member (SPEC §2): the response of the first attempt, or why there
/// was none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Forwarded {
    /// The receiver answered (any status; a 429 or 5xx is retried later by the outbox).
    Response {
        url: String,
        status_code: u16,
        host: String,
        pinned_ip: String,
        /// Bytes of the response body read, at most [`MAX_RESPONSE_BYTES`] (counted, not
        /// taken from `Content-Length`).
        response_size: u64,
    },
    /// No response: connect error, TLS failure, timeout.
    Error {
        url: String,
        host: String,
        error: String,
    },
}

impl Forwarded {
    /// Whether the receiver took the delivery (2xx): nothing is retried after it.
    pub fn delivered(&self) -> bool {
        matches!(self, Forwarded::Response { status_code, .. } if (200..300).contains(status_code))
    }
}

/// A delivery reads at most this much of a response body.
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// The 200 answer: `{"delivery_id","forwarded","replay"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardReply {
    /// The id the receiver dedupes on (`X-Signet-Delivery`), also the path of the delivery in
    /// the deliveries API.
    pub delivery_id: String,
    pub forwarded: Forwarded,
    /// True when the key had a delivery already: this is its stored first outcome.
    #[serde(default)]
    pub replay: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_forms_of_forwarded_are_those_of_spec_section_2() {
        let ok = Forwarded::Response {
            url: "https://a.example.com/h".into(),
            status_code: 204,
            host: "a.example.com".into(),
            pinned_ip: "203.0.113.7".into(),
            response_size: 0,
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"url":"https://a.example.com/h","status_code":204,"host":"a.example.com","pinned_ip":"203.0.113.7","response_size":0}"#
        );
        assert!(ok.delivered());
        let failed = Forwarded::Error {
            url: "https://a.example.com/h".into(),
            host: "a.example.com".into(),
            error: "connect: refused".into(),
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"url":"https://a.example.com/h","host":"a.example.com","error":"connect: refused"}"#
        );
        assert!(!failed.delivered());
        for f in [ok, failed] {
            let reply = ForwardReply {
                delivery_id: "d".into(),
                forwarded: f,
                replay: false,
            };
            let back: ForwardReply =
                serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
            assert_eq!(back, reply);
        }
        let busy = Forwarded::Response {
            url: String::new(),
            status_code: 503,
            host: String::new(),
            pinned_ip: String::new(),
            response_size: 0,
        };
        assert!(!busy.delivered());
    }
}
