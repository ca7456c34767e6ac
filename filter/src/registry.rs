//! The registry of payload types (JSON Schemas, embedded JSON, invariants) and mappings
//! (JMESPath). It is data: the built-in types ship as `registry/default.json` and the plugin
//! configuration adds or replaces types, mappings and currencies without a rebuild.
//!
//! [`Registry::normalize`] is the middle of the SPEC §4 pipeline: validate against the source
//! schema → decode and repair embedded JSON → semantic invariants → transform → validate against
//! the target schema (and its invariants).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use signet_protocol::canonical::{self, ParseOptions, Profile};
use signet_protocol::ApiError;

use crate::money::CurrencyTable;
use crate::repair::repair;
use crate::sanitize::sanitize;
use crate::schema::{SchemaId, SchemaSet};
use crate::semantic::PatternStep;
use crate::transform::{self, Engine, Expression, Input};

const DEFAULT_REGISTRY_JSON: &str = include_str!("../registry/default.json");

// ---- configuration as written -------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    #[serde(default)]
    pub types: BTreeMap<String, RawType>,
    #[serde(default)]
    pub mappings: Vec<RawMapping>,
    #[serde(default)]
    pub currencies: BTreeMap<String, u8>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawType {
    pub schema: Value,
    #[serde(default)]
    pub embedded_json: Vec<String>,
    #[serde(default)]
    pub decoded_schema: Option<Value>,
    #[serde(default)]
    pub invariants: Vec<RawInvariant>,
    /// The LLM fallback for its embedded JSON (tenants with `fallback_enabled`).
    #[serde(default)]
    pub fallback: Option<RawFallback>,
}

/// `fallback` of a type: what the provider is told and what its repair must keep.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    /// JSON Schema of one embedded value, sent to the provider (structured outputs).
    #[serde(default)]
    pub schema: Option<Value>,
    /// Paths within the embedded value (JSON pointers, `*` for any member or item) whose
    /// values the repair must keep from the broken text; absent: every value.
    #[serde(default)]
    pub invariants: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInvariant {
    pub expression: String,
    pub detail: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    pub from: String,
    pub to: String,
    pub expression: String,
    #[serde(default = "default_true")]
    pub omit_nulls: bool,
}

fn default_true() -> bool {
    true
}

impl RawRegistry {
    /// The built-in registry.
    pub fn builtin() -> Result<Self, String> {
        serde_json::from_str(DEFAULT_REGISTRY_JSON).map_err(|e| format!("built-in registry: {e}"))
    }

    /// `other` on top of `self`: types by name, mappings by (from, to), currencies by code.
    pub fn merge(mut self, other: &RawRegistry) -> Self {
        for (name, ty) in &other.types {
            self.types.insert(name.clone(), ty.clone());
        }
        for mapping in &other.mappings {
            self.mappings
                .retain(|m| !(m.from == mapping.from && m.to == mapping.to));
            self.mappings.push(mapping.clone());
        }
        self.currencies
            .extend(other.currencies.iter().map(|(k, v)| (k.clone(), *v)));
        self
    }
}

// ---- compiled ------------------------------------------------------------------------------

pub struct Registry {
    schemas: SchemaSet,
    engine: Engine,
    types: HashMap<String, PayloadType>,
    mappings: HashMap<(String, String), Mapping>,
}

struct PayloadType {
    schema: SchemaId,
    embedded_json: Vec<Pointer>,
    decoded_schema: Option<SchemaId>,
    invariants: Vec<Invariant>,
    fallback_schema: Option<Value>,
    /// `None`: every value of the embedded JSON.
    fallback_invariants: Option<Vec<Vec<PatternStep>>>,
}

/// An embedded JSON text deterministic repair could not fix, on a type that may ask the LLM
/// fallback.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackNeed {
    /// JSON pointer of the text in the payload.
    pub location: String,
    /// The text (sanitized).
    pub text: String,
    /// The refusal if the fallback cannot help (`REPAIR_FAILED`).
    pub error: ApiError,
    pub schema: Option<Value>,
    pub invariants: Option<Vec<Vec<PatternStep>>>,
}

