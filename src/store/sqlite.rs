//! The embedded backend: one SQLite file in WAL mode.
//!
//! Readers share a small pool (WAL lets them run beside the writer). Writes
//! are serialised in-process by a mutex and open with `BEGIN IMMEDIATE`, so
//! they take the write lock up front and never fail with `SQLITE_BUSY`
//! half-way; `busy_timeout` covers other processes on the same file.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::Mutex;

use super::{
    challenge_mismatch, conflict_as, count, decide_spend, decode_amount, encode_amount, encode_scopes, encode_uses,
    from_sqlx, grants, normalize, redact_url, sort_sessions, AccountRecord, ChallengeRecord, OpenOutcome, RawChallenge,
    RawKey, RawSession, RawSpend, SessionRecord, SpendDecision, SpendOutcome, SpendRequest, Store, StoreError,
    CHALLENGE_COLUMNS, SESSION_COLUMNS,
};
use super::{
    decide_promote, promoted_outcomes, sort_issuer_keys, IssuerKeyRecord, IssuerKeyState, PromoteAudit, PromoteOutcome,
    RawIssuerKey, RevokeOutcome, SpendEvent, ISSUER_KEY_COLUMNS,
};

const BACKEND: &str = "sqlite";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;

/// The SQLite store.
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    write: Mutex<()>,
    tx: super::TxStats,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it, mode 0600, and its parent directories if missing)
    /// the database at `sqlite://PATH` and runs the migrations.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: redact_url(url),
            reason,
        };
        if !url.starts_with("sqlite:") {
            return Err(invalid("expected sqlite://PATH".into()));
        }
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(invalid("an in-memory database is not persistent".into()));
        }
        let options = SqliteConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))?;
        let path = options.get_filename().to_path_buf();
        if path.as_os_str().is_empty() {
            return Err(invalid("no file path".into()));
        }
        prepare_file(&path).await?;

        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration {
                backend: BACKEND,
                reason: e.to_string(),
            })?;
        tracing::debug!(path = %path.display(), "sqlite store open");
        Ok(SqliteStore {
            pool,
            path,
            write: Mutex::new(()),
            tx: super::TxStats::new(BACKEND)?,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection pool (the audit log's store code).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The single in-process writer lock.
    pub(crate) fn writer(&self) -> &Mutex<()> {
        &self.write
    }
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        backend: BACKEND,
        reason: format!("{what} {}: {e}", path.display()),
    }
}

/// Creates the parent directories (0700) and the file (0600) if missing;
/// narrows the mode of an existing file (and its WAL files) to 0600.
async fn prepare_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .await
            .map_err(|e| io_error(parent, "cannot create directory", e))?;
    }
    tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| io_error(path, "cannot open", e))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    for file in [path.to_path_buf(), PathBuf::from(wal), PathBuf::from(shm)] {
        let meta = match tokio::fs::metadata(&file).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&file, "cannot stat", e)),
        };
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %file.display(), "store file was readable by others; setting mode 0600");
            tokio::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(|e| io_error(&file, "cannot chmod", e))?;
        }
    }
    Ok(())
}

fn raw_challenge(row: &SqliteRow) -> Result<RawChallenge, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawChallenge {
        id: row.try_get("id").map_err(err)?,
        account_id: row.try_get("account_id").map_err(err)?,
        delegate: row.try_get("delegate").map_err(err)?,
        scopes: row.try_get("scopes").map_err(err)?,
        cap: row.try_get("cap").map_err(err)?,
        nonce: row.try_get("nonce").map_err(err)?,
        typed_data: row.try_get("typed_data").map_err(err)?,
        issued_at: row.try_get("issued_at").map_err(err)?,
        expires_at: row.try_get("expires_at").map_err(err)?,
        consumed_at: row.try_get("consumed_at").map_err(err)?,
    })
}

