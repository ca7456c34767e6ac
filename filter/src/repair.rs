//! Deterministic repair of JSON text written by language models (tool-call `arguments`).
//!
//! One pass of a small tokenizer that knows where string literals are, so nothing inside a string
//! is ever rewritten (an apostrophe in `"it's"` stays, a `,}` inside a string stays). It fixes:
//! a Markdown code fence around the text, single-quoted strings, unquoted member names, trailing
//! commas, raw control characters inside strings (escaped, the content is unchanged), Python
//! literals `True`/`False`/`None`, an unterminated last string and missing closing brackets.
//! Anything else is left for the strict parser to reject.
//!
//! Cost: linear in the text, O(1) amortized per character (each bracket is pushed and popped
//! at most once; whether a closer matches an open bracket is two counters, not a scan of the
//! stack), output at most 6× the input (a control character becomes `\u00XX`) plus one closer
//! per open bracket. `benches/worst_case.rs` measures it.

/// Returns the repaired text, or `None` when nothing needed changing.
pub fn repair(text: &str) -> Option<String> {
    let unfenced = strip_code_fence(text);
    let mut repairer = Repairer::default();
    repairer.run(unfenced);
    let out = repairer.out;
    (out != text).then_some(out)
}

/// Removes a Markdown fence: "```json\n{...}\n```" → "{...}".
fn strip_code_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let Some(after_open) = trimmed.strip_prefix("```") else {
        return text;
    };
    // drop the info string ("json") up to the end of the first line
    let body = match after_open.find('\n') {
        Some(nl) => after_open.get(nl + 1..).unwrap_or(""),
        None => after_open.trim_start_matches(|c: char| c.is_ascii_alphanumeric()),
    };
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

#[derive(Default)]
struct Repairer {
    out: String,
    /// Open brackets, innermost last: `{` or `[`.
    open: Vec<char>,
    /// How many of `open` are `{` and how many `[` (so a closer is matched in O(1)).
    open_braces: usize,
    open_brackets: usize,
    /// A comma seen but not written yet: dropped if the next token closes a container.
    pending_comma: bool,
    /// Whitespace after the pending comma, written after it (or alone if it is dropped).
    pending_space: String,
}

