//! Fuzzes receipt, chain and bundle verification with arbitrary JSON: it must never panic, and a
//! document must not verify with a JWKS whose only key never signed anything.

#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_protocol::canonical::{parse, ParseOptions, Profile};
use signet_protocol::{bundle, chain, receipt, Jwks, SigningKey};

fuzz_target!(|data: &[u8]| {
    let options = ParseOptions {
        profile: Profile::Rfc8785,
        reject_unsafe_integers: false,
    };
    let Ok(document) = parse(data, &options) else {
        return;
    };
    let unused_key = SigningKey::from_seed([7; 32], "fuzz");
    let jwks: Jwks = [unused_key.public_jwk()].into_iter().collect();
    for require_sig in [false, true] {
        let _ = receipt::verify(&document, None, require_sig);
        let _ = bundle::verify(&document, None, require_sig);
        if let Some(receipts) = document.as_array() {
            let _ = chain::verify(receipts, None, require_sig);
        }
    }
    assert!(receipt::verify(&document, Some(&jwks), true).is_err());
    assert!(bundle::verify(&document, Some(&jwks), true).is_err());
    if let Some(receipts) = document.as_array() {
        assert!(chain::verify(receipts, Some(&jwks), true).is_err());
    }
});
