-- KEK backups (`keyward kek backup`): every KEK wrapped under a recovery key
-- that is split among custodians and never stored. `recovery_check` is
-- SHA-256("keyward recovery check" || id || recovery key), to recognise the
-- key rebuilt from shares; `keks` is JSON: [{version, kind, wrapped, check_value}].
CREATE TABLE kek_backups (
    id             TEXT    NOT NULL PRIMARY KEY,
    created_at     INTEGER NOT NULL,
    created_by     TEXT    NOT NULL,
    threshold      INTEGER NOT NULL,
    shares         INTEGER NOT NULL,
    recovery_check BLOB    NOT NULL,
    keks           TEXT    NOT NULL
) STRICT;
