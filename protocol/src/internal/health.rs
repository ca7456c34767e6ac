//! Health, as the control plane reports it: its public `/healthz` and `GET /v1/internal/health`
//! answer the same [`Health`]. The filter asks the internal one over its own cluster and with
//! its own token, so `/healthz` through Envoy says whether exchanges can reach the control plane
//! at all, not only whether the control plane is up.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub const PATH: &str = "/v1/internal/health";

/// `{"status":"ok"|"unavailable","storage","database","reason"?}`: 200 when ok, else 503.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health<'a> {
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    /// `sqlite` or `postgres`.
    #[serde(borrow)]
    pub storage: Cow<'a, str>,
    /// `reachable` or `unreachable`.
    #[serde(borrow)]
    pub database: Cow<'a, str>,
    /// Why it is unavailable (a storage worker that died, the database's error).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'a, str>>,
}

impl Health<'_> {
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reads_what_it_writes() {
        let ok = Health {
            status: "ok".into(),
            storage: "sqlite".into(),
            database: "reachable".into(),
            reason: None,
        };
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(
            text,
            r#"{"status":"ok","storage":"sqlite","database":"reachable"}"#
        );
        assert_eq!(serde_json::from_str::<Health>(&text).unwrap(), ok);
        let down: Health = serde_json::from_str(
            r#"{"status":"unavailable","storage":"postgres","database":"unreachable","reason":"x"}"#,
        )
        .unwrap();
        assert!(!down.is_ok());
        assert_eq!(down.reason.as_deref(), Some("x"));
    }
}
