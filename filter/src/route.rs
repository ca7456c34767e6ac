//! Per-route settings: `filter_metadata.signet` of the route over the plugin's `route_defaults`.
//! Parsed on a route's first request and cached per route name; the cache entry is reused while
//! the route's metadata bytes are unchanged, so an RDS update is picked up without a reload.

use std::collections::HashMap;
use std::rc::Rc;

use serde::Deserialize;

use crate::protobuf;
use crate::registry::Registry;

/// Name of the metadata namespace and of the filter in docs/config.md.
pub const METADATA_NAMESPACE: &str = "signet";

pub const DEFAULT_BODY_LIMIT: u64 = 1024 * 1024;
pub const MAX_BODY_LIMIT: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `POST /v1/exchange`, answered by the filter.
    Exchange,
    /// The route's body is the payload; it goes on upstream with receipt headers.
    Inline,
    /// `/healthz` through Envoy: answered by the filter with the control plane's health as the
    /// filter reaches it (`pipeline::health`).
    Health,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exchange => "exchange",
            Mode::Inline => "inline",
            Mode::Health => "health",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InlineBody {
    Normalized,
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptCanon {
    Keep,
    Drop,
}

/// Route settings as written (every field optional: route over defaults over built-ins).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteSettings {
    pub mode: Option<Mode>,
    pub payload_type: Option<String>,
    pub target_type: Option<String>,
    pub inline_body: Option<InlineBody>,
    pub body_limit_bytes: Option<u64>,
    pub fail_open: Option<bool>,
    pub receipt_canon: Option<ReceiptCanon>,
    pub tenant_requests_per_second: Option<u32>,
}

impl RawRouteSettings {
    /// `self` with every field that `over` sets replaced.
    fn overlaid(&self, over: &RawRouteSettings) -> RawRouteSettings {
        RawRouteSettings {
            mode: over.mode.or(self.mode),
            payload_type: over
                .payload_type
                .clone()
                .or_else(|| self.payload_type.clone()),
            target_type: over
                .target_type
                .clone()
                .or_else(|| self.target_type.clone()),
            inline_body: over.inline_body.or(self.inline_body),
            body_limit_bytes: over.body_limit_bytes.or(self.body_limit_bytes),
            fail_open: over.fail_open.or(self.fail_open),
            receipt_canon: over.receipt_canon.or(self.receipt_canon),
            tenant_requests_per_second: over
                .tenant_requests_per_second
                .or(self.tenant_requests_per_second),
        }
    }
}

/// Validated settings of one route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    pub name: String,
    pub mode: Mode,
    /// Inline mode: the declared payload and target types (checked against the registry).
    pub inline_types: Option<(String, String)>,
    pub inline_body: InlineBody,
    pub body_limit: usize,
    pub fail_open: bool,
    pub keep_canon: bool,
    /// Requests per second a tenant may make on this route (per Envoy instance); `None`: no limit.
    pub tenant_requests_per_second: Option<u32>,
}

impl RouteSettings {
    /// Validates `defaults` overlaid with `route`; errors name the field.
    pub fn compile(
        name: &str,
        defaults: &RawRouteSettings,
        route: &RawRouteSettings,
        registry: &Registry,
    ) -> Result<Self, String> {
        let raw = defaults.overlaid(route);
        let mode = raw.mode.unwrap_or(Mode::Exchange);
        let body_limit = raw.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT);
        if !(1..=MAX_BODY_LIMIT).contains(&body_limit) {
            return Err(format!(
                "body_limit_bytes: {body_limit} is outside 1..={MAX_BODY_LIMIT}"
            ));
        }
        let inline_types = match (mode, raw.payload_type) {
            (Mode::Inline, None) => return Err("payload_type: required in inline mode".into()),
            (Mode::Inline, Some(payload)) => {
                let target = raw.target_type.unwrap_or_else(|| payload.clone());
                for (field, ty) in [("payload_type", &payload), ("target_type", &target)] {
                    if !registry.has_type(ty) {
                        return Err(format!("{field}: unknown type {ty:?}"));
                    }
                }
                if !registry.can_map(&payload, &target) {
                    return Err(format!(
                        "target_type: no mapping from {payload} to {target}"
                    ));
                }
                Some((payload, target))
            }
            (Mode::Exchange | Mode::Health, _) => None,
        };
        if raw.tenant_requests_per_second == Some(0) {
            return Err(
                "tenant_requests_per_second: must be at least 1 (omit it for no limit)".into(),
            );
        }
        Ok(Self {
            name: name.to_owned(),
            mode,
            inline_types,
            inline_body: raw.inline_body.unwrap_or(InlineBody::Normalized),
            body_limit: usize::try_from(body_limit).map_err(|_| "body_limit_bytes: too large")?,
            fail_open: raw.fail_open.unwrap_or(false),
            keep_canon: raw.receipt_canon.unwrap_or(ReceiptCanon::Keep) == ReceiptCanon::Keep,
            tenant_requests_per_second: raw.tenant_requests_per_second,
        })
    }

    /// From the serialized `envoy.config.core.v3.Metadata` of the route.
    pub fn from_metadata(
        name: &str,
        metadata: &[u8],
        defaults: &RawRouteSettings,
        registry: &Registry,
    ) -> Result<Self, String> {
        let raw = match protobuf::filter_metadata(metadata, METADATA_NAMESPACE)? {
            Some(value) => serde_path_to_error::deserialize(value)
                .map_err(|e| format!("{}: {}", e.path(), e.inner()))?,
            None => RawRouteSettings::default(),
        };
        Self::compile(name, defaults, &raw, registry)
    }
}

