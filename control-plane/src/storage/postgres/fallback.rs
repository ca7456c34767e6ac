//! [`FallbackStore`] on PostgreSQL. A reservation and a settlement each lock the tenant's
//! month row first (`usage_monthly`, created at zero if absent, as a commit does), so every
//! quota decision of a tenant-month, on any instance, sees the one before it: settled FU and
//! open reservations are read under that lock, and nothing can reserve between the read and
//! the insert. A commit locks idempotency, trace, then month; these lock only the month (and
//! rows no commit touches), so the two never deadlock.

use async_trait::async_trait;
use tokio_postgres::Transaction;

use super::{db, PostgresStorage};
use crate::storage::fallback::{
    decide_reserve, ledger_key, FallbackStore, Reservation, ReserveState, Reserved, SettleRows,
    Settled, Settlement, StoredRepair,
};
use crate::storage::{to_i64, to_u64, StoreError};

/// Locks (creating at zero if absent) the month row; its settled FU.
const LOCK_MONTH: &str = "
INSERT INTO usage_monthly (tenant, month, vex, fu) VALUES ($1, $2, 0, 0)
ON CONFLICT (tenant, month) DO UPDATE SET vex = usage_monthly.vex
RETURNING fu";

const STORED_REPAIR: &str = "
SELECT fingerprint, status, body FROM fallback_repairs WHERE tenant = $1 AND idempotency_key = $2";

/// Reservations whose call never settled: of this month, and of this key in any month.
const DELETE_EXPIRED: &str = "
DELETE FROM fu_reservations WHERE tenant = $1 AND expires_ms <= $2
    AND (month = $3 OR idempotency_key = $4)";

const OPEN_RESERVATIONS: &str = "
SELECT COALESCE(SUM(tokens), 0)::BIGINT,
       EXISTS (SELECT 1 FROM fu_reservations WHERE tenant = $1 AND idempotency_key = $3)
FROM fu_reservations WHERE tenant = $1 AND month = $2";

