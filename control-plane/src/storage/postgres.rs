//! PostgreSQL backend: a deadpool of `tokio-postgres` connections for single operations, a
//! dedicated connection for batched commits, row locks where requests meet.
//!
//! A commit locks, in this order, its idempotency row, its trace row and the tenant's
//! month-to-date row, so concurrent commits serialize exactly where they must and never
//! deadlock. Every commit of a tenant in a month updates that tenant's month-to-date row, so
//! commits of one tenant cannot overlap; with an fsync per transaction (~5 ms on this disk) a
//! commit per transaction would cap a tenant at ~200/s. Commits are therefore batched: one task
//! takes all queued commits, locks their rows with a few multi-row statements, decides them in
//! order with the same rules as SQLite (so several commits on one trace or key in one batch
//! behave as if serial), writes the accepted ones with one statement per table and commits once.
//! If the batch fails (e.g. another instance created the same trace meanwhile), every commit of
//! it is redone in its own transaction with row locks (`commit_one`), which decides exactly.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

use super::*;
use crate::billing::lines_for_exchange;
use signet_protocol::internal::{decide, Decision, Record, TraceState};

/// Any constant shared by every instance: serializes migrations of concurrent starts.
const MIGRATION_LOCK: i64 = 0x5349_474e_4554; // "SIGNET"

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE traces (
    trace_id   TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    head_hop   BIGINT NOT NULL,
    head_hash  TEXT,
    created_ms BIGINT NOT NULL
);
CREATE TABLE receipts (
    trace_id          TEXT NOT NULL,
    hop               BIGINT NOT NULL,
    receipt_hash      TEXT NOT NULL UNIQUE,
    prev_receipt_hash TEXT,
    tenant            TEXT NOT NULL,
    body              TEXT NOT NULL,
    stored_ms         BIGINT NOT NULL,
    PRIMARY KEY (trace_id, hop)
);
CREATE FUNCTION signet_receipts_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'receipts are append-only'; END $$;
CREATE TRIGGER receipts_append_only BEFORE UPDATE OR DELETE ON receipts
    FOR EACH ROW EXECUTE FUNCTION signet_receipts_append_only();
CREATE TABLE idempotency (
    tenant         TEXT NOT NULL,
    key            TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    response       TEXT,
    lease_until_ms BIGINT NOT NULL,
    updated_ms     BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE TABLE usage_ledger (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant       TEXT NOT NULL,
    month        TEXT NOT NULL,
    trace_id     TEXT NOT NULL,
    hop          BIGINT NOT NULL,
    receipt_hash TEXT NOT NULL UNIQUE,
    vex          BIGINT NOT NULL,
    fu           BIGINT NOT NULL,
    created_ms   BIGINT NOT NULL
);
CREATE INDEX usage_ledger_tenant_month ON usage_ledger (tenant, month);
CREATE TABLE usage_monthly (
    tenant TEXT NOT NULL,
    month  TEXT NOT NULL,
    vex    BIGINT NOT NULL,
    fu     BIGINT NOT NULL,
    PRIMARY KEY (tenant, month)
);
CREATE TABLE billing_queue (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          TEXT NOT NULL,
    month           TEXT NOT NULL,
    meter           TEXT NOT NULL CHECK (meter IN ('vex', 'fu')),
    band            INTEGER NOT NULL,
    units           BIGINT NOT NULL CHECK (units > 0),
    stripe_item     TEXT,
    price_per_unit  TEXT,
    amount          TEXT,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX billing_queue_pending ON billing_queue (id) WHERE state = 'pending';
CREATE INDEX billing_queue_tenant ON billing_queue (tenant, month);
CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    jwk           TEXT NOT NULL,
    first_seen_ms BIGINT NOT NULL
);
"#,
    r#"
-- A batch statement that must write exactly `expected` rows aborts its transaction otherwise
-- (then every request of the batch is redone alone).
CREATE FUNCTION signet_expect_rows(expected BIGINT, actual BIGINT, what TEXT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    IF expected <> actual THEN
        RAISE EXCEPTION 'batch wrote % % rows, expected %', actual, what, expected
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN actual;
END $$;
"#,
    r#"
-- Commit is the only write of an exchange: no more reservations. A key left pending by an
-- earlier version stored nothing, so it goes; a done key keeps its response.
DELETE FROM idempotency WHERE state <> 'done';
ALTER TABLE idempotency DROP COLUMN state, DROP COLUMN lease_until_ms,
    ALTER COLUMN response SET NOT NULL;
ALTER TABLE idempotency RENAME COLUMN updated_ms TO created_ms;
"#,
];

/// Records the key with this request's response, or locks and returns the row already there
/// (the no-op update only takes the lock); `inserted` tells a fresh row. A fresh row is the
/// final record: it goes with the transaction if the commit is refused. A concurrent commit of
/// the same key waits on it, then sees it.
const LOCK_IDEMPOTENCY: &str = "
INSERT INTO idempotency (tenant, key, fingerprint, response, created_ms)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant, key) DO UPDATE SET created_ms = idempotency.created_ms
RETURNING fingerprint, CASE WHEN xmax = 0 THEN NULL ELSE response END AS response,
          (xmax = 0) AS inserted";

