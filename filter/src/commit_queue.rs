//! Group commit: the receipts of one worker's exchanges travel to the control plane together,
//! one callout per batch instead of one per exchange.
//!
//! An exchange ready to commit is queued. When no batch is in flight, everything queued leaves
//! at once (so a lone request waits for nothing); while one is in flight, the next exchanges
//! gather and leave together when it returns. Under load a batch carries the exchanges of one
//! control-plane round trip, which spreads the cost of a callout (Envoy's side and the control
//! plane's HTTP handling) over all of them; the control plane stores them in one transaction.
//!
//! Wire form (docs/ARCHITECTURE.md): `{"commits":[<commit>, …]}` answered by
//! `{"results":[{"status":200,"body":{…}}, …]}` in the same order. A whole-batch error (a
//! timeout, no answer, a 4xx/5xx) is every member's answer; a 200 that is not a batch reply
//! reads as a 502.
//!
//! Pure logic; `wasm.rs` dispatches the batches from the root context (the SDK routes a
//! callout's answer to the context that dispatched it, and the root outlives every exchange in
//! a batch).

use serde::Deserialize;
use serde_json::Value;

use crate::pipeline::CalloutResponse;

/// Identifies an exchange (its HTTP context id).
pub type Member = u32;

/// A batch ready to dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub members: Vec<Member>,
    pub body: Vec<u8>,
}

#[derive(Default)]
pub struct CommitQueue {
    pending: Vec<(Member, Vec<u8>)>,
    in_flight: Option<Vec<Member>>,
    /// The root context was asked to dispatch and has not run yet.
    woken: bool,
}

#[derive(Deserialize)]
struct BatchReply {
    results: Vec<ItemReply>,
}

#[derive(Deserialize)]
struct ItemReply {
    status: u16,
    body: Value,
}

impl CommitQueue {
    /// At most this many commits per batch,
    pub const MAX_COMMITS: usize = 64;
    /// and at most about this many bytes (a batch always takes one commit, whatever its size;
    /// the control plane accepts 16 MiB).
    pub const MAX_BYTES: usize = 4 << 20;

    /// Queues one exchange's commit (its JSON). True when the caller must wake the root
    /// context to dispatch (nothing in flight, and it was not woken already).
    pub fn push(&mut self, member: Member, commit: Vec<u8>) -> bool {
        self.pending.push((member, commit));
        let wake = self.in_flight.is_none() && !self.woken;
        self.woken |= wake;
        wake
    }

    /// The batch to dispatch now, if none is in flight and something waits.
    pub fn next_batch(&mut self) -> Option<Batch> {
        self.woken = false;
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let count = self
            .pending
            .iter()
            .take(Self::MAX_COMMITS)
            .take_while(|(_, commit)| {
                bytes += commit.len() + 1;
                bytes <= Self::MAX_BYTES
            })
            .count()
            .max(1);
        let taken: Vec<(Member, Vec<u8>)> = self.pending.drain(..count).collect();
        let mut body = Vec::with_capacity(bytes.min(Self::MAX_BYTES) + 16);
        body.extend_from_slice(br#"{"commits":["#);
        for (i, (_, commit)) in taken.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(commit);
        }
        body.extend_from_slice(b"]}");
        let members: Vec<Member> = taken.into_iter().map(|(m, _)| m).collect();
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
        let split = serde_json::from_slice::<BatchReply>(&response.body)
            .ok()
            .filter(|reply| reply.results.len() == members.len());
        match split {
            Some(reply) => members
                .into_iter()
                .zip(reply.results)
                .map(|(member, item)| {
                    let answer = CalloutResponse {
                        status: Some(item.status),
                        body: item.body.to_string().into_bytes(),
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
        self.pending.retain(|(m, _)| *m != member);
        if self.pending.is_empty() {
            self.woken = false;
        }
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
    use serde_json::json;

    fn response(status: Option<u16>, body: Value) -> CalloutResponse {
        CalloutResponse {
            status,
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn a_lone_commit_leaves_at_once_and_later_ones_gather() {
        let mut q = CommitQueue::default();
        assert!(q.push(1, br#"{"a":1}"#.to_vec()), "wake the root");
        let batch = q.next_batch().unwrap();
        assert_eq!(batch.members, vec![1]);
        assert_eq!(batch.body, br#"{"commits":[{"a":1}]}"#);
        // while it is in flight, nobody needs waking and nothing leaves
        assert!(!q.push(2, b"2".to_vec()));
        assert!(!q.push(3, b"3".to_vec()));
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
        assert!(q.push(1, b"1".to_vec()));
        assert!(!q.push(2, b"2".to_vec()), "already woken");
        assert_eq!(q.next_batch().unwrap().members, vec![1, 2]);
        q.complete(response(None, json!(null)));
        assert!(q.push(3, b"3".to_vec()), "idle again");
    }

    #[test]
    fn a_withdrawn_commit_does_not_leave() {
        let mut q = CommitQueue::default();
        assert!(q.push(1, b"1".to_vec()));
        q.withdraw(1);
        assert_eq!(q.next_batch(), None);
        assert!(q.push(2, b"2".to_vec()), "idle again");
    }

    #[test]
    fn results_go_to_their_members_in_order() {
        let mut q = CommitQueue::default();
        q.push(7, b"{}".to_vec());
        q.push(9, b"{}".to_vec());
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
            q.push(1, b"{}".to_vec());
            q.push(2, b"{}".to_vec());
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
            q.push(1, b"{}".to_vec());
            q.push(2, b"{}".to_vec());
            q.next_batch().unwrap();
            let answers = q.complete(response(Some(200), stray));
            assert!(answers.iter().all(|(_, a)| a.status == Some(502)));
            assert_eq!(answers.len(), 2);
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut q = CommitQueue::default();
        for i in 0..(CommitQueue::MAX_COMMITS as u32 + 5) {
            q.push(i, b"{}".to_vec());
        }
        assert_eq!(
            q.next_batch().unwrap().members.len(),
            CommitQueue::MAX_COMMITS
        );
        q.complete(response(None, json!(null)));
        assert_eq!(q.next_batch().unwrap().members.len(), 5);
        q.complete(response(None, json!(null)));

        let big = vec![b'x'; CommitQueue::MAX_BYTES / 2];
        q.push(1, big.clone());
        q.push(2, big.clone());
        q.push(3, vec![b'x'; CommitQueue::MAX_BYTES * 2]);
        assert_eq!(q.next_batch().unwrap().members, vec![1]);
        q.complete(response(None, json!(null)));
        assert_eq!(q.next_batch().unwrap().members, vec![2]);
        q.complete(response(None, json!(null)));
        // one commit over the byte budget still leaves, alone
        assert_eq!(q.next_batch().unwrap().members, vec![3]);
    }
}
