//! What one control-plane callout costs Envoy, by transport (docs/perf.md, "The commit callout's
//! transport"). The path picks the mode:
//!
//! - `/passthrough`: the filter continues; the router proxies to the peer (the reference).
//! - `/wake`: the request waits, wakes the root context through a per-VM shared queue (as the
//!   Signet filter's exchanges do before a commit), and the root answers it with a local reply.
//! - `/http1`, `/http2`: as `/wake`, but the root first sends one ~2 KB message to the peer with
//!   `dispatch_http_call` on an HTTP/1.1 or an HTTP/2 cluster, and answers with the reply.
//! - `/grpc-stream`: as `/wake`, but the message goes on one long-lived gRPC stream per VM
//!   (`proxy_grpc_stream` once, then `proxy_grpc_send`); the peer answers each in order.
//!
//! So each mode minus `/wake` is the cost of one callout. Like the Signet filter, nothing here
//! panics; a failed call answers 5xx, which the run counts.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

/// The size of a commit batch of one exchange, and of its results.
const MESSAGE: [u8; 2000] = [b'c'; 2000];
const ANSWER: [u8; 300] = [b'r'; 300];

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Wake,
    Http1,
    Http2,
    GrpcStream,
}

impl Mode {
    fn from_path(path: &str) -> Option<Mode> {
        match path {
            "/wake" => Some(Mode::Wake),
            "/http1" => Some(Mode::Http1),
            "/http2" => Some(Mode::Http2),
            "/grpc-stream" => Some(Mode::GrpcStream),
            _ => None,
        }
    }
}

/// This VM's requests in their stages; the root and the requests share it (one thread per VM).
#[derive(Default)]
struct Vm {
    doorbell: Option<u32>,
    waiting: VecDeque<(u32, Mode)>,
    calls: HashMap<u32, u32>,
    stream: Option<u32>,
    on_stream: VecDeque<u32>,
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

/// Answers request `context` from the root.
fn answer(context: u32, status: u32, body: Option<&[u8]>) {
    if hostcalls::set_effective_context(context).is_ok() {
        let _ = hostcalls::send_http_response(status, Vec::new(), body);
    }
}

/// Envoy reads the `grpc_service` argument as a serialized `envoy.config.core.v3.GrpcService`
/// when it parses as one, and a bare cluster name can (Envoy 1.40 then aborts on "unset
/// oneof"), so the stream names its cluster as `GrpcService { envoy_grpc { cluster_name } }`.
fn grpc_service(cluster: &str) -> Option<String> {
    let inner = u8::try_from(cluster.len()).ok()?;
    let outer = inner.checked_add(2)?;
    let mut bytes = vec![0x0a, outer, 0x0a, inner];
    bytes.extend_from_slice(cluster.as_bytes());
    String::from_utf8(bytes).ok()
}

fn send(context: u32, mode: Mode) {
    match mode {
        Mode::Wake => answer(context, 200, Some(&ANSWER)),
        Mode::Http1 | Mode::Http2 => {
            let cluster = if mode == Mode::Http1 {
                "peer_http1"
            } else {
                "peer_http2"
            };
            let headers = vec![
                (":method", "POST"),
                (":path", "/message"),
                (":authority", "peer"),
                ("content-type", "application/json"),
            ];
            let sent = hostcalls::dispatch_http_call(
                cluster,
                headers,
                Some(&MESSAGE),
                Vec::new(),
                Duration::from_secs(5),
            );
            match sent {
                Ok(token) => {
                    VM.with(|vm| vm.borrow_mut().calls.insert(token, context));
                }
                Err(_) => answer(context, 500, None),
            }
        }
        Mode::GrpcStream => {
            let open = VM.with(|vm| vm.borrow().stream);
            let stream = match open {
                Some(token) => Some(token),
                None => grpc_service("peer_http2").and_then(|service| {
                    hostcalls::open_grpc_stream(&service, "callout.Transport", "Stream", Vec::new())
                        .ok()
                }),
            };
            let Some(stream) = stream else {
                return answer(context, 500, None);
            };
            VM.with(|vm| vm.borrow_mut().stream = Some(stream));
            match hostcalls::send_grpc_stream_message(stream, Some(&MESSAGE), false) {
                Ok(()) => VM.with(|vm| vm.borrow_mut().on_stream.push_back(context)),
                Err(_) => answer(context, 502, None),
            }
        }
    }
}

struct Root;

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten();
        if let Some(context) = VM.with(|vm| vm.borrow_mut().calls.remove(&token)) {
            answer(context, 200, body.as_deref());
        }
    }

    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .ok()
            .flatten();
        if let Some(context) = VM.with(|vm| vm.borrow_mut().on_stream.pop_front()) {
            answer(context, 200, body.as_deref());
        }
    }

    fn on_grpc_stream_close(&mut self, _token: u32, _status: u32) {
        let lost: Vec<u32> = VM.with(|vm| {
            let mut vm = vm.borrow_mut();
            vm.stream = None;
            vm.on_stream.drain(..).collect()
        });
        for context in lost {
            answer(context, 503, None);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        // one queue per VM: the name must differ between the workers' VMs
        let nanos = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        match hostcalls::register_shared_queue(&format!("callout-transport.{nanos}")) {
            Ok(queue) => {
                VM.with(|vm| vm.borrow_mut().doorbell = Some(queue));
                true
            }
            Err(_) => false,
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue) {}
        while let Some((context, mode)) = VM.with(|vm| vm.borrow_mut().waiting.pop_front()) {
            send(context, mode);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { id }))
    }
}

struct Request {
    id: u32,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let Some(mode) = Mode::from_path(&path) else {
            return Action::Continue;
        };
        let doorbell = VM.with(|vm| {
            let mut vm = vm.borrow_mut();
            vm.waiting.push_back((self.id, mode));
            vm.doorbell
        });
        if let Some(queue) = doorbell {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(b"ring"));
        }
        Action::Pause
    }
}