/// Locks (creating at hop 0 if absent) the trace row; hop 0 means "no trace yet".
const LOCK_TRACE: &str = "
INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms) VALUES ($1, $2, 0, NULL, $3)
ON CONFLICT (trace_id) DO UPDATE SET head_hop = traces.head_hop
RETURNING tenant, head_hop, head_hash";

const APPEND: &str = "
WITH receipt AS (
    INSERT INTO receipts (trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
), head AS (
    UPDATE traces SET head_hop = $2, head_hash = $3 WHERE trace_id = $1
)
INSERT INTO usage_monthly (tenant, month, vex, fu) VALUES ($5, $8, 1, $9)
ON CONFLICT (tenant, month) DO UPDATE SET vex = usage_monthly.vex + 1, fu = usage_monthly.fu + EXCLUDED.fu
RETURNING vex, fu";

const RECORD: &str = "
WITH ledger AS (
    INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
    VALUES ($1, $2, $3, $4, $5, 1, $6, $7)
)
INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                           idempotency_key, created_ms)
SELECT $1, $2, meter, band, units, stripe_item, price, amount, event_key, $7
FROM unnest($8::text[], $9::int[], $10::bigint[], $11::text[], $12::text[], $13::text[], $14::text[])
     AS line (meter, band, units, stripe_item, price, amount, event_key)";

pub struct PostgresStorage {
    pool: Pool,
    /// Commits go through one batcher (see `run_batches`).
    jobs: mpsc::UnboundedSender<Job>,
}

/// A commit queued for the batcher, with where its answer goes.
struct Job {
    req: CommitRequest,
    reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
}

impl Job {
    fn answer(self, outcome: Result<CommitOutcome, StoreError>) {
        // The caller may have gone away; what was decided is stored anyway.
        let _ = self.reply.send(outcome);
    }
}

impl PostgresStorage {
    /// Connects, checks the database is reachable and migrates the schema (in the first schema
    /// of the connection's `search_path`; give one with `options=-csearch_path%3D...`).
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let pg_config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Database(format!("SP_POSTGRES_URL does not parse: {e}")))?;
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let (jobs, queue) = mpsc::unbounded_channel();
        let storage = Self {
            pool: pool.clone(),
            jobs,
        };
        storage.migrate().await?;
        let main = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("signet-pg-committer".into())
            .spawn(move || run_batches(pg_config, pool, main, queue))
            .map_err(|e| StoreError::Database(format!("cannot start the commit batcher: {e}")))?;
        Ok(storage)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Database(e.to_string()))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        migrate_to(&mut client, MIGRATIONS.len()).await
    }
}

/// Applies the migrations the database lacks, up to schema version `target`.
async fn migrate_to(client: &mut tokio_postgres::Client, target: usize) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .await
        .map_err(db)?;
    let version: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await
        .map_err(db)?
        .get(0);
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(version.unwrap_or(0) as usize)
    {
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    })
}

/// The idempotency row returned by `LOCK_IDEMPOTENCY` or `BATCH_LOCK_KEYS`, `None` when this
/// transaction inserted it.
fn record_of(row: &Row) -> Result<Option<Record>, StoreError> {
    if row.get::<_, bool>("inserted") {
        return Ok(None);
    }
    Ok(Some(Record {
        fingerprint: row.get("fingerprint"),
        response: row.get::<_, &str>("response").into(),
    }))
}