fn raw_session(row: &SqliteRow) -> Result<RawSession, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawSession {
        id: row.try_get("id").map_err(err)?,
        account_id: row.try_get("account_id").map_err(err)?,
        delegate: row.try_get("delegate").map_err(err)?,
        scopes: row.try_get("scopes").map_err(err)?,
        cap: row.try_get("cap").map_err(err)?,
        remaining: row.try_get("remaining").map_err(err)?,
        uses: row.try_get("uses").map_err(err)?,
        issued_at: row.try_get("issued_at").map_err(err)?,
        expires_at: row.try_get("expires_at").map_err(err)?,
        challenge_id: row.try_get("challenge_id").map_err(err)?,
        jti: row.try_get("jti").map_err(err)?,
        revoked_at: row.try_get("revoked_at").map_err(err)?,
        revoked_by: row.try_get("revoked_by").map_err(err)?,
    })
}

/// Reads one session on `conn` (a transaction or the pool).
async fn fetch_session<'e, E>(conn: E, id: &str) -> Result<Option<SessionRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
    row.map(|row| raw_session(&row)?.decode()).transpose()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn audit(&self) -> &dyn crate::audit::AuditStore {
        self
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        Ok(())
    }

    async fn create_account_audited(
        &self,
        rec: &AccountRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, label, controller, created_by, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&rec.id)
        .bind(&rec.label)
        .bind(&rec.controller)
        .bind(&rec.created_by)
        .bind(rec.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("account {}", rec.id)))?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict {
                what: format!("account {}", rec.id),
            });
        }
        for key in &rec.keys {
            sqlx::query(
                "INSERT INTO account_keys \
                 (account_id, alg, public_key, wrapped, kek_version, key_version) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(&rec.id)
            .bind(key.alg.as_str())
            .bind(&key.public_key)
            .bind(&key.wrapped)
            .bind(i64::from(key.kek_version))
            .bind(i64::from(key.key_version))
            .execute(&mut *tx)
            .await
            .map_err(conflict_as(BACKEND, || {
                format!("{} key version {} of account {}", key.alg, key.key_version, rec.id)
            }))?;
        }
        for identity in grants(rec) {
            sqlx::query("INSERT INTO account_grants (account_id, identity) VALUES (?1, ?2)")
                .bind(&rec.id)
                .bind(identity)
                .execute(&mut *tx)
                .await
                .map_err(conflict_as(BACKEND, || {
                    format!("grant {identity} on account {}", rec.id)
                }))?;
        }
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok(seq)
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        // One read transaction: a consistent snapshot of the three tables.
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        let Some(row) = sqlx::query("SELECT id, label, controller, created_by, created_at FROM accounts WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        let mut rec = AccountRecord {
            id: row.try_get("id").map_err(err)?,
            label: row.try_get("label").map_err(err)?,
            controller: row.try_get("controller").map_err(err)?,
            created_by: row.try_get("created_by").map_err(err)?,
            created_at: row.try_get("created_at").map_err(err)?,
            allowed: Vec::new(),
            keys: Vec::new(),
        };
        let rows = sqlx::query(
            "SELECT alg, public_key, wrapped, kek_version, key_version FROM account_keys \
             WHERE account_id = ?1 ORDER BY alg, key_version",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        for row in rows {
            let raw = RawKey {
                alg: row.try_get("alg").map_err(err)?,
                public_key: row.try_get("public_key").map_err(err)?,
                wrapped: row.try_get("wrapped").map_err(err)?,
                kek_version: row.try_get("kek_version").map_err(err)?,
                key_version: row.try_get("key_version").map_err(err)?,
            };
            rec.keys.push(raw.decode(id)?);
        }
        let rows = sqlx::query("SELECT identity FROM account_grants WHERE account_id = ?1 ORDER BY identity")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        for row in rows {
            rec.allowed.push(row.try_get("identity").map_err(err)?);
        }
        tx.commit().await.map_err(err)?;
        normalize(&mut rec);
        Ok(Some(rec))
    }

    async fn count_accounts(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        count(n)
    }

    async fn create_challenge(&self, c: &ChallengeRecord) -> Result<(), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let scopes = encode_scopes(BACKEND, &c.scopes)?;
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let inserted = sqlx::query(
            "INSERT INTO challenges \
             (id, account_id, delegate, scopes, cap, nonce, typed_data, issued_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.account_id)
        .bind(&c.delegate)
        .bind(scopes)
        .bind(encode_amount(c.cap))
        .bind(&c.nonce[..])
        .bind(&c.typed_data)
        .bind(c.issued_at)
        .bind(c.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("challenge {}", c.id)))?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict {
                what: format!("challenge {}", c.id),
            });
        }
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    async fn get_challenge(&self, id: &str) -> Result<Option<(ChallengeRecord, Option<i64>)>, StoreError> {
        let sql = format!("SELECT {CHALLENGE_COLUMNS} FROM challenges WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        row.map(|row| raw_challenge(&row)?.decode()).transpose()
    }

    async fn open_session_audited(
        &self,
        challenge_id: &str,
        now: i64,
        session: &SessionRecord,
        max_open: Option<u64>,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(OpenOutcome, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        if session.challenge_id != challenge_id {
            return Err(challenge_mismatch(BACKEND, challenge_id, session));
        }
        let what = format!("session {}", session.id);
        let scopes = encode_scopes(BACKEND, &session.scopes)?;
        let uses = encode_uses(&what, session.uses)?;
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let row = sqlx::query("SELECT consumed_at, expires_at FROM challenges WHERE id = ?1")
            .bind(challenge_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let refusal = match row {
            None => Some(OpenOutcome::ChallengeNotFound),
            Some(row) => {
                let consumed_at: Option<i64> = row.try_get("consumed_at").map_err(err)?;
                let expires_at: i64 = row.try_get("expires_at").map_err(err)?;
                if consumed_at.is_some() {
                    Some(OpenOutcome::ChallengeUsed)
                } else if now >= expires_at {
                    Some(OpenOutcome::ChallengeExpired)
                } else {
                    None
                }
            }
        };
        let refusal = match (refusal, max_open) {
            (None, Some(max)) => {
                let open: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sessions WHERE account_id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                )
                .bind(&session.account_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
                let open = count(open)?;
                (open >= max).then_some(OpenOutcome::TooManyOpen(open))
            }
            (refusal, _) => refusal,
        };
        if let Some(outcome) = refusal {
            tx.rollback().await.map_err(err)?;
            return Ok((outcome, None));
        }
        sqlx::query("UPDATE challenges SET consumed_at = ?1 WHERE id = ?2")
            .bind(now)
            .bind(challenge_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "INSERT INTO sessions \
             (id, account_id, delegate, scopes, cap, remaining, uses, issued_at, expires_at, \
              challenge_id, jti, revoked_at, revoked_by) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .bind(&session.id)
        .bind(&session.account_id)
        .bind(&session.delegate)
        .bind(scopes)
        .bind(encode_amount(session.cap))
        .bind(encode_amount(session.remaining))
        .bind(uses)
        .bind(session.issued_at)
        .bind(session.expires_at)
        .bind(challenge_id)
        .bind(&session.jti)
        .bind(session.revoked_at)
        .bind(&session.revoked_by)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || what.clone()))?;
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((OpenOutcome::Opened, seq))
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        fetch_session(&self.pool, id).await
    }

    async fn list_sessions(&self, account_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE account_id = ?1 ORDER BY issued_at DESC, id");
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        let mut sessions = rows
            .iter()
            .map(|row| raw_session(row)?.decode())
            .collect::<Result<Vec<_>, _>>()?;
        sort_sessions(&mut sessions);
        Ok(sessions)
    }

    async fn revoke_session(&self, id: &str, by: &str, now: i64) -> Result<Option<SessionRecord>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        sqlx::query("UPDATE sessions SET revoked_at = ?1, revoked_by = ?2 WHERE id = ?3 AND revoked_at IS NULL")
            .bind(now)
            .bind(by)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let session = fetch_session(&mut *tx, id).await?;
        tx.commit().await.map_err(err)?;
        Ok(session)
    }

    async fn reserve_spend_audited(
        &self,
        r: &SpendRequest<'_>,
        event: Option<SpendEvent<'_>>,
    ) -> Result<(SpendOutcome, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let session = fetch_session(&mut *tx, r.session_id).await?;
        let existing = match session {
            None => None,
            Some(_) => sqlx::query("SELECT body_hash, response FROM spends WHERE session_id = ?1 AND request_id = ?2")
                .bind(r.session_id)
                .bind(r.request_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err)?
                .map(|row| -> Result<RawSpend, StoreError> {
                    Ok(RawSpend {
                        body_hash: row.try_get("body_hash").map_err(err)?,
                        response: row.try_get("response").map_err(err)?,
                    })
                })
                .transpose()?,
        };
        let (remaining, uses) = match decide_spend(r, session, existing)? {
            SpendDecision::Answer(outcome) => {
                tx.rollback().await.map_err(err)?;
                return Ok((outcome, None));
            }
            SpendDecision::Reserve { remaining, uses } => (remaining, uses),
        };
        let what = format!("session {}", r.session_id);
        let stored_uses = encode_uses(&what, uses)?;
        sqlx::query("UPDATE sessions SET remaining = ?1, uses = ?2 WHERE id = ?3")
            .bind(encode_amount(remaining))
            .bind(stored_uses)
            .bind(r.session_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "INSERT INTO spends (session_id, request_id, body_hash, amount, nonce, created_at, response) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
        )
        .bind(r.session_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(encode_amount(r.amount))
        .bind(stored_uses)
        .bind(r.now)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || {
            format!("spend {} of session {}", r.request_id, r.session_id)
        }))?;
        let event = event.map(|build| build(uses));
        let seq = crate::audit::sqlite::append_one(&mut tx, event.as_ref()).await?;
        tx.commit().await.map_err(err)?;
        Ok((SpendOutcome::Reserved { remaining, nonce: uses }, seq))
    }

    async fn complete_spend(&self, session_id: &str, request_id: &str, response: &[u8]) -> Result<bool, StoreError> {
        let _writer = self.write.lock().await;
        let done = sqlx::query(
            "UPDATE spends SET response = ?1 \
             WHERE session_id = ?2 AND request_id = ?3 AND response IS NULL",
        )
        .bind(response)
        .bind(session_id)
        .bind(request_id)
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn stale_spends(&self, before: i64, limit: u32) -> Result<Vec<super::PendingSpend>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let rows = sqlx::query(
            "SELECT p.session_id, s.account_id, p.request_id, p.created_at \
             FROM spends p JOIN sessions s ON s.id = p.session_id \
             WHERE p.response IS NULL AND p.created_at < ?1 \
             ORDER BY p.created_at, p.session_id, p.request_id LIMIT ?2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter()
            .map(|row| {
                Ok(super::PendingSpend {
                    session_id: row.try_get("session_id").map_err(err)?,
                    account_id: row.try_get("account_id").map_err(err)?,
                    request_id: row.try_get("request_id").map_err(err)?,
                    created_at: row.try_get("created_at").map_err(err)?,
                })
            })
            .collect()
    }

    async fn probe_write(&self, now: i64) -> Result<(), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        sqlx::query(
            "INSERT INTO store_health (id, probed_at) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    async fn release_spend_audited(
        &self,
        session_id: &str,
        request_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let remaining: Option<String> = sqlx::query_scalar("SELECT remaining FROM sessions WHERE id = ?1")
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let pending: Option<String> = sqlx::query_scalar(
            "SELECT amount FROM spends WHERE session_id = ?1 AND request_id = ?2 AND response IS NULL",
        )
        .bind(session_id)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let (Some(remaining), Some(amount)) = (remaining, pending) else {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        };
        let what = format!("session {session_id}");
        let remaining = decode_amount(&what, "remaining", &remaining)?;
        let amount = decode_amount(&format!("spend {request_id} of {what}"), "amount", &amount)?;
        let restored = remaining.checked_add(amount).ok_or_else(|| StoreError::Corrupt {
            what: format!("{what}: remaining {remaining} + released {amount} overflows"),
        })?;
        sqlx::query("DELETE FROM spends WHERE session_id = ?1 AND request_id = ?2")
            .bind(session_id)
            .bind(request_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("UPDATE sessions SET remaining = ?1 WHERE id = ?2")
            .bind(encode_amount(restored))
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok(seq)
    }

    fn pool_stats(&self) -> super::PoolStats {
        super::PoolStats {
            size: self.pool.size(),
            idle: self.pool.num_idle(),
        }
    }

    fn tx_stats(&self) -> &super::TxStats {
        &self.tx
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    // ----- Receipts (issue 5) --------------------------------------------------

    async fn record_receipt(
        &self,
        r: &super::NewReceipt<'_>,
        sign: super::ReceiptSigner,
    ) -> Result<super::ReceiptOutcome, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        if let Some(existing) = fetch_receipt(&mut *tx, r.account_id, r.request_id).await? {
            tx.rollback().await.map_err(err)?;
            return Ok(super::existing_receipt(r, existing));
        }
        // AUTOINCREMENT: seqs are never reused, and a rolled-back insert
        // leaves no gap (sqlite_sequence is part of the transaction).
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO receipts (receipt_id, account_id, request_id, body_hash, session_id, created_at, jws) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, '') RETURNING seq",
        )
        .bind(r.receipt_id)
        .bind(r.account_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(r.session_id)
        .bind(r.created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("receipt {}", r.receipt_id)))?;
        let seq_u = u64::try_from(seq).map_err(|_| StoreError::Corrupt {
            what: format!("receipt {}: negative seq", r.receipt_id),
        })?;
        // The receipt's audit event is appended in this transaction: its
        // sequence number is the receipt's `audit_seq`.
        let seq_u = crate::audit::sqlite::append_one(&mut tx, r.audit.as_ref())
            .await?
            .unwrap_or(seq_u);
        let audit_seq = i64::try_from(seq_u).map_err(|_| StoreError::Corrupt {
            what: format!("receipt {}: audit seq out of range", r.receipt_id),
        })?;
        let jws = match sign(seq_u).await {
            Ok(jws) => jws,
            Err(e) => {
                tx.rollback().await.map_err(err)?;
                return Ok(super::ReceiptOutcome::SignFailed(e));
            }
        };
        sqlx::query("UPDATE receipts SET jws = ?1, audit_seq = ?3 WHERE seq = ?2")
            .bind(&jws)
            .bind(seq)
            .bind(audit_seq)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(super::ReceiptOutcome::Recorded(super::ReceiptRecord {
            seq: seq_u,
            receipt_id: r.receipt_id.to_string(),
            account_id: r.account_id.to_string(),
            request_id: r.request_id.to_string(),
            body_hash: r.body_hash,
            session_id: r.session_id.map(str::to_string),
            created_at: r.created_at,
            jws,
        }))
    }

    async fn get_receipt(
        &self,
        account_id: &str,
        request_id: &str,
    ) -> Result<Option<super::ReceiptRecord>, StoreError> {
        fetch_receipt(&self.pool, account_id, request_id).await
    }
    // ----- end receipts ----------------------------------------------------------

    // ---- Issuer keys (JWKS lifecycle, issue 5) ----
    // The single in-process writer (BEGIN IMMEDIATE) serialises every state
    // change; the partial unique index keeps one active key per algorithm.

    async fn list_issuer_keys(&self) -> Result<Vec<IssuerKeyRecord>, StoreError> {
        issuer_keys_where(&self.pool, None).await
    }

    async fn add_issuer_key_audited(
        &self,
        rec: &IssuerKeyRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        if !matches!(rec.state, IssuerKeyState::Active | IssuerKeyState::Next) {
            return Err(StoreError::Backend {
                backend: BACKEND,
                reason: format!("a new issuer key must be next or active, not {}", rec.state.as_str()),
            });
        }
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM issuer_keys WHERE alg = ?1 AND state = ?2")
            .bind(&rec.alg)
            .bind(rec.state.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        if n > 0 {
            tx.rollback().await.map_err(err)?;
            return Ok((false, None));
        }
        sqlx::query(&format!(
            "INSERT INTO issuer_keys ({ISSUER_KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))
        .bind(&rec.kid)
        .bind(&rec.alg)
        .bind(&rec.label)
        .bind(rec.state.as_str())
        .bind(rec.created_at)
        .bind(rec.activated_at)
        .bind(rec.retired_at)
        .bind(rec.revoked_at)
        .bind(&rec.jwk)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("issuer key {}", rec.kid)))?;
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((true, seq))
    }

    async fn promote_issuer_keys_audited(
        &self,
        algs: &[&str],
        now: i64,
        min_published: i64,
        active_due_before: Option<i64>,
        audit: Option<&PromoteAudit>,
    ) -> Result<(Vec<PromoteOutcome>, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let mut promoted = Vec::with_capacity(algs.len());
        for alg in algs {
            let keys = issuer_keys_where(&mut *tx, Some(alg)).await?;
            match decide_promote(&keys, now, min_published, active_due_before) {
                Ok((next, active)) => {
                    promote_in(&mut tx, &next, active.as_deref(), now).await?;
                    promoted.push((next, active));
                }
                Err(outcome) => {
                    tx.rollback().await.map_err(err)?;
                    return Ok((vec![outcome], None));
                }
            }
        }
        let events = audit.map(|a| a.events(&promoted)).unwrap_or_default();
        let seq = crate::audit::sqlite::append_in(&mut tx, &events)
            .await?
            .first()
            .map(|e| e.seq);
        tx.commit().await.map_err(err)?;
        Ok((promoted_outcomes(promoted), seq))
    }

    async fn revoke_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<RevokeOutcome>, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE kid = ?1");
        let row = sqlx::query(&sql)
            .bind(kid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let Some(before) = row.map(|r| raw_issuer_key(&r)?.decode()).transpose()? else {
            tx.rollback().await.map_err(err)?;
            return Ok((None, None));
        };
        if before.state == IssuerKeyState::Revoked {
            tx.rollback().await.map_err(err)?;
            return Ok((Some(RevokeOutcome { before, promoted: None }), None));
        }
        sqlx::query("UPDATE issuer_keys SET state = 'revoked', revoked_at = ?1 WHERE kid = ?2")
            .bind(now)
            .bind(kid)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let mut promoted = None;
        if before.state == IssuerKeyState::Active {
            let keys = issuer_keys_where(&mut *tx, Some(&before.alg)).await?;
            if let Ok((next, _)) = decide_promote(&keys, now, 0, None) {
                promote_in(&mut tx, &next, None, now).await?;
                promoted = Some(next);
            }
        }
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((Some(RevokeOutcome { before, promoted }), seq))
    }

    async fn delete_issuer_key_audited(
        &self,
        kid: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let r = sqlx::query("DELETE FROM issuer_keys WHERE kid = ?1 AND state IN ('retired', 'revoked')")
            .bind(kid)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(err)?;
            return Ok((false, None));
        }
        let seq = crate::audit::sqlite::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((true, seq))
    }

    async fn take_token(&self, key: &str, bucket: super::limits::Bucket, now: i64) -> Result<bool, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let stored: Option<(i64, i64)> = sqlx::query_as("SELECT tokens, updated_at FROM limit_buckets WHERE key = ?1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let Some((tokens, at)) = super::limits::take(stored, now, bucket) else {
            tx.rollback().await.map_err(err)?;
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO limit_buckets (key, tokens, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(tokens)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(true)
    }

    async fn add_to_total(&self, key: &str, amount: u128, cap: u128, now: i64) -> Result<Option<u128>, StoreError> {
        self.change_total(key, now, |t| super::limits::add(t, amount, cap))
            .await
    }

    async fn subtract_from_total(&self, key: &str, amount: u128, now: i64) -> Result<(), StoreError> {
        self.change_total(key, now, |t| Some(t.saturating_sub(amount)))
            .await
            .map(|_| ())
    }

    async fn prune_limit_counters(&self, totals_before: i64, buckets: &[(String, i64)]) -> Result<u64, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let mut gone = sqlx::query("DELETE FROM limit_totals WHERE updated_at < ?1")
            .bind(totals_before)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected();
        for (prefix, before) in buckets {
            gone += sqlx::query("DELETE FROM limit_buckets WHERE substr(key, 1, length(?1)) = ?1 AND updated_at < ?2")
                .bind(prefix)
                .bind(before)
                .execute(&mut *tx)
                .await
                .map_err(err)?
                .rows_affected();
        }
        tx.commit().await.map_err(err)?;
        Ok(gone)
    }
}

