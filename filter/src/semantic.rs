//! The semantic invariants of an LLM-fallback repair: the repaired value must hold the values
//! the broken text held, at the same places. An LLM asked to fix syntax may also "fix" an
//! amount, a currency or an id; this catches it.
//!
//! The broken text does not parse, so [`scan`] reads it tolerantly: one pass that knows string
//! literals (either quote, escapes, unterminated), bare words, brackets, colons and commas, and
//! records each scalar with its path (member names and array positions). [`check`] then compares
//! the repaired value's scalars with those, path by path: never by searching the text for a
//! value (an amount that moved to another member, or that appears elsewhere in the text, does
//! not pass). A path the scan cannot place (the text is broken there) fails: refusing a repair
//! is safe, passing a changed value is not.
//!
//! Cost: linear in the text and the value; at most [`MAX_SCALARS`] scalars are recorded.

use serde_json::Value;
use signet_protocol::canonical;

/// Scalars a scan records at most (the text is at most 64 KiB).
pub const MAX_SCALARS: usize = 16_384;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A step of a pattern: a member name, or `*` (any member or item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternStep {
    Any,
    Key(String),
}

/// A scalar of the broken text as written: a string literal (unescaped) or a bare word
/// (number, literal, or an unquoted word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Str(String),
    Bare(String),
}

#[derive(Debug)]
enum Frame {
    Object {
        /// The member name read, waiting for its colon.
        candidate: Option<String>,
        /// The name whose value comes next (after its colon).
        key: Option<String>,
    },
    Array {
        index: usize,
    },
}

/// The scalars of `text` with their paths, as far as the brackets tell.
pub fn scan(text: &str) -> Vec<(Vec<Step>, Token)> {
    let mut out = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut path: Vec<Step> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if out.len() >= MAX_SCALARS {
            break;
        }
        match c {
            c if c.is_whitespace() => {}
            '{' | '[' => {
                // the container is the value of the pending key or the next array item
                let step = value_step(&mut stack);
                let frame = if c == '{' {
                    Frame::Object {
                        candidate: None,
                        key: None,
                    }
                } else {
                    Frame::Array { index: 0 }
                };
                if !stack.is_empty() || step.is_some() {
                    path.push(step.unwrap_or(Step::Index(usize::MAX)));
                }
                stack.push(frame);
            }
            '}' | ']' => {
                if stack.pop().is_some() {
                    path.pop();
                }
            }
            ':' => {
                if let Some(Frame::Object { candidate, key }) = stack.last_mut() {
                    *key = candidate.take();
                }
            }
            ',' => match stack.last_mut() {
                Some(Frame::Object { candidate, key }) => {
                    *candidate = None;
                    *key = None;
                }
                Some(Frame::Array { index }) => *index = index.saturating_add(1),
                None => {}
            },
            '"' | '\'' => {
                let s = string(c, &mut chars);
                scalar(&mut stack, &path, Token::Str(s), &mut out);
            }
            c => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || "{}[]:,\"'".contains(n) {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                scalar(&mut stack, &path, Token::Bare(word), &mut out);
            }
        }
    }
    out
}

/// The step under which the next value of the innermost container goes (`None` at the root
/// or for a value without a member name).
fn value_step(stack: &mut [Frame]) -> Option<Step> {
    match stack.last_mut()? {
        Frame::Object { key, candidate } => {
            *candidate = None;
            key.take().map(Step::Key)
        }
        Frame::Array { index } => Some(Step::Index(*index)),
    }
}

fn scalar(stack: &mut [Frame], path: &[Step], token: Token, out: &mut Vec<(Vec<Step>, Token)>) {
    match stack.last_mut() {
        None => out.push((path.to_vec(), token)),
        Some(Frame::Object { candidate, key }) => match key.take() {
            Some(name) => {
                let mut at = path.to_vec();
                at.push(Step::Key(name));
                out.push((at, token));
            }
            // a member name, if a colon follows
            None => {
                *candidate = Some(match token {
                    Token::Str(s) | Token::Bare(s) => s,
                })
            }
        },
        Some(Frame::Array { index }) => {
            let mut at = path.to_vec();
            at.push(Step::Index(*index));
            out.push((at, token));
        }
    }
}