/// The trace row returned by `LOCK_TRACE` or `BATCH_LOCK_TRACES`; hop 0 is a row this
/// transaction just created.
fn trace_of(row: &Row) -> Option<TraceState> {
    let hop: i64 = row.get("head_hop");
    (hop > 0).then(|| TraceState {
        tenant: row.get("tenant"),
        head: Head {
            hop: to_u64(hop),
            receipt_hash: row.get("head_hash"),
        },
    })
}

/// How often `commit_one` tries when PostgreSQL aborts it for a deadlock or a serialization
/// failure (another instance's batch may take the same rows in another order).
const COMMIT_ONE_ATTEMPTS: usize = 3;

/// One commit in its own transaction, locking row by row: the exact path when a batch fails.
async fn commit_one(pool: &Pool, req: &CommitRequest) -> Result<CommitOutcome, StoreError> {
    let mut attempt = 1;
    loop {
        match commit_one_attempt(pool, req).await {
            Err(StoreError::Database(e))
                if attempt < COMMIT_ONE_ATTEMPTS
                    && (e.starts_with("40P01:") || e.starts_with("40001:")) =>
            {
                tracing::debug!("commit retried after {e}");
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn commit_one_attempt(pool: &Pool, req: &CommitRequest) -> Result<CommitOutcome, StoreError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?;
    let tx = client.transaction().await.map_err(db)?;
    let key_stmt = tx.prepare_cached(LOCK_IDEMPOTENCY).await.map_err(db)?;
    let trace_stmt = tx.prepare_cached(LOCK_TRACE).await.map_err(db)?;
    let response: &str = &req.response;
    let key_params: [&(dyn ToSql + Sync); 5] = [
        &req.tenant,
        &req.idempotency_key,
        &req.fingerprint,
        &response,
        &req.now_ms,
    ];
    let trace_params: [&(dyn ToSql + Sync); 3] = [&req.trace_id, &req.tenant, &req.now_ms];
    // Pipelined: both are sent before either answer is awaited.
    let (key_row, trace_row) = tokio::try_join!(
        tx.query_one(&key_stmt, &key_params),
        tx.query_one(&trace_stmt, &trace_params)
    )
    .map_err(db)?;

    let rejected = match decide(
        record_of(&key_row)?.as_ref(),
        trace_of(&trace_row).as_ref(),
        &req.candidate(),
    ) {
        Decision::Append => None,
        Decision::Replay(response) => Some(CommitOutcome::Replay { response }),
        Decision::Reject(r) => Some(CommitOutcome::Rejected(r)),
    };
    if let Some(outcome) = rejected {
        tx.rollback().await.map_err(db)?;
        return Ok(outcome);
    }

    let hop = to_i64(req.hop);
    let fu = to_i64(req.fu_tokens);
    let append = tx.prepare_cached(APPEND).await.map_err(db)?;
    let counters = tx
        .query_one(
            &append,
            &[
                &req.trace_id,
                &hop,
                &req.receipt_hash,
                &req.prev_receipt_hash,
                &req.tenant,
                &req.receipt,
                &req.now_ms,
                &req.month,
                &fu,
            ],
        )
        .await
        .map_err(db)?;
    let (vex_after, fu_after): (i64, i64) = (counters.get(0), counters.get(1));
    let lines: Vec<BillingColumns> = lines_for_exchange(
        &req.plan,
        to_u64(vex_after),
        to_u64(fu_after),
        req.fu_tokens,
    )
    .iter()
    .map(|l| BillingColumns::new(&req.receipt_hash, l))
    .collect();
    let meters: Vec<&str> = lines.iter().map(|l| l.meter).collect();
    let bands: Vec<i32> = lines.iter().map(|l| l.band).collect();
    let units: Vec<i64> = lines.iter().map(|l| l.units).collect();
    let items: Vec<Option<&str>> = lines.iter().map(|l| l.stripe_item.as_deref()).collect();
    let prices: Vec<Option<&str>> = lines.iter().map(|l| l.price_per_unit.as_deref()).collect();
    let amounts: Vec<Option<&str>> = lines.iter().map(|l| l.amount.as_deref()).collect();
    let keys: Vec<&str> = lines.iter().map(|l| l.idempotency_key.as_str()).collect();
    let record = tx.prepare_cached(RECORD).await.map_err(db)?;
    tx.execute(
        &record,
        &[
            &req.tenant,
            &req.month,
            &req.trace_id,
            &hop,
            &req.receipt_hash,
            &fu,
            &req.now_ms,
            &meters,
            &bands,
            &units,
            &items,
            &prices,
            &amounts,
            &keys,
        ],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(CommitOutcome::Committed)
}

#[async_trait]
impl Storage for PostgresStorage {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .simple_query("SELECT 1")
            .await
            .map_err(db)
            .map(drop)
    }

    async fn commit(&self, req: CommitRequest) -> Result<CommitOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { req, reply })
            .map_err(|_| StoreError::Database("the batcher stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Database("the batcher stopped".into()))?
    }

    async fn chain(&self, trace_id: &str) -> Result<Option<StoredChain>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the owner and the receipts.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let owner = tx
            .query_opt(
                "SELECT tenant FROM traces WHERE trace_id = $1 AND head_hop > 0",
                &[&trace_id],
            )
            .await
            .map_err(db)?;
        let Some(owner) = owner else { return Ok(None) };
        let rows = tx
            .query(
                "SELECT body FROM receipts WHERE trace_id = $1 ORDER BY hop",
                &[&trace_id],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let receipts = rows
            .iter()
            .map(|r| parse_json(r.get(0), "receipt"))
            .collect::<Result<Vec<Value>, _>>()?;
        Ok(Some(StoredChain {
            tenant: owner.get(0),
            receipts,
        }))
    }

    async fn remember_signing_key(&self, kid: &str, jwk: &str) -> Result<String, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "WITH inserted AS (
                     INSERT INTO signing_keys (kid, jwk, first_seen_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (kid) DO NOTHING RETURNING jwk
                 )
                 SELECT jwk FROM inserted UNION ALL SELECT jwk FROM signing_keys WHERE kid = $1",
                &[&kid, &jwk, &crate::now_ms()],
            )
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    async fn signing_keys(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT jwk FROM signing_keys ORDER BY first_seen_ms, kid",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn usage(&self, tenant: &str, month: &str) -> Result<Usage, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT vex, fu FROM usage_monthly WHERE tenant = $1 AND month = $2",
                &[&tenant, &month],
            )
            .await
            .map_err(db)?;
        Ok(row
            .map(|r| Usage {
                vex: to_u64(r.get(0)),
                fu: to_u64(r.get(1)),
            })
            .unwrap_or_default())
    }

    async fn billing_queue(&self, tenant: &str) -> Result<Vec<BillingRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                        idempotency_key, state
                 FROM billing_queue WHERE tenant = $1 ORDER BY id",
                &[&tenant],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| BillingRow {
                tenant: r.get(0),
                month: r.get(1),
                meter: r.get(2),
                band: r.get::<_, i32>(3) as u32,
                units: to_u64(r.get(4)),
                stripe_item: r.get(5),
                price_per_unit: r.get(6),
                amount: r.get(7),
                idempotency_key: r.get(8),
                state: r.get(9),
            })
            .collect())
    }
}

