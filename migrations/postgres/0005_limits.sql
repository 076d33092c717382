-- Limit counters (policies/limits.toml), shared by every replica: token
-- buckets (in milli-tokens, refilled from updated_at) and running totals such
-- as an account's daily spend per currency (decimal u128 text, like session
-- amounts). Updates take the row lock, so replicas count exactly.

CREATE TABLE limit_buckets (
    key         TEXT   NOT NULL PRIMARY KEY,
    tokens      BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE limit_totals (
    key         TEXT   NOT NULL PRIMARY KEY,
    total       TEXT   NOT NULL,
    updated_at  BIGINT NOT NULL
);
