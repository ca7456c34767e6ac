-- The billing reporter (issue #11): queued rows are claimed into reports, one meter event per
-- tenant, meter, band, event_name and window, whose identifier is fixed before the first send.
ALTER TABLE billing_queue ADD COLUMN report_id INTEGER;
CREATE INDEX billing_queue_report ON billing_queue (report_id);
CREATE TABLE billing_reports (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant          TEXT NOT NULL,
    month           TEXT NOT NULL,
    meter           TEXT NOT NULL CHECK (meter IN ('vex', 'fu')),
    band            INTEGER NOT NULL,
    event_name      TEXT,
    stripe_customer TEXT,
    window_start_ms INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    value           INTEGER NOT NULL CHECK (value > 0),
    amount          TEXT,
    row_count       INTEGER NOT NULL,
    identifier      TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN ('sending', 'reported', 'dead', 'unmetered')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_ms      INTEGER NOT NULL,
    first_sent_ms   INTEGER,
    next_attempt_ms INTEGER NOT NULL,
    lease_until_ms  INTEGER NOT NULL DEFAULT 0,
    done_ms         INTEGER,
    last_error      TEXT
);
CREATE UNIQUE INDEX billing_reports_aggregate
    ON billing_reports (tenant, month, meter, band, event_name, window_start_ms, seq);
CREATE INDEX billing_reports_due ON billing_reports (next_attempt_ms) WHERE state = 'sending';
CREATE INDEX billing_reports_tenant ON billing_reports (tenant, month);
CREATE INDEX billing_reports_month ON billing_reports (month, state);
