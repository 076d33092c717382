//! What the audit log needs from the store, and its one implementation for
//! both SQL backends. The chain head lives in a one-row table that every
//! append locks inside its transaction (SQLite: the store's writer lock and
//! `BEGIN IMMEDIATE`; PostgreSQL: `SELECT ... FOR UPDATE` on the head), so
//! appends serialise with every state change and several replicas on one
//! PostgreSQL database append to a single dense chain.

use std::fmt;

use serde::{Deserialize, Serialize};
use sqlx::{ColumnIndex, Decode, Encode, Executor, IntoArguments, Row, Type};

use super::chain::link;
use super::event::{hex32, Event, NewEvent};
use crate::store::dialect::Dialect;
use crate::store::{from_sqlx, SqlStore, StoreError};

/// The chain's ends as the store records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The last pruned (archived) event, 0 if none was pruned.
    pub base_seq: u64,
    /// Its hash (the `prev_hash` of the first stored event).
    pub base_hash: [u8; 32],
    /// The last appended event, 0 if none.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

/// A signed checkpoint over `first_seq..=last_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// First event covered.
    pub first_seq: u64,
    /// Last event covered.
    pub last_seq: u64,
    /// RFC 6962 Merkle tree hash over the covered events' hashes.
    #[serde(with = "hex32")]
    pub root: [u8; 32],
    /// When it was made, unix seconds.
    pub created_at: i64,
    /// The compact JWS over the checkpoint claims.
    pub jws: String,
}

/// Audit persistence.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + fmt::Debug {
    /// Appends `events` in one transaction (one commit, one fsync), under
    /// the head lock; returns them with their sequence numbers and hashes.
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<Event>, StoreError>;

    /// Up to `limit` events with `seq > after`, ascending.
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError>;

    /// The recorded chain ends.
    async fn audit_head(&self) -> Result<Head, StoreError>;

    /// Every stored checkpoint, by `first_seq`.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;

    /// The stored checkpoint with the highest `first_seq`, if any (one row,
    /// however many checkpoints there are).
    async fn last_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;

    /// The `(seq, hash)` of the events `first..=last`, ascending (fewer if
    /// some are missing): what a checkpoint's Merkle tree needs, without
    /// reading the events' other columns.
    async fn event_hashes(&self, first: u64, last: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError>;

    /// Stores a checkpoint; false (nothing written) if one already starts at
    /// its `first_seq` (another replica was first).
    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<bool, StoreError>;

    /// Deletes the events `<= through` and the checkpoints ending `<= through`,
    /// and records event `through` as the new base; returns how many events
    /// were deleted.
    async fn prune_events(&self, through: u64) -> Result<u64, StoreError>;
}

/// Chains `events` onto `(seq, hash)`.
pub(crate) fn chain_onto(mut seq: u64, mut hash: [u8; 32], events: &[NewEvent]) -> Vec<Event> {
    events
        .iter()
        .map(|e| {
            seq += 1;
            let prev = hash;
            hash = link(&prev, seq, e);
            Event {
                seq,
                body: e.clone(),
                prev_hash: prev,
                hash,
            }
        })
        .collect()
}

/// One `audit_events` row as read.
pub(crate) struct RawEvent {
    pub seq: i64,
    pub time_ms: i64,
    pub identity: String,
    pub action: String,
    pub account: String,
    pub session: String,
    pub request_id: String,
    pub decision: String,
    pub policies: String,
    pub code: String,
    pub digest: String,
    pub signature_ref: String,
    pub trace_id: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The columns of an `audit_events` row, in [`RawEvent`] order.
pub(crate) const EVENT_COLUMNS: &str = "seq, time_ms, identity, action, account, session, request_id, decision, \
     policies, code, digest, signature_ref, trace_id, prev_hash, hash";

pub(crate) fn hash32(what: &str, b: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(b).map_err(|_| StoreError::Corrupt {
        what: format!("{what}: hash is {} bytes, not 32", b.len()),
    })
}

pub(crate) fn seq_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        what: format!("audit seq {v} is negative"),
    })
}

pub(crate) fn seq_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt {
        what: format!("audit seq {v} out of range"),
    })
}

pub(crate) fn encode_policies(p: &[String]) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "[]".into())
}

impl RawEvent {
    /// Decodes a row; a row that does not decode is reported as corrupt.
    pub(crate) fn decode(self) -> Result<Event, StoreError> {
        let what = format!("audit event {}", self.seq);
        let policies: Vec<String> = serde_json::from_str(&self.policies).map_err(|e| StoreError::Corrupt {
            what: format!("{what}: policies: {e}"),
        })?;
        Ok(Event {
            seq: seq_u64(self.seq)?,
            prev_hash: hash32(&what, &self.prev_hash)?,
            hash: hash32(&what, &self.hash)?,
            body: NewEvent {
                time_ms: self.time_ms,
                identity: self.identity,
                action: self.action,
                account: self.account,
                session: self.session,
                request_id: self.request_id,
                decision: self.decision,
                policies,
                code: self.code,
                digest: self.digest,
                signature_ref: self.signature_ref,
                trace_id: self.trace_id,
            },
        })
    }
}

