//! The HTTP headers of an exchange: what the client sends, and the receipt headers the filter
//! sets (SPEC §4).

use serde_json::Value;
use signet_protocol::ApiError;

pub const API_KEY_HEADERS: [&str; 2] = ["x-signet-api-key", "x-odin-api-key"];
pub const IDEMPOTENCY_KEY_HEADERS: [&str; 2] =
    ["x-signet-idempotency-key", "x-odin-idempotency-key"];
pub const TRACE_HEADER: &str = "x-signet-trace";
pub const RECEIPT_HASH_HEADER: &str = "x-signet-receipt-hash";
pub const HOP_HEADER: &str = "x-signet-hop";
pub const CID_HEADER: &str = "x-signet-cid";
pub const IDEMPOTENCY_HIT_HEADER: &str = "x-signet-idempotency-hit";
/// Receipt headers only the filter may set on the upstream request.
pub const FORGEABLE_HEADERS: [&str; 4] = [
    RECEIPT_HASH_HEADER,
    HOP_HEADER,
    CID_HEADER,
    IDEMPOTENCY_HIT_HEADER,
];

/// `X-SIGNET-Trace`, `-Receipt-Hash`, `-Hop`, `-CID` from an exchange's 200 body.
pub fn receipt_headers(response: &Value) -> Vec<(String, String)> {
    let receipt = response.get("receipt");
    let field = |v: Option<&Value>, name: &str| match v.and_then(|v| v.get(name)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    [
        (TRACE_HEADER, field(Some(response), "trace_id")),
        (RECEIPT_HASH_HEADER, field(receipt, "receipt_hash")),
        (HOP_HEADER, field(receipt, "hop")),
        (CID_HEADER, field(receipt, "cid")),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|t| (name.to_owned(), t)))
    .collect()
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// A header map as the host hands it over: names and values as raw bytes, never assumed to be
/// UTF-8 (a client can send any byte but NUL, CR and LF in a value; proxy-wasm 0.2's string
/// getters panic on them and kill the VM). Values are read with ASCII OWS (SP, HTAB, RFC 9110)
/// trimmed, and nothing else.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Headers {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Headers {
    pub fn new(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self { pairs }
    }

    /// The proxy-wasm serialized map: a u32 count, `count` pairs of u32 sizes, then each name
    /// and value followed by a NUL (all little-endian). What a malformed map holds past the
    /// first inconsistency is dropped.
    pub fn from_serialized(bytes: &[u8]) -> Self {
        let u32_at = |at: usize| -> Option<usize> {
            let end = at.checked_add(4)?;
            let word: [u8; 4] = bytes.get(at..end)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(word)).ok()
        };
        let mut pairs = Vec::new();
        let Some(count) = u32_at(0) else {
            return Self { pairs };
        };
        let sizes_end = count.checked_mul(8).and_then(|n| n.checked_add(4));
        let mut at = sizes_end.unwrap_or(usize::MAX);
        for n in 0..count {
            let Some(sizes) = n.checked_mul(8).and_then(|s| s.checked_add(4)) else {
                break;
            };
            let mut take = |size: Option<usize>| -> Option<Vec<u8>> {
                let end = at.checked_add(size?)?;
                let field = bytes.get(at..end)?.to_vec();
                at = end.checked_add(1)?; // the NUL
                Some(field)
            };
            let name = take(u32_at(sizes));
            let value = take(sizes.checked_add(4).and_then(u32_at));
            match (name, value) {
                (Some(name), Some(value)) => pairs.push((name, value)),
                _ => break,
            }
        }
        Self { pairs }
    }

    /// Every value of `name` (ASCII case-insensitive), OWS-trimmed, in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pairs
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| trim_ows(v))
    }

    /// The value of a header that may appear once: 400 `DUPLICATE_HEADER` when repeated (a
    /// proxy or application behind this one may read another of the values).
    pub fn single(&self, name: &str) -> Result<Option<&[u8]>, ApiError> {
        let mut found = None;
        for (n, v) in &self.pairs {
            if n.eq_ignore_ascii_case(name.as_bytes()) {
                if found.is_some() {
                    return Err(duplicate(name));
                }
                found = Some(trim_ows(v));
            }
        }
        Ok(found)
    }

    /// The value of a header with aliases (`X-SIGNET-`, `X-ODIN-`): each may appear once, and
    /// where several are set they must agree. Empty values count as absent.
    pub fn aliased(&self, names: &[&str]) -> Result<Option<&[u8]>, ApiError> {
        let mut found: Option<&[u8]> = None;
        for name in names {
            match (self.single(name)?, found) {
                (Some([]), _) => {}
                (Some(v), Some(f)) if v != f => return Err(duplicate(name)),
                (Some(v), None) => found = Some(v),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Every value of `name`, for headers that may repeat.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name)
    }
}

