//! Tenants and their reserved capacity (SPEC §6): parsed from `SP_API_KEYS` and
//! `SP_RESERVED_CONFIG`, replaced as a whole by an admin reload.
//!
//! API keys are hashed as soon as they are read; only the hashes are kept.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;
use signet_protocol::internal::Grant;

use crate::billing::{BillingPlan, MeterPlan, Tier};

/// Lowercase hex SHA-256 of the key's UTF-8 bytes (ARCHITECTURE.md, internal API).
pub fn api_key_hash(api_key: &str) -> String {
    signet_protocol::cid::sha256_hex(api_key.as_bytes())
}

/// All tenants: the lookup by API-key hash (the filter) and by name (billing).
#[derive(Debug, Default)]
pub struct TenantDirectory {
    /// What each key grants, as the filter receives it; its allowlist is the key's own followed
    /// by the global `SP_HEL_ALLOWLIST`.
    grants: HashMap<String, Arc<Grant>>,
    plans: HashMap<String, Arc<BillingPlan>>,
    /// The LLM fallback of each tenant: on when any of its keys enables it.
    fallbacks: HashMap<String, FallbackGrant>,
    /// `stripe_customer` of each tenant that has one: whom its meter events bill.
    customers: HashMap<String, String>,
}

/// What the LLM fallback may do for a tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FallbackGrant {
    pub enabled: bool,
    /// `fu_monthly_limit`: FU a UTC calendar month may use; `None`: no limit.
    pub fu_monthly_limit: Option<u64>,
}