const INSERT_RESERVATION: &str = "
INSERT INTO fu_reservations (id, tenant, month, idempotency_key, tokens, expires_ms, created_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The call's ledger row; nothing when the call was settled before (`usage_ledger_provider_call`
/// keeps its key unique).
const INSERT_LEDGER: &str = "
INSERT INTO usage_ledger (tenant, month, trace_id, hop, receipt_hash, vex, fu, created_ms)
VALUES ($1, $2, '', 0, $3, 0, $4, $5) ON CONFLICT (receipt_hash) WHERE trace_id = '' DO NOTHING";

const SET_MONTH_FU: &str = "UPDATE usage_monthly SET fu = $3 WHERE tenant = $1 AND month = $2";

const INSERT_BILLING: &str = "
INSERT INTO billing_queue (tenant, month, meter, band, units, stripe_item, price_per_unit, amount,
                           idempotency_key, created_ms)
SELECT $1, $2, b.* , $10
FROM unnest($3::text[], $4::int[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[]) AS b";

const INSERT_REPAIR: &str = "
INSERT INTO fallback_repairs (tenant, idempotency_key, fingerprint, status, body, fu_tokens,
                              usage_estimated, created_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant, idempotency_key) DO NOTHING";

async fn lock_month(tx: &Transaction<'_>, tenant: &str, month: &str) -> Result<u64, StoreError> {
    let row = tx
        .query_one(LOCK_MONTH, &[&tenant, &month])
        .await
        .map_err(db)?;
    Ok(to_u64(row.get(0)))
}

async fn reserve(tx: &Transaction<'_>, r: &Reservation) -> Result<Reserved, StoreError> {
    let settled = lock_month(tx, &r.tenant, &r.month).await?;
    let stored = tx
        .query_opt(STORED_REPAIR, &[&r.tenant, &r.idempotency_key])
        .await
        .map_err(db)?;
    if let Some(row) = stored {
        let status: i32 = row.get(1);
        let state = ReserveState {
            stored: Some((
                row.get(0),
                StoredRepair {
                    status: u16::try_from(status).unwrap_or(500),
                    body: row.get(2),
                },
            )),
            ..ReserveState::default()
        };
        return Ok(decide_reserve(r, state));
    }
    tx.execute(
        DELETE_EXPIRED,
        &[&r.tenant, &r.now_ms, &r.month, &r.idempotency_key],
    )
    .await
    .map_err(db)?;
    let open = tx
        .query_one(
            OPEN_RESERVATIONS,
            &[&r.tenant, &r.month, &r.idempotency_key],
        )
        .await
        .map_err(db)?;
    let state = ReserveState {
        stored: None,
        settled,
        reserved: to_u64(open.get(0)),
        key_in_flight: open.get(1),
    };
    let decision = decide_reserve(r, state);
    if decision == Reserved::Reserved {
        tx.execute(
            INSERT_RESERVATION,
            &[
                &r.id,
                &r.tenant,
                &r.month,
                &r.idempotency_key,
                &to_i64(r.tokens),
                &r.expires_ms,
                &r.now_ms,
            ],
        )
        .await
        .map_err(db)?;
    }
    Ok(decision)
}

async fn settle(tx: &Transaction<'_>, s: &Settlement) -> Result<Settled, StoreError> {
    let fu_before = lock_month(tx, &s.tenant, &s.month).await?;
    let Some(rows) = SettleRows::new(s, fu_before) else {
        return Ok(Settled::CounterOverflow);
    };
    let event = ledger_key(&s.id);
    let inserted = tx
        .execute(
            INSERT_LEDGER,
            &[&s.tenant, &s.month, &event, &to_i64(s.fu_tokens), &s.now_ms],
        )
        .await
        .map_err(db)?;
    if inserted == 0 {
        return Ok(Settled::AlreadySettled);
    }
    tx.execute(SET_MONTH_FU, &[&s.tenant, &s.month, &rows.month_fu])
        .await
        .map_err(db)?;
    if !rows.units.is_empty() {
        tx.execute(
            INSERT_BILLING,
            &[
                &s.tenant,
                &s.month,
                &rows.meter,
                &rows.band,
                &rows.units,
                &rows.stripe_item,
                &rows.price_per_unit,
                &rows.amount,
                &rows.idempotency_key,
                &s.now_ms,
            ],
        )
        .await
        .map_err(db)?;
    }
    tx.execute("DELETE FROM fu_reservations WHERE id = $1", &[&s.id])
        .await
        .map_err(db)?;
    tx.execute(
        INSERT_REPAIR,
        &[
            &s.tenant,
            &s.idempotency_key,
            &s.fingerprint,
            &i32::from(s.result.status),
            &s.result.body,
            &to_i64(s.fu_tokens),
            &i32::from(s.usage_estimated),
            &s.now_ms,
        ],
    )
    .await
    .map_err(db)?;
    Ok(Settled::Metered {
        month_fu: to_u64(rows.month_fu),
    })
}

/// At most `$2` settled repairs created before `$1` (oldest first), skipping rows another
/// instance holds.
const SWEEP_REPAIRS: &str = "
DELETE FROM fallback_repairs WHERE ctid IN (
    SELECT ctid FROM fallback_repairs WHERE created_ms < $1
    ORDER BY created_ms LIMIT $2 FOR UPDATE SKIP LOCKED
)";

/// At most `$2` reservations expired before `$1`.
const SWEEP_RESERVATIONS: &str = "
DELETE FROM fu_reservations WHERE ctid IN (
    SELECT ctid FROM fu_reservations WHERE expires_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED
)";

/// One pass of the retention sweep over the fallback's tables; the larger count deleted.
pub(super) async fn sweep(
    client: &tokio_postgres::Client,
    cutoff_ms: i64,
    rows: i64,
) -> Result<u64, StoreError> {
    let repairs = client
        .execute(SWEEP_REPAIRS, &[&cutoff_ms, &rows])
        .await
        .map_err(db)?;
    let reservations = client
        .execute(SWEEP_RESERVATIONS, &[&cutoff_ms, &rows])
        .await
        .map_err(db)?;
    Ok(repairs.max(reservations))
}

#[async_trait]
impl FallbackStore for PostgresStorage {
    async fn reserve(&self, reservation: Reservation) -> Result<Reserved, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let decision = reserve(&tx, &reservation).await?;
        tx.commit().await.map_err(db)?;
        Ok(decision)
    }

    async fn settle(&self, settlement: Settlement) -> Result<Settled, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let settled = settle(&tx, &settlement).await?;
        match settled {
            Settled::Metered { .. } => tx.commit().await.map_err(db)?,
            Settled::AlreadySettled | Settled::CounterOverflow => {
                tx.rollback().await.map_err(db)?
            }
        }
        Ok(settled)
    }

    async fn release(&self, id: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM fu_reservations WHERE id = $1", &[&id])
            .await
            .map_err(db)
            .map(drop)
    }

    async fn reserved_tokens(
        &self,
        tenant: &str,
        month: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COALESCE(SUM(tokens), 0)::BIGINT FROM fu_reservations
                 WHERE tenant = $1 AND month = $2 AND expires_ms > $3",
                &[&tenant, &month, &now_ms],
            )
            .await
            .map_err(db)?;
        Ok(to_u64(row.get(0)))
    }
}