fn err<DB: Dialect>(e: sqlx::Error) -> StoreError {
    from_sqlx(DB::BACKEND, e)
}

fn raw_event<DB>(row: &DB::Row) -> Result<RawEvent, StoreError>
where
    DB: Dialect,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    Ok(RawEvent {
        seq: row.try_get("seq").map_err(err::<DB>)?,
        time_ms: row.try_get("time_ms").map_err(err::<DB>)?,
        identity: row.try_get("identity").map_err(err::<DB>)?,
        action: row.try_get("action").map_err(err::<DB>)?,
        account: row.try_get("account").map_err(err::<DB>)?,
        session: row.try_get("session").map_err(err::<DB>)?,
        request_id: row.try_get("request_id").map_err(err::<DB>)?,
        decision: row.try_get("decision").map_err(err::<DB>)?,
        policies: row.try_get("policies").map_err(err::<DB>)?,
        code: row.try_get("code").map_err(err::<DB>)?,
        digest: row.try_get("digest").map_err(err::<DB>)?,
        signature_ref: row.try_get("signature_ref").map_err(err::<DB>)?,
        trace_id: row.try_get("trace_id").map_err(err::<DB>)?,
        prev_hash: row.try_get("prev_hash").map_err(err::<DB>)?,
        hash: row.try_get("hash").map_err(err::<DB>)?,
    })
}

fn checkpoint_row<DB>(r: &DB::Row) -> Result<Checkpoint, StoreError>
where
    DB: Dialect,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    Ok(Checkpoint {
        first_seq: seq_u64(r.try_get("first_seq").map_err(err::<DB>)?)?,
        last_seq: seq_u64(r.try_get("last_seq").map_err(err::<DB>)?)?,
        root: hash32("audit checkpoint", &r.try_get::<Vec<u8>, _>("root").map_err(err::<DB>)?)?,
        created_at: r.try_get("created_at").map_err(err::<DB>)?,
        jws: r.try_get("jws").map_err(err::<DB>)?,
    })
}

/// Reads the head row; with `lock`, holds it until the transaction ends
/// (where the dialect locks rows; SQLite's writer lock already holds it).
async fn read_head<DB>(conn: &mut DB::Connection, lock: bool) -> Result<Head, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    let lock = if lock { DB::FOR_UPDATE } else { "" };
    let sql = format!("SELECT base_seq, base_hash, seq, hash FROM audit_head WHERE id = 1{lock}");
    let row = sqlx::query(&sql).fetch_one(&mut *conn).await.map_err(err::<DB>)?;
    Ok(Head {
        base_seq: seq_u64(row.try_get("base_seq").map_err(err::<DB>)?)?,
        base_hash: hash32(
            "audit head",
            &row.try_get::<Vec<u8>, _>("base_hash").map_err(err::<DB>)?,
        )?,
        seq: seq_u64(row.try_get("seq").map_err(err::<DB>)?)?,
        hash: hash32("audit head", &row.try_get::<Vec<u8>, _>("hash").map_err(err::<DB>)?)?,
    })
}

/// Rows per multi-row INSERT, largest first (every batch is cut into these).
const INSERT_CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// Columns bound per event row.
const EVENT_BINDS: usize = 15;

/// `INSERT INTO audit_events ... VALUES (...), (...)` for `rows` rows, built
/// once per chunk size.
fn insert_sql(rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<(usize, String)>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        INSERT_CHUNKS
            .iter()
            .map(|&n| {
                let mut sql = format!("INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES ");
                for r in 0..n {
                    if r > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('(');
                    for c in 0..EVENT_BINDS {
                        if c > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!("${}", r * EVENT_BINDS + c + 1));
                    }
                    sql.push(')');
                }
                (n, sql)
            })
            .collect()
    });
    all.iter()
        .find(|(n, _)| *n == rows)
        .or_else(|| all.last())
        .map(|(_, sql)| sql.as_str())
        .unwrap_or("")
}

