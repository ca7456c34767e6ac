//! Fuzzes the strict I-JSON parser and the canonical writer with arbitrary bytes.
//!
//! Checked on every input, in both profiles: no panic, no stack overflow (the nesting limit is
//! enforced without recursion); an accepted input has a canonical form that is a fixed point;
//! and whatever the parser accepts, serde_json's parser accepts too (it is the laxer of the two),
//! unless the nesting exceeds serde_json's own recursion limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_protocol::canonical::{canonicalize, parse, to_canonical, ParseOptions, Profile};

fuzz_target!(|data: &[u8]| {
    for profile in [Profile::Signet, Profile::Rfc8785] {
        let options = ParseOptions {
            profile,
            reject_unsafe_integers: false,
        };
        let value = match parse(data, &options) {
            Ok(value) => value,
            Err(err) => {
                assert!(!err.code().is_empty() && !err.to_string().is_empty());
                continue;
            }
        };
        let canonical = match to_canonical(&value, profile) {
            Ok(canonical) => canonical,
            // Only values whose names collide after NFC have no Signet form, and the parser
            // already rejects those.
            Err(err) => panic!("parsed but not canonicalizable ({profile:?}): {err}"),
        };
        let again = canonicalize(canonical.as_bytes(), profile)
            .unwrap_or_else(|err| panic!("canonical output rejected ({profile:?}): {err}"));
        assert_eq!(
            again, canonical,
            "canonical form is not a fixed point ({profile:?})"
        );

        if let Err(err) = serde_json::from_slice::<serde_json::Value>(data) {
            assert!(
                err.to_string().contains("recursion limit"),
                "accepted input that serde_json rejects: {err}"
            );
        }
    }
});
