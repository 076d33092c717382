//! Every store operation, written once for both SQL backends. What differs
//! between SQLite and PostgreSQL (opening a write transaction, row locks, the
//! read snapshot, the rotation lock) is read from [`Dialect`]; a fix made here
//! is made for both. Never opens a transaction except through
//! [`super::begin`].

use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::{ColumnIndex, Decode, Encode, Executor, IntoArguments, Row, Type};
use tokio::sync::{Mutex, MutexGuard};
use tracing::Instrument as _;

use super::dialect::Dialect;
use super::{
    challenge_mismatch, conflict_as, count, decide_promote, decide_spend, decode_amount, encode_amount, encode_scopes,
    encode_uses, from_sqlx, grants, normalize, promoted_outcomes, sort_issuer_keys, AccountRecord, ChallengeRecord,
    IssuerKeyRecord, IssuerKeyState, OpenOutcome, PromoteAudit, PromoteOutcome, Pruned, RawChallenge, RawIssuerKey,
    RawKey, RawSession, RawSpend, RevokeOutcome, SessionCursor, SessionRecord, SpendDecision, SpendEvent, SpendOutcome,
    SpendRequest, Store, StoreError, CHALLENGE_COLUMNS, ISSUER_KEY_COLUMNS, SESSION_COLUMNS,
};

/// The columns of a `controller_changes` row.
const CONTROLLER_CHANGE_COLUMNS: &str = "id, account_id, old_controller, new_controller, requested_by, requested_at, \
     effective_at, digest, state, settled_at";

/// The open sessions of an account (`$1`) at `$2`: one range of the
/// partial index `sessions_open (account_id, expires_at) WHERE revoked_at IS NULL`.
pub(crate) const COUNT_OPEN_SESSIONS: &str =
    "SELECT COUNT(*) FROM sessions WHERE account_id = $1 AND revoked_at IS NULL AND expires_at > $2";

/// A page of an account's (`$1`) sessions, at most `$2`, newest first, ids
/// in byte order (`byte_order`: the dialect's [`Dialect::BYTE_ORDER`]);
/// with `after`, those after the session issued at `$3` with id `$4`. One
/// range of `sessions_account (account_id, issued_at DESC, id)`.
pub(crate) fn sessions_page_sql(byte_order: &str, after: bool) -> String {
    let id = format!("id{byte_order}");
    let start = if after {
        format!("AND issued_at <= $3 AND (issued_at < $3 OR {id} > $4) ")
    } else {
        String::new()
    };
    format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE account_id = $1 {start}ORDER BY issued_at DESC, {id} LIMIT $2"
    )
}

/// Up to `$3` sessions that ended before `$1` (expired before it, or revoked
/// before it and expired by `$2`): ranges of `sessions_expires` and
/// `sessions_revoked`.
pub(crate) const ENDED_SESSIONS: &str = "SELECT id, challenge_id FROM sessions \
     WHERE expires_at < $1 OR (revoked_at < $1 AND expires_at <= $2) LIMIT $3";

/// Deletes up to `$2` challenges that expired before `$1` and opened no
/// (remaining) session: a range of `challenges_expires`, each checked
/// against the unique index on `sessions.challenge_id`.
pub(crate) const DELETE_STALE_CHALLENGES: &str = "DELETE FROM challenges WHERE id IN (\
     SELECT c.id FROM challenges c WHERE c.expires_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.challenge_id = c.id) LIMIT $2)";

/// A store on one SQL database (see [`super::SqliteStore`] and
/// [`super::PgStore`]).
pub struct SqlStore<DB: sqlx::Database> {
    pub(crate) pool: sqlx::Pool<DB>,
    /// The database file (SQLite) or the URL without its password.
    pub(crate) location: OsString,
    /// The single in-process writer, where the dialect has one (shared
    /// with the audit writer thread, see [`crate::audit::writer`]).
    writer: Arc<Mutex<()>>,
    pub(crate) tx: super::TxStats,
}

impl<DB: sqlx::Database> SqlStore<DB> {
    /// A store on `pool`, already migrated.
    pub(crate) fn new(pool: sqlx::Pool<DB>, location: OsString, tx: super::TxStats) -> SqlStore<DB> {
        SqlStore {
            pool,
            location,
            writer: Arc::new(Mutex::new(())),
            tx,
        }
    }
}

/// A write transaction, holding the writer lock (where the dialect has one)
/// until it ends.
pub(crate) struct WriteTx<'a, DB: sqlx::Database> {
    // Declared first, so dropped first: an abandoned transaction's rollback
    // is queued before the writer lock goes.
    tx: sqlx::Transaction<'static, DB>,
    _writer: Option<MutexGuard<'a, ()>>,
    /// The `store.transaction` span: opened before BEGIN, closed with the
    /// transaction (its duration is the transaction's, lock waits included).
    _span: tracing::Span,
}

impl<DB: sqlx::Database> WriteTx<'_, DB> {
    pub(crate) async fn commit(self) -> Result<(), StoreError>
    where
        DB: Dialect,
    {
        self.tx.commit().await.map_err(|e| from_sqlx(DB::BACKEND, e))
    }

    pub(crate) async fn rollback(self) -> Result<(), StoreError>
    where
        DB: Dialect,
    {
        self.tx.rollback().await.map_err(|e| from_sqlx(DB::BACKEND, e))
    }
}

impl<DB: sqlx::Database> Deref for WriteTx<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> DerefMut for WriteTx<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

// The dialect is crate-private on purpose (sealed); these methods are too.
#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// Waits for the in-process writer lock, where the dialect has one.
    pub(crate) async fn write_lock(&self) -> Option<MutexGuard<'_, ()>> {
        if DB::WRITER_MUTEX {
            Some(self.writer.lock().await)
        } else {
            None
        }
    }

    /// Opens a write transaction the dialect's way.
    pub(crate) async fn begin_write(&self) -> Result<WriteTx<'_, DB>, StoreError> {
        let span = tracing::debug_span!("store", otel.name = "store.transaction", db.system = DB::BACKEND);
        let writer = self.write_lock().instrument(span.clone()).await;
        let tx = super::begin(DB::BACKEND, &self.pool, &self.tx, DB::BEGIN_WRITE)
            .instrument(span.clone())
            .await?;
        Ok(WriteTx {
            tx,
            _writer: writer,
            _span: span,
        })
    }

    /// Opens a read transaction that sees one snapshot.
    async fn begin_snapshot(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        super::begin(DB::BACKEND, &self.pool, &self.tx, DB::BEGIN_SNAPSHOT).await
    }
}

fn err<DB: Dialect>(e: sqlx::Error) -> StoreError {
    from_sqlx(DB::BACKEND, e)
}

