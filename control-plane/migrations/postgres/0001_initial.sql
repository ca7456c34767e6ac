CREATE TABLE traces (
    trace_id   TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    head_hop   BIGINT NOT NULL,
    head_hash  TEXT,
    created_ms BIGINT NOT NULL
);
CREATE TABLE receipts (
    trace_id          TEXT NOT NULL,
    hop               BIGINT NOT NULL,
    receipt_hash      TEXT NOT NULL UNIQUE,
    prev_receipt_hash TEXT,
    tenant            TEXT NOT NULL,
    body              TEXT NOT NULL,
    stored_ms         BIGINT NOT NULL,
    PRIMARY KEY (trace_id, hop)
);
CREATE FUNCTION signet_receipts_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'receipts are append-only'; END $$;
CREATE TRIGGER receipts_append_only BEFORE UPDATE OR DELETE ON receipts
    FOR EACH ROW EXECUTE FUNCTION signet_receipts_append_only();
CREATE TABLE idempotency (
    tenant         TEXT NOT NULL,
    key            TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    response       TEXT,
    lease_until_ms BIGINT NOT NULL,
    updated_ms     BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE TABLE usage_ledger (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant       TEXT NOT NULL,
    month        TEXT NOT NULL,
    trace_id     TEXT NOT NULL,
    hop          BIGINT NOT NULL,
    receipt_hash TEXT NOT NULL UNIQUE,
    vex          BIGINT NOT NULL,
    fu           BIGINT NOT NULL,
    created_ms   BIGINT NOT NULL
);
CREATE INDEX usage_ledger_tenant_month ON usage_ledger (tenant, month);
CREATE TABLE usage_monthly (
    tenant TEXT NOT NULL,
    month  TEXT NOT NULL,
    vex    BIGINT NOT NULL,
    fu     BIGINT NOT NULL,
    PRIMARY KEY (tenant, month)
);
CREATE TABLE billing_queue (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          TEXT NOT NULL,
    month           TEXT NOT NULL,
    meter           TEXT NOT NULL CHECK (meter IN ('vex', 'fu')),
    band            INTEGER NOT NULL,
    units           BIGINT NOT NULL CHECK (units > 0),
    stripe_item     TEXT,
    price_per_unit  TEXT,
    amount          TEXT,
    idempotency_key TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX billing_queue_pending ON billing_queue (id) WHERE state = 'pending';
CREATE INDEX billing_queue_tenant ON billing_queue (tenant, month);
CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    jwk           TEXT NOT NULL,
    first_seen_ms BIGINT NOT NULL
);
