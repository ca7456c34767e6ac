//! The reporter's settings (`SP_STRIPE_*`, `SP_BILLING_*`) and the consistency of the tenants'
//! Stripe settings (`stripe_customer`, `stripe_item_vex`/`stripe_item_fu` in `SP_API_KEYS`,
//! each tier's `stripe_item` in `SP_RESERVED_CONFIG`).
//!
//! Without `SP_STRIPE_API_KEY` nothing is reported: the reporter does not run and the billing
//! queue keeps filling, to be reported once a key is configured (within Stripe's 35 days).

use std::time::Duration;

use super::{Meter, MeterPlan};
use crate::config::ConfigError;
use crate::tenants::{TenantConfigError, TenantDirectory};

pub const DEFAULT_STRIPE_BASE_URL: &str = "https://api.stripe.com";
pub const DEFAULT_WINDOW_SECS: u64 = 60;
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_RETRY_BASE_MS: u64 = 1_000;
/// 23 hours: a report still failing then is dead-lettered, an hour before Stripe may forget
/// its identifier and idempotency key (kept at least 24 hours), after which a resend could
/// count twice.
pub const MAX_GIVE_UP_SECS: u64 = 23 * 3600;
/// Longest `event_name` and `identifier` Stripe accepts.
pub const MAX_EVENT_NAME_LEN: usize = 100;

/// How to reach Stripe.
#[derive(Clone)]
pub struct StripeSettings {
    /// `SP_STRIPE_API_KEY`: a secret (`sk_…`) or restricted (`rk_…`) key.
    pub api_key: String,
    /// `SP_STRIPE_BASE_URL`, without a trailing `/`.
    pub base_url: String,
    /// `SP_STRIPE_TIMEOUT_SECS`: one request, connect to last byte.
    pub timeout: Duration,
}

impl std::fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSettings")
            .field("api_key", &"<secret>")
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// `None`: no `SP_STRIPE_API_KEY`, nothing is reported.
    pub stripe: Option<StripeSettings>,
    /// `SP_BILLING_WINDOW_SECS`: usage is summed per window into one meter event per tenant,
    /// meter and band. Divides a day, so that no window spans two months.
    pub window: Duration,
    /// `SP_BILLING_REPORT_INTERVAL_MS`: how often the reporter claims and sends.
    pub interval: Duration,
    /// `SP_BILLING_RETRY_BASE_MS`: the first retry's delay, doubled at each attempt (up to
    /// [`MAX_RETRY_DELAY`]), with jitter.
    pub retry_base: Duration,
    /// `SP_BILLING_GIVE_UP_SECS`: how long after its first send a failing report is
    /// dead-lettered (at most 23 hours).
    pub give_up_after: Duration,
}

/// The longest wait between two attempts of one report.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);
/// Rows one claim takes (a pass claims again while it takes this many).
pub const CLAIM_ROWS: usize = 5_000;
/// Reports one pass leases and sends.
pub const SEND_BATCH: usize = 64;
/// Requests in flight at once (each to a distinct customer and meter, as Stripe asks).
pub const SEND_CONCURRENCY: usize = 16;

impl StripeSettings {
    /// How long a leased report stays with its instance: the reporter starts a send only
    /// while at least a request timeout of its lease remains, so two instances never send
    /// one report at once; after a crash another instance resends it once the lease expires.
    pub fn lease(&self) -> Duration {
        self.timeout * 4 + Duration::from_secs(5)
    }
}

