-- Account lifecycle: freezing, and the change feed replicas evict their key
-- caches from. A frozen account signs nothing (sessions included) until it
-- is unfrozen; reads still work.
ALTER TABLE accounts ADD COLUMN frozen_at BIGINT;
ALTER TABLE accounts ADD COLUMN frozen_reason TEXT;

-- One row per change to an account's record (label, grants, freezing),
-- written in the changing transaction. Every replica reads the rows of the
-- last few seconds (by wall time `changed_at`, so a transaction that commits
-- late is still seen) and drops those accounts from its cache.
CREATE TABLE account_changes (
    seq        BIGSERIAL PRIMARY KEY,
    account_id TEXT   NOT NULL,
    changed_at BIGINT NOT NULL
);
CREATE INDEX account_changes_at ON account_changes (changed_at);
