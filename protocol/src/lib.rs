//! The Signet wire formats (SPEC §1–§3) without I/O, clock or randomness, so the same code runs in
//! the control plane, the CLI and the proxy-wasm filter inside Envoy (`wasm32-wasip1`).
//!
//! - [`canonical`]: strict I-JSON parsing and canonical JSON (`signet-jcs` = RFC 8785 + NFC, and
//!   plain RFC 8785).
//! - [`cid`]: `sha256:<hex>` content identifiers.
//! - [`keys`]: Ed25519 signing keys from a base64url seed, JWK and JWKS.
//! - [`receipt`], [`chain`], [`bundle`]: building, signing and verifying SR-1 receipts, chains and
//!   export bundles.
//! - [`time`], [`trace`], [`error`]: receipt timestamps, trace ids, the SPEC §4 error body and
//!   [`VerifyError`].
//!
//! # Deviations
//!
//! Additions to the API in `docs/ARCHITECTURE.md` (nothing documented was changed):
//! - `VerifyError` lives in [`error`] (re-exported at the crate root) with a public [`error::Rule`]
//!   naming the failed check; `CanonError` also has `offset()` and `message()`.
//! - `KeyError` lives in [`keys`]; `Jwks` has `from_json`/`to_json` (lenient: unusable keys are
//!   skipped) and `Jwks: FromIterator<Jwk>`.
//! - `CanonError::code()` can also be `INVALID_UTF8` (invalid UTF-8 input) and `RESERVED_MEMBER`
//!   (a receipt extension named like a core member).
//! - Verification accepts receipts and bundles hashed with plain RFC 8785 (no NFC) when their
//!   hash matches that form, for interop with implementations without the NFC step.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bundle;
pub mod canonical;
pub mod chain;
pub mod cid;
pub mod error;
pub mod keys;
pub mod receipt;
pub mod time;
pub mod trace;

pub use canonical::{CanonError, Profile};
pub use error::{ApiError, VerifyError};
pub use keys::{Jwk, Jwks, KeyError, SigningKey};
