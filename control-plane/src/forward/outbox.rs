//! The outbox worker: retries deliveries whose attempt failed (connect error, timeout, 429,
//! 5xx) with exponential backoff and jitter, honouring `Retry-After`, until they are delivered,
//! out of attempts or too old (then dead-lettered). Durable: what is due is in the database,
//! so a restart (or a kill -9) loses nothing; a delivery whose attempt was cut by a kill is
//! claimed again once its lease runs out. Several instances share one PostgreSQL safely
//! (`storage::forward`: claims skip locked rows and hold leases).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::settings::ForwardConfig;
use super::Forwarder;
use crate::storage::forward::{Delivery, Next};
use crate::storage::worker::Alive;

/// How long after its start an attempt's lease runs out: its longest duration and a margin.
pub fn lease(config: &ForwardConfig) -> Duration {
    config.total_timeout + config.connect_timeout + Duration::from_secs(5)
}

/// After attempt `attempt` (1-based) of the current budget failed: the delay before the next,
/// `retry_base · 2^(attempt−1)` capped at `retry_max`, of which the upper half is jitter
/// (spread per delivery and attempt), at least `retry_after` when the receiver asked.
pub fn backoff(
    config: &ForwardConfig,
    id: &str,
    attempt: u64,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(32);
    let ceiling = config
        .retry_base
        .checked_mul(1u32 << exponent.min(31))
        .unwrap_or(config.retry_max)
        .min(config.retry_max);
    let half = ceiling / 2;
    let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    let digest = Sha256::digest(format!("{id}/{attempt}/{}", crate::now_ms()).as_bytes());
    let draw = u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    let jitter = Duration::from_millis(draw.checked_rem(spread.saturating_add(1)).unwrap_or(0));
    let delay = half + jitter;
    retry_after.map_or(delay, |asked| asked.max(delay))
}

/// What follows a failed attempt of `delivery` (`retryable`: 429, 5xx or no answer).
pub fn after_failure(
    config: &ForwardConfig,
    delivery: &Delivery,
    attempt: u64,
    retryable: bool,
    retry_after: Option<Duration>,
    now_ms: i64,
) -> Next {
    let used = attempt.saturating_sub(delivery.attempts_base);
    if !retryable || used >= config.max_attempts {
        return Next::Dead;
    }
    let delay = backoff(config, &delivery.id, used, retry_after);
    let at = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    let deadline = delivery
        .window_start_ms
        .saturating_add(i64::try_from(config.max_age.as_millis()).unwrap_or(i64::MAX));
    if at > deadline {
        Next::Dead
    } else {
        Next::RetryAt(at)
    }
}

/// Runs until `stop` fires; `alive` marks it ended (a panic included) for `/healthz`.
pub(crate) async fn run(
    forwarder: Arc<Forwarder>,
    mut stop: tokio::sync::watch::Receiver<()>,
    alive: Alive,
) {
    let _alive = alive;
    let config = forwarder.config.clone();
    let token_prefix = format!("{}:", forwarder.instance);
    let mut last_depth = Instant::now() - Duration::from_secs(3600);
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(config.poll) => {}
        }
        if last_depth.elapsed() >= Duration::from_secs(1) {
            last_depth = Instant::now();
            match forwarder.storage.forward_depth().await {
                Ok(depth) => forwarder.metrics.set_depth(depth),
                Err(e) => tracing::warn!("forward outbox depth: {e}"),
            }
        }
        if last_sweep.elapsed() >= forwarder.retention.sweep_every {
            last_sweep = Instant::now();
            forwarder
                .sweep(forwarder.retention.cutoff_ms(crate::now_ms()))
                .await;
        }
        let now = crate::now_ms();
        let lease_ms = i64::try_from(lease(&config).as_millis()).unwrap_or(i64::MAX);
        let claimed = match forwarder
            .storage
            .forward_claim(
                now,
                now.saturating_add(lease_ms),
                &token_prefix,
                config.batch,
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!("forward outbox claim: {e}");
                continue;
            }
        };
        let attempts = claimed.into_iter().map(|claim| {
            let forwarder = forwarder.clone();
            async move { forwarder.retry(claim).await }
        });
        futures_util::future::join_all(attempts).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        Delivery {
            id: "dlv_1".into(),
            tenant: "t".into(),
            idempotency_key: "k".into(),
            fingerprint: "f".into(),
            trace_id: "tr".into(),
            hop: 1,
            prev_receipt_hash: None,
            receipt_hash: None,
            cid: "c".into(),
            url: "https://a.example.com/".into(),
            host: "a.example.com".into(),
            body: "{}".into(),
            state: "pending".into(),
            attempts: 1,
            attempts_base: 0,
            window_start_ms: 0,
            next_attempt_ms: 0,
            first_outcome: None,
            last_error: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn backoff_doubles_within_its_jitter_and_cap() {
        let config = ForwardConfig {
            retry_base: Duration::from_millis(1000),
            retry_max: Duration::from_millis(10_000),
            ..ForwardConfig::default()
        };
        for (attempt, ceiling) in [
            (1, 1000),
            (2, 2000),
            (3, 4000),
            (4, 8000),
            (5, 10_000),
            (60, 10_000),
        ] {
            for _ in 0..20 {
                let d = backoff(&config, "dlv_1", attempt, None).as_millis() as u64;
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d}");
            }
        }
        // Retry-After is a floor, never shortened
        let asked = Duration::from_secs(120);
        assert_eq!(backoff(&config, "dlv_1", 1, Some(asked)), asked);
        assert!(
            backoff(&config, "dlv_1", 4, Some(Duration::from_millis(1)))
                >= Duration::from_millis(4000)
        );
    }

    #[test]
    fn attempts_and_age_are_bounded() {
        let config = ForwardConfig {
            max_attempts: 3,
            max_age: Duration::from_secs(60),
            retry_base: Duration::from_millis(100),
            ..ForwardConfig::default()
        };
        let d = delivery();
        assert!(
            matches!(after_failure(&config, &d, 1, true, None, 0), Next::RetryAt(at) if (50..=100).contains(&at))
        );
        assert!(matches!(
            after_failure(&config, &d, 2, true, None, 0),
            Next::RetryAt(_)
        ));
        assert_eq!(after_failure(&config, &d, 3, true, None, 0), Next::Dead);
        // not retryable (a 4xx other than 429): dead at once
        assert_eq!(after_failure(&config, &d, 1, false, None, 0), Next::Dead);
        // a Retry-After past the age bound
        assert_eq!(
            after_failure(&config, &d, 1, true, Some(Duration::from_secs(61)), 0),
            Next::Dead
        );
        // a re-drive gives a fresh budget from its base
        let redriven = Delivery {
            attempts_base: 3,
            window_start_ms: 1_000_000,
            ..d
        };
        assert!(matches!(
            after_failure(&config, &redriven, 4, true, None, 1_000_000),
            Next::RetryAt(_)
        ));
    }
}
