-- Forwarding (SPEC §5): one delivery per (tenant, idempotency key), so that a replay never
-- delivers again, and the outbox of its retries. `next_attempt_ms` is when the delivery is
-- due; a claimed (or first-attempted) delivery has it moved past the attempt's lease and a
-- `lease_token`, so that another instance claims it again only once the lease ran out (a
-- killed instance) and a late answer of a lost lease is not recorded.
CREATE TABLE forward_deliveries (
    id TEXT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    hop BIGINT NOT NULL,
    prev_receipt_hash TEXT,
    -- set when the exchange's receipt is committed; retries after it carry it
    receipt_hash TEXT,
    cid TEXT NOT NULL,
    url TEXT NOT NULL,
    host TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('delivering', 'pending', 'delivered', 'dead')),
    -- attempts started; the budget of attempts and age counts from attempts_base and
    -- window_start_ms, which a re-drive of a dead letter resets
    attempts BIGINT NOT NULL,
    attempts_base BIGINT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    lease_token TEXT,
    -- the receipt's `forwarded` (JSON), the outcome of the first attempt
    first_outcome TEXT,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX forward_deliveries_due ON forward_deliveries (next_attempt_ms)
    WHERE state IN ('delivering', 'pending');
CREATE INDEX forward_deliveries_trace ON forward_deliveries (tenant, trace_id);
CREATE INDEX forward_deliveries_dead ON forward_deliveries (state, tenant);
-- delivered and dead deliveries are removed with their idempotency key's retention
CREATE INDEX forward_deliveries_created ON forward_deliveries (created_ms);

CREATE TABLE forward_attempts (
    delivery_id TEXT NOT NULL REFERENCES forward_deliveries (id),
    attempt BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status_code INTEGER,
    pinned_ip TEXT,
    response_size BIGINT,
    error TEXT,
    PRIMARY KEY (delivery_id, attempt)
);
