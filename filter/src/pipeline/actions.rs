//! What an exchange asks of the filter, and the control-plane callouts it makes.

use serde_json::value::RawValue;
use signet_protocol::internal::{self, commit, forward, health, idempotency, repair, tenant};

use crate::config::Config;

/// A control-plane endpoint of `signet_protocol::internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Tenant,
    Commit,
    /// The stored answer of an idempotency key, for a request the pipeline refuses.
    Idempotency,
    /// The control plane's health, for `/healthz` through Envoy.
    Health,
    /// The delivery of a verified payload to its `forward_url` (SPEC §5).
    Forward,
    /// The LLM-fallback repair of an embedded JSON text (`control_plane.repair_timeout_ms`).
    Repair,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Tenant => "tenant",
            Call::Commit => "commit",
            Call::Idempotency => "idempotency",
            Call::Health => "health",
            Call::Forward => "forward",
            Call::Repair => "repair",
        }
    }
}

/// An HTTP call to the control plane cluster; its answer goes to
/// [`Exchange::on_callout_response`](super::Exchange::on_callout_response).
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
    /// Send this callout, then wait for its answer: a tenant lookup joins the one out for its
    /// key (single flight); any other call is the exchange's own.
    Call(Callout),
    /// Queue this [`internal::Commit`] for the worker's next batch ([`crate::commit_queue`]),
    /// then wait; its answer comes back through
    /// [`Exchange::on_callout_response`](super::Exchange::on_callout_response).
    Commit(CommitJson),
    /// Answer locally; the request ends here.
    Respond(Response),
    /// Continue upstream with these changes.
    Continue(Forward),
    /// Continue upstream untouched (nothing left to do for this request).
    PassThrough,
}

/// One exchange's [`internal::Commit`], serialized once, and its `deadline_ms` (Unix ms);
/// equal when its JSON text is.
#[derive(Debug, Clone)]
pub struct CommitJson(pub Box<RawValue>, pub u64);

impl PartialEq for CommitJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get() && self.1 == other.1
    }
}

/// A callout to the control plane's internal API; for [`Call::Commit`] the body is a batch
/// ([`crate::commit_queue`]).
pub fn callout(
    config: &Config,
    call: Call,
    body: Option<Vec<u8>>,
    extra_headers: Vec<(String, String)>,
) -> Callout {
    let cp = &config.control_plane;
    let (method, path) = match call {
        Call::Tenant => ("GET", tenant::PATH),
        Call::Commit => ("POST", commit::PATH),
        Call::Idempotency => ("POST", idempotency::PATH),
        Call::Health => ("GET", health::PATH),
        Call::Forward => ("POST", forward::PATH),
        Call::Repair => ("POST", repair::PATH),
    };
    let mut headers = vec![
        (":method".to_owned(), method.to_owned()),
        (":path".to_owned(), path.to_owned()),
        (":authority".to_owned(), cp.authority.clone()),
        (
            internal::FILTER_TOKEN_HEADER.to_owned(),
            cp.filter_token.clone(),
        ),
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
        // a delivery and a repair wait for the receiver and the LLM provider
        timeout_ms: match call {
            Call::Forward => cp.forward_timeout_ms,
            Call::Repair => cp.repair_timeout_ms,
            _ => cp.timeout_ms,
        },
    }
}
