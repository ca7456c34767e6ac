//! Per-tenant request rate of a route (SPEC §4: 429 `RATE_LIMITED`).
//!
//! A fixed one-second window per route and tenant, kept in VM shared data so that every Envoy
//! worker thread draws from one budget; updates use the shared data's compare-and-swap token.
//! The budget is per Envoy instance: a fleet of N proxies admits up to N times the rate.

use crate::host::Host;

/// Shared-data key prefix of the windows.
const WINDOW_PREFIX: &str = "signet.rate.";

/// A window update that keeps losing the compare-and-swap (other workers writing the same key)
/// is given up after this many tries, and the request admitted: contention must not turn into
/// errors.
const MAX_CAS_TRIES: usize = 4;

/// Counts one request of `tenant` on `route` against `per_second`; false when the current
/// second's budget is spent (nothing is counted then).
pub fn admit(host: &mut dyn Host, route: &str, tenant: &str, per_second: u32) -> bool {
    let key = format!("{WINDOW_PREFIX}{route}.{tenant}");
    let second = host.now_millis() / 1000;
    for _ in 0..MAX_CAS_TRIES {
        let (stored, cas) = host.shared_get_cas(&key);
        let count = stored
            .as_deref()
            .and_then(|bytes| parse_window(bytes, second))
            .unwrap_or(0);
        if count >= per_second {
            return false;
        }
        let window = format!("{second}:{}", count + 1);
        if host.shared_set_cas(&key, window.as_bytes(), cas) {
            return true;
        }
    }
    true
}

/// The count of a stored `"<second>:<count>"` window if it is the current second's.
fn parse_window(bytes: &[u8], second: u64) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (window, count) = text.split_once(':')?;
    (window.parse::<u64>().ok()? == second)
        .then(|| count.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing::MockHost;

    #[test]
    fn admits_up_to_the_rate_per_second_then_refuses() {
        let mut host = MockHost {
            now: 5_000,
            ..Default::default()
        };
        let admitted = (0..5).filter(|_| admit(&mut host, "r", "demo", 3)).count();
        assert_eq!(admitted, 3);
        // other tenants and routes have their own budget
        assert!(admit(&mut host, "r", "other", 3));
        assert!(admit(&mut host, "r2", "demo", 3));
        // the next second starts afresh
        host.now = 6_000;
        assert!(admit(&mut host, "r", "demo", 3));
    }

    #[test]
    fn a_lost_compare_and_swap_is_retried_on_the_new_value() {
        let mut host = MockHost {
            now: 1_000,
            ..Default::default()
        };
        assert!(admit(&mut host, "r", "t", 2));
        // another worker counts one in between our read and our write
        host.cas_interference = Some(b"1:2".to_vec());
        assert!(!admit(&mut host, "r", "t", 2));
        assert_eq!(
            host.shared.get("signet.rate.r.t").map(Vec::as_slice),
            Some(&b"1:2"[..])
        );
    }

    #[test]
    fn unreadable_or_stale_windows_count_from_zero() {
        assert_eq!(parse_window(b"7:3", 7), Some(3));
        assert_eq!(parse_window(b"6:3", 7), None);
        assert_eq!(parse_window(b"garbage", 7), None);
    }
}
