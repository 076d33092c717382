-- Receipts (issue 5): every signed receipt with the audit sequence number
-- the store assigned to it in the transaction that recorded it. The
-- tamper-evident audit log is later work and will take `seq` over.
-- Idempotency: one receipt per (account_id, request_id).

CREATE TABLE receipts (
    seq         BIGSERIAL PRIMARY KEY,
    receipt_id  TEXT      NOT NULL UNIQUE,
    account_id  TEXT      NOT NULL REFERENCES accounts (id),
    request_id  TEXT      NOT NULL,
    body_hash   BYTEA     NOT NULL,
    session_id  TEXT,
    created_at  BIGINT    NOT NULL,
    jws         TEXT      NOT NULL,
    UNIQUE (account_id, request_id)
);
