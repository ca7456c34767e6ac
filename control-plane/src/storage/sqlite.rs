//! SQLite backend: one connection owned by a writer thread (WAL, synchronous=FULL).
//!
//! Every operation is queued to that thread. The thread takes whatever is queued (up to
//! `MAX_BATCH`), runs the operations in one `BEGIN IMMEDIATE` transaction and replies only
//! after `COMMIT`: one WAL append and one fsync for many commits. Operations are serial, so the
//! read-decide-write of a commit needs no further locking.
//!
//! Durability: `synchronous=FULL` fsyncs the WAL at every `COMMIT`, before the writer answers.
//! With `NORMAL` a power cut could roll back transactions the filter had already answered with
//! a signed receipt, and the next exchange would sign a second receipt at the same hop: a fork
//! the client holds in hand. Group commit (the batches above) keeps the fsyncs few.
//!
//! An operation decides before it writes: a refused commit writes nothing, so the batch needs no
//! savepoint per operation (a savepoint makes SQLite copy every page the batch already dirtied
//! into a statement journal before changing it again, which cost more than the commits'
//! own writes). Should an operation fail with a database error, or write and then not keep its
//! changes, the whole batch is rolled back and every operation of it runs again alone, in a
//! transaction of its own: the failure stays with the operation that caused it.

use std::path::Path;
use std::sync::{mpsc, Arc};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::batch::{Batch, Locked};
use super::rows::Rows;
use super::worker::{check_all, panic_message, Worker};
use super::*;
use signet_protocol::internal::{Record, TraceState};

mod billing;

const MAX_BATCH: usize = 512;
/// The default of `SP_SQLITE_CHECKPOINT_MS` (see [`checkpoint_loop`]).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
const WAL_RESTART_FRAMES: i64 = 16_384;

use super::migrations::SQLITE as MIGRATIONS;

mod fallback;
/// [`ForwardStore`](super::ForwardStore) on this backend.
mod forward;

pub struct SqliteStorage {
    jobs: mpsc::Sender<Box<dyn Job>>,
    /// Reads that need no lock (chains, idempotency lookups, usage) go here, off the writer:
    /// WAL lets them run beside it, each on a snapshot.
    reader: Arc<std::sync::Mutex<Connection>>,
    /// The checkpoint thread and its stop: dropping the sender ends it, and it then empties
    /// the WAL (see `Drop`).
    checkpoints: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    /// Dropping it ends the sweep thread.
    _stop_sweep: mpsc::Sender<()>,
    /// The writer and checkpoint threads, checked by `ping`.
    workers: Vec<Worker>,
}

/// A clean stop leaves an empty WAL: the next start has nothing to recover, and the file does
/// not keep the size it reached at the busiest moment. The process exits right after the
/// storage is dropped, so the drop waits for the checkpoint thread's last checkpoint.
impl Drop for SqliteStorage {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.checkpoints.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl SqliteStorage {
    /// [`SqliteStorage::open_with`] the default [`Retention`] and checkpoint interval.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Retention::DEFAULT, CHECKPOINT_EVERY)
    }

    /// Opens (creating the file and its directory if needed) and migrates the database, then
    /// starts the writer thread, the checkpoint thread (a checkpoint every `checkpoint_every`)
    /// and the sweep of idempotency records older than `retention`. The threads end when the
    /// storage is dropped.
    pub fn open_with(
        path: &Path,
        retention: Retention,
        checkpoint_every: std::time::Duration,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        tune_cache(&conn).map_err(db)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(db)?;
        // Checkpoints (the database file's fsyncs) run on their own thread.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn).map_err(db)?;

        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        reader.set_prepared_statement_cache_capacity(16);

        let checkpoints = Connection::open(path).map_err(db)?;
        checkpoints
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let (checkpointer, alive) = Worker::start("the SQLite checkpoint thread");
        let checkpoint_thread = std::thread::Builder::new()
            .name("signet-sqlite-checkpoint".into())
            .spawn(move || {
                let _alive = alive;
                checkpoint_loop(checkpoints, checkpoint_every, stopped)
            })
            .map_err(|e| {
                StoreError::Database(format!("cannot start the checkpoint thread: {e}"))
            })?;

        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let (writer, alive) = Worker::start("the SQLite writer thread");
        std::thread::Builder::new()
            .name("signet-sqlite-writer".into())
            .spawn(move || {
                let _alive = alive;
                writer_loop(conn, queue)
            })
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        let (stop_sweep, stopped) = mpsc::channel::<()>();
        let (sweeper, alive) = Worker::start("the SQLite idempotency sweep");
        let sweep_jobs = jobs.clone();
        std::thread::Builder::new()
            .name("signet-sqlite-sweep".into())
            .spawn(move || {
                let _alive = alive;
                sweep_loop(sweep_jobs, retention, stopped)
            })
            .map_err(|e| StoreError::Database(format!("cannot start the sweep thread: {e}")))?;
        Ok(Self {
            jobs,
            reader: Arc::new(std::sync::Mutex::new(reader)),
            checkpoints: Some((stop_checkpoints, checkpoint_thread)),
            _stop_sweep: stop_sweep,
            workers: vec![writer, checkpointer, sweeper],
        })
    }