impl BillingSettings {
    /// Reads the settings through `get` and checks the tenants' Stripe settings against them.
    pub fn from_lookup(
        get: &impl Fn(&str) -> Option<String>,
        tenants: &TenantDirectory,
    ) -> Result<Self, ConfigError> {
        let invalid = |variable: &'static str, problem: String| ConfigError { variable, problem };
        let number = |variable: &'static str, default: u64, min: u64, max: u64| {
            let Some(v) = get(variable) else {
                return Ok(default);
            };
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| invalid(variable, format!("{v:?} is not a whole number")))?;
            if n < min || n > max {
                return Err(invalid(variable, format!("{n} is outside {min}..={max}")));
            }
            Ok(n)
        };
        let window = number("SP_BILLING_WINDOW_SECS", DEFAULT_WINDOW_SECS, 1, 86_400)?;
        if 86_400 % window != 0 {
            return Err(invalid(
                "SP_BILLING_WINDOW_SECS",
                format!("{window} does not divide a day (86400 s): a window would span two days"),
            ));
        }
        let interval = number(
            "SP_BILLING_REPORT_INTERVAL_MS",
            DEFAULT_INTERVAL_MS,
            10,
            3_600_000,
        )?;
        let timeout = number("SP_STRIPE_TIMEOUT_SECS", DEFAULT_TIMEOUT_SECS, 1, 120)?;
        let retry_base = number("SP_BILLING_RETRY_BASE_MS", DEFAULT_RETRY_BASE_MS, 1, 60_000)?;
        let give_up = number(
            "SP_BILLING_GIVE_UP_SECS",
            MAX_GIVE_UP_SECS,
            1,
            MAX_GIVE_UP_SECS,
        )?;

        let base_url = get("SP_STRIPE_BASE_URL");
        let stripe = match get("SP_STRIPE_API_KEY") {
            None => {
                if base_url.is_some() {
                    return Err(invalid(
                        "SP_STRIPE_BASE_URL",
                        "is set but SP_STRIPE_API_KEY is not: nothing would be reported".into(),
                    ));
                }
                None
            }
            Some(key) => {
                let key = key.trim().to_owned();
                if !(key.starts_with("sk_") || key.starts_with("rk_"))
                    || key.len() < 8
                    || key.chars().any(|c| !c.is_ascii_graphic())
                {
                    return Err(invalid(
                        "SP_STRIPE_API_KEY",
                        "must be a Stripe secret key (sk_…) or restricted key (rk_…)".into(),
                    ));
                }
                let base_url = base_url
                    .map(|u| u.trim().trim_end_matches('/').to_owned())
                    .unwrap_or_else(|| DEFAULT_STRIPE_BASE_URL.to_owned());
                let scheme_ok = base_url.starts_with("https://") || base_url.starts_with("http://");
                if !scheme_ok || base_url.chars().any(|c| !c.is_ascii_graphic()) {
                    return Err(invalid(
                        "SP_STRIPE_BASE_URL",
                        format!("{base_url:?} is not an http(s) URL"),
                    ));
                }
                Some(StripeSettings {
                    api_key: key,
                    base_url,
                    timeout: Duration::from_secs(timeout),
                })
            }
        };
        check_tenants(tenants, stripe.is_some()).map_err(|e| match e {
            TenantConfigError::ApiKeys(p) => invalid("SP_API_KEYS", p),
            TenantConfigError::Reserved(p) => invalid("SP_RESERVED_CONFIG", p),
        })?;
        Ok(BillingSettings {
            stripe,
            window: Duration::from_secs(window),
            interval: Duration::from_millis(interval),
            retry_base: Duration::from_millis(retry_base),
            give_up_after: Duration::from_secs(give_up),
        })
    }

    /// No Stripe, default timings (tests, and the reload check without a key).
    pub fn disabled() -> Self {
        BillingSettings {
            stripe: None,
            window: Duration::from_secs(DEFAULT_WINDOW_SECS),
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            retry_base: Duration::from_millis(DEFAULT_RETRY_BASE_MS),
            give_up_after: Duration::from_secs(MAX_GIVE_UP_SECS),
        }
    }
}

/// The tenants' Stripe settings are well formed and, when usage is `reporting` to Stripe,
/// every unit a tenant is billed for has somewhere to go: a meter (`event_name`) for each band
/// and a customer. A tenant with no Stripe setting and no reserved capacity is not billed
/// through Stripe (its queue rows are kept as `unmetered`). Errors name the setting.
pub fn check_tenants(
    directory: &TenantDirectory,
    reporting: bool,
) -> Result<(), TenantConfigError> {
    let mut tenants: Vec<_> = directory.plans().collect();
    tenants.sort_by_key(|(tenant, _)| *tenant);
    for (tenant, plan) in tenants {
        let customer = directory.stripe_customer(tenant);
        if let Some(c) = customer {
            if c.is_empty() || c.len() > 255 || c.chars().any(|c| !c.is_ascii_graphic()) {
                return Err(TenantConfigError::ApiKeys(format!(
                    "tenant {tenant:?}: stripe_customer {c:?} is not a Stripe customer id"
                )));
            }
        }
        for meter in [Meter::Vex, Meter::Fu] {
            check_meter(tenant, meter, plan.meter(meter), customer, reporting)?;
        }
    }
    Ok(())
}

