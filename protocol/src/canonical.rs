//! Canonical JSON (SPEC §1): RFC 8785 (JCS), and the `signet-jcs` profile that also puts every
//! string into Unicode NFC.
//!
//! The parser is hand-written rather than serde_json's: that one recurses (with a fixed limit of
//! 128 levels), keeps the last of duplicate member names, has no NFC step and, without its
//! `float_roundtrip` feature, does not always round decimals to the nearest double. Both the
//! parser and the writer here use an explicit stack, so nesting up to [`MAX_DEPTH`] never grows
//! the native stack, natively or in the Envoy Wasm VM.
//!
//! Nothing here relies on serde_json's optional features (`preserve_order`,
//! `arbitrary_precision` may be switched on by other crates in the build): numbers are read with
//! `as_i64`/`as_u64`/`as_f64` and members are sorted by the writer itself.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use serde_json::{Map, Number, Value};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Which canonical form to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// `signet-jcs`: RFC 8785 plus NFC on every string (member names and values).
    #[default]
    Signet,
    /// Plain RFC 8785, strings are kept as they are.
    Rfc8785,
}

/// Maximum nesting of arrays and objects (the top-level container is depth 1). Deeper input is
/// rejected with `TOO_DEEP`; it is enforced by both the parser and the writer.
pub const MAX_DEPTH: usize = 1024;

/// Options of [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParseOptions {
    pub profile: Profile,
    /// Reject numbers that denote an integer beyond 2^53 which a double cannot hold exactly, in
    /// any notation (`9007199254740993`, `9007199254740993.0`, `9.007199254740993e15`): it would
    /// silently change (SPEC §1, a 422 in the exchange pipeline).
    pub reject_unsafe_integers: bool,
}

/// Largest integer magnitude that survives the trip through an IEEE-754 double unchanged.
const MAX_SAFE_MAGNITUDE: u64 = 1 << 53;

/// Why a JSON text or value has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonError {
    kind: ErrorKind,
    message: String,
    offset: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    InvalidJson,
    InvalidUtf8,
    DuplicateKey,
    LoneSurrogate,
    Noncharacter,
    NumberOutOfRange,
    UnsafeInteger,
    TooDeep,
    ReservedMember,
}

impl CanonError {
    fn new(kind: ErrorKind, message: impl Into<String>, offset: Option<usize>) -> Self {
        CanonError {
            kind,
            message: message.into(),
            offset,
        }
    }

    /// A receipt extension tried to set a member the receipt itself defines.
    pub(crate) fn reserved_member(name: &str) -> Self {
        CanonError::new(
            ErrorKind::ReservedMember,
            format!("extension member {name:?} is reserved by the receipt format"),
            None,
        )
    }

    /// Stable UPPER_SNAKE code, suitable for the `code` of an API error.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidJson => "INVALID_JSON",
            ErrorKind::InvalidUtf8 => "INVALID_UTF8",
            ErrorKind::DuplicateKey => "DUPLICATE_KEY",
            ErrorKind::LoneSurrogate => "LONE_SURROGATE",
            ErrorKind::Noncharacter => "NONCHARACTER",
            ErrorKind::NumberOutOfRange => "NUMBER_OUT_OF_RANGE",
            ErrorKind::UnsafeInteger => "UNSAFE_INTEGER",
            ErrorKind::TooDeep => "TOO_DEEP",
            ErrorKind::ReservedMember => "RESERVED_MEMBER",
        }
    }

    /// Byte offset in the input where the problem was found (parse errors only).
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }

    /// The reason without the offset.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CanonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{} at byte {offset}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CanonError {}

/// Parses one strict I-JSON text (RFC 7493): valid UTF-8, no lone surrogates, no duplicate member
/// names (compared after NFC in the Signet profile), finite numbers only, nesting ≤ [`MAX_DEPTH`].
/// In the Signet profile every string (names and values) of the result is in NFC.
///
/// Integers that fit `i64`/`u64` are kept as integers, every other number becomes the nearest
/// `f64` (correctly rounded), so canonical output reproduces the ECMAScript number.
pub fn parse(input: &[u8], opts: &ParseOptions) -> Result<Value, CanonError> {
    let text = std::str::from_utf8(input).map_err(|e| {
        let at = e.valid_up_to();
        // ED A0..BF starts a UTF-8-encoded surrogate (CESU-8 / WTF-8), which UTF-8 forbids.
        match input.get(at..at + 2) {
            Some([0xED, 0xA0..=0xBF]) => CanonError::new(
                ErrorKind::LoneSurrogate,
                "surrogate encoded as UTF-8",
                Some(at),
            ),
            _ => CanonError::new(ErrorKind::InvalidUtf8, "invalid UTF-8", Some(at)),
        }
    })?;
    Parser {
        text,
        bytes: input,
        pos: 0,
        opts: *opts,
    }
    .parse_document()
}

/// Writes the canonical form of `value`.
///
/// Numbers are IEEE-754 doubles (integers are converted first, as RFC 8785 requires). In the
/// Signet profile strings are NFC-normalized here too, so values built in code need no extra
/// step; two member names that become equal under NFC are a `DUPLICATE_KEY` error.
pub fn to_canonical(value: &Value, profile: Profile) -> Result<String, CanonError> {
    let mut out = String::with_capacity(128);
    Writer::new(profile).write(Some(value), &mut out)?;
    Ok(out)
}

