//! The reporter: every `SP_BILLING_REPORT_INTERVAL_MS`, claims the closed windows' queued rows
//! into reports, then leases due reports and sends them to Stripe.
//!
//! Exactly once, across retries, crashes and instances: a report's identifier, key and value
//! are in the database before its first send; a send starts only while the lease has at least
//! a request timeout left (so two instances never send one report at once); an unanswered
//! send (timeout, dropped connection, 500) is resent with the same key, which Stripe answers
//! from its idempotency cache, or dedups by identifier. Past `SP_BILLING_GIVE_UP_SECS` (at most
//! 23 h) from its first send a report is dead-lettered rather than sent after Stripe may have
//! forgotten it. Reports of one customer and meter are sent one at a time (Stripe's limit).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::report::{closed_before, jitter_seed, retry_delay};
use super::settings::{CLAIM_ROWS, SEND_BATCH, SEND_CONCURRENCY};
use super::stripe::{MeterEvent, Outcome, StripeClient};
use crate::storage::billing::{Attempt, Claim, LeasedReport};
use crate::storage::worker::{Alive, Worker};
use crate::{now_ms, ControlPlane};

/// How long after a window's end its rows are claimed: commits in flight at its end are in.
pub const CLAIM_GRACE: Duration = Duration::from_secs(2);
/// Claims or lease batches per pass at most (a backlog drains over several passes).
const PASSES: usize = 20;

/// Starts the reporter when `SP_STRIPE_API_KEY` is set. It holds the control plane weakly and
/// ends when the control plane is dropped.
pub fn spawn(cp: &Arc<ControlPlane>) -> Result<(), String> {
    let Some(stripe) = &cp.billing.settings.stripe else {
        tracing::info!("SP_STRIPE_API_KEY is not set: usage is queued, not reported to Stripe");
        return Ok(());
    };
    let client = StripeClient::new(stripe)?;
    let (worker, alive) = Worker::start("the billing reporter");
    cp.billing.set_reporter(worker);
    let task = tokio::spawn(run(Arc::downgrade(cp), Arc::new(client), alive));
    cp.billing.set_task(task.abort_handle());
    Ok(())
}

async fn run(cp: Weak<ControlPlane>, client: Arc<StripeClient>, alive: Alive) {
    let _alive = alive;
    loop {
        let interval = match cp.upgrade() {
            Some(cp) => cp.billing.settings.interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(cp) = cp.upgrade() else { return };
        pass(&cp, &client).await;
    }
}

/// One claim-and-send pass. Errors are logged and the next pass tries again.
pub async fn pass(cp: &Arc<ControlPlane>, client: &Arc<StripeClient>) {
    if let Err(e) = claim(cp).await {
        tracing::warn!("billing claim: {e}");
    }
    for _ in 0..PASSES {
        match send_due(cp, client).await {
            Ok(leased) if leased == SEND_BATCH => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!("billing send: {e}");
                break;
            }
        }
    }
}

async fn claim(cp: &ControlPlane) -> Result<(), crate::storage::StoreError> {
    let settings = &cp.billing.settings;
    let tenants = cp.tenants();
    let customers: std::collections::HashMap<String, String> = tenants
        .plans()
        .filter_map(|(t, _)| Some((t.to_owned(), tenants.stripe_customer(t)?.to_owned())))
        .collect();
    let customers = Arc::new(customers);
    for _ in 0..PASSES {
        let now = now_ms();
        let claimed = cp
            .storage
            .claim_billing(Claim {
                closed_before_ms: closed_before(now, settings.window, CLAIM_GRACE),
                window: settings.window,
                rows: CLAIM_ROWS,
                now_ms: now,
                customers: customers.clone(),
            })
            .await?;
        if claimed.dead > 0 {
            cp.billing
                .counters
                .dead_lettered
                .inc_by(claimed.dead as u64);
            tracing::error!(
                reports = claimed.dead,
                "billing: usage older than Stripe accepts was dead-lettered; reconcile it by hand (GET /v1/admin/usage/{{tenant}})"
            );
        }
        if claimed.rows > 0 {
            tracing::debug!(
                rows = claimed.rows,
                reports = claimed.reports,
                "billing rows claimed"
            );
        }
        if claimed.rows < CLAIM_ROWS {
            break;
        }
    }
    Ok(())
}

