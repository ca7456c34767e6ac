//! Error answers whatever refuses the request (a handler, an extractor, the fallback): a
//! SPEC §4 body, and one count in `signet_cp_errors_total` by code. The HTTP layer does not
//! depend on the backend, so SQLite only.

mod common;

use common::*;
use serde_json::json;

/// The raw answer: status, `Content-Type` and body text.
async fn raw(request: reqwest::RequestBuilder) -> (u16, String, String) {
    let response = request.send().await.unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (
        response.status().as_u16(),
        content_type,
        response.text().await.unwrap(),
    )
}

fn error_count(metrics: &str, code: &str) -> u64 {
    let prefix = format!("signet_cp_errors_total{{code=\"{code}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_rejection_is_a_spec_error_body() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db).await;
    let url = |path: &str| server.url(path);
    let json = "application/json".to_owned();
    let cases = [
        // a path that is not UTF-8 once decoded: axum's own rejection was plain text
        (
            server
                .http
                .get(url("/v1/receipts/chain/%FF"))
                .header("X-SIGNET-API-Key", DEMO_KEY),
            400,
            r#"{"detail":"trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]","code":"BAD_TRACE_ID"}"#,
        ),
        (
            server.http.get(url("/v1/internal/tenant")),
            401,
            r#"{"detail":"missing or wrong filter token","code":"FILTER_UNAUTHORIZED"}"#,
        ),
        (
            server
                .http
                .get(url("/v1/admin/usage/demo"))
                .header("X-SIGNET-Admin-Key", "wrong-admin-key-000000"),
            401,
            r#"{"detail":"unknown admin key","code":"UNKNOWN_ADMIN_KEY"}"#,
        ),
        (
            server.http.post(url("/v1/admin/reload")).json(&json!({})),
            401,
            r#"{"detail":"missing X-SIGNET-Admin-Key header","code":"MISSING_ADMIN_KEY"}"#,
        ),
    ];
    for (request, status, body) in cases {
        assert_eq!(raw(request).await, (status, json.clone(), body.to_owned()));
    }
    // a query that does not parse: axum's own rejection was plain text
    let (status, content_type, body) = raw(server
        .http
        .get(url("/v1/admin/usage/demo?month=2025-01&month=2025-02"))
        .header("X-SIGNET-Admin-Key", ADMIN_KEY))
    .await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, content_type, &body["code"]),
        (400, json, &json!("BAD_REQUEST"))
    );
    assert!(body["detail"].is_string(), "{body}");
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_counted_once_by_its_code() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db).await;
    let wrong_admin = [("X-SIGNET-Admin-Key", "wrong-admin-key-000000")];
    assert_eq!(
        server
            .get("/v1/admin/usage/demo", &wrong_admin)
            .await
            .status,
        401
    );
    assert_eq!(server.get("/v1/admin/usage/demo", &[]).await.status, 401);
    assert_eq!(
        server
            .get("/v1/receipts/chain/t-1", &wrong_admin)
            .await
            .status,
        401
    );
    assert_eq!(server.get("/v1/no/such/endpoint", &[]).await.status, 404);
    let no_token = server.http.get(server.url("/v1/internal/tenant"));
    assert_eq!(raw(no_token).await.0, 401);
    // a refused commit inside a 200 batch answer counts too, the batch answer does not
    let batch = server
        .internal("commits", &json!({"commits": [{"tenant": "demo"}]}))
        .await;
    assert_eq!(
        (batch.status, &batch.body["results"][0]["status"]),
        (200, &json!(400))
    );
    let metrics = server.get_text("/metrics").await;
    for (code, count) in [
        ("UNKNOWN_ADMIN_KEY", 2),
        ("MISSING_ADMIN_KEY", 1),
        ("NOT_FOUND", 1),
        ("FILTER_UNAUTHORIZED", 1),
        ("BAD_REQUEST", 1),
    ] {
        assert_eq!(error_count(&metrics, code), count, "{code}\n{metrics}");
    }
    server.stop().await;
    db.cleanup().await;
}
