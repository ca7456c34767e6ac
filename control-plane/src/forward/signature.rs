//! The headers of a delivery and their RFC 9421 signature (the signature base is built by
//! `signet_protocol::http_signature`, which `signet verify-delivery` checks with).
//!
//! What each attempt carries: `X-Signet-Delivery` (the id to dedupe on, the same on every
//! attempt), `X-Signet-Trace`, `X-Signet-Hop`, `X-Signet-Cid` (the SHA-256 of the body, the
//! receipt's `cid`), `X-Signet-Prev-Receipt-Hash` (the receipt this exchange's receipt is
//! signed on; absent at hop 1) and `X-Signet-Attempt`. The first attempt happens before the
//! exchange's receipt is signed, so it cannot carry that receipt's hash: the receipt is found
//! by (trace, cid) in the trace's chain, and it records this attempt's outcome. Retries after
//! the receipt was committed carry `X-Signet-Receipt-Hash` too, with the committed hop.

use signet_protocol::http_signature::{self as sig, SignatureHeaders};
use signet_protocol::keys::SigningKey;

use crate::storage::forward::Delivery;

/// The signed headers of attempt `attempt` of `delivery` to `target_uri`, at `created` (Unix s).
pub fn headers(
    key: &SigningKey,
    delivery: &Delivery,
    attempt: u64,
    target_uri: &str,
    created: u64,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = vec![
        (sig::CONTENT_TYPE.into(), "application/json".into()),
        (
            sig::CONTENT_DIGEST.into(),
            sig::content_digest(delivery.body.as_bytes()),
        ),
        (sig::DELIVERY_ID.into(), delivery.id.clone()),
        (sig::TRACE.into(), delivery.trace_id.clone()),
        (sig::HOP.into(), delivery.hop.to_string()),
        (sig::CID.into(), delivery.cid.clone()),
    ];
    if let Some(prev) = &delivery.prev_receipt_hash {
        headers.push((sig::PREV_RECEIPT_HASH.into(), prev.clone()));
    }
    if let Some(hash) = &delivery.receipt_hash {
        headers.push((sig::RECEIPT_HASH.into(), hash.clone()));
    }
    headers.push((sig::ATTEMPT.into(), attempt.to_string()));
    let borrowed: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let SignatureHeaders {
        signature_input,
        signature,
    } = sig::sign("POST", target_uri, &borrowed, created, key);
    headers.push(("signature-input".into(), signature_input));
    headers.push(("signature".into(), signature));
    headers
}
