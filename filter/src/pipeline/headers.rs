//! The HTTP headers of an exchange: what the client sends, and the receipt headers the filter
//! sets (SPEC §4).

use serde_json::Value;

pub const API_KEY_HEADERS: [&str; 2] = ["x-signet-api-key", "x-odin-api-key"];
pub const IDEMPOTENCY_KEY_HEADERS: [&str; 2] =
    ["x-signet-idempotency-key", "x-odin-idempotency-key"];
pub const TRACE_HEADER: &str = "x-signet-trace";
pub const RECEIPT_HASH_HEADER: &str = "x-signet-receipt-hash";
pub const HOP_HEADER: &str = "x-signet-hop";
pub const CID_HEADER: &str = "x-signet-cid";
pub const IDEMPOTENCY_HIT_HEADER: &str = "x-signet-idempotency-hit";
/// Receipt headers only the filter may set on the upstream request.
pub const FORGEABLE_HEADERS: [&str; 4] = [
    RECEIPT_HASH_HEADER,
    HOP_HEADER,
    CID_HEADER,
    IDEMPOTENCY_HIT_HEADER,
];

/// `X-SIGNET-Trace`, `-Receipt-Hash`, `-Hop`, `-CID` from an exchange's 200 body.
pub fn receipt_headers(response: &Value) -> Vec<(String, String)> {
    let receipt = response.get("receipt");
    let field = |v: Option<&Value>, name: &str| match v.and_then(|v| v.get(name)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    [
        (TRACE_HEADER, field(Some(response), "trace_id")),
        (RECEIPT_HASH_HEADER, field(receipt, "receipt_hash")),
        (HOP_HEADER, field(receipt, "hop")),
        (CID_HEADER, field(receipt, "cid")),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|t| (name.to_owned(), t)))
    .collect()
}
