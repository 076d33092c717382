-- Account lifecycle: freezing, deletion, and the change feed replicas evict
-- their key caches from. A frozen account signs nothing (sessions included)
-- until it is unfrozen; reads still work. A deleted account keeps its row (a
-- tombstone: its id is never reused, its audit events still name it) and its
-- public keys; its wrapped private keys are emptied (kek_version 0).
ALTER TABLE accounts ADD COLUMN frozen_at INTEGER;
ALTER TABLE accounts ADD COLUMN frozen_reason TEXT;
ALTER TABLE accounts ADD COLUMN deleted_at INTEGER;

-- One row per change to an account's record (label, grants, freezing),
-- written in the changing transaction. Every replica reads the rows of the
-- last few seconds (by wall time `changed_at`, so a transaction that commits
-- late is still seen) and drops those accounts from its cache.
CREATE TABLE account_changes (
    seq        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    account_id TEXT    NOT NULL,
    changed_at INTEGER NOT NULL
) STRICT;
CREATE INDEX account_changes_at ON account_changes (changed_at);

-- Controller changes: asked by the current controller (a signed EIP-712
-- ControllerChange, `digest` its signing hash, never accepted twice) or by an
-- operator; they take effect at `effective_at` (the deployment's delay) unless
-- cancelled first. At most one is pending per account.
CREATE TABLE controller_changes (
    id             TEXT    NOT NULL PRIMARY KEY,
    account_id     TEXT    NOT NULL,
    old_controller TEXT    NOT NULL,
    new_controller TEXT    NOT NULL,
    requested_by   TEXT    NOT NULL,
    requested_at   INTEGER NOT NULL,
    effective_at   INTEGER NOT NULL,
    digest         TEXT    UNIQUE,
    state          TEXT    NOT NULL CHECK (state IN ('pending', 'applied', 'cancelled')),
    settled_at     INTEGER
) STRICT;
CREATE UNIQUE INDEX controller_changes_one_pending ON controller_changes (account_id) WHERE state = 'pending';
CREATE INDEX controller_changes_due ON controller_changes (effective_at) WHERE state = 'pending';

-- Import jobs (bring your own key): each names a one-time RSA transport key on
-- the token (label keyward-import-<id>); a job serves one import, before it
-- expires.
CREATE TABLE import_jobs (
    id         TEXT    NOT NULL PRIMARY KEY,
    created_by TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
) STRICT;
