//! Single flight for tenant lookups: the exchanges of one worker that miss the tenant cache for
//! the same API key share one callout. The first queues the lookup; the others wait for its
//! answer, which is every waiter's answer. Like commits, lookups leave from the root context
//! (`wasm/root.rs`): an answer must reach the waiters even when the exchange that asked first
//! has ended. At most [`MAX_LOOKUPS`] keys are looked up at once on a worker (beyond: 503, like
//! a full commit queue), so a flood of random keys cannot grow this without bound; answers
//! that a key is unknown are cached briefly (`pipeline::tenant_cache`).
//!
//! Pure logic, keyed by the API key's hash.

use std::collections::HashMap;

use crate::commit_queue::Member;

/// Most distinct keys looked up at once on one worker.
pub const MAX_LOOKUPS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// The first for this key: the lookup is queued; wake the root to send it.
    Send,
    /// A lookup of this key is already queued or out: wait for its answer.
    Wait,
    /// Too many keys are being looked up on this worker.
    Full,
}

pub struct TenantLookups<L> {
    /// Waiters by key hash, the first one's lookup with them until it is sent.
    waiting: HashMap<String, Vec<Member>>,
    queued: Vec<(String, L)>,
}

impl<L> Default for TenantLookups<L> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            queued: Vec::new(),
        }
    }
}

impl<L> TenantLookups<L> {
    /// `member` waits for the lookup of `key_hash`; `lookup` is what to send if none is out.
    pub fn join(&mut self, key_hash: &str, member: Member, lookup: L) -> Join {
        if let Some(waiters) = self.waiting.get_mut(key_hash) {
            waiters.push(member);
            return Join::Wait;
        }
        if self.waiting.len() >= MAX_LOOKUPS {
            return Join::Full;
        }
        self.waiting.insert(key_hash.to_owned(), vec![member]);
        self.queued.push((key_hash.to_owned(), lookup));
        Join::Send
    }

    /// The lookups to send now, each key once.
    pub fn take_queued(&mut self) -> Vec<(String, L)> {
        std::mem::take(&mut self.queued)
    }

    /// The answer of `key_hash`'s lookup has come (or it could not be sent): every member that
    /// waits for it, in order; the next miss of the key asks again.
    pub fn complete(&mut self, key_hash: &str) -> Vec<Member> {
        self.queued.retain(|(k, _)| k != key_hash);
        self.waiting.remove(key_hash).unwrap_or_default()
    }

    pub fn in_flight(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_lookups_of_one_key_share_one_callout() {
        let mut l = TenantLookups::default();
        assert_eq!(l.join("a", 1, "lookup a"), Join::Send);
        assert_eq!(l.join("a", 2, "lookup a again"), Join::Wait);
        assert_eq!(l.join("b", 3, "lookup b"), Join::Send);
        assert_eq!(
            l.take_queued(),
            vec![("a".into(), "lookup a"), ("b".into(), "lookup b")]
        );
        // sent: later exchanges still wait for the answer out
        assert_eq!(l.join("a", 4, "lookup a"), Join::Wait);
        assert!(l.take_queued().is_empty());
        assert_eq!(l.complete("a"), vec![1, 2, 4]);
        assert_eq!(l.complete("a"), Vec::<Member>::new(), "answered once");
        // the next miss asks again
        assert_eq!(l.join("a", 5, "lookup a"), Join::Send);
        assert_eq!(l.in_flight(), 2);
    }

    #[test]
    fn a_lookup_that_could_not_be_sent_releases_its_waiters() {
        let mut l = TenantLookups::default();
        l.join("a", 1, ());
        l.join("a", 2, ());
        assert_eq!(l.complete("a"), vec![1, 2]);
        assert!(l.take_queued().is_empty(), "never sent after");
    }

    #[test]
    fn at_most_max_lookups_keys_at_once() {
        let mut l = TenantLookups::default();
        for i in 0..MAX_LOOKUPS {
            assert_eq!(l.join(&format!("k{i}"), 1, ()), Join::Send);
        }
        assert_eq!(l.join("one more", 2, ()), Join::Full);
        assert_eq!(
            l.join("k0", 2, ()),
            Join::Wait,
            "a key already out can be waited for"
        );
        l.complete("k0");
        assert_eq!(l.join("one more", 2, ()), Join::Send);
    }
}
