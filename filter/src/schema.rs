//! JSON Schema validation with `boon` (drafts 4 to 2020-12; 2020-12 when `$schema` is absent).
//! All schemas of a registry are compiled once, at configuration load, into one `boon::Schemas`.
//!
//! Cost: validation visits each instance node once per subschema that applies to it; schemas
//! come from the operator's registry, fixed at load (the built-in ones: one non-recursive
//! `$ref`, `maxItems: 16` tool calls, `maxLength: 65536` arguments), so for a registry it is
//! linear in the payload, which the route's body limit and `registry::MAX_PAYLOAD_DEPTH` (64,
//! checked before) bound. Measured in `benches/worst_case.rs`.

use boon::{Compiler, SchemaIndex, Schemas};
use serde_json::Value;

/// The compiled schemas of a registry.
pub struct SchemaSet {
    schemas: Schemas,
    compiler: Compiler,
}

/// Handle of one compiled schema inside a [`SchemaSet`].
#[derive(Debug, Clone, Copy)]
pub struct SchemaId(SchemaIndex);

impl Default for SchemaSet {
    fn default() -> Self {
        let mut compiler = Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        Self {
            schemas: Schemas::new(),
            compiler,
        }
    }
}

impl SchemaSet {
    /// Compiles `schema` under a unique `name` (used for its internal URL and error messages).
    pub fn compile(&mut self, name: &str, schema: Value) -> Result<SchemaId, String> {
        let url = format!("urn:signet:schema:{name}");
        self.compiler
            .add_resource(&url, schema)
            .map_err(|e| e.to_string())?;
        self.compiler
            .compile(&url, &mut self.schemas)
            .map(SchemaId)
            .map_err(|e| e.to_string())
    }

    /// Validates; the error names the failing locations (JSON pointers) and rules.
    pub fn validate(&self, id: SchemaId, instance: &Value) -> Result<(), String> {
        self.schemas
            .validate(instance, id.0)
            .map_err(|err| describe(&err))
    }
}

/// A one-line description of the leaf errors (at most three), e.g.
/// `at '/amount': want number, but got string`.
fn describe(err: &boon::ValidationError<'_, '_>) -> String {
    let mut leaves = Vec::new();
    let mut stack = vec![err];
    while let Some(e) = stack.pop() {
        if e.causes.is_empty() {
            leaves.push(format!("at '{}': {}", e.instance_location, e.kind));
        } else {
            stack.extend(e.causes.iter().rev());
        }
    }
    let more = leaves.len().saturating_sub(3);
    leaves.truncate(3);
    let mut text = leaves.join("; ");
    if more > 0 {
        text.push_str(&format!(" (and {more} more)"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_and_names_the_location() {
        let mut set = SchemaSet::default();
        let id = set
            .compile(
                "t",
                json!({"type":"object","required":["a"],"properties":{"a":{"type":"number","minimum":0}},"additionalProperties":false}),
            )
            .unwrap();
        assert!(set.validate(id, &json!({"a": 1})).is_ok());
        let err = set.validate(id, &json!({"a": "x"})).unwrap_err();
        assert!(err.contains("/a"), "{err}");
        let err = set.validate(id, &json!({"a": -1, "b": 2})).unwrap_err();
        assert!(err.contains("/a") && err.contains("b"), "{err}");
        assert!(set
            .validate(id, &json!({}))
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn rejects_invalid_schemas_at_compile_time() {
        let mut set = SchemaSet::default();
        assert!(set.compile("bad", json!({"type": 12})).is_err());
        assert!(set.compile("bad2", json!({"$ref": "urn:nowhere"})).is_err());
    }

    #[test]
    fn several_schemas_share_one_set() {
        let mut set = SchemaSet::default();
        let a = set.compile("a", json!({"type":"string"})).unwrap();
        let b = set.compile("b", json!({"type":"integer"})).unwrap();
        assert!(set.validate(a, &json!("x")).is_ok());
        assert!(set.validate(b, &json!("x")).is_err());
        assert!(set.validate(b, &json!(3)).is_ok());
    }
}
