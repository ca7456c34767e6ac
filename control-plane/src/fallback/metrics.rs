//! The fallback's Prometheus metrics, named without the `signet_cp_` prefix of the others
//! (`signet_fallback_*`, `signet_fu_*`), served on the same `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `tokenizer` or `approximation`.
    pub method: &'static str,
}

#[derive(Clone)]
pub struct FallbackMetrics {
    /// Repairs the provider answered with usable JSON (replays not counted).
    pub used: Counter,
    /// FU metered, by tenant.
    pub fu_tokens: Family<TenantLabels, Counter>,
    /// Repairs refused by the quota (no provider call).
    pub quota_denials: Family<TenantLabels, Counter>,
    /// Repairs answered from the stored result.
    pub replays: Counter,
    /// Provider calls that failed, and answers that could not be used, by kind.
    pub errors: Family<KindLabels, Counter>,
    /// Answers without `usage`, metered at the estimate.
    pub usage_missing: Counter,
    /// Seconds per provider call.
    pub provider_seconds: Histogram,
    /// The estimate reserved per call, by how it was counted.
    pub estimated_tokens: Family<MethodLabels, Histogram>,
    /// The provider's `usage.total_tokens` per call.
    pub actual_tokens: Histogram,
}

fn token_histogram() -> Histogram {
    // 16 .. ~262k tokens
    Histogram::new(exponential_buckets(16.0, 2.0, 15))
}

impl FallbackMetrics {
    pub fn new() -> Self {
        let m = FallbackMetrics {
            used: Counter::default(),
            fu_tokens: Family::default(),
            quota_denials: Family::default(),
            replays: Counter::default(),
            errors: Family::default(),
            usage_missing: Counter::default(),
            // 10 ms .. ~82 s
            provider_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            estimated_tokens: Family::new_with_constructor(token_histogram),
            actual_tokens: token_histogram(),
        };
        for kind in super::openai::ERROR_KINDS {
            let _created = m.errors.get_or_create(&KindLabels { kind });
        }
        m
    }

    /// Registers them in `registry`, whose prefix should be `signet`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fallback_used",
            "LLM-fallback repairs answered with usable JSON",
            self.used.clone(),
        );
        registry.register(
            "fu_tokens",
            "Fallback units (provider tokens) metered, by tenant",
            self.fu_tokens.clone(),
        );
        registry.register(
            "fu_quota_denials",
            "Fallback repairs refused by fu_monthly_limit before any provider call",
            self.quota_denials.clone(),
        );
        registry.register(
            "fallback_replays",
            "Fallback repairs answered from the stored result of their idempotency key",
            self.replays.clone(),
        );
        registry.register(
            "fallback_errors",
            "Provider failures and unusable answers, by kind",
            self.errors.clone(),
        );
        registry.register(
            "fallback_usage_missing",
            "Provider answers without usage, metered at the estimate",
            self.usage_missing.clone(),
        );
        registry.register(
            "fallback_provider_seconds",
            "Latency of provider calls",
            self.provider_seconds.clone(),
        );
        registry.register(
            "fallback_estimated_tokens",
            "Tokens reserved per provider call (prompt estimate plus max_tokens)",
            self.estimated_tokens.clone(),
        );
        registry.register(
            "fallback_actual_tokens",
            "usage.total_tokens per provider call",
            self.actual_tokens.clone(),
        );
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }
}

impl Default for FallbackMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::super::openai::{Failure, Unusable, ERROR_KINDS};

    #[test]
    fn every_error_kind_is_exported_from_zero() {
        let kinds = [
            Failure::Timeout.kind(),
            Failure::Unreachable(String::new()).kind(),
            Failure::RateLimited.kind(),
            Failure::Status(503).kind(),
            Failure::Status(400).kind(),
            Unusable::Refused(String::new()).kind(),
            Unusable::Malformed(String::new()).kind(),
            Unusable::Truncated.kind(),
            Unusable::TooLarge.kind(),
        ];
        assert_eq!(kinds, ERROR_KINDS);
        let text = {
            let mut out = String::new();
            let mut registry = prometheus_client::registry::Registry::with_prefix("signet");
            super::FallbackMetrics::new().register(&mut registry);
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        for kind in ERROR_KINDS {
            let series = format!("signet_fallback_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }
}
