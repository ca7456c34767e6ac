//! The shared conformance vectors (/work/shared/vectors, see its README): plain RFC 8785 must
//! reproduce them byte for byte; the Signet profile may differ only by NFC-normalizing strings.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Number, Value};
use signet_protocol::canonical::{canonicalize, parse, to_canonical, ParseOptions, Profile};
use signet_protocol::{chain, receipt};

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors")
}

/// The vectors whose strings are not in NFC (named in the vectors' README).
const NOT_NFC: [&str; 4] = [
    "rfc8785/sec3.1-unicode-not-normalized",
    "rfc8785/sec3.2.3-sorting",
    "cyberphone/unicode",
    "cyberphone/weird",
];

fn rfc8785_options() -> ParseOptions {
    ParseOptions {
        profile: Profile::Rfc8785,
        reject_unsafe_integers: false,
    }
}

#[test]
fn input_output_vectors() {
    let mut checked = 0;
    let mut signet_differs = BTreeSet::new();
    for suite in ["rfc8785", "cyberphone"] {
        let dir = vectors_dir().join(suite);
        let mut inputs: Vec<PathBuf> = fs::read_dir(dir.join("input"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        for input_path in inputs {
            let name = input_path.file_stem().unwrap().to_str().unwrap().to_owned();
            let id = format!("{suite}/{name}");
            let input = fs::read(&input_path).unwrap();
            let expected_path = dir.join("output").join(format!("{name}.json"));
            if dir.join("output").join(format!("{name}.error")).exists() {
                for profile in [Profile::Rfc8785, Profile::Signet] {
                    assert!(
                        canonicalize(&input, profile).is_err(),
                        "{id} must be rejected ({profile:?})"
                    );
                }
            } else {
                let expected = fs::read_to_string(&expected_path).unwrap();
                let plain = canonicalize(&input, Profile::Rfc8785).unwrap();
                assert_eq!(plain, expected, "{id} (RFC 8785)");

                let signet = canonicalize(&input, Profile::Signet).unwrap();
                // The expected output with its strings NFC-normalized, re-sorted, re-written.
                let expected_nfc = canonicalize(expected.as_bytes(), Profile::Signet).unwrap();
                assert_eq!(signet, expected_nfc, "{id} (Signet)");
                if signet != expected {
                    signet_differs.insert(id);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} vectors found");
    assert_eq!(
        signet_differs,
        NOT_NFC.iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn appendix_b_numbers() {
    let table = fs::read_to_string(vectors_dir().join("rfc8785/appendixB.csv")).unwrap();
    let mut checked = 0;
    for line in table.lines().filter(|line| !line.trim().is_empty()) {
        let (hex, expected) = line.split_once(',').unwrap();
        let double = f64::from_bits(u64::from_str_radix(hex, 16).unwrap());
        let Some(number) = Number::from_f64(double) else {
            // NaN and Infinity have no JSON form; their .error vectors cover the parser.
            assert!(!double.is_finite(), "{line}");
            continue;
        };
        let written = to_canonical(&Value::Number(number), Profile::Signet).unwrap();
        assert_eq!(written, expected, "{line}");
        // Parsing the ECMAScript form gives the same double back (-0 is written as 0).
        let reparsed = parse(expected.as_bytes(), &rfc8785_options()).unwrap();
        let reparsed = reparsed.as_f64().unwrap();
        assert!(
            reparsed.to_bits() == double.to_bits() || (double == 0.0 && reparsed == 0.0),
            "{line}: read back as {reparsed:e}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} numbers checked");
}

#[test]
fn upstream_canonicalization_cases() {
    let doc = fs::read(vectors_dir().join("signet-upstream/canonicalization-tests.json")).unwrap();
    let doc = parse(&doc, &rfc8785_options()).unwrap();
    let tests = doc["tests"].as_array().unwrap();
    assert!(!tests.is_empty());
    for case in tests {
        for profile in [Profile::Rfc8785, Profile::Signet] {
            assert_eq!(
                to_canonical(&case["input"], profile).unwrap(),
                case["expected"].as_str().unwrap(),
                "{} ({profile:?})",
                case["name"]
            );
        }
    }
}

#[test]
fn upstream_receipt_and_chain_verify_unsigned() {
    let read = |name: &str| {
        let bytes = fs::read(vectors_dir().join("signet-upstream").join(name)).unwrap();
        parse(&bytes, &ParseOptions::default()).unwrap()
    };
    let basic = read("basic-receipt.json");
    receipt::verify(&basic, None, false).unwrap();
    // Unsigned receipts fail as soon as a signature is required.
    let err = receipt::verify(&basic, None, true).unwrap_err();
    assert_eq!(err.code(), "MISSING_SIGNATURE");

    let chain = read("simple-chain.json");
    let receipts = chain.as_array().unwrap();
    chain::verify(receipts, None, false).unwrap();
    assert!(chain::verify(receipts, None, true).is_err());
    // Their receipt_hash is the same in both profiles (all strings are ASCII).
    for receipt in receipts {
        let map = receipt.as_object().unwrap();
        let mut without_hash = map.clone();
        without_hash.remove("receipt_hash");
        let plain = to_canonical(&Value::Object(without_hash), Profile::Rfc8785).unwrap();
        assert_eq!(
            signet_protocol::cid::cid(plain.as_bytes()),
            receipt::receipt_hash(map).unwrap()
        );
        assert_eq!(map["receipt_hash"], receipt::receipt_hash(map).unwrap());
    }
}
