-- Sessions that bound real value (scope grammar 2). `scope_grammar` is 1 for
-- sessions opened before: their plain typed-data scopes stay unbounded, as the
-- wallet granted them. A spend in an asset with its own cap (a `cap:<asset>:`
-- scope) names the asset in `spends.asset` and adds to `session_assets.spent`
-- instead of taking from `sessions.remaining`; NULL: the session's cap.
-- Amounts are decimal TEXT (u128), as elsewhere.

ALTER TABLE sessions ADD COLUMN scope_grammar INTEGER NOT NULL DEFAULT 1;
ALTER TABLE spends ADD COLUMN asset TEXT;
-- A transaction's gas, when it is paid in another asset than what it moves
-- (an ERC-20 transfer pays gas in ether): its amount and asset (NULL: the
-- session's cap), given back with the rest when the spend is released.
ALTER TABLE spends ADD COLUMN fee_asset TEXT;
ALTER TABLE spends ADD COLUMN fee_amount TEXT;

CREATE TABLE session_assets (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    asset      TEXT NOT NULL,
    spent      TEXT NOT NULL,
    PRIMARY KEY (session_id, asset)
) STRICT;
