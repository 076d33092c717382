//! The server backend: PostgreSQL.
//!
//! The URL may choose a schema, either the libpq way
//! (`?options=-c%20search_path%3Dmy_schema`) or with a plain
//! `?search_path=my_schema`; tables and the migration history then live in
//! that schema.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Row};

use super::{
    challenge_mismatch, conflict_as, count, decide_spend, decode_amount, encode_amount, encode_scopes, encode_uses,
    from_sqlx, grants, normalize, redact_url, scrub, sort_sessions, AccountRecord, ChallengeRecord, OpenOutcome,
    RawChallenge, RawKey, RawSession, RawSpend, SessionRecord, SpendDecision, SpendOutcome, SpendRequest, Store,
    StoreError, CHALLENGE_COLUMNS, SESSION_COLUMNS,
};
use super::{
    decide_promote, promoted_outcomes, sort_issuer_keys, IssuerKeyRecord, IssuerKeyState, PromoteAudit, PromoteOutcome,
    RawIssuerKey, RevokeOutcome, SpendEvent, ISSUER_KEY_COLUMNS,
};

const BACKEND: &str = "postgres";
/// Bounds connecting as well as waiting for a pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 10;

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    url: String,
    tx: super::TxStats,
}

impl PgStore {
    /// The connection pool (the audit log's store code).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
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
        tracing::debug!(url = %redacted, "postgres store open");
        Ok(PgStore {
            pool,
            url: redacted,
            tx: super::TxStats::new(BACKEND)?,
        })
    }
}

fn raw_challenge(row: &PgRow) -> Result<RawChallenge, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawChallenge {
        id: row.try_get("id").map_err(err)?,
        account_id: row.try_get("account_id").map_err(err)?,
        delegate: row.try_get("delegate").map_err(err)?,
        scopes: row.try_get("scopes").map_err(err)?,
        cap: row.try_get("cap").map_err(err)?,
        nonce: row.try_get("nonce").map_err(err)?,
        typed_data: row.try_get("typed_data").map_err(err)?,
        issued_at: row.try_get("issued_at").map_err(err)?,
        expires_at: row.try_get("expires_at").map_err(err)?,
        consumed_at: row.try_get("consumed_at").map_err(err)?,
    })
}

fn raw_session(row: &PgRow) -> Result<RawSession, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawSession {
        id: row.try_get("id").map_err(err)?,
        account_id: row.try_get("account_id").map_err(err)?,
        delegate: row.try_get("delegate").map_err(err)?,
        scopes: row.try_get("scopes").map_err(err)?,
        cap: row.try_get("cap").map_err(err)?,
        remaining: row.try_get("remaining").map_err(err)?,
        uses: row.try_get("uses").map_err(err)?,
        issued_at: row.try_get("issued_at").map_err(err)?,
        expires_at: row.try_get("expires_at").map_err(err)?,
        challenge_id: row.try_get("challenge_id").map_err(err)?,
        jti: row.try_get("jti").map_err(err)?,
        revoked_at: row.try_get("revoked_at").map_err(err)?,
        revoked_by: row.try_get("revoked_by").map_err(err)?,
    })
}

