-- SPEC §2: a trace id names a chain within its tenant: tenant A's `order-42` and tenant B's
-- `order-42` are two chains. Traces and receipts are keyed by (tenant, trace_id); every row
-- keeps its values (a trace had one tenant, so the old keys stay unique under the new ones).
ALTER TABLE traces DROP CONSTRAINT traces_pkey, ADD PRIMARY KEY (tenant, trace_id);
ALTER TABLE receipts DROP CONSTRAINT receipts_pkey, ADD PRIMARY KEY (tenant, trace_id, hop);
