//! [`BillingStore`] on PostgreSQL, for several instances over one database: one instance
//! claims at a time (a transaction-scoped advisory lock that the others skip rather than wait
//! for), the rows it claims are locked `FOR UPDATE SKIP LOCKED`, and reports are leased with
//! `FOR UPDATE SKIP LOCKED` and an expiry, so a report whose instance died is sent again by
//! whoever leases it next.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;

use super::{db, snapshot, PostgresStorage};
use crate::billing::report::{aggregate, identifier, NewReport, QueuedRow, ReportState};
use crate::storage::billing::*;
use crate::storage::{to_i64, to_u64, StoreError};

/// Any constant shared by every instance: one claimer at a time.
const CLAIM_LOCK: i64 = 0x0053_474e_4249_4c4c; // "SGNBILL"

const PENDING_ROWS: &str = "
SELECT id, tenant, month, meter, band, units, stripe_item, amount, created_ms FROM billing_queue
WHERE state = 'pending' AND created_ms < $1 AND (stripe_item IS NULL OR tenant = ANY($2))
ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED";

const NEXT_SEQ: &str = "
SELECT COALESCE(MAX(seq), 0) + 1 FROM billing_reports
WHERE tenant = $1 AND month = $2 AND meter = $3 AND band = $4
  AND event_name IS NOT DISTINCT FROM $5 AND window_start_ms = $6";

const INSERT_REPORT: &str = "
INSERT INTO billing_reports (tenant, month, meter, band, event_name, stripe_customer,
    window_start_ms, seq, value, amount, row_count, identifier, idempotency_key, state,
    created_ms, next_attempt_ms, done_ms, last_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $14, $15, $16)
RETURNING id";

const MARK_ROWS: &str = "
UPDATE billing_queue SET state = 'claimed', report_id = $1 WHERE id = ANY($2) AND state = 'pending'";

const LEASE: &str = "
UPDATE billing_reports SET lease_until_ms = $1 + $2, first_sent_ms = COALESCE(first_sent_ms, $1)
WHERE id IN (SELECT id FROM billing_reports
             WHERE state = 'sending' AND next_attempt_ms <= $1 AND lease_until_ms <= $1
             ORDER BY next_attempt_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING id, tenant, meter, band, event_name, stripe_customer, value, identifier,
          idempotency_key, window_start_ms, attempts, first_sent_ms, lease_until_ms, last_error";

const FINISH: &str = "
UPDATE billing_reports SET state = $3::TEXT, attempts = attempts + 1, lease_until_ms = 0,
    last_error = $4::TEXT, next_attempt_ms = COALESCE($5::BIGINT, next_attempt_ms),
    done_ms = CASE WHEN $3::TEXT = 'sending' THEN NULL ELSE $6::BIGINT END
WHERE id = $1 AND state = 'sending' AND lease_until_ms = $2";

fn u32_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

async fn claim(tx: &tokio_postgres::Transaction<'_>, claim: &Claim) -> Result<Claimed, StoreError> {
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&CLAIM_LOCK])
        .await
        .map_err(db)?
        .get(0);
    if !locked {
        return Ok(Claimed::default());
    }
    let tenants: Vec<&str> = claim.customers.keys().map(String::as_str).collect();
    let rows = tx
        .query(
            PENDING_ROWS,
            &[
                &claim.closed_before_ms,
                &tenants,
                &to_i64(claim.rows as u64),
            ],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| QueuedRow {
            id: r.get(0),
            tenant: r.get(1),
            month: r.get(2),
            meter: r.get(3),
            band: u32_of(r.get(4)),
            units: to_u64(r.get(5)),
            stripe_item: r.get(6),
            amount: r.get(7),
            created_ms: r.get(8),
        })
        .collect::<Vec<_>>();
    let reports = aggregate(
        rows,
        |t| claim.customers.get(t).cloned(),
        claim.window,
        claim.now_ms,
    );
    let mut claimed = Claimed::default();
    for report in &reports {
        insert_report(tx, report, claim.now_ms).await?;
        claimed.reports += 1;
        claimed.rows += report.row_ids.len();
        if report.state == ReportState::Dead {
            claimed.dead += 1;
        }
    }
    Ok(claimed)
}

