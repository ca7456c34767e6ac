//! The commit decision (SPEC §2 chain rules, SR-1 §4, SPEC §4 idempotency): what a commit does
//! given the stored idempotency record of its key and the stored state of its trace. Pure, so
//! the SQLite and PostgreSQL backends and the filter's test fake decide alike; a backend only
//! locks the rows, calls [`decide`] and writes what it says.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::code::{Code, ErrorReply};

/// The last receipt of a trace: the hop and hash the next receipt links to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub hop: u64,
    pub receipt_hash: String,
}

/// A stored trace: who opened it and its head. Hops are contiguous, so `head.hop` is its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceState {
    pub tenant: String,
    pub head: Head,
}

/// The stored record of one (tenant, idempotency key): a committed request and its 200 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fingerprint: String,
    /// The stored 200 body, JSON text.
    pub response: Arc<str>,
}

/// What a commit asks for: its key's fingerprint and where its receipt links.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub tenant: &'a str,
    pub fingerprint: &'a str,
    pub hop: u64,
    pub prev_receipt_hash: Option<&'a str>,
    /// The most receipts a trace may hold (`SP_CHAIN_MAX`).
    pub chain_max: u64,
}

/// Why a commit is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Same idempotency key, other request.
    KeyReused,
    /// The trace was opened by another tenant.
    TraceForbidden,
    /// The trace holds `chain_max` receipts.
    ChainFull,
    /// The receipt does not extend the current head (`None`: the trace does not exist).
    ChainConflict { head: Option<Head> },
}

impl Rejection {
    pub fn code(&self) -> Code {
        match self {
            Rejection::KeyReused => Code::IdempotencyKeyReused,
            Rejection::TraceForbidden => Code::TraceForbidden,
            Rejection::ChainFull => Code::ChainFull,
            Rejection::ChainConflict { .. } => Code::ChainConflict,
        }
    }

    /// The SPEC §4 error answer.
    pub fn reply(&self) -> ErrorReply {
        match self {
            Rejection::KeyReused => ErrorReply::new(
                self.code(),
                "the idempotency key was used with a different request body",
            ),
            Rejection::TraceForbidden => {
                ErrorReply::new(self.code(), "the trace belongs to another tenant")
            }
            Rejection::ChainFull => {
                ErrorReply::new(self.code(), "the trace has reached its maximum length")
            }
            Rejection::ChainConflict { head } => ErrorReply::conflict(
                "chain conflict: the receipt does not extend the current head",
                head.clone(),
            ),
        }
    }
}

/// What to do with a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store the receipt (the trace's new head), record the key, count the usage.
    Append,
    /// The same request was committed: answer its stored response, write and count nothing.
    Replay(Arc<str>),
    /// Write nothing.
    Reject(Rejection),
}

