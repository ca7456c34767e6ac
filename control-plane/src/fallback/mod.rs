//! The LLM fallback (SPEC §4 repair, §6 FU): `POST /v1/internal/repair` asks an
//! OpenAI-compatible provider to fix the JSON text deterministic repair could not, and meters
//! the tokens it used as fallback units.
//!
//! One repair: reserve the estimate against the tenant's month ([`quota`], atomically in
//! storage: 429 `FU_QUOTA_EXCEEDED` and no provider call when settled + reserved + estimate
//! exceeds `fu_monthly_limit`) → call the provider ([`openai`], with the [`prompt`]) → settle
//! (FU = `usage.total_tokens`, or the [`estimate`] when the answer has no usage, flagged) →
//! answer. A provider that did not answer releases the reservation and meters nothing; one that
//! answered unusable content is metered and answered 422. The result is stored with the key: a
//! replay answers it and meters nothing.
//!
//! These are the only FU metered: a commit's `fu_tokens` (which the receipt states) counts
//! nothing (see `api/internal.rs`).
//!
//! - [`estimate`]: the token estimate (the model's tokenizer, else an approximation).
//! - [`prompt`]: the system prompt, the strict-schema check and the request body.
//! - [`openai`]: the HTTP client and how an answer is read.
//! - [`quota`]: the reservation and the settlement.
//! - [`metrics`]: `signet_fallback_*` and `signet_fu_*`.

pub mod estimate;
pub mod metrics;
pub mod openai;
pub mod prompt;
pub mod quota;

use std::sync::Arc;
use std::time::{Duration, Instant};

use signet_protocol::internal::repair::{RepairRequest, Repaired, MAX_TEXT_BYTES};
use signet_protocol::internal::{Code, ErrorReply};

use crate::api::HttpError;
use crate::config::{invalid, parse_number, ConfigError};
use crate::storage::fallback::{Reserved, Settled, StoredRepair};
use crate::ControlPlane;
pub use metrics::FallbackMetrics;
use openai::{Failure, Provider, Unusable};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
pub const DEFAULT_TIMEOUT_MS: u64 = 20_000;
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// The longest schema accepted with a repair (bytes of its JSON).
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;

/// `SP_OPENAI_*`.
#[derive(Clone, PartialEq, Eq)]
pub struct FallbackConfig {
    /// `SP_OPENAI_BASE_URL`: requests go to `{base}/chat/completions`.
    pub base_url: String,
    /// `SP_OPENAI_API_KEY`; without it every repair is 503 `FALLBACK_UNAVAILABLE`.
    pub api_key: Option<String>,
    /// `SP_OPENAI_MODEL`.
    pub model: String,
    /// `SP_OPENAI_TIMEOUT_MS`: the whole provider call.
    pub timeout: Duration,
    /// `SP_OPENAI_MAX_TOKENS`: the completion's `max_tokens`, reserved with the prompt.
    pub max_tokens: u32,
}

impl std::fmt::Debug for FallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("model", &self.model)
            .field("timeout", &self.timeout)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl FallbackConfig {
    /// Reads `SP_OPENAI_*` through `get` (empty counts as unset).
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let base_url = get("SP_OPENAI_BASE_URL")
            .map(|u| u.trim().to_owned())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(invalid(
                "SP_OPENAI_BASE_URL",
                format!("{base_url:?} is not an http(s) URL"),
            ));
        }
        let timeout_ms = parse_number(
            "SP_OPENAI_TIMEOUT_MS",
            get("SP_OPENAI_TIMEOUT_MS"),
            DEFAULT_TIMEOUT_MS,
            100,
            600_000,
        )?;
        let max_tokens = parse_number(
            "SP_OPENAI_MAX_TOKENS",
            get("SP_OPENAI_MAX_TOKENS"),
            DEFAULT_MAX_TOKENS,
            1,
            1_000_000,
        )?;
        Ok(FallbackConfig {
            base_url,
            api_key: get("SP_OPENAI_API_KEY").map(|k| k.trim().to_owned()),
            model: get("SP_OPENAI_MODEL")
                .map(|m| m.trim().to_owned())
                .unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            timeout: Duration::from_millis(timeout_ms),
            max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        })
    }
}

