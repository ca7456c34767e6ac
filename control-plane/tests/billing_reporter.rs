//! The billing reporter against a fake Stripe (`common/fake_stripe.rs`): what Stripe holds per
//! meter equals the local overage per band exactly, through failures, dropped answers, a dead
//! reporter, two instances and a Stripe that refuses everything; dead letters are visible.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::billing::*;
use common::fake_stripe::{FakeStripe, Faults};
use common::*;

both_backends!(
    usage_reaches_stripe_exactly_once_per_band,
    failures_and_dropped_answers_change_nothing,
    a_reporter_dead_mid_send_turns_healthz_red_and_another_instance_finishes,
    two_instances_report_each_aggregate_once,
    validation_errors_are_dead_letters_visible_in_metrics_and_the_admin_api,
    a_stripe_down_past_the_give_up_time_is_dead_lettered_nothing_lost,
    without_a_stripe_key_the_queue_fills_and_health_stays_green,
);

#[tokio::test]
async fn the_fake_behaves_like_stripe() {
    common::fake_stripe::self_test().await;
}

async fn usage_reaches_stripe_exactly_once_per_band(backend: Backend) {
    let stripe = FakeStripe::start().await;
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let server = Server::start(&db).await;
    let n = 1_500;
    let started = Instant::now();
    exchanges(&server, "acme", 0..n).await;
    exchanges(&server, "free", 0..20).await;
    let committed = started.elapsed();
    let usage = settled(&server, "acme", Duration::from_secs(60)).await;
    assert_exact(&stripe.fake, &usage, n);
    // one event per meter, band and window, not one per exchange
    let events = stripe.fake.events().len() as u64;
    eprintln!(
        "{backend:?}: {n} exchanges committed in {committed:?}, all reported {:?} later as {events} meter events",
        started.elapsed() - committed
    );
    assert!(events < n / 10, "{events} events for {n} exchanges");
    assert_eq!(usage["billing"]["meters"]["vex"]["amount"], "5.7"); // 300×0.01 + 400×0.005 + 700×0.001
                                                                    // a tenant without a meter is counted, never sent
    let free = settled(&server, "free", Duration::from_secs(30)).await;
    assert_eq!(
        free["billing"]["meters"]["vex"]["tiers"][0]["stripe"]["unmetered"],
        20
    );
    assert!(stripe
        .fake
        .events()
        .iter()
        .all(|e| e.customer == "cus_acme"));

    let text = server.get_text("/metrics").await;
    assert_eq!(
        metric(&text, "signet_billing_reported_total"),
        Some(events as f64),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"signet_reserved_capacity{tenant="acme",type="fu"}"#
        ),
        Some(5000.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"signet_overage_units_total{tenant="acme",type="vex",tier="1"}"#
        ),
        Some(400.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"signet_overage_charges_total{tenant="acme",type="vex",tier="0"}"#
        ),
        Some(3.0)
    );
    let fu_used: u64 = (0..n).map(fu_of).sum::<u64>() + (0..20).map(fu_of).sum::<u64>();
    let enqueued = metric(&text, r#"signet_billing_enqueued_total{type="fu"}"#).unwrap();
    assert_eq!(
        enqueued as u64,
        fu_used - FU_RESERVED,
        "acme's overage and all of free's"
    );
    assert_eq!(
        metric(&text, "signet_billing_oldest_pending_seconds"),
        Some(0.0)
    );
    assert_eq!(metric(&text, "signet_billing_reporter_running"), Some(1.0));
    assert!(text.trim_end().ends_with("# EOF") && text.matches("# EOF").count() == 1);

    // the tenant reads its own month with its API key, and only its own
    let own = server
        .get("/v1/usage", &[("X-SIGNET-API-Key", ACME_KEY)])
        .await;
    assert_eq!(own.status, 200);
    assert_eq!(own.body["billing"], usage["billing"]);
    let other = server
        .get("/v1/usage?tenant=acme", &[("X-SIGNET-API-Key", FREE_KEY)])
        .await;
    assert_eq!(other.status, 401, "{}", other.body);
    assert_eq!(server.get("/v1/usage", &[]).await.status, 401);
    let bad_month = server
        .get("/v1/usage?month=2026-1", &[("X-SIGNET-API-Key", ACME_KEY)])
        .await;
    assert_eq!(bad_month.status, 400);
    server.stop().await;
    db.cleanup().await;
}

