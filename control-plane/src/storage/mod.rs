//! Where receipts live: one trait, two backends that behave identically (SQLite and
//! PostgreSQL).
//!
//! - [`batch`]: the commit decision of a whole batch, pure (each commit decided by
//!   `signet_protocol::internal::decide`, then counted and billed by [`crate::billing`]).
//! - [`rows`]: the rows it writes, one struct per table.
//! - [`migrations`]: each backend's schema, the `.sql` files of `control-plane/migrations/`.
//! - `sqlite`, `postgres`: a backend locks the rows a commit depends on, calls
//!   [`batch::decide_batch`] and writes its rows, atomically.
//! - [`forward`]: forwarded deliveries, their attempts and outbox ([`ForwardStore`]).
//! - [`fallback`]: the LLM fallback's FU reservations and settlements ([`FallbackStore`]).
//! - [`billing`]: the billing reporter's claims, leases and reads (its own trait).
//! - [`worker`]: the liveness of a backend's threads and tasks, which `ping` reports.
//!
//! A new table (or column, or constraint) is a new migration file in each of
//! `migrations/sqlite/` and `migrations/postgres/`, listed in [`migrations`];
//! `tests/schema_parity.rs` fails until both backends have it alike.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::billing::BillingPlan;
use signet_protocol::internal::{Candidate, Head, Record, Rejection};

mod batch;
pub mod billing;
pub mod fallback;
pub mod forward;
mod migrations;
mod postgres;
mod rows;
mod sqlite;
pub(crate) mod worker;

pub use fallback::FallbackStore;
pub use forward::ForwardStore;
pub use postgres::PostgresStorage;
pub use sqlite::{SqliteStorage, CHECKPOINT_EVERY as SQLITE_CHECKPOINT_EVERY};

/// `commit`: store one verified receipt with everything that depends on it, in one
/// transaction.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    pub trace_id: String,
    pub hop: u64,
    pub receipt_hash: String,
    pub prev_receipt_hash: Option<String>,
    /// The receipt as JSON text.
    pub receipt: String,
    /// The exchange's 200 body as JSON text (an object), stored for replays.
    pub response: Arc<str>,
    pub fu_tokens: u64,
    /// UTC calendar month of the usage, `YYYY-MM`.
    pub month: String,
    pub now_ms: i64,
    /// Unix ms after which the filter no longer waits for the answer: checked again under the
    /// commit's locks, right before writing ([`CommitOutcome::Expired`]).
    pub deadline_ms: Option<u64>,
    pub chain_max: u64,
    pub plan: Arc<BillingPlan>,
}

impl CommitRequest {
    /// The trace it appends to: (tenant, trace id).
    pub(crate) fn trace_key(&self) -> (String, String) {
        (self.tenant.clone(), self.trace_id.clone())
    }

    /// What [`signet_protocol::internal::decide`] needs of it.
    pub fn candidate(&self) -> Candidate<'_> {
        Candidate {
            tenant: &self.tenant,
            fingerprint: &self.fingerprint,
            hop: self.hop,
            prev_receipt_hash: self.prev_receipt_hash.as_deref(),
            chain_max: self.chain_max,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    Committed,
    /// The stored response (JSON text) of the key's earlier commit.
    Replay {
        response: Arc<str>,
    },
    Rejected(Rejection),
    /// Past its deadline when it was about to be written: nothing was stored
    /// (`COMMIT_EXPIRED`).
    Expired,
    /// Would take the month-to-date counters past what they hold (2^63 − 1): nothing was
    /// stored.
    CounterOverflow,
}

/// Which receipts of a chain to read: those after `after_hop`, in hop order, at most `limit`,
/// and no more than `max_bytes` of receipt text (the first receipt always comes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainPage {
    pub after_hop: u64,
    pub limit: usize,
    pub max_bytes: usize,
}

impl ChainPage {
    /// The whole chain, however large.
    pub const ALL: ChainPage = ChainPage {
        after_hop: 0,
        limit: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// `LIMIT` of the query: one more row than the page holds tells whether more follow.
    pub(crate) fn rows_to_read(&self) -> i64 {
        i64::try_from(self.limit.saturating_add(1)).unwrap_or(i64::MAX)
    }
}

/// A page of a trace's chain, its receipts in hop order.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChain {
    pub tenant: String,
    pub receipts: Vec<Value>,
    /// Receipts follow the last one here (the page was full).
    pub more: bool,
}

/// Builds a [`StoredChain`] from receipt texts read in hop order, stopping as soon as the
/// page is full: a backend reads its rows one at a time and stops when [`Self::offer`] says.
pub(crate) struct PageBuilder {
    page: ChainPage,
    bodies: Vec<String>,
    bytes: usize,
    more: bool,
}

impl PageBuilder {
    pub fn new(page: ChainPage) -> Self {
        PageBuilder {
            page,
            bodies: Vec::new(),
            bytes: 0,
            more: false,
        }
    }

    /// Takes the next receipt; false when the page is full (this one is not in it).
    pub fn offer(&mut self, body: String) -> bool {
        let bytes = self.bytes.saturating_add(body.len());
        let fits = self.bodies.len() < self.page.limit
            && (self.bodies.is_empty() || bytes <= self.page.max_bytes);
        if !fits {
            self.more = true;
            return false;
        }
        self.bytes = bytes;
        self.bodies.push(body);
        true
    }

