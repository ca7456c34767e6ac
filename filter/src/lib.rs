//! Signet for Envoy: the proxy-wasm HTTP filter that turns requests into verified exchanges
//! (SPEC §4). Everything but `wasm.rs` is plain Rust behind the [`host::Host`] trait, unit-tested
//! natively; `wasm.rs` only translates proxy-wasm events into [`pipeline`] calls.

// A panic aborts the Wasm VM of an Envoy worker: every request on it would fail.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod commit_queue;
pub mod config;
pub mod host;
pub mod money;
pub mod pipeline;
pub mod policy;
mod protobuf;
pub mod rate_limit;
pub mod registry;
pub mod repair;
pub mod route;
pub mod sanitize;
pub mod schema;
pub mod transform;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod wasm;