    /// Runs the read `op` on the read-only connection, on a blocking thread: never queued
    /// behind commits.
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            op(&conn).map_err(db)
        })
        .await
        .map_err(|e| StoreError::Database(format!("the read failed: {e}")))?
    }

    /// Runs `op` on the writer thread. `op` returns its value and whether its changes are kept;
    /// it may run twice (see the module documentation), the first run leaving no trace.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<(T, bool)> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = TypedJob {
            op,
            result: None,
            reply,
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| StoreError::Database("the SQLite writer thread stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Database("the SQLite writer thread stopped".into()))?
    }
}

/// Sends `op` to the writer and waits for its answer, from a thread that is not async.
fn run_blocking<T, F>(jobs: &mpsc::Sender<Box<dyn Job>>, op: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Fn(&Connection) -> rusqlite::Result<(T, bool)> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let stopped = || StoreError::Database("the SQLite writer thread stopped".into());
    let job = TypedJob {
        op,
        result: None,
        reply,
    };
    jobs.send(Box::new(job)).map_err(|_| stopped())?;
    answer.blocking_recv().map_err(|_| stopped())?
}

/// Every `retention.sweep_every`, deletes the idempotency records older than the retention, in
/// passes of at most `retention.sweep_rows` rows, each a transaction of the writer between
/// commits, until a pass deletes fewer.
fn sweep_loop(jobs: mpsc::Sender<Box<dyn Job>>, retention: Retention, stopped: mpsc::Receiver<()>) {
    let rows = i64::try_from(retention.sweep_rows).unwrap_or(i64::MAX);
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(retention.sweep_every) {
        let cutoff = retention.cutoff_ms(crate::now_ms());
        loop {
            let pass = run_blocking(&jobs, move |conn| {
                // the fallback's results replay for as long as the exchange's key does
                let deleted = sweep_idempotency(conn, cutoff, rows)?
                    .max(fallback::sweep(conn, cutoff, rows)?);
                Ok((deleted, true))
            });
            match pass {
                Ok(deleted) if deleted < retention.sweep_rows => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("idempotency sweep: {e}");
                    break;
                }
            }
        }
    }
}

/// Deletes at most `rows` idempotency records created before `cutoff_ms`, oldest first.
fn sweep_idempotency(conn: &Connection, cutoff_ms: i64, rows: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM idempotency WHERE rowid IN
             (SELECT rowid FROM idempotency WHERE created_ms < ?1 ORDER BY created_ms LIMIT ?2)",
    )?
    .execute(params![cutoff_ms, rows])
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Applies the migrations the database lacks, up to schema version `target`.
fn migrate_to(conn: &mut Connection, target: usize) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let version: Option<i64> =
        tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
    let version = version.unwrap_or(0) as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().take(target).skip(version) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as i64 + 1],
        )?;
    }
    tx.commit()
}

/// A queued operation, type-erased so one thread can run them all.
trait Job: Send {
    /// Runs the operation (again, after a rollback, if asked); false when it failed or wrote
    /// something it does not keep.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Delivers the result once the transaction's fate (`outcome`) is known.
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
}

struct TypedJob<T, F> {
    op: F,
    result: Option<rusqlite::Result<(T, bool)>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> rusqlite::Result<(T, bool)> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let before = conn.total_changes();
        // A panicking operation fails alone (its batch is rolled back and redone without it);
        // the writer goes on.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.op)(conn)))
            .unwrap_or_else(|panic| {
                let message = format!("the operation panicked: {}", panic_message(&*panic));
                let error = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR);
                Err(rusqlite::Error::SqliteFailure(error, Some(message)))
            });
        let clean = match &result {
            Ok((_, true)) => true,
            Ok((_, false)) => conn.total_changes() == before,
            Err(_) => false,
        };
        self.result = Some(result);
        clean
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let answer = match (outcome, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(Ok((value, _)))) => Ok(value),
            (Ok(()), Some(Err(e))) => Err(db(e)),
            (Ok(()), None) => Err(StoreError::Database("operation did not run".into())),
        };
        // The caller may have gone away (client disconnect); the data is committed anyway.
        let _ = self.reply.send(answer);
    }
}