impl From<&[(&str, &str)]> for Headers {
    fn from(pairs: &[(&str, &str)]) -> Self {
        let pairs = pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        Self { pairs }
    }
}

fn duplicate(name: &str) -> ApiError {
    ApiError::new(
        400,
        "DUPLICATE_HEADER",
        format!("{name} must appear once (and agree with its alias)"),
    )
}

/// Trims RFC 9110 optional whitespace (SP, HTAB) only: any other byte is part of the value.
pub fn trim_ows(value: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |e| e + 1);
    value.get(start..end).unwrap_or_default()
}

/// The value as text when every byte is visible ASCII (0x21–0x7E): what an API key, an
/// idempotency key or a trace id may hold.
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    if value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut bytes = (pairs.len() as u32).to_le_bytes().to_vec();
        for (n, v) in pairs {
            bytes.extend((n.len() as u32).to_le_bytes());
            bytes.extend((v.len() as u32).to_le_bytes());
        }
        for (n, v) in pairs {
            bytes.extend(*n);
            bytes.push(0);
            bytes.extend(*v);
            bytes.push(0);
        }
        bytes
    }

    #[test]
    fn a_serialized_map_is_read_as_bytes() {
        let bytes = serialize(&[(b":status", b"200"), (b"x-k", b"a\xffb"), (b"x-k", b"")]);
        let headers = Headers::from_serialized(&bytes);
        assert_eq!(headers.single(":status").unwrap(), Some(&b"200"[..]));
        assert_eq!(
            headers.all("x-k").collect::<Vec<_>>(),
            [&b"a\xffb"[..], b""]
        );
        assert_eq!(headers.single("x-k").unwrap_err().code, "DUPLICATE_HEADER");
        // truncated or lying sizes: what is consistent, and never a panic
        for cut in 0..bytes.len() {
            let partial = Headers::from_serialized(&bytes[..cut]);
            assert!(partial.pairs.len() <= 3);
        }
        let lying = [u32::MAX.to_le_bytes(), 7u32.to_le_bytes()].concat();
        assert_eq!(Headers::from_serialized(&lying), Headers::default());
        assert_eq!(Headers::from_serialized(&[]), Headers::default());
    }

    #[test]
    fn only_ascii_ows_is_trimmed() {
        assert_eq!(trim_ows(b" \tk\t "), b"k");
        assert_eq!(trim_ows(b"  "), b"");
        assert_eq!(trim_ows("k\u{3000}".as_bytes()), "k\u{3000}".as_bytes());
        assert_eq!(trim_ows(b"\xa0k"), b"\xa0k");
        assert_eq!(visible_ascii(b"demo-key"), Some("demo-key"));
        for bad in [
            &b"demo key"[..],
            b"k\xff",
            "k\u{2028}".as_bytes(),
            b"k\x7f",
            b"\x00",
        ] {
            assert_eq!(visible_ascii(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn aliases_must_agree_and_appear_once() {
        let h = |pairs: &[(&str, &str)]| Headers::from(pairs);
        let names = ["x-signet-api-key", "x-odin-api-key"];
        assert_eq!(
            h(&[("X-ODIN-API-KEY", " k ")]).aliased(&names).unwrap(),
            Some(&b"k"[..])
        );
        assert_eq!(
            h(&[("x-signet-api-key", "k"), ("x-odin-api-key", "k")])
                .aliased(&names)
                .unwrap(),
            Some(&b"k"[..])
        );
        assert_eq!(
            h(&[("x-signet-api-key", ""), ("x-odin-api-key", "k")])
                .aliased(&names)
                .unwrap(),
            Some(&b"k"[..])
        );
        for repeated in [
            h(&[("x-signet-api-key", "k"), ("x-odin-api-key", "j")]),
            h(&[("x-signet-api-key", "k"), ("x-signet-api-key", "k")]),
        ] {
            assert_eq!(
                repeated.aliased(&names).unwrap_err().code,
                "DUPLICATE_HEADER"
            );
        }
        assert_eq!(h(&[]).aliased(&names).unwrap(), None);
    }
}
