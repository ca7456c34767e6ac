//! The proxy-wasm glue: translates Envoy's callbacks into [`Exchange`] calls and carries out the
//! [`PipelineAction`]s it returns. No decisions are made here.
//!
//! Commits go out in batches ([`CommitQueue`]) from the root context: an exchange queues its
//! commit and, when the queue was idle, wakes the root through a per-VM shared queue. Why the
//! root: the SDK hands a callout's answer to the context that was running when it was
//! dispatched, and drops it if that context has ended, and any exchange of a batch may end
//! first (its client goes away); the root lives as long as the VM. The root hands each answer
//! to its exchange with `set_effective_context`.
//!
//! Host calls go through `proxy_wasm::hostcalls` (which return `Result`) rather than the SDK's
//! context traits (which unwrap), so a host error becomes a log line, not a VM abort.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{self, BufferType, ContextType, MapType, MetricType};

use crate::commit_queue::CommitQueue;
use crate::config::Config;
use crate::host::{Host, LogLevel};
use crate::pipeline::{
    self, Action as PipelineAction, Call, Callout, CalloutResponse, Exchange, Forward,
};
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

// ---- commits: shared by the root and the HTTP contexts of one VM -------------------------------

#[derive(Default)]
struct Commits {
    queue: RefCell<CommitQueue>,
    /// The shared queue that wakes this VM's root context.
    doorbell: Cell<Option<u32>>,
    /// Exchanges with a commit queued or in flight, by context id.
    streams: RefCell<HashMap<u32, Weak<RefCell<Stream>>>>,
}

impl Commits {
    /// Queues a stream's commit; wakes the root when the queue was idle. False when the root
    /// cannot be woken (the commit is withdrawn).
    fn push(&self, stream: &StreamHandle, body: Vec<u8>) -> bool {
        let Ok(mut queue) = self.queue.try_borrow_mut() else {
            return false;
        };
        if let Ok(mut streams) = self.streams.try_borrow_mut() {
            streams.insert(stream.id, Rc::downgrade(&stream.stream));
        }
        if !queue.push(stream.id, body) {
            return true;
        }
        let rung = self
            .doorbell
            .get()
            .is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(b"commit")).is_ok());
        if !rung {
            queue.withdraw(stream.id);
            WasmHost.log(LogLevel::Error, "signet: cannot wake the commit dispatcher");
        }
        rung
    }
}

// ---- root context: configuration, commit batches ---------------------------------------------

#[derive(Default)]
struct SignetRoot {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    /// This VM's (this worker's) in-flight keys and trace heads.
    worker: Rc<RefCell<WorkerState>>,
    commits: Rc<Commits>,
}

impl SignetRoot {
    /// Sends the next batch if none is in flight; a batch that cannot be dispatched is answered
    /// as a failed callout at once.
    fn dispatch_commits(&self) {
        let Some(config) = &self.config else {
            return;
        };
        loop {
            let batch = match self.commits.queue.try_borrow_mut() {
                Ok(mut queue) => queue.next_batch(),
                Err(_) => None,
            };
            let Some(batch) = batch else {
                return;
            };
            let callout = pipeline::callout(config, Call::Commit, Some(batch.body), Vec::new());
            if dispatch(&callout) {
                return;
            }
            self.deliver(CalloutResponse::none());
        }
    }

    /// Hands the in-flight batch's answer to its exchanges.
    fn deliver(&self, response: CalloutResponse) {
        let answers = match self.commits.queue.try_borrow_mut() {
            Ok(mut queue) => queue.complete(response),
            Err(_) => return,
        };
        for (id, answer) in answers {
            let stream = self
                .commits
                .streams
                .try_borrow_mut()
                .ok()
                .and_then(|mut streams| streams.remove(&id))
                .and_then(|weak| weak.upgrade());
            // gone: the client left; its receipt may still have been stored, as with a
            // disconnect during any callout
            let Some(stream) = stream else { continue };
            if hostcalls::set_effective_context(id).is_err() {
                continue;
            }
            let handle = StreamHandle {
                id,
                stream,
                commits: Rc::clone(&self.commits),
            };
            let action = match handle.stream.try_borrow_mut() {
                Ok(mut s) => match s.exchange.as_mut() {
                    Some(ex) => ex.on_callout_response(&mut WasmHost, answer),
                    None => continue,
                },
                Err(_) => continue,
            };
            handle.apply(action, Phase::Callout);
        }
    }
}

impl Context for SignetRoot {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // the root dispatches nothing but commit batches, one at a time
        self.deliver(read_call_response(num_headers, body_size));
        self.dispatch_commits();
    }
}

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
        let config = match Config::load(&json, &|name| std::env::var(name).ok()) {
            Ok(config) => config,
            Err(e) => {
                WasmHost.log(
                    LogLevel::Error,
                    &format!("signet: invalid plugin configuration: {e}"),
                );
                return false;
            }
        };
        if self.commits.doorbell.get().is_none() {
            // one queue per VM: a name registered again moves the queue to the new registrant
            let name = format!("signet.commits.{}", WasmHost.random_hex(8));
            match hostcalls::register_shared_queue(&name) {
                Ok(id) => self.commits.doorbell.set(Some(id)),
                Err(status) => {
                    WasmHost.log(
                        LogLevel::Error,
                        &format!("signet: cannot register the commit queue: {status:?}"),
                    );
                    return false;
                }
            }
        }
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

    fn on_queue_ready(&mut self, queue_id: u32) {
        // the messages only wake us; the commits are in the VM's memory
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.dispatch_commits();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // the SDK aborts on None: always return a context (it passes through without config)
        Some(Box::new(SignetHttp {
            config: self.config.clone(),
            routes: Rc::clone(&self.routes),
            worker: Rc::clone(&self.worker),
            handle: StreamHandle {
                id: context_id,
                stream: Rc::new(RefCell::new(Stream::default())),
                commits: Rc::clone(&self.commits),
            },
        }))
    }
}

