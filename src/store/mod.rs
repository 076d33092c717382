//! Persistent state behind one narrow trait; SQLite (embedded default) and
//! PostgreSQL. Never holds a plaintext private key: an account's keys are
//! stored only as blobs wrapped under the HSM's key-encryption key.
//!
//! [`open`] picks the backend from the URL scheme and runs the migrations
//! under `migrations/sqlite` or `migrations/postgres`.

use std::fmt;
use std::sync::Arc;

use crate::types::KeyAlg;

mod postgres;
mod sqlite;
pub mod testing;

#[cfg(test)]
mod tests;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// One custodial account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Opaque account id (a UUID for accounts the daemon creates).
    pub id: String,
    /// Free-form label, if any.
    pub label: Option<String>,
    /// The controller's `0x` EIP-55 address, as given.
    pub controller: String,
    /// The mTLS identity that created the account.
    pub created_by: String,
    /// Creation time, unix seconds UTC.
    pub created_at: i64,
    /// Identities that may have this account sign, besides `created_by`
    /// (sorted and without duplicates when read back).
    pub allowed: Vec<String>,
    /// The account's keys (ordered by algorithm name, then key version, when
    /// read back).
    pub keys: Vec<KeyRecord>,
}

/// One wrapped account key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's algorithm.
    pub alg: KeyAlg,
    /// The public key, in the algorithm's usual encoding.
    pub public_key: Vec<u8>,
    /// The private key wrapped under the key-encryption key.
    pub wrapped: Vec<u8>,
    /// The version of the key-encryption key that wrapped it.
    pub kek_version: u32,
    /// The version of this account key.
    pub key_version: u32,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("alg", &self.alg)
            .field("public_key", &hex::encode(&self.public_key))
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .field("kek_version", &self.kek_version)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// Why a store operation failed. Messages never contain a password from a
/// connection URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or used right now (connect, IO, pool
    /// timeout, busy, disk full); retrying later may help.
    #[error("{backend} store unavailable: {reason}")]
    Unavailable {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// A row with the same unique key already exists.
    #[error("{what} already exists")]
    Conflict {
        /// What collided, e.g. `account 1234`.
        what: String,
    },
    /// A stored row does not decode (e.g. an unknown key algorithm).
    #[error("corrupt store row: {what}")]
    Corrupt {
        /// Which row and why.
        what: String,
    },
    /// The schema migrations failed.
    #[error("{backend} store migration failed: {reason}")]
    Migration {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// The store URL is malformed or names no supported backend.
    #[error("invalid store URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database rejected a statement for another reason (a bug or a
    /// schema that does not match this build); retrying will not help.
    #[error("{backend} store error: {reason}")]
    Backend {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The database's message.
        reason: String,
    },
}

/// The persistent state of the daemon.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores the account, its keys and its grants in one transaction. An
    /// existing id gives [`StoreError::Conflict`] and writes nothing.
    async fn create_account(&self, rec: &AccountRecord) -> Result<(), StoreError>;

    /// The account, or `None` if no account has this id. Keys come ordered
    /// by algorithm name (then key version); `allowed` comes sorted.
    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;

    /// How many accounts exist.
    async fn count_accounts(&self) -> Result<u64, StoreError>;

    /// Closes the connection pool, waiting for connections in use to be
    /// returned. Later calls fail with [`StoreError::Unavailable`].
    async fn close(&self);
}

/// Opens the store named by `url` (`sqlite://PATH`, `postgres://...` or
/// `postgresql://...`) and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        Err(StoreError::InvalidUrl {
            url: redact_url(url),
            reason: "expected sqlite://, postgres:// or postgresql://".into(),
        })
    }
}

/// `url` with the password (in the userinfo or a `password=` parameter)
/// replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    match head.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            out.push_str(scheme);
            out.push_str("://");
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Removes any password that appears in `url` from `text`.
pub(crate) fn scrub(text: String, url: &str) -> String {
    let mut secrets = Vec::new();
    let head = url.split('?').next().unwrap_or(url);
    if let Some((_, rest)) = head.split_once("://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                secrets.push(password.to_string());
            }
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if k.eq_ignore_ascii_case("password") {
                    secrets.push(v.to_string());
                }
            }
        }
    }
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |t, s| t.replace(s.as_str(), "***"))
}

