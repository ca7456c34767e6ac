//! SPEC §4 sanitizing of string values: drop C0 controls except TAB, LF, CR, and DEL; then turn
//! CRLF and lone CR into LF. Member names are left alone (they are matched by schemas).
//!
//! Cost: one pass over each string, O(1) per byte, no recursion; linear in the payload
//! (`benches/worst_case.rs`: flat ns/byte from 64 KiB to 4 MiB).

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
    // 8 bytes at a time: only a word holding a byte below 0x20 or a DEL is looked at byte by
    // byte (TAB and LF, which stay, send a word there too). Most strings have neither.
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let needs = |b: &u8| (*b < 0x20 && *b != b'\t' && *b != b'\n') || *b == 0x7f;
    let mut words = s.as_bytes().chunks_exact(8);
    for word in &mut words {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(word);
        let w = u64::from_le_bytes(buf);
        let del = w ^ (0x7f * ONES);
        // some byte < 0x20, or some byte == 0x7f (exact tests, Hacker's Delight 6-1)
        let suspect = (w.wrapping_sub(0x20 * ONES) & !w & HIGH) != 0
            || (del.wrapping_sub(ONES) & !del & HIGH) != 0;
        if suspect && word.iter().any(needs) {
            return true;
        }
    }
    words.remainder().iter().any(needs)
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
    fn word_check_agrees_with_the_byte_check() {
        let by_byte = |s: &str| {
            s.bytes()
                .any(|b| (b < 0x20 && b != b'\t' && b != b'\n') || b == 0x7f)
        };
        // every ASCII byte at every position of strings up to two words and a bit long, with
        // non-ASCII neighbours too
        for filler in ["a", "\u{e9}", "\u{20ac}", "\t"] {
            for len in 0..20 {
                for at in 0..len {
                    for b in 0u8..0x80 {
                        let mut text: Vec<String> = vec![filler.to_owned(); len];
                        text[at] = char::from(b).to_string();
                        let text = text.concat();
                        assert_eq!(needs_sanitizing(&text), by_byte(&text), "{text:?}");
                    }
                }
            }
        }
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
