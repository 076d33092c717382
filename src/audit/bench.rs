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
                    let event = NewEvent {
                        time_ms: 0,
                        action: "Bench".into(),
                        identity: format!("writer-{w}"),
                        decision: "allow".into(),
                        code: "OK".into(),
                        ..NewEvent::default()
                    };
                    appender.append(event).await?;
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
