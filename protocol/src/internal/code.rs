//! The error codes the control plane answers (SPEC §4 body `{"detail","code"}`), each with its
//! one status. The control plane builds its errors from these; the filter reads codes as text
//! (a newer control plane may send one it does not know) and classifies them with [`Code::parse`].

use serde::{Deserialize, Serialize, Serializer};

use super::decide::Head;

macro_rules! codes {
    ($($variant:ident = $status:literal $name:literal, $why:literal;)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $(#[doc = $why] $variant,)*
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];

            /// The UPPER_SNAKE name on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            pub fn status(self) -> u16 {
                match self { $(Code::$variant => $status,)* }
            }

            pub fn parse(name: &str) -> Option<Code> {
                match name { $($name => Some(Code::$variant),)* _ => None }
            }
        }
    };
}

codes! {
    BadRequest = 400 "BAD_REQUEST", "The body is not the JSON the endpoint expects.";
    BadTraceId = 400 "BAD_TRACE_ID", "A trace id that is not 1 to 128 of `[A-Za-z0-9._:-]`.";
    FingerprintInvalid = 400 "FINGERPRINT_INVALID", "A commit's fingerprint is not `sha256:` and 64 hex digits.";
    IdempotencyKeyInvalid = 400 "IDEMPOTENCY_KEY_INVALID", "A commit's idempotency key is empty or over 256 bytes.";
    ReceiptInvalid = 400 "RECEIPT_INVALID", "A committed receipt does not verify or is not the caller's.";
    ConfigInvalid = 400 "CONFIG_INVALID", "An admin reload whose configuration does not validate.";
    FilterUnauthorized = 401 "FILTER_UNAUTHORIZED", "An internal call without the right filter token.";
    MissingApiKey = 401 "MISSING_API_KEY", "No API key where one is required.";
    UnknownApiKey = 401 "UNKNOWN_API_KEY", "An API key no tenant has.";
    MissingAdminKey = 401 "MISSING_ADMIN_KEY", "No admin key on an admin endpoint.";
    UnknownAdminKey = 401 "UNKNOWN_ADMIN_KEY", "A wrong admin key (or none is configured).";
    UnknownTenant = 403 "UNKNOWN_TENANT", "A commit for a tenant that is not configured (e.g. after a reload).";
    HelBadUrl = 403 "HEL_BAD_URL", "A `forward_url` that is not an absolute URL with a host and without userinfo.";
    HelSchemeNotHttps = 403 "HEL_SCHEME_NOT_HTTPS", "A `forward_url` that is not `https`.";
    HelHostNotAllowed = 403 "HEL_HOST_NOT_ALLOWED", "A `forward_url` host in neither the tenant's nor the global allowlist.";
    HelResolvedLoopback = 403 "HEL_RESOLVED_LOOPBACK", "The `forward_url` host is or resolves to a loopback address.";
    HelResolvedPrivate = 403 "HEL_RESOLVED_PRIVATE", "The `forward_url` host is or resolves to a private-use, shared (CGNAT) or unique-local address.";
    HelResolvedLinkLocal = 403 "HEL_RESOLVED_LINKLOCAL", "The `forward_url` host is or resolves to a link-local address (cloud metadata among them).";
    HelResolvedReserved = 403 "HEL_RESOLVED_RESERVED", "The `forward_url` host is or resolves to another address that is not globally routable (IANA special-purpose registries).";
    HelNoResolution = 403 "HEL_NO_RESOLUTION", "The `forward_url` host has no address (NXDOMAIN or no A/AAAA records).";
    HelResolutionFailed = 403 "HEL_RESOLUTION_FAILED", "The `forward_url` host could not be resolved (DNS failure or timeout).";
    TraceForbidden = 403 "TRACE_FORBIDDEN", "The trace was opened by another tenant.";
    NotFound = 404 "NOT_FOUND", "No such endpoint.";
    TraceNotFound = 404 "TRACE_NOT_FOUND", "No such trace (or not the caller's).";
    ChainConflict = 409 "CHAIN_CONFLICT", "The receipt does not extend the trace's head; the answer names the head.";
    ChainFull = 409 "CHAIN_FULL", "The trace holds `SP_CHAIN_MAX` receipts.";
    IdempotencyKeyUnknown = 404 "IDEMPOTENCY_KEY_UNKNOWN", "No committed request has this idempotency key.";
    BodyTooLarge = 413 "BODY_TOO_LARGE", "A request body over the endpoint's limit.";
    IdempotencyKeyReused = 422 "IDEMPOTENCY_KEY_REUSED", "The idempotency key was used with another request.";
    FallbackDisabled = 403 "FALLBACK_DISABLED", "A fallback repair for a tenant without `fallback_enabled`.";
    FallbackInFlight = 409 "FALLBACK_IN_FLIGHT", "A fallback repair of this idempotency key is already running.";
    FallbackInvalid = 422 "FALLBACK_INVALID", "The provider answered, but not with usable JSON (malformed, truncated, too large); its tokens are metered.";
    FallbackRefused = 422 "FALLBACK_REFUSED", "The provider refused to repair the text; its tokens are metered.";
    FuQuotaExceeded = 429 "FU_QUOTA_EXCEEDED", "The repair's token estimate does not fit the tenant's `fu_monthly_limit`; no provider call was made.";
    FallbackProviderError = 502 "FALLBACK_PROVIDER_ERROR", "The provider answered with an error status (5xx, or a 4xx other than 429); nothing metered.";
    FallbackUnavailable = 503 "FALLBACK_UNAVAILABLE", "No provider is configured, or it is unreachable or rate limiting (429); nothing metered.";
    FallbackTimeout = 504 "FALLBACK_TIMEOUT", "The provider did not answer within `SP_OPENAI_TIMEOUT_MS`; nothing metered.";
    ExportFailed = 500 "EXPORT_FAILED", "The export bundle could not be built.";
    StorageUnavailable = 503 "STORAGE_UNAVAILABLE", "The database failed; nothing was stored.";
    CommitExpired = 504 "COMMIT_EXPIRED", "The commit arrived after its deadline; nothing was stored.";
}

