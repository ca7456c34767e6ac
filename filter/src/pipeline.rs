//! The SPEC §4 exchange as a state machine, one per HTTP request.
//!
//! The filter feeds it host events (request headers, request body, control-plane responses) and
//! gets back an explicit [`Action`]: pause, call the control plane, answer locally, or let the
//! request continue upstream (with receipt headers and maybe a new body). Nothing here touches
//! proxy-wasm, so every path runs in native unit tests.
//!
//! ```text
//! headers ─▶ API key, idempotency key, trace header ─▶ tenant (cached in shared data, else callout)
//!         ─▶ key in flight on this worker? (409)
//! body    ─▶ limit (413) ─▶ parse (400/422) ─▶ sanitize → normalize → HEL
//!         ─▶ sign on the head this worker knows (hop 1 for a new trace)
//!         ─▶ commit ─┬─ committed ─▶ 200 / upstream
//!                    ├─ replay    ─▶ the stored response, Idempotency-Hit
//!                    └─ 409 conflict with the head ─▶ re-sign on it, once
//! ```
//!
//! One callout per exchange: commit decides idempotency and the chain append in one
//! transaction, so nothing is reserved before it and nothing must be released after an error
//! (see [`crate::worker`] for what a worker remembers instead).

use std::cell::RefCell;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use signet_protocol::canonical::{self, Profile};
use signet_protocol::receipt::{self, Policy, ReceiptDraft};
use signet_protocol::{cid, time, trace, ApiError};

use crate::config::Config;
use crate::host::{stats, Host, LogLevel};
use crate::policy;
use crate::rate_limit;
use crate::registry::parse_options;
use crate::route::{CachedRoute, InlineBody, Mode, RouteSettings};
use crate::sanitize::sanitize;
use crate::worker::{Head, WorkerState};

// ---- request and response headers -----------------------------------------------------------

const API_KEY_HEADERS: [&str; 2] = ["x-signet-api-key", "x-odin-api-key"];
const IDEMPOTENCY_KEY_HEADERS: [&str; 2] = ["x-signet-idempotency-key", "x-odin-idempotency-key"];
const TRACE_HEADER: &str = "x-signet-trace";
const RECEIPT_HASH_HEADER: &str = "x-signet-receipt-hash";
const HOP_HEADER: &str = "x-signet-hop";
const CID_HEADER: &str = "x-signet-cid";
const IDEMPOTENCY_HIT_HEADER: &str = "x-signet-idempotency-hit";
/// Receipt headers only the filter may set on the upstream request.
const FORGEABLE_HEADERS: [&str; 4] = [
    RECEIPT_HASH_HEADER,
    HOP_HEADER,
    CID_HEADER,
    IDEMPOTENCY_HIT_HEADER,
];
const FILTER_TOKEN_HEADER: &str = "x-signet-filter-token";
const KEY_HASH_HEADER: &str = "x-signet-key-hash";

/// Shared-data key prefix of cached tenant lookups.
const TENANT_CACHE_PREFIX: &str = "signet.tenant.";

// ---- actions ---------------------------------------------------------------------------------

/// A control-plane endpoint of docs/ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Tenant,
    Commit,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Tenant => "tenant",
            Call::Commit => "commit",
        }
    }
}

/// An HTTP call to the control plane cluster; its answer goes to
/// [`Exchange::on_callout_response`].
#[derive(Debug, Clone, PartialEq)]
pub struct Callout {
    pub call: Call,
    pub cluster: String,
    /// Pseudo-headers (`:method`, `:path`, `:authority`) first.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

/// The control plane's answer; `status: None` when there was none (reset, no healthy host,
/// dispatch failure: Envoy reports those with zero headers).
#[derive(Debug, Clone, PartialEq)]
pub struct CalloutResponse {
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

impl CalloutResponse {
    /// No answer at all.
    pub fn none() -> Self {
        CalloutResponse {
            status: None,
            body: Vec::new(),
        }
    }
}

/// A local reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Changes to the request before it continues upstream (inline mode): removals first, then
/// `set_headers`, then the body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Forward {
    pub set_headers: Vec<(String, String)>,
    pub remove_headers: Vec<&'static str>,
    /// A replacement body (its `content-length` is among `set_headers`).
    pub body: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Wait for more of the body or for a callout.
    Pause,
    /// Dispatch this callout (the tenant lookup), then wait.
    Call(Callout),
    /// Queue this commit (one `commits` item) for the worker's next batch, then wait; its
    /// answer comes back through [`Exchange::on_callout_response`] (see `commit_queue`).
    Commit(Vec<u8>),
    /// Answer locally; the request ends here.
    Respond(Response),
    /// Continue upstream with these changes.
    Continue(Forward),
    /// Continue upstream untouched (nothing left to do for this request).
    PassThrough,
}

// ---- control-plane payloads ------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct Tenant {
    tenant: String,
    #[serde(default)]
    allowlist: Vec<String>,
}