impl Repairer {
    fn run(&mut self, text: &str) {
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' | '\'' => {
                    self.flush_comma();
                    self.string(c, &mut chars);
                }
                ',' => {
                    if self.pending_comma {
                        // ",," — keep it, the parser will reject it; no guessing
                        self.out.push(',');
                    }
                    self.pending_comma = true;
                }
                '{' | '[' => {
                    self.flush_comma();
                    self.push_open(c);
                    self.out.push(c);
                }
                '}' | ']' => {
                    self.drop_comma();
                    // `{"a": [1}`: close the containers left open inside the one this closes
                    if self.open_count(matching_open(c)) > 0 {
                        while let Some(open) = self.pop_open() {
                            if open == matching_open(c) {
                                break;
                            }
                            self.out.push(matching_close(open));
                        }
                    }
                    self.out.push(c);
                }
                c if c.is_whitespace() && self.pending_comma => self.pending_space.push(c),
                c if c.is_whitespace() => self.out.push(c),
                c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                    self.flush_comma();
                    let mut word = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' || n == '$' || n == '-' {
                            word.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    self.word(&word, &mut chars);
                }
                other => {
                    self.flush_comma();
                    self.out.push(other);
                }
            }
        }
        self.finish();
    }

    fn push_open(&mut self, open: char) {
        self.open.push(open);
        let count = self.count_mut(open);
        *count = count.saturating_add(1);
    }

    fn pop_open(&mut self) -> Option<char> {
        let open = self.open.pop()?;
        let count = self.count_mut(open);
        *count = count.saturating_sub(1);
        Some(open)
    }

    fn open_count(&self, open: char) -> usize {
        if open == '{' {
            self.open_braces
        } else {
            self.open_brackets
        }
    }

    fn count_mut(&mut self, open: char) -> &mut usize {
        if open == '{' {
            &mut self.open_braces
        } else {
            &mut self.open_brackets
        }
    }

    fn flush_comma(&mut self) {
        if self.pending_comma {
            self.out.push(',');
            self.pending_comma = false;
        }
        self.out.push_str(&self.pending_space);
        self.pending_space.clear();
    }

    /// A trailing comma (before a closer or the end) is dropped; its whitespace stays.
    fn drop_comma(&mut self) {
        self.pending_comma = false;
        self.out.push_str(&self.pending_space);
        self.pending_space.clear();
    }

    /// A bare word: a member name when an object expects one and a `:` follows, else a literal.
    fn word(&mut self, word: &str, chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
        let mut lookahead = chars.clone();
        while lookahead.next_if(|c| c.is_whitespace()).is_some() {}
        let is_key = self.open.last() == Some(&'{') && lookahead.peek() == Some(&':');
        if is_key {
            self.out.push('"');
            self.out.push_str(word);
            self.out.push('"');
            return;
        }
        self.out.push_str(match word {
            "True" => "true",
            "False" => "false",
            "None" => "null",
            other => other,
        });
    }

    /// Copies a string literal opened by `quote`, re-quoting single-quoted strings with `"`.
    fn string(&mut self, quote: char, chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
        self.out.push('"');
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    // `\'` is not a JSON escape; inside a re-quoted string it is a plain quote
                    Some('\'') => self.out.push('\''),
                    Some(escaped) => {
                        self.out.push('\\');
                        self.out.push(escaped);
                    }
                    None => {}
                },
                c if c == quote => {
                    self.out.push('"');
                    return;
                }
                '"' => self.out.push_str("\\\""), // only reachable in a single-quoted string
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                c if c < '\u{20}' => {
                    // `\u00XX` without going through `fmt` (hot on a hostile string)
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    let b = u32::from(c);
                    self.out.push_str("\\u00");
                    for nibble in [b >> 4, b & 0xf] {
                        let digit = HEX.get(nibble as usize).copied().unwrap_or(b'0');
                        self.out.push(char::from(digit));
                    }
                }
                c => self.out.push(c),
            }
        }
        // unterminated at the end of the text: close it
        self.out.push('"');
    }

    fn finish(&mut self) {
        self.drop_comma();
        let trailing_ws = self.out.len() - self.out.trim_end().len();
        let ws = self.out.split_off(self.out.len() - trailing_ws);
        while let Some(open) = self.pop_open() {
            self.out.push(matching_close(open));
        }
        self.out.push_str(&ws);
    }
}

fn matching_open(close: char) -> char {
    if close == '}' {
        '{'
    } else {
        '['
    }
}

