//! Clients that give up: thousands of concurrent writing requests of every
//! kind, each with a random deadline (some enforced by the client dropping
//! the call, some by the server from `grpc-timeout`), some on connections
//! dropped mid-request, through real mTLS against a real daemon on a real
//! SoftHSM token, on SQLite and PostgreSQL. Afterwards every kind of write
//! must succeed at once, no spend is left pending past the recovery bound,
//! every session's cap is exact, every payment a client received was
//! recorded, the daemon is ready, and the audit chain verifies.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, OpenSessionRequest, RevokeSessionRequest, SignMessageRequest,
    SignPaymentRequest, SignReceiptRequest, SignTypedDataRequest, SignatureAlgorithm,
};
use keyward::config::Custody;
use rand::Rng;
use tonic::transport::Channel;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const CAP: u128 = 3_000;
/// Rounds of `WIDTH` concurrent requests.
const ROUNDS: usize = 40;
const WIDTH: usize = 64;
/// Sessions paid in, and the request ids each payment picks from (so
/// retries and concurrent duplicates of one id happen).
const PAY_SESSIONS: usize = 4;
const REQUEST_IDS: usize = 150;

/// Limits wide enough that the storm is about cancellation, not refusals.
const LIMITS: &str = r#"
[[rate]]
name = "client-account-creation"
per = "identity"
actions = ["CreateAccount"]
capacity = 100000
refill_per_second = 10000.0

[[daily_spend]]
name = "usdc-per-account-day"
currency = "USDC"
cap = "1000000000"

[sessions]
max_ttl_seconds = 86400
max_cap = "1000000000000"
max_open_per_account = 100000
"#;

struct Clients {
    admin: Vec<Channel>,
    market: Vec<Channel>,
    gateway: Vec<Channel>,
}

struct Fixture {
    env: Env,
    daemon: Daemon,
    wallet: Wallet,
    account_id: String,
    /// (session id, token) paid in.
    pay: Vec<(String, String)>,
    /// Sessions the storm revokes.
    revocable: Vec<String>,
}

impl Fixture {
    async fn open_session(&self, gateway: &Channel, cap: u128) -> Result<(String, String), tonic::Status> {
        let mut s = SessionServiceClient::new(gateway.clone());
        let c = s
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: self.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
                cap: cap.to_string(),
                ttl_seconds: 3600,
            })
            .await?
            .into_inner();
        let opened = s
            .open_session(OpenSessionRequest {
                challenge_id: c.challenge_id,
                signature: self.wallet.sign(&c.typed_data_json),
            })
            .await?
            .into_inner();
        let session = opened
            .session
            .ok_or_else(|| tonic::Status::internal("no session in the answer"))?;
        Ok((session.session_id, opened.token))
    }
}

async fn fixture(env: Env) -> Fixture {
    env.init().await;
    let daemon = env.start().await;
    let wallet = Wallet::new(0x42);
    let account = daemon
        .accounts(&env, "admin")
        .await
        .create_account(CreateAccountRequest {
            controller: wallet.address().to_checksum(),
            label: "storm".into(),
            allow: vec![],
        })
        .await
        .expect("account")
        .into_inner();
    let mut f = Fixture {
        env,
        daemon,
        wallet,
        account_id: account.account_id,
        pay: Vec::new(),
        revocable: Vec::new(),
    };
    let gateway = f.daemon.channel(&f.env, "wallet-gateway").await;
    for _ in 0..PAY_SESSIONS {
        let s = f.open_session(&gateway, CAP).await.expect("session");
        f.pay.push(s);
    }
    for _ in 0..24 {
        let (id, _) = f.open_session(&gateway, 100).await.expect("session");
        f.revocable.push(id);
    }
    f
}

/// A payment the client got an answer for: (session, request id, amount).
type Acknowledged = Arc<Mutex<Vec<(usize, String, u128)>>>;

