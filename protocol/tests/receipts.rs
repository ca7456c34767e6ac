//! Receipts, chains and bundles built and signed by this crate: they verify, every SPEC §2/§3 rule
//! is enforced, and any single changed byte of the serialized JSON is detected.

use serde_json::{json, Map, Value};
use signet_protocol::canonical::{parse, to_canonical, ParseOptions, Profile};
use signet_protocol::cid::cid;
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{bundle, chain, Jwks, SigningKey, VerifyError};

fn key(kid: &str, byte: u8) -> SigningKey {
    SigningKey::from_seed([byte; 32], kid)
}

fn jwks_of(keys: &[&SigningKey]) -> Jwks {
    keys.iter().map(|key| key.public_jwk()).collect()
}

fn draft(trace_id: &str, hop: u64, prev: Option<&str>) -> ReceiptDraft {
    let payload = json!({"invoice_id": format!("INV-{hop}"), "amount": 1000 + hop, "currency": "EUR",
                         "note": "Grüße, café", "lines": [{"sku": "A-1", "qty": 2}]});
    let canon = to_canonical(&payload, Profile::Signet).unwrap();
    let mut extensions = Map::new();
    extensions.insert("payload_type".into(), "invoice.v1".into());
    extensions.insert("fu_tokens".into(), 0.into());
    extensions.insert(
        "forwarded".into(),
        json!({"url": "https://api.example.com/x", "status_code": 200, "host": "api.example.com",
               "pinned_ip": "93.184.216.34", "response_size": 17}),
    );
    ReceiptDraft {
        trace_id: trace_id.into(),
        hop,
        ts: format!("2026-11-25T17:00:0{hop}.123Z"),
        tenant: "acme".into(),
        cid: cid(canon.as_bytes()),
        canon: Some(canon),
        prev_receipt_hash: prev.map(str::to_owned),
        policy: Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "ok".into(),
        },
        extensions,
    }
}

fn signed_chain(key: &SigningKey, len: u64) -> Vec<Value> {
    let mut chain: Vec<Value> = Vec::new();
    for hop in 1..=len {
        let prev = chain
            .last()
            .map(|r| r["receipt_hash"].as_str().unwrap().to_owned());
        let receipt = receipt::sign(&draft("trace-1", hop, prev.as_deref()), key).unwrap();
        chain.push(Value::Object(receipt));
    }
    chain
}

fn code(result: Result<(), VerifyError>) -> Option<&'static str> {
    result.err().map(|e| e.code())
}

#[test]
fn signed_receipt_follows_the_spec_order_and_verifies() {
    let key = key("k1", 7);
    let receipt = receipt::sign(&draft("trace-1", 1, None), &key).unwrap();
    assert_eq!(receipt["algo"], "sha256");
    assert_eq!(receipt["kid"], "k1");
    assert_eq!(receipt["prev_receipt_hash"], Value::Null);
    assert_eq!(receipt["payload_type"], "invoice.v1");

    // sig covers everything but sig and receipt_hash; receipt_hash covers everything but itself.
    let mut unsigned = receipt.clone();
    let sig = unsigned.remove("sig").unwrap();
    let hash = unsigned.remove("receipt_hash").unwrap();
    let signed_bytes = to_canonical(&Value::Object(unsigned), Profile::Signet).unwrap();
    jwks_of(&[&key])
        .verify("k1", signed_bytes.as_bytes(), sig.as_str().unwrap())
        .unwrap();
    let mut without_hash = receipt.clone();
    without_hash.remove("receipt_hash");
    let hashed = to_canonical(&Value::Object(without_hash), Profile::Rfc8785).unwrap();
    assert_eq!(hash, cid(hashed.as_bytes()));
    assert_eq!(hash, receipt::receipt_hash(&receipt).unwrap());

    let receipt = Value::Object(receipt);
    receipt::verify(&receipt, Some(&jwks_of(&[&key])), true).unwrap();
    receipt::verify(&receipt, None, false).unwrap();
    assert_eq!(
        code(receipt::verify(&receipt, None, true)),
        Some("UNKNOWN_KID")
    );
    let other = self::key("k2", 8);
    assert_eq!(
        code(receipt::verify(&receipt, Some(&jwks_of(&[&other])), false)),
        Some("UNKNOWN_KID")
    );
    // Same kid, other key: the signature does not verify.
    let impostor = self::key("k1", 9);
    assert_eq!(
        code(receipt::verify(
            &receipt,
            Some(&jwks_of(&[&impostor])),
            false
        )),
        Some("SIGNATURE")
    );
}