/// A repaired value for the embedded JSON at `location`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fix {
    pub location: String,
    pub value: Value,
}

/// What [`Registry::normalize_with`] ends with.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Normalized(Normalized),
    /// Deterministic repair failed here; nothing after decoding ran.
    NeedsFallback(Box<FallbackNeed>),
}

struct Invariant {
    expression: Expression,
    detail: String,
}

struct Mapping {
    expression: Expression,
    omit_nulls: bool,
}

/// A JSON pointer where `*` matches every array item or object member.
#[derive(Debug, Clone, PartialEq)]
struct Pointer(Vec<Segment>);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Any,
    Key(String),
}

impl Pointer {
    fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "{text:?} is not a JSON pointer (must start with '/')"
            ));
        };
        Ok(Pointer(
            rest.split('/')
                .map(|s| match s {
                    "*" => Segment::Any,
                    key => Segment::Key(key.replace("~1", "/").replace("~0", "~")),
                })
                .collect(),
        ))
    }

    /// Calls `f(location, value)` for every value the pointer reaches.
    fn for_each_mut(
        &self,
        root: &mut Value,
        f: &mut dyn FnMut(&str, &mut Value) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        fn walk(
            value: &mut Value,
            segments: &[Segment],
            location: &mut String,
            f: &mut dyn FnMut(&str, &mut Value) -> Result<(), ApiError>,
        ) -> Result<(), ApiError> {
            let Some((head, tail)) = segments.split_first() else {
                return f(location, value);
            };
            let len = location.len();
            match (head, value) {
                (Segment::Any, Value::Array(items)) => {
                    for (i, item) in items.iter_mut().enumerate() {
                        // writing to a String cannot fail
                        let _ = write!(location, "/{i}");
                        walk(item, tail, location, f)?;
                        location.truncate(len);
                    }
                }
                (Segment::Any, Value::Object(members)) => {
                    for (key, member) in members.iter_mut() {
                        push_token(location, key);
                        walk(member, tail, location, f)?;
                        location.truncate(len);
                    }
                }
                (Segment::Key(key), Value::Object(members)) => {
                    if let Some(member) = members.get_mut(key) {
                        push_token(location, key);
                        walk(member, tail, location, f)?;
                        location.truncate(len);
                    }
                }
                (Segment::Key(key), Value::Array(items)) => {
                    if let Some(item) = key.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                        push_token(location, key);
                        walk(item, tail, location, f)?;
                        location.truncate(len);
                    }
                }
                _ => {}
            }
            Ok(())
        }
        walk(root, &self.0, &mut String::new(), f)
    }
}

/// Appends `/` and `token` escaped as RFC 6901 asks (`~` → `~0`, `/` → `~1`), without the
/// temporary strings of `format!` and `replace` (this runs for every payload).
fn push_token(location: &mut String, token: &str) {
    location.push('/');
    for c in token.chars() {
        match c {
            '~' => location.push_str("~0"),
            '/' => location.push_str("~1"),
            c => location.push(c),
        }
    }
}

/// Deepest nesting a payload may have (decoded embedded JSON included). The parser allows 1024,
/// but schema validation and JMESPath recurse over the value, and the Wasm stack is 1 MiB;
/// business payloads nest a handful of levels.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Nesting depth of a value: the containers on the longest path from the root, each counting
/// as a level even when empty (a scalar is 0, `[]` and `[1]` are 1, `[[]]` is 2). Without
/// recursion; linear in the number of values.
pub fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((node, outer)) = stack.pop() {
        let level = outer.saturating_add(1);
        match node {
            Value::Array(items) => {
                deepest = deepest.max(level);
                stack.extend(items.iter().map(|v| (v, level)));
            }
            Value::Object(members) => {
                deepest = deepest.max(level);
                stack.extend(members.values().map(|v| (v, level)));
            }
            _ => {}
        }
    }
    deepest
}

fn check_depth(value: &Value) -> Result<(), ApiError> {
    if nesting_depth(value) > MAX_PAYLOAD_DEPTH {
        return Err(unprocessable(
            "TOO_DEEP",
            format!("payload nests deeper than {MAX_PAYLOAD_DEPTH} levels"),
        ));
    }
    Ok(())
}

