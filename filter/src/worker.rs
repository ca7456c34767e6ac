//! What one Envoy worker remembers between exchanges, so that an exchange needs one control-plane
//! callout (commit) instead of a reservation before it:
//!
//! - [`InFlight`]: the idempotency keys of this worker's exchanges still running. A twin on the
//!   same worker gets 409 at once; twins on other workers or Envoys both reach commit, where the
//!   control plane stores one and answers the other with the stored response (a replay).
//! - [`HeadCache`]: the last receipt this worker committed per trace, to link the next hop
//!   without asking. A miss, or a head another writer moved, costs one re-sign: commit answers
//!   409 `CHAIN_CONFLICT` with the real head.
//!
//! One instance per Wasm VM (a VM serves one worker thread); nothing here is shared across
//! workers, so nothing needs locking and everything is bounded.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

pub use signet_protocol::internal::Head;

#[derive(Default)]
pub struct WorkerState {
    pub in_flight: InFlight,
    pub heads: HeadCache,
}

/// `(tenant, idempotency key)` pairs in flight.
#[derive(Default)]
pub struct InFlight {
    keys: HashSet<(String, String)>,
}

impl InFlight {
    /// False when the key is already in flight on this worker.
    pub fn enter(&mut self, tenant: &str, key: &str) -> bool {
        self.keys.insert((tenant.to_owned(), key.to_owned()))
    }

    pub fn leave(&mut self, tenant: &str, key: &str) {
        self.keys.remove(&(tenant.to_owned(), key.to_owned()));
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// An exchange's hold on its idempotency key in its worker's [`InFlight`] set, released when
/// dropped: however the exchange ends (an answer, an error, a stream reset), the key is freed.
pub struct InFlightKey {
    worker: Rc<RefCell<WorkerState>>,
    tenant: String,
    key: String,
}

impl InFlightKey {
    /// The hold, or `None` when the key is already in flight on this worker.
    pub fn enter(worker: &Rc<RefCell<WorkerState>>, tenant: &str, key: &str) -> Option<Self> {
        // a worker state in use elsewhere cannot be checked: let the control plane decide
        let entered = worker
            .try_borrow_mut()
            .map_or(true, |mut w| w.in_flight.enter(tenant, key));
        entered.then(|| InFlightKey {
            worker: Rc::clone(worker),
            tenant: tenant.to_owned(),
            key: key.to_owned(),
        })
    }
}

impl InFlightKey {
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for InFlightKey {
    fn drop(&mut self) {
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            w.in_flight.leave(&self.tenant, &self.key);
        }
    }
}

/// Trace heads this worker committed, at most [`HeadCache::CAPACITY`]: two generations, the
/// older dropped whole when the newer fills (O(1), no per-entry bookkeeping; an evicted head only
/// costs a re-sign).
#[derive(Default)]
pub struct HeadCache {
    current: HashMap<String, (String, Head)>,
    previous: HashMap<String, (String, Head)>,
}

impl HeadCache {
    pub const CAPACITY: usize = 8192;

    /// The head of `trace_id` if this worker knows it and the trace is `tenant`'s.
    pub fn get(&self, tenant: &str, trace_id: &str) -> Option<Head> {
        let (owner, head) = self
            .current
            .get(trace_id)
            .or_else(|| self.previous.get(trace_id))?;
        (owner == tenant).then(|| head.clone())
    }

    pub fn put(&mut self, tenant: &str, trace_id: &str, head: Head) {
        if self.current.len() >= Self::CAPACITY / 2 && !self.current.contains_key(trace_id) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current
            .insert(trace_id.to_owned(), (tenant.to_owned(), head));
    }

    /// Forgets the head of the tenant's trace (in either generation).
    pub fn remove(&mut self, tenant: &str, trace_id: &str) {
        for generation in [&mut self.current, &mut self.previous] {
            if generation
                .get(trace_id)
                .is_some_and(|(owner, _)| owner == tenant)
            {
                generation.remove(trace_id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(hop: u64) -> Head {
        Head {
            hop,
            receipt_hash: format!("sha256:{hop}"),
        }
    }

    #[test]
    fn in_flight_keys_are_per_tenant_and_leave() {
        let mut f = InFlight::default();
        assert!(f.enter("a", "k"));
        assert!(!f.enter("a", "k"));
        assert!(f.enter("b", "k"));
        f.leave("a", "k");
        assert!(f.enter("a", "k"));
        f.leave("a", "k");
        f.leave("b", "k");
        assert!(f.is_empty());
    }

    #[test]
    fn an_in_flight_hold_is_exclusive_and_freed_on_drop() {
        let worker = Rc::new(RefCell::new(WorkerState::default()));
        let hold = InFlightKey::enter(&worker, "a", "k");
        assert!(hold.is_some());
        assert!(InFlightKey::enter(&worker, "a", "k").is_none());
        drop(hold);
        assert!(worker.borrow().in_flight.is_empty());
    }

    #[test]
    fn heads_are_per_tenant_and_updated() {
        let mut c = HeadCache::default();
        assert_eq!(c.get("a", "t"), None);
        c.put("a", "t", head(1));
        c.put("a", "t", head(2));
        assert_eq!(c.get("a", "t"), Some(head(2)));
        assert_eq!(
            c.get("b", "t"),
            None,
            "another tenant's trace is not linked to"
        );
    }

    #[test]
    fn heads_stay_bounded_and_recent_ones_survive() {
        let mut c = HeadCache::default();
        for i in 0..(3 * HeadCache::CAPACITY) as u64 {
            c.put("a", &format!("t{i}"), head(i));
            assert!(c.len() <= HeadCache::CAPACITY);
        }
        let last = (3 * HeadCache::CAPACITY - 1) as u64;
        assert_eq!(c.get("a", &format!("t{last}")), Some(head(last)));
        let recent = last - HeadCache::CAPACITY as u64 / 2;
        assert_eq!(c.get("a", &format!("t{recent}")), Some(head(recent)));
        assert_eq!(c.get("a", "t0"), None);
        // an update of a known trace never evicts
        let before = c.len();
        c.put("a", &format!("t{last}"), head(last + 1));
        assert_eq!(c.len(), before);
    }
}
