//! A batch of commits decided in memory: given what the backend locked ([`Locked`]), the
//! outcome of each commit and the rows to write ([`Decided`]), as if the commits had run one
//! after the other. Every commit path calls it (SQLite's, and PostgreSQL's batch and single
//! commit), so they count, bill and write alike; a backend locks, calls [`decide_batch`] and
//! writes the rows.

use std::collections::HashMap;

use super::rows::Rows;
use super::worker::panic_message;
use super::{CommitOutcome, CommitRequest, StoreError, Usage};
use signet_protocol::internal::{decide, Decision, Head, Record, TraceState};

/// The stored state the commits of a batch depend on, read under lock.
#[derive(Debug, Default)]
pub(crate) struct Locked {
    /// By (tenant, idempotency key); a key absent here has no record.
    pub records: HashMap<(String, String), Record>,
    /// By (tenant, trace id): a trace id names a chain within its tenant (SPEC §2); a trace
    /// absent here does not exist.
    pub traces: HashMap<(String, String), TraceState>,
    /// Month-to-date counters by (tenant, month); a month absent here has no usage yet.
    pub months: HashMap<(String, String), Usage>,
    /// Unix ms once the rows were locked: a commit whose deadline is before it is expired.
    pub locked_at_ms: i64,
}

impl Locked {
    /// What one commit depends on.
    pub fn of_one(
        req: &CommitRequest,
        record: Option<Record>,
        trace: Option<TraceState>,
        usage: Option<Usage>,
    ) -> Self {
        let mut locked = Locked::default();
        if let Some(record) = record {
            let key = (req.tenant.clone(), req.idempotency_key.clone());
            locked.records.insert(key, record);
        }
        if let Some(trace) = trace {
            locked.traces.insert(req.trace_key(), trace);
        }
        if let Some(usage) = usage {
            let month = (req.tenant.clone(), req.month.clone());
            locked.months.insert(month, usage);
        }
        locked
    }
}

/// What a batch does.
#[derive(Debug)]
pub(crate) struct Decided<'a> {
    /// One per commit, in order.
    pub outcomes: Vec<CommitOutcome>,
    pub rows: Rows<'a>,
    /// The time written on the rows: the latest of the commits'.
    pub now_ms: i64,
}

/// Decides `requests` in order: each sees the records, heads and counters the ones before it
/// left. Pure.
pub(crate) fn decide_batch<'a>(locked: Locked, requests: &[&'a CommitRequest]) -> Decided<'a> {
    let mut batch = Batch::new(locked);
    let outcomes = requests.iter().map(|req| batch.decide(req)).collect();
    let (rows, now_ms) = batch.finish();
    Decided {
        outcomes,
        rows,
        now_ms,
    }
}

/// [`decide_batch`], with a panic (never expected: a bug in the decision or the billing math)
/// turned into an error of the batch, so that the worker that runs it goes on.
pub(crate) fn decide_batch_or_fail<'a>(
    locked: Locked,
    requests: &[&'a CommitRequest],
) -> Result<Decided<'a>, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decide_batch(locked, requests)
    }))
    .map_err(|panic| {
        StoreError::Database(format!("the decision panicked: {}", panic_message(&*panic)))
    })
}

/// A batch being decided, commit after commit.
pub(crate) struct Batch<'a> {
    locked: Locked,
    rows: Rows<'a>,
    /// The last commit appended to each trace, in first-seen order.
    heads: Vec<&'a CommitRequest>,
    /// The counters of each (tenant, month) counted, in first-seen order.
    months: Vec<((&'a str, &'a str), Usage)>,
    now_ms: i64,
}

impl<'a> Batch<'a> {
    pub fn new(locked: Locked) -> Self {
        Batch {
            locked,
            rows: Rows::default(),
            heads: Vec::new(),
            months: Vec::new(),
            now_ms: 0,
        }
    }

