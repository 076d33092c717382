-- Retention and pagination (issue 12, part 7).
-- The prune finds ended sessions and stale challenges by time; the
-- open-session limit counts an account's open sessions in one index range.
CREATE INDEX sessions_expires ON sessions (expires_at);
CREATE INDEX sessions_revoked ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_open ON sessions (account_id, expires_at) WHERE revoked_at IS NULL;
CREATE INDEX challenges_expires ON challenges (expires_at);
-- ListSessions pages in byte order of the id, whatever the database's
-- collation ("C"), newest first.
DROP INDEX sessions_account;
CREATE INDEX sessions_account ON sessions (account_id, issued_at DESC, id COLLATE "C");
