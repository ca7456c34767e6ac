//! Chain append rules (SPEC §2, SR-1 §4), shared by both storage backends so they decide alike.

use serde::Serialize;

/// The last receipt of a trace, as the filter needs it to sign the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    pub hop: u64,
    pub receipt_hash: String,
}

/// A stored trace: who opened it and its head. Hops are contiguous, so `head.hop` is the length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceState {
    pub tenant: String,
    pub head: Head,
}

/// Why a request cannot go on. Both backends return these; the API maps them to SPEC §4 errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Same idempotency key, other request body.
    KeyReused,
    /// The trace was opened by another tenant.
    TraceForbidden,
    /// The trace holds `chain_max` receipts.
    ChainFull,
    /// The receipt does not extend the current head (`None`: the trace does not exist).
    ChainConflict { head: Option<Head> },
}

/// May `tenant` add a receipt to this trace, and on which head? Ownership comes first, so
/// another tenant's head is never disclosed.
fn check_owner(
    trace: Option<&TraceState>,
    tenant: &str,
    chain_max: u64,
) -> Result<Option<Head>, Rejection> {
    let Some(trace) = trace else { return Ok(None) };
    if trace.tenant != tenant {
        return Err(Rejection::TraceForbidden);
    }
    if trace.head.hop >= chain_max {
        return Err(Rejection::ChainFull);
    }
    Ok(Some(trace.head.clone()))
}

/// Checks at `commit`: does the receipt (`hop`, `prev_receipt_hash`) extend the head exactly?
/// A receipt that does not (including hop 1 for a trace that exists: the filter's guess for a
/// trace it has not seen) is a conflict that names the current head.
pub fn check_append(
    trace: Option<&TraceState>,
    tenant: &str,
    hop: u64,
    prev_receipt_hash: Option<&str>,
    chain_max: u64,
) -> Result<(), Rejection> {
    let head = check_owner(trace, tenant, chain_max)?;
    let extends = match &head {
        None => hop == 1 && prev_receipt_hash.is_none(),
        Some(h) => hop == h.hop + 1 && prev_receipt_hash == Some(h.receipt_hash.as_str()),
    };
    if extends {
        Ok(())
    } else {
        Err(Rejection::ChainConflict { head })
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

    #[test]
    fn a_new_trace_starts_at_hop_one_without_prev() {
        assert_eq!(check_append(None, "t", 1, None, 10), Ok(()));
        assert_eq!(
            check_append(None, "t", 2, Some("sha256:1"), 10),
            Err(Rejection::ChainConflict { head: None })
        );
        assert_eq!(
            check_append(None, "t", 1, Some("sha256:0"), 10),
            Err(Rejection::ChainConflict { head: None })
        );
    }

    #[test]
    fn an_append_must_extend_the_current_head() {
        let t = trace("t", 3);
        assert_eq!(check_append(Some(&t), "t", 4, Some("sha256:3"), 10), Ok(()));
        let conflict = Err(Rejection::ChainConflict {
            head: Some(t.head.clone()),
        });
        assert_eq!(
            check_append(Some(&t), "t", 3, Some("sha256:2"), 10),
            conflict
        );
        assert_eq!(
            check_append(Some(&t), "t", 4, Some("sha256:2"), 10),
            conflict
        );
        assert_eq!(check_append(Some(&t), "t", 1, None, 10), conflict);
    }

    #[test]
    fn ownership_and_cap_come_before_the_link() {
        let t = trace("owner", 3);
        assert_eq!(
            check_append(Some(&t), "other", 4, Some("sha256:3"), 10),
            Err(Rejection::TraceForbidden)
        );
        assert_eq!(
            check_append(Some(&t), "other", 1, None, 10),
            Err(Rejection::TraceForbidden),
            "not a conflict naming the other tenant's head"
        );
        assert_eq!(
            check_append(Some(&t), "owner", 4, Some("sha256:3"), 3),
            Err(Rejection::ChainFull)
        );
        assert_eq!(
            check_append(Some(&t), "owner", 1, None, 3),
            Err(Rejection::ChainFull)
        );
        assert_eq!(
            check_append(Some(&t), "owner", 4, Some("sha256:3"), 4),
            Ok(())
        );
    }
}
