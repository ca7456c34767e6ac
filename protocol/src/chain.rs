//! Hash-linked receipt chains (SR-1 §4).

use serde_json::Value;

use crate::error::{Rule, VerifyError};
use crate::keys::Jwks;
use crate::receipt;

/// Verifies every receipt (see [`receipt::verify`]) and the SR-1 §4 links between them: the first
/// has hop 1 and `prev_receipt_hash: null`; each next one has hop + 1, links to the previous
/// `receipt_hash`, and has the same `trace_id` and `tenant`. Stops at the first failure, which
/// names the receipt (0-based position) and the rule.
pub fn verify(
    receipts: &[Value],
    jwks: Option<&Jwks>,
    require_sig: bool,
) -> Result<(), VerifyError> {
    if receipts.is_empty() {
        return Err(VerifyError::new(Rule::EmptyChain, "chain has no receipts"));
    }
    let mut previous: Option<&Value> = None;
    for (index, receipt) in receipts.iter().enumerate() {
        let hop = receipt.get("hop").and_then(Value::as_u64);
        receipt::verify(receipt, jwks, require_sig).map_err(|e| e.at(index, hop))?;
        check_link(previous, receipt, index).map_err(|e| e.at(index, hop))?;
        previous = Some(receipt);
    }
    Ok(())
}

/// The SR-1 §4 rules between a verified receipt and its predecessor.
fn check_link(previous: Option<&Value>, receipt: &Value, index: usize) -> Result<(), VerifyError> {
    let hop = receipt.get("hop").and_then(Value::as_u64);
    let prev_hash = receipt.get("prev_receipt_hash").unwrap_or(&Value::Null);
    let Some(previous) = previous else {
        if hop != Some(1) {
            return Err(VerifyError::new(
                Rule::ChainStart,
                "first receipt does not have hop 1",
            ));
        }
        if !prev_hash.is_null() {
            return Err(VerifyError::new(
                Rule::ChainStart,
                "first receipt has a prev_receipt_hash (expected null)",
            ));
        }
        return Ok(());
    };
    let before = index - 1;
    let previous_hop = previous.get("hop").and_then(Value::as_u64);
    let expected_hop = previous_hop.and_then(|h| h.checked_add(1));
    if expected_hop.is_none() || hop != expected_hop {
        return Err(VerifyError::new(
            Rule::HopSequence,
            format!("hop does not follow receipt {before}'s hop"),
        ));
    }
    if Some(prev_hash) != previous.get("receipt_hash") {
        return Err(VerifyError::new(
            Rule::Linkage,
            format!("prev_receipt_hash does not match receipt {before}'s receipt_hash"),
        ));
    }
    if receipt.get("trace_id") != previous.get("trace_id") {
        return Err(VerifyError::new(
            Rule::TraceId,
            format!("trace_id differs from receipt {before}'s"),
        ));
    }
    if receipt.get("tenant") != previous.get("tenant") {
        return Err(VerifyError::new(
            Rule::Tenant,
            format!("tenant differs from receipt {before}'s"),
        ));
    }
    Ok(())
}