fn matching_close(open: char) -> char {
    if open == '{' {
        '}'
    } else {
        ']'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(input: &str) -> String {
        repair(input).unwrap_or_else(|| input.to_owned())
    }

    fn parses(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn valid_json_needs_no_repair() {
        assert_eq!(repair(r#"{"a": [1, 2], "b": "x"}"#), None);
        assert_eq!(repair("  [true, null]\n"), None);
    }

    #[test]
    fn trailing_commas_are_dropped() {
        assert_eq!(
            fixed(r#"{"a": 1, "b": [1, 2,],}"#),
            r#"{"a": 1, "b": [1, 2]}"#
        );
        assert_eq!(fixed("[1,\n]"), "[1\n]");
    }

    #[test]
    fn single_quotes_become_double_without_touching_content() {
        assert_eq!(fixed(r#"{'a': 'it\'s "x"'}"#), r#"{"a": "it's \"x\""}"#);
        assert_eq!(fixed(r#"{"a": "it's"}"#), r#"{"a": "it's"}"#);
    }

    #[test]
    fn unquoted_keys_and_python_literals() {
        let out = fixed("{invoice_id: 'INV-1', paid: True, note: None, tags: [False]}");
        assert_eq!(
            parses(&out),
            serde_json::json!({"invoice_id": "INV-1", "paid": true, "note": null, "tags": [false]})
        );
    }

    #[test]
    fn never_rewrites_inside_strings() {
        let input = r#"{"s": "a, } ] {x: True} 'q' ```", "t": 1,}"#;
        let out = fixed(input);
        assert_eq!(
            parses(&out),
            serde_json::json!({"s": "a, } ] {x: True} 'q' ```", "t": 1})
        );
    }

    #[test]
    fn code_fences_are_removed() {
        assert_eq!(fixed("```json\n{\"a\": 1}\n```"), r#"{"a": 1}"#);
        assert_eq!(fixed("```\n[1]\n```\n"), "[1]");
    }

    #[test]
    fn missing_closers_and_unterminated_string() {
        assert_eq!(fixed(r#"{"a": [1, {"b": 2"#), r#"{"a": [1, {"b": 2}]}"#);
        assert_eq!(fixed(r#"{"a": "unterminated"#), r#"{"a": "unterminated"}"#);
        assert_eq!(fixed("{\"a\": 1,\n"), "{\"a\": 1}\n");
        assert_eq!(fixed(r#"{"a": [1, 2}"#), r#"{"a": [1, 2]}"#);
        assert_eq!(fixed(r#"[{"a": 1]"#), r#"[{"a": 1}]"#);
        // a closer with nothing to close is left for the parser to reject
        assert_eq!(fixed(r#"{"a": 1}}"#), r#"{"a": 1}}"#);
    }

    #[test]
    fn raw_controls_inside_strings_are_escaped() {
        let out = fixed("{\"a\": \"line1\nline2\ttab\u{1}\"}");
        assert_eq!(
            parses(&out),
            serde_json::json!({"a": "line1\nline2\ttab\u{1}"})
        );
    }

    #[test]
    fn valid_json_is_never_touched() {
        let samples = [
            serde_json::json!({"s": "it's, } ] // 'x' True None ```json", "k:": [1, -2.5e3, null]}),
            serde_json::json!(["\u{1}\n\t", {"": {}}, [], "\\\"", "é😀"]),
            serde_json::json!({"nested": {"a": [{"b": [true, false]}]}}),
        ];
        for value in samples {
            for text in [
                value.to_string(),
                serde_json::to_string_pretty(&value).unwrap(),
            ] {
                assert_eq!(repair(&text), None, "{text}");
            }
        }
    }

    #[test]
    fn garbage_stays_garbage() {
        for input in [
            "{\"a\" 1}",
            "not json at all",
            "{\"a\": 1,, \"b\": 2}",
            "[1 2]",
        ] {
            assert!(
                serde_json::from_str::<serde_json::Value>(&fixed(input)).is_err(),
                "{input}"
            );
        }
    }

    #[test]
    fn the_seed_example_repairs() {
        let args = "{invoice_id: 'INV-1', amount: 123.45, currency: 'USD', customer_name: 'Acme', description: 'Services',}";
        assert_eq!(
            parses(&fixed(args)),
            serde_json::json!({"invoice_id":"INV-1","amount":123.45,"currency":"USD","customer_name":"Acme","description":"Services"})
        );
    }

    #[test]
    fn mismatched_closers_cost_linear_time() {
        // each '}' used to scan the whole stack of '[': 3 s natively for this size before
        let n = 128 << 10;
        let text = format!("{}{}", "[".repeat(n), "}".repeat(n));
        let started = std::time::Instant::now();
        let out = fixed(&text);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // the closers stay (the parser rejects them); the brackets are closed at the end
        assert_eq!(out.len(), 3 * n);
        assert!(out.ends_with(']'));
    }

    #[test]
    fn raw_control_characters_in_strings_are_escaped() {
        assert_eq!(
            fixed("{\"a\":\"x\u{1}\u{1f}\u{7}\"}"),
            r#"{"a":"x\u0001\u001f\u0007"}"#
        );
    }
}
