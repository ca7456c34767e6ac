//! A fake Stripe for the billing tests: `POST /v1/billing/meter_events` as Stripe behaves where
//! it matters to the reporter.
//!
//! - the secret key (`Authorization: Bearer sk_…`), else 401;
//! - a form-encoded body with Stripe's field names only (`event_name`,
//!   `payload[stripe_customer_id]`, `payload[value]` a whole number, `identifier` ≤ 100
//!   characters, `timestamp` within the past 35 days or 5 minutes ahead), else 400
//!   `invalid_request_error` (`Stripe-Should-Retry: false`);
//! - `Idempotency-Key`: a request repeating a key with the same parameters gets the first
//!   answer again (`Idempotent-Replayed: true`), with other parameters 400 `idempotency_error`;
//!   one still running with the same key is 409;
//! - events stored by `identifier`: a second event with a known identifier is refused;
//! - one request at a time per customer and meter, else 429 (Stripe's limit);
//! - faults on demand: 500s and 429s (answered before anything is stored, so not saved for the
//!   key), answers dropped after the event was recorded (the connection closes), answers that
//!   never come, and validation errors for every event.

#![allow(dead_code)]
// The error of these helpers is the HTTP answer itself, returned at once.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};

pub const STRIPE_KEY: &str = "sk_test_signet_fake_0123456789";

/// What the fake does to the next requests (after authentication and validation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Share of requests answered 500 (`Stripe-Should-Retry: true`), nothing stored.
    pub error_500: f64,
    /// Share answered 429 (rate limited), nothing stored.
    pub rate_limited: f64,
    /// Share whose event is recorded (and the key's answer saved) but whose connection is then
    /// closed without an answer.
    pub drop_after_record: f64,
    /// Every event is recorded and its answer saved, then no answer ever comes.
    pub hang_after_record: bool,
    /// Every event is refused as invalid (400, a validation error).
    pub reject_all: bool,
    /// Every request is answered 500 (Stripe down).
    pub always_500: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_name: String,
    pub customer: String,
    pub value: u64,
    pub identifier: String,
    pub timestamp: i64,
    pub idempotency_key: String,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub requests: u64,
    pub unauthorized: u64,
    pub invalid: u64,
    pub replays: u64,
    pub idempotency_errors: u64,
    pub in_use_409: u64,
    pub duplicate_identifiers: u64,
    pub injected_500: u64,
    pub injected_429: u64,
    pub concurrency_429: u64,
    pub dropped: u64,
    pub hung: u64,
}

enum Saved {
    /// A request with this key is being handled.
    Running,
    Done {
        status: u16,
        body: Value,
    },
}

#[derive(Default)]
struct Inner {
    faults: Faults,
    rng: u64,
    events: HashMap<String, Event>,
    /// identifier → order recorded
    order: Vec<String>,
    keys: HashMap<String, (Vec<(String, String)>, Saved)>,
    in_flight: HashSet<(String, String)>,
    counts: Counts,
}

#[derive(Clone, Default)]
pub struct FakeStripe {
    inner: Arc<Mutex<Inner>>,
}

/// Closes the request's connection when notified (the "dropped answer").
#[derive(Clone)]
struct Hangup(Arc<tokio::sync::Notify>);

pub struct Running {
    pub fake: FakeStripe,
    pub base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    /// Serves the fake on a loopback port.
    pub async fn start() -> Running {
        let fake = FakeStripe::default();
        fake.inner.lock().unwrap().rng = 0x5eed_1234_abcd_ef01;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let router = Router::new()
            .route("/v1/billing/meter_events", post(meter_events))
            .with_state(fake.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hangup = Arc::new(tokio::sync::Notify::new());
                let service = TowerToHyperService::new(
                    router.clone().layer(Extension(Hangup(hangup.clone()))),
                );
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        () = hangup.notified() => {} // dropped: the socket closes unanswered
                    }
                });
            }
        });
        Running {
            fake,
            base_url,
            task,
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().unwrap().faults = faults;
    }

    pub fn events(&self) -> Vec<Event> {
        let inner = self.inner.lock().unwrap();
        inner
            .order
            .iter()
            .map(|i| inner.events[i].clone())
            .collect()
    }

    /// The sum of values Stripe holds per meter (`event_name`).
    pub fn sums(&self) -> HashMap<String, u64> {
        let mut sums = HashMap::new();
        for e in self.events() {
            *sums.entry(e.event_name).or_default() += e.value;
        }
        sums
    }

    pub fn counts<T>(&self, f: impl FnOnce(&Counts) -> T) -> T {
        f(&self.inner.lock().unwrap().counts)
    }
}

