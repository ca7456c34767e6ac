//! Idempotency decisions (SPEC §4), shared by both storage backends.
//!
//! A key is reserved per tenant by `begin` with a lease, then completed by `commit` with the
//! response. The request fingerprint (SHA-256 of the raw body) tells a replay from a reuse.

use serde_json::Value;

use crate::chain::Rejection;

/// The stored state of one (tenant, key).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub fingerprint: String,
    pub state: RecordState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RecordState {
    /// Reserved by `begin` until `lease_until_ms` (Unix milliseconds).
    Pending { lease_until_ms: i64 },
    /// Committed; the stored 200 body.
    Done { response: Value },
}

/// What `begin` does with the key.
#[derive(Debug, Clone, PartialEq)]
pub enum BeginStep {
    /// No record: insert a pending one.
    Reserve,
    /// A pending record of the same request whose lease ran out (its owner died): take it over.
    Renew,
    Replay(Value),
    Reject(Rejection),
}

pub fn begin_step(existing: Option<&Record>, fingerprint: &str, now_ms: i64) -> BeginStep {
    let Some(record) = existing else {
        return BeginStep::Reserve;
    };
    if record.fingerprint != fingerprint {
        return BeginStep::Reject(Rejection::KeyReused);
    }
    match &record.state {
        RecordState::Done { response } => BeginStep::Replay(response.clone()),
        RecordState::Pending { lease_until_ms } if *lease_until_ms > now_ms => {
            BeginStep::Reject(Rejection::InFlight)
        }
        RecordState::Pending { .. } => BeginStep::Renew,
    }
}

/// What `commit` does with the key.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitStep {
    /// Store the receipt and complete the key (reserved by `begin`, or not at all).
    Proceed,
    Replay(Value),
    Reject(Rejection),
}

pub fn commit_step(existing: Option<&Record>, fingerprint: &str) -> CommitStep {
    match existing {
        Some(r) if r.fingerprint != fingerprint => CommitStep::Reject(Rejection::KeyReused),
        Some(Record {
            state: RecordState::Done { response },
            ..
        }) => CommitStep::Replay(response.clone()),
        // A pending record is the reservation of this very request (same fingerprint); its
        // lease only guards `begin` against a concurrent twin.
        _ => CommitStep::Proceed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pending(lease_until_ms: i64) -> Record {
        Record {
            fingerprint: "f".into(),
            state: RecordState::Pending { lease_until_ms },
        }
    }

    #[test]
    fn begin_decisions() {
        assert_eq!(begin_step(None, "f", 0), BeginStep::Reserve);
        assert_eq!(
            begin_step(Some(&pending(10)), "f", 5),
            BeginStep::Reject(Rejection::InFlight)
        );
        assert_eq!(begin_step(Some(&pending(10)), "f", 10), BeginStep::Renew);
        assert_eq!(
            begin_step(Some(&pending(10)), "g", 5),
            BeginStep::Reject(Rejection::KeyReused)
        );
        let done = Record {
            fingerprint: "f".into(),
            state: RecordState::Done {
                response: json!({"a":1}),
            },
        };
        assert_eq!(
            begin_step(Some(&done), "f", 0),
            BeginStep::Replay(json!({"a":1}))
        );
        assert_eq!(
            begin_step(Some(&done), "g", 0),
            BeginStep::Reject(Rejection::KeyReused)
        );
    }

    #[test]
    fn commit_decisions() {
        assert_eq!(commit_step(None, "f"), CommitStep::Proceed);
        assert_eq!(
            commit_step(Some(&pending(i64::MAX)), "f"),
            CommitStep::Proceed
        );
        assert_eq!(
            commit_step(Some(&pending(0)), "g"),
            CommitStep::Reject(Rejection::KeyReused)
        );
        let done = Record {
            fingerprint: "f".into(),
            state: RecordState::Done { response: json!(1) },
        };
        assert_eq!(commit_step(Some(&done), "f"), CommitStep::Replay(json!(1)));
    }
}