/// Canonical form of the object made of the members of `object` whose names pass `include`,
/// without building that object (receipts and bundles hash a subset of their members).
pub(crate) fn to_canonical_subset(
    object: &Map<String, Value>,
    include: impl Fn(&str) -> bool,
    profile: Profile,
) -> Result<String, CanonError> {
    let mut out = String::with_capacity(256);
    let mut writer = Writer::new(profile);
    writer.open_object(object, include, &mut out)?;
    writer.write(None, &mut out)?;
    Ok(out)
}

/// [`parse`] (without the unsafe-integer check) followed by [`to_canonical`].
pub fn canonicalize(input: &[u8], profile: Profile) -> Result<String, CanonError> {
    let value = parse(
        input,
        &ParseOptions {
            profile,
            reject_unsafe_integers: false,
        },
    )?;
    to_canonical(&value, profile)
}

/// Rewrites every string of `object` (names and values, at any depth) in NFC, so that the Signet
/// profile and plain RFC 8785 produce the same bytes for it. Fails when two names of one object
/// collide after NFC.
pub(crate) fn normalize_object(object: &mut Map<String, Value>) -> Result<(), CanonError> {
    normalize_names(object)?;
    let mut pending: Vec<&mut Value> = object.values_mut().collect();
    while let Some(value) = pending.pop() {
        match value {
            Value::String(s) => {
                if let Cow::Owned(normalized) = nfc(s) {
                    *s = normalized;
                }
            }
            Value::Array(items) => pending.extend(items.iter_mut()),
            Value::Object(members) => {
                normalize_names(members)?;
                pending.extend(members.values_mut());
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    Ok(())
}

/// Puts the member names of `object` in NFC (rebuilding it only when one is not).
fn normalize_names(object: &mut Map<String, Value>) -> Result<(), CanonError> {
    if object
        .keys()
        .all(|name| matches!(nfc(name), Cow::Borrowed(_)))
    {
        return Ok(());
    }
    for (name, member) in std::mem::take(object) {
        let name = nfc(&name).into_owned();
        if object.contains_key(&name) {
            return Err(duplicate_key(&name, None));
        }
        object.insert(name, member);
    }
    Ok(())
}

/// NFC form of `s`, borrowed when it already is (the common case: checked without allocating).
/// What the `signet-jcs` profile makes of every string, e.g. the tenant a receipt names.
pub fn nfc(s: &str) -> Cow<'_, str> {
    // Every character below U+0300 is a starter that composes with nothing below U+0300, so text
    // made only of them is NFC; in UTF-8 that is text without a byte >= 0xCC. This skips the
    // per-character lookups for ASCII and Latin-1 text (ASCII checked 8 bytes at a time).
    if is_ascii(s.as_bytes())
        || s.bytes().all(|b| b < 0xCC)
        || is_nfc_quick(s.chars()) == IsNormalized::Yes
    {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.nfc().collect())
    }
}

/// `bytes.is_ascii()`, 8 bytes per step also on wasm32 (whose `usize` words are 4 bytes).
fn is_ascii(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let mut high = 0u64;
    for word in &mut words {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(word);
        high |= u64::from_le_bytes(buf);
    }
    high & 0x8080_8080_8080_8080 == 0 && words.remainder().is_ascii()
}

fn duplicate_key(key: &str, offset: Option<usize>) -> CanonError {
    const SHOWN: usize = 64;
    let shown: String = key.chars().take(SHOWN).collect();
    let ellipsis = if shown.len() < key.len() { "…" } else { "" };
    CanonError::new(
        ErrorKind::DuplicateKey,
        format!("duplicate member name \"{shown}{ellipsis}\""),
        offset,
    )
}

fn too_deep(offset: Option<usize>) -> CanonError {
    CanonError::new(
        ErrorKind::TooDeep,
        format!("nesting deeper than {MAX_DEPTH} levels"),
        offset,
    )
}

// ---------------------------------------------------------------------------------------------
// Parser

/// A container being filled while its members are parsed.
enum OpenContainer {
    Array(Vec<Value>),
    Object {
        members: Map<String, Value>,
        /// Name of the member whose value is being parsed, and where that name started.
        key: String,
        key_offset: usize,
    },
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    opts: ParseOptions,
}

impl Parser<'_> {
    fn parse_document(mut self) -> Result<Value, CanonError> {
        let mut stack: Vec<OpenContainer> = Vec::new();
        'value: loop {
            self.skip_whitespace();
            let start = self.pos;
            let mut value = match self.bytes.get(self.pos) {
                Some(b'{') | Some(b'[') if stack.len() >= MAX_DEPTH => {
                    return Err(too_deep(Some(start)));
                }
                Some(b'{') => {
                    self.pos += 1;
                    self.skip_whitespace();
                    if self.eat(b'}') {
                        Value::Object(Map::new())
                    } else {
                        let (key, key_offset) = self.parse_member_name()?;
                        stack.push(OpenContainer::Object {
                            members: Map::new(),
                            key,
                            key_offset,
                        });
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.skip_whitespace();
                    if self.eat(b']') {
                        Value::Array(Vec::new())
                    } else {
                        stack.push(OpenContainer::Array(Vec::new()));
                        continue 'value;
                    }
                }
                Some(b'"') => Value::String(self.parse_string()?),
                Some(b'-' | b'0'..=b'9') => Value::Number(self.parse_number()?),
                Some(b't') => self.parse_literal("true", Value::Bool(true))?,
                Some(b'f') => self.parse_literal("false", Value::Bool(false))?,
                Some(b'n') => self.parse_literal("null", Value::Null)?,
                Some(_) => return Err(self.unexpected("a value")),
                None => return Err(self.unexpected_end()),
            };

            // Hand the finished value to its container; close every container that ends here.
            loop {
                match stack.last_mut() {
                    None => {
                        self.skip_whitespace();
                        if self.pos != self.bytes.len() {
                            return Err(self.unexpected("end of input"));
                        }
                        return Ok(value);
                    }
                    Some(OpenContainer::Array(items)) => {
                        items.push(value);
                        self.skip_whitespace();
                        match self.bytes.get(self.pos) {
                            Some(b',') => {
                                self.pos += 1;
                                continue 'value;
                            }
                            Some(b']') => {
                                self.pos += 1;
                                value = match stack.pop() {
                                    Some(OpenContainer::Array(items)) => Value::Array(items),
                                    _ => unreachable_container(),
                                };
                            }
                            Some(_) => return Err(self.unexpected("',' or ']'")),
                            None => return Err(self.unexpected_end()),
                        }
                    }
                    Some(OpenContainer::Object {
                        members,
                        key,
                        key_offset,
                    }) => {
                        let name = std::mem::take(key);
                        if members.contains_key(&name) {
                            return Err(duplicate_key(&name, Some(*key_offset)));
                        }
                        members.insert(name, value);
                        self.skip_whitespace();
                        match self.bytes.get(self.pos) {
                            Some(b',') => {
                                self.pos += 1;
                                self.skip_whitespace();
                                (*key, *key_offset) = self.parse_member_name()?;
                                continue 'value;
                            }
                            Some(b'}') => {
                                self.pos += 1;
                                value = match stack.pop() {
                                    Some(OpenContainer::Object { members, .. }) => {
                                        Value::Object(members)
                                    }
                                    _ => unreachable_container(),
                                };
                            }
                            Some(_) => return Err(self.unexpected("',' or '}'")),
                            None => return Err(self.unexpected_end()),
                        }
                    }
                }
            }
        }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.bytes.get(self.pos) == Some(&byte);
        if found {
            self.pos += 1;
        }
        found
    }

    fn unexpected(&self, expected: &str) -> CanonError {
        let found = match self
            .text
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
        {
            Some(c) if c.is_ascii_graphic() => format!("'{c}'"),
            Some(c) => format!("U+{:04X}", u32::from(c)),
            None => "end of input".to_owned(),
        };
        CanonError::new(
            ErrorKind::InvalidJson,
            format!("expected {expected}, found {found}"),
            Some(self.pos),
        )
    }

    fn unexpected_end(&self) -> CanonError {
        CanonError::new(
            ErrorKind::InvalidJson,
            "unexpected end of input",
            Some(self.pos),
        )
    }

    fn parse_literal(&mut self, word: &str, value: Value) -> Result<Value, CanonError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.unexpected("a value"))
        }
    }

    /// `"name"` followed by `:`; the name is NFC-normalized in the Signet profile.
    fn parse_member_name(&mut self) -> Result<(String, usize), CanonError> {
        let offset = self.pos;
        if self.bytes.get(self.pos) != Some(&b'"') {
            return Err(self.unexpected("a member name"));
        }
        let name = self.parse_string()?;
        self.skip_whitespace();
        if !self.eat(b':') {
            return Err(self.unexpected("':'"));
        }
        Ok((name, offset))
    }

    /// Parses a string starting at the opening quote.
    fn parse_string(&mut self) -> Result<String, CanonError> {
        let string_start = self.pos;
        self.pos += 1; // opening quote
        let mut out = String::new();
        // OR of every byte copied: below 0x80, the string is ASCII and so already NFC
        let mut seen = 0u8;
        loop {
            // Copy the run up to the next quote, backslash or control character. Those are ASCII,
            // so the run ends on a char boundary of the (already validated) UTF-8 text.
            let run_start = self.pos;
            let (len, run_bytes) = plain_run(self.bytes.get(self.pos..).unwrap_or_default());
            seen |= run_bytes;
            self.pos += len;
            out.push_str(&self.text[run_start..self.pos]);
            match self.bytes.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => seen |= self.parse_escape(&mut out)?,
                Some(_) => {
                    return Err(CanonError::new(
                        ErrorKind::InvalidJson,
                        "unescaped control character in string",
                        Some(self.pos),
                    ))
                }
                None => return Err(self.unexpected_end()),
            }
        }
        if seen >= 0x80 {
            // RFC 7493 §2.1: I-JSON has no noncharacters (raw or escaped)
            if let Some(c) = out.chars().find(|&c| is_noncharacter(c)) {
                return Err(CanonError::new(
                    ErrorKind::Noncharacter,
                    format!("noncharacter U+{:04X} in string", u32::from(c)),
                    Some(string_start),
                ));
            }
        }
        if self.opts.profile == Profile::Signet && seen >= 0x80 {
            if let Cow::Owned(normalized) = nfc(&out) {
                out = normalized;
            }
        }
        Ok(out)
    }

    /// Appends the character of the escape at `pos`; returns 0x80 if it is not ASCII, else 0.
    fn parse_escape(&mut self, out: &mut String) -> Result<u8, CanonError> {
        let escape_start = self.pos;
        self.pos += 1; // backslash
        let simple = match self.bytes.get(self.pos) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let unit = self.parse_hex4()?;
                let c = match unit {
                    0xD800..=0xDBFF => {
                        let low = if self.bytes[self.pos..].starts_with(b"\\u") {
                            self.pos += 2;
                            Some(self.parse_hex4()?)
                        } else {
                            None
                        };
                        match low {
                            Some(low @ 0xDC00..=0xDFFF) => {
                                let scalar = 0x10000
                                    + ((u32::from(unit) - 0xD800) << 10)
                                    + (u32::from(low) - 0xDC00);
                                char::from_u32(scalar)
                            }
                            _ => None,
                        }
                    }
                    0xDC00..=0xDFFF => None,
                    _ => char::from_u32(u32::from(unit)),
                };
                return match c {
                    Some(c) => {
                        out.push(c);
                        Ok(if c.is_ascii() { 0 } else { 0x80 })
                    }
                    None => Err(CanonError::new(
                        ErrorKind::LoneSurrogate,
                        "lone surrogate in \\u escape",
                        Some(escape_start),
                    )),
                };
            }
            Some(_) => {
                return Err(CanonError::new(
                    ErrorKind::InvalidJson,
                    "invalid escape sequence",
                    Some(escape_start),
                ))
            }
            None => return Err(self.unexpected_end()),
        };
        self.pos += 1;
        out.push(simple);
        Ok(0)
    }

    fn parse_hex4(&mut self) -> Result<u16, CanonError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.unexpected_end())?;
        let mut unit: u16 = 0;
        for &d in digits {
            let nibble = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => {
                    return Err(CanonError::new(
                        ErrorKind::InvalidJson,
                        "invalid \\u escape",
                        Some(self.pos),
                    ))
                }
            };
            unit = (unit << 4) | u16::from(nibble);
        }
        self.pos += 4;
        Ok(unit)
    }

    /// RFC 8259 number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn parse_number(&mut self) -> Result<Number, CanonError> {
        let start = self.pos;
        self.eat(b'-');
        match self.bytes.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(self.unexpected("a digit")),
        }
        let mut is_integer = true;
        if self.eat(b'.') {
            is_integer = false;
            if !self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
                return Err(self.unexpected("a digit"));
            }
            self.skip_digits();
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            is_integer = false;
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if !self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
                return Err(self.unexpected("a digit"));
            }
            self.skip_digits();
        }
        let literal = &self.text[start..self.pos];

        if self.opts.reject_unsafe_integers && exceeds_safe_integer(literal) {
            return Err(CanonError::new(
                ErrorKind::UnsafeInteger,
                format!("integer {literal} exceeds 2^53 in magnitude (SPEC §1)"),
                Some(start),
            ));
        }
        if is_integer {
            if let Ok(i) = literal.parse::<i64>() {
                return Ok(Number::from(i));
            }
            if let Ok(u) = literal.parse::<u64>() {
                return Ok(Number::from(u));
            }
        }
        // str::parse::<f64> rounds correctly (round-half-even on the exact decimal value).
        let double = literal.parse::<f64>().ok().filter(|d| d.is_finite());
        double.and_then(Number::from_f64).ok_or_else(|| {
            CanonError::new(
                ErrorKind::NumberOutOfRange,
                format!("number {literal} is outside the range of a double"),
                Some(start),
            )
        })
    }

    fn skip_digits(&mut self) {
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
    }
}

