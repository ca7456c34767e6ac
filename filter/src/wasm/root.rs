//! The root context: the plugin configuration, this VM's worker state, and every control-plane
//! callout: commit batches ([`CommitQueue`]; why they leave from here: see
//! [`crate::commit_queue`]), tenant lookups (single flight) and the exchanges' own calls. An
//! exchange queues its callout and wakes the root through a per-VM shared queue; the root sends
//! it and hands the answer to the exchange.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use signet_protocol::internal::tenant::KEY_HASH_HEADER;

use super::host::{header_map, WasmHost};
use super::http::{Phase, SignetHttp, Stream, StreamHandle};
use crate::commit_queue::{CommitQueue, Full, MAX_PENDING_BYTES, MAX_PENDING_COMMITS};
use crate::config::Config;
use crate::host::{Host, LogLevel};
use crate::pipeline::{self, Call, Callout, CalloutResponse, CommitJson};
use crate::route::RouteCache;
use crate::tenant_lookups::{Join, TenantLookups, MAX_LOOKUPS};
use crate::worker::WorkerState;

// ---- callouts that leave from the root: shared by the root and the HTTP contexts of one VM ----

/// Most of an exchange's own callouts (neither commits nor tenant lookups) queued or out at
/// once on one worker; beyond, the exchange answers as for a failed callout.
pub const MAX_CALLS: usize = 1024;

/// Commit batches, tenant lookups and the exchanges' own calls: an exchange queues them here
/// and the root sends them, so their answers reach the root, which lives as long as the VM
/// (see [`crate::commit_queue`]), and it hands each answer to its exchange.
#[derive(Default)]
pub(super) struct RootCallouts {
    queue: RefCell<CommitQueue>,
    lookups: RefCell<TenantLookups<Callout>>,
    /// Lookups out, by callout token: the key hash they answer for.
    lookup_tokens: RefCell<HashMap<u32, String>>,
    /// Exchanges' own calls waiting to be sent: (context id, callout).
    calls: RefCell<Vec<(u32, Callout)>>,
    /// Exchanges' own calls out, by callout token: the context id each answers.
    call_tokens: RefCell<HashMap<u32, u32>>,
    /// The shared queue that wakes this VM's root context.
    doorbell: Cell<Option<u32>>,
    /// Exchanges waiting for a commit or a lookup, by context id.
    streams: RefCell<HashMap<u32, Weak<RefCell<Stream>>>>,
}

impl RootCallouts {
    /// Queues a stream's commit; wakes the root when the queue was idle. False when the queue
    /// is full or the root cannot be woken (the commit is withdrawn): the exchange answers as
    /// for a failed callout.
    pub(super) fn push(&self, stream: &StreamHandle, commit: CommitJson) -> bool {
        let Ok(mut queue) = self.queue.try_borrow_mut() else {
            return false;
        };
        let CommitJson(commit, deadline_ms) = commit;
        let wake = match queue.push(stream.id, commit, deadline_ms) {
            Ok(wake) => wake,
            Err(Full) => {
                WasmHost.log(
                    LogLevel::Warn,
                    &format!(
                        "signet: commit queue full ({MAX_PENDING_COMMITS} commits or \
                         {MAX_PENDING_BYTES} bytes waiting)"
                    ),
                );
                return false;
            }
        };
        self.wait(stream);
        if !wake {
            return true;
        }
        let rung = self.ring();
        if !rung {
            queue.withdraw(stream.id);
        }
        rung
    }

    /// Queues an exchange's callout for the root to send: a tenant lookup joins the one out for
    /// its key. False when it cannot be sent (too many at once, or the root cannot be woken):
    /// the exchange answers as for a failed callout.
    pub(super) fn call(&self, stream: &StreamHandle, callout: Callout) -> bool {
        if callout.call == Call::Tenant {
            return self.look_up(stream, callout);
        }
        let Ok(mut calls) = self.calls.try_borrow_mut() else {
            return false;
        };
        let out = self.call_tokens.try_borrow().map_or(0, |t| t.len());
        if calls.len().saturating_add(out) >= MAX_CALLS {
            WasmHost.log(
                LogLevel::Warn,
                &format!("signet: {MAX_CALLS} exchange callouts already out on this worker"),
            );
            return false;
        }
        calls.push((stream.id, callout));
        self.wait(stream);
        let rung = self.ring();
        if !rung {
            calls.retain(|(id, _)| *id != stream.id);
        }
        rung
    }

