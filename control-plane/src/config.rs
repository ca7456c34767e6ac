//! Configuration from the environment. Every variable is documented in README.md.
//!
//! Invalid configuration stops the start with a message naming the variable and the problem;
//! nothing silently falls back to a default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use signet_protocol::keys::{Jwk, Jwks, SigningKey};

use crate::tenants::{api_key_hash, normalize_host_pattern, TenantDirectory};

pub const DEFAULT_PORT: u16 = 8088;
pub const DEFAULT_INTERNAL_PORT: u16 = 8090;
pub const DEFAULT_ADMIN_PORT: u16 = 8091;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_RECEIPT_MAX_SKEW_SECS: u64 = 300;
pub const DEFAULT_DB_PATH: &str = "./data/signet.db";
pub const DEFAULT_CHAIN_MAX: u64 = 1000;
pub const DEFAULT_PG_POOL_SIZE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    Sqlite {
        path: PathBuf,
        /// `SP_SQLITE_CHECKPOINT_MS`: how often the WAL is copied into the database file.
        checkpoint_every: Duration,
    },
    Postgres {
        url: String,
        pool_size: usize,
    },
}

impl StorageConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StorageConfig::Sqlite { .. } => "sqlite",
            StorageConfig::Postgres { .. } => "postgres",
        }
    }
}

/// Where each API is served: one listener each, so that exposing one (the public JWKS and
/// exports) never exposes another (the filter's callouts, the operator's reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// `SP_BIND`:`PORT`: health, metrics, JWKS, chains, exports.
    pub public: SocketAddr,
    /// `SP_INTERNAL_BIND`:`SP_INTERNAL_PORT`: `/v1/internal/*`, for the filter only.
    pub internal: SocketAddr,
    /// `SP_ADMIN_BIND`:`SP_ADMIN_PORT`: `/v1/admin/*`, loopback unless said otherwise.
    pub admin: SocketAddr,
}

/// What one client may hold of a listener (each listener has its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `SP_MAX_CONNECTIONS`: open connections per listener; more wait in the accept backlog.
    pub max_connections: usize,
    /// `SP_IDLE_TIMEOUT_SECS`: how long a connection may take to send a request's headers,
    /// counted from when it opens or finished its previous request (so also the idle
    /// keep-alive timeout).
    pub idle_timeout: Duration,
    /// `SP_REQUEST_TIMEOUT_SECS`: how long a request (its body and its handler) may take.
    pub request_timeout: Duration,
}

