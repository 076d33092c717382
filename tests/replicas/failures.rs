//! Failures under load: a rolling restart, a replica killed, the database's
//! connections cut. Nine clients (three per replica) pay in one session
//! without pause; a client that meets UNAVAILABLE (the replica is gone or
//! its store is) or ABORTED (the request id is still held by an attempt that
//! died with its replica) retries the same request id on the next replica.
//! A client also retries a request whose connection broke, in the one test
//! that kills a replica (nothing else breaks connections: a stopping replica
//! first refuses new requests with UNAVAILABLE for `server.drain_seconds`).
//! Afterwards: no client saw a failure, every answered payment is one
//! completed spend with its audit event, the session's remaining cap is
//! exact, no reservation is left pending, and the audit chain verifies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Code;

use crate::cluster::Cluster;
use crate::common::Wallet;
use crate::{create_account, open_session, pay, runtime, Received};

const CAP: u128 = 1_000_000_000;

/// What the clients were answered: request id -> (amount, signature).
type Answered = BTreeMap<String, (u128, Vec<u8>)>;

/// Nine clients paying in one session until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    received: Received,
    /// Requests that ended in an error the client does not retry.
    failed: Arc<Mutex<Vec<(String, String)>>>,
    /// Retries, by the code that caused them.
    retries: Arc<Mutex<BTreeMap<String, usize>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A request broken by its connection (the replica died under it): the
/// client cannot know whether it was done, and retries it with its id.
fn broken_connection(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unknown | Code::Cancelled)
        && std::error::Error::source(s).is_some_and(|e| {
            // Broken while connecting or sending (tonic's transport error), or
            // while the answer's body was read (hyper's own error).
            e.downcast_ref::<tonic::transport::Error>().is_some() || e.downcast_ref::<hyper::Error>().is_some()
        })
}

