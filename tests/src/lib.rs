//! Harness of the end-to-end tests (`tests/*.rs`): each test starts its own [`Stack`] — the real
//! Envoy 1.40 with the built `signet_filter.wasm`, the real `signet-control-plane` (SQLite or
//! PostgreSQL) and the demo upstream — on free loopback ports, with its own temp dir.
//!
//! The binaries come from the workspace target dir; `make test` builds them first (see
//! [`binaries`]). A missing one fails the test with the command that builds it.

pub mod binaries;
pub mod control_plane;
pub mod envoy;
/// The DNS server, test CA and HTTPS receiver of forwarding's tests: one definition, the
/// control plane's (its integration tests use it too).
#[path = "../../control-plane/tests/forward_support/mod.rs"]
pub mod forward_support;
pub mod http;
pub mod payloads;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod raw;
pub mod stack;

pub use control_plane::Storage;
pub use stack::{Stack, StackOptions};

/// `n` random bytes as lowercase hex, for names that must not collide between runs.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