    /// Decides the next commit and adds its rows.
    pub fn decide(&mut self, req: &'a CommitRequest) -> CommitOutcome {
        self.now_ms = self.now_ms.max(req.now_ms);
        let locked_at = u64::try_from(self.locked.locked_at_ms).unwrap_or(0);
        if req.deadline_ms.is_some_and(|deadline| locked_at > deadline) {
            return CommitOutcome::Expired;
        }
        let key = (req.tenant.clone(), req.idempotency_key.clone());
        let decision = decide(
            self.locked.records.get(&key),
            self.locked.traces.get(&req.trace_key()),
            &req.candidate(),
        );
        match decision {
            Decision::Replay(response) => return CommitOutcome::Replay { response },
            Decision::Reject(rejection) => return CommitOutcome::Rejected(rejection),
            Decision::Append => {}
        }
        let Some(usage) = self.count(req) else {
            return CommitOutcome::CounterOverflow;
        };
        self.rows.append(req, usage);
        let same_trace =
            |h: &&mut &CommitRequest| h.trace_id == req.trace_id && h.tenant == req.tenant;
        match self.heads.iter_mut().find(same_trace) {
            Some(head) => *head = req,
            None => self.heads.push(req),
        }
        let head = Head {
            hop: req.hop,
            receipt_hash: req.receipt_hash.clone(),
        };
        let trace = TraceState {
            tenant: req.tenant.clone(),
            head,
        };
        self.locked.traces.insert(req.trace_key(), trace);
        let record = Record {
            fingerprint: req.fingerprint.clone(),
            response: req.response.clone(),
        };
        self.locked.records.insert(key, record);
        CommitOutcome::Committed
    }

    /// Counts an appended commit in its month: the counters after it, `None` (and nothing
    /// counted) if they would not fit the stored 64-bit signed integers.
    fn count(&mut self, req: &'a CommitRequest) -> Option<Usage> {
        let month = (req.tenant.as_str(), req.month.as_str());
        let at = match self.months.iter().position(|(m, _)| *m == month) {
            Some(at) => at,
            None => {
                let key = (req.tenant.clone(), req.month.clone());
                let stored = self.locked.months.get(&key).copied();
                self.months.push((month, stored.unwrap_or_default()));
                self.months.len() - 1
            }
        };
        let usage = &mut self.months[at].1;
        let add = |counter: u64, by: u64| {
            counter
                .checked_add(by)
                .filter(|sum| i64::try_from(*sum).is_ok())
        };
        *usage = Usage {
            vex: add(usage.vex, 1)?,
            fu: add(usage.fu, req.fu_tokens)?,
        };
        Some(*usage)
    }

    /// The rows to write, with the time to write on them (the latest of the commits').
    pub fn finish(mut self) -> (Rows<'a>, i64) {
        self.rows.finish(&self.heads, &self.months);
        (self.rows, self.now_ms)
    }
}

/// Commits for the tests of the backends' commit paths.
#[cfg(test)]
pub(crate) mod test_commits {
    use std::sync::Arc;

    use crate::storage::CommitRequest;

    pub const MONTH: &str = "2025-01";

    pub fn hash(trace: &str, hop: u64) -> String {
        format!("sha256:{trace}-{hop}")
    }