pub struct Config {
    pub listeners: Listeners,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub tenants: TenantDirectory,
    /// `SP_HEL_ALLOWLIST`, kept to rebuild the directory on an admin reload.
    pub global_allowlist: Vec<String>,
    pub signing_key: SigningKey,
    /// Public keys of earlier kids (`SP_PREVIOUS_JWKS`); the database keeps every kid ever
    /// configured as well.
    pub previous_keys: Vec<Jwk>,
    /// SHA-256 hex of `SP_FILTER_TOKEN`.
    pub filter_token_hash: String,
    /// SHA-256 hex of `SP_ADMIN_KEY`; `None` disables admin access.
    pub admin_key_hash: Option<String>,
    pub chain_max: u64,
    /// `SP_RECEIPT_MAX_SKEW_SECS`: how far a committed receipt's `ts` may be from now.
    pub receipt_max_skew: Duration,
    /// `SP_IDEMPOTENCY_RETENTION_SECS`: how long a committed idempotency key is kept (7 days).
    pub idempotency_retention: Duration,
    /// `SP_DNS_SERVERS`, `SP_FORWARD_*`: delivering to `forward_url`.
    pub forward: crate::forward::ForwardConfig,
    /// `SP_OPENAI_*`: the LLM fallback's provider.
    pub fallback: crate::fallback::FallbackConfig,
    /// `SP_STRIPE_*`, `SP_BILLING_*`: the billing reporter.
    pub billing: crate::billing::settings::BillingSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}",
            self.variable, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty variable counts as unset, as shells and compose files tend to produce them.
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let listeners = parse_listeners(&get)?;
        let limits = Limits {
            max_connections: parse_number(
                "SP_MAX_CONNECTIONS",
                get("SP_MAX_CONNECTIONS"),
                DEFAULT_MAX_CONNECTIONS,
                1,
                1_000_000,
            )? as usize,
            idle_timeout: Duration::from_secs(parse_number(
                "SP_IDLE_TIMEOUT_SECS",
                get("SP_IDLE_TIMEOUT_SECS"),
                DEFAULT_IDLE_TIMEOUT_SECS,
                1,
                3600,
            )?),
            request_timeout: Duration::from_secs(parse_number(
                "SP_REQUEST_TIMEOUT_SECS",
                get("SP_REQUEST_TIMEOUT_SECS"),
                DEFAULT_REQUEST_TIMEOUT_SECS,
                1,
                3600,
            )?),
        };

        let storage = match get("SP_STORAGE").as_deref().map(str::trim) {
            None | Some("sqlite") => {
                if get("SP_POSTGRES_URL").is_some() && get("SP_STORAGE").is_none() {
                    return Err(invalid(
                        "SP_STORAGE",
                        "SP_POSTGRES_URL is set but SP_STORAGE is not; set SP_STORAGE=postgres (or unset the URL)",
                    ));
                }
                StorageConfig::Sqlite {
                    path: PathBuf::from(
                        get("SP_DB_PATH").unwrap_or_else(|| DEFAULT_DB_PATH.into()),
                    ),
                    checkpoint_every: Duration::from_millis(parse_number(
                        "SP_SQLITE_CHECKPOINT_MS",
                        get("SP_SQLITE_CHECKPOINT_MS"),
                        crate::storage::SQLITE_CHECKPOINT_EVERY.as_millis() as u64,
                        5,
                        60_000,
                    )?),
                }
            }
            Some("postgres") => StorageConfig::Postgres {
                url: get("SP_POSTGRES_URL").ok_or_else(|| {
                    invalid("SP_POSTGRES_URL", "required when SP_STORAGE=postgres")
                })?,
                pool_size: parse_number(
                    "SP_PG_POOL_SIZE",
                    get("SP_PG_POOL_SIZE"),
                    DEFAULT_PG_POOL_SIZE as u64,
                    1,
                    1024,
                )? as usize,
            },
            Some(other) => {
                return Err(invalid(
                    "SP_STORAGE",
                    format!("{other:?} is not a storage; use sqlite or postgres"),
                ))
            }
        };

        let global_allowlist = parse_allowlist(get("SP_HEL_ALLOWLIST").as_deref())?;
        let tenants = TenantDirectory::parse(
            get("SP_API_KEYS").as_deref().unwrap_or("{}"),
            get("SP_RESERVED_CONFIG").as_deref().unwrap_or("{}"),
            &global_allowlist,
        )
        .map_err(|e| match e {
            crate::tenants::TenantConfigError::ApiKeys(p) => invalid("SP_API_KEYS", p),
            crate::tenants::TenantConfigError::Reserved(p) => invalid("SP_RESERVED_CONFIG", p),
        })?;

        let billing = crate::billing::settings::BillingSettings::from_lookup(&get, &tenants)?;

        let kid = get("SP_KID")
            .ok_or_else(|| invalid("SP_KID", "required (key id of SP_PRIVATE_KEY_B64)"))?;
        let seed = get("SP_PRIVATE_KEY_B64").ok_or_else(|| {
            invalid(
                "SP_PRIVATE_KEY_B64",
                "required (32-byte Ed25519 seed, base64url)",
            )
        })?;
        let signing_key = SigningKey::from_seed_b64url(seed.trim(), kid.trim())
            .map_err(|e| invalid("SP_PRIVATE_KEY_B64", e.to_string()))?;

        let previous_keys = match get("SP_PREVIOUS_JWKS") {
            None => Vec::new(),
            Some(v) => {
                let keys = Jwks::from_json(v.as_bytes())
                    .map_err(|e| invalid("SP_PREVIOUS_JWKS", e.to_string()))?
                    .keys()
                    .to_vec();
                // a JWKS reader skips keys it cannot use; here a skipped key would silently
                // orphan every receipt it signed
                let listed = serde_json::from_str::<serde_json::Value>(&v)
                    .ok()
                    .and_then(|doc| doc["keys"].as_array().map(Vec::len))
                    .unwrap_or(0);
                if keys.len() != listed {
                    return Err(invalid(
                        "SP_PREVIOUS_JWKS",
                        format!(
                            "{} of its {listed} keys are not Ed25519 public keys (kty OKP, crv Ed25519, x, kid)",
                            listed.saturating_sub(keys.len())
                        ),
                    ));
                }
                keys
            }
        };

        let filter_token = get("SP_FILTER_TOKEN").ok_or_else(|| {
            invalid(
                "SP_FILTER_TOKEN",
                "required (the shared secret the filter presents)",
            )
        })?;
        if filter_token.len() < 16 {
            return Err(invalid("SP_FILTER_TOKEN", "must be at least 16 characters"));
        }
        let admin_key_hash = match get("SP_ADMIN_KEY") {
            Some(k) if k.len() < 16 => {
                return Err(invalid("SP_ADMIN_KEY", "must be at least 16 characters"))
            }
            other => other.map(|k| api_key_hash(&k)),
        };

        let chain_max = parse_number(
            "SP_CHAIN_MAX",
            get("SP_CHAIN_MAX"),
            DEFAULT_CHAIN_MAX,
            1,
            1_000_000,
        )?;

        let receipt_max_skew = Duration::from_secs(parse_number(
            "SP_RECEIPT_MAX_SKEW_SECS",
            get("SP_RECEIPT_MAX_SKEW_SECS"),
            DEFAULT_RECEIPT_MAX_SKEW_SECS,
            1,
            86_400,
        )?);
        let idempotency_retention = Duration::from_secs(parse_number(
            "SP_IDEMPOTENCY_RETENTION_SECS",
            get("SP_IDEMPOTENCY_RETENTION_SECS"),
            7 * 24 * 3600,
            60,
            10 * 365 * 24 * 3600,
        )?);

        let fallback = crate::fallback::FallbackConfig::from_lookup(&get)?;
        if fallback.timeout >= limits.request_timeout {
            return Err(invalid(
                "SP_OPENAI_TIMEOUT_MS",
                "must be shorter than SP_REQUEST_TIMEOUT_SECS, which cuts the repair request",
            ));
        }

        Ok(Config {
            listeners,
            limits,
            storage,
            tenants,
            global_allowlist,
            signing_key,
            previous_keys,
            filter_token_hash: api_key_hash(&filter_token),
            admin_key_hash,
            chain_max,
            receipt_max_skew,
            idempotency_retention,
            forward: crate::forward::ForwardConfig::from_lookup(&get)?,
            fallback,
            billing,
        })
    }
}

