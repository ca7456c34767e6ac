//! What the provider is asked: a system prompt that allows fixing syntax only, the broken text
//! as the user message, `temperature` 0, and structured outputs: `response_format`
//! `json_schema` with `strict: true` when the schema is within OpenAI's strict subset, else
//! `json_object` with the schema quoted in the system prompt.

use serde_json::{json, Map, Value};

/// The system prompt. The values must come out as they went in: the filter compares amounts,
/// currencies and ids with the original text afterwards and refuses the repair otherwise.
pub const SYSTEM_PROMPT: &str = "You repair broken JSON. The user message is a JSON text that a \
strict parser rejected. Answer with the one JSON value it was meant to be, as JSON and nothing \
else. Fix only the syntax: quotes, commas, colons, brackets, escapes, literals. Never invent, \
guess, compute, convert, round, translate or reformat a value: every number, amount, currency, \
identifier, date and string must appear in your answer exactly as in the user message, and no \
member may be added that is not in it. If the text cannot be repaired without inventing or \
changing a value, refuse.";

/// Nesting and size bounds of OpenAI's strict mode.
const STRICT_MAX_DEPTH: usize = 10;
const STRICT_MAX_PROPERTIES: usize = 5000;

/// Keywords strict mode accepts (anything else, e.g. `allOf`, `not`, `if`, `patternProperties`,
/// `oneOf`, sends the schema as `json_object` instead).
const STRICT_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "description",
    "title",
    "$defs",
    "$ref",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
];

/// Whether `schema` is within the strict subset: an object at the root; every object lists
/// all its properties in `required` and has `additionalProperties: false`; only
/// [`STRICT_KEYWORDS`]; at most 10 levels and 5000 properties.
pub fn fits_strict(schema: &Value) -> bool {
    let Some(root) = schema.as_object() else {
        return false;
    };
    if root.get("type") != Some(&json!("object")) {
        return false;
    }
    let mut properties = 0usize;
    let mut stack: Vec<(&Map<String, Value>, usize)> = vec![(root, 0)];
    while let Some((node, depth)) = stack.pop() {
        if depth > STRICT_MAX_DEPTH || !node.keys().all(|k| STRICT_KEYWORDS.contains(&k.as_str())) {
            return false;
        }
        let is_object = match node.get("type") {
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
            _ => node.contains_key("properties"),
        };
        if is_object {
            let Some(props) = node.get("properties").and_then(Value::as_object) else {
                return false;
            };
            properties = properties.saturating_add(props.len());
            let required: Vec<&str> = node
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let all_required = props.keys().all(|k| required.contains(&k.as_str()))
                && required.len() == props.len();
            if !all_required || node.get("additionalProperties") != Some(&Value::Bool(false)) {
                return false;
            }
            for p in props.values() {
                let Some(p) = p.as_object() else { return false };
                stack.push((p, depth + 1));
            }
        }
        // items, anyOf options and $defs: each a schema object
        let mut children: Vec<&Value> = Vec::new();
        children.extend(node.get("items"));
        if let Some(options) = node.get("anyOf") {
            match options.as_array() {
                Some(options) => children.extend(options),
                None => return false,
            }
        }
        if let Some(defs) = node.get("$defs") {
            match defs.as_object() {
                Some(defs) => children.extend(defs.values()),
                None => return false,
            }
        }
        for child in children {
            let Some(child) = child.as_object() else {
                return false;
            };
            stack.push((child, depth + 1));
        }
    }
    properties <= STRICT_MAX_PROPERTIES
}

/// The `response_format` for `schema`, and whether it is strict.
pub fn response_format(schema: Option<&Value>) -> (Value, bool) {
    match schema {
        Some(schema) if fits_strict(schema) => (
            json!({
                "type": "json_schema",
                "json_schema": {"name": "repaired", "strict": true, "schema": schema}
            }),
            true,
        ),
        _ => (json!({"type": "json_object"}), false),
    }
}

/// The system message: [`SYSTEM_PROMPT`], and the schema as text when it is not sent strict
/// (JSON mode only knows it from there).
pub fn system_message(
    payload_type: &str,
    location: &str,
    schema: Option<&Value>,
    strict: bool,
) -> String {
    let mut message = format!(
        "{SYSTEM_PROMPT}\nThe text is the value at {} of a {payload_type} payload.",
        if location.is_empty() {
            "the root"
        } else {
            location
        }
    );
    if let (Some(schema), false) = (schema, strict) {
        message.push_str("\nThe answer must satisfy this JSON Schema: ");
        message.push_str(&schema.to_string());
    }
    message
}

/// The chat completions body.
pub fn body(
    model: &str,
    max_tokens: u32,
    system: &str,
    text: &str,
    response_format: Value,
) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": text},
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "response_format": response_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict_invoice() -> Value {
        json!({
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "currency": {"type": "string", "enum": ["EUR", "USD"]},
                "lines": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}},
                    "required": ["sku"],
                    "additionalProperties": false
                }}
            },
            "required": ["amount", "currency", "lines"],
            "additionalProperties": false
        })
    }

    #[test]
    fn a_closed_schema_with_every_property_required_is_strict() {
        assert!(fits_strict(&strict_invoice()));
        let (format, strict) = response_format(Some(&strict_invoice()));
        assert!(strict);
        assert_eq!(format["type"], "json_schema");
        assert_eq!(format["json_schema"]["strict"], true);
        assert_eq!(format["json_schema"]["schema"], strict_invoice());
    }

    #[test]
    fn anything_outside_the_subset_falls_back_to_json_mode() {
        let mut optional = strict_invoice();
        optional["required"] = json!(["amount"]);
        let mut open = strict_invoice();
        open["additionalProperties"] = json!(true);
        let mut nested_open = strict_invoice();
        nested_open["properties"]["lines"]["items"]
            .as_object_mut()
            .unwrap()
            .remove("additionalProperties");
        let mut all_of = strict_invoice();
        all_of["allOf"] = json!([{"type": "object"}]);
        let mut deep = json!({"type": "string"});
        for _ in 0..12 {
            deep = json!({"type":"object","properties":{"a":deep},"required":["a"],"additionalProperties":false});
        }
        for schema in [
            optional,
            open,
            nested_open,
            all_of,
            deep,
            json!({"type": "array", "items": {"type": "string"}}),
            json!({}),
            json!(true),
        ] {
            assert!(!fits_strict(&schema), "{schema}");
            let (format, strict) = response_format(Some(&schema));
            assert_eq!((format, strict), (json!({"type": "json_object"}), false));
        }
        assert_eq!(response_format(None).0, json!({"type": "json_object"}));
    }

    #[test]
    fn json_mode_quotes_the_schema_and_the_body_is_deterministic() {
        let schema = json!({"type": "object"});
        let system = system_message("invoice.v1", "/arguments", Some(&schema), false);
        assert!(system.starts_with(SYSTEM_PROMPT));
        assert!(system.contains("JSON Schema: {\"type\":\"object\"}"));
        assert!(system.contains("/arguments of a invoice.v1"));
        let strict = system_message("invoice.v1", "", Some(&schema), true);
        assert!(!strict.contains("JSON Schema:") && strict.contains("the root"));
        let b = body("m", 64, "sys", "{a:1", json!({"type": "json_object"}));
        assert_eq!(b["temperature"], 0);
        assert_eq!(b["max_tokens"], 64);
        assert_eq!(b["messages"][1], json!({"role": "user", "content": "{a:1"}));
    }
}
