//! Signet for Envoy: the proxy-wasm HTTP filter that turns requests into verified exchanges
//! (SPEC §4). Everything but `wasm` is plain Rust behind the [`host::Host`] trait, unit-tested
//! natively; `wasm` only translates proxy-wasm events into [`pipeline`] calls.
//!
//! - [`pipeline`]: the exchange as a state machine, from the request headers to its answer.
//! - [`commit_queue`]: group commit, one worker's receipts in one control-plane call.
//! - [`tenant_lookups`]: single flight, one callout for a worker's concurrent lookups of a key.
//! - [`worker`]: what one Envoy worker remembers between exchanges (keys in flight, trace heads).
//! - [`config`]: the plugin configuration and the filter's secrets.
//! - [`route`]: per-route settings from route metadata, cached per route.
//! - [`registry`]: the payload types and mappings, and `normalize` over them.
//! - [`schema`]: JSON Schema validation of payloads.
//! - [`repair`]: deterministic repair of model-written JSON text.
//! - [`transform`]: JMESPath mappings and invariants.
//! - [`money`]: ISO 4217 minor units, exact decimal conversion.
//! - [`sanitize`]: SPEC §4 sanitizing of string values.
//! - [`policy`]: HEL, the egress policy on `forward_url`.
//! - [`rate_limit`]: a tenant's requests per second on a route.
//! - [`host`]: what the pipeline needs from Envoy, and the stat names.
//! - `protobuf`: reading route metadata out of its protobuf bytes.
//! - `wasm` (wasm32 only): the proxy-wasm glue.

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
pub mod semantic;
pub mod tenant_lookups;
pub mod transform;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod wasm;
