//! From queued billing lines to meter events (pure: both storage backends call it inside the
//! claim transaction).
//!
//! One report per tenant × meter × band × `event_name` × window, never one per exchange:
//! thousands of exchanges a second become a few events a minute, far inside Stripe's limits.
//! A report's `identifier` (also its `Idempotency-Key`) is derived from what it aggregates
//! plus a sequence number, and written with the report before its first send: every retry,
//! from any instance, sends the same identifier, key and value. Rows that reach a window after
//! it was reported (a late commit) form the window's next report (sequence 2, 3, …).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;

/// What aggregation needs of a queued row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRow {
    pub id: i64,
    pub tenant: String,
    pub month: String,
    pub meter: String,
    pub band: u32,
    pub units: u64,
    /// The meter's `event_name`; `None`: nowhere to report (the row is kept `unmetered`).
    pub stripe_item: Option<String>,
    pub amount: Option<String>,
    pub created_ms: i64,
}

/// What one report sums.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReportKey {
    pub tenant: String,
    pub month: String,
    pub meter: String,
    pub band: u32,
    pub event_name: Option<String>,
    pub window_start_ms: i64,
}

/// Where a new report starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportState {
    /// To be sent to Stripe.
    Sending,
    /// No meter configured for these units: counted locally, never sent.
    Unmetered,
    /// Too old for Stripe (its timestamp would be past 35 days): an operator reconciles it.
    Dead,
}

impl ReportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Sending => "sending",
            ReportState::Unmetered => "unmetered",
            ReportState::Dead => "dead",
        }
    }
}

/// A report to write, with the rows it claims.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReport {
    pub key: ReportKey,
    pub stripe_customer: Option<String>,
    pub value: u64,
    /// Sum of the rows' amounts; `None` when Stripe prices the units.
    pub amount: Option<Decimal>,
    pub row_ids: Vec<i64>,
    pub state: ReportState,
    pub last_error: Option<String>,
}

/// Stripe refuses timestamps older than 35 days; a window older than this is dead on arrival.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(34 * 24 * 3600);

/// The start (Unix ms) of the window holding `at_ms`.
pub fn window_start(at_ms: i64, window: Duration) -> i64 {
    let w = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
    at_ms.div_euclid(w) * w
}

/// Rows created before this (Unix ms) are in closed windows at `now_ms`: windows that ended
/// at least `grace` ago, so that commits still in flight at the window's end are in.
pub fn closed_before(now_ms: i64, window: Duration, grace: Duration) -> i64 {
    let grace = i64::try_from(grace.as_millis()).unwrap_or(0);
    window_start(now_ms.saturating_sub(grace), window)
}

/// Groups `rows` into reports. `customer(tenant)` is the tenant's Stripe customer; a row
/// whose tenant has none while it has a meter is left out (it stays queued). Reports come out
/// in key order; each row is in exactly one.
pub fn aggregate(
    rows: Vec<QueuedRow>,
    customer: impl Fn(&str) -> Option<String>,
    window: Duration,
    now_ms: i64,
) -> Vec<NewReport> {
    let oldest = now_ms.saturating_sub(MAX_EVENT_AGE.as_millis() as i64);
    // Several reports per key only when a sum would overflow.
    let mut groups: BTreeMap<ReportKey, Vec<NewReport>> = BTreeMap::new();
    for row in rows {
        let customer = match &row.stripe_item {
            Some(_) => match customer(&row.tenant) {
                Some(c) => Some(c),
                None => continue,
            },
            None => None,
        };
        let key = ReportKey {
            window_start_ms: window_start(row.created_ms, window),
            tenant: row.tenant,
            month: row.month,
            meter: row.meter,
            band: row.band,
            event_name: row.stripe_item,
        };
        let amount = row
            .amount
            .as_deref()
            .and_then(|a| Decimal::from_str(a).ok());
        let reports = groups.entry(key.clone()).or_default();
        let fits = reports.last_mut().and_then(|r| {
            let value = r.value.checked_add(row.units)?;
            let amount = match (r.amount, amount) {
                (Some(a), Some(b)) => Some(a.checked_add(b)?),
                (a, b) => a.or(b),
            };
            Some((r, value, amount))
        });
        match fits {
            Some((report, value, sum)) => {
                report.value = value;
                report.amount = sum;
                report.row_ids.push(row.id);
            }
            None => {
                let (state, last_error) = if key.event_name.is_none() {
                    (ReportState::Unmetered, None)
                } else if key.window_start_ms < oldest {
                    let e = "older than Stripe accepts (35 days): never sent, reconcile by hand";
                    (ReportState::Dead, Some(e.to_owned()))
                } else {
                    (ReportState::Sending, None)
                };
                reports.push(NewReport {
                    key,
                    stripe_customer: customer,
                    value: row.units,
                    amount,
                    row_ids: vec![row.id],
                    state,
                    last_error,
                });
            }
        }
    }
    groups.into_values().flatten().collect()
}