async fn failures_and_dropped_answers_change_nothing(backend: Backend) {
    let stripe = FakeStripe::start().await;
    // a fifth of the requests each: every kind happens even when a fast run needs few events
    stripe.fake.set_faults(Faults {
        error_500: 0.2,
        rate_limited: 0.2,
        drop_after_record: 0.2,
        ..Faults::default()
    });
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let server = Server::start(&db).await;
    let n = 1_200;
    exchanges(&server, "acme", 0..n).await;
    let usage = settled(&server, "acme", Duration::from_secs(90)).await;
    assert_exact(&stripe.fake, &usage, n);
    let (e500, e429, dropped, replays) = stripe
        .fake
        .counts(|c| (c.injected_500, c.injected_429, c.dropped, c.replays));
    assert!(
        e500 > 0 && e429 > 0 && dropped > 0,
        "{e500} {e429} {dropped}"
    );
    assert!(
        replays >= dropped,
        "every dropped answer was asked again with its key"
    );
    let text = server.get_text("/metrics").await;
    assert!(
        metric(&text, "signet_billing_retries_total").unwrap() >= (e500 + e429 + dropped) as f64
    );
    assert_eq!(
        metric(&text, "signet_billing_dead_lettered_total"),
        Some(0.0)
    );
    server.stop().await;
    db.cleanup().await;
}

