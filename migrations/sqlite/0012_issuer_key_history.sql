-- Issuer key history: every issuer public key ever stored, with its lifecycle
-- times, kept for as long as anything it signed may need verifying. The
-- `issuer_keys` row of a retired key is deleted after the grace period (its
-- private key is destroyed); its history row stays. Kept by triggers, so a
-- change to `issuer_keys` and its history commit in one transaction, whoever
-- makes it. Times are first-set-wins: a revocation time never moves.

CREATE TABLE issuer_key_history (
    kid          TEXT    NOT NULL PRIMARY KEY,
    alg          TEXT    NOT NULL,
    jwk          TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    activated_at INTEGER,
    retired_at   INTEGER,
    revoked_at   INTEGER
) STRICT;

INSERT INTO issuer_key_history (kid, alg, jwk, created_at, activated_at, retired_at, revoked_at)
SELECT kid, alg, jwk, created_at, activated_at, retired_at, revoked_at FROM issuer_keys;

CREATE TRIGGER issuer_key_history_add AFTER INSERT ON issuer_keys
BEGIN
    INSERT OR IGNORE INTO issuer_key_history (kid, alg, jwk, created_at, activated_at, retired_at, revoked_at)
    VALUES (NEW.kid, NEW.alg, NEW.jwk, NEW.created_at, NEW.activated_at, NEW.retired_at, NEW.revoked_at);
END;

CREATE TRIGGER issuer_key_history_change AFTER UPDATE ON issuer_keys
BEGIN
    UPDATE issuer_key_history SET
        activated_at = COALESCE(activated_at, NEW.activated_at),
        retired_at   = COALESCE(retired_at, NEW.retired_at),
        revoked_at   = COALESCE(revoked_at, NEW.revoked_at)
    WHERE kid = NEW.kid;
END;

-- History is never rewritten or removed.
CREATE TRIGGER issuer_key_history_keep BEFORE DELETE ON issuer_key_history
BEGIN
    SELECT RAISE(ABORT, 'issuer key history is append-only');
END;

CREATE TRIGGER issuer_key_history_fixed BEFORE UPDATE OF kid, alg, jwk, created_at ON issuer_key_history
BEGIN
    SELECT RAISE(ABORT, 'issuer key history is append-only');
END;
