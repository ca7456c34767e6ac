//! Two control planes on one database (a rolling deploy, or two replicas on PostgreSQL): the
//! chain still never forks and every key still counts once. On PostgreSQL this drives the
//! batch path into conflicts with the other instance and through its one-by-one fallback.

mod common;

use std::sync::Arc;

use common::*;

both_backends!(
    two_instances_share_one_unforked_chain,
    two_instances_opening_the_same_traces_conflict_cleanly
);

async fn two_instances_share_one_unforked_chain(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = Arc::new(Server::start(&db).await);
    let b = Arc::new(Server::start(&db).await);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let server = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut committed = 0u64;
            for attempt in 0..3 {
                let r = server
                    .exchange("demo", &format!("k{i}-{attempt}"), "t-shared", 1)
                    .await;
                match (r.status, r.body["code"].as_str()) {
                    (200, _) => committed += 1,
                    (409, Some("CHAIN_CONFLICT")) => {}
                    other => panic!("unexpected {other:?} {:?}", r.body),
                }
            }
            committed
        }));
    }
    let mut successes = 0;
    for t in tasks {
        successes += t.await.unwrap();
    }
    let chain = a
        .get(
            "/v1/receipts/chain/t-shared",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await
        .body;
    let receipts = chain.as_array().unwrap();
    assert!(successes >= 2);
    assert_eq!(receipts.len() as u64, successes);
    signet_protocol::chain::verify(receipts, Some(a.cp.keys.jwks()), true).unwrap();
    let usage = b.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(successes), Some(0))
    );
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
    db.cleanup().await;
}

async fn two_instances_opening_the_same_traces_conflict_cleanly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = Arc::new(Server::start(&db).await);
    let b = Arc::new(Server::start(&db).await);
    let mut tasks = Vec::new();
    for t in 0..24 {
        for (n, server) in [a.clone(), b.clone()].into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let trace_id = format!("t-new-{t}");
                let receipt = sign_receipt(&signing_key(), &trace_id, 1, None, "demo");
                let key = format!("{trace_id}-{n}");
                server
                    .commit("demo", &key, &fingerprint(key.as_bytes()), &receipt, 0)
                    .await
            }));
        }
    }
    let mut committed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match (r.status, r.body["code"].as_str()) {
            (200, _) => committed += 1,
            (409, Some("CHAIN_CONFLICT")) => assert_eq!(r.body["head"]["hop"], 1),
            other => panic!("unexpected {other:?} {:?}", r.body),
        }
    }
    assert_eq!(committed, 24, "exactly one opener per trace wins");
    assert_eq!(a.usage("demo").await["vex"].as_u64(), Some(24));
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
    db.cleanup().await;
}
