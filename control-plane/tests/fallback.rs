//! `POST /v1/internal/repair` against a fake OpenAI-compatible provider: FU metered exactly
//! once per provider call (the fake's own token counts), replays metering nothing, provider
//! failures metering nothing with clear codes, unusable answers metered and refused, and the
//! monthly quota never overshot by concurrent repairs on one or two instances.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_openai::{Behaviour, FakeOpenAi, MODEL, OPENAI_KEY};
use common::*;
use serde_json::{json, Value};
use signet_control_plane::fallback::{prepare, FallbackConfig};
use signet_control_plane::storage::fallback::{Reservation, Reserved};
use signet_protocol::internal::repair::RepairRequest;

both_backends!(
    a_repair_meters_the_providers_tokens_once_and_a_replay_meters_nothing,
    unusable_answers_are_metered_and_refused,
    concurrent_repairs_never_exceed_the_monthly_limit,
    a_reservation_that_never_settles_stops_counting_when_it_expires,
    settled_repairs_and_dead_reservations_go_with_the_idempotency_retention,
    a_provider_call_settled_twice_is_metered_and_billed_once,
);

mod sqlite_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_failures_meter_nothing_and_answer_clear_codes() {
        super::provider_failures_meter_nothing_and_answer_clear_codes(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn who_may_repair_and_what_is_refused_before_any_call() {
        super::who_may_repair_and_what_is_refused_before_any_call(Backend::Sqlite).await
    }
}

mod postgres_only {
    use super::*;

    /// The issue's quota test: a limit that fits N repairs, 4N concurrent repairs across two
    /// control planes over one PostgreSQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_never_exceed_the_monthly_limit_together() {
        super::quota_across_instances(Backend::Postgres, 2).await
    }
}

/// The broken tool-call arguments deterministic repair cannot fix (a missing quote in the
/// middle of a value), and what the fake answers for them.
const BROKEN: &str =
    r#"{"invoice_id": "inv-42", "amount": 1250.5, "currency": EUR", "note": "it's late"}"#;
const REPAIRED: &str =
    r#"{"invoice_id":"inv-42","amount":1250.5,"currency":"EUR","note":"it's late"}"#;
const MAX_TOKENS: u32 = 200;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "invoice_id": {"type": "string"},
            "amount": {"type": "number"},
            "currency": {"type": "string"},
            "note": {"type": "string"}
        },
        "required": ["invoice_id", "amount", "currency", "note"],
        "additionalProperties": false
    })
}

fn repair_request(tenant: &str, key: &str, text: &str) -> Value {
    json!({"tenant": tenant, "idempotency_key": key, "payload_type": "invoice.v1",
           "location": "/arguments", "text": text, "schema": schema()})
}

/// The estimate the control plane reserves for [`repair_request`]'s text.
fn estimate_of(text: &str) -> u64 {
    let config = FallbackConfig {
        base_url: String::new(),
        api_key: None,
        model: MODEL.into(),
        timeout: Duration::from_secs(2),
        max_tokens: MAX_TOKENS,
    };
    let json = repair_request("demo", "k", text).to_string();
    let request: RepairRequest = serde_json::from_str(&json).unwrap();
    prepare(&config, &request).estimate
}

/// A database whose tenant `demo` has the fallback (with `limit`), `other` has not, and a
/// provider: `fake`.
async fn setup(backend: Backend, limit: Option<u64>, fake: &FakeOpenAi) -> TestDb {
    let mut db = TestDb::new(backend).await;
    db.set(
        "SP_API_KEYS",
        &json!({
            DEMO_KEY: {"tenant": "demo", "fallback_enabled": true, "fu_monthly_limit": limit,
                       "stripe_item_fu": "si_fu"},
            OTHER_KEY: {"tenant": "other"},
        })
        .to_string(),
    );
    db.set("SP_OPENAI_BASE_URL", &fake.base_url);
    db.set("SP_OPENAI_API_KEY", OPENAI_KEY);
    db.set("SP_OPENAI_MODEL", MODEL);
    db.set("SP_OPENAI_TIMEOUT_MS", "2000");
    db.set("SP_OPENAI_MAX_TOKENS", &MAX_TOKENS.to_string());
    db
}

async fn repair(server: &Server, key: &str, text: &str) -> Reply {
    server
        .internal("repair", &repair_request("demo", key, text))
        .await
}