    /// A commit of `key` appending `hop` to `trace`, linked to the previous hop, at `hop` ms,
    /// billed by the default plan.
    pub fn commit(tenant: &str, key: &str, trace: &str, hop: u64) -> CommitRequest {
        CommitRequest {
            tenant: tenant.into(),
            idempotency_key: key.into(),
            fingerprint: format!("fp-{key}"),
            trace_id: trace.into(),
            hop,
            receipt_hash: hash(trace, hop),
            prev_receipt_hash: (hop > 1).then(|| hash(trace, hop - 1)),
            receipt: format!(r#"{{"hop":{hop}}}"#),
            response: format!(r#"{{"key":"{key}"}}"#).into(),
            fu_tokens: 0,
            month: MONTH.into(),
            now_ms: hop as i64,
            deadline_ms: None,
            chain_max: 10,
            plan: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Arc;

    use rust_decimal::Decimal;
    use signet_protocol::internal::Rejection;

    use super::test_commits::{commit, hash, MONTH};
    use super::*;
    use crate::billing::{BillingPlan, MeterPlan, Tier};

    fn trace(tenant: &str, trace: &str, hop: u64) -> TraceState {
        TraceState {
            tenant: tenant.into(),
            head: Head {
                hop,
                receipt_hash: hash(trace, hop),
            },
        }
    }

    fn run<'a>(locked: Locked, requests: &'a [CommitRequest]) -> Decided<'a> {
        let requests: Vec<&CommitRequest> = requests.iter().collect();
        decide_batch(locked, &requests)
    }

    fn month_rows<'a>(rows: &Rows<'a>) -> Vec<(&'a str, &'a str, i64, i64)> {
        let m = &rows.months;
        (0..m.tenant.len())
            .map(|i| (m.tenant[i], m.month[i], m.vex[i], m.fu[i]))
            .collect()
    }

    #[test]
    fn a_stored_record_replays_and_writes_nothing() {
        let mut locked = Locked::default();
        let stored = Record {
            fingerprint: "fp-k".into(),
            response: r#"{"stored":1}"#.into(),
        };
        locked.records.insert(("t".into(), "k".into()), stored);
        let reused = CommitRequest {
            fingerprint: "other".into(),
            ..commit("t", "k", "a", 1)
        };
        let requests = [commit("t", "k", "a", 1), reused];
        let d = run(locked, &requests);
        assert_eq!(
            d.outcomes,
            vec![
                CommitOutcome::Replay {
                    response: r#"{"stored":1}"#.into()
                },
                CommitOutcome::Rejected(Rejection::KeyReused),
            ]
        );
        assert!(d.rows.is_empty());
        assert_eq!(d.rows, Rows::default(), "not even a month row");
    }

    #[test]
    fn twins_of_one_key_store_once_and_replay_the_first() {
        let twin = commit("t", "k", "a", 1);
        let other_body = CommitRequest {
            fingerprint: "fp-changed".into(),
            ..commit("t", "k", "a", 1)
        };
        let requests = [twin.clone(), twin, other_body];
        let d = run(Locked::default(), &requests);
        assert_eq!(
            d.outcomes,
            vec![
                CommitOutcome::Committed,
                CommitOutcome::Replay {
                    response: r#"{"key":"k"}"#.into()
                },
                CommitOutcome::Rejected(Rejection::KeyReused),
            ]
        );
        assert_eq!(d.rows.receipts.trace_id, ["a"]);
        assert_eq!(d.rows.keys.key, ["k"]);
        assert_eq!(d.rows.ledger.receipt_hash, [hash("a", 1).as_str()]);
        assert_eq!(month_rows(&d.rows), [("t", MONTH, 1, 0)], "one VEx");
    }

    #[test]
    fn two_hops_of_one_trace_append_in_order_and_leave_one_head() {
        let mut locked = Locked::default();
        locked
            .traces
            .insert(("t".into(), "a".into()), trace("t", "a", 3));
        let requests = [
            commit("t", "k4", "a", 4),
            commit("t", "n1", "new", 1),
            commit("t", "k5", "a", 5),
        ];
        let d = run(locked, &requests);
        assert_eq!(d.outcomes, vec![CommitOutcome::Committed; 3]);
        let r = &d.rows.receipts;
        assert_eq!(r.trace_id, ["a", "new", "a"]);
        assert_eq!(r.hop, [4, 1, 5]);
        assert_eq!(
            r.prev_receipt_hash,
            [
                Some(hash("a", 3).as_str()),
                None,
                Some(hash("a", 4).as_str())
            ]
        );
        let h = &d.rows.heads;
        assert_eq!(
            h.trace_id,
            ["a", "new"],
            "each trace once, first seen first"
        );
        assert_eq!(h.head_hop, [5, 1]);
        assert_eq!(
            h.head_hash,
            [hash("a", 5).as_str(), hash("new", 1).as_str()]
        );
        assert_eq!(h.tenant, ["t", "t"]);
        assert_eq!(d.now_ms, 5, "the latest commit's time");
    }

    #[test]
    fn a_conflict_after_an_append_names_the_head_the_append_left() {
        let requests = [
            commit("t", "first", "a", 1),
            commit("t", "second", "a", 1),
            commit("t", "fourth", "a", 3),
        ];
        let d = run(Locked::default(), &requests);
        assert_eq!(
            d.outcomes,
            vec![
                CommitOutcome::Committed,
                CommitOutcome::Rejected(Rejection::ChainConflict {
                    head: Some(trace("t", "a", 1).head)
                }),
                CommitOutcome::Rejected(Rejection::ChainConflict {
                    head: Some(trace("t", "a", 1).head)
                }),
            ]
        );
        assert_eq!(d.rows.receipts.hop, [1]);
        assert_eq!(d.rows.keys.key, ["first"], "a refused key is not recorded");
        assert_eq!(d.rows.heads.head_hop, [1]);
    }

    /// SPEC §2: tenant A's `a` and tenant B's `a` are two chains; neither sees the other.
    #[test]
    fn one_trace_id_of_two_tenants_is_two_chains() {
        let mut locked = Locked::default();
        locked
            .traces
            .insert(("t".into(), "a".into()), trace("t", "a", 3));
        let requests = [
            commit("other", "theirs-1", "a", 1),
            commit("t", "mine-4", "a", 4),
            commit("other", "theirs-2", "a", 2),
            commit("other", "theirs-5", "a", 5),
        ];
        let d = run(locked, &requests);
        assert_eq!(
            d.outcomes[..3],
            [
                CommitOutcome::Committed,
                CommitOutcome::Committed,
                CommitOutcome::Committed
            ]
        );
        assert_eq!(
            d.outcomes[3],
            CommitOutcome::Rejected(Rejection::ChainConflict {
                head: Some(Head {
                    hop: 2,
                    receipt_hash: hash("a", 2)
                })
            })
        );
        let h = &d.rows.heads;
        assert_eq!(
            (&h.tenant[..], &h.head_hop[..]),
            (&["other", "t"][..], &[2, 4][..])
        );
    }

    #[test]
    fn the_cap_counts_the_receipts_appended_in_the_batch() {
        let mut locked = Locked::default();
        locked
            .traces
            .insert(("t".into(), "a".into()), trace("t", "a", 9));
        let requests = [commit("t", "k10", "a", 10), commit("t", "k11", "a", 11)];
        let d = run(locked, &requests);
        assert_eq!(
            d.outcomes,
            vec![
                CommitOutcome::Committed,
                CommitOutcome::Rejected(Rejection::ChainFull)
            ]
        );
    }

    #[test]
    fn month_counters_and_billing_lines_accumulate_over_the_batch() {
        let price = Decimal::from_str("0.5").unwrap();
        let plan = Arc::new(BillingPlan {
            vex: MeterPlan {
                reserved: 6,
                tiers: vec![Tier {
                    threshold: 100,
                    price_per_unit: price,
                    stripe_item: Some("si_vex".into()),
                }],
                default_stripe_item: None,
            },
            fu: MeterPlan {
                reserved: 100,
                tiers: vec![],
                default_stripe_item: Some("si_fu".into()),
            },
        });
        let with = |tenant: &str, key: &str, hop: u64, fu: u64, month: &str| CommitRequest {
            fu_tokens: fu,
            month: month.into(),
            plan: plan.clone(),
            ..commit(tenant, key, &format!("{tenant}-trace"), hop)
        };
        let mut locked = Locked::default();
        // 5 VEx and 90 FU stored this month; nothing stored for "u" nor for next month.
        let stored = Usage { vex: 5, fu: 90 };
        locked.months.insert(("t".into(), MONTH.into()), stored);
        let requests = [
            with("t", "a", 1, 4, MONTH),     // vex 6 (reserved), fu 94
            with("u", "b", 1, 7, MONTH),     // another tenant's month
            with("t", "c", 2, 10, MONTH),    // vex 7: 1 over; fu 104: 4 over
            with("t", "d", 2, 1, MONTH),     // conflict: counts nothing
            with("t", "e", 3, 0, "2025-02"), // next month, within its reservation
            with("t", "f", 4, 3, MONTH),     // vex 8: 1 over; fu 107: 3 over
        ];
        let d = run(locked, &requests);
        assert!(matches!(
            d.outcomes[3],
            CommitOutcome::Rejected(Rejection::ChainConflict { .. })
        ));
        assert_eq!(
            month_rows(&d.rows),
            [
                ("t", MONTH, 8, 107),
                ("u", MONTH, 1, 7),
                ("t", "2025-02", 1, 0)
            ]
        );
        assert_eq!(d.rows.ledger.fu, [4, 7, 10, 0, 3]);
        assert_eq!(d.rows.ledger.month[3], "2025-02");
        let b = &d.rows.billing;
        assert_eq!(b.len(), 4);
        assert_eq!(b.meter, ["vex", "fu", "vex", "fu"]);
        assert_eq!(b.units, [1, 4, 1, 3]);
        assert_eq!(b.tenant, ["t"; 4]);
        assert_eq!(b.month, [MONTH; 4]);
        assert_eq!(b.band, [0; 4]);
        let item = |s: &str| Some(s.to_owned());
        assert_eq!(
            b.stripe_item,
            [item("si_vex"), item("si_fu"), item("si_vex"), item("si_fu")]
        );
        assert_eq!(b.price_per_unit, [item("0.5"), None, item("0.5"), None]);
        assert_eq!(b.amount, [item("0.5"), None, item("0.5"), None]);
        let c2 = hash("t-trace", 2);
        let f4 = hash("t-trace", 4);
        assert_eq!(
            b.idempotency_key,
            [
                format!("{c2}/vex/0"),
                format!("{c2}/fu/0"),
                format!("{f4}/vex/0"),
                format!("{f4}/fu/0")
            ]
        );
    }

    #[test]
    fn a_commit_past_its_deadline_when_locked_writes_nothing() {
        let locked = Locked {
            locked_at_ms: 1_000,
            ..Locked::default()
        };
        let with_deadline = |key: &str, hop: u64, deadline: Option<u64>| CommitRequest {
            deadline_ms: deadline,
            ..commit("t", key, "a", hop)
        };
        let requests = [
            with_deadline("late", 1, Some(999)),
            with_deadline("just", 1, Some(1_000)),
            with_deadline("none", 2, None),
            with_deadline("late-replay", 1, Some(0)),
        ];
        let d = run(locked, &requests);
        use CommitOutcome::{Committed, Expired};
        assert_eq!(d.outcomes, [Expired, Committed, Committed, Expired]);
        assert_eq!(d.rows.keys.key, ["just", "none"]);
        assert_eq!(month_rows(&d.rows), [("t", MONTH, 2, 0)]);
    }

    #[test]
    fn a_commit_that_would_overflow_a_counter_is_refused_and_counts_nothing() {
        let max = i64::MAX as u64;
        let mut locked = Locked::default();
        let stored = Usage {
            vex: 1,
            fu: max - 1,
        };
        locked.months.insert(("t".into(), MONTH.into()), stored);
        let with_fu = |key: &str, hop: u64, fu: u64| CommitRequest {
            fu_tokens: fu,
            ..commit("t", key, "a", hop)
        };
        let requests = [
            with_fu("over", 1, 2),
            with_fu("wraps", 1, u64::MAX),
            with_fu("fits", 1, 1),
            with_fu("over-by-one", 2, 1),
        ];
        let d = run(locked, &requests);
        use CommitOutcome::{Committed, CounterOverflow};
        assert_eq!(
            d.outcomes,
            [CounterOverflow, CounterOverflow, Committed, CounterOverflow]
        );
        assert_eq!(d.rows.receipts.hop, [1]);
        assert_eq!(month_rows(&d.rows), [("t", MONTH, 2, i64::MAX)]);
        assert_eq!(d.rows.ledger.fu, [1]);
    }

    #[test]
    fn a_decision_of_one_sees_what_was_locked_for_it() {
        let req = commit("t", "k", "a", 2);
        let locked = Locked::of_one(
            &req,
            None,
            Some(trace("t", "a", 1)),
            Some(Usage { vex: 41, fu: 2 }),
        );
        let mut batch = Batch::new(locked);
        assert_eq!(batch.decide(&req), CommitOutcome::Committed);
        let (rows, now_ms) = batch.finish();
        assert_eq!(month_rows(&rows), [("t", MONTH, 42, 2)]);
        assert_eq!(now_ms, 2);
        let record = Record {
            fingerprint: "fp-k".into(),
            response: "{}".into(),
        };
        let locked = Locked::of_one(&req, Some(record), None, None);
        let d = decide_batch(locked, &[&req]);
        assert_eq!(
            d.outcomes,
            vec![CommitOutcome::Replay {
                response: "{}".into()
            }]
        );
    }
}
