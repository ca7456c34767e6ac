//! [`ForwardStore`] on SQLite: every write on the writer thread (serial, so a claim needs no
//! row lock), reads of the deliveries API on the reader.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::forward::*;
use super::super::{to_i64, to_u64, StoreError};
use super::SqliteStorage;

fn delivery(r: &Row) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        tenant: r.get(1)?,
        idempotency_key: r.get(2)?,
        fingerprint: r.get(3)?,
        trace_id: r.get(4)?,
        hop: to_u64(r.get(5)?),
        prev_receipt_hash: r.get(6)?,
        receipt_hash: r.get(7)?,
        cid: r.get(8)?,
        url: r.get(9)?,
        host: r.get(10)?,
        body: r.get(11)?,
        state: r.get(12)?,
        attempts: to_u64(r.get(13)?),
        attempts_base: to_u64(r.get(14)?),
        window_start_ms: r.get(15)?,
        next_attempt_ms: r.get(16)?,
        first_outcome: r.get(17)?,
        last_error: r.get(18)?,
        created_ms: r.get(19)?,
        updated_ms: r.get(20)?,
    })
}

fn attempt(r: &Row) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        attempt: to_u64(r.get(0)?),
        started_ms: r.get(1)?,
        duration_ms: r.get(2)?,
        status_code: r
            .get::<_, Option<i64>>(3)?
            .and_then(|s| u16::try_from(s).ok()),
        pinned_ip: r.get(4)?,
        response_size: r.get::<_, Option<i64>>(5)?.map(to_u64),
        error: r.get(6)?,
    })
}

fn find(conn: &Connection, tenant: &str, key: &str) -> rusqlite::Result<Option<Delivery>> {
    conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM forward_deliveries WHERE tenant = ?1 AND idempotency_key = ?2"
    ))?
    .query_row(params![tenant, key], delivery)
    .optional()
}

fn next_state(next: Next) -> (&'static str, Option<i64>) {
    match next {
        Next::Delivered => (DELIVERED, None),
        Next::RetryAt(at) => (PENDING, Some(at)),
        Next::Dead => (DEAD, None),
    }
}

