//! The threads that make hsm-custody signing calls.
//!
//! One thread per pool session takes signing jobs from one queue. Under load
//! the queue is never empty, so a thread goes from one token call to the
//! next without sleeping; Tokio's blocking pool would wake a parked thread
//! (and take its shared lock) for every signature. A job is only run if its
//! request still waits for it: a request dropped while its job is queued
//! starts nothing, and a job that has started runs to its end.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

/// Name of the threads that run hsm-custody signatures.
pub const TOKEN_THREAD: &str = "keyward-hsm-sign";

type Job = Box<dyn FnOnce() + Send>;

/// Why a job was not run.
#[derive(Debug, PartialEq, Eq)]
pub enum JobLost {
    /// No signing thread could be started, or every one of them is gone.
    NoThreads,
    /// The job panicked (its answer was dropped).
    Panicked,
}

/// The queue and its threads. The threads end when the last clone of the
/// queue is dropped.
#[derive(Debug, Clone)]
pub struct TokenThreads {
    queue: Sender<Job>,
}

impl TokenThreads {
    /// Starts `threads` signing threads (at least one). Fails only if not one
    /// thread could be started.
    pub fn start(threads: usize) -> std::io::Result<TokenThreads> {
        let (queue, jobs) = channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let mut started = 0;
        let mut last_error = None;
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            match std::thread::Builder::new()
                .name(TOKEN_THREAD.into())
                .spawn(move || run(&jobs))
            {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!(error = %e, thread = i, "cannot start a signing thread");
                    last_error = Some(e);
                }
            }
        }
        match (started, last_error) {
            (0, Some(e)) => Err(e),
            _ => Ok(TokenThreads { queue }),
        }
    }

    /// Runs `job` on a signing thread and waits for its answer. If the
    /// caller stops waiting before a thread takes the job, the job is not
    /// run.
    pub async fn run<T, F>(&self, work: F) -> Result<T, JobLost>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (answer, wait) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if answer.is_closed() {
                return; // the request is gone: start nothing
            }
            let _ = answer.send(work());
        });
        self.queue.send(job).map_err(|_| JobLost::NoThreads)?;
        // The sender is dropped without an answer only if the job panicked
        // (a skipped job has no one waiting).
        wait.await.map_err(|_| JobLost::Panicked)
    }
}

fn run(jobs: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while taking one job: the thread that holds
        // it waits on the queue, the others on the lock.
        let job = match jobs.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return, // every queue handle is gone
        };
        // A panicking job drops its answer (its caller sees `Panicked`);
        // the thread goes on with the next one.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a signing job panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_run_on_the_signing_threads_and_answer() {
        let threads = TokenThreads::start(2).expect("threads");
        let name = threads
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .expect("answer");
        assert_eq!(name.as_deref(), Some(TOKEN_THREAD));
    }

    #[tokio::test]
    async fn a_panicking_job_is_reported_and_the_thread_goes_on() {
        let threads = TokenThreads::start(1).expect("threads");
        let lost = threads.run(|| -> u8 { panic!("job panics") }).await;
        assert_eq!(lost, Err(JobLost::Panicked));
        // The one thread still serves.
        assert_eq!(threads.run(|| 7u8).await, Ok(7));
    }

    #[tokio::test]
    async fn a_job_whose_caller_left_while_queued_is_not_run() {
        let threads = TokenThreads::start(1).expect("threads");
        let ran = Arc::new(AtomicUsize::new(0));
        // Hold the only thread.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let blocker = {
            let threads = threads.clone();
            tokio::spawn(async move {
                threads
                    .run(move || {
                        let _ = started_tx.send(());
                        let _ = held.recv();
                    })
                    .await
            })
        };
        started.await.expect("the blocker runs");
        // Queue a job behind it, then give up on it.
        let queued = {
            let (threads, ran) = (threads.clone(), ran.clone());
            tokio::spawn(async move {
                threads
                    .run(move || {
                        ran.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        queued.abort();
        assert!(queued.await.is_err_and(|e| e.is_cancelled()));
        release.send(()).expect("release");
        blocker.await.expect("blocker").expect("answer");
        // A job queued after the abandoned one runs: the abandoned one was
        // taken from the queue before it, and skipped.
        let after = ran.clone();
        threads
            .run(move || {
                after.fetch_add(10, Ordering::SeqCst);
            })
            .await
            .expect("answer");
        assert_eq!(ran.load(Ordering::SeqCst), 10, "the abandoned job ran");
    }

    #[tokio::test]
    async fn a_started_job_runs_to_its_end_when_its_caller_leaves() {
        let threads = TokenThreads::start(1).expect("threads");
        let done = Arc::new(AtomicUsize::new(0));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let job = {
            let (threads, done) = (threads.clone(), done.clone());
            tokio::spawn(async move {
                threads
                    .run(move || {
                        let _ = started_tx.send(());
                        std::thread::sleep(Duration::from_millis(100));
                        done.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            })
        };
        started.await.expect("started");
        job.abort();
        // The next job runs after the abandoned one finished.
        let seen = done.clone();
        let when_next_ran = threads.run(move || seen.load(Ordering::SeqCst)).await;
        assert_eq!(when_next_ran, Ok(1), "the started job was cut short");
    }
}