fn stripe_error(
    status: u16,
    kind: &str,
    code: &str,
    message: &str,
    retry: Option<bool>,
) -> Response {
    let body = json!({"error": {"type": kind, "code": code, "message": message}});
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    if let Some(retry) = retry {
        response.headers_mut().insert(
            "stripe-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    response
}

fn invalid(message: &str) -> Response {
    stripe_error(
        400,
        "invalid_request_error",
        "parameter_invalid",
        message,
        Some(false),
    )
}

const FIELDS: [&str; 5] = [
    "event_name",
    "payload[stripe_customer_id]",
    "payload[value]",
    "identifier",
    "timestamp",
];

/// The event of a valid form, or Stripe's validation error.
fn parse(form: &[(String, String)], key: &str) -> Result<Event, Response> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for (name, value) in form {
        if !FIELDS.contains(&name.as_str()) {
            return Err(invalid(&format!("Received unknown parameter: {name}")));
        }
        if fields.insert(name, value).is_some() {
            return Err(invalid(&format!("{name} is given twice")));
        }
    }
    let get = |name: &str| {
        fields
            .get(name)
            .copied()
            .ok_or_else(|| invalid(&format!("Missing required param: {name}.")))
    };
    let event_name = get("event_name")?;
    if event_name.is_empty() || event_name.len() > 100 {
        return Err(invalid("event_name: 1 to 100 characters"));
    }
    let customer = get("payload[stripe_customer_id]")?;
    let value = get("payload[value]")?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("payload[value] must be a whole number"));
    }
    let identifier = get("identifier")?;
    if identifier.is_empty() || identifier.len() > 100 {
        return Err(invalid("identifier: 1 to 100 characters"));
    }
    let timestamp: i64 = get("timestamp")?
        .parse()
        .map_err(|_| invalid("timestamp must be an integer"))?;
    let now = signet_control_plane::now_ms() / 1000;
    if timestamp < now - 35 * 24 * 3600 || timestamp > now + 300 {
        return Err(invalid(
            "timestamp must be within the past 35 days or 5 minutes ahead",
        ));
    }
    Ok(Event {
        event_name: event_name.into(),
        customer: customer.into(),
        value: value
            .parse()
            .map_err(|_| invalid("payload[value] too large"))?,
        identifier: identifier.into(),
        timestamp,
        idempotency_key: key.into(),
    })
}

impl Inner {
    fn roll(&mut self) -> f64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A request past its checks: what the second half of the handler needs.
struct Accepted {
    event: Event,
    key: String,
    params: Vec<(String, String)>,
    lane: (String, String),
    faults: Faults,
}

async fn meter_events(
    State(fake): State<FakeStripe>,
    Extension(Hangup(hangup)): Extension<Hangup>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let accepted = match fake.check(&headers, &body) {
        Ok(a) => a,
        Err(response) => return response,
    };
    // Should the client go away now (its timeout), the request ends unrecorded, as in Stripe.
    let mut guard = Unrecorded {
        fake: fake.clone(),
        lane: accepted.lane.clone(),
        key: accepted.key.clone(),
        armed: true,
    };
    // Stripe takes a moment; a concurrent request of the same lane or key meets this one.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    guard.armed = false;
    let (status, body, hang, drop_it) = fake.record(accepted);
    if drop_it {
        hangup.notify_one();
    }
    if hang || drop_it {
        std::future::pending::<()>().await;
    }
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

/// Releases the lane and the key of a request dropped before it was recorded.
struct Unrecorded {
    fake: FakeStripe,
    lane: (String, String),
    key: String,
    armed: bool,
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.fake.inner.lock().unwrap();
            inner.in_flight.remove(&self.lane);
            if matches!(inner.keys.get(&self.key), Some((_, Saved::Running))) {
                inner.keys.remove(&self.key);
            }
        }
    }
}