fn code(r: &Reply) -> (u16, &str) {
    (r.status, r.body["code"].as_str().unwrap_or(""))
}

async fn fu_of(server: &Server) -> u64 {
    server.usage("demo").await["fu"].as_u64().unwrap()
}

/// The value of a metric line `name` (labels included) in the `/metrics` text.
async fn metric(server: &Server, name: &str) -> f64 {
    let text = server.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn a_repair_meters_the_providers_tokens_once_and_a_replay_meters_nothing(backend: Backend) {
    let fake = FakeOpenAi::start().await;
    fake.repair_with(REPAIRED);
    fake.tokens(61, 23);
    let db = setup(backend, Some(100_000), &fake).await;
    let server = Server::start(&db).await;

    let r = repair(&server, "k1", BROKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"repaired": REPAIRED, "fu_tokens": 84, "usage_estimated": false, "replay": false})
    );
    assert_eq!(fake.problems(), Vec::<String>::new());
    assert_eq!(fake.calls(), 1);
    let sent = fake.last_request().unwrap();
    assert_eq!(sent["messages"][1]["content"], BROKEN, "the text, verbatim");
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(sent["response_format"]["json_schema"]["schema"], schema());
    assert_eq!(sent["max_tokens"], MAX_TOKENS);

    let usage = server.usage("demo").await;
    assert_eq!(usage["fu"], 84);
    assert_eq!(usage["vex"], 0, "a repair is not an exchange");
    let fu_rows: Vec<(u64, Value)> = usage["billing_queue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["meter"] == "fu")
        .map(|row| (row["units"].as_u64().unwrap(), row["stripe_item"].clone()))
        .collect();
    assert_eq!(fu_rows, vec![(84, json!("si_fu"))]);

    // the same request again: the stored answer, no call, nothing metered
    let again = repair(&server, "k1", BROKEN).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["replay"], true);
    assert_eq!(
        (
            again.body["repaired"].as_str(),
            again.body["fu_tokens"].as_u64()
        ),
        (Some(REPAIRED), Some(84))
    );
    // the key with another text
    let reused = repair(&server, "k1", "{\"amount\": 1}x").await;
    assert_eq!(code(&reused), (422, "IDEMPOTENCY_KEY_REUSED"));
    assert_eq!(fake.calls(), 1);
    assert_eq!(fu_of(&server).await, 84);

    // the exchange then commits a receipt stating fu_tokens 84: counted once, by the repair
    let receipt = sign_receipt(&signing_key(), "t-fallback", 1, None, "demo");
    let committed = server
        .commit("demo", "k1", &fingerprint(b"k1"), &receipt, 84)
        .await;
    assert_eq!(committed.status, 200, "{}", committed.body);
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        (Some(1), Some(84))
    );

    // a second repair of another key: the month adds up
    fake.tokens(10, 5);
    assert_eq!(repair(&server, "k2", BROKEN).await.status, 200);
    assert_eq!(fu_of(&server).await, 99);
    assert_eq!(
        metric(&server, "signet_fu_tokens_total{tenant=\"demo\"}").await,
        99.0
    );
    assert_eq!(metric(&server, "signet_fallback_used_total").await, 2.0);
    assert_eq!(metric(&server, "signet_fallback_replays_total").await, 1.0);
    assert_eq!(
        metric(&server, "signet_fallback_actual_tokens_sum").await,
        99.0
    );
    let estimated = metric(
        &server,
        "signet_fallback_estimated_tokens_sum{method=\"tokenizer\"}",
    )
    .await;
    assert_eq!(estimated, 2.0 * estimate_of(BROKEN) as f64);
    assert_eq!(fake.problems(), Vec::<String>::new());
    server.stop().await;
    db.cleanup().await;
}

