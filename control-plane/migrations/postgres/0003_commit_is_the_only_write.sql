-- Commit is the only write of an exchange: no more reservations. A key left pending by an
-- earlier version stored nothing, so it goes; a done key keeps its response.
DELETE FROM idempotency WHERE state <> 'done';
ALTER TABLE idempotency DROP COLUMN state, DROP COLUMN lease_until_ms,
    ALTER COLUMN response SET NOT NULL;
ALTER TABLE idempotency RENAME COLUMN updated_ms TO created_ms;
