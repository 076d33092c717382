//! SIGKILL between a session spend's reservation and its completion: the
//! `keyward` binary as shipped (`keyward dev --custody hsm`, one HSM session,
//! so payments queue for the HSM after reserving), killed under 64 payments
//! in flight, then restarted. The recovery sweep releases every spend the
//! kill left pending, each with its `ReleaseSpend` event; the cap is exact;
//! every payment a client received is recorded; `keyward audit verify`
//! passes; a retry of a released request signs once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{dev_channel, signal, start_dev, Wallet};
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{CreateAccountRequest, CreateSessionChallengeRequest, OpenSessionRequest, SignPaymentRequest};
use tonic::transport::Channel;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const CAP: u128 = 1_000_000;

/// Payments a client received: request id -> (amount, signature).
type Received = Arc<Mutex<BTreeMap<String, (u128, Vec<u8>)>>>;

fn keyward(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home")
        .arg(home)
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn");
    c
}

/// (request id -> (amount, completed)) of the session's spends, read from the file.
async fn spends(db: &str, session_id: &str) -> BTreeMap<String, (u128, bool)> {
    let pool = sqlx::SqlitePool::connect(db).await.expect("sqlite");
    let rows: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT request_id, amount, response IS NOT NULL FROM spends WHERE session_id = ?1")
            .bind(session_id)
            .fetch_all(&pool)
            .await
            .expect("spends");
    pool.close().await;
    rows.into_iter()
        .map(|(id, amount, done)| (id, (amount.parse().expect("amount"), done)))
        .collect()
}

async fn pay(ch: &Channel, token: &str, amount: u128, request_id: &str) -> Result<Vec<u8>, tonic::Status> {
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
        .map(|r| r.into_inner().signature)
}

#[test]
fn sigkill_between_reserve_and_complete_is_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    // First run writes the config; then one HSM session and a 2 s bound.
    let mut child = start_dev(&home, &["--custody", "hsm"]);
    signal(&mut child, "-TERM");
    let config = home.join("keyward.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("pool_size"), "the dev config names the HSM pool size");
    let mut edited = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("pool_size") {
            edited.push_str("pool_size = 1\n");
        } else {
            edited.push_str(line);
            edited.push('\n');
        }
    }
    let edited = if edited.contains("[sessions]") {
        edited.replace("[sessions]", "[sessions]\npending_spend_timeout_seconds = 2")
    } else {
        format!("{edited}\n[sessions]\npending_spend_timeout_seconds = 2\n")
    };
    std::fs::write(&config, edited).expect("config");
    let db = format!("sqlite://{}", home.join("keyward.db").display());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut child = start_dev(&home, &["--custody", "hsm"]);
    let wallet = Wallet::new(0x42);
    let (session_id, token) = rt.block_on(async {
        let admin = dev_channel(&home, "admin").await;
        let account = AccountServiceClient::new(admin)
            .create_account(CreateAccountRequest {
                controller: wallet.address().to_checksum(),
                label: "sigkill".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner();
        let mut s = SessionServiceClient::new(dev_channel(&home, "wallet-gateway").await);
        let c = s
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: account.account_id,
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
                cap: CAP.to_string(),
                ttl_seconds: 3600,
            })
            .await
            .expect("challenge")
            .into_inner();
        let opened = s
            .open_session(OpenSessionRequest {
                challenge_id: c.challenge_id,
                signature: wallet.sign(&c.typed_data_json),
            })
            .await
            .expect("open")
            .into_inner();
        (opened.session.expect("session").session_id, opened.token)
    });

    // 64 payments in flight on one HSM session: most wait for the HSM
    // after their reservation committed.
    let received: Received = Arc::default();
    let workers: Vec<_> = (0..64usize)
        .map(|w| {
            let (home, token, received) = (home.clone(), token.clone(), received.clone());
            rt.spawn(async move {
                let ch = dev_channel(&home, "marketplace").await;
                for i in 0usize.. {
                    let id = format!("w{w}-{i}");
                    let amount = 1 + ((w * 31 + i * 7) % 100) as u128;
                    match pay(&ch, &token, amount, &id).await {
                        Ok(sig) => {
                            received.lock().expect("lock").insert(id, (amount, sig));
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().expect("lock").len() < 300 {
        assert!(Instant::now() < deadline, "load did not get going");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&mut child, "-KILL");
    for w in workers {
        rt.block_on(w).expect("worker");
    }
    let received = received.lock().expect("lock").clone();

    // What the kill left: spends reserved (their allow event committed) but
    // never completed.
    let at_kill = rt.block_on(spends(&db, &session_id));
    let pending: Vec<String> = at_kill
        .iter()
        .filter(|(_, (_, done))| !done)
        .map(|(id, _)| id.clone())
        .collect();
    eprintln!(
        "killed with {} payments received, {} spends recorded, {} pending",
        received.len(),
        at_kill.len(),
        pending.len()
    );
    assert!(
        !pending.is_empty(),
        "the kill should land between reservations and completions"
    );

    // Restart: the sweep releases every pending spend within the bound.
    let mut child = start_dev(&home, &["--custody", "hsm"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = rt.block_on(spends(&db, &session_id));
        if now.values().all(|(_, done)| *done) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pending spends were not released after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = rt.block_on(spends(&db, &session_id));
    let store = rt.block_on(keyward::store::open(&db)).expect("store");
    let session = rt
        .block_on(store.get_session(&session_id))
        .expect("read")
        .expect("session");
    let spent: u128 = after.values().map(|(a, _)| a).sum();
    assert_eq!(session.remaining + spent, CAP, "cap not exact after recovery");
    for (id, (amount, _)) in &received {
        assert_eq!(after.get(id), Some(&(*amount, true)), "{id}: received but not recorded");
    }
    // A release event for every spend the kill left pending.
    let mut events = Vec::new();
    let mut cursor = 0;
    loop {
        let page = rt.block_on(store.audit().events_after(cursor, 1000)).expect("events");
        let Some(last) = page.last().map(|e| e.seq) else { break };
        cursor = last;
        events.extend(page);
    }
    for id in &pending {
        let released = events
            .iter()
            .filter(|e| e.body.action == "ReleaseSpend" && &e.body.request_id == id && e.body.session == session_id)
            .count();
        assert_eq!(released, 1, "{id}: one ReleaseSpend");
        assert!(!after.contains_key(id), "{id}: released spend still stored");
    }
    // A retry of a released request signs once.
    rt.block_on(async {
        let ch = dev_channel(&home, "marketplace").await;
        let first = pay(&ch, &token, 5, &pending[0]).await.expect("retry signs");
        let again = pay(&ch, &token, 5, &pending[0]).await.expect("replay");
        assert_eq!(first, again);
    });
    signal(&mut child, "-TERM");
    let out = keyward(&home).args(["audit", "verify"]).output().expect("audit verify");
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