    /// Joins (or queues) the lookup of the callout's API key.
    fn look_up(&self, stream: &StreamHandle, callout: Callout) -> bool {
        let key_hash = callout
            .headers
            .iter()
            .find(|(name, _)| name == KEY_HASH_HEADER)
            .map(|(_, value)| value.clone());
        let Some(key_hash) = key_hash else {
            return false;
        };
        let Ok(mut lookups) = self.lookups.try_borrow_mut() else {
            return false;
        };
        match lookups.join(&key_hash, stream.id, callout) {
            Join::Wait => {
                self.wait(stream);
                true
            }
            Join::Send => {
                self.wait(stream);
                let rung = self.ring();
                if !rung {
                    lookups.complete(&key_hash);
                }
                rung
            }
            Join::Full => {
                WasmHost.log(
                    LogLevel::Warn,
                    &format!("signet: {MAX_LOOKUPS} tenant lookups already out on this worker"),
                );
                false
            }
        }
    }

    fn wait(&self, stream: &StreamHandle) {
        if let Ok(mut streams) = self.streams.try_borrow_mut() {
            streams.insert(stream.id, Rc::downgrade(&stream.stream));
        }
    }

    /// Wakes the root context to send what is queued.
    fn ring(&self) -> bool {
        let rung = self
            .doorbell
            .get()
            .is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(b"callout")).is_ok());
        if !rung {
            WasmHost.log(LogLevel::Error, "signet: cannot wake the root dispatcher");
        }
        rung
    }
}

// ---- root context ----------------------------------------------------------------------------

#[derive(Default)]
pub(super) struct SignetRoot {
    config: Option<Rc<Config>>,
    routes: Rc<RefCell<RouteCache>>,
    /// This VM's (this worker's) in-flight keys and trace heads.
    worker: Rc<RefCell<WorkerState>>,
    callouts: Rc<RootCallouts>,
}

impl SignetRoot {
    /// Sends the next batch if none is in flight; a batch that cannot be dispatched is answered
    /// as a failed callout at once.
    fn dispatch_commits(&self) {
        let Some(config) = &self.config else {
            return;
        };
        loop {
            let now_ms = WasmHost.now_millis();
            let (expired, batch) = match self.callouts.queue.try_borrow_mut() {
                Ok(mut queue) => (queue.expire(now_ms), queue.next_batch()),
                Err(_) => (Vec::new(), None),
            };
            for id in expired {
                self.answer(id, pipeline::expired_commit());
            }
            let Some(batch) = batch else {
                return;
            };
            let callout = pipeline::callout(config, Call::Commit, Some(batch.body), Vec::new());
            if dispatch(&callout).is_some() {
                return;
            }
            self.deliver(CalloutResponse::none());
        }
    }

    /// Sends the queued tenant lookups; one that cannot be sent is answered as a failed callout.
    fn dispatch_lookups(&self) {
        let queued = match self.callouts.lookups.try_borrow_mut() {
            Ok(mut lookups) => lookups.take_queued(),
            Err(_) => return,
        };
        for (key_hash, callout) in queued {
            match dispatch(&callout) {
                Some(token) => {
                    if let Ok(mut tokens) = self.callouts.lookup_tokens.try_borrow_mut() {
                        tokens.insert(token, key_hash);
                    }
                }
                None => self.answer_lookup(&key_hash, &CalloutResponse::none()),
            }
        }
    }

    /// Sends the exchanges' own queued calls; one that cannot be sent is answered as a failed
    /// callout.
    fn dispatch_calls(&self) {
        let queued = match self.callouts.calls.try_borrow_mut() {
            Ok(mut calls) => std::mem::take(&mut *calls),
            Err(_) => return,
        };
        for (id, callout) in queued {
            match dispatch(&callout) {
                Some(token) => {
                    if let Ok(mut tokens) = self.callouts.call_tokens.try_borrow_mut() {
                        tokens.insert(token, id);
                    }
                }
                None => self.answer(id, CalloutResponse::none()),
            }
        }
    }

