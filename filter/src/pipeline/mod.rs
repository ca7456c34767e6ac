//! The SPEC §4 exchange as a state machine, one per HTTP request.
//!
//! The filter feeds it host events (request headers, request body, control-plane responses) and
//! gets back an explicit [`Action`]: pause, call the control plane, answer locally, or let the
//! request continue upstream (with receipt headers and maybe a new body). Nothing here touches
//! proxy-wasm, so every path runs in native unit tests.
//!
//! ```text
//! headers ─▶ route, API key, idempotency key, trace header ─▶ tenant (cached, else callout)
//!         ─▶ admitted: rate (429), key in flight on this worker? (409)
//! body    ─▶ limit (413) ─▶ parse (400/422) ─▶ sanitize → normalize → HEL
//!         ─▶ sign on the head this worker knows (hop 1 for a new trace)
//!         ─▶ commit ─┬─ committed ─▶ 200 / upstream
//!                    ├─ replay    ─▶ the stored response, Idempotency-Hit
//!                    └─ 409 conflict with the head ─▶ re-sign on it, once
//! ```
//!
//! One callout per exchange once the tenant is known: commit decides idempotency and the chain
//! append in one transaction, so nothing is reserved before it and nothing must be released
//! after an error (see [`crate::worker`] for what a worker remembers instead). Commits travel in
//! batches: see [`crate::commit_queue`].
//!
//! - [`actions`]: what the exchange asks of the filter ([`Action`]) and the callouts it makes.
//! - `exchange`: [`Exchange`] and its [`Stage`](exchange) enum, the step functions.
//! - `headers`: the request and response header names, receipt headers of a 200 body.
//! - `health`: `/healthz` through Envoy, the control plane's health as the filter reaches it.
//! - `reply`: a control-plane answer, classified; which errors blame the filter.
//! - `tenant_cache`: the tenant grants cached in shared data.
//! - `request`: parsing the body (the envelope or the inline payload).
//! - `verify`: sanitize → normalize → HEL → canonical form and CID.
//! - `forward`: the delivery to `forward_url` before signing, its outcome in the receipt.
//! - `sign`: the receipt, the SPEC §4 200 body ([`exchange_response`]) and the commit.

pub mod actions;
mod exchange;
mod fallback;
mod forward;
mod headers;
mod health;
mod reply;
mod request;
mod sign;
mod tenant_cache;
mod verify;

pub use actions::{callout, Action, Call, Callout, CalloutResponse, CommitJson, Forward, Response};
pub use exchange::Exchange;
pub use headers::Headers;
pub use reply::expired_commit;
pub use sign::exchange_response;

#[cfg(test)]
mod tests;
