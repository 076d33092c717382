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

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;
use tokio::sync::Mutex;

use super::{conflict_as, count, from_sqlx, grants, normalize, redact_url, AccountRecord, RawKey, Store, StoreError};

const BACKEND: &str = "sqlite";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;

/// The SQLite store.
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    write: Mutex<()>,
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
        tracing::info!(path = %path.display(), "sqlite store open");
        Ok(SqliteStore {
            pool,
            path,
            write: Mutex::new(()),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
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

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        Ok(())
    }

    async fn create_account(&self, rec: &AccountRecord) -> Result<(), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let _writer = self.write.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(err)?;
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
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        // One read transaction: a consistent snapshot of the three tables.
        let mut tx = self.pool.begin().await.map_err(err)?;
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

    async fn close(&self) {
        self.pool.close().await;
    }
}