impl TenantDirectory {
    /// Builds the directory from the raw JSON of `SP_API_KEYS` and `SP_RESERVED_CONFIG` and the
    /// parsed global allowlist. Errors name the offending key or tenant, never the API key.
    pub fn parse(
        api_keys_json: &str,
        reserved_json: &str,
        global_allowlist: &[String],
    ) -> Result<Self, TenantConfigError> {
        // The code and offset only: a duplicate's name may be an API key.
        let strict = |json: &str| {
            crate::strict_json(json.as_bytes()).map_err(|e| {
                format!(
                    "not strict JSON: {} at byte {}",
                    e.code(),
                    e.offset().unwrap_or(0)
                )
            })
        };
        strict(api_keys_json).map_err(TenantConfigError::ApiKeys)?;
        strict(reserved_json).map_err(TenantConfigError::Reserved)?;
        let keys: BTreeMap<String, KeyEntry> =
            serde_json::from_str(api_keys_json).map_err(|e| {
                TenantConfigError::ApiKeys(format!("not the expected JSON object: {e}"))
            })?;
        let reserved: BTreeMap<String, ReservedEntry> = serde_json::from_str(reserved_json)
            .map_err(|e| {
                TenantConfigError::Reserved(format!("not the expected JSON object: {e}"))
            })?;

        let mut grants = HashMap::new();
        let mut fallbacks: HashMap<String, FallbackGrant> = HashMap::new();
        // Tenant-level settings must agree across all keys of a tenant.
        let mut items: HashMap<String, TenantItems> = HashMap::new();
        let mut customers: HashMap<String, Option<String>> = HashMap::new();
        for (n, (api_key, entry)) in keys.into_iter().enumerate() {
            let which = format!("entry #{} (tenant {:?})", n + 1, entry.tenant);
            if api_key.is_empty() {
                return Err(TenantConfigError::ApiKeys(format!(
                    "{which}: empty API key"
                )));
            }
            if entry.tenant.is_empty() {
                return Err(TenantConfigError::ApiKeys(format!("{which}: empty tenant")));
            }
            let mut allowlist = Vec::with_capacity(entry.allowlist.len() + global_allowlist.len());
            for pattern in &entry.allowlist {
                allowlist.push(
                    normalize_host_pattern(pattern)
                        .map_err(|p| TenantConfigError::ApiKeys(format!("{which}: {p}")))?,
                );
            }
            allowlist.extend(global_allowlist.iter().cloned());
            let tenant_items = (
                entry.stripe_item_vex.clone(),
                entry.stripe_item_fu.clone(),
                entry.fu_monthly_limit,
            );
            if let Some(existing) = items.get(&entry.tenant) {
                if *existing != tenant_items {
                    return Err(TenantConfigError::ApiKeys(format!(
                        "{which}: stripe_item_vex, stripe_item_fu and fu_monthly_limit must be the same for every key of a tenant"
                    )));
                }
            }
            items.insert(entry.tenant.clone(), tenant_items);
            let fallback = fallbacks.entry(entry.tenant.clone()).or_default();
            fallback.enabled |= entry.fallback_enabled;
            fallback.fu_monthly_limit = entry.fu_monthly_limit;
            if customers.get(&entry.tenant) != Some(&entry.stripe_customer) {
                if customers.contains_key(&entry.tenant) {
                    return Err(TenantConfigError::ApiKeys(format!(
                        "{which}: stripe_customer must be the same for every key of a tenant"
                    )));
                }
                customers.insert(entry.tenant.clone(), entry.stripe_customer.clone());
            }
            grants.insert(
                api_key_hash(&api_key),
                Arc::new(Grant {
                    tenant: entry.tenant,
                    allowlist,
                    fallback_enabled: entry.fallback_enabled,
                    fu_monthly_limit: entry.fu_monthly_limit,
                }),
            );
        }

        let mut plans = HashMap::new();
        for (tenant, entry) in reserved {
            let (vex_item, fu_item, _) = items.get(&tenant).cloned().unwrap_or_default();
            let which = |meter: &str| format!("tenant {tenant:?}, {meter}_overage_tiers");
            let plan = BillingPlan {
                vex: meter_plan(entry.vex_reserved, entry.vex_overage_tiers, vex_item)
                    .map_err(|p| TenantConfigError::Reserved(format!("{}: {p}", which("vex"))))?,
                fu: meter_plan(entry.fu_reserved, entry.fu_overage_tiers, fu_item)
                    .map_err(|p| TenantConfigError::Reserved(format!("{}: {p}", which("fu"))))?,
            };
            plans.insert(tenant, Arc::new(plan));
        }
        // Tenants without reserved capacity bill every unit to their Stripe items.
        for (tenant, (vex_item, fu_item, _)) in items {
            plans.entry(tenant).or_insert_with(|| {
                Arc::new(BillingPlan {
                    vex: MeterPlan {
                        default_stripe_item: vex_item,
                        ..MeterPlan::default()
                    },
                    fu: MeterPlan {
                        default_stripe_item: fu_item,
                        ..MeterPlan::default()
                    },
                })
            });
        }
        let customers = customers
            .into_iter()
            .filter_map(|(tenant, customer)| Some((tenant, customer?)))
            .collect();
        Ok(Self {
            grants,
            plans,
            fallbacks,
            customers,
        })
    }

    /// The HEL allowlist of `tenant`: every entry of any of its keys (each with the global
    /// allowlist); `None` for a tenant no key has.
    pub fn allowlist_of_tenant(&self, tenant: &str) -> Option<Vec<String>> {
        let mut grants = self
            .grants
            .values()
            .filter(|g| g.tenant == tenant)
            .peekable();
        grants.peek()?;
        let mut allowlist: Vec<String> = grants.flat_map(|g| g.allowlist.iter().cloned()).collect();
        allowlist.sort();
        allowlist.dedup();
        Some(allowlist)
    }

    /// The tenant's `stripe_customer`, if it has one.
    pub fn stripe_customer(&self, tenant: &str) -> Option<&str> {
        self.customers.get(tenant).map(String::as_str)
    }

    /// Every tenant with its billing plan, in no particular order.
    pub fn plans(&self) -> impl Iterator<Item = (&str, &BillingPlan)> {
        self.plans.iter().map(|(t, p)| (t.as_str(), p.as_ref()))
    }

    pub fn grant_for_key_hash(&self, key_hash: &str) -> Option<Arc<Grant>> {
        self.grants.get(&key_hash.to_ascii_lowercase()).cloned()
    }

    /// The billing plan of a tenant known by any key or by its reserved capacity.
    pub fn plan(&self, tenant: &str) -> Option<Arc<BillingPlan>> {
        self.plans.get(tenant).cloned()
    }

