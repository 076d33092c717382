-- Limit counters (policies/limits.toml), kept in the store so they hold
-- across restarts: token buckets (in milli-tokens, refilled from updated_at)
-- and running totals such as an account's daily spend per currency (decimal
-- u128 text, like session amounts).

CREATE TABLE limit_buckets (
    key         TEXT    NOT NULL PRIMARY KEY,
    tokens      INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE limit_totals (
    key         TEXT    NOT NULL PRIMARY KEY,
    total       TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
