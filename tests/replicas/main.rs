//! Replicas as processes: three `keyward serve` processes over one
//! PostgreSQL schema and one SoftHSM token (see `cluster.rs` for why one
//! token), loaded by clients that spread their requests over every replica.
//! Every guarantee that holds in one process must hold across them: exact
//! caps, limits and single-use challenges, one signature per request id, one
//! audit chain, one issuer rotation at a time, and nothing lost when a
//! replica is restarted, killed, or loses its database connections.

mod cluster;
#[path = "../common/mod.rs"]
mod common;
mod failures;
mod https;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Cluster;
use common::Wallet;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::jwks_service_client::JwksServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::signing_service_client::SigningServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, ListIssuerKeysRequest, OpenSessionRequest,
    RotateIssuerKeyRequest, SignPaymentRequest, SignPaymentResponse, SignReceiptRequest, SignTypedDataRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
pub const MARKETPLACE: &str = "spiffe://example.org/marketplace";

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Creates an account controlled by `wallet` (as admin, on replica 0).
pub async fn create_account(cl: &Cluster, wallet: &Wallet, label: &str) -> String {
    AccountServiceClient::new(cl.channel(0, "admin").await)
        .create_account(CreateAccountRequest {
            controller: wallet.address().to_checksum(),
            label: label.into(),
            allow: vec![],
        })
        .await
        .expect("account")
        .into_inner()
        .account_id
}

/// Asks replica `on` for a session challenge (payments 0–100, the test
/// manifest, `cap`): (challenge id, typed data the wallet signs).
pub async fn challenge(cl: &Cluster, on: usize, account_id: &str, cap: u128) -> (String, String) {
    let c = SessionServiceClient::new(cl.channel(on, "wallet-gateway").await)
        .create_session_challenge(CreateSessionChallengeRequest {
            account_id: account_id.into(),
            delegate: MARKETPLACE.into(),
            scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
            cap: cap.to_string(),
            ttl_seconds: 3600,
        })
        .await
        .expect("challenge")
        .into_inner();
    (c.challenge_id, c.typed_data_json)
}

/// A session opened through replica `on`: (session id, token).
pub async fn open_session(cl: &Cluster, on: usize, wallet: &Wallet, account_id: &str, cap: u128) -> (String, String) {
    let (id, typed) = challenge(cl, on, account_id, cap).await;
    let opened = SessionServiceClient::new(cl.channel(on, "wallet-gateway").await)
        .open_session(OpenSessionRequest {
            challenge_id: id,
            signature: wallet.sign(&typed),
        })
        .await
        .expect("open")
        .into_inner();
    (opened.session.expect("session").session_id, opened.token)
}

pub async fn pay(
    ch: &Channel,
    token: &str,
    amount: u128,
    currency: &str,
    request_id: &str,
) -> Result<SignPaymentResponse, Status> {
    SigningServiceClient::new(ch.clone())
        .sign_payment(SignPaymentRequest {
            session_token: token.into(),
            amount: amount.to_string(),
            currency: currency.into(),
            manifest: MANIFEST.into(),
            license_id: "lic-7".into(),
            payee: String::new(),
            request_id: request_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A code a caller may see when a limit or a race refuses it: anything but
/// a server fault or an unreachable replica.
fn is_clean_refusal(code: Code) -> bool {
    !matches!(
        code,
        Code::Ok | Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss | Code::Unimplemented
    )
}

/// `n` payments of `amount` in `currency`, all at once, spread over
/// `channels` (so over every replica): (request ids signed, refusal codes).
async fn race_payments(
    channels: &[Channel],
    token: &str,
    n: usize,
    amount: u128,
    currency: &str,
    prefix: &str,
) -> (Vec<String>, BTreeMap<String, usize>) {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ch = channels[i % channels.len()].clone();
            let (token, currency, start) = (token.to_string(), currency.to_string(), start.clone());
            let id = format!("{prefix}-{i}");
            tokio::spawn(async move {
                start.wait().await;
                (id.clone(), pay(&ch, &token, amount, &currency, &id).await)
            })
        })
        .collect();
    let mut ok = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (id, r) = t.await.expect("payment task");
        match r {
            Ok(_) => ok.push(id),
            Err(s) => {
                assert!(is_clean_refusal(s.code()), "{id}: {s:?}");
                *refused.entry(format!("{:?}", s.code())).or_default() += 1;
            }
        }
    }
    (ok, refused)
}

