//! Helpers for tests that need a real store: a SQLite file in a directory,
//! or a private schema in a PostgreSQL test database.
//!
//! The PostgreSQL server comes from `KEYWARD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When no server answers, the
//! helpers print a loud `SKIPPED:` line and return `None`, except when
//! `CI=true`, where they panic so the test fails. These helpers panic on
//! any other setup failure: they are for tests only.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use super::redact_url;

/// The environment variable naming the PostgreSQL test database.
pub const DATABASE_URL_ENV: &str = "KEYWARD_TEST_DATABASE_URL";
/// The PostgreSQL test database used when [`DATABASE_URL_ENV`] is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Prefix of the schemas the helpers create.
pub const SCHEMA_PREFIX: &str = "kw_test_";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Schemas left behind (see [`postgres_url_for_tests`]) are dropped by a
/// later run once they are this old.
const SWEEP_AFTER_SECS: u64 = 6 * 3600;

/// `sqlite://DIR/keyward.db`.
pub fn sqlite_url_in(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("keyward.db").display())
}

/// The PostgreSQL test database URL (without a schema).
pub fn postgres_base_url() -> String {
    std::env::var(DATABASE_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

/// Whether `CI=true` (or `CI=1`): an unreachable server is then a failure.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Creates a fresh schema in the test database and returns a URL whose
/// `search_path` is that schema, or `None` (after a loud `SKIPPED:` line)
/// if no server answers outside CI.
///
/// The schema outlives the call; a later call drops such schemas once they
/// are a few hours old. Use [`PgTestSchema`] to drop it when done.
pub fn postgres_url_for_tests() -> Option<String> {
    PgTestSchema::create().map(PgTestSchema::keep)
}

/// A fresh PostgreSQL schema, dropped (best effort) when this is dropped.
#[derive(Debug)]
pub struct PgTestSchema {
    base_url: String,
    schema: String,
    url: String,
    keep: bool,
}

enum Setup {
    Unreachable(String),
    Failed(String),
}

impl PgTestSchema {
    /// Creates the schema; `None` (after a loud `SKIPPED:` line) if no
    /// server answers and `CI` is not `true`.
    ///
    /// # Panics
    /// If the server is unreachable under `CI=true`, or answers but the
    /// schema cannot be created.
    pub fn create() -> Option<PgTestSchema> {
        let base_url = postgres_base_url();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let random = uuid::Uuid::new_v4().simple().to_string();
        let schema = format!("{SCHEMA_PREFIX}{now}_{}", &random[..12]);
        let shown = redact_url(&base_url);
        let result = run_blocking({
            let base_url = base_url.clone();
            let schema = schema.clone();
            move || async move { create_schema(&base_url, &schema, now).await }
        })
        .unwrap_or_else(|e| Err(Setup::Failed(e)));
        match result {
            Ok(()) => {}
            Err(Setup::Unreachable(reason)) if in_ci() => {
                panic!("PostgreSQL test server not reachable at {shown} ({reason}) and CI=true");
            }
            Err(Setup::Unreachable(reason)) => {
                // Straight to stderr, past libtest's capture, so the skip
                // shows even when the test passes.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: PostgreSQL tests not run: server not reachable at {shown} ({reason}). \
                     Start one or set {DATABASE_URL_ENV}; with CI=true this fails."
                );
                return None;
            }
            Err(Setup::Failed(reason)) => {
                panic!("PostgreSQL test schema setup failed at {shown}: {reason}");
            }
        }
        let sep = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{sep}options=-c%20search_path%3D{schema}");
        Some(PgTestSchema {
            base_url,
            schema,
            url,
            keep: false,
        })
    }

    /// The URL that connects with `search_path` set to the schema.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Keeps the schema (left for a later sweep) and returns its URL.
    pub fn keep(mut self) -> String {
        self.keep = true;
        std::mem::take(&mut self.url)
    }
}

impl Drop for PgTestSchema {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let base_url = std::mem::take(&mut self.base_url);
        let schema = std::mem::take(&mut self.schema);
        let dropped = run_blocking(move || async move {
            let mut conn = connect(&base_url).await.ok()?;
            let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
            let ok = sqlx::raw_sql(&sql).execute(&mut conn).await.is_ok();
            let _ = conn.close().await;
            ok.then_some(())
        });
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("note: could not drop PostgreSQL test schema {}", self.schema);
        }
    }
}

/// Runs the future `make` returns to completion on a fresh runtime in its own thread, so that
/// these helpers work from sync code and from inside a tokio test alike.
fn run_blocking<M, F>(make: M) -> Result<F::Output, String>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(make()))
            .map_err(|e| format!("cannot start a tokio runtime: {e}"))
    })
    .join()
    .map_err(|_| "setup thread panicked".to_string())?
}

async fn connect(base_url: &str) -> Result<PgConnection, Setup> {
    let options: PgConnectOptions = base_url
        .parse()
        .map_err(|e| Setup::Failed(format!("invalid {DATABASE_URL_ENV}: {e}")))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Err(_) => Err(Setup::Unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        Ok(Err(e @ (sqlx::Error::Io(_) | sqlx::Error::Tls(_)))) => Err(Setup::Unreachable(e.to_string())),
        Ok(Err(e)) => Err(Setup::Failed(e.to_string())),
        Ok(Ok(conn)) => Ok(conn),
    }
}

async fn create_schema(base_url: &str, schema: &str, now: u64) -> Result<(), Setup> {
    let mut conn = connect(base_url).await?;
    sweep(&mut conn, now).await;
    let sql = format!("CREATE SCHEMA \"{schema}\"");
    let created = sqlx::raw_sql(&sql).execute(&mut conn).await;
    let _ = conn.close().await;
    created.map(|_| ()).map_err(|e| Setup::Failed(format!("{sql}: {e}")))
}

/// Drops test schemas older than [`SWEEP_AFTER_SECS`] (best effort).
async fn sweep(conn: &mut PgConnection, now: u64) {
    let pattern = format!("{}%", SCHEMA_PREFIX.replace('_', "\\_"));
    let Ok(names) = sqlx::query_scalar::<_, String>("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
        .bind(pattern)
        .fetch_all(&mut *conn)
        .await
    else {
        return;
    };
    for name in names {
        let created = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|ts| ts.parse::<u64>().ok());
        if matches!(created, Some(t) if now.saturating_sub(t) > SWEEP_AFTER_SECS) {
            let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", name.replace('"', "\"\""));
            let _ = sqlx::raw_sql(&sql).execute(&mut *conn).await;
        }
    }
}