/// Copies the WAL into the database every `every`, next to the writer (PASSIVE never blocks
/// it), so that the writer itself never waits for the database file's fsync. When the WAL has
/// grown past `WAL_RESTART_FRAMES` under constant load, a RESTART checkpoint briefly waits for
/// the writer so that the WAL starts over.
///
/// The writer still waits on the disk: a checkpoint writes every page changed since the last
/// one and syncs them at once, and a commit's WAL sync issued meanwhile waits behind that
/// burst. So the interval trades tail latency for CPU: shorter bursts, more of them, a page
/// written more often (docs/perf.md, "What a commit writes": why the default is 20 ms).
fn checkpoint_loop(conn: Connection, every: std::time::Duration, stopped: mpsc::Receiver<()>) {
    let checkpoint = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            r.get::<_, i64>(1)
        })
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
        match checkpoint("PASSIVE") {
            Ok(frames) if frames > WAL_RESTART_FRAMES => {
                if let Err(e) = checkpoint("RESTART") {
                    tracing::warn!("SQLite checkpoint (restart) failed: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("SQLite checkpoint failed: {e}"),
        }
    }
    // The storage is being dropped: empty the WAL (see `Drop for SqliteStorage`).
    if let Err(e) = checkpoint("TRUNCATE") {
        tracing::warn!("SQLite checkpoint at stop failed: {e}");
    }
}

/// Page cache sizes, in KiB (see `tune_cache`).
const CACHE_KIB_SMALL_DB: i64 = 8 * 1024;
const CACHE_KIB_LARGE_DB: i64 = 64 * 1024;
/// How many batches between two `tune_cache` calls.
const TUNE_CACHE_EVERY: u64 = 4096;

/// Sizes the page cache for the database. When a b-tree split reorders sibling pages, SQLite
/// parks a page for a moment under the number of the lock page (1 GiB / page size); at the end
/// of the transaction, in a database smaller than that, it then scans its whole page-cache
/// hash table, whose size follows the pages cached. With 64 MiB cached that scan took a tenth
/// of the writer thread, every batch; with 8 MiB, the commit bench used ~10% less CPU per
/// commit, the pages beyond coming from the OS page cache. A database past 1 GiB never pays for
/// the scan and gets the large cache.
fn tune_cache(conn: &Connection) -> rusqlite::Result<()> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let large = pages.saturating_mul(page_size) > 1 << 30;
    let kib = if large {
        CACHE_KIB_LARGE_DB
    } else {
        CACHE_KIB_SMALL_DB
    };
    conn.pragma_update(None, "cache_size", -kib)
}

fn writer_loop(conn: Connection, queue: mpsc::Receiver<Box<dyn Job>>) {
    let mut batches: u64 = 0;
    while let Ok(first) = queue.recv() {
        batches += 1;
        if batches.is_multiple_of(TUNE_CACHE_EVERY) {
            if let Err(e) = tune_cache(&conn) {
                tracing::warn!("SQLite cache size: {e}");
            }
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match run_batch(&conn, &mut batch) {
            Ok(true) => {
                for job in batch {
                    job.finish(Ok(()));
                }
            }
            Ok(false) => {
                // One of them failed: each alone, so that only its own transaction fails.
                for mut job in batch {
                    let outcome = run_batch(&conn, std::slice::from_mut(&mut job)).map(drop);
                    job.finish(outcome);
                }
            }
            Err(e) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                for job in batch {
                    job.finish(Err(e.clone()));
                }
            }
        }
    }
}

/// Runs `batch` in one transaction. `Ok(true)`: committed; `Ok(false)`: an operation failed or
/// wrote what it does not keep, and the transaction was rolled back (a batch of one that
/// merely does not keep its writes is rolled back and counts as done).
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<bool, StoreError> {
    // Prepared once and cached: parsing these at every batch showed in profiles.
    let exec = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]).map(drop))
            .map_err(db)
    };
    exec("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        if !job.run(conn) {
            let rolled_back = exec("ROLLBACK");
            // Alone, the operation's own result (its error, or what it decided) is the answer.
            return rolled_back.map(|()| batch.len() == 1);
        }
    }
    if let Err(e) = exec("COMMIT") {
        let _ = exec("ROLLBACK");
        return Err(e);
    }
    Ok(true)
}

fn read_record(conn: &Connection, tenant: &str, key: &str) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(
        "SELECT fingerprint, response FROM idempotency WHERE tenant = ?1 AND key = ?2",
    )?
    .query_row(params![tenant, key], |r| {
        Ok(Record {
            fingerprint: r.get(0)?,
            response: r.get::<_, String>(1)?.into(),
        })
    })
    .optional()
}

