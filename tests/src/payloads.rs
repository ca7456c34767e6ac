//! Request bodies: the invoice tool call of the built-in registry (docs/config.md), shared with
//! `make up` and `make bench` through scripts/payloads/.

use serde_json::{json, Value};

pub const SOURCE_TYPE: &str = "openai.tooluse.invoice.v1";
pub const TARGET_TYPE: &str = "invoice.iso20022.v1";

/// scripts/payloads/invoice-toolcall.json: an OpenAI tool call `create_invoice` (~1 KB).
pub fn sample_invoice() -> Value {
    let path = crate::binaries::workspace_root().join("scripts/payloads/invoice-toolcall.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("invoice-toolcall.json is JSON")
}

/// A `create_invoice` tool call whose `arguments` is the JSON text of `arguments`.
pub fn invoice_tool_call(arguments: &Value) -> Value {
    invoice_tool_call_raw(&arguments.to_string())
}

/// A `create_invoice` tool call with `arguments` as given (e.g. broken JSON to repair).
pub fn invoice_tool_call_raw(arguments: &str) -> Value {
    json!({"tool_calls": [{"type": "function", "function": {
        "name": "create_invoice",
        "arguments": arguments,
    }}]})
}

pub fn invoice_arguments(invoice_id: &str, amount: Value, currency: &str) -> Value {
    json!({
        "invoice_id": invoice_id,
        "amount": amount,
        "currency": currency,
        "customer_name": "ACME Robotics GmbH",
    })
}

/// The SVX-1 exchange envelope around a source payload.
pub fn exchange_body(payload: Value) -> Value {
    json!({"payload_type": SOURCE_TYPE, "target_type": TARGET_TYPE, "payload": payload})
}