    /// Hands a lookup's answer to every exchange waiting for it.
    fn answer_lookup(&self, key_hash: &str, response: &CalloutResponse) {
        let waiters = match self.callouts.lookups.try_borrow_mut() {
            Ok(mut lookups) => lookups.complete(key_hash),
            Err(_) => return,
        };
        for id in waiters {
            self.answer(id, response.clone());
        }
    }

    /// Hands the in-flight batch's answer to its exchanges.
    fn deliver(&self, response: CalloutResponse) {
        let answers = match self.callouts.queue.try_borrow_mut() {
            Ok(mut queue) => queue.complete(response),
            Err(_) => return,
        };
        for (id, answer) in answers {
            self.answer(id, answer);
        }
    }

    /// Hands one exchange the answer it waits for (its commit's, lookup's or own call's).
    fn answer(&self, id: u32, answer: CalloutResponse) {
        let stream = self
            .callouts
            .streams
            .try_borrow_mut()
            .ok()
            .and_then(|mut streams| streams.remove(&id))
            .and_then(|weak| weak.upgrade());
        // gone: the client left; its receipt may still have been stored, as with a
        // disconnect during any callout
        let Some(stream) = stream else { return };
        if hostcalls::set_effective_context(id).is_err() {
            return;
        }
        let handle = StreamHandle {
            id,
            stream,
            callouts: Rc::clone(&self.callouts),
        };
        let action = match handle.stream.try_borrow_mut() {
            Ok(mut s) => match s.exchange.as_mut() {
                Some(ex) => ex.on_callout_response(&mut WasmHost, answer),
                None => return,
            },
            Err(_) => return,
        };
        handle.apply(action, Phase::Callout);
    }
}

impl Context for SignetRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let response = read_call_response(num_headers, body_size);
        let lookup = self
            .callouts
            .lookup_tokens
            .try_borrow_mut()
            .ok()
            .and_then(|mut tokens| tokens.remove(&token_id));
        if let Some(key_hash) = lookup {
            return self.answer_lookup(&key_hash, &response);
        }
        let call = self
            .callouts
            .call_tokens
            .try_borrow_mut()
            .ok()
            .and_then(|mut tokens| tokens.remove(&token_id));
        match call {
            Some(id) => self.answer(id, response),
            // the root's other callouts are commit batches, one at a time
            None => {
                self.deliver(response);
                self.dispatch_commits();
            }
        }
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
        if self.callouts.doorbell.get().is_none() {
            // one queue per VM: a name registered again moves the queue to the new registrant
            let name = format!("signet.commits.{}", WasmHost.random_hex(8));
            match hostcalls::register_shared_queue(&name) {
                Ok(id) => self.callouts.doorbell.set(Some(id)),
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
        // the messages only wake us; the callouts are in the VM's memory
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.dispatch_lookups();
        self.dispatch_calls();
        self.dispatch_commits();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // the SDK aborts on None: always return a context (it passes through without config)
        Some(Box::new(SignetHttp::new(
            self.config.clone(),
            Rc::clone(&self.routes),
            Rc::clone(&self.worker),
            StreamHandle {
                id: context_id,
                stream: Rc::new(RefCell::new(Stream::default())),
                callouts: Rc::clone(&self.callouts),
            },
        )))
    }
}

/// Dispatches a callout from the current context (its answer comes back to that context): its
/// token, or `None`, logged, when Envoy refuses it (e.g. no such cluster).
pub(super) fn dispatch(callout: &Callout) -> Option<u32> {
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
    dispatched.ok()
}

pub(super) fn read_call_response(num_headers: usize, body_size: usize) -> CalloutResponse {
    if num_headers == 0 {
        return CalloutResponse::none();
    }
    let headers = header_map(MapType::HttpCallResponseHeaders);
    let status = headers
        .single(":status")
        .ok()
        .flatten()
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    CalloutResponse { status, body }
}
