//! Reads `filter_metadata[<name>]` out of a serialized `envoy.config.core.v3.Metadata`.
//!
//! Envoy's Wasm host returns the `xds.route_metadata` property as the protobuf bytes of that
//! message (it serializes CEL message values with `SerializeToString`). Only four messages are
//! involved (Metadata, Struct, Value, ListValue), so a ~100-line wire-format reader does it;
//! `prost` + `prost-types` would add code generation or a runtime for the same result.
//!
//! ```text
//! Metadata  { map<string, Struct> filter_metadata = 1; map<string, Any> typed_filter_metadata = 2; }
//! Struct    { map<string, Value> fields = 1; }
//! Value     { oneof kind { NullValue null_value = 1; double number_value = 2; string string_value = 3;
//!                          bool bool_value = 4; Struct struct_value = 5; ListValue list_value = 6; } }
//! ListValue { repeated Value values = 1; }
//! map entry { key = 1; value = 2; }
//! ```

use serde_json::{Map, Number, Value};

/// Nesting limit for Struct/List values (route metadata is written by operators; still bounded).
const MAX_DEPTH: usize = 32;

/// The `filter_metadata[filter]` struct as JSON, `None` if absent.
pub fn filter_metadata(metadata: &[u8], filter: &str) -> Result<Option<Value>, String> {
    let mut found = None;
    let mut reader = Reader::new(metadata);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, Wire::Len) => {
                let entry = reader.bytes()?;
                let (key, value) = map_entry(entry)?;
                if key == filter {
                    // a repeated map key: the last one wins, as in protobuf
                    found = Some(match value {
                        Some(bytes) => read_struct(bytes, 0)?,
                        None => Value::Object(Map::new()),
                    });
                }
            }
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok(found)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

struct Reader<'a> {
    buf: &'a [u8],
}

const TRUNCATED: &str = "truncated protobuf";

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.buf.split_first().ok_or(TRUNCATED)?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("protobuf varint too long".into())
    }

    fn key(&mut self) -> Result<Option<(u64, Wire)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            other => return Err(format!("unsupported protobuf wire type {other}")),
        };
        Ok(Some((key >> 3, wire)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err(TRUNCATED.into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|_| TRUNCATED)?;
        self.take(len)
    }

    fn fixed64(&mut self) -> Result<u64, String> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| TRUNCATED)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn skip(&mut self, wire: Wire) -> Result<(), String> {
        match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.take(8).map(drop),
            Wire::Len => self.bytes().map(drop),
            Wire::Fixed32 => self.take(4).map(drop),
        }
    }
}

/// A map entry: (key, raw value bytes).
fn map_entry(entry: &[u8]) -> Result<(String, Option<&[u8]>), String> {
    let mut reader = Reader::new(entry);
    let (mut key, mut value) = (String::new(), None);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, Wire::Len) => {
                key = String::from_utf8(reader.bytes()?.to_vec())
                    .map_err(|_| "map key is not UTF-8")?
            }
            (2, Wire::Len) => value = Some(reader.bytes()?),
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn read_struct(bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("metadata nested too deeply".into());
    }
    let mut fields = Map::new();
    let mut reader = Reader::new(bytes);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, Wire::Len) => {
                let (key, value) = map_entry(reader.bytes()?)?;
                let value = match value {
                    Some(v) => read_value(v, depth + 1)?,
                    None => Value::Null,
                };
                fields.insert(key, value);
            }
            (_, wire) => reader.skip(wire)?,
        }
    }
    Ok(Value::Object(fields))
}

