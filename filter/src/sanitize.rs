//! SPEC §4 sanitizing of string values: drop C0 controls except TAB, LF, CR, and DEL; then turn
//! CRLF and lone CR into LF. Member names are left alone (they are matched by schemas).

use serde_json::Value;

/// Sanitizes every string value in place (iteratively: payloads may nest up to the parser's
/// depth limit, which recursion on a Wasm stack should not be trusted with).
pub fn sanitize(value: &mut Value) {
    let mut stack: Vec<&mut Value> = vec![value];
    while let Some(node) = stack.pop() {
        match node {
            Value::String(s) => {
                if needs_sanitizing(s) {
                    *s = sanitize_str(s);
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(members) => stack.extend(members.values_mut()),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

fn needs_sanitizing(s: &str) -> bool {
    s.bytes()
        .any(|b| (b < 0x20 && b != b'\t' && b != b'\n') || b == 0x7f)
}

pub fn sanitize_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().filter(|&c| !is_removed(c)).peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    out
}

fn is_removed(c: char) -> bool {
    (c < '\u{20}' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{7f}'
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removes_controls_and_normalizes_newlines() {
        assert_eq!(sanitize_str("a\u{0}b\u{1f}c\u{7f}d"), "abcd");
        assert_eq!(sanitize_str("tab\there\nline"), "tab\there\nline");
        assert_eq!(sanitize_str("a\r\nb\rc\n\rd"), "a\nb\nc\n\nd");
        // a control between CR and LF is removed first, so the pair still becomes one LF
        assert_eq!(sanitize_str("a\r\u{0}\nb"), "a\nb");
        assert_eq!(sanitize_str("é€😀\u{80}"), "é€😀\u{80}");
    }

    #[test]
    fn walks_nested_values_and_leaves_names_and_numbers() {
        let mut v = json!({"k\u{1}": ["x\r\ny", {"z": "\u{7f}q"}], "n": 1.5, "b": true});
        sanitize(&mut v);
        assert_eq!(
            v,
            json!({"k\u{1}": ["x\ny", {"z": "q"}], "n": 1.5, "b": true})
        );
    }
}
