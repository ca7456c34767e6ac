-- LLM fallback (SPEC §4, §6). A repair first reserves its token estimate against the tenant's
-- month: the quota check sums settled FU (usage_monthly.fu) and the open reservations. At
-- most one reservation per (tenant, idempotency key): one provider call in flight per key.
-- A reservation past expires_ms no longer counts (its call never settled: a crash).
CREATE TABLE fu_reservations (
    id              TEXT NOT NULL PRIMARY KEY,
    tenant          TEXT NOT NULL,
    month           TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    tokens          INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX fu_reservations_tenant_month ON fu_reservations (tenant, month);
-- The settled result of each (tenant, idempotency key): a replay answers it, meters nothing.
CREATE TABLE fallback_repairs (
    tenant          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    status          INTEGER NOT NULL,
    body            TEXT NOT NULL,
    fu_tokens       INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (tenant, idempotency_key)
);
CREATE INDEX fallback_repairs_created_ms ON fallback_repairs (created_ms);
