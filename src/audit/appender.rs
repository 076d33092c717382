//! Group commit: one appender per daemon drains the queue of events from
//! concurrent requests and writes them in one transaction (one fsync), then
//! wakes each waiter with its sequence number. On the embedded store the
//! appender is a thread with its own SQLite connection
//! ([`super::writer`]); on PostgreSQL, a task on the store's pool. A request's response is
//! sent only after its event is durable. The appender starts checkpoints
//! every N events (checked against the sequence it committed, without a
//! store read) or T seconds, signed beside it so appends never wait on an
//! HSM signature, and makes a final one at shutdown ([`Appender::finish`])
//! over the events since the last.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::checkpoint::Checkpointer;
use super::event::NewEvent;
use super::store::Checkpoint;
use super::writer::{self, Job};
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
    /// How long a group waits for the events of requests still in flight
    /// (see [`Appender::enter`]) before it commits; zero never waits.
    pub wait: Duration,
}

impl Default for AppenderSettings {
    fn default() -> Self {
        AppenderSettings {
            max_batch: 256,
            queue: 4096,
            wait: Duration::ZERO,
        }
    }
}

/// What the appender measures of its groups (the daemon registers both).
#[derive(Debug, Clone)]
pub struct AppenderStats {
    /// Events per committed group.
    pub group_events: prometheus::Histogram,
    /// Seconds a group's transaction took, from BEGIN (the writer lock
    /// included) to the end of COMMIT (its fsync included).
    pub commit_seconds: prometheus::Histogram,
}

impl AppenderStats {
    fn new() -> Result<AppenderStats, prometheus::Error> {
        Ok(AppenderStats {
            group_events: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("audit_group_events", "audit events per group-committed transaction")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )?,
            commit_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "audit_group_commit_seconds",
                    "time one group of audit events took to commit (lock wait, inserts, fsync)",
                )
                .buckets(vec![
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0, 5.0,
                ]),
            )?,
        })
    }

    pub(super) fn observe(&self, events: usize, started: std::time::Instant) {
        self.group_events.observe(events as f64);
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// The handle requests use to append their event.
#[derive(Debug)]
pub struct Appender {
    tx: flume::Sender<Job>,
    /// Requests in flight that will append an event (see [`Appender::enter`]).
    busy: Arc<AtomicUsize>,
    /// Wakes the writer thread when the group it waits for is complete.
    wake: Arc<GroupWake>,
    stats: Option<AppenderStats>,
    head: watch::Receiver<u64>,
    checkpoints: Option<Arc<Checkpointer>>,
    /// Stops the checkpoint tick when the appender goes.
    _tick: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Append { .. } => f.debug_struct("Append").finish_non_exhaustive(),
            Job::Flush { .. } => f.debug_struct("Flush").finish_non_exhaustive(),
        }
    }
}

impl Appender {
    /// Starts the appender on the current runtime: on an embedded (SQLite)
    /// store a writer thread with its own connection ([`super::writer`]),
    /// on a server database a task on the store's pool. It stops when the
    /// last [`Appender`] is dropped, after writing what is queued.
    pub fn start(
        store: Arc<dyn Store>,
        settings: AppenderSettings,
        checkpoints: Option<Arc<Checkpointer>>,
    ) -> Appender {
        let (tx, rx) = flume::bounded(settings.queue.max(1));
        let (head_tx, head) = watch::channel(0);
        let busy = Arc::new(AtomicUsize::new(0));
        let wake = Arc::new(GroupWake::default());
        let group = Grouping {
            max: settings.max_batch.max(1),
            wait: settings.wait,
            busy: busy.clone(),
            wake: wake.clone(),
        };
        let stats = AppenderStats::new()
            .map_err(|e| tracing::warn!(error = %e, "audit group metrics unavailable"))
            .ok();
        // The checkpoint rules run in a task of their own, on the runtime:
        // the writer thread holds nothing of the HSM (a checkpoint is signed
        // by the issuer), so nothing of it outlives the runtime at exit.
        let tick = checkpoints.as_ref().map(|c| {
            let (stop, stopped) = oneshot::channel();
            tokio::spawn(rules(c.clone(), head.clone(), stopped));
            stop
        });
        match store.direct_audit() {
            Some(target) => {
                if let Err(e) = writer::spawn(target, group, rx, head_tx, stats.clone()) {
                    // No thread: the channel's receiver is gone, so every
                    // append answers `Stopped` and readiness says so.
                    tracing::error!(error = %e, "cannot start the audit writer thread");
                }
            }
            None => {
                tokio::spawn(run(store, group, rx, head_tx, stats.clone()));
            }
        }
        Appender {
            tx,
            busy,
            wake,
            stats,
            head,
            checkpoints,
            _tick: tick,
        }
    }