const MAX_BATCH: usize = 256;

/// The batcher: takes whatever commits are queued, up to `MAX_BATCH`, and runs them together.
///
/// It runs on a thread of its own with its own connection, so that its round trips are not
/// queued behind request handlers on the main runtime (which would stretch every batch and
/// the time the tenant's month row stays locked).
fn run_batches(
    pg_config: tokio_postgres::Config,
    pool: Pool,
    main: tokio::runtime::Handle,
    mut queue: mpsc::UnboundedReceiver<Job>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the commit batcher: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let mut connection: Option<(tokio_postgres::Client, BatchStatements)> = None;
        while let Some(first) = queue.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                connection = match connect_batcher(&pg_config).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("commit batcher cannot connect: {e}");
                        None
                    }
                };
            }
            let result = match connection.as_ref() {
                Some((client, statements)) => {
                    let requests: Vec<&CommitRequest> = jobs.iter().map(|j| &j.req).collect();
                    run_batch(client, statements, &requests).await
                }
                None => Err(StoreError::Database("no connection".into())),
            };
            match result {
                Ok(outcomes) => {
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        job.answer(Ok(outcome));
                    }
                }
                Err(e) => {
                    tracing::debug!("batch of {} failed ({e}); one by one", jobs.len());
                    let pool = pool.clone();
                    main.spawn(async move {
                        for job in jobs {
                            let outcome = commit_one(&pool, &job.req).await;
                            job.answer(outcome);
                        }
                    });
                }
            }
        }
    });
}

