//! Group commit measured: appends per second from concurrent writers on a
//! scratch SQLite store (synchronous=FULL, as the daemon's), batching vs one
//! commit per event. `keyward bench` reports both and their ratio.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::appender::{Appender, AppenderSettings};
use super::event::NewEvent;
use super::AuditError;

/// The event writer `w` appends (the same rows in both measurements).
fn bench_event(w: usize) -> NewEvent {
    NewEvent {
        time_ms: 0,
        action: "Bench".into(),
        identity: format!("writer-{w}"),
        decision: "allow".into(),
        code: "OK".into(),
        ..NewEvent::default()
    }
}

/// Events appended per second by `writers` concurrent tasks for `dur`, with
/// at most `max_batch` events per transaction, on a fresh store in `dir`.
pub async fn append_rate(dir: &Path, max_batch: usize, writers: usize, dur: Duration) -> Result<f64, AuditError> {
    let scratch = tempfile::tempdir_in(dir).map_err(|e| AuditError::File {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let url = format!("sqlite://{}", scratch.path().join("audit-bench.db").display());
    let store = crate::store::open(&url).await?;
    let appender = Arc::new(Appender::start(
        store.clone(),
        AppenderSettings {
            max_batch,
            ..Default::default()
        },
        None,
    ));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers.max(1))
        .map(|w| {
            let (appender, done) = (appender.clone(), done.clone());
            tokio::spawn(async move {
                while start.elapsed() < dur {
                    appender.append(bench_event(w)).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), AuditError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|_| AuditError::Stopped)??;
    }
    let secs = start.elapsed().as_secs_f64();
    store.close().await;
    Ok(done.load(Ordering::Relaxed) as f64 / secs)
}

/// The bare ceiling for [`append_rate`]: one SQLite connection (rusqlite,
/// no pool, no worker thread, no appender) inserting the same chained rows
/// with a prepared statement, `rows_per_commit` rows per transaction
/// (synchronous=FULL, WAL, as the daemon's store), for `dur`; rows per
/// second. The schema is the store's own (its migrations run first).
pub async fn bare_insert_rate(dir: &Path, rows_per_commit: usize, dur: Duration) -> Result<f64, AuditError> {
    let scratch = tempfile::tempdir_in(dir).map_err(|e| AuditError::File {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let path = scratch.path().join("audit-bare.db");
    let store = crate::store::open(&format!("sqlite://{}", path.display())).await?;
    store.close().await;
    let rows = rows_per_commit.max(1);
    let bare = |e: rusqlite::Error| AuditError::Unavailable(format!("bare SQLite loop: {e}"));
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&path).map_err(bare)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(bare)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(bare)?;
        let mut head = (0u64, [0u8; 32]);
        let mut done = 0u64;
        let start = Instant::now();
        while start.elapsed() < dur {
            let events: Vec<NewEvent> = (0..rows).map(bench_event).collect();
            let stored = super::store::chain_onto(head.0, head.1, &events);
            let tx = conn.unchecked_transaction().map_err(bare)?;
            {
                let mut insert = tx
                    .prepare_cached(&format!(
                        "INSERT INTO audit_events ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                        super::store::EVENT_COLUMNS
                    ))
                    .map_err(bare)?;
                for e in &stored {
                    let seq = i64::try_from(e.seq).map_err(|_| AuditError::Unavailable("seq overflow".into()))?;
                    insert
                        .execute(rusqlite::params![
                            seq,
                            e.body.time_ms,
                            e.body.identity,
                            e.body.action,
                            e.body.account,
                            e.body.session,
                            e.body.request_id,
                            e.body.decision,
                            super::store::encode_policies(&e.body.policies),
                            e.body.code,
                            e.body.digest,
                            e.body.signature_ref,
                            e.body.trace_id,
                            &e.prev_hash[..],
                            &e.hash[..],
                        ])
                        .map_err(bare)?;
                }
            }
            if let Some(last) = stored.last() {
                let seq = i64::try_from(last.seq).map_err(|_| AuditError::Unavailable("seq overflow".into()))?;
                tx.execute(
                    "UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1",
                    rusqlite::params![seq, &last.hash[..]],
                )
                .map_err(bare)?;
                head = (last.seq, last.hash);
            }
            tx.commit().map_err(bare)?;
            done += stored.len() as u64;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64().max(1e-9))
    })
    .await
    .map_err(|_| AuditError::Stopped)?
}
