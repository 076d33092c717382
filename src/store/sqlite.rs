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

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::shared::SqlStore;
use super::{from_sqlx, redact_url, StoreError};

const BACKEND: &str = "sqlite";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;

/// The SQLite store (its operations are in `shared.rs`, its dialect in
/// `dialect.rs`).
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path())
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
        Ok(SqlStore::new(
            pool,
            path.into_os_string(),
            super::TxStats::new(BACKEND)?,
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        Path::new(&self.location)
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
