-- SPEC §2: a trace id names a chain within its tenant: tenant A's `order-42` and tenant B's
-- `order-42` are two chains. Traces and receipts are keyed by (tenant, trace_id); every row
-- keeps its values (a trace had one tenant, so the old keys stay unique under the new ones).
CREATE TABLE traces_v5 (
    trace_id   TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    head_hop   INTEGER NOT NULL,
    head_hash  TEXT,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, trace_id)
);
INSERT INTO traces_v5 (trace_id, tenant, head_hop, head_hash, created_ms)
    SELECT trace_id, tenant, head_hop, head_hash, created_ms FROM traces;
DROP TABLE traces;
ALTER TABLE traces_v5 RENAME TO traces;

CREATE TABLE receipts_v5 (
    trace_id          TEXT NOT NULL,
    hop               INTEGER NOT NULL,
    receipt_hash      TEXT NOT NULL UNIQUE,
    prev_receipt_hash TEXT,
    tenant            TEXT NOT NULL,
    body              TEXT NOT NULL,
    stored_ms         INTEGER NOT NULL,
    PRIMARY KEY (tenant, trace_id, hop)
);
INSERT INTO receipts_v5 (trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms)
    SELECT trace_id, hop, receipt_hash, prev_receipt_hash, tenant, body, stored_ms FROM receipts;
DROP TABLE receipts;
ALTER TABLE receipts_v5 RENAME TO receipts;
CREATE TRIGGER receipts_no_update BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
