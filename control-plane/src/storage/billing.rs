//! The billing reporter's storage: claims of queued rows into reports, leases of reports to
//! send, their outcomes, and what a month holds (both backends, `sqlite/billing.rs` and
//! `postgres/billing.rs`, behave alike).
//!
//! A row of `billing_queue` goes `pending` → `claimed` (with its `report_id`) exactly once, in
//! the transaction that writes its report. A report of `billing_reports` goes `sending` →
//! `reported` or `dead` (or is `unmetered` from the start: no meter to send it to, or `dead`
//! from the start: too old for Stripe). Several instances may share a database: claims and
//! leases skip what another instance holds, and a lease expires, so that a report whose
//! instance died is sent again, by anyone, with the same identifier, key and value.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;

/// What a claim takes.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Rows created before this (Unix ms): closed windows only.
    pub closed_before_ms: i64,
    pub window: Duration,
    /// At most this many rows.
    pub rows: usize,
    pub now_ms: i64,
    /// `stripe_customer` of each tenant that has one; rows of a metered tenant without one
    /// stay queued.
    pub customers: Arc<HashMap<String, String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claimed {
    pub rows: usize,
    pub reports: usize,
    /// Reports born dead (too old for Stripe).
    pub dead: usize,
}

/// A report this instance holds until `lease_until_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedReport {
    pub id: i64,
    pub tenant: String,
    pub meter: String,
    pub band: u32,
    pub event_name: String,
    pub stripe_customer: String,
    pub value: u64,
    pub identifier: String,
    pub idempotency_key: String,
    pub window_start_ms: i64,
    /// Attempts before this one.
    pub attempts: u32,
    pub first_sent_ms: i64,
    pub lease_until_ms: i64,
    /// Why the previous attempt failed.
    pub last_error: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Reported,
    Retry { next_attempt_ms: i64, error: String },
    Dead { error: String },
}

/// Units of one meter and band of a month, by report state (and `pending`: still queued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandUnits {
    pub meter: String,
    pub band: u32,
    pub event_name: Option<String>,
    /// `pending` (queued), `sending`, `reported`, `dead` or `unmetered`.
    pub state: String,
    pub units: u64,
    /// Queue rows (pending) or meter events (reports).
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadReport {
    pub identifier: String,
    pub meter: String,
    pub band: u32,
    pub event_name: Option<String>,
    pub value: u64,
    pub window_start_ms: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// A tenant's month as billing holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthBilling {
    pub bands: Vec<BandUnits>,
    /// The latest dead reports (at most [`DEAD_LISTED`]).
    pub dead: Vec<DeadReport>,
}

pub const DEAD_LISTED: i64 = 100;

/// The whole queue's state for `/metrics` (a month's reports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingStats {
    /// (meter, rows, units) still queued.
    pub pending: Vec<(String, u64, u64)>,
    /// When the oldest queued row was written.
    pub oldest_pending_ms: Option<i64>,
    /// (meter, state, reports, units) of the month's reports.
    pub reports: Vec<(String, String, u64, u64)>,
    /// When the oldest report still sending was claimed.
    pub oldest_sending_ms: Option<i64>,
    /// (tenant, vex, fu) month-to-date counters of the month.
    pub usage: Vec<(String, u64, u64)>,
}

#[async_trait]
pub trait BillingStore: Send + Sync {
    /// Claims queued rows of closed windows into reports ([`crate::billing::report::aggregate`]),
    /// rows and reports in one transaction. Nothing when another instance is claiming.
    async fn claim_billing(&self, claim: Claim) -> Result<Claimed, StoreError>;
    /// Leases up to `limit` reports due at `now_ms` for `lease` (none another instance holds).
    async fn lease_reports(
        &self,
        now_ms: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<LeasedReport>, StoreError>;
    /// Records how an attempt of `report` ended; false when the lease was no longer this
    /// instance's (another instance took the report over, and its outcome counts).
    async fn finish_attempt(
        &self,
        report: &LeasedReport,
        attempt: Attempt,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// What `tenant`'s `month` holds, per band and state, and its latest dead reports.
    async fn month_billing(&self, tenant: &str, month: &str) -> Result<MonthBilling, StoreError>;
    async fn billing_stats(&self, month: &str) -> Result<BillingStats, StoreError>;
}

/// The `state` and `last_error` columns of a finished attempt.
pub(crate) fn attempt_columns(attempt: &Attempt) -> (&'static str, Option<&str>, Option<i64>) {
    match attempt {
        Attempt::Reported => ("reported", None, None),
        Attempt::Retry {
            next_attempt_ms,
            error,
        } => ("sending", Some(error), Some(*next_attempt_ms)),
        Attempt::Dead { error } => ("dead", Some(error), None),
    }
}
