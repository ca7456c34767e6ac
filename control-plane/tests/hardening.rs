//! What a filter may commit (#13 items 3, 8, 11, 13) and what a client may hold of a listener
//! (item 5). Each test failed before its fix.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use signet_protocol::keys::SigningKey;

both_backends!(
    an_expired_commit_is_answered_504_and_not_stored,
    receipts_of_a_previous_kid_verify_but_cannot_be_committed,
    numbers_and_timestamps_are_bounded,
);

/// One commit's JSON, with `extra` members merged in (e.g. `deadline_ms`).
fn commit_json(receipt: &Value, key: &str, fu: u64, extra: Value) -> Value {
    let mut commit = json!({"tenant": "demo", "idempotency_key": key,
        "fingerprint": fingerprint(key.as_bytes()), "receipt": receipt,
        "response": response_for(receipt), "fu_tokens": fu});
    if let (Some(commit), Value::Object(extra)) = (commit.as_object_mut(), extra) {
        commit.extend(extra);
    }
    commit
}

/// Status and code of each commit of a batch.
async fn commit_batch(server: &Server, commits: Vec<String>) -> Vec<(u64, Value)> {
    let body = format!("{{\"commits\":[{}]}}", commits.join(","));
    let response = server
        .http
        .post(server.url("/v1/internal/commits"))
        .header("X-SIGNET-Filter-Token", FILTER_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let code = r["body"]["code"].clone();
            (r["status"].as_u64().unwrap(), code)
        })
        .collect()
}

async fn an_expired_commit_is_answered_504_and_not_stored(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = Server::start(&db).await;
    let now = signet_control_plane::now_ms() as u64;
    let late = sign_receipt(&signing_key(), "t-late", 1, None, "demo");
    let on_time = sign_receipt(&signing_key(), "t-on-time", 1, None, "demo");
    let results = commit_batch(
        &server,
        vec![
            commit_json(&late, "k-late", 5, json!({"deadline_ms": now - 1})).to_string(),
            commit_json(
                &on_time,
                "k-on-time",
                5,
                json!({"deadline_ms": now + 60_000}),
            )
            .to_string(),
        ],
    )
    .await;
    assert_eq!(
        results,
        vec![(504, json!("COMMIT_EXPIRED")), (200, Value::Null)]
    );
    let owner = [("X-SIGNET-API-Key", DEMO_KEY)];
    assert_eq!(
        server.get("/v1/receipts/chain/t-late", &owner).await.status,
        404,
        "nothing stored"
    );
    let usage = server.usage("demo").await;
    assert_eq!(
        (usage["vex"].as_u64(), usage["fu"].as_u64()),
        // a commit's fu_tokens is what its receipt states; FU are metered by the repair only
        (Some(1), Some(0))
    );
    // the key was not consumed: a commit in time succeeds
    let retry = server
        .commit("demo", "k-late", &fingerprint(b"k-late"), &late, 5)
        .await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    server.stop().await;
    db.cleanup().await;
}

async fn receipts_of_a_previous_kid_verify_but_cannot_be_committed(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    let old = SigningKey::from_seed_b64url(OTHER_SEED, "old-k0").unwrap();
    let jwks = json!({"keys": [old.public_jwk()]}).to_string();
    db.set("SP_PREVIOUS_JWKS", &jwks);
    let server = Server::start(&db).await;
    let jwks = server.get("/.well-known/jwks.json", &[]).await.body;
    assert_eq!(jwks["keys"][1]["kid"], "old-k0", "still published");
    let receipt = sign_receipt(&old, "t-old-kid", 1, None, "demo");
    signet_protocol::receipt::verify(
        &receipt,
        Some(&signet_protocol::keys::Jwks::from_json(jwks.to_string().as_bytes()).unwrap()),
        true,
    )
    .expect("an old kid's receipt verifies");
    let r = server
        .commit("demo", "k-old", &fingerprint(b"k-old"), &receipt, 0)
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("RECEIPT_INVALID"))
    );
    assert!(
        r.body["detail"].as_str().unwrap().contains("old-k0"),
        "{}",
        r.body
    );
    let current = sign_receipt(&signing_key(), "t-old-kid", 1, None, "demo");
    let r = server
        .commit("demo", "k-old", &fingerprint(b"k-old"), &current, 0)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop().await;
    db.cleanup().await;
}

