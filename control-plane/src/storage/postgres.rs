//! PostgreSQL backend: a deadpool of `tokio-postgres` connections for single operations, a
//! dedicated connection for batched commits, row locks where requests meet.
//!
//! - [`batcher`]: every commit goes through one batcher, which runs the commits queued
//!   meanwhile in one transaction.
//! - [`commit`]: that transaction (lock, decide, write), and the single commit that redoes a
//!   failed batch's commits one by one.
//!
//! Every commit of a tenant in a month updates that tenant's month-to-date row, so commits of
//! one tenant cannot overlap; with an fsync per transaction (~5 ms on this disk) a commit per
//! transaction would cap a tenant at ~200/s. Batched, they share the fsync, and several commits
//! on one trace or key in one batch behave as if serial.

use std::str::FromStr;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::migrations::POSTGRES as MIGRATIONS;
use super::worker::{check_all, Alive, Worker};
use super::*;
use batcher::{run_batches, Job};

mod batcher;
mod billing;
mod commit;
mod fallback;
/// [`ForwardStore`](super::ForwardStore) on this backend.
mod forward;

/// How long a request waits for a pooled connection (`wait`: every connection busy), for a new
/// one (`create`: connect and authenticate) and for a returned one to be checked (`recycle`):
/// past it the request fails with 503 `STORAGE_UNAVAILABLE` (and `/healthz` with 503) instead of
/// hanging on an exhausted pool or an unreachable database.
pub const POOL_TIMEOUTS: Timeouts = Timeouts {
    wait: Some(std::time::Duration::from_secs(2)),
    create: Some(std::time::Duration::from_secs(5)),
    recycle: Some(std::time::Duration::from_secs(2)),
};

/// Any constant shared by every instance: serializes migrations of concurrent starts.
const MIGRATION_LOCK: i64 = 0x5349_474e_4554; // "SIGNET"

pub struct PostgresStorage {
    pool: Pool,
    /// Commits go through one batcher (see `run_batches`).
    jobs: mpsc::UnboundedSender<Job>,
    /// The batcher and the retention sweep, checked by `ping`.
    workers: Vec<Worker>,
    /// Dropping it ends the sweep.
    _stop_sweep: oneshot::Sender<()>,
}

impl PostgresStorage {
    /// Connects, checks the database is reachable and migrates the schema (in the first schema
    /// of the connection's `search_path`; give one with `options=-csearch_path%3D...`).
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with(url, pool_size, Retention::DEFAULT).await
    }

    /// [`PostgresStorage::connect`], sweeping idempotency records older than `retention`.
    /// Several instances may sweep one database: a pass skips the rows another one holds.
    pub async fn connect_with(
        url: &str,
        pool_size: usize,
        retention: Retention,
    ) -> Result<Self, StoreError> {
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
            .runtime(Runtime::Tokio1)
            .timeouts(POOL_TIMEOUTS)
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let (jobs, queue) = mpsc::unbounded_channel();
        let (batcher, alive) = Worker::start("the PostgreSQL commit batcher");
        let (sweeper, sweeping) = Worker::start("the PostgreSQL idempotency sweep");
        let (stop_sweep, stopped) = oneshot::channel();
        let storage = Self {
            pool: pool.clone(),
            jobs,
            workers: vec![batcher, sweeper],
            _stop_sweep: stop_sweep,
        };
        storage.migrate().await?;
        tokio::spawn(sweep_loop(pool.clone(), retention, stopped, sweeping));
        let main = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("signet-pg-committer".into())
            .spawn(move || run_batches(pg_config, pool, main, queue, alive))
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

/// Deletes at most `$2` idempotency records created before `$1`, oldest first, skipping those a
/// commit (or another instance's sweep) holds.
const SWEEP_IDEMPOTENCY: &str = "
DELETE FROM idempotency WHERE ctid IN (
    SELECT ctid FROM idempotency WHERE created_ms < $1
    ORDER BY created_ms LIMIT $2 FOR UPDATE SKIP LOCKED
)";

/// Every `retention.sweep_every`, passes of [`SWEEP_IDEMPOTENCY`] until one deletes fewer than
/// `retention.sweep_rows`; ends when `stopped` fires or its sender is dropped.
async fn sweep_loop(
    pool: Pool,
    retention: Retention,
    mut stopped: oneshot::Receiver<()>,
    alive: Alive,
) {
    let _alive = alive;
    let rows = i64::try_from(retention.sweep_rows).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(retention.sweep_every) => {}
        }
        let cutoff = retention.cutoff_ms(crate::now_ms());
        loop {
            let pass = async {
                let client = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Database(e.to_string()))?;
                let keys = client
                    .execute(SWEEP_IDEMPOTENCY, &[&cutoff, &rows])
                    .await
                    .map_err(db)?;
                // the fallback's results replay for as long as the exchange's key does
                Ok::<_, StoreError>(keys.max(fallback::sweep(&client, cutoff, rows).await?))
            };
            match pass.await {
                Ok(deleted) if deleted < rows as u64 => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("idempotency sweep: {e}");
                    break;
                }
            }
        }
    }
}

