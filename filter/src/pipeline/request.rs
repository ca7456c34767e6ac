//! The request body, parsed: the exchange envelope
//! `{"payload_type","target_type","payload","trace_id"?,"forward_url"?}`, or on an inline route
//! the payload itself (its types come from the route, its trace from `X-SIGNET-Trace`).

use serde_json::Value;
use signet_protocol::internal::idempotency;
use signet_protocol::{canonical, trace, ApiError};

use crate::registry::{parse_options, Registry};
use crate::route::RouteSettings;

pub struct Request {
    pub payload_type: String,
    pub target_type: String,
    pub payload: Value,
    pub trace_id: Option<String>,
    pub forward_url: Option<String>,
    /// What makes the request distinct for its idempotency key (SPEC §4): the body and the
    /// `X-SIGNET-Trace` header ([`idempotency::fingerprint`]).
    pub fingerprint: String,
}

pub fn parse(
    body: &[u8],
    route: &RouteSettings,
    registry: &Registry,
    header_trace: Option<&str>,
) -> Result<Request, ApiError> {
    let value = canonical::parse(body, &parse_options()).map_err(|e| ApiError::from(&e))?;
    let fingerprint = idempotency::fingerprint(body, header_trace);
    let header_trace = header_trace.map(str::to_owned);
    if let Some((payload_type, target_type)) = &route.inline_types {
        return Ok(Request {
            payload_type: payload_type.clone(),
            target_type: target_type.clone(),
            payload: value,
            trace_id: header_trace,
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
        trace_id: trace_id.or(header_trace),
        forward_url,
        fingerprint,
    })
}

fn invalid_request(detail: &str) -> ApiError {
    ApiError::new(422, "INVALID_REQUEST", detail)
}

pub fn bad_trace_id() -> ApiError {
    ApiError::new(
        400,
        "BAD_TRACE_ID",
        "trace_id must be 1 to 128 characters of [A-Za-z0-9._:-]",
    )
}
