//! SPEC §6 tier math: what one usage event bills.
//!
//! Units are integers, prices are decimals (`rust_decimal`, never `f64`). Within the reservation
//! nothing is billed; overage tiers are sorted by `threshold`, the cumulative number of overage
//! units up to which that tier's price applies, and the last tier also prices everything beyond.
//! Each event bills only its own incremental units, split across the bands it crosses.
//!
//! Every sum and product is checked. The bounds below make overflow impossible for what the
//! control plane admits: units per event at most [`MAX_FU_TOKENS`] (refused at the commit),
//! prices at most [`MAX_PRICE_PER_UNIT`] (refused in the configuration), so even `u64::MAX`
//! units at the highest price fit a `Decimal` (about 7.9 × 10^28).

use rust_decimal::Decimal;

/// Fallback units one exchange may report (`fu_tokens`); a commit above it is refused
/// (400 `RECEIPT_INVALID`) before it reaches billing.
pub const MAX_FU_TOKENS: u64 = 1_000_000_000;

/// The highest `price_per_unit` a tier may have: `u64::MAX` units at this price still fit a
/// `Decimal`.
pub const MAX_PRICE_PER_UNIT: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

/// A counter or an amount that does not fit its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("billing arithmetic overflows")
    }
}

impl std::error::Error for Overflow {}

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
    /// `units × price_per_unit`, computed (checked) when the line is made.
    amount: Option<Decimal>,
}

impl BillingLine {
    /// `units × price_per_unit`, exact (rounded only beyond `Decimal`'s 28 digits); `None`
    /// when Stripe prices the item.
    pub fn amount(&self) -> Option<Decimal> {
        self.amount
    }
}

impl MeterPlan {
    /// The lines for an event that takes the month-to-date counter of `meter` from
    /// `before` to `before + increment`.
    pub fn bill(
        &self,
        meter: Meter,
        before: u64,
        increment: u64,
    ) -> Result<Vec<BillingLine>, Overflow> {
        let after = before.checked_add(increment).ok_or(Overflow)?;
        // The event's overage units are the half-open range [start, end) of cumulative overage.
        let start = before.saturating_sub(self.reserved);
        let end = after.saturating_sub(self.reserved);
        if start >= end {
            return Ok(Vec::new());
        }
        if self.tiers.is_empty() {
            return Ok(vec![BillingLine {
                meter,
                band: 0,
                units: end - start,
                stripe_item: self.default_stripe_item.clone(),
                price_per_unit: None,
                amount: None,
            }]);
        }
        let mut lines = Vec::new();
        let mut band_start = 0u64;
        for (band, tier) in self.tiers.iter().enumerate() {
            let last = band + 1 == self.tiers.len();
            let band_end = if last { u64::MAX } else { tier.threshold };
            let units = end.min(band_end).saturating_sub(start.max(band_start));
            if units > 0 {
                let amount = tier
                    .price_per_unit
                    .checked_mul(Decimal::from(units))
                    .ok_or(Overflow)?;
                lines.push(BillingLine {
                    meter,
                    band,
                    units,
                    stripe_item: tier
                        .stripe_item
                        .clone()
                        .or_else(|| self.default_stripe_item.clone()),
                    price_per_unit: Some(tier.price_per_unit),
                    amount: Some(amount),
                });
            }
            band_start = band_end;
            if band_start >= end {
                break;
            }
        }
        Ok(lines)
    }
}

