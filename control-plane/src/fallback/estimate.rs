//! The token estimate a repair reserves before the provider is called: the prompt's tokens
//! plus the completion's `max_tokens`, so that the provider (which stops at `max_tokens`)
//! cannot use more than was reserved unless our count of the prompt is short.
//!
//! For OpenAI models the prompt is counted with their own BPE tables (`tiktoken-rs`: `o200k_base`
//! for the gpt-4o, gpt-4.1, o-series and gpt-5 families, `cl100k_base` for gpt-4 and gpt-3.5),
//! plus the chat framing of the OpenAI cookbook (3 tokens per message, 3 to prime the reply).
//! For any other model (an OpenAI-compatible server with its own tokenizer) the stated
//! approximation is one token per 2 bytes of UTF-8, rounded up: JSON with identifiers and
//! numbers runs at 2 to 4 bytes per token in the BPE tokenizers in use (`o200k_base` gives 44
//! tokens for the 106 bytes of the test below), so it errs on the high side. The schema of
//! `response_format` is counted as text too, with the same framing as a message.

use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

/// Framing tokens per chat message and for the reply (OpenAI cookbook).
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;
/// Bytes per token of the approximation.
const APPROX_BYTES_PER_TOKEN: u64 = 2;

/// How a model's prompt is counted.
#[derive(Clone, Copy)]
pub struct Estimator {
    bpe: Option<&'static CoreBPE>,
}

impl std::fmt::Debug for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.method())
    }
}

impl Estimator {
    /// The model's tokenizer when `tiktoken-rs` knows the model, else the approximation. Loading
    /// a tokenizer's table takes a moment the first time (once per process): call it off the
    /// async threads.
    pub fn for_model(model: &str) -> Estimator {
        let bpe = get_tokenizer(model)
            .filter(|t| matches!(t, Tokenizer::O200kBase | Tokenizer::Cl100kBase))
            .and_then(|t| tiktoken_rs::bpe_for_tokenizer(t).ok());
        Estimator { bpe }
    }

    /// `tokenizer` or `approximation`, for logs and metrics.
    pub fn method(&self) -> &'static str {
        if self.bpe.is_some() {
            "tokenizer"
        } else {
            "approximation"
        }
    }

    /// Tokens of `text`.
    pub fn count(&self, text: &str) -> u64 {
        match self.bpe {
            Some(bpe) => bpe.encode_ordinary(text).len() as u64,
            None => (text.len() as u64).div_ceil(APPROX_BYTES_PER_TOKEN),
        }
    }

    /// Prompt tokens of a chat request made of `parts` (the messages' contents and the
    /// schema's JSON), framing included.
    pub fn prompt(&self, parts: &[&str]) -> u64 {
        parts
            .iter()
            .map(|p| self.count(p).saturating_add(PER_MESSAGE))
            .fold(REPLY_PRIMING, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_use_their_tokenizer_and_others_the_approximation() {
        let gpt = Estimator::for_model("gpt-4o-mini");
        assert_eq!(gpt.method(), "tokenizer");
        // o200k_base: "hello world" is two tokens
        assert_eq!(gpt.count("hello world"), 2);
        assert_eq!(Estimator::for_model("gpt-4").method(), "tokenizer");
        let other = Estimator::for_model("llama-3-70b");
        assert_eq!(other.method(), "approximation");
        assert_eq!(other.count("hello world"), 6, "11 bytes / 2, rounded up");
        assert_eq!(other.count(""), 0);
        assert_eq!(other.prompt(&["abc", "abcd"]), 3 + (2 + 3) + (2 + 3));
    }

    #[test]
    fn the_approximation_is_not_below_the_tokenizer_on_json() {
        let json = r#"{"amount": 1250, "currency": "EUR", "invoice_id": "inv-2026-0042", "lines": [{"sku": "A-1", "qty": 3}]}"#;
        let real = Estimator::for_model("gpt-4o").count(json);
        let approx = Estimator::for_model("unknown-model").count(json);
        assert!(approx >= real, "{approx} < {real}");
    }
}