async fn unusable_answers_are_metered_and_refused(backend: Backend) {
    let fake = FakeOpenAi::start().await;
    fake.tokens(30, 12);
    let db = setup(backend, None, &fake).await;
    let server = Server::start(&db).await;
    let estimate = estimate_of(BROKEN);
    let mut metered = 0;
    let cases: Vec<(Behaviour, (u16, &str), u64)> = vec![
        (Behaviour::Refuse, (422, "FALLBACK_REFUSED"), 42),
        (Behaviour::Truncated, (422, "FALLBACK_INVALID"), 42),
        (
            Behaviour::Answer {
                content: "Sure! Here is the JSON: {\"amount\": 1}".into(),
                usage: true,
            },
            (422, "FALLBACK_INVALID"),
            42,
        ),
        (
            Behaviour::Answer {
                content: r#"{"a":1,"a":2}"#.into(),
                usage: true,
            },
            (422, "FALLBACK_INVALID"),
            42,
        ),
        // no usage to read: metered at the estimate
        (Behaviour::Malformed, (422, "FALLBACK_INVALID"), estimate),
        (
            Behaviour::Huge(2 << 20),
            (422, "FALLBACK_INVALID"),
            estimate,
        ),
    ];
    for (i, (behaviour, expected, fu)) in cases.into_iter().enumerate() {
        fake.answer(behaviour.clone());
        let key = format!("bad-{i}");
        let r = repair(&server, &key, BROKEN).await;
        assert_eq!(code(&r), expected, "{behaviour:?}: {}", r.body);
        metered += fu;
        assert_eq!(fu_of(&server).await, metered, "{behaviour:?}");
        // a replay answers the same refusal without a call or a charge
        let calls = fake.calls();
        let again = repair(&server, &key, BROKEN).await;
        assert_eq!(code(&again), expected);
        assert_eq!(fake.calls(), calls);
        assert_eq!(fu_of(&server).await, metered);
    }
    // a usable answer without usage: accepted, metered at the estimate and flagged
    fake.answer(Behaviour::Answer {
        content: REPAIRED.into(),
        usage: false,
    });
    let r = repair(&server, "no-usage", BROKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["fu_tokens"].as_u64(), &r.body["usage_estimated"]),
        (Some(estimate), &json!(true))
    );
    assert_eq!(fu_of(&server).await, metered + estimate);
    assert_eq!(
        metric(&server, "signet_fallback_usage_missing_total").await,
        3.0
    );
    assert_eq!(
        metric(&server, "signet_fallback_errors_total{kind=\"refused\"}").await,
        1.0
    );
    assert_eq!(fake.problems(), Vec::<String>::new());
    server.stop().await;
    db.cleanup().await;
}