async fn a_reporter_dead_mid_send_turns_healthz_red_and_another_instance_finishes(
    backend: Backend,
) {
    let stripe = FakeStripe::start().await;
    stripe.fake.set_faults(Faults {
        hang_after_record: true,
        ..Faults::default()
    });
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let a = Server::start(&db).await;
    let n = 900;
    exchanges(&a, "acme", 0..n).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stripe.fake.counts(|c| c.hung) == 0 {
        assert!(Instant::now() < deadline, "nothing sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // recorded by Stripe, unanswered, and the reporter dies
    a.cp.billing.stop_reporter();
    let health = a.get("/healthz", &[]).await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert_eq!(health.body["reason"], "the billing reporter stopped");
    assert_eq!(
        metric(
            &a.get_text("/metrics").await,
            "signet_billing_reporter_running"
        ),
        Some(0.0)
    );
    a.stop().await;

    stripe.fake.set_faults(Faults::default());
    let b = Server::start(&db).await;
    let usage = settled(&b, "acme", Duration::from_secs(60)).await;
    assert_exact(&stripe.fake, &usage, n);
    assert!(
        stripe.fake.counts(|c| c.replays) >= 1,
        "what the dead reporter sent was sent again with the same key and answered from Stripe's cache"
    );
    b.stop().await;
    db.cleanup().await;
}

async fn two_instances_report_each_aggregate_once(backend: Backend) {
    let stripe = FakeStripe::start().await;
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let a = Arc::new(Server::start(&db).await);
    let b = Arc::new(Server::start(&db).await);
    let n = 1_000;
    let (x, y) = (a.clone(), b.clone());
    tokio::join!(
        async move { exchanges(&x, "acme", 0..n / 2).await },
        async move { exchanges(&y, "acme", n / 2..n).await },
    );
    let usage = settled(&a, "acme", Duration::from_secs(60)).await;
    assert_exact(&stripe.fake, &usage, n);
    let reported: f64 = [&a, &b]
        .iter()
        .map(|s| async move {
            metric(
                &s.get_text("/metrics").await,
                "signet_billing_reported_total",
            )
            .unwrap()
        })
        .collect::<futures_util::future::JoinAll<_>>()
        .await
        .into_iter()
        .sum();
    let events = stripe.fake.events().len() as f64;
    assert!(reported >= events, "{reported} {events}");
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
    db.cleanup().await;
}

async fn validation_errors_are_dead_letters_visible_in_metrics_and_the_admin_api(backend: Backend) {
    let stripe = FakeStripe::start().await;
    stripe.fake.set_faults(Faults {
        reject_all: true,
        ..Faults::default()
    });
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    let server = Server::start(&db).await;
    let n = 400;
    exchanges(&server, "acme", 0..n).await;
    let usage = settled(&server, "acme", Duration::from_secs(60)).await;
    assert!(stripe.fake.events().is_empty());
    let fu_used: u64 = (0..n).map(fu_of).sum();
    let mut dead_units = 0;
    for (meter, used, reserved, thresholds) in [
        ("vex", n, VEX_RESERVED, &VEX_THRESHOLDS),
        ("fu", fu_used, FU_RESERVED, &FU_THRESHOLDS),
    ] {
        for (band, units) in expected_bands(used, reserved, thresholds)
            .iter()
            .enumerate()
        {
            let tier = &usage["billing"]["meters"][meter]["tiers"][band];
            assert_eq!(
                tier["stripe"]["dead"].as_u64(),
                Some(*units),
                "nothing lost: {tier}"
            );
            dead_units += units;
        }
    }
    let dead = usage["billing"]["dead_letters"].as_array().unwrap();
    assert!(!dead.is_empty());
    assert_eq!(
        dead.iter()
            .map(|d| d["value"].as_u64().unwrap())
            .sum::<u64>(),
        dead_units
    );
    assert!(dead.iter().all(|d| d["last_error"]
        .as_str()
        .unwrap()
        .contains("resource_missing")));
    assert!(
        dead.iter().all(|d| d["attempts"] == 1),
        "a validation error is not retried"
    );
    let text = server.get_text("/metrics").await;
    assert_eq!(
        metric(&text, "signet_billing_dead_letters"),
        Some(dead.len() as f64)
    );
    assert_eq!(
        metric(&text, "signet_billing_dead_lettered_total"),
        Some(dead.len() as f64)
    );
    assert_eq!(
        metric(&text, r#"signet_billing_reports{state="dead"}"#),
        Some(dead.len() as f64)
    );
    server.stop().await;
    db.cleanup().await;
}

async fn a_stripe_down_past_the_give_up_time_is_dead_lettered_nothing_lost(backend: Backend) {
    let stripe = FakeStripe::start().await;
    stripe.fake.set_faults(Faults {
        always_500: true,
        ..Faults::default()
    });
    let mut db = TestDb::new(backend).await;
    let _openai = billing_env(&mut db, &stripe.base_url).await;
    db.set("SP_BILLING_GIVE_UP_SECS", "2");
    let server = Server::start(&db).await;
    exchanges(&server, "acme", 0..200).await;
    let usage = settled(&server, "acme", Duration::from_secs(60)).await;
    let dead = usage["billing"]["dead_letters"].as_array().unwrap();
    assert!(!dead.is_empty());
    for d in dead {
        assert!(d["attempts"].as_u64().unwrap() > 1, "retried first: {d}");
        let error = d["last_error"].as_str().unwrap();
        assert!(
            error.contains("gave up") && error.contains("Stripe answered 500"),
            "{error}"
        );
    }
    let vex = &usage["billing"]["meters"]["vex"];
    let dead_vex: u64 = vex["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["stripe"]["dead"].as_u64().unwrap())
        .sum();
    assert_eq!(
        dead_vex,
        vex["overage"].as_u64().unwrap(),
        "every unit is accounted for"
    );
    assert!(
        metric(
            &server.get_text("/metrics").await,
            "signet_billing_retries_total"
        )
        .unwrap()
            > 0.0
    );
    server.stop().await;
    db.cleanup().await;
}

async fn without_a_stripe_key_the_queue_fills_and_health_stays_green(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    db.set("SP_API_KEYS", &acme_keys());
    db.set("SP_RESERVED_CONFIG", &acme_reserved());
    let _openai = fallback_env(&mut db).await;
    let server = Server::start(&db).await;
    exchanges(&server, "acme", 0..150).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = server.get("/healthz", &[]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let usage = server.usage("acme").await;
    assert!(usage["billing"]["reporting"]
        .as_str()
        .unwrap()
        .starts_with("off"));
    let tier = &usage["billing"]["meters"]["vex"]["tiers"][0];
    assert_eq!(tier["units"], 50);
    assert_eq!(
        tier["stripe"]["pending"], 50,
        "queued, waiting for a key: {tier}"
    );
    let text = server.get_text("/metrics").await;
    assert_eq!(metric(&text, "signet_billing_reporter_running"), Some(0.0));
    assert!(metric(&text, "signet_billing_oldest_pending_seconds").unwrap() >= 0.0);
    assert_eq!(
        metric(&text, r#"signet_billing_enqueued_total{type="vex"}"#),
        Some(50.0)
    );
    server.stop().await;
    db.cleanup().await;
}