/// Helpers shared by the operations (crate-private, as is the dialect).
#[allow(private_bounds)]
impl<DB> SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q [u8]>: Encode<'q, DB>,
    for<'q> bool: Decode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    fn raw_challenge(row: &DB::Row) -> Result<RawChallenge, StoreError> {
        Ok(RawChallenge {
            id: row.try_get("id").map_err(err::<DB>)?,
            account_id: row.try_get("account_id").map_err(err::<DB>)?,
            delegate: row.try_get("delegate").map_err(err::<DB>)?,
            scopes: row.try_get("scopes").map_err(err::<DB>)?,
            cap: row.try_get("cap").map_err(err::<DB>)?,
            nonce: row.try_get("nonce").map_err(err::<DB>)?,
            typed_data: row.try_get("typed_data").map_err(err::<DB>)?,
            issued_at: row.try_get("issued_at").map_err(err::<DB>)?,
            expires_at: row.try_get("expires_at").map_err(err::<DB>)?,
            consumed_at: row.try_get("consumed_at").map_err(err::<DB>)?,
        })
    }

    fn raw_session(row: &DB::Row) -> Result<RawSession, StoreError> {
        Ok(RawSession {
            id: row.try_get("id").map_err(err::<DB>)?,
            account_id: row.try_get("account_id").map_err(err::<DB>)?,
            delegate: row.try_get("delegate").map_err(err::<DB>)?,
            scopes: row.try_get("scopes").map_err(err::<DB>)?,
            cap: row.try_get("cap").map_err(err::<DB>)?,
            remaining: row.try_get("remaining").map_err(err::<DB>)?,
            uses: row.try_get("uses").map_err(err::<DB>)?,
            issued_at: row.try_get("issued_at").map_err(err::<DB>)?,
            expires_at: row.try_get("expires_at").map_err(err::<DB>)?,
            challenge_id: row.try_get("challenge_id").map_err(err::<DB>)?,
            jti: row.try_get("jti").map_err(err::<DB>)?,
            revoked_at: row.try_get("revoked_at").map_err(err::<DB>)?,
            revoked_by: row.try_get("revoked_by").map_err(err::<DB>)?,
            scope_grammar: row.try_get("scope_grammar").map_err(err::<DB>)?,
        })
    }

    fn controller_change(row: &DB::Row) -> Result<super::ControllerChangeRecord, StoreError> {
        Ok(super::ControllerChangeRecord {
            id: row.try_get("id").map_err(err::<DB>)?,
            account_id: row.try_get("account_id").map_err(err::<DB>)?,
            old_controller: row.try_get("old_controller").map_err(err::<DB>)?,
            new_controller: row.try_get("new_controller").map_err(err::<DB>)?,
            requested_by: row.try_get("requested_by").map_err(err::<DB>)?,
            requested_at: row.try_get("requested_at").map_err(err::<DB>)?,
            effective_at: row.try_get("effective_at").map_err(err::<DB>)?,
            digest: row.try_get("digest").map_err(err::<DB>)?,
            state: row.try_get("state").map_err(err::<DB>)?,
            settled_at: row.try_get("settled_at").map_err(err::<DB>)?,
        })
    }

    /// In `tx`: the account gets the change's new controller, its open sessions end, the
    /// change is marked applied at `now`, and the account change feed is told.
    async fn apply_controller_change_in(
        tx: &mut DB::Connection,
        rec: &super::ControllerChangeRecord,
        now: i64,
        changed_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE accounts SET controller = $1 WHERE id = $2")
            .bind(&rec.new_controller)
            .bind(&rec.account_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        sqlx::query(
            "UPDATE sessions SET revoked_at = $1, revoked_by = 'keyward:controller-change' \
             WHERE account_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(&rec.account_id)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        sqlx::query("UPDATE controller_changes SET state = 'applied', settled_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&rec.id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        Self::note_account_change(tx, &rec.account_id, changed_at).await
    }

    /// In `tx`: a row of the account change feed every replica evicts its cache from.
    async fn note_account_change(tx: &mut DB::Connection, account_id: &str, changed_at: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO account_changes (account_id, changed_at) VALUES ($1, $2)")
            .bind(account_id)
            .bind(changed_at)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        Ok(())
    }

    fn raw_issuer_key(row: &DB::Row) -> Result<RawIssuerKey, StoreError> {
        Ok(RawIssuerKey {
            kid: row.try_get("kid").map_err(err::<DB>)?,
            alg: row.try_get("alg").map_err(err::<DB>)?,
            label: row.try_get("label").map_err(err::<DB>)?,
            state: row.try_get("state").map_err(err::<DB>)?,
            created_at: row.try_get("created_at").map_err(err::<DB>)?,
            activated_at: row.try_get("activated_at").map_err(err::<DB>)?,
            retired_at: row.try_get("retired_at").map_err(err::<DB>)?,
            revoked_at: row.try_get("revoked_at").map_err(err::<DB>)?,
            jwk: row.try_get("jwk").map_err(err::<DB>)?,
            wrapped: row.try_get("wrapped").map_err(err::<DB>)?,
            kek_version: row.try_get("kek_version").map_err(err::<DB>)?,
        })
    }

    /// Reads one session on `conn` (a transaction or the pool), locking the
    /// row until the transaction ends if `for_update` (where the dialect
    /// locks rows).
    async fn fetch_session<'e, E>(conn: E, id: &str, for_update: bool) -> Result<Option<SessionRecord>, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        let lock = if for_update { DB::FOR_UPDATE } else { "" };
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1{lock}");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(err::<DB>)?;
        row.map(|row| Self::raw_session(&row)?.decode()).transpose()
    }

    /// How many of the account's sessions are open at `now`, on `conn`.
    async fn count_open_in<'e, E>(conn: E, account_id: &str, now: i64) -> Result<u64, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        let open: i64 = sqlx::query_scalar(COUNT_OPEN_SESSIONS)
            .bind(account_id)
            .bind(now)
            .fetch_one(conn)
            .await
            .map_err(err::<DB>)?;
        count(open)
    }

    /// Runs a `DELETE` whose one parameter is `key`; returns the rows deleted.
    async fn delete_by(conn: &mut DB::Connection, sql: &'static str, key: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(sql).bind(key).execute(conn).await.map_err(err::<DB>)?;
        Ok(DB::rows_affected(&done))
    }

    /// One retention batch of ended sessions: their spends, the sessions and
    /// their challenges, in one transaction. Returns what went and whether
    /// the batch was full (more may be left).
    async fn prune_session_batch(&self, before: i64, now: i64, batch: u32) -> Result<(Pruned, bool), StoreError> {
        let mut tx = self.begin_write().await?;
        // Locked (PostgreSQL): a replica pruning at the same time waits, then
        // finds the rows gone and deletes nothing twice.
        let rows = sqlx::query(&format!("{ENDED_SESSIONS}{}", DB::FOR_UPDATE))
            .bind(before)
            .bind(now)
            .bind(i64::from(batch))
            .fetch_all(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let mut pruned = Pruned::default();
        for row in &rows {
            let id: String = row.try_get("id").map_err(err::<DB>)?;
            let challenge: String = row.try_get("challenge_id").map_err(err::<DB>)?;
            // Children first: spends name the session, the session its challenge.
            Self::delete_by(&mut tx, "DELETE FROM spends WHERE session_id = $1", &id).await?;
            Self::delete_by(&mut tx, "DELETE FROM session_assets WHERE session_id = $1", &id).await?;
            pruned.sessions += Self::delete_by(&mut tx, "DELETE FROM sessions WHERE id = $1", &id).await?;
            pruned.challenges += Self::delete_by(&mut tx, "DELETE FROM challenges WHERE id = $1", &challenge).await?;
        }
        tx.commit().await?;
        Ok((pruned, rows.len() >= usize::try_from(batch).unwrap_or(usize::MAX)))
    }

    /// The issuer keys of `alg` (all of them if `None`), sorted.
    async fn issuer_keys_where<'e, E>(conn: E, alg: Option<&str>) -> Result<Vec<IssuerKeyRecord>, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE CAST($1 AS TEXT) IS NULL OR alg = $1");
        let rows = sqlx::query(&sql).bind(alg).fetch_all(conn).await.map_err(err::<DB>)?;
        let mut keys = rows
            .iter()
            .map(|r| Self::raw_issuer_key(r)?.decode())
            .collect::<Result<Vec<_>, _>>()?;
        sort_issuer_keys(&mut keys);
        Ok(keys)
    }

    /// Makes `next` the active key, retiring `active` if given.
    async fn promote_in(
        conn: &mut DB::Connection,
        next: &str,
        active: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        if let Some(active) = active {
            sqlx::query(
                "UPDATE issuer_keys SET state = 'retired', retired_at = $1, wrapped = NULL \
                 WHERE kid = $2 AND state = 'active'",
            )
            .bind(now)
            .bind(active)
            .execute(&mut *conn)
            .await
            .map_err(err::<DB>)?;
        }
        sqlx::query("UPDATE issuer_keys SET state = 'active', activated_at = $1 WHERE kid = $2 AND state = 'next'")
            .bind(now)
            .bind(next)
            .execute(&mut *conn)
            .await
            .map_err(err::<DB>)?;
        Ok(())
    }

    /// `(kek_version, n)` rows of a per-KEK count query.
    async fn count_per_kek(&self, sql: &str) -> Result<Vec<(u32, u64)>, StoreError> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await.map_err(err::<DB>)?;
        rows.iter()
            .map(|r| {
                let v: i64 = r.try_get("kek_version").map_err(err::<DB>)?;
                let n: i64 = r.try_get("n").map_err(err::<DB>)?;
                let v = u32::try_from(v).map_err(|_| StoreError::Corrupt {
                    what: format!("kek_version {v}"),
                })?;
                Ok((v, count(n)?))
            })
            .collect()
    }

    /// Takes the dialect's rotation lock for the transaction (waiting), or
    /// only tries it when `try_only`; returns whether it is held (always,
    /// where the writer lock serialises issuer key changes instead).
    async fn lock_rotation(conn: &mut DB::Connection, try_only: bool) -> Result<bool, StoreError> {
        let Some(lock) = DB::ROTATION_LOCK else {
            return Ok(true);
        };
        if try_only {
            sqlx::query_scalar(lock.try_only)
                .bind(lock.key)
                .fetch_one(&mut *conn)
                .await
                .map_err(err::<DB>)
        } else {
            sqlx::query(lock.wait)
                .bind(lock.key)
                .execute(&mut *conn)
                .await
                .map_err(err::<DB>)?;
            Ok(true)
        }
    }

    /// Receipts, first step: the unsigned row and its audit event, in one
    /// transaction (see [`Store::record_receipt`]).
    async fn reserve_receipt(&self, r: &super::NewReceipt<'_>) -> Result<super::Reserved, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(existing) = Self::fetch_receipt(&mut *tx, r.account_id, r.caller, r.request_id).await? {
            tx.rollback().await?;
            return Ok(super::reserved_existing(r, existing));
        }
        // A concurrent identical request (another replica, another process
        // on the SQLite file) waits on the unique index here and then
        // inserts nothing: answer from the row it committed. SQLite's
        // AUTOINCREMENT never reuses a seq, and a rolled-back insert leaves
        // no gap there (sqlite_sequence is part of the transaction).
        let seq: Option<i64> = sqlx::query_scalar(
            "INSERT INTO receipts (receipt_id, account_id, caller, request_id, body_hash, session_id, created_at, jws) \
             VALUES ($1, $2, $7, $3, $4, $5, $6, '') \
             ON CONFLICT (account_id, caller, request_id) DO NOTHING RETURNING seq",
        )
        .bind(r.receipt_id)
        .bind(r.account_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(r.session_id)
        .bind(r.created_at)
        .bind(r.caller)
        .fetch_optional(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || format!("receipt {}", r.receipt_id)))?;
        let Some(seq) = seq else {
            tx.rollback().await?;
            return match Self::fetch_receipt(&self.pool, r.account_id, r.caller, r.request_id).await? {
                Some(existing) => Ok(super::reserved_existing(r, existing)),
                None => Err(StoreError::Conflict {
                    what: format!("receipt request {}", r.request_id),
                }),
            };
        };
        let seq_u = u64::try_from(seq).map_err(|_| StoreError::Corrupt {
            what: format!("receipt {}: negative seq", r.receipt_id),
        })?;
        // The receipt's audit event is appended in this transaction: its
        // sequence number is the receipt's `audit_seq`.
        let audit_seq = crate::audit::store::append_one::<DB>(&mut tx, r.audit.as_ref())
            .await?
            .unwrap_or(seq_u);
        sqlx::query("UPDATE receipts SET audit_seq = $1 WHERE seq = $2")
            .bind(i64::try_from(audit_seq).map_err(|_| StoreError::Corrupt {
                what: format!("receipt {}: audit seq out of range", r.receipt_id),
            })?)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
        Ok(super::Reserved::Fresh(super::ReceiptFacts {
            receipt_id: r.receipt_id.to_string(),
            created_at: r.created_at,
            audit_seq,
        }))
    }

    /// Receipts, after a failed signature: the unsigned row goes, and the
    /// compensating event is appended, in one transaction.
    async fn withdraw_receipt(
        &self,
        receipt_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM receipts WHERE receipt_id = $1 AND jws = ''")
            .bind(receipt_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The receipt `caller` recorded for `(account_id, request_id)`, on `conn`.
    async fn fetch_receipt<'e, E>(
        conn: E,
        account_id: &str,
        caller: &str,
        request_id: &str,
    ) -> Result<Option<super::ReceiptRecord>, StoreError>
    where
        E: Executor<'e, Database = DB>,
    {
        let sql = format!(
            "SELECT {} FROM receipts WHERE account_id = $1 AND caller = $2 AND request_id = $3",
            super::RECEIPT_COLUMNS
        );
        let row = sqlx::query(&sql)
            .bind(account_id)
            .bind(caller)
            .bind(request_id)
            .fetch_optional(conn)
            .await
            .map_err(err::<DB>)?;
        row.map(|row| -> Result<super::ReceiptRecord, StoreError> {
            super::RawReceipt {
                seq: row.try_get("seq").map_err(err::<DB>)?,
                receipt_id: row.try_get("receipt_id").map_err(err::<DB>)?,
                account_id: row.try_get("account_id").map_err(err::<DB>)?,
                caller: row.try_get("caller").map_err(err::<DB>)?,
                request_id: row.try_get("request_id").map_err(err::<DB>)?,
                body_hash: row.try_get("body_hash").map_err(err::<DB>)?,
                session_id: row.try_get("session_id").map_err(err::<DB>)?,
                created_at: row.try_get("created_at").map_err(err::<DB>)?,
                jws: row.try_get("jws").map_err(err::<DB>)?,
            }
            .decode()
        })
        .transpose()
    }

    /// Reads the total `key` (0 when absent) under its row lock, applies
    /// `f`, and stores its answer, in one write transaction; None from `f`
    /// changes nothing.
    async fn change_total(
        &self,
        key: &str,
        now: i64,
        f: impl FnOnce(u128) -> Option<u128> + Send,
    ) -> Result<Option<u128>, StoreError> {
        let mut tx = self.begin_write().await?;
        // The row exists (a zero total) and is locked: writers change it one
        // at a time.
        sqlx::query(
            "INSERT INTO limit_totals (key, total, updated_at) VALUES ($1, '0', $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        let sql = format!("SELECT total FROM limit_totals WHERE key = $1{}", DB::FOR_UPDATE);
        let stored: String = sqlx::query_scalar(&sql)
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let total = decode_amount(&format!("limit total {key}"), "total", &stored)?;
        let Some(next) = f(total) else {
            tx.rollback().await?;
            return Ok(None);
        };
        sqlx::query("UPDATE limit_totals SET total = $2, updated_at = $3 WHERE key = $1")
            .bind(key)
            .bind(encode_amount(next))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
        Ok(Some(next))
    }
}

#[async_trait::async_trait]
impl<DB> Store for SqlStore<DB>
where
    Self: std::fmt::Debug + crate::audit::AuditStore,
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q [u8]>: Encode<'q, DB>,
    for<'q> bool: Decode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    fn backend(&self) -> &'static str {
        DB::BACKEND
    }

    fn audit(&self) -> &dyn crate::audit::AuditStore {
        self
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(err::<DB>)?;
        Ok(())
    }

    async fn create_account_audited(
        &self,
        rec: &AccountRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin_write().await?;
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
        .map_err(conflict_as(DB::BACKEND, || format!("account {}", rec.id)))?;
        if DB::rows_affected(&inserted) == 0 {
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
            .map_err(conflict_as(DB::BACKEND, || {
                format!("{} key version {} of account {}", key.alg, key.key_version, rec.id)
            }))?;
        }
        for identity in grants(rec) {
            sqlx::query("INSERT INTO account_grants (account_id, identity) VALUES ($1, $2)")
                .bind(&rec.id)
                .bind(identity)
                .execute(&mut *tx)
                .await
                .map_err(conflict_as(DB::BACKEND, || {
                    format!("grant {identity} on account {}", rec.id)
                }))?;
        }
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        // One snapshot for the three reads.
        let mut tx = self.begin_snapshot().await?;
        let Some(row) = sqlx::query(
            "SELECT id, label, controller, created_by, created_at, frozen_at, frozen_reason, deleted_at \
             FROM accounts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err::<DB>)?
        else {
            return Ok(None);
        };
        let mut rec = AccountRecord {
            id: row.try_get("id").map_err(err::<DB>)?,
            label: row.try_get("label").map_err(err::<DB>)?,
            controller: row.try_get("controller").map_err(err::<DB>)?,
            created_by: row.try_get("created_by").map_err(err::<DB>)?,
            created_at: row.try_get("created_at").map_err(err::<DB>)?,
            allowed: Vec::new(),
            keys: Vec::new(),
            frozen: match row.try_get::<Option<i64>, _>("frozen_at").map_err(err::<DB>)? {
                Some(at) => Some(super::Frozen {
                    at,
                    reason: row
                        .try_get::<Option<String>, _>("frozen_reason")
                        .map_err(err::<DB>)?
                        .unwrap_or_default(),
                }),
                None => None,
            },
            deleted_at: row.try_get("deleted_at").map_err(err::<DB>)?,
        };
        let rows = sqlx::query(
            "SELECT alg, public_key, wrapped, kek_version, key_version FROM account_keys \
             WHERE account_id = $1 ORDER BY alg, key_version",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        for row in rows {
            let raw = RawKey {
                alg: row.try_get("alg").map_err(err::<DB>)?,
                public_key: row.try_get("public_key").map_err(err::<DB>)?,
                wrapped: row.try_get("wrapped").map_err(err::<DB>)?,
                kek_version: row.try_get("kek_version").map_err(err::<DB>)?,
                key_version: row.try_get("key_version").map_err(err::<DB>)?,
            };
            rec.keys.push(raw.decode(id)?);
        }
        let rows = sqlx::query("SELECT identity FROM account_grants WHERE account_id = $1 ORDER BY identity")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        for row in rows {
            rec.allowed.push(row.try_get("identity").map_err(err::<DB>)?);
        }
        tx.commit().await.map_err(err::<DB>)?;
        normalize(&mut rec);
        Ok(Some(rec))
    }

    async fn count_accounts(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.pool)
            .await
            .map_err(err::<DB>)?;
        count(n)
    }

    async fn create_challenge(&self, c: &ChallengeRecord) -> Result<(), StoreError> {
        let scopes = encode_scopes(DB::BACKEND, &c.scopes)?;
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO challenges \
             (id, account_id, delegate, scopes, cap, nonce, typed_data, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
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
        .map_err(conflict_as(DB::BACKEND, || format!("challenge {}", c.id)))?;
        if DB::rows_affected(&inserted) == 0 {
            return Err(StoreError::Conflict {
                what: format!("challenge {}", c.id),
            });
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_challenge(&self, id: &str) -> Result<Option<(ChallengeRecord, Option<i64>)>, StoreError> {
        let sql = format!("SELECT {CHALLENGE_COLUMNS} FROM challenges WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(err::<DB>)?;
        row.map(|row| Self::raw_challenge(&row)?.decode()).transpose()
    }

    async fn open_session_audited(
        &self,
        challenge_id: &str,
        now: i64,
        session: &SessionRecord,
        max_open: Option<u64>,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(OpenOutcome, Option<u64>), StoreError> {
        if session.challenge_id != challenge_id {
            return Err(challenge_mismatch(DB::BACKEND, challenge_id, session));
        }
        let what = format!("session {}", session.id);
        let scopes = encode_scopes(DB::BACKEND, &session.scopes)?;
        let uses = encode_uses(&what, session.uses)?;
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT consumed_at, expires_at FROM challenges WHERE id = $1{}",
            DB::FOR_UPDATE
        );
        let row = sqlx::query(&sql)
            .bind(challenge_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let refusal = match row {
            None => Some(OpenOutcome::ChallengeNotFound),
            Some(row) => {
                let consumed_at: Option<i64> = row.try_get("consumed_at").map_err(err::<DB>)?;
                let expires_at: i64 = row.try_get("expires_at").map_err(err::<DB>)?;
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
                if !DB::FOR_UPDATE.is_empty() {
                    // Opens of one account wait for each other here, so the
                    // count below is of committed sessions only.
                    let sql = format!("SELECT id FROM accounts WHERE id = $1{}", DB::FOR_UPDATE);
                    sqlx::query(&sql)
                        .bind(&session.account_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(err::<DB>)?;
                }
                let open = Self::count_open_in(&mut *tx, &session.account_id, now).await?;
                (open >= max).then_some(OpenOutcome::TooManyOpen(open))
            }
            (refusal, _) => refusal,
        };
        if let Some(outcome) = refusal {
            tx.rollback().await?;
            return Ok((outcome, None));
        }
        sqlx::query("UPDATE challenges SET consumed_at = $1 WHERE id = $2")
            .bind(now)
            .bind(challenge_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        sqlx::query(
            "INSERT INTO sessions \
             (id, account_id, delegate, scopes, cap, remaining, uses, issued_at, expires_at, \
              challenge_id, jti, revoked_at, revoked_by, scope_grammar) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .bind(i64::from(session.scope_grammar))
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || what.clone()))?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok((OpenOutcome::Opened, seq))
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Self::fetch_session(&self.pool, id, false).await
    }

    async fn list_sessions_page(
        &self,
        account_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = sessions_page_sql(DB::BYTE_ORDER, after.is_some());
        let mut query = sqlx::query(&sql).bind(account_id).bind(i64::from(limit));
        if let Some(c) = after {
            query = query.bind(c.issued_at).bind(&c.id);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(err::<DB>)?;
        rows.iter().map(|row| Self::raw_session(row)?.decode()).collect()
    }

    async fn count_open_sessions(&self, account_id: &str, now: i64) -> Result<u64, StoreError> {
        Self::count_open_in(&self.pool, account_id, now).await
    }

    async fn prune_sessions(&self, before: i64, now: i64, batch: u32) -> Result<Pruned, StoreError> {
        let batch = batch.max(1);
        let mut pruned = Pruned::default();
        loop {
            let (gone, full) = self.prune_session_batch(before, now, batch).await?;
            pruned.sessions += gone.sessions;
            pruned.challenges += gone.challenges;
            if !full {
                break;
            }
        }
        loop {
            let mut tx = self.begin_write().await?;
            let done = sqlx::query(DELETE_STALE_CHALLENGES)
                .bind(before)
                .bind(i64::from(batch))
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
            tx.commit().await?;
            let gone = DB::rows_affected(&done);
            pruned.challenges += gone;
            if gone < u64::from(batch) {
                return Ok(pruned);
            }
        }
    }

    async fn revoke_session(&self, id: &str, by: &str, now: i64) -> Result<Option<SessionRecord>, StoreError> {
        // The update locks the row (or runs under the writer lock): a
        // concurrent revocation waits, then finds it revoked and changes
        // nothing.
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_by = $2 WHERE id = $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(by)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let session = Self::fetch_session(&mut *tx, id, false).await?;
        tx.commit().await?;
        Ok(session)
    }

    async fn reserve_spend_audited(
        &self,
        r: &SpendRequest<'_>,
        event: Option<SpendEvent<'_>>,
    ) -> Result<(SpendOutcome, Option<u64>), StoreError> {
        let mut tx = self.begin_write().await?;
        // The row lock (or the writer lock) serialises spends of one session.
        let session = Self::fetch_session(&mut *tx, r.session_id, true).await?;
        let existing = match session {
            None => None,
            Some(_) => sqlx::query("SELECT body_hash, response FROM spends WHERE session_id = $1 AND request_id = $2")
                .bind(r.session_id)
                .bind(r.request_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err::<DB>)?
                .map(|row| -> Result<RawSpend, StoreError> {
                    Ok(RawSpend {
                        body_hash: row.try_get("body_hash").map_err(err::<DB>)?,
                        response: row.try_get("response").map_err(err::<DB>)?,
                    })
                })
                .transpose()?,
        };
        // The spent totals of the assets with their own caps it counts against.
        let mut spent = Vec::new();
        if session.is_some() {
            for part in super::spend_parts(r) {
                let Some((asset, _)) = part.asset_cap else { continue };
                if spent.iter().any(|(a, _): &(String, u128)| a == asset) {
                    continue;
                }
                let row: Option<String> =
                    sqlx::query_scalar("SELECT spent FROM session_assets WHERE session_id = $1 AND asset = $2")
                        .bind(r.session_id)
                        .bind(asset)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(err::<DB>)?;
                let value = match row {
                    Some(v) => decode_amount(&format!("session {} asset {asset}", r.session_id), "spent", &v)?,
                    None => 0,
                };
                spent.push((asset.to_string(), value));
            }
        }
        let (remaining, left, uses, new_spent) = match decide_spend(r, session, existing, &spent)? {
            SpendDecision::Answer(outcome) => {
                tx.rollback().await?;
                return Ok((outcome, None));
            }
            SpendDecision::Reserve {
                session_remaining,
                left,
                uses,
                asset_spent,
            } => (session_remaining, left, uses, asset_spent),
        };
        let what = format!("session {}", r.session_id);
        let stored_uses = encode_uses(&what, uses)?;
        sqlx::query("UPDATE sessions SET remaining = $1, uses = $2 WHERE id = $3")
            .bind(encode_amount(remaining))
            .bind(stored_uses)
            .bind(r.session_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        for (asset, total) in &new_spent {
            sqlx::query(
                "INSERT INTO session_assets (session_id, asset, spent) VALUES ($1, $2, $3) \
                 ON CONFLICT (session_id, asset) DO UPDATE SET spent = excluded.spent",
            )
            .bind(r.session_id)
            .bind(asset)
            .bind(encode_amount(*total))
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        }
        sqlx::query(
            "INSERT INTO spends (session_id, request_id, body_hash, amount, nonce, created_at, response, asset, \
             fee_asset, fee_amount) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9)",
        )
        .bind(r.session_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(encode_amount(r.amount))
        .bind(stored_uses)
        .bind(r.now)
        .bind(r.asset_cap.map(|(a, _)| a))
        .bind(r.fee.and_then(|f| f.asset_cap).map(|(a, _)| a))
        .bind(r.fee.map(|f| encode_amount(f.amount)))
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || {
            format!("spend {} of session {}", r.request_id, r.session_id)
        }))?;
        let event = event.map(|build| build(uses));
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event.as_ref()).await?;
        tx.commit().await?;
        Ok((
            SpendOutcome::Reserved {
                remaining: left,
                nonce: uses,
            },
            seq,
        ))
    }

    async fn complete_spend(&self, session_id: &str, request_id: &str, response: &[u8]) -> Result<bool, StoreError> {
        let _writer = self.write_lock().await;
        let done = sqlx::query(
            "UPDATE spends SET response = $1 \
             WHERE session_id = $2 AND request_id = $3 AND response IS NULL",
        )
        .bind(response)
        .bind(session_id)
        .bind(request_id)
        .execute(&self.pool)
        .await
        .map_err(err::<DB>)?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn session_asset_spent(&self, session_id: &str) -> Result<Vec<(String, u128)>, StoreError> {
        let rows = sqlx::query("SELECT asset, spent FROM session_assets WHERE session_id = $1 ORDER BY asset")
            .bind(session_id)
            .fetch_all(&self.pool)
            .await
            .map_err(err::<DB>)?;
        rows.iter()
            .map(|row| {
                let asset: String = row.try_get("asset").map_err(err::<DB>)?;
                let spent: String = row.try_get("spent").map_err(err::<DB>)?;
                let spent = decode_amount(&format!("session {session_id} asset {asset}"), "spent", &spent)?;
                Ok((asset, spent))
            })
            .collect()
    }

    async fn get_spend(&self, session_id: &str, request_id: &str) -> Result<Option<super::SpendRecord>, StoreError> {
        let row = sqlx::query("SELECT amount, response FROM spends WHERE session_id = $1 AND request_id = $2")
            .bind(session_id)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(err::<DB>)?;
        row.map(|r| {
            let amount: String = r.try_get("amount").map_err(err::<DB>)?;
            Ok(super::SpendRecord {
                amount: amount.parse().map_err(|_| StoreError::Corrupt {
                    what: format!("spend amount {amount:?}"),
                })?,
                response: r.try_get("response").map_err(err::<DB>)?,
            })
        })
        .transpose()
    }

    async fn stale_spends(&self, before: i64, limit: u32) -> Result<Vec<super::PendingSpend>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.session_id, s.account_id, p.request_id, p.created_at \
             FROM spends p JOIN sessions s ON s.id = p.session_id \
             WHERE p.response IS NULL AND p.created_at < $1 \
             ORDER BY p.created_at, p.session_id, p.request_id LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err::<DB>)?;
        rows.iter()
            .map(|row| {
                Ok(super::PendingSpend {
                    session_id: row.try_get("session_id").map_err(err::<DB>)?,
                    account_id: row.try_get("account_id").map_err(err::<DB>)?,
                    request_id: row.try_get("request_id").map_err(err::<DB>)?,
                    created_at: row.try_get("created_at").map_err(err::<DB>)?,
                })
            })
            .collect()
    }

    async fn probe_write(&self, now: i64) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO store_health (id, probed_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        tx.commit().await?;
        Ok(())
    }

    async fn release_spend_audited(
        &self,
        session_id: &str,
        request_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let sql = format!("SELECT remaining FROM sessions WHERE id = $1{}", DB::FOR_UPDATE);
        let remaining: Option<String> = sqlx::query_scalar(&sql)
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let pending = sqlx::query(
            "SELECT amount, asset, fee_asset, fee_amount FROM spends \
             WHERE session_id = $1 AND request_id = $2 AND response IS NULL",
        )
        .bind(session_id)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        let (Some(remaining), Some(pending)) = (remaining, pending) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let what = format!("session {session_id}");
        let spend = format!("spend {request_id} of {what}");
        let amount: String = pending.try_get("amount").map_err(err::<DB>)?;
        let asset: Option<String> = pending.try_get("asset").map_err(err::<DB>)?;
        let fee_asset: Option<String> = pending.try_get("fee_asset").map_err(err::<DB>)?;
        let fee_amount: Option<String> = pending.try_get("fee_amount").map_err(err::<DB>)?;
        let mut parts = vec![(asset, decode_amount(&spend, "amount", &amount)?)];
        if let Some(fee) = fee_amount {
            parts.push((fee_asset, decode_amount(&spend, "fee_amount", &fee)?));
        }
        sqlx::query("DELETE FROM spends WHERE session_id = $1 AND request_id = $2")
            .bind(session_id)
            .bind(request_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let mut restored = decode_amount(&what, "remaining", &remaining)?;
        for (asset, amount) in parts {
            match asset {
                // Counted against its asset's own cap: the asset's total gives it back.
                Some(asset) => {
                    let spent: Option<String> =
                        sqlx::query_scalar("SELECT spent FROM session_assets WHERE session_id = $1 AND asset = $2")
                            .bind(session_id)
                            .bind(&asset)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(err::<DB>)?;
                    let corrupt = || StoreError::Corrupt {
                        what: format!("{what}: asset {asset} released {amount} more than it spent"),
                    };
                    let spent = decode_amount(&format!("{what} asset {asset}"), "spent", &spent.ok_or_else(corrupt)?)?;
                    let left = spent.checked_sub(amount).ok_or_else(corrupt)?;
                    sqlx::query("UPDATE session_assets SET spent = $1 WHERE session_id = $2 AND asset = $3")
                        .bind(encode_amount(left))
                        .bind(session_id)
                        .bind(&asset)
                        .execute(&mut *tx)
                        .await
                        .map_err(err::<DB>)?;
                }
                None => {
                    restored = restored.checked_add(amount).ok_or_else(|| StoreError::Corrupt {
                        what: format!("{what}: remaining {restored} + released {amount} overflows"),
                    })?;
                }
            }
        }
        sqlx::query("UPDATE sessions SET remaining = $1 WHERE id = $2")
            .bind(encode_amount(restored))
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
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

    fn direct_audit(&self) -> Option<crate::audit::writer::DirectAudit> {
        DB::WRITER_MUTEX.then(|| crate::audit::writer::DirectAudit {
            path: std::path::PathBuf::from(&self.location),
            writer: self.writer.clone(),
        })
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    /// Records a receipt in three steps, so that no HSM call is made under
    /// the audit head's lock (SQLite's writer, PostgreSQL's `FOR UPDATE`):
    /// the row and its audit event commit first, unsigned; the signer runs
    /// with no transaction open; the JWS is stored in a short transaction of
    /// its own. A failed signature withdraws the row this call recorded,
    /// with its compensating event. A row left unsigned (a crash, a failed
    /// withdrawal) is completed by the next retry with the same request id,
    /// which signs the recorded facts.
    async fn record_receipt(
        &self,
        r: &super::NewReceipt<'_>,
        sign: super::ReceiptSigner,
    ) -> Result<super::ReceiptOutcome, StoreError> {
        let (facts, fresh) = match self.reserve_receipt(r).await? {
            super::Reserved::Done(outcome) => return Ok(outcome),
            super::Reserved::Fresh(facts) => (facts, true),
            super::Reserved::Pending(existing) => (
                super::ReceiptFacts {
                    receipt_id: existing.receipt_id,
                    created_at: existing.created_at,
                    audit_seq: existing.seq,
                },
                false,
            ),
        };
        let jws = match sign(facts.clone()).await {
            Ok(jws) => jws,
            Err(e) => {
                if fresh {
                    self.withdraw_receipt(&facts.receipt_id, r.abandon.as_ref()).await?;
                }
                return Ok(super::ReceiptOutcome::SignFailed(e));
            }
        };
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE receipts SET jws = $1 WHERE receipt_id = $2 AND jws = ''")
            .bind(&jws)
            .bind(&facts.receipt_id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
        if DB::rows_affected(&done) == 0 {
            // A concurrent retry of the same request stored its signature
            // first: answer with what is stored.
            return match self.get_receipt(r.account_id, r.caller, r.request_id).await? {
                Some(existing) if !existing.jws.is_empty() => Ok(super::ReceiptOutcome::Replay(existing)),
                _ => Err(StoreError::Conflict {
                    what: format!("receipt request {}", r.request_id),
                }),
            };
        }
        let record = super::ReceiptRecord {
            seq: facts.audit_seq,
            receipt_id: facts.receipt_id,
            account_id: r.account_id.to_string(),
            caller: r.caller.to_string(),
            request_id: r.request_id.to_string(),
            body_hash: r.body_hash,
            session_id: r.session_id.map(str::to_string),
            created_at: facts.created_at,
            jws,
        };
        Ok(if fresh {
            super::ReceiptOutcome::Recorded(record)
        } else {
            super::ReceiptOutcome::Completed(record)
        })
    }

    async fn get_receipt(
        &self,
        account_id: &str,
        caller: &str,
        request_id: &str,
    ) -> Result<Option<super::ReceiptRecord>, StoreError> {
        Self::fetch_receipt(&self.pool, account_id, caller, request_id).await
    }

    // ---- Issuer keys (JWKS lifecycle, issue 5) ----
    // Every state change but a deletion takes the rotation lock in its
    // transaction where the dialect has one (scheduled promotion only tries
    // it: one replica rotates, the others skip), else runs under the writer
    // lock; the partial unique index keeps one active key per algorithm.

    async fn add_kek_backup_audited(
        &self,
        rec: &super::KekBackupRecord,
        event: &crate::audit::NewEvent,
    ) -> Result<u64, StoreError> {
        let keks = serde_json::to_string(&rec.keks).map_err(|e| StoreError::Backend {
            backend: DB::BACKEND,
            reason: format!("KEK backup does not encode: {e}"),
        })?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO kek_backups (id, created_at, created_by, threshold, shares, recovery_check, keks) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&rec.id)
        .bind(rec.created_at)
        .bind(&rec.created_by)
        .bind(i64::from(rec.threshold))
        .bind(i64::from(rec.shares))
        .bind(&rec.recovery_check[..])
        .bind(&keks)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || format!("KEK backup {}", rec.id)))?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, Some(event)).await?;
        tx.commit().await?;
        seq.ok_or_else(|| StoreError::Backend {
            backend: DB::BACKEND,
            reason: "append returned no event".into(),
        })
    }

    async fn get_kek_backup(&self, id: Option<&str>) -> Result<Option<super::KekBackupRecord>, StoreError> {
        let columns = "id, created_at, created_by, threshold, shares, recovery_check, keks";
        let row = match id {
            Some(id) => {
                sqlx::query(&format!("SELECT {columns} FROM kek_backups WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {columns} FROM kek_backups ORDER BY created_at DESC, id DESC LIMIT 1"
                ))
                .fetch_optional(&self.pool)
                .await
            }
        }
        .map_err(err::<DB>)?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id").map_err(err::<DB>)?;
        let corrupt = |what: &str| StoreError::Corrupt {
            what: format!("KEK backup {id}: {what}"),
        };
        let threshold: i64 = row.try_get("threshold").map_err(err::<DB>)?;
        let shares: i64 = row.try_get("shares").map_err(err::<DB>)?;
        let check: Vec<u8> = row.try_get("recovery_check").map_err(err::<DB>)?;
        let keks: String = row.try_get("keks").map_err(err::<DB>)?;
        Ok(Some(super::KekBackupRecord {
            created_at: row.try_get("created_at").map_err(err::<DB>)?,
            created_by: row.try_get("created_by").map_err(err::<DB>)?,
            threshold: u8::try_from(threshold).map_err(|_| corrupt("threshold"))?,
            shares: u8::try_from(shares).map_err(|_| corrupt("shares"))?,
            recovery_check: <[u8; 32]>::try_from(check.as_slice()).map_err(|_| corrupt("recovery_check"))?,
            keks: serde_json::from_str(&keks).map_err(|_| corrupt("keks"))?,
            id,
        }))
    }

    async fn account_ids_page(&self, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(err::<DB>)
    }

    async fn list_account_ids(
        &self,
        filter: &super::AccountFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM accounts WHERE id > $1 \
             AND (CAST($2 AS TEXT) IS NULL OR label = $2) \
             AND (CAST($3 AS TEXT) IS NULL OR lower(controller) = lower($3)) \
             AND (CAST($4 AS TEXT) IS NULL OR created_by = $4) \
             AND (deleted_at IS NULL OR $6 = 1) \
             ORDER BY id LIMIT $5",
        )
        .bind(after.unwrap_or(""))
        .bind(filter.label.as_deref())
        .bind(filter.controller.as_deref())
        .bind(filter.created_by.as_deref())
        .bind(i64::from(limit))
        .bind(i64::from(filter.include_deleted))
        .fetch_all(&self.pool)
        .await
        .map_err(err::<DB>)
    }

    async fn change_account_audited(
        &self,
        id: &str,
        change: &super::AccountChange,
        changed_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let mut tx = self.begin_write().await?;
        let sql = format!("SELECT id FROM accounts WHERE id = $1{}", DB::FOR_UPDATE);
        let found: Option<String> = sqlx::query_scalar(&sql)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        if found.is_none() {
            return Ok((false, None));
        }
        if let Some(label) = &change.label {
            sqlx::query("UPDATE accounts SET label = $1 WHERE id = $2")
                .bind(label.as_deref())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
        }
        if let Some(allowed) = &change.allowed {
            sqlx::query("DELETE FROM account_grants WHERE account_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
            let mut allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            allowed.sort_unstable();
            allowed.dedup();
            for identity in allowed {
                sqlx::query("INSERT INTO account_grants (account_id, identity) VALUES ($1, $2)")
                    .bind(id)
                    .bind(identity)
                    .execute(&mut *tx)
                    .await
                    .map_err(err::<DB>)?;
            }
        }
        for key in change.new_keys.iter().flatten() {
            sqlx::query(
                "INSERT INTO account_keys \
                 (account_id, alg, public_key, wrapped, kek_version, key_version) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(key.alg.as_str())
            .bind(&key.public_key)
            .bind(&key.wrapped)
            .bind(i64::from(key.kek_version))
            .bind(i64::from(key.key_version))
            .execute(&mut *tx)
            .await
            .map_err(conflict_as(DB::BACKEND, || {
                format!("{} key version {} of account {id}", key.alg, key.key_version)
            }))?;
        }
        if let Some(at) = change.deleted_at {
            // Crypto-shred: the wrapped private keys go; the public keys stay for verifiers.
            sqlx::query("UPDATE accounts SET deleted_at = $1 WHERE id = $2")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
            sqlx::query("UPDATE account_keys SET wrapped = $1, kek_version = 0 WHERE account_id = $2")
                .bind(Vec::<u8>::new())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
            sqlx::query(
                "UPDATE controller_changes SET state = 'cancelled', settled_at = $1 \
                 WHERE account_id = $2 AND state = 'pending'",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
            sqlx::query(
                "UPDATE sessions SET revoked_at = $1, revoked_by = 'keyward:account-deleted' \
                 WHERE account_id = $2 AND revoked_at IS NULL",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        }
        if let Some(frozen) = &change.frozen {
            sqlx::query("UPDATE accounts SET frozen_at = $1, frozen_reason = $2 WHERE id = $3")
                .bind(frozen.as_ref().map(|f| f.at))
                .bind(frozen.as_ref().map(|f| f.reason.as_str()))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(err::<DB>)?;
        }
        Self::note_account_change(&mut tx, id, changed_at).await?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok((true, seq))
    }

    async fn request_controller_change_audited(
        &self,
        rec: &super::ControllerChangeRecord,
        changed_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let sql = format!("SELECT controller FROM accounts WHERE id = $1{}", DB::FOR_UPDATE);
        let current: Option<String> = sqlx::query_scalar(&sql)
            .bind(&rec.account_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        if !current.is_some_and(|c| c.eq_ignore_ascii_case(&rec.old_controller)) {
            return Err(StoreError::Conflict {
                what: format!("the controller of account {} changed meanwhile", rec.account_id),
            });
        }
        let pending: Option<i64> = sqlx::query_scalar(
            "SELECT effective_at FROM controller_changes WHERE account_id = $1 AND state = 'pending'",
        )
        .bind(&rec.account_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        if let Some(at) = pending {
            return Err(StoreError::Conflict {
                what: format!(
                    "a controller change of account {} is pending (effective at {at}); cancel it first",
                    rec.account_id
                ),
            });
        }
        let due = rec.effective_at <= rec.requested_at;
        sqlx::query(
            "INSERT INTO controller_changes (id, account_id, old_controller, new_controller, requested_by, \
             requested_at, effective_at, digest, state, settled_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', NULL)",
        )
        .bind(&rec.id)
        .bind(&rec.account_id)
        .bind(&rec.old_controller)
        .bind(&rec.new_controller)
        .bind(&rec.requested_by)
        .bind(rec.requested_at)
        .bind(rec.effective_at)
        .bind(rec.digest.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || {
            "this ControllerChange document was used already".to_string()
        }))?;
        if due {
            Self::apply_controller_change_in(&mut tx, rec, rec.requested_at, changed_at).await?;
        }
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn cancel_controller_change_audited(
        &self,
        account_id: &str,
        only: Option<&str>,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<super::ControllerChangeRecord>, Option<u64>), StoreError> {
        let mut tx = self.begin_write().await?;
        let sql = format!(
            "SELECT {CONTROLLER_CHANGE_COLUMNS} FROM controller_changes WHERE account_id = $1 AND state = 'pending'{}",
            DB::FOR_UPDATE
        );
        let row = sqlx::query(&sql)
            .bind(account_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let Some(row) = row else { return Ok((None, None)) };
        let mut rec = Self::controller_change(&row)?;
        if only.is_some_and(|id| id != rec.id) {
            return Ok((None, None));
        }
        sqlx::query("UPDATE controller_changes SET state = 'cancelled', settled_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&rec.id)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        rec.state = "cancelled".into();
        rec.settled_at = Some(now);
        Ok((Some(rec), seq))
    }

    async fn apply_due_controller_changes(
        &self,
        now: i64,
        changed_at: i64,
        event: &crate::audit::NewEvent,
    ) -> Result<Vec<super::ControllerChangeRecord>, StoreError> {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM controller_changes WHERE state = 'pending' AND effective_at <= $1 ORDER BY effective_at, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(err::<DB>)?;
        let mut applied = Vec::new();
        for id in due {
            let mut tx = self.begin_write().await?;
            let sql = format!(
                "SELECT {CONTROLLER_CHANGE_COLUMNS} FROM controller_changes WHERE id = $1 AND state = 'pending'{}",
                DB::FOR_UPDATE
            );
            let row = sqlx::query(&sql)
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err::<DB>)?;
            // Applied or cancelled by another replica meanwhile.
            let Some(row) = row else { continue };
            let mut rec = Self::controller_change(&row)?;
            Self::apply_controller_change_in(&mut tx, &rec, now, changed_at).await?;
            let mut e = event.clone();
            e.account.clone_from(&rec.account_id);
            e.signature_ref = format!("controller:{}", rec.new_controller);
            crate::audit::store::append_one::<DB>(&mut tx, Some(&e)).await?;
            tx.commit().await?;
            rec.state = "applied".into();
            rec.settled_at = Some(now);
            applied.push(rec);
        }
        Ok(applied)
    }

    async fn create_import_job_audited(
        &self,
        id: &str,
        created_by: &str,
        created_at: i64,
        expires_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO import_jobs (id, created_by, created_at, expires_at, used_at) VALUES ($1, $2, $3, $4, NULL)",
        )
        .bind(id)
        .bind(created_by)
        .bind(created_at)
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || format!("import job {id}")))?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok(seq)
    }

    async fn import_job_open(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM import_jobs WHERE id = $1 AND used_at IS NULL AND expires_at > $2",
        )
        .bind(id)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(err::<DB>)?;
        Ok(n > 0)
    }

    async fn take_import_job(&self, id: &str, now: i64) -> Result<Option<String>, StoreError> {
        let taken =
            sqlx::query("UPDATE import_jobs SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND expires_at > $1")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(err::<DB>)?;
        if DB::rows_affected(&taken) == 1 {
            return Ok(None);
        }
        let row: Option<(Option<i64>, i64)> =
            sqlx::query_as("SELECT used_at, expires_at FROM import_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(err::<DB>)?;
        Ok(Some(match row {
            None => format!("no import job {id}"),
            Some((Some(at), _)) => format!("import job {id} was used at {at}; ask for a new one"),
            Some((None, exp)) => format!("import job {id} expired at {exp}; ask for a new one"),
        }))
    }

    async fn prune_account_changes(&self, before: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM account_changes WHERE changed_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
        Ok(DB::rows_affected(&done))
    }

    async fn account_changes_since(&self, since: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = sqlx::query("SELECT seq, account_id FROM account_changes WHERE changed_at >= $1 ORDER BY seq")
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(err::<DB>)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("seq").map_err(err::<DB>)?,
                    r.try_get("account_id").map_err(err::<DB>)?,
                ))
            })
            .collect()
    }

    async fn key_blobs_under(
        &self,
        kek_version: u32,
        after: Option<&super::KeyBlob>,
        limit: u32,
    ) -> Result<Vec<super::KeyBlob>, StoreError> {
        let (a, alg, kv) = after.map_or((String::new(), String::new(), -1i64), |b| {
            (b.account_id.clone(), b.alg.clone(), i64::from(b.key_version))
        });
        let rows = sqlx::query(
            "SELECT account_id, alg, key_version, wrapped FROM account_keys WHERE kek_version = $1 \
             AND (account_id, alg, key_version) > ($2, $3, $4) ORDER BY account_id, alg, key_version LIMIT $5",
        )
        .bind(i64::from(kek_version))
        .bind(a)
        .bind(alg)
        .bind(kv)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err::<DB>)?;
        rows.iter()
            .map(|r| {
                let key_version: i64 = r.try_get("key_version").map_err(err::<DB>)?;
                Ok(super::KeyBlob {
                    account_id: r.try_get("account_id").map_err(err::<DB>)?,
                    alg: r.try_get("alg").map_err(err::<DB>)?,
                    key_version: u32::try_from(key_version).map_err(|_| StoreError::Corrupt {
                        what: format!("key_version {key_version}"),
                    })?,
                    kek_version,
                    wrapped: r.try_get("wrapped").map_err(err::<DB>)?,
                })
            })
            .collect()
    }

    async fn replace_key_blob(
        &self,
        blob: &super::KeyBlob,
        wrapped: &[u8],
        kek_version: u32,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE account_keys SET wrapped = $1, kek_version = $2 \
             WHERE account_id = $3 AND alg = $4 AND key_version = $5 AND kek_version = $6",
        )
        .bind(wrapped)
        .bind(i64::from(kek_version))
        .bind(&blob.account_id)
        .bind(&blob.alg)
        .bind(i64::from(blob.key_version))
        .bind(i64::from(blob.kek_version))
        .execute(&self.pool)
        .await
        .map_err(err::<DB>)?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn keys_per_kek(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.count_per_kek(
            "SELECT kek_version, COUNT(*) AS n FROM account_keys WHERE kek_version > 0 \
             GROUP BY kek_version ORDER BY kek_version",
        )
        .await
    }

    async fn issuer_keys_per_kek(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.count_per_kek(
            "SELECT kek_version, COUNT(*) AS n FROM issuer_keys WHERE wrapped IS NOT NULL \
             GROUP BY kek_version ORDER BY kek_version",
        )
        .await
    }

    async fn replace_issuer_blob(
        &self,
        kid: &str,
        from_kek: u32,
        wrapped: &[u8],
        kek_version: u32,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE issuer_keys SET wrapped = $1, kek_version = $2 \
             WHERE kid = $3 AND kek_version = $4 AND wrapped IS NOT NULL",
        )
        .bind(wrapped)
        .bind(i64::from(kek_version))
        .bind(kid)
        .bind(i64::from(from_kek))
        .execute(&self.pool)
        .await
        .map_err(err::<DB>)?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn retire_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: &crate::audit::NewEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        Self::lock_rotation(&mut tx, false).await?;
        let done = sqlx::query(
            "UPDATE issuer_keys SET state = 'retired', retired_at = $1, wrapped = NULL \
             WHERE kid = $2 AND state IN ('next', 'active')",
        )
        .bind(now)
        .bind(kid)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        let n = DB::rows_affected(&done);
        if n == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        crate::audit::store::append_one::<DB>(&mut tx, Some(event)).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_issuer_keys(&self) -> Result<Vec<IssuerKeyRecord>, StoreError> {
        Self::issuer_keys_where(&self.pool, None).await
    }

    async fn issuer_key_history(&self) -> Result<Vec<super::IssuerKeyHistoryRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, alg, jwk, created_at, activated_at, retired_at, revoked_at \
             FROM issuer_key_history ORDER BY alg, created_at, kid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(err::<DB>)?;
        rows.iter()
            .map(|row| {
                Ok(super::IssuerKeyHistoryRecord {
                    kid: row.try_get("kid").map_err(err::<DB>)?,
                    alg: row.try_get("alg").map_err(err::<DB>)?,
                    jwk: row.try_get("jwk").map_err(err::<DB>)?,
                    created_at: row.try_get("created_at").map_err(err::<DB>)?,
                    activated_at: row.try_get("activated_at").map_err(err::<DB>)?,
                    retired_at: row.try_get("retired_at").map_err(err::<DB>)?,
                    revoked_at: row.try_get("revoked_at").map_err(err::<DB>)?,
                })
            })
            .collect()
    }

    async fn add_issuer_key_audited(
        &self,
        rec: &IssuerKeyRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        if !matches!(rec.state, IssuerKeyState::Active | IssuerKeyState::Next) {
            return Err(StoreError::Backend {
                backend: DB::BACKEND,
                reason: format!("a new issuer key must be next or active, not {}", rec.state.as_str()),
            });
        }
        let mut tx = self.begin_write().await?;
        Self::lock_rotation(&mut tx, false).await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM issuer_keys WHERE alg = $1 AND state = $2")
            .bind(&rec.alg)
            .bind(rec.state.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        if n > 0 {
            tx.rollback().await?;
            return Ok((false, None));
        }
        sqlx::query(&format!(
            "INSERT INTO issuer_keys ({ISSUER_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
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
        .bind(rec.wrapped.as_deref())
        .bind(rec.kek_version.map(i64::from))
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(DB::BACKEND, || format!("issuer key {}", rec.kid)))?;
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
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
        let mut tx = self.begin_write().await?;
        if !Self::lock_rotation(&mut tx, active_due_before.is_some()).await? {
            tx.rollback().await?;
            return Ok((vec![PromoteOutcome::Busy], None));
        }
        let mut promoted = Vec::with_capacity(algs.len());
        for alg in algs {
            let keys = Self::issuer_keys_where(&mut *tx, Some(alg)).await?;
            match decide_promote(&keys, now, min_published, active_due_before) {
                Ok((next, active)) => {
                    Self::promote_in(&mut tx, &next, active.as_deref(), now).await?;
                    promoted.push((next, active));
                }
                Err(outcome) => {
                    tx.rollback().await?;
                    return Ok((vec![outcome], None));
                }
            }
        }
        let events = audit.map(|a| a.events(&promoted)).unwrap_or_default();
        let seq = crate::audit::store::append_in::<DB>(&mut tx, &events)
            .await?
            .first()
            .map(|e| e.seq);
        tx.commit().await?;
        Ok((promoted_outcomes(promoted), seq))
    }

    async fn revoke_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<RevokeOutcome>, Option<u64>), StoreError> {
        let mut tx = self.begin_write().await?;
        Self::lock_rotation(&mut tx, false).await?;
        let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE kid = $1");
        let row = sqlx::query(&sql)
            .bind(kid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let Some(before) = row.map(|r| Self::raw_issuer_key(&r)?.decode()).transpose()? else {
            tx.rollback().await?;
            return Ok((None, None));
        };
        if before.state == IssuerKeyState::Revoked {
            tx.rollback().await?;
            return Ok((Some(RevokeOutcome { before, promoted: None }), None));
        }
        sqlx::query(
            "UPDATE issuer_keys SET state = 'revoked', revoked_at = $1, wrapped = NULL \
             WHERE kid = $2",
        )
        .bind(now)
        .bind(kid)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        let mut promoted = None;
        if before.state == IssuerKeyState::Active {
            let keys = Self::issuer_keys_where(&mut *tx, Some(&before.alg)).await?;
            if let Ok((next, _)) = decide_promote(&keys, now, 0, None) {
                Self::promote_in(&mut tx, &next, None, now).await?;
                promoted = Some(next);
            }
        }
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok((Some(RevokeOutcome { before, promoted }), seq))
    }

    async fn delete_issuer_key_audited(
        &self,
        kid: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let mut tx = self.begin_write().await?;
        let r = sqlx::query("DELETE FROM issuer_keys WHERE kid = $1 AND state IN ('retired', 'revoked')")
            .bind(kid)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        if DB::rows_affected(&r) == 0 {
            tx.rollback().await?;
            return Ok((false, None));
        }
        let seq = crate::audit::store::append_one::<DB>(&mut tx, event).await?;
        tx.commit().await?;
        Ok((true, seq))
    }

    async fn take_token(&self, key: &str, bucket: super::limits::Bucket, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        // The row exists (created full) and is locked: writers take tokens
        // one at a time. A refusal rolls the creation back.
        let full = i64::try_from(bucket.capacity)
            .unwrap_or(i64::MAX / super::limits::MILLI)
            .saturating_mul(super::limits::MILLI);
        sqlx::query(
            "INSERT INTO limit_buckets (key, tokens, updated_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(full)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err::<DB>)?;
        let sql = format!(
            "SELECT tokens, updated_at FROM limit_buckets WHERE key = $1{}",
            DB::FOR_UPDATE
        );
        let stored: (i64, i64) = sqlx::query_as(&sql)
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let Some((tokens, at)) = super::limits::take(Some(stored), now, bucket) else {
            tx.rollback().await?;
            return Ok(false);
        };
        sqlx::query("UPDATE limit_buckets SET tokens = $2, updated_at = $3 WHERE key = $1")
            .bind(key)
            .bind(tokens)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
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
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM limit_totals WHERE updated_at < $1")
            .bind(totals_before)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let mut gone = DB::rows_affected(&deleted);
        for (prefix, before) in buckets {
            let deleted =
                sqlx::query("DELETE FROM limit_buckets WHERE substr(key, 1, length($1)) = $1 AND updated_at < $2")
                    .bind(prefix)
                    .bind(before)
                    .execute(&mut *tx)
                    .await
                    .map_err(err::<DB>)?;
            gone += DB::rows_affected(&deleted);
        }
        tx.commit().await?;
        Ok(gone)
    }
}