impl SqliteStore {
    /// Reads the total `key` (0 when absent), applies `f`, and stores its
    /// answer, in one write transaction; None from `f` changes nothing.
    async fn change_total(
        &self,
        key: &str,
        now: i64,
        f: impl FnOnce(u128) -> Option<u128> + Send,
    ) -> Result<Option<u128>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, Some("BEGIN IMMEDIATE")).await?;
        let stored: Option<String> = sqlx::query_scalar("SELECT total FROM limit_totals WHERE key = ?1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let total = stored
            .map(|s| decode_amount(&format!("limit total {key}"), "total", &s))
            .transpose()?
            .unwrap_or(0);
        let Some(next) = f(total) else {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO limit_totals (key, total, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET total = excluded.total, updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(encode_amount(next))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Some(next))
    }
}

// ---- Issuer keys (JWKS lifecycle, issue 5) ----

fn raw_issuer_key(row: &SqliteRow) -> Result<RawIssuerKey, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawIssuerKey {
        kid: row.try_get("kid").map_err(err)?,
        alg: row.try_get("alg").map_err(err)?,
        label: row.try_get("label").map_err(err)?,
        state: row.try_get("state").map_err(err)?,
        created_at: row.try_get("created_at").map_err(err)?,
        activated_at: row.try_get("activated_at").map_err(err)?,
        retired_at: row.try_get("retired_at").map_err(err)?,
        revoked_at: row.try_get("revoked_at").map_err(err)?,
        jwk: row.try_get("jwk").map_err(err)?,
    })
}

