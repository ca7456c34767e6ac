//! The signature of a forwarded delivery (SPEC §5): an HTTP Message Signature (RFC 9421) made
//! with the Signet Ed25519 key (`alg="ed25519"`, `keyid` = kid) over the method, the target
//! URI, the RFC 9530 `Content-Digest` of the body and the Signet headers of the delivery.
//!
//! One definition for both sides: the control plane signs with [`sign`], `signet
//! verify-delivery` (and any receiver written in Rust) checks with [`verify`]. No I/O.
//!
//! Only the subset of RFC 9421 that Signet produces is read back: one signature labelled
//! [`LABEL`], components that are `@method`, `@target-uri` or lowercase header names without
//! parameters, and the `created`, `keyid` and `alg` parameters. A receiver with a general RFC
//! 9421 library verifies the same headers with it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::keys::{Jwks, SigningKey};

/// The label of the one signature in `Signature-Input` and `Signature`.
pub const LABEL: &str = "sig1";
pub const ALG: &str = "ed25519";

/// The delivery's own headers, in the order they are signed (each is covered when present).
pub const DELIVERY_ID: &str = "x-signet-delivery";
pub const TRACE: &str = "x-signet-trace";
pub const HOP: &str = "x-signet-hop";
pub const CID: &str = "x-signet-cid";
/// The receipt the filter signs this exchange on (its `prev_receipt_hash`), on every attempt;
/// absent for the first exchange of a trace.
pub const PREV_RECEIPT_HASH: &str = "x-signet-prev-receipt-hash";
/// The exchange's own receipt: known only once it is committed, so only on retries.
pub const RECEIPT_HASH: &str = "x-signet-receipt-hash";
/// Which attempt this is (1 for the first).
pub const ATTEMPT: &str = "x-signet-attempt";
pub const CONTENT_DIGEST: &str = "content-digest";
pub const CONTENT_TYPE: &str = "content-type";

/// Signed whenever present, in this order, after `@method` and `@target-uri`.
pub const SIGNED_HEADERS: &[&str] = &[
    CONTENT_DIGEST,
    CONTENT_TYPE,
    DELIVERY_ID,
    TRACE,
    HOP,
    CID,
    PREV_RECEIPT_HASH,
    RECEIPT_HASH,
    ATTEMPT,
];

/// What a verifier requires to be covered: a signature that leaves one of them out proves
/// nothing about it.
pub const REQUIRED: &[&str] = &[
    "@method",
    "@target-uri",
    CONTENT_DIGEST,
    DELIVERY_ID,
    TRACE,
    CID,
];

/// RFC 9530 `Content-Digest` with SHA-256: `sha-256=:<base64>:`.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", STANDARD.encode(Sha256::digest(body)))
}

/// The two signature headers of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// `Signature-Input: sig1=("@method" …);created=…;keyid="…";alg="ed25519"`
    pub signature_input: String,
    /// `Signature: sig1=:<base64>:`
    pub signature: String,
}

/// Signs a request: `headers` are (lowercase name, value) pairs; those of [`SIGNED_HEADERS`]
/// that are present are covered, in that order. `created` is Unix seconds.
pub fn sign(
    method: &str,
    target_uri: &str,
    headers: &[(&str, &str)],
    created: u64,
    key: &SigningKey,
) -> SignatureHeaders {
    let mut components = vec![
        ("@method".to_owned(), method.to_ascii_uppercase()),
        ("@target-uri".to_owned(), target_uri.to_owned()),
    ];
    for name in SIGNED_HEADERS {
        if let Some((_, value)) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            components.push(((*name).to_owned(), value.trim().to_owned()));
        }
    }
    let params = signature_params(
        components.iter().map(|(n, _)| n.as_str()),
        created,
        key.kid(),
    );
    let base = signature_base(&components, &params);
    SignatureHeaders {
        signature_input: format!("{LABEL}={params}"),
        signature: format!("{LABEL}=:{}:", key.sign(base.as_bytes())),
    }
}

/// `("@method" "@target-uri" …);created=…;keyid="…";alg="ed25519"` (RFC 9421 §2.3).
fn signature_params<'a>(names: impl Iterator<Item = &'a str>, created: u64, kid: &str) -> String {
    let list: Vec<String> = names.map(|n| format!("\"{n}\"")).collect();
    format!(
        "({});created={created};keyid=\"{}\";alg=\"{ALG}\"",
        list.join(" "),
        escape(kid)
    )
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The signature base (RFC 9421 §2.5): one `"name": value` line per component, then the
/// `"@signature-params"` line, without a final newline.
pub fn signature_base(components: &[(String, String)], params: &str) -> String {
    let mut base = String::new();
    for (name, value) in components {
        base.push_str(&format!("\"{name}\": {value}\n"));
    }
    base.push_str(&format!("\"@signature-params\": {params}"));
    base
}

/// What a verified delivery proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub kid: String,
    pub created: u64,
    /// The covered components, in order.
    pub covered: Vec<String>,
}