#[test]
fn extension_names_on_either_side_of_sig_sign_and_hash_like_the_spec_says() {
    // sign() writes the members before and after `sig` apart and splices `sig` in for the
    // hash: names right next to it in UTF-16 order, and non-ASCII ones, must not upset that.
    let key = key("k1", 7);
    let mut d = draft("trace-1", 1, None);
    for name in [
        "si",
        "sif",
        "sig_x",
        "sigz",
        "sh\u{fc}",
        "\u{e9}t\u{e9}",
        "\u{ff61}",
        "\u{1f600}",
    ] {
        d.extensions.insert(name.into(), json!(name));
    }
    let receipt = receipt::sign(&d, &key).unwrap();
    let mut unsigned = receipt.clone();
    let sig = unsigned.remove("sig").unwrap();
    let hash = unsigned.remove("receipt_hash").unwrap();
    let signed_bytes = to_canonical(&Value::Object(unsigned), Profile::Signet).unwrap();
    assert!(
        signed_bytes.contains("\"sh\u{fc}\":\"sh\u{fc}\",\"si\":\"si\",\"sif\":\"sif\",\"sig_x\"")
    );
    assert_eq!(sig.as_str().unwrap(), key.sign(signed_bytes.as_bytes()));
    assert_eq!(hash, receipt::receipt_hash(&receipt).unwrap());
    receipt::verify(&Value::Object(receipt), Some(&jwks_of(&[&key])), true).unwrap();
}

#[test]
fn canon_may_be_omitted_and_extensions_cannot_override_core_members() {
    let key = key("k1", 7);
    let mut private = draft("trace-1", 1, None);
    private.canon = None;
    let receipt = receipt::sign(&private, &key).unwrap();
    assert!(!receipt.contains_key("canon"));
    receipt::verify(&Value::Object(receipt), Some(&jwks_of(&[&key])), true).unwrap();

    let mut sneaky = draft("trace-1", 1, None);
    sneaky
        .extensions
        .insert("receipt_hash".into(), "sha256:00".into());
    assert_eq!(
        receipt::sign(&sneaky, &key).err().map(|e| e.code()),
        Some("RESERVED_MEMBER")
    );
}

#[test]
fn cid_must_match_canon() {
    let key = key("k1", 7);
    let mut lying = draft("trace-1", 1, None);
    lying.cid = cid(b"something else");
    let receipt = Value::Object(receipt::sign(&lying, &key).unwrap());
    assert_eq!(
        code(receipt::verify(&receipt, Some(&jwks_of(&[&key])), true)),
        Some("CID")
    );
}

#[test]
fn receipts_are_stored_in_nfc_so_every_profile_agrees() {
    let key = key("k1", 7);
    let mut decomposed = draft("trace-1", 1, None);
    decomposed.tenant = "cafe\u{301}".into();
    let receipt = receipt::sign(&decomposed, &key).unwrap();
    assert_eq!(receipt["tenant"], "caf\u{e9}");
    let value = Value::Object(receipt.clone());
    assert_eq!(
        to_canonical(&value, Profile::Signet).unwrap(),
        to_canonical(&value, Profile::Rfc8785).unwrap()
    );
    receipt::verify(&value, Some(&jwks_of(&[&key])), true).unwrap();
}

#[test]
fn accepts_receipts_hashed_without_the_nfc_step() {
    // As another SR-1 implementation (plain RFC 8785) would emit it.
    let mut foreign: Map<String, Value> = serde_json::from_value(json!({
        "trace_id": "t-1", "hop": 1, "ts": "2025-01-27T12:00:00Z", "tenant": "cafe\u{301}",
        "cid": cid(b"{}"), "canon": "{}", "algo": "sha256", "prev_receipt_hash": null,
        "policy": {"engine": "HEL", "allowed": true, "reason": "ok"}
    }))
    .unwrap();
    let plain = to_canonical(&Value::Object(foreign.clone()), Profile::Rfc8785).unwrap();
    foreign.insert("receipt_hash".into(), cid(plain.as_bytes()).into());
    let foreign = Value::Object(foreign);
    receipt::verify(&foreign, None, false).unwrap();

    let mut tampered = foreign.clone();
    tampered["tenant"] = "cafe".into();
    assert_eq!(
        code(receipt::verify(&tampered, None, false)),
        Some("RECEIPT_HASH")
    );
}

