-- Receipt idempotency keys belong to the caller that chose them: one receipt
-- per (account_id, caller, request_id). Receipts recorded before this
-- migration take their caller from their audit event, where it still exists.

ALTER TABLE receipts ADD COLUMN caller TEXT NOT NULL DEFAULT '';
UPDATE receipts r SET caller = e.identity FROM audit_events e WHERE e.seq = r.audit_seq;
ALTER TABLE receipts ALTER COLUMN caller DROP DEFAULT;
ALTER TABLE receipts DROP CONSTRAINT receipts_account_id_request_id_key;
ALTER TABLE receipts ADD CONSTRAINT receipts_account_caller_request UNIQUE (account_id, caller, request_id);