/// A string literal after its opening `quote`, unescaped; an unterminated one ends with the
/// text.
fn string(quote: char, chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut s = String::new();
    while let Some(c) = chars.next() {
        match c {
            c if c == quote => break,
            '\\' => match chars.next() {
                Some('n') => s.push('\n'),
                Some('t') => s.push('\t'),
                Some('r') => s.push('\r'),
                Some('b') => s.push('\u{8}'),
                Some('f') => s.push('\u{c}'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        Some(ch) => s.push(ch),
                        // a surrogate or bad escape: kept as written, so it compares unequal
                        None => {
                            s.push_str("\\u");
                            s.push_str(&hex);
                        }
                    }
                }
                Some(other) => s.push(other),
                None => break,
            },
            c => s.push(c),
        }
    }
    s
}

/// Checks `repaired` against the broken `original`: each scalar of `repaired` whose path
/// matches one of `patterns` (every scalar when `None`) must be the one scalar the scan found
/// at that path, and each scalar the scan found at a matching path must be in `repaired`.
/// The error names the first path that differs.
pub fn check(
    original: &str,
    repaired: &Value,
    patterns: Option<&[Vec<PatternStep>]>,
) -> Result<(), String> {
    let matches = |path: &[Step]| patterns.is_none_or(|ps| ps.iter().any(|p| matches(p, path)));
    let scanned: Vec<(Vec<Step>, Token)> = scan(original)
        .into_iter()
        .filter(|(path, _)| matches(path))
        .collect();
    let leaves = leaves(repaired);
    for (path, value) in leaves.iter().filter(|(path, _)| matches(path)) {
        let mut at = scanned.iter().filter(|(p, _)| p == path);
        let (Some((_, token)), None) = (at.next(), at.next()) else {
            return Err(format!(
                "{} is not a value of the original text at that place",
                pointer(path)
            ));
        };
        if !same(token, value) {
            return Err(format!("{} differs from the original text", pointer(path)));
        }
    }
    for (path, _) in &scanned {
        if !leaves.iter().any(|(p, _)| p == path) {
            return Err(format!(
                "{} of the original text is missing from the repair",
                pointer(path)
            ));
        }
    }
    Ok(())
}

fn matches(pattern: &[PatternStep], path: &[Step]) -> bool {
    pattern.len() == path.len()
        && pattern.iter().zip(path).all(|(p, s)| match (p, s) {
            (PatternStep::Any, _) => true,
            (PatternStep::Key(k), Step::Key(name)) => k == name,
            (PatternStep::Key(k), Step::Index(i)) => k.parse::<usize>().ok() == Some(*i),
        })
}