#[test]
fn chain_rules() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let good = signed_chain(&key, 3);
    chain::verify(&good, Some(&jwks), true).unwrap();
    assert_eq!(
        code(chain::verify(&[], Some(&jwks), false)),
        Some("EMPTY_CHAIN")
    );

    let hash_of = |r: &Value| r["receipt_hash"].as_str().unwrap().to_owned();
    let resign = |d: ReceiptDraft| Value::Object(receipt::sign(&d, &key).unwrap());

    // Receipt 2 links to receipt 0 instead of receipt 1: a validly signed fork.
    let mut forked = good.clone();
    forked[2] = resign(draft("trace-1", 3, Some(&hash_of(&good[0]))));
    let err = chain::verify(&forked, Some(&jwks), true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "receipt 2 (hop 3): prev_receipt_hash does not match receipt 1's receipt_hash [LINKAGE]"
    );

    let mut skipped = good.clone();
    skipped[2] = resign(draft("trace-1", 4, Some(&hash_of(&good[1]))));
    assert_eq!(
        code(chain::verify(&skipped, Some(&jwks), true)),
        Some("HOP_SEQUENCE")
    );

    let mut other_trace = good.clone();
    other_trace[1] = resign(draft("trace-2", 2, Some(&hash_of(&good[0]))));
    assert_eq!(
        code(chain::verify(&other_trace, Some(&jwks), true)),
        Some("TRACE_ID")
    );

    let mut other_tenant = good.clone();
    let mut d = draft("trace-1", 2, Some(&hash_of(&good[0])));
    d.tenant = "mallory".into();
    other_tenant[1] = resign(d);
    assert_eq!(
        code(chain::verify(&other_tenant, Some(&jwks), true)),
        Some("TENANT")
    );

    let headless = &good[1..];
    let err = chain::verify(headless, Some(&jwks), true).unwrap_err();
    assert_eq!((err.code(), err.receipt_index), ("CHAIN_START", Some(0)));
    let mut linked_start = good.clone();
    linked_start[0] = resign(draft("trace-1", 1, Some(&hash_of(&good[2]))));
    assert_eq!(
        code(chain::verify(&linked_start[..1], Some(&jwks), true)),
        Some("CHAIN_START")
    );
}

#[test]
fn bundle_export_and_verify() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let exported = bundle::export(
        "trace-1",
        signed_chain(&key, 2),
        "2026-11-25T18:00:00.000Z",
        &key,
    )
    .unwrap();
    bundle::verify(&exported, Some(&jwks), true).unwrap();
    bundle::verify(&exported, None, false).unwrap();

    // bundle_cid covers exactly trace_id, chain and exported_at; the signature its UTF-8 string.
    let triple = json!({"trace_id": exported["trace_id"], "chain": exported["chain"],
                        "exported_at": exported["exported_at"]});
    let bundle_cid = cid(to_canonical(&triple, Profile::Signet).unwrap().as_bytes());
    assert_eq!(exported["bundle_cid"], bundle_cid);
    jwks.verify(
        "k1",
        bundle_cid.as_bytes(),
        exported["signature"].as_str().unwrap(),
    )
    .unwrap();

    let mut later = exported.clone();
    later["exported_at"] = "2026-11-25T18:00:01.000Z".into();
    assert_eq!(
        code(bundle::verify(&later, Some(&jwks), true)),
        Some("BUNDLE_CID")
    );

    let wrong_trace = bundle::export(
        "trace-9",
        signed_chain(&key, 2),
        "2026-11-25T18:00:00.000Z",
        &key,
    )
    .unwrap();
    assert_eq!(
        code(bundle::verify(&wrong_trace, Some(&jwks), true)),
        Some("BUNDLE_TRACE_ID")
    );

    let impostor = self::key("k1", 9);
    assert_eq!(
        code(bundle::verify(
            &exported,
            Some(&jwks_of(&[&impostor])),
            false
        )),
        Some("SIGNATURE")
    );
}

