//! A control-plane answer, classified: a 2xx body, an [`ErrorReply`], or no usable answer.

use signet_protocol::internal::{Code, ErrorReply};
use signet_protocol::ApiError;

use super::actions::CalloutResponse;
use crate::host::{Host, LogLevel};

pub enum Reply {
    Ok(Vec<u8>),
    /// A 4xx with the SPEC §4 error body.
    Error(u16, ErrorReply),
}

/// The answer, or why the control plane cannot be used (no answer, a 5xx, a 4xx without an
/// error body).
pub fn classify(response: CalloutResponse) -> Result<Reply, String> {
    let Some(status) = response.status else {
        return Err("no response (connection failure or reset)".into());
    };
    match status {
        200..=299 => Ok(Reply::Ok(response.body)),
        // the commit reached the control plane (or left this worker's queue) past its deadline:
        // nothing was stored, like a timeout
        504 if is_expired(&response.body) => {
            Err("the commit missed its deadline (COMMIT_EXPIRED); nothing was stored".into())
        }
        400..=499 => match serde_json::from_slice::<ErrorReply>(&response.body) {
            Ok(e) => Ok(Reply::Error(status, e)),
            Err(_) => Err(format!("status {status} without an error body")),
        },
        _ => Err(format!("status {status}")),
    }
}

/// The client's answer to a control-plane error: as it came, unless it blames the filter (its
/// token, key or request shape), which is a 500, a deployment error.
pub fn control_plane_error(host: &mut dyn Host, status: u16, reply: ErrorReply) -> ApiError {
    let error = ApiError::new(status, reply.code, reply.detail);
    if !Code::parse(&error.code).is_some_and(Code::blames_filter) {
        return error;
    }
    host.log(
        LogLevel::Error,
        &format!("signet: control plane rejected the filter: {error}"),
    );
    ApiError::new(500, error.code, "the Signet filter is misconfigured")
}

fn is_expired(body: &[u8]) -> bool {
    serde_json::from_slice::<ErrorReply>(body).is_ok_and(|e| e.code == Code::CommitExpired.as_str())
}

/// The answer of a commit whose deadline passed before it left this worker's queue.
pub fn expired_commit() -> CalloutResponse {
    let reply = ErrorReply::new(
        Code::CommitExpired,
        "the commit's deadline passed while it waited for a batch",
    );
    CalloutResponse {
        status: Some(Code::CommitExpired.status()),
        body: reply.to_json().into_bytes(),
    }
}
