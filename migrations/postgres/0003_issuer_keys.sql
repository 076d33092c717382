-- Issuer key lifecycle (JWKS): next -> active -> retired -> (deleted after
-- the grace period); revoked keys leave the JWKS at once. The public JWK is
-- stored as JSON text; the private key never leaves the HSM (label names it).

CREATE TABLE issuer_keys (
    kid          TEXT    NOT NULL PRIMARY KEY,
    alg          TEXT    NOT NULL,
    label        TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('next', 'active', 'retired', 'revoked')),
    created_at   BIGINT  NOT NULL,
    activated_at BIGINT,
    retired_at   BIGINT,
    revoked_at   BIGINT,
    jwk          TEXT    NOT NULL
);

-- At most one signing key per algorithm, whatever races.
CREATE UNIQUE INDEX issuer_keys_one_active ON issuer_keys (alg) WHERE state = 'active';
