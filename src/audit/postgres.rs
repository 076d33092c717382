//! [`AuditStore`] on PostgreSQL: every append locks the one-row
//! `audit_head` (`SELECT ... FOR UPDATE`) in its transaction, so appends from
//! several replicas form one dense chain.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::event::{Event, NewEvent};
use super::store::{
    chain_onto, encode_policies, hash32, seq_i64, seq_u64, AuditStore, Checkpoint, Head, RawEvent, EVENT_COLUMNS,
};
use crate::store::{from_sqlx, PgStore, StoreError};

const BACKEND: &str = "postgres";

fn err(e: sqlx::Error) -> StoreError {
    from_sqlx(BACKEND, e)
}

fn raw_event(row: &PgRow) -> Result<RawEvent, StoreError> {
    Ok(RawEvent {
        seq: row.try_get("seq").map_err(err)?,
        time_ms: row.try_get("time_ms").map_err(err)?,
        identity: row.try_get("identity").map_err(err)?,
        action: row.try_get("action").map_err(err)?,
        account: row.try_get("account").map_err(err)?,
        session: row.try_get("session").map_err(err)?,
        request_id: row.try_get("request_id").map_err(err)?,
        decision: row.try_get("decision").map_err(err)?,
        policies: row.try_get("policies").map_err(err)?,
        code: row.try_get("code").map_err(err)?,
        digest: row.try_get("digest").map_err(err)?,
        signature_ref: row.try_get("signature_ref").map_err(err)?,
        prev_hash: row.try_get("prev_hash").map_err(err)?,
        hash: row.try_get("hash").map_err(err)?,
    })
}

async fn read_head(conn: &mut PgConnection, lock: bool) -> Result<Head, StoreError> {
    let sql = if lock {
        "SELECT base_seq, base_hash, seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT base_seq, base_hash, seq, hash FROM audit_head WHERE id = 1"
    };
    let row = sqlx::query(sql).fetch_one(&mut *conn).await.map_err(err)?;
    Ok(Head {
        base_seq: seq_u64(row.try_get("base_seq").map_err(err)?)?,
        base_hash: hash32("audit head", &row.try_get::<Vec<u8>, _>("base_hash").map_err(err)?)?,
        seq: seq_u64(row.try_get("seq").map_err(err)?)?,
        hash: hash32("audit head", &row.try_get::<Vec<u8>, _>("hash").map_err(err)?)?,
    })
}

/// Appends `events` inside the caller's transaction, locking the head row
/// until it ends.
pub(crate) async fn append_in(conn: &mut PgConnection, events: &[NewEvent]) -> Result<Vec<Event>, StoreError> {
    let head = read_head(conn, true).await?;
    let stored = chain_onto(head.seq, head.hash, events);
    for e in &stored {
        sqlx::query(
            "INSERT INTO audit_events (seq, time_ms, identity, action, account, session, request_id, decision, \
             policies, code, digest, signature_ref, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
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
        .bind(&e.prev_hash[..])
        .bind(&e.hash[..])
        .execute(&mut *conn)
        .await
        .map_err(err)?;
    }
    if let Some(last) = stored.last() {
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq_i64(last.seq)?)
            .bind(&last.hash[..])
            .execute(&mut *conn)
            .await
            .map_err(err)?;
    }
    Ok(stored)
}

/// Appends `event`, if any, inside the caller's transaction; its seq.
pub(crate) async fn append_one(conn: &mut PgConnection, event: Option<&NewEvent>) -> Result<Option<u64>, StoreError> {
    match event {
        Some(e) => Ok(append_in(conn, std::slice::from_ref(e)).await?.first().map(|e| e.seq)),
        None => Ok(None),
    }
}

#[async_trait::async_trait]
impl AuditStore for PgStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<Event>, StoreError> {
        let mut tx = crate::store::begin(BACKEND, self.pool(), crate::store::Store::tx_stats(self), None).await?;
        let stored = append_in(&mut tx, events).await?;
        tx.commit().await.map_err(err)?;
        Ok(stored)
    }

    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(seq_i64(after)?)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(err)?;
        rows.iter().map(|r| raw_event(r)?.decode()).collect()
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        let mut conn = self.pool().acquire().await.map_err(err)?;
        read_head(&mut conn, false).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows =
            sqlx::query("SELECT first_seq, last_seq, root, created_at, jws FROM audit_checkpoints ORDER BY first_seq")
                .fetch_all(self.pool())
                .await
                .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    first_seq: seq_u64(r.try_get("first_seq").map_err(err)?)?,
                    last_seq: seq_u64(r.try_get("last_seq").map_err(err)?)?,
                    root: hash32("audit checkpoint", &r.try_get::<Vec<u8>, _>("root").map_err(err)?)?,
                    created_at: r.try_get("created_at").map_err(err)?,
                    jws: r.try_get("jws").map_err(err)?,
                })
            })
            .collect()
    }

    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO audit_checkpoints (first_seq, last_seq, root, created_at, jws) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(seq_i64(c.first_seq)?)
        .bind(seq_i64(c.last_seq)?)
        .bind(&c.root[..])
        .bind(c.created_at)
        .bind(&c.jws)
        .execute(self.pool())
        .await
        .map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_events(&self, through: u64) -> Result<u64, StoreError> {
        let mut tx = crate::store::begin(BACKEND, self.pool(), crate::store::Store::tx_stats(self), None).await?;
        read_head(&mut tx, true).await?;
        let hash: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = $1")
            .bind(seq_i64(through)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let Some(hash) = hash else {
            return Err(StoreError::Corrupt {
                what: format!("audit event {through} is not in the store"),
            });
        };
        let deleted = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(seq_i64(through)?)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected();
        sqlx::query("DELETE FROM audit_checkpoints WHERE last_seq <= $1")
            .bind(seq_i64(through)?)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("UPDATE audit_head SET base_seq = $1, base_hash = $2 WHERE id = 1")
            .bind(seq_i64(through)?)
            .bind(hash)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(deleted)
    }
}
