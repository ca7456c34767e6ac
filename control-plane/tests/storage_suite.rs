//! The storage suite: the same behaviour, through the HTTP API, on SQLite and PostgreSQL.

mod common;

use common::*;
use serde_json::{json, Value};
use signet_protocol::keys::{Jwks, SigningKey};

both_backends!(
    chain_grows_and_exports_a_verifiable_bundle,
    idempotency_replays_and_refuses_reuse,
    a_commit_that_does_not_extend_the_head_is_a_conflict,
    traces_belong_to_the_tenant_that_opened_them,
    chains_are_capped,
    invalid_receipts_and_callers_are_refused,
    usage_and_billing_rows_follow_the_tiers,
    tenant_lookup_and_reload,
    rotation_keeps_old_kids_in_the_jwks,
    concurrent_commits_on_one_trace_never_fork,
    concurrent_identical_requests_count_one_vex,
    a_batch_of_commits_answers_each_commit_in_order,
);

async fn chain_grows_and_exports_a_verifiable_bundle(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let health = server.get("/healthz", &[]).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["storage"], db.env["SP_STORAGE"].as_str());
    assert_eq!(health.body["database"], "reachable");

    let r1 = sign_receipt(&signing_key(), "t-1", 1, None, "demo");
    let c1 = server
        .commit("demo", "k1", &fingerprint(b"k1"), &r1, 0)
        .await;
    assert_eq!(c1.status, 200, "{:?}", c1.body);
    assert_eq!(c1.body, json!({"outcome": "committed"}));

    // The next exchanges guess hop 1, get the head in the conflict and re-sign on it.
    for hop in 2..=3 {
        let r = server.exchange("demo", &format!("x{hop}"), "t-1", 0).await;
        assert_eq!(r.body["outcome"], "committed", "{:?}", r.body);
    }

    let owner = [("X-SIGNET-API-Key", DEMO_KEY)];
    let chain = server.get("/v1/receipts/chain/t-1", &owner).await;
    assert_eq!(chain.status, 200);
    let receipts = chain.body.as_array().unwrap();
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts[0], r1);
    let jwks_body = server.get_text("/.well-known/jwks.json").await;
    assert_eq!(
        jwks_body,
        server.get_text("/.well-known/signet-jwks.json").await
    );
    let jwks = Jwks::from_json(jwks_body.as_bytes()).unwrap();
    signet_protocol::chain::verify(receipts, Some(&jwks), true).unwrap();

    let export = server
        .get("/v1/receipts/export/t-1", &[("X-ODIN-API-Key", DEMO_KEY)])
        .await;
    assert_eq!(export.status, 200);
    signet_protocol::bundle::verify(&export.body, Some(&jwks), true).unwrap();
    assert_eq!(export.body["chain"], chain.body);
    for (member, names) in [
        (
            "bundle_cid",
            ["x-signet-response-cid", "x-odin-response-cid"],
        ),
        ("signature", ["x-signet-signature", "x-odin-signature"]),
        ("kid", ["x-signet-kid", "x-odin-kid"]),
    ] {
        for name in names {
            assert_eq!(export.header(name), export.body[member].as_str(), "{name}");
        }
    }
    // An auditor with the admin key may export too, naming the tenant.
    let audit = server
        .get(
            "/v1/receipts/export/t-1?tenant=demo",
            &[("X-SIGNET-Admin-Key", ADMIN_KEY)],
        )
        .await;
    assert_eq!(audit.status, 200);
    assert_eq!(audit.body["chain"], chain.body);
    assert_eq!(server.usage("demo").await["vex"], 3);
    server.stop().await;
    db.cleanup().await;
}