/// The three listeners: public on `SP_BIND` (default loopback), internal on `SP_INTERNAL_BIND`
/// (default `SP_BIND`: the filter must reach it wherever the service is exposed), admin on
/// `SP_ADMIN_BIND` (default loopback, whatever `SP_BIND` says). Three distinct ports.
fn parse_listeners(get: &impl Fn(&str) -> Option<String>) -> Result<Listeners, ConfigError> {
    let port = |variable: &'static str, default: u16| {
        parse_number(variable, get(variable), default as u64, 1, u16::MAX as u64).map(|p| p as u16)
    };
    let address = |variable: &'static str, default: IpAddr| match get(variable) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| invalid(variable, format!("{v:?} is not an IP address"))),
    };
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let bind = address("SP_BIND", loopback)?;
    let listeners = Listeners {
        public: SocketAddr::new(bind, port("PORT", DEFAULT_PORT)?),
        internal: SocketAddr::new(
            address("SP_INTERNAL_BIND", bind)?,
            port("SP_INTERNAL_PORT", DEFAULT_INTERNAL_PORT)?,
        ),
        admin: SocketAddr::new(
            address("SP_ADMIN_BIND", loopback)?,
            port("SP_ADMIN_PORT", DEFAULT_ADMIN_PORT)?,
        ),
    };
    let (public, internal, admin) = (
        listeners.public.port(),
        listeners.internal.port(),
        listeners.admin.port(),
    );
    if internal == public {
        return Err(invalid(
            "SP_INTERNAL_PORT",
            format!("{internal} is also PORT; each API needs its own port"),
        ));
    }
    if admin == public || admin == internal {
        return Err(invalid(
            "SP_ADMIN_PORT",
            format!("{admin} is also PORT or SP_INTERNAL_PORT; each API needs its own port"),
        ));
    }
    Ok(listeners)
}