impl FakeStripe {
    /// Authentication, form, idempotency, validation and injected faults: `Err` is the answer.
    fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<Accepted, Response> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        inner.counts.requests += 1;
        if header("authorization") != Some(&format!("Bearer {STRIPE_KEY}")) {
            inner.counts.unauthorized += 1;
            return Err(stripe_error(
                401,
                "invalid_request_error",
                "api_key_invalid",
                "Invalid API Key provided",
                None,
            ));
        }
        if header("content-type") != Some("application/x-www-form-urlencoded") {
            inner.counts.invalid += 1;
            return Err(invalid("the body must be form-encoded"));
        }
        let Some(key) = header("idempotency-key").map(String::from) else {
            inner.counts.invalid += 1;
            return Err(invalid("the reporter always sends an Idempotency-Key"));
        };
        if key.len() > 255 {
            inner.counts.invalid += 1;
            return Err(invalid("Idempotency-Key: at most 255 characters"));
        }
        let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let faults = inner.faults;
        if faults.always_500 {
            inner.counts.injected_500 += 1;
            return Err(stripe_error(
                500,
                "api_error",
                "",
                "Stripe is down",
                Some(true),
            ));
        }
        let mut params = form.clone();
        params.sort();
        // Answers of an earlier request with this key.
        if let Some((saved_params, saved)) = inner.keys.get(&key) {
            if *saved_params != params {
                inner.counts.idempotency_errors += 1;
                return Err(stripe_error(
                    400,
                    "idempotency_error",
                    "",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                    Some(false),
                ));
            }
            return Err(match saved {
                Saved::Running => {
                    inner.counts.in_use_409 += 1;
                    stripe_error(
                        409,
                        "idempotency_error",
                        "idempotency_key_in_use",
                        "in use",
                        Some(true),
                    )
                }
                Saved::Done { status, body } => {
                    let mut response = (
                        StatusCode::from_u16(*status).unwrap(),
                        axum::Json(body.clone()),
                    )
                        .into_response();
                    response
                        .headers_mut()
                        .insert("idempotent-replayed", HeaderValue::from_static("true"));
                    inner.counts.replays += 1;
                    response
                }
            });
        }
        let event = match parse(&form, &key) {
            Ok(e) => e,
            Err(response) => {
                // a validation error is not saved for the key (Stripe's rule)
                inner.counts.invalid += 1;
                return Err(response);
            }
        };
        if faults.reject_all {
            inner.counts.invalid += 1;
            return Err(stripe_error(
                400,
                "invalid_request_error",
                "resource_missing",
                "No such customer",
                Some(false),
            ));
        }
        let roll = inner.roll();
        if roll < faults.error_500 {
            inner.counts.injected_500 += 1;
            return Err(stripe_error(
                500,
                "api_error",
                "",
                "An unknown error occurred",
                Some(true),
            ));
        }
        if roll < faults.error_500 + faults.rate_limited {
            inner.counts.injected_429 += 1;
            return Err(stripe_error(
                429,
                "rate_limit_error",
                "rate_limit",
                "Too many requests",
                Some(true),
            ));
        }
        let lane = (event.customer.clone(), event.event_name.clone());
        if !inner.in_flight.insert(lane.clone()) {
            inner.counts.concurrency_429 += 1;
            return Err(stripe_error(
                429,
                "rate_limit_error",
                "lock_timeout",
                "one request at a time per customer and meter",
                Some(true),
            ));
        }
        inner
            .keys
            .insert(key.clone(), (params.clone(), Saved::Running));
        Ok(Accepted {
            event,
            key,
            params,
            lane,
            faults,
        })
    }

    /// Stores the event (unless its identifier is known) and the key's answer: (status, body,
    /// hang, drop the connection).
    fn record(&self, a: Accepted) -> (u16, Value, bool, bool) {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        inner.in_flight.remove(&a.lane);
        let event = a.event;
        let (status, body) = if inner.events.contains_key(&event.identifier) {
            inner.counts.duplicate_identifiers += 1;
            (
                400,
                json!({"error": {"type": "invalid_request_error", "code": "resource_already_exists",
                                  "message": "An event with this identifier already exists"}}),
            )
        } else {
            let body = json!({
                "object": "billing.meter_event", "event_name": event.event_name,
                "identifier": event.identifier, "livemode": false, "timestamp": event.timestamp,
                "payload": {"stripe_customer_id": event.customer, "value": event.value.to_string()},
            });
            inner.order.push(event.identifier.clone());
            inner.events.insert(event.identifier.clone(), event);
            (200, body)
        };
        inner.keys.insert(
            a.key,
            (
                a.params,
                Saved::Done {
                    status,
                    body: body.clone(),
                },
            ),
        );
        let hang = status == 200 && a.faults.hang_after_record;
        let drop_it = status == 200 && !hang && inner.roll() < a.faults.drop_after_record;
        if hang {
            inner.counts.hung += 1;
        }
        if drop_it {
            inner.counts.dropped += 1;
        }
        (status, body, hang, drop_it)
    }
}