async fn idempotency_replays_and_refuses_reuse(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let fp = fingerprint(b"body");
    let other_fp = fingerprint(b"other body");
    let receipt = sign_receipt(&signing_key(), "t-idem", 1, None, "demo");
    let first = server.commit("demo", "key", &fp, &receipt, 5).await;
    assert_eq!(first.body, json!({"outcome": "committed"}));
    // A retry of the same request, even re-signed on another head (as a twin on another
    // worker does after a conflict), gets the stored response and counts nothing.
    let r2 = sign_receipt(
        &signing_key(),
        "t-idem",
        2,
        receipt["receipt_hash"].as_str(),
        "demo",
    );
    for retry in [&receipt, &r2] {
        let replay = server.commit("demo", "key", &fp, retry, 5).await;
        assert_eq!(
            (replay.status, &replay.body),
            (
                200,
                &json!({"outcome": "replay", "response": response_for(&receipt)})
            )
        );
    }
    let reused = server.commit("demo", "key", &other_fp, &r2, 5).await;
    assert_eq!(
        (reused.status, reused.body["code"].as_str()),
        (422, Some("IDEMPOTENCY_KEY_REUSED"))
    );
    // The same key of another tenant is another key.
    let theirs = sign_receipt(&signing_key(), "t-theirs", 1, None, "other");
    assert_eq!(
        server
            .commit("other", "key", &other_fp, &theirs, 0)
            .await
            .body["outcome"],
        "committed"
    );
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(1), Some(0))
    );
    let chain = server
        .get(
            "/v1/receipts/chain/t-idem",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await;
    assert_eq!(chain.body.as_array().map(Vec::len), Some(1));
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.contains("signet_cp_idempotent_hits_total 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("signet_cp_vex_total 2\n"), "{metrics}");
    server.stop().await;
    db.cleanup().await;
}

async fn a_commit_that_does_not_extend_the_head_is_a_conflict(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let key = signing_key();
    // A receipt beyond hop 1 on a trace that does not exist (linked to a well-formed hash).
    let orphan = sign_receipt(
        &key,
        "t-c",
        2,
        Some(&fingerprint(b"no such receipt")),
        "demo",
    );
    let r = server
        .commit("demo", "a", &fingerprint(b"a"), &orphan, 0)
        .await;
    assert_eq!(
        (r.status, &r.body["code"], &r.body["head"]),
        (409, &json!("CHAIN_CONFLICT"), &Value::Null)
    );

    let r1 = sign_receipt(&key, "t-c", 1, None, "demo");
    assert_eq!(
        server
            .commit("demo", "b", &fingerprint(b"b"), &r1, 0)
            .await
            .status,
        200
    );
    let head = json!({"hop": 1, "receipt_hash": r1["receipt_hash"]});
    for (name, receipt) in [
        ("same hop", sign_receipt(&key, "t-c", 1, None, "demo")),
        (
            "skipped hop",
            sign_receipt(&key, "t-c", 3, r1["receipt_hash"].as_str(), "demo"),
        ),
        (
            "wrong link",
            sign_receipt(&key, "t-c", 2, Some(&fingerprint(b"not the head")), "demo"),
        ),
    ] {
        let r = server
            .commit("demo", name, &fingerprint(name.as_bytes()), &receipt, 0)
            .await;
        assert_eq!(
            (r.status, &r.body["code"]),
            (409, &json!("CHAIN_CONFLICT")),
            "{name}"
        );
        assert_eq!(r.body["head"], head, "{name}");
        assert!(r.body["detail"].is_string());
    }
    // A conflicting commit leaves nothing behind: the key is still free.
    let ok = sign_receipt(&key, "t-c", 2, r1["receipt_hash"].as_str(), "demo");
    assert_eq!(
        server
            .commit("demo", "wrong link", &fingerprint(b"wrong link"), &ok, 0)
            .await
            .status,
        200
    );
    assert_eq!(server.usage("demo").await["vex"], 2);
    assert!(server
        .get_text("/metrics")
        .await
        .contains("signet_cp_chain_conflicts_total 4"));
    server.stop().await;
    db.cleanup().await;
}

async fn traces_belong_to_the_tenant_that_opened_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    assert_eq!(server.exchange("demo", "k1", "t-own", 0).await.status, 200);
    assert_eq!(server.exchange("demo", "k2", "t-own", 0).await.status, 200);
    // SPEC §2: another tenant's `t-own` is another chain. Its hop 1 opens it; nothing tells
    // it that demo has a trace of that id (no conflict naming demo's head, no 403).
    let theirs = sign_receipt(&signing_key(), "t-own", 1, None, "other");
    let b = server
        .commit("other", "k1", &fingerprint(b"k1"), &theirs, 0)
        .await;
    assert_eq!((b.status, &b.body), (200, &json!({"outcome": "committed"})));
    let (mine, other) = (
        server
            .get(
                "/v1/receipts/chain/t-own",
                &[("X-SIGNET-API-Key", DEMO_KEY)],
            )
            .await,
        server
            .get(
                "/v1/receipts/chain/t-own",
                &[("X-SIGNET-API-Key", OTHER_KEY)],
            )
            .await,
    );
    assert_eq!((mine.status, other.status), (200, 200));
    assert_eq!(mine.body.as_array().unwrap().len(), 2);
    assert_eq!(other.body, json!([theirs]));
    assert_eq!(mine.body[0]["tenant"], "demo");
    // A tenant never reads another's chain, even naming it.
    let named = server
        .get(
            "/v1/receipts/chain/t-own?tenant=demo",
            &[("X-SIGNET-API-Key", OTHER_KEY)],
        )
        .await;
    assert_eq!(
        (named.status, named.body["code"].as_str()),
        (404, Some("TRACE_NOT_FOUND"))
    );
    // An auditor names the tenant.
    for (tenant, receipts) in [("demo", 2), ("other", 1)] {
        let audit = server
            .get(
                &format!("/v1/receipts/chain/t-own?tenant={tenant}"),
                &[("X-SIGNET-Admin-Key", ADMIN_KEY)],
            )
            .await;
        assert_eq!(audit.status, 200, "{tenant}");
        assert_eq!(audit.body.as_array().unwrap().len(), receipts, "{tenant}");
    }
    let unnamed = server
        .get(
            "/v1/receipts/chain/t-own",
            &[("X-SIGNET-Admin-Key", ADMIN_KEY)],
        )
        .await;
    assert_eq!(
        (unnamed.status, unnamed.body["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );

    let read = |headers: &'static [(&'static str, &'static str)]| {
        server.get("/v1/receipts/chain/t-own", headers)
    };
    assert_eq!(read(&[("X-SIGNET-API-Key", "nope")]).await.status, 401);
    assert_eq!(read(&[]).await.status, 401);
    assert_eq!(
        read(&[("X-SIGNET-Admin-Key", "wrong-admin-key-000000")])
            .await
            .status,
        401
    );
    let missing = server
        .get(
            "/v1/receipts/export/t-none",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await;
    assert_eq!(
        (missing.status, missing.body["code"].as_str()),
        (404, Some("TRACE_NOT_FOUND"))
    );
    let bad = server
        .get(
            "/v1/receipts/chain/bad%20id",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await;
    assert_eq!(
        (bad.status, bad.body["code"].as_str()),
        (400, Some("BAD_TRACE_ID"))
    );
    server.stop().await;
    db.cleanup().await;
}

async fn chains_are_capped(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    db.set("SP_CHAIN_MAX", "2");
    let server = Server::start(&db).await;
    assert_eq!(server.exchange("demo", "k1", "t-cap", 0).await.status, 200);
    assert_eq!(server.exchange("demo", "k2", "t-cap", 0).await.status, 200);
    let full = server.exchange("demo", "k3", "t-cap", 0).await;
    assert_eq!(
        (full.status, full.body["code"].as_str()),
        (409, Some("CHAIN_FULL"))
    );
    let chain = server
        .get(
            "/v1/receipts/chain/t-cap",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await
        .body;
    let r3 = sign_receipt(
        &signing_key(),
        "t-cap",
        3,
        chain[1]["receipt_hash"].as_str(),
        "demo",
    );
    let c = server
        .commit("demo", "k3", &fingerprint(b"k3"), &r3, 0)
        .await;
    assert_eq!(
        (c.status, c.body["code"].as_str()),
        (409, Some("CHAIN_FULL"))
    );
    server.stop().await;
    db.cleanup().await;
}

async fn invalid_receipts_and_callers_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let fp = fingerprint(b"x");
    let good = sign_receipt(&signing_key(), "t-bad", 1, None, "demo");
    let mut tampered = good.clone();
    tampered["ts"] = json!("2020-01-01T00:00:00.000Z");
    let stranger = sign_receipt(
        &SigningKey::from_seed_b64url(OTHER_SEED, "stranger").unwrap(),
        "t-bad",
        1,
        None,
        "demo",
    );
    let impostor = sign_receipt(
        &SigningKey::from_seed_b64url(OTHER_SEED, KID).unwrap(),
        "t-bad",
        1,
        None,
        "demo",
    );
    let other_tenant = sign_receipt(&signing_key(), "t-bad", 1, None, "other");
    for (name, receipt) in [
        ("tampered", tampered),
        ("unknown kid", stranger),
        ("wrong key", impostor),
        ("tenant", other_tenant),
    ] {
        let r = server.commit("demo", name, &fp, &receipt, 0).await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (400, Some("RECEIPT_INVALID")),
            "{name}: {:?}",
            r.body
        );
    }
    let unknown = server.commit("ghost", "k", &fp, &good, 0).await;
    assert_eq!(unknown.status, 403);
    let bad_fp = server.commit("demo", "k", "sha256:XYZ", &good, 0).await;
    assert_eq!(
        (bad_fp.status, bad_fp.body["code"].as_str()),
        (400, Some("FINGERPRINT_INVALID"))
    );
    let long_key = "k".repeat(257);
    let bad_key = server.commit("demo", &long_key, &fp, &good, 0).await;
    assert_eq!(
        (bad_key.status, bad_key.body["code"].as_str()),
        (400, Some("IDEMPOTENCY_KEY_INVALID"))
    );
    let mut bad_trace = good.clone();
    bad_trace["trace_id"] = json!("a b");
    let bad_trace = server.commit("demo", "k", &fp, &bad_trace, 0).await;
    assert_eq!(
        (bad_trace.status, bad_trace.body["code"].as_str()),
        (400, Some("BAD_TRACE_ID"))
    );
    let malformed = server
        .http
        .post(server.url("/v1/internal/commits"))
        .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["code"], "BAD_REQUEST");
    // Nobody but the filter can commit.
    for token in [None, Some("wrong-token-0000000000")] {
        let mut req = server
            .http
            .post(server.url("/v1/internal/commits"))
            .json(&json!({}));
        if let Some(t) = token {
            req = req.header("X-SIGNET-Filter-Token", t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"detail": "missing or wrong filter token", "code": "FILTER_UNAUTHORIZED"})
        );
    }
    assert_eq!(server.usage("demo").await["vex"], 0);
    // The good receipt is still accepted.
    assert_eq!(server.commit("demo", "k", &fp, &good, 0).await.status, 200);
    server.stop().await;
    db.cleanup().await;
}

async fn usage_and_billing_rows_follow_the_tiers(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    db.set(
        "SP_RESERVED_CONFIG",
        &json!({"demo": {
            "vex_reserved": 2,
            "vex_overage_tiers": [{"threshold": 1, "price_per_unit": "0.5"},
                                  {"threshold": 10, "price_per_unit": 0.25, "stripe_item": "si_vex_b"}],
            "fu_reserved": 100,
            "fu_overage_tiers": [{"threshold": 50, "price_per_unit": 0.001},
                                 {"threshold": 1000, "price_per_unit": "0.0001"}],
        }})
        .to_string(),
    );
    let server = Server::start(&db).await;
    for (i, fu) in [60u64, 60, 60, 0].iter().enumerate() {
        let r = server
            .exchange("demo", &format!("k{i}"), "t-bill", *fu)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(4), Some(0))
    );
    let rows: Vec<(String, u64, u64, Value, Value, Value)> = usage["billing_queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["meter"].as_str().unwrap().to_owned(),
                r["band"].as_u64().unwrap(),
                r["units"].as_u64().unwrap(),
                r["stripe_item"].clone(),
                r["price_per_unit"].clone(),
                r["amount"].clone(),
            )
        })
        .collect();
    // VEx 3 = first overage unit (band 0), VEx 4 = band 1. The commits' fu_tokens bill
    // nothing: FU are billed by the repair (tests/fallback.rs bills them through the tiers).
    let expected = vec![
        (
            "vex".to_owned(),
            0,
            1,
            json!("si_vex"),
            json!("0.5"),
            json!("0.5"),
        ),
        (
            "vex".to_owned(),
            1,
            1,
            json!("si_vex_b"),
            json!("0.25"),
            json!("0.25"),
        ),
    ];
    assert_eq!(rows, expected);
    let keys: std::collections::HashSet<_> = usage["billing_queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["idempotency_key"].clone())
        .collect();
    assert_eq!(
        keys.len(),
        2,
        "every billing row has its own Stripe idempotency key"
    );
    assert!(usage["billing_queue"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "pending"));
    server.stop().await;
    db.cleanup().await;
}

