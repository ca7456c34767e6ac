//! What the LLM fallback stores (SPEC §4, §6): the FU reservation of a repair before the
//! provider is called, and its settlement after.
//!
//! - [`FallbackStore::reserve`]: in one transaction, under the lock of the tenant's month row
//!   (the row every commit of the tenant locks too): a stored result of the key answers it
//!   (replay); else settled FU + open reservations + the estimate must fit `fu_monthly_limit`,
//!   and the reservation is recorded. Two instances over one PostgreSQL wait for each other on
//!   that row, so together they never reserve past the limit.
//! - [`FallbackStore::settle`]: in one transaction, the provider's tokens go into the usage
//!   ledger (one row per provider call, keyed by the call's reservation id: a second settle of
//!   the same call writes nothing), the month-to-date counter and the billing queue (SPEC §6
//!   tiers, [`crate::billing`]); the reservation is released and the result stored for replays.
//! - [`FallbackStore::release`]: the provider never answered: nothing to meter.
//!
//! A reservation that is never settled nor released (the instance died mid-call) stops
//! counting at its `expires_ms`, and the next reservation of its tenant-month deletes it.
//!
//! The decisions are here, pure ([`decide_reserve`], [`SettleRows`]); each backend locks,
//! calls them and writes.

use std::sync::Arc;

use async_trait::async_trait;

use super::{to_i64, StoreError};
use crate::billing::{BillingPlan, Meter};

/// Prefix of the `usage_ledger.receipt_hash` of a provider call (its reservation id follows):
/// the ledger's unique key, so a call is metered once. Such rows have `vex` 0, `hop` 0 and an
/// empty `trace_id`.
pub const LEDGER_PREFIX: &str = "fallback:";

/// `reserve`: hold `tokens` of the tenant's month for one provider call.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Random, unique per provider call.
    pub id: String,
    pub tenant: String,
    /// UTC calendar month, `YYYY-MM`.
    pub month: String,
    pub idempotency_key: String,
    /// [`signet_protocol::internal::repair::RepairRequest::fingerprint`].
    pub fingerprint: String,
    /// The estimate: prompt tokens plus the completion's `max_tokens`.
    pub tokens: u64,
    /// `fu_monthly_limit`; `None`: no limit (the reservation still guards the key).
    pub limit: Option<u64>,
    pub now_ms: i64,
    /// After this the reservation no longer counts.
    pub expires_ms: i64,
}

/// A repair's stored result: the status and body it was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRepair {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Recorded: call the provider, then settle or release.
    Reserved,
    /// The key was settled before with the same request: answer this, meter nothing.
    Replay(StoredRepair),
    /// The key was settled before with another request.
    KeyReused,
    /// Another call of this key holds a reservation that has not expired.
    InFlight,
    /// Does not fit: `settled` FU this month, `reserved` by open reservations.
    Denied { settled: u64, reserved: u64 },
}

/// `settle`: what one provider call used, and what the repair answered.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The call's reservation id.
    pub id: String,
    pub tenant: String,
    pub month: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    /// The provider's `usage.total_tokens` (or the estimate, `usage_estimated`).
    pub fu_tokens: u64,
    pub usage_estimated: bool,
    /// The answer stored for replays (a failure after the provider answered too).
    pub result: StoredRepair,
    pub now_ms: i64,
    pub plan: Arc<BillingPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Metered: the month's FU after it.
    Metered { month_fu: u64 },
    /// This call was settled before: nothing written.
    AlreadySettled,
    /// The month's counter would pass 2^63 − 1: nothing written.
    CounterOverflow,
}

#[async_trait]
pub trait FallbackStore: Send + Sync {
    async fn reserve(&self, reservation: Reservation) -> Result<Reserved, StoreError>;
    async fn settle(&self, settlement: Settlement) -> Result<Settled, StoreError>;
    /// Deletes the reservation `id` (the provider did not answer).
    async fn release(&self, id: &str) -> Result<(), StoreError>;
    /// Tokens held by the tenant-month's reservations not expired at `now_ms`.
    async fn reserved_tokens(
        &self,
        tenant: &str,
        month: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
}

/// What the backend read under the month lock for a reservation.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReserveState {
    /// The key's stored result, with its fingerprint.
    pub stored: Option<(String, StoredRepair)>,
    /// Settled FU of the month.
    pub settled: u64,
    /// Tokens of the month's reservations that have not expired.
    pub reserved: u64,
    /// The key holds a reservation that has not expired.
    pub key_in_flight: bool,
}

/// The reservation decision, given what was read under the lock.
pub(crate) fn decide_reserve(r: &Reservation, state: ReserveState) -> Reserved {
    if let Some((fingerprint, stored)) = state.stored {
        return if fingerprint == r.fingerprint {
            Reserved::Replay(stored)
        } else {
            Reserved::KeyReused
        };
    }
    if state.key_in_flight {
        return Reserved::InFlight;
    }
    if let Some(limit) = r.limit {
        let fits = state
            .settled
            .checked_add(state.reserved)
            .and_then(|held| held.checked_add(r.tokens))
            .is_some_and(|total| total <= limit);
        if !fits {
            return Reserved::Denied {
                settled: state.settled,
                reserved: state.reserved,
            };
        }
    }
    Reserved::Reserved
}

/// The billing-queue rows of one settled call (the columns of `billing_queue`, written like a
/// commit's: see `rows.rs`).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct SettleRows {
    pub month_fu: i64,
    pub meter: Vec<&'static str>,
    pub band: Vec<i32>,
    pub units: Vec<i64>,
    pub stripe_item: Vec<Option<String>>,
    pub price_per_unit: Vec<Option<String>>,
    pub amount: Vec<Option<String>>,
    pub idempotency_key: Vec<String>,
}

