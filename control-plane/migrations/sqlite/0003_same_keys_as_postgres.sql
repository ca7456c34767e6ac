-- What tests/schema_parity.rs found SQLite lacked and PostgreSQL had from its first version.
--
-- A ledger row and a billing line are written once, by the commit that stores their receipt
-- (whose hash is unique), so no existing database holds duplicates; should one, this migration
-- fails and the service does not start.
CREATE UNIQUE INDEX usage_ledger_receipt_hash_key ON usage_ledger (receipt_hash);
CREATE UNIQUE INDEX billing_queue_idempotency_key_key ON billing_queue (idempotency_key);

-- A primary key that is not INTEGER accepts NULL in SQLite unless declared NOT NULL, and a
-- column cannot be altered: both tables are copied into their NOT NULL form. Every row written
-- has a key, so the copy is the same rows.
CREATE TABLE traces_v3 (
    trace_id   TEXT NOT NULL PRIMARY KEY,
    tenant     TEXT NOT NULL,
    head_hop   INTEGER NOT NULL,
    head_hash  TEXT,
    created_ms INTEGER NOT NULL
);
INSERT INTO traces_v3 (trace_id, tenant, head_hop, head_hash, created_ms)
    SELECT trace_id, tenant, head_hop, head_hash, created_ms FROM traces;
DROP TABLE traces;
ALTER TABLE traces_v3 RENAME TO traces;

CREATE TABLE signing_keys_v3 (
    kid           TEXT NOT NULL PRIMARY KEY,
    jwk           TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL
);
INSERT INTO signing_keys_v3 (kid, jwk, first_seen_ms)
    SELECT kid, jwk, first_seen_ms FROM signing_keys;
DROP TABLE signing_keys;
ALTER TABLE signing_keys_v3 RENAME TO signing_keys;
