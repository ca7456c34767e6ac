//! Ed25519 signing keys and the JWKS (SPEC §3).

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
// ed25519-dalek: its 32-bit field arithmetic suits wasm32 (docs/perf.md). Verification is
// `verify_strict`: S < L, no small-order key or R, cofactorless equation.
use ed25519_dalek::{Signature, Signer, SigningKey as DalekKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{Rule, VerifyError};

/// Why a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// An Ed25519 key with its key id. Built from the configured 32-byte seed.
#[derive(Clone)]
pub struct SigningKey {
    key: DalekKey,
    kid: String,
}

impl SigningKey {
    /// From the seed as configured in `SP_PRIVATE_KEY_B64`: base64url of 32 bytes (padding optional).
    pub fn from_seed_b64url(seed: &str, kid: impl Into<String>) -> Result<Self, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(seed.trim().trim_end_matches('='))
            // the decoder's message names a symbol of the seed and where it is: say nothing of it
            .map_err(|_| {
                KeyError(
                    "signing key seed is not base64url (URL-safe alphabet, 43 characters)".into(),
                )
            })?;
        let seed: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            KeyError(format!(
                "signing key seed must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(SigningKey::from_seed(seed, kid))
    }

    pub fn from_seed(seed: [u8; 32], kid: impl Into<String>) -> Self {
        SigningKey {
            key: DalekKey::from_bytes(&seed),
            kid: kid.into(),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Deterministic Ed25519 signature of `msg`, standard base64 with padding.
    pub fn sign(&self, msg: &[u8]) -> String {
        STANDARD.encode(self.key.sign(msg).to_bytes())
    }

    /// The public half as published in the JWKS.
    pub fn public_jwk(&self) -> Jwk {
        Jwk::ed25519(self.kid.clone(), &self.key.verifying_key())
    }

    /// The seed in the configured form (base64url, no padding).
    pub fn seed_b64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.to_bytes())
    }
}

impl fmt::Debug for SigningKey {
    // Never print the seed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// One public key of the JWKS: `{"kty":"OKP","crv":"Ed25519","x","kid","use":"sig","alg":"EdDSA"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    /// base64url (no padding) of the 32-byte public key.
    pub x: String,
    pub kid: String,
    /// `use` and `alg` are optional in RFC 7517: a key published without them still verifies.
    #[serde(rename = "use", default = "default_use")]
    pub use_: String,
    #[serde(default = "default_alg")]
    pub alg: String,
}

fn default_use() -> String {
    "sig".into()
}

fn default_alg() -> String {
    "EdDSA".into()
}

impl Jwk {
    fn ed25519(kid: String, pk: &VerifyingKey) -> Self {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(pk.as_bytes()),
            kid,
            use_: "sig".into(),
            alg: "EdDSA".into(),
        }
    }

    /// The point `x` encodes, if it is a usable Ed25519 public key. A key that is not fails
    /// every signature check (a `Signature` failure, as for a small-order key).
    fn point(&self) -> Option<VerifyingKey> {
        let encoded = self.public_key().ok()?;
        is_canonical_y(&encoded)
            .then(|| VerifyingKey::from_bytes(&encoded).ok())
            .flatten()
    }

    /// The 32 bytes of `x`.
    fn public_key(&self) -> Result<[u8; 32], VerifyError> {
        if self.kty != "OKP" || self.crv != "Ed25519" {
            return Err(VerifyError::new(
                Rule::UnknownKid,
                format!("key {:?} is not an Ed25519 key", self.kid),
            ));
        }
        URL_SAFE_NO_PAD
            .decode(self.x.trim_end_matches('='))
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                VerifyError::new(
                    Rule::UnknownKid,
                    format!("key {:?} has no valid Ed25519 public key", self.kid),
                )
            })
    }
}

/// `{"keys":[…]}` as served at `/.well-known/jwks.json`. Built from its keys with `collect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Jwks {
    keys: Vec<Jwk>,
    /// Each key's point, decompressed once: ~5 µs of every verification otherwise
    /// (docs/perf.md). `None` for a key that cannot verify anything.
    #[serde(skip)]
    points: Vec<Option<VerifyingKey>>,
}

impl Jwks {
    /// Parses a JWKS document. Keys this crate cannot use (other key types, members missing) are
    /// skipped, as RFC 7517 §5 asks, so a mixed JWKS still works.
    pub fn from_json(bytes: &[u8]) -> Result<Jwks, KeyError> {
        let document = serde_json::from_slice(bytes)
            .map_err(|e| KeyError(format!("not a JWKS document: {e}")))?;
        Jwks::from_value(document)
    }

