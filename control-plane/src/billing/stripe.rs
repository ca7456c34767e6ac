//! The Stripe client: `POST {SP_STRIPE_BASE_URL}/v1/billing/meter_events`, form-encoded, with
//! the secret key as a bearer token and the report's `Idempotency-Key`; and what each answer
//! means for the report ([`Outcome`]).
//!
//! The v2 meter event stream (sessions, 100 events a request) could replace [`StripeClient::send`]
//! for scale without touching the queue or the reports: a report is already one event with a
//! fixed identifier.

use std::time::Duration;

use super::settings::StripeSettings;

/// One meter event, as Stripe's `POST /v1/billing/meter_events` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent<'a> {
    pub event_name: &'a str,
    pub stripe_customer_id: &'a str,
    /// `payload[value]`: a whole number.
    pub value: u64,
    pub identifier: &'a str,
    /// Unix seconds: the start of the report's window.
    pub timestamp: i64,
}

impl MeterEvent<'_> {
    /// The form fields, in Stripe's names.
    pub fn form(&self) -> [(&'static str, String); 5] {
        [
            ("event_name", self.event_name.to_owned()),
            (
                "payload[stripe_customer_id]",
                self.stripe_customer_id.to_owned(),
            ),
            ("payload[value]", self.value.to_string()),
            ("identifier", self.identifier.to_owned()),
            ("timestamp", self.timestamp.to_string()),
        ]
    }
}

/// What an attempt means for its report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stripe holds the event (a replayed answer of the same key included).
    Reported,
    /// Try again later with the same identifier, key and value: the event may or may not be
    /// recorded (a 500, a timeout, a dropped connection), or was refused for now (429, 409).
    Retry(String),
    /// Stripe refused the event itself (a validation error): sending it again cannot help.
    Dead(String),
}

pub struct StripeClient {
    http: reqwest::Client,
    url: String,
    authorization: String,
}

impl StripeClient {
    pub fn new(settings: &StripeSettings) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("cannot build the Stripe client: {e}"))?;
        Ok(StripeClient {
            http,
            url: format!("{}/v1/billing/meter_events", settings.base_url),
            authorization: format!("Bearer {}", settings.api_key),
        })
    }

    /// Sends `event` once.
    pub async fn send(&self, event: &MeterEvent<'_>, idempotency_key: &str) -> Outcome {
        let sent = self
            .http
            .post(&self.url)
            .header("Authorization", &self.authorization)
            .header("Idempotency-Key", idempotency_key)
            .form(&event.form())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            // Indeterminate: Stripe may have recorded it. The same key makes a resend safe.
            Err(e) => return Outcome::Retry(format!("no answer from Stripe: {}", error_chain(&e))),
        };
        let status = response.status().as_u16();
        let should_retry = response
            .headers()
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        let body = response.text().await.unwrap_or_default();
        classify(status, should_retry, &body)
    }
}

/// What Stripe's answer means. `Stripe-Should-Retry`, when present, decides; else 409
/// (a concurrent request with the same key), 429 (rate limit), 5xx (500 is indeterminate),
/// and 401/403 (a key to fix, not an event to drop) are retried, and any other 4xx (a
/// validation error) is dead at once.
pub fn classify(status: u16, should_retry: Option<bool>, body: &str) -> Outcome {
    if (200..300).contains(&status) {
        return Outcome::Reported;
    }
    let detail = format!("Stripe answered {status}: {}", error_summary(body));
    match should_retry {
        Some(true) => Outcome::Retry(detail),
        Some(false) => Outcome::Dead(detail),
        None if matches!(status, 401 | 403 | 409 | 429) || status >= 500 => Outcome::Retry(detail),
        None => Outcome::Dead(detail),
    }
}

/// `type/code: message` of a Stripe error body, or the start of the body.
fn error_summary(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let summary = match parsed.as_ref().map(|v| &v["error"]) {
        Some(e) if e.is_object() => format!(
            "{}/{}: {}",
            e["type"].as_str().unwrap_or("?"),
            e["code"].as_str().unwrap_or("-"),
            e["message"].as_str().unwrap_or("")
        ),
        _ => body.to_owned(),
    };
    summary.chars().take(300).collect()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_retried_or_dead_as_stripe_says() {
        assert_eq!(classify(200, None, "{}"), Outcome::Reported);
        for status in [409, 429, 500, 502, 503, 401] {
            assert!(
                matches!(classify(status, None, ""), Outcome::Retry(_)),
                "{status}"
            );
        }
        for status in [400, 404, 402] {
            assert!(
                matches!(classify(status, None, ""), Outcome::Dead(_)),
                "{status}"
            );
        }
        assert!(matches!(classify(500, Some(false), ""), Outcome::Dead(_)));
        assert!(matches!(classify(400, Some(true), ""), Outcome::Retry(_)));
        let body = r#"{"error":{"type":"invalid_request_error","code":"parameter_missing","message":"Missing event_name"}}"#;
        assert_eq!(
            classify(400, None, body),
            Outcome::Dead(
                "Stripe answered 400: invalid_request_error/parameter_missing: Missing event_name"
                    .into()
            )
        );
    }

    #[test]
    fn the_form_uses_stripes_field_names() {
        let event = MeterEvent {
            event_name: "vex_t1",
            stripe_customer_id: "cus_1",
            value: 42,
            identifier: "sgn_x",
            timestamp: 1_800_000_000,
        };
        let names: Vec<_> = event.form().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "event_name",
                "payload[stripe_customer_id]",
                "payload[value]",
                "identifier",
                "timestamp"
            ]
        );
        assert_eq!(event.form()[2].1, "42");
    }
}
