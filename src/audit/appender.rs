//! Group commit: one appender task per daemon drains the queue of events
//! from concurrent requests and writes them in one transaction (one fsync),
//! then wakes each waiter with its sequence number. A request's response is
//! sent only after its event is durable. The same task makes checkpoints
//! every N events or T seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::Checkpointer;
use super::event::NewEvent;
use super::AuditError;
use crate::store::Store;

/// How the appender batches.
#[derive(Debug, Clone, Copy)]
pub struct AppenderSettings {
    /// Most events written in one transaction; 1 commits every event on
    /// its own (no group commit).
    pub max_batch: usize,
    /// Most events waiting in the queue before requests wait for room.
    pub queue: usize,
}

impl Default for AppenderSettings {
    fn default() -> Self {
        AppenderSettings {
            max_batch: 256,
            queue: 4096,
        }
    }
}

struct Job {
    event: NewEvent,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// The handle requests use to append their event.
#[derive(Debug)]
pub struct Appender {
    tx: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the appender task on the current runtime. It stops when the
    /// last [`Appender`] is dropped, after writing what is queued.
    pub fn start(
        store: Arc<dyn Store>,
        settings: AppenderSettings,
        checkpoints: Option<Arc<Checkpointer>>,
    ) -> Appender {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let (head_tx, head) = watch::channel(0);
        tokio::spawn(run(store, settings, checkpoints, rx, head_tx));
        Appender { tx, head }
    }

    /// Appends `event` and waits until it is committed; returns its sequence number.
    pub async fn append(&self, event: NewEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job { event, done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// The last sequence number this appender committed (changes wake
    /// live streams).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }
}

async fn run(
    store: Arc<dyn Store>,
    settings: AppenderSettings,
    checkpoints: Option<Arc<Checkpointer>>,
    mut rx: mpsc::Receiver<Job>,
    head: watch::Sender<u64>,
) {
    let max = settings.max_batch.max(1);
    let period = checkpoints
        .as_ref()
        .map(|c| c.period())
        .unwrap_or(Duration::from_secs(3600));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut batch: Vec<Job> = Vec::with_capacity(max);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, max) => {
                if n == 0 {
                    break;
                }
            }
            _ = tick.tick() => {
                if let Some(c) = &checkpoints {
                    if let Err(e) = c.maybe_checkpoint(false).await {
                        tracing::warn!(error = %e, "audit checkpoint failed");
                    }
                }
                continue;
            }
        }
        let events: Vec<NewEvent> = batch.iter().map(|j| j.event.clone()).collect();
        match store.audit().append_events(&events).await {
            Ok(stored) => {
                if let Some(last) = stored.last() {
                    head.send_replace(last.seq);
                }
                for (job, e) in batch.drain(..).zip(stored) {
                    let _ = job.done.send(Ok(e.seq));
                }
                if let Some(c) = &checkpoints {
                    if let Err(e) = c.maybe_checkpoint(false).await {
                        tracing::warn!(error = %e, "audit checkpoint failed");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, events = batch.len(), "audit append failed");
                let reason = e.to_string();
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(AuditError::Unavailable(reason.clone())));
                }
            }
        }
    }
}