/// Maps a sqlx error to a [`StoreError`] for `backend`.
pub(crate) fn from_sqlx(backend: &'static str, e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Database(db) => from_database(backend, db.as_ref()),
        E::Migrate(m) => StoreError::Migration {
            backend,
            reason: m.to_string(),
        },
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable {
                backend,
                reason: e.to_string(),
            }
        }
        E::RowNotFound
        | E::TypeNotFound { .. }
        | E::ColumnIndexOutOfBounds { .. }
        | E::ColumnNotFound(_)
        | E::ColumnDecode { .. }
        | E::Decode(_) => StoreError::Corrupt { what: e.to_string() },
        other => StoreError::Backend {
            backend,
            reason: other.to_string(),
        },
    }
}

fn from_database(backend: &'static str, db: &dyn sqlx::error::DatabaseError) -> StoreError {
    let reason = db.message().to_string();
    if db.is_unique_violation() {
        return StoreError::Conflict { what: reason };
    }
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let transient = match backend {
        "sqlite" => {
            // Extended result codes carry the primary code in the low byte.
            let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1);
            match primary {
                // CORRUPT, NOTADB
                11 | 26 => return StoreError::Corrupt { what: reason },
                // NOMEM, READONLY, BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL
                5..=8 | 10 | 13..=15 => true,
                _ => false,
            }
        }
        _ => {
            // Connection exception, insufficient resources, operator
            // intervention, system error; serialization failure, deadlock,
            // lock not available.
            ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                || ["40001", "40P01", "55P03"].contains(&code.as_str())
        }
    };
    if transient {
        StoreError::Unavailable { backend, reason }
    } else {
        StoreError::Backend { backend, reason }
    }
}

/// Like [`from_sqlx`], naming `what` if the error is a unique violation.
pub(crate) fn conflict_as(
    backend: &'static str,
    what: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match from_sqlx(backend, e) {
        StoreError::Conflict { .. } => StoreError::Conflict { what: what() },
        other => other,
    }
}

/// One `account_keys` row as read, before it is checked.
pub(crate) struct RawKey {
    pub alg: String,
    pub public_key: Vec<u8>,
    pub wrapped: Vec<u8>,
    pub kek_version: i64,
    pub key_version: i64,
}

impl RawKey {
    /// Checks the row decodes.
    pub(crate) fn decode(self, account_id: &str) -> Result<KeyRecord, StoreError> {
        let alg: KeyAlg = self.alg.parse().map_err(|e| StoreError::Corrupt {
            what: format!("key of account {account_id}: {e}"),
        })?;
        let version = |name: &str, v: i64| {
            u32::try_from(v).map_err(|_| StoreError::Corrupt {
                what: format!("{alg} key of account {account_id}: {name} {v} out of range"),
            })
        };
        Ok(KeyRecord {
            alg,
            public_key: self.public_key,
            wrapped: self.wrapped,
            kek_version: version("kek_version", self.kek_version)?,
            key_version: version("key_version", self.key_version)?,
        })
    }
}

/// Puts keys and grants in the documented order, independent of the
/// database's collation.
pub(crate) fn normalize(rec: &mut AccountRecord) {
    rec.keys
        .sort_by(|a, b| (a.alg.as_str(), a.key_version).cmp(&(b.alg.as_str(), b.key_version)));
    rec.allowed.sort();
    rec.allowed.dedup();
}

/// The grants to write: sorted, without duplicates.
pub(crate) fn grants(rec: &AccountRecord) -> Vec<&str> {
    let mut allowed: Vec<&str> = rec.allowed.iter().map(String::as_str).collect();
    allowed.sort_unstable();
    allowed.dedup();
    allowed
}

/// Converts a `COUNT(*)` result.
pub(crate) fn count(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt {
        what: format!("negative account count {n}"),
    })
}