impl Code {
    /// Codes that blame what the filter sent (its token, its signing key, its request shape),
    /// not the client: the filter answers them as a 500, a deployment error. (A trace id reaches
    /// a commit only after the filter checked it, so a bad one is the filter's fault too.)
    pub fn blames_filter(self) -> bool {
        matches!(
            self,
            Code::FilterUnauthorized
                | Code::ReceiptInvalid
                | Code::BadRequest
                | Code::FingerprintInvalid
                | Code::BadTraceId
        )
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An error answer of the control plane: the SPEC §4 body, plus the trace's `head` (null when
/// the trace does not exist) on a [`Code::ChainConflict`], and only there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorReply {
    pub detail: String,
    /// As text: the reader may not know every code.
    pub code: String,
    #[serde(default)]
    pub head: Option<Head>,
}

impl ErrorReply {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        ErrorReply {
            detail: detail.into(),
            code: code.as_str().to_owned(),
            head: None,
        }
    }

    /// The body of a chain conflict, naming the current head.
    pub fn conflict(detail: impl Into<String>, head: Option<Head>) -> Self {
        ErrorReply {
            head,
            ..ErrorReply::new(Code::ChainConflict, detail)
        }
    }

    pub fn to_json(&self) -> String {
        // Strings and integers only: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Serialize for ErrorReply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let conflict = self.code == Code::ChainConflict.as_str();
        let mut map = s.serialize_map(Some(2 + usize::from(conflict)))?;
        map.serialize_entry("detail", &self.detail)?;
        map.serialize_entry("code", &self.code)?;
        if conflict {
            map.serialize_entry("head", &self.head)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_upper_snake_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for &code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(code
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_'));
            assert_eq!(Code::parse(code.as_str()), Some(code));
            assert!((400..600).contains(&code.status()));
        }
        assert_eq!(Code::parse("TRACE_ID_INVALID"), None, "one rule, one code");
    }

    #[test]
    fn only_a_conflict_carries_a_head_and_it_is_null_for_no_trace() {
        let plain = ErrorReply::new(Code::ChainFull, "full");
        assert_eq!(plain.to_json(), r#"{"detail":"full","code":"CHAIN_FULL"}"#);
        let none = ErrorReply::conflict("c", None);
        assert_eq!(
            none.to_json(),
            r#"{"detail":"c","code":"CHAIN_CONFLICT","head":null}"#
        );
        let head = Head {
            hop: 3,
            receipt_hash: "sha256:ab".into(),
        };
        let some = ErrorReply::conflict("c", Some(head.clone()));
        assert_eq!(
            some.to_json(),
            r#"{"detail":"c","code":"CHAIN_CONFLICT","head":{"hop":3,"receipt_hash":"sha256:ab"}}"#
        );
        assert_eq!(
            serde_json::from_str::<ErrorReply>(&some.to_json()).unwrap(),
            some
        );
    }
}