/// The report's `identifier` and `Idempotency-Key`: `sgn_` and 48 hex digits of SHA-256 over
/// what it aggregates and its sequence number within its key (well inside Stripe's 100
/// characters; the tenant name, of any length, is hashed in).
pub fn identifier(key: &ReportKey, seq: u32) -> String {
    let text = format!(
        "signet-meter-event\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
        key.tenant,
        key.month,
        key.meter,
        key.band,
        key.event_name.as_deref().unwrap_or(""),
        key.window_start_ms,
        seq
    );
    let hash = signet_protocol::cid::sha256_hex(text.as_bytes());
    format!("sgn_{}", &hash[..48])
}

/// When to try a report again after `attempts` failed attempts: `base × 2^(attempts-1)`, at
/// most [`super::settings::MAX_RETRY_DELAY`], with "equal jitter" (half fixed, half random)
/// so that reports failing together do not retry together.
pub fn retry_delay(attempts: u32, base: Duration, jitter_seed: u64) -> Duration {
    let max = super::settings::MAX_RETRY_DELAY.as_millis() as u64;
    let exp = attempts.saturating_sub(1).min(30);
    let delay = (base.as_millis() as u64)
        .saturating_mul(1u64 << exp)
        .min(max)
        .max(1);
    let half = delay / 2;
    let random = splitmix(jitter_seed) % (delay - half + 1);
    Duration::from_millis(half + random)
}

