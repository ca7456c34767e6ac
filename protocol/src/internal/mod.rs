//! The filter ↔ control-plane API (docs/ARCHITECTURE.md, "Internal API"): one definition of each
//! message, used by both sides, so that neither writes or reads the other's JSON by hand.
//!
//! - [`tenant`]: `GET /v1/internal/tenant`, the key-hash lookup and the [`tenant::Grant`] it answers.
//! - [`commit`]: `POST /v1/internal/commits`, a [`commit::CommitBatch`] of [`commit::Commit`]s
//!   answered by one [`commit::CommitResult`] each.
//! - [`idempotency`]: `POST /v1/internal/idempotency`, the stored answer of a key, and the
//!   request [`idempotency::fingerprint`].
//! - [`health`]: `GET /v1/internal/health` (and the public `/healthz`): [`health::Health`].
//! - [`forward`]: `POST /v1/internal/forward`, a [`forward::ForwardRequest`] delivered once by
//!   the control plane and answered with the receipt's [`forward::Forwarded`].
//! - [`repair`]: `POST /v1/internal/repair`, the LLM-fallback repair of an embedded JSON text,
//!   metered in FU against the tenant's monthly quota.
//! - [`decide`]: the commit decision (idempotency, then the chain append) as a pure function, the
//!   one both storage backends and the filter's test fake call.
//! - [`code`]: every error code the control plane answers, with its status.
//!
//! A new internal endpoint gets a file here with its path, its request and its answer.

pub mod code;
pub mod commit;
pub mod decide;
pub mod forward;
pub mod health;
pub mod idempotency;
pub mod repair;
pub mod tenant;

pub use code::Code;
pub use code::ErrorReply;
pub use commit::{Commit, CommitBatch, CommitReply, CommitResult, CommitResults, Outcome};
pub use decide::{decide, Candidate, Decision, Head, Record, Rejection, TraceState};
pub use tenant::Grant;

/// Every internal call presents `SP_FILTER_TOKEN` in this header.
pub const FILTER_TOKEN_HEADER: &str = "x-signet-filter-token";