/// Appends `events` inside the caller's write transaction (opened by
/// [`SqlStore::begin_write`]), locking the head until it ends.
pub(crate) async fn append_in<DB>(conn: &mut DB::Connection, events: &[NewEvent]) -> Result<Vec<Event>, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    let head = read_head::<DB>(conn, true).await?;
    let stored = chain_onto(head.seq, head.hash, events);
    // Several rows per INSERT: one statement (one round trip to the
    // database, or to sqlx's SQLite worker thread) per chunk instead of one
    // per event. Chunk sizes are fixed so the prepared statements are few
    // and stay cached.
    let mut rest = &stored[..];
    while !rest.is_empty() {
        let rows = INSERT_CHUNKS.iter().copied().find(|n| *n <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(rows);
        let mut q = sqlx::query(insert_sql(rows));
        for e in chunk {
            q = q
                .bind(seq_i64(e.seq)?)
                .bind(e.body.time_ms)
                .bind(&e.body.identity)
                .bind(&e.body.action)
                .bind(&e.body.account)
                .bind(&e.body.session)
                .bind(&e.body.request_id)
                .bind(&e.body.decision)
                .bind(encode_policies(&e.body.policies))
                .bind(&e.body.code)
                .bind(&e.body.digest)
                .bind(&e.body.signature_ref)
                .bind(&e.body.trace_id)
                .bind(&e.prev_hash[..])
                .bind(&e.hash[..]);
        }
        q.execute(&mut *conn).await.map_err(err::<DB>)?;
        rest = tail;
    }
    if let Some(last) = stored.last() {
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq_i64(last.seq)?)
            .bind(&last.hash[..])
            .execute(&mut *conn)
            .await
            .map_err(err::<DB>)?;
    }
    Ok(stored)
}

/// Appends `event`, if any, inside the caller's write transaction; its seq.
pub(crate) async fn append_one<DB>(
    conn: &mut DB::Connection,
    event: Option<&NewEvent>,
) -> Result<Option<u64>, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    match event {
        Some(e) => Ok(append_in::<DB>(conn, std::slice::from_ref(e))
            .await?
            .first()
            .map(|e| e.seq)),
        None => Ok(None),
    }
}

#[async_trait::async_trait]
impl<DB> AuditStore for SqlStore<DB>
where
    Self: fmt::Debug,
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.begin_write().await?;
        let stored = append_in::<DB>(&mut tx, events).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(seq_i64(after)?)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(err::<DB>)?;
        rows.iter().map(|r| raw_event::<DB>(r)?.decode()).collect()
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(err::<DB>)?;
        read_head::<DB>(&mut conn, false).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows =
            sqlx::query("SELECT first_seq, last_seq, root, created_at, jws FROM audit_checkpoints ORDER BY first_seq")
                .fetch_all(&self.pool)
                .await
                .map_err(err::<DB>)?;
        rows.iter().map(checkpoint_row::<DB>).collect()
    }

    async fn last_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let row = sqlx::query(
            "SELECT first_seq, last_seq, root, created_at, jws FROM audit_checkpoints \
             ORDER BY first_seq DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(err::<DB>)?;
        row.as_ref().map(checkpoint_row::<DB>).transpose()
    }

    async fn event_hashes(&self, first: u64, last: u64) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let rows = sqlx::query("SELECT seq, hash FROM audit_events WHERE seq >= $1 AND seq <= $2 ORDER BY seq")
            .bind(seq_i64(first)?)
            .bind(seq_i64(last)?)
            .fetch_all(&self.pool)
            .await
            .map_err(err::<DB>)?;
        rows.iter()
            .map(|r| {
                let seq = seq_u64(r.try_get("seq").map_err(err::<DB>)?)?;
                let hash = hash32(
                    &format!("audit event {seq}"),
                    &r.try_get::<Vec<u8>, _>("hash").map_err(err::<DB>)?,
                )?;
                Ok((seq, hash))
            })
            .collect()
    }

    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<bool, StoreError> {
        let _writer = self.write_lock().await;
        let done = sqlx::query(
            "INSERT INTO audit_checkpoints (first_seq, last_seq, root, created_at, jws) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(seq_i64(c.first_seq)?)
        .bind(seq_i64(c.last_seq)?)
        .bind(&c.root[..])
        .bind(c.created_at)
        .bind(&c.jws)
        .execute(&self.pool)
        .await
        .map_err(err::<DB>)?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn prune_events(&self, through: u64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        read_head::<DB>(&mut tx, true).await?;
        let hash: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = $1")
            .bind(seq_i64(through)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        let Some(hash) = hash else {
            return Err(StoreError::Corrupt {
                what: format!("audit event {through} is not in the store"),
            });
        };
        let deleted = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(seq_i64(through)?)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        sqlx::query("DELETE FROM audit_checkpoints WHERE last_seq <= $1")
            .bind(seq_i64(through)?)
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        sqlx::query("UPDATE audit_head SET base_seq = $1, base_hash = $2 WHERE id = 1")
            .bind(seq_i64(through)?)
            .bind(&hash[..])
            .execute(&mut *tx)
            .await
            .map_err(err::<DB>)?;
        tx.commit().await?;
        Ok(DB::rows_affected(&deleted))
    }
}
