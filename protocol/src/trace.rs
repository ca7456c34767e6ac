//! Trace ids (SPEC §2).

/// 1..128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_trace_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_documented_alphabet_and_length() {
        assert!(is_valid_trace_id("test-chain-001"));
        assert!(is_valid_trace_id("a.B_9:-"));
        assert!(is_valid_trace_id(&"x".repeat(128)));
        assert!(!is_valid_trace_id(""));
        assert!(!is_valid_trace_id(&"x".repeat(129)));
        assert!(!is_valid_trace_id("a b"));
        assert!(!is_valid_trace_id("a/b"));
        assert!(!is_valid_trace_id("é"));
    }
}