async fn tenant_lookup_and_reload(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    db.set("SP_HEL_ALLOWLIST", "api.global.org");
    let server = Server::start(&db).await;
    let lookup = |hash: String| {
        server
            .http
            .get(server.url("/v1/internal/tenant"))
            .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
            .header("X-SIGNET-Key-Hash", hash)
            .send()
    };
    let hash = signet_protocol::cid::sha256_hex(DEMO_KEY.as_bytes());
    let r = lookup(hash.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"tenant": "demo", "allowlist": ["*.example.com", "api.global.org"],
               "fallback_enabled": false, "fu_monthly_limit": null})
    );
    let unknown = lookup(signet_protocol::cid::sha256_hex(b"nope"))
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 401);
    assert_eq!(
        unknown.json::<Value>().await.unwrap(),
        json!({"detail": "unknown API key", "code": "UNKNOWN_API_KEY"})
    );

    let reload = |body: Value, key: &'static str| {
        server
            .http
            .post(server.url("/v1/admin/reload"))
            .header("X-SIGNET-Admin-Key", key)
            .json(&body)
            .send()
    };
    let new_keys =
        json!({"new-key": {"tenant": "demo", "fallback_enabled": true, "fu_monthly_limit": 500}});
    assert_eq!(
        reload(json!({"api_keys": new_keys}), "wrong-admin-key-000000")
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let invalid = reload(json!({"api_keys": {"k": {"allowlist": []}}}), ADMIN_KEY)
        .await
        .unwrap();
    assert_eq!(invalid.status().as_u16(), 400);
    assert_eq!(
        lookup(hash.clone()).await.unwrap().status().as_u16(),
        200,
        "a failed reload changes nothing"
    );
    let ok = reload(json!({"api_keys": new_keys}), ADMIN_KEY)
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(
        lookup(hash).await.unwrap().status().as_u16(),
        401,
        "the old key is gone"
    );
    let r = lookup(signet_protocol::cid::sha256_hex(b"new-key"))
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (
            body["fallback_enabled"].as_bool(),
            body["fu_monthly_limit"].as_u64()
        ),
        (Some(true), Some(500))
    );
    server.stop().await;
    db.cleanup().await;
}