/// One storm request of kind `op`; the caller puts a deadline on it.
async fn one(
    f: &Fixture,
    c: &Clients,
    op: u32,
    acked: &Acknowledged,
    channel_pick: usize,
) -> Result<(), tonic::Status> {
    // Every random choice up front: the generator is not held across awaits.
    let (ed, data_n, s, n, receipt_n, revoke_pick) = {
        let mut rng = rand::thread_rng();
        (
            rng.gen_bool(0.5),
            rng.gen::<u64>(),
            rng.gen_range(0..PAY_SESSIONS),
            rng.gen_range(0..REQUEST_IDS),
            rng.gen::<u32>() % 500,
            rng.gen_range(0..f.revocable.len()),
        )
    };
    let admin = c.admin[channel_pick % c.admin.len()].clone();
    let market = c.market[channel_pick % c.market.len()].clone();
    let gateway = c.gateway[channel_pick % c.gateway.len()].clone();
    match op {
        0 => {
            AccountServiceClient::new(admin)
                .create_account(CreateAccountRequest {
                    controller: CONTROLLER.into(),
                    label: "storm".into(),
                    allow: vec![],
                })
                .await?;
        }
        1 => {
            let alg = if ed {
                SignatureAlgorithm::Ed25519
            } else {
                SignatureAlgorithm::Secp256k1
            };
            SigningServiceClient::new(admin)
                .sign_message(SignMessageRequest {
                    account_id: f.account_id.clone(),
                    alg: alg as i32,
                    data: format!("storm {data_n}").into_bytes(),
                })
                .await?;
        }
        2 => {
            SigningServiceClient::new(admin)
                .sign_typed_data(SignTypedDataRequest {
                    account_id: f.account_id.clone(),
                    typed_data_json: MAIL.into(),
                    session_token: String::new(),
                    request_id: String::new(),
                })
                .await?;
        }
        3 => {
            f.open_session(&gateway, 50).await?;
        }
        4..=6 => {
            let (session_id, token) = &f.pay[s];
            let request_id = format!("pay-{n}");
            let amount = amount_for(s, n);
            let r = SigningServiceClient::new(market)
                .sign_payment(SignPaymentRequest {
                    session_token: token.clone(),
                    amount: amount.to_string(),
                    currency: "USDC".into(),
                    manifest: MANIFEST.into(),
                    license_id: "lic-7".into(),
                    payee: String::new(),
                    request_id: request_id.clone(),
                })
                .await?
                .into_inner();
            assert_eq!(&r.session_id, session_id);
            acked.lock().expect("lock").push((s, request_id, amount));
        }
        7 => {
            SigningServiceClient::new(admin)
                .sign_receipt(SignReceiptRequest {
                    account_id: f.account_id.clone(),
                    buyer: "0x00000000000000000000000000000000000000b1".into(),
                    amount: "5".into(),
                    currency: "USDC".into(),
                    manifest: MANIFEST.into(),
                    license_id: "lic-7".into(),
                    session_token: String::new(),
                    payment_signature_ref: String::new(),
                    request_id: format!("receipt-{receipt_n}"),
                    payment_request_id: String::new(),
                })
                .await?;
        }
        _ => {
            let id = f.revocable[revoke_pick].clone();
            SessionServiceClient::new(admin)
                .revoke_session(RevokeSessionRequest {
                    session_id: id,
                    controller_signature: vec![],
                })
                .await?;
        }
    }
    Ok(())
}

/// The amounts of the completed spends of a session, by request id, read
/// from the database itself; and how many are still pending.
async fn spends(store_url: &str, session_id: &str) -> (BTreeMap<String, u128>, usize) {
    let rows: Vec<(String, String, bool)> = if store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(store_url).await.expect("sqlite");
        let rows = sqlx::query_as("SELECT request_id, amount, response IS NOT NULL FROM spends WHERE session_id = ?1")
            .bind(session_id)
            .fetch_all(&pool)
            .await
            .expect("spends");
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(store_url).await.expect("postgres");
        let rows = sqlx::query_as("SELECT request_id, amount, response IS NOT NULL FROM spends WHERE session_id = $1")
            .bind(session_id)
            .fetch_all(&pool)
            .await
            .expect("spends");
        pool.close().await;
        rows
    };
    let mut done = BTreeMap::new();
    let mut pending = 0;
    for (request_id, amount, completed) in rows {
        if completed {
            done.insert(request_id, amount.parse::<u128>().expect("amount"));
        } else {
            pending += 1;
        }
    }
    (done, pending)
}

