//! Nesting up to MAX_DEPTH must not grow the stack with the depth: the parser and the writer
//! keep their own stacks on the heap.

use serde_json::Value;
use signet_protocol::canonical::{parse, to_canonical, ParseOptions, Profile, MAX_DEPTH};

/// Drops `value` without recursion. (serde_json's own `Drop` recurses, roughly 150 bytes a level
/// in a debug build: fine on default stacks, but it is not the code under test here.)
fn drop_flat(value: Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(members) => pending.extend(members.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

#[test]
fn nesting_at_the_limit_fits_in_a_32_kib_stack() {
    let levels = MAX_DEPTH / 2;
    let text = format!("{}1{}", "[{\"a\":".repeat(levels), "}]".repeat(levels));
    let outcome = std::thread::Builder::new()
        .stack_size(32 * 1024)
        .spawn(move || {
            let value = parse(text.as_bytes(), &ParseOptions::default()).unwrap();
            let canonical = to_canonical(&value, Profile::Signet).unwrap();
            let rejected = parse(format!("[{text}]").as_bytes(), &ParseOptions::default());
            drop_flat(value);
            (canonical == text, rejected.err().map(|e| e.code()))
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(outcome, (true, Some("TOO_DEEP")));
}