    /// Parses what was taken (only now: a page is parsed only once it is known to be read).
    pub fn finish(self, tenant: String) -> Result<StoredChain, StoreError> {
        let receipts = self
            .bodies
            .iter()
            .map(|b| parse_json(b, "receipt"))
            .collect::<Result<Vec<Value>, _>>()?;
        Ok(StoredChain {
            tenant,
            receipts,
            more: self.more,
        })
    }
}

/// Month-to-date counters of a tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vex: u64,
    pub fu: u64,
}

/// A row of the billing queue (what the Stripe reporter sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingRow {
    pub tenant: String,
    pub month: String,
    pub meter: String,
    pub band: u32,
    pub units: u64,
    pub stripe_item: Option<String>,
    pub price_per_unit: Option<String>,
    pub amount: Option<String>,
    /// `{event}/{meter}/{band}`: names the line (the report sent to Stripe has its own key).
    pub idempotency_key: String,
    pub state: String,
}

/// How long idempotency records are kept (SPEC §4: a replay within it answers the stored
/// response; after it the key is new again), and how the background sweep deletes the expired
/// ones: every `sweep_every`, passes of at most `sweep_rows` rows each (one short transaction
/// per pass) until a pass finds fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub idempotency: Duration,
    pub sweep_every: Duration,
    pub sweep_rows: usize,
}

impl Retention {
    /// 7 days (`SP_IDEMPOTENCY_RETENTION_SECS`), swept every minute, 1000 rows a pass.
    pub const DEFAULT: Retention = Retention {
        idempotency: Duration::from_secs(7 * 24 * 3600),
        sweep_every: Duration::from_secs(60),
        sweep_rows: 1000,
    };

    /// Records created before this (Unix ms) have expired at `now_ms`.
    pub(crate) fn cutoff_ms(&self, now_ms: i64) -> i64 {
        let kept = i64::try_from(self.idempotency.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(kept)
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention::DEFAULT
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The database failed or is unreachable.
    Database(String),
    /// A stored row does not parse (never expected).
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Database(e) => write!(f, "database error: {e}"),
            StoreError::Corrupt(e) => write!(f, "corrupt row: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

#[async_trait]
pub trait Storage: ForwardStore + billing::BillingStore + Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// A round trip to the database; `Err` too when a worker of the backend (writer, batcher,
    /// sweep) has ended, naming it.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The only write of an exchange: idempotency, append, usage and billing, atomically.
    async fn commit(&self, req: CommitRequest) -> Result<CommitOutcome, StoreError>;
    /// A page of the chain of `tenant`'s trace `trace_id` (another tenant's trace of that id
    /// is another chain): `None` when the trace does not exist, known from its trace row before
    /// any receipt is read.
    async fn chain(
        &self,
        tenant: &str,
        trace_id: &str,
        page: ChainPage,
    ) -> Result<Option<StoredChain>, StoreError>;
    /// The record of a committed (tenant, idempotency key), unless never committed or expired.
    async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<Record>, StoreError>;
    /// Records a signing key's public JWK (JSON) under its kid unless the kid is known, and
    /// returns the JWK stored for that kid.
    async fn remember_signing_key(&self, kid: &str, jwk: &str) -> Result<String, StoreError>;
    /// Every public JWK (JSON) ever recorded, oldest first.
    async fn signing_keys(&self) -> Result<Vec<String>, StoreError>;
    async fn usage(&self, tenant: &str, month: &str) -> Result<Usage, StoreError>;
    async fn billing_queue(&self, tenant: &str) -> Result<Vec<BillingRow>, StoreError>;
    /// The LLM fallback's reservations and settlements.
    fn fallback(&self) -> &dyn FallbackStore;
}

/// Hops and counters are stored as signed 64-bit integers. A hop is at most the chain cap and a
/// counter is checked before it is stored (`CommitOutcome::CounterOverflow`), so this saturation
/// never happens to a written value.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn parse_json(text: &str, what: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_stops_at_its_limit_or_its_bytes_but_always_holds_one_receipt() {
        let page = |limit, max_bytes| ChainPage {
            after_hop: 0,
            limit,
            max_bytes,
        };
        let fill = |page: ChainPage, bodies: &[&str]| {
            let mut b = PageBuilder::new(page);
            let offered = bodies
                .iter()
                .take_while(|body| b.offer(body.to_string()))
                .count();
            let chain = b.finish("t".into()).unwrap();
            (offered, chain.receipts.len(), chain.more)
        };
        let three = ["[1]", "[2]", "[3]"];
        assert_eq!(fill(page(2, 100), &three), (2, 2, true));
        assert_eq!(fill(page(3, 100), &three), (3, 3, false));
        assert_eq!(fill(page(10, 6), &three), (2, 2, true));
        assert_eq!(
            fill(page(10, 1), &three),
            (1, 1, true),
            "one, however large"
        );
        assert_eq!(fill(ChainPage::ALL, &three), (3, 3, false));
        assert_eq!(page(5, 0).rows_to_read(), 6);
        assert_eq!(ChainPage::ALL.rows_to_read(), i64::MAX);
    }
}
