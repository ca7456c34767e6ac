//! The rows a commit writes, one struct per table and one vector per column: PostgreSQL binds
//! each vector as an array for `unnest`, SQLite inserts them row by row. Built only by
//! [`Rows::append`] and [`Rows::finish`], so both backends write the same values.

use super::{to_i64, CommitRequest, Usage};
use crate::billing::{lines_for_exchange, BillingLine};

/// `receipts`: one row per appended receipt.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ReceiptRows<'a> {
    pub trace_id: Vec<&'a str>,
    pub hop: Vec<i64>,
    pub receipt_hash: Vec<&'a str>,
    pub prev_receipt_hash: Vec<Option<&'a str>>,
    pub tenant: Vec<&'a str>,
    /// The receipt as JSON text.
    pub body: Vec<&'a str>,
}

/// `traces`: the final head of every trace the commits appended to, in the order first
/// appended to.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HeadRows<'a> {
    pub trace_id: Vec<&'a str>,
    pub tenant: Vec<&'a str>,
    pub head_hop: Vec<i64>,
    pub head_hash: Vec<&'a str>,
}

/// `usage_monthly`: the final month-to-date counters of every (tenant, month) counted.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct MonthRows<'a> {
    pub tenant: Vec<&'a str>,
    pub month: Vec<&'a str>,
    pub vex: Vec<i64>,
    pub fu: Vec<i64>,
}

/// `usage_ledger`: one row per appended receipt (each counts one VEx).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LedgerRows<'a> {
    pub tenant: Vec<&'a str>,
    pub month: Vec<&'a str>,
    pub trace_id: Vec<&'a str>,
    pub hop: Vec<i64>,
    pub receipt_hash: Vec<&'a str>,
    pub fu: Vec<i64>,
}

/// `billing_queue`: the billing lines of every appended receipt.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct BillingRows<'a> {
    pub tenant: Vec<&'a str>,
    pub month: Vec<&'a str>,
    pub meter: Vec<&'static str>,
    pub band: Vec<i32>,
    pub units: Vec<i64>,
    pub stripe_item: Vec<Option<String>>,
    pub price_per_unit: Vec<Option<String>>,
    pub amount: Vec<Option<String>>,
    /// `{receipt_hash}/{meter}/{band}`: unique because the receipt's hash is (migration 0009).
    pub idempotency_key: Vec<String>,
}

/// `idempotency`: the record of every appended commit's key.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct KeyRows<'a> {
    pub tenant: Vec<&'a str>,
    pub key: Vec<&'a str>,
    pub fingerprint: Vec<&'a str>,
    pub response: Vec<&'a str>,
}

/// Everything a batch of commits writes.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Rows<'a> {
    pub receipts: ReceiptRows<'a>,
    pub heads: HeadRows<'a>,
    pub months: MonthRows<'a>,
    pub ledger: LedgerRows<'a>,
    pub billing: BillingRows<'a>,
    pub keys: KeyRows<'a>,
}

impl<'a> Rows<'a> {
    /// The rows of an appended commit that takes its month's counters to `usage`.
    pub fn append(&mut self, req: &'a CommitRequest, usage: Usage) {
        let hop = to_i64(req.hop);
        let r = &mut self.receipts;
        r.trace_id.push(&req.trace_id);
        r.hop.push(hop);
        r.receipt_hash.push(&req.receipt_hash);
        r.prev_receipt_hash.push(req.prev_receipt_hash.as_deref());
        r.tenant.push(&req.tenant);
        r.body.push(&req.receipt);

        let l = &mut self.ledger;
        l.tenant.push(&req.tenant);
        l.month.push(&req.month);
        l.trace_id.push(&req.trace_id);
        l.hop.push(hop);
        l.receipt_hash.push(&req.receipt_hash);
        l.fu.push(to_i64(req.fu_tokens));

        for line in lines_for_exchange(&req.plan, usage.vex, usage.fu, req.fu_tokens) {
            self.billing.push(req, &line);
        }

        let k = &mut self.keys;
        k.tenant.push(&req.tenant);
        k.key.push(&req.idempotency_key);
        k.fingerprint.push(&req.fingerprint);
        k.response.push(&req.response);
    }

    /// Adds the final state of what the commits changed: `heads`, the last commit appended to
    /// each trace; `months`, the counters of each (tenant, month).
    pub fn finish(&mut self, heads: &[&'a CommitRequest], months: &[((&'a str, &'a str), Usage)]) {
        for req in heads {
            let h = &mut self.heads;
            h.trace_id.push(&req.trace_id);
            h.tenant.push(&req.tenant);
            h.head_hop.push(to_i64(req.hop));
            h.head_hash.push(&req.receipt_hash);
        }
        for ((tenant, month), usage) in months {
            let m = &mut self.months;
            m.tenant.push(tenant);
            m.month.push(month);
            m.vex.push(to_i64(usage.vex));
            m.fu.push(to_i64(usage.fu));
        }
    }

    /// Nothing to write: every commit was refused or replayed.
    pub fn is_empty(&self) -> bool {
        self.receipts.trace_id.is_empty()
    }
}

impl<'a> BillingRows<'a> {
    fn push(&mut self, req: &'a CommitRequest, line: &BillingLine) {
        let meter = line.meter.as_str();
        self.tenant.push(&req.tenant);
        self.month.push(&req.month);
        self.meter.push(meter);
        self.band.push(i32::try_from(line.band).unwrap_or(i32::MAX));
        self.units.push(to_i64(line.units));
        self.stripe_item.push(line.stripe_item.clone());
        self.price_per_unit
            .push(line.price_per_unit.map(|p| p.to_string()));
        self.amount
            .push(line.amount().map(|a| a.normalize().to_string()));
        self.idempotency_key
            .push(format!("{}/{meter}/{}", req.receipt_hash, line.band));
    }

    pub fn len(&self) -> usize {
        self.idempotency_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idempotency_key.is_empty()
    }
}