/// U+FDD0..U+FDEF and the last two code points of every plane (U+FFFE, U+FFFF, U+1FFFE, …).
fn is_noncharacter(c: char) -> bool {
    let u = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&u) || u & 0xFFFE == 0xFFFE
}

/// Whether a number literal (RFC 8259 grammar, already checked) denotes an integer beyond 2^53
/// in magnitude, in any notation: `9007199254740993`, `9007199254740994` (a double holds it, but
/// not every neighbour: SPEC §1 rejects the range), `9007199254740993.0`, `9.007199254740994e15`
/// and `1e21` alike, while `9007199254740993.5` (not an integer) passes. Decided on the decimal
/// digits, never through a double.
fn exceeds_safe_integer(literal: &str) -> bool {
    let unsigned = literal.trim_start_matches('-');
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            // an exponent too large for i64 is beyond any limit either way
            unsigned[at + 1..].parse::<i64>().unwrap_or_else(|_| {
                if unsigned[at + 1..].starts_with('-') {
                    i64::MIN
                } else {
                    i64::MAX
                }
            }),
        ),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let fraction = fraction.trim_end_matches('0');
    let whole = whole.trim_start_matches('0');
    // value = significant × 10^scale, significant without leading or trailing zeros
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return false; // zero
    }
    let significant = digits.trim_end_matches('0');
    let scale = exponent
        .saturating_sub(fraction.len() as i64)
        .saturating_add((digits.len() - significant.len()) as i64);
    if scale < 0 {
        return false; // not an integer
    }
    const LIMIT: &str = "9007199254740992"; // 2^53
    let length = (significant.len() as i64).saturating_add(scale);
    if length != LIMIT.len() as i64 {
        return length > LIMIT.len() as i64;
    }
    let integer = format!("{significant}{}", "0".repeat(scale as usize));
    integer.as_str() > LIMIT
}