/// The configured fallback.
pub struct Fallback {
    /// `None` without `SP_OPENAI_API_KEY`.
    provider: Option<Provider>,
    config: FallbackConfig,
}

impl Fallback {
    pub fn new(config: FallbackConfig) -> Result<Fallback, String> {
        let provider = match &config.api_key {
            Some(key) => Some(Provider::new(&config.base_url, key, config.timeout)?),
            None => None,
        };
        // Loads the model's tokenizer table now rather than on the first repair; without a
        // provider there is no repair to count for, so none of its CPU and memory.
        if provider.is_some() {
            let model = config.model.clone();
            std::thread::spawn(move || estimate::Estimator::for_model(&model));
        }
        Ok(Fallback { provider, config })
    }
}

/// `POST /v1/internal/repair`. Runs as a task of its own: a caller that goes away does not
/// cancel a provider call that is already being paid for, so it is settled all the same.
pub async fn repair(
    cp: Arc<ControlPlane>,
    request: RepairRequest<'static>,
) -> Result<Repaired, HttpError> {
    check(&cp, &request)?;
    tokio::spawn(async move { run(&cp, request).await })
        .await
        .map_err(|e| {
            tracing::error!("the repair task failed: {e}");
            HttpError::new(Code::FallbackUnavailable, "the repair failed")
        })?
}

/// What can be refused before anything is reserved.
fn check(cp: &ControlPlane, r: &RepairRequest<'_>) -> Result<(), HttpError> {
    let grant = cp
        .tenants()
        .fallback(&r.tenant)
        .ok_or_else(|| HttpError::new(Code::UnknownTenant, "unknown tenant"))?;
    if !grant.enabled {
        return Err(HttpError::new(
            Code::FallbackDisabled,
            "the LLM fallback is not enabled for this tenant",
        ));
    }
    if r.idempotency_key.is_empty() || r.idempotency_key.len() > 256 {
        return Err(HttpError::new(
            Code::IdempotencyKeyInvalid,
            "the idempotency key must be 1 to 256 bytes",
        ));
    }
    let schema_bytes = r.schema.as_ref().map_or(0, |s| s.to_string().len());
    if r.text.len() > MAX_TEXT_BYTES || schema_bytes > MAX_SCHEMA_BYTES {
        return Err(HttpError::new(
            Code::BodyTooLarge,
            format!(
                "a repair takes at most {MAX_TEXT_BYTES} bytes of text and {MAX_SCHEMA_BYTES} of schema"
            ),
        ));
    }
    if r.schema
        .as_ref()
        .is_some_and(|s| !(s.is_object() || s.is_boolean()))
    {
        return Err(HttpError::new(
            Code::BadRequest,
            "schema must be a JSON Schema (an object or a boolean) or null",
        ));
    }
    if cp.fallback.provider.is_none() {
        return Err(HttpError::new(
            Code::FallbackUnavailable,
            "no LLM provider is configured (SP_OPENAI_API_KEY)",
        ));
    }
    Ok(())
}

