//! The forwarder's Prometheus metrics, `signet_forward_*`, served with the others at
//! `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::storage::forward::OutboxDepth;

/// The values of `signet_forward_total`'s `outcome` label, each exported from 0.
pub const OUTCOMES: [&str; 5] = ["delivered", "failed", "dead", "refused", "replay"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `failed` (retry scheduled), `dead`, `refused` (HEL/SSRF), `replay`.
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct ForwardMetrics {
    /// Deliveries by how an attempt (or a request) ended.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Attempts made (first and retries).
    pub attempts: Counter,
    /// Deliveries waiting for a retry (or in an attempt), as last counted.
    pub retry_queue_depth: Gauge,
    /// Dead letters, as last counted.
    pub dead_letters: Gauge,
    /// Duration of attempts that got an answer, in seconds.
    pub delivery_seconds: Histogram,
}

impl Default for ForwardMetrics {
    fn default() -> Self {
        let outcomes = Family::default();
        for outcome in OUTCOMES {
            let _created = outcomes.get_or_create(&OutcomeLabels { outcome });
        }
        ForwardMetrics {
            outcomes,
            attempts: Counter::default(),
            retry_queue_depth: Gauge::default(),
            dead_letters: Gauge::default(),
            // 5 ms .. ~80 s
            delivery_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
        }
    }
}

impl ForwardMetrics {
    /// Registers them in `registry`, whose prefix should be `signet`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "forward",
            "Deliveries by outcome of an attempt",
            self.outcomes.clone(),
        );
        registry.register(
            "forward_attempts",
            "Delivery attempts",
            self.attempts.clone(),
        );
        registry.register(
            "forward_retry_queue_depth",
            "Deliveries waiting for a retry",
            self.retry_queue_depth.clone(),
        );
        registry.register(
            "forward_dead_letters",
            "Deliveries dead-lettered",
            self.dead_letters.clone(),
        );
        registry.register(
            "forward_delivery_seconds",
            "Latency of delivery attempts that got an answer",
            self.delivery_seconds.clone(),
        );
    }

    pub fn outcome(&self, outcome: &'static str) {
        debug_assert!(OUTCOMES.contains(&outcome), "{outcome} is not in OUTCOMES");
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn set_depth(&self, depth: OutboxDepth) {
        self.retry_queue_depth
            .set(i64::try_from(depth.pending).unwrap_or(i64::MAX));
        self.dead_letters
            .set(i64::try_from(depth.dead).unwrap_or(i64::MAX));
    }
}
