//! A stand-in for the API behind an `inline` route: it answers every request with a JSON echo of
//! what reached it (method, path, the `X-SIGNET-*` headers, body), so that a test or a person can
//! see what the filter forwarded.
//!
//! `demo-upstream [ADDR]` (default `127.0.0.1:8089`; port 0 picks a free one). The first line on
//! stdout is `listening on <addr>`, which the e2e harness reads.

use std::io::Write;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::Json;
use serde_json::{json, Map, Value};

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let signet_headers: Map<String, Value> = headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.starts_with("x-signet-") || name.starts_with("x-odin-")
        })
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), Value::String(value))
        })
        .collect();
    // A JSON body is echoed as JSON so that tests can compare values, anything else as text.
    let body = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "signet_headers": signet_headers,
        "content_type": headers.get("content-type").and_then(|v| v.to_str().ok()),
        "body": body,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8089".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    let app = axum::Router::new().fallback(echo);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
