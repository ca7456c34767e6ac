//! `/healthz` through Envoy (a route in `health` mode): the control plane's health as this
//! filter reaches it, over the cluster, listener and token its exchanges use. So a wrong token
//! or an unreachable internal listener shows here, which the control plane's own `/healthz`
//! cannot tell.

use serde_json::{json, Map, Value};
use signet_protocol::internal::health::Health;

use super::actions::{CalloutResponse, Response};

/// 200 `{"status":"ok","filter":{"control_plane":"reachable"},"control_plane":{…}}` when the
/// control plane answers that it is healthy; else 503 with `"status":"unavailable"` and what
/// the filter saw.
pub fn answer(response: CalloutResponse) -> Response {
    let (healthy, seen, control_plane) = match response.status {
        None => (false, "unreachable".to_owned(), None),
        Some(status) => match serde_json::from_slice::<Health>(&response.body) {
            Ok(health) => (
                status == 200 && health.is_ok(),
                "reachable".to_owned(),
                serde_json::to_value(&health).ok(),
            ),
            Err(_) if status == 401 => (false, "rejects the filter token".to_owned(), None),
            // Envoy's own answers: no connection to the cluster (503), or the callout timed
            // out (504)
            Err(_) if status == 503 || status == 504 => (false, "unreachable".to_owned(), None),
            Err(_) => (false, format!("answers {status}"), None),
        },
    };
    let mut filter = Map::new();
    filter.insert("control_plane".into(), Value::String(seen));
    if control_plane.is_none() && !response.body.is_empty() {
        let reason = excerpt(&response.body, MAX_REASON_BYTES);
        filter.insert("reason".into(), Value::String(reason));
    }
    let mut body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "filter": filter,
    });
    if let (Some(cp), Value::Object(map)) = (control_plane, &mut body) {
        map.insert("control_plane".into(), cp);
    }
    Response {
        status: if healthy { 200 } else { 503 },
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "no-store".into()),
        ],
        body: body.to_string().into_bytes(),
    }
}

/// Most of an answer that is not health that `/healthz` repeats.
const MAX_REASON_BYTES: usize = 200;

/// The first `max` bytes of `body` as text (lossy, cut at a character boundary).
fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let kept: String = text
        .char_indices()
        .take_while(|(at, c)| at.saturating_add(c.len_utf8()) <= max)
        .map(|(_, c)| c)
        .collect();
    kept.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: Option<u16>, body: &str) -> (u16, Value) {
        let r = answer(CalloutResponse {
            status,
            body: body.as_bytes().to_vec(),
        });
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn the_filters_view_of_the_control_plane() {
        let ok = r#"{"status":"ok","storage":"sqlite","database":"reachable"}"#;
        assert_eq!(
            answered(Some(200), ok),
            (
                200,
                json!({"status":"ok","filter":{"control_plane":"reachable"},
                       "control_plane":{"status":"ok","storage":"sqlite","database":"reachable"}})
            )
        );
        let down = r#"{"status":"unavailable","storage":"postgres","database":"unreachable","reason":"batcher panicked"}"#;
        let (status, body) = answered(Some(503), down);
        assert_eq!(status, 503);
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["control_plane"]["reason"], "batcher panicked");
        let token = r#"{"detail":"bad token","code":"FILTER_UNAUTHORIZED"}"#;
        assert_eq!(
            answered(Some(401), token).1["filter"]["control_plane"],
            "rejects the filter token"
        );
        assert_eq!(
            answered(None, "").1,
            json!({"status":"unavailable","filter":{"control_plane":"unreachable"}})
        );
        assert_eq!(
            answered(Some(404), "no").1["filter"]["control_plane"],
            "answers 404"
        );
        let refused = answered(Some(503), "upstream connect error or disconnect/reset");
        assert_eq!(refused.0, 503);
        assert_eq!(refused.1["filter"]["control_plane"], "unreachable");
        assert_eq!(
            refused.1["filter"]["reason"],
            "upstream connect error or disconnect/reset"
        );
        let long = "é".repeat(150);
        let cut = answered(Some(500), &long).1["filter"]["reason"].clone();
        assert_eq!(cut.as_str().map(str::len), Some(200));
    }
}