#[derive(Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
enum CommitReply {
    /// Stored: the filter answers with the response it sent.
    Committed,
    /// The key was done: the stored response of that first request.
    Replay { response: Value },
}

#[derive(Deserialize)]
struct ErrorBody {
    detail: String,
    code: String,
    #[serde(default)]
    head: Option<Head>,
}

#[derive(Deserialize)]
struct CachedTenant {
    expires_ms: u64,
    tenant: Tenant,
}

/// A control-plane answer, classified.
enum Reply {
    Ok(Vec<u8>),
    Error(ApiError, Option<Head>),
    Unavailable(String),
}

fn classify(response: CalloutResponse) -> Reply {
    let Some(status) = response.status else {
        return Reply::Unavailable("no response (connection failure or reset)".into());
    };
    match status {
        200..=299 => Reply::Ok(response.body),
        400..=499 => match serde_json::from_slice::<ErrorBody>(&response.body) {
            Ok(e) => Reply::Error(ApiError::new(status, e.code, e.detail), e.head),
            Err(_) => Reply::Unavailable(format!("status {status} without an error body")),
        },
        _ => Reply::Unavailable(format!("status {status}")),
    }
}

// ---- the exchange ----------------------------------------------------------------------------

/// The request after its body was parsed.
struct Request {
    payload_type: String,
    target_type: String,
    payload: Value,
    trace_id: Option<String>,
    forward_url: Option<String>,
    fingerprint: String,
}

/// A signed receipt's answer, kept until commit stores it: the 200 body as it was sent in the
/// commit (so it is neither echoed back nor serialized twice), its receipt headers, and the
/// trace's new head.
struct Signed {
    response: Vec<u8>,
    headers: Vec<(String, String)>,
    trace_id: String,
    head: Head,
}

/// What the receipt commits to; kept to re-sign on a chain conflict.
struct Verified {
    trace_id: String,
    normalized: Value,
    canon: String,
    cid: String,
}

pub struct Exchange {
    config: Rc<Config>,
    route: CachedRoute,
    worker: Rc<RefCell<WorkerState>>,
    started_ms: u64,
    key_hash: String,
    idempotency_key: String,
    header_trace: Option<String>,
    tenant: Option<Tenant>,
    body: Option<Vec<u8>>,
    awaiting: Option<Call>,
    request: Option<Request>,
    verified: Option<Verified>,
    signed: Option<Signed>,
    /// Re-signs left for 409 `CHAIN_CONFLICT`: one, plus one when the head was a guess (a trace
    /// this worker has not seen: the first conflict only tells its head).
    conflict_retries: u8,
    /// The rate and in-flight checks ran (once, as soon as the tenant is known).
    admitted: bool,
    /// This exchange holds its idempotency key in the worker's in-flight set.
    in_flight: bool,
    response_headers: Vec<(String, String)>,
    finished: bool,
}

impl Exchange {
    pub fn new(
        config: Rc<Config>,
        route: CachedRoute,
        worker: Rc<RefCell<WorkerState>>,
        now_ms: u64,
    ) -> Self {
        Self {
            config,
            route,
            worker,
            started_ms: now_ms,
            key_hash: String::new(),
            idempotency_key: String::new(),
            header_trace: None,
            tenant: None,
            body: None,
            awaiting: None,
            request: None,
            verified: None,
            signed: None,
            conflict_retries: 0,
            admitted: false,
            in_flight: false,
            response_headers: Vec::new(),
            finished: false,
        }
    }

    /// Headers to add to the upstream's response (inline mode, after a verified exchange).
    pub fn response_headers(&self) -> &[(String, String)] {
        &self.response_headers
    }

    fn settings(&self) -> Option<&RouteSettings> {
        self.route.as_ref().as_ref().ok()
    }

