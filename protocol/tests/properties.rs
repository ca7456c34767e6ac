//! Property tests of the canonical form: idempotent, independent of member order and whitespace,
//! and numbers and strings survive the round trip.

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use signet_protocol::canonical::{canonicalize, parse, to_canonical, ParseOptions, Profile};

fn any_profile() -> impl Strategy<Value = Profile> {
    prop_oneof![Just(Profile::Signet), Just(Profile::Rfc8785)]
}

fn any_string() -> impl Strategy<Value = String> {
    // Mostly short strings, with control characters, quotes, combining marks, astral characters.
    prop_oneof![
        "[a-z]{0,6}",
        "[\\x00-\\x1f\"\\\\/a\u{e9}\u{301}\u{ff61}\u{1f600}]{0,6}",
        any::<String>(),
    ]
}

fn any_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Number::from_f64(f).unwrap()),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any_number().prop_map(Value::Number),
        any_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any_string(), inner), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// JSON text of `value` with object members in the order `order` picks and spaces between
/// tokens, written by hand so that neither serde_json's map type nor its writer decide the order.
fn write_shuffled(value: &Value, order: &mut impl FnMut(usize) -> usize, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push_str("[ ");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" ,\n");
                }
                write_shuffled(item, order, out);
            }
            out.push_str(" ]");
        }
        Value::Object(members) => {
            let mut members: Vec<_> = members.iter().collect();
            for i in (1..members.len()).rev() {
                members.swap(i, order(i + 1));
            }
            out.push_str("{\t");
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(name).unwrap());
                out.push_str(" : ");
                write_shuffled(member, order, out);
            }
            out.push_str("\r\n}");
        }
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap()),
    }
}

fn rfc8785() -> ParseOptions {
    ParseOptions {
        profile: Profile::Rfc8785,
        reject_unsafe_integers: false,
    }
}

proptest! {
    #[test]
    fn canonical_form_is_idempotent(value in any_json(), profile in any_profile()) {
        // Signet may refuse values whose names collide after NFC; everything else has a form.
        if let Ok(once) = to_canonical(&value, profile) {
            let twice = canonicalize(once.as_bytes(), profile).unwrap();
            prop_assert_eq!(&twice, &once);
        } else {
            prop_assert_eq!(profile, Profile::Signet);
        }
    }

    #[test]
    fn member_order_and_whitespace_do_not_matter(
        value in any_json(),
        seeds in prop::collection::vec(any::<usize>(), 64),
        profile in any_profile(),
    ) {
        let mut n = 0;
        let mut order = |len: usize| { n += 1; seeds[n % seeds.len()] % len };
        let mut text = String::new();
        write_shuffled(&value, &mut order, &mut text);
        let from_text = canonicalize(text.as_bytes(), profile);
        let from_value = to_canonical(&value, profile);
        prop_assert_eq!(from_text.ok(), from_value.ok());
    }

    #[test]
    fn doubles_round_trip(double in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        let text = to_canonical(&Value::from(double), Profile::Rfc8785).unwrap();
        let back = parse(text.as_bytes(), &rfc8785()).unwrap().as_f64().unwrap();
        // -0 is written as 0; everything else comes back bit for bit.
        prop_assert!(back.to_bits() == double.to_bits() || (double == 0.0 && back == 0.0),
            "{} -> {} -> {}", double, text, back);
    }

    #[test]
    fn integers_keep_their_double_value(int in any::<i64>()) {
        let text = to_canonical(&Value::from(int), Profile::Rfc8785).unwrap();
        let back = parse(text.as_bytes(), &rfc8785()).unwrap().as_f64().unwrap();
        prop_assert_eq!(back, int as f64);
    }

    #[test]
    fn strings_round_trip_in_rfc8785_mode(s in any_string()) {
        let text = to_canonical(&Value::String(s.clone()), Profile::Rfc8785).unwrap();
        prop_assert_eq!(parse(text.as_bytes(), &rfc8785()).unwrap(), Value::String(s.clone()));
        prop_assert_eq!(serde_json::from_str::<String>(&text).unwrap(), s);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = canonicalize(&bytes, Profile::Signet);
    }
}