async fn rotation_keeps_old_kids_in_the_jwks(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    assert_eq!(server.exchange("demo", "k1", "t-rot", 0).await.status, 200);
    server.stop().await;

    db.set("SP_PRIVATE_KEY_B64", OTHER_SEED);
    db.set("SP_KID", "test-k2");
    let server = Server::start(&db).await;
    let jwks = Jwks::from_json(server.get_text("/.well-known/jwks.json").await.as_bytes()).unwrap();
    let kids: Vec<&str> = jwks.keys().iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, vec!["test-k2", KID]);
    let export = server
        .get(
            "/v1/receipts/export/t-rot",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await;
    assert_eq!(export.body["kid"], "test-k2");
    signet_protocol::bundle::verify(&export.body, Some(&jwks), true).unwrap();
    server.stop().await;

    // A kid never changes its key.
    db.set("SP_KID", KID);
    let err = match signet_control_plane::ControlPlane::start(db.config()).await {
        Ok(_) => panic!("a reused kid was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("SP_KID") && err.contains(KID), "{err}");
    db.cleanup().await;
}

async fn concurrent_commits_on_one_trace_never_fork(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = std::sync::Arc::new(Server::start(&db).await);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                // As the filter does: one retry on a conflict, re-signed on the new head.
                for attempt in 0..2 {
                    let r = server
                        .exchange("demo", &format!("c{i}-{attempt}"), "t-race", 0)
                        .await;
                    match (r.status, r.body["code"].as_str()) {
                        (200, _) => return true,
                        (409, Some("CHAIN_CONFLICT")) => continue,
                        other => panic!("unexpected {other:?} {:?}", r.body),
                    }
                }
                false
            })
        })
        .collect();
    let mut successes = 0;
    for t in tasks {
        successes += t.await.unwrap() as u64;
    }
    let chain = server
        .get(
            "/v1/receipts/chain/t-race",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await
        .body;
    let receipts = chain.as_array().unwrap();
    assert!(successes >= 2, "only {successes} of 64 succeeded");
    assert_eq!(receipts.len() as u64, successes);
    let jwks = server.cp.keys.jwks().clone();
    signet_protocol::chain::verify(receipts, Some(&jwks), true).unwrap();
    assert_eq!(server.usage("demo").await["vex"].as_u64(), Some(successes));
    let conflicts = server.get_text("/metrics").await;
    assert!(
        !conflicts.contains("signet_cp_chain_conflicts_total 0\n"),
        "64 racers without a conflict?"
    );
    std::sync::Arc::into_inner(server).unwrap().stop().await;
    db.cleanup().await;
}

