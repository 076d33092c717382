-- Delegated sessions: challenges waiting for the controller's signature,
-- the sessions they open, and the spends made under a session.
-- u128 amounts are decimal TEXT (as in the SQLite schema, which has no
-- 128-bit integers); scopes are a JSON array of strings, in order.

CREATE TABLE challenges (
    id          TEXT    NOT NULL PRIMARY KEY,
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    delegate    TEXT    NOT NULL,
    scopes      TEXT    NOT NULL,
    cap         TEXT    NOT NULL,
    nonce       BYTEA   NOT NULL,
    typed_data  TEXT    NOT NULL,
    issued_at   BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    consumed_at BIGINT
);

CREATE INDEX challenges_account ON challenges (account_id);

CREATE TABLE sessions (
    id           TEXT    NOT NULL PRIMARY KEY,
    account_id   TEXT    NOT NULL REFERENCES accounts (id),
    delegate     TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    cap          TEXT    NOT NULL,
    remaining    TEXT    NOT NULL,
    uses         BIGINT  NOT NULL,
    issued_at    BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    challenge_id TEXT    NOT NULL UNIQUE REFERENCES challenges (id),
    jti          TEXT    NOT NULL,
    revoked_at   BIGINT,
    revoked_by   TEXT
);

CREATE INDEX sessions_account ON sessions (account_id, issued_at DESC, id);

CREATE TABLE spends (
    session_id  TEXT    NOT NULL REFERENCES sessions (id),
    request_id  TEXT    NOT NULL,
    body_hash   BYTEA   NOT NULL,
    amount      TEXT    NOT NULL,
    nonce       BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL,
    response    BYTEA,
    PRIMARY KEY (session_id, request_id)
);