/// The container on top of the stack was just matched by kind; reaching this is a bug.
#[cold]
fn unreachable_container() -> Value {
    debug_assert!(false, "container stack out of sync");
    Value::Null
}

// ---------------------------------------------------------------------------------------------
// Writer

/// A container whose members are being written.
enum Frame<'a> {
    Array {
        items: std::slice::Iter<'a, Value>,
        first: bool,
    },
    /// Its members wait, sorted, in `Writer::members[start..]` (above them only members of
    /// nested objects, which are gone by the time this frame is on top again).
    Object { start: usize, next: usize },
}

/// Iterative canonical writer. All open objects share one buffer of sorted members, so writing
/// allocates nothing per object.
struct Writer<'a> {
    profile: Profile,
    stack: Vec<Frame<'a>>,
    members: Vec<(Cow<'a, str>, &'a Value)>,
}

impl<'a> Writer<'a> {
    fn new(profile: Profile) -> Self {
        Writer {
            profile,
            stack: Vec::new(),
            members: Vec::new(),
        }
    }

    /// Writes `{` and queues the members of `object` that pass `include`, in RFC 8785 order
    /// (UTF-16 code units of the names, after NFC in the Signet profile).
    fn open_object(
        &mut self,
        object: &'a Map<String, Value>,
        include: impl Fn(&str) -> bool,
        out: &mut String,
    ) -> Result<(), CanonError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(too_deep(None));
        }
        let start = self.members.len();
        let profile = self.profile;
        self.members.extend(
            object
                .iter()
                .filter(|(name, _)| include(name))
                .map(|(name, value)| (apply_profile(name, profile), value)),
        );
        let queued = &mut self.members[start..];
        queued.sort_unstable_by(|a, b| cmp_utf16(&a.0, &b.0));
        // Names are unique in a Map; they can only collide after NFC.
        if let Some(pair) = queued.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(duplicate_key(&pair[0].0, None));
        }
        out.push('{');
        self.stack.push(Frame::Object { start, next: start });
        Ok(())
    }

    /// Writes `next` (if any), then the rest of every open container.
    fn write(&mut self, mut next: Option<&'a Value>, out: &mut String) -> Result<(), CanonError> {
        loop {
            if let Some(value) = next.take() {
                match value {
                    Value::Null => out.push_str("null"),
                    Value::Bool(true) => out.push_str("true"),
                    Value::Bool(false) => out.push_str("false"),
                    Value::Number(n) => write_number(n, out)?,
                    Value::String(s) => write_string(&apply_profile(s, self.profile), out),
                    // Empty containers count as a level too, as in the parser.
                    Value::Array(_) if self.stack.len() >= MAX_DEPTH => return Err(too_deep(None)),
                    Value::Array(items) if items.is_empty() => out.push_str("[]"),
                    Value::Array(items) => {
                        out.push('[');
                        self.stack.push(Frame::Array {
                            items: items.iter(),
                            first: true,
                        });
                    }
                    Value::Object(object) => self.open_object(object, |_| true, out)?,
                }
            }
            let Some(frame) = self.stack.last_mut() else {
                return Ok(());
            };
            match frame {
                Frame::Array { items, first } => match items.next() {
                    Some(item) => {
                        if !std::mem::take(first) {
                            out.push(',');
                        }
                        next = Some(item);
                    }
                    None => {
                        out.push(']');
                        self.stack.pop();
                    }
                },
                Frame::Object { start, next: at } => match self.members.get(*at) {
                    Some((name, member)) => {
                        if at != start {
                            out.push(',');
                        }
                        *at += 1;
                        write_string(name, out);
                        out.push(':');
                        next = Some(*member);
                    }
                    None => {
                        out.push('}');
                        self.members.truncate(*start);
                        self.stack.pop();
                    }
                },
            }
        }
    }
}