    /// The LLM fallback of a tenant known by a key.
    pub fn fallback(&self, tenant: &str) -> Option<FallbackGrant> {
        self.fallbacks.get(tenant).copied()
    }

    pub fn key_count(&self) -> usize {
        self.grants.len()
    }

    pub fn tenant_count(&self) -> usize {
        self.plans.len()
    }
}

/// `stripe_item_vex`, `stripe_item_fu` and `fu_monthly_limit`: per tenant, not per key.
type TenantItems = (Option<String>, Option<String>, Option<u64>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantConfigError {
    ApiKeys(String),
    Reserved(String),
}

impl std::fmt::Display for TenantConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TenantConfigError::ApiKeys(p) => write!(f, "SP_API_KEYS: {p}"),
            TenantConfigError::Reserved(p) => write!(f, "SP_RESERVED_CONFIG: {p}"),
        }
    }
}

impl std::error::Error for TenantConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    tenant: String,
    #[serde(default)]
    allowlist: Vec<String>,
    #[serde(default)]
    fallback_enabled: bool,
    #[serde(default)]
    fu_monthly_limit: Option<u64>,
    #[serde(default)]
    stripe_item_vex: Option<String>,
    #[serde(default)]
    stripe_item_fu: Option<String>,
    /// The Stripe customer (`cus_…`) the tenant's meter events bill.
    #[serde(default)]
    stripe_customer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReservedEntry {
    #[serde(default)]
    vex_reserved: u64,
    #[serde(default)]
    fu_reserved: u64,
    #[serde(default)]
    vex_overage_tiers: Vec<TierEntry>,
    #[serde(default)]
    fu_overage_tiers: Vec<TierEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierEntry {
    threshold: u64,
    /// A JSON number or a decimal string; read as a decimal, never as binary floating point.
    price_per_unit: Value,
    #[serde(default)]
    stripe_item: Option<String>,
}

fn meter_plan(
    reserved: u64,
    entries: Vec<TierEntry>,
    default_stripe_item: Option<String>,
) -> Result<MeterPlan, String> {
    let mut tiers = entries
        .into_iter()
        .map(|t| {
            Ok(Tier {
                threshold: t.threshold,
                price_per_unit: parse_price(&t.price_per_unit)?,
                stripe_item: t.stripe_item,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    tiers.sort_by_key(|t| t.threshold);
    if let Some(w) = tiers.windows(2).find(|w| w[0].threshold == w[1].threshold) {
        return Err(format!("two tiers with threshold {}", w[0].threshold));
    }
    Ok(MeterPlan {
        reserved,
        tiers,
        default_stripe_item,
    })
}

/// A price as written: `0.0025`, `"0.0025"` or `1e-7`. The JSON number's shortest decimal
/// form (what serde_json prints) is parsed as a decimal, so `0.1` is exactly one tenth.
fn parse_price(value: &Value) -> Result<Decimal, String> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => {
            return Err(format!(
                "price_per_unit must be a number or a decimal string, not {other}"
            ))
        }
    };
    let price = Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| format!("price_per_unit {text:?} is not a decimal number"))?;
    if price.is_sign_negative() {
        return Err(format!("price_per_unit {text} is negative"));
    }
    if price > crate::billing::MAX_PRICE_PER_UNIT {
        return Err(format!(
            "price_per_unit {text} is above {} (so that no amount can overflow)",
            crate::billing::MAX_PRICE_PER_UNIT
        ));
    }
    Ok(price.normalize())
}

/// An allowlist entry: a host (`api.example.com`) or a subdomain wildcard (`*.example.com`),
/// lowercased, trailing dot removed. IDNA mapping is the filter's job (SPEC §5).
pub fn normalize_host_pattern(pattern: &str) -> Result<String, String> {
    let p = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = p.strip_prefix("*.").unwrap_or(&p);
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    // no `_`: the filter matches hosts after strict UTS 46, which refuses it,
                    // so such an entry could never match
                    .all(|c| c.is_alphanumeric() || c == '-')
        });
    if valid {
        Ok(p)
    } else {
        Err(format!(
            "allowlist entry {pattern:?} is not a host name or *.host pattern"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kept_as_hashes_with_the_global_allowlist_appended() {
        let dir = TenantDirectory::parse(
            r#"{"demo-key":{"tenant":"demo","allowlist":["*.Example.com."],"fallback_enabled":true}}"#,
            "{}",
            &["api.partner.org".to_string()],
        )
        .unwrap();
        assert!(dir.grant_for_key_hash("demo-key").is_none());
        let grant = dir.grant_for_key_hash(&api_key_hash("demo-key")).unwrap();
        assert_eq!(grant.tenant, "demo");
        assert_eq!(grant.allowlist, vec!["*.example.com", "api.partner.org"]);
        assert!(grant.fallback_enabled);
        assert_eq!(grant.fu_monthly_limit, None);
    }

    #[test]
    fn reserved_config_prices_are_exact_decimals_and_tiers_sorted() {
        let dir = TenantDirectory::parse(
            r#"{"k":{"tenant":"acme","stripe_item_fu":"si_fu"}}"#,
            r#"{"acme":{"fu_reserved":1000,"fu_overage_tiers":[
                {"threshold":500,"price_per_unit":"0.0001"},
                {"threshold":100,"price_per_unit":0.1,"stripe_item":"si_t"}]}}"#,
            &[],
        )
        .unwrap();
        let plan = dir.plan("acme").unwrap();
        assert_eq!(plan.fu.reserved, 1000);
        assert_eq!(plan.fu.tiers[0].threshold, 100);
        assert_eq!(plan.fu.tiers[0].price_per_unit, Decimal::new(1, 1));
        assert_eq!(plan.fu.tiers[1].price_per_unit, Decimal::new(1, 4));
        assert_eq!(plan.fu.default_stripe_item.as_deref(), Some("si_fu"));
    }

    #[test]
    fn invalid_configuration_is_rejected_with_the_variable_named() {
        let bad = [
            (r#"{"k":{"allowlist":[]}}"#, "{}", "SP_API_KEYS"),
            (
                r#"{"k":{"tenant":"t","allowlist":["http://x"]}}"#,
                "{}",
                "SP_API_KEYS",
            ),
            (r#"{"k":{"tenant":"t","tenatn":"x"}}"#, "{}", "SP_API_KEYS"),
            (
                r#"{"a":{"tenant":"t","stripe_item_vex":"x"},"b":{"tenant":"t"}}"#,
                "{}",
                "SP_API_KEYS",
            ),
            (
                "{}",
                r#"{"t":{"vex_overage_tiers":[{"threshold":1,"price_per_unit":-1}]}}"#,
                "SP_RESERVED_CONFIG",
            ),
            (
                "{}",
                r#"{"t":{"vex_overage_tiers":[{"threshold":1,"price_per_unit":"x"}]}}"#,
                "SP_RESERVED_CONFIG",
            ),
            (
                "{}",
                r#"{"t":{"vex_overage_tiers":[{"threshold":1,"price_per_unit":"1000000000.01"}]}}"#,
                "SP_RESERVED_CONFIG",
            ),
            // serde_json would keep the second entry of a duplicated key
            (
                r#"{"secret-key":{"tenant":"a"},"secret-key":{"tenant":"b"}}"#,
                "{}",
                "SP_API_KEYS",
            ),
            (
                "{}",
                r#"{"t":{"vex_reserved":1,"vex_reserved":2}}"#,
                "SP_RESERVED_CONFIG",
            ),
            (
                "{}",
                r#"{"t":{"vex_overage_tiers":[{"threshold":1,"price_per_unit":1},{"threshold":1,"price_per_unit":2}]}}"#,
                "SP_RESERVED_CONFIG",
            ),
        ];
        for (keys, reserved, var) in bad {
            let err = TenantDirectory::parse(keys, reserved, &[]).unwrap_err();
            assert!(err.to_string().starts_with(var), "{keys} {reserved}: {err}");
            assert!(
                !err.to_string().contains("\"a\"") && !err.to_string().contains("secret-key"),
                "API keys never appear in errors"
            );
        }
    }
}