/// Verifies a received delivery: `header` looks a header up by lowercase name (its value as
/// received); `body` is the raw body. Checks the `Content-Digest` against the body, that every
/// [`REQUIRED`] component is covered and the Ed25519 signature against `jwks`.
pub fn verify(
    method: &str,
    target_uri: &str,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
    jwks: &Jwks,
) -> Result<Verified, String> {
    let input = header("signature-input").ok_or("no Signature-Input header")?;
    let signature = header("signature").ok_or("no Signature header")?;
    let params = member(&input, LABEL).ok_or(format!("Signature-Input has no {LABEL}"))?;
    let signature = member(&signature, LABEL).ok_or(format!("Signature has no {LABEL}"))?;
    let signature = signature
        .strip_prefix(':')
        .and_then(|s| s.strip_suffix(':'))
        .ok_or("the signature is not a byte sequence :…:")?;
    let parsed = parse_params(params)?;
    if parsed.alg.as_deref() != Some(ALG) {
        return Err(format!("alg is not \"{ALG}\""));
    }
    let kid = parsed.keyid.ok_or("no keyid")?;
    let created = parsed.created.ok_or("no created")?;
    for required in REQUIRED {
        if !parsed.covered.iter().any(|c| c == required) {
            return Err(format!("{required} is not covered by the signature"));
        }
    }
    let digest = header(CONTENT_DIGEST).ok_or("no Content-Digest header")?;
    if digest.trim() != content_digest(body) {
        return Err("Content-Digest is not the SHA-256 of the body".into());
    }
    let mut components = Vec::with_capacity(parsed.covered.len());
    for name in &parsed.covered {
        let value = match name.as_str() {
            "@method" => method.to_ascii_uppercase(),
            "@target-uri" => target_uri.to_owned(),
            n if n.starts_with('@') => return Err(format!("component {n} is not supported")),
            n => header(n)
                .map(|v| v.trim().to_owned())
                .ok_or(format!("covered header {n} is absent"))?,
        };
        components.push((name.clone(), value));
    }
    let base = signature_base(&components, params);
    jwks.verify(&kid, base.as_bytes(), signature)
        .map_err(|e| format!("signature: {e}"))?;
    Ok(Verified {
        kid,
        created,
        covered: parsed.covered,
    })
}

/// The value of dictionary member `label` in a Structured Field dictionary of one or more
/// `label=value` members (values here hold no top-level comma).
fn member<'a>(dictionary: &'a str, label: &str) -> Option<&'a str> {
    split_top_level(dictionary).into_iter().find_map(|m| {
        let (name, value) = m.trim().split_once('=')?;
        (name.trim() == label).then_some(value.trim())
    })
}