fn apply_profile(s: &str, profile: Profile) -> Cow<'_, str> {
    match profile {
        Profile::Signet => nfc(s),
        Profile::Rfc8785 => Cow::Borrowed(s),
    }
}

/// Orders strings by their UTF-16 code units (RFC 8785 §3.2.3).
///
/// UTF-8 byte order is code point order. It differs from UTF-16 order only between a
/// supplementary character (lead byte F0..F4; a surrogate pair D800.. in UTF-16) and a character
/// in U+E000..U+FFFF (lead byte EE or EF), so the first differing byte decides, with that one
/// case turned around. (A difference in a continuation byte means equal lead bytes, hence
/// characters of the same kind.)
pub(crate) fn cmp_utf16(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) else {
        return a.len().cmp(&b.len());
    };
    let (x, y) = (a[at], b[at]);
    let supplementary_vs_high_bmp = |s: u8, t: u8| s >= 0xF0 && (t == 0xEE || t == 0xEF);
    if supplementary_vs_high_bmp(x, y) {
        Ordering::Less
    } else if supplementary_vs_high_bmp(y, x) {
        Ordering::Greater
    } else {
        x.cmp(&y)
    }
}

/// The escape of each byte in a JSON string (RFC 8785 §3.2.2.2): 0 for none, `u` for `\u00xx`,
/// else the character after the backslash. Bytes >= 0x80 are written raw.
static ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut at = 0;
    loop {
        let (len, _) = plain_run(bytes.get(at..).unwrap_or_default());
        // A run starts at 0 or after an ASCII byte and ends before one or at the end: char
        // boundaries.
        out.push_str(&s[at..at + len]);
        at += len;
        let Some(&b) = bytes.get(at) else {
            break;
        };
        out.push('\\');
        match ESCAPES[usize::from(b)] {
            b'u' => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
            escape => out.push(char::from(escape)),
        }
        at += 1;
    }
    out.push('"');
}