const BATCH_LOCK_KEYS: &str = "
SELECT i.tenant, i.key, i.fingerprint, i.response, false AS inserted
FROM unnest($1::text[], $2::text[]) AS k (tenant, key)
JOIN idempotency i ON i.tenant = k.tenant AND i.key = k.key
FOR UPDATE OF i";

const BATCH_LOCK_TRACES: &str = "
SELECT trace_id, tenant, head_hop, head_hash FROM traces
WHERE trace_id = ANY($1::text[]) AND head_hop > 0 FOR UPDATE";

const BATCH_ENSURE_MONTHS: &str = "
INSERT INTO usage_monthly (tenant, month, vex, fu)
SELECT tenant, month, 0, 0 FROM unnest($1::text[], $2::text[]) AS m (tenant, month)
ON CONFLICT (tenant, month) DO NOTHING";

const BATCH_LOCK_MONTHS: &str = "
SELECT u.tenant, u.month, u.vex, u.fu
FROM unnest($1::text[], $2::text[]) AS m (tenant, month)
JOIN usage_monthly u ON u.tenant = m.tenant AND u.month = m.month
FOR UPDATE OF u";

const BATCH_RECEIPTS: &str = "
INSERT INTO receipts (trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms)
SELECT r.*, $7 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[]) AS r";

const BATCH_HEADS: &str = "
INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms)
SELECT h.*, $5 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS h
ON CONFLICT (trace_id) DO UPDATE SET head_hop = EXCLUDED.head_hop, head_hash = EXCLUDED.head_hash";

const BATCH_MONTHS: &str = "
UPDATE usage_monthly SET vex = m.vex, fu = m.fu
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS m (tenant, month, vex, fu)
WHERE usage_monthly.tenant = m.tenant AND usage_monthly.month = m.month";

const BATCH_LEDGER: &str = "
INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
SELECT l.tenant, l.month, l.trace_id, l.hop, l.receipt_hash, 1, l.fu, $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
     AS l (tenant, month, trace_id, hop, receipt_hash, fu)";

const BATCH_BILLING: &str = "
INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                           idempotency_key, created_ms)
SELECT b.*, $10 FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[],
                            $7::text[], $8::text[], $9::text[]) AS b";

// The idempotency rows the batch decided on were locked if they existed. One that did not
// exist may have been created meanwhile by another instance: then fewer rows are written than
// expected, which aborts the batch (its requests are redone one by one and see that row).
const BATCH_KEYS: &str = "
WITH written AS (
    INSERT INTO idempotency (tenant, key, fingerprint, response, created_ms)
    SELECT k.*, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k
    ON CONFLICT (tenant, key) DO NOTHING
    RETURNING 1
)
SELECT signet_expect_rows(cardinality($2::text[]), count(*), 'idempotency') FROM written";

/// Columns of the rows a batch writes, one vector per column (bound as arrays for `unnest`).
#[derive(Default)]
struct BatchRows<'a> {
    r_trace: Vec<&'a str>,
    r_hop: Vec<i64>,
    r_hash: Vec<&'a str>,
    r_prev: Vec<Option<&'a str>>,
    r_tenant: Vec<&'a str>,
    r_body: Vec<&'a str>,
    l_month: Vec<&'a str>,
    l_fu: Vec<i64>,
    b_tenant: Vec<&'a str>,
    b_month: Vec<&'a str>,
    b_meter: Vec<&'static str>,
    b_band: Vec<i32>,
    b_units: Vec<i64>,
    b_item: Vec<Option<String>>,
    b_price: Vec<Option<String>>,
    b_amount: Vec<Option<String>>,
    b_key: Vec<String>,
    k_tenant: Vec<&'a str>,
    k_key: Vec<&'a str>,
    k_fingerprint: Vec<&'a str>,
    k_response: Vec<&'a str>,
}