async fn run(cp: &ControlPlane, r: RepairRequest<'static>) -> Result<Repaired, HttpError> {
    let Some(provider) = &cp.fallback.provider else {
        return Err(HttpError::new(
            Code::FallbackUnavailable,
            "no LLM provider is configured (SP_OPENAI_API_KEY)",
        ));
    };
    let config = &cp.fallback.config;
    let metrics = &cp.metrics.fallback;
    let tenant = r.tenant.as_ref();
    let limit = cp
        .tenants()
        .fallback(tenant)
        .and_then(|g| g.fu_monthly_limit);
    let plan = cp.tenants().plan(tenant).unwrap_or_default();

    let prepared = {
        let (config, request) = (config.clone(), r.clone());
        tokio::task::spawn_blocking(move || prepare(&config, &request))
            .await
            .map_err(|e| HttpError::new(Code::FallbackUnavailable, format!("estimate: {e}")))?
    };
    let (body, estimate, method) = (prepared.body, prepared.estimate, prepared.method);

    let ask = quota::Ask {
        tenant,
        idempotency_key: &r.idempotency_key,
        fingerprint: &r.fingerprint(),
        tokens: estimate,
        limit,
        call_timeout: config.timeout,
    };
    let reservation = quota::reservation(&ask, crate::now_ms());
    let store = cp.storage.fallback();
    match store
        .reserve(reservation.clone())
        .await
        .map_err(HttpError::storage)?
    {
        Reserved::Reserved => {}
        Reserved::Replay(stored) => {
            metrics.replays.inc();
            return replay(stored);
        }
        Reserved::KeyReused => {
            return Err(HttpError::new(
                Code::IdempotencyKeyReused,
                "the idempotency key was used with another repair",
            ))
        }
        Reserved::InFlight => {
            return Err(HttpError::new(
                Code::FallbackInFlight,
                "a repair with this idempotency key is in flight",
            ))
        }
        Reserved::Denied { settled, reserved } => {
            metrics
                .quota_denials
                .get_or_create(&metrics::TenantLabels {
                    tenant: tenant.to_owned(),
                })
                .inc();
            return Err(HttpError::new(
                Code::FuQuotaExceeded,
                format!(
                    "the repair's estimate of {estimate} FU does not fit fu_monthly_limit {}: {settled} used and {reserved} reserved this month",
                    limit.unwrap_or_default()
                ),
            ));
        }
    }
    metrics
        .estimated_tokens
        .get_or_create(&metrics::MethodLabels { method })
        .observe(estimate as f64);

    let started = Instant::now();
    let outcome = provider.complete(&body).await;
    metrics
        .provider_seconds
        .observe(started.elapsed().as_secs_f64());
    let answer = match outcome {
        Ok(answer) => answer,
        Err(failure) => {
            metrics.error(failure.kind());
            if let Err(e) = store.release(&reservation.id).await {
                // it expires on its own
                tracing::warn!("cannot release reservation {}: {e}", reservation.id);
            }
            return Err(failure_error(&failure));
        }
    };

    let usage_estimated = answer.total_tokens.is_none();
    let fu_tokens = answer.total_tokens.unwrap_or(estimate);
    if usage_estimated {
        metrics.usage_missing.inc();
    } else {
        metrics.actual_tokens.observe(fu_tokens as f64);
    }
    let result = answer
        .content
        .and_then(|text| match crate::strict_json(text.trim().as_bytes()) {
            Ok(()) => Ok(text.trim().to_owned()),
            Err(e) => Err(Unusable::Malformed(format!(
                "the content is not strict JSON: {e}"
            ))),
        })
        .map(|repaired| Repaired {
            repaired,
            fu_tokens,
            usage_estimated,
            replay: false,
        })
        .map_err(|unusable| {
            metrics.error(unusable.kind());
            unusable_error(&unusable, fu_tokens)
        });
    let stored = match &result {
        Ok(repaired) => StoredRepair {
            status: 200,
            body: serde_json::to_string(repaired).unwrap_or_default(),
        },
        Err(e) => StoredRepair {
            status: e.code().status(),
            body: e.reply().to_json(),
        },
    };
    let settlement = quota::settlement(&reservation, fu_tokens, usage_estimated, stored, plan);
    match store.settle(settlement).await {
        Ok(Settled::Metered { .. }) => {
            metrics
                .fu_tokens
                .get_or_create(&metrics::TenantLabels {
                    tenant: tenant.to_owned(),
                })
                .inc_by(fu_tokens);
            cp.metrics.fu.inc_by(fu_tokens);
        }
        Ok(Settled::AlreadySettled) => {}
        Ok(Settled::CounterOverflow) => {
            tracing::error!(
                tenant,
                fu_tokens,
                "the month's FU counter is full: repair not metered"
            );
            return Err(HttpError::new(
                Code::StorageUnavailable,
                "the month's FU counter cannot hold this repair",
            ));
        }
        Err(e) => {
            // the reservation keeps holding the estimate until it expires
            tracing::error!(
                tenant,
                fu_tokens,
                "the repair's FU could not be metered: {e}"
            );
            return Err(HttpError::storage(e));
        }
    }
    if result.is_ok() {
        metrics.used.inc();
    }
    result
}

