-- The tamper-evident audit log: one hash-chained row per decision, the
-- chain head (locked FOR UPDATE by every append, from every replica), and
-- signed Merkle checkpoints. Sequence numbers are dense: a removed row
-- leaves a visible gap.

CREATE TABLE audit_events (
    seq           BIGINT PRIMARY KEY,
    time_ms       BIGINT NOT NULL,
    identity      TEXT   NOT NULL,
    action        TEXT   NOT NULL,
    account       TEXT   NOT NULL,
    session       TEXT   NOT NULL,
    request_id    TEXT   NOT NULL,
    decision      TEXT   NOT NULL,
    policies      TEXT   NOT NULL,
    code          TEXT   NOT NULL,
    digest        TEXT   NOT NULL,
    signature_ref TEXT   NOT NULL,
    prev_hash     BYTEA  NOT NULL,
    hash          BYTEA  NOT NULL
);

-- base_*: the last archived and pruned event (0 and zeros if none).
CREATE TABLE audit_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    base_seq  BIGINT NOT NULL,
    base_hash BYTEA  NOT NULL,
    seq       BIGINT NOT NULL,
    hash      BYTEA  NOT NULL
);
INSERT INTO audit_head (id, base_seq, base_hash, seq, hash)
VALUES (1, 0, decode(repeat('00', 32), 'hex'), 0, decode(repeat('00', 32), 'hex'));

CREATE TABLE audit_checkpoints (
    first_seq  BIGINT PRIMARY KEY,
    last_seq   BIGINT NOT NULL UNIQUE,
    root       BYTEA  NOT NULL,
    created_at BIGINT NOT NULL,
    jws        TEXT   NOT NULL
);

-- A receipt's audit_seq is the seq of its audit event (appended in the
-- transaction that records the receipt); NULL for receipts recorded before.
ALTER TABLE receipts ADD COLUMN audit_seq BIGINT;
