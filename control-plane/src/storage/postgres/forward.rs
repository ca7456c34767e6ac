//! [`ForwardStore`] on PostgreSQL, safe with several instances on one database: a claim takes
//! due rows with `FOR UPDATE SKIP LOCKED` and moves them past a lease in the same statement, so
//! two instances never claim one delivery while its lease holds, and a recorded attempt needs
//! the claim's `lease_token`.

use async_trait::async_trait;
use tokio_postgres::Row;

use super::super::forward::*;
use super::super::{to_i64, to_u64, StoreError};
use super::{db, snapshot, PostgresStorage};

fn delivery(r: &Row) -> Delivery {
    Delivery {
        id: r.get(0),
        tenant: r.get(1),
        idempotency_key: r.get(2),
        fingerprint: r.get(3),
        trace_id: r.get(4),
        hop: to_u64(r.get(5)),
        prev_receipt_hash: r.get(6),
        receipt_hash: r.get(7),
        cid: r.get(8),
        url: r.get(9),
        host: r.get(10),
        body: r.get(11),
        state: r.get(12),
        attempts: to_u64(r.get(13)),
        attempts_base: to_u64(r.get(14)),
        window_start_ms: r.get(15),
        next_attempt_ms: r.get(16),
        first_outcome: r.get(17),
        last_error: r.get(18),
        created_ms: r.get(19),
        updated_ms: r.get(20),
    }
}

fn attempt(r: &Row) -> Attempt {
    Attempt {
        attempt: to_u64(r.get(0)),
        started_ms: r.get(1),
        duration_ms: r.get(2),
        status_code: r
            .get::<_, Option<i32>>(3)
            .and_then(|s| u16::try_from(s).ok()),
        pinned_ip: r.get(4),
        response_size: r.get::<_, Option<i64>>(5).map(to_u64),
        error: r.get(6),
    }
}

