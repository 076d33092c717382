-- Delegated sessions: challenges waiting for the controller's signature,
-- the sessions they open, and the spends made under a session.
-- u128 amounts are decimal TEXT (SQLite has no 128-bit integers); scopes
-- are a JSON array of strings, in order.

CREATE TABLE challenges (
    id          TEXT    NOT NULL PRIMARY KEY,
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    delegate    TEXT    NOT NULL,
    scopes      TEXT    NOT NULL,
    cap         TEXT    NOT NULL,
    nonce       BLOB    NOT NULL,
    typed_data  TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    consumed_at INTEGER
) STRICT;

CREATE INDEX challenges_account ON challenges (account_id);

CREATE TABLE sessions (
    id           TEXT    NOT NULL PRIMARY KEY,
    account_id   TEXT    NOT NULL REFERENCES accounts (id),
    delegate     TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    cap          TEXT    NOT NULL,
    remaining    TEXT    NOT NULL,
    uses         INTEGER NOT NULL,
    issued_at    INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    challenge_id TEXT    NOT NULL UNIQUE REFERENCES challenges (id),
    jti          TEXT    NOT NULL,
    revoked_at   INTEGER,
    revoked_by   TEXT
) STRICT;

CREATE INDEX sessions_account ON sessions (account_id, issued_at DESC, id);

CREATE TABLE spends (
    session_id  TEXT    NOT NULL REFERENCES sessions (id),
    request_id  TEXT    NOT NULL,
    body_hash   BLOB    NOT NULL,
    amount      TEXT    NOT NULL,
    nonce       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    response    BLOB,
    PRIMARY KEY (session_id, request_id)
) STRICT;
