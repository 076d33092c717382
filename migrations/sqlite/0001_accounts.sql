-- Accounts, their wrapped keys and the identities allowed to use them.
-- No plaintext private key is ever stored.

CREATE TABLE accounts (
    id          TEXT    NOT NULL PRIMARY KEY,
    label       TEXT,
    controller  TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE account_keys (
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    alg         TEXT    NOT NULL,
    public_key  BLOB    NOT NULL,
    wrapped     BLOB    NOT NULL,
    kek_version INTEGER NOT NULL,
    key_version INTEGER NOT NULL,
    PRIMARY KEY (account_id, alg, key_version)
) STRICT;

CREATE TABLE account_grants (
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    identity    TEXT    NOT NULL,
    PRIMARY KEY (account_id, identity)
) STRICT;
