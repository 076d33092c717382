//! The server backend: PostgreSQL.
//!
//! The URL may choose a schema, either the libpq way
//! (`?options=-c%20search_path%3Dmy_schema`) or with a plain
//! `?search_path=my_schema`; tables and the migration history then live in
//! that schema.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Row};

use super::{
    conflict_as, count, from_sqlx, grants, normalize, redact_url, scrub, AccountRecord, RawKey, Store, StoreError,
};

const BACKEND: &str = "postgres";
/// Bounds connecting as well as waiting for a pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 10;

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    url: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Turns a plain `search_path=X` query parameter into the
/// `options[search_path]=X` form sqlx understands.
pub(crate) fn with_search_path_option(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("search_path", value)) => format!("options[search_path]={value}"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

impl PgStore {
    /// Connects to `postgres://...` (or `postgresql://...`), failing with
    /// [`StoreError::Unavailable`] within a few seconds if no server
    /// answers, and runs the migrations.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let redacted = redact_url(url);
        if !(url.starts_with("postgres:") || url.starts_with("postgresql:")) {
            return Err(StoreError::InvalidUrl {
                url: redacted,
                reason: "expected postgres:// or postgresql://".into(),
            });
        }
        let options =
            PgConnectOptions::from_str(&with_search_path_option(url)).map_err(|e| StoreError::InvalidUrl {
                url: redacted.clone(),
                reason: scrub(e.to_string(), url),
            })?;
        let options = match options.get_application_name() {
            Some(_) => options,
            None => options.application_name("keyward"),
        };
        let unavailable = |reason: String| StoreError::Unavailable {
            backend: BACKEND,
            reason: format!("cannot connect to {redacted}: {}", scrub(reason, url)),
        };
        let connect_err = |e: sqlx::Error| match from_sqlx(BACKEND, e) {
            StoreError::Unavailable { reason, .. } => unavailable(reason),
            StoreError::Backend { backend, reason } => StoreError::Backend {
                backend,
                reason: format!("cannot connect to {redacted}: {}", scrub(reason, url)),
            },
            other => other,
        };
        // One direct attempt first: the pool would retry a refused
        // connection until its timeout and report only "timed out".
        match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
            Err(_) => return Err(unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(connect_err(e)),
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration {
                backend: BACKEND,
                reason: scrub(e.to_string(), url),
            })?;
        tracing::info!(url = %redacted, "postgres store open");
        Ok(PgStore { pool, url: redacted })
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
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
        let mut tx = self.pool.begin().await.map_err(err)?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, label, controller, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
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
                 VALUES ($1, $2, $3, $4, $5, $6)",
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
            sqlx::query("INSERT INTO account_grants (account_id, identity) VALUES ($1, $2)")
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
        // One snapshot for the three reads.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(err)?;
        let Some(row) = sqlx::query("SELECT id, label, controller, created_by, created_at FROM accounts WHERE id = $1")
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
             WHERE account_id = $1 ORDER BY alg, key_version",
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
        let rows = sqlx::query("SELECT identity FROM account_grants WHERE account_id = $1 ORDER BY identity")
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
