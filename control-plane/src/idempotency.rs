//! Idempotency decisions (SPEC §4), shared by both storage backends.
//!
//! `commit` is the only write of an exchange: an idempotency key is recorded, with the 200 body,
//! in the transaction that stores its receipt, and never before. The request fingerprint (SHA-256
//! of the raw body) tells a replay from a reuse.

use std::sync::Arc;

use crate::chain::Rejection;

/// The stored record of one (tenant, key): a committed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub fingerprint: String,
    /// The stored 200 body, JSON text.
    pub response: Arc<str>,
}

/// What `commit` does with the key.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitStep {
    /// No record: store the receipt and record the key.
    Proceed,
    /// The same request was committed: answer with its stored response, count nothing.
    Replay(Arc<str>),
    Reject(Rejection),
}

pub fn commit_step(existing: Option<&Record>, fingerprint: &str) -> CommitStep {
    match existing {
        None => CommitStep::Proceed,
        Some(r) if r.fingerprint != fingerprint => CommitStep::Reject(Rejection::KeyReused),
        Some(r) => CommitStep::Replay(r.response.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_decisions() {
        assert_eq!(commit_step(None, "f"), CommitStep::Proceed);
        let done = Record {
            fingerprint: "f".into(),
            response: r#"{"a":1}"#.into(),
        };
        assert_eq!(
            commit_step(Some(&done), "f"),
            CommitStep::Replay(r#"{"a":1}"#.into())
        );
        assert_eq!(
            commit_step(Some(&done), "g"),
            CommitStep::Reject(Rejection::KeyReused)
        );
    }
}