#[async_trait]
impl ForwardStore for SqliteStorage {
    async fn forward_begin(&self, new: NewDelivery) -> Result<Result<(), Delivery>, StoreError> {
        self.run(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO forward_deliveries (id, tenant, idempotency_key, fingerprint,
                         trace_id, hop, prev_receipt_hash, cid, url, host, body, state, attempts,
                         attempts_base, window_start_ms, next_attempt_ms, lease_token,
                         created_ms, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'delivering', 1, 0,
                             ?12, ?13, ?14, ?12, ?12)
                     ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    new.id,
                    new.tenant,
                    new.idempotency_key,
                    new.fingerprint,
                    new.trace_id,
                    to_i64(new.hop),
                    new.prev_receipt_hash,
                    new.cid,
                    new.url,
                    new.host,
                    new.body,
                    new.now_ms,
                    new.lease_until_ms,
                    new.lease_token,
                ])?;
            if inserted == 1 {
                return Ok((Ok(()), true));
            }
            let existing = find(conn, &new.tenant, &new.idempotency_key)?
                .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            Ok((Err(existing), true))
        })
        .await
    }

    async fn forward_find(&self, tenant: &str, key: &str) -> Result<Option<Delivery>, StoreError> {
        let (tenant, key) = (tenant.to_owned(), key.to_owned());
        self.read(move |conn| find(conn, &tenant, &key)).await
    }

    async fn forward_record(&self, recorded: Recorded) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let (state, next_at) = next_state(recorded.next);
            let a = &recorded.attempt;
            let updated = conn
                .prepare_cached(
                    "UPDATE forward_deliveries
                     SET state = ?3, next_attempt_ms = coalesce(?4, next_attempt_ms),
                         lease_token = NULL, first_outcome = coalesce(first_outcome, ?5),
                         last_error = ?6, updated_ms = ?7
                     WHERE id = ?1 AND lease_token = ?2",
                )?
                .execute(params![
                    recorded.id,
                    recorded.lease_token,
                    state,
                    next_at,
                    recorded.first_outcome,
                    a.error,
                    recorded.now_ms,
                ])?;
            if updated == 1 {
                conn.prepare_cached(
                    "INSERT INTO forward_attempts (delivery_id, attempt, started_ms, duration_ms,
                         status_code, pinned_ip, response_size, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    recorded.id,
                    to_i64(a.attempt),
                    a.started_ms,
                    a.duration_ms,
                    a.status_code.map(i64::from),
                    a.pinned_ip,
                    a.response_size.map(to_i64),
                    a.error,
                ])?;
            }
            Ok((updated == 1, true))
        })
        .await
    }

    async fn forward_claim(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        token_prefix: &str,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let prefix = token_prefix.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |conn| {
            let claimed = conn
                .prepare_cached(&format!(
                    "UPDATE forward_deliveries
                     SET attempts = attempts + 1, next_attempt_ms = ?2,
                         lease_token = ?3 || id, updated_ms = ?1
                     WHERE id IN (SELECT id FROM forward_deliveries
                                  WHERE state IN ('delivering', 'pending') AND next_attempt_ms <= ?1
                                  ORDER BY next_attempt_ms LIMIT ?4)
                     RETURNING {DELIVERY_COLUMNS}, lease_token"
                ))?
                .query_map(params![now_ms, lease_until_ms, prefix, limit], |r| {
                    Ok(Claimed {
                        delivery: delivery(r)?,
                        lease_token: r.get(21)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((claimed, true))
        })
        .await
    }

    async fn forward_link_receipt(
        &self,
        tenant: &str,
        key: &str,
        hop: u64,
        receipt_hash: &str,
    ) -> Result<(), StoreError> {
        let (tenant, key, hash) = (tenant.to_owned(), key.to_owned(), receipt_hash.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "UPDATE forward_deliveries SET receipt_hash = ?3, hop = ?4
                 WHERE tenant = ?1 AND idempotency_key = ?2 AND receipt_hash IS NULL",
            )?
            .execute(params![tenant, key, hash, to_i64(hop)])?;
            Ok(((), true))
        })
        .await
    }

    async fn forward_deliveries(
        &self,
        tenant: &str,
        trace_id: &str,
        limit: usize,
    ) -> Result<Vec<(Delivery, Vec<Attempt>)>, StoreError> {
        let (tenant, trace_id) = (tenant.to_owned(), trace_id.to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let deliveries = tx
                .prepare_cached(&format!(
                    "SELECT {DELIVERY_COLUMNS} FROM forward_deliveries
                     WHERE tenant = ?1 AND trace_id = ?2 ORDER BY created_ms, id LIMIT ?3"
                ))?
                .query_map(params![tenant, trace_id, limit], delivery)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut out = Vec::with_capacity(deliveries.len());
            for d in deliveries {
                let attempts = tx
                    .prepare_cached(&format!(
                        "SELECT {ATTEMPT_COLUMNS} FROM forward_attempts
                         WHERE delivery_id = ?1 ORDER BY attempt"
                    ))?
                    .query_map([&d.id], attempt)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                out.push((d, attempts));
            }
            Ok(out)
        })
        .await
    }

    async fn forward_redrive(&self, which: Redrive, now_ms: i64) -> Result<u64, StoreError> {
        self.run(move |conn| {
            let sql = "UPDATE forward_deliveries
                       SET state = 'pending', attempts_base = attempts, window_start_ms = ?1,
                           next_attempt_ms = ?1, lease_token = NULL, updated_ms = ?1
                       WHERE state = 'dead' AND tenant = ?2";
            let n = match &which {
                Redrive::One { tenant, id } => conn
                    .prepare_cached(&format!("{sql} AND id = ?3"))?
                    .execute(params![now_ms, tenant, id])?,
                Redrive::Tenant(tenant) => {
                    conn.prepare_cached(sql)?.execute(params![now_ms, tenant])?
                }
            };
            Ok((n as u64, true))
        })
        .await
    }

    async fn forward_sweep(&self, cutoff_ms: i64, rows: usize) -> Result<usize, StoreError> {
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        self.run(move |conn| {
            let chosen = "SELECT id FROM forward_deliveries
                          WHERE created_ms < ?1 AND state IN ('delivered', 'dead')
                          ORDER BY created_ms LIMIT ?2";
            conn.prepare_cached(&format!(
                "DELETE FROM forward_attempts WHERE delivery_id IN ({chosen})"
            ))?
            .execute(params![cutoff_ms, rows])?;
            let deleted = conn
                .prepare_cached(&format!(
                    "DELETE FROM forward_deliveries WHERE id IN ({chosen})"
                ))?
                .execute(params![cutoff_ms, rows])?;
            Ok((deleted, true))
        })
        .await
    }

    async fn forward_depth(&self) -> Result<OutboxDepth, StoreError> {
        self.read(|conn| {
            let count = |state: &str| -> rusqlite::Result<u64> {
                conn.prepare_cached("SELECT count(*) FROM forward_deliveries WHERE state = ?1")?
                    .query_row([state], |r| r.get::<_, i64>(0))
                    .map(to_u64)
            };
            Ok(OutboxDepth {
                pending: count(PENDING)?.saturating_add(count(DELIVERING)?),
                dead: count(DEAD)?,
            })
        })
        .await
    }
}