/// Leases a batch and sends it; how many reports were leased.
async fn send_due(
    cp: &Arc<ControlPlane>,
    client: &Arc<StripeClient>,
) -> Result<usize, crate::storage::StoreError> {
    let Some(stripe) = &cp.billing.settings.stripe else {
        return Ok(0);
    };
    let leased = cp
        .storage
        .lease_reports(now_ms(), stripe.lease(), SEND_BATCH)
        .await?;
    let count = leased.len();
    // One request at a time per customer and meter (Stripe's limit), several across them.
    let mut groups: BTreeMap<(String, String), Vec<LeasedReport>> = BTreeMap::new();
    for report in leased {
        groups
            .entry((report.stripe_customer.clone(), report.event_name.clone()))
            .or_default()
            .push(report);
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(SEND_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (_, reports) in groups {
        let (cp, client, slots) = (cp.clone(), client.clone(), slots.clone());
        tasks.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            for report in reports {
                send_one(&cp, &client, report).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    Ok(count)
}

async fn send_one(cp: &ControlPlane, client: &StripeClient, report: LeasedReport) {
    let settings = &cp.billing.settings;
    let Some(stripe) = &settings.stripe else {
        return;
    };
    let give_up_at = report
        .first_sent_ms
        .saturating_add(settings.give_up_after.as_millis() as i64);
    let now = now_ms();
    let attempt = if now >= give_up_at {
        Attempt::Dead {
            error: format!(
                "gave up: not acknowledged within {} s of its first send, after {} attempts: {}",
                settings.give_up_after.as_secs(),
                report.attempts,
                report.last_error.as_deref().unwrap_or("no answer")
            ),
        }
    } else if report.lease_until_ms.saturating_sub(now) < stripe.timeout.as_millis() as i64 + 1000 {
        // Too little of the lease left to send safely: the next lease sends it.
        return;
    } else {
        let event = MeterEvent {
            event_name: &report.event_name,
            stripe_customer_id: &report.stripe_customer,
            value: report.value,
            identifier: &report.identifier,
            timestamp: report.window_start_ms.div_euclid(1000),
        };
        match client.send(&event, &report.idempotency_key).await {
            Outcome::Reported => Attempt::Reported,
            Outcome::Dead(error) => Attempt::Dead { error },
            Outcome::Retry(error) => {
                let attempts = report.attempts.saturating_add(1);
                let delay = retry_delay(
                    attempts,
                    settings.retry_base,
                    jitter_seed(report.id, attempts),
                );
                let next_attempt_ms = now_ms().saturating_add(delay.as_millis() as i64);
                if next_attempt_ms >= give_up_at {
                    Attempt::Dead {
                        error: format!("gave up after {attempts} attempts: {error}"),
                    }
                } else {
                    Attempt::Retry {
                        next_attempt_ms,
                        error,
                    }
                }
            }
        }
    };
    let counters = &cp.billing.counters;
    let what = attempt.clone();
    match cp.storage.finish_attempt(&report, attempt, now_ms()).await {
        Ok(true) => match what {
            Attempt::Reported => {
                counters.reported.inc();
            }
            Attempt::Retry { error, .. } => {
                counters.retried.inc();
                tracing::warn!(identifier = %report.identifier, tenant = %report.tenant, "billing: will retry: {error}");
            }
            Attempt::Dead { error } => {
                counters.dead_lettered.inc();
                tracing::error!(
                    identifier = %report.identifier, tenant = %report.tenant,
                    event_name = %report.event_name, value = report.value,
                    "billing: dead-lettered, reconcile by hand: {error}"
                );
            }
        },
        // another instance took the report over after our lease ran out: its outcome counts
        Ok(false) => tracing::debug!(identifier = %report.identifier, "billing: lease lost"),
        Err(e) => {
            tracing::warn!(identifier = %report.identifier, "billing: outcome not stored, the report will be sent again: {e}")
        }
    }
}
