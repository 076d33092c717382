//! The embedded store's audit writer: one OS thread with a SQLite
//! connection of its own (rusqlite), fed by the appender's queue.
//!
//! Through sqlx, a group of events costs a hand-off to sqlx's SQLite worker
//! thread and back for every statement (BEGIN, the head, each INSERT, the
//! head's UPDATE, COMMIT) and a task hand-off for the transaction's start.
//! Here the thread takes a whole group from the queue, writes it with
//! prepared statements in one `BEGIN IMMEDIATE` transaction (one fsync) and
//! wakes the group's waiters: two hand-offs per group, none per statement.
//!
//! The thread holds the store's in-process writer lock for the transaction,
//! so its appends serialise with every other write of the daemon (which
//! may append events of their own inside their transactions); the chain's
//! head is read inside the transaction, so the chain stays one dense chain
//! whoever appends. Another process on the same file is kept out by SQLite's
//! own lock (`busy_timeout`, as the store's). A transaction that fails is
//! rolled back and its waiters get the error; the next group tries again,
//! reopening the connection if it is gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::{oneshot, watch, Mutex};

use super::appender::{AppenderStats, Grouping};
use super::chain::link;
use super::event::NewEvent;
use super::store::{encode_policies, EVENT_COLUMNS};
use super::AuditError;

/// How long a write waits for another process's lock on the file (the store's own).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// An embedded store's file and its in-process writer lock (see
/// [`crate::store::Store::direct_audit`]).
#[derive(Debug, Clone)]
pub struct DirectAudit {
    /// The SQLite file.
    pub path: PathBuf,
    /// The store's writer lock, held by every write transaction.
    pub writer: Arc<Mutex<()>>,
}

/// What the writer thread is asked.
// Appends are the hot variant: boxing their event would cost an allocation
// per request to save space in a queue slot.
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    /// Append an event; answer its seq once committed.
    Append {
        event: NewEvent,
        done: oneshot::Sender<Result<u64, AuditError>>,
    },
    /// Answer once everything queued before it is written.
    Flush { done: oneshot::Sender<()> },
}

/// Moves the appends at the front of `jobs`, up to the first flush, to
/// `events` and `waiters`, and returns that flush: what was queued before
/// a flush is written before it is answered. Called until it returns
/// `None`, with a write after each call.
pub(super) fn take_appends(
    jobs: &mut impl Iterator<Item = Job>,
    events: &mut Vec<NewEvent>,
    waiters: &mut Vec<oneshot::Sender<Result<u64, AuditError>>>,
) -> Option<oneshot::Sender<()>> {
    for job in jobs {
        match job {
            Job::Append { event, done } => {
                events.push(event);
                waiters.push(done);
            }
            Job::Flush { done } => return Some(done),
        }
    }
    None
}

/// Starts the writer thread on `target`. It stops when every sender of
/// `rx` is gone, after writing what is queued. It holds nothing but its
/// connection, the store's writer lock and its channels: at exit nothing
/// of the HSM or the runtime is dropped on it.
pub(super) fn spawn(
    target: DirectAudit,
    group: Grouping,
    rx: flume::Receiver<Job>,
    head: watch::Sender<u64>,
    stats: Option<AppenderStats>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keyward-audit".into())
        .spawn(move || {
            let mut writer = Writer {
                target,
                conn: None,
                stats,
            };
            group.wake.set_thread(std::thread::current());
            let max = group.max;
            let mut jobs: Vec<Job> = Vec::with_capacity(max);
            let mut events: Vec<NewEvent> = Vec::with_capacity(max);
            let mut waiters: Vec<oneshot::Sender<Result<u64, AuditError>>> = Vec::with_capacity(max);
            while let Ok(first) = rx.recv() {
                // A group: what is queued now, up to the batch bound; then
                // what requests still in flight append before the deadline
                // (`audit.group_commit_wait_micros`, as on PostgreSQL). Not
                // bounded by how long the last commit took: under load that
                // cut groups to about 40 % of what the full wait gathers, and
                // the extra commits cost more CPU than the wait cost time.
                let deadline = std::time::Instant::now() + group.wait;
                jobs.push(first);
                let take = |jobs: &mut Vec<Job>| {
                    let before = jobs.len();
                    while jobs.len() < max {
                        match rx.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    jobs.len() > before
                };
                take(&mut jobs);
                // Sleeps until the deadline unless the event that completes
                // the group wakes it (see `GroupWake`): the events between
                // wake nobody.
                while group.more_coming(jobs.len(), deadline) {
                    group.wake.gathering(jobs.len(), true);
                    if take(&mut jobs) {
                        continue;
                    }
                    std::thread::park_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
                    take(&mut jobs);
                }
                group.wake.gathering(0, false);
                let mut group = jobs.drain(..);
                loop {
                    let flush = take_appends(&mut group, &mut events, &mut waiters);
                    writer.write(&mut events, &mut waiters, &head);
                    match flush {
                        Some(done) => {
                            let _ = done.send(());
                        }
                        None => break,
                    }
                }
            }
        })
        .map(|_| ())
}

struct Writer {
    target: DirectAudit,
    conn: Option<Connection>,
    stats: Option<AppenderStats>,
}

impl Writer {
    /// Writes `events` in one transaction and answers `waiters` (one per
    /// event, in order); leaves both empty.
    fn write(
        &mut self,
        events: &mut Vec<NewEvent>,
        waiters: &mut Vec<oneshot::Sender<Result<u64, AuditError>>>,
        head: &watch::Sender<u64>,
    ) {
        if events.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let result = {
            // The store's writer lock, as every write transaction takes it.
            let lock = self.target.writer.clone();
            let _writer = lock.blocking_lock();
            self.connection().and_then(|conn| append(conn, events))
        };
        match result {
            Ok(first) => {
                if let Some(s) = &self.stats {
                    s.observe(events.len(), started);
                }
                let last = first + events.len() as u64 - 1;
                head.send_replace(last);
                for (i, done) in waiters.drain(..).enumerate() {
                    let _ = done.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "audit append failed");
                // A connection that failed is opened anew for the next group.
                self.conn = None;
                let reason = e.to_string();
                for done in waiters.drain(..) {
                    let _ = done.send(Err(AuditError::Unavailable(reason.clone())));
                }
            }
        }
        events.clear();
    }

    fn connection(&mut self) -> Result<&mut Connection, rusqlite::Error> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => open(&self.target.path)?,
        };
        Ok(self.conn.insert(conn))
    }
}

