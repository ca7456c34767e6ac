//! `GET /v1/internal/tenant`: which tenant an API key belongs to, and what it may do.
//! The filter sends only the key's hash ([`crate::cid::sha256_hex`] of its UTF-8 bytes).

use serde::{Deserialize, Serialize};

pub const PATH: &str = "/v1/internal/tenant";
/// Lowercase hex SHA-256 of the API key.
pub const KEY_HASH_HEADER: &str = "x-signet-key-hash";

/// The 200 answer: `{"tenant","allowlist","fallback_enabled","fu_monthly_limit"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub tenant: String,
    /// HEL allowlist of the tenant (exact hosts or `*.example.com`).
    #[serde(default)]
    pub allowlist: Vec<String>,
    #[serde(default)]
    pub fallback_enabled: bool,
    #[serde(default)]
    pub fu_monthly_limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_reads_what_it_writes_and_defaults_what_is_absent() {
        let grant = Grant {
            tenant: "demo".into(),
            allowlist: vec!["*.example.com".into()],
            fallback_enabled: true,
            fu_monthly_limit: Some(10),
        };
        let text = serde_json::to_string(&grant).unwrap();
        assert_eq!(
            text,
            r#"{"tenant":"demo","allowlist":["*.example.com"],"fallback_enabled":true,"fu_monthly_limit":10}"#
        );
        assert_eq!(serde_json::from_str::<Grant>(&text).unwrap(), grant);
        let bare: Grant = serde_json::from_str(r#"{"tenant":"t"}"#).unwrap();
        assert_eq!(bare.allowlist, Vec::<String>::new());
        assert_eq!(bare.fu_monthly_limit, None);
    }
}
