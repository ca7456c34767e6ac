//! Issue #13, storage side, on both backends: the idempotency lookup, commit deadlines checked
//! by storage, counters that refuse to overflow.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use signet_control_plane::storage::{ChainPage, CommitOutcome, CommitRequest};

both_backends!(
    the_idempotency_lookup_answers_the_stored_response_of_the_tenants_key,
    a_commit_past_its_deadline_stores_nothing,
    a_commit_that_would_overflow_the_month_counters_is_refused,
    the_chain_is_read_page_by_page,
);

/// A commit of `key` opening `trace` for `tenant`, at the current time, as the API builds it.
fn request(tenant: &str, key: &str, trace: &str) -> CommitRequest {
    CommitRequest {
        tenant: tenant.into(),
        idempotency_key: key.into(),
        fingerprint: fingerprint(key.as_bytes()),
        trace_id: trace.into(),
        hop: 1,
        receipt_hash: format!("sha256:{trace}-1"),
        prev_receipt_hash: None,
        receipt: r#"{"hop":1}"#.into(),
        response: r#"{"ok":true}"#.into(),
        fu_tokens: 0,
        month: "2025-01".into(),
        now_ms: signet_control_plane::now_ms(),
        deadline_ms: None,
        chain_max: 10,
        plan: Arc::default(),
    }
}

async fn the_idempotency_lookup_answers_the_stored_response_of_the_tenants_key(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let receipt = sign_receipt(&signing_key(), "t-1", 1, None, "demo");
    let fp = fingerprint(b"k1");
    let c = server.commit("demo", "k1", &fp, &receipt, 0).await;
    assert_eq!(c.status, 200, "{:?}", c.body);

    let lookup = |tenant: &str, key: &str| json!({"tenant": tenant, "idempotency_key": key});
    let found = server.internal("idempotency", &lookup("demo", "k1")).await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    assert_eq!(
        found.body,
        json!({"fingerprint": fp, "response": response_for(&receipt)})
    );
    for (tenant, key) in [("demo", "never"), ("other", "k1")] {
        let unknown = server.internal("idempotency", &lookup(tenant, key)).await;
        assert_eq!(
            (unknown.status, &unknown.body["code"]),
            (404, &json!("IDEMPOTENCY_KEY_UNKNOWN")),
            "{tenant}/{key}"
        );
    }
    let bad = server
        .internal("idempotency", &json!({"tenant": "demo"}))
        .await;
    assert_eq!(
        (bad.status, &bad.body["code"]),
        (400, &json!("BAD_REQUEST"))
    );
    let no_token = server
        .http
        .post(server.url("/v1/internal/idempotency"))
        .json(&lookup("demo", "k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    server.stop().await;
    db.cleanup().await;
}

async fn a_commit_past_its_deadline_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let storage = &server.cp.storage;
    let past = (signet_control_plane::now_ms() - 1) as u64;
    let expired = CommitRequest {
        deadline_ms: Some(past),
        ..request("demo", "late", "t-late")
    };
    assert_eq!(storage.commit(expired).await, Ok(CommitOutcome::Expired));
    assert_eq!(
        storage.chain("demo", "t-late", ChainPage::ALL).await,
        Ok(None)
    );
    assert_eq!(storage.idempotency_record("demo", "late").await, Ok(None));
    let future = (signet_control_plane::now_ms() + 60_000) as u64;
    let in_time = CommitRequest {
        deadline_ms: Some(future),
        ..request("demo", "late", "t-late")
    };
    assert_eq!(storage.commit(in_time).await, Ok(CommitOutcome::Committed));

    // Through the API: 504 COMMIT_EXPIRED and nothing stored.
    let receipt = sign_receipt(&signing_key(), "t-api", 1, None, "demo");
    let commit = json!({"tenant": "demo", "idempotency_key": "api", "fingerprint": fingerprint(b"api"),
        "receipt": receipt, "response": response_for(&receipt), "fu_tokens": 0,
        "deadline_ms": past});
    let batch = server
        .internal("commits", &json!({ "commits": [commit] }))
        .await;
    let result: &Value = &batch.body["results"][0];
    assert_eq!(
        (&result["status"], &result["body"]["code"]),
        (&json!(504), &json!("COMMIT_EXPIRED")),
        "{result}"
    );
    assert_eq!(
        storage.chain("demo", "t-api", ChainPage::ALL).await,
        Ok(None)
    );
    // Only the storage-level commit counted, in its month; the API one counted nothing.
    assert_eq!(storage.usage("demo", "2025-01").await.unwrap().vex, 1);
    assert_eq!(server.usage("demo").await["vex"], 0);
    server.stop().await;
    db.cleanup().await;
}

async fn a_commit_that_would_overflow_the_month_counters_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let storage = &server.cp.storage;
    let most = CommitRequest {
        fu_tokens: i64::MAX as u64 - 1,
        ..request("demo", "most", "t-a")
    };
    assert_eq!(storage.commit(most).await, Ok(CommitOutcome::Committed));
    for (key, fu) in [("over", 2), ("wraps", u64::MAX)] {
        let over = CommitRequest {
            fu_tokens: fu,
            ..request("demo", key, &format!("t-{key}"))
        };
        assert_eq!(
            storage.commit(over).await,
            Ok(CommitOutcome::CounterOverflow),
            "{key}"
        );
        assert_eq!(
            storage
                .chain("demo", &format!("t-{key}"), ChainPage::ALL)
                .await,
            Ok(None)
        );
    }
    let usage = storage.usage("demo", "2025-01").await.unwrap();
    assert_eq!((usage.vex, usage.fu), (1, i64::MAX as u64 - 1));
    // The storage goes on committing.
    let next = request("demo", "next", "t-next");
    assert_eq!(storage.commit(next).await, Ok(CommitOutcome::Committed));
    assert_eq!(server.get("/healthz", &[]).await.status, 200);
    server.stop().await;
    db.cleanup().await;
}