    /// Appends `event` and waits until it is committed; returns its sequence number.
    pub async fn append(&self, event: NewEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send_async(Job::Append { event, done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        self.wake.queued(self.tx.len(), &self.busy);
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Counts a request that will append its event until the guard drops:
    /// a group waits (up to [`AppenderSettings::wait`]) while more such
    /// requests are in flight than it holds events, so that one fsync
    /// covers them instead of one each.
    pub fn enter(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.busy.clone())
    }

    /// At shutdown, once no request appends any more: waits until every
    /// queued event is written, then signs a checkpoint over the events the
    /// last checkpoint does not cover (those appended in store transactions
    /// included). `None` if every event is covered already or the daemon
    /// runs without checkpoints.
    pub async fn finish(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send_async(Job::Flush { done })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?;
        match &self.checkpoints {
            Some(c) => c.maybe_checkpoint(true).await,
            None => Ok(None),
        }
    }

    /// Unix seconds of the last checkpoint this process signed (0: none yet,
    /// or no checkpoints).
    pub fn last_checkpoint(&self) -> i64 {
        self.checkpoints.as_ref().map(|c| c.last_stored()).unwrap_or(0)
    }

    /// Events queued and not yet taken by the appender; `None` once it has
    /// stopped (nothing can be appended any more).
    pub fn backlog(&self) -> Option<usize> {
        if self.tx.is_disconnected() {
            return None;
        }
        Some(self.tx.len())
    }

    /// The group metrics, to register (`None` if they could not be made).
    pub fn stats(&self) -> Option<&AppenderStats> {
        self.stats.as_ref()
    }

    /// The last sequence number this appender committed (changes wake
    /// live streams).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }
}

/// The checkpoint rules, until `stop` goes: a check every period (the time
/// rule), and one whenever the committed sequence may call for one (the
/// count rule, checked against what the appender committed, without a
/// store read; a check reads the store, so it is started only then).
async fn rules(c: Arc<Checkpointer>, mut committed: watch::Receiver<u64>, mut stop: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(c.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => spawn_checkpoint(&c),
            changed = committed.changed() => {
                if changed.is_err() {
                    break;
                }
                let seq = *committed.borrow_and_update();
                if c.may_be_due(seq) {
                    spawn_checkpoint(&c);
                }
            }
        }
    }
}

/// A request counted by [`Appender::enter`].
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a group is formed: what is queued, up to `max`; then, while
/// requests in flight (`busy`) outnumber the group's events, what comes
/// within `wait` of the first event.
#[derive(Debug, Clone)]
pub(super) struct Grouping {
    pub max: usize,
    pub wait: Duration,
    pub busy: Arc<AtomicUsize>,
    pub wake: Arc<GroupWake>,
}

/// How the writer thread waits for the rest of a group without being woken
/// by every event: it sleeps until the group's deadline, and only the event
/// that completes the group (every request in flight has queued its own)
/// wakes it early. Under load a group is cut by its deadline and no event
/// wakes the thread; a lone request's group is complete at once.
///
/// The writer publishes the size of its group and raises `gathering`, then
/// takes what is queued once more before it sleeps; a request queues its
/// event, then reads `gathering`. With a full fence between each side's
/// write and read, either the writer sees the event or the request sees
/// the flag, so an event that completes a group never goes unnoticed.
#[derive(Debug, Default)]
pub(super) struct GroupWake {
    thread: std::sync::OnceLock<std::thread::Thread>,
    gathering: AtomicBool,
    grouped: AtomicUsize,
    /// Times a request woke the writer.
    #[cfg(test)]
    woken: AtomicUsize,
}

impl GroupWake {
    /// The writer thread names itself, once, before it first gathers.
    pub(super) fn set_thread(&self, thread: std::thread::Thread) {
        let _ = self.thread.set(thread);
    }