/// A provider request ready to send, with the tokens it reserves.
pub struct Prepared {
    /// The chat completions body.
    pub body: serde_json::Value,
    /// Prompt tokens (counted as [`estimate`] says) plus `max_tokens`.
    pub estimate: u64,
    /// `tokenizer` or `approximation`.
    pub method: &'static str,
}

/// Builds the request for `r` and its estimate. May load the model's tokenizer table the first
/// time: call it off the async threads.
pub fn prepare(config: &FallbackConfig, r: &RepairRequest<'_>) -> Prepared {
    let (response_format, strict) = prompt::response_format(r.schema.as_ref());
    let system = prompt::system_message(&r.payload_type, &r.location, r.schema.as_ref(), strict);
    let schema_text = match (&r.schema, strict) {
        (Some(schema), true) => schema.to_string(),
        _ => String::new(),
    };
    let estimator = estimate::Estimator::for_model(&config.model);
    let prompt_tokens = estimator.prompt(&[&system, &r.text, &schema_text]);
    Prepared {
        body: prompt::body(
            &config.model,
            config.max_tokens,
            &system,
            &r.text,
            response_format,
        ),
        estimate: prompt_tokens.saturating_add(u64::from(config.max_tokens)),
        method: estimator.method(),
    }
}

/// The stored answer of a settled key, marked as a replay.
fn replay(stored: StoredRepair) -> Result<Repaired, HttpError> {
    if stored.status == 200 {
        let mut repaired: Repaired = serde_json::from_str(&stored.body).map_err(|e| {
            HttpError::storage(crate::storage::StoreError::Corrupt(format!("repair: {e}")))
        })?;
        repaired.replay = true;
        return Ok(repaired);
    }
    let reply: ErrorReply = serde_json::from_str(&stored.body).map_err(|e| {
        HttpError::storage(crate::storage::StoreError::Corrupt(format!("repair: {e}")))
    })?;
    let code = Code::parse(&reply.code).unwrap_or(Code::FallbackInvalid);
    Err(HttpError::new(code, reply.detail))
}

fn failure_error(failure: &Failure) -> HttpError {
    match failure {
        Failure::Timeout => HttpError::new(
            Code::FallbackTimeout,
            "the LLM provider did not answer in time (SP_OPENAI_TIMEOUT_MS); nothing metered",
        ),
        Failure::Unreachable(e) => HttpError::new(
            Code::FallbackUnavailable,
            format!("the LLM provider is unreachable ({e}); nothing metered"),
        ),
        Failure::RateLimited => HttpError::new(
            Code::FallbackUnavailable,
            "the LLM provider is rate limiting (429); nothing metered",
        ),
        Failure::Status(status) => HttpError::new(
            Code::FallbackProviderError,
            format!("the LLM provider answered {status}; nothing metered"),
        ),
    }
}

fn unusable_error(unusable: &Unusable, fu_tokens: u64) -> HttpError {
    match unusable {
        Unusable::Refused(why) => HttpError::new(
            Code::FallbackRefused,
            format!("the LLM provider refused the repair ({why}); {fu_tokens} FU metered"),
        ),
        Unusable::Malformed(why) => HttpError::new(
            Code::FallbackInvalid,
            format!("the LLM provider's answer is unusable: {why}; {fu_tokens} FU metered"),
        ),
        Unusable::Truncated => HttpError::new(
            Code::FallbackInvalid,
            format!(
                "the LLM provider's answer was cut at SP_OPENAI_MAX_TOKENS; {fu_tokens} FU metered"
            ),
        ),
        Unusable::TooLarge => HttpError::new(
            Code::FallbackInvalid,
            format!(
                "the LLM provider's answer is over {} bytes; {fu_tokens} FU metered (estimated)",
                openai::MAX_ANSWER_BYTES
            ),
        ),
    }
}
