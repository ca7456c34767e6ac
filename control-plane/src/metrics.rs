//! Prometheus metrics served at `/metrics` (OpenMetrics text).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use signet_protocol::internal::Code;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    pub backend: &'static str,
    pub op: &'static str,
}

pub struct Metrics {
    registry: Registry,
    backend: &'static str,
    /// Receipts stored.
    pub commits: Counter,
    /// Commits refused because the receipt did not extend the head (also in `errors`).
    pub chain_conflicts: Counter,
    /// Commits answered with the stored response of an earlier commit.
    pub idempotent_hits: Counter,
    /// Verified exchanges counted (one per stored receipt).
    pub vex: Counter,
    /// Fallback units counted.
    pub fu: Counter,
    /// Error responses by SPEC §4 code.
    pub errors: Family<CodeLabels, Counter>,
    pub storage_seconds: Family<StorageLabels, Histogram>,
    /// Commits per `/v1/internal/commits` call (how much the filters' group commit gathers).
    pub commit_batch_size: Histogram,
    /// `signet_forward_*`.
    pub forward: crate::forward::ForwardMetrics,
    /// The LLM fallback's (`signet_fallback_*`, `signet_fu_*`).
    pub fallback: crate::fallback::FallbackMetrics,
    /// Forwarding's and the fallback's families, named without the `signet_cp_` prefix.
    features_registry: Registry,
}

fn storage_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

impl Metrics {
    pub fn new(backend: &'static str) -> Self {
        let mut registry = Registry::with_prefix("signet_cp");
        let m = Metrics {
            backend,
            commits: Counter::default(),
            chain_conflicts: Counter::default(),
            idempotent_hits: Counter::default(),
            vex: Counter::default(),
            fu: Counter::default(),
            errors: Family::default(),
            storage_seconds: Family::new_with_constructor(storage_histogram),
            // 1 .. 64 (the filter's largest batch)
            commit_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            registry: Registry::default(),
            forward: crate::forward::ForwardMetrics::default(),
            fallback: crate::fallback::FallbackMetrics::new(),
            features_registry: Registry::default(),
        };
        let mut features_registry = Registry::with_prefix("signet");
        m.forward.register(&mut features_registry);
        m.fallback.register(&mut features_registry);
        registry.register("commits", "Receipts stored", m.commits.clone());
        registry.register(
            "chain_conflicts",
            "Commits refused: not on the chain head",
            m.chain_conflicts.clone(),
        );
        registry.register(
            "idempotent_hits",
            "Commits answered with the stored response of an earlier commit",
            m.idempotent_hits.clone(),
        );
        registry.register("vex", "Verified exchanges counted", m.vex.clone());
        registry.register("fu", "Fallback units (LLM tokens) counted", m.fu.clone());
        registry.register("errors", "Error responses by code", m.errors.clone());
        registry.register(
            "storage_seconds",
            "Latency of storage operations",
            m.storage_seconds.clone(),
        );
        registry.register(
            "commit_batch_size",
            "Commits per batch call from a filter",
            m.commit_batch_size.clone(),
        );
        Metrics {
            registry,
            features_registry,
            ..m
        }
    }

    /// Counts an error answered, whole response or single commit of a batch.
    pub fn error(&self, code: Code) {
        self.errors
            .get_or_create(&CodeLabels {
                code: code.as_str(),
            })
            .inc();
        if code == Code::ChainConflict {
            self.chain_conflicts.inc();
        }
    }

    /// Starts timing a storage operation; the latency is recorded by [`StorageTimer::done`].
    pub fn time(&self, op: &'static str) -> StorageTimer<'_> {
        StorageTimer {
            metrics: self,
            op,
            start: Instant::now(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.features_registry);
        let _ = encode_eof(&mut out);
        out
    }
}

pub struct StorageTimer<'a> {
    metrics: &'a Metrics,
    op: &'static str,
    start: Instant,
}

impl StorageTimer<'_> {
    pub fn done(self) {
        self.metrics
            .storage_seconds
            .get_or_create(&StorageLabels {
                backend: self.metrics.backend,
                op: self.op,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
