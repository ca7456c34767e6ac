//! What a month bills, as the admin (`GET /v1/admin/usage/{tenant}`), the tenant
//! (`GET /v1/usage`) and Prometheus (`/metrics`) see it.
//!
//! Overage per tier and its amount come from the month-to-date counters and the tenant's plan
//! (the same tier math as the commits); what Stripe holds comes from the reports: reported,
//! being sent, dead-lettered (an operator must reconcile these), unmetered (no meter
//! configured), and what is still queued.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{BillingPlan, Meter};
use crate::storage::billing::MonthBilling;
use crate::storage::{StoreError, Usage};
use crate::ControlPlane;

/// The report states, in the order shown.
const STATES: [&str; 5] = ["reported", "sending", "pending", "dead", "unmetered"];

/// The `billing` member of a month's usage.
pub fn month_summary(
    plan: Option<&BillingPlan>,
    usage: Usage,
    billing: &MonthBilling,
    reporting: bool,
) -> Value {
    let default_plan = BillingPlan::default();
    let plan = plan.unwrap_or(&default_plan);
    // (meter, band) -> state -> units
    let mut held: BTreeMap<(String, u32), BTreeMap<String, u64>> = BTreeMap::new();
    for b in &billing.bands {
        let units = held
            .entry((b.meter.clone(), b.band))
            .or_default()
            .entry(b.state.clone())
            .or_default();
        *units = units.saturating_add(b.units);
    }
    let mut meters = serde_json::Map::new();
    for (meter, used) in [(Meter::Vex, usage.vex), (Meter::Fu, usage.fu)] {
        let mp = plan.meter(meter);
        let lines = mp.bill(meter, 0, used).unwrap_or_default();
        let bands = mp.tiers.len().max(1);
        let mut tiers = Vec::new();
        let mut total: Option<Decimal> = None;
        for band in 0..bands {
            let tier = mp.tiers.get(band);
            let line = lines.iter().find(|l| l.band == band);
            let units = line.map_or(0, |l| l.units);
            let amount = match (line.and_then(|l| l.amount()), tier) {
                (Some(a), _) => Some(a),
                (None, Some(_)) => Some(Decimal::ZERO),
                (None, None) => None,
            };
            if let Some(a) = amount {
                total = Some(total.unwrap_or_default().saturating_add(a));
            }
            let states = held.remove(&(meter.as_str().to_owned(), band as u32));
            let mut stripe = serde_json::Map::new();
            for state in STATES {
                let units = states.as_ref().and_then(|s| s.get(state)).copied();
                stripe.insert(state.into(), json!(units.unwrap_or(0)));
            }
            tiers.push(json!({
                "band": band,
                "threshold": tier.map(|t| t.threshold),
                "price_per_unit": tier.map(|t| t.price_per_unit.to_string()),
                "stripe_item": tier.and_then(|t| t.stripe_item.clone()).or_else(|| mp.default_stripe_item.clone()),
                "units": units,
                "amount": amount.map(|a| a.normalize().to_string()),
                "stripe": stripe,
            }));
        }
        meters.insert(
            meter.as_str().into(),
            json!({
                "used": used,
                "reserved": mp.reserved,
                "overage": used.saturating_sub(mp.reserved),
                "amount": total.map(|a| a.normalize().to_string()),
                "tiers": tiers,
            }),
        );
    }
    // Units of bands the current plan no longer has (a reload changed it mid-month).
    let other: Vec<Value> = held
        .into_iter()
        .map(|((meter, band), states)| json!({"meter": meter, "band": band, "stripe": states}))
        .collect();
    let dead: Vec<Value> = billing
        .dead
        .iter()
        .map(|d| {
            json!({
                "identifier": d.identifier, "meter": d.meter, "band": d.band,
                "event_name": d.event_name, "value": d.value,
                "window_start": signet_protocol::time::rfc3339_millis(d.window_start_ms.max(0) as u64),
                "attempts": d.attempts, "last_error": d.last_error,
            })
        })
        .collect();
    json!({
        "reporting": if reporting { "stripe" } else { "off: no SP_STRIPE_API_KEY, usage stays queued" },
        "meters": meters,
        "other_bands": other,
        "dead_letters": dead,
    })
}

