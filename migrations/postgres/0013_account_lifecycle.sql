-- Account lifecycle: freezing, deletion, and the change feed replicas evict
-- their key caches from. A frozen account signs nothing (sessions included)
-- until it is unfrozen; reads still work. A deleted account keeps its row (a
-- tombstone: its id is never reused, its audit events still name it) and its
-- public keys; its wrapped private keys are emptied (kek_version 0).
ALTER TABLE accounts ADD COLUMN frozen_at BIGINT;
ALTER TABLE accounts ADD COLUMN frozen_reason TEXT;
ALTER TABLE accounts ADD COLUMN deleted_at BIGINT;

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