fn storm(store: StoreKind) {
    let env = Env::new(Custody::Host, store).expect("env");
    std::fs::write(env.dir.path().join("policies/limits.toml"), LIMITS).expect("limits");
    // A short recovery bound, so the test sees the sweep's bound pass.
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let text = text.replace("[policy]", "[sessions]\npending_spend_timeout_seconds = 2\n[policy]");
    std::fs::write(&env.config_path, text).expect("config");
    block_on(async {
        let f = Arc::new(fixture(env).await);
        let mut clients = Clients {
            admin: Vec::new(),
            market: Vec::new(),
            gateway: Vec::new(),
        };
        for _ in 0..3 {
            clients.admin.push(f.daemon.channel(&f.env, "admin").await);
            clients.market.push(f.daemon.channel(&f.env, "marketplace").await);
            clients.gateway.push(f.daemon.channel(&f.env, "wallet-gateway").await);
        }
        let clients = Arc::new(clients);
        let acked: Acknowledged = Arc::default();
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        let started = Instant::now();
        for _ in 0..ROUNDS {
            let mut tasks = Vec::with_capacity(WIDTH);
            for i in 0..WIDTH {
                let f = f.clone();
                let clients = clients.clone();
                let acked = acked.clone();
                tasks.push(tokio::spawn(async move {
                    let (op, deadline_us, how) = {
                        let mut rng = rand::thread_rng();
                        (
                            rng.gen_range(0..9u32),
                            rng.gen_range(1_000..150_000u64),
                            rng.gen_range(0..4u32),
                        )
                    };
                    let deadline = Duration::from_micros(deadline_us);
                    let outcome = match how {
                        // The client gives up: the call is dropped (RST_STREAM).
                        0 | 1 => match tokio::time::timeout(deadline, one(&f, &clients, op, &acked, i)).await {
                            Ok(r) => r.map_err(|s| s.code()),
                            Err(_) => Err(tonic::Code::Cancelled),
                        },
                        // The client disconnects: a connection of its own, dropped mid-call.
                        2 => {
                            let profile = match op {
                                3 => "wallet-gateway",
                                4..=6 => "marketplace",
                                _ => "admin",
                            };
                            let own = f.daemon.channel(&f.env, profile).await;
                            let c = Clients {
                                admin: vec![own.clone()],
                                market: vec![own.clone()],
                                gateway: vec![own],
                            };
                            let r = match tokio::time::timeout(deadline, one(&f, &c, op, &acked, 0)).await {
                                Ok(r) => r.map_err(|s| s.code()),
                                Err(_) => Err(tonic::Code::Cancelled),
                            };
                            drop(c);
                            r
                        }
                        // The deadline travels as grpc-timeout: the server gives up.
                        _ => {
                            let r = tokio::time::timeout(Duration::from_secs(10), async {
                                tokio::task::yield_now().await;
                                one_with_server_deadline(&f, &clients, op, &acked, i, deadline).await
                            })
                            .await;
                            match r {
                                Ok(r) => r.map_err(|s| s.code()),
                                Err(_) => Err(tonic::Code::DeadlineExceeded),
                            }
                        }
                    };
                    (op, outcome)
                }));
            }
            for t in tasks {
                let (op, outcome) = t.await.expect("storm task");
                let key = match outcome {
                    Ok(()) => format!("op{op} OK"),
                    Err(code) => format!("op{op} {code:?}"),
                };
                *outcomes.entry(key).or_default() += 1;
            }
        }
        eprintln!(
            "storm: {} requests in {:?}: {outcomes:?}",
            ROUNDS * WIDTH,
            started.elapsed()
        );
        // No storm request may have failed for a reason other than its
        // deadline or an ordinary refusal: UNAVAILABLE or INTERNAL means the
        // store (or something else) broke under cancellation.
        for (k, n) in &outcomes {
            assert!(
                !k.ends_with("Unavailable") && !k.ends_with("Internal"),
                "{n} storm requests answered {k}: {outcomes:?}"
            );
        }

        // Every kind of write succeeds at once afterwards.
        let admin = f.daemon.channel(&f.env, "admin").await;
        let market = f.daemon.channel(&f.env, "marketplace").await;
        let gateway = f.daemon.channel(&f.env, "wallet-gateway").await;
        let at_once = Duration::from_secs(5);
        let after = Clients {
            admin: vec![admin.clone()],
            market: vec![market],
            gateway: vec![gateway.clone()],
        };
        // Every request the storm started runs to its end (its client gave
        // up, its work did not): wait for that backlog to drain.
        let drained = Instant::now();
        let deadline = drained + Duration::from_secs(120);
        while f.daemon.state.metrics.in_flight().get() > 0 {
            assert!(Instant::now() < deadline, "the storm's requests did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("backlog drained in {:?}", drained.elapsed());
        for op in 0..9u32 {
            let r = tokio::time::timeout(at_once, one(&f, &after, op, &acked, 0))
                .await
                .unwrap_or_else(|_| panic!("op {op} did not finish within {at_once:?} after the storm"));
            if let Err(s) = r {
                // A payment may meet its own cap; nothing else may fail.
                assert!(
                    (4..=6).contains(&op) && s.code() == tonic::Code::ResourceExhausted,
                    "op {op} failed after the storm: {s:?}"
                );
            }
        }
        let (id, _) = tokio::time::timeout(at_once, f.open_session(&gateway, 10))
            .await
            .expect("open in time")
            .expect("a session opens after the storm");
        SessionServiceClient::new(admin)
            .revoke_session(RevokeSessionRequest {
                session_id: id,
                controller_signature: vec![],
            })
            .await
            .expect("revoke after the storm");

        // The daemon says it is ready.
        assert!(f.daemon.state.health.readiness().is_ready());
        let (status, body) = https_get(&f, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));

        // No spend is left pending past the recovery bound (2 s here; the
        // sweep runs every second).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pending = 0;
            for (session_id, _) in &f.pay {
                pending += spends(&f.env.store_url, session_id).await.1;
            }
            if pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} spends still pending past the recovery bound"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Caps are exact: what is left plus what was completed is the cap,
        // and every payment a client received was recorded with its amount.
        let store = f.daemon.state.keys.store().clone();
        let acked = acked.lock().expect("lock").clone();
        for (i, (session_id, _)) in f.pay.iter().enumerate() {
            let (done, _) = spends(&f.env.store_url, session_id).await;
            let spent: u128 = done.values().sum();
            let s = store.get_session(session_id).await.expect("read").expect("session");
            assert_eq!(s.remaining + spent, CAP, "session {i}: cap not exact");
            let received: BTreeSet<&String> = acked.iter().filter(|a| a.0 == i).map(|a| &a.1).collect();
            for (s_i, request_id, amount) in acked.iter().filter(|a| a.0 == i) {
                assert_eq!(
                    done.get(request_id),
                    Some(amount),
                    "session {s_i}: {request_id} was received but not recorded"
                );
            }
            eprintln!(
                "session {i}: {} payments completed ({} received by a client), {spent} spent",
                done.len(),
                received.len()
            );
        }
        assert!(store.stale_spends(i64::MAX, 1).await.expect("stale").is_empty());

        // The audit chain verifies: one chain, no fork, no gap.
        audit_verifies(store.as_ref()).await;
        let f = Arc::try_unwrap(f).unwrap_or_else(|_| panic!("fixture still shared"));
        f.daemon.stop().await;
    });
}

