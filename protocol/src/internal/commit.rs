//! `POST /v1/internal/commits`: one worker's receipts, stored together.
//!
//! The filter sends a [`CommitBatch`] of [`Commit`]s; the control plane answers
//! [`CommitResults`], one [`CommitResult`] per commit in order, each decided as if it came alone
//! (a body of [`CommitReply`] on 200, an [`ErrorReply`](super::code::ErrorReply) otherwise).
//! An error of the whole call (401, 413, a body that is not a batch) is an ordinary error answer.
//!
//! The exchange's 200 body travels as raw JSON ([`RawValue`]): the filter serializes it once,
//! the control plane stores and replays it verbatim, neither rebuilds it as a tree.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub const PATH: &str = "/v1/internal/commits";

/// The filter sends at most this many commits in one batch,
pub const MAX_COMMITS: usize = 64;
/// and at most about this many bytes (a batch always takes one commit, whatever its size).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// The control plane accepts request bodies up to this size.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// One exchange's commit: `{"tenant","idempotency_key","fingerprint","receipt","response","fu_tokens"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Commit<'a> {
    #[serde(borrow)]
    pub tenant: Cow<'a, str>,
    #[serde(borrow)]
    pub idempotency_key: Cow<'a, str>,
    /// `sha256:` + hex SHA-256 of the request (SPEC §4 idempotency).
    #[serde(borrow)]
    pub fingerprint: Cow<'a, str>,
    /// The full signed receipt.
    pub receipt: Value,
    /// The exchange's 200 body, answered again on a replay.
    #[serde(borrow)]
    pub response: &'a RawValue,
    /// Fallback units the exchange used (SPEC §6).
    #[serde(default)]
    pub fu_tokens: u64,
    /// Unix milliseconds after which the filter no longer waits for the answer (its client
    /// got an error): the control plane stores nothing after it, so no receipt exists for a
    /// request the client saw fail. Absent: no deadline (older filters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

impl Commit<'_> {
    /// The JSON the filter queues, written once and not scanned again (`to_raw_value` trusts
    /// its own serializer; `RawValue::from_string` would re-validate the whole commit).
    pub fn to_json(&self) -> Result<Box<RawValue>, serde_json::Error> {
        serde_json::value::to_raw_value(self)
    }
}

/// `{"commits":[commit, …]}`; each commit stays raw so that a malformed one fails alone.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommitBatch<'a> {
    #[serde(borrow)]
    pub commits: Vec<&'a RawValue>,
}

/// A commit's answer within the batch: its status and body, as if it had come alone. `B` is
/// what the side has: the typed body when writing, [`RawValue`] when reading.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommitResult<B> {
    pub status: u16,
    pub body: B,
}

/// `{"results":[{"status","body"}, …]}`, in the order of the batch.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommitResults<B> {
    pub results: Vec<CommitResult<B>>,
}

/// A 200 answer to one commit: `{"outcome":"committed"}` or
/// `{"outcome":"replay","response":{…stored…}}`. A struct, not a tagged enum: serde buffers a
/// tagged enum's members, and a raw value cannot be read from a buffer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommitReply<'a> {
    pub outcome: Outcome,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a RawValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Stored; it counts one VEx. The filter answers with the response it sent.
    Committed,
    /// The key was committed before with the same request: its stored response. Counts nothing.
    Replay,
}

impl<'a> CommitReply<'a> {
    pub fn committed() -> Self {
        CommitReply {
            outcome: Outcome::Committed,
            response: None,
        }
    }

    pub fn replay(response: &'a RawValue) -> Self {
        CommitReply {
            outcome: Outcome::Replay,
            response: Some(response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::code::{Code, ErrorReply};
    use serde_json::json;

    #[test]
    fn a_commit_round_trips_with_its_response_verbatim() {
        let response = RawValue::from_string(r#"{"b":1,"a":[2]}"#.to_owned()).unwrap();
        let commit = Commit {
            tenant: "demo".into(),
            idempotency_key: "k\"1".into(),
            fingerprint: "sha256:00".into(),
            receipt: json!({"hop": 1}),
            response: &response,
            fu_tokens: 0,
            deadline_ms: None,
        };
        let text = commit.to_json().unwrap();
        assert_eq!(
            text.get(),
            r#"{"tenant":"demo","idempotency_key":"k\"1","fingerprint":"sha256:00","receipt":{"hop":1},"response":{"b":1,"a":[2]},"fu_tokens":0}"#
        );
        let back: Commit = serde_json::from_str(text.get()).unwrap();
        assert_eq!(back.response.get(), r#"{"b":1,"a":[2]}"#, "not rebuilt");
        assert_eq!(back.idempotency_key, "k\"1");
        assert!(matches!(back.tenant, Cow::Borrowed("demo")), "no copy");
    }

    #[test]
    fn a_batch_keeps_each_commit_raw() {
        let a = RawValue::from_string(r#"{"x":1}"#.into()).unwrap();
        let b = RawValue::from_string("[]".into()).unwrap();
        let text = serde_json::to_string(&CommitBatch {
            commits: vec![&a, &b],
        })
        .unwrap();
        assert_eq!(text, r#"{"commits":[{"x":1},[]]}"#);
        let back: CommitBatch = serde_json::from_str(&text).unwrap();
        assert_eq!(back.commits[1].get(), "[]");
    }

    #[test]
    fn results_are_written_typed_and_read_raw() {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Body<'a> {
            Reply(CommitReply<'a>),
            Error(ErrorReply),
        }
        let stored = RawValue::from_string(r#"{"trace_id":"t"}"#.into()).unwrap();
        let written = CommitResults {
            results: vec![
                CommitResult {
                    status: 200,
                    body: Body::Reply(CommitReply::committed()),
                },
                CommitResult {
                    status: 200,
                    body: Body::Reply(CommitReply::replay(&stored)),
                },
                CommitResult {
                    status: 409,
                    body: Body::Error(ErrorReply::new(Code::ChainFull, "full")),
                },
            ],
        };
        let text = serde_json::to_string(&written).unwrap();
        assert_eq!(
            text,
            r#"{"results":[{"status":200,"body":{"outcome":"committed"}},{"status":200,"body":{"outcome":"replay","response":{"trace_id":"t"}}},{"status":409,"body":{"detail":"full","code":"CHAIN_FULL"}}]}"#
        );
        let read: CommitResults<&RawValue> = serde_json::from_str(&text).unwrap();
        assert_eq!(read.results.len(), 3);
        let replay: CommitReply = serde_json::from_str(read.results[1].body.get()).unwrap();
        assert_eq!(replay.outcome, Outcome::Replay);
        assert_eq!(replay.response.map(RawValue::get), Some(stored.get()));
        let committed: CommitReply = serde_json::from_str(read.results[0].body.get()).unwrap();
        assert_eq!(
            (committed.outcome, committed.response.is_none()),
            (Outcome::Committed, true)
        );
        let error: ErrorReply = serde_json::from_str(read.results[2].body.get()).unwrap();
        assert_eq!(error.code, "CHAIN_FULL");
    }
}
