//! Plugin configuration: the raw JSON as written, compiled into a validated [`Config`] (schemas
//! compiled, expressions parsed, allowlist normalized, signing key loaded) when Envoy loads it.
//! Any error rejects the configuration, with a message naming the field.

use serde::Deserialize;
use signet_protocol::SigningKey;

use crate::policy::HostPattern;
use crate::registry::{RawRegistry, Registry};
use crate::route::RawRouteSettings;

/// Environment variables Envoy passes in with `vm_config.environment_variables.host_env_keys`.
pub const ENV_PRIVATE_KEY: &str = "SP_PRIVATE_KEY_B64";
pub const ENV_KID: &str = "SP_KID";
pub const ENV_FILTER_TOKEN: &str = "SP_FILTER_TOKEN";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    control_plane: RawControlPlane,
    #[serde(default = "default_tenant_cache_ttl_s")]
    tenant_cache_ttl_s: u64,
    #[serde(default)]
    global_allowlist: Vec<String>,
    #[serde(default)]
    route_defaults: RawRouteSettings,
    #[serde(default = "default_true")]
    default_registry: bool,
    #[serde(default)]
    registry: RawRegistry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlPlane {
    cluster: String,
    authority: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_forward_timeout_ms")]
    forward_timeout_ms: u64,
    #[serde(default = "default_repair_timeout_ms")]
    repair_timeout_ms: u64,
}

fn default_tenant_cache_ttl_s() -> u64 {
    30
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_forward_timeout_ms() -> u64 {
    15_000
}
/// Above the control plane's provider timeout (`SP_OPENAI_TIMEOUT_MS`, 20 s by default).
fn default_repair_timeout_ms() -> u64 {
    25_000
}
fn default_true() -> bool {
    true
}

/// Where and how the filter calls the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    /// The forward callout's timeout: the control plane resolves and delivers the first
    /// attempt inside it (its own `SP_FORWARD_TIMEOUT_MS` should be shorter).
    pub forward_timeout_ms: u64,
    /// How long the LLM-fallback repair callout may take (`control_plane.repair_timeout_ms`).
    pub repair_timeout_ms: u64,
    /// `X-SIGNET-Filter-Token` of every internal call.
    pub filter_token: String,
}

/// The validated runtime configuration.
pub struct Config {
    pub control_plane: ControlPlane,
    pub tenant_cache_ttl_ms: u64,
    pub global_allowlist: Vec<HostPattern>,
    pub route_defaults: RawRouteSettings,
    pub registry: Registry,
    pub signing_key: SigningKey,
}

