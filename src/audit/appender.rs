//! Group commit: one appender task per daemon drains the queue of events
//! from concurrent requests and writes them in one transaction (one fsync),
//! then wakes each waiter with its sequence number. A request's response is
//! sent only after its event is durable. The same task starts checkpoints
//! every N events (checked against the sequence it committed, without a
//! store read) or T seconds, signed beside it so appends never wait on an
//! HSM signature, and makes a final one at shutdown ([`Appender::finish`])
//! over the events since the last.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::Checkpointer;
use super::event::NewEvent;
use super::store::Checkpoint;
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

// Appends are the hot variant: boxing their event would cost an allocation
// per request to save space in a queue slot.
#[allow(clippy::large_enum_variant)]
enum Job {
    /// Append an event; answer its seq.
    Append {
        event: NewEvent,
        done: oneshot::Sender<Result<u64, AuditError>>,
    },
    /// After everything queued before it: a checkpoint over the events not
    /// covered yet (none if there are none).
    Checkpoint {
        done: oneshot::Sender<Result<Option<Checkpoint>, AuditError>>,
    },
}

/// The handle requests use to append their event.
#[derive(Debug)]
pub struct Appender {
    tx: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
    checkpoints: Option<Arc<Checkpointer>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Append { .. } => f.debug_struct("Append").finish_non_exhaustive(),
            Job::Checkpoint { .. } => f.debug_struct("Checkpoint").finish_non_exhaustive(),
        }
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
        tokio::spawn(run(store, settings, checkpoints.clone(), rx, head_tx));
        Appender { tx, head, checkpoints }
    }

    /// Appends `event` and waits until it is committed; returns its sequence number.
    pub async fn append(&self, event: NewEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Append { event, done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// At shutdown, once no request appends any more: waits until every
    /// queued event is written, then signs a checkpoint over the events the
    /// last checkpoint does not cover (those appended in store transactions
    /// included). `None` if every event is covered already or the daemon
    /// runs without checkpoints.
    pub async fn finish(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Checkpoint { done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Unix seconds of the last checkpoint this process signed (0: none yet,
    /// or no checkpoints).
    pub fn last_checkpoint(&self) -> i64 {
        self.checkpoints.as_ref().map(|c| c.last_stored()).unwrap_or(0)
    }

    /// Events queued and not yet taken by the appender task; `None` once the
    /// task has stopped (nothing can be appended any more).
    pub fn backlog(&self) -> Option<usize> {
        if self.tx.is_closed() {
            return None;
        }
        Some(self.tx.max_capacity().saturating_sub(self.tx.capacity()))
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
                    spawn_checkpoint(c);
                }
                continue;
            }
        }
        // Appends queued before a checkpoint request are written first.
        let mut waiting = Vec::new();
        let mut appends = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            match job {
                Job::Append { event, done } => {
                    if waiting.is_empty() {
                        events.push(event);
                        appends.push(done);
                    } else {
                        // After a checkpoint request: the next round.
                        waiting.push(Job::Append { event, done });
                    }
                }
                Job::Checkpoint { done } => waiting.push(Job::Checkpoint { done }),
            }
        }
        if !events.is_empty() {
            append_batch(store.as_ref(), checkpoints.as_ref(), &head, events, appends).await;
        }
        for job in waiting {
            match job {
                Job::Checkpoint { done } => {
                    let out = match &checkpoints {
                        Some(c) => c.maybe_checkpoint(true).await,
                        None => Ok(None),
                    };
                    let _ = done.send(out);
                }
                Job::Append { event, done } => {
                    append_batch(store.as_ref(), checkpoints.as_ref(), &head, vec![event], vec![done]).await;
                }
            }
        }
    }
}

/// Checks (and signs, when one is due) a checkpoint in a task of its own.
fn spawn_checkpoint(c: &Arc<Checkpointer>) {
    let c = c.clone();
    tokio::spawn(async move {
        if let Err(e) = c.maybe_checkpoint(false).await {
            tracing::warn!(error = %e, "audit checkpoint failed");
        }
    });
}

/// Writes one batch in one transaction, answers its waiters, and starts a
/// checkpoint check.
async fn append_batch(
    store: &dyn Store,
    checkpoints: Option<&Arc<Checkpointer>>,
    head: &watch::Sender<u64>,
    events: Vec<NewEvent>,
    waiters: Vec<oneshot::Sender<Result<u64, AuditError>>>,
) {
    match store.audit().append_events(&events).await {
        Ok(stored) => {
            let committed = stored.last().map(|last| last.seq);
            if let Some(seq) = committed {
                head.send_replace(seq);
            }
            for (done, e) in waiters.into_iter().zip(stored) {
                let _ = done.send(Ok(e.seq));
            }
            // The count rule only: the time rule has its own tick. A check
            // reads the store, so it is started only when one may be due.
            if let (Some(c), Some(seq)) = (checkpoints, committed) {
                if c.may_be_due(seq) {
                    spawn_checkpoint(c);
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, events = events.len(), "audit append failed");
            let reason = e.to_string();
            for done in waiters {
                let _ = done.send(Err(AuditError::Unavailable(reason.clone())));
            }
        }
    }
}