/// Length of the leading run of `bytes` without a byte that JSON strings escape (quote,
/// backslash, controls), and the OR of the bytes of the run (>= 0x80: not ASCII). Looks at 8
/// bytes at a time: strings are mostly such runs, in the parser and in the writer.
fn plain_run(bytes: &[u8]) -> (usize, u8) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // whether some byte of `v` is 0 / is below 0x20 (exact tests, Hacker's Delight 6-1)
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let has_control = |v: u64| v.wrapping_sub(0x20 * ONES) & !v & HIGH != 0;
    let mut at = 0;
    let mut seen = 0u64;
    while let Some(word) = bytes.get(at..at + 8) {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(word);
        let w = u64::from_le_bytes(buf);
        if has_control(w)
            || has_zero(w ^ (u64::from(b'"') * ONES))
            || has_zero(w ^ (u64::from(b'\\') * ONES))
        {
            break;
        }
        seen |= w;
        at += 8;
    }
    let mut seen = seen.to_le_bytes().iter().fold(0, |acc, b| acc | b);
    while let Some(&b) = bytes.get(at) {
        if ESCAPES[usize::from(b)] != 0 {
            break;
        }
        seen |= b;
        at += 1;
    }
    (at, seen)
}

/// ECMAScript `Number.prototype.toString` of the number as a double (RFC 8785 §3.2.2.3).
fn write_number(n: &Number, out: &mut String) -> Result<(), CanonError> {
    let double = if let Some(i) = n.as_i64() {
        if i.unsigned_abs() <= MAX_SAFE_MAGNITUDE {
            // Exact as a double and below 1e21: ECMAScript prints the plain integer.
            out.push_str(itoa_i64(i, &mut [0u8; 20]));
            return Ok(());
        }
        i as f64
    } else if let Some(u) = n.as_u64() {
        u as f64
    } else {
        n.as_f64().unwrap_or(f64::NAN)
    };
    if !double.is_finite() {
        return Err(CanonError::new(
            ErrorKind::NumberOutOfRange,
            format!("number {n} is not a finite double"),
            None,
        ));
    }
    // ryu-js prints -0 as "0", as ECMAScript does.
    out.push_str(ryu_js::Buffer::new().format_finite(double));
    Ok(())
}