/// Session caps, daily caps, rate buckets, single-use challenges and
/// idempotency keys are exact across three replicas under concurrent load
/// from three clients each, and the audit chain they all append to verifies
/// as one chain after the run.
#[test]
fn limits_challenges_and_idempotency_are_exact_across_three_replicas() {
    let limits = r#"
[[daily_spend]]
name = "eur-per-account-day"
currency = "EUR"
cap = "1000"

[[rate]]
name = "replica-typed-data"
per = "account"
actions = ["SignTypedData"]
capacity = 30
refill_per_second = 0.001
"#;
    let Some(cl) = Cluster::start(3, "", limits) else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let wallet = Wallet::new(0x51);
        let account = create_account(&cl, &wallet, "replicas").await;
        let market = cl.channels("marketplace", 3).await;
        let gateway = cl.channels("wallet-gateway", 3).await;
        let db = cl.db().await;

        // One challenge, opened on every replica at once: exactly one session.
        let (challenge_id, typed) = challenge(&cl, 1, &account, 1_000_000).await;
        let signature = wallet.sign(&typed);
        let start = Arc::new(tokio::sync::Barrier::new(gateway.len()));
        let opens: Vec<_> = gateway
            .iter()
            .map(|ch| {
                let mut c = SessionServiceClient::new(ch.clone());
                let (challenge_id, signature, start) = (challenge_id.clone(), signature.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    c.open_session(OpenSessionRequest {
                        challenge_id,
                        signature,
                    })
                    .await
                })
            })
            .collect();
        let mut opened = 0;
        for t in opens {
            match t.await.expect("open task") {
                Ok(_) => opened += 1,
                Err(s) => assert!(is_clean_refusal(s.code()), "open: {s:?}"),
            }
        }
        assert_eq!(opened, 1, "one challenge opened more than one session");
        let (sessions,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sessions WHERE challenge_id = $1")
            .bind(&challenge_id)
            .fetch_one(&db)
            .await
            .expect("count");
        assert_eq!(sessions, 1);

        // Session cap at the boundary: 200 payments of 10 against a cap of 1,000.
        let (capped, capped_token) = open_session(&cl, 2, &wallet, &account, 1_000).await;
        let (ok, refused) = race_payments(&market, &capped_token, 200, 10, "USDC", "cap").await;
        eprintln!("session cap: {} signed, refused {refused:?}", ok.len());
        assert_eq!(ok.len(), 100, "a cap of 1,000 in payments of 10 signs exactly 100");
        let (remaining,): (String,) = sqlx::query_as("SELECT remaining FROM sessions WHERE id = $1")
            .bind(&capped)
            .fetch_one(&db)
            .await
            .expect("remaining");
        assert_eq!(remaining, "0");
        // Each replica counts the refusals it answered; together, every one.
        let mut cap_refusals = 0.0;
        for r in &cl.replicas {
            let scrape = https::get_metrics(r.metrics).await;
            cap_refusals += https::sample(&scrape, "keyward_session_refusals_total{reason=\"cap_exhausted\"}");
        }
        assert_eq!(cap_refusals, 100.0, "the replicas' cap-refusal counters do not add up");

        // Daily cap (EUR, 1,000 a day per account) with a session cap far above it.
        let (_, wide_token) = open_session(&cl, 0, &wallet, &account, 1_000_000).await;
        let (ok, refused) = race_payments(&market, &wide_token, 200, 10, "EUR", "day").await;
        eprintln!("daily cap: {} signed, refused {refused:?}", ok.len());
        assert_eq!(
            ok.len(),
            100,
            "a daily cap of 1,000 in payments of 10 signs exactly 100"
        );

        // One request id on every replica at once: one spend, one signature.
        let (same, same_token) = open_session(&cl, 1, &wallet, &account, 1_000_000).await;
        let start = Arc::new(tokio::sync::Barrier::new(market.len()));
        let tasks: Vec<_> = market
            .iter()
            .map(|ch| {
                let (ch, token, start) = (ch.clone(), same_token.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    pay(&ch, &token, 42, "USDC", "same-request").await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("task").expect("an idempotent retry is answered"));
        }
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "one request id got different answers"
        );
        let (spends, total): (i64, Option<String>) =
            sqlx::query_as("SELECT COUNT(*), MIN(amount) FROM spends WHERE session_id = $1")
                .bind(&same)
                .fetch_one(&db)
                .await
                .expect("spends");
        assert_eq!((spends, total.as_deref()), (1, Some("42")));

        // A rate bucket of 30 (no refill to speak of) over 90 requests.
        let admin = cl.channels("admin", 3).await;
        let start = Arc::new(tokio::sync::Barrier::new(90));
        let tasks: Vec<_> = (0..90)
            .map(|i| {
                let mut c = SigningServiceClient::new(admin[i % admin.len()].clone());
                let (account, start) = (account.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    c.sign_typed_data(SignTypedDataRequest {
                        account_id: account,
                        typed_data_json: common::MAIL.into(),
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        let mut signed = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => signed += 1,
                Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
            }
        }
        assert_eq!(signed, 30, "a bucket of 30 let another number through");
        db.close().await;
    });
    let (ok, report) = cl.audit_verify();
    assert!(ok, "the audit chain of three replicas does not verify: {report}");
    eprintln!("audit verify: {}", report.trim());
}

/// (kid, state) of every issuer key, as replica `i` lists them.
async fn issuer_keys(cl: &Cluster, i: usize) -> Vec<(String, String, String)> {
    JwksServiceClient::new(cl.channel(i, "admin").await)
        .list_issuer_keys(ListIssuerKeysRequest {})
        .await
        .expect("list issuer keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.kid, k.alg, k.state))
        .collect()
}

/// The kid in a compact JWS's protected header.
fn jws_kid(compact: &str) -> String {
    use base64::Engine as _;
    let header = compact.split('.').next().expect("header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64url header");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON header");
    v["kid"].as_str().expect("kid").to_string()
}

/// One rotation at a time across replicas: the same rotation asked of every
/// replica at once promotes once; every replica then serves the new JWKS
/// over HTTPS within its cache window and signs receipts with the new key,
/// although another replica made it.
#[test]
fn one_issuer_rotation_at_a_time_and_every_replica_serves_it() {
    let extra = "[jwks]\nmax_age_seconds = 2\ntick_seconds = 1\n";
    let Some(cl) = Cluster::start(3, extra, "") else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let wallet = Wallet::new(0x52);
        let account = create_account(&cl, &wallet, "rotation").await;
        // Next keys: a rotation request publishes them when there are none
        // (and is told to wait), unless a replica's scheduler did already.
        let mut jwks = JwksServiceClient::new(cl.channel(0, "admin").await);
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = loop {
            let next: Vec<String> = issuer_keys(&cl, 0)
                .await
                .into_iter()
                .filter(|k| k.2 == "next")
                .map(|k| k.0)
                .collect();
            if next.len() == 2 {
                break next;
            }
            assert!(next.len() < 2, "more than one next key per algorithm: {next:?}");
            match jwks
                .rotate_issuer_key(RotateIssuerKeyRequest { alg: String::new() })
                .await
            {
                Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::Aborted) => {}
                other => panic!("a rotation with no next keys: {other:?}"),
            }
            assert!(Instant::now() < deadline, "no next keys published");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Pre-published on every replica's JWKS within the cache window.
        for (i, r) in cl.replicas.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(4);
            loop {
                let jwks = https::get_jwks(r.https, &cl.pki.ca_cert).await;
                if next.iter().all(|k| jwks.contains(k.as_str())) {
                    break;
                }
                assert!(Instant::now() < deadline, "replica {i} does not publish the next keys");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Nine rotations at once, three per replica: one promotes.
        let admin = cl.channels("admin", 3).await;
        let start = Arc::new(tokio::sync::Barrier::new(admin.len()));
        let tasks: Vec<_> = admin
            .iter()
            .map(|ch| {
                let (mut c, start) = (JwksServiceClient::new(ch.clone()), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    c.rotate_issuer_key(RotateIssuerKeyRequest { alg: String::new() }).await
                })
            })
            .collect();
        let mut rotated = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(r) => rotated.push(r.into_inner()),
                // Too early (the winner published a fresh next key), or
                // raced with the winner's transaction: nothing changed.
                Err(s) => assert!(matches!(s.code(), Code::FailedPrecondition | Code::Aborted), "{s:?}"),
            }
        }
        assert_eq!(
            rotated.len(),
            1,
            "concurrent rotations promoted {} times",
            rotated.len()
        );
        let active: Vec<String> = rotated[0].rotations.iter().map(|r| r.activated_kid.clone()).collect();
        let mut sorted = active.clone();
        sorted.sort();
        let mut expected = next.clone();
        expected.sort();
        assert_eq!(sorted, expected, "the pre-published keys are the ones promoted");
        for i in 0..3 {
            let keys = issuer_keys(&cl, i).await;
            let actives: Vec<&(String, String, String)> = keys.iter().filter(|k| k.2 == "active").collect();
            assert_eq!(actives.len(), 2, "replica {i}: one active key per algorithm: {keys:?}");
        }
        // Every replica signs with the new EdDSA or ES256 key within its
        // tick, and every receipt verifies against its replica's JWKS.
        let eddsa_new = rotated[0]
            .rotations
            .iter()
            .find(|r| r.alg == "EdDSA")
            .map(|r| r.activated_kid.clone());
        let es256_new = rotated[0]
            .rotations
            .iter()
            .find(|r| r.alg == "ES256")
            .map(|r| r.activated_kid.clone());
        for (i, r) in cl.replicas.iter().enumerate() {
            let mut c = SigningServiceClient::new(cl.channel(i, "admin").await);
            let deadline = Instant::now() + Duration::from_secs(4);
            let receipt = loop {
                let receipt = c
                    .sign_receipt(SignReceiptRequest {
                        account_id: account.clone(),
                        buyer: "did:example:buyer".into(),
                        amount: "40".into(),
                        currency: "USDC".into(),
                        manifest: MANIFEST.into(),
                        license_id: "lic-7".into(),
                        session_token: String::new(),
                        payment_signature_ref: String::new(),
                        request_id: format!("receipt-{i}-{}", Instant::now().elapsed().as_nanos()),
                        payment_request_id: String::new(),
                    })
                    .await
                    .expect("receipt")
                    .into_inner()
                    .receipt;
                let kid = jws_kid(&receipt);
                if Some(&kid) == eddsa_new.as_ref() || Some(&kid) == es256_new.as_ref() {
                    break receipt;
                }
                assert!(Instant::now() < deadline, "replica {i} still signs with {kid}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let jwks = https::get_jwks(r.https, &cl.pki.ca_cert).await;
            let path = cl.home().join(format!("jwks-{i}.json"));
            std::fs::write(&path, &jwks).expect("jwks file");
            let out = cl
                .keyward()
                .args(["verify", "--jwks"])
                .arg(&path)
                .arg(&receipt)
                .output()
                .expect("keyward verify");
            assert!(
                out.status.success(),
                "replica {i}'s receipt does not verify against its JWKS: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    let (ok, report) = cl.audit_verify();
    assert!(ok, "{report}");
}

/// Payments a client was answered: request id -> (amount, signature).
pub type Received = Arc<Mutex<BTreeMap<String, (u128, Vec<u8>)>>>;

/// `keyward bench --replicas`, the load generator over a cluster of its
/// own, in a short smoke run: both phases sign, without errors, and report
/// the database transactions each signature cost.
#[test]
fn bench_over_replicas_smoke() {
    if keyward::store::testing::PgTestSchema::create().is_none() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["bench", "--replicas", "2", "--op", "payment", "--duration", "1"])
        .args(["--accounts", "4", "--concurrency", "8", "--connections", "2", "--json"])
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "warn")
        .output()
        .expect("keyward bench");
    assert!(
        out.status.success(),
        "keyward bench --replicas failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for phase in ["one_replica", "all_replicas"] {
        assert!(v[phase]["ok"].as_u64().unwrap_or(0) > 0, "{phase} signed nothing: {v}");
        assert_eq!(v[phase]["errors"].as_u64(), Some(0), "{phase}: {v}");
    }
    for key in ["db_transactions_per_signature_one", "db_transactions_per_signature_all"] {
        let tx = v[key].as_f64().unwrap_or(0.0);
        // A payment reserves and completes in the store: at least two
        // transactions each (PostgreSQL's own count).
        assert!(tx >= 2.0, "{key} = {tx}: {v}");
    }
    assert_eq!(v["replicas"].as_u64(), Some(2));
}

/// SIGTERM starts a drain (`server.drain_seconds`, 2 by default): the
/// replica at once reports NOT_SERVING and `/readyz` 503, and answers a new
/// request UNAVAILABLE (retry elsewhere), while a request it already runs
/// finishes; then it exits cleanly.
#[test]
fn a_stopping_replica_drains_before_it_closes() {
    let Some(mut cl) = Cluster::start(2, "", "") else {
        return;
    };
    let rt = runtime();
    let (account, slow, ch) = rt.block_on(async {
        let wallet = Wallet::new(0x53);
        let account = create_account(&cl, &wallet, "drain").await;
        let ch = cl.channel(0, "admin").await;
        // A request in progress when the signal comes: a long document.
        let big = {
            let mut v: serde_json::Value = serde_json::from_str(common::MAIL).expect("mail");
            v["message"]["contents"] = serde_json::Value::String("x".repeat(200_000));
            v.to_string()
        };
        let mut c = SigningServiceClient::new(ch.clone());
        let account2 = account.clone();
        let slow = tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                answers.push(
                    c.sign_typed_data(SignTypedDataRequest {
                        account_id: account2.clone(),
                        typed_data_json: big.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code()),
                );
            }
            answers
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        (account, slow, ch)
    });
    cl.kill(0, "-TERM").expect("SIGTERM");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        loop {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|s| s.code());
            if status == Ok(2) {
                break; // NOT_SERVING
            }
            assert!(Instant::now() < deadline, "health still {status:?} after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let readyz = https::get_status(cl.replicas[0].https, &cl.pki.ca_cert, "/readyz").await;
        assert!(readyz.starts_with("HTTP/1.1 503"), "/readyz while draining: {readyz}");
        let refused = SigningServiceClient::new(ch.clone())
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.clone(),
                typed_data_json: common::MAIL.into(),
                ..Default::default()
            })
            .await
            .expect_err("a new request while draining");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        // The other replica serves it.
        SigningServiceClient::new(cl.channel(1, "admin").await)
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.clone(),
                typed_data_json: common::MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("the other replica signs");
        let answers = slow.await.expect("slow task");
        assert!(
            answers.first() == Some(&Ok(())),
            "the request in progress at SIGTERM did not finish: {answers:?}"
        );
        for a in &answers {
            assert!(
                matches!(a, Ok(()) | Err(Code::Unavailable)),
                "a draining replica answered {a:?}"
            );
        }
    });
    assert!(
        cl.wait_exit(0).expect("wait"),
        "replica 0 did not exit cleanly: {}",
        cl.log_tail(0)
    );
}
