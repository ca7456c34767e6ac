//! The proxy-wasm glue: translates Envoy's callbacks into [`Exchange`](crate::pipeline::Exchange)
//! calls and carries out the [`Action`](crate::pipeline::Action)s it returns. No decisions are
//! made here.
//!
//! - `host`: [`Host`](crate::host::Host) on proxy-wasm host calls.
//! - `root`: the root context: configuration, and the commit batches, which leave from it (why:
//!   see [`crate::commit_queue`]).
//! - `http`: one HTTP context per request, carrying out its exchange's actions.
//!
//! Host calls go through `proxy_wasm::hostcalls` (which return `Result`) rather than the SDK's
//! context traits (which unwrap), so a host error becomes a log line, not a VM abort.

mod host;
mod http;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types;

proxy_wasm::main! {{
    // also installs a panic hook that logs the panic before the VM aborts
    proxy_wasm::set_log_level(types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::SignetRoot::default()) });
}}