/// A 64-bit mixer (SplitMix64): enough randomness for jitter, no dependency.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A jitter seed that differs per report, attempt and moment.
pub fn jitter_seed(report_id: i64, attempts: u32) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (report_id as u64) ^ ((attempts as u64) << 48) ^ (nanos << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn row(id: i64, tenant: &str, band: u32, units: u64, item: Option<&str>, at: i64) -> QueuedRow {
        QueuedRow {
            id,
            tenant: tenant.into(),
            month: "2026-12".into(),
            meter: "fu".into(),
            band,
            units,
            stripe_item: item.map(String::from),
            amount: Some("0.5".into()),
            created_ms: at,
        }
    }

    fn customer(t: &str) -> Option<String> {
        (t != "nocustomer").then(|| format!("cus_{t}"))
    }

    #[test]
    fn one_report_per_tenant_meter_band_and_window() {
        let now = 1_800_000_000_000;
        let w = window_start(now, MIN);
        let rows = vec![
            row(1, "a", 0, 3, Some("fu_t1"), w + 1),
            row(2, "a", 0, 4, Some("fu_t1"), w + 59_999),
            row(3, "a", 1, 5, Some("fu_t2"), w + 2),
            row(4, "a", 0, 6, Some("fu_t1"), w + 60_000),
            row(5, "b", 0, 7, Some("fu_t1"), w + 3),
            row(6, "a", 0, 1, None, w + 4),
            row(7, "nocustomer", 0, 1, Some("fu_t1"), w + 5),
        ];
        let reports = aggregate(rows, customer, MIN, now + 120_000);
        let summary: Vec<_> = reports
            .iter()
            .map(|r| {
                (
                    r.key.tenant.as_str(),
                    r.key.band,
                    r.key.window_start_ms - w,
                    r.value,
                    r.row_ids.clone(),
                    r.state,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", 0, 0, 1, vec![6], ReportState::Unmetered),
                ("a", 0, 0, 7, vec![1, 2], ReportState::Sending),
                ("a", 0, 60_000, 6, vec![4], ReportState::Sending),
                ("a", 1, 0, 5, vec![3], ReportState::Sending),
                ("b", 0, 0, 7, vec![5], ReportState::Sending),
            ]
        );
        assert_eq!(reports[1].amount, Some(Decimal::new(10, 1)));
        assert_eq!(reports[1].stripe_customer.as_deref(), Some("cus_a"));
        assert_eq!(reports[0].stripe_customer, None);
    }

    #[test]
    fn a_window_older_than_stripe_accepts_is_dead_on_arrival() {
        let now = 1_800_000_000_000;
        let old = now - 35 * 24 * 3600 * 1000;
        let reports = aggregate(vec![row(1, "a", 0, 3, Some("e"), old)], customer, MIN, now);
        assert_eq!(reports[0].state, ReportState::Dead);
        assert!(reports[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("35 days"));
    }

    #[test]
    fn a_sum_that_would_overflow_starts_another_report() {
        let rows = vec![
            row(1, "a", 0, u64::MAX - 1, Some("e"), 0),
            row(2, "a", 0, 2, Some("e"), 1),
            row(3, "a", 0, 3, Some("e"), 2),
        ];
        let reports = aggregate(rows, customer, MIN, 1_000);
        let values: Vec<_> = reports.iter().map(|r| r.value).collect();
        assert_eq!(values, vec![u64::MAX - 1, 5]);
        assert_eq!(reports[0].key, reports[1].key);
    }

    #[test]
    fn identifiers_are_deterministic_short_and_distinct() {
        let key = ReportKey {
            tenant: "t".repeat(500),
            month: "2026-12".into(),
            meter: "vex".into(),
            band: 2,
            event_name: Some("vex_t3".into()),
            window_start_ms: 60_000,
        };
        let id = identifier(&key, 1);
        assert_eq!(id, identifier(&key.clone(), 1));
        assert_eq!(id.len(), 52);
        assert_ne!(id, identifier(&key, 2));
        let other_band = ReportKey {
            band: 1,
            ..key.clone()
        };
        assert_ne!(id, identifier(&other_band, 1));
    }

    #[test]
    fn windows_and_the_grace_before_claiming() {
        assert_eq!(window_start(125_000, MIN), 120_000);
        assert_eq!(window_start(-1, MIN), -60_000);
        // at 181 s with a 2 s grace the window [120, 180) is not yet closed
        assert_eq!(closed_before(181_000, MIN, Duration::from_secs(2)), 120_000);
        assert_eq!(closed_before(182_000, MIN, Duration::from_secs(2)), 180_000);
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let base = Duration::from_secs(1);
        for seed in 0..200u64 {
            let d1 = retry_delay(1, base, seed).as_millis();
            assert!((500..=1000).contains(&d1), "{d1}");
            let d4 = retry_delay(4, base, seed).as_millis();
            assert!((4000..=8000).contains(&d4), "{d4}");
            let d40 = retry_delay(40, base, seed).as_millis();
            assert!((300_000..=600_000).contains(&d40), "{d40}");
        }
        let spread: std::collections::HashSet<_> =
            (0..50u64).map(|s| retry_delay(3, base, s)).collect();
        assert!(spread.len() > 10, "jitter spreads retries");
    }
}