    fn from_value(document: serde_json::Value) -> Result<Jwks, KeyError> {
        let serde_json::Value::Object(mut document) = document else {
            return Err(KeyError("not a JWKS document: not an object".into()));
        };
        let Some(serde_json::Value::Array(keys)) = document.remove("keys") else {
            return Err(KeyError("not a JWKS document: no \"keys\" array".into()));
        };
        Ok(keys
            .into_iter()
            .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
            .filter(|key| key.kty == "OKP" && key.crv == "Ed25519")
            .collect())
    }

    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    /// The JWKS document as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from(r#"{"keys":[]}"#))
    }

    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|key| key.kid == kid)
    }

    /// Checks the standard-base64 Ed25519 signature `sig_b64` of `msg` with the key `kid`.
    pub fn verify(&self, kid: &str, msg: &[u8], sig_b64: &str) -> Result<(), VerifyError> {
        let (key, point) = self
            .keys
            .iter()
            .zip(&self.points)
            .find(|(key, _)| key.kid == kid)
            .ok_or_else(|| {
                VerifyError::new(Rule::UnknownKid, format!("kid {kid:?} is not in the JWKS"))
            })?;
        key.public_key()?; // a malformed `x` is an unknown kid, not a bad signature
        let signature = STANDARD
            .decode(sig_b64)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or_else(|| {
                VerifyError::new(
                    Rule::Signature,
                    "signature is not standard base64 of 64 bytes",
                )
            })?;
        let verified = point.is_some_and(|point| point.verify_strict(msg, &signature).is_ok());
        verified.then_some(()).ok_or_else(|| {
            VerifyError::new(
                Rule::Signature,
                format!("Ed25519 signature does not verify with kid {kid:?}"),
            )
        })
    }
}

/// Whether the y coordinate of an encoded point (its low 255 bits) is below p = 2^255 - 19, as
/// RFC 8032 §5.1.3 decoding requires. curve25519-dalek reduces a larger y instead of refusing
/// it (ed25519-compact, used before, refused it): keep refusing such keys.
fn is_canonical_y(encoded: &[u8; 32]) -> bool {
    // y >= p only for ed..ff, then 30 bytes ff, then 7f (the sign bit aside)
    let [first, middle @ .., last] = encoded;
    !(*first >= 0xed && middle.iter().all(|&b| b == 0xff) && last & 0x7f == 0x7f)
}

impl<'de> Deserialize<'de> for Jwks {
    /// Same leniency as [`Jwks::from_json`].
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let document = serde_json::Value::deserialize(deserializer)?;
        Jwks::from_value(document).map_err(serde::de::Error::custom)
    }
}

