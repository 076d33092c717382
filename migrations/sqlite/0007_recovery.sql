-- Cancellation safety and readiness (issue 11).
-- The recovery sweep looks for spends still pending past a bound.
CREATE INDEX spends_pending ON spends (created_at) WHERE response IS NULL;

-- One row, rewritten by the readiness probe: a write the store must be able
-- to make (a held lock, a full disk or a read-only database fail it).
CREATE TABLE store_health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at  INTEGER NOT NULL
) STRICT;