impl Config {
    /// Parses and validates; `env` looks up the environment (never logged).
    pub fn load(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.inner().to_string()
            } else {
                format!("{path}: {}", e.inner())
            }
        })?;
        de.end().map_err(|e| e.to_string())?;

        let cp = raw.control_plane;
        if cp.cluster.trim().is_empty() {
            return Err("control_plane.cluster: must not be empty".into());
        }
        if !(1..=60_000).contains(&cp.timeout_ms) {
            return Err(format!(
                "control_plane.timeout_ms: {} is outside 1..=60000",
                cp.timeout_ms
            ));
        }
        if !(1..=120_000).contains(&cp.forward_timeout_ms) {
            return Err(format!(
                "control_plane.forward_timeout_ms: {} is outside 1..=120000",
                cp.forward_timeout_ms
            ));
        }
        if !(1..=120_000).contains(&cp.repair_timeout_ms) {
            return Err(format!(
                "control_plane.repair_timeout_ms: {} is outside 1..=120000",
                cp.repair_timeout_ms
            ));
        }
        if raw.tenant_cache_ttl_s > 86_400 {
            return Err(format!(
                "tenant_cache_ttl_s: {} is outside 0..=86400",
                raw.tenant_cache_ttl_s
            ));
        }
        let global_allowlist = raw
            .global_allowlist
            .iter()
            .enumerate()
            .map(|(i, p)| HostPattern::parse(p).map_err(|e| format!("global_allowlist[{i}]: {e}")))
            .collect::<Result<_, _>>()?;

        let registry_raw = if raw.default_registry {
            RawRegistry::builtin()?.merge(&raw.registry)
        } else {
            raw.registry
        };
        let registry = Registry::compile(&registry_raw).map_err(|e| format!("registry.{e}"))?;
        // The route defaults must themselves be a valid route.
        crate::route::RouteSettings::compile(
            "route_defaults",
            &RawRouteSettings::default(),
            &raw.route_defaults,
            &registry,
        )
        .map_err(|e| format!("route_defaults.{e}"))?;

        let seed = env(ENV_PRIVATE_KEY).ok_or(format!("{ENV_PRIVATE_KEY}: not set"))?;
        let kid = env(ENV_KID)
            .filter(|k| !k.is_empty())
            .ok_or(format!("{ENV_KID}: not set"))?;
        // The key error text is about the encoding, never the key material.
        let signing_key = SigningKey::from_seed_b64url(seed.trim(), kid)
            .map_err(|e| format!("{ENV_PRIVATE_KEY}: {e}"))?;
        let filter_token = env(ENV_FILTER_TOKEN)
            .filter(|t| !t.is_empty())
            .ok_or(format!("{ENV_FILTER_TOKEN}: not set"))?;

        Ok(Self {
            control_plane: ControlPlane {
                authority: cp.authority.unwrap_or_else(|| cp.cluster.clone()),
                cluster: cp.cluster,
                timeout_ms: cp.timeout_ms,
                forward_timeout_ms: cp.forward_timeout_ms,
                repair_timeout_ms: cp.repair_timeout_ms,
                filter_token,
            },
            tenant_cache_ttl_ms: raw.tenant_cache_ttl_s * 1000,
            global_allowlist,
            route_defaults: raw.route_defaults,
            registry,
            signing_key,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The RFC 8032 test 1 seed, base64url.
    pub(crate) const SEED: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";

    pub(crate) fn env(name: &str) -> Option<String> {
        match name {
            ENV_PRIVATE_KEY => Some(SEED.into()),
            ENV_KID => Some("k1".into()),
            ENV_FILTER_TOKEN => Some("tok".into()),
            _ => None,
        }
    }

    fn load(json: &str) -> Result<Config, String> {
        Config::load(json.as_bytes(), &env)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load(r#"{"control_plane":{"cluster":"cp"}}"#).unwrap();
        assert_eq!(
            c.control_plane,
            ControlPlane {
                cluster: "cp".into(),
                authority: "cp".into(),
                timeout_ms: 2000,
                forward_timeout_ms: 15_000,
                repair_timeout_ms: 25_000,
                filter_token: "tok".into()
            }
        );
        assert_eq!(c.tenant_cache_ttl_ms, 30_000);
        assert!(c
            .registry
            .can_map("openai.tooluse.invoice.v1", "invoice.iso20022.v1"));
        assert_eq!(c.signing_key.kid(), "k1");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{}"#, "missing field `control_plane`"),
            (
                r#"{"control_plane":{"cluster":"cp","timeout_ms":"x"}}"#,
                "control_plane.timeout_ms:",
            ),
            (
                r#"{"control_plane":{"cluster":"cp","timeout_ms":0}}"#,
                "control_plane.timeout_ms:",
            ),
            (
                r#"{"control_plane":{"cluster":""}}"#,
                "control_plane.cluster:",
            ),
            (
                r#"{"control_plane":{"cluster":"cp"},"tenant_cache_tl_s":1}"#,
                "unknown field `tenant_cache_tl_s`",
            ),
            (
                r#"{"control_plane":{"cluster":"cp"},"global_allowlist":["ok.com","*."]}"#,
                "global_allowlist[1]:",
            ),
            (
                r#"{"control_plane":{"cluster":"cp"},"registry":{"types":{"t":{"schema":{"type":1}}}}}"#,
                "registry.types.t.schema:",
            ),
            (
                r#"{"control_plane":{"cluster":"cp"},"route_defaults":{"mode":"inline"}}"#,
                "route_defaults.payload_type:",
            ),
            (
                r#"{"control_plane":{"cluster":"cp"},"route_defaults":{"mode":"x"}}"#,
                "route_defaults.mode:",
            ),
            (r#"{"control_plane":{"cluster":"cp"}} trailing"#, "trailing"),
        ];
        for (json, expected) in cases {
            let err = load(json).err().unwrap();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn missing_or_bad_key_rejects_without_leaking_it() {
        let json = br#"{"control_plane":{"cluster":"cp"}}"#;
        let no_key = |n: &str| if n == ENV_PRIVATE_KEY { None } else { env(n) };
        assert!(Config::load(json, &no_key)
            .err()
            .unwrap()
            .starts_with(ENV_PRIVATE_KEY));
        let bad_key = |n: &str| {
            if n == ENV_PRIVATE_KEY {
                Some("c2VjcmV0LXRvby1zaG9ydA".into())
            } else {
                env(n)
            }
        };
        let err = Config::load(json, &bad_key).err().unwrap();
        assert!(
            err.starts_with(ENV_PRIVATE_KEY) && !err.contains("c2VjcmV0"),
            "{err}"
        );
        let no_token = |n: &str| if n == ENV_FILTER_TOKEN { None } else { env(n) };
        assert!(Config::load(json, &no_token)
            .err()
            .unwrap()
            .starts_with(ENV_FILTER_TOKEN));
        let no_kid = |n: &str| {
            if n == ENV_KID {
                Some(String::new())
            } else {
                env(n)
            }
        };
        assert!(Config::load(json, &no_kid)
            .err()
            .unwrap()
            .starts_with(ENV_KID));
    }

    #[test]
    fn plugin_registry_extends_or_replaces_the_builtin() {
        let c = load(
            r#"{"control_plane":{"cluster":"cp"},"registry":{"types":{"x.v1":{"schema":{}}}}}"#,
        )
        .unwrap();
        assert!(c.registry.has_type("x.v1") && c.registry.has_type("invoice.iso20022.v1"));
        let c = load(r#"{"control_plane":{"cluster":"cp"},"default_registry":false,"registry":{"types":{"x.v1":{"schema":{}}}}}"#).unwrap();
        assert!(c.registry.has_type("x.v1") && !c.registry.has_type("invoice.iso20022.v1"));
    }
}
