//! A fake OpenAI-compatible chat completions server (`POST /v1/chat/completions`) on a
//! loopback port. It checks what it receives as the real service would care (the bearer key,
//! the model, a system then a user message, temperature 0, a `response_format` of a known
//! shape) and records every problem; it answers as told ([`Behaviour`]) and reports its own
//! token counts, so that a test can assert the FU metered exactly.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

pub const OPENAI_KEY: &str = "sk-test-fake-openai-key";
pub const MODEL: &str = "gpt-4o-mini";

/// How the fake answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with `content`, and `usage` unless `usage` is false.
    Answer { content: String, usage: bool },
    /// 200 with a refusal.
    Refuse,
    /// 200, cut at max_tokens (`finish_reason: "length"`).
    Truncated,
    /// This status, with an error body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with a body of this many bytes (a JSON string of `x`).
    Huge(usize),
    /// 200 with `{}` and a usage of N prompt tokens, N read from the user message `fu=N`: each
    /// concurrent call meters what its own request asks (the billing tests).
    Metered,
}

#[derive(Debug)]
struct Settings {
    behaviour: Behaviour,
    delay: Duration,
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub struct FakeState {
    settings: Mutex<Settings>,
    calls: AtomicU64,
    problems: Mutex<Vec<String>>,
    requests: Mutex<Vec<Value>>,
}

pub struct FakeOpenAi {
    /// `http://127.0.0.1:port/v1`: what `SP_OPENAI_BASE_URL` is set to.
    pub base_url: String,
    pub state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOpenAi {
    pub async fn start() -> FakeOpenAi {
        let state = Arc::new(FakeState {
            settings: Mutex::new(Settings {
                behaviour: Behaviour::Answer {
                    content: "{}".into(),
                    usage: true,
                },
                delay: Duration::ZERO,
                prompt_tokens: 40,
                completion_tokens: 15,
            }),
            calls: AtomicU64::new(0),
            problems: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeOpenAi {
            base_url,
            state,
            task,
        }
    }

    pub fn answer(&self, behaviour: Behaviour) {
        self.state.settings.lock().unwrap().behaviour = behaviour;
    }

    /// Answers `content` (a repaired JSON text) with usage.
    pub fn repair_with(&self, content: &str) {
        self.answer(Behaviour::Answer {
            content: content.into(),
            usage: true,
        });
    }

    pub fn delay(&self, delay: Duration) {
        self.state.settings.lock().unwrap().delay = delay;
    }

    /// The usage it reports: `total_tokens` is their sum.
    pub fn tokens(&self, prompt: u64, completion: u64) {
        let mut s = self.state.settings.lock().unwrap();
        s.prompt_tokens = prompt;
        s.completion_tokens = completion;
    }

    pub fn total_tokens(&self) -> u64 {
        let s = self.state.settings.lock().unwrap();
        s.prompt_tokens + s.completion_tokens
    }

    /// Requests received.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// What was wrong in the requests received (empty: all were as the real service expects).
    pub fn problems(&self) -> Vec<String> {
        self.state.problems.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<Value> {
        self.state.requests.lock().unwrap().last().cloned()
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the real service would refuse or what the fallback must always send.
fn check(headers: &HeaderMap, body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {OPENAI_KEY}") {
        problems.push(format!("authorization {auth:?}"));
    }
    if body["model"] != MODEL {
        problems.push(format!("model {}", body["model"]));
    }
    if body["temperature"] != 0 {
        problems.push(format!("temperature {}", body["temperature"]));
    }
    if !body["max_tokens"].is_u64() {
        problems.push(format!("max_tokens {}", body["max_tokens"]));
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap_or(""))
        .collect();
    if roles != ["system", "user"] {
        problems.push(format!("roles {roles:?}"));
    }
    let system = messages
        .first()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    if !system.contains("Never invent") {
        problems.push("the system prompt does not forbid inventing values".into());
    }
    let format = &body["response_format"];
    match format["type"].as_str() {
        Some("json_schema") => {
            let s = &format["json_schema"];
            if !(s["name"].is_string() && s["strict"] == true && s["schema"].is_object()) {
                problems.push(format!("json_schema response_format {format}"));
            }
        }
        // JSON mode: the word JSON must be in the messages, or the real service refuses
        Some("json_object") if system.contains("JSON") => {}
        _ => problems.push(format!("response_format {format}")),
    }
    problems
}

async fn complete(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let body: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            state
                .problems
                .lock()
                .unwrap()
                .push(format!("body not JSON: {e}"));
            return (StatusCode::BAD_REQUEST, "{}").into_response();
        }
    };
    let problems = check(&headers, &body);
    let unauthorized = problems.iter().any(|p| p.starts_with("authorization"));
    state.problems.lock().unwrap().extend(problems);
    let user = body["messages"][1]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    state.requests.lock().unwrap().push(body);
    if unauthorized {
        let error = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}});
        return (StatusCode::UNAUTHORIZED, error.to_string()).into_response();
    }
    let (behaviour, delay, prompt, completion) = {
        let s = state.settings.lock().unwrap();
        (
            s.behaviour.clone(),
            s.delay,
            s.prompt_tokens,
            s.completion_tokens,
        )
    };
    tokio::time::sleep(delay).await;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion});
    let completion_with = |message: Value, finish: &str, usage: Option<&Value>| {
        let mut doc = json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        });
        if let Some(usage) = usage {
            doc["usage"] = usage.clone();
        }
        doc.to_string()
    };
    let json_ok = |text: String| {
        (StatusCode::OK, [("content-type", "application/json")], text).into_response()
    };
    match behaviour {
        Behaviour::Answer {
            content,
            usage: with_usage,
        } => json_ok(completion_with(
            json!({"role": "assistant", "content": content, "refusal": null}),
            "stop",
            with_usage.then_some(&usage),
        )),
        Behaviour::Refuse => json_ok(completion_with(
            json!({"role": "assistant", "content": null, "refusal": "I cannot repair this without guessing."}),
            "stop",
            Some(&usage),
        )),
        Behaviour::Truncated => json_ok(completion_with(
            json!({"role": "assistant", "content": "{\"amount\": 12", "refusal": null}),
            "length",
            Some(&usage),
        )),
        Behaviour::Status(status) => {
            let error = json!({"error": {"message": "fake failure", "type": "server_error"}});
            (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                error.to_string(),
            )
                .into_response()
        }
        Behaviour::Malformed => json_ok("<html>upstream connect error</html>".into()),
        Behaviour::Huge(bytes) => json_ok(format!("\"{}\"", "x".repeat(bytes))),
        Behaviour::Metered => {
            let tokens: u64 = user
                .split_once("fu=")
                .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let usage = json!({"prompt_tokens": tokens, "completion_tokens": 0,
                               "total_tokens": tokens});
            json_ok(completion_with(
                json!({"role": "assistant", "content": "{}", "refusal": null}),
                "stop",
                Some(&usage),
            ))
        }
    }
}