async fn concurrent_identical_requests_count_one_vex(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = std::sync::Arc::new(Server::start(&db).await);
    let receipt = sign_receipt(&signing_key(), "t-same", 1, None, "demo");
    let fp = fingerprint(b"same body");
    // 64 twins of one request (one key, one body) on different workers commit at once; half
    // of them signed the same receipt, the other half each their own (other ts), as workers
    // that sign independently do.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let server = server.clone();
        let receipt = if i % 2 == 0 {
            receipt.clone()
        } else {
            let ts = ts_base() + 1_000 + i;
            sign_receipt_at(&signing_key(), "t-same", 1, None, "demo", ts)
        };
        let fp = fp.clone();
        tasks.push(tokio::spawn(async move {
            let r = server.commit("demo", "same", &fp, &receipt, 7).await;
            (r, receipt)
        }));
    }
    let mut committed = Vec::new();
    let mut replays = Vec::new();
    for t in tasks {
        let (r, sent) = t.await.unwrap();
        match (r.status, r.body["outcome"].as_str()) {
            (200, Some("committed")) => {
                assert_eq!(r.body, json!({"outcome": "committed"}));
                committed.push(sent);
            }
            (200, Some("replay")) => replays.push(r.body["response"].clone()),
            other => panic!("unexpected {other:?} {:?}", r.body),
        }
    }
    assert_eq!(committed.len(), 1, "exactly one twin stores");
    assert_eq!(replays.len(), 63);
    let stored = response_for(&committed[0]);
    assert!(
        replays.iter().all(|r| *r == stored),
        "every twin gets the stored response"
    );
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(1), Some(0))
    );
    let chain = server
        .get(
            "/v1/receipts/chain/t-same",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await
        .body;
    assert_eq!(chain, json!([committed[0]]));
    std::sync::Arc::into_inner(server).unwrap().stop().await;
    db.cleanup().await;
}