    /// The writer holds `grouped` events and waits for more (`true`) or
    /// stopped waiting (`false`).
    pub(super) fn gathering(&self, grouped: usize, on: bool) {
        self.grouped.store(grouped, Ordering::SeqCst);
        self.gathering.store(on, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// A request queued its event (`queued` events wait in the queue now):
    /// wakes the writer if that completes the group it waits for.
    fn queued(&self, queued: usize, busy: &AtomicUsize) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.gathering.load(Ordering::SeqCst) {
            return;
        }
        if queued + self.grouped.load(Ordering::SeqCst) >= busy.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                #[cfg(test)]
                self.woken.fetch_add(1, Ordering::Relaxed);
                t.unpark();
            }
        }
    }
}

impl Grouping {
    /// Whether the group should wait for more: requests still in flight
    /// have not queued their events, and there is room and time.
    pub(super) fn more_coming(&self, group: usize, deadline: Instant) -> bool {
        group < self.max && group < self.busy.load(Ordering::Relaxed) && Instant::now() < deadline
    }
}

/// The server-database appender: groups what is queued into one store
/// transaction.
async fn run(
    store: Arc<dyn Store>,
    group: Grouping,
    rx: flume::Receiver<Job>,
    head: watch::Sender<u64>,
    stats: Option<AppenderStats>,
) {
    let stats = stats.as_ref();
    let mut jobs: Vec<Job> = Vec::with_capacity(group.max);
    let mut events = Vec::with_capacity(group.max);
    let mut waiters = Vec::with_capacity(group.max);
    while let Ok(first) = rx.recv_async().await {
        let deadline = Instant::now() + group.wait;
        jobs.push(first);
        loop {
            while jobs.len() < group.max {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if !group.more_coming(jobs.len(), deadline) {
                break;
            }
            match tokio::time::timeout_at(deadline.into(), rx.recv_async()).await {
                Ok(Ok(job)) => jobs.push(job),
                _ => break,
            }
        }
        let mut group = jobs.drain(..);
        loop {
            let flush = writer::take_appends(&mut group, &mut events, &mut waiters);
            append_batch(store.as_ref(), &head, stats, &mut events, &mut waiters).await;
            match flush {
                Some(done) => {
                    let _ = done.send(());
                }
                None => break,
            }
        }
    }
}

/// Checks (and signs, when one is due) a checkpoint in a task of its own.
fn spawn_checkpoint(c: &Arc<Checkpointer>) {
    let c = c.clone();
    tokio::spawn(async move { checkpoint(&c).await });
}

async fn checkpoint(c: &Checkpointer) {
    if let Err(e) = c.maybe_checkpoint(false).await {
        tracing::warn!(error = %e, "audit checkpoint failed");
    }
}

/// Writes one batch in one transaction and answers its waiters.
async fn append_batch(
    store: &dyn Store,
    head: &watch::Sender<u64>,
    stats: Option<&AppenderStats>,
    events: &mut Vec<NewEvent>,
    waiters: &mut Vec<oneshot::Sender<Result<u64, AuditError>>>,
) {
    if events.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let result = store.audit().append_events(events).await;
    if let (Some(s), Ok(_)) = (stats, &result) {
        s.observe(events.len(), started);
    }
    events.clear();
    match result {
        Ok(stored) => {
            if let Some(last) = stored.last() {
                head.send_replace(last.seq);
            }
            for (done, e) in waiters.drain(..).zip(stored) {
                let _ = done.send(Ok(e.seq));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, events = waiters.len(), "audit append failed");
            let reason = e.to_string();
            for done in waiters.drain(..) {
                let _ = done.send(Err(AuditError::Unavailable(reason.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::Connection as _;

    use super::*;
    use crate::audit::verify::verify_store;
    use crate::jwks::history::KeyHistory;
    use crate::store::testing::{sqlite_url_in, PgTestSchema};

    fn event(i: usize) -> NewEvent {
        NewEvent {
            time_ms: 1_700_000_000_000 + i as i64,
            identity: format!("client-{}", i % 7),
            action: "SignMessage".into(),
            account: format!("acct-{i}"),
            decision: "allow".into(),
            code: "OK".into(),
            ..NewEvent::default()
        }
    }

    /// A SQLite store in `dir` and an appender on it (no checkpoints).
    async fn sqlite_appender(
        dir: &std::path::Path,
        settings: AppenderSettings,
    ) -> (String, Arc<dyn Store>, Arc<Appender>) {
        let url = sqlite_url_in(dir);
        let store = crate::store::open(&url).await.expect("open");
        let appender = Arc::new(Appender::start(store.clone(), settings, None));
        (url, store, appender)
    }

    /// Appends through the appender (the writer thread on SQLite, a task on
    /// PostgreSQL) interleaved with events appended inside store
    /// transactions form one dense chain that verifies, and every append
    /// gets its own sequence number.
    async fn one_chain(store: Arc<dyn Store>) {
        let appender = Arc::new(Appender::start(
            store.clone(),
            AppenderSettings {
                max_batch: 16,
                wait: Duration::from_millis(1),
                ..Default::default()
            },
            None,
        ));
        let mut tasks = Vec::new();
        for i in 0..200usize {
            let (a, s) = (appender.clone(), store.clone());
            tasks.push(tokio::spawn(async move {
                if i % 10 == 0 {
                    // A state change's events, in its own transaction.
                    let stored = s.audit().append_events(&[event(10_000 + i), event(20_000 + i)]).await?;
                    Ok::<Vec<u64>, AuditError>(stored.iter().map(|e| e.seq).collect())
                } else {
                    let _busy = a.enter();
                    Ok(vec![a.append(event(i)).await?])
                }
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.expect("task").expect("appended"));
        }
        seqs.sort_unstable();
        let expected: Vec<u64> = (1..=220).collect();
        assert_eq!(seqs, expected, "every event has its own seq, densely");
        assert_eq!(*appender.committed().borrow(), 220);
        let report = verify_store(store.as_ref(), &KeyHistory::default())
            .await
            .expect("verify");
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.events, 220);
        // Grouped: fewer transactions than appends.
        let stats = appender.stats().expect("stats");
        assert_eq!(stats.group_events.get_sample_sum() as u64, 180);
        assert!(stats.group_events.get_sample_count() < 180);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writer_thread_and_store_transactions_form_one_chain_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::open(&sqlite_url_in(dir.path())).await.expect("open");
        assert!(store.direct_audit().is_some(), "SQLite appends on the writer thread");
        one_chain(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appender_task_and_store_transactions_form_one_chain_postgres() {
        let Some(schema) = PgTestSchema::create() else { return };
        let store = crate::store::open(schema.url()).await.expect("open");
        assert!(store.direct_audit().is_none(), "PostgreSQL appends through the pool");
        one_chain(store).await;
    }

    /// A SQLite appender that groups up to 16 events and may wait 5 s for
    /// the events of requests in flight.
    async fn waiting_appender(dir: &std::path::Path) -> Arc<Appender> {
        let (_url, _store, appender) = sqlite_appender(
            dir,
            AppenderSettings {
                max_batch: 16,
                wait: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await;
        appender
    }

    /// Two requests in flight, the second's event (`first + 1`) queued
    /// 100 ms after the first's (`first`): their seqs.
    async fn two_in_flight(appender: &Arc<Appender>, first: usize) -> (u64, u64) {
        let guards = (appender.enter(), appender.enter());
        let a = {
            let a = appender.clone();
            let guard = guards.0;
            tokio::spawn(async move {
                let _guard = guard;
                a.append(event(first)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = {
            let _guard = guards.1;
            appender.append(event(first + 1)).await.expect("second")
        };
        (a.await.expect("task").expect("first"), second)
    }

    /// A group waits for the event of a request still in flight (one
    /// transaction for both), up to the configured wait whatever the
    /// commits before it took (the first group too), and never for a
    /// request that is not there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_waits_for_requests_in_flight_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let appender = waiting_appender(dir.path()).await;
        let stats = appender.stats().expect("stats").group_events.clone();

        // Two requests in flight: the first one's event waits for the second's.
        let started = Instant::now();
        assert_eq!(two_in_flight(&appender, 1).await, (1, 2));
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            (stats.get_sample_count(), stats.get_sample_sum() as u64),
            (1, 2),
            "both events in one group"
        );

        // Fast commits before it do not shorten the next group's wait.
        assert_eq!(two_in_flight(&appender, 3).await, (3, 4));
        assert_eq!(
            (stats.get_sample_count(), stats.get_sample_sum() as u64),
            (2, 4),
            "again one group"
        );

        // Nobody else in flight: a lone append is not held back, although
        // the configured wait is 5 s.
        let started = Instant::now();
        let _lone = appender.enter();
        appender.append(event(5)).await.expect("appended");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(stats.get_sample_count(), 3);
    }

    /// While a group waits for the requests in flight, their events do not
    /// wake the writer one by one: only the one that completes the group
    /// does, and the group is written then, well before its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_event_that_completes_a_group_wakes_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let appender = waiting_appender(dir.path()).await;
        let stats = appender.stats().expect("stats").group_events.clone();
        assert_eq!(appender.wake.woken.load(Ordering::Relaxed), 0);

        // Four requests in flight, their events 50 ms apart.
        let guards: Vec<Busy> = (0..4).map(|_| appender.enter()).collect();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (i, guard) in guards.into_iter().enumerate() {
            let a = appender.clone();
            tasks.push(tokio::spawn(async move {
                let _guard = guard;
                a.append(event(i + 1)).await
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in tasks {
            t.await.expect("task").expect("appended");
        }
        assert_eq!(
            (stats.get_sample_count(), stats.get_sample_sum() as u64),
            (1, 4),
            "the four events in one group"
        );
        assert_eq!(
            appender.wake.woken.load(Ordering::Relaxed),
            1,
            "the fourth event woke the writer, the second and third did not"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "written when complete, not at the deadline: {:?}",
            started.elapsed()
        );
    }

    /// `finish` answers after everything queued before it is written,
    /// even while the writer is held up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_waits_for_what_is_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, store, appender) = sqlite_appender(
            dir.path(),
            AppenderSettings {
                max_batch: 8,
                ..Default::default()
            },
        )
        .await;
        let mut other = sqlx::SqliteConnection::connect(&url).await.expect("connect");
        sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.expect("lock");
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let a = appender.clone();
                tokio::spawn(async move { a.append(event(i)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let finish = {
            let a = appender.clone();
            tokio::spawn(async move { a.finish().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!finish.is_finished(), "finish answered while events were queued");
        sqlx::query("ROLLBACK").execute(&mut other).await.expect("unlock");
        drop(other);
        assert_eq!(finish.await.expect("task").expect("finish"), None);
        assert_eq!(store.audit().audit_head().await.expect("head").seq, 50);
        for t in tasks {
            t.await.expect("task").expect("appended");
        }
    }
}