/// The idempotency record decides first (a replay or a reused key never touches the chain);
/// then trace ownership and the cap, so another tenant's head is never disclosed; then the link:
/// the receipt must extend the head exactly. Hop 1 on a trace that exists (the filter's guess
/// for a trace it has not seen) is a conflict that names the head.
pub fn decide(record: Option<&Record>, trace: Option<&TraceState>, c: &Candidate) -> Decision {
    match record {
        Some(r) if r.fingerprint != c.fingerprint => return Decision::Reject(Rejection::KeyReused),
        Some(r) => return Decision::Replay(r.response.clone()),
        None => {}
    }
    let head = match trace {
        None => None,
        Some(t) if t.tenant != c.tenant => return Decision::Reject(Rejection::TraceForbidden),
        Some(t) if t.head.hop >= c.chain_max => return Decision::Reject(Rejection::ChainFull),
        Some(t) => Some(&t.head),
    };
    let extends = match head {
        None => c.hop == 1 && c.prev_receipt_hash.is_none(),
        Some(h) => {
            Some(c.hop) == h.hop.checked_add(1)
                && c.prev_receipt_hash == Some(h.receipt_hash.as_str())
        }
    };
    if extends {
        Decision::Append
    } else {
        Decision::Reject(Rejection::ChainConflict {
            head: head.cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(tenant: &str, hop: u64) -> TraceState {
        TraceState {
            tenant: tenant.into(),
            head: Head {
                hop,
                receipt_hash: format!("sha256:{hop}"),
            },
        }
    }

    fn candidate<'a>(tenant: &'a str, hop: u64, prev: Option<&'a str>, max: u64) -> Candidate<'a> {
        Candidate {
            tenant,
            fingerprint: "f",
            hop,
            prev_receipt_hash: prev,
            chain_max: max,
        }
    }

    fn conflict(head: Option<&TraceState>) -> Decision {
        Decision::Reject(Rejection::ChainConflict {
            head: head.map(|t| t.head.clone()),
        })
    }

    #[test]
    fn the_key_decides_before_the_chain() {
        let done = Record {
            fingerprint: "f".into(),
            response: r#"{"a":1}"#.into(),
        };
        let other = trace("other", 3);
        // a replay wins even over a trace the request could not append to now
        assert_eq!(
            decide(Some(&done), Some(&other), &candidate("t", 1, None, 10)),
            Decision::Replay(r#"{"a":1}"#.into())
        );
        let reused = Candidate {
            fingerprint: "g",
            ..candidate("t", 1, None, 10)
        };
        assert_eq!(
            decide(Some(&done), None, &reused),
            Decision::Reject(Rejection::KeyReused)
        );
    }

    #[test]
    fn a_new_trace_starts_at_hop_one_without_prev() {
        assert_eq!(
            decide(None, None, &candidate("t", 1, None, 10)),
            Decision::Append
        );
        assert_eq!(
            decide(None, None, &candidate("t", 2, Some("sha256:1"), 10)),
            conflict(None)
        );
        assert_eq!(
            decide(None, None, &candidate("t", 1, Some("sha256:0"), 10)),
            conflict(None)
        );
    }

    #[test]
    fn an_append_must_extend_the_current_head() {
        let t = trace("t", 3);
        let at = |hop, prev| decide(None, Some(&t), &candidate("t", hop, prev, 10));
        assert_eq!(at(4, Some("sha256:3")), Decision::Append);
        assert_eq!(at(3, Some("sha256:2")), conflict(Some(&t)));
        assert_eq!(at(4, Some("sha256:2")), conflict(Some(&t)));
        assert_eq!(at(1, None), conflict(Some(&t)));
        let top = trace("t", u64::MAX);
        assert_eq!(
            decide(
                None,
                Some(&top),
                &candidate("t", 0, Some("sha256:x"), u64::MAX)
            ),
            Decision::Reject(Rejection::ChainFull)
        );
    }

    #[test]
    fn ownership_and_cap_come_before_the_link() {
        let t = trace("owner", 3);
        let by =
            |tenant, hop, prev, max| decide(None, Some(&t), &candidate(tenant, hop, prev, max));
        let forbidden = Decision::Reject(Rejection::TraceForbidden);
        assert_eq!(by("other", 4, Some("sha256:3"), 10), forbidden);
        assert_eq!(
            by("other", 1, None, 10),
            forbidden,
            "no conflict naming the other's head"
        );
        let full = Decision::Reject(Rejection::ChainFull);
        assert_eq!(by("owner", 4, Some("sha256:3"), 3), full);
        assert_eq!(by("owner", 1, None, 3), full);
        assert_eq!(by("owner", 4, Some("sha256:3"), 4), Decision::Append);
    }

    #[test]
    fn each_rejection_answers_its_code_and_status() {
        for (r, status) in [
            (Rejection::KeyReused, 422),
            (Rejection::TraceForbidden, 403),
            (Rejection::ChainFull, 409),
            (Rejection::ChainConflict { head: None }, 409),
        ] {
            assert_eq!(r.code().status(), status);
            assert_eq!(r.reply().code, r.code().as_str());
        }
    }
}