    pub fn on_request_headers(
        &mut self,
        host: &mut dyn Host,
        header: &dyn Fn(&str) -> Option<String>,
        end_of_stream: bool,
    ) -> Action {
        let mode = match self.route.as_ref() {
            Ok(s) => s.mode,
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("signet: route metadata invalid: {e}"),
                );
                return self.fail(
                    host,
                    ApiError::new(
                        500,
                        "ROUTE_CONFIG_INVALID",
                        "the route's signet settings are invalid",
                    ),
                );
            }
        };
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| header(n).filter(|v| !v.trim().is_empty()))
        };
        let Some(api_key) = first(&API_KEY_HEADERS) else {
            return self.fail(
                host,
                ApiError::new(401, "MISSING_API_KEY", "X-SIGNET-API-Key is required"),
            );
        };
        self.key_hash = cid::sha256_hex(api_key.trim().as_bytes());
        // an empty key means "missing": answered once the API key is known (auth comes first)
        self.idempotency_key = match (first(&IDEMPOTENCY_KEY_HEADERS), mode) {
            (Some(key), _) => key.trim().to_owned(),
            (None, Mode::Exchange) => String::new(),
            // inline callers are ordinary API clients: without a key every request is new
            (None, Mode::Inline) => format!("auto-{}", host.random_hex(16)),
        };
        if let Some(t) = header(TRACE_HEADER) {
            if !trace::is_valid_trace_id(&t) {
                return self.fail(host, bad_trace_id());
            }
            self.header_trace = Some(t);
        }
        // a declared length over the limit is refused before anything is buffered or called
        let declared = header("content-length").and_then(|n| n.trim().parse::<usize>().ok());
        if let Some(error) = declared.and_then(|n| self.over_limit(n)) {
            return self.fail(host, error);
        }
        if end_of_stream {
            self.body = Some(Vec::new());
        }
        self.tenant = self.cached_tenant(host);
        if self.tenant.is_none() {
            return self.look_up_tenant();
        }
        self.advance(host)
    }

    /// `read_body` returns the whole buffered body; it is only called at the end of the stream.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        buffered_size: usize,
        end_of_stream: bool,
        read_body: &mut dyn FnMut() -> Vec<u8>,
    ) -> Action {
        if self.finished {
            return Action::PassThrough;
        }
        if let Some(error) = self.over_limit(buffered_size) {
            return self.fail(host, error);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.body = Some(read_body());
        self.advance(host)
    }

    /// 429 when the tenant has spent this second's budget on the route (before any callout).
    fn over_rate(&self, host: &mut dyn Host) -> Option<ApiError> {
        let settings = self.settings()?;
        let per_second = settings.tenant_requests_per_second?;
        let tenant = self.tenant_name();
        (!rate_limit::admit(host, &settings.name, &tenant, per_second)).then(|| {
            ApiError::new(
                429,
                "RATE_LIMITED",
                format!(
                    "tenant {tenant} exceeded {per_second} requests per second on route {}",
                    settings.name
                ),
            )
        })
    }

    fn over_limit(&self, size: usize) -> Option<ApiError> {
        let limit = self.settings().map_or(usize::MAX, |s| s.body_limit);
        (size > limit).then(|| {
            ApiError::new(
                413,
                "BODY_TOO_LARGE",
                format!("request body exceeds {limit} bytes"),
            )
        })
    }

    pub fn on_callout_response(
        &mut self,
        host: &mut dyn Host,
        response: CalloutResponse,
    ) -> Action {
        let Some(call) = self.awaiting.take() else {
            return Action::Pause; // a stray response (the exchange already answered)
        };
        let reply = classify(response);
        if let Reply::Unavailable(why) = &reply {
            host.count(&stats::callout_failures(call.name()));
            host.log(
                LogLevel::Warn,
                &format!("signet: control plane {} call failed: {why}", call.name()),
            );
            return self.unavailable(host);
        }
        match call {
            Call::Tenant => self.on_tenant(host, reply),
            Call::Commit => self.on_commit(host, reply),
        }
    }

    // ---- steps -------------------------------------------------------------------------------

    /// Runs what is runnable: once the tenant is known, admit the request; once the body is
    /// complete too, verify, sign and commit.
    fn advance(&mut self, host: &mut dyn Host) -> Action {
        if self.finished {
            return Action::PassThrough;
        }
        if self.awaiting.is_some() || self.tenant.is_none() || self.request.is_some() {
            return Action::Pause;
        }
        if self.idempotency_key.is_empty() {
            return self.fail(
                host,
                ApiError::new(
                    400,
                    "MISSING_IDEMPOTENCY_KEY",
                    "X-SIGNET-Idempotency-Key is required",
                ),
            );
        }
        if !self.admitted {
            self.admitted = true;
            if let Some(error) = self.over_rate(host) {
                return self.fail(host, error);
            }
            if let Some(error) = self.enter_in_flight() {
                return self.fail(host, error);
            }
        }
        let Some(body) = self.body.take() else {
            return Action::Pause;
        };
        let request = match self.parse_request(&body) {
            Ok(r) => r,
            Err(e) => return self.fail(host, e),
        };
        let trace_id = request.trace_id.clone();
        self.request = Some(request);
        if let Err(e) = self.verify(host) {
            return self.fail(host, e);
        }
        let head = trace_id.as_deref().and_then(|t| self.known_head(t));
        let guessed = trace_id.is_some() && head.is_none();
        self.conflict_retries = 1 + u8::from(guessed);
        self.commit(host, head)
    }

    /// 409 when this worker already runs an exchange with the same idempotency key.
    fn enter_in_flight(&mut self) -> Option<ApiError> {
        let tenant = self.tenant_name();
        let entered = self.worker.try_borrow_mut().map_or(true, |mut w| {
            w.in_flight.enter(&tenant, &self.idempotency_key)
        });
        self.in_flight = entered;
        (!entered).then(|| {
            ApiError::new(
                409,
                "IDEMPOTENCY_IN_FLIGHT",
                "a request with this idempotency key is still being processed",
            )
        })
    }

    fn leave_in_flight(&mut self) {
        if !std::mem::take(&mut self.in_flight) {
            return;
        }
        let tenant = self.tenant_name();
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            w.in_flight.leave(&tenant, &self.idempotency_key);
        }
    }

    /// The head this worker committed last on the tenant's trace, if any.
    fn known_head(&self, trace_id: &str) -> Option<Head> {
        let worker = self.worker.try_borrow().ok()?;
        worker.heads.get(&self.tenant_name(), trace_id)
    }

    fn on_tenant(&mut self, host: &mut dyn Host, reply: Reply) -> Action {
        match reply {
            Reply::Ok(body) => match serde_json::from_slice::<Tenant>(&body) {
                Ok(tenant) => {
                    self.cache_tenant(host, &tenant);
                    self.tenant = Some(tenant);
                    self.advance(host)
                }
                Err(e) => {
                    host.count(&stats::callout_failures(Call::Tenant.name()));
                    host.log(
                        LogLevel::Warn,
                        &format!("signet: tenant answer unreadable: {e}"),
                    );
                    self.unavailable(host)
                }
            },
            Reply::Error(e, _) => {
                let e = control_plane_error(host, e);
                self.fail(host, e)
            }
            Reply::Unavailable(_) => self.unavailable(host),
        }
    }

    fn on_commit(&mut self, host: &mut dyn Host, reply: Reply) -> Action {
        let body = match reply {
            Reply::Ok(body) => body,
            Reply::Error(e, Some(head))
                if e.code == "CHAIN_CONFLICT" && self.conflict_retries > 0 =>
            {
                // Another exchange extended the trace first (or the head was a guess): link
                // to the head commit reported.
                self.conflict_retries -= 1;
                host.log(
                    LogLevel::Debug,
                    "signet: chain conflict, re-signing on the head the control plane reported",
                );
                return self.commit(host, Some(head));
            }
            Reply::Error(e, _) => {
                let e = control_plane_error(host, e);
                return self.fail(host, e);
            }
            Reply::Unavailable(_) => return self.unavailable(host),
        };
        match serde_json::from_slice::<CommitReply>(&body) {
            Ok(CommitReply::Committed) => {
                let Some(signed) = self.signed.take() else {
                    return self.fail(host, ApiError::new(500, "INTERNAL", "nothing was signed"));
                };
                if let Some(s) = self.settings() {
                    host.count(&stats::exchanges(s.mode.as_str()));
                }
                self.remember_head(&signed.trace_id, signed.head);
                self.deliver(host, signed.response, signed.headers, false)
            }
            Ok(CommitReply::Replay { response }) => {
                let headers = receipt_headers(&response);
                let body = serde_json::to_vec(&response).unwrap_or_default();
                self.deliver(host, body, headers, true)
            }
            Err(e) => {
                host.count(&stats::callout_failures(Call::Commit.name()));
                host.log(
                    LogLevel::Warn,
                    &format!("signet: commit answer unreadable: {e}"),
                );
                self.unavailable(host)
            }
        }
    }

    /// Parses the body: the exchange envelope, or the inline route's payload.
    fn parse_request(&self, body: &[u8]) -> Result<Request, ApiError> {
        let settings = self
            .settings()
            .ok_or_else(|| ApiError::new(500, "ROUTE_CONFIG_INVALID", "route settings invalid"))?;
        let value = canonical::parse(body, &parse_options()).map_err(|e| {
            if e.code() == "INVALID_JSON" || e.code() == "INVALID_UTF8" {
                ApiError::new(
                    400,
                    "MALFORMED_JSON",
                    format!("request body is not valid JSON: {e}"),
                )
            } else {
                ApiError::new(422, e.code(), format!("request body is not I-JSON: {e}"))
            }
        })?;
        let fingerprint = format!("sha256:{}", cid::sha256_hex(body));
        if let Some((payload_type, target_type)) = &settings.inline_types {
            return Ok(Request {
                payload_type: payload_type.clone(),
                target_type: target_type.clone(),
                payload: value,
                trace_id: self.header_trace.clone(),
                forward_url: None,
                fingerprint,
            });
        }
        let Value::Object(mut envelope) = value else {
            return Err(invalid_request("the request body must be a JSON object"));
        };
        let mut text = |name: &str| match envelope.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(name.to_owned()),
        };
        let payload_type = text("payload_type")
            .ok()
            .flatten()
            .ok_or_else(|| invalid_request("payload_type must be a string"))?;
        let target_type = text("target_type")
            .ok()
            .flatten()
            .ok_or_else(|| invalid_request("target_type must be a string"))?;
        let trace_id = text("trace_id").map_err(|_| bad_trace_id())?;
        if trace_id
            .as_deref()
            .is_some_and(|t| !trace::is_valid_trace_id(t))
        {
            return Err(bad_trace_id());
        }
        let forward_url =
            text("forward_url").map_err(|_| invalid_request("forward_url must be a string"))?;
        let payload = envelope
            .remove("payload")
            .ok_or_else(|| invalid_request("payload is required"))?;
        // normalize would refuse them too; checked here so that the error names the field
        let registry = &self.config.registry;
        for (field, ty) in [
            ("payload_type", &payload_type),
            ("target_type", &target_type),
        ] {
            if !registry.has_type(ty) {
                return Err(ApiError::new(
                    422,
                    "UNKNOWN_TYPE",
                    format!("unknown {field} {ty:?}"),
                ));
            }
        }
        if !registry.can_map(&payload_type, &target_type) {
            return Err(ApiError::new(
                422,
                "NO_MAPPING",
                format!("no mapping from {payload_type} to {target_type}"),
            ));
        }
        Ok(Request {
            payload_type,
            target_type,
            payload,
            trace_id: trace_id.or_else(|| self.header_trace.clone()),
            forward_url,
            fingerprint,
        })
    }

    /// sanitize → normalize (validate, repair, invariants, transform, validate) → HEL.
    fn verify(&mut self, host: &mut dyn Host) -> Result<(), ApiError> {
        let request = self
            .request
            .as_mut()
            .ok_or_else(|| ApiError::new(500, "INTERNAL", "no parsed request"))?;
        let mut payload = std::mem::take(&mut request.payload);
        sanitize(&mut payload);
        let normalized =
            self.config
                .registry
                .normalize(&request.payload_type, &request.target_type, payload)?;
        for _ in 0..normalized.repairs {
            host.count(stats::REPAIRS);
        }
        if let Some(url) = &request.forward_url {
            let allowlist = self
                .tenant
                .as_ref()
                .map(|t| t.allowlist.as_slice())
                .unwrap_or(&[]);
            match policy::evaluate(url, allowlist, &self.config.global_allowlist) {
                Err(denial) => {
                    host.count(&stats::denials(denial.reason()));
                    return Err(ApiError::new(403, denial.reason(), denial.detail()));
                }
                Ok(_) => {
                    return Err(ApiError::new(
                        422,
                        "FORWARD_UNAVAILABLE",
                        "forward_url is allowed by the egress policy, but forwarding is not available yet",
                    ))
                }
            }
        }
        let canon = canonical::to_canonical(&normalized.value, Profile::Signet)
            .map_err(|e| ApiError::new(500, "INTERNAL", format!("cannot canonicalize: {e}")))?;
        let trace_id = match &request.trace_id {
            Some(t) => t.clone(),
            None => format!("sig-{}", host.random_hex(8)),
        };
        self.verified = Some(Verified {
            trace_id,
            cid: cid::cid(canon.as_bytes()),
            canon,
            normalized: normalized.value,
        });
        Ok(())
    }

    /// Signs the receipt on `head` and commits it.
    fn commit(&mut self, host: &mut dyn Host, head: Option<Head>) -> Action {
        match self.sign(host, head) {
            Ok((commit, signed)) => {
                self.signed = Some(signed);
                self.awaiting = Some(Call::Commit);
                Action::Commit(commit)
            }
            Err(e) => self.fail(host, e),
        }
    }

    /// The committed receipt is its trace's head now: the next hop through this worker links
    /// to it without asking.
    fn remember_head(&self, trace_id: &str, head: Head) {
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            w.heads.put(&self.tenant_name(), trace_id, head);
        }
    }

    /// The receipt on `head`, signed, as the commit to send (JSON) and the answer to give once
    /// it is stored.
    fn sign(&self, host: &mut dyn Host, head: Option<Head>) -> Result<(Vec<u8>, Signed), ApiError> {
        let internal = |what: String| ApiError::new(500, "INTERNAL", what);
        let (Some(settings), Some(request), Some(verified)) = (
            self.settings(),
            self.request.as_ref(),
            self.verified.as_ref(),
        ) else {
            return Err(internal("nothing to sign".into()));
        };
        let policy = Policy {
            engine: "HEL".into(),
            allowed: true,
            reason: "no_forward".into(),
        };
        let mut extensions = Map::new();
        extensions.insert("payload_type".into(), request.payload_type.clone().into());
        extensions.insert("target_type".into(), request.target_type.clone().into());
        let draft = ReceiptDraft {
            trace_id: verified.trace_id.clone(),
            hop: head.as_ref().map_or(1, |h| h.hop.saturating_add(1)),
            ts: time::rfc3339_millis(host.now_millis()),
            tenant: self.tenant_name(),
            cid: verified.cid.clone(),
            canon: settings.keep_canon.then(|| verified.canon.clone()),
            prev_receipt_hash: head.map(|h| h.receipt_hash),
            policy: policy.clone(),
            extensions,
        };
        let receipt = receipt::sign(&draft, &self.config.signing_key)
            .map_err(|e| internal(format!("cannot sign the receipt: {e}")))?;
        // inline routes that drop `canon` for privacy do not store the payload either
        let normalized = (settings.mode == Mode::Exchange || settings.keep_canon)
            .then(|| verified.normalized.clone());
        let response = exchange_response(&receipt, normalized, &policy)?;
        let headers = receipt_headers(&response);
        let new_head = Head {
            hop: draft.hop,
            receipt_hash: receipt
                .get("receipt_hash")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        };
        let response = json_text(&response)?;
        let commit = commit_text(
            &self.idempotency_key,
            &request.fingerprint,
            &receipt,
            &response,
        )?;
        let signed = Signed {
            response: response.into_bytes(),
            headers,
            trace_id: draft.trace_id,
            head: new_head,
        };
        Ok((commit, signed))
    }

    /// Answers with a verified (or replayed) exchange's 200 body and its receipt headers.
    fn deliver(
        &mut self,
        host: &mut dyn Host,
        body: Vec<u8>,
        mut headers: Vec<(String, String)>,
        replay: bool,
    ) -> Action {
        if replay {
            host.count(stats::IDEMPOTENT_HITS);
            headers.push((IDEMPOTENCY_HIT_HEADER.into(), "1".into()));
        }
        let Some(settings) = self.settings().cloned() else {
            return self.unavailable(host);
        };
        match settings.mode {
            Mode::Exchange => {
                headers.insert(0, ("content-type".into(), "application/json".into()));
                self.finish(
                    host,
                    Action::Respond(Response {
                        status: 200,
                        headers,
                        body,
                    }),
                )
            }
            Mode::Inline => {
                let body = match settings.inline_body {
                    InlineBody::Original => None,
                    InlineBody::Normalized => match self.inline_body(host, replay) {
                        Ok(body) => Some(body),
                        Err(e) => return self.fail(host, e),
                    },
                };
                self.response_headers = headers.clone();
                let mut set_headers = headers;
                if let Some(b) = &body {
                    set_headers.push(("content-length".into(), b.len().to_string()));
                    set_headers.push(("content-type".into(), "application/json".into()));
                }
                // set_headers are applied after the removals
                let remove_headers = API_KEY_HEADERS
                    .into_iter()
                    .chain(FORGEABLE_HEADERS)
                    .collect();
                self.finish(
                    host,
                    Action::Continue(Forward {
                        set_headers,
                        remove_headers,
                        body,
                    }),
                )
            }
        }
    }

    /// The canonical normalized payload for the upstream; a replay recomputes it (the stored
    /// response may not hold it), which is deterministic.
    fn inline_body(&mut self, host: &mut dyn Host, replay: bool) -> Result<Vec<u8>, ApiError> {
        if replay && self.verified.is_none() {
            self.verify(host)?;
        }
        self.verified
            .as_ref()
            .map(|v| v.canon.clone().into_bytes())
            .ok_or_else(|| ApiError::new(500, "INTERNAL", "no normalized payload"))
    }

    // ---- endings -----------------------------------------------------------------------------

    /// The one callout an exchange makes itself (commits go out in the worker's batches).
    fn look_up_tenant(&mut self) -> Action {
        self.awaiting = Some(Call::Tenant);
        let key_hash = vec![(KEY_HASH_HEADER.into(), self.key_hash.clone())];
        Action::Call(callout(&self.config, Call::Tenant, None, key_hash))
    }

    fn fail(&mut self, host: &mut dyn Host, error: ApiError) -> Action {
        host.count(&stats::errors(&error.code));
        host.log(LogLevel::Debug, &format!("signet: {error}"));
        let response = Response {
            status: error.status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: error.to_json().into_bytes(),
        };
        self.finish(host, Action::Respond(response))
    }

    /// The control plane cannot be used: 503, or on a fail-open route, the request continues
    /// as it came (no receipt, nothing counted), only without receipt headers a client may have
    /// forged: the upstream must never see receipt headers on a request that has no receipt.
    fn unavailable(&mut self, host: &mut dyn Host) -> Action {
        if self.settings().is_some_and(|s| s.fail_open) {
            host.log(
                LogLevel::Warn,
                "signet: control plane unavailable, failing open",
            );
            let forward = Forward {
                remove_headers: FORGEABLE_HEADERS.to_vec(),
                ..Forward::default()
            };
            return self.finish(host, Action::Continue(forward));
        }
        self.fail(
            host,
            ApiError::new(
                503,
                "CONTROL_PLANE_UNAVAILABLE",
                "the Signet control plane is unavailable",
            ),
        )
    }

    fn finish(&mut self, host: &mut dyn Host, action: Action) -> Action {
        if !self.finished {
            self.finished = true;
            self.awaiting = None;
            self.leave_in_flight();
            let elapsed = host.now_millis().saturating_sub(self.started_ms);
            host.record(stats::EXCHANGE_LATENCY_MS, elapsed);
        }
        action
    }

    // ---- tenant cache ------------------------------------------------------------------------

    fn tenant_name(&self) -> String {
        self.tenant
            .as_ref()
            .map(|t| t.tenant.clone())
            .unwrap_or_default()
    }

    fn cached_tenant(&self, host: &mut dyn Host) -> Option<Tenant> {
        if self.config.tenant_cache_ttl_ms == 0 {
            return None;
        }
        let bytes = host.shared_get(&format!("{TENANT_CACHE_PREFIX}{}", self.key_hash))?;
        let cached: CachedTenant = serde_json::from_slice(&bytes).ok()?;
        (cached.expires_ms > host.now_millis()).then_some(cached.tenant)
    }

    fn cache_tenant(&self, host: &mut dyn Host, tenant: &Tenant) {
        if self.config.tenant_cache_ttl_ms == 0 {
            return;
        }
        let entry = json!({
            "expires_ms": host.now_millis().saturating_add(self.config.tenant_cache_ttl_ms),
            "tenant": {"tenant": tenant.tenant, "allowlist": tenant.allowlist},
        });
        host.shared_set(
            &format!("{TENANT_CACHE_PREFIX}{}", self.key_hash),
            entry.to_string().as_bytes(),
        );
    }
}