/// Every scalar of `value` with its path, in order (members by name, items by position),
/// without recursion.
fn leaves(value: &Value) -> Vec<(Vec<Step>, &Value)> {
    let mut out = Vec::new();
    let mut stack = vec![(Vec::new(), value)];
    while let Some((path, node)) = stack.pop() {
        match node {
            Value::Object(members) => {
                for (k, v) in members.iter().rev() {
                    let mut p = path.clone();
                    p.push(Step::Key(k.clone()));
                    stack.push((p, v));
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate().rev() {
                    let mut p = path.clone();
                    p.push(Step::Index(i));
                    stack.push((p, v));
                }
            }
            scalar => out.push((path, scalar)),
        }
    }
    out
}

/// Whether the token as written is the repaired scalar: the same string (NFC), the same
/// number (as IEEE doubles: `12.50` is `12.5`; a quoted number is its digits), or the same
/// literal (Python's `True`/`False`/`None` included).
fn same(token: &Token, value: &Value) -> bool {
    let text = match token {
        Token::Str(s) | Token::Bare(s) => canonical::nfc(s),
    };
    match value {
        Value::String(s) => canonical::nfc(s) == text,
        Value::Number(n) => {
            let written = text.trim().parse::<f64>().ok();
            written.is_some() && written == n.as_f64()
        }
        Value::Bool(b) => {
            matches!(token, Token::Bare(_)) && text.eq_ignore_ascii_case(&b.to_string())
        }
        Value::Null => {
            matches!(token, Token::Bare(_)) && (text.eq_ignore_ascii_case("null") || text == "None")
        }
        Value::Array(_) | Value::Object(_) => false,
    }
}

/// The path as a JSON pointer, for messages.
fn pointer(path: &[Step]) -> String {
    if path.is_empty() {
        return "the value".into();
    }
    path.iter()
        .map(|s| match s {
            Step::Key(k) => format!("/{}", k.replace('~', "~0").replace('/', "~1")),
            Step::Index(i) => format!("/{i}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(k: &str) -> Step {
        Step::Key(k.into())
    }

    fn pattern(p: &str) -> Vec<PatternStep> {
        p.trim_start_matches('/')
            .split('/')
            .map(|s| match s {
                "*" => PatternStep::Any,
                k => PatternStep::Key(k.into()),
            })
            .collect()
    }

    #[test]
    fn a_scan_places_scalars_by_member_and_position() {
        let scanned = scan(r#"{'id': "a\"b", amount: 12.50, lines: [{"sku": X1}, 7,], ok: True"#);
        assert_eq!(
            scanned,
            vec![
                (vec![key("id")], Token::Str("a\"b".into())),
                (vec![key("amount")], Token::Bare("12.50".into())),
                (
                    vec![key("lines"), Step::Index(0), key("sku")],
                    Token::Bare("X1".into())
                ),
                (vec![key("lines"), Step::Index(1)], Token::Bare("7".into())),
                (vec![key("ok")], Token::Bare("True".into())),
            ]
        );
    }

    #[test]
    fn a_faithful_repair_passes() {
        let original = r#"{"invoice_id": "inv-42", "amount": 1250.50, "currency": 'EUR', "lines": [{"qty": 3,}], "paid": False"#;
        let repaired = json!({"invoice_id": "inv-42", "amount": 1250.5, "currency": "EUR",
                              "lines": [{"qty": 3}], "paid": false});
        assert_eq!(check(original, &repaired, None), Ok(()));
    }

    #[test]
    fn a_changed_amount_currency_or_id_fails_by_path() {
        let original = r#"{"invoice_id": "inv-42", "amount": 12.5, "currency": "EUR" "#;
        for (repaired, path) in [
            (
                json!({"invoice_id": "inv-42", "amount": 125, "currency": "EUR"}),
                "/amount",
            ),
            (
                json!({"invoice_id": "inv-42", "amount": 12.5, "currency": "USD"}),
                "/currency",
            ),
            (
                json!({"invoice_id": "inv-43", "amount": 12.5, "currency": "EUR"}),
                "/invoice_id",
            ),
            (json!({"invoice_id": "inv-42", "amount": 12.5}), "/currency"),
        ] {
            let e = check(original, &repaired, None).unwrap_err();
            assert!(e.starts_with(path), "{e}");
        }
        // an invented member
        let invented = json!({"invoice_id": "inv-42", "amount": 12.5, "currency": "EUR", "tax": 2});
        assert!(check(original, &invented, None)
            .unwrap_err()
            .starts_with("/tax"));
    }

    #[test]
    fn values_are_compared_at_their_path_never_found_as_substrings() {
        // 12.5 is in the text, but as the tax, not the amount
        let original = r#"{"amount": 10, "tax": 12.5, "id": "inv-1"}"#;
        let swapped = json!({"amount": 12.5, "tax": 10, "id": "inv-1"});
        assert!(check(original, &swapped, None)
            .unwrap_err()
            .starts_with("/amount"));
        // a nested key of the same name is another path
        let original = r#"{"a": {"id": "x"}, "id": "y"}"#;
        let moved = json!({"a": {"id": "y"}, "id": "x"});
        assert!(check(original, &moved, None).is_err());
        // "inv-1" is a substring of "inv-12": not the same id
        let original = r#"{"id": "inv-12"}"#;
        assert!(check(original, &json!({"id": "inv-1"}), None).is_err());
    }

    #[test]
    fn patterns_limit_the_check_to_the_declared_paths() {
        let original = r#"{"amount": 12.5, "currency": EUR", "note": "it's late"}"#;
        let repaired = json!({"amount": 12.5, "currency": "EUR", "note": "it's late"});
        // the scan loses its way after the broken quote: the note cannot be placed
        assert!(check(original, &repaired, None).is_err());
        let declared = [pattern("/amount"), pattern("/currency")];
        assert_eq!(check(original, &repaired, Some(&declared)), Ok(()));
        let changed = json!({"amount": 12.5, "currency": "USD", "note": "it's late"});
        assert!(check(original, &changed, Some(&declared)).is_err());
        let lines = [pattern("/lines/*/amount")];
        let original = r#"{"lines": [{"amount": 1}, {"amount": 2]}"#;
        assert_eq!(
            check(
                original,
                &json!({"lines": [{"amount": 1}, {"amount": 2}]}),
                Some(&lines)
            ),
            Ok(())
        );
        assert!(check(
            original,
            &json!({"lines": [{"amount": 2}, {"amount": 1}]}),
            Some(&lines)
        )
        .is_err());
    }

    #[test]
    fn a_repeated_path_in_the_original_is_ambiguous() {
        let original = r#"{"amount": 1, "amount": 2"#;
        assert!(check(original, &json!({"amount": 1}), None).is_err());
    }
}