/// A read-only, repeatable-read transaction: several reads that see one snapshot (a write
/// committing between two statements must not show in one and not the other).
async fn snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)
}

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    })
}

#[async_trait]
impl Storage for PostgresStorage {
    fn fallback(&self) -> &dyn FallbackStore {
        self
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// Checks every worker is running, then a round trip through the pool.
    async fn ping(&self) -> Result<(), StoreError> {
        check_all(&self.workers)?;
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

    async fn chain(
        &self,
        tenant: &str,
        trace_id: &str,
        page: ChainPage,
    ) -> Result<Option<StoredChain>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the owner and the receipts.
        let tx = snapshot(&mut client).await?;
        let owner = tx
            .query_opt(
                "SELECT tenant FROM traces WHERE tenant = $1 AND trace_id = $2 AND head_hop > 0",
                &[&tenant, &trace_id],
            )
            .await
            .map_err(db)?;
        let Some(owner) = owner else { return Ok(None) };
        let after = to_i64(page.after_hop);
        let rows_to_read = page.rows_to_read();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&tenant, &trace_id, &after, &rows_to_read];
        let mut builder = PageBuilder::new(page);
        {
            // Row by row: a full page stops the reading.
            let rows = tx
                .query_raw(
                    "SELECT body FROM receipts WHERE tenant = $1 AND trace_id = $2 AND hop > $3
                     ORDER BY hop LIMIT $4",
                    params,
                )
                .await
                .map_err(db)?;
            let mut rows = std::pin::pin!(rows);
            while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows)
                .await
                .map_err(db)?
            {
                if !builder.offer(row.get(0)) {
                    break;
                }
            }
        }
        tx.commit().await.map_err(db)?;
        builder.finish(owner.get(0)).map(Some)
    }

    async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<Record>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT fingerprint, response FROM idempotency WHERE tenant = $1 AND key = $2",
                &[&tenant, &key],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| Record {
            fingerprint: r.get(0),
            response: r.get::<_, &str>(1).into(),
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

/// Stops the batcher as a dead thread would: its queue closes.
#[cfg(test)]
impl PostgresStorage {
    pub(crate) async fn stop_batcher(&mut self) {
        self.jobs = mpsc::unbounded_channel().0;
        let batcher = &self.workers[0];
        for _ in 0..100 {
            if batcher.check().is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the batcher did not stop");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

    /// An empty schema `{prefix}_{pid}` (dropped first if a failed run left it), a connection
    /// to drop it with, and the URL of a connection that uses it.
    pub async fn fresh_schema(prefix: &str) -> (tokio_postgres::Client, String, String) {
        let schema = format!("{prefix}_{}", std::process::id());
        let (admin, conn) = tokio_postgres::connect(PG, NoTls).await.unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
        let url = format!("{PG}?options=-csearch_path%3D{schema}");
        (admin, schema, url)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweep_deletes_expired_idempotency_records_in_bounded_passes() {
        use crate::storage::batch::test_commits::commit as test_commit;

        let (admin, schema, url) = fresh_schema("cp_unit_sweep").await;
        let storage = PostgresStorage::connect(&url, 2).await.unwrap();
        let now = crate::now_ms();
        let hour_ms = 3_600_000;
        for (key, age_ms) in [
            ("e1", 10 * hour_ms),
            ("e2", 9 * hour_ms),
            ("e3", 8 * hour_ms),
            ("e4", 2 * hour_ms),
            ("e5", 2 * hour_ms),
            ("kept", hour_ms - 60_000),
        ] {
            let req = CommitRequest {
                now_ms: now - age_ms,
                ..test_commit("t", key, key, 1)
            };
            assert_eq!(storage.commit(req).await, Ok(CommitOutcome::Committed));
        }
        // A row a commit holds is skipped, not waited for.
        let mut holder = storage.client().await.unwrap();
        let held = holder.transaction().await.unwrap();
        held.execute("SELECT 1 FROM idempotency WHERE key = 'e1' FOR UPDATE", &[])
            .await
            .unwrap();
        // Another instance sweeps.
        let retention = Retention {
            idempotency: std::time::Duration::from_secs(3600),
            sweep_every: std::time::Duration::from_millis(50),
            sweep_rows: 2,
        };
        let sweeping = PostgresStorage::connect_with(&url, 2, retention)
            .await
            .unwrap();
        let keys = |storage: &PostgresStorage| {
            let pool = storage.pool.clone();
            async move {
                let rows = pool
                    .get()
                    .await
                    .unwrap()
                    .query("SELECT key FROM idempotency ORDER BY key", &[])
                    .await
                    .unwrap();
                rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
            }
        };
        let mut left = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            left = keys(&storage).await;
            if left == ["e1", "kept"] {
                break;
            }
        }
        assert_eq!(left, ["e1", "kept"]);
        held.rollback().await.unwrap();
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            left = keys(&storage).await;
            if left == ["kept"] {
                break;
            }
        }
        assert_eq!(left, ["kept"]);
        assert_eq!(storage.idempotency_record("t", "e1").await, Ok(None));
        assert_eq!(
            storage.idempotency_record("t", "kept").await,
            Ok(Some(Record {
                fingerprint: "fp-kept".into(),
                response: r#"{"key":"kept"}"#.into(),
            }))
        );
        assert_eq!(sweeping.ping().await, Ok(()));
        drop((storage, sweeping, holder));
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_v5_migration_keeps_traces_and_receipts_and_scopes_them_by_tenant() {
        let (admin, schema, url) = fresh_schema("cp_unit_v5").await;
        let (mut client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        migrate_to(&mut client, 4).await.unwrap();
        client
            .batch_execute(
                "INSERT INTO traces VALUES ('t1', 'demo', 1, 'sha256:h1', 7);
                 INSERT INTO receipts VALUES ('t1', 1, 'sha256:h1', NULL, 'demo', '{}', 7);",
            )
            .await
            .unwrap();
        migrate_to(&mut client, MIGRATIONS.len()).await.unwrap();
        client
            .batch_execute(
                "INSERT INTO traces VALUES ('t1', 'other', 1, 'sha256:o1', 8);
                 INSERT INTO receipts VALUES ('t1', 1, 'sha256:o1', NULL, 'other', '{}', 8);",
            )
            .await
            .unwrap();
        let rows: Vec<String> = client
            .query(
                "SELECT r.tenant || '/' || r.trace_id || '/' || r.hop || '/' || t.head_hash
                 FROM receipts r JOIN traces t USING (tenant, trace_id) ORDER BY r.tenant",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, ["demo/t1/1/sha256:h1", "other/t1/1/sha256:o1"]);
        let twice = client
            .batch_execute("INSERT INTO traces VALUES ('t1', 'demo', 2, 'sha256:x', 9)")
            .await;
        assert!(twice.is_err());
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_exhausted_pool_fails_the_ping_after_the_wait_timeout() {
        let (admin, schema, url) = fresh_schema("cp_unit_pool").await;
        let storage = PostgresStorage::connect(&url, 1).await.unwrap();
        let held = storage.client().await.unwrap();
        let started = std::time::Instant::now();
        let ping = tokio::time::timeout(std::time::Duration::from_secs(10), storage.ping())
            .await
            .expect("the ping does not hang");
        assert!(ping.is_err(), "{ping:?}");
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_secs(2)
                && waited < std::time::Duration::from_secs(4),
            "{waited:?}"
        );
        drop(held);
        assert_eq!(storage.ping().await, Ok(()));
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_v3_migration_drops_pending_keys_and_keeps_done_ones() {
        let (admin, schema, url) = fresh_schema("cp_unit_migration").await;
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