/// The store's own settings: WAL, `synchronous=FULL` (a commit is on disk
/// before its waiters are answered), its busy timeout. The file exists
/// (the store created it and ran its migrations).
fn open(path: &std::path::Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(8);
    Ok(conn)
}

/// Appends `events` in one `BEGIN IMMEDIATE` transaction under the chain
/// head; the first one's seq.
fn append(conn: &mut Connection, events: &[NewEvent]) -> Result<u64, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (seq, hash): (i64, Vec<u8>) = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut prev: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("audit head hash is not 32 bytes"))?;
    let mut seq = u64::try_from(seq).map_err(|_| corrupt("audit head seq is negative"))?;
    let first = seq + 1;
    {
        let mut insert = tx.prepare_cached(insert_sql())?;
        for e in events {
            seq += 1;
            let hash = link(&prev, seq, e);
            let seq_i = i64::try_from(seq).map_err(|_| corrupt("audit seq out of range"))?;
            insert.execute(params![
                seq_i,
                e.time_ms,
                e.identity,
                e.action,
                e.account,
                e.session,
                e.request_id,
                e.decision,
                encode_policies(&e.policies),
                e.code,
                e.digest,
                e.signature_ref,
                e.trace_id,
                &prev[..],
                &hash[..],
            ])?;
            prev = hash;
        }
    }
    let seq_i = i64::try_from(seq).map_err(|_| corrupt("audit seq out of range"))?;
    tx.prepare_cached("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1")?
        .execute(params![seq_i, &prev[..]])?;
    tx.commit()?;
    Ok(first)
}

fn insert_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let binds: Vec<String> = (1..=15).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO audit_events ({EVENT_COLUMNS}) VALUES ({})",
            binds.join(", ")
        )
    })
}

fn corrupt(what: &'static str) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(what.into())
}

/// The hashes of the events `first..=last`, in order, read on a read-only
/// connection of this call's own (a checkpoint reads a thousand at a time:
/// through sqlx each row would be a hand-off from its worker thread).
/// Blocking: call it off the runtime.
pub(crate) fn event_hashes(path: &std::path::Path, first: u64, last: u64) -> Result<Vec<(u64, [u8; 32])>, AuditError> {
    let unavailable = |e: rusqlite::Error| AuditError::Unavailable(e.to_string());
    let range = |v: u64| i64::try_from(v).map_err(|_| AuditError::Invalid(format!("audit seq {v} out of range")));
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unavailable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
    let mut stmt = conn
        .prepare("SELECT seq, hash FROM audit_events WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq")
        .map_err(unavailable)?;
    let mut rows = stmt.query(params![range(first)?, range(last)?]).map_err(unavailable)?;
    let mut out = Vec::with_capacity(
        usize::try_from(last.saturating_sub(first).saturating_add(1))
            .unwrap_or(0)
            .min(1 << 16),
    );
    while let Some(row) = rows.next().map_err(unavailable)? {
        let seq: i64 = row.get(0).map_err(unavailable)?;
        let seq = u64::try_from(seq).map_err(|_| AuditError::Invalid(format!("audit seq {seq} is negative")))?;
        let hash: Vec<u8> = row.get(1).map_err(unavailable)?;
        out.push((seq, super::store::hash32(&format!("audit event {seq}"), &hash)?));
    }
    Ok(out)
}
