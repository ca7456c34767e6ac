//! Tenant lookups cached in VM-wide shared data (every worker of the plugin), for
//! `tenant_cache_ttl_ms`; a TTL of 0 turns the cache off. An API key the control plane does
//! not know is cached too, for [`UNKNOWN_TTL_MS`] (at most the TTL), so a client repeating a
//! wrong key costs one callout per few seconds; a key just created is recognised that late.

use serde::{Deserialize, Serialize};
use signet_protocol::internal::Grant;

use crate::host::Host;

/// Shared-data key prefix of cached tenant lookups, followed by the API key's hash.
const PREFIX: &str = "signet.tenant.";

/// How long "no tenant has this key" is remembered.
pub const UNKNOWN_TTL_MS: u64 = 5_000;

/// A cached answer: the key's tenant, or `None` when no tenant has it.
#[derive(Serialize, Deserialize)]
struct Entry<G> {
    expires_ms: u64,
    grant: Option<G>,
}

/// What the cache knows of a key.
#[derive(Debug, PartialEq)]
pub enum Cached {
    Tenant(Grant),
    Unknown,
}

/// The answer cached for `key_hash`, if it has not expired.
pub fn get(host: &dyn Host, ttl_ms: u64, key_hash: &str) -> Option<Cached> {
    if ttl_ms == 0 {
        return None;
    }
    let bytes = host.shared_get(&format!("{PREFIX}{key_hash}"))?;
    let entry: Entry<Grant> = serde_json::from_slice(&bytes).ok()?;
    if entry.expires_ms <= host.now_millis() {
        return None;
    }
    Some(entry.grant.map_or(Cached::Unknown, Cached::Tenant))
}

/// Caches the key's tenant for the TTL.
pub fn put(host: &mut dyn Host, ttl_ms: u64, key_hash: &str, grant: &Grant) {
    write(host, ttl_ms, key_hash, Some(grant));
}

/// Caches that no tenant has the key, for [`UNKNOWN_TTL_MS`] (at most the TTL).
pub fn put_unknown(host: &mut dyn Host, ttl_ms: u64, key_hash: &str) {
    write::<Grant>(host, ttl_ms.min(UNKNOWN_TTL_MS), key_hash, None);
}

fn write<G: Serialize>(host: &mut dyn Host, ttl_ms: u64, key_hash: &str, grant: Option<&G>) {
    if ttl_ms == 0 {
        return;
    }
    let entry = Entry {
        expires_ms: host.now_millis().saturating_add(ttl_ms),
        grant,
    };
    if let Ok(bytes) = serde_json::to_vec(&entry) {
        host.shared_set(&format!("{PREFIX}{key_hash}"), &bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing::MockHost;

    fn grant() -> Grant {
        Grant {
            tenant: "demo".into(),
            allowlist: vec![],
            fallback_enabled: false,
            fu_monthly_limit: None,
        }
    }

    #[test]
    fn known_keys_last_the_ttl_and_unknown_ones_five_seconds() {
        let mut host = MockHost {
            now: 1_000,
            ..Default::default()
        };
        put(&mut host, 30_000, "k", &grant());
        put_unknown(&mut host, 30_000, "u");
        assert_eq!(get(&host, 30_000, "k"), Some(Cached::Tenant(grant())));
        assert_eq!(get(&host, 30_000, "u"), Some(Cached::Unknown));
        host.now += UNKNOWN_TTL_MS - 1;
        assert_eq!(get(&host, 30_000, "u"), Some(Cached::Unknown));
        host.now += 1;
        assert_eq!(get(&host, 30_000, "u"), None, "expired");
        assert!(get(&host, 30_000, "k").is_some());
        host.now = 1_000 + 30_000;
        assert_eq!(get(&host, 30_000, "k"), None);
        // a TTL below five seconds bounds the negative one too; 0 turns both off
        put_unknown(&mut host, 1_000, "u");
        host.now += 1_000;
        assert_eq!(get(&host, 1_000, "u"), None);
        put_unknown(&mut host, 0, "z");
        assert_eq!(get(&host, 30_000, "z"), None);
    }
}
