//! [`Exchange`]: one request's way through the pipeline. Its [`State`] says where it is, and each
//! stage holds what it owns, so no step has to infer its place from which fields are set.

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::Value;
use signet_protocol::canonical::{self, Profile};
use signet_protocol::internal::{idempotency, Code, CommitReply, ErrorReply, Grant, Head, Outcome};
use signet_protocol::{cid, trace, ApiError};

use super::actions::{callout, Action, Call, CalloutResponse, Forward, Response};
use super::fallback::{self as llm, Refusal};
use super::forward;
use super::headers::{
    receipt_headers, trim_ows, visible_ascii, Headers, API_KEY_HEADERS, FORGEABLE_HEADERS,
    IDEMPOTENCY_HIT_HEADER, IDEMPOTENCY_KEY_HEADERS, MAX_IDEMPOTENCY_KEY_BYTES, TRACE_HEADER,
};
use super::health;
use super::reply::{classify, control_plane_error, Reply};
use super::request::{self, bad_trace_id, Request};
use super::sign::{self, Signed, Subject};
use super::tenant_cache::{self, Cached};
use super::verify::{verify_with, Verdict, Verified};
use crate::config::Config;
use crate::host::{stats, Host, LogLevel};
use crate::rate_limit;
use crate::route::{CachedRoute, InlineBody, Mode, RouteSettings};
use crate::worker::{InFlightKey, WorkerState};
use signet_protocol::internal::tenant::KEY_HASH_HEADER;

pub struct Exchange {
    config: Rc<Config>,
    worker: Rc<RefCell<WorkerState>>,
    started_ms: u64,
    state: State,
}

enum State {
    /// Created for a request; its headers come next. The route as the cache has it: an invalid
    /// route is answered at the headers, and never looked at again.
    New(CachedRoute),
    /// Between the request headers and the answer.
    Open(Routed, Stage),
    /// A `health` route: the control plane's health is asked for.
    CheckingHealth,
    /// Answered (or passed on); the headers the upstream's response gets (inline mode).
    Done(Vec<(String, String)>),
}

/// What the request headers said, on a valid route.
struct Routed {
    route: Rc<RouteSettings>,
    key_hash: String,
    /// Missing or invalid: answered once the API key is known (auth comes first).
    idempotency_key: Result<String, Box<ApiError>>,
    /// The client named the key (an inline request without one gets a fresh key, which no
    /// earlier request can have stored).
    key_given: bool,
    header_trace: Option<String>,
}

enum Stage {
    /// The tenant lookup is out; the body may be complete before its answer.
    AwaitingTenant { body: Option<Vec<u8>> },
    /// Admitted; waiting for the end of the body.
    AwaitingBody(Admitted),
    /// Refused before its body (the route's rate): the body is awaited only to tell whether
    /// the request replays a stored one.
    Refusing {
        admitted: Admitted,
        error: Box<ApiError>,
    },
    /// Refused by the pipeline: the key's stored answer is looked up before the refusal is
    /// answered (SPEC §4: a replay gets the stored response even when the pipeline would
    /// refuse the request now, and a reused key is 422 whatever the new body).
    CheckingReplay(Box<Refused>),
    /// The control plane delivers to `forward_url` (pipeline/forward.rs); its answer is signed
    /// into the receipt.
    Forwarding(Box<Forwarding>),
    /// Deterministic repair failed on a tenant with `fallback_enabled`: the LLM-fallback
    /// repair callout is out (`fallback.rs`); its answer verifies the payload again.
    Repairing(Box<Repairing>),
    /// The signed receipt is in a commit batch.
    Committing(Box<Committing>),
}

impl Routed {
    /// What tells this request from another with the same key (SPEC §4).
    fn fingerprint(&self, body: &[u8]) -> String {
        idempotency::fingerprint(body, self.header_trace.as_deref())
    }
}

/// A known tenant's request, holding its idempotency key on this worker.
struct Admitted {
    grant: Grant,
    /// The idempotency key, freed on this worker when the exchange ends, however it ends.
    in_flight: InFlightKey,
}

/// A verified request, ready to be signed.
struct Signable {
    admitted: Admitted,
    request: Request,
    verified: Verified,
    /// The receipt's `forwarded`, once the delivery answered.
    forwarded: Option<Value>,
}

/// Waiting for the delivery's first attempt, then signed on `head`.
struct Forwarding {
    subject: Signable,
    head: Option<Head>,
    retries: u8,
}

