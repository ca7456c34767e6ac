//! The real binary: committed receipts survive a restart, and bad configuration stops the start.

mod common;

use std::process::Command;

use common::process::{spawn, Process};
use common::*;
use signet_protocol::keys::Jwks;

both_backends!(
    committed_receipts_survive_a_restart,
    each_api_is_served_on_its_own_port_only
);

/// Stops the process the way an orchestrator does (SIGTERM) and waits for it.
fn terminate(mut p: Process) {
    let pid = p.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = p.0.wait().unwrap();
    assert!(status.success(), "graceful shutdown: {status}");
}

async fn committed_receipts_survive_a_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (process, client) = spawn(&db).await;
    for i in 0..5 {
        let r = client
            .exchange("demo", &format!("k{i}"), "t-durable", 3)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let owner = [("X-SIGNET-API-Key", DEMO_KEY)];
    let before = client
        .get("/v1/receipts/chain/t-durable", &owner)
        .await
        .body;
    terminate(process);

    let (_process, client) = spawn(&db).await;
    let after = client
        .get("/v1/receipts/chain/t-durable", &owner)
        .await
        .body;
    assert_eq!(after.as_array().unwrap().len(), 5);
    assert_eq!(before, after);
    // The idempotency record survived too: a retry replays the stored response.
    let retry = sign_receipt(&signing_key(), "t-durable", 1, None, "demo");
    let replay = client
        .commit("demo", "k4", &fingerprint(b"k4"), &retry, 3)
        .await;
    assert_eq!(
        (replay.body["outcome"].as_str(), &replay.body["response"]),
        (Some("replay"), &response_for(&before[4]))
    );
    let usage = client.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(5), Some(0))
    );
    // The chain continues where it stopped.
    assert_eq!(
        client.exchange("demo", "k5", "t-durable", 0).await.status,
        200
    );
    let export = client
        .get("/v1/receipts/export/t-durable", &owner)
        .await
        .body;
    let jwks = client
        .get("/.well-known/jwks.json", &[])
        .await
        .body
        .to_string();
    signet_protocol::bundle::verify(
        &export,
        Some(&Jwks::from_json(jwks.as_bytes()).unwrap()),
        true,
    )
    .unwrap();
    drop(_process);
    db.cleanup().await;
}

/// Each listener serves its API and nothing else: a path of another API is 404 `NOT_FOUND`
/// there, as an unknown path is (so the public port says nothing about the others).
async fn each_api_is_served_on_its_own_port_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (process, client) = spawn(&db).await;
    let b = client.bases.clone();
    let admin = [("X-SIGNET-Admin-Key", ADMIN_KEY)];
    let filter = [("X-SIGNET-Filter-Token", FILTER_TOKEN)];
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);
    let cases: [Case; 9] = [
        (&b.internal, "/v1/internal/tenant", &filter, 401),
        (&b.public, "/v1/internal/tenant", &filter, 404),
        (&b.admin, "/v1/internal/tenant", &filter, 404),
        (&b.admin, "/v1/admin/usage/demo", &admin, 200),
        (&b.public, "/v1/admin/usage/demo", &admin, 404),
        (&b.internal, "/v1/admin/usage/demo", &admin, 404),
        (&b.public, "/.well-known/jwks.json", &[], 200),
        (&b.internal, "/.well-known/jwks.json", &[], 404),
        (&b.admin, "/healthz", &[], 404),
    ];
    for (base, path, headers, status) in cases {
        let mut request = client.http.get(format!("{base}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{base}{path}");
        if status == 404 {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["code"], "NOT_FOUND", "{base}{path}");
        }
    }
    // the filter's commit is served on the internal port alone
    let commit = client.exchange("demo", "k-ports", "t-ports", 0).await;
    assert_eq!(commit.status, 200, "{:?}", commit.body);
    let on_public = client
        .http
        .post(format!("{}/v1/internal/commits", b.public))
        .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(on_public.status().as_u16(), 404);
    drop(process);
    db.cleanup().await;
}

#[test]
fn invalid_configuration_stops_the_start_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-control-plane"))
        .env_clear()
        .env("SP_STORAGE", "postgres")
        .env("SP_PRIVATE_KEY_B64", SEED)
        .env("SP_KID", KID)
        .env("SP_FILTER_TOKEN", FILTER_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SP_POSTGRES_URL"), "{stderr}");
    assert!(!stderr.contains(SEED), "never log keys");
}