impl Load {
    /// Nine clients; with `retry_broken`, a request whose connection broke
    /// is retried as well (only a killed replica does that: a stopping one
    /// answers UNAVAILABLE).
    fn start(rt: &tokio::runtime::Runtime, channels: Vec<Channel>, token: &str, retry_broken: bool) -> Load {
        let load = Load {
            stop: Arc::default(),
            received: Arc::default(),
            failed: Arc::default(),
            retries: Arc::default(),
            tasks: Vec::new(),
        };
        let channels = Arc::new(channels);
        let tasks = (0..channels.len())
            .map(|c| {
                let (channels, token) = (channels.clone(), token.to_string());
                let (stop, received, failed, retries) = (
                    load.stop.clone(),
                    load.received.clone(),
                    load.failed.clone(),
                    load.retries.clone(),
                );
                rt.spawn(async move {
                    let mut target = c;
                    for n in 0usize.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let id = format!("c{c}-{n}");
                        let amount = 1 + ((c * 31 + n * 7) % 100) as u128;
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            match pay(&channels[target % channels.len()], &token, amount, "USDC", &id).await {
                                Ok(r) => {
                                    received.lock().expect("lock").insert(id.clone(), (amount, r.signature));
                                    break;
                                }
                                Err(s)
                                    if (matches!(s.code(), Code::Unavailable | Code::Aborted)
                                        || (retry_broken && broken_connection(&s)))
                                        && Instant::now() < deadline =>
                                {
                                    let why = match broken_connection(&s) {
                                        true => "broken connection".to_string(),
                                        false => format!("{:?}", s.code()),
                                    };
                                    *retries.lock().expect("lock").entry(why).or_default() += 1;
                                    // The next channel is the next replica.
                                    target += 1;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                Err(s) => {
                                    failed.lock().expect("lock").push((id.clone(), format!("{s:?}")));
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    fn received(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// Waits until `n` more payments were answered (or panics after 60 s).
    fn wait_for_more(&self, n: usize) {
        let target = self.received() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received() < target {
            assert!(
                Instant::now() < deadline,
                "the load stalled at {} payments; failures: {:?}",
                self.received(),
                self.failed.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the clients (each finishes its request, retries included).
    fn stop(self, rt: &tokio::runtime::Runtime) -> (Answered, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            rt.block_on(t).expect("client task");
        }
        let failed = self.failed.lock().expect("lock").clone();
        assert!(failed.is_empty(), "clients saw failures: {failed:?}");
        let received = self.received.lock().expect("lock").clone();
        let retries = self.retries.lock().expect("lock").clone();
        (received, retries)
    }
}

/// The store agrees with what the clients were answered: one completed
/// spend per answered payment (same amount), no spend pending, no spend the
/// clients were not answered, the remaining cap exact, an allow event for
/// each, and the audit chain verifies.
fn check_store(
    cl: &Cluster,
    rt: &tokio::runtime::Runtime,
    session_id: &str,
    received: &BTreeMap<String, (u128, Vec<u8>)>,
) {
    rt.block_on(async {
        let db = cl.db().await;
        let rows: Vec<(String, String, bool)> =
            sqlx::query_as("SELECT request_id, amount, response IS NOT NULL FROM spends WHERE session_id = $1")
                .bind(session_id)
                .fetch_all(&db)
                .await
                .expect("spends");
        let pending: Vec<&String> = rows.iter().filter(|r| !r.2).map(|r| &r.0).collect();
        assert!(pending.is_empty(), "spends left pending: {pending:?}");
        let spends: BTreeMap<String, u128> = rows
            .iter()
            .map(|(id, amount, _)| (id.clone(), amount.parse().expect("amount")))
            .collect();
        let answered: BTreeMap<String, u128> = received.iter().map(|(id, (a, _))| (id.clone(), *a)).collect();
        // A spend no client heard of is possible only for a request whose
        // client stopped retrying; the clients here never stop early.
        assert_eq!(spends, answered, "completed spends and answered payments differ");
        let (remaining,): (String,) = sqlx::query_as("SELECT remaining FROM sessions WHERE id = $1")
            .bind(session_id)
            .fetch_one(&db)
            .await
            .expect("remaining");
        let spent: u128 = answered.values().sum();
        assert_eq!(remaining, (CAP - spent).to_string(), "the remaining cap is not exact");
        let events: Vec<(String,)> = sqlx::query_as(
            "SELECT request_id FROM audit_events WHERE session = $1 AND action = 'SignPayment' AND decision = 'allow'",
        )
        .bind(session_id)
        .fetch_all(&db)
        .await
        .expect("audit events");
        let with_event: std::collections::BTreeSet<String> = events.into_iter().map(|(id,)| id).collect();
        let missing: Vec<&String> = answered.keys().filter(|id| !with_event.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "answered payments without an audit event: {missing:?}"
        );
        db.close().await;
    });
    let (ok, report) = cl.audit_verify();
    assert!(ok, "the audit chain does not verify: {report}");
}

fn session(cl: &Cluster, rt: &tokio::runtime::Runtime, seed: u8) -> (String, String, Vec<Channel>) {
    rt.block_on(async {
        let wallet = Wallet::new(seed);
        let account = create_account(cl, &wallet, "load").await;
        let (id, token) = open_session(cl, 0, &wallet, &account, CAP).await;
        (id, token, cl.channels("marketplace", 3).await)
    })
}

/// SIGTERM one replica at a time under load, and start it again: no client
/// sees a failure, and nothing is signed twice or lost.
#[test]
fn rolling_restart_under_load_loses_nothing() {
    let Some(mut cl) = Cluster::start(3, "", "") else {
        return;
    };
    let rt = runtime();
    let (session_id, token, channels) = session(&cl, &rt, 0x61);
    let load = Load::start(&rt, channels, &token, false);
    load.wait_for_more(100);
    for i in 0..3 {
        assert!(
            cl.signal(i, "-TERM"),
            "replica {i} did not stop cleanly: {}",
            cl.log_tail(i)
        );
        load.wait_for_more(50);
        cl.spawn(i);
        cl.wait_ready(i);
        load.wait_for_more(100);
    }
    let (received, retries) = load.stop(&rt);
    eprintln!(
        "rolling restart: {} payments answered, retries {retries:?}",
        received.len()
    );
    assert!(
        retries.values().sum::<usize>() > 0,
        "no client was ever turned away: the restarts did not happen under load"
    );
    check_store(&cl, &rt, &session_id, &received);
}

/// SIGKILL one replica mid-load and leave it down: the survivors release
/// what it had reserved within the recovery bound, retried requests are
/// signed once, and every answered payment has its audit event.
#[test]
fn a_replica_killed_mid_load_leaves_nothing_pending() {
    let Some(mut cl) = Cluster::start(3, "[sessions]\npending_spend_timeout_seconds = 2\n", "") else {
        return;
    };
    let rt = runtime();
    let (session_id, token, channels) = session(&cl, &rt, 0x62);
    let load = Load::start(&rt, channels, &token, true);
    load.wait_for_more(200);
    let killed_at = Instant::now();
    cl.signal(1, "-KILL");
    load.wait_for_more(300);
    let (received, retries) = load.stop(&rt);
    // The recovery bound: the pending timeout plus one sweep period (a
    // quarter of it), with a margin for a loaded machine.
    let bound = Duration::from_millis(2_500 + 2_000);
    if let Some(rest) = bound.checked_sub(killed_at.elapsed()) {
        std::thread::sleep(rest);
    }
    eprintln!("SIGKILL: {} payments answered, retries {retries:?}", received.len());
    check_store(&cl, &rt, &session_id, &received);
}

/// Every database connection of the replicas terminated, again and again,
/// for three seconds under load: the replicas answer UNAVAILABLE while it
/// lasts, recover without a restart, and nothing is lost.
#[test]
fn database_connections_cut_mid_load_lose_nothing() {
    // A spend whose completion and release both failed with the database
    // stays reserved until the sweep (the recovery bound); a retry of it is
    // answered ABORTED until then. A short bound keeps the test short.
    let Some(mut cl) = Cluster::start(3, "[sessions]\npending_spend_timeout_seconds = 2\n", "") else {
        return;
    };
    let rt = runtime();
    let (session_id, token, channels) = session(&cl, &rt, 0x63);
    let load = Load::start(&rt, channels, &token, false);
    load.wait_for_more(100);
    let terminated = rt.block_on(async {
        // The test's own connection is outside the replicas' application name.
        let base = keyward::store::testing::postgres_base_url();
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&base)
            .await
            .expect("postgres");
        let mut terminated = 0usize;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let rows: Vec<(bool,)> =
                sqlx::query_as("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                    .bind(&cl.app_name)
                    .fetch_all(&admin)
                    .await
                    .expect("pg_terminate_backend");
            terminated += rows.iter().filter(|r| r.0).count();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        admin.close().await;
        terminated
    });
    assert!(terminated > 0, "no replica connection was found to terminate");
    for i in 0..3 {
        cl.wait_ready(i);
    }
    load.wait_for_more(200);
    let (received, retries) = load.stop(&rt);
    eprintln!(
        "{terminated} backends terminated: {} payments answered, retries {retries:?}",
        received.len()
    );
    assert!(
        retries.get("Unavailable").copied().unwrap_or(0) > 0,
        "no request was answered UNAVAILABLE while the database connections were cut: {retries:?}"
    );
    check_store(&cl, &rt, &session_id, &received);
}