/// A route's settings, or why its metadata is invalid; shared by the requests of the route.
pub type CachedRoute = Result<Rc<RouteSettings>, Rc<str>>;

/// Parsed settings per route name, with the metadata bytes they came from.
#[derive(Default)]
pub struct RouteCache {
    entries: HashMap<String, (Vec<u8>, CachedRoute)>,
}

impl RouteCache {
    pub fn get_or_parse(
        &mut self,
        name: &str,
        metadata: &[u8],
        parse: impl FnOnce() -> Result<RouteSettings, String>,
    ) -> CachedRoute {
        if let Some((bytes, settings)) = self.entries.get(name) {
            if bytes.as_slice() == metadata {
                return settings.clone();
            }
        }
        let settings: CachedRoute = parse().map(Rc::new).map_err(Rc::from);
        self.entries
            .insert(name.to_owned(), (metadata.to_vec(), settings.clone()));
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protobuf::tests::metadata;
    use crate::registry::RawRegistry;
    use serde_json::json;

    fn registry() -> Registry {
        Registry::compile(&RawRegistry::builtin().unwrap()).unwrap()
    }

    #[test]
    fn defaults_then_route_override() {
        let r = registry();
        let defaults = RawRouteSettings {
            body_limit_bytes: Some(1000),
            fail_open: Some(true),
            ..Default::default()
        };
        let bytes = metadata(&[(
            "signet",
            json!({"mode":"inline","payload_type":"openai.tooluse.invoice.v1",
                   "target_type":"invoice.iso20022.v1","fail_open":false,"receipt_canon":"drop",
                   "inline_body":"original"}),
        )]);
        let s = RouteSettings::from_metadata("r1", &bytes, &defaults, &r).unwrap();
        assert_eq!(s.mode, Mode::Inline);
        assert_eq!(s.body_limit, 1000);
        assert!(!s.fail_open && !s.keep_canon);
        assert_eq!(s.inline_body, InlineBody::Original);
        assert_eq!(
            s.inline_types,
            Some((
                "openai.tooluse.invoice.v1".into(),
                "invoice.iso20022.v1".into()
            ))
        );
        let plain =
            RouteSettings::from_metadata("r2", &[], &RawRouteSettings::default(), &r).unwrap();
        assert_eq!(
            (
                plain.mode,
                plain.body_limit,
                plain.fail_open,
                plain.keep_canon
            ),
            (Mode::Exchange, 1024 * 1024, false, true)
        );
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let r = registry();
        let err = |v: serde_json::Value| {
            RouteSettings::from_metadata("r", &metadata(&[("signet", v)]), &Default::default(), &r)
                .unwrap_err()
        };
        assert!(err(json!({"mode":"inline"})).starts_with("payload_type:"));
        assert!(
            err(json!({"mode":"inline","payload_type":"x"})).starts_with("payload_type: unknown")
        );
        assert!(err(json!({"mode":"inline","payload_type":"invoice.iso20022.v1","target_type":"openai.tooluse.invoice.v1"}))
            .starts_with("target_type: no mapping"));
        assert!(err(json!({"mode":"proxy"})).starts_with("mode:"));
        assert!(err(json!({"body_limit_bytes":0})).starts_with("body_limit_bytes:"));
        assert!(
            err(json!({"tenant_requests_per_second":0})).starts_with("tenant_requests_per_second:")
        );
        assert!(err(json!({"fail_opn":true})).contains("fail_opn"));
    }

    #[test]
    fn cache_reuses_until_metadata_changes() {
        let mut cache = RouteCache::default();
        let mut parses = 0;
        let mut get = |bytes: &[u8], cache: &mut RouteCache| {
            cache.get_or_parse("r", bytes, || {
                parses += 1;
                Err(format!("parse {parses}"))
            })
        };
        let a = get(b"one", &mut cache);
        let b = get(b"one", &mut cache);
        assert!(Rc::ptr_eq(&a.unwrap_err(), &b.unwrap_err()));
        let c = get(b"two", &mut cache);
        assert_eq!(&*c.unwrap_err(), "parse 2");
    }
}
