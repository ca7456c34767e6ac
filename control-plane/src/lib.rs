//! Signet control plane: where receipts live.
//!
//! The Envoy filter keeps no durable state; it reaches this service through HTTP callouts
//! (`/v1/internal/*`, see docs/ARCHITECTURE.md) to look up tenants and to commit receipts (one
//! commit per exchange, which also decides idempotency). Operators and auditors use the public
//! endpoints (JWKS, chains, signed export bundles, metrics).
//!
//! - [`api`]: the HTTP routes, their handlers, the extractors that authenticate callers and the
//!   one error answer.
//! - [`storage`]: the receipt store (SQLite or PostgreSQL): commits, chains, usage, billing queue.
//! - [`forward`]: delivering exchanges to their `forward_url` (SPEC §5), and the outbox that
//!   retries them.
//! - [`tenants`]: API keys (kept as hashes), what each grants and each tenant's billing plan.
//! - [`billing`]: SPEC §6: what usage bills, and the reporter that sends it to Stripe.
//! - [`fallback`]: the LLM-fallback repair, its provider client and its FU quota.
//! - [`keys`]: the signing key and the JWKS of every kid ever used.
//! - [`metrics`]: the Prometheus counters served at `/metrics`.
//! - [`server`]: one listener per API, with its connection limit and timeouts.
//! - [`config`]: the configuration from the environment.

pub mod api;
pub mod billing;
pub mod config;
pub mod fallback;
pub mod forward;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod tenants;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use config::{Config, StorageConfig};
use keys::KeyRing;
use metrics::Metrics;
use storage::{PostgresStorage, Retention, SqliteStorage, Storage, StoreError};
use tenants::TenantDirectory;

/// Shared state of the service.
pub struct ControlPlane {
    pub storage: Arc<dyn Storage>,
    tenants: RwLock<Arc<TenantDirectory>>,
    pub global_allowlist: Vec<String>,
    pub keys: KeyRing,
    pub metrics: Metrics,
    filter_token_hash: String,
    admin_key_hash: Option<String>,
    pub chain_max: u64,
    /// How far a committed receipt's `ts` may be from now (`SP_RECEIPT_MAX_SKEW_SECS`).
    pub receipt_max_skew: Duration,
    /// `SP_REQUEST_TIMEOUT_SECS`.
    pub request_timeout: Duration,
    pub forward: forward::ForwardService,
    /// The LLM fallback (`SP_OPENAI_*`).
    pub fallback: fallback::Fallback,
    /// The Stripe reporter's settings, liveness and counters.
    pub billing: billing::Billing,
}

impl ControlPlane {
    /// Opens the storage (creating or migrating the schema) and loads the key ring.
    pub async fn start(config: Config) -> Result<Arc<Self>, Box<dyn std::error::Error>> {
        let retention = Retention {
            idempotency: config.idempotency_retention,
            ..Retention::DEFAULT
        };
        let storage = open_storage(&config.storage, retention).await?;
        let keys =
            KeyRing::load(storage.as_ref(), config.signing_key, config.previous_keys).await?;
        let metrics = Metrics::new(storage.kind());
        let forward = forward::ForwardService::start(
            config.forward,
            storage.clone(),
            keys.signing_key().clone(),
            metrics.forward.clone(),
            retention,
        )?;
        let cp = Arc::new(ControlPlane {
            billing: billing::Billing::new(config.billing),
            metrics,
            forward,
            storage,
            tenants: RwLock::new(Arc::new(config.tenants)),
            global_allowlist: config.global_allowlist,
            keys,
            filter_token_hash: config.filter_token_hash,
            admin_key_hash: config.admin_key_hash,
            chain_max: config.chain_max,
            receipt_max_skew: config.receipt_max_skew,
            request_timeout: config.limits.request_timeout,
            fallback: fallback::Fallback::new(config.fallback)?,
        });
        billing::reporter::spawn(&cp)?;
        Ok(cp)
    }

    pub fn tenants(&self) -> Arc<TenantDirectory> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace_tenants(&self, directory: TenantDirectory) {
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(directory);
    }

    /// Whether `token` is `SP_FILTER_TOKEN` (compared as SHA-256 digests).
    pub fn is_filter_token(&self, token: &str) -> bool {
        tenants::api_key_hash(token) == self.filter_token_hash
    }

    /// Whether `key` is `SP_ADMIN_KEY`; always false when no admin key is configured.
    pub fn is_admin_key(&self, key: &str) -> bool {
        self.admin_key_hash.as_deref() == Some(tenants::api_key_hash(key).as_str())
    }
}

pub async fn open_storage(
    config: &StorageConfig,
    retention: Retention,
) -> Result<Arc<dyn Storage>, StoreError> {
    Ok(match config {
        StorageConfig::Sqlite {
            path,
            checkpoint_every,
        } => Arc::new(SqliteStorage::open_with(
            path,
            retention,
            *checkpoint_every,
        )?),
        StorageConfig::Postgres { url, pool_size } => {
            Arc::new(PostgresStorage::connect_with(url, *pool_size, retention).await?)
        }
    })
}

/// Checks `json` with the protocol's strict parser (RFC 7493 I-JSON: duplicate member names,
/// lone surrogates, noncharacters refused) before serde reads it: serde_json silently keeps
/// the last of two members of one name, so what the control plane reads could differ from
/// what another reader of the same bytes sees.
pub fn strict_json(json: &[u8]) -> Result<(), signet_protocol::CanonError> {
    let options = signet_protocol::canonical::ParseOptions {
        // names compared as sent: the NFC step would only cost here
        profile: signet_protocol::Profile::Rfc8785,
        reject_unsafe_integers: false,
    };
    signet_protocol::canonical::parse(json, &options).map(drop)
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