fn read_trace(
    conn: &Connection,
    tenant: &str,
    trace_id: &str,
) -> rusqlite::Result<Option<TraceState>> {
    conn.prepare_cached(
        "SELECT tenant, head_hop, head_hash FROM traces WHERE tenant = ?1 AND trace_id = ?2",
    )?
    .query_row([tenant, trace_id], |r| {
        Ok(TraceState {
            tenant: r.get(0)?,
            head: Head {
                hop: to_u64(r.get(1)?),
                receipt_hash: r.get(2)?,
            },
        })
    })
    .optional()
}

fn read_usage(conn: &Connection, tenant: &str, month: &str) -> rusqlite::Result<Option<Usage>> {
    conn.prepare_cached("SELECT vex, fu FROM usage_monthly WHERE tenant = ?1 AND month = ?2")?
        .query_row([tenant, month], |r| {
            Ok(Usage {
                vex: to_u64(r.get(0)?),
                fu: to_u64(r.get(1)?),
            })
        })
        .optional()
}

/// Reads what the commit depends on, decides, writes. Serial on the writer thread: the reads
/// need no lock.
fn commit(conn: &Connection, req: &CommitRequest) -> rusqlite::Result<(CommitOutcome, bool)> {
    let mut locked = Locked::of_one(
        req,
        read_record(conn, &req.tenant, &req.idempotency_key)?,
        read_trace(conn, &req.tenant, &req.trace_id)?,
        read_usage(conn, &req.tenant, &req.month)?,
    );
    locked.locked_at_ms = crate::now_ms();
    let mut batch = Batch::new(locked);
    let outcome = batch.decide(req);
    let (rows, now_ms) = batch.finish();
    write(conn, &rows, now_ms)?;
    let kept = outcome == CommitOutcome::Committed;
    Ok((outcome, kept))
}

/// Writes `rows` (of any number of commits) row by row.
fn write(conn: &Connection, rows: &Rows, now_ms: i64) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let r = &rows.receipts;
    insert_each(
        conn,
        "INSERT INTO receipts (trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        r.trace_id.len(),
        |i| {
            (
                r.trace_id[i],
                r.hop[i],
                r.receipt_hash[i],
                r.prev_receipt_hash[i],
                r.tenant[i],
                r.body[i],
                now_ms,
            )
        },
    )?;
    let h = &rows.heads;
    insert_each(
        conn,
        "INSERT INTO traces (trace_id, tenant, head_hop, head_hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, trace_id) DO UPDATE SET head_hop = excluded.head_hop, head_hash = excluded.head_hash",
        h.trace_id.len(),
        |i| (h.trace_id[i], h.tenant[i], h.head_hop[i], h.head_hash[i], now_ms),
    )?;
    let m = &rows.months;
    insert_each(
        conn,
        "INSERT INTO usage_monthly (tenant, month, vex, fu) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, month) DO UPDATE SET vex = excluded.vex, fu = excluded.fu",
        m.tenant.len(),
        |i| (m.tenant[i], m.month[i], m.vex[i], m.fu[i]),
    )?;
    let l = &rows.ledger;
    insert_each(
        conn,
        "INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)",
        l.tenant.len(),
        |i| {
            (
                l.tenant[i],
                l.month[i],
                l.trace_id[i],
                l.hop[i],
                l.receipt_hash[i],
                l.fu[i],
                now_ms,
            )
        },
    )?;
    let b = &rows.billing;
    insert_each(
        conn,
        "INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit,
                                    amount, idempotency_key, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        b.len(),
        |i| {
            (
                b.tenant[i],
                b.month[i],
                b.meter[i],
                b.band[i],
                b.units[i],
                &b.stripe_item[i],
                &b.price_per_unit[i],
                &b.amount[i],
                &b.idempotency_key[i],
                now_ms,
            )
        },
    )?;
    let k = &rows.keys;
    insert_each(
        conn,
        "INSERT INTO idempotency (tenant, key, fingerprint, response, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        k.tenant.len(),
        |i| {
            (
                k.tenant[i],
                k.key[i],
                k.fingerprint[i],
                k.response[i],
                now_ms,
            )
        },
    )
}

/// Runs `sql` once for each of `rows` rows, with the parameters `row(i)`.
fn insert_each<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    rows: usize,
    row: impl Fn(usize) -> P,
) -> rusqlite::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut statement = conn.prepare_cached(sql)?;
    for i in 0..rows {
        statement.execute(row(i))?;
    }
    Ok(())
}