/// Flips each byte of `document` in turn and asserts that the result is rejected, either as JSON
/// or by `verify`.
fn assert_every_byte_is_protected(
    document: &Value,
    verify: impl Fn(&Value) -> Result<(), VerifyError>,
) {
    let bytes = serde_json::to_vec(document).unwrap();
    // Parse as the CLI does: strict I-JSON, strings exactly as given.
    let options = ParseOptions {
        profile: Profile::Rfc8785,
        reject_unsafe_integers: false,
    };
    verify(&parse(&bytes, &options).unwrap()).unwrap();
    for at in 0..bytes.len() {
        for change in [0x01, 0x20] {
            let mut tampered = bytes.clone();
            tampered[at] ^= change;
            if let Ok(value) = parse(&tampered, &options) {
                assert!(
                    verify(&value).is_err(),
                    "changing byte {at} ({:?} -> {:?}) went unnoticed",
                    char::from(bytes[at]),
                    char::from(tampered[at])
                );
            }
        }
    }
}

#[test]
fn any_changed_byte_of_a_receipt_is_detected() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let receipt = Value::Object(receipt::sign(&draft("trace-1", 1, None), &key).unwrap());
    assert_every_byte_is_protected(&receipt, |r| receipt::verify(r, Some(&jwks), true));
    // Without a JWKS the receipt_hash still protects every byte, the signature included.
    assert_every_byte_is_protected(&receipt, |r| receipt::verify(r, None, false));
}

#[test]
fn any_changed_byte_of_a_chain_is_detected() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let chain = Value::Array(signed_chain(&key, 3));
    assert_every_byte_is_protected(&chain, |c| {
        chain::verify(c.as_array().unwrap(), Some(&jwks), true)
    });
}

#[test]
fn any_changed_byte_of_a_bundle_is_detected() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let exported = bundle::export(
        "trace-1",
        signed_chain(&key, 2),
        "2026-11-25T18:00:00.000Z",
        &key,
    )
    .unwrap();
    assert_every_byte_is_protected(&exported, |b| bundle::verify(b, Some(&jwks), true));
}

#[test]
fn members_of_the_wrong_form_do_not_verify_even_when_signed() {
    let key = key("k1", 7);
    let jwks = jwks_of(&[&key]);
    let prev = cid(b"hop 1");
    type Mutation = fn(&mut ReceiptDraft);
    let mutations: [(&str, Mutation); 11] = [
        ("cid not a CID, no canon", |d| {
            d.cid = "x".into();
            d.canon = None;
        }),
        ("cid in upper case, no canon", |d| {
            d.cid = d.cid.to_uppercase();
            d.canon = None;
        }),
        ("ts not RFC 3339", |d| d.ts = "yesterday".into()),
        ("ts with an offset", |d| {
            d.ts = "2026-11-25T18:00:00+01:00".into()
        }),
        ("empty tenant", |d| d.tenant = String::new()),
        ("another engine", |d| d.policy.engine = "OPA".into()),
        ("a denial", |d| d.policy.allowed = false),
        ("an unknown reason", |d| d.policy.reason = "maybe".into()),
        ("negative fu_tokens", |d| {
            d.extensions.insert("fu_tokens".into(), (-1).into());
        }),
        ("fallback_used not a boolean", |d| {
            d.extensions.insert("fallback_used".into(), "yes".into());
        }),
        ("prev_receipt_hash not a hash", |d| {
            d.prev_receipt_hash = Some("x".into())
        }),
    ];
    for (what, mutate) in mutations {
        let mut d = draft("trace-1", 2, Some(&prev));
        mutate(&mut d);
        let receipt = Value::Object(receipt::sign(&d, &key).unwrap());
        assert_eq!(
            code(receipt::verify(&receipt, Some(&jwks), true)),
            Some("MALFORMED"),
            "{what}"
        );
    }
    let fine = Value::Object(receipt::sign(&draft("trace-1", 2, Some(&prev)), &key).unwrap());
    receipt::verify(&fine, Some(&jwks), true).unwrap();
}
