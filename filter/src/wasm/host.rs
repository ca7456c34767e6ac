//! [`Host`] on proxy-wasm host calls; metrics are defined on first use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{self, MapType, MetricType};

use crate::host::{Host, LogLevel};
use crate::pipeline::Headers;

thread_local! {
    /// Metric ids by name: defined on first use, once per VM.
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

fn metric(kind: MetricType, name: &str) -> Option<u32> {
    METRICS.with(|cell| {
        let mut ids = cell.borrow_mut();
        if let Some(&id) = ids.get(name) {
            return Some(id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        ids.insert(name.to_owned(), id);
        Some(id)
    })
}

pub struct WasmHost;

impl Host for WasmHost {
    fn now_millis(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_shared_data(key)
            .ok()
            .and_then(|(value, _cas)| value)
    }

    fn shared_set(&mut self, key: &str, value: &[u8]) {
        if let Err(status) = hostcalls::set_shared_data(key, Some(value), None) {
            self.log(
                LogLevel::Debug,
                &format!("signet: shared data write failed: {status:?}"),
            );
        }
    }

    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        hostcalls::get_shared_data(key).map_or((None, 0), |(value, cas)| (value, cas.unwrap_or(0)))
    }

    fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: u32) -> bool {
        // a token of 0 means "absent": the host then writes unconditionally
        hostcalls::set_shared_data(key, Some(value), (cas != 0).then_some(cas)).is_ok()
    }

    fn random_hex(&mut self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        if getrandom::fill(&mut buf).is_err() {
            // WASI random_get failing is a broken host; ids must still be unique, not secret
            self.log(
                LogLevel::Warn,
                "signet: random_get failed, deriving the id from the clock",
            );
            let nanos = hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            for (b, n) in buf.iter_mut().zip(nanos.to_le_bytes().iter().cycle()) {
                *b = *n;
            }
        }
        signet_protocol::cid::to_hex(&buf)
    }

    fn count(&mut self, stat: &str) {
        if let Some(id) = metric(MetricType::Counter, stat) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn record(&mut self, stat: &str, value: u64) {
        if let Some(id) = metric(MetricType::Histogram, stat) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => types::LogLevel::Debug,
            LogLevel::Info => types::LogLevel::Info,
            LogLevel::Warn => types::LogLevel::Warn,
            LogLevel::Error => types::LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The SDK's getters of header maps turn a value that is not UTF-8 into a panic (and a
    // status it does not expect into another); this one returns the bytes and lets us decide.
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// A header map (request headers, a callout's response headers) as bytes; empty when the host
/// has none to give.
pub fn header_map(map: MapType) -> Headers {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through the SDK's exported allocator
    // (`proxy_on_memory_allocate`, a `Vec<u8>` of capacity `size`), which we now own and free
    // as that `Vec`, as the SDK's own getters do.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != 0 || data.is_null() {
        return Headers::default();
    }
    // SAFETY: see above; `data` is non-null and owns `size` initialized bytes.
    let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
    Headers::from_serialized(&bytes)
}
