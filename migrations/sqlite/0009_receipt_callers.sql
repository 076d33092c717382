-- Receipt idempotency keys belong to the caller that chose them: one receipt
-- per (account_id, caller, request_id). SQLite cannot drop a UNIQUE
-- constraint, so the table is rebuilt (nothing references it), keeping every
-- row, its seq, and the AUTOINCREMENT counter. Receipts recorded before this
-- migration take their caller from their audit event, where it still exists.

CREATE TABLE receipts_new (
    seq         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    receipt_id  TEXT    NOT NULL UNIQUE,
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    caller      TEXT    NOT NULL,
    request_id  TEXT    NOT NULL,
    body_hash   BLOB    NOT NULL,
    session_id  TEXT,
    created_at  INTEGER NOT NULL,
    jws         TEXT    NOT NULL,
    audit_seq   INTEGER,
    UNIQUE (account_id, caller, request_id)
) STRICT;

INSERT INTO receipts_new
    (seq, receipt_id, account_id, caller, request_id, body_hash, session_id, created_at, jws, audit_seq)
SELECT r.seq, r.receipt_id, r.account_id,
       COALESCE((SELECT e.identity FROM audit_events e WHERE e.seq = r.audit_seq), ''),
       r.request_id, r.body_hash, r.session_id, r.created_at, r.jws, r.audit_seq
FROM receipts r;

DELETE FROM sqlite_sequence WHERE name = 'receipts_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'receipts_new', seq FROM sqlite_sequence WHERE name = 'receipts';

DROP TABLE receipts;
ALTER TABLE receipts_new RENAME TO receipts;