impl Drop for Exchange {
    /// A stream reset before the exchange answered still frees its idempotency key.
    fn drop(&mut self) {
        self.leave_in_flight();
    }
}

/// A callout to the control plane's internal API; for [`Call::Commit`] the body is a batch
/// (`commit_queue`).
pub fn callout(
    config: &Config,
    call: Call,
    body: Option<Vec<u8>>,
    extra_headers: Vec<(String, String)>,
) -> Callout {
    let cp = &config.control_plane;
    let (method, path) = match call {
        Call::Tenant => ("GET", "/v1/internal/tenant"),
        Call::Commit => ("POST", "/v1/internal/commits"),
    };
    let mut headers = vec![
        (":method".to_owned(), method.to_owned()),
        (":path".to_owned(), path.to_owned()),
        (":authority".to_owned(), cp.authority.clone()),
        (FILTER_TOKEN_HEADER.to_owned(), cp.filter_token.clone()),
    ];
    if body.is_some() {
        headers.push(("content-type".into(), "application/json".into()));
    }
    headers.extend(extra_headers);
    Callout {
        call,
        cluster: cp.cluster.clone(),
        headers,
        body,
        timeout_ms: cp.timeout_ms,
    }
}

/// The SPEC §4 200 body of an exchange: `{"trace_id","normalized","policy","receipt":{…}}`
/// (`normalized` left out when the route keeps no payload).
pub fn exchange_response(
    receipt: &Map<String, Value>,
    normalized: Option<Value>,
    policy: &Policy,
) -> Result<Value, ApiError> {
    let summary: Map<String, Value> = [
        "ts",
        "cid",
        "receipt_hash",
        "prev_receipt_hash",
        "hop",
        "kid",
        "sig",
    ]
    .iter()
    .filter_map(|&k| receipt.get(k).map(|v| (k.to_owned(), v.clone())))
    .collect();
    let mut response = Map::new();
    if let Some(trace_id) = receipt.get("trace_id") {
        response.insert("trace_id".into(), trace_id.clone());
    }
    if let Some(normalized) = normalized {
        response.insert("normalized".into(), normalized);
    }
    response.insert(
        "policy".into(),
        serde_json::to_value(policy).map_err(internal_error)?,
    );
    response.insert("receipt".into(), Value::Object(summary));
    Ok(Value::Object(response))
}

