//! The commit batcher: one thread, one connection, one transaction per batch of the commits
//! queued meanwhile (see [`super::commit`]).

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::commit::{commit_one, run_batch, BatchStatements};
use crate::storage::worker::Alive;
use crate::storage::{CommitOutcome, CommitRequest, StoreError};

/// A commit queued for the batcher, with where its answer goes.
pub(super) struct Job {
    pub req: CommitRequest,
    pub reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
}

impl Job {
    fn answer(self, outcome: Result<CommitOutcome, StoreError>) {
        // The caller may have gone away; what was decided is stored anyway.
        let _ = self.reply.send(outcome);
    }
}

const MAX_BATCH: usize = 256;

/// The batcher: takes whatever commits are queued, up to `MAX_BATCH`, and runs them together.
///
/// It runs on a thread of its own with its own connection, so that its round trips are not
/// queued behind request handlers on the main runtime (which would stretch every batch and
/// the time the tenant's month row stays locked).
pub(super) fn run_batches(
    pg_config: tokio_postgres::Config,
    pool: Pool,
    main: tokio::runtime::Handle,
    mut queue: mpsc::UnboundedReceiver<Job>,
    alive: Alive,
) {
    let _alive = alive;
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