/// Decimal digits of `i` (|i| ≤ 2^53) without going through `fmt`.
fn itoa_i64(i: i64, buf: &mut [u8; 20]) -> &str {
    let mut magnitude = i.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if i < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signet(input: &str) -> Result<String, CanonError> {
        canonicalize(input.as_bytes(), Profile::Signet)
    }

    #[test]
    fn numbers_follow_ecmascript() {
        let cases = [
            ("1e21", "1e+21"),
            ("1e-7", "1e-7"),
            ("0.000001", "0.000001"),
            ("100", "100"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("5e-324", "5e-324"),
            ("9007199254740993", "9007199254740992"),
            ("18446744073709551615", "18446744073709552000"),
            ("-9223372036854775808", "-9223372036854776000"),
            ("123456789012345678901234567890", "1.2345678901234568e+29"),
            ("1.0", "1"),
        ];
        for (input, expected) in cases {
            assert_eq!(signet(input).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn rejects_what_i_json_forbids() {
        let cases: [(&[u8], &str); 12] = [
            (br#"{"a":1,"a":2}"#, "DUPLICATE_KEY"),
            (br#"["\ud800"]"#, "LONE_SURROGATE"),
            (br#"["\udc00\ud800"]"#, "LONE_SURROGATE"),
            (br#"["\ud800\u0041"]"#, "LONE_SURROGATE"),
            (b"[\"\xed\xa0\x80\"]", "LONE_SURROGATE"),
            (b"[\"\xff\"]", "INVALID_UTF8"),
            (b"[NaN]", "INVALID_JSON"),
            (b"[Infinity]", "INVALID_JSON"),
            (b"1e400", "NUMBER_OUT_OF_RANGE"),
            (b"-1e400", "NUMBER_OUT_OF_RANGE"),
            (b"[01]", "INVALID_JSON"),
            (b"[1,]", "INVALID_JSON"),
        ];
        for (input, code) in cases {
            let err = canonicalize(input, Profile::Signet).err();
            assert_eq!(err.as_ref().map(CanonError::code), Some(code), "{input:?}");
        }
    }

    #[test]
    fn more_grammar_errors() {
        for input in [
            "",
            " ",
            "{",
            "[",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{1:2}",
            "tru",
            "nul",
            "1.",
            ".5",
            "1e",
            "-",
            "+1",
            "\"\\x\"",
            "\"\t\"",
            "[1]x",
            "\u{feff}[]",
            "'a'",
        ] {
            let err = signet(input).err();
            assert_eq!(
                err.as_ref().map(CanonError::code),
                Some("INVALID_JSON"),
                "{input:?}"
            );
        }
    }

    #[test]
    fn duplicate_names_are_compared_after_nfc() {
        // "é" precomposed and decomposed are the same name in the Signet profile only.
        let input = "{\"\u{e9}\":1,\"e\u{301}\":2}";
        assert_eq!(signet(input).err().map(|e| e.code()), Some("DUPLICATE_KEY"));
        assert!(canonicalize(input.as_bytes(), Profile::Rfc8785).is_ok());
    }

    #[test]
    fn writer_rejects_names_that_collide_after_nfc() {
        let mut map = Map::new();
        map.insert("\u{e9}".into(), Value::from(1));
        map.insert("e\u{301}".into(), Value::from(2));
        let value = Value::Object(map);
        assert_eq!(
            to_canonical(&value, Profile::Signet)
                .err()
                .map(|e| e.code()),
            Some("DUPLICATE_KEY")
        );
        assert!(to_canonical(&value, Profile::Rfc8785).is_ok());
    }

    #[test]
    fn strings_are_normalized_whether_raw_or_escaped() {
        // the combining acute accent raw, escaped, and after an escaped base letter
        for input in [
            "\"e\u{301}\"",
            "\"e\\u0301\"",
            "\"\\u0065\\u0301\"",
            "\"\\u0065\u{301}\"",
        ] {
            assert_eq!(signet(input).as_deref(), Ok("\"\u{e9}\""), "{input}");
            assert_ne!(
                canonicalize(input.as_bytes(), Profile::Rfc8785).as_deref(),
                Ok("\"\u{e9}\""),
                "{input}"
            );
        }
        assert_eq!(
            signet("{\"\\u0065\\u0301\":1}").as_deref(),
            Ok("{\"\u{e9}\":1}")
        );
    }

    #[test]
    fn signet_profile_normalizes_values_built_in_code() {
        let value = Value::String("e\u{301}".into());
        assert_eq!(
            to_canonical(&value, Profile::Signet).as_deref(),
            Ok("\"\u{e9}\"")
        );
        assert_eq!(
            to_canonical(&value, Profile::Rfc8785).as_deref(),
            Ok("\"e\u{301}\"")
        );
    }

    #[test]
    fn unsafe_integers_are_rejected_only_on_request() {
        let strict = ParseOptions {
            profile: Profile::Signet,
            reject_unsafe_integers: true,
        };
        assert!(parse(b"9007199254740992", &strict).is_ok());
        assert!(parse(b"-9007199254740992", &strict).is_ok());
        assert!(parse(b"9007199254740992.0", &strict).is_ok());
        assert!(parse(b"9007199254740993.5", &strict).is_ok()); // not an integer
        assert!(parse(b"90071992547409920e-1", &strict).is_ok());
        assert!(parse(b"1e15", &strict).is_ok());
        assert!(parse(b"0.0e400", &strict).is_ok());
        assert!(parse(b"1e-400000000000000000000", &strict).is_ok()); // a tiny fraction
        let huge = parse(b"1e99999999999999999999", &strict).err();
        assert_eq!(huge.map(|e| e.code()), Some("UNSAFE_INTEGER"));
        for input in [
            "9007199254740993",
            "-9007199254740993",
            "1000000000000000000000000",
            // a double holds these exactly, but SPEC §1 rejects the whole range beyond 2^53
            "9007199254740994",
            "18446744073709551616",
            "-18446744073709551616",
            "-18014398509481984",
            "1e21",
            // the same integers in other notations
            "9007199254740993.0",
            "9.007199254740993e15",
            "90071992547409930e-1",
            "0.9007199254740994e16",
            "6.02e23",
        ] {
            let err = parse(input.as_bytes(), &strict).err();
            assert_eq!(err.map(|e| e.code()), Some("UNSAFE_INTEGER"), "{input}");
            assert!(parse(input.as_bytes(), &ParseOptions::default()).is_ok());
        }
    }

    #[test]
    fn noncharacters_are_refused_raw_or_escaped() {
        for input in [
            "\"\u{FDD0}\"",
            "\"a\u{FDEF}\"",
            "\"\u{FFFE}\"",
            "\"\u{FFFF}\"",
            "\"\u{1FFFE}\"",
            "\"\u{10FFFF}\"",
            r#""\ufdd0""#,
            r#""\uffff""#,
            r#""\ud83f\udffe""#, // U+1FFFE as a surrogate pair
            "{\"\u{FFFE}\":1}",
        ] {
            for profile in [Profile::Signet, Profile::Rfc8785] {
                let opts = ParseOptions {
                    profile,
                    reject_unsafe_integers: false,
                };
                let err = parse(input.as_bytes(), &opts).err();
                assert_eq!(err.map(|e| e.code()), Some("NONCHARACTER"), "{input:?}");
            }
        }
        for fine in ["\"\u{FDCF}\u{FDF0}\u{FFFD}\u{1FFFD}\"", r#""\ufffd\u00e9""#] {
            assert!(signet(fine).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn escapes_only_what_rfc8785_requires() {
        let input = r#""\u0000\u001f\b\t\n\f\r\"\\\/\u00e9\u20ac\ud83d\ude00\u007f""#;
        assert_eq!(
            signet(input).as_deref(),
            Ok("\"\\u0000\\u001f\\b\\t\\n\\f\\r\\\"\\\\/é€😀\u{7f}\"")
        );
    }

    #[test]
    fn members_sort_by_utf16_code_units() {
        // U+FF61 sorts after U+1F600 in code points but before it in UTF-16 (0xD83D < 0xFF61).
        let input = "{\"\u{ff61}\":1,\"\u{1f600}\":2,\"a\":3,\"\":4,\"ab\":5}";
        assert_eq!(
            signet(input).as_deref(),
            Ok("{\"\":4,\"a\":3,\"ab\":5,\"\u{1f600}\":2,\"\u{ff61}\":1}")
        );
    }

    proptest::proptest! {
        #[test]
        fn utf16_order_matches_encode_utf16(
            a in "[a\u{7f}\u{80}\u{ff}\u{800}\u{d7ff}\u{e000}\u{ff61}\u{ffff}\u{10000}\u{1f600}\u{10ffff}]{0,4}",
            b in "[a\u{7f}\u{80}\u{ff}\u{800}\u{d7ff}\u{e000}\u{ff61}\u{ffff}\u{10000}\u{1f600}\u{10ffff}]{0,4}",
        ) {
            proptest::prop_assert_eq!(cmp_utf16(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
        }

        #[test]
        fn plain_runs_stop_where_the_byte_loop_does(
            s in "[a\u{0}\u{1f} \"\\\\\u{7f}\u{80}\u{ff}\u{2028}\u{1f600}]{0,24}"
        ) {
            let stop = s.bytes().position(|b| b < 0x20 || b == b'"' || b == b'\\');
            let len = stop.unwrap_or(s.len());
            let or = s.as_bytes()[..len].iter().fold(0, |acc, b| acc | b);
            proptest::prop_assert_eq!(plain_run(s.as_bytes()), (len, or));
            // and the writer escapes exactly those bytes, whatever their position
            let written = to_canonical(&Value::String(s.clone()), Profile::Rfc8785).unwrap();
            proptest::prop_assert_eq!(
                parse(written.as_bytes(), &ParseOptions { profile: Profile::Rfc8785, reject_unsafe_integers: false }).unwrap(),
                Value::String(s)
            );
        }

        #[test]
        fn ascii_check_agrees_with_core(s in "[a\u{0}\u{7f}\u{80}\u{ff}\u{20ac}]{0,24}") {
            proptest::prop_assert_eq!(is_ascii(s.as_bytes()), s.is_ascii());
        }

        #[test]
        fn latin_fast_path_agrees_with_nfc(s in "[\u{0}-\u{2ff}]{0,8}") {
            proptest::prop_assert_eq!(is_nfc_quick(s.chars()), IsNormalized::Yes);
            proptest::prop_assert_eq!(nfc(&s), Cow::Borrowed(s.as_str()));
        }
    }

    #[test]
    fn nesting_limit_is_enforced_without_recursion() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(signet(&ok).as_deref(), Ok(ok.as_str()));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(signet(&deep).err().map(|e| e.code()), Some("TOO_DEEP"));
        let objects = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert_eq!(signet(&objects).as_deref(), Ok(objects.as_str()));

        // A value built in code deeper than the limit is refused by the writer too; an empty
        // container counts as a level, as in the parser.
        for innermost in [Value::Null, Value::Array(vec![]), Value::Object(Map::new())] {
            let mut value = innermost.clone();
            let levels = if innermost.is_null() {
                MAX_DEPTH
            } else {
                MAX_DEPTH - 1
            };
            for _ in 0..levels {
                value = Value::Array(vec![value]);
            }
            let text = to_canonical(&value, Profile::Rfc8785).unwrap();
            assert_eq!(signet(&text).as_deref(), Ok(text.as_str()));
            let value = Value::Array(vec![value]);
            let result = to_canonical(&value, Profile::Rfc8785);
            assert_eq!(
                result.err().map(|e| e.code()),
                Some("TOO_DEEP"),
                "{innermost}"
            );
        }
    }

    #[test]
    fn errors_carry_offsets() {
        let err = signet("{\"a\":1,\n \"a\":2}").err();
        assert_eq!(err.as_ref().and_then(CanonError::offset), Some(9));
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("duplicate member name \"a\" at byte 9")
        );
    }

    #[test]
    fn normalize_object_matches_signet_profile() {
        let mut value = parse(
            "{\"e\u{301}\":[\"A\u{30a}\",{\"x\u{308}\":\"o\u{308}\"}]}".as_bytes(),
            &ParseOptions {
                profile: Profile::Rfc8785,
                reject_unsafe_integers: false,
            },
        )
        .unwrap();
        let signet = to_canonical(&value, Profile::Signet).unwrap();
        assert_ne!(to_canonical(&value, Profile::Rfc8785).unwrap(), signet);
        normalize_object(value.as_object_mut().unwrap()).unwrap();
        assert_eq!(to_canonical(&value, Profile::Rfc8785).unwrap(), signet);

        let mut colliding = Map::new();
        colliding.insert("n".into(), json!({"\u{e9}": 1, "e\u{301}": 2}));
        assert_eq!(
            normalize_object(&mut colliding).err().map(|e| e.code()),
            Some("DUPLICATE_KEY")
        );
    }
}
