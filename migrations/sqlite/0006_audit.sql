-- The tamper-evident audit log: one hash-chained row per decision, the
-- chain head (locked by every append), and signed Merkle checkpoints.
-- Sequence numbers are dense: a removed row leaves a visible gap.

CREATE TABLE audit_events (
    seq           INTEGER NOT NULL PRIMARY KEY,
    time_ms       INTEGER NOT NULL,
    identity      TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    account       TEXT    NOT NULL,
    session       TEXT    NOT NULL,
    request_id    TEXT    NOT NULL,
    decision      TEXT    NOT NULL,
    policies      TEXT    NOT NULL,
    code          TEXT    NOT NULL,
    digest        TEXT    NOT NULL,
    signature_ref TEXT    NOT NULL,
    prev_hash     BLOB    NOT NULL,
    hash          BLOB    NOT NULL
) STRICT;

-- base_*: the last archived and pruned event (0 and zeros if none).
CREATE TABLE audit_head (
    id        INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    base_seq  INTEGER NOT NULL,
    base_hash BLOB    NOT NULL,
    seq       INTEGER NOT NULL,
    hash      BLOB    NOT NULL
) STRICT;
INSERT INTO audit_head (id, base_seq, base_hash, seq, hash) VALUES (1, 0, zeroblob(32), 0, zeroblob(32));

CREATE TABLE audit_checkpoints (
    first_seq  INTEGER NOT NULL PRIMARY KEY,
    last_seq   INTEGER NOT NULL UNIQUE,
    root       BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    jws        TEXT    NOT NULL
) STRICT;

-- A receipt's audit_seq is the seq of its audit event (appended in the
-- transaction that records the receipt); NULL for receipts recorded before.
ALTER TABLE receipts ADD COLUMN audit_seq INTEGER;
