//! [`BillingStore`] on SQLite: claims and leases run on the writer thread, in its
//! transactions, so they are serial with every commit (and, across processes sharing the file,
//! `BEGIN IMMEDIATE` serializes them).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStorage;
use crate::billing::report::{aggregate, identifier, NewReport, QueuedRow, ReportState};
use crate::storage::billing::*;
use crate::storage::{to_i64, to_u64, StoreError};

/// Queued rows of closed windows, oldest first: metered rows of tenants with a customer, and
/// unmetered rows.
const PENDING_ROWS: &str = "
SELECT id, tenant, month, meter, band, units, stripe_item, amount, created_ms FROM billing_queue
WHERE state = 'pending' AND created_ms < ?1
  AND (stripe_item IS NULL OR tenant IN (SELECT value FROM json_each(?2)))
ORDER BY id LIMIT ?3";

fn claim(conn: &Connection, claim: &Claim) -> rusqlite::Result<Claimed> {
    let tenants = serde_json::to_string(&claim.customers.keys().collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into());
    let rows = conn
        .prepare_cached(PENDING_ROWS)?
        .query_map(
            params![claim.closed_before_ms, tenants, to_i64(claim.rows as u64)],
            |r| {
                Ok(QueuedRow {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    month: r.get(2)?,
                    meter: r.get(3)?,
                    band: r.get(4)?,
                    units: to_u64(r.get(5)?),
                    stripe_item: r.get(6)?,
                    amount: r.get(7)?,
                    created_ms: r.get(8)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let row_count = rows.len();
    let reports = aggregate(
        rows,
        |t| claim.customers.get(t).cloned(),
        claim.window,
        claim.now_ms,
    );
    let mut claimed = Claimed::default();
    for report in &reports {
        insert_report(conn, report, claim.now_ms)?;
        claimed.reports += 1;
        claimed.rows += report.row_ids.len();
        if report.state == ReportState::Dead {
            claimed.dead += 1;
        }
    }
    debug_assert_eq!(claimed.rows, row_count);
    Ok(claimed)
}

fn insert_report(conn: &Connection, report: &NewReport, now_ms: i64) -> rusqlite::Result<()> {
    let k = &report.key;
    let seq: u32 = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM billing_reports
             WHERE tenant = ?1 AND month = ?2 AND meter = ?3 AND band = ?4 AND event_name IS ?5
               AND window_start_ms = ?6",
        )?
        .query_row(
            params![
                k.tenant,
                k.month,
                k.meter,
                k.band,
                k.event_name,
                k.window_start_ms
            ],
            |r| r.get(0),
        )?;
    let id = identifier(k, seq);
    let done_ms = (report.state != ReportState::Sending).then_some(now_ms);
    let report_id: i64 = conn
        .prepare_cached(
            "INSERT INTO billing_reports (tenant, month, meter, band, event_name, stripe_customer,
                 window_start_ms, seq, value, amount, row_count, identifier, idempotency_key, state,
                 created_ms, next_attempt_ms, done_ms, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?14, ?15, ?16)
             RETURNING id",
        )?
        .query_row(
            params![
                k.tenant,
                k.month,
                k.meter,
                k.band,
                k.event_name,
                report.stripe_customer,
                k.window_start_ms,
                seq,
                to_i64(report.value),
                report.amount.map(|a| a.normalize().to_string()),
                to_i64(report.row_ids.len() as u64),
                id,
                report.state.as_str(),
                now_ms,
                done_ms,
                report.last_error,
            ],
            |r| r.get(0),
        )?;
    let mut mark = conn.prepare_cached(
        "UPDATE billing_queue SET state = 'claimed', report_id = ?1 WHERE id = ?2 AND state = 'pending'",
    )?;
    for row in &report.row_ids {
        if mark.execute(params![report_id, row])? != 1 {
            // serial on the writer, so never; were it to happen the claim is rolled back
            return Err(rusqlite::Error::StatementChangedRows(0));
        }
    }
    Ok(())
}

const LEASE: &str = "
UPDATE billing_reports SET lease_until_ms = ?1 + ?2, first_sent_ms = COALESCE(first_sent_ms, ?1)
WHERE id IN (SELECT id FROM billing_reports
             WHERE state = 'sending' AND next_attempt_ms <= ?1 AND lease_until_ms <= ?1
             ORDER BY next_attempt_ms, id LIMIT ?3)
RETURNING id, tenant, meter, band, event_name, stripe_customer, value, identifier,
          idempotency_key, window_start_ms, attempts, first_sent_ms, lease_until_ms, last_error";

fn leased(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeasedReport> {
    Ok(LeasedReport {
        id: r.get(0)?,
        tenant: r.get(1)?,
        meter: r.get(2)?,
        band: r.get(3)?,
        event_name: r.get(4)?,
        stripe_customer: r.get(5)?,
        value: to_u64(r.get(6)?),
        identifier: r.get(7)?,
        idempotency_key: r.get(8)?,
        window_start_ms: r.get(9)?,
        attempts: r.get(10)?,
        first_sent_ms: r.get(11)?,
        lease_until_ms: r.get(12)?,
        last_error: r.get(13)?,
    })
}

const FINISH: &str = "
UPDATE billing_reports SET state = ?3, attempts = attempts + 1, lease_until_ms = 0,
    last_error = ?4, next_attempt_ms = COALESCE(?5, next_attempt_ms),
    done_ms = CASE WHEN ?3 = 'sending' THEN NULL ELSE ?6 END
WHERE id = ?1 AND state = 'sending' AND lease_until_ms = ?2";

#[async_trait]
impl BillingStore for SqliteStorage {
    async fn claim_billing(&self, c: Claim) -> Result<Claimed, StoreError> {
        self.run(move |conn| claim(conn, &c).map(|claimed| (claimed, true)))
            .await
    }

    async fn lease_reports(
        &self,
        now_ms: i64,
        lease: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<LeasedReport>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let limit = to_i64(limit as u64);
        self.run(move |conn| {
            let mut reports = conn
                .prepare_cached(LEASE)?
                .query_map(params![now_ms, lease_ms, limit], leased)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            reports.sort_by_key(|r| r.id);
            Ok((reports, true))
        })
        .await
    }

    async fn finish_attempt(
        &self,
        report: &LeasedReport,
        attempt: Attempt,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (id, lease) = (report.id, report.lease_until_ms);
        self.run(move |conn| {
            let (state, error, next) = attempt_columns(&attempt);
            let changed = conn
                .prepare_cached(FINISH)?
                .execute(params![id, lease, state, error, next, now_ms])?;
            Ok((changed == 1, true))
        })
        .await
    }

    async fn month_billing(&self, tenant: &str, month: &str) -> Result<MonthBilling, StoreError> {
        let (tenant, month) = (tenant.to_owned(), month.to_owned());
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let band = |r: &rusqlite::Row<'_>| {
                Ok(BandUnits {
                    meter: r.get(0)?,
                    band: r.get(1)?,
                    event_name: r.get(2)?,
                    state: r.get(3)?,
                    units: to_u64(r.get(4)?),
                    count: to_u64(r.get(5)?),
                })
            };
            let mut bands = tx
                .prepare_cached(
                    "SELECT meter, band, event_name, state, SUM(value), COUNT(*) FROM billing_reports
                     WHERE tenant = ?1 AND month = ?2 GROUP BY meter, band, event_name, state",
                )?
                .query_map(params![tenant, month], band)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            bands.extend(
                tx.prepare_cached(
                    "SELECT meter, band, stripe_item, 'pending', SUM(units), COUNT(*) FROM billing_queue
                     WHERE tenant = ?1 AND month = ?2 AND state = 'pending'
                     GROUP BY meter, band, stripe_item",
                )?
                .query_map(params![tenant, month], band)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            );
            let dead = tx
                .prepare_cached(
                    "SELECT identifier, meter, band, event_name, value, window_start_ms, attempts,
                            last_error
                     FROM billing_reports WHERE tenant = ?1 AND month = ?2 AND state = 'dead'
                     ORDER BY id DESC LIMIT ?3",
                )?
                .query_map(params![tenant, month, DEAD_LISTED], |r| {
                    Ok(DeadReport {
                        identifier: r.get(0)?,
                        meter: r.get(1)?,
                        band: r.get(2)?,
                        event_name: r.get(3)?,
                        value: to_u64(r.get(4)?),
                        window_start_ms: r.get(5)?,
                        attempts: r.get(6)?,
                        last_error: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(MonthBilling { bands, dead })
        })
        .await
    }

    async fn billing_stats(&self, month: &str) -> Result<BillingStats, StoreError> {
        let month = month.to_owned();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let pending = tx
                .prepare_cached(
                    "SELECT meter, COUNT(*), SUM(units) FROM billing_queue WHERE state = 'pending'
                     GROUP BY meter",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, to_u64(r.get(1)?), to_u64(r.get(2)?)))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let oldest_pending_ms = tx
                .prepare_cached(
                    "SELECT created_ms FROM billing_queue WHERE state = 'pending' ORDER BY id LIMIT 1",
                )?
                .query_row([], |r| r.get(0))
                .optional()?;
            let reports = tx
                .prepare_cached(
                    "SELECT meter, state, COUNT(*), SUM(value) FROM billing_reports WHERE month = ?1
                     GROUP BY meter, state",
                )?
                .query_map([&month], |r| {
                    Ok((r.get(0)?, r.get(1)?, to_u64(r.get(2)?), to_u64(r.get(3)?)))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let oldest_sending_ms = tx
                .prepare_cached(
                    "SELECT MIN(created_ms) FROM billing_reports WHERE state = 'sending'",
                )?
                .query_row([], |r| r.get(0))?;
            let usage = tx
                .prepare_cached("SELECT tenant, vex, fu FROM usage_monthly WHERE month = ?1")?
                .query_map([&month], |r| {
                    Ok((r.get(0)?, to_u64(r.get(1)?), to_u64(r.get(2)?)))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(BillingStats {
                pending,
                oldest_pending_ms,
                reports,
                oldest_sending_ms,
                usage,
            })
        })
        .await
    }
}