/// `keyward audit verify`'s check, on the store: one chain, no gap, no fork.
async fn audit_verifies(store: &dyn keyward::store::Store) {
    let keys = keyward::audit::verify::store_keys(store).await.expect("keys");
    let report = keyward::audit::verify::verify_store(store, &keys)
        .await
        .expect("verify");
    assert!(report.ok(), "{report:?}");
}

/// As [`one`], with the deadline sent as `grpc-timeout` (the server cancels).
async fn one_with_server_deadline(
    f: &Fixture,
    c: &Clients,
    op: u32,
    acked: &Acknowledged,
    pick: usize,
    deadline: Duration,
) -> Result<(), tonic::Status> {
    // Every client call goes through an interceptor that stamps the deadline.
    let stamp = move |mut req: tonic::Request<()>| {
        req.set_timeout(deadline);
        Ok(req)
    };
    let admin = c.admin[pick % c.admin.len()].clone();
    let market = c.market[pick % c.market.len()].clone();
    match op {
        1 | 2 => {
            let mut s = SigningServiceClient::with_interceptor(admin, stamp);
            if op == 1 {
                s.sign_message(SignMessageRequest {
                    account_id: f.account_id.clone(),
                    alg: SignatureAlgorithm::Secp256k1 as i32,
                    data: b"deadline".to_vec(),
                })
                .await?;
            } else {
                s.sign_typed_data(SignTypedDataRequest {
                    account_id: f.account_id.clone(),
                    typed_data_json: MAIL.into(),
                    session_token: String::new(),
                    request_id: String::new(),
                })
                .await?;
            }
        }
        4..=6 => {
            let s = pick % PAY_SESSIONS;
            let (_, token) = &f.pay[s];
            let n = (pick * 7 + op as usize) % REQUEST_IDS;
            let request_id = format!("pay-{n}");
            let amount = amount_for(s, n);
            SigningServiceClient::with_interceptor(market, stamp)
                .sign_payment(SignPaymentRequest {
                    session_token: token.clone(),
                    amount: amount.to_string(),
                    currency: "USDC".into(),
                    manifest: MANIFEST.into(),
                    license_id: "lic-7".into(),
                    payee: String::new(),
                    request_id: request_id.clone(),
                })
                .await?;
            acked.lock().expect("lock").push((s, request_id, amount));
        }
        _ => {
            AccountServiceClient::with_interceptor(admin, stamp)
                .create_account(CreateAccountRequest {
                    controller: CONTROLLER.into(),
                    label: "deadline".into(),
                    allow: vec![],
                })
                .await?;
        }
    }
    Ok(())
}