/// One `commits` item (docs/ARCHITECTURE.md), written around the response text, which is also
/// the answer's body: it is serialized once.
pub fn commit_text(
    idempotency_key: &str,
    fingerprint: &str,
    receipt: &Map<String, Value>,
    response: &str,
) -> Result<Vec<u8>, ApiError> {
    let tenant = receipt.get("tenant").cloned().unwrap_or_default();
    let mut commit = String::with_capacity(response.len() * 3);
    commit.push_str("{\"tenant\":");
    commit.push_str(&json_text(&tenant)?);
    commit.push_str(",\"idempotency_key\":");
    commit.push_str(&json_text(idempotency_key)?);
    commit.push_str(",\"fingerprint\":");
    commit.push_str(&json_text(fingerprint)?);
    commit.push_str(",\"receipt\":");
    commit.push_str(&json_text(receipt)?);
    commit.push_str(",\"response\":");
    commit.push_str(response);
    commit.push_str(",\"fu_tokens\":0}");
    Ok(commit.into_bytes())
}

fn internal_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "INTERNAL", e.to_string())
}

fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, ApiError> {
    serde_json::to_string(value).map_err(internal_error)
}

fn invalid_request(detail: &str) -> ApiError {
    ApiError::new(422, "INVALID_REQUEST", detail)
}

