//! What differs between the two SQL backends, and nothing else: how a write
//! transaction is opened and serialised, the row-lock suffix, the read
//! snapshot, the rotation lock. Every operation is written once, in
//! `shared.rs`, and reads its differences from here; never put a statement
//! that both databases accept in this file.
//!
//! SQL text is written once with `$N` parameters, which sqlx's SQLite driver
//! binds by number as PostgreSQL does.

/// The advisory lock every issuer key state change takes in its transaction
/// (PostgreSQL: one replica at a time rotates).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RotationLock {
    /// Waits for the lock (`$1` is the lock key).
    pub wait: &'static str,
    /// Only tries it and answers whether it is held (`$1` is the lock key).
    pub try_only: &'static str,
    /// The lock key.
    pub key: i64,
}

/// A database the store runs on, and how it differs from the other.
pub(crate) trait Dialect: sqlx::Database {
    /// `sqlite` or `postgres`, as in errors and metrics.
    const BACKEND: &'static str;
    /// Whether writers queue on the store's in-process mutex before their
    /// transaction opens (SQLite has one writer; PostgreSQL locks rows).
    const WRITER_MUTEX: bool;
    /// The statement opening a write transaction (`None`: the driver's
    /// plain `BEGIN`).
    const BEGIN_WRITE: Option<&'static str>;
    /// The statement opening a read transaction that sees one snapshot.
    const BEGIN_SNAPSHOT: Option<&'static str>;
    /// Appended to a `SELECT` whose rows the transaction must hold until it
    /// ends (empty where the writer lock already serialises writers).
    const FOR_UPDATE: &'static str;
    /// The issuer key rotation lock, where one is needed beside the writer
    /// lock.
    const ROTATION_LOCK: Option<RotationLock>;
    /// Appended to a text column in `ORDER BY` and comparisons so that text
    /// orders by its bytes whatever the database's collation (keyset pages
    /// and their cursors then agree).
    const BYTE_ORDER: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(r: &Self::QueryResult) -> u64;
}

/// SQLite: one writer at a time, in-process by the store's mutex and across
/// processes by `BEGIN IMMEDIATE` (which takes the write lock up front, so a
/// transaction never fails with `SQLITE_BUSY` half-way). Every write
/// transaction is serialised, so no row needs locking; a deferred `BEGIN`
/// reads one WAL snapshot.
impl Dialect for sqlx::Sqlite {
    const BACKEND: &'static str = "sqlite";
    const WRITER_MUTEX: bool = true;
    const BEGIN_WRITE: Option<&'static str> = Some("BEGIN IMMEDIATE");
    const BEGIN_SNAPSHOT: Option<&'static str> = None;
    const FOR_UPDATE: &'static str = "";
    const ROTATION_LOCK: Option<RotationLock> = None;
    // BINARY is SQLite's default collation.
    const BYTE_ORDER: &'static str = "";

    fn rows_affected(r: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        r.rows_affected()
    }
}

/// PostgreSQL: several replicas write at once; a transaction locks the rows
/// it decides on (`SELECT ... FOR UPDATE`) and issuer key changes take an
/// advisory lock.
impl Dialect for sqlx::Postgres {
    const BACKEND: &'static str = "postgres";
    const WRITER_MUTEX: bool = false;
    const BEGIN_WRITE: Option<&'static str> = None;
    const BEGIN_SNAPSHOT: Option<&'static str> = Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const ROTATION_LOCK: Option<RotationLock> = Some(RotationLock {
        wait: "SELECT pg_advisory_xact_lock($1)",
        try_only: "SELECT pg_try_advisory_xact_lock($1)",
        // "keyward-jwks"
        key: 0x6b77_6a77_6b73_0001,
    });
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";

    fn rows_affected(r: &sqlx::postgres::PgQueryResult) -> u64 {
        r.rows_affected()
    }
}
