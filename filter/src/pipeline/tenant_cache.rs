//! Tenant lookups cached in VM-wide shared data (every worker of the plugin), for
//! `tenant_cache_ttl_ms`; a TTL of 0 turns the cache off.

use serde::{Deserialize, Serialize};
use signet_protocol::internal::Grant;

use crate::host::Host;

/// Shared-data key prefix of cached tenant lookups, followed by the API key's hash.
const PREFIX: &str = "signet.tenant.";

#[derive(Serialize, Deserialize)]
struct Entry<G> {
    expires_ms: u64,
    grant: G,
}

/// The grant cached for `key_hash`, if it has not expired.
pub fn get(host: &dyn Host, ttl_ms: u64, key_hash: &str) -> Option<Grant> {
    if ttl_ms == 0 {
        return None;
    }
    let bytes = host.shared_get(&format!("{PREFIX}{key_hash}"))?;
    let entry: Entry<Grant> = serde_json::from_slice(&bytes).ok()?;
    (entry.expires_ms > host.now_millis()).then_some(entry.grant)
}

pub fn put(host: &mut dyn Host, ttl_ms: u64, key_hash: &str, grant: &Grant) {
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
