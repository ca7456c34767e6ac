//! Group commit: concurrent exchanges on one Envoy worker reach the control plane in shared
//! batch callouts, and each still gets its own receipt, counted once, on an unforked chain.

use signet_e2e::payloads::{exchange_body, sample_invoice};
use signet_e2e::stack::{new_idempotency_key, DEMO_KEY, DEMO_TENANT};
use signet_e2e::{Stack, Storage};
use signet_protocol::Jwks;

use crate::assert_ok;

fn post(stack: &Stack, body: &serde_json::Value) -> signet_e2e::http::Response {
    let key = new_idempotency_key();
    stack.exchange_with(
        &[
            ("X-SIGNET-API-Key", DEMO_KEY),
            ("X-SIGNET-Idempotency-Key", key.as_str()),
        ],
        body.to_string().as_bytes(),
    )
}

#[test]
fn concurrent_exchanges_share_batches_and_keep_their_own_receipts() {
    let stack = Stack::start(Storage::Sqlite);
    // the tenant lookup is cached before the burst
    assert_ok(&stack, &post(&stack, &exchange_body(sample_invoice())));
    let (threads, each) = (24, 4);
    let receipts: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    (0..each)
                        .map(|_| {
                            let r = post(&stack, &exchange_body(sample_invoice()));
                            let body = assert_ok(&stack, &r);
                            body["receipt"]["receipt_hash"].as_str().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = threads * each + 1;
    let mut distinct = receipts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        receipts.len(),
        "every exchange its own receipt"
    );
    assert_eq!(stack.vex_count(DEMO_TENANT), total as u64);

    let metrics = stack.control_plane.metrics();
    let batched = metrics.value("signet_cp_commit_batch_size_sum", &[]);
    let batches = metrics.value("signet_cp_commit_batch_size_count", &[]);
    assert_eq!(batched, total as f64, "every commit came in a batch");
    assert!(
        batches < batched,
        "{batches} batch calls for {batched} commits: none was shared"
    );
}

#[test]
fn concurrent_hops_on_one_trace_never_fork_it() {
    let stack = Stack::start(Storage::Sqlite);
    let first = assert_ok(&stack, &post(&stack, &exchange_body(sample_invoice())));
    let trace_id = first["trace_id"].clone();
    let mut body = exchange_body(sample_invoice());
    body["trace_id"] = trace_id.clone();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| post(&stack, &body)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert!(
                    r.status == 200 || (r.status == 409 && r.error_code() == "CHAIN_CONFLICT"),
                    "{} {}",
                    r.status,
                    r.text()
                );
                r.status
            })
            .collect()
    });
    let stored = statuses.iter().filter(|s| **s == 200).count();
    assert!(stored >= 1, "{statuses:?}");
    let chain = stack.chain(trace_id.as_str().unwrap());
    assert_eq!(chain.len(), stored + 1);
    let jwks: Jwks =
        serde_json::from_slice(&stack.client.get(&stack.jwks_url(), &[]).body).unwrap();
    signet_protocol::chain::verify(&chain, Some(&jwks), true).unwrap();
}
