//! The quota's side of a repair: the reservation made before the provider call and the
//! settlement after it (what storage decides and writes is `storage/fallback.rs`).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signet_protocol::time;

use crate::billing::BillingPlan;
use crate::storage::fallback::{Reservation, Settlement, StoredRepair};

/// How long after its call's deadline a reservation still counts: a call that never settles
/// (the instance died) holds its tokens this long, no longer.
pub const RESERVATION_GRACE: Duration = Duration::from_secs(60);

/// The UTC calendar month of `now_ms`, `YYYY-MM`.
pub fn month_of(now_ms: i64) -> String {
    let text = time::rfc3339_millis(u64::try_from(now_ms).unwrap_or(0));
    text.get(..7).unwrap_or_default().to_owned()
}

/// A reservation id unique across instances: 128 bits from the process's random hasher keys
/// (seeded by the OS), a counter and the time.
pub fn reservation_id() -> String {
    static STATE: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = STATE.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let high = state.hash_one((n, nanos, 0u8));
    let low = state.hash_one((n, nanos, 1u8));
    format!("{high:016x}{low:016x}")
}

/// What a repair asks to reserve.
pub struct Ask<'a> {
    pub tenant: &'a str,
    pub idempotency_key: &'a str,
    pub fingerprint: &'a str,
    pub tokens: u64,
    pub limit: Option<u64>,
    pub call_timeout: Duration,
}

pub fn reservation(ask: &Ask<'_>, now_ms: i64) -> Reservation {
    let held = ask.call_timeout.saturating_add(RESERVATION_GRACE);
    Reservation {
        id: reservation_id(),
        tenant: ask.tenant.to_owned(),
        month: month_of(now_ms),
        idempotency_key: ask.idempotency_key.to_owned(),
        fingerprint: ask.fingerprint.to_owned(),
        tokens: ask.tokens,
        limit: ask.limit,
        now_ms,
        expires_ms: now_ms.saturating_add(i64::try_from(held.as_millis()).unwrap_or(i64::MAX)),
    }
}

/// The settlement of `reservation`'s call: metered in the reservation's month (the one its
/// quota was checked against).
pub fn settlement(
    reservation: &Reservation,
    fu_tokens: u64,
    usage_estimated: bool,
    result: StoredRepair,
    plan: Arc<BillingPlan>,
) -> Settlement {
    Settlement {
        id: reservation.id.clone(),
        tenant: reservation.tenant.clone(),
        month: reservation.month.clone(),
        idempotency_key: reservation.idempotency_key.clone(),
        fingerprint: reservation.fingerprint.clone(),
        fu_tokens,
        usage_estimated,
        result,
        now_ms: crate::now_ms(),
        plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_and_ids_do_not_repeat() {
        assert_eq!(month_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and the next millisecond
        assert_eq!(month_of(1_796_083_199_999), "2026-11");
        assert_eq!(month_of(1_796_083_200_000), "2026-12");
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| reservation_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 32));
    }

    #[test]
    fn a_reservation_expires_after_the_call_timeout_and_the_grace() {
        let ask = Ask {
            tenant: "t",
            idempotency_key: "k",
            fingerprint: "sha256:f",
            tokens: 10,
            limit: Some(100),
            call_timeout: Duration::from_secs(20),
        };
        let r = reservation(&ask, 1_000);
        assert_eq!(r.expires_ms, 1_000 + 80_000);
        assert_eq!(
            (r.tokens, r.limit, r.month.as_str()),
            (10, Some(100), "1970-01")
        );
    }
}