/// Checks the fake against what the reporter relies on.
pub async fn self_test() {
    let stripe = FakeStripe::start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/billing/meter_events", stripe.base_url);
    let ts = (signet_control_plane::now_ms() / 1000).to_string();
    let form = |value: &str| {
        vec![
            ("event_name", "vex_t1".to_string()),
            ("payload[stripe_customer_id]", "cus_1".to_string()),
            ("payload[value]", value.to_string()),
            ("identifier", "id-1".to_string()),
            ("timestamp", ts.clone()),
        ]
    };
    let send = |key: &str, form: Vec<(&'static str, String)>, auth: &str| {
        http.post(&url)
            .header("Authorization", format!("Bearer {auth}"))
            .header("Idempotency-Key", key)
            .form(&form)
            .send()
    };
    assert_eq!(
        send("k1", form("5"), "sk_test_wrong")
            .await
            .unwrap()
            .status(),
        401
    );
    let first = send("k1", form("5"), STRIPE_KEY).await.unwrap();
    assert_eq!(first.status(), 200);
    let replay = send("k1", form("5"), STRIPE_KEY).await.unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let other = send("k1", form("6"), STRIPE_KEY).await.unwrap();
    assert_eq!(other.status(), 400);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["type"], "idempotency_error");
    let duplicate = send("k2", form("5"), STRIPE_KEY).await.unwrap();
    assert_eq!(duplicate.status(), 400, "a known identifier is refused");
    let mut bad = form("1.5");
    bad[3].1 = "id-2".into();
    assert_eq!(send("k3", bad, STRIPE_KEY).await.unwrap().status(), 400);
    let mut unknown = form("1");
    unknown[0].0 = "event";
    assert_eq!(send("k4", unknown, STRIPE_KEY).await.unwrap().status(), 400);
    // a dropped answer: recorded, then the connection closes
    stripe.fake.set_faults(Faults {
        drop_after_record: 1.0,
        ..Faults::default()
    });
    let mut dropped = form("7");
    dropped[3].1 = "id-3".into();
    assert!(send("k5", dropped.clone(), STRIPE_KEY).await.is_err());
    stripe.fake.set_faults(Faults::default());
    let retry = send("k5", dropped, STRIPE_KEY).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(stripe.fake.sums()["vex_t1"], 12);
    assert_eq!(stripe.fake.events().len(), 2);
}