fn check_meter(
    tenant: &str,
    meter: Meter,
    plan: &MeterPlan,
    customer: Option<&str>,
    reporting: bool,
) -> Result<(), TenantConfigError> {
    let m = meter.as_str();
    let event_name_ok = |e: &str| {
        !e.is_empty() && e.len() <= MAX_EVENT_NAME_LEN && e.chars().all(|c| c.is_ascii_graphic())
    };
    if let Some(item) = &plan.default_stripe_item {
        if !event_name_ok(item) {
            return Err(TenantConfigError::ApiKeys(format!(
                "tenant {tenant:?}: stripe_item_{m} {item:?} is not a meter event_name (1 to {MAX_EVENT_NAME_LEN} printable ASCII characters)"
            )));
        }
    }
    for tier in &plan.tiers {
        if let Some(item) = &tier.stripe_item {
            if !event_name_ok(item) {
                return Err(TenantConfigError::Reserved(format!(
                    "tenant {tenant:?}, {m}_overage_tiers, threshold {}: stripe_item {item:?} is not a meter event_name (1 to {MAX_EVENT_NAME_LEN} printable ASCII characters)",
                    tier.threshold
                )));
            }
        }
    }
    let billed = !plan.tiers.is_empty() || plan.default_stripe_item.is_some() || plan.reserved > 0;
    if !reporting || !billed {
        return Ok(());
    }
    if plan.tiers.is_empty() && plan.default_stripe_item.is_none() {
        return Err(TenantConfigError::ApiKeys(format!(
            "tenant {tenant:?}: stripe_item_{m} is required: {m}_reserved is set and no {m}_overage_tiers say where its overage goes"
        )));
    }
    if plan.default_stripe_item.is_none() {
        if let Some(tier) = plan.tiers.iter().find(|t| t.stripe_item.is_none()) {
            return Err(TenantConfigError::Reserved(format!(
                "tenant {tenant:?}, {m}_overage_tiers, threshold {}: stripe_item is required (or the tenant's stripe_item_{m}): its overage is billed",
                tier.threshold
            )));
        }
    }
    if customer.is_none() {
        return Err(TenantConfigError::ApiKeys(format!(
            "tenant {tenant:?}: stripe_customer is required: its {m} overage is billed to Stripe"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(
        keys: &str,
        reserved: &str,
        vars: &[(&str, &str)],
    ) -> Result<BillingSettings, ConfigError> {
        let tenants = TenantDirectory::parse(keys, reserved, &[]).map_err(|e| ConfigError {
            variable: "tenants",
            problem: e.to_string(),
        })?;
        let env: HashMap<&str, &str> = vars.iter().copied().collect();
        BillingSettings::from_lookup(&|n: &str| env.get(n).map(|v| v.to_string()), &tenants)
    }

    const KEY: (&str, &str) = ("SP_STRIPE_API_KEY", "sk_test_0123456789");
    const ENTERPRISE_KEYS: &str = r#"{"k":{"tenant":"acme","stripe_customer":"cus_1","stripe_item_vex":"vex","stripe_item_fu":"fu"}}"#;
    const ENTERPRISE_RESERVED: &str = r#"{"acme":{"vex_reserved":10,"vex_overage_tiers":[
        {"threshold":5,"price_per_unit":"0.1","stripe_item":"vex_t1"},
        {"threshold":9,"price_per_unit":"0.05","stripe_item":"vex_t2"}]}}"#;

    #[test]
    fn defaults_and_no_key_means_no_reporting() {
        let s = settings(ENTERPRISE_KEYS, ENTERPRISE_RESERVED, &[]).unwrap();
        assert!(s.stripe.is_none());
        assert_eq!(s.window, Duration::from_secs(60));
        assert_eq!(s.give_up_after, Duration::from_secs(23 * 3600));
        let s = settings(ENTERPRISE_KEYS, ENTERPRISE_RESERVED, &[KEY]).unwrap();
        let stripe = s.stripe.unwrap();
        assert_eq!(stripe.base_url, "https://api.stripe.com");
        assert!(
            !format!("{stripe:?}").contains("sk_test"),
            "the key is never printed"
        );
        let s = settings(
            ENTERPRISE_KEYS,
            "{}",
            &[KEY, ("SP_STRIPE_BASE_URL", "http://127.0.0.1:9/")],
        )
        .unwrap();
        assert_eq!(s.stripe.unwrap().base_url, "http://127.0.0.1:9");
    }

    #[test]
    fn a_tenant_without_any_stripe_setting_is_not_billed_through_stripe() {
        let keys = r#"{"k":{"tenant":"free"}}"#;
        assert!(settings(keys, "{}", &[KEY]).is_ok());
    }

    #[test]
    fn inconsistent_settings_stop_the_start_naming_the_field() {
        let no_customer =
            r#"{"k":{"tenant":"acme","stripe_item_vex":"vex","stripe_item_fu":"fu"}}"#;
        let tier_without_item =
            r#"{"acme":{"fu_overage_tiers":[{"threshold":5,"price_per_unit":"0.1"}]}}"#;
        let keys_vex_only =
            r#"{"k":{"tenant":"acme","stripe_customer":"cus_1","stripe_item_vex":"vex"}}"#;
        let reserved_no_tiers = r#"{"acme":{"fu_reserved":100}}"#;
        // (SP_API_KEYS, SP_RESERVED_CONFIG, other variables, the variable named, what it says)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                no_customer,
                "{}",
                &[KEY],
                "SP_API_KEYS",
                "stripe_customer is required",
            ),
            (
                keys_vex_only,
                tier_without_item,
                &[KEY],
                "SP_RESERVED_CONFIG",
                "stripe_item is required",
            ),
            (
                keys_vex_only,
                reserved_no_tiers,
                &[KEY],
                "SP_API_KEYS",
                "stripe_item_fu is required",
            ),
            (
                ENTERPRISE_KEYS,
                "{}",
                &[("SP_STRIPE_API_KEY", "pk_live_123456")],
                "SP_STRIPE_API_KEY",
                "secret key",
            ),
            (
                ENTERPRISE_KEYS,
                "{}",
                &[("SP_STRIPE_BASE_URL", "http://x")],
                "SP_STRIPE_BASE_URL",
                "SP_STRIPE_API_KEY is not",
            ),
            (
                ENTERPRISE_KEYS,
                "{}",
                &[KEY, ("SP_STRIPE_BASE_URL", "ftp://x")],
                "SP_STRIPE_BASE_URL",
                "not an http",
            ),
            (
                ENTERPRISE_KEYS,
                "{}",
                &[("SP_BILLING_WINDOW_SECS", "7")],
                "SP_BILLING_WINDOW_SECS",
                "divide a day",
            ),
            (
                ENTERPRISE_KEYS,
                "{}",
                &[("SP_BILLING_GIVE_UP_SECS", "86400")],
                "SP_BILLING_GIVE_UP_SECS",
                "outside",
            ),
            (
                r#"{"k":{"tenant":"acme","stripe_item_vex":"has space"}}"#,
                "{}",
                &[],
                "SP_API_KEYS",
                "stripe_item_vex",
            ),
            (
                "{}",
                r#"{"acme":{"vex_overage_tiers":[{"threshold":1,"price_per_unit":1,"stripe_item":""}]}}"#,
                &[],
                "SP_RESERVED_CONFIG",
                "threshold 1",
            ),
        ];
        for (keys, reserved, vars, variable, says) in cases {
            match settings(keys, reserved, vars) {
                Ok(_) => panic!("{keys} {reserved} {vars:?} accepted"),
                Err(e) => {
                    assert_eq!(e.variable, *variable, "{e}");
                    assert!(e.problem.contains(says), "{e}");
                }
            }
        }
        // without a key the same tenants are fine: nothing is reported yet
        assert!(settings(no_customer, "{}", &[]).is_ok());
    }

    #[test]
    fn every_key_of_a_tenant_names_the_same_customer() {
        let keys = r#"{"a":{"tenant":"t","stripe_customer":"cus_1"},"b":{"tenant":"t","stripe_customer":"cus_2"}}"#;
        let err = TenantDirectory::parse(keys, "{}", &[]).unwrap_err();
        assert!(
            err.to_string().contains("stripe_customer must be the same"),
            "{err}"
        );
        let keys = r#"{"a":{"tenant":"t","stripe_customer":"cus_1"},"b":{"tenant":"t"}}"#;
        assert!(TenantDirectory::parse(keys, "{}", &[]).is_err());
        let keys = r#"{"a":{"tenant":"t","stripe_customer":"cus_1"},"b":{"tenant":"t","stripe_customer":"cus_1"}}"#;
        let dir = TenantDirectory::parse(keys, "{}", &[]).unwrap();
        assert_eq!(dir.stripe_customer("t"), Some("cus_1"));
    }
}
