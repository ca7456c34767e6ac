-- Idempotency records expire after the retention (the sweep deletes the oldest first): an
-- index on their age keeps each pass of the sweep bounded.
CREATE INDEX idempotency_created_ms ON idempotency (created_ms);
