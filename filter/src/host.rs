//! What the pipeline needs from its environment. `wasm.rs` implements it with proxy-wasm host
//! calls; tests use [`testing::MockHost`]. Control-plane callouts are not here: the pipeline
//! returns them as [`crate::pipeline::Action::Call`] and is fed their responses.

/// Severity of a log line (maps onto Envoy's log levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

pub trait Host {
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
    /// VM-wide shared data (all workers of one plugin).
    fn shared_get(&self, key: &str) -> Option<Vec<u8>>;
    fn shared_set(&mut self, key: &str, value: &[u8]);
    /// The entry and its compare-and-swap token (0 when absent).
    fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, u32);
    /// Writes only if the entry's token is still `cas`; false when another worker wrote first.
    fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: u32) -> bool;
    /// Cryptographically random bytes, as lowercase hex.
    fn random_hex(&mut self, bytes: usize) -> String;
    /// Adds one to a counter (defined on first use).
    fn count(&mut self, stat: &str);
    /// Records a histogram sample.
    fn record(&mut self, stat: &str, value: u64);
    fn log(&mut self, level: LogLevel, message: &str);
}

/// Stat names of docs/ARCHITECTURE.md (Envoy prefixes `wasmcustom.`).
pub mod stats {
    pub const IDEMPOTENT_HITS: &str = "signet.idempotent_hits";
    pub const REPAIRS: &str = "signet.repairs";
    pub const EXCHANGE_LATENCY_MS: &str = "signet.exchange_latency_ms";

    pub fn exchanges(mode: &str) -> String {
        format!("signet.exchanges.mode.{mode}")
    }
    pub fn denials(reason: &str) -> String {
        format!("signet.denials.reason.{}", label(reason))
    }
    pub fn errors(code: &str) -> String {
        format!("signet.errors.code.{}", label(code))
    }
    pub fn callout_failures(call: &str) -> String {
        format!("signet.callout_failures.call.{call}")
    }

    /// Codes may come from the control plane: only `UPPER_SNAKE` names become stat labels, so a
    /// misbehaving peer cannot create unbounded or malformed stat names.
    fn label(code: &str) -> &str {
        let ok = !code.is_empty()
            && code.len() <= 64
            && code
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            code
        } else {
            "OTHER"
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn labels_are_bounded() {
            assert_eq!(
                super::errors("BODY_TOO_LARGE"),
                "signet.errors.code.BODY_TOO_LARGE"
            );
            assert_eq!(super::errors("a.b"), "signet.errors.code.OTHER");
            assert_eq!(super::denials(""), "signet.denials.reason.OTHER");
        }
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// Records everything; time is set by the test.
    #[derive(Default)]
    pub struct MockHost {
        pub now: u64,
        pub shared: HashMap<String, Vec<u8>>,
        pub counters: BTreeMap<String, u64>,
        pub histograms: BTreeMap<String, Vec<u64>>,
        pub logs: Vec<(LogLevel, String)>,
        pub random_calls: u64,
        /// Compare-and-swap tokens of `shared`, bumped on every write.
        pub cas: HashMap<String, u32>,
        /// Written to the next `shared_set_cas` key just before it compares: another worker
        /// winning the race.
        pub cas_interference: Option<Vec<u8>>,
    }

    impl MockHost {
        pub fn counter(&self, stat: &str) -> u64 {
            self.counters.get(stat).copied().unwrap_or(0)
        }
    }

    impl Host for MockHost {
        fn now_millis(&self) -> u64 {
            self.now
        }
        fn shared_get(&self, key: &str) -> Option<Vec<u8>> {
            self.shared.get(key).cloned()
        }
        fn shared_set(&mut self, key: &str, value: &[u8]) {
            self.shared.insert(key.to_owned(), value.to_vec());
            *self.cas.entry(key.to_owned()).or_default() += 1;
        }
        fn shared_get_cas(&self, key: &str) -> (Option<Vec<u8>>, u32) {
            (
                self.shared.get(key).cloned(),
                self.cas.get(key).copied().unwrap_or(0),
            )
        }
        fn shared_set_cas(&mut self, key: &str, value: &[u8], cas: u32) -> bool {
            if let Some(other) = self.cas_interference.take() {
                self.shared_set(key, &other);
            }
            if self.cas.get(key).copied().unwrap_or(0) != cas {
                return false;
            }
            self.shared_set(key, value);
            true
        }
        fn random_hex(&mut self, bytes: usize) -> String {
            self.random_calls += 1;
            format!("{:0width$x}", self.random_calls, width = bytes * 2)
        }
        fn count(&mut self, stat: &str) {
            *self.counters.entry(stat.to_owned()).or_default() += 1;
        }
        fn record(&mut self, stat: &str, value: u64) {
            self.histograms
                .entry(stat.to_owned())
                .or_default()
                .push(value);
        }
        fn log(&mut self, level: LogLevel, message: &str) {
            self.logs.push((level, message.to_owned()));
        }
    }
}