/// The batch statements, prepared once per connection.
struct BatchStatements {
    lock_keys: Statement,
    lock_traces: Statement,
    ensure_months: Statement,
    lock_months: Statement,
    receipts: Statement,
    heads: Statement,
    months: Statement,
    ledger: Statement,
    billing: Statement,
    keys: Statement,
}

impl BatchStatements {
    async fn prepare(c: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let (lock_keys, lock_traces, ensure_months, lock_months, receipts) = tokio::try_join!(
            c.prepare(BATCH_LOCK_KEYS),
            c.prepare(BATCH_LOCK_TRACES),
            c.prepare(BATCH_ENSURE_MONTHS),
            c.prepare(BATCH_LOCK_MONTHS),
            c.prepare(BATCH_RECEIPTS),
        )?;
        let (heads, months, ledger, billing, keys) = tokio::try_join!(
            c.prepare(BATCH_HEADS),
            c.prepare(BATCH_MONTHS),
            c.prepare(BATCH_LEDGER),
            c.prepare(BATCH_BILLING),
            c.prepare(BATCH_KEYS),
        )?;
        Ok(BatchStatements {
            lock_keys,
            lock_traces,
            ensure_months,
            lock_months,
            receipts,
            heads,
            months,
            ledger,
            billing,
            keys,
        })
    }
}

async fn connect_batcher(
    pg_config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, BatchStatements), tokio_postgres::Error> {
    let (client, connection) = pg_config.connect(NoTls).await?;
    tokio::spawn(connection);
    // The batch statements join `unnest($n)` arrays with growing tables; a generic plan made
    // while the tables were small keeps scanning them whole. Plan each batch for its arrays.
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .await?;
    let statements = BatchStatements::prepare(&client).await?;
    Ok((client, statements))
}

