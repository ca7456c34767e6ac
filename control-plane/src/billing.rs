//! SPEC §6 tier math: what one usage event bills.
//!
//! Units are integers, prices are decimals (`rust_decimal`, never `f64`). Within the reservation
//! nothing is billed; overage tiers are sorted by `threshold`, the cumulative number of overage
//! units up to which that tier's price applies, and the last tier also prices everything beyond.
//! Each event bills only its own incremental units, split across the bands it crosses.

use rust_decimal::Decimal;

/// The two metered quantities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// Verified exchanges: one per stored receipt.
    Vex,
    /// Fallback units: LLM tokens reported by the provider.
    Fu,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Vex => "vex",
            Meter::Fu => "fu",
        }
    }
}

/// One overage band.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Cumulative overage units up to which `price_per_unit` applies.
    pub threshold: u64,
    pub price_per_unit: Decimal,
    /// Stripe item of this band; when absent the tenant's item for the meter is used.
    pub stripe_item: Option<String>,
}

/// How one meter of one tenant is billed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeterPlan {
    /// Units per month included in the reservation (billed nowhere here).
    pub reserved: u64,
    /// Sorted by `threshold`, strictly increasing. Empty: overage is reported to the tenant's
    /// Stripe item without a local price (Stripe prices it).
    pub tiers: Vec<Tier>,
    /// The tenant's Stripe item for this meter (`stripe_item_vex` / `stripe_item_fu`).
    pub default_stripe_item: Option<String>,
}

/// Everything needed to bill a tenant's usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BillingPlan {
    pub vex: MeterPlan,
    pub fu: MeterPlan,
}

impl BillingPlan {
    pub fn meter(&self, meter: Meter) -> &MeterPlan {
        match meter {
            Meter::Vex => &self.vex,
            Meter::Fu => &self.fu,
        }
    }
}

/// One row for the billing queue.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingLine {
    pub meter: Meter,
    /// Index of the overage band (0 when the meter has no tiers).
    pub band: usize,
    pub units: u64,
    pub stripe_item: Option<String>,
    /// `None` when Stripe prices the item.
    pub price_per_unit: Option<Decimal>,
}

impl BillingLine {
    /// `units × price_per_unit`, exact.
    pub fn amount(&self) -> Option<Decimal> {
        self.price_per_unit.map(|p| p * Decimal::from(self.units))
    }
}

impl MeterPlan {
    /// The lines for an event that takes the month-to-date counter of `meter` from
    /// `before` to `before + increment`.
    pub fn bill(&self, meter: Meter, before: u64, increment: u64) -> Vec<BillingLine> {
        let after = before.saturating_add(increment);
        // The event's overage units are the half-open range [start, end) of cumulative overage.
        let start = before.saturating_sub(self.reserved);
        let end = after.saturating_sub(self.reserved);
        if start >= end {
            return Vec::new();
        }
        if self.tiers.is_empty() {
            return vec![BillingLine {
                meter,
                band: 0,
                units: end - start,
                stripe_item: self.default_stripe_item.clone(),
                price_per_unit: None,
            }];
        }
        let mut lines = Vec::new();
        let mut band_start = 0u64;
        for (band, tier) in self.tiers.iter().enumerate() {
            let last = band + 1 == self.tiers.len();
            let band_end = if last { u64::MAX } else { tier.threshold };
            let units = end.min(band_end).saturating_sub(start.max(band_start));
            if units > 0 {
                lines.push(BillingLine {
                    meter,
                    band,
                    units,
                    stripe_item: tier
                        .stripe_item
                        .clone()
                        .or_else(|| self.default_stripe_item.clone()),
                    price_per_unit: Some(tier.price_per_unit),
                });
            }
            band_start = band_end;
            if band_start >= end {
                break;
            }
        }
        lines
    }
}