/// Dispatches a callout from the current context (its answer comes back to that context);
/// false, logged, when Envoy refuses it (e.g. no such cluster).
fn dispatch(callout: &Callout) -> bool {
    let headers: Vec<(&str, &str)> = callout
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let dispatched = hostcalls::dispatch_http_call(
        &callout.cluster,
        headers,
        callout.body.as_deref(),
        Vec::new(),
        Duration::from_millis(callout.timeout_ms),
    );
    if let Err(status) = &dispatched {
        WasmHost.log(
            LogLevel::Warn,
            &format!(
                "signet: cannot call cluster {:?} ({status:?})",
                callout.cluster
            ),
        );
    }
    dispatched.is_ok()
}

fn read_call_response(num_headers: usize, body_size: usize) -> CalloutResponse {
    if num_headers == 0 {
        return CalloutResponse::none();
    }
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    CalloutResponse { status, body }
}

// ---- HTTP context: one exchange ----------------------------------------------------------------

/// An exchange's state; the root reaches it (weakly) while its commit is in a batch.
#[derive(Default)]
struct Stream {
    exchange: Option<Exchange>,
    /// Size of the buffered request body, to replace it whole.
    body_size: usize,
}

/// What carries out an exchange's actions, from its own callbacks or from the root's.
struct StreamHandle {
    id: u32,
    stream: Rc<RefCell<Stream>>,
    commits: Rc<Commits>,
}

struct SignetHttp {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    worker: Rc<RefCell<WorkerState>>,
    handle: StreamHandle,
}

/// Where an action is carried out: inside a request callback (its return value resumes the
/// request) or after a callout (resume explicitly).
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

impl StreamHandle {
    /// Feeds a failed callout to the exchange; its next action.
    fn fail_callout(&self) -> PipelineAction {
        match self.stream.try_borrow_mut() {
            Ok(mut s) => match s.exchange.as_mut() {
                Some(ex) => ex.on_callout_response(&mut WasmHost, CalloutResponse::none()),
                None => PipelineAction::PassThrough,
            },
            Err(_) => PipelineAction::Pause,
        }
    }

    fn apply(&self, mut action: PipelineAction, phase: Phase) -> types::Action {
        let mut host = WasmHost;
        loop {
            match action {
                PipelineAction::Pause => return types::Action::Pause,
                PipelineAction::Commit(commit) => {
                    if self.commits.push(self, commit) {
                        return types::Action::Pause;
                    }
                    action = self.fail_callout();
                }
                PipelineAction::Call(callout) => {
                    if dispatch(&callout) {
                        return types::Action::Pause;
                    }
                    action = self.fail_callout();
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
                    return resume(phase);
                }
                PipelineAction::PassThrough => return resume(phase),
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
            let size = self.stream.try_borrow().map_or(0, |s| s.body_size);
            if let Err(status) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body) {
                host.log(
                    LogLevel::Error,
                    &format!("signet: cannot replace the request body: {status:?}"),
                );
            }
        }
    }
}

fn resume(phase: Phase) -> types::Action {
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

impl SignetHttp {
    fn route(&self, config: &Config) -> CachedRoute {
        let name = String::from_utf8(property(&["xds", "route_name"])).unwrap_or_default();
        let metadata = property(&["xds", "route_metadata"]);
        self.routes.borrow_mut().get_or_parse(&name, &metadata, || {
            RouteSettings::from_metadata(&name, &metadata, &config.route_defaults, &config.registry)
                .map_err(|e| format!("route {name:?}: {e}"))
        })
    }

    /// Runs `step` on the exchange (if any) and carries out its action.
    fn step(
        &self,
        phase: Phase,
        step: impl FnOnce(&mut Exchange, &mut Stream) -> PipelineAction,
    ) -> types::Action {
        let action = match self.handle.stream.try_borrow_mut() {
            Ok(mut stream) => {
                let mut exchange = stream.exchange.take();
                let action = exchange.as_mut().map(|ex| step(ex, &mut stream));
                stream.exchange = exchange;
                action
            }
            Err(_) => None,
        };
        match action {
            Some(action) => self.handle.apply(action, phase),
            None => types::Action::Continue,
        }
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
        // the tenant lookup (commits are answered through the root)
        let response = read_call_response(num_headers, body_size);
        self.step(Phase::Callout, |ex, _| {
            ex.on_callout_response(&mut WasmHost, response)
        });
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
        let exchange = Exchange::new(config, route, worker, host.now_millis());
        if let Ok(mut stream) = self.handle.stream.try_borrow_mut() {
            stream.exchange = Some(exchange);
        }
        let header = |name: &str| {
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                .ok()
                .flatten()
        };
        self.step(Phase::Callback, |ex, _| {
            ex.on_request_headers(&mut host, &header, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        self.step(Phase::Callback, |ex, stream| {
            stream.body_size = body_size;
            let mut read_body = || {
                hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            };
            ex.on_request_body(&mut WasmHost, body_size, end_of_stream, &mut read_body)
        })
    }

    /// Trailers end the request: the body is complete (a body followed by trailers never
    /// arrives with `end_of_stream`).
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> types::Action {
        let size = self.handle.stream.try_borrow().map_or(0, |s| s.body_size);
        self.on_http_request_body(size, true)
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> types::Action {
        if let Ok(stream) = self.handle.stream.try_borrow() {
            if let Some(exchange) = &stream.exchange {
                for (name, value) in exchange.response_headers() {
                    let _ =
                        hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
                }
            }
        }
        types::Action::Continue
    }
}