/// Runs one batch in one transaction, in two round trips: BEGIN with the locking reads, then
/// the writes with COMMIT (a failed write turns that COMMIT into a rollback).
async fn run_batch(
    client: &tokio_postgres::Client,
    st: &BatchStatements,
    requests: &[&CommitRequest],
) -> Result<Vec<CommitOutcome>, StoreError> {
    let result = decide_and_write(client, st, requests).await;
    if result.is_err() {
        // Whatever state the transaction is in, end it before the next batch.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn decide_and_write(
    tx: &tokio_postgres::Client,
    st: &BatchStatements,
    requests: &[&CommitRequest],
) -> Result<Vec<CommitOutcome>, StoreError> {
    let now_ms = requests.iter().map(|r| r.now_ms).max().unwrap_or(0);

    // Lock what the batch touches: idempotency rows, trace heads, month-to-date rows.
    let key_tenants: Vec<&str> = requests.iter().map(|r| r.tenant.as_str()).collect();
    let key_names: Vec<&str> = requests
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    let trace_ids: Vec<&str> = requests.iter().map(|r| r.trace_id.as_str()).collect();
    let mut month_keys: Vec<(&str, &str)> = requests
        .iter()
        .map(|r| (r.tenant.as_str(), r.month.as_str()))
        .collect();
    month_keys.sort_unstable();
    month_keys.dedup();
    let month_tenants: Vec<&str> = month_keys.iter().map(|m| m.0).collect();
    let month_names: Vec<&str> = month_keys.iter().map(|m| m.1).collect();

    let (s_keys, s_traces, s_ensure, s_months) = (
        &st.lock_keys,
        &st.lock_traces,
        &st.ensure_months,
        &st.lock_months,
    );
    // Sent in this order on one connection, so the months exist before they are locked.
    let p_keys: [&(dyn ToSql + Sync); 2] = [&key_tenants, &key_names];
    let p_traces: [&(dyn ToSql + Sync); 1] = [&trace_ids];
    let p_months: [&(dyn ToSql + Sync); 2] = [&month_tenants, &month_names];
    let (_, key_rows, trace_rows, _, month_rows) = tokio::try_join!(
        tx.batch_execute("BEGIN"),
        tx.query(s_keys, &p_keys),
        tx.query(s_traces, &p_traces),
        tx.execute(s_ensure, &p_months),
        tx.query(s_months, &p_months),
    )
    .map_err(db)?;

    let mut records: HashMap<(String, String), Record> = HashMap::new();
    for row in &key_rows {
        if let Some(record) = record_of(row)? {
            records.insert((row.get("tenant"), row.get("key")), record);
        }
    }
    let mut traces: HashMap<String, TraceState> = HashMap::new();
    for row in &trace_rows {
        if let Some(trace) = trace_of(row) {
            traces.insert(row.get("trace_id"), trace);
        }
    }
    let mut months: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for row in &month_rows {
        months.insert(
            (row.get(0), row.get(1)),
            (to_u64(row.get(2)), to_u64(row.get(3))),
        );
    }

    // Decide in order, as if the requests ran one after the other.
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut rows = BatchRows::default();
    let mut touched_traces: Vec<&str> = Vec::new();
    for req in requests.iter().copied() {
        let key = (req.tenant.clone(), req.idempotency_key.clone());
        match decide(
            records.get(&key),
            traces.get(&req.trace_id),
            &req.candidate(),
        ) {
            Decision::Append => {}
            Decision::Replay(response) => {
                outcomes.push(CommitOutcome::Replay { response });
                continue;
            }
            Decision::Reject(r) => {
                outcomes.push(CommitOutcome::Rejected(r));
                continue;
            }
        }
        let counters = months
            .get_mut(&(req.tenant.clone(), req.month.clone()))
            .ok_or_else(|| StoreError::Database("month row was not locked".into()))?;
        counters.0 += 1;
        counters.1 += req.fu_tokens;
        for line in lines_for_exchange(&req.plan, counters.0, counters.1, req.fu_tokens) {
            let c = BillingColumns::new(&req.receipt_hash, &line);
            rows.b_tenant.push(&req.tenant);
            rows.b_month.push(&req.month);
            rows.b_meter.push(c.meter);
            rows.b_band.push(c.band);
            rows.b_units.push(c.units);
            rows.b_item.push(c.stripe_item);
            rows.b_price.push(c.price_per_unit);
            rows.b_amount.push(c.amount);
            rows.b_key.push(c.idempotency_key);
        }
        rows.r_trace.push(&req.trace_id);
        rows.r_hop.push(to_i64(req.hop));
        rows.r_hash.push(&req.receipt_hash);
        rows.r_prev.push(req.prev_receipt_hash.as_deref());
        rows.r_tenant.push(&req.tenant);
        rows.r_body.push(&req.receipt);
        rows.l_month.push(&req.month);
        rows.l_fu.push(to_i64(req.fu_tokens));
        rows.k_tenant.push(&req.tenant);
        rows.k_key.push(&req.idempotency_key);
        rows.k_fingerprint.push(&req.fingerprint);
        rows.k_response.push(&req.response);
        if !touched_traces.contains(&req.trace_id.as_str()) {
            touched_traces.push(&req.trace_id);
        }
        traces.insert(
            req.trace_id.clone(),
            TraceState {
                tenant: req.tenant.clone(),
                head: Head {
                    hop: req.hop,
                    receipt_hash: req.receipt_hash.clone(),
                },
            },
        );
        records.insert(
            key,
            Record {
                fingerprint: req.fingerprint.clone(),
                response: req.response.clone(),
            },
        );
        outcomes.push(CommitOutcome::Committed);
    }

    if rows.r_trace.is_empty() {
        tx.batch_execute("ROLLBACK").await.map_err(db)?;
        return Ok(outcomes);
    }
    // The final head of every trace and the final counters of every month touched.
    let heads: Vec<&TraceState> = touched_traces.iter().map(|t| &traces[*t]).collect();
    let head_hops: Vec<i64> = heads.iter().map(|t| to_i64(t.head.hop)).collect();
    let head_hashes: Vec<&str> = heads.iter().map(|t| t.head.receipt_hash.as_str()).collect();
    let head_tenants: Vec<&str> = heads.iter().map(|t| t.tenant.as_str()).collect();
    let month_vex: Vec<i64> = month_keys
        .iter()
        .map(|(t, m)| to_i64(months[&(t.to_string(), m.to_string())].0))
        .collect();
    let month_fu: Vec<i64> = month_keys
        .iter()
        .map(|(t, m)| to_i64(months[&(t.to_string(), m.to_string())].1))
        .collect();

    let (w_receipts, w_heads, w_months, w_ledger, w_billing, w_keys) = (
        &st.receipts,
        &st.heads,
        &st.months,
        &st.ledger,
        &st.billing,
        &st.keys,
    );
    let p_billing: [&(dyn ToSql + Sync); 10] = [
        &rows.b_tenant,
        &rows.b_month,
        &rows.b_meter,
        &rows.b_band,
        &rows.b_units,
        &rows.b_item,
        &rows.b_price,
        &rows.b_amount,
        &rows.b_key,
        &now_ms,
    ];
    let p_receipts: [&(dyn ToSql + Sync); 7] = [
        &rows.r_trace,
        &rows.r_hop,
        &rows.r_hash,
        &rows.r_prev,
        &rows.r_tenant,
        &rows.r_body,
        &now_ms,
    ];
    let p_heads: [&(dyn ToSql + Sync); 5] = [
        &touched_traces,
        &head_tenants,
        &head_hops,
        &head_hashes,
        &now_ms,
    ];
    let p_month_values: [&(dyn ToSql + Sync); 4] =
        [&month_tenants, &month_names, &month_vex, &month_fu];
    let p_ledger: [&(dyn ToSql + Sync); 7] = [
        &rows.r_tenant,
        &rows.l_month,
        &rows.r_trace,
        &rows.r_hop,
        &rows.r_hash,
        &rows.l_fu,
        &now_ms,
    ];
    let p_keys_done: [&(dyn ToSql + Sync); 5] = [
        &rows.k_tenant,
        &rows.k_key,
        &rows.k_fingerprint,
        &rows.k_response,
        &now_ms,
    ];
    // Pipelined: the writes and COMMIT are sent before the first answer is awaited.
    tokio::try_join!(
        tx.execute(w_receipts, &p_receipts),
        tx.execute(w_heads, &p_heads),
        tx.execute(w_months, &p_month_values),
        tx.execute(w_ledger, &p_ledger),
        execute_unless(tx, rows.b_key.is_empty(), w_billing, &p_billing),
        tx.execute(w_keys, &p_keys_done),
        tx.batch_execute("COMMIT"),
    )
    .map_err(db)?;
    Ok(outcomes)
}

/// Executes `statement` unless it has nothing to write.
async fn execute_unless(
    tx: &tokio_postgres::Client,
    nothing_to_write: bool,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    if nothing_to_write {
        Ok(0)
    } else {
        tx.execute(statement, params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

    #[tokio::test]
    async fn the_v3_migration_drops_pending_keys_and_keeps_done_ones() {
        let schema = format!("cp_unit_migration_{}", std::process::id());
        let (admin, conn) = tokio_postgres::connect(PG, NoTls).await.unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
        let url = format!("{PG}?options=-csearch_path%3D{schema}");
        let (mut client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate_to(&mut client, 2).await.unwrap();
        client
            .batch_execute(
                "INSERT INTO idempotency VALUES ('t', 'done', 'sha256:a', 'done', '{\"x\":1}', 0, 5);
                 INSERT INTO idempotency VALUES ('t', 'left', 'sha256:b', 'pending', NULL, 99, 6);",
            )
            .await
            .unwrap();
        migrate_to(&mut client, MIGRATIONS.len()).await.unwrap();
        // A second start migrates nothing.
        migrate_to(&mut client, MIGRATIONS.len()).await.unwrap();
        let rows: Vec<(String, String, String, i64)> = client
            .query(
                "SELECT key, fingerprint, response, created_ms FROM idempotency",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(
            rows,
            vec![("done".into(), "sha256:a".into(), "{\"x\":1}".into(), 5)]
        );
        let version: Option<i32> = client
            .query_one("SELECT max(version) FROM schema_version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, Some(MIGRATIONS.len() as i32));
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