/// A GET on the HTTPS side port (server TLS only): status and body.
async fn https_get(f: &Fixture, path: &str) -> (u16, String) {
    let url = format!("https://{}{path}", f.daemon.https_addr);
    keyward::cli::verify::https_get(&url, &f.env.pki.ca_cert, "localhost")
        .await
        .expect("https get")
}

/// The amount of payment `n` in session `s`: a retry of one request id is
/// the same request.
fn amount_for(s: usize, n: usize) -> u128 {
    1 + ((n * 37 + s * 13) % 100) as u128
}

#[test]
fn cancellation_storm_sqlite() {
    storm(StoreKind::Sqlite);
}

#[test]
fn cancellation_storm_postgres() {
    storm(StoreKind::Postgres);
}

// ---------------------------------------------------------------------------
// Session spends that cannot get stuck.
// ---------------------------------------------------------------------------

/// Every audit event, in order.
async fn all_events(store: &dyn keyward::store::Store) -> Vec<keyward::audit::Event> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit().events_after(after, 1000).await.expect("events");
        let Some(last) = page.last().map(|e| e.seq) else {
            return all;
        };
        after = last;
        all.extend(page);
    }
}

/// Runs SQL on the daemon's database from outside the daemon (a second
/// connection, as an operator or a failing disk would).
async fn sql(store_url: &str, statements: &[&str]) {
    if store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(store_url).await.expect("sqlite");
        for s in statements {
            sqlx::query(s).execute(&pool).await.expect("statement");
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(store_url).await.expect("postgres");
        for s in statements {
            sqlx::query(s).execute(&pool).await.expect("statement");
        }
        pool.close().await;
    }
}

/// Env with a short recovery bound (2 s) and, optionally, a one-session HSM
/// pool (so requests queue for the HSM).
fn recovery_env(custody: Custody, store: StoreKind, one_hsm_session: bool) -> Env {
    let env = Env::new(custody, store).expect("env");
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let mut text = text.replace("[policy]", "[sessions]\npending_spend_timeout_seconds = 2\n[policy]");
    if one_hsm_session {
        text = text.replace("pool_size = 4", "pool_size = 1");
    }
    std::fs::write(&env.config_path, text).expect("config");
    env
}