async fn the_chain_is_read_page_by_page(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    for i in 1..=5 {
        let r = server
            .exchange("demo", &format!("p{i}"), "t-pages", 0)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let owner = [("X-SIGNET-API-Key", DEMO_KEY)];
    let hops = |body: &Value| -> Vec<u64> {
        let receipts = body.as_array().unwrap();
        receipts
            .iter()
            .map(|r| r["hop"].as_u64().unwrap())
            .collect()
    };
    let whole = server.get("/v1/receipts/chain/t-pages", &owner).await;
    assert_eq!(hops(&whole.body), [1, 2, 3, 4, 5]);
    assert_eq!(whole.header("x-signet-next-after-hop"), None);
    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = server
            .get(
                &format!("/v1/receipts/chain/t-pages?after_hop={after}&limit=2"),
                &owner,
            )
            .await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        pages.push(hops(&page.body));
        match page.header("x-signet-next-after-hop") {
            Some(next) => after = next.parse().unwrap(),
            None => break,
        }
    }
    assert_eq!(pages, [vec![1, 2], vec![3, 4], vec![5]]);
    for limit in ["0", "1001", "x"] {
        let bad = server
            .get(&format!("/v1/receipts/chain/t-pages?limit={limit}"), &owner)
            .await;
        assert_eq!(
            (bad.status, &bad.body["code"]),
            (400, &json!("BAD_REQUEST")),
            "{limit}"
        );
    }
    // A byte cap stops a page after its first receipt.
    let storage = &server.cp.storage;
    let capped = ChainPage {
        after_hop: 3,
        limit: 10,
        max_bytes: 1,
    };
    let page = storage
        .chain("demo", "t-pages", capped)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((page.receipts.len(), page.more), (1, true));
    assert_eq!(page.receipts[0]["hop"], 4);
    // Another tenant's trace of that id and no trace at all: the same answer.
    for (key, trace) in [(OTHER_KEY, "t-pages"), (DEMO_KEY, "t-none")] {
        let r = server
            .get(
                &format!("/v1/receipts/chain/{trace}"),
                &[("X-SIGNET-API-Key", key)],
            )
            .await;
        assert_eq!(
            (r.status, &r.body),
            (
                404,
                &json!({"detail": "no such trace", "code": "TRACE_NOT_FOUND"})
            )
        );
    }
    server.stop().await;
    db.cleanup().await;
}