impl FromIterator<Jwk> for Jwks {
    fn from_iter<I: IntoIterator<Item = Jwk>>(keys: I) -> Self {
        let keys: Vec<Jwk> = keys.into_iter().collect();
        let points = keys.iter().map(Jwk::point).collect();
        Jwks { keys, points }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 §7.1, test 1.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const RFC8032_SIG_EMPTY: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn rfc8032_key() -> SigningKey {
        let seed: [u8; 32] = unhex(RFC8032_SEED).try_into().unwrap();
        SigningKey::from_seed(seed, "k1")
    }

    #[test]
    fn signs_like_rfc8032() {
        let key = rfc8032_key();
        assert_eq!(key.sign(b""), STANDARD.encode(unhex(RFC8032_SIG_EMPTY)));
        assert_eq!(
            key.public_jwk().x,
            URL_SAFE_NO_PAD.encode(unhex(RFC8032_PUBLIC))
        );
    }

    #[test]
    fn seed_round_trips_through_base64url() {
        let key = rfc8032_key();
        let again = SigningKey::from_seed_b64url(&key.seed_b64url(), "k1").unwrap();
        assert_eq!(again.public_jwk(), key.public_jwk());
        assert!(SigningKey::from_seed_b64url("AAAA", "k").is_err());
        assert!(SigningKey::from_seed_b64url("not base64!", "k").is_err());
        assert!(!format!("{key:?}").contains(&key.seed_b64url()));
    }

    #[test]
    fn a_bad_seed_is_refused_without_echoing_any_of_it() {
        let seed = key_seed_with_one_bad_symbol();
        let message = SigningKey::from_seed_b64url(&seed, "k")
            .unwrap_err()
            .to_string();
        // neither the symbol, nor its code, nor its offset, nor any 4-character run of the seed
        for leak in ["*", "42", "offset", "symbol"] {
            assert!(!message.contains(leak), "{message:?} contains {leak:?}");
        }
        for window in seed.as_bytes().windows(4) {
            let run = std::str::from_utf8(window).unwrap();
            assert!(!message.contains(run), "{message:?} echoes {run:?}");
        }
    }

    fn key_seed_with_one_bad_symbol() -> String {
        let mut seed = rfc8032_key().seed_b64url();
        seed.replace_range(20..21, "*");
        seed
    }

    #[test]
    fn jwks_round_trip_and_verify() {
        let key = rfc8032_key();
        let jwks: Jwks = [key.public_jwk()].into_iter().collect();
        let json = jwks.to_json();
        assert!(json.contains(r#""use":"sig""#));
        let parsed = Jwks::from_json(json.as_bytes()).unwrap();
        assert_eq!(parsed, jwks);

        let sig = key.sign(b"hello");
        assert!(parsed.verify("k1", b"hello", &sig).is_ok());
        let err = |r: Result<(), VerifyError>| r.err().map(|e| e.rule);
        assert_eq!(
            err(parsed.verify("k1", b"hellp", &sig)),
            Some(Rule::Signature)
        );
        assert_eq!(
            err(parsed.verify("k2", b"hello", &sig)),
            Some(Rule::UnknownKid)
        );
        assert_eq!(
            err(parsed.verify("k1", b"hello", "%%")),
            Some(Rule::Signature)
        );
    }

    #[test]
    fn jwks_skips_keys_it_cannot_use() {
        let doc = r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"r"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"e","use":"sig","alg":"EdDSA"}]}"#;
        let jwks = Jwks::from_json(doc.as_bytes()).unwrap();
        assert_eq!(jwks.keys().len(), 1);
        assert!(jwks.find("e").is_some());
        assert!(Jwks::from_json(b"[]").is_err());
        assert!(Jwks::from_json(br#"{"keys":{}}"#).is_err());
        let via_serde: Jwks = serde_json::from_str(doc).unwrap();
        assert_eq!(via_serde, jwks);
    }

    fn jwks_with_x(x: &[u8]) -> Jwks {
        let mut jwk = rfc8032_key().public_jwk();
        jwk.x = URL_SAFE_NO_PAD.encode(x);
        [jwk].into_iter().collect()
    }

    #[test]
    fn a_non_canonical_s_is_rejected() {
        // S + L is the same scalar mod L: a verifier that does not insist on S < L accepts it,
        // which makes signatures malleable.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let key = rfc8032_key();
        let jwks: Jwks = [key.public_jwk()].into_iter().collect();
        let mut sig = STANDARD.decode(key.sign(b"hello")).unwrap();
        let mut carry = 0u16;
        for (s, l) in sig[32..].iter_mut().zip(L) {
            let sum = u16::from(*s) + u16::from(l) + carry;
            *s = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0);
        let err = jwks.verify("k1", b"hello", &STANDARD.encode(&sig)).err();
        assert_eq!(err.map(|e| e.rule), Some(Rule::Signature));
    }

    #[test]
    fn small_order_keys_and_non_points_are_rejected() {
        // With A and R the identity and S = 0, [S]B = R + [k]A holds for every message: a
        // verifier that accepts small-order keys accepts this "signature" of anything.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut forged = identity.to_vec();
        forged.extend([0u8; 32]);
        let forged = STANDARD.encode(&forged);
        for msg in [&b"hello"[..], b"", b"anything at all"] {
            let err = jwks_with_x(&identity).verify("k1", msg, &forged).err();
            assert_eq!(err.map(|e| e.rule), Some(Rule::Signature));
        }
        // Another small-order point (order 2, y = -1) with an honest-looking signature.
        let mut minus_one = [0xffu8; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        let sig = rfc8032_key().sign(b"hello");
        let err = jwks_with_x(&minus_one).verify("k1", b"hello", &sig).err();
        assert_eq!(err.map(|e| e.rule), Some(Rule::Signature));
        // y = 2 is not the y of any curve point; a key of the wrong length is no key.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        let err = jwks_with_x(&not_a_point).verify("k1", b"hello", &sig).err();
        assert_eq!(err.map(|e| e.rule), Some(Rule::Signature));
        let err = jwks_with_x(&[1u8; 31]).verify("k1", b"hello", &sig).err();
        assert_eq!(err.map(|e| e.rule), Some(Rule::UnknownKid));
    }

    #[test]
    fn non_canonical_key_encodings_are_rejected() {
        let encoding = |first: u8, last: u8| {
            let mut bytes = [0xffu8; 32];
            bytes[0] = first;
            bytes[31] = last;
            bytes
        };
        // p - 1 (the point y = -1) is canonical; p, p + 3 (y = 3 is on the curve) and p + 18
        // are not, with or without the sign bit
        assert!(is_canonical_y(&encoding(0xec, 0x7f)));
        assert!(is_canonical_y(&encoding(0xec, 0xff)));
        assert!(is_canonical_y(&[0u8; 32]));
        for (first, last) in [(0xed, 0x7f), (0xf0, 0x7f), (0xf0, 0xff), (0xff, 0x7f)] {
            assert!(
                !is_canonical_y(&encoding(first, last)),
                "{first:x} {last:x}"
            );
        }
        let sig = rfc8032_key().sign(b"hello");
        let err = jwks_with_x(&encoding(0xf0, 0x7f))
            .verify("k1", b"hello", &sig)
            .err();
        assert_eq!(err.map(|e| e.rule), Some(Rule::Signature));
    }

    #[test]
    fn jwks_accepts_keys_without_the_optional_use_and_alg() {
        let key = rfc8032_key();
        let minimal = serde_json::json!({"keys":[{"kty":"OKP","crv":"Ed25519",
            "x": key.public_jwk().x, "kid": key.kid()}]});
        let jwks = Jwks::from_json(minimal.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.keys(), [key.public_jwk()]);
        let sig = key.sign(b"m");
        assert!(jwks.verify(key.kid(), b"m", &sig).is_ok());
    }
}