pub(crate) fn parse_number(
    variable: &'static str,
    value: Option<String>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| invalid(variable, format!("{v:?} is not a whole number")))?;
    if n < min || n > max {
        return Err(invalid(variable, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

/// `SP_HEL_ALLOWLIST`: host patterns separated by commas, or a JSON array of them.
fn parse_allowlist(value: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let Some(v) = value else {
        return Ok(Vec::new());
    };
    let entries: Vec<String> = if v.trim_start().starts_with('[') {
        serde_json::from_str(v).map_err(|e| {
            invalid(
                "SP_HEL_ALLOWLIST",
                format!("not a JSON array of strings: {e}"),
            )
        })?
    } else {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    entries
        .iter()
        .map(|e| normalize_host_pattern(e).map_err(|p| invalid("SP_HEL_ALLOWLIST", p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SEED: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: HashMap<String, String> = [
            ("SP_PRIVATE_KEY_B64", SEED),
            ("SP_KID", "k1"),
            ("SP_FILTER_TOKEN", "filter-token-0123456789"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in vars {
            env.insert(k.to_string(), v.to_string());
        }
        Config::from_lookup(|name| env.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listeners.public.to_string(), "127.0.0.1:8088");
        assert_eq!(c.listeners.internal.to_string(), "127.0.0.1:8090");
        assert_eq!(c.listeners.admin.to_string(), "127.0.0.1:8091");
        assert_eq!(c.limits.max_connections, 1024);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.receipt_max_skew, Duration::from_secs(300));
        assert_eq!(c.idempotency_retention, Duration::from_secs(604_800));
        let short = config(&[("SP_IDEMPOTENCY_RETENTION_SECS", "3600")]).unwrap();
        assert_eq!(short.idempotency_retention, Duration::from_secs(3600));
        assert!(config(&[("SP_IDEMPOTENCY_RETENTION_SECS", "1")]).is_err());
        assert_eq!(
            c.storage,
            StorageConfig::Sqlite {
                path: "./data/signet.db".into(),
                checkpoint_every: Duration::from_millis(20),
            }
        );
        let rarely = config(&[("SP_SQLITE_CHECKPOINT_MS", "250")]).unwrap();
        assert!(
            matches!(rarely.storage, StorageConfig::Sqlite { checkpoint_every, .. }
            if checkpoint_every == Duration::from_millis(250))
        );
        assert!(config(&[("SP_SQLITE_CHECKPOINT_MS", "1")]).is_err());
        assert_eq!(c.chain_max, 1000);
        assert!(c.admin_key_hash.is_none());
        assert_eq!(c.fallback.base_url, "https://api.openai.com/v1");
        assert_eq!(c.fallback.model, "gpt-4o-mini");
        assert_eq!(c.fallback.api_key, None);
        assert_eq!(c.fallback.timeout, Duration::from_secs(20));
        assert_eq!(c.fallback.max_tokens, 1024);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("SP_STORAGE", "postgres")], "SP_POSTGRES_URL"),
            (&[("SP_STORAGE", "mysql")], "SP_STORAGE"),
            (&[("SP_POSTGRES_URL", "postgres://x")], "SP_STORAGE"),
            (&[("PORT", "0")], "PORT"),
            (&[("PORT", "eighty")], "PORT"),
            (&[("SP_BIND", "localhost:1")], "SP_BIND"),
            (&[("SP_CHAIN_MAX", "0")], "SP_CHAIN_MAX"),
            (&[("SP_INTERNAL_PORT", "8088")], "SP_INTERNAL_PORT"),
            (&[("PORT", "8090")], "SP_INTERNAL_PORT"),
            (&[("SP_ADMIN_PORT", "8090")], "SP_ADMIN_PORT"),
            (&[("SP_ADMIN_PORT", "8088")], "SP_ADMIN_PORT"),
            (&[("SP_INTERNAL_BIND", "localhost")], "SP_INTERNAL_BIND"),
            (&[("SP_ADMIN_BIND", "any")], "SP_ADMIN_BIND"),
            (&[("SP_MAX_CONNECTIONS", "0")], "SP_MAX_CONNECTIONS"),
            (&[("SP_IDLE_TIMEOUT_SECS", "0")], "SP_IDLE_TIMEOUT_SECS"),
            (
                &[("SP_REQUEST_TIMEOUT_SECS", "x")],
                "SP_REQUEST_TIMEOUT_SECS",
            ),
            (
                &[("SP_RECEIPT_MAX_SKEW_SECS", "0")],
                "SP_RECEIPT_MAX_SKEW_SECS",
            ),
            (&[("SP_KID", "")], "SP_KID"),
            (&[("SP_PRIVATE_KEY_B64", "c2hvcnQ")], "SP_PRIVATE_KEY_B64"),
            (&[("SP_FILTER_TOKEN", "")], "SP_FILTER_TOKEN"),
            (&[("SP_ADMIN_KEY", "short")], "SP_ADMIN_KEY"),
            (&[("SP_API_KEYS", "[]")], "SP_API_KEYS"),
            (&[("SP_RESERVED_CONFIG", "{\"t\":1}")], "SP_RESERVED_CONFIG"),
            (&[("SP_HEL_ALLOWLIST", "https://x.com")], "SP_HEL_ALLOWLIST"),
            (
                &[("SP_HEL_ALLOWLIST", "my_host.example.com")],
                "SP_HEL_ALLOWLIST",
            ),
            (&[("SP_PREVIOUS_JWKS", "{}")], "SP_PREVIOUS_JWKS"),
            (
                &[("SP_OPENAI_BASE_URL", "api.openai.com")],
                "SP_OPENAI_BASE_URL",
            ),
            (&[("SP_OPENAI_TIMEOUT_MS", "0")], "SP_OPENAI_TIMEOUT_MS"),
            (&[("SP_OPENAI_TIMEOUT_MS", "30000")], "SP_OPENAI_TIMEOUT_MS"),
            (&[("SP_OPENAI_MAX_TOKENS", "0")], "SP_OPENAI_MAX_TOKENS"),
            (
                &[(
                    "SP_PREVIOUS_JWKS",
                    r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"old"}]}"#,
                )],
                "SP_PREVIOUS_JWKS",
            ),
        ];
        for (vars, variable) in cases {
            match config(vars) {
                Ok(_) => panic!("{vars:?} accepted"),
                Err(e) => assert_eq!(e.variable, *variable, "{vars:?}: {e}"),
            }
        }
    }

    #[test]
    fn the_internal_api_follows_sp_bind_and_the_admin_api_stays_on_loopback() {
        let c = config(&[("SP_BIND", "0.0.0.0"), ("SP_INTERNAL_PORT", "9000")]).unwrap();
        assert_eq!(c.listeners.public.to_string(), "0.0.0.0:8088");
        assert_eq!(c.listeners.internal.to_string(), "0.0.0.0:9000");
        assert_eq!(c.listeners.admin.to_string(), "127.0.0.1:8091");
        let c = config(&[("SP_INTERNAL_BIND", "10.0.0.2"), ("SP_ADMIN_BIND", "::1")]).unwrap();
        assert_eq!(c.listeners.internal.to_string(), "10.0.0.2:8090");
        assert_eq!(c.listeners.admin.to_string(), "[::1]:8091");
    }

    #[test]
    fn postgres_and_allowlist_forms() {
        let c = config(&[
            ("SP_STORAGE", "postgres"),
            ("SP_POSTGRES_URL", "postgres://postgres@127.0.0.1/test"),
            ("SP_HEL_ALLOWLIST", "a.com, *.b.org"),
        ])
        .unwrap();
        assert_eq!(c.storage.kind(), "postgres");
        assert_eq!(c.global_allowlist, vec!["a.com", "*.b.org"]);
        let c = config(&[("SP_HEL_ALLOWLIST", r#"["a.com"]"#)]).unwrap();
        assert_eq!(c.global_allowlist, vec!["a.com"]);
    }
}