#[async_trait]
impl ForwardStore for PostgresStorage {
    async fn forward_begin(&self, new: NewDelivery) -> Result<Result<(), Delivery>, StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO forward_deliveries (id, tenant, idempotency_key, fingerprint,
                     trace_id, hop, prev_receipt_hash, cid, url, host, body, state, attempts,
                     attempts_base, window_start_ms, next_attempt_ms, lease_token,
                     created_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'delivering', 1, 0,
                         $12, $13, $14, $12, $12)
                 ON CONFLICT DO NOTHING",
                &[
                    &new.id,
                    &new.tenant,
                    &new.idempotency_key,
                    &new.fingerprint,
                    &new.trace_id,
                    &to_i64(new.hop),
                    &new.prev_receipt_hash,
                    &new.cid,
                    &new.url,
                    &new.host,
                    &new.body,
                    &new.now_ms,
                    &new.lease_until_ms,
                    &new.lease_token,
                ],
            )
            .await
            .map_err(db)?;
        if inserted == 1 {
            return Ok(Ok(()));
        }
        drop(client);
        match self.forward_find(&new.tenant, &new.idempotency_key).await? {
            Some(existing) => Ok(Err(existing)),
            None => Err(StoreError::Database(
                "a conflicting delivery vanished".into(),
            )),
        }
    }

    async fn forward_find(&self, tenant: &str, key: &str) -> Result<Option<Delivery>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM forward_deliveries
                     WHERE tenant = $1 AND idempotency_key = $2"
                ),
                &[&tenant, &key],
            )
            .await
            .map_err(db)?;
        Ok(row.as_ref().map(delivery))
    }

    async fn forward_record(&self, recorded: Recorded) -> Result<bool, StoreError> {
        let (state, next_at) = match recorded.next {
            Next::Delivered => (DELIVERED, None),
            Next::RetryAt(at) => (PENDING, Some(at)),
            Next::Dead => (DEAD, None),
        };
        let a = &recorded.attempt;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let updated = tx
            .execute(
                "UPDATE forward_deliveries
                 SET state = $3, next_attempt_ms = coalesce($4, next_attempt_ms),
                     lease_token = NULL, first_outcome = coalesce(first_outcome, $5),
                     last_error = $6, updated_ms = $7
                 WHERE id = $1 AND lease_token = $2",
                &[
                    &recorded.id,
                    &recorded.lease_token,
                    &state,
                    &next_at,
                    &recorded.first_outcome,
                    &a.error,
                    &recorded.now_ms,
                ],
            )
            .await
            .map_err(db)?;
        if updated == 1 {
            tx.execute(
                "INSERT INTO forward_attempts (delivery_id, attempt, started_ms, duration_ms,
                     status_code, pinned_ip, response_size, error)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                &[
                    &recorded.id,
                    &to_i64(a.attempt),
                    &a.started_ms,
                    &a.duration_ms,
                    &a.status_code.map(i32::from),
                    &a.pinned_ip,
                    &a.response_size.map(to_i64),
                    &a.error,
                ],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(updated == 1)
    }

    async fn forward_claim(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        token_prefix: &str,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "UPDATE forward_deliveries
                     SET attempts = attempts + 1, next_attempt_ms = $2,
                         lease_token = $3 || id, updated_ms = $1
                     WHERE id IN (SELECT id FROM forward_deliveries
                                  WHERE state IN ('delivering', 'pending') AND next_attempt_ms <= $1
                                  ORDER BY next_attempt_ms LIMIT $4
                                  FOR UPDATE SKIP LOCKED)
                     RETURNING {DELIVERY_COLUMNS}, lease_token"
                ),
                &[&now_ms, &lease_until_ms, &token_prefix, &limit],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                delivery: delivery(r),
                lease_token: r.get(21),
            })
            .collect())
    }

    async fn forward_link_receipt(
        &self,
        tenant: &str,
        key: &str,
        hop: u64,
        receipt_hash: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE forward_deliveries SET receipt_hash = $3, hop = $4
                 WHERE tenant = $1 AND idempotency_key = $2 AND receipt_hash IS NULL",
                &[&tenant, &key, &receipt_hash, &to_i64(hop)],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn forward_deliveries(
        &self,
        tenant: &str,
        trace_id: &str,
        limit: usize,
    ) -> Result<Vec<(Delivery, Vec<Attempt>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        // one snapshot for the deliveries and their attempts
        let tx = snapshot(&mut client).await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM forward_deliveries
                     WHERE tenant = $1 AND trace_id = $2 ORDER BY created_ms, id LIMIT $3"
                ),
                &[&tenant, &trace_id, &limit],
            )
            .await
            .map_err(db)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let d = delivery(row);
            let attempts = tx
                .query(
                    &format!(
                        "SELECT {ATTEMPT_COLUMNS} FROM forward_attempts
                         WHERE delivery_id = $1 ORDER BY attempt"
                    ),
                    &[&d.id],
                )
                .await
                .map_err(db)?;
            out.push((d, attempts.iter().map(attempt).collect()));
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn forward_redrive(&self, which: Redrive, now_ms: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE forward_deliveries
                   SET state = 'pending', attempts_base = attempts, window_start_ms = $1,
                       next_attempt_ms = $1, lease_token = NULL, updated_ms = $1
                   WHERE state = 'dead' AND tenant = $2";
        let client = self.client().await?;
        let n = match &which {
            Redrive::One { tenant, id } => {
                client
                    .execute(&format!("{sql} AND id = $3"), &[&now_ms, tenant, id])
                    .await
            }
            Redrive::Tenant(tenant) => client.execute(sql, &[&now_ms, tenant]).await,
        };
        n.map_err(db)
    }

    async fn forward_sweep(&self, cutoff_ms: i64, rows: usize) -> Result<usize, StoreError> {
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // rows another instance sweeps (or attempts) meanwhile are skipped
        let ids: Vec<String> = tx
            .query(
                "SELECT id FROM forward_deliveries
                 WHERE created_ms < $1 AND state IN ('delivered', 'dead')
                 ORDER BY created_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&cutoff_ms, &rows],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            "DELETE FROM forward_attempts WHERE delivery_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(db)?;
        let deleted = tx
            .execute("DELETE FROM forward_deliveries WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    async fn forward_depth(&self) -> Result<OutboxDepth, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FILTER (WHERE state IN ('delivering', 'pending')),
                        count(*) FILTER (WHERE state = 'dead')
                 FROM forward_deliveries",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(OutboxDepth {
            pending: to_u64(row.get(0)),
            dead: to_u64(row.get(1)),
        })
    }
}
