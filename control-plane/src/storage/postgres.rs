//! PostgreSQL backend: a deadpool of `tokio-postgres` connections, one transaction per
//! operation, row locks where requests meet.
//!
//! A commit locks, in this order, its idempotency row, its trace row and the tenant's
//! month-to-date row, so concurrent commits serialize exactly where they must and never
//! deadlock. The two locking upserts are pipelined in one round trip; the whole commit is five
//! round trips (BEGIN, locks, append + counters, ledger + billing + idempotency, COMMIT).

use std::str::FromStr;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::*;
use crate::billing::lines_for_exchange;
use crate::chain::{check_append, check_begin, TraceState};
use crate::idempotency::{begin_step, commit_step, BeginStep, CommitStep, Record, RecordState};

/// Any constant shared by every instance: serializes migrations of concurrent starts.
const MIGRATION_LOCK: i64 = 0x5349_474e_4554; // "SIGNET"

const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// Locks (creating if absent) the idempotency row. A conflicting row is returned unchanged
/// (the no-op update only takes the lock); `inserted` tells a fresh row.
const LOCK_IDEMPOTENCY: &str = "
INSERT INTO idempotency (tenant, key, fingerprint, state, response, lease_until_ms, updated_ms)
VALUES ($1, $2, $3, 'pending', NULL, $4, $5)
ON CONFLICT (tenant, key) DO UPDATE SET updated_ms = idempotency.updated_ms
RETURNING fingerprint, state, response, lease_until_ms, (xmax = 0) AS inserted";

/// Locks (creating at hop 0 if absent) the trace row; hop 0 means "no trace yet".
const LOCK_TRACE: &str = "
INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms) VALUES ($1, $2, 0, NULL, $3)
ON CONFLICT (trace_id) DO UPDATE SET head_hop = traces.head_hop
RETURNING tenant, head_hop, head_hash";

const READ_TRACE: &str = "SELECT tenant, head_hop, head_hash FROM traces WHERE trace_id = $1";

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
), done AS (
    UPDATE idempotency SET state = 'done', response = $8, updated_ms = $7
    WHERE tenant = $1 AND key = $9
)
INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                           idempotency_key, created_ms)
SELECT $1, $2, meter, band, units, stripe_item, price, amount, event_key, $7
FROM unnest($10::text[], $11::int[], $12::bigint[], $13::text[], $14::text[], $15::text[], $16::text[])
     AS line (meter, band, units, stripe_item, price, amount, event_key)";

pub struct PostgresStorage {
    pool: Pool,
}

impl PostgresStorage {
    /// Connects, checks the database is reachable and migrates the schema (in the first schema
    /// of the connection's `search_path`; give one with `options=-csearch_path%3D...`).
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let pg_config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Database(format!("SP_POSTGRES_URL does not parse: {e}")))?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let storage = Self { pool };
        storage.migrate().await?;
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
}

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    })
}

/// The idempotency row returned by `LOCK_IDEMPOTENCY`, `None` when this call inserted it.
fn record_of(row: &Row) -> Result<Option<Record>, StoreError> {
    if row.get::<_, bool>("inserted") {
        return Ok(None);
    }
    let state = if row.get::<_, &str>("state") == "done" {
        let text: &str = row.get("response");
        RecordState::Done {
            response: parse_json(text, "idempotent response")?,
        }
    } else {
        RecordState::Pending {
            lease_until_ms: row.get("lease_until_ms"),
        }
    };
    Ok(Some(Record {
        fingerprint: row.get("fingerprint"),
        state,
    }))
}

/// The trace row returned by `LOCK_TRACE` or a plain read; hop 0 is a row this transaction
/// just created.
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

    async fn begin(&self, req: BeginRequest) -> Result<BeginOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let lease_until = req.now_ms.saturating_add(req.lease_ms);
        let lock_stmt = tx.prepare_cached(LOCK_IDEMPOTENCY).await.map_err(db)?;
        let trace_stmt = tx.prepare_cached(READ_TRACE).await.map_err(db)?;
        let lock_params: [&(dyn ToSql + Sync); 5] = [
            &req.tenant,
            &req.idempotency_key,
            &req.fingerprint,
            &lease_until,
            &req.now_ms,
        ];
        let lock = tx.query_one(&lock_stmt, &lock_params);
        let read_trace = async {
            match &req.trace_id {
                None => Ok(None),
                Some(t) => tx.query_opt(&trace_stmt, &[t]).await,
            }
        };
        let (row, trace_row) = tokio::try_join!(lock, read_trace).map_err(db)?;
        let step = begin_step(record_of(&row)?.as_ref(), &req.fingerprint, req.now_ms);
        let outcome = match step {
            BeginStep::Replay(response) => BeginOutcome::Replay { response },
            BeginStep::Reject(r) => BeginOutcome::Rejected(r),
            BeginStep::Reserve | BeginStep::Renew => {
                let trace = trace_row.as_ref().and_then(trace_of);
                match check_begin(trace.as_ref(), &req.tenant, req.chain_max) {
                    Err(r) => BeginOutcome::Rejected(r),
                    Ok(head) => {
                        if step == BeginStep::Renew {
                            tx.execute(
                                "UPDATE idempotency SET lease_until_ms = $3, updated_ms = $4
                                 WHERE tenant = $1 AND key = $2",
                                &[&req.tenant, &req.idempotency_key, &lease_until, &req.now_ms],
                            )
                            .await
                            .map_err(db)?;
                        }
                        tx.commit().await.map_err(db)?;
                        return Ok(BeginOutcome::Proceed { head });
                    }
                }
            }
        };
        tx.rollback().await.map_err(db)?;
        Ok(outcome)
    }

    async fn commit(&self, req: CommitRequest) -> Result<CommitOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let key_stmt = tx.prepare_cached(LOCK_IDEMPOTENCY).await.map_err(db)?;
        let trace_stmt = tx.prepare_cached(LOCK_TRACE).await.map_err(db)?;
        let key_params: [&(dyn ToSql + Sync); 5] = [
            &req.tenant,
            &req.idempotency_key,
            &req.fingerprint,
            &0i64,
            &req.now_ms,
        ];
        let trace_params: [&(dyn ToSql + Sync); 3] = [&req.trace_id, &req.tenant, &req.now_ms];
        // Pipelined: both are sent before either answer is awaited.
        let (key_row, trace_row) = tokio::try_join!(
            tx.query_one(&key_stmt, &key_params),
            tx.query_one(&trace_stmt, &trace_params)
        )
        .map_err(db)?;

        let rejected = match commit_step(record_of(&key_row)?.as_ref(), &req.fingerprint) {
            CommitStep::Replay(response) => Some(CommitOutcome::Replay { response }),
            CommitStep::Reject(r) => Some(CommitOutcome::Rejected(r)),
            CommitStep::Proceed => check_append(
                trace_of(&trace_row).as_ref(),
                &req.tenant,
                req.hop,
                req.prev_receipt_hash.as_deref(),
                req.chain_max,
            )
            .err()
            .map(CommitOutcome::Rejected),
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
                &req.response.to_string(),
                &req.idempotency_key,
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
        Ok(CommitOutcome::Committed {
            response: req.response,
        })
    }

    async fn release(
        &self,
        tenant: &str,
        idempotency_key: &str,
        fingerprint: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM idempotency WHERE tenant = $1 AND key = $2 AND fingerprint = $3
                 AND state = 'pending'",
                &[&tenant, &idempotency_key, &fingerprint],
            )
            .await
            .map_err(db)?;
        Ok(n > 0)
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
