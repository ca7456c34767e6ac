//! Content identifiers: `"sha256:" + lowercase hex SHA-256` (SPEC §1).

use sha2::{Digest, Sha256};

/// The CID prefix; also the receipt's `algo`.
pub const PREFIX: &str = "sha256:";

/// `sha256:<hex>` of `bytes` (usually canonical JSON).
pub fn cid(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    push_hex(&Sha256::digest(bytes), &mut out);
    out
}

/// [`cid`] of the concatenation of `parts`, without building it.
pub(crate) fn cid_of_parts(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    push_hex(&hasher.finalize(), &mut out);
    out
}

/// Whether `s` has the form of a CID: `sha256:` and 64 lowercase hex digits.
pub fn is_cid(s: &str) -> bool {
    s.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Lowercase hex SHA-256 of `bytes`, without prefix (e.g. the API key hash).
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes` (random ids, digests).
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(bytes, &mut out);
    out
}

fn push_hex(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_form() {
        assert!(is_cid(&cid(b"")));
        for bad in [
            "x",
            "sha256:",
            "sha256:ABC",
            &cid(b"")[..70],
            &cid(b"").to_uppercase(),
        ] {
            assert!(!is_cid(bad), "{bad}");
        }
        assert!(!is_cid(&format!("{}0", cid(b""))));
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            cid(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