/// Reads one session on `conn` (a transaction or the pool), locking the
/// row until the transaction ends if `for_update`.
async fn fetch_session<'e, E>(conn: E, id: &str, for_update: bool) -> Result<Option<SessionRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1{lock}");
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
    row.map(|row| raw_session(&row)?.decode()).transpose()
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn audit(&self) -> &dyn crate::audit::AuditStore {
        self
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        Ok(())
    }

    async fn create_account_audited(
        &self,
        rec: &AccountRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
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
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok(seq)
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        // One snapshot for the three reads.
        let mut tx = super::begin(
            BACKEND,
            &self.pool,
            &self.tx,
            Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        )
        .await?;
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

    async fn create_challenge(&self, c: &ChallengeRecord) -> Result<(), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let scopes = encode_scopes(BACKEND, &c.scopes)?;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
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
        .map_err(conflict_as(BACKEND, || format!("challenge {}", c.id)))?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict {
                what: format!("challenge {}", c.id),
            });
        }
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    async fn get_challenge(&self, id: &str) -> Result<Option<(ChallengeRecord, Option<i64>)>, StoreError> {
        let sql = format!("SELECT {CHALLENGE_COLUMNS} FROM challenges WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        row.map(|row| raw_challenge(&row)?.decode()).transpose()
    }

    async fn open_session_audited(
        &self,
        challenge_id: &str,
        now: i64,
        session: &SessionRecord,
        max_open: Option<u64>,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(OpenOutcome, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        if session.challenge_id != challenge_id {
            return Err(challenge_mismatch(BACKEND, challenge_id, session));
        }
        let what = format!("session {}", session.id);
        let scopes = encode_scopes(BACKEND, &session.scopes)?;
        let uses = encode_uses(&what, session.uses)?;
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        let row = sqlx::query("SELECT consumed_at, expires_at FROM challenges WHERE id = $1 FOR UPDATE")
            .bind(challenge_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let refusal = match row {
            None => Some(OpenOutcome::ChallengeNotFound),
            Some(row) => {
                let consumed_at: Option<i64> = row.try_get("consumed_at").map_err(err)?;
                let expires_at: i64 = row.try_get("expires_at").map_err(err)?;
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
                // Opens of one account wait for each other here, so the
                // count below is of committed sessions only.
                sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
                    .bind(&session.account_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(err)?;
                let open: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sessions WHERE account_id = $1 AND revoked_at IS NULL AND expires_at > $2",
                )
                .bind(&session.account_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
                let open = count(open)?;
                (open >= max).then_some(OpenOutcome::TooManyOpen(open))
            }
            (refusal, _) => refusal,
        };
        if let Some(outcome) = refusal {
            tx.rollback().await.map_err(err)?;
            return Ok((outcome, None));
        }
        sqlx::query("UPDATE challenges SET consumed_at = $1 WHERE id = $2")
            .bind(now)
            .bind(challenge_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "INSERT INTO sessions \
             (id, account_id, delegate, scopes, cap, remaining, uses, issued_at, expires_at, \
              challenge_id, jti, revoked_at, revoked_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || what.clone()))?;
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((OpenOutcome::Opened, seq))
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        fetch_session(&self.pool, id, false).await
    }

    async fn list_sessions(&self, account_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE account_id = $1 ORDER BY issued_at DESC, id");
        let rows = sqlx::query(&sql)
            .bind(account_id)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| from_sqlx(BACKEND, e))?;
        let mut sessions = rows
            .iter()
            .map(|row| raw_session(row)?.decode())
            .collect::<Result<Vec<_>, _>>()?;
        sort_sessions(&mut sessions);
        Ok(sessions)
    }

    async fn revoke_session(&self, id: &str, by: &str, now: i64) -> Result<Option<SessionRecord>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        // The update locks the row: a concurrent revocation waits, then
        // finds it revoked and changes nothing.
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_by = $2 WHERE id = $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(by)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let session = fetch_session(&mut *tx, id, false).await?;
        tx.commit().await.map_err(err)?;
        Ok(session)
    }

    async fn reserve_spend_audited(
        &self,
        r: &SpendRequest<'_>,
        event: Option<SpendEvent<'_>>,
    ) -> Result<(SpendOutcome, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        // The row lock serialises spends of one session.
        let session = fetch_session(&mut *tx, r.session_id, true).await?;
        let existing = match session {
            None => None,
            Some(_) => sqlx::query("SELECT body_hash, response FROM spends WHERE session_id = $1 AND request_id = $2")
                .bind(r.session_id)
                .bind(r.request_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err)?
                .map(|row| -> Result<RawSpend, StoreError> {
                    Ok(RawSpend {
                        body_hash: row.try_get("body_hash").map_err(err)?,
                        response: row.try_get("response").map_err(err)?,
                    })
                })
                .transpose()?,
        };
        let (remaining, uses) = match decide_spend(r, session, existing)? {
            SpendDecision::Answer(outcome) => {
                tx.rollback().await.map_err(err)?;
                return Ok((outcome, None));
            }
            SpendDecision::Reserve { remaining, uses } => (remaining, uses),
        };
        let what = format!("session {}", r.session_id);
        let stored_uses = encode_uses(&what, uses)?;
        sqlx::query("UPDATE sessions SET remaining = $1, uses = $2 WHERE id = $3")
            .bind(encode_amount(remaining))
            .bind(stored_uses)
            .bind(r.session_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "INSERT INTO spends (session_id, request_id, body_hash, amount, nonce, created_at, response) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(r.session_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(encode_amount(r.amount))
        .bind(stored_uses)
        .bind(r.now)
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || {
            format!("spend {} of session {}", r.request_id, r.session_id)
        }))?;
        let event = event.map(|build| build(uses));
        let seq = crate::audit::postgres::append_one(&mut tx, event.as_ref()).await?;
        tx.commit().await.map_err(err)?;
        Ok((SpendOutcome::Reserved { remaining, nonce: uses }, seq))
    }

    async fn complete_spend(&self, session_id: &str, request_id: &str, response: &[u8]) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE spends SET response = $1 \
             WHERE session_id = $2 AND request_id = $3 AND response IS NULL",
        )
        .bind(response)
        .bind(session_id)
        .bind(request_id)
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn stale_spends(&self, before: i64, limit: u32) -> Result<Vec<super::PendingSpend>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
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
        .map_err(err)?;
        rows.iter()
            .map(|row| {
                Ok(super::PendingSpend {
                    session_id: row.try_get("session_id").map_err(err)?,
                    account_id: row.try_get("account_id").map_err(err)?,
                    request_id: row.try_get("request_id").map_err(err)?,
                    created_at: row.try_get("created_at").map_err(err)?,
                })
            })
            .collect()
    }

    async fn probe_write(&self, now: i64) -> Result<(), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        sqlx::query(
            "INSERT INTO store_health (id, probed_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(())
    }

    async fn release_spend_audited(
        &self,
        session_id: &str,
        request_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        let remaining: Option<String> = sqlx::query_scalar("SELECT remaining FROM sessions WHERE id = $1 FOR UPDATE")
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let pending: Option<String> = sqlx::query_scalar(
            "SELECT amount FROM spends WHERE session_id = $1 AND request_id = $2 AND response IS NULL",
        )
        .bind(session_id)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let (Some(remaining), Some(amount)) = (remaining, pending) else {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        };
        let what = format!("session {session_id}");
        let remaining = decode_amount(&what, "remaining", &remaining)?;
        let amount = decode_amount(&format!("spend {request_id} of {what}"), "amount", &amount)?;
        let restored = remaining.checked_add(amount).ok_or_else(|| StoreError::Corrupt {
            what: format!("{what}: remaining {remaining} + released {amount} overflows"),
        })?;
        sqlx::query("DELETE FROM spends WHERE session_id = $1 AND request_id = $2")
            .bind(session_id)
            .bind(request_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query("UPDATE sessions SET remaining = $1 WHERE id = $2")
            .bind(encode_amount(restored))
            .bind(session_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
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

    async fn close(&self) {
        self.pool.close().await;
    }

    // ----- Receipts (issue 5) --------------------------------------------------

    async fn record_receipt(
        &self,
        r: &super::NewReceipt<'_>,
        sign: super::ReceiptSigner,
    ) -> Result<super::ReceiptOutcome, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        if let Some(existing) = fetch_receipt(&mut *tx, r.account_id, r.request_id).await? {
            tx.rollback().await.map_err(err)?;
            return Ok(super::existing_receipt(r, existing));
        }
        // A concurrent identical request waits on the unique index here and
        // then inserts nothing: answer from the row it committed.
        let seq: Option<i64> = sqlx::query_scalar(
            "INSERT INTO receipts (receipt_id, account_id, request_id, body_hash, session_id, created_at, jws) \
             VALUES ($1, $2, $3, $4, $5, $6, '') \
             ON CONFLICT (account_id, request_id) DO NOTHING RETURNING seq",
        )
        .bind(r.receipt_id)
        .bind(r.account_id)
        .bind(r.request_id)
        .bind(&r.body_hash[..])
        .bind(r.session_id)
        .bind(r.created_at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("receipt {}", r.receipt_id)))?;
        let Some(seq) = seq else {
            tx.rollback().await.map_err(err)?;
            return match self.get_receipt(r.account_id, r.request_id).await? {
                Some(existing) => Ok(super::existing_receipt(r, existing)),
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
        let seq_u = crate::audit::postgres::append_one(&mut tx, r.audit.as_ref())
            .await?
            .unwrap_or(seq_u);
        let audit_seq = i64::try_from(seq_u).map_err(|_| StoreError::Corrupt {
            what: format!("receipt {}: audit seq out of range", r.receipt_id),
        })?;
        let jws = match sign(seq_u).await {
            Ok(jws) => jws,
            Err(e) => {
                tx.rollback().await.map_err(err)?;
                return Ok(super::ReceiptOutcome::SignFailed(e));
            }
        };
        sqlx::query("UPDATE receipts SET jws = $1, audit_seq = $3 WHERE seq = $2")
            .bind(&jws)
            .bind(seq)
            .bind(audit_seq)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(super::ReceiptOutcome::Recorded(super::ReceiptRecord {
            seq: seq_u,
            receipt_id: r.receipt_id.to_string(),
            account_id: r.account_id.to_string(),
            request_id: r.request_id.to_string(),
            body_hash: r.body_hash,
            session_id: r.session_id.map(str::to_string),
            created_at: r.created_at,
            jws,
        }))
    }

    async fn get_receipt(
        &self,
        account_id: &str,
        request_id: &str,
    ) -> Result<Option<super::ReceiptRecord>, StoreError> {
        fetch_receipt(&self.pool, account_id, request_id).await
    }
    // ----- end receipts ----------------------------------------------------------

    // ---- Issuer keys (JWKS lifecycle, issue 5) ----
    // Every state change takes the rotation advisory lock in its transaction
    // (scheduled promotion only tries it: one replica rotates, the others
    // skip); the partial unique index keeps one active key per algorithm.

    async fn list_issuer_keys(&self) -> Result<Vec<IssuerKeyRecord>, StoreError> {
        issuer_keys_where(&self.pool, None).await
    }

    async fn add_issuer_key_audited(
        &self,
        rec: &IssuerKeyRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        if !matches!(rec.state, IssuerKeyState::Active | IssuerKeyState::Next) {
            return Err(StoreError::Backend {
                backend: BACKEND,
                reason: format!("a new issuer key must be next or active, not {}", rec.state.as_str()),
            });
        }
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        lock_rotation(&mut tx, false).await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM issuer_keys WHERE alg = $1 AND state = $2")
            .bind(&rec.alg)
            .bind(rec.state.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        if n > 0 {
            tx.rollback().await.map_err(err)?;
            return Ok((false, None));
        }
        sqlx::query(&format!(
            "INSERT INTO issuer_keys ({ISSUER_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
        .execute(&mut *tx)
        .await
        .map_err(conflict_as(BACKEND, || format!("issuer key {}", rec.kid)))?;
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
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
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        if !lock_rotation(&mut tx, active_due_before.is_some()).await? {
            tx.rollback().await.map_err(err)?;
            return Ok((vec![PromoteOutcome::Busy], None));
        }
        let mut promoted = Vec::with_capacity(algs.len());
        for alg in algs {
            let keys = issuer_keys_where(&mut *tx, Some(alg)).await?;
            match decide_promote(&keys, now, min_published, active_due_before) {
                Ok((next, active)) => {
                    promote_in(&mut tx, &next, active.as_deref(), now).await?;
                    promoted.push((next, active));
                }
                Err(outcome) => {
                    tx.rollback().await.map_err(err)?;
                    return Ok((vec![outcome], None));
                }
            }
        }
        let events = audit.map(|a| a.events(&promoted)).unwrap_or_default();
        let seq = crate::audit::postgres::append_in(&mut tx, &events)
            .await?
            .first()
            .map(|e| e.seq);
        tx.commit().await.map_err(err)?;
        Ok((promoted_outcomes(promoted), seq))
    }

    async fn revoke_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<RevokeOutcome>, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        lock_rotation(&mut tx, false).await?;
        let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE kid = $1");
        let row = sqlx::query(&sql)
            .bind(kid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?;
        let Some(before) = row.map(|r| raw_issuer_key(&r)?.decode()).transpose()? else {
            tx.rollback().await.map_err(err)?;
            return Ok((None, None));
        };
        if before.state == IssuerKeyState::Revoked {
            tx.rollback().await.map_err(err)?;
            return Ok((Some(RevokeOutcome { before, promoted: None }), None));
        }
        sqlx::query("UPDATE issuer_keys SET state = 'revoked', revoked_at = $1 WHERE kid = $2")
            .bind(now)
            .bind(kid)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let mut promoted = None;
        if before.state == IssuerKeyState::Active {
            let keys = issuer_keys_where(&mut *tx, Some(&before.alg)).await?;
            if let Ok((next, _)) = decide_promote(&keys, now, 0, None) {
                promote_in(&mut tx, &next, None, now).await?;
                promoted = Some(next);
            }
        }
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((Some(RevokeOutcome { before, promoted }), seq))
    }

    async fn delete_issuer_key_audited(
        &self,
        kid: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        let r = sqlx::query("DELETE FROM issuer_keys WHERE kid = $1 AND state IN ('retired', 'revoked')")
            .bind(kid)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(err)?;
            return Ok((false, None));
        }
        let seq = crate::audit::postgres::append_one(&mut tx, event).await?;
        tx.commit().await.map_err(err)?;
        Ok((true, seq))
    }

    async fn take_token(&self, key: &str, bucket: super::limits::Bucket, now: i64) -> Result<bool, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        // The row exists (created full) and is locked: replicas take tokens one at a time.
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
        .map_err(err)?;
        let stored: (i64, i64) =
            sqlx::query_as("SELECT tokens, updated_at FROM limit_buckets WHERE key = $1 FOR UPDATE")
                .bind(key)
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
        let Some((tokens, at)) = super::limits::take(Some(stored), now, bucket) else {
            tx.rollback().await.map_err(err)?;
            return Ok(false);
        };
        sqlx::query("UPDATE limit_buckets SET tokens = $2, updated_at = $3 WHERE key = $1")
            .bind(key)
            .bind(tokens)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
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
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        let mut gone = sqlx::query("DELETE FROM limit_totals WHERE updated_at < $1")
            .bind(totals_before)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected();
        for (prefix, before) in buckets {
            gone += sqlx::query("DELETE FROM limit_buckets WHERE substr(key, 1, length($1)) = $1 AND updated_at < $2")
                .bind(prefix)
                .bind(before)
                .execute(&mut *tx)
                .await
                .map_err(err)?
                .rows_affected();
        }
        tx.commit().await.map_err(err)?;
        Ok(gone)
    }
}

impl PgStore {
    /// Reads the total `key` (0 when absent) under its row lock, applies `f`,
    /// and stores its answer; None from `f` changes nothing.
    async fn change_total(
        &self,
        key: &str,
        now: i64,
        f: impl FnOnce(u128) -> Option<u128> + Send,
    ) -> Result<Option<u128>, StoreError> {
        let err = |e| from_sqlx(BACKEND, e);
        let mut tx = super::begin(BACKEND, &self.pool, &self.tx, None).await?;
        sqlx::query(
            "INSERT INTO limit_totals (key, total, updated_at) VALUES ($1, '0', $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let stored: String = sqlx::query_scalar("SELECT total FROM limit_totals WHERE key = $1 FOR UPDATE")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let total = decode_amount(&format!("limit total {key}"), "total", &stored)?;
        let Some(next) = f(total) else {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        };
        sqlx::query("UPDATE limit_totals SET total = $2, updated_at = $3 WHERE key = $1")
            .bind(key)
            .bind(encode_amount(next))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Some(next))
    }
}

// ---- Issuer keys (JWKS lifecycle, issue 5) ----

fn raw_issuer_key(row: &PgRow) -> Result<RawIssuerKey, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    Ok(RawIssuerKey {
        kid: row.try_get("kid").map_err(err)?,
        alg: row.try_get("alg").map_err(err)?,
        label: row.try_get("label").map_err(err)?,
        state: row.try_get("state").map_err(err)?,
        created_at: row.try_get("created_at").map_err(err)?,
        activated_at: row.try_get("activated_at").map_err(err)?,
        retired_at: row.try_get("retired_at").map_err(err)?,
        revoked_at: row.try_get("revoked_at").map_err(err)?,
        jwk: row.try_get("jwk").map_err(err)?,
    })
}

async fn issuer_keys_where<'e, E>(conn: E, alg: Option<&str>) -> Result<Vec<IssuerKeyRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let sql = format!("SELECT {ISSUER_KEY_COLUMNS} FROM issuer_keys WHERE $1::TEXT IS NULL OR alg = $1");
    let rows = sqlx::query(&sql)
        .bind(alg)
        .fetch_all(conn)
        .await
        .map_err(|e| from_sqlx(BACKEND, e))?;
    let mut keys = rows
        .iter()
        .map(|r| raw_issuer_key(r)?.decode())
        .collect::<Result<Vec<_>, _>>()?;
    sort_issuer_keys(&mut keys);
    Ok(keys)
}

async fn promote_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    next: &str,
    active: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    if let Some(active) = active {
        sqlx::query("UPDATE issuer_keys SET state = 'retired', retired_at = $1 WHERE kid = $2 AND state = 'active'")
            .bind(now)
            .bind(active)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
    }
    sqlx::query("UPDATE issuer_keys SET state = 'active', activated_at = $1 WHERE kid = $2 AND state = 'next'")
        .bind(now)
        .bind(next)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    Ok(())
}

