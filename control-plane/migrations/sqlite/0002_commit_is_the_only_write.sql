-- Commit is the only write of an exchange: no more reservations. A key left pending by an
-- earlier version stored nothing, so it goes; a done key keeps its response.
CREATE TABLE idempotency_v2 (
    tenant      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
);
INSERT INTO idempotency_v2 (tenant, key, fingerprint, response, created_ms)
    SELECT tenant, key, fingerprint, response, updated_ms FROM idempotency WHERE state = 'done';
DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
