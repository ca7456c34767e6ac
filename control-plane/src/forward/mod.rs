//! Forwarding (SPEC §5): the control plane delivers an exchange's normalized payload to its
//! `forward_url`, safely, once per idempotency key, signed, and retries what failed.
//!
//! - [`classify`]: which addresses are globally routable (the IANA special-purpose
//!   registries), and the test-only allow ranges.
//! - [`resolve`]: resolve once, classify every address, pin one.
//! - [`deliver`]: one HTTPS attempt to the pinned address (rustls, no redirects, timeouts,
//!   1 MiB read).
//! - [`signature`]: the delivery's headers and RFC 9421 signature.
//! - [`outbox`]: the worker that retries failed deliveries, backoff, dead letters.
//! - [`settings`], [`metrics`]: `SP_FORWARD_*`/`SP_DNS_SERVERS`, `signet_forward_*`.
//!
//! [`Forwarder::forward`] serves `POST /v1/internal/forward` (the first attempt, inside the
//! filter's request); what it stores is `storage::forward`.

pub mod classify;
pub mod deliver;
pub mod metrics;
pub mod outbox;
pub mod resolve;
pub mod settings;
pub mod signature;

use std::sync::Arc;
use std::time::{Duration, Instant};

use signet_protocol::internal::forward::{ForwardReply, ForwardRequest, Forwarded};
use signet_protocol::internal::Code;
use signet_protocol::keys::SigningKey;
use signet_protocol::{cid, hel, trace};

pub use metrics::ForwardMetrics;
pub use settings::ForwardConfig;

use crate::storage::forward::{Attempt, Claimed, Delivery, NewDelivery, Next, Recorded};
use crate::storage::forward::{DEAD, DELIVERED};
use crate::storage::worker::Worker;
use crate::storage::{Retention, Storage, StoreError};

/// An error answer of the forward endpoint: its code and detail.
pub type Refused = (Code, String);

pub struct Forwarder {
    pub config: ForwardConfig,
    policy: classify::Policy,
    resolver: resolve::Resolver,
    tls: rustls::ClientConfig,
    key: SigningKey,
    pub metrics: ForwardMetrics,
    storage: Arc<dyn Storage>,
    /// Names this instance's leases.
    instance: String,
    /// The idempotency retention: a finished delivery is kept as long as its key.
    retention: Retention,
}

/// The forwarder and its outbox worker, whose end (or panic) [`ForwardService::check`] reports.
pub struct ForwardService {
    pub forwarder: Arc<Forwarder>,
    worker: Worker,
    _stop: tokio::sync::watch::Sender<()>,
}

impl ForwardService {
    /// Builds the forwarder and starts its outbox worker (inside a Tokio runtime).
    pub fn start(
        config: ForwardConfig,
        storage: Arc<dyn Storage>,
        key: SigningKey,
        metrics: ForwardMetrics,
        retention: Retention,
    ) -> Result<ForwardService, String> {
        if !config.allow_cidrs.is_empty() {
            let ranges: Vec<String> = config.allow_cidrs.iter().map(|c| c.to_string()).collect();
            tracing::warn!(
                "SP_FORWARD_ALLOW_CIDRS={}: deliveries may reach these loopback addresses; a setting for tests, never for production",
                ranges.join(",")
            );
        }
        let resolver = resolve::Resolver::new(&config.dns_servers, config.connect_timeout)?;
        let tls = deliver::tls_config(config.ca_file.as_deref())?;
        let instance = format!(
            "{}-{}",
            std::process::id(),
            cid::sha256_hex(format!("{:?}", std::time::SystemTime::now()).as_bytes())
                .get(..12)
                .unwrap_or_default()
        );
        let forwarder = Arc::new(Forwarder {
            policy: classify::Policy {
                allow: config.allow_cidrs.clone(),
            },
            config,
            resolver,
            tls,
            key,
            metrics,
            storage,
            instance,
            retention,
        });
        let (stop, stopped) = tokio::sync::watch::channel(());
        let (worker, alive) = Worker::start("the forward outbox worker");
        tokio::spawn(outbox::run(forwarder.clone(), stopped, alive));
        Ok(ForwardService {
            forwarder,
            worker,
            _stop: stop,
        })
    }

    /// `Err` once the outbox worker has ended.
    pub fn check(&self) -> Result<(), StoreError> {
        self.worker.check()
    }
}

