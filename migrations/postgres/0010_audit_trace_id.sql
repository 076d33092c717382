-- The W3C trace id of the request an audit event records (empty: none).
-- Part of the event's hash only when non-empty, so existing rows keep theirs.
ALTER TABLE audit_events ADD COLUMN trace_id TEXT NOT NULL DEFAULT '';
