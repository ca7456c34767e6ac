//! [`FallbackStore`] on SQLite: each operation runs on the writer thread, which runs one
//! operation at a time, so the read-check-write of a reservation needs no further locking.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{read_usage, SqliteStorage};
use crate::storage::fallback::{
    decide_reserve, ledger_key, FallbackStore, Reservation, ReserveState, Reserved, SettleRows,
    Settled, Settlement, StoredRepair,
};
use crate::storage::{to_i64, to_u64, StoreError};

fn stored_repair(
    conn: &Connection,
    tenant: &str,
    key: &str,
) -> rusqlite::Result<Option<(String, StoredRepair)>> {
    conn.prepare_cached(
        "SELECT fingerprint, status, body FROM fallback_repairs
         WHERE tenant = ?1 AND idempotency_key = ?2",
    )?
    .query_row([tenant, key], |r| {
        let status: i64 = r.get(1)?;
        Ok((
            r.get(0)?,
            StoredRepair {
                status: u16::try_from(status).unwrap_or(500),
                body: r.get(2)?,
            },
        ))
    })
    .optional()
}

fn reserve(conn: &Connection, r: &Reservation) -> rusqlite::Result<(Reserved, bool)> {
    if let Some(stored) = stored_repair(conn, &r.tenant, &r.idempotency_key)? {
        let state = ReserveState {
            stored: Some(stored),
            ..ReserveState::default()
        };
        return Ok((decide_reserve(r, state), false));
    }
    // Reservations whose call never settled: of this month, and of this key in any month.
    conn.prepare_cached(
        "DELETE FROM fu_reservations WHERE tenant = ?1 AND expires_ms <= ?2
             AND (month = ?3 OR idempotency_key = ?4)",
    )?
    .execute(params![r.tenant, r.now_ms, r.month, r.idempotency_key])?;
    let (reserved, key_in_flight): (i64, i64) = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(tokens), 0),
                    EXISTS (SELECT 1 FROM fu_reservations WHERE tenant = ?1 AND idempotency_key = ?3)
             FROM fu_reservations WHERE tenant = ?1 AND month = ?2",
        )?
        .query_row(params![r.tenant, r.month, r.idempotency_key], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let state = ReserveState {
        stored: None,
        settled: read_usage(conn, &r.tenant, &r.month)?.map_or(0, |u| u.fu),
        reserved: to_u64(reserved),
        key_in_flight: key_in_flight != 0,
    };
    let decision = decide_reserve(r, state);
    if decision == Reserved::Reserved {
        conn.prepare_cached(
            "INSERT INTO fu_reservations (id, tenant, month, idempotency_key, tokens, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            r.id,
            r.tenant,
            r.month,
            r.idempotency_key,
            to_i64(r.tokens),
            r.expires_ms,
            r.now_ms
        ])?;
    }
    Ok((decision, true))
}

fn settle(conn: &Connection, s: &Settlement) -> rusqlite::Result<(Settled, bool)> {
    let event = ledger_key(&s.id);
    let settled_before = conn
        .prepare_cached("SELECT 1 FROM usage_ledger WHERE receipt_hash = ?1 AND trace_id = ''")?
        .query_row([&event], |_| Ok(()))
        .optional()?;
    if settled_before.is_some() {
        return Ok((Settled::AlreadySettled, false));
    }
    let fu_before = read_usage(conn, &s.tenant, &s.month)?.map_or(0, |u| u.fu);
    let Some(rows) = SettleRows::new(s, fu_before) else {
        return Ok((Settled::CounterOverflow, false));
    };
    conn.prepare_cached(
        "INSERT INTO usage_monthly (tenant, month, vex, fu) VALUES (?1, ?2, 0, ?3)
         ON CONFLICT (tenant, month) DO UPDATE SET fu = excluded.fu",
    )?
    .execute(params![s.tenant, s.month, rows.month_fu])?;
    conn.prepare_cached(
        "INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
         VALUES (?1, ?2, '', 0, ?3, 0, ?4, ?5)",
    )?
    .execute(params![
        s.tenant,
        s.month,
        event,
        to_i64(s.fu_tokens),
        s.now_ms
    ])?;
    let mut billing = conn.prepare_cached(
        "INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit,
                                    amount, idempotency_key, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for i in 0..rows.units.len() {
        billing.execute(params![
            s.tenant,
            s.month,
            rows.meter[i],
            rows.band[i],
            rows.units[i],
            rows.stripe_item[i],
            rows.price_per_unit[i],
            rows.amount[i],
            rows.idempotency_key[i],
            s.now_ms
        ])?;
    }
    conn.prepare_cached("DELETE FROM fu_reservations WHERE id = ?1")?
        .execute([&s.id])?;
    conn.prepare_cached(
        "INSERT INTO fallback_repairs (tenant, idempotency_key, fingerprint, status, body, fu_tokens,
                                       usage_estimated, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (tenant, idempotency_key) DO NOTHING",
    )?
    .execute(params![
        s.tenant,
        s.idempotency_key,
        s.fingerprint,
        i64::from(s.result.status),
        s.result.body,
        to_i64(s.fu_tokens),
        i64::from(s.usage_estimated),
        s.now_ms
    ])?;
    Ok((
        Settled::Metered {
            month_fu: to_u64(rows.month_fu),
        },
        true,
    ))
}

/// Deletes at most `rows` settled repairs created before `cutoff_ms` (oldest first) and at most
/// `rows` reservations expired before it; the larger count.
pub(super) fn sweep(conn: &Connection, cutoff_ms: i64, rows: i64) -> rusqlite::Result<usize> {
    let repairs = conn
        .prepare_cached(
            "DELETE FROM fallback_repairs WHERE rowid IN
                 (SELECT rowid FROM fallback_repairs WHERE created_ms < ?1 ORDER BY created_ms LIMIT ?2)",
        )?
        .execute(params![cutoff_ms, rows])?;
    let reservations = conn
        .prepare_cached(
            "DELETE FROM fu_reservations WHERE rowid IN
                 (SELECT rowid FROM fu_reservations WHERE expires_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![cutoff_ms, rows])?;
    Ok(repairs.max(reservations))
}

#[async_trait]
impl FallbackStore for SqliteStorage {
    async fn reserve(&self, reservation: Reservation) -> Result<Reserved, StoreError> {
        self.run(move |conn| reserve(conn, &reservation)).await
    }

    async fn settle(&self, settlement: Settlement) -> Result<Settled, StoreError> {
        self.run(move |conn| settle(conn, &settlement)).await
    }

    async fn release(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM fu_reservations WHERE id = ?1")?
                .execute([&id])?;
            Ok(((), true))
        })
        .await
    }

    async fn reserved_tokens(
        &self,
        tenant: &str,
        month: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let (tenant, month) = (tenant.to_owned(), month.to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT COALESCE(SUM(tokens), 0) FROM fu_reservations
                 WHERE tenant = ?1 AND month = ?2 AND expires_ms > ?3",
            )?
            .query_row(params![tenant, month, now_ms], |r| r.get::<_, i64>(0))
            .map(to_u64)
        })
        .await
    }
}