async fn issuer_keys_where<'e, E>(conn: E, alg: Option<&str>) -> Result<Vec<IssuerKeyRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE ?1 IS NULL OR alg = ?1");
    let rows = sqlx::query(&sql)
        .bind(alg)
        .fetch_all(conn)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
    let mut keys = rows
        .iter()
        .map(|r| raw_issuer_key(r)?.decode())
        .collect::<Result<Vec<_>, _>>()?;
    sort_issuer_keys(&mut keys);
    Ok(keys)
}

async fn promote_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    next: &str,
    active: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    if let Some(active) = active {
        sqlx::query("UPDATE issuer_keys SET state = 'retired', retired_at = ?1 WHERE kid = ?2 AND state = 'active'")
            .bind(now)
            .bind(active)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
    }
    sqlx::query("UPDATE issuer_keys SET state = 'active', activated_at = ?1 WHERE kid = ?2 AND state = 'next'")
        .bind(now)
        .bind(next)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    Ok(())
}

// ----- Receipts (issue 5) ----------------------------------------------------

async fn fetch_receipt<'e, E>(
    conn: E,
    account_id: &str,
    request_id: &str,
) -> Result<Option<super::ReceiptRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let err = |e| from_sqlx(BACKEND, e);
    let sql = format!(
        "SELECT {} FROM receipts WHERE account_id = ?1 AND request_id = ?2",
        super::RECEIPT_COLUMNS
    );
    let row = sqlx::query(&sql)
        .bind(account_id)
        .bind(request_id)
        .fetch_optional(conn)
        .await
        .map_err(err)?;
    row.map(|row| -> Result<super::ReceiptRecord, StoreError> {
        super::RawReceipt {
            seq: row.try_get("seq").map_err(err)?,
            receipt_id: row.try_get("receipt_id").map_err(err)?,
            account_id: row.try_get("account_id").map_err(err)?,
            request_id: row.try_get("request_id").map_err(err)?,
            body_hash: row.try_get("body_hash").map_err(err)?,
            session_id: row.try_get("session_id").map_err(err)?,
            created_at: row.try_get("created_at").map_err(err)?,
            jws: row.try_get("jws").map_err(err)?,
        }
        .decode()
    })
    .transpose()
}
// ----- end receipts ------------------------------------------------------------
