//! `POST /v1/internal/idempotency`: the stored answer of a committed idempotency key, so that a
//! replay is answered with it even when the pipeline would refuse the request now (SPEC §4: a
//! changed registry, a rate limit), and a reused key is 422 even with an invalid body.
//!
//! The request fingerprint ([`fingerprint`]) is what tells a replay from a reuse.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cid;

pub const PATH: &str = "/v1/internal/idempotency";

/// The lookup: `{"tenant","idempotency_key"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lookup<'a> {
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    #[serde(borrow)]
    pub idempotency_key: Cow<'a, str>,
}

/// The 200 answer: `{"fingerprint","response"}`; a key never committed is 404
/// [`Code::IdempotencyKeyUnknown`](super::Code::IdempotencyKeyUnknown).
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored<'a> {
    #[serde(borrow)]
    pub fingerprint: Cow<'a, str>,
    #[serde(borrow)]
    pub response: &'a RawValue,
}

/// What makes two requests the same request: `sha256:` + hex SHA-256 of the raw body, and of
/// the `X-SIGNET-Trace` header too when there is one (two traces, two requests). Without the
/// header it is the hash of the body alone, as it always was.
pub fn fingerprint(body: &[u8], trace_header: Option<&str>) -> String {
    match trace_header {
        None => cid::cid(body),
        // The header is visible ASCII (the filter refuses anything else): a NUL separates
        // the two unambiguously.
        Some(trace) => cid::cid(&[trace.as_bytes(), b"\0", body].concat()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_header_is_part_of_the_request() {
        let body = br#"{"a":1}"#;
        assert_eq!(fingerprint(body, None), cid::cid(body));
        assert_ne!(fingerprint(body, Some("t-1")), fingerprint(body, None));
        assert_ne!(
            fingerprint(body, Some("t-1")),
            fingerprint(body, Some("t-2"))
        );
        assert_eq!(
            fingerprint(body, Some("t-1")),
            fingerprint(body, Some("t-1"))
        );
        assert!(cid::is_cid(&fingerprint(body, Some("t-1"))));
    }

    #[test]
    fn a_stored_answer_round_trips_verbatim() {
        let response = RawValue::from_string(r#"{"trace_id":"t"}"#.into()).unwrap();
        let stored = Stored {
            fingerprint: "sha256:00".into(),
            response: &response,
        };
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            text,
            r#"{"fingerprint":"sha256:00","response":{"trace_id":"t"}}"#
        );
        let back: Stored = serde_json::from_str(&text).unwrap();
        assert_eq!(back.response.get(), response.get());
    }
}