/// A tenant's month: counters, what it bills and where its reports are.
pub async fn month(cp: &ControlPlane, tenant: &str, month: &str) -> Result<Value, StoreError> {
    let (usage, billing) = tokio::try_join!(
        cp.storage.usage(tenant, month),
        cp.storage.month_billing(tenant, month)
    )?;
    let plan = cp.tenants().plan(tenant);
    let summary = month_summary(plan.as_deref(), usage, &billing, cp.billing.reporting());
    Ok(json!({
        "tenant": tenant, "month": month, "vex": usage.vex, "fu": usage.fu,
        "stripe_customer": cp.tenants().stripe_customer(tenant),
        "billing": summary,
    }))
}

/// The current UTC month, `YYYY-MM`.
pub fn current_month() -> String {
    signet_protocol::time::rfc3339_millis(crate::now_ms().max(0) as u64)[..7].to_owned()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantTypeLabels {
    tenant: String,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tenant: String,
    r#type: &'static str,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

fn meter_label(meter: &str) -> &'static str {
    if meter == "fu" {
        "fu"
    } else {
        "vex"
    }
}

/// Appends the `signet_billing_*`, `signet_reserved_capacity` and `signet_overage_*`
/// families to `text` (the OpenMetrics text of the other metrics, whose `# EOF` moves to the
/// end). Values from the database are the current UTC month's, the same on every instance;
/// `signet_billing_{reported,retries,dead_lettered}_total` count what this instance did.
pub async fn append_metrics(cp: &ControlPlane, text: &mut String) {
    let month = current_month();
    let stats = cp.storage.billing_stats(&month).await;
    let mut registry = Registry::with_prefix("signet");

    let reserved = Family::<TenantTypeLabels, Gauge>::default();
    let charges = Family::<TierLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let overage = Family::<TierLabels, Counter>::default();
    let tenants = cp.tenants();
    let usage: BTreeMap<String, (u64, u64)> = stats
        .as_ref()
        .map(|s| {
            s.usage
                .iter()
                .map(|(t, v, f)| (t.clone(), (*v, *f)))
                .collect()
        })
        .unwrap_or_default();
    for (tenant, plan) in tenants.plans() {
        let (vex, fu) = usage.get(tenant).copied().unwrap_or_default();
        for (meter, used) in [(Meter::Vex, vex), (Meter::Fu, fu)] {
            let mp = plan.meter(meter);
            reserved
                .get_or_create(&TenantTypeLabels {
                    tenant: tenant.to_owned(),
                    r#type: meter.as_str(),
                })
                .set(i64::try_from(mp.reserved).unwrap_or(i64::MAX));
            for line in mp.bill(meter, 0, used).unwrap_or_default() {
                let labels = TierLabels {
                    tenant: tenant.to_owned(),
                    r#type: meter.as_str(),
                    tier: line.band.to_string(),
                };
                overage.get_or_create(&labels).inc_by(line.units);
                if let Some(amount) = line.amount().and_then(|a| a.to_f64()) {
                    charges.get_or_create(&labels).inc_by(amount);
                }
            }
        }
    }
    registry.register(
        "reserved_capacity",
        "Units per month within the reservation, by tenant and type (vex, fu)",
        reserved,
    );
    registry.register(
        "overage_charges",
        "Amount of this UTC month's overage by tenant, type and tier (band), from the plan's prices",
        charges,
    );
    registry.register(
        "overage_units",
        "Units of this UTC month's overage by tenant, type and tier (band)",
        overage,
    );

    let counters = &cp.billing.counters;
    registry.register(
        "billing_reported",
        "Meter events this instance reported to Stripe",
        counters.reported.clone(),
    );
    registry.register(
        "billing_retries",
        "Failed attempts this instance scheduled again",
        counters.retried.clone(),
    );
    registry.register(
        "billing_dead_lettered",
        "Meter events this instance gave up on (to reconcile by hand)",
        counters.dead_lettered.clone(),
    );
    let running = Gauge::<i64>::default();
    running.set(i64::from(
        cp.billing.reporting() && cp.billing.check().is_ok(),
    ));
    registry.register(
        "billing_reporter_running",
        "1 while this instance reports usage to Stripe",
        running,
    );

    match stats {
        Ok(stats) => {
            let enqueued = Family::<TypeLabels, Counter>::default();
            let reports = Family::<StateLabels, Gauge>::default();
            let dead = Gauge::<i64>::default();
            for (meter, _rows, units) in &stats.pending {
                enqueued
                    .get_or_create(&TypeLabels {
                        r#type: meter_label(meter),
                    })
                    .inc_by(*units);
            }
            // every state from 0, so that an alert on one sees its first report
            let mut by_state: BTreeMap<String, i64> = ["sending", "reported", "dead", "unmetered"]
                .into_iter()
                .map(|state| (state.to_owned(), 0))
                .collect();
            for (meter, state, count, units) in &stats.reports {
                enqueued
                    .get_or_create(&TypeLabels {
                        r#type: meter_label(meter),
                    })
                    .inc_by(*units);
                let n = by_state.entry(state.clone()).or_default();
                *n = n.saturating_add(i64::try_from(*count).unwrap_or(i64::MAX));
            }
            for (state, n) in by_state {
                if state == "dead" {
                    dead.set(n);
                }
                reports.get_or_create(&StateLabels { state }).set(n);
            }
            let now = crate::now_ms();
            let oldest = [stats.oldest_pending_ms, stats.oldest_sending_ms]
                .into_iter()
                .flatten()
                .min();
            let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            age.set(oldest.map_or(0.0, |t| now.saturating_sub(t).max(0) as f64 / 1000.0));
            registry.register(
                "billing_enqueued",
                "Units queued for billing this UTC month, by type (vex, fu)",
                enqueued,
            );
            registry.register(
                "billing_reports",
                "Meter events of this UTC month by state (sending, reported, dead, unmetered)",
                reports,
            );
            registry.register(
                "billing_dead_letters",
                "Meter events of this UTC month given up on: reconcile them by hand",
                dead,
            );
            registry.register(
                "billing_oldest_pending_seconds",
                "Age of the oldest usage not yet reported (queued or being sent)",
                age,
            );
        }
        Err(e) => tracing::warn!("billing metrics: {e}"),
    }

    if text.ends_with("# EOF\n") {
        text.truncate(text.len() - "# EOF\n".len());
    }
    let _ = prometheus_client::encoding::text::encode_registry(text, &registry);
    let _ = prometheus_client::encoding::text::encode_eof(text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{MeterPlan, Tier};
    use crate::storage::billing::BandUnits;

    #[test]
    fn a_month_shows_used_reserved_overage_per_tier_and_where_it_is() {
        let plan = BillingPlan {
            vex: MeterPlan {
                reserved: 10,
                tiers: vec![
                    Tier {
                        threshold: 5,
                        price_per_unit: Decimal::new(1, 1),
                        stripe_item: Some("v1".into()),
                    },
                    Tier {
                        threshold: 10,
                        price_per_unit: Decimal::new(5, 2),
                        stripe_item: Some("v2".into()),
                    },
                ],
                default_stripe_item: None,
            },
            fu: MeterPlan::default(),
        };
        let billing = MonthBilling {
            bands: vec![
                BandUnits {
                    meter: "vex".into(),
                    band: 0,
                    event_name: Some("v1".into()),
                    state: "reported".into(),
                    units: 4,
                    count: 2,
                },
                BandUnits {
                    meter: "vex".into(),
                    band: 0,
                    event_name: Some("v1".into()),
                    state: "pending".into(),
                    units: 1,
                    count: 1,
                },
            ],
            dead: vec![],
        };
        let s = month_summary(Some(&plan), Usage { vex: 22, fu: 0 }, &billing, true);
        let vex = &s["meters"]["vex"];
        assert_eq!(
            (
                vex["used"].as_u64(),
                vex["reserved"].as_u64(),
                vex["overage"].as_u64()
            ),
            (Some(22), Some(10), Some(12))
        );
        assert_eq!(vex["tiers"][0]["units"], 5);
        assert_eq!(vex["tiers"][0]["amount"], "0.5");
        assert_eq!(vex["tiers"][1]["units"], 7);
        assert_eq!(vex["tiers"][1]["amount"], "0.35");
        assert_eq!(vex["amount"], "0.85");
        assert_eq!(vex["tiers"][0]["stripe"]["reported"], 4);
        assert_eq!(vex["tiers"][0]["stripe"]["pending"], 1);
        assert_eq!(vex["tiers"][1]["stripe"]["reported"], 0);
    }
}
