-- Issue #12: every unique index is a B-tree that a commit writes at a random place, and the
-- p99 follows the pages a checkpoint has to write back. An exchange's ledger row and billing
-- lines are written by the commit that stores its receipt, in one transaction, and
-- receipts.receipt_hash is unique: their own unique keys on the same hash only repeat it.
-- A provider call (issue #10) has no receipt: its ledger row, keyed `fallback:<reservation>`
-- with an empty trace, keeps a unique key of its own, and its billing lines are written with it.
DROP INDEX usage_ledger_receipt_hash_key;
DROP INDEX billing_queue_idempotency_key_key;
CREATE UNIQUE INDEX usage_ledger_provider_call ON usage_ledger (receipt_hash) WHERE trace_id = '';