/// The lines of one committed exchange: one VEx plus `fu_tokens` FU, given the month-to-date
/// counters *after* the event.
///
/// Cannot overflow: each meter's `before + increment` is at most its `after` (or the
/// increment, for counters below it), and amounts are bounded by [`MAX_PRICE_PER_UNIT`]. Were
/// it to, the exchange is logged and bills nothing rather than panicking in the writer.
pub fn lines_for_exchange(
    plan: &BillingPlan,
    vex_after: u64,
    fu_after: u64,
    fu_tokens: u64,
) -> Vec<BillingLine> {
    let lines = |(meter, after, increment): (Meter, u64, u64)| {
        plan.meter(meter)
            .bill(meter, after.saturating_sub(increment), increment)
    };
    let all = [(Meter::Vex, vex_after, 1), (Meter::Fu, fu_after, fu_tokens)]
        .into_iter()
        .map(lines)
        .collect::<Result<Vec<_>, _>>();
    match all {
        Ok(all) => all.into_iter().flatten().collect(),
        Err(e) => {
            tracing::error!(vex_after, fu_after, fu_tokens, "exchange not billed: {e}");
            Vec::new()
        }
    }
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
        assert!(plan().bill(Meter::Vex, 0, 100).unwrap().is_empty());
        assert!(plan().bill(Meter::Vex, 99, 1).unwrap().is_empty());
        assert!(plan().bill(Meter::Vex, 5, 0).unwrap().is_empty());
    }

    #[test]
    fn an_event_crossing_the_reservation_bills_only_the_overage() {
        let lines = plan().bill(Meter::Fu, 95, 10).unwrap();
        assert_eq!(units_by_band(&lines), vec![(0, 5)]);
        assert_eq!(lines[0].amount(), Some(d("0.05")));
        assert_eq!(lines[0].stripe_item.as_deref(), Some("si_a"));
    }

    #[test]
    fn an_event_is_split_across_every_band_it_crosses() {
        // Overage goes from 5 to 75: 5 in band 0, 40 in band 1, 10 in band 2, 15 beyond the
        // last threshold, priced by the last tier.
        let lines = plan().bill(Meter::Fu, 105, 70).unwrap();
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
            for l in p.bill(Meter::Fu, counter, inc).unwrap() {
                per_band[l.band] += l.units;
            }
            counter += inc;
        }
        let whole: Vec<_> = p
            .bill(Meter::Fu, 0, counter)
            .unwrap()
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
        let lines = p.bill(Meter::Vex, 1, 3).unwrap();
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

    /// One tier at the highest price with 28 significant digits: the same for every band.
    fn extreme_plan() -> MeterPlan {
        MeterPlan {
            reserved: 0,
            tiers: vec![Tier {
                threshold: u64::MAX,
                price_per_unit: d("999999999.9999999999999999999"),
                stripe_item: None,
            }],
            default_stripe_item: None,
        }
    }

    #[test]
    fn counters_near_2_pow_64_are_refused_not_wrapped() {
        let p = plan();
        assert_eq!(p.bill(Meter::Fu, u64::MAX, 1), Err(Overflow));
        assert_eq!(p.bill(Meter::Fu, u64::MAX - 5, 6), Err(Overflow));
        // the last unit that fits is billed, in the last band
        let lines = p.bill(Meter::Fu, u64::MAX - 1, 1).unwrap();
        assert_eq!(units_by_band(&lines), vec![(2, 1)]);
        assert_eq!(lines[0].amount(), Some(d("0.001")));
    }

    #[test]
    fn amounts_at_the_price_bound_never_overflow() {
        assert!(d("999999999.9999999999999999999") < MAX_PRICE_PER_UNIT);
        let p = extreme_plan();
        // u64::MAX - 1 units at once: the largest product there can be
        let lines = p.bill(Meter::Fu, 0, u64::MAX - 1).unwrap();
        let amount = lines[0].amount().unwrap();
        assert!(amount > d("18446744073709551613000000000"), "{amount}");
        // MAX_PRICE_PER_UNIT itself times u64::MAX fits
        assert!(MAX_PRICE_PER_UNIT
            .checked_mul(Decimal::from(u64::MAX))
            .is_some());
        // a price with many digits stays exact within Decimal's 28 digits
        let many = MeterPlan {
            tiers: vec![Tier {
                threshold: 1,
                price_per_unit: d("0.0000000000000000000000000001"),
                stripe_item: None,
            }],
            ..extreme_plan()
        };
        let lines = many.bill(Meter::Fu, 0, 7).unwrap();
        assert_eq!(lines[0].amount(), Some(d("0.0000000000000000000000000007")));
    }

    #[test]
    fn an_exchange_with_counters_near_2_pow_64_does_not_panic() {
        let plan = BillingPlan {
            vex: extreme_plan(),
            fu: extreme_plan(),
        };
        let lines = lines_for_exchange(&plan, u64::MAX, u64::MAX, MAX_FU_TOKENS);
        let units: Vec<_> = lines.iter().map(|l| (l.meter, l.units)).collect();
        assert_eq!(units, vec![(Meter::Vex, 1), (Meter::Fu, MAX_FU_TOKENS)]);
        // fu_tokens larger than the counter (an inconsistent input) bills the tokens alone
        let lines = lines_for_exchange(&plan, 1, 3, u64::MAX);
        assert_eq!(lines[1].units, u64::MAX);
        assert!(lines[1].amount().is_some());
    }
}