async fn insert_report(
    tx: &tokio_postgres::Transaction<'_>,
    report: &NewReport,
    now_ms: i64,
) -> Result<(), StoreError> {
    let k = &report.key;
    let band = i32::try_from(k.band).unwrap_or(i32::MAX);
    let seq: i32 = tx
        .query_one(
            NEXT_SEQ,
            &[
                &k.tenant,
                &k.month,
                &k.meter,
                &band,
                &k.event_name,
                &k.window_start_ms,
            ],
        )
        .await
        .map_err(db)?
        .get(0);
    let id = identifier(k, u32::try_from(seq).unwrap_or(0));
    let done_ms = (report.state != ReportState::Sending).then_some(now_ms);
    let value = to_i64(report.value);
    let amount = report.amount.map(|a| a.normalize().to_string());
    let rows = to_i64(report.row_ids.len() as u64);
    let params: [&(dyn ToSql + Sync); 16] = [
        &k.tenant,
        &k.month,
        &k.meter,
        &band,
        &k.event_name,
        &report.stripe_customer,
        &k.window_start_ms,
        &seq,
        &value,
        &amount,
        &rows,
        &id,
        &report.state.as_str(),
        &now_ms,
        &done_ms,
        &report.last_error,
    ];
    let report_id: i64 = tx
        .query_one(INSERT_REPORT, &params)
        .await
        .map_err(db)?
        .get(0);
    let marked = tx
        .execute(MARK_ROWS, &[&report_id, &report.row_ids])
        .await
        .map_err(db)?;
    if marked != report.row_ids.len() as u64 {
        // the rows are locked by this transaction, so never
        return Err(StoreError::Database(format!(
            "claimed {marked} of {} billing rows",
            report.row_ids.len()
        )));
    }
    Ok(())
}

