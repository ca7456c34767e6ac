//! What forwarding keeps (SPEC §5): one delivery per (tenant, idempotency key) and each of its
//! attempts, the outbox of the deliveries due, and the dead letters. `crate::forward` decides;
//! a backend stores what it decided, each operation atomically.
//!
//! A delivery is due when its state is `delivering` or `pending` and `next_attempt_ms` has
//! passed. Whoever attempts it (the first attempt in the request, a retry in the outbox
//! worker) holds a lease: `next_attempt_ms` moved past the attempt's longest duration and a
//! fresh `lease_token`. Another instance claims it again only once that lease has run out (its
//! holder was killed), and an answer recorded under a lost lease is dropped: one attempt at a
//! time per delivery, over any number of instances.

use async_trait::async_trait;

use super::StoreError;

pub const DELIVERING: &str = "delivering";
pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const DEAD: &str = "dead";

/// A delivery to create, with the lease of its first attempt.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    pub trace_id: String,
    pub hop: u64,
    pub prev_receipt_hash: Option<String>,
    pub cid: String,
    pub url: String,
    pub host: String,
    pub body: String,
    pub now_ms: i64,
    /// The first attempt's lease ends then.
    pub lease_until_ms: i64,
    pub lease_token: String,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    pub trace_id: String,
    pub hop: u64,
    pub prev_receipt_hash: Option<String>,
    pub receipt_hash: Option<String>,
    pub cid: String,
    pub url: String,
    pub host: String,
    pub body: String,
    pub state: String,
    /// Attempts started (the current one included, while it runs).
    pub attempts: u64,
    pub attempts_base: u64,
    pub window_start_ms: i64,
    pub next_attempt_ms: i64,
    /// The receipt's `forwarded` (JSON) once the first attempt ended.
    pub first_outcome: Option<String>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A delivery claimed for its next attempt (numbered `delivery.attempts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub delivery: Delivery,
    pub lease_token: String,
}

/// One attempt as it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: u64,
    pub started_ms: i64,
    pub duration_ms: i64,
    pub status_code: Option<u16>,
    pub pinned_ip: Option<String>,
    pub response_size: Option<u64>,
    pub error: Option<String>,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryAt(i64),
    Dead,
}

/// The result of an attempt, recorded under the lease that ran it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub id: String,
    pub lease_token: String,
    pub attempt: Attempt,
    pub next: Next,
    /// The receipt's `forwarded` (JSON): kept only if none is stored (the first attempt's).
    pub first_outcome: Option<String>,
    pub now_ms: i64,
}

/// What a re-drive of dead letters takes: one delivery, or every dead letter of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    One { tenant: String, id: String },
    Tenant(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxDepth {
    /// Deliveries waiting for a retry (or in an attempt).
    pub pending: u64,
    pub dead: u64,
}

#[async_trait]
pub trait ForwardStore: Send + Sync {
    /// Creates the delivery with its first attempt's lease; `Err(existing)` when the (tenant,
    /// key) has one already, which is left as it is.
    async fn forward_begin(&self, new: NewDelivery) -> Result<Result<(), Delivery>, StoreError>;
    async fn forward_find(&self, tenant: &str, key: &str) -> Result<Option<Delivery>, StoreError>;
    /// Stores the attempt and the delivery's next state, unless the lease was lost (false).
    async fn forward_record(&self, recorded: Recorded) -> Result<bool, StoreError>;
    /// Claims up to `limit` due deliveries (oldest due first) for an attempt each: counts the
    /// attempt, gives it a lease to `lease_until_ms` and a token (`token_prefix` + id).
    async fn forward_claim(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        token_prefix: &str,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// The receipt of the delivery's exchange was committed: later attempts carry it.
    async fn forward_link_receipt(
        &self,
        tenant: &str,
        key: &str,
        hop: u64,
        receipt_hash: &str,
    ) -> Result<(), StoreError>;
    /// The tenant's deliveries of a trace, oldest first, each with its attempts in order (at
    /// most `limit` deliveries).
    async fn forward_deliveries(
        &self,
        tenant: &str,
        trace_id: &str,
        limit: usize,
    ) -> Result<Vec<(Delivery, Vec<Attempt>)>, StoreError>;
    /// Makes the chosen dead letters due now with a fresh budget; how many.
    async fn forward_redrive(&self, which: Redrive, now_ms: i64) -> Result<u64, StoreError>;
    async fn forward_depth(&self) -> Result<OutboxDepth, StoreError>;
    /// Deletes at most `rows` delivered or dead deliveries created before `cutoff_ms` (oldest
    /// first), with their attempts: their idempotency key has expired, so the key is new again.
    async fn forward_sweep(&self, cutoff_ms: i64, rows: usize) -> Result<usize, StoreError>;
}

/// The columns of [`Delivery`], in its order, for both backends' SELECTs.
pub(crate) const DELIVERY_COLUMNS: &str = "id, tenant, idempotency_key, fingerprint, trace_id, \
    hop, prev_receipt_hash, receipt_hash, cid, url, host, body, state, attempts, attempts_base, \
    window_start_ms, next_attempt_ms, first_outcome, last_error, created_ms, updated_ms";

pub(crate) const ATTEMPT_COLUMNS: &str =
    "attempt, started_ms, duration_ms, status_code, pinned_ip, response_size, error";