fn bad_trace_id() -> ApiError {
    ApiError::new(
        400,
        "BAD_TRACE_ID",
        "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
    )
}

/// Control-plane errors that blame the filter (its token, key or request shape), not the
/// client, become 500s.
fn control_plane_error(host: &mut dyn Host, error: ApiError) -> ApiError {
    match error.code.as_str() {
        "FILTER_UNAUTHORIZED"
        | "RECEIPT_INVALID"
        | "BAD_REQUEST"
        | "FINGERPRINT_INVALID"
        | "TRACE_ID_INVALID" => {
            host.log(
                LogLevel::Error,
                &format!("signet: control plane rejected the filter: {error}"),
            );
            ApiError::new(500, error.code, "the Signet filter is misconfigured")
        }
        _ => error,
    }
}

/// `X-SIGNET-Trace`, `-Receipt-Hash`, `-Hop`, `-CID` from a stored 200 body.
fn receipt_headers(response: &Value) -> Vec<(String, String)> {
    let receipt = response.get("receipt");
    let field = |v: Option<&Value>, name: &str| match v.and_then(|v| v.get(name)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    [
        (TRACE_HEADER, field(Some(response), "trace_id")),
        (RECEIPT_HASH_HEADER, field(receipt, "receipt_hash")),
        (HOP_HEADER, field(receipt, "hop")),
        (CID_HEADER, field(receipt, "cid")),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|t| (name.to_owned(), t)))
    .collect()
}

#[cfg(test)]
mod tests;
