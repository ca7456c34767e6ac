//! A commit transaction in three steps: lock (the rows the commits depend on, read into a
//! [`Locked`] snapshot), decide ([`decide_batch`], pure), write (the [`Rows`], pipelined with
//! COMMIT). Two round trips: BEGIN with the locking reads, then the writes with COMMIT.
//!
//! Two ways to lock: a batch locks the rows that exist with a few multi-row statements (a row
//! created meanwhile by another instance makes its writes fail, and the batch is redone commit
//! by commit); a single commit ([`commit_one`]) creates its idempotency, trace and month rows if
//! absent, so that a concurrent commit of the same rows waits for it and then sees them: it
//! decides exactly. Both lock in the order idempotency, trace, month, so they never deadlock.

use std::future::Future;

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::db;
use crate::storage::batch::{decide_batch_or_fail, Locked};
use crate::storage::rows::{KeyRows, Rows};
use crate::storage::{to_u64, CommitOutcome, CommitRequest, StoreError, Usage};
use signet_protocol::internal::{Head, Record, TraceState};

const LOCK_KEYS: &str = "
SELECT i.tenant, i.key, i.fingerprint, i.response, false AS inserted
FROM unnest($1::text[], $2::text[]) AS k (tenant, key)
JOIN idempotency i ON i.tenant = k.tenant AND i.key = k.key
FOR UPDATE OF i";

const LOCK_TRACES: &str = "
SELECT t.trace_id, t.tenant, t.head_hop, t.head_hash
FROM unnest($1::text[], $2::text[]) AS k (tenant, trace_id)
JOIN traces t ON t.tenant = k.tenant AND t.trace_id = k.trace_id
WHERE t.head_hop > 0 FOR UPDATE OF t";

const ENSURE_MONTHS: &str = "
INSERT INTO usage_monthly (tenant, month, vex, fu)
SELECT tenant, month, 0, 0 FROM unnest($1::text[], $2::text[]) AS m (tenant, month)
ON CONFLICT (tenant, month) DO NOTHING";

const LOCK_MONTHS: &str = "
SELECT u.tenant, u.month, u.vex, u.fu
FROM unnest($1::text[], $2::text[]) AS m (tenant, month)
JOIN usage_monthly u ON u.tenant = m.tenant AND u.month = m.month
FOR UPDATE OF u";

/// Records the key with this request's response, or locks and returns the row already there
/// (the no-op update only takes the lock); `inserted` tells a fresh row. A fresh row is the
/// final record: it goes with the transaction if the commit is refused. A concurrent commit of
/// the same key waits on it, then sees it.
const LOCK_KEY: &str = "
INSERT INTO idempotency (tenant, key, fingerprint, response, created_ms)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant, key) DO UPDATE SET created_ms = idempotency.created_ms
RETURNING fingerprint, CASE WHEN xmax = 0 THEN NULL ELSE response END AS response,
          (xmax = 0) AS inserted";

/// Locks (creating at hop 0 if absent) the trace row; hop 0 means "no trace yet".
const LOCK_TRACE: &str = "
INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms) VALUES ($1, $2, 0, NULL, $3)
ON CONFLICT (tenant, trace_id) DO UPDATE SET head_hop = traces.head_hop
RETURNING tenant, head_hop, head_hash";

/// Locks (creating at zero if absent) the month-to-date row.
const LOCK_MONTH: &str = "
INSERT INTO usage_monthly (tenant, month, vex, fu) VALUES ($1, $2, 0, 0)
ON CONFLICT (tenant, month) DO UPDATE SET vex = usage_monthly.vex
RETURNING vex, fu";

const INSERT_RECEIPTS: &str = "
INSERT INTO receipts (trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms)
SELECT r.*, $7 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[]) AS r";

const SET_HEADS: &str = "
INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms)
SELECT h.*, $5 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS h
ON CONFLICT (tenant, trace_id) DO UPDATE SET head_hop = EXCLUDED.head_hop, head_hash = EXCLUDED.head_hash";

const SET_MONTHS: &str = "
UPDATE usage_monthly SET vex = m.vex, fu = m.fu
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS m (tenant, month, vex, fu)
WHERE usage_monthly.tenant = m.tenant AND usage_monthly.month = m.month";