#[async_trait]
impl BillingStore for PostgresStorage {
    async fn claim_billing(&self, c: Claim) -> Result<Claimed, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let claimed = claim(&tx, &c).await?;
        tx.commit().await.map_err(db)?;
        Ok(claimed)
    }

    async fn lease_reports(
        &self,
        now_ms: i64,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<LeasedReport>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let limit = to_i64(limit as u64);
        let rows = self
            .client()
            .await?
            .query(LEASE, &[&now_ms, &lease_ms, &limit])
            .await
            .map_err(db)?;
        let mut reports: Vec<_> = rows
            .iter()
            .map(|r| LeasedReport {
                id: r.get(0),
                tenant: r.get(1),
                meter: r.get(2),
                band: u32_of(r.get(3)),
                event_name: r.get(4),
                stripe_customer: r.get(5),
                value: to_u64(r.get(6)),
                identifier: r.get(7),
                idempotency_key: r.get(8),
                window_start_ms: r.get(9),
                attempts: u32_of(r.get(10)),
                first_sent_ms: r.get(11),
                lease_until_ms: r.get(12),
                last_error: r.get(13),
            })
            .collect();
        reports.sort_by_key(|r| r.id);
        Ok(reports)
    }

    async fn finish_attempt(
        &self,
        report: &LeasedReport,
        attempt: Attempt,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (state, error, next) = attempt_columns(&attempt);
        let changed = self
            .client()
            .await?
            .execute(
                FINISH,
                &[
                    &report.id,
                    &report.lease_until_ms,
                    &state,
                    &error,
                    &next,
                    &now_ms,
                ],
            )
            .await
            .map_err(db)?;
        Ok(changed == 1)
    }

    async fn month_billing(&self, tenant: &str, month: &str) -> Result<MonthBilling, StoreError> {
        let mut client = self.client().await?;
        // one snapshot: a claim between two reads would move units out of both
        let tx = snapshot(&mut client).await?;
        let band = |r: &tokio_postgres::Row| BandUnits {
            meter: r.get(0),
            band: u32_of(r.get(1)),
            event_name: r.get(2),
            state: r.get(3),
            units: to_u64(r.get(4)),
            count: to_u64(r.get(5)),
        };
        let reports = tx
            .query(
                "SELECT meter, band, event_name, state, SUM(value)::BIGINT, COUNT(*) FROM billing_reports
                 WHERE tenant = $1 AND month = $2 GROUP BY meter, band, event_name, state",
                &[&tenant, &month],
            )
            .await
            .map_err(db)?;
        let pending = tx
            .query(
                "SELECT meter, band, stripe_item, 'pending', SUM(units)::BIGINT, COUNT(*) FROM billing_queue
                 WHERE tenant = $1 AND month = $2 AND state = 'pending'
                 GROUP BY meter, band, stripe_item",
                &[&tenant, &month],
            )
            .await
            .map_err(db)?;
        let dead = tx
            .query(
                "SELECT identifier, meter, band, event_name, value, window_start_ms, attempts,
                        last_error
                 FROM billing_reports WHERE tenant = $1 AND month = $2 AND state = 'dead'
                 ORDER BY id DESC LIMIT $3",
                &[&tenant, &month, &DEAD_LISTED],
            )
            .await
            .map_err(db)?;
        Ok(MonthBilling {
            bands: reports.iter().chain(pending.iter()).map(band).collect(),
            dead: dead
                .iter()
                .map(|r| DeadReport {
                    identifier: r.get(0),
                    meter: r.get(1),
                    band: u32_of(r.get(2)),
                    event_name: r.get(3),
                    value: to_u64(r.get(4)),
                    window_start_ms: r.get(5),
                    attempts: u32_of(r.get(6)),
                    last_error: r.get(7),
                })
                .collect(),
        })
    }

    async fn billing_stats(&self, month: &str) -> Result<BillingStats, StoreError> {
        let mut client = self.client().await?;
        // one snapshot: a claim between two reads would move units out of both
        let tx = snapshot(&mut client).await?;
        let pending = tx
            .query(
                "SELECT meter, COUNT(*), SUM(units)::BIGINT FROM billing_queue WHERE state = 'pending'
                 GROUP BY meter",
                &[],
            )
            .await
            .map_err(db)?;
        let oldest_pending = tx
            .query_opt(
                "SELECT created_ms FROM billing_queue WHERE state = 'pending' ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .map_err(db)?;
        let reports = tx
            .query(
                "SELECT meter, state, COUNT(*), SUM(value)::BIGINT FROM billing_reports
                 WHERE month = $1 GROUP BY meter, state",
                &[&month],
            )
            .await
            .map_err(db)?;
        let oldest_sending: Option<i64> = tx
            .query_one(
                "SELECT MIN(created_ms) FROM billing_reports WHERE state = 'sending'",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        let usage = tx
            .query(
                "SELECT tenant, vex, fu FROM usage_monthly WHERE month = $1",
                &[&month],
            )
            .await
            .map_err(db)?;
        Ok(BillingStats {
            pending: pending
                .iter()
                .map(|r| (r.get(0), to_u64(r.get(1)), to_u64(r.get(2))))
                .collect(),
            oldest_pending_ms: oldest_pending.map(|r| r.get(0)),
            reports: reports
                .iter()
                .map(|r| (r.get(0), r.get(1), to_u64(r.get(2)), to_u64(r.get(3))))
                .collect(),
            oldest_sending_ms: oldest_sending,
            usage: usage
                .iter()
                .map(|r| (r.get(0), to_u64(r.get(1)), to_u64(r.get(2))))
                .collect(),
        })
    }
}
