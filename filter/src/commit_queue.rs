//! Group commit: the receipts of one worker's exchanges travel to the control plane together,
//! one callout per batch instead of one per exchange. (This is the one place that explains it;
//! elsewhere a pointer.)
//!
//! An exchange ready to commit is queued. When no batch is in flight, everything queued leaves
//! at once (so a lone request waits for nothing); while one is in flight, the next exchanges
//! gather and leave together when it returns. Under load a batch carries the exchanges of one
//! control-plane round trip, which spreads the cost of a callout (Envoy's side and the control
//! plane's HTTP handling) over all of them; the control plane stores them in one transaction.
//!
//! Wire form: a [`CommitBatch`] answered by [`CommitResults`] in the same order
//! (`signet_protocol::internal::commit`). A whole-batch error (a timeout, no answer, a 4xx/5xx)
//! is every member's answer; a 200 that is not this batch's results reads as a 502.
//!
//! Why batches leave from the root context: the SDK hands a callout's answer to the context that
//! was running when it was dispatched, and drops it if that context has ended; any exchange of
//! a batch may end first (its client goes away), while the root lives as long as the VM. The
//! root hands each answer to its exchange with `set_effective_context` (`wasm/root.rs`).
//!
//! Bounds: at most [`MAX_PENDING_COMMITS`] commits and [`MAX_PENDING_BYTES`] wait (besides
//! the batch in flight); a commit that does not fit is refused at once ([`Full`]: the exchange
//! answers 503), so a slow control plane cannot grow the queue until Wasm allocation fails.
//! Every commit carries its deadline (`Commit::deadline_ms`: when it was signed plus the
//! callout timeout, never later than the filter gives up on its batch); the control plane
//! refuses one that arrives late (504 `COMMIT_EXPIRED`), and one whose deadline passes while it
//! waits here is never sent ([`CommitQueue::expire`]). So a receipt is stored only while its
//! client can still receive it.
//!
//! Pure logic; `wasm/root.rs` dispatches the batches.

use serde_json::value::RawValue;
use signet_protocol::internal::commit::{MAX_BATCH_BYTES, MAX_COMMITS};
use signet_protocol::internal::{CommitBatch, CommitResults};

use crate::pipeline::CalloutResponse;

/// Identifies an exchange (its HTTP context id).
pub type Member = u32;

/// Most commits waiting for a batch on one worker.
pub const MAX_PENDING_COMMITS: usize = 1024;
/// Most bytes of commits waiting for a batch on one worker (one commit alone always fits).
pub const MAX_PENDING_BYTES: usize = 32 << 20;

/// The queue is at its bound: the commit was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A batch ready to dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub members: Vec<Member>,
    pub body: Vec<u8>,
}

struct Pending {
    member: Member,
    commit: Box<RawValue>,
    deadline_ms: u64,
}

#[derive(Default)]
pub struct CommitQueue {
    /// Each member's [`signet_protocol::internal::Commit`], serialized once, and its deadline.
    pending: Vec<Pending>,
    pending_bytes: usize,
    in_flight: Option<Vec<Member>>,
    /// The root context was asked to dispatch and has not run yet.
    woken: bool,
}

impl CommitQueue {
    /// Queues one exchange's commit, to be sent before `deadline_ms`. True when the caller must
    /// wake the root context to dispatch (nothing in flight, and it was not woken already).
    pub fn push(
        &mut self,
        member: Member,
        commit: Box<RawValue>,
        deadline_ms: u64,
    ) -> Result<bool, Full> {
        let size = commit.get().len();
        let bytes = self.pending_bytes.saturating_add(size);
        let fits = self.pending.is_empty()
            || (self.pending.len() < MAX_PENDING_COMMITS && bytes <= MAX_PENDING_BYTES);
        if !fits {
            return Err(Full);
        }
        self.pending_bytes = bytes;
        self.pending.push(Pending {
            member,
            commit,
            deadline_ms,
        });
        let wake = self.in_flight.is_none() && !self.woken;
        self.woken |= wake;
        Ok(wake)
    }