/// A request the pipeline refused, waiting for its key's stored answer.
struct Refused {
    /// Held, never read: the key stays in flight on this worker until the answer.
    _admitted: Admitted,
    fingerprint: String,
    error: ApiError,
}

/// A request waiting for an LLM-fallback repair.
struct Repairing {
    admitted: Admitted,
    /// Its payload is the sanitized one, verified again with `fixes`.
    request: Request,
    need: Box<crate::registry::FallbackNeed>,
    fixes: Vec<crate::registry::Fix>,
    /// FU of the repairs so far.
    fu_tokens: u64,
    calls: u8,
}

struct Committing {
    subject: Signable,
    signed: Signed,
    /// Re-signs left for 409 `CHAIN_CONFLICT`: one, plus one when the head was a guess (a trace
    /// this worker has not seen: the first conflict only tells its head).
    retries: u8,
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
            worker,
            started_ms: now_ms,
            state: State::New(route),
        }
    }

    /// Headers to add to the upstream's response (inline mode, after a verified exchange).
    pub fn response_headers(&self) -> &[(String, String)] {
        match &self.state {
            State::Done(headers) => headers,
            State::New(_) | State::Open(..) | State::CheckingHealth => &[],
        }
    }

    pub fn on_request_headers(
        &mut self,
        host: &mut dyn Host,
        headers: &Headers,
        end_of_stream: bool,
    ) -> Action {
        let State::New(route) = &self.state else {
            return Action::PassThrough;
        };
        let route = match route.clone() {
            Ok(route) => route,
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
        if route.mode == Mode::Health {
            self.state = State::CheckingHealth;
            return Action::Call(callout(&self.config, Call::Health, None, Vec::new()));
        }
        let read = match read_headers(host, headers, route.mode) {
            Ok(read) => read,
            Err(e) => return self.fail(host, e),
        };
        // a declared length over the limit is refused before anything is buffered or called
        if let Some(error) = read.declared_length.and_then(|n| over_limit(&route, n)) {
            return self.fail(host, error);
        }
        let ReadHeaders {
            key_hash,
            idempotency_key,
            key_given,
            header_trace,
            ..
        } = read;
        let body = end_of_stream.then(Vec::new);
        let routed = Routed {
            route,
            key_hash,
            idempotency_key,
            key_given,
            header_trace,
        };
        let ttl_ms = self.config.tenant_cache_ttl_ms;
        match tenant_cache::get(host, ttl_ms, &routed.key_hash) {
            Some(Cached::Tenant(grant)) => self.admit(host, routed, grant, body),
            Some(Cached::Unknown) => self.fail(host, unknown_api_key()),
            None => {
                // the one callout an exchange makes itself (commits go out in batches)
                let key_hash = vec![(KEY_HASH_HEADER.into(), routed.key_hash.clone())];
                let lookup = callout(&self.config, Call::Tenant, None, key_hash);
                self.state = State::Open(routed, Stage::AwaitingTenant { body });
                Action::Call(lookup)
            }
        }
    }

    /// `read_body` returns the whole buffered body; it is only called at the end of the stream.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        buffered_size: usize,
        end_of_stream: bool,
        read_body: &mut dyn FnMut() -> Vec<u8>,
    ) -> Action {
        let Some((routed, stage)) = self.take_open() else {
            return Action::PassThrough;
        };
        let buffered = u64::try_from(buffered_size).unwrap_or(u64::MAX);
        if let Some(error) = over_limit(&routed.route, buffered) {
            return self.fail(host, error);
        }
        match stage {
            Stage::AwaitingTenant { .. } if end_of_stream => {
                let body = Some(read_body());
                self.wait(routed, Stage::AwaitingTenant { body })
            }
            Stage::AwaitingBody(admitted) if end_of_stream => {
                let body = read_body();
                self.on_body(host, routed, admitted, body)
            }
            Stage::Refusing { admitted, error } if end_of_stream => {
                let fingerprint = routed.fingerprint(&read_body());
                self.refuse(host, routed, admitted, fingerprint, *error)
            }
            stage => self.wait(routed, stage),
        }
    }

    pub fn on_callout_response(
        &mut self,
        host: &mut dyn Host,
        response: CalloutResponse,
    ) -> Action {
        if let State::CheckingHealth = self.state {
            self.state = State::Done(Vec::new());
            return Action::Respond(health::answer(response));
        }
        let Some((routed, stage)) = self.take_open() else {
            return Action::Pause; // a stray response (the exchange already answered)
        };
        let call = match &stage {
            Stage::AwaitingTenant { .. } => Call::Tenant,
            Stage::CheckingReplay(_) => Call::Idempotency,
            Stage::Forwarding(_) => Call::Forward,
            Stage::Repairing(_) => Call::Repair,
            Stage::Committing(_) => Call::Commit,
            Stage::AwaitingBody(_) | Stage::Refusing { .. } => return self.wait(routed, stage),
        };
        if let Stage::Repairing(repairing) = stage {
            return self.on_repair(host, routed, response, *repairing);
        }
        let reply = classify(response);
        if let Stage::CheckingReplay(refused) = stage {
            return self.on_stored_answer(host, routed, reply, *refused);
        }
        let reply = match reply {
            Ok(reply) => reply,
            Err(why) => {
                host.count(&stats::callout_failures(call.name()));
                host.log(
                    LogLevel::Warn,
                    &format!("signet: control plane {} call failed: {why}", call.name()),
                );
                return self.unavailable(host, &routed.route);
            }
        };
        match stage {
            Stage::AwaitingTenant { body } => self.on_tenant(host, routed, reply, body),
            Stage::Committing(committing) => self.on_commit(host, routed, reply, *committing),
            Stage::Forwarding(forwarding) => {
                let Forwarding {
                    mut subject,
                    head,
                    retries,
                } = *forwarding;
                match forward::outcome(host, reply) {
                    Ok(forwarded) => {
                        subject.forwarded = Some(forwarded);
                        self.commit(host, routed, subject, head, retries)
                    }
                    Err(e) => self.fail(host, e),
                }
            }
            Stage::AwaitingBody(_)
            | Stage::Refusing { .. }
            | Stage::CheckingReplay(_)
            | Stage::Repairing(_) => self.wait(routed, stage),
        }
    }

    // ---- steps -------------------------------------------------------------------------------

    fn on_tenant(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        reply: Reply,
        body: Option<Vec<u8>>,
    ) -> Action {
        match reply {
            Reply::Ok(bytes) => match serde_json::from_slice::<Grant>(&bytes) {
                Ok(grant) => {
                    let ttl_ms = self.config.tenant_cache_ttl_ms;
                    tenant_cache::put(host, ttl_ms, &routed.key_hash, &grant);
                    self.admit(host, routed, grant, body)
                }
                Err(e) => {
                    host.count(&stats::callout_failures(Call::Tenant.name()));
                    host.log(
                        LogLevel::Warn,
                        &format!("signet: tenant answer unreadable: {e}"),
                    );
                    self.unavailable(host, &routed.route)
                }
            },
            Reply::Error(status, e) => {
                if e.code == Code::UnknownApiKey.as_str() {
                    let ttl_ms = self.config.tenant_cache_ttl_ms;
                    tenant_cache::put_unknown(host, ttl_ms, &routed.key_hash);
                }
                let e = control_plane_error(host, status, e);
                self.fail(host, e)
            }
        }
    }

    /// Once the tenant is known: the idempotency key (400), the route's rate (429), the key in
    /// flight on this worker (409); then the body, if it is complete. Over the rate, a request
    /// with the client's key waits for its body all the same: it may replay a stored request.
    fn admit(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        grant: Grant,
        body: Option<Vec<u8>>,
    ) -> Action {
        let idempotency_key = match &routed.idempotency_key {
            Ok(key) => key.clone(),
            Err(e) => return self.fail(host, (**e).clone()),
        };
        let over_rate = over_rate(host, &routed.route, &grant.tenant);
        if let (Some(error), false) = (&over_rate, routed.key_given) {
            return self.fail(host, error.clone());
        }
        let Some(in_flight) = InFlightKey::enter(&self.worker, &grant.tenant, &idempotency_key)
        else {
            return self.fail(
                host,
                ApiError::new(
                    409,
                    "IDEMPOTENCY_IN_FLIGHT",
                    "a request with this idempotency key is still being processed",
                ),
            );
        };
        let admitted = Admitted { grant, in_flight };
        match (body, over_rate) {
            (Some(body), None) => self.on_body(host, routed, admitted, body),
            (None, None) => self.wait(routed, Stage::AwaitingBody(admitted)),
            (Some(body), Some(error)) => {
                let fingerprint = routed.fingerprint(&body);
                self.refuse(host, routed, admitted, fingerprint, error)
            }
            (None, Some(error)) => {
                let error = Box::new(error);
                self.wait(routed, Stage::Refusing { admitted, error })
            }
        }
    }

    /// The complete body of an admitted request: parse, verify, sign on the head this worker
    /// knows, commit.
    fn on_body(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        admitted: Admitted,
        body: Vec<u8>,
    ) -> Action {
        let registry = &self.config.registry;
        let trace = routed.header_trace.as_deref();
        let mut request = match request::parse(&body, &routed.route, registry, trace) {
            Ok(request) => request,
            Err(e) => {
                let fingerprint = routed.fingerprint(&body);
                return self.refuse(host, routed, admitted, fingerprint, e);
            }
        };
        let fallback = admitted.grant.fallback_enabled;
        let config = self.config.clone();
        let verified =
            match verify_with(host, &config, &admitted.grant, &mut request, &[], fallback) {
                Ok(Verdict::Verified(verified)) => verified,
                Ok(Verdict::NeedsFallback(need)) => {
                    let repairing = Repairing {
                        admitted,
                        request,
                        need,
                        fixes: Vec::new(),
                        fu_tokens: 0,
                        calls: 0,
                    };
                    return self.ask_repair(host, routed, repairing);
                }
                Err(e) => {
                    let fingerprint = std::mem::take(&mut request.fingerprint);
                    return self.refuse(host, routed, admitted, fingerprint, e);
                }
            };
        self.on_verified(host, routed, admitted, request, verified)
    }

    /// Sends the repair callout for `repairing.need`.
    fn ask_repair(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        mut repairing: Repairing,
    ) -> Action {
        if repairing.calls >= llm::MAX_REPAIRS {
            let fingerprint = std::mem::take(&mut repairing.request.fingerprint);
            let error = repairing.need.error.clone();
            return self.refuse(host, routed, repairing.admitted, fingerprint, error);
        }
        let callout = llm::repair_callout(
            &self.config,
            &repairing.admitted.grant.tenant,
            repairing.admitted.in_flight.key(),
            &repairing.request.payload_type,
            &repairing.need,
        );
        match callout {
            Ok(callout) => {
                repairing.calls = repairing.calls.saturating_add(1);
                self.state = State::Open(routed, Stage::Repairing(Box::new(repairing)));
                Action::Call(callout)
            }
            Err(e) => self.fail(host, e),
        }
    }

    /// The repair's answer: with the fix, the payload is verified again (another broken text
    /// asks again); a refused repair is answered as the pipeline's refusals are.
    fn on_repair(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        response: CalloutResponse,
        mut repairing: Repairing,
    ) -> Action {
        match llm::on_repaired(host, response, &repairing.need) {
            Ok((fix, fu)) => {
                repairing.fixes.push(fix);
                repairing.fu_tokens = repairing.fu_tokens.saturating_add(fu);
            }
            Err(Refusal::Error(e)) => {
                let fingerprint = std::mem::take(&mut repairing.request.fingerprint);
                return self.refuse(host, routed, repairing.admitted, fingerprint, e);
            }
            Err(Refusal::Unavailable(why)) => {
                host.count(&stats::callout_failures(Call::Repair.name()));
                host.log(
                    LogLevel::Warn,
                    &format!("signet: control plane repair call failed: {why}"),
                );
                return self.unavailable(host, &routed.route);
            }
        }
        let Repairing {
            admitted,
            mut request,
            fixes,
            fu_tokens,
            calls,
            ..
        } = repairing;
        let config = self.config.clone();
        match verify_with(host, &config, &admitted.grant, &mut request, &fixes, true) {
            Ok(Verdict::Verified(mut verified)) => {
                verified.fallback_fu = Some(fu_tokens);
                self.on_verified(host, routed, admitted, request, verified)
            }
            Ok(Verdict::NeedsFallback(need)) => {
                let repairing = Repairing {
                    admitted,
                    request,
                    need,
                    fixes,
                    fu_tokens,
                    calls,
                };
                self.ask_repair(host, routed, repairing)
            }
            Err(e) => {
                let fingerprint = std::mem::take(&mut request.fingerprint);
                self.refuse(host, routed, admitted, fingerprint, e)
            }
        }
    }

    /// A verified request: signed on the head this worker knows, then committed. (A callout
    /// stage before signing, see `Stage`, returns `self.wait(routed, …)` with its callout here;
    /// its answer continues with the commit below.)
    fn on_verified(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        admitted: Admitted,
        request: Request,
        verified: Verified,
    ) -> Action {
        let head = request
            .trace_id
            .as_deref()
            .and_then(|t| self.known_head(&admitted.grant.tenant, t));
        let guessed = request.trace_id.is_some() && head.is_none();
        let retries = 1 + u8::from(guessed);
        if let Some(allowed) = &verified.forward {
            let ask = forward::Ask {
                tenant: &admitted.grant.tenant,
                idempotency_key: admitted.in_flight.key(),
                fingerprint: &request.fingerprint,
                verified: &verified,
                allowed,
                head: head.as_ref(),
                now_ms: host.now_millis(),
            };
            let call = match forward::ask(&self.config, &ask) {
                Ok(call) => call,
                Err(e) => return self.fail(host, e),
            };
            let forwarding = Forwarding {
                subject: Signable {
                    admitted,
                    request,
                    verified,
                    forwarded: None,
                },
                head,
                retries,
            };
            self.state = State::Open(routed, Stage::Forwarding(Box::new(forwarding)));
            return Action::Call(call);
        }
        let subject = Signable {
            admitted,
            request,
            verified,
            forwarded: None,
        };
        self.commit(host, routed, subject, head, retries)
    }

    /// An admitted request the pipeline refuses: with the client's own key, its stored answer
    /// is looked up before `error` is answered ([`Stage::CheckingReplay`]).
    fn refuse(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        admitted: Admitted,
        fingerprint: String,
        error: ApiError,
    ) -> Action {
        if !routed.key_given {
            return self.fail(host, error);
        }
        // the tenant as receipts (and so their idempotency records) name it
        let lookup = idempotency::Lookup {
            tenant: canonical::nfc(&admitted.grant.tenant),
            idempotency_key: admitted.in_flight.key().into(),
        };
        let Ok(body) = serde_json::to_vec(&lookup) else {
            return self.fail(host, error);
        };
        let lookup = callout(&self.config, Call::Idempotency, Some(body), Vec::new());
        let refused = Refused {
            _admitted: admitted,
            fingerprint,
            error,
        };
        self.state = State::Open(routed, Stage::CheckingReplay(Box::new(refused)));
        Action::Call(lookup)
    }

    /// The key's stored answer: the same request replays it; another request is 422
    /// `IDEMPOTENCY_KEY_REUSED`; no stored answer (or none to be had) leaves the refusal.
    fn on_stored_answer(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        reply: Result<Reply, String>,
        refused: Refused,
    ) -> Action {
        let Refused {
            fingerprint, error, ..
        } = refused;
        let answer = match reply {
            Ok(Reply::Ok(bytes)) => Ok(bytes),
            // nothing stored for the key: the refusal stands
            Ok(Reply::Error(_, e)) if e.code == Code::IdempotencyKeyUnknown.as_str() => {
                return self.fail(host, error)
            }
            Ok(Reply::Error(status, e)) => Err(format!("refused: {status} {}", e.code)),
            Err(why) => Err(why),
        };
        let stored = answer.and_then(|bytes| {
            let stored = serde_json::from_slice::<idempotency::Stored>(&bytes);
            stored
                .map(|s| (s.fingerprint.into_owned(), s.response.get().to_owned()))
                .map_err(|e| format!("answer unreadable: {e}"))
        });
        let (stored_fingerprint, stored_response) = match stored {
            Ok(stored) => stored,
            Err(why) => {
                // no answer to be had: counted, and the refusal stands
                host.count(&stats::callout_failures(Call::Idempotency.name()));
                host.log(
                    LogLevel::Warn,
                    &format!("signet: control plane idempotency call failed: {why}"),
                );
                return self.fail(host, error);
            }
        };
        if stored_fingerprint != fingerprint {
            return self.fail(host, key_reused());
        }
        let response = serde_json::from_str::<Value>(&stored_response).unwrap_or_default();
        // an inline route forwards the payload again: the canonical form of the one stored
        let canon = response
            .get("normalized")
            .and_then(|n| canonical::to_canonical(n, Profile::Signet).ok());
        if routed.route.mode == Mode::Inline
            && routed.route.inline_body == InlineBody::Normalized
            && canon.is_none()
        {
            // the route keeps no payload: nothing to forward again, the refusal stands
            return self.fail(host, error);
        }
        let headers = receipt_headers(&response);
        let body = stored_response.into_bytes();
        self.deliver(host, &routed, canon, body, headers, true)
    }

    /// Signs the receipt on `head` and commits it.
    fn commit(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        subject: Signable,
        head: Option<Head>,
        retries: u8,
    ) -> Action {
        let signing = Subject {
            tenant: &subject.admitted.grant.tenant,
            idempotency_key: subject.admitted.in_flight.key(),
            request: &subject.request,
            verified: &subject.verified,
            forwarded: subject.forwarded.as_ref(),
        };
        match sign::sign(host, &self.config, &routed.route, &signing, head) {
            Ok((commit, signed)) => {
                let committing = Committing {
                    subject,
                    signed,
                    retries,
                };
                self.state = State::Open(routed, Stage::Committing(Box::new(committing)));
                Action::Commit(commit)
            }
            Err(e) => self.fail(host, e),
        }
    }

    fn on_commit(
        &mut self,
        host: &mut dyn Host,
        routed: Routed,
        reply: Reply,
        committing: Committing,
    ) -> Action {
        let body = match reply {
            Reply::Ok(body) => body,
            Reply::Error(_, ErrorReply { code, head, .. })
                if code == Code::ChainConflict.as_str() && committing.retries > 0 =>
            {
                // Another exchange extended the trace first (or the head was a guess): link
                // to the head commit reported. No head: the control plane has no such trace
                // although this worker remembers one (its storage rolled back, or the cache
                // is wrong): forget it and open the trace anew, at hop 1.
                host.log(
                    LogLevel::Debug,
                    "signet: chain conflict, re-signing on the head the control plane reported",
                );
                if head.is_none() {
                    let subject = &committing.subject;
                    let tenant = &subject.admitted.grant.tenant;
                    self.forget_head(tenant, &subject.verified.trace_id);
                }
                let retries = committing.retries.saturating_sub(1);
                return self.commit(host, routed, committing.subject, head, retries);
            }
            Reply::Error(status, e) => {
                let e = control_plane_error(host, status, e);
                return self.fail(host, e);
            }
        };
        let unreadable = |host: &mut dyn Host, why: &dyn std::fmt::Display| {
            host.count(&stats::callout_failures(Call::Commit.name()));
            host.log(
                LogLevel::Warn,
                &format!("signet: commit answer unreadable: {why}"),
            );
        };
        match serde_json::from_slice::<CommitReply>(&body) {
            Ok(CommitReply {
                outcome: Outcome::Committed,
                ..
            }) => {
                host.count(&stats::exchanges(routed.route.mode.as_str()));
                let Committing {
                    subject, signed, ..
                } = committing;
                let tenant = &subject.admitted.grant.tenant;
                self.remember_head(tenant, &subject.verified.trace_id, signed.head);
                let response = String::from(Box::<str>::from(signed.response)).into_bytes();
                let canon = Some(subject.verified.canon);
                self.deliver(host, &routed, canon, response, signed.headers, false)
            }
            Ok(CommitReply {
                outcome: Outcome::Replay,
                response: Some(stored),
            }) => {
                // the stored 200 body, verbatim
                let headers = serde_json::from_str::<Value>(stored.get())
                    .map(|v| receipt_headers(&v))
                    .unwrap_or_default();
                let response = stored.get().as_bytes().to_vec();
                let canon = Some(committing.subject.verified.canon);
                self.deliver(host, &routed, canon, response, headers, true)
            }
            Ok(CommitReply {
                outcome: Outcome::Replay,
                response: None,
            }) => {
                unreadable(host, &"a replay without its response");
                self.unavailable(host, &routed.route)
            }
            Err(e) => {
                unreadable(host, &e);
                self.unavailable(host, &routed.route)
            }
        }
    }

    /// Answers with a verified (or replayed) exchange's 200 body and its receipt headers; an
    /// inline route forwards `canon`, the normalized payload, when it forwards that.
    fn deliver(
        &mut self,
        host: &mut dyn Host,
        routed: &Routed,
        canon: Option<String>,
        body: Vec<u8>,
        mut headers: Vec<(String, String)>,
        replay: bool,
    ) -> Action {
        if replay {
            host.count(stats::IDEMPOTENT_HITS);
            headers.push((IDEMPOTENCY_HIT_HEADER.into(), "1".into()));
        }
        match routed.route.mode {
            // (a health route never gets here: it is answered at its headers)
            Mode::Exchange | Mode::Health => {
                headers.insert(0, ("content-type".into(), "application/json".into()));
                let response = Response {
                    status: 200,
                    headers,
                    body,
                };
                self.finish(host, Action::Respond(response), Vec::new())
            }
            Mode::Inline => {
                // a replay forwards the same canonical payload: it is deterministic
                let body = match routed.route.inline_body {
                    InlineBody::Original => None,
                    InlineBody::Normalized => canon.map(String::into_bytes),
                };
                let response_headers = headers.clone();
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
                let forward = Forward {
                    set_headers,
                    remove_headers,
                    body,
                };
                self.finish(host, Action::Continue(forward), response_headers)
            }
        }
    }

    // ---- the worker's memory -----------------------------------------------------------------

    /// The head this worker committed last on the tenant's trace, if any.
    fn known_head(&self, tenant: &str, trace_id: &str) -> Option<Head> {
        let worker = self.worker.try_borrow().ok()?;
        worker.heads.get(tenant, trace_id)
    }

    /// The committed receipt is its trace's head now: the next hop through this worker links
    /// to it without asking.
    fn remember_head(&self, tenant: &str, trace_id: &str, head: Head) {
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            w.heads.put(tenant, trace_id, head);
        }
    }

    /// The control plane has no such trace: the head this worker remembers is not one.
    fn forget_head(&self, tenant: &str, trace_id: &str) {
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            w.heads.remove(tenant, trace_id);
        }
    }

    // ---- waiting and endings -----------------------------------------------------------------

    /// The open exchange, taken out of `self` for a step to move on (the step puts it back with
    /// [`Exchange::wait`] or ends it); `None` before the headers and after the answer.
    fn take_open(&mut self) -> Option<(Routed, Stage)> {
        match std::mem::replace(&mut self.state, State::Done(Vec::new())) {
            State::Open(routed, stage) => Some((routed, stage)),
            other => {
                self.state = other;
                None
            }
        }
    }

    fn wait(&mut self, routed: Routed, stage: Stage) -> Action {
        self.state = State::Open(routed, stage);
        Action::Pause
    }

    fn fail(&mut self, host: &mut dyn Host, error: ApiError) -> Action {
        host.count(&stats::errors(&error.code));
        host.log(LogLevel::Debug, &format!("signet: {error}"));
        let response = Response {
            status: error.status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: error.to_json().into_bytes(),
        };
        self.finish(host, Action::Respond(response), Vec::new())
    }

    /// The control plane cannot be used: 503, or on a fail-open route, the request continues
    /// as it came (no receipt, nothing counted), only without the API key headers (as on every
    /// path) and receipt headers a client may have forged: the upstream must never see receipt
    /// headers on a request that has no receipt.
    fn unavailable(&mut self, host: &mut dyn Host, route: &RouteSettings) -> Action {
        if route.fail_open {
            host.log(
                LogLevel::Warn,
                "signet: control plane unavailable, failing open",
            );
            // the tenant's API key is a credential for Signet, never for the upstream
            let forward = Forward {
                remove_headers: API_KEY_HEADERS
                    .into_iter()
                    .chain(FORGEABLE_HEADERS)
                    .collect(),
                ..Forward::default()
            };
            return self.finish(host, Action::Continue(forward), Vec::new());
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

    /// Ends the exchange (it was open or new): what it held, such as its in-flight key, is
    /// dropped with its stage.
    fn finish(
        &mut self,
        host: &mut dyn Host,
        action: Action,
        response_headers: Vec<(String, String)>,
    ) -> Action {
        self.state = State::Done(response_headers);
        let elapsed = host.now_millis().saturating_sub(self.started_ms);
        host.record(stats::EXCHANGE_LATENCY_MS, elapsed);
        action
    }
}

/// 413 when `size` exceeds the route's body limit.
fn over_limit(route: &RouteSettings, size: u64) -> Option<ApiError> {
    let limit = route.body_limit;
    (size > u64::try_from(limit).unwrap_or(u64::MAX)).then(|| {
        ApiError::new(
            413,
            "BODY_TOO_LARGE",
            format!("request body exceeds {limit} bytes"),
        )
    })
}

/// 429 when the tenant has spent this second's budget on the route (before any callout).
fn over_rate(host: &mut dyn Host, route: &RouteSettings, tenant: &str) -> Option<ApiError> {
    let per_second = route.tenant_requests_per_second?;
    (!rate_limit::admit(host, &route.name, tenant, per_second)).then(|| {
        ApiError::new(
            429,
            "RATE_LIMITED",
            format!(
                "tenant {tenant} exceeded {per_second} requests per second on route {}",
                route.name
            ),
        )
    })
}

/// What the request headers say, each read as bytes and validated.
struct ReadHeaders {
    key_hash: String,
    idempotency_key: Result<String, Box<ApiError>>,
    key_given: bool,
    header_trace: Option<String>,
    declared_length: Option<u64>,
}

/// The credential, idempotency and trace headers (each at most once, aliases agreeing: 400
/// `DUPLICATE_HEADER`), the API key (401 `MISSING_API_KEY`, `INVALID_API_KEY` unless visible
/// ASCII), the trace (400 `BAD_TRACE_ID`), the content encoding (415 unless identity: the body
/// is signed as it came, so it must be the payload), the declared length (as u64: 2^32 and more
/// are lengths too). The idempotency key's own errors wait for the tenant.
fn read_headers(
    host: &mut dyn Host,
    headers: &Headers,
    mode: Mode,
) -> Result<ReadHeaders, ApiError> {
    let api_key = headers.aliased(&API_KEY_HEADERS)?;
    let idempotency_key = headers.aliased(&IDEMPOTENCY_KEY_HEADERS)?;
    let header_trace = headers.single(TRACE_HEADER)?;
    let Some(api_key) = api_key else {
        return Err(ApiError::new(
            401,
            "MISSING_API_KEY",
            "X-SIGNET-API-Key is required",
        ));
    };
    let Some(api_key) = visible_ascii(api_key) else {
        return Err(ApiError::new(
            401,
            "INVALID_API_KEY",
            "X-SIGNET-API-Key must be visible ASCII",
        ));
    };
    let header_trace = match header_trace {
        None => None,
        Some(t) => match visible_ascii(t).filter(|t| trace::is_valid_trace_id(t)) {
            Some(t) => Some(t.to_owned()),
            None => return Err(bad_trace_id()),
        },
    };
    if headers
        .all("content-encoding")
        .any(|e| !e.is_empty() && !e.eq_ignore_ascii_case(b"identity"))
    {
        return Err(ApiError::new(
            415,
            "UNSUPPORTED_CONTENT_ENCODING",
            "the body is signed as it comes: send it without a content-encoding",
        ));
    }
    let declared_length = headers
        .single("content-length")
        .ok()
        .flatten()
        .and_then(|n| std::str::from_utf8(trim_ows(n)).ok()?.parse::<u64>().ok());
    let key_given = idempotency_key.is_some();
    let idempotency_key = match (idempotency_key, mode) {
        (Some(key), _) => visible_ascii(key)
            .filter(|k| k.len() <= MAX_IDEMPOTENCY_KEY_BYTES)
            .map(str::to_owned)
            .ok_or_else(|| {
                Box::new(ApiError::new(
                    400,
                    "IDEMPOTENCY_KEY_INVALID",
                    format!(
                        "X-SIGNET-Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} \
                         visible ASCII characters"
                    ),
                ))
            }),
        (None, Mode::Exchange | Mode::Health) => Err(Box::new(ApiError::new(
            400,
            "MISSING_IDEMPOTENCY_KEY",
            "X-SIGNET-Idempotency-Key is required",
        ))),
        // inline callers are ordinary API clients: without a key every request is new
        (None, Mode::Inline) => Ok(format!("auto-{}", host.random_hex(16))),
    };
    Ok(ReadHeaders {
        key_hash: cid::sha256_hex(api_key.as_bytes()),
        idempotency_key,
        key_given,
        header_trace,
        declared_length,
    })
}

/// A key stored for another request (SPEC §4), as the control plane's commit answers it.
fn key_reused() -> ApiError {
    ApiError::new(
        Code::IdempotencyKeyReused.status(),
        Code::IdempotencyKeyReused.as_str(),
        "the idempotency key was used for a different request",
    )
}

/// The control plane's answer for a key no tenant has (here from the cache).
fn unknown_api_key() -> ApiError {
    ApiError::new(401, Code::UnknownApiKey.as_str(), "unknown API key")
}