/// The outcome of [`Registry::normalize`].
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The payload in the target type.
    pub value: Value,
    /// How many embedded JSON strings needed a repair.
    pub repairs: u32,
}

fn unprocessable(code: &str, detail: impl Into<String>) -> ApiError {
    ApiError::new(422, code, detail)
}

/// Strict I-JSON, integers beyond 2^53 rejected: what the exchange pipeline accepts.
pub fn parse_options() -> ParseOptions {
    ParseOptions {
        profile: Profile::Signet,
        reject_unsafe_integers: true,
    }
}

impl Registry {
    /// Compiles a registry; errors name the offending field (`types.<name>.schema: …`).
    pub fn compile(raw: &RawRegistry) -> Result<Self, String> {
        let mut currencies = CurrencyTable::iso4217()?;
        currencies
            .extend(&raw.currencies)
            .map_err(|e| format!("currencies: {e}"))?;
        let engine = Engine::new(Arc::new(currencies));
        let mut schemas = SchemaSet::default();
        let mut types = HashMap::new();
        for (name, ty) in &raw.types {
            let field = |f: &str| format!("types.{name}.{f}");
            let schema = schemas
                .compile(name, ty.schema.clone())
                .map_err(|e| format!("{}: {e}", field("schema")))?;
            let decoded_schema = match &ty.decoded_schema {
                Some(s) => Some(
                    schemas
                        .compile(&format!("{name}:decoded"), s.clone())
                        .map_err(|e| format!("{}: {e}", field("decoded_schema")))?,
                ),
                None => None,
            };
            let embedded_json = ty
                .embedded_json
                .iter()
                .map(|p| Pointer::parse(p))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", field("embedded_json")))?;
            let invariants = ty
                .invariants
                .iter()
                .enumerate()
                .map(|(i, inv)| {
                    engine
                        .compile(&inv.expression)
                        .map(|expression| Invariant {
                            expression,
                            detail: inv.detail.clone(),
                        })
                        .map_err(|e| {
                            format!("{}: {e}", field(&format!("invariants[{i}].expression")))
                        })
                })
                .collect::<Result<_, _>>()?;
            let fallback = ty.fallback.clone().unwrap_or_default();
            let fallback_invariants = match &fallback.invariants {
                None => None,
                Some(paths) => Some(
                    paths
                        .iter()
                        .map(|p| {
                            Pointer::parse(p).map(|ptr| {
                                ptr.0
                                    .into_iter()
                                    .map(|s| match s {
                                        Segment::Any => PatternStep::Any,
                                        Segment::Key(k) => PatternStep::Key(k),
                                    })
                                    .collect()
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("{}: {e}", field("fallback.invariants")))?,
                ),
            };
            types.insert(
                name.clone(),
                PayloadType {
                    schema,
                    embedded_json,
                    decoded_schema,
                    invariants,
                    fallback_schema: fallback.schema,
                    fallback_invariants,
                },
            );
        }
        let mut mappings = HashMap::new();
        for (i, m) in raw.mappings.iter().enumerate() {
            let field = |f: &str| format!("mappings[{i}].{f}");
            for (f, ty) in [("from", &m.from), ("to", &m.to)] {
                if !types.contains_key(ty) {
                    return Err(format!("{}: unknown type {ty:?}", field(f)));
                }
            }
            let expression = engine
                .compile(&m.expression)
                .map_err(|e| format!("{}: {e}", field("expression")))?;
            mappings.insert(
                (m.from.clone(), m.to.clone()),
                Mapping {
                    expression,
                    omit_nulls: m.omit_nulls,
                },
            );
        }
        Ok(Self {
            schemas,
            engine,
            types,
            mappings,
        })
    }

    pub fn has_type(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }

    /// Whether a payload of `from` can be normalized into `to`.
    pub fn can_map(&self, from: &str, to: &str) -> bool {
        self.has_type(from)
            && self.has_type(to)
            && (from == to
                || self
                    .mappings
                    .contains_key(&(from.to_owned(), to.to_owned())))
    }

    /// Validate → repair embedded JSON → invariants → transform → validate the target.
    /// `payload` is already sanitized. Every error is a 422 with the stage's code.
    pub fn normalize(&self, from: &str, to: &str, payload: Value) -> Result<Normalized, ApiError> {
        match self.normalize_with(from, to, payload, &[], false)? {
            Outcome::Normalized(n) => Ok(n),
            Outcome::NeedsFallback(need) => Err(need.error),
        }
    }

    /// [`Registry::normalize`], with the LLM fallback's repairs: an embedded text deterministic
    /// repair cannot fix takes its value from `fixes` (by location); without one, and with
    /// `fallback`, the first such text is answered as [`Outcome::NeedsFallback`].
    pub fn normalize_with(
        &self,
        from: &str,
        to: &str,
        payload: Value,
        fixes: &[Fix],
        fallback: bool,
    ) -> Result<Outcome, ApiError> {
        let source = self.types.get(from).ok_or_else(|| {
            unprocessable("UNKNOWN_TYPE", format!("unknown payload_type {from:?}"))
        })?;
        let target = self
            .types
            .get(to)
            .ok_or_else(|| unprocessable("UNKNOWN_TYPE", format!("unknown target_type {to:?}")))?;
        let mapping = match self.mappings.get(&(from.to_owned(), to.to_owned())) {
            Some(m) => Some(m),
            None if from == to => None,
            None => {
                return Err(unprocessable(
                    "NO_MAPPING",
                    format!("no mapping from {from} to {to}"),
                ))
            }
        };

        check_depth(&payload)?;
        self.schemas
            .validate(source.schema, &payload)
            .map_err(|e| {
                unprocessable(
                    "SCHEMA_INVALID",
                    format!("payload does not match {from}: {e}"),
                )
            })?;
        let mut decoded = payload;
        let mut need = None;
        let wanted = fallback.then_some(&mut need);
        let repairs = match decode_embedded_json(&source.embedded_json, &mut decoded, fixes, wanted)
        {
            Ok(repairs) => repairs,
            Err(error) => {
                return match need {
                    Some((location, text)) => Ok(Outcome::NeedsFallback(Box::new(FallbackNeed {
                        location,
                        text,
                        error,
                        schema: source.fallback_schema.clone(),
                        invariants: source.fallback_invariants.clone(),
                    }))),
                    None => Err(error),
                }
            }
        };
        check_depth(&decoded)?;
        if let Some(schema) = source.decoded_schema {
            self.schemas.validate(schema, &decoded).map_err(|e| {
                unprocessable(
                    "SCHEMA_INVALID",
                    format!("payload does not match {from}: {e}"),
                )
            })?;
        }
        // the source invariants and the mapping read the same data: convert it once
        let input =
            (!source.invariants.is_empty() || mapping.is_some()).then(|| Input::new(&decoded));
        self.check_invariants(source, input.as_ref())?;

        let value = match mapping {
            None => decoded,
            Some(m) => {
                let input = input.unwrap_or_else(|| Input::new(&decoded));
                let mut out = input
                    .and_then(|input| self.engine.evaluate_on(&m.expression, &input))
                    .and_then(|out| transform::to_json(&out))
                    .map_err(|e| {
                        unprocessable("TRANSFORM_FAILED", format!("mapping {from} → {to}: {e}"))
                    })?;
                if m.omit_nulls {
                    omit_nulls(&mut out);
                }
                out
            }
        };
        self.schemas.validate(target.schema, &value).map_err(|e| {
            unprocessable(
                "TARGET_SCHEMA_INVALID",
                format!("normalized payload does not match {to}: {e}"),
            )
        })?;
        if !target.invariants.is_empty() {
            self.check_invariants(target, Some(&Input::new(&value)))?;
        }
        Ok(Outcome::Normalized(Normalized { value, repairs }))
    }

    /// `input`: the value as JMESPath data (`None` when `ty` has no invariants).
    fn check_invariants(
        &self,
        ty: &PayloadType,
        input: Option<&Result<Input, String>>,
    ) -> Result<(), ApiError> {
        let Some(input) = input else {
            return Ok(());
        };
        for inv in &ty.invariants {
            let holds = match input {
                Ok(input) => self.engine.holds(&inv.expression, input),
                Err(e) => Err(e.clone()),
            };
            match holds {
                Ok(true) => {}
                Ok(false) => return Err(unprocessable("INVARIANT_FAILED", inv.detail.clone())),
                Err(e) => {
                    return Err(unprocessable(
                        "INVARIANT_FAILED",
                        format!("{} ({e})", inv.detail),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Replaces each embedded JSON string by its value, repairing it when the strict parse fails
/// with a syntax error. Returns the number of repaired strings. A string deterministic repair
/// cannot fix takes its value from `fixes`; without one, when `need` is given, it is recorded
/// there (location, text) and the error returned.
fn decode_embedded_json(
    pointers: &[Pointer],
    payload: &mut Value,
    fixes: &[Fix],
    mut need: Option<&mut Option<(String, String)>>,
) -> Result<u32, ApiError> {
    let mut repairs = 0;
    for pointer in pointers {
        pointer.for_each_mut(payload, &mut |location, value| {
            let Value::String(text) = value else {
                return Ok(()); // the source schema decides whether non-strings are allowed
            };
            let decoded = match canonical::parse(text.as_bytes(), &parse_options()) {
                Ok(v) => v,
                Err(e) if e.code() != "INVALID_JSON" => {
                    return Err(unprocessable(
                        e.code(),
                        format!("embedded JSON at {location}: {e}"),
                    ))
                }
                Err(first) => {
                    let repaired = match repair(text) {
                        None => Err(unprocessable(
                            "REPAIR_FAILED",
                            format!("embedded JSON at {location}: {first}"),
                        )),
                        Some(fixed) => canonical::parse(fixed.as_bytes(), &parse_options())
                            .map_err(|e| {
                                unprocessable(
                                    "REPAIR_FAILED",
                                    format!("embedded JSON at {location} cannot be repaired: {e}"),
                                )
                            }),
                    };
                    match repaired {
                        Ok(v) => {
                            repairs += 1;
                            v
                        }
                        Err(e) => match fixes.iter().find(|f| f.location == location) {
                            Some(fix) => fix.value.clone(),
                            None => {
                                if let Some(need) = need.as_deref_mut() {
                                    *need = Some((location.to_owned(), text.clone()));
                                }
                                return Err(e);
                            }
                        },
                    }
                }
            };
            // its strings are string values of the payload too (SPEC §4 sanitize)
            let mut decoded = decoded;
            sanitize(&mut decoded);
            *value = decoded;
            Ok(())
        })?;
    }
    Ok(repairs)
}

fn omit_nulls(value: &mut Value) {
    let mut stack = vec![value];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(members) => {
                members.retain(|_, v| !v.is_null());
                stack.extend(members.values_mut());
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OPENAI: &str = "openai.tooluse.invoice.v1";
    const INVOICE: &str = "invoice.iso20022.v1";

    fn builtin() -> Registry {
        Registry::compile(&RawRegistry::builtin().unwrap()).unwrap()
    }

    fn tool_call(arguments: &str) -> Value {
        json!({"tool_calls":[{"type":"function","function":{"name":"create_invoice","arguments":arguments}}]})
    }

    const ARGS: &str = r#"{"invoice_id":"INV-1","amount":123.45,"currency":"USD","customer_name":"Acme","description":"Services"}"#;

    #[test]
    fn seed_example_normalizes() {
        let out = builtin()
            .normalize(OPENAI, INVOICE, tool_call(ARGS))
            .unwrap();
        assert_eq!(out.repairs, 0);
        assert_eq!(
            out.value,
            json!({"invoice_id":"INV-1","amount_minor":12345,"currency":"USD","customer":{"name":"Acme"},"description":"Services"})
        );
    }

    #[test]
    fn strings_inside_embedded_json_are_sanitized_too() {
        let args = r#"{"invoice_id":"INV-1","amount":1,"currency":"USD","customer_name":"Ac\u0001me","description":"line 1\r\nline 2\rline 3"}"#;
        let out = builtin()
            .normalize(OPENAI, INVOICE, tool_call(args))
            .unwrap();
        assert_eq!(out.value["customer"]["name"], "Acme");
        assert_eq!(out.value["description"], "line 1\nline 2\nline 3");
    }

    #[test]
    fn broken_arguments_are_repaired_and_counted() {
        let args = "```json\n{invoice_id: 'INV-1', amount: 0.29, currency: 'USD', customer_name: 'Acme',}\n```";
        let out = builtin()
            .normalize(OPENAI, INVOICE, tool_call(args))
            .unwrap();
        assert_eq!(out.repairs, 1);
        assert_eq!(
            out.value,
            json!({"invoice_id":"INV-1","amount_minor":29,"currency":"USD","customer":{"name":"Acme"}})
        );
    }

    #[test]
    fn each_stage_has_its_code() {
        let r = builtin();
        let code = |payload: Value| r.normalize(OPENAI, INVOICE, payload).unwrap_err().code;
        assert_eq!(code(json!({"tool_calls": "x"})), "SCHEMA_INVALID");
        assert_eq!(code(tool_call("{{{ nope")), "REPAIR_FAILED");
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":1,"amount":2,"currency":"USD","customer_name":"A"}"#
            )),
            "DUPLICATE_KEY"
        );
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":1,"currency":"USD"}"#
            )),
            "SCHEMA_INVALID"
        );
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":-5,"currency":"USD","customer_name":"A"}"#
            )),
            "INVARIANT_FAILED"
        );
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":5,"currency":"ABC","customer_name":"A"}"#
            )),
            "INVARIANT_FAILED"
        );
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":1.005,"currency":"USD","customer_name":"A"}"#
            )),
            "TRANSFORM_FAILED"
        );
        assert_eq!(
            code(tool_call(&format!(
                r#"{{"invoice_id":"{}","amount":1,"currency":"USD","customer_name":"A"}}"#,
                "X".repeat(36)
            ))),
            "TARGET_SCHEMA_INVALID"
        );
        assert_eq!(
            code(tool_call(
                r#"{"invoice_id":"I","amount":9007199254740993,"currency":"USD","customer_name":"A"}"#
            )),
            "UNSAFE_INTEGER"
        );
        assert_eq!(
            r.normalize("nope", INVOICE, json!({})).unwrap_err().code,
            "UNKNOWN_TYPE"
        );
        assert_eq!(
            r.normalize(INVOICE, OPENAI, json!({})).unwrap_err().code,
            "NO_MAPPING"
        );
    }

    #[test]
    fn deep_payloads_are_refused_before_recursive_stages() {
        let r = builtin();
        let mut deep = json!(1);
        for _ in 0..MAX_PAYLOAD_DEPTH + 1 {
            deep = json!([deep]);
        }
        assert_eq!(nesting_depth(&deep), MAX_PAYLOAD_DEPTH + 1);
        let err = r.normalize(INVOICE, INVOICE, deep.clone()).unwrap_err();
        assert_eq!(err.code, "TOO_DEEP");
        // an empty container is a level too
        for (value, depth) in [
            (json!(1), 0),
            (json!([]), 1),
            (json!({}), 1),
            (json!([1]), 1),
            (json!([[]]), 2),
            (json!({"a": [{}], "b": 1}), 3),
        ] {
            assert_eq!(nesting_depth(&value), depth, "{value}");
        }
        let mut empty_inside = json!([]);
        for _ in 0..MAX_PAYLOAD_DEPTH {
            empty_inside = json!([empty_inside]);
        }
        assert_eq!(nesting_depth(&empty_inside), MAX_PAYLOAD_DEPTH + 1);
        let err = r.normalize(INVOICE, INVOICE, empty_inside).unwrap_err();
        assert_eq!(err.code, "TOO_DEEP");
        // also when the depth hides in an embedded JSON string
        let args = format!(
            r#"{{"invoice_id":"I","amount":1,"currency":"USD","customer_name":"A","x":{deep}}}"#
        );
        let err = r.normalize(OPENAI, INVOICE, tool_call(&args)).unwrap_err();
        assert_eq!(err.code, "TOO_DEEP", "{err}");
    }

    #[test]
    fn identity_when_source_equals_target() {
        let r = builtin();
        let invoice =
            json!({"invoice_id":"I","amount_minor":5,"currency":"EUR","customer":{"name":"A"}});
        assert_eq!(
            r.normalize(INVOICE, INVOICE, invoice.clone())
                .unwrap()
                .value,
            invoice
        );
        assert!(
            r.can_map(INVOICE, INVOICE)
                && r.can_map(OPENAI, INVOICE)
                && !r.can_map(INVOICE, OPENAI)
        );
    }

    #[test]
    fn a_new_type_is_configuration_only() {
        let extra: RawRegistry = serde_json::from_value(json!({
            "types": {"acme.order.v1": {
                "schema": {"type":"object","required":["qty","price","ccy"]},
                "invariants": [{"expression": "qty > `0`", "detail": "qty must be positive"}]
            }},
            "mappings": [{"from": "acme.order.v1", "to": INVOICE, "expression":
                "{invoice_id: 'ORD', amount_minor: to_minor(price, ccy), currency: ccy, customer: {name: 'acme'}}"}],
            "currencies": {"XTS": 2}
        }))
        .unwrap();
        let r = Registry::compile(&RawRegistry::builtin().unwrap().merge(&extra)).unwrap();
        let out = r
            .normalize(
                "acme.order.v1",
                INVOICE,
                json!({"qty":2,"price":"9.99","ccy":"XTS"}),
            )
            .unwrap();
        assert_eq!(out.value["amount_minor"], json!(999));
        let err = r
            .normalize(
                "acme.order.v1",
                INVOICE,
                json!({"qty":0,"price":1,"ccy":"EUR"}),
            )
            .unwrap_err();
        assert_eq!(
            (err.code.as_str(), err.detail.as_str()),
            ("INVARIANT_FAILED", "qty must be positive")
        );
        // the built-in types are still there
        assert!(r.can_map(OPENAI, INVOICE));
    }

    #[test]
    fn compile_errors_name_the_field() {
        let bad = |v: Value| {
            Registry::compile(&serde_json::from_value::<RawRegistry>(v).unwrap())
                .err()
                .unwrap()
        };
        assert!(bad(json!({"types":{"t":{"schema":{"type":5}}}})).starts_with("types.t.schema:"));
        assert!(
            bad(json!({"types":{"t":{"schema":{},"embedded_json":["a/b"]}}}))
                .starts_with("types.t.embedded_json:")
        );
        assert!(bad(json!({"types":{"t":{"schema":{},"invariants":[{"expression":"nope(@)","detail":"d"}]}}}))
            .starts_with("types.t.invariants[0].expression:"));
        assert!(
            bad(json!({"mappings":[{"from":"a","to":"b","expression":"@"}]}))
                .starts_with("mappings[0].from:")
        );
        assert!(bad(json!({"currencies":{"usd":2}})).starts_with("currencies:"));
        assert!(serde_json::from_value::<RawRegistry>(json!({"typos": {}})).is_err());
    }

    #[test]
    fn pointer_wildcards_reach_every_item() {
        let p = Pointer::parse("/a/*/b").unwrap();
        let mut v = json!({"a":[{"b":1},{"c":2},{"b":3}]});
        let mut seen = Vec::new();
        p.for_each_mut(&mut v, &mut |loc, val| {
            seen.push((loc.to_owned(), val.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                ("/a/0/b".to_owned(), json!(1)),
                ("/a/2/b".to_owned(), json!(3))
            ]
        );
        assert_eq!(
            Pointer::parse("/x~1y").unwrap(),
            Pointer(vec![Segment::Key("x/y".into())])
        );
        // locations escape what they name (RFC 6901)
        let p = Pointer::parse("/*/x~1y").unwrap();
        let mut v = json!({"a/b~": {"x/y": 1}});
        let mut seen = Vec::new();
        p.for_each_mut(&mut v, &mut |loc, _| {
            seen.push(loc.to_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec!["/a~1b~0/x~1y".to_owned()]);
    }
}