const INSERT_LEDGER: &str = "
INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
SELECT l.tenant, l.month, l.trace_id, l.hop, l.receipt_hash, 1, l.fu, $7
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
     AS l (tenant, month, trace_id, hop, receipt_hash, fu)";

const INSERT_BILLING: &str = "
INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                           idempotency_key, created_ms)
SELECT b.*, $10 FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::text[],
                            $7::text[], $8::text[], $9::text[]) AS b";

// The idempotency rows the batch decided on were locked if they existed. One that did not
// exist may have been created meanwhile by another instance: then fewer rows are written than
// expected, which aborts the batch (its requests are redone one by one and see that row).
const INSERT_KEYS: &str = "
WITH written AS (
    INSERT INTO idempotency (tenant, key, fingerprint, response, created_ms)
    SELECT k.*, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k
    ON CONFLICT (tenant, key) DO NOTHING
    RETURNING 1
)
SELECT signet_expect_rows(cardinality($2::text[]), count(*), 'idempotency') FROM written";

/// The statements that write [`Rows`], one per table.
pub(super) struct WriteStatements {
    receipts: Statement,
    heads: Statement,
    months: Statement,
    ledger: Statement,
    billing: Statement,
    keys: Statement,
}

impl WriteStatements {
    /// Prepares them with `prepare` (a connection's own, or the pool's cache), pipelined.
    async fn prepare<F, P>(prepare: P) -> Result<Self, tokio_postgres::Error>
    where
        P: Fn(&'static str) -> F,
        F: Future<Output = Result<Statement, tokio_postgres::Error>>,
    {
        let (receipts, heads, months, ledger, billing, keys) = tokio::try_join!(
            prepare(INSERT_RECEIPTS),
            prepare(SET_HEADS),
            prepare(SET_MONTHS),
            prepare(INSERT_LEDGER),
            prepare(INSERT_BILLING),
            prepare(INSERT_KEYS),
        )?;
        Ok(WriteStatements {
            receipts,
            heads,
            months,
            ledger,
            billing,
            keys,
        })
    }
}

/// The batcher's statements, prepared once on its connection.
pub(super) struct BatchStatements {
    lock_keys: Statement,
    lock_traces: Statement,
    ensure_months: Statement,
    lock_months: Statement,
    write: WriteStatements,
}

impl BatchStatements {
    pub async fn prepare(c: &Client) -> Result<Self, tokio_postgres::Error> {
        let (lock_keys, lock_traces, ensure_months, lock_months) = tokio::try_join!(
            c.prepare(LOCK_KEYS),
            c.prepare(LOCK_TRACES),
            c.prepare(ENSURE_MONTHS),
            c.prepare(LOCK_MONTHS),
        )?;
        Ok(BatchStatements {
            lock_keys,
            lock_traces,
            ensure_months,
            lock_months,
            write: WriteStatements::prepare(|sql| c.prepare(sql)).await?,
        })
    }
}

/// The idempotency row returned by `LOCK_KEY` or `LOCK_KEYS`, `None` when this transaction
/// inserted it.
fn record_of(row: &Row) -> Result<Option<Record>, StoreError> {
    if row.get::<_, bool>("inserted") {
        return Ok(None);
    }
    Ok(Some(Record {
        fingerprint: row.get("fingerprint"),
        response: row.get::<_, &str>("response").into(),
    }))
}

/// The trace row returned by `LOCK_TRACE` or `LOCK_TRACES`; hop 0 is a row this transaction
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

fn usage_of(row: &Row) -> Usage {
    Usage {
        vex: to_u64(row.get("vex")),
        fu: to_u64(row.get("fu")),
    }
}

/// Runs `requests` in one transaction on the batcher's connection.
pub(super) async fn run_batch(
    client: &Client,
    st: &BatchStatements,
    requests: &[&CommitRequest],
) -> Result<Vec<CommitOutcome>, StoreError> {
    let result = async {
        let locked = lock_batch(client, st, requests).await?;
        let decided = decide_batch_or_fail(locked, requests)?;
        write_and_commit(client, &st.write, &decided.rows, decided.now_ms).await?;
        Ok(decided.outcomes)
    }
    .await;
    if result.is_err() {
        // Whatever state the transaction is in, end it before the next batch.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// BEGIN and lock what the batch touches: the idempotency rows and trace heads that exist,
/// and the month-to-date rows (created at zero if absent), in one round trip.
async fn lock_batch(
    tx: &Client,
    st: &BatchStatements,
    requests: &[&CommitRequest],
) -> Result<Locked, StoreError> {
    let key_tenants: Vec<&str> = requests.iter().map(|r| r.tenant.as_str()).collect();
    let key_names: Vec<&str> = requests
        .iter()
        .map(|r| r.idempotency_key.as_str())
        .collect();
    let trace_ids: Vec<&str> = requests.iter().map(|r| r.trace_id.as_str()).collect();
    // Sorted: concurrent batches lock the month rows in the same order.
    let mut months: Vec<(&str, &str)> = requests
        .iter()
        .map(|r| (r.tenant.as_str(), r.month.as_str()))
        .collect();
    months.sort_unstable();
    months.dedup();
    let month_tenants: Vec<&str> = months.iter().map(|m| m.0).collect();
    let month_names: Vec<&str> = months.iter().map(|m| m.1).collect();

    let p_keys: [&(dyn ToSql + Sync); 2] = [&key_tenants, &key_names];
    let p_traces: [&(dyn ToSql + Sync); 2] = [&key_tenants, &trace_ids];
    let p_months: [&(dyn ToSql + Sync); 2] = [&month_tenants, &month_names];
    // Sent in this order on one connection, so the months exist before they are locked.
    let (_, key_rows, trace_rows, _, month_rows) = tokio::try_join!(
        tx.batch_execute("BEGIN"),
        tx.query(&st.lock_keys, &p_keys),
        tx.query(&st.lock_traces, &p_traces),
        tx.execute(&st.ensure_months, &p_months),
        tx.query(&st.lock_months, &p_months),
    )
    .map_err(db)?;

    let mut locked = Locked::default();
    for row in &key_rows {
        if let Some(record) = record_of(row)? {
            locked
                .records
                .insert((row.get("tenant"), row.get("key")), record);
        }
    }
    for row in &trace_rows {
        if let Some(trace) = trace_of(row) {
            let key = (row.get("tenant"), row.get("trace_id"));
            locked.traces.insert(key, trace);
        }
    }
    for row in &month_rows {
        locked
            .months
            .insert((row.get("tenant"), row.get("month")), usage_of(row));
    }
    locked.locked_at_ms = crate::now_ms();
    // A month absent from the snapshot would count from zero and its update write nothing.
    if locked.months.len() != months.len() {
        return Err(StoreError::Database("a month row was not locked".into()));
    }
    Ok(locked)
}

/// Writes `rows` and commits, pipelined: every statement and COMMIT are sent before the first
/// answer is awaited (a failed write turns that COMMIT into a rollback). Nothing to write: a
/// rollback.
async fn write_and_commit(
    tx: &Client,
    st: &WriteStatements,
    rows: &Rows<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return tx.batch_execute("ROLLBACK").await.map_err(db);
    }
    let (r, h, m, l, b, k) = (
        &rows.receipts,
        &rows.heads,
        &rows.months,
        &rows.ledger,
        &rows.billing,
        &rows.keys,
    );
    let p_receipts: [&(dyn ToSql + Sync); 7] = [
        &r.trace_id,
        &r.hop,
        &r.receipt_hash,
        &r.prev_receipt_hash,
        &r.tenant,
        &r.body,
        &now_ms,
    ];
    let p_heads: [&(dyn ToSql + Sync); 5] =
        [&h.trace_id, &h.tenant, &h.head_hop, &h.head_hash, &now_ms];
    let p_months: [&(dyn ToSql + Sync); 4] = [&m.tenant, &m.month, &m.vex, &m.fu];
    let p_ledger: [&(dyn ToSql + Sync); 7] = [
        &l.tenant,
        &l.month,
        &l.trace_id,
        &l.hop,
        &l.receipt_hash,
        &l.fu,
        &now_ms,
    ];
    let p_billing: [&(dyn ToSql + Sync); 10] = [
        &b.tenant,
        &b.month,
        &b.meter,
        &b.band,
        &b.units,
        &b.stripe_item,
        &b.price_per_unit,
        &b.amount,
        &b.idempotency_key,
        &now_ms,
    ];
    let p_keys: [&(dyn ToSql + Sync); 5] =
        [&k.tenant, &k.key, &k.fingerprint, &k.response, &now_ms];
    tokio::try_join!(
        tx.execute(&st.receipts, &p_receipts),
        tx.execute(&st.heads, &p_heads),
        tx.execute(&st.months, &p_months),
        tx.execute(&st.ledger, &p_ledger),
        execute_unless(tx, b.is_empty(), &st.billing, &p_billing),
        execute_unless(tx, k.tenant.is_empty(), &st.keys, &p_keys),
        tx.batch_execute("COMMIT"),
    )
    .map_err(db)?;
    Ok(())
}

/// Executes `statement` unless it has nothing to write.
async fn execute_unless(
    tx: &Client,
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

/// How often `commit_one` tries when PostgreSQL aborts it for a deadlock or a serialization
/// failure (another instance's batch may take the same rows in another order).
const COMMIT_ONE_ATTEMPTS: usize = 3;

/// One commit in its own transaction, creating the rows it locks: the exact path when a batch
/// fails.
pub(super) async fn commit_one(
    pool: &Pool,
    req: &CommitRequest,
) -> Result<CommitOutcome, StoreError> {
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
    let client = pool
        .get()
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?;
    let cached = |sql: &'static str| client.prepare_cached(sql);
    let (lock_key, lock_trace, lock_month, write) = tokio::try_join!(
        cached(LOCK_KEY),
        cached(LOCK_TRACE),
        cached(LOCK_MONTH),
        WriteStatements::prepare(cached),
    )
    .map_err(db)?;
    let result = async {
        let response: &str = &req.response;
        let p_key: [&(dyn ToSql + Sync); 5] = [
            &req.tenant,
            &req.idempotency_key,
            &req.fingerprint,
            &response,
            &req.now_ms,
        ];
        let p_trace: [&(dyn ToSql + Sync); 3] = [&req.trace_id, &req.tenant, &req.now_ms];
        let p_month: [&(dyn ToSql + Sync); 2] = [&req.tenant, &req.month];
        let (_, key_row, trace_row, month_row) = tokio::try_join!(
            client.batch_execute("BEGIN"),
            client.query_one(&lock_key, &p_key),
            client.query_one(&lock_trace, &p_trace),
            client.query_one(&lock_month, &p_month),
        )
        .map_err(db)?;
        let mut locked = Locked::of_one(
            req,
            record_of(&key_row)?,
            trace_of(&trace_row),
            Some(usage_of(&month_row)),
        );
        locked.locked_at_ms = crate::now_ms();
        let mut decided = decide_batch_or_fail(locked, &[req])?;
        // LOCK_KEY already inserted the key's record.
        decided.rows.keys = KeyRows::default();
        write_and_commit(&client, &write, &decided.rows, decided.now_ms).await?;
        decided
            .outcomes
            .pop()
            .ok_or_else(|| StoreError::Database("no outcome".into()))
    }
    .await;
    if result.is_err() {
        // The connection goes back to the pool: never inside a transaction.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_postgres::NoTls;

    use super::*;
    use crate::billing::{BillingPlan, MeterPlan};
    use crate::storage::batch::test_commits::{self, hash};
    use crate::storage::postgres::tests::fresh_schema;
    use crate::storage::postgres::PostgresStorage;
    use signet_protocol::internal::Rejection;

    fn commit(
        tenant: &str,
        key: &str,
        trace: &str,
        hop: u64,
        plan: &Arc<BillingPlan>,
    ) -> CommitRequest {
        CommitRequest {
            fu_tokens: 1,
            plan: plan.clone(),
            ..test_commits::commit(tenant, key, trace, hop)
        }
    }

    /// The batch and the single commit, on one database: each sees what the other wrote, and
    /// both write the same rows.
    #[tokio::test]
    async fn the_batch_and_the_single_commit_decide_and_write_alike() {
        let (admin, schema, url) = fresh_schema("cp_unit_commit").await;
        let storage = PostgresStorage::connect(&url, 2).await.unwrap();
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        let statements = BatchStatements::prepare(&client).await.unwrap();
        // Two VEx reserved, then every VEx billed to the tenant's item; FU within reservation.
        let plan = Arc::new(BillingPlan {
            vex: MeterPlan {
                reserved: 2,
                tiers: vec![],
                default_stripe_item: Some("si_vex".into()),
            },
            fu: MeterPlan {
                reserved: 100,
                ..MeterPlan::default()
            },
        });
        let c = |key: &str, trace: &str, hop: u64| commit("demo", key, trace, hop, &plan);

        let (a1, a2, b1) = (c("a1", "A", 1), c("a2", "A", 2), c("b1", "B", 1));
        let batch = [&a1, &a2, &a2, &b1];
        let outcomes = run_batch(&client, &statements, &batch).await.unwrap();
        let replay = |key: &str| CommitOutcome::Replay {
            response: format!(r#"{{"key":"{key}"}}"#).into(),
        };
        use CommitOutcome::Committed;
        assert_eq!(outcomes, [Committed, Committed, replay("a2"), Committed]);

        let a3 = c("a3", "A", 3);
        assert_eq!(commit_one(&storage.pool, &a3).await, Ok(Committed));
        assert_eq!(commit_one(&storage.pool, &a3).await, Ok(replay("a3")));
        assert_eq!(commit_one(&storage.pool, &a1).await, Ok(replay("a1")));
        let head_3 = Head {
            hop: 3,
            receipt_hash: hash("A", 3),
        };
        assert_eq!(
            commit_one(&storage.pool, &c("x", "A", 3)).await,
            Ok(CommitOutcome::Rejected(Rejection::ChainConflict {
                head: Some(head_3.clone())
            }))
        );
        // Another tenant's trace A is another chain: hop 4 does not extend it.
        let theirs = commit("other", "y", "A", 4, &plan);
        assert_eq!(
            commit_one(&storage.pool, &theirs).await,
            Ok(CommitOutcome::Rejected(Rejection::ChainConflict {
                head: None
            }))
        );
        // The batch sees the single commit's key and head.
        let (a4, x) = (c("a4", "A", 4), c("x", "A", 3));
        let outcomes = run_batch(&client, &statements, &[&a3, &x, &a4])
            .await
            .unwrap();
        let conflict = CommitOutcome::Rejected(Rejection::ChainConflict { head: Some(head_3) });
        assert_eq!(outcomes, [replay("a3"), conflict, Committed]);

        let strings = |sql: &'static str| {
            let client = &client;
            async move {
                let rows = client.query(sql, &[]).await.unwrap();
                rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
            }
        };
        assert_eq!(
            strings("SELECT trace_id || '/' || hop || '/' || coalesce(prev_receipt_hash, '-') FROM receipts ORDER BY trace_id, hop").await,
            ["A/1/-", "A/2/sha256:A-1", "A/3/sha256:A-2", "A/4/sha256:A-3", "B/1/-"]
        );
        assert_eq!(
            strings("SELECT trace_id || '/' || head_hop || '/' || head_hash FROM traces ORDER BY trace_id").await,
            ["A/4/sha256:A-4", "B/1/sha256:B-1"]
        );
        assert_eq!(
            strings("SELECT tenant || '/' || vex || '/' || fu FROM usage_monthly WHERE vex > 0")
                .await,
            ["demo/5/5"]
        );
        assert_eq!(
            strings("SELECT receipt_hash FROM usage_ledger ORDER BY id").await,
            [
                hash("A", 1),
                hash("A", 2),
                hash("B", 1),
                hash("A", 3),
                hash("A", 4)
            ]
        );
        assert_eq!(
            strings("SELECT key || '/' || fingerprint FROM idempotency ORDER BY key").await,
            ["a1/fp-a1", "a2/fp-a2", "a3/fp-a3", "a4/fp-a4", "b1/fp-b1"]
        );
        // VEx 3, 4 and 5: B1 from the batch, A3 alone, A4 from the batch.
        assert_eq!(
            strings("SELECT idempotency_key || ' ' || units || ' ' || stripe_item FROM billing_queue ORDER BY id").await,
            [
                format!("{}/vex/0 1 si_vex", hash("B", 1)),
                format!("{}/vex/0 1 si_vex", hash("A", 3)),
                format!("{}/vex/0 1 si_vex", hash("A", 4)),
            ]
        );
        drop((storage, client));
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
