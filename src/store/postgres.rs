//! The server backend: PostgreSQL.
//!
//! The URL may choose a schema, either the libpq way
//! (`?options=-c%20search_path%3Dmy_schema`) or with a plain
//! `?search_path=my_schema`; tables and the migration history then live in
//! that schema.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use super::shared::SqlStore;
use super::{from_sqlx, redact_url, scrub, StoreError};

const BACKEND: &str = "postgres";
/// Bounds connecting as well as waiting for a pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 10;

/// The PostgreSQL store (its operations are in `shared.rs`, its dialect in
/// `dialect.rs`).
pub type PgStore = SqlStore<sqlx::Postgres>;

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.location)
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
        tracing::debug!(url = %redacted, "postgres store open");
        Ok(SqlStore::new(pool, redacted.into(), super::TxStats::new(BACKEND)?))
    }
}