impl SettleRows {
    /// The month's FU counter after the call and the call's billing lines; `None` when the
    /// counter would not fit (nothing is written then).
    pub fn new(s: &Settlement, fu_before: u64) -> Option<SettleRows> {
        let after = fu_before
            .checked_add(s.fu_tokens)
            .filter(|a| i64::try_from(*a).is_ok())?;
        let lines = match s.plan.fu.bill(Meter::Fu, fu_before, s.fu_tokens) {
            Ok(lines) => lines,
            Err(e) => {
                tracing::error!(tenant = %s.tenant, fu_before, fu = s.fu_tokens, "fallback not billed: {e}");
                Vec::new()
            }
        };
        let mut rows = SettleRows {
            month_fu: to_i64(after),
            ..SettleRows::default()
        };
        let event = ledger_key(&s.id);
        for line in lines {
            let meter = line.meter.as_str();
            rows.meter.push(meter);
            rows.band.push(i32::try_from(line.band).unwrap_or(i32::MAX));
            rows.units.push(to_i64(line.units));
            rows.stripe_item.push(line.stripe_item.clone());
            rows.price_per_unit
                .push(line.price_per_unit.map(|p| p.to_string()));
            rows.amount
                .push(line.amount().map(|a| a.normalize().to_string()));
            rows.idempotency_key
                .push(format!("{event}/{meter}/{}", line.band));
        }
        Some(rows)
    }
}

/// The ledger key of a provider call.
pub(crate) fn ledger_key(reservation_id: &str) -> String {
    format!("{LEDGER_PREFIX}{reservation_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{MeterPlan, Tier};
    use std::str::FromStr;

    fn reservation(tokens: u64, limit: Option<u64>) -> Reservation {
        Reservation {
            id: "r1".into(),
            tenant: "t".into(),
            month: "2026-12".into(),
            idempotency_key: "k".into(),
            fingerprint: "sha256:f".into(),
            tokens,
            limit,
            now_ms: 0,
            expires_ms: 1,
        }
    }

    fn state(settled: u64, reserved: u64) -> ReserveState {
        ReserveState {
            settled,
            reserved,
            ..ReserveState::default()
        }
    }

    #[test]
    fn a_reservation_fits_when_settled_plus_open_plus_estimate_is_within_the_limit() {
        let r = reservation(100, Some(1000));
        assert_eq!(decide_reserve(&r, state(600, 300)), Reserved::Reserved);
        assert_eq!(
            decide_reserve(&r, state(600, 301)),
            Reserved::Denied {
                settled: 600,
                reserved: 301
            }
        );
        assert_eq!(
            decide_reserve(&reservation(u64::MAX, Some(u64::MAX)), state(1, 0)),
            Reserved::Denied {
                settled: 1,
                reserved: 0
            },
            "an overflowing sum never fits"
        );
        assert_eq!(
            decide_reserve(&reservation(u64::MAX, None), state(u64::MAX, 5)),
            Reserved::Reserved,
            "no limit"
        );
    }

    #[test]
    fn a_stored_key_replays_or_is_reused_before_any_quota_check() {
        let stored = StoredRepair {
            status: 200,
            body: "{}".into(),
        };
        let over = ReserveState {
            stored: Some(("sha256:f".into(), stored.clone())),
            ..state(5000, 0)
        };
        let r = reservation(100, Some(1000));
        assert_eq!(decide_reserve(&r, over.clone()), Reserved::Replay(stored));
        let other = Reservation {
            fingerprint: "sha256:other".into(),
            ..r.clone()
        };
        assert_eq!(decide_reserve(&other, over), Reserved::KeyReused);
        let busy = ReserveState {
            key_in_flight: true,
            ..state(0, 0)
        };
        assert_eq!(decide_reserve(&r, busy), Reserved::InFlight);
    }

    #[test]
    fn a_settlement_bills_its_tokens_across_the_tiers_from_the_month_counter() {
        let plan = BillingPlan {
            fu: MeterPlan {
                reserved: 100,
                tiers: vec![
                    Tier {
                        threshold: 10,
                        price_per_unit: rust_decimal::Decimal::from_str("0.01").unwrap(),
                        stripe_item: Some("si_a".into()),
                    },
                    Tier {
                        threshold: 1000,
                        price_per_unit: rust_decimal::Decimal::from_str("0.5").unwrap(),
                        stripe_item: None,
                    },
                ],
                default_stripe_item: Some("si_fu".into()),
            },
            ..BillingPlan::default()
        };
        let s = Settlement {
            id: "abc".into(),
            tenant: "t".into(),
            month: "2026-12".into(),
            idempotency_key: "k".into(),
            fingerprint: "sha256:f".into(),
            fu_tokens: 20,
            usage_estimated: false,
            result: StoredRepair {
                status: 200,
                body: "{}".into(),
            },
            now_ms: 0,
            plan: Arc::new(plan),
        };
        let rows = SettleRows::new(&s, 95).unwrap();
        assert_eq!(rows.month_fu, 115);
        assert_eq!(rows.units, [10, 5]);
        assert_eq!(rows.band, [0, 1]);
        assert_eq!(rows.meter, ["fu", "fu"]);
        assert_eq!(
            rows.stripe_item,
            [Some("si_a".to_owned()), Some("si_fu".to_owned())]
        );
        assert_eq!(rows.amount, [Some("0.1".into()), Some("2.5".into())]);
        assert_eq!(
            rows.idempotency_key,
            ["fallback:abc/fu/0", "fallback:abc/fu/1"]
        );
        assert!(
            SettleRows::new(&s, 50).unwrap().units.is_empty(),
            "within the reservation"
        );
        assert_eq!(SettleRows::new(&s, i64::MAX as u64 - 5), None);
    }
}