async fn provider_failures_meter_nothing_and_answer_clear_codes(backend: Backend) {
    let fake = FakeOpenAi::start().await;
    let db = setup(backend, Some(10_000), &fake).await;
    let server = Server::start(&db).await;
    let month = signet_control_plane::fallback::quota::month_of(signet_control_plane::now_ms());
    for (behaviour, expected) in [
        (Behaviour::Status(500), (502, "FALLBACK_PROVIDER_ERROR")),
        (Behaviour::Status(503), (502, "FALLBACK_PROVIDER_ERROR")),
        (Behaviour::Status(400), (502, "FALLBACK_PROVIDER_ERROR")),
        (Behaviour::Status(429), (503, "FALLBACK_UNAVAILABLE")),
    ] {
        fake.answer(behaviour.clone());
        let r = repair(&server, "k-fail", BROKEN).await;
        assert_eq!(code(&r), expected, "{behaviour:?}: {}", r.body);
        assert_eq!(fu_of(&server).await, 0);
        let held = server
            .cp
            .storage
            .fallback()
            .reserved_tokens("demo", &month, signet_control_plane::now_ms())
            .await
            .unwrap();
        assert_eq!(held, 0, "the reservation is released");
    }
    // slower than SP_OPENAI_TIMEOUT_MS: 504 within the timeout, not a hang
    fake.repair_with(REPAIRED);
    fake.delay(Duration::from_secs(5));
    let started = Instant::now();
    let r = repair(&server, "k-fail", BROKEN).await;
    assert_eq!(code(&r), (504, "FALLBACK_TIMEOUT"), "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fu_of(&server).await, 0);
    // nothing was stored for the key: it repairs once the provider answers
    fake.delay(Duration::ZERO);
    let r = repair(&server, "k-fail", BROKEN).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(fu_of(&server).await, fake.total_tokens());
    assert_eq!(
        metric(&server, "signet_fallback_errors_total{kind=\"timeout\"}").await,
        1.0
    );
    assert_eq!(
        metric(&server, "signet_fallback_errors_total{kind=\"status_5xx\"}").await,
        2.0
    );
    assert_eq!(fake.calls(), 6);
    assert_eq!(fake.problems(), Vec::<String>::new());
    server.stop().await;

    // a provider that is not listening: 503, quickly
    let mut db = db;
    db.set("SP_OPENAI_BASE_URL", "http://127.0.0.1:9/v1");
    let server = Server::start(&db).await;
    let r = repair(&server, "k-down", BROKEN).await;
    assert_eq!(code(&r), (503, "FALLBACK_UNAVAILABLE"), "{}", r.body);
    server.stop().await;
    db.cleanup().await;
}

async fn who_may_repair_and_what_is_refused_before_any_call(backend: Backend) {
    let fake = FakeOpenAi::start().await;
    fake.repair_with(REPAIRED);
    let mut db = setup(backend, Some(1), &fake).await;
    let server = Server::start(&db).await;
    let other = server
        .internal("repair", &repair_request("other", "k", BROKEN))
        .await;
    assert_eq!(code(&other), (403, "FALLBACK_DISABLED"));
    let nobody = server
        .internal("repair", &repair_request("nobody", "k", BROKEN))
        .await;
    assert_eq!(code(&nobody), (403, "UNKNOWN_TENANT"));
    // a limit of 1 FU fits no repair: 429 before any call
    let r = repair(&server, "k", BROKEN).await;
    assert_eq!(code(&r), (429, "FU_QUOTA_EXCEEDED"), "{}", r.body);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("fu_monthly_limit 1"));
    let huge = repair(&server, "k-big", &"x".repeat(64 * 1024 + 1)).await;
    assert_eq!(code(&huge), (413, "BODY_TOO_LARGE"));
    let no_key = repair(&server, "", BROKEN).await;
    assert_eq!(code(&no_key), (400, "IDEMPOTENCY_KEY_INVALID"));
    let unauthorized = server
        .http
        .post(server.url("/v1/internal/repair"))
        .json(&repair_request("demo", "k", BROKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(fake.calls(), 0);
    assert_eq!(
        metric(&server, "signet_fu_quota_denials_total{tenant=\"demo\"}").await,
        1.0
    );
    server.stop().await;
    // without SP_OPENAI_API_KEY there is no provider
    db.env.remove("SP_OPENAI_API_KEY");
    let server = Server::start(&db).await;
    let r = repair(&server, "k", BROKEN).await;
    assert_eq!(code(&r), (503, "FALLBACK_UNAVAILABLE"));
    assert_eq!(fake.calls(), 0);
    server.stop().await;
    db.cleanup().await;
}

async fn concurrent_repairs_never_exceed_the_monthly_limit(backend: Backend) {
    quota_across_instances(backend, 1).await
}

/// A limit that fits N = 3 repairs (each metered at exactly its estimate E: the fake reports
/// E tokens), 4N concurrent repairs of distinct keys spread over `instances` control planes:
/// exactly N succeed, the month never exceeds the limit, the rest are 429 without a call.
/// (Exactly N: a repair is refused only once N others hold or used E each, and those N all
/// succeed.)
async fn quota_across_instances(backend: Backend, instances: usize) {
    const N: u64 = 3;
    let fake = FakeOpenAi::start().await;
    fake.repair_with(REPAIRED);
    let e = estimate_of(BROKEN);
    fake.tokens(e - 1, 1);
    fake.delay(Duration::from_millis(300));
    let limit = N * e + e / 2;
    let db = setup(backend, Some(limit), &fake).await;
    let mut servers = Vec::new();
    for _ in 0..instances {
        servers.push(Arc::new(Server::start(&db).await));
    }
    let mut tasks = Vec::new();
    for i in 0..4 * N {
        let server = servers[i as usize % instances].clone();
        tasks.push(tokio::spawn(async move {
            repair(&server, &format!("q{i}"), BROKEN).await
        }));
    }
    let mut ok = 0;
    let mut denied = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match code(&r) {
            (200, _) => ok += 1,
            (429, "FU_QUOTA_EXCEEDED") => denied += 1,
            other => panic!("unexpected {other:?}: {}", r.body),
        }
    }
    assert_eq!((ok, denied), (N, 3 * N));
    assert_eq!(fake.calls(), N, "no provider call for a denied repair");
    let fu = fu_of(&servers[0]).await;
    assert_eq!(fu, N * e);
    assert!(fu <= limit);
    let mut denials = 0.0;
    for s in &servers {
        denials += metric(s, "signet_fu_quota_denials_total{tenant=\"demo\"}").await;
    }
    assert_eq!(denials, (3 * N) as f64);
    // the month is full: the next repair is refused too
    let r = repair(&servers[0], "after", BROKEN).await;
    assert_eq!(code(&r), (429, "FU_QUOTA_EXCEEDED"));
    assert_eq!(fake.calls(), N);
    for s in servers {
        Arc::into_inner(s).unwrap().stop().await;
    }
    db.cleanup().await;
}

async fn a_reservation_that_never_settles_stops_counting_when_it_expires(backend: Backend) {
    let fake = FakeOpenAi::start().await;
    let db = setup(backend, Some(1000), &fake).await;
    let server = Server::start(&db).await;
    let store = server.cp.storage.fallback();
    let now = signet_control_plane::now_ms();
    let reservation = |id: &str, key: &str, tokens: u64, expires_ms: i64| Reservation {
        id: id.into(),
        tenant: "demo".into(),
        month: "2026-12".into(),
        idempotency_key: key.into(),
        fingerprint: "sha256:f".into(),
        tokens,
        limit: Some(1000),
        now_ms: now,
        expires_ms,
    };
    // a call that died mid-way holds 900 until it expires
    assert_eq!(
        store
            .reserve(reservation("r1", "dead", 900, now + 1_000))
            .await,
        Ok(Reserved::Reserved)
    );
    assert_eq!(
        store
            .reserve(reservation("r2", "next", 200, now + 60_000))
            .await,
        Ok(Reserved::Denied {
            settled: 0,
            reserved: 900
        })
    );
    assert_eq!(
        store
            .reserve(reservation("r3", "dead", 10, now + 60_000))
            .await,
        Ok(Reserved::InFlight),
        "one call in flight per key"
    );
    // later: the dead reservation no longer counts, and its key may be tried again
    let later = |r: Reservation| Reservation {
        now_ms: now + 2_000,
        ..r
    };
    assert_eq!(
        store
            .reserve(later(reservation("r4", "next", 200, now + 60_000)))
            .await,
        Ok(Reserved::Reserved)
    );
    assert_eq!(
        store
            .reserve(later(reservation("r5", "dead", 700, now + 60_000)))
            .await,
        Ok(Reserved::Reserved)
    );
    assert_eq!(
        store.reserved_tokens("demo", "2026-12", now + 2_000).await,
        Ok(900)
    );
    store.release("r5").await.unwrap();
    assert_eq!(
        store.reserved_tokens("demo", "2026-12", now + 2_000).await,
        Ok(200)
    );
    server.stop().await;
    db.cleanup().await;
}

/// The storage the control plane would open on `db`, with `retention`.
async fn open_storage(
    backend: Backend,
    db: &TestDb,
    retention: signet_control_plane::storage::Retention,
) -> Arc<dyn signet_control_plane::storage::Storage> {
    use signet_control_plane::storage::{PostgresStorage, SqliteStorage, SQLITE_CHECKPOINT_EVERY};
    match backend {
        Backend::Sqlite => Arc::new(
            SqliteStorage::open_with(
                std::path::Path::new(&db.env["SP_DB_PATH"]),
                retention,
                SQLITE_CHECKPOINT_EVERY,
            )
            .unwrap(),
        ),
        Backend::Postgres => Arc::new(
            PostgresStorage::connect_with(&db.env["SP_POSTGRES_URL"], 2, retention)
                .await
                .unwrap(),
        ),
    }
}

/// A reservation of 10 tokens by tenant `demo` in 2026-12, made at `at`.
fn reservation(key: &str, at: i64, expires_ms: i64) -> Reservation {
    Reservation {
        id: format!("id-{key}"),
        tenant: "demo".into(),
        month: "2026-12".into(),
        idempotency_key: key.into(),
        fingerprint: "sha256:f".into(),
        tokens: 10,
        limit: None,
        now_ms: at,
        expires_ms,
    }
}

/// The settlement of `r` at `at`: 7 tokens used, answered 200.
fn settlement(r: &Reservation, at: i64) -> signet_control_plane::storage::fallback::Settlement {
    use signet_control_plane::storage::fallback::{Settlement, StoredRepair};
    Settlement {
        id: r.id.clone(),
        tenant: r.tenant.clone(),
        month: r.month.clone(),
        idempotency_key: r.idempotency_key.clone(),
        fingerprint: r.fingerprint.clone(),
        fu_tokens: 7,
        usage_estimated: false,
        result: StoredRepair {
            status: 200,
            body: "{}".into(),
        },
        now_ms: at,
        plan: Arc::default(),
    }
}

/// A settlement that arrives twice is metered and billed once. SQLite looks the call's ledger
/// key up first; PostgreSQL's insert relies on its unique index (`usage_ledger_provider_call`).
async fn a_provider_call_settled_twice_is_metered_and_billed_once(backend: Backend) {
    use signet_control_plane::storage::fallback::Settled;

    let db = TestDb::new(backend).await;
    let storage = open_storage(backend, &db, Default::default()).await;
    let store = storage.fallback();
    let now = signet_control_plane::now_ms();
    let r = reservation("twice", now, now + 60_000);
    assert_eq!(store.reserve(r.clone()).await, Ok(Reserved::Reserved));
    let settlement = settlement(&r, now);
    assert_eq!(
        store.settle(settlement.clone()).await,
        Ok(Settled::Metered { month_fu: 7 })
    );
    assert_eq!(store.settle(settlement).await, Ok(Settled::AlreadySettled));
    assert_eq!(storage.usage("demo", "2026-12").await.unwrap().fu, 7);
    let lines = storage.billing_queue("demo").await.unwrap();
    assert_eq!(
        lines
            .iter()
            .map(|l| (l.meter.as_str(), l.units, l.idempotency_key.as_str()))
            .collect::<Vec<_>>(),
        [("fu", 7, "fallback:id-twice/fu/0")]
    );
    db.cleanup().await;
}

/// The retention sweep that removes old idempotency records removes the fallback's results
/// (their replays end with the exchange's) and long-expired reservations too.
async fn settled_repairs_and_dead_reservations_go_with_the_idempotency_retention(backend: Backend) {
    use signet_control_plane::storage::fallback::Settled;
    use signet_control_plane::storage::Retention;

    let db = TestDb::new(backend).await;
    let storage = open_storage(
        backend,
        &db,
        Retention {
            idempotency: Duration::from_secs(3600),
            sweep_every: Duration::from_millis(50),
            sweep_rows: 2,
        },
    )
    .await;
    let store = storage.fallback();
    let now = signet_control_plane::now_ms();
    let hour = 3_600_000;
    // three repairs settled long ago (more than one pass of 2 rows), one just now
    for (key, at) in [
        ("old-1", now - 3 * hour),
        ("old-2", now - 3 * hour),
        ("old-3", now - 2 * hour),
        ("new", now),
    ] {
        let r = reservation(key, at, at + 60_000);
        assert_eq!(store.reserve(r.clone()).await, Ok(Reserved::Reserved));
        let settled = store.settle(settlement(&r, at)).await;
        assert!(
            matches!(settled, Ok(Settled::Metered { .. })),
            "{settled:?}"
        );
    }
    // a reservation whose call died two hours ago
    // (in another month: the probes below reserve in 2026-12 and must not be counted)
    let dead = Reservation {
        month: "2026-11".into(),
        ..reservation("dead", now - 2 * hour, now - 2 * hour + 60_000)
    };
    assert_eq!(store.reserve(dead).await, Ok(Reserved::Reserved));
    let replays = |key: &'static str| {
        let store = storage.clone();
        async move {
            let r = reservation(key, signet_control_plane::now_ms(), now + 60_000);
            matches!(
                store.fallback().reserve(r.clone()).await,
                Ok(Reserved::Replay(_))
            )
        }
    };
    let mut swept = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = store
            .reserved_tokens("demo", "2026-11", now - 2 * hour)
            .await
            .unwrap();
        if !replays("old-1").await && !replays("old-3").await && held == 0 {
            swept = true;
            break;
        }
    }
    assert!(swept, "old results and the dead reservation are swept");
    assert!(replays("new").await, "a recent result still replays");
    // the FU metered stay: the sweep removes replay records, never usage
    assert_eq!(storage.usage("demo", "2026-12").await.unwrap().fu, 28);
    drop(storage);
    db.cleanup().await;
}