/// The delivery id of a (tenant, idempotency key): the same on every instance, so that two
/// racing first attempts meet on one row.
pub fn delivery_id(tenant: &str, key: &str) -> String {
    let hash = cid::sha256_hex(format!("{tenant}\0{key}").as_bytes());
    format!("dlv_{}", hash.get(..32).unwrap_or(&hash))
}

fn storage_error(e: StoreError) -> Refused {
    tracing::error!("forward storage failure: {e}");
    (
        Code::StorageUnavailable,
        "the delivery store is unavailable".into(),
    )
}

/// What one attempt produced.
struct Ended {
    forwarded: Forwarded,
    attempt: Attempt,
    /// 2xx; else whether it may be retried (429, 5xx, no answer).
    delivered: bool,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Forwarder {
    /// `POST /v1/internal/forward`: checks, resolves, delivers the first attempt and answers
    /// its outcome; a key seen before answers its stored outcome without delivering.
    pub async fn forward(
        &self,
        req: ForwardRequest,
        allowlist: &[String],
    ) -> Result<ForwardReply, Refused> {
        validate(&req)?;
        let allowed = hel::evaluate(&req.url, allowlist, &[]).map_err(|d| {
            self.metrics.outcome("refused");
            (d.code(), d.detail().to_owned())
        })?;
        if let Some(existing) = self.existing(&req).await? {
            return self.replay(&req, existing);
        }
        let url = delivery_url(&allowed.url, Some(&allowed.host))?;
        let host = url.host().ok_or((Code::HelBadUrl, "no host".to_owned()))?;
        let pinned = match resolve::pin(&self.resolver, &self.policy, &host).await {
            Ok(ip) => ip,
            Err(refusal) => {
                self.metrics.outcome("refused");
                return Err((refusal.code(), refusal.detail()));
            }
        };
        let now = crate::now_ms();
        let id = delivery_id(&req.tenant, &req.idempotency_key);
        let lease_token = format!("{}:first:{id}", self.instance);
        let lease_ms = i64::try_from(outbox::lease(&self.config).as_millis()).unwrap_or(i64::MAX);
        let new = NewDelivery {
            id: id.clone(),
            tenant: req.tenant.clone(),
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: req.fingerprint.clone(),
            trace_id: req.trace_id.clone(),
            hop: req.hop,
            prev_receipt_hash: req.prev_receipt_hash.clone(),
            cid: req.cid.clone(),
            url: url.to_string(),
            host: allowed.host.clone(),
            body: req.canon.clone(),
            now_ms: now,
            lease_until_ms: now.saturating_add(lease_ms),
            lease_token: lease_token.clone(),
        };
        if let Err(existing) = self
            .storage
            .forward_begin(new)
            .await
            .map_err(storage_error)?
        {
            return self.replay(&req, existing);
        }
        let delivery = self
            .storage
            .forward_find(&req.tenant, &req.idempotency_key)
            .await
            .map_err(storage_error)?
            .ok_or_else(|| storage_error(StoreError::Corrupt("the new delivery is gone".into())))?;
        let limit = req
            .deadline_ms
            .map(|deadline| Duration::from_millis(deadline.saturating_sub(now.max(0) as u64)));
        let ended = self.attempt(&delivery, &url, pinned, 1, limit).await;
        let next = self.next(&delivery, 1, &ended);
        let recorded = self
            .storage
            .forward_record(Recorded {
                id: id.clone(),
                lease_token,
                attempt: ended.attempt.clone(),
                next,
                first_outcome: serde_json::to_string(&ended.forwarded).ok(),
                now_ms: crate::now_ms(),
            })
            .await
            .map_err(storage_error)?;
        if !recorded {
            tracing::warn!(delivery = %id, "the first attempt outlived its lease; the outbox took it over");
        }
        Ok(ForwardReply {
            delivery_id: id,
            forwarded: ended.forwarded,
            replay: false,
        })
    }

    /// The key's delivery, unless it ended before the key's retention (then it is swept now, as
    /// the key counts as new: SPEC §4).
    async fn existing(&self, req: &ForwardRequest) -> Result<Option<Delivery>, Refused> {
        let find = || self.storage.forward_find(&req.tenant, &req.idempotency_key);
        let Some(existing) = find().await.map_err(storage_error)? else {
            return Ok(None);
        };
        let cutoff = self.retention.cutoff_ms(crate::now_ms());
        let finished = existing.state == DELIVERED || existing.state == DEAD;
        if !(finished && existing.created_ms < cutoff) {
            return Ok(Some(existing));
        }
        self.sweep(cutoff).await;
        find().await.map_err(storage_error)
    }

    /// Deletes finished deliveries created before `cutoff_ms`, in bounded passes.
    async fn sweep(&self, cutoff_ms: i64) {
        loop {
            match self
                .storage
                .forward_sweep(cutoff_ms, self.retention.sweep_rows)
                .await
            {
                Ok(deleted) if deleted < self.retention.sweep_rows => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("forward sweep: {e}");
                    return;
                }
            }
        }
    }

