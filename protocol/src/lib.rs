//! The Signet wire formats (SPEC §1–§3) without I/O, clock or randomness, so the same code runs in
//! the control plane, the CLI and the proxy-wasm filter inside Envoy (`wasm32-wasip1`).
//!
//! - [`canonical`]: strict I-JSON parsing and canonical JSON (`signet-jcs` = RFC 8785 + NFC, and
//!   plain RFC 8785).
//! - [`cid`]: `sha256:<hex>` content identifiers.
//! - [`keys`]: Ed25519 signing keys from a base64url seed, JWK and JWKS.
//! - [`receipt`], [`chain`], [`bundle`]: building, signing and verifying SR-1 receipts, chains and
//!   export bundles.
//! - [`hel`]: the egress policy on `forward_url` decided before resolution (SPEC §5), which
//!   the filter applies and the control plane checks again before delivering.
//! - [`http_signature`]: the RFC 9421 signature base and RFC 9530 `Content-Digest` of a
//!   forwarded delivery, built by the control plane and checked by the CLI.
//! - [`internal`]: the filter ↔ control-plane API, one definition for both sides, and the commit
//!   decision both storage backends share.
//! - [`time`], [`trace`], [`error`]: receipt timestamps, trace ids, the SPEC §4 error body and
//!   [`VerifyError`].
//!
//! # Deviations
//!
//! Additions to the API in `docs/ARCHITECTURE.md` (nothing documented was changed):
//! - `VerifyError` lives in [`error`] (re-exported at the crate root) with public fields and an
//!   [`error::Rule`] naming the failed check (`code()` gives its UPPER_SNAKE name).
//! - `CanonError` also has `offset()` and `message()`; `code()` can also be `INVALID_UTF8`
//!   (input not UTF-8) and `RESERVED_MEMBER` (a receipt extension named like a core member).
//!   `ApiError: From<&CanonError>` maps it to 400 (not JSON) or 422 (not I-JSON, limits).
//! - `KeyError` lives in [`keys`]; `Jwks` has `from_json`/`to_json` (lenient: unusable keys are
//!   skipped, per RFC 7517 §5) and implements `FromIterator<Jwk>`.
//! - Verification also accepts receipts and bundles hashed with plain RFC 8785 (no NFC step) when
//!   their hash matches that form, for interop with implementations without the NFC step.
//!   Receipts built by [`receipt::sign`] store every string in NFC, so both forms agree on them.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bundle;
pub mod canonical;
pub mod chain;
pub mod cid;
pub mod error;
pub mod hel;
pub mod http_signature;
pub mod internal;
pub mod keys;
pub mod receipt;
pub mod time;
pub mod trace;

pub use canonical::{CanonError, Profile};
pub use error::{ApiError, VerifyError};
pub use keys::{Jwk, Jwks, KeyError, SigningKey};
