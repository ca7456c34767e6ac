//! The provider: an OpenAI-compatible `POST {SP_OPENAI_BASE_URL}/chat/completions`, with
//! `Authorization: Bearer {SP_OPENAI_API_KEY}`. HTTPS through rustls, no proxy from the
//! environment, no redirects, one deadline for the whole call (`SP_OPENAI_TIMEOUT_MS`), and at
//! most [`MAX_ANSWER_BYTES`] read of an answer.
//!
//! What comes back is one of two things: the provider did not answer ([`Failure`]: nothing
//! to meter), or it answered ([`Answer`]: its tokens are metered whether or not the content is
//! usable).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::billing::MAX_FU_TOKENS;

/// The most of an answer read (a repair of a 64 KiB text fits many times over).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The provider did not answer with a completion: nothing was used, as far as we can know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    /// Connection or TLS failure.
    Unreachable(String),
    /// 429: the provider's own rate limit or quota.
    RateLimited,
    /// Any other status than 200 and 429.
    Status(u16),
}

impl Failure {
    /// The label of `signet_fallback_errors`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable(_) => "unreachable",
            Failure::RateLimited => "rate_limited",
            Failure::Status(s) if *s >= 500 => "status_5xx",
            Failure::Status(_) => "status_4xx",
        }
    }
}

/// Every [`Failure::kind`] and [`Unusable::kind`]: the values of `signet_fallback_errors_total`'s
/// `kind` label, each exported from 0 so that an alert on a kind's rate sees its first error.
pub const ERROR_KINDS: [&str; 9] = [
    "timeout",
    "unreachable",
    "rate_limited",
    "status_5xx",
    "status_4xx",
    "refused",
    "malformed",
    "truncated",
    "too_large",
];

/// A 200 answer whose content cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// `message.refusal`.
    Refused(String),
    /// Not the chat completion JSON, no content, or content that is not JSON.
    Malformed(String),
    /// `finish_reason: "length"`: cut at `max_tokens`.
    Truncated,
    /// Over [`MAX_ANSWER_BYTES`].
    TooLarge,
}

impl Unusable {
    pub fn kind(&self) -> &'static str {
        match self {
            Unusable::Refused(_) => "refused",
            Unusable::Malformed(_) => "malformed",
            Unusable::Truncated => "truncated",
            Unusable::TooLarge => "too_large",
        }
    }
}

/// The provider answered 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `usage.total_tokens`; `None` when absent (or unreadable, or above
    /// [`MAX_FU_TOKENS`]): the call is metered at its estimate then.
    pub total_tokens: Option<u64>,
    /// The message's content.
    pub content: Result<String, Unusable>,
}

pub struct Provider {
    http: reqwest::Client,
    url: String,
    api_key: String,
    timeout: Duration,
}

impl Provider {
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Provider, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Provider {
            http,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key: api_key.to_owned(),
            timeout,
        })
    }

    /// Sends `body`; never longer than the timeout, never more than [`MAX_ANSWER_BYTES`] read.
    pub async fn complete(&self, body: &Value) -> Result<Answer, Failure> {
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, self.send(body)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(elapsed = ?started.elapsed(), "the provider timed out");
                Err(Failure::Timeout)
            }
        }
    }

    async fn send(&self, body: &Value) -> Result<Answer, Failure> {
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                Failure::Timeout
            } else {
                Failure::Unreachable(e.to_string())
            }
        };
        let mut response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await
            .map_err(failed)?;
        match response.status().as_u16() {
            200 => {}
            429 => return Err(Failure::RateLimited),
            other => return Err(Failure::Status(other)),
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if bytes.len().saturating_add(chunk.len()) > MAX_ANSWER_BYTES {
                return Ok(Answer {
                    total_tokens: None,
                    content: Err(Unusable::TooLarge),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(read_answer(&bytes))
    }
}

/// Reads a chat completion: its usage, then its first choice.
pub fn read_answer(bytes: &[u8]) -> Answer {
    let Ok(doc) = serde_json::from_slice::<Value>(bytes) else {
        return Answer {
            total_tokens: None,
            content: Err(Unusable::Malformed("the answer is not JSON".into())),
        };
    };
    let total_tokens = doc
        .pointer("/usage/total_tokens")
        .and_then(Value::as_u64)
        .filter(|t| *t <= MAX_FU_TOKENS);
    let choice = doc.pointer("/choices/0");
    let message = choice.and_then(|c| c.get("message"));
    let content = if let Some(refusal) = message
        .and_then(|m| m.get("refusal"))
        .and_then(Value::as_str)
    {
        Err(Unusable::Refused(refusal.to_owned()))
    } else if choice.and_then(|c| c.get("finish_reason")) == Some(&Value::from("length")) {
        Err(Unusable::Truncated)
    } else {
        match message
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
        {
            Some(text) => Ok(text.to_owned()),
            None => Err(Unusable::Malformed(
                "the answer has no choices[0].message.content".into(),
            )),
        }
    };
    Answer {
        total_tokens,
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(doc: Value) -> Answer {
        read_answer(doc.to_string().as_bytes())
    }

    #[test]
    fn a_completion_gives_its_content_and_total_tokens() {
        let a = answer(json!({
            "choices": [{"message": {"role": "assistant", "content": "{\"a\":1}", "refusal": null},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
        }));
        assert_eq!(
            a,
            Answer {
                total_tokens: Some(35),
                content: Ok("{\"a\":1}".into())
            }
        );
    }

    #[test]
    fn refusals_truncation_and_garbage_are_unusable_but_keep_their_usage() {
        let usage = json!({"total_tokens": 12});
        let refused = answer(
            json!({"choices": [{"message": {"content": null, "refusal": "no"}}], "usage": usage}),
        );
        assert_eq!(refused.content, Err(Unusable::Refused("no".into())));
        assert_eq!(refused.total_tokens, Some(12));
        let cut = answer(
            json!({"choices": [{"message": {"content": "{\"a\":"}, "finish_reason": "length"}], "usage": usage}),
        );
        assert_eq!(cut.content, Err(Unusable::Truncated));
        let empty = answer(json!({"choices": [], "usage": usage}));
        assert!(matches!(empty.content, Err(Unusable::Malformed(_))));
        let not_json = read_answer(b"<html>oops</html>");
        assert_eq!(not_json.total_tokens, None);
        assert!(matches!(not_json.content, Err(Unusable::Malformed(_))));
        let no_usage = answer(json!({"choices": [{"message": {"content": "{}"}}]}));
        assert_eq!(
            (no_usage.total_tokens, no_usage.content),
            (None, Ok("{}".into()))
        );
        let absurd = answer(
            json!({"choices": [{"message": {"content": "{}"}}], "usage": {"total_tokens": 1u64 << 40}}),
        );
        assert_eq!(absurd.total_tokens, None, "beyond MAX_FU_TOKENS: estimated");
    }
}