async fn pay_once(
    ch: &Channel,
    token: &str,
    amount: u128,
    request_id: &str,
) -> Result<keyward::api::pb::SignPaymentResponse, tonic::Status> {
    SigningServiceClient::new(ch.clone())
        .sign_payment(SignPaymentRequest {
            session_token: token.into(),
            amount: amount.to_string(),
            currency: "USDC".into(),
            manifest: MANIFEST.into(),
            license_id: "lic-7".into(),
            payee: String::new(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Clients whose deadline is shorter than the wait for the HSM (one HSM
/// session, 64 payments in flight): each payment still completes or is
/// released in its own task; a retry with the same request id returns the
/// first signature or signs once, never a lasting ABORTED; the cap is exact.
fn deadline_shorter_than_the_hsm_wait(store: StoreKind) {
    let env = recovery_env(Custody::Hsm, store, true);
    block_on(async {
        let f = fixture(env).await;
        let market = f.daemon.channel(&f.env, "marketplace").await;
        let (session_id, token) = f.pay[0].clone();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for i in 0..300usize {
            let (market, token, sem) = (market.clone(), token.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await;
                // Long enough to reserve, mostly shorter than the HSM queue.
                let deadline = Duration::from_micros(2_000 + (i as u64 * 7919) % 28_000);
                let r = tokio::time::timeout(deadline, pay_once(&market, &token, amount_for(0, i), &format!("r-{i}")))
                    .await;
                (i, r.ok().and_then(Result::ok))
            }));
        }
        let mut received = BTreeMap::new();
        for t in tasks {
            let (i, r) = t.await.expect("task");
            if let Some(r) = r {
                received.insert(i, r);
            }
        }
        // Each request's own task completes or releases its spend: once none
        // is in flight, none is pending (well before the 2 s recovery bound
        // would let the sweep release one).
        let deadline = Instant::now() + Duration::from_secs(30);
        while f.daemon.state.metrics.in_flight().get() > 0 {
            assert!(Instant::now() < deadline, "requests did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (done_now, pending_now) = spends(&f.env.store_url, &session_id).await;
        eprintln!(
            "{} of 300 answered within their deadline; {} completed and {pending_now} pending once none was in flight",
            received.len(),
            done_now.len()
        );
        assert_eq!(pending_now, 0, "a cancelled request left its spend pending");
        assert!(
            done_now.len() > received.len(),
            "the scenario happened: spends completed for clients that had given up"
        );
        // Retries with no deadline: the first signature, or one new signing.
        let mut cap_refusals = 0;
        for i in 0..300usize {
            match pay_once(&market, &token, amount_for(0, i), &format!("r-{i}")).await {
                Ok(r) => {
                    if let Some(first) = received.get(&i) {
                        assert_eq!(
                            first.signature, r.signature,
                            "r-{i}: a retry must return the first signature"
                        );
                        assert_eq!(first.nonce, r.nonce);
                    }
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => cap_refusals += 1,
                Err(s) => panic!("retry of r-{i} failed: {s:?}"),
            }
        }
        let (done, pending) = spends(&f.env.store_url, &session_id).await;
        assert_eq!(pending, 0, "spends left pending after every request ended");
        let s = f
            .daemon
            .state
            .keys
            .store()
            .get_session(&session_id)
            .await
            .expect("read")
            .expect("session");
        let spent: u128 = done.values().sum();
        assert_eq!(s.remaining + spent, CAP, "cap not exact");
        assert_eq!(done.len() + cap_refusals, 300);
        let store = f.daemon.state.keys.store().clone();
        audit_verifies(store.as_ref()).await;
        f.daemon.stop().await;
    });
}

#[test]
fn deadline_shorter_than_the_hsm_wait_sqlite() {
    deadline_shorter_than_the_hsm_wait(StoreKind::Sqlite);
}

#[test]
fn deadline_shorter_than_the_hsm_wait_postgres() {
    deadline_shorter_than_the_hsm_wait(StoreKind::Postgres);
}

/// Completion fails (the database refuses to record the response): the
/// signature is withheld and the spend given back at once with its
/// `ReleaseSpend` event. When the release fails too, the spend stays pending
/// until the recovery sweep releases it, with its own event. Retries of both
/// request ids then sign once each.
fn completion_failure(store: StoreKind) {
    let env = recovery_env(Custody::Host, store, false);
    let (fail_update, fail_delete, heal): (Vec<&str>, Vec<&str>, Vec<&str>) = match store {
        StoreKind::Sqlite => (
            vec!["CREATE TRIGGER fail_complete BEFORE UPDATE OF response ON spends BEGIN SELECT RAISE(ABORT, 'injected: cannot record the response'); END"],
            vec!["CREATE TRIGGER fail_release BEFORE DELETE ON spends BEGIN SELECT RAISE(ABORT, 'injected: cannot release'); END"],
            vec!["DROP TRIGGER fail_complete", "DROP TRIGGER fail_release"],
        ),
        StoreKind::Postgres => (
            vec![
                "CREATE FUNCTION keyward_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$",
                "CREATE TRIGGER fail_complete BEFORE UPDATE OF response ON spends FOR EACH ROW EXECUTE FUNCTION keyward_fail()",
            ],
            vec!["CREATE TRIGGER fail_release BEFORE DELETE ON spends FOR EACH ROW EXECUTE FUNCTION keyward_fail()"],
            vec![
                "DROP TRIGGER fail_complete ON spends",
                "DROP TRIGGER fail_release ON spends",
                "DROP FUNCTION keyward_fail()",
            ],
        ),
    };
    block_on(async {
        let f = fixture(env).await;
        let market = f.daemon.channel(&f.env, "marketplace").await;
        let (session_id, token) = f.pay[0].clone();
        let store = f.daemon.state.keys.store().clone();
        let remaining = |store: Arc<dyn keyward::store::Store>, id: String| async move {
            store.get_session(&id).await.expect("read").expect("session").remaining
        };
        let releases = |events: &[keyward::audit::Event], request_id: &str| -> Vec<keyward::audit::Event> {
            events
                .iter()
                .filter(|e| e.body.action == "ReleaseSpend" && e.body.request_id == request_id)
                .cloned()
                .collect()
        };

        // 1. Completion fails, release works: given back at once.
        sql(&f.env.store_url, &fail_update).await;
        let err = pay_once(&market, &token, 40, "a")
            .await
            .expect_err("completion failed: no signature");
        assert_ne!(err.code(), tonic::Code::Ok);
        assert_eq!(remaining(store.clone(), session_id.clone()).await, CAP);
        let events = all_events(store.as_ref()).await;
        assert_eq!(releases(&events, "a").len(), 1, "one ReleaseSpend for a");

        // 2. Completion and release fail: pending until the sweep.
        sql(&f.env.store_url, &fail_delete).await;
        pay_once(&market, &token, 40, "b")
            .await
            .expect_err("completion failed: no signature");
        assert_eq!(
            remaining(store.clone(), session_id.clone()).await,
            CAP - 40,
            "b is still held"
        );
        sql(&f.env.store_url, &heal).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while remaining(store.clone(), session_id.clone()).await != CAP {
            assert!(Instant::now() < deadline, "the sweep did not release b");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let events = all_events(store.as_ref()).await;
        let b = releases(&events, "b");
        assert_eq!(b.len(), 1, "one ReleaseSpend for b");
        assert_eq!(b[0].body.identity, "keyward");
        assert_eq!(b[0].body.code, "DEADLINE_EXCEEDED");
        assert_eq!(b[0].body.policies, vec![keyward::session::RECOVERY_RULE.to_string()]);

        // 3. Retries sign once each.
        let a = pay_once(&market, &token, 40, "a").await.expect("retry a");
        let b2 = pay_once(&market, &token, 40, "b").await.expect("retry b");
        assert_eq!(
            pay_once(&market, &token, 40, "b").await.expect("replay b").signature,
            b2.signature
        );
        assert_ne!(a.nonce, b2.nonce);
        assert_eq!(remaining(store.clone(), session_id.clone()).await, CAP - 80);
        audit_verifies(store.as_ref()).await;
        f.daemon.stop().await;
    });
}

#[test]
fn completion_failure_is_released_sqlite() {
    completion_failure(StoreKind::Sqlite);
}

#[test]
fn completion_failure_is_released_postgres() {
    completion_failure(StoreKind::Postgres);
}