/// The lines of one committed exchange: one VEx plus `fu_tokens` FU, given the month-to-date
/// counters *after* the event.
pub fn lines_for_exchange(
    plan: &BillingPlan,
    vex_after: u64,
    fu_after: u64,
    fu_tokens: u64,
) -> Vec<BillingLine> {
    let mut lines = plan.vex.bill(Meter::Vex, vex_after.saturating_sub(1), 1);
    lines.extend(
        plan.fu
            .bill(Meter::Fu, fu_after.saturating_sub(fu_tokens), fu_tokens),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn plan() -> MeterPlan {
        MeterPlan {
            reserved: 100,
            tiers: vec![
                Tier {
                    threshold: 10,
                    price_per_unit: d("0.01"),
                    stripe_item: Some("si_a".into()),
                },
                Tier {
                    threshold: 50,
                    price_per_unit: d("0.005"),
                    stripe_item: None,
                },
                Tier {
                    threshold: 60,
                    price_per_unit: d("0.001"),
                    stripe_item: Some("si_c".into()),
                },
            ],
            default_stripe_item: Some("si_default".into()),
        }
    }

    fn units_by_band(lines: &[BillingLine]) -> Vec<(usize, u64)> {
        lines.iter().map(|l| (l.band, l.units)).collect()
    }

    #[test]
    fn nothing_is_billed_within_the_reservation() {
        assert!(plan().bill(Meter::Vex, 0, 100).is_empty());
        assert!(plan().bill(Meter::Vex, 99, 1).is_empty());
        assert!(plan().bill(Meter::Vex, 5, 0).is_empty());
    }

    #[test]
    fn an_event_crossing_the_reservation_bills_only_the_overage() {
        let lines = plan().bill(Meter::Fu, 95, 10);
        assert_eq!(units_by_band(&lines), vec![(0, 5)]);
        assert_eq!(lines[0].amount(), Some(d("0.05")));
        assert_eq!(lines[0].stripe_item.as_deref(), Some("si_a"));
    }

    #[test]
    fn an_event_is_split_across_every_band_it_crosses() {
        // Overage goes from 5 to 75: 5 in band 0, 40 in band 1, 10 in band 2, 15 beyond the
        // last threshold, priced by the last tier.
        let lines = plan().bill(Meter::Fu, 105, 70);
        assert_eq!(units_by_band(&lines), vec![(0, 5), (1, 40), (2, 25)]);
        assert_eq!(lines[1].stripe_item.as_deref(), Some("si_default"));
        let total: Decimal = lines.iter().filter_map(BillingLine::amount).sum();
        assert_eq!(total, d("0.05") + d("0.2") + d("0.025"));
    }

    #[test]
    fn a_sequence_of_events_bills_the_same_units_as_one_big_event() {
        let p = plan();
        let mut per_band = [0u64; 3];
        let mut counter = 0;
        for inc in [3, 90, 1, 17, 0, 44, 9] {
            for l in p.bill(Meter::Fu, counter, inc) {
                per_band[l.band] += l.units;
            }
            counter += inc;
        }
        let whole: Vec<_> = p
            .bill(Meter::Fu, 0, counter)
            .iter()
            .map(|l| l.units)
            .collect();
        assert_eq!(per_band.to_vec(), whole);
        assert_eq!(per_band.iter().sum::<u64>(), counter - 100);
    }

    #[test]
    fn without_tiers_overage_goes_to_the_tenant_item_unpriced() {
        let p = MeterPlan {
            reserved: 2,
            tiers: vec![],
            default_stripe_item: Some("si_v".into()),
        };
        let lines = p.bill(Meter::Vex, 1, 3);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].units, lines[0].price_per_unit), (2, None));
        assert_eq!(lines[0].stripe_item.as_deref(), Some("si_v"));
    }

    #[test]
    fn an_exchange_bills_one_vex_and_its_tokens() {
        let plan = BillingPlan {
            vex: MeterPlan {
                reserved: 1,
                ..MeterPlan::default()
            },
            fu: plan(),
        };
        // First exchange of the month: inside both reservations.
        assert!(lines_for_exchange(&plan, 1, 40, 40).is_empty());
        // Second: one VEx over, and FU 40 -> 120 crosses into band 0 and 1.
        let lines = lines_for_exchange(&plan, 2, 120, 80);
        let summary: Vec<_> = lines.iter().map(|l| (l.meter, l.band, l.units)).collect();
        assert_eq!(
            summary,
            vec![(Meter::Vex, 0, 1), (Meter::Fu, 0, 10), (Meter::Fu, 1, 10)]
        );
    }
}
