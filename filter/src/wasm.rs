//! The proxy-wasm glue: translates Envoy's callbacks into [`Exchange`] calls and carries out the
//! [`PipelineAction`]s it returns. No decisions are made here.
//!
//! Host calls go through `proxy_wasm::hostcalls` (which return `Result`) rather than the SDK's
//! context traits (which unwrap), so a host error becomes a log line, not a VM abort.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{self, BufferType, ContextType, MapType, MetricType};

use crate::config::Config;
use crate::host::{Host, LogLevel};
use crate::pipeline::{Action as PipelineAction, CalloutResponse, Exchange, Forward};
use crate::route::{CachedRoute, RouteCache, RouteSettings};
use crate::worker::WorkerState;

proxy_wasm::main! {{
    // also installs a panic hook that logs the panic before the VM aborts
    proxy_wasm::set_log_level(types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SignetRoot::default()) });
}}

// ---- host ------------------------------------------------------------------------------------

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

struct WasmHost;

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
        buf.iter().map(|b| format!("{b:02x}")).collect()
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

// ---- root context: configuration ---------------------------------------------------------------

#[derive(Default)]
struct SignetRoot {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    /// This VM's (this worker's) in-flight keys and trace heads.
    worker: Rc<RefCell<WorkerState>>,
}

impl Context for SignetRoot {}

impl RootContext for SignetRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let json = hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        // the key and token come from host_env_keys (WASI environ_get); never logged
        match Config::load(&json, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                WasmHost.log(
                    LogLevel::Info,
                    &format!(
                        "signet: configured (control plane cluster {}, kid {})",
                        config.control_plane.cluster,
                        config.signing_key.kid()
                    ),
                );
                self.config = Some(Rc::new(config));
                self.routes = Rc::new(RefCell::new(RouteCache::default()));
                self.worker = Rc::new(RefCell::new(WorkerState::default()));
                true
            }
            Err(e) => {
                WasmHost.log(
                    LogLevel::Error,
                    &format!("signet: invalid plugin configuration: {e}"),
                );
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // the SDK aborts on None: always return a context (it passes through without config)
        Some(Box::new(SignetHttp {
            config: self.config.clone(),
            routes: Rc::clone(&self.routes),
            worker: Rc::clone(&self.worker),
            exchange: None,
            body_size: 0,
        }))
    }
}

// ---- HTTP context: one exchange ----------------------------------------------------------------

struct SignetHttp {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    worker: Rc<RefCell<WorkerState>>,
    exchange: Option<Exchange>,
    /// Size of the buffered request body, to replace it whole.
    body_size: usize,
}

/// Where an action is carried out: inside a request callback (its return value resumes the
/// request) or in a callout response (resume explicitly).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Callback,
    Callout,
}

fn property(path: &[&str]) -> Vec<u8> {
    hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl SignetHttp {
    fn route(&self, config: &Config) -> CachedRoute {
        let name = String::from_utf8(property(&["xds", "route_name"])).unwrap_or_default();
        let metadata = property(&["xds", "route_metadata"]);
        self.routes.borrow_mut().get_or_parse(&name, &metadata, || {
            RouteSettings::from_metadata(&name, &metadata, &config.route_defaults, &config.registry)
                .map_err(|e| format!("route {name:?}: {e}"))
        })
    }

    fn apply(&mut self, mut action: PipelineAction, phase: Phase) -> types::Action {
        let mut host = WasmHost;
        loop {
            match action {
                PipelineAction::Pause => return types::Action::Pause,
                PipelineAction::Call(callout) => {
                    let headers: Vec<(&str, &str)> = callout
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    match hostcalls::dispatch_http_call(
                        &callout.cluster,
                        headers,
                        callout.body.as_deref(),
                        Vec::new(),
                        Duration::from_millis(callout.timeout_ms),
                    ) {
                        Ok(_token) => return types::Action::Pause,
                        Err(status) => {
                            host.log(
                                LogLevel::Warn,
                                &format!(
                                    "signet: cannot call cluster {:?} ({status:?})",
                                    callout.cluster
                                ),
                            );
                            let failed = CalloutResponse {
                                status: None,
                                body: Vec::new(),
                            };
                            action = match self.exchange.as_mut() {
                                Some(ex) => ex.on_callout_response(&mut host, failed),
                                None => PipelineAction::PassThrough,
                            };
                        }
                    }
                }
                PipelineAction::Respond(response) => {
                    let headers: Vec<(&str, &str)> = response
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    if let Err(status) = hostcalls::send_http_response(
                        u32::from(response.status),
                        headers,
                        Some(&response.body),
                    ) {
                        host.log(
                            LogLevel::Error,
                            &format!("signet: local reply failed: {status:?}"),
                        );
                    }
                    return types::Action::Pause;
                }
                PipelineAction::Continue(forward) => {
                    self.forward(&mut host, &forward);
                    return self.resume(phase);
                }
                PipelineAction::PassThrough => return self.resume(phase),
            }
        }
    }

    fn forward(&self, host: &mut WasmHost, forward: &Forward) {
        for name in &forward.remove_headers {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
        for (name, value) in &forward.set_headers {
            if let Err(status) =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            {
                host.log(
                    LogLevel::Error,
                    &format!("signet: cannot set request header {name}: {status:?}"),
                );
            }
        }
        if let Some(body) = &forward.body {
            if let Err(status) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, self.body_size, body)
            {
                host.log(
                    LogLevel::Error,
                    &format!("signet: cannot replace the request body: {status:?}"),
                );
            }
        }
    }

    fn resume(&self, phase: Phase) -> types::Action {
        if phase == Phase::Callout {
            if let Err(status) = hostcalls::resume_http_request() {
                WasmHost.log(
                    LogLevel::Error,
                    &format!("signet: cannot resume the request: {status:?}"),
                );
            }
        }
        types::Action::Continue
    }
}

impl Context for SignetHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let response = if num_headers == 0 {
            CalloutResponse {
                status: None,
                body: Vec::new(),
            }
        } else {
            let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|s| s.parse().ok());
            let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            CalloutResponse { status, body }
        };
        let Some(exchange) = self.exchange.as_mut() else {
            return;
        };
        let action = exchange.on_callout_response(&mut WasmHost, response);
        self.apply(action, Phase::Callout);
    }
}

impl HttpContext for SignetHttp {
    fn on_http_request_headers(
        &mut self,
        _num_headers: usize,
        end_of_stream: bool,
    ) -> types::Action {
        let Some(config) = self.config.clone() else {
            return types::Action::Continue;
        };
        let route = self.route(&config);
        let mut host = WasmHost;
        let worker = Rc::clone(&self.worker);
        let mut exchange = Exchange::new(config, route, worker, host.now_millis());
        let header = |name: &str| {
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                .ok()
                .flatten()
        };
        let action = exchange.on_request_headers(&mut host, &header, end_of_stream);
        self.exchange = Some(exchange);
        self.apply(action, Phase::Callback)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        self.body_size = body_size;
        let Some(exchange) = self.exchange.as_mut() else {
            return types::Action::Continue;
        };
        let mut read_body = || {
            hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let action =
            exchange.on_request_body(&mut WasmHost, body_size, end_of_stream, &mut read_body);
        self.apply(action, Phase::Callback)
    }

    /// Trailers end the request: the body is complete (a body followed by trailers never
    /// arrives with `end_of_stream`).
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> types::Action {
        self.on_http_request_body(self.body_size, true)
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> types::Action {
        if let Some(exchange) = &self.exchange {
            for (name, value) in exchange.response_headers() {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
            }
        }
        types::Action::Continue
    }
}