async fn numbers_and_timestamps_are_bounded(backend: Backend) {
    let mut db = TestDb::new(backend).await;
    db.set("SP_CHAIN_MAX", "10");
    // priced overage tiers: fu_tokens near 2^64 overflowed the amount (a panic in the writer)
    db.set(
        "SP_RESERVED_CONFIG",
        r#"{"demo":{"fu_reserved":0,"fu_overage_tiers":[{"threshold":1000,"price_per_unit":"123456.789"}]}}"#,
    );
    let server = Server::start(&db).await;
    let key = signing_key();
    let refused = |detail: &'static str| {
        move |r: &Reply| {
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (400, Some("RECEIPT_INVALID")),
                "{detail}: {}",
                r.body
            );
            assert!(
                r.body["detail"].as_str().unwrap().contains(detail),
                "{}",
                r.body
            );
        }
    };
    let fresh = sign_receipt(&key, "t-big", 1, None, "demo");
    for fu in [1_000_000_001, u64::MAX / 2, u64::MAX] {
        let r = server
            .commit("demo", "k-fu", &fingerprint(b"k-fu"), &fresh, fu)
            .await;
        refused("fu_tokens")(&r);
    }
    // hop: the one after SP_CHAIN_MAX is the decision's (CHAIN_CONFLICT on this new trace),
    // beyond it the receipt is refused
    let next = sign_receipt(&key, "t-hop", 11, Some(&fingerprint(b"x")), "demo");
    let r = server
        .commit("demo", "k-h1", &fingerprint(b"k-h1"), &next, 0)
        .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("CHAIN_CONFLICT"))
    );
    for hop in [12, 1 << 53] {
        let at = signet_control_plane::now_ms() as u64;
        let far = sign_receipt_at(&key, "t-hop", hop, Some(&fingerprint(b"x")), "demo", at);
        let r = server
            .commit("demo", "k-h2", &fingerprint(b"k-h2"), &far, 0)
            .await;
        refused("SP_CHAIN_MAX")(&r);
    }
    // ts: within SP_RECEIPT_MAX_SKEW_SECS (300 s) of now, either way
    let now = signet_control_plane::now_ms() as u64;
    for at in [now - 301_000, now + 301_000, 1_764_090_000_000] {
        let stale = sign_receipt_at(&key, "t-ts", 1, None, "demo", at);
        let r = server
            .commit("demo", "k-ts", &fingerprint(b"k-ts"), &stale, 0)
            .await;
        refused("SP_RECEIPT_MAX_SKEW_SECS")(&r);
    }
    let near = sign_receipt_at(&key, "t-ts", 1, None, "demo", now - 200_000);
    let r = server
        .commit("demo", "k-ts", &fingerprint(b"k-ts"), &near, 0)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // the largest fu_tokens allowed is accepted, and bills nothing: FU are metered by the
    // repair endpoint only (its tier math is tested in tests/fallback.rs and billing.rs)
    let r = server
        .commit("demo", "k-fu", &fingerprint(b"k-fu"), &fresh, 1_000_000_000)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = server.usage("demo").await;
    assert_eq!(usage["fu"].as_u64(), Some(0));
    let fu_rows = usage["billing_queue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["meter"] == "fu")
        .count();
    assert_eq!(fu_rows, 0, "{usage}");
    server.stop().await;
    db.cleanup().await;
}

