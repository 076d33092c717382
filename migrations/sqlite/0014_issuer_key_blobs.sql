-- Issuer keys wrapped under the KEK, stored like account keys: any replica
-- whose token holds the KEK (a restored token included) unwraps and signs with
-- them. `wrapped` is NULL for a key that lives only as a token object (made
-- before this migration; `kek_version` NULL too) and for every key that can no
-- longer sign: a key's blob is destroyed when it is retired or revoked, in the
-- same transaction (`kek_version` stays: the key was a stored one).

ALTER TABLE issuer_keys ADD COLUMN wrapped BLOB;
ALTER TABLE issuer_keys ADD COLUMN kek_version INTEGER;
