//! Billing (SPEC §6): what usage bills, and its reporting to Stripe as Billing meter events.
//!
//! Every commit writes its billing lines into the billing queue, in the commit's transaction
//! ([`plan`] says which lines). The reporter then moves them to Stripe, exactly once:
//!
//! 1. claim: closed windows' queued rows are grouped into reports, one per tenant × meter
//!    (`event_name`) × band × window, each with its deterministic `identifier` and
//!    `Idempotency-Key`, in the same transaction that marks the rows claimed ([`report`]);
//! 2. send: a report is leased by one instance at a time and sent with the identifier, key and
//!    value fixed at the claim; retried with backoff and jitter, dead-lettered before Stripe's
//!    24-hour dedup window closes ([`stripe`], [`reporter`]).
//!
//! - [`plan`]: the tier math, what one usage event bills.
//! - [`settings`]: `SP_STRIPE_*` and `SP_BILLING_*`, and the consistency of the tenants'
//!   Stripe settings.
//! - [`report`]: aggregation, identifiers and the retry schedule (pure).
//! - [`stripe`]: the HTTP client of `POST /v1/billing/meter_events` and what an answer means.
//! - [`reporter`]: the background worker.
//! - [`usage`]: what a month bills, for the admin and tenant APIs and `/metrics`.

mod plan;
pub mod report;
pub mod reporter;
pub mod settings;
pub mod stripe;
pub mod usage;

pub use plan::*;

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;

use crate::storage::worker::Worker;
use settings::BillingSettings;

/// The billing state of a control plane: its settings, the reporter's liveness and what this
/// instance's reporter did.
pub struct Billing {
    pub settings: BillingSettings,
    /// Set once the reporter runs (never without `SP_STRIPE_API_KEY`).
    reporter: Mutex<Option<Worker>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    pub counters: ReporterCounters,
}

/// What this instance's reporter did since it started (each instance counts its own).
#[derive(Default, Clone)]
pub struct ReporterCounters {
    /// Reports Stripe accepted.
    pub reported: Counter,
    /// Attempts that failed and were scheduled again.
    pub retried: Counter,
    /// Reports given up on (an operator must reconcile them).
    pub dead_lettered: Counter,
}

impl Billing {
    pub fn new(settings: BillingSettings) -> Self {
        Billing {
            settings,
            reporter: Mutex::new(None),
            task: Mutex::new(None),
            counters: ReporterCounters::default(),
        }
    }

    /// `Err` with the reason once the reporter has ended (it never ends while the service
    /// runs); `Ok` when it runs or is not configured.
    pub fn check(&self) -> Result<(), String> {
        match &*self.reporter.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(worker) => worker.check().map_err(|e| match e {
                crate::storage::StoreError::Database(reason)
                | crate::storage::StoreError::Corrupt(reason) => reason,
            }),
            None => Ok(()),
        }
    }

    /// Whether the reporter was started (`SP_STRIPE_API_KEY` is set).
    pub fn reporting(&self) -> bool {
        self.reporter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Ends the reporter where it is, as a crash would (a report being sent stays leased
    /// until its lease expires). `/healthz` turns red.
    pub fn stop_reporter(&self) {
        if let Some(task) = &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            task.abort();
        }
    }

    fn set_reporter(&self, worker: Worker) {
        *self.reporter.lock().unwrap_or_else(|e| e.into_inner()) = Some(worker);
    }

    fn set_task(&self, task: tokio::task::AbortHandle) {
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }
}