/// Splits at commas outside quoted strings and parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut start, mut depth, mut quoted, mut escaped) =
        (Vec::new(), 0, 0u32, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth = depth.saturating_add(1),
            ')' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

struct Params {
    covered: Vec<String>,
    created: Option<u64>,
    keyid: Option<String>,
    alg: Option<String>,
}

/// `("a" "b");created=1;keyid="k";alg="ed25519"`: an inner list of strings and parameters.
fn parse_params(s: &str) -> Result<Params, String> {
    let rest = s
        .strip_prefix('(')
        .ok_or("Signature-Input is not an inner list")?;
    let close = rest.find(')').ok_or("unterminated inner list")?;
    let (list, tail) = (&rest[..close], &rest[close + 1..]);
    let mut covered = Vec::new();
    for item in list.split_whitespace() {
        let name = item
            .strip_prefix('"')
            .and_then(|i| i.strip_suffix('"'))
            .filter(|n| !n.is_empty() && !n.contains(['"', '\\', ';']))
            .ok_or(format!("component {item} is not a plain string"))?;
        if covered.iter().any(|c| c == name) {
            return Err(format!("component {name} is covered twice"));
        }
        covered.push(name.to_owned());
    }
    let mut params = Params {
        covered,
        created: None,
        keyid: None,
        alg: None,
    };
    for param in tail.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, value) = param
            .trim()
            .split_once('=')
            .ok_or(format!("parameter {param} has no value"))?;
        let string = || -> Result<String, String> {
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\"))
                .ok_or(format!("{name} is not a string"))
        };
        match name {
            "created" => {
                params.created = Some(value.parse().map_err(|_| "created is not an integer")?)
            }
            "keyid" => params.keyid = Some(string()?),
            "alg" => params.alg = Some(string()?),
            // expires, nonce, tag: signed as they are (they are part of the base) but unused
            _ => {}
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_seed([7; 32], "k1")
    }

    fn jwks() -> Jwks {
        [key().public_jwk()].into_iter().collect()
    }

    const URI: &str = "https://hooks.example.com/in?x=1";

    fn delivery(body: &[u8]) -> Vec<(String, String)> {
        let digest = content_digest(body);
        let mut headers: Vec<(String, String)> = vec![
            ("content-type".into(), "application/json".into()),
            (CONTENT_DIGEST.into(), digest),
            (DELIVERY_ID.into(), "d-1".into()),
            (TRACE.into(), "t-1".into()),
            (HOP.into(), "2".into()),
            (CID.into(), "sha256:ab".into()),
        ];
        let borrowed: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let sig = sign("post", URI, &borrowed, 1_700_000_000, &key());
        headers.push(("signature-input".into(), sig.signature_input));
        headers.push(("signature".into(), sig.signature));
        headers
    }

    fn check(
        headers: &[(String, String)],
        method: &str,
        uri: &str,
        body: &[u8],
    ) -> Result<Verified, String> {
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        verify(method, uri, &lookup, body, &jwks())
    }

    #[test]
    fn the_rfc_9530_example_digest() {
        // RFC 9530 §B.1: {"hello": "world"}\n
        assert_eq!(
            content_digest(b"{\"hello\": \"world\"}\n"),
            "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"
        );
    }

    #[test]
    fn a_signed_delivery_verifies_and_its_base_has_the_rfc_9421_form() {
        let body = br#"{"a":1}"#;
        let headers = delivery(body);
        let input = &headers
            .iter()
            .find(|(n, _)| n == "signature-input")
            .unwrap()
            .1;
        assert_eq!(
            input,
            r#"sig1=("@method" "@target-uri" "content-digest" "content-type" "x-signet-delivery" "x-signet-trace" "x-signet-hop" "x-signet-cid");created=1700000000;keyid="k1";alg="ed25519""#
        );
        let verified = check(&headers, "POST", URI, body).unwrap();
        assert_eq!(verified.kid, "k1");
        assert_eq!(verified.created, 1_700_000_000);
        let components = vec![
            ("@method".to_owned(), "POST".to_owned()),
            ("@target-uri".to_owned(), URI.to_owned()),
        ];
        assert_eq!(
            signature_base(&components, "(\"@method\" \"@target-uri\");created=1"),
            "\"@method\": POST\n\"@target-uri\": https://hooks.example.com/in?x=1\n\"@signature-params\": (\"@method\" \"@target-uri\");created=1"
        );
    }

    #[test]
    fn any_change_is_refused() {
        let body = br#"{"a":1}"#;
        let headers = delivery(body);
        assert!(check(&headers, "POST", URI, br#"{"a":2}"#)
            .unwrap_err()
            .contains("Content-Digest"));
        assert!(check(&headers, "PUT", URI, body)
            .unwrap_err()
            .contains("signature"));
        assert!(check(&headers, "POST", "https://evil.example.com/in?x=1", body).is_err());
        for (name, value) in [
            (TRACE, "t-2"),
            (HOP, "3"),
            (CID, "sha256:cd"),
            (DELIVERY_ID, "d-2"),
        ] {
            let mut changed = headers.clone();
            changed.iter_mut().find(|(n, _)| n == name).unwrap().1 = value.into();
            assert!(check(&changed, "POST", URI, body).is_err(), "{name}");
        }
        // a signature by another key
        let mut other = headers.clone();
        let digest = content_digest(body);
        let sig = sign(
            "POST",
            URI,
            &[
                (CONTENT_DIGEST, &digest),
                (DELIVERY_ID, "d-1"),
                (TRACE, "t-1"),
                (CID, "sha256:ab"),
            ],
            1,
            &SigningKey::from_seed([8; 32], "k1"),
        );
        other.retain(|(n, _)| !n.starts_with("signature"));
        other.push(("signature-input".into(), sig.signature_input));
        other.push(("signature".into(), sig.signature));
        assert!(check(&other, "POST", URI, body).is_err());
    }

    #[test]
    fn a_signature_that_leaves_a_required_header_out_is_refused() {
        let body = b"{}";
        let digest = content_digest(body);
        let sig = sign(
            "POST",
            URI,
            &[
                (CONTENT_DIGEST, &digest),
                (TRACE, "t-1"),
                (CID, "sha256:ab"),
            ],
            1,
            &key(),
        );
        let headers = vec![
            (CONTENT_DIGEST.to_owned(), digest.clone()),
            (TRACE.to_owned(), "t-1".to_owned()),
            (CID.to_owned(), "sha256:ab".to_owned()),
            (DELIVERY_ID.to_owned(), "d-1".to_owned()),
            ("signature-input".to_owned(), sig.signature_input),
            ("signature".to_owned(), sig.signature),
        ];
        assert!(check(&headers, "POST", URI, body)
            .unwrap_err()
            .contains("x-signet-delivery"));
    }

    #[test]
    fn dictionaries_with_other_signatures_are_read() {
        assert_eq!(
            member(r#"a=("x,y");k="1,2", sig1=:AA==:"#, "sig1"),
            Some(":AA==:")
        );
        assert_eq!(member(r#"a=("x,y");k="1,2""#, "sig1"), None);
        assert!(parse_params(r#"("a" "a");created=1"#).is_err());
        assert!(parse_params(r#""a";created=1"#).is_err());
    }
}