async fn a_batch_of_commits_answers_each_commit_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let key = signing_key();
    let head = sign_receipt(&key, "t-old", 1, None, "demo");
    let fp = |k: &str| fingerprint(k.as_bytes());
    assert_eq!(
        server
            .commit("demo", "old", &fp("old"), &head, 0)
            .await
            .status,
        200
    );
    let item = |k: &str, receipt: &Value| {
        json!({"tenant": "demo", "idempotency_key": k, "fingerprint": fp(k),
               "receipt": receipt, "response": response_for(receipt), "fu_tokens": 2})
    };
    let new = sign_receipt(&key, "t-batch", 1, None, "demo");
    let guess = sign_receipt(&key, "t-old", 1, None, "demo");
    let batch = json!({"commits": [
        item("new", &new),
        item("guess", &guess),
        {"tenant": "demo"},
        item("new", &new),
    ]});
    let r = server.internal("commits", &batch).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(
        results[1],
        json!({"status": 409, "body": {
            "detail": "chain conflict: the receipt does not extend the current head",
            "code": "CHAIN_CONFLICT",
            "head": {"hop": 1, "receipt_hash": head["receipt_hash"]}}})
    );
    assert_eq!(
        (&results[2]["status"], &results[2]["body"]["code"]),
        (&json!(400), &json!("BAD_REQUEST"))
    );
    // The twins: one stores, the other replays the stored response.
    let mut outcomes: Vec<&str> = [&results[0], &results[3]]
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200);
            if r["body"]["outcome"] == "replay" {
                assert_eq!(r["body"]["response"], response_for(&new));
            }
            r["body"]["outcome"].as_str().unwrap()
        })
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["committed", "replay"]);
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(2), Some(0))
    );
    let empty = server.internal("commits", &json!({"commits": []})).await;
    assert_eq!(
        (empty.status, &empty.body["code"]),
        (400, &json!("BAD_REQUEST"))
    );
    server.stop().await;
    db.cleanup().await;
}
