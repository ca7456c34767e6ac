//! One HTTP context per request: feeds its callbacks to the exchange and carries out the
//! actions it returns (a commit goes to the root's queue).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{self, BufferType, MapType};

use super::host::{header_map, WasmHost};
use super::root::RootCallouts;
use crate::config::Config;
use crate::host::{Host, LogLevel};
use crate::pipeline::{Action as PipelineAction, CalloutResponse, Exchange, Forward};
use crate::route::{CachedRoute, RouteCache, RouteSettings};
use crate::worker::WorkerState;

/// An exchange's state; the root reaches it (weakly) while its commit is in a batch.
#[derive(Default)]
pub(super) struct Stream {
    pub(super) exchange: Option<Exchange>,
    /// Size of the buffered request body, to replace it whole.
    body_size: usize,
}

/// What carries out an exchange's actions, from its own callbacks or from the root's.
pub(super) struct StreamHandle {
    pub(super) id: u32,
    pub(super) stream: Rc<RefCell<Stream>>,
    pub(super) callouts: Rc<RootCallouts>,
}

pub(super) struct SignetHttp {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    worker: Rc<RefCell<WorkerState>>,
    handle: StreamHandle,
}

/// Where an action is carried out: inside a request callback (its return value resumes the
/// request) or after a callout (resume explicitly).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
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

    pub(super) fn apply(&self, mut action: PipelineAction, phase: Phase) -> types::Action {
        let mut host = WasmHost;
        loop {
            match action {
                PipelineAction::Pause => return types::Action::Pause,
                PipelineAction::Commit(commit) => {
                    if self.callouts.push(self, commit) {
                        return types::Action::Pause;
                    }
                    action = self.fail_callout();
                }
                // sent from the root, which hands the answer back (set_effective_context)
                PipelineAction::Call(callout) => {
                    if self.callouts.call(self, callout) {
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
    pub(super) fn new(
        config: Option<Rc<Config>>,
        routes: Rc<RefCell<RouteCache>>,
        worker: Rc<RefCell<WorkerState>>,
        handle: StreamHandle,
    ) -> Self {
        SignetHttp {
            config,
            routes,
            worker,
            handle,
        }
    }

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

// Every callout leaves from the root context and is answered there (`root.rs`).
impl Context for SignetHttp {}

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
        let headers = header_map(MapType::HttpRequestHeaders);
        self.step(Phase::Callback, |ex, _| {
            ex.on_request_headers(&mut host, &headers, end_of_stream)
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