    /// The answer for a key that has a delivery: its first outcome, or that it is under way.
    fn replay(&self, req: &ForwardRequest, existing: Delivery) -> Result<ForwardReply, Refused> {
        if existing.fingerprint != req.fingerprint {
            return Err((
                Code::IdempotencyKeyReused,
                "the idempotency key was used with another request".into(),
            ));
        }
        self.metrics.outcome("replay");
        let forwarded = existing
            .first_outcome
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_else(|| Forwarded::Error {
                url: existing.url.clone(),
                host: existing.host.clone(),
                error: "a delivery of this idempotency key is under way".into(),
            });
        Ok(ForwardReply {
            delivery_id: existing.id,
            forwarded,
            replay: true,
        })
    }

    /// A retry by the outbox worker: resolves again (each attempt resolves once), delivers,
    /// records under the claim's lease.
    async fn retry(&self, claim: Claimed) {
        let Claimed {
            delivery,
            lease_token,
        } = claim;
        let attempt = delivery.attempts;
        let started = crate::now_ms();
        let ended = match delivery_url(&delivery.url, None) {
            Err((_, e)) => self.failed(&delivery, attempt, started, Instant::now(), e, false),
            Ok(url) => {
                let pinned = match url.host() {
                    Some(host) => resolve::pin(&self.resolver, &self.policy, &host)
                        .await
                        .map_err(|r| format!("{}: {}", r.code(), r.detail())),
                    None => Err("no host".into()),
                };
                match pinned {
                    Ok(ip) => self.attempt(&delivery, &url, ip, attempt, None).await,
                    Err(e) => self.failed(&delivery, attempt, started, Instant::now(), e, true),
                }
            }
        };
        let next = self.next(&delivery, attempt, &ended);
        let recorded = self
            .storage
            .forward_record(Recorded {
                id: delivery.id.clone(),
                lease_token,
                attempt: ended.attempt,
                next,
                first_outcome: serde_json::to_string(&ended.forwarded).ok(),
                now_ms: crate::now_ms(),
            })
            .await;
        match recorded {
            Ok(true) => {}
            Ok(false) => tracing::warn!(delivery = %delivery.id, "an attempt outlived its lease"),
            Err(e) => tracing::warn!(delivery = %delivery.id, "recording an attempt: {e}"),
        }
    }

    /// What follows the attempt, counted.
    fn next(&self, delivery: &Delivery, attempt: u64, ended: &Ended) -> Next {
        let next = if ended.delivered {
            Next::Delivered
        } else {
            outbox::after_failure(
                &self.config,
                delivery,
                attempt,
                ended.retryable,
                ended.retry_after,
                crate::now_ms(),
            )
        };
        self.metrics.outcome(match next {
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "failed",
            Next::Dead => "dead",
        });
        if let Next::Dead = next {
            tracing::warn!(delivery = %delivery.id, attempt, "dead-lettered");
        }
        next
    }

    async fn attempt(
        &self,
        delivery: &Delivery,
        url: &url::Url,
        pinned: std::net::IpAddr,
        attempt: u64,
        limit: Option<Duration>,
    ) -> Ended {
        self.metrics.attempts.inc();
        let started_ms = crate::now_ms();
        let started = Instant::now();
        let created = u64::try_from(started_ms / 1000).unwrap_or(0);
        let headers = signature::headers(&self.key, delivery, attempt, url.as_str(), created);
        let outcome = deliver::send(
            &self.config,
            &self.tls,
            deliver::Request {
                url,
                pinned,
                headers: &headers,
                body: &delivery.body,
            },
            limit,
        )
        .await;
        match outcome {
            deliver::Outcome::Response {
                status,
                pinned_ip,
                response_size,
                retry_after,
            } => {
                self.metrics
                    .delivery_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ended {
                    forwarded: Forwarded::Response {
                        url: delivery.url.clone(),
                        status_code: status,
                        host: delivery.host.clone(),
                        pinned_ip: pinned_ip.to_string(),
                        response_size,
                    },
                    attempt: Attempt {
                        attempt,
                        started_ms,
                        duration_ms: elapsed_ms(started),
                        status_code: Some(status),
                        pinned_ip: Some(pinned_ip.to_string()),
                        response_size: Some(response_size),
                        error: (!(200..300).contains(&status)).then(|| format!("status {status}")),
                    },
                    delivered: (200..300).contains(&status),
                    retryable: status == 429 || status >= 500,
                    retry_after,
                }
            }
            deliver::Outcome::Failed { error } => {
                let mut ended = self.failed(delivery, attempt, started_ms, started, error, true);
                ended.attempt.pinned_ip = Some(pinned.to_string());
                ended
            }
        }
    }