    /// Takes out the commits whose deadline has passed while they waited: their exchanges have
    /// given up (they answer 503); sending them would only be refused.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Member> {
        let mut expired = Vec::new();
        self.pending.retain(|p| {
            let late = p.deadline_ms <= now_ms;
            if late {
                expired.push(p.member);
            }
            !late
        });
        self.recount();
        expired
    }

    /// The batch to dispatch now, if none is in flight and something waits: at most
    /// [`MAX_COMMITS`] commits and about [`MAX_BATCH_BYTES`], but always one.
    pub fn next_batch(&mut self) -> Option<Batch> {
        self.woken = false;
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        let mut bytes = 0usize;
        let count = self
            .pending
            .iter()
            .take(MAX_COMMITS)
            .take_while(|p| {
                bytes = bytes.saturating_add(p.commit.get().len().saturating_add(1));
                bytes <= MAX_BATCH_BYTES
            })
            .count()
            .max(1);
        let taken: Vec<Pending> = self.pending.drain(..count).collect();
        self.recount();
        let batch = CommitBatch {
            commits: taken.iter().map(|p| p.commit.as_ref()).collect(),
        };
        // raw JSON members in a list: writing cannot fail
        let body = serde_json::to_vec(&batch).unwrap_or_default();
        let members: Vec<Member> = taken.into_iter().map(|p| p.member).collect();
        self.in_flight = Some(members.clone());
        Some(Batch { members, body })
    }

    /// The in-flight batch's answer, split into each member's answer.
    pub fn complete(&mut self, response: CalloutResponse) -> Vec<(Member, CalloutResponse)> {
        let members = self.in_flight.take().unwrap_or_default();
        if response.status != Some(200) {
            return members
                .into_iter()
                .map(|member| (member, response.clone()))
                .collect();
        }
        let split = serde_json::from_slice::<CommitResults<&RawValue>>(&response.body)
            .ok()
            .filter(|reply| reply.results.len() == members.len());
        match split {
            Some(reply) => members
                .into_iter()
                .zip(reply.results)
                .map(|(member, result)| {
                    let answer = CalloutResponse {
                        status: Some(result.status),
                        body: result.body.get().as_bytes().to_vec(),
                    };
                    (member, answer)
                })
                .collect(),
            // never read a stray 200 as a member's own answer
            None => members
                .into_iter()
                .map(|member| {
                    let bad_gateway = CalloutResponse {
                        status: Some(502),
                        body: Vec::new(),
                    };
                    (member, bad_gateway)
                })
                .collect(),
        }
    }

    /// Takes a queued commit back (its member could not wake the root context).
    pub fn withdraw(&mut self, member: Member) {
        self.pending.retain(|p| p.member != member);
        self.recount();
        if self.pending.is_empty() {
            self.woken = false;
        }
    }

    fn recount(&mut self) {
        self.pending_bytes = self
            .pending
            .iter()
            .fold(0, |n, p| n.saturating_add(p.commit.get().len()));
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A deadline no test reaches.
    const FAR: u64 = u64::MAX;

    fn push(q: &mut CommitQueue, member: Member, commit: Box<RawValue>) -> bool {
        q.push(member, commit, FAR).unwrap()
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    /// A commit of `bytes` bytes (a JSON string).
    fn sized(bytes: usize) -> Box<RawValue> {
        raw(&format!("\"{}\"", "x".repeat(bytes - 2)))
    }

    fn response(status: Option<u16>, body: Value) -> CalloutResponse {
        CalloutResponse {
            status,
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn a_lone_commit_leaves_at_once_and_later_ones_gather() {
        let mut q = CommitQueue::default();
        assert!(push(&mut q, 1, raw(r#"{"a":1}"#)), "wake the root");
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.members, vec![1]);
        assert_eq!(batch.body, br#"{"commits":[{"a":1}]}"#);
        // while it is in flight, nobody needs waking and nothing leaves
        assert!(!push(&mut q, 2, raw("2")));
        assert!(!push(&mut q, 3, raw("3")));
        assert_eq!(q.next_batch(), None);
        let answers = q.complete(response(
            Some(200),
            json!({"results":[{"status":200,"body":{"outcome":"committed"}}]}),
        ));
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, 1);
        assert_eq!(answers[0].1.status, Some(200));
        assert_eq!(answers[0].1.body, br#"{"outcome":"committed"}"#);
        // the ones that gathered leave together
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.members, vec![2, 3]);
        assert_eq!(batch.body, br#"{"commits":[2,3]}"#);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn waking_happens_once_until_the_root_runs() {
        let mut q = CommitQueue::default();
        assert!(push(&mut q, 1, raw("1")));
        assert!(!push(&mut q, 2, raw("2")), "already woken");
        assert_eq!(q.next_batch().unwrap().members, vec![1, 2]);
        q.complete(response(None, json!(null)));
        assert!(push(&mut q, 3, raw("3")), "idle again");
    }

    #[test]
    fn a_withdrawn_commit_does_not_leave() {
        let mut q = CommitQueue::default();
        assert!(push(&mut q, 1, raw("1")));
        q.withdraw(1);
        assert_eq!(q.next_batch(), None);
        assert!(push(&mut q, 2, raw("2")), "idle again");
    }

    #[test]
    fn results_go_to_their_members_in_order() {
        let mut q = CommitQueue::default();
        push(&mut q, 7, raw("{}"));
        push(&mut q, 9, raw("{}"));
        q.next_batch().unwrap();
        let answers = q.complete(response(
            Some(200),
            json!({"results":[
                {"status":200,"body":{"outcome":"replay"}},
                {"status":409,"body":{"code":"CHAIN_CONFLICT","detail":"d","head":{"hop":1,"receipt_hash":"h"}}}
            ]}),
        ));
        assert_eq!(answers[0].0, 7);
        assert_eq!(answers[1].0, 9);
        assert_eq!(answers[1].1.status, Some(409));
        let body: Value = serde_json::from_slice(&answers[1].1.body).unwrap();
        assert_eq!(body["head"]["hop"], 1);
        assert!(!q.in_flight());
    }

    #[test]
    fn a_whole_batch_failure_is_every_members_answer() {
        for failure in [
            response(None, json!(null)),
            response(
                Some(503),
                json!({"code":"STORAGE_UNAVAILABLE","detail":"d"}),
            ),
            response(
                Some(401),
                json!({"code":"FILTER_UNAUTHORIZED","detail":"d"}),
            ),
        ] {
            let mut q = CommitQueue::default();
            push(&mut q, 1, raw("{}"));
            push(&mut q, 2, raw("{}"));
            q.next_batch().unwrap();
            let answers = q.complete(failure.clone());
            assert_eq!(answers, vec![(1, failure.clone()), (2, failure)]);
        }
    }

    #[test]
    fn a_200_that_is_not_this_batchs_reply_is_a_502_for_each_member() {
        for stray in [
            json!({"results":[{"status":200,"body":{}}]}), // one result for two members
            json!({"outcome":"committed","response":{}}),  // a single commit's answer
        ] {
            let mut q = CommitQueue::default();
            push(&mut q, 1, raw("{}"));
            push(&mut q, 2, raw("{}"));
            q.next_batch().unwrap();
            let answers = q.complete(response(Some(200), stray));
            assert!(answers.iter().all(|(_, a)| a.status == Some(502)));
            assert_eq!(answers.len(), 2);
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut q = CommitQueue::default();
        for i in 0..(MAX_COMMITS as u32 + 5) {
            push(&mut q, i, raw("{}"));
        }
        assert_eq!(q.next_batch().unwrap().members.len(), MAX_COMMITS);
        q.complete(response(None, json!(null)));
        assert_eq!(q.next_batch().unwrap().members.len(), 5);
        q.complete(response(None, json!(null)));

        let big = sized(MAX_BATCH_BYTES / 2);
        push(&mut q, 1, big.clone());
        push(&mut q, 2, big.clone());
        push(&mut q, 3, sized(MAX_BATCH_BYTES * 2));
        assert_eq!(q.next_batch().unwrap().members, vec![1]);
        q.complete(response(None, json!(null)));
        assert_eq!(q.next_batch().unwrap().members, vec![2]);
        q.complete(response(None, json!(null)));
        // one commit over the byte budget still leaves, alone
        assert_eq!(q.next_batch().unwrap().members, vec![3]);
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let mut q = CommitQueue::default();
        push(&mut q, 0, raw("0"));
        q.next_batch().unwrap(); // in flight: the rest waits
        for i in 1..=MAX_PENDING_COMMITS as u32 {
            push(&mut q, i, raw("{}"));
        }
        assert_eq!(q.push(9999, raw("{}"), FAR), Err(Full));
        assert_eq!(q.pending(), MAX_PENDING_COMMITS);
        // room again once a batch leaves
        q.complete(response(None, json!(null)));
        q.next_batch().unwrap();
        assert_eq!(q.push(9999, raw("{}"), FAR), Ok(false));
    }

    #[test]
    fn the_byte_budget_bounds_the_queue_but_one_commit_always_fits() {
        let mut q = CommitQueue::default();
        assert!(
            push(&mut q, 1, sized(MAX_PENDING_BYTES + 10)),
            "alone, it fits"
        );
        assert_eq!(q.push(2, raw("{}"), FAR), Err(Full));
        q.withdraw(1);
        push(&mut q, 1, sized(MAX_PENDING_BYTES / 2));
        push(&mut q, 2, sized(MAX_PENDING_BYTES / 2));
        assert_eq!(q.push(3, raw("{}"), FAR), Err(Full));
        // the bytes are released when the commits leave
        assert_eq!(q.next_batch().unwrap().members, vec![1]);
        assert_eq!(q.push(3, raw("{}"), FAR), Ok(false));
    }

    #[test]
    fn commits_past_their_deadline_never_leave() {
        let mut q = CommitQueue::default();
        q.push(1, raw("1"), 100).unwrap();
        q.push(2, raw("2"), 200).unwrap();
        q.push(3, raw("3"), 300).unwrap();
        assert_eq!(q.expire(99), Vec::<Member>::new());
        assert_eq!(q.expire(200), vec![1, 2]);
        let batch = q.next_batch().unwrap();
        assert_eq!(
            (batch.members, batch.body),
            (vec![3], br#"{"commits":[3]}"#.to_vec())
        );
    }
}