/// serde_json keeps the last of two members of one name; the control plane refuses them, in
/// one commit (which fails alone) and in an admin reload (which changes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_member_names_are_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db).await;
    let receipt = sign_receipt(&signing_key(), "t-dup", 1, None, "demo");
    let good = commit_json(&receipt, "k-good", 0, json!({})).to_string();
    // the same commit with a second "tenant" member: serde would read "other"
    let twice = good.replacen(
        r#""tenant":"demo""#,
        r#""tenant":"demo","tenant":"other""#,
        1,
    );
    assert_ne!(twice, good);
    // and with a second receipt member inside the receipt
    let other = sign_receipt(&signing_key(), "t-dup-2", 1, None, "demo");
    let inner = commit_json(&other, "k-inner", 0, json!({}))
        .to_string()
        .replacen(r#""hop":1"#, r#""hop":1,"hop":1"#, 1);
    let results = commit_batch(&server, vec![twice, inner, good]).await;
    assert_eq!(
        results,
        vec![
            (400, json!("BAD_REQUEST")),
            (400, json!("BAD_REQUEST")),
            (200, Value::Null)
        ]
    );

    let reload = server
        .http
        .post(server.url("/v1/admin/reload"))
        .header("X-SIGNET-Admin-Key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(r#"{"api_keys":{"new-key-1":{"tenant":"a"},"new-key-1":{"tenant":"b"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status().as_u16(), 400);
    let body: Value = reload.json().await.unwrap();
    assert_eq!(body["code"], "BAD_REQUEST");
    assert!(
        !body["detail"].as_str().unwrap().contains("new-key-1"),
        "an API key is never echoed: {body}"
    );
    let still = server
        .get(
            "/v1/receipts/chain/t-dup",
            &[("X-SIGNET-API-Key", DEMO_KEY)],
        )
        .await;
    assert_eq!(still.status, 200, "the old keys still work");
    server.stop().await;
    db.cleanup().await;
}

fn address(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Whether the server closed `stream` within `within` (a read returns 0 or fails).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// A client that opens a connection and sends nothing, or half its headers, or keeps an idle
/// connection, is cut off after `SP_IDLE_TIMEOUT_SECS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(&db, |c| c.limits.idle_timeout = Duration::from_secs(1)).await;
    let public = address(&server.bases.public);
    tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(&public).unwrap();
        let mut dribble = TcpStream::connect(&public).unwrap();
        dribble
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .unwrap();
        let mut idle = TcpStream::connect(&public).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut answer = [0u8; 12];
        idle.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        let start = Instant::now();
        for stream in [&mut silent, &mut dribble, &mut idle] {
            assert!(closed_within(stream, Duration::from_secs(5)));
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    })
    .await
    .unwrap();
    server.stop().await;
    db.cleanup().await;
}

/// A listener holds at most `SP_MAX_CONNECTIONS` connections; a flood on one listener does not
/// reach another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_limited_per_listener() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(&db, |c| c.limits.max_connections = 2).await;
    let public = address(&server.bases.public);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&public).unwrap())
        .collect();
    // the third connection is accepted by the kernel but not served while two are held
    let third = tokio::time::timeout(
        Duration::from_millis(700),
        server.http.get(server.url("/healthz")).send(),
    )
    .await;
    assert!(third.is_err(), "served beyond the limit");
    // the internal listener has its own slots
    let tenant = server
        .http
        .get(server.url("/v1/internal/tenant"))
        .send()
        .await
        .unwrap();
    assert_eq!(tenant.status().as_u16(), 401);
    drop(held);
    let health = server.get("/healthz", &[]).await;
    assert_eq!(health.status, 200);
    server.stop().await;
    db.cleanup().await;
}

/// A request whose body never completes is answered by `SP_REQUEST_TIMEOUT_SECS`, not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_completes_times_out() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server =
        Server::start_with(&db, |c| c.limits.request_timeout = Duration::from_secs(1)).await;
    let internal = address(&server.bases.internal);
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(&internal).unwrap();
        let head = format!(
            "POST /v1/internal/commits HTTP/1.1\r\nhost: x\r\nx-signet-filter-token: {FILTER_TOKEN}\r\ncontent-length: 100\r\n\r\n{{\"commits\":"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (start.elapsed(), String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .unwrap();
    assert!(answer.0 < Duration::from_secs(4), "{answer:?}");
    assert!(answer.1.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.1.contains("SP_REQUEST_TIMEOUT_SECS"), "{answer:?}");
    server.stop().await;
    db.cleanup().await;
}