#[async_trait]
impl Storage for SqliteStorage {
    fn fallback(&self) -> &dyn FallbackStore {
        self
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    /// Through the writer thread, after checking every worker is running.
    async fn ping(&self) -> Result<(), StoreError> {
        check_all(&self.workers)?;
        self.run(|conn| conn.query_row("SELECT 1", [], |_| Ok(((), false))))
            .await
    }

    async fn commit(&self, req: CommitRequest) -> Result<CommitOutcome, StoreError> {
        self.run(move |conn| commit(conn, &req)).await
    }

    async fn chain(
        &self,
        tenant: &str,
        trace_id: &str,
        page: ChainPage,
    ) -> Result<Option<StoredChain>, StoreError> {
        let (tenant, trace_id) = (tenant.to_owned(), trace_id.to_owned());
        let taken = self
            .read(move |conn| {
                // One snapshot for the trace row and the receipts.
                let tx = conn.unchecked_transaction()?;
                if read_trace(&tx, &tenant, &trace_id)?.is_none() {
                    return Ok(None);
                }
                let mut builder = PageBuilder::new(page);
                let mut statement = tx.prepare_cached(
                    "SELECT body FROM receipts WHERE tenant = ?1 AND trace_id = ?2 AND hop > ?3
                     ORDER BY hop LIMIT ?4",
                )?;
                let after = to_i64(page.after_hop);
                let mut rows =
                    statement.query(params![tenant, trace_id, after, page.rows_to_read()])?;
                while let Some(row) = rows.next()? {
                    if !builder.offer(row.get(0)?) {
                        break;
                    }
                }
                Ok(Some((tenant, builder)))
            })
            .await?;
        taken
            .map(|(tenant, builder)| builder.finish(tenant))
            .transpose()
    }

    async fn idempotency_record(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<Record>, StoreError> {
        let (tenant, key) = (tenant.to_owned(), key.to_owned());
        self.read(move |conn| read_record(conn, &tenant, &key))
            .await
    }

    async fn remember_signing_key(&self, kid: &str, jwk: &str) -> Result<String, StoreError> {
        let (kid, jwk) = (kid.to_owned(), jwk.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO signing_keys (kid, jwk, first_seen_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kid) DO NOTHING",
            )?
            .execute(params![kid, jwk, crate::now_ms()])?;
            let stored: String = conn
                .prepare_cached("SELECT jwk FROM signing_keys WHERE kid = ?1")?
                .query_row([&kid], |r| r.get(0))?;
            Ok((stored, true))
        })
        .await
    }

    async fn signing_keys(&self) -> Result<Vec<String>, StoreError> {
        self.run(|conn| {
            let keys = conn
                .prepare_cached("SELECT jwk FROM signing_keys ORDER BY first_seen_ms, kid")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok((keys, false))
        })
        .await
    }

    async fn usage(&self, tenant: &str, month: &str) -> Result<Usage, StoreError> {
        let (tenant, month) = (tenant.to_owned(), month.to_owned());
        self.read(move |conn| Ok(read_usage(conn, &tenant, &month)?.unwrap_or_default()))
            .await
    }