/// Key of the advisory lock every issuer key state change takes ("keyward-jwks").
const ROTATION_LOCK: i64 = 0x6b77_6a77_6b73_0001;

/// Takes the rotation lock for the transaction (waiting), or only tries it
/// when `try_only`; returns whether it is held.
async fn lock_rotation(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, try_only: bool) -> Result<bool, StoreError> {
    let err = |e| from_sqlx(BACKEND, e);
    if try_only {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(ROTATION_LOCK)
            .fetch_one(&mut **tx)
            .await
            .map_err(err)
    } else {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ROTATION_LOCK)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        Ok(true)
    }
}

// ----- Receipts (issue 5) ----------------------------------------------------

async fn fetch_receipt<'e, E>(
    conn: E,
    account_id: &str,
    request_id: &str,
) -> Result<Option<super::ReceiptRecord>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let err = |e| from_sqlx(BACKEND, e);
    let sql = format!(
        "SELECT {} FROM receipts WHERE account_id = $1 AND request_id = $2",
        super::RECEIPT_COLUMNS
    );
    let row = sqlx::query(&sql)
        .bind(account_id)
        .bind(request_id)
        .fetch_optional(conn)
        .await
        .map_err(err)?;
    row.map(|row| -> Result<super::ReceiptRecord, StoreError> {
        super::RawReceipt {
            seq: row.try_get("seq").map_err(err)?,
            receipt_id: row.try_get("receipt_id").map_err(err)?,
            account_id: row.try_get("account_id").map_err(err)?,
            request_id: row.try_get("request_id").map_err(err)?,
            body_hash: row.try_get("body_hash").map_err(err)?,
            session_id: row.try_get("session_id").map_err(err)?,
            created_at: row.try_get("created_at").map_err(err)?,
            jws: row.try_get("jws").map_err(err)?,
        }
        .decode()
    })
    .transpose()
}
// ----- end receipts ------------------------------------------------------------