    fn failed(
        &self,
        delivery: &Delivery,
        attempt: u64,
        started_ms: i64,
        started: Instant,
        error: String,
        retryable: bool,
    ) -> Ended {
        Ended {
            forwarded: Forwarded::Error {
                url: delivery.url.clone(),
                host: delivery.host.clone(),
                error: error.clone(),
            },
            attempt: Attempt {
                attempt,
                started_ms,
                duration_ms: elapsed_ms(started),
                status_code: None,
                pinned_ip: None,
                response_size: None,
                error: Some(error),
            },
            delivered: false,
            retryable,
            retry_after: None,
        }
    }
}

fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// The URL a delivery is sent to: the one HEL allowed, without its fragment, its host name
/// the normalized one (UTS 46, no trailing dot) that certificates are checked against.
fn delivery_url(url: &str, normalized_host: Option<&str>) -> Result<url::Url, Refused> {
    let mut url =
        url::Url::parse(url).map_err(|e| (Code::HelBadUrl, format!("forward_url: {e}")))?;
    url.set_fragment(None);
    if let (Some(host), Some(url::Host::Domain(_))) = (normalized_host, url.host()) {
        url.set_host(Some(host))
            .map_err(|e| (Code::HelBadUrl, format!("forward_url host: {e}")))?;
    }
    Ok(url)
}

fn validate(req: &ForwardRequest) -> Result<(), Refused> {
    let bad = |code: Code, detail: &str| Err((code, detail.to_owned()));
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 256 {
        return bad(
            Code::IdempotencyKeyInvalid,
            "the idempotency key must be 1 to 256 bytes",
        );
    }
    if !trace::is_valid_trace_id(&req.trace_id) {
        return bad(
            Code::BadTraceId,
            "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
        );
    }
    if !cid::is_cid(&req.fingerprint) {
        return bad(
            Code::FingerprintInvalid,
            "the fingerprint must be sha256: and 64 lowercase hex digits",
        );
    }
    if req.hop == 0 || cid::cid(req.canon.as_bytes()) != req.cid {
        return bad(
            Code::BadRequest,
            "hop must be >= 1 and cid the CID of canon (the delivered body)",
        );
    }
    Ok(())
}

#[cfg(test)]
impl ForwardService {
    /// Ends the outbox worker, as a crash would.
    pub(crate) fn stop_outbox(&self) {
        let _ = self._stop.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_id_is_one_per_tenant_and_key() {
        let id = delivery_id("demo", "k-1");
        assert!(id.starts_with("dlv_") && id.len() == 36, "{id}");
        assert_eq!(id, delivery_id("demo", "k-1"));
        assert_ne!(id, delivery_id("demo", "k-2"));
        assert_ne!(id, delivery_id("other", "k-1"));
        // the separator keeps ("ab","c") and ("a","bc") apart
        assert_ne!(delivery_id("ab", "c"), delivery_id("a", "bc"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_outbox_worker_turns_healthz_red() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db").to_string_lossy().into_owned();
        let vars = [
            (
                "SP_PRIVATE_KEY_B64",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
            ),
            ("SP_KID", "test-k1"),
            ("SP_FILTER_TOKEN", "filter-token-for-tests-0123456789"),
            ("SP_STORAGE", "sqlite"),
            ("SP_DB_PATH", db.as_str()),
        ];
        let lookup = |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        };
        let config = crate::config::Config::from_lookup(lookup).unwrap();
        let cp = crate::ControlPlane::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routers = crate::api::Routers::new(cp.clone());
        tokio::spawn(async move { axum::serve(listener, routers.public).await });
        let healthz = || async {
            let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        };
        assert_eq!(healthz().await.0, 200);
        cp.forward.stop_outbox();
        let mut last = (0, serde_json::Value::Null);
        for _ in 0..100 {
            last = healthz().await;
            if last.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(last.0, 503, "{}", last.1);
        assert_eq!(
            last.1["reason"],
            "database error: the forward outbox worker stopped"
        );
    }
}