fn read_value(bytes: &[u8], depth: usize) -> Result<Value, String> {
    let mut value = Value::Null;
    let mut reader = Reader::new(bytes);
    while let Some((field, wire)) = reader.key()? {
        value = match (field, wire) {
            (1, Wire::Varint) => {
                reader.varint()?;
                Value::Null
            }
            (2, Wire::Fixed64) => number(f64::from_bits(reader.fixed64()?)),
            (3, Wire::Len) => Value::String(
                String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "string is not UTF-8")?,
            ),
            (4, Wire::Varint) => Value::Bool(reader.varint()? != 0),
            (5, Wire::Len) => read_struct(reader.bytes()?, depth + 1)?,
            (6, Wire::Len) => {
                let mut items = Vec::new();
                let mut list = Reader::new(reader.bytes()?);
                while let Some((field, wire)) = list.key()? {
                    match (field, wire) {
                        (1, Wire::Len) => items.push(read_value(list.bytes()?, depth + 1)?),
                        (_, wire) => list.skip(wire)?,
                    }
                }
                Value::Array(items)
            }
            (_, wire) => {
                reader.skip(wire)?;
                continue;
            }
        };
    }
    Ok(value)
}

/// Struct numbers are doubles; integral ones become JSON integers so `65536` reads as a `u64`.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        // exact: |n| <= 2^53 and integral
        #[allow(clippy::cast_possible_truncation)]
        let i = n as i64;
        Value::Number(Number::from(i))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    // A minimal protobuf writer, to build the test messages the way Envoy serializes them.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn len_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    fn entry(key: &str, value: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        len_field(1, key.as_bytes(), &mut e);
        len_field(2, value, &mut e);
        e
    }
    fn value(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        match v {
            Value::Null => {
                varint(1 << 3, &mut out);
                varint(0, &mut out);
            }
            Value::Number(n) => {
                varint(2 << 3 | 1, &mut out);
                out.extend_from_slice(&n.as_f64().unwrap().to_le_bytes());
            }
            Value::String(s) => len_field(3, s.as_bytes(), &mut out),
            Value::Bool(b) => {
                varint(4 << 3, &mut out);
                varint(u64::from(*b), &mut out);
            }
            Value::Object(_) => len_field(5, &structure(v), &mut out),
            Value::Array(items) => {
                let mut list = Vec::new();
                for item in items {
                    len_field(1, &value(item), &mut list);
                }
                len_field(6, &list, &mut out);
            }
        }
        out
    }
    fn structure(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, member) in v.as_object().unwrap() {
            len_field(1, &entry(k, &value(member)), &mut out);
        }
        out
    }

    /// `envoy.config.core.v3.Metadata` with the given filter_metadata structs.
    pub(crate) fn metadata(filters: &[(&str, Value)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, v) in filters {
            len_field(1, &entry(name, &structure(v)), &mut out);
        }
        // typed_filter_metadata (field 2) is skipped by the reader
        len_field(2, &entry("x", b"\x0a\x01a"), &mut out);
        out
    }

    #[test]
    fn reads_the_named_filter_struct() {
        let signet = json!({"mode":"inline","body_limit_bytes":65536,"fail_open":true,
                            "ratio":0.5,"nested":{"list":[1,"a",null,false,{"x":[]}]}});
        let bytes = metadata(&[("other", json!({"a":1})), ("signet", signet.clone())]);
        assert_eq!(filter_metadata(&bytes, "signet").unwrap(), Some(signet));
        assert_eq!(filter_metadata(&bytes, "absent").unwrap(), None);
        assert_eq!(filter_metadata(&[], "signet").unwrap(), None);
    }

    #[test]
    fn integral_doubles_become_integers() {
        let bytes = metadata(&[("s", json!({"n": 65536.0, "neg": -3.0}))]);
        let v = filter_metadata(&bytes, "s").unwrap().unwrap();
        assert!(v["n"].is_u64() && v["neg"].is_i64());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let bytes = metadata(&[("signet", json!({"mode":"exchange"}))]);
        for cut in 1..bytes.len() {
            let _ = filter_metadata(&bytes[..cut], "signet");
        }
        assert!(filter_metadata(&[0x0a, 0x05, 0x01], "signet").is_err());
        assert!(filter_metadata(&[0xff; 11], "signet").is_err());
        assert!(filter_metadata(&[0x0b], "signet").is_err()); // wire type 3 (groups)
    }
}