    async fn billing_queue(&self, tenant: &str) -> Result<Vec<BillingRow>, StoreError> {
        let tenant = tenant.to_owned();
        self.run(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                            idempotency_key, state
                     FROM billing_queue WHERE tenant = ?1 ORDER BY id",
                )?
                .query_map([&tenant], |r| {
                    Ok(BillingRow {
                        tenant: r.get(0)?,
                        month: r.get(1)?,
                        meter: r.get(2)?,
                        band: r.get(3)?,
                        units: to_u64(r.get(4)?),
                        stripe_item: r.get(5)?,
                        price_per_unit: r.get(6)?,
                        amount: r.get(7)?,
                        idempotency_key: r.get(8)?,
                        state: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((rows, false))
        })
        .await
    }
}

/// Kills the writer thread as a bug outside any operation would: a job that panics in the
/// writer loop itself (an operation's own panic is caught).
#[cfg(test)]
impl SqliteStorage {
    pub(crate) fn kill_writer(&self) {
        struct Panics;
        impl Job for Panics {
            fn run(&mut self, _: &Connection) -> bool {
                panic!("killed by the test")
            }
            fn finish(self: Box<Self>, _: Result<(), StoreError>) {}
        }
        self.jobs.send(Box::new(Panics)).unwrap();
        let writer = &self.workers[0];
        for _ in 0..100 {
            if writer.check().is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the writer did not die");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// How many bytes `path` grew by once ~400 KB were committed and `wait` has passed.
    async fn database_size_after_writes(path: &Path, every: Duration, wait: Duration) -> u64 {
        let storage = SqliteStorage::open_with(path, Retention::DEFAULT, every).unwrap();
        let before = std::fs::metadata(path).unwrap().len();
        storage
            .run(|conn| {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS scratch (x BLOB);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
                     INSERT INTO scratch SELECT zeroblob(4000) FROM n;",
                )?;
                Ok(((), true))
            })
            .await
            .unwrap();
        tokio::time::sleep(wait).await;
        let after = std::fs::metadata(path).unwrap().len();
        after.saturating_sub(before)
    }

    #[tokio::test]
    async fn checkpoints_copy_the_wal_into_the_database_at_the_configured_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (often_db, rarely_db) = (dir.path().join("often.db"), dir.path().join("rarely.db"));
        let wait = Duration::from_millis(500);
        // committed pages reach the database file only through a checkpoint
        let (often, rarely) = tokio::join!(
            database_size_after_writes(&often_db, Duration::from_millis(5), wait),
            database_size_after_writes(&rarely_db, Duration::from_secs(60), wait),
        );
        assert!(often >= 400_000, "checkpointed every 5 ms: {often} bytes");
        assert_eq!(rarely, 0, "not checkpointed yet");
    }

    #[tokio::test]
    async fn a_dropped_storage_leaves_an_empty_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        // checkpoints held off: everything written is still in the WAL at the drop
        database_size_after_writes(&path, Duration::from_secs(60), Duration::ZERO).await;
        let wal_size = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert_eq!(wal_size, 0, "the WAL after the drop");
        let storage = SqliteStorage::open(&path).unwrap();
        let rows: i64 = storage
            .read(|conn| conn.query_row("SELECT count(*) FROM scratch", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(rows, 100, "the rows are in the database file");
    }

    #[tokio::test]
    async fn a_panicking_operation_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("t.db")).unwrap();
        let panicked = storage
            .run(|_| -> rusqlite::Result<((), bool)> { panic!("a bug") })
            .await;
        assert!(
            matches!(&panicked, Err(StoreError::Database(m)) if m.contains("panicked: a bug")),
            "{panicked:?}"
        );
        assert_eq!(storage.ping().await, Ok(()));
        storage.kill_writer();
        assert_eq!(
            storage.ping().await,
            Err(StoreError::Database(
                "the SQLite writer thread panicked".into()
            ))
        );
    }

    #[test]
    fn the_v2_migration_drops_pending_keys_and_keeps_done_ones() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 1).unwrap();
        conn.execute_batch(
            "INSERT INTO idempotency VALUES ('t', 'done', 'sha256:a', 'done', '{\"x\":1}', 0, 5);
             INSERT INTO idempotency VALUES ('t', 'left', 'sha256:b', 'pending', NULL, 99, 6);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, String, String, i64)> = conn
            .prepare("SELECT key, fingerprint, response, created_ms FROM idempotency")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![("done".into(), "sha256:a".into(), "{\"x\":1}".into(), 5)]
        );
        let version: i64 = conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        // A second start migrates nothing.
        migrate(&mut conn).unwrap();
        assert_eq!(
            read_record(&conn, "t", "done").unwrap(),
            Some(Record {
                fingerprint: "sha256:a".into(),
                response: r#"{"x":1}"#.into(),
            })
        );
    }

    #[test]
    fn a_v2_database_migrates_to_v3_with_its_rows_and_the_keys_postgres_has() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "INSERT INTO traces VALUES ('t1', 'demo', 1, 'sha256:h1', 7);
             INSERT INTO signing_keys VALUES ('k1', '{\"kty\":\"OKP\"}', 3);
             INSERT INTO usage_monthly VALUES ('demo', '2025-01', 1, 0);
             INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
                 VALUES ('demo', '2025-01', 't1', 1, 'sha256:h1', 1, 0, 7);
             INSERT INTO billing_queue (tenant, month, meter, band, units, idempotency_key, created_ms)
                 VALUES ('demo', '2025-01', 'vex', 0, 1, 'sha256:h1/vex/0', 7);
             -- v2 accepted what v3 refuses:
             INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
                 VALUES ('demo', '2025-01', 't1', 1, 'sha256:h1', 1, 0, 7);
             INSERT INTO traces VALUES (NULL, 'demo', 1, 'sha256:x', 7);",
        )
        .unwrap();
        // The rows v3 refuses go first (no database holds them: see the migration).
        conn.execute_batch(
            "DELETE FROM usage_ledger WHERE id = 2; DELETE FROM traces WHERE trace_id IS NULL;",
        )
        .unwrap();
        migrate_to(&mut conn, 3).unwrap();
        for refused in [
            "INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
                 VALUES ('demo', '2025-01', 't1', 1, 'sha256:h1', 1, 0, 7)",
            "INSERT INTO billing_queue (tenant, month, meter, band, units, idempotency_key, created_ms)
                 VALUES ('demo', '2025-01', 'vex', 0, 1, 'sha256:h1/vex/0', 7)",
            "INSERT INTO traces VALUES (NULL, 'demo', 1, 'sha256:x', 7)",
            "INSERT INTO signing_keys VALUES (NULL, '{}', 3)",
        ] {
            let e = conn.execute(refused, []).unwrap_err().to_string();
            assert!(e.contains("constraint failed"), "{refused}: {e}");
        }
        // The rest of the migrations keep the rows.
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        assert_eq!(
            read_trace(&conn, "demo", "t1").unwrap(),
            Some(TraceState {
                tenant: "demo".into(),
                head: Head {
                    hop: 1,
                    receipt_hash: "sha256:h1".into()
                }
            })
        );
        let kid: (String, String, i64) = conn
            .query_row(
                "SELECT kid, jwk, first_seen_ms FROM signing_keys",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(kid, ("k1".into(), r#"{"kty":"OKP"}"#.into(), 3));
        // The migrated database takes the next commit of the trace.
        let req = CommitRequest {
            tenant: "demo".into(),
            idempotency_key: "k2".into(),
            fingerprint: "sha256:f2".into(),
            trace_id: "t1".into(),
            hop: 2,
            receipt_hash: "sha256:h2".into(),
            prev_receipt_hash: Some("sha256:h1".into()),
            receipt: "{}".into(),
            response: "{}".into(),
            fu_tokens: 0,
            month: "2025-01".into(),
            now_ms: 8,
            deadline_ms: None,
            chain_max: 10,
            plan: Default::default(),
        };
        assert_eq!(
            commit(&conn, &req).unwrap(),
            (CommitOutcome::Committed, true)
        );
        assert_eq!(
            read_usage(&conn, "demo", "2025-01").unwrap(),
            Some(Usage { vex: 2, fu: 0 })
        );
    }

    #[test]
    fn a_provider_calls_ledger_key_is_unique_in_the_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let insert = "INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
                      VALUES ('demo', '2026-12', '', 0, 'fallback:r1', 0, 7, 1)";
        conn.execute(insert, []).unwrap();
        let e = conn.execute(insert, []).unwrap_err().to_string();
        assert!(e.contains("UNIQUE constraint failed"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_operation_fails_alone_and_the_rest_of_its_batch_commits() {
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SqliteStorage::open(&dir.path().join("t.db")).unwrap());
        fn insert(conn: &Connection, kid: &str) -> rusqlite::Result<()> {
            conn.execute(
                "INSERT INTO signing_keys (kid, jwk, first_seen_ms) VALUES (?1, '{}', 0)",
                [kid],
            )
            .map(drop)
        }
        // The first operation holds the writer while the others queue: they form one batch.
        let first = {
            let s = storage.clone();
            tokio::spawn(async move {
                s.run(|conn| {
                    std::thread::sleep(Duration::from_millis(300));
                    insert(conn, "a").map(|()| ((), true))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let kept = |kid: &'static str| {
            let s = storage.clone();
            tokio::spawn(async move {
                s.run(move |conn| insert(conn, kid).map(|()| ((), true)))
                    .await
            })
        };
        let b = kept("b");
        let failing = {
            let s = storage.clone();
            tokio::spawn(async move {
                s.run(|conn| {
                    insert(conn, "c")?;
                    conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                    Ok(((), true))
                })
                .await
            })
        };
        let discarded = {
            let s = storage.clone();
            tokio::spawn(
                async move { s.run(|conn| insert(conn, "d").map(|()| ("d", false))).await },
            )
        };
        let e = kept("e");
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(b.await.unwrap(), Ok(()));
        assert!(
            matches!(failing.await.unwrap(), Err(StoreError::Database(m)) if m.contains("no_such_table"))
        );
        assert_eq!(discarded.await.unwrap(), Ok("d"));
        assert_eq!(e.await.unwrap(), Ok(()));
        let kids = storage
            .run(|conn| {
                let kids = conn
                    .prepare("SELECT kid FROM signing_keys ORDER BY kid")?
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((kids, false))
            })
            .await
            .unwrap();
        assert_eq!(kids, vec!["a", "b", "e"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweep_deletes_expired_idempotency_records_in_bounded_passes() {
        use crate::storage::batch::test_commits::commit as test_commit;

        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            idempotency: std::time::Duration::from_secs(3600),
            sweep_every: std::time::Duration::from_millis(50),
            sweep_rows: 2,
        };
        let storage =
            SqliteStorage::open_with(&dir.path().join("t.db"), retention, CHECKPOINT_EVERY)
                .unwrap();
        let now = crate::now_ms();
        let hour_ms = 3_600_000;
        // Five expired records, one just within the retention.
        for (key, age_ms) in [
            ("e1", 10 * hour_ms),
            ("e2", 9 * hour_ms),
            ("e3", 8 * hour_ms),
            ("e4", 7 * hour_ms),
            ("e5", 2 * hour_ms),
            ("kept", hour_ms - 60_000),
        ] {
            let req = CommitRequest {
                now_ms: now - age_ms,
                ..test_commit("t", key, key, 1)
            };
            assert_eq!(storage.commit(req).await, Ok(CommitOutcome::Committed));
        }
        let mut left = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            left = storage
                .run(|conn| {
                    let keys = conn
                        .prepare("SELECT key FROM idempotency ORDER BY key")?
                        .query_map([], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((keys, false))
                })
                .await
                .unwrap();
            if left == ["kept"] {
                break;
            }
        }
        assert_eq!(left, ["kept"]);
        assert!(storage
            .idempotency_record("t", "e1")
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            storage.idempotency_record("t", "kept").await.unwrap(),
            Some(Record {
                fingerprint: "fp-kept".into(),
                response: r#"{"key":"kept"}"#.into(),
            })
        );
        assert_eq!(storage.ping().await, Ok(()));
        // A pass deletes at most its rows, oldest first.
        let conn = Connection::open_in_memory().unwrap();
        let mut conn = conn;
        migrate(&mut conn).unwrap();
        for (key, created) in [("a", 3), ("b", 1), ("c", 2), ("d", 9)] {
            conn.execute(
                "INSERT INTO idempotency VALUES ('t', ?1, 'fp', '{}', ?2)",
                params![key, created],
            )
            .unwrap();
        }
        assert_eq!(sweep_idempotency(&conn, 5, 2).unwrap(), 2);
        let left: Vec<String> = conn
            .prepare("SELECT key FROM idempotency ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(left, ["a", "d"]);
    }

    #[test]
    fn the_v5_migration_keeps_traces_and_receipts_and_scopes_them_by_tenant() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 4).unwrap();
        conn.execute_batch(
            "INSERT INTO traces VALUES ('t1', 'demo', 1, 'sha256:h1', 7);
             INSERT INTO receipts VALUES ('t1', 1, 'sha256:h1', NULL, 'demo', '{\"hop\":1}', 7);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let head = |tenant| read_trace(&conn, tenant, "t1").unwrap().map(|t| t.head.hop);
        assert_eq!((head("demo"), head("other")), (Some(1), None));
        // Another tenant's t1 is another chain; the append-only triggers are back.
        conn.execute_batch(
            "INSERT INTO traces VALUES ('t1', 'other', 1, 'sha256:o1', 8);
             INSERT INTO receipts VALUES ('t1', 1, 'sha256:o1', NULL, 'other', '{}', 8);",
        )
        .unwrap();
        let e = conn
            .execute("DELETE FROM receipts WHERE tenant = 'demo'", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let bodies: Vec<(String, String)> = conn
            .prepare("SELECT tenant, body FROM receipts ORDER BY tenant")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            bodies,
            [
                ("demo".into(), r#"{"hop":1}"#.into()),
                ("other".into(), "{}".into())
            ]
        );
    }

    /// Chains, idempotency lookups and usage do not wait for the writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_run_beside_a_busy_writer() {
        use crate::storage::batch::test_commits::commit as test_commit;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SqliteStorage::open(&dir.path().join("t.db")).unwrap());
        let c = test_commit("t", "k", "a", 1);
        assert_eq!(storage.commit(c).await, Ok(CommitOutcome::Committed));
        let busy = {
            let s = storage.clone();
            tokio::spawn(async move {
                s.run(|_| {
                    std::thread::sleep(Duration::from_millis(1500));
                    Ok(((), false))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let chain = storage
            .chain("t", "a", ChainPage::ALL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chain.receipts.len(), 1);
        assert!(storage
            .idempotency_record("t", "k")
            .await
            .unwrap()
            .is_some());
        assert_eq!(storage.usage("t", "2025-01").await.unwrap().vex, 1);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
        busy.await.unwrap().unwrap();
    }

    /// FULL (2): a transaction answered is on disk (see the module documentation).
    #[tokio::test]
    async fn the_writer_fsyncs_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("t.db")).unwrap();
        let synchronous = storage
            .run(|conn| {
                let mode: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                Ok((mode, false))
            })
            .await
            .unwrap();
        assert_eq!(synchronous, 2, "synchronous=FULL");
    }

    #[test]
    fn a_small_database_gets_the_small_page_cache() {
        let conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "cache_size", -1).unwrap();
        tune_cache(&conn).unwrap();
        let kib: i64 = conn
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kib, -CACHE_KIB_SMALL_DB);
    }
}
