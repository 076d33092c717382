//! The policy decision point end to end: a real daemon, SoftHSM token, mTLS
//! and stores, with the default Cedar set (or one a test writes): denials name
//! policies, limits refuse and recover, the daily cap survives a restart, an
//! invalid set stops the start and an invalid reload keeps the old set, and
//! every RPC is decided.

mod common;

use std::sync::Arc;

use common::*;
use keyward::api::pb::account_service_client::AccountServiceClient;
use keyward::api::pb::audit_service_client::AuditServiceClient;
use keyward::api::pb::jwks_service_client::JwksServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, GetAccountJwksRequest, GetAccountRequest, GetJwksRequest,
    GetSessionRequest, ListIssuerKeysRequest, ListSessionsRequest, OpenSessionRequest, RevokeIssuerKeyRequest,
    RevokeSessionRequest, RotateIssuerKeyRequest, SignAttestationRequest, SignMessageRequest, SignPaymentRequest,
    SignReceiptRequest, SignTransactionRequest, SignTypedDataRequest, SignatureAlgorithm,
};
use keyward::clock::ManualClock;
use keyward::config::Custody;
use tonic::transport::Channel;
use tonic::Code;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const START: i64 = 1_800_000_000;

fn policies_dir(env: &Env) -> std::path::PathBuf {
    env.dir.path().join("policies")
}

fn write_limits(env: &Env, text: &str) {
    std::fs::write(policies_dir(env).join("limits.toml"), text).expect("limits.toml");
}

async fn create(d: &Daemon, env: &Env, profile: &str) -> Result<String, tonic::Status> {
    d.accounts(env, profile)
        .await
        .create_account(CreateAccountRequest {
            controller: Wallet::new(0x42).address().to_checksum(),
            label: "alice".into(),
            allow: vec![],
        })
        .await
        .map(|r| r.into_inner().account_id)
}

/// A session for the marketplace on `account`, opened through the wallet gateway.
async fn session(d: &Daemon, env: &Env, account: &str) -> (String, String) {
    let mut s = SessionServiceClient::new(d.channel(env, "wallet-gateway").await);
    let license = format!("license:manifest:{MANIFEST}");
    let c = s
        .create_session_challenge(CreateSessionChallengeRequest {
            account_id: account.into(),
            delegate: MARKETPLACE.into(),
            scopes: vec!["payments:0-100".into(), license, "attest:ds-1".into()],
            cap: "1000".into(),
            ttl_seconds: 1800,
        })
        .await
        .expect("challenge")
        .into_inner();
    let r = s
        .open_session(OpenSessionRequest {
            challenge_id: c.challenge_id,
            signature: Wallet::new(0x42).sign(&c.typed_data_json),
        })
        .await
        .expect("open")
        .into_inner();
    (r.session.expect("session").session_id, r.token)
}

async fn pay(d: &Daemon, env: &Env, token: &str, amount: &str) -> Result<String, tonic::Status> {
    d.signing(env, "marketplace")
        .await
        .sign_payment(SignPaymentRequest {
            session_token: token.into(),
            amount: amount.into(),
            currency: "USDC".into(),
            manifest: MANIFEST.into(),
            license_id: "lic-7".into(),
            payee: String::new(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().remaining)
}

#[test]
fn denials_name_the_deciding_policy_and_are_counted() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create(&d, &env, "admin").await.expect("admin creates");
        let sign = |profile: &'static str, data: Vec<u8>| {
            let (d, env, id) = (&d, &env, account.clone());
            async move {
                d.signing(env, profile)
                    .await
                    .sign_message(SignMessageRequest {
                        account_id: id,
                        alg: SignatureAlgorithm::Secp256k1 as i32,
                        data,
                    })
                    .await
            }
        };
        sign("admin", b"hello".to_vec()).await.expect("operator signs directly");
        let err = sign("admin", vec![7u8; 32]).await.expect_err("raw digest");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("forbid-raw-digest"), "{}", err.message());
        let err = sign("marketplace", b"hello".to_vec())
            .await
            .expect_err("outside a session");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("deny by default"), "{}", err.message());
        let err = create(&d, &env, "marketplace").await.expect_err("not an admin");
        assert_eq!(err.code(), Code::PermissionDenied);
        let metrics = d.state.metrics.render();
        for line in [
            r#"keyward_policy_decisions_total{action="SignMessage",outcome="allow",policy="operators-sign-directly"} 1"#,
            r#"keyward_policy_decisions_total{action="SignMessage",outcome="deny",policy="forbid-raw-digest"} 1"#,
            r#"keyward_policy_decisions_total{action="SignMessage",outcome="deny",policy="default-deny"} 1"#,
            r#"keyward_policy_decisions_total{action="CreateAccount",outcome="deny",policy="default-deny"} 1"#,
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
        d.stop().await;
    });
}

#[test]
fn rate_limit_refuses_an_empty_bucket_and_recovers_after_refill() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    write_limits(
        &env,
        r#"
[[rate]]
name = "admin-creations"
per = "identity"
actions = ["CreateAccount"]
capacity = 2
refill_per_second = 0.5
"#,
    );
    block_on(async {
        env.init().await;
        let clock = Arc::new(ManualClock::new(START));
        let d = env.start_with_clock(clock.clone()).await;
        create(&d, &env, "admin").await.expect("first");
        create(&d, &env, "admin").await.expect("second");
        let err = create(&d, &env, "admin").await.expect_err("bucket empty");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("admin-creations"), "{}", err.message());
        // A refused request creates nothing.
        assert_eq!(d.state.keys.store().count_accounts().await.expect("count"), 2);
        clock.advance(1);
        let err = create(&d, &env, "admin").await.expect_err("half a token");
        assert_eq!(err.code(), Code::ResourceExhausted);
        clock.advance(1);
        create(&d, &env, "admin").await.expect("refilled");
        assert!(d.state.metrics.render().contains(
            r#"keyward_policy_decisions_total{action="CreateAccount",outcome="deny",policy="limit:admin-creations"} 2"#
        ));
        d.stop().await;
    });
}

#[test]
fn open_session_limit_is_checked_where_the_session_opens() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    write_limits(&env, "[sessions]\nmax_open_per_account = 1\n");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create(&d, &env, "admin").await.expect("account");
        let mut s = SessionServiceClient::new(d.channel(&env, "wallet-gateway").await);
        // Two challenges while none is open: both are handed out.
        let mut challenges = Vec::new();
        for _ in 0..2 {
            let c = s
                .create_session_challenge(CreateSessionChallengeRequest {
                    account_id: account.clone(),
                    delegate: MARKETPLACE.into(),
                    scopes: vec!["payments:0-100".into()],
                    cap: "1000".into(),
                    ttl_seconds: 1800,
                })
                .await
                .expect("challenge")
                .into_inner();
            challenges.push(c);
        }
        let open = |c: &keyward::api::pb::SessionChallenge| OpenSessionRequest {
            challenge_id: c.challenge_id.clone(),
            signature: Wallet::new(0x42).sign(&c.typed_data_json),
        };
        s.open_session(open(&challenges[0])).await.expect("the first opens");
        let err = s.open_session(open(&challenges[1])).await.expect_err("the limit");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(
            err.message().contains("sessions.max_open_per_account"),
            "{}",
            err.message()
        );
        // Refused where it opens: the challenge was not consumed.
        let (_, consumed) = d
            .state
            .keys
            .store()
            .get_challenge(&challenges[1].challenge_id)
            .await
            .expect("store")
            .expect("challenge");
        assert_eq!(consumed, None);
        assert!(d.state.metrics.render().contains(
            r#"keyward_policy_decisions_total{action="OpenSession",outcome="deny",policy="limit:sessions.max_open_per_account"} 1"#
        ));
        d.stop().await;
    });
}

fn daily_cap_survives_a_restart(store: StoreKind) {
    let Some(env) = Env::new(Custody::Host, store) else {
        return;
    };
    write_limits(
        &env,
        r#"
[[daily_spend]]
name = "usdc-day"
currency = "USDC"
cap = "100"
"#,
    );
    block_on(async {
        env.init().await;
        let clock = Arc::new(ManualClock::new(START));
        let d = env.start_with_clock(clock.clone()).await;
        let account = create(&d, &env, "admin").await.expect("account");
        let (_, token) = session(&d, &env, &account).await;
        assert_eq!(pay(&d, &env, &token, "60").await.expect("60"), "940");
        d.stop().await;

        let d = env.start_with_clock(clock.clone()).await;
        let err = pay(&d, &env, &token, "50").await.expect_err("over the daily cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains("usdc-day"), "{}", err.message());
        // The refused payment spent nothing of the session either.
        assert_eq!(pay(&d, &env, &token, "40").await.expect("40 fits"), "900");
        assert_eq!(
            pay(&d, &env, &token, "1").await.expect_err("cap reached").code(),
            Code::ResourceExhausted
        );
        // The next UTC day starts from zero (with a new session: the first one expired).
        clock.advance(86_400);
        let (_, token) = session(&d, &env, &account).await;
        assert_eq!(pay(&d, &env, &token, "100").await.expect("a new day"), "900");
        // Pruning keeps today's and yesterday's totals; two days on, both go.
        let policy = d.state.policy.clone();
        assert_eq!(policy.prune_counters().await.expect("prune"), 0);
        clock.advance(2 * 86_400);
        assert_eq!(policy.prune_counters().await.expect("prune"), 2);
        assert_eq!(policy.prune_counters().await.expect("prune"), 0);
        d.stop().await;
    });
}

#[test]
fn daily_cap_survives_a_restart_sqlite() {
    daily_cap_survives_a_restart(StoreKind::Sqlite);
}

#[test]
fn daily_cap_survives_a_restart_postgres() {
    daily_cap_survives_a_restart(StoreKind::Postgres);
}

#[test]
fn the_daemon_refuses_to_start_on_an_invalid_set() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    std::fs::write(
        policies_dir(&env).join("broken.cedar"),
        "@id(\"typo\")\npermit (principal, action, resource) when { resource.lable == \"x\" };\n",
    )
    .expect("write");
    block_on(async {
        env.init().await;
        let err = keyward::server::start(&env.config()).await.expect_err("invalid set");
        let msg = err.to_string();
        assert!(matches!(err, keyward::server::ServeError::Policy(_)), "{msg}");
        assert!(msg.contains("typo") && msg.contains("broken.cedar"), "{msg}");
    });
}

#[test]
fn an_invalid_reload_keeps_the_old_set_and_a_valid_one_replaces_it() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let dir = policies_dir(&env);
        std::fs::write(
            dir.join("extra.cedar"),
            "@id(\"half\") forbid (principal, action, resource) when {",
        )
        .expect("write");
        let err = d.state.policy.reload().expect_err("does not parse");
        assert!(err.to_string().contains("extra.cedar"), "{err}");
        create(&d, &env, "admin").await.expect("the old set still decides");
        std::fs::write(
            dir.join("extra.cedar"),
            "@id(\"freeze-accounts\") forbid (principal, action == Keyward::Action::\"CreateAccount\", resource);",
        )
        .expect("write");
        d.state.policy.reload().expect("valid set");
        let err = create(&d, &env, "admin").await.expect_err("new forbid");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("freeze-accounts"), "{}", err.message());
        d.stop().await;
    });
}

/// Calls every RPC of the proto once and checks the decision point counted a
/// decision for each: no request path bypasses it.
#[test]
fn every_rpc_is_decided() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create(&d, &env, "admin").await.expect("account");
        let (session_id, token) = session(&d, &env, &account).await;
        let ch = |p: &'static str| {
            let (d, env) = (&d, &env);
            async move { d.channel(env, p).await }
        };
        let mut accounts = AccountServiceClient::new(ch("admin").await);
        let _ = accounts
            .get_account(GetAccountRequest {
                account_id: account.clone(),
            })
            .await;
        let _ = accounts
            .get_account_jwks(GetAccountJwksRequest {
                account_id: account.clone(),
            })
            .await;
        let _ = accounts
            .list_accounts(keyward::api::pb::ListAccountsRequest::default())
            .await;
        let _ = accounts
            .update_account(keyward::api::pb::UpdateAccountRequest {
                account_id: account.clone(),
                label: Some("x".into()),
                ..Default::default()
            })
            .await;
        let _ = accounts
            .freeze_account(keyward::api::pb::FreezeAccountRequest {
                account_id: account.clone(),
                reason: "drill".into(),
            })
            .await;
        let _ = accounts
            .unfreeze_account(keyward::api::pb::UnfreezeAccountRequest {
                account_id: account.clone(),
            })
            .await;
        let mut signer = d.signing(&env, "admin").await;
        let _ = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await;
        let _ = signer
            .sign_message(SignMessageRequest {
                account_id: account.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: b"x".to_vec(),
            })
            .await;
        let _ = pay(&d, &env, &token, "1").await;
        let _ = signer
            .sign_receipt(SignReceiptRequest {
                account_id: account.clone(),
                buyer: "did:pkh:eip155:1:0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826".into(),
                amount: "1".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                ..Default::default()
            })
            .await;
        let _ = signer
            .sign_attestation(SignAttestationRequest {
                account_id: account.clone(),
                dataset_id: "ds-1".into(),
                contribution_hash: format!("sha256:{MANIFEST}"),
                license: "CC-BY-4.0".into(),
                purpose: "training".into(),
                ..Default::default()
            })
            .await;
        let _ = signer
            .sign_transaction(SignTransactionRequest {
                account_id: account.clone(),
                chain_id: 1,
                gas_limit: 21_000,
                max_fee_per_gas: "1".into(),
                max_priority_fee_per_gas: "1".into(),
                to: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".into(),
                ..Default::default()
            })
            .await;
        let mut sessions: SessionServiceClient<Channel> = SessionServiceClient::new(ch("admin").await);
        let _ = sessions
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await;
        let _ = sessions
            .list_sessions(ListSessionsRequest {
                account_id: account.clone(),
                ..Default::default()
            })
            .await;
        let _ = sessions
            .revoke_session(RevokeSessionRequest {
                session_id: session_id.clone(),
                controller_signature: vec![],
            })
            .await;
        let mut jwks = JwksServiceClient::new(ch("marketplace").await);
        let _ = jwks.get_jwks(GetJwksRequest {}).await;
        let _ = jwks.list_issuer_keys(ListIssuerKeysRequest {}).await;
        let _ = jwks
            .rotate_issuer_key(RotateIssuerKeyRequest { alg: "EdDSA".into() })
            .await;
        let _ = jwks.revoke_issuer_key(RevokeIssuerKeyRequest { kid: "k".into() }).await;
        let mut audit = AuditServiceClient::new(ch("marketplace").await);
        let _ = audit
            .stream_events(keyward::api::pb::StreamEventsRequest { since_seq: 0 })
            .await;
        let _ = accounts
            .change_controller(keyward::api::pb::ChangeControllerRequest {
                account_id: account.clone(),
                new_controller: "0x3149fb64BDeE81206161dfAEE77C6B69692357d2".into(),
                ..Default::default()
            })
            .await;
        let _ = accounts
            .cancel_controller_change(keyward::api::pb::CancelControllerChangeRequest {
                account_id: account.clone(),
                ..Default::default()
            })
            .await;
        let _ = accounts
            .rotate_account_keys(keyward::api::pb::RotateAccountKeysRequest {
                account_id: account.clone(),
                reason: "drill".into(),
            })
            .await;
        let _ = accounts
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await;
        let _ = accounts
            .import_account(keyward::api::pb::ImportAccountRequest {
                job_id: "00000000-0000-4000-8000-000000000000".into(),
                alg: "ed25519".into(),
                wrapped_key: vec![1; 384],
                controller: "0x3149fb64BDeE81206161dfAEE77C6B69692357d2".into(),
                ..Default::default()
            })
            .await;
        // Last: the account is gone after this.
        let _ = accounts
            .delete_account(keyward::api::pb::DeleteAccountRequest {
                account_id: account.clone(),
                reason: "drill".into(),
            })
            .await;
        let metrics = d.state.metrics.render();
        let mut proto = String::new();
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/keyward/v1")).expect("proto dir") {
            proto.push_str(&std::fs::read_to_string(entry.expect("entry").path()).expect("proto"));
        }
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        assert_eq!(rpcs.len(), 29, "{rpcs:?}");
        for rpc in rpcs {
            let action = keyward::policy::Action::for_rpc(rpc).unwrap_or_else(|| panic!("{rpc} has no action"));
            assert!(
                metrics.contains(&format!("keyward_policy_decisions_total{{action=\"{}\"", action.name())),
                "no decision counted for {rpc}:\n{metrics}"
            );
        }
        d.stop().await;
    });
}

fn keyward_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.env_remove("SOFTHSM2_CONF").env("RUST_LOG", "warn");
    c
}

/// `keyward policy check|test|explain` on the shipped folder, and on a broken one.
#[test]
fn policy_cli_checks_tests_and_explains() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("policies");
    let run = |args: &[&str]| {
        let out = keyward_cmd().args(args).output().expect("run keyward");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let d = dir.to_str().expect("utf-8");
    let (ok, out, err) = run(&["policy", "check", "--dir", d]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("ok: "), "{out}");
    let table = dir.join("tests/default.toml");
    let t = table.to_str().expect("utf-8");
    let (ok, out, err) = run(&["policy", "test", t, "--dir", d]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
    let (ok, out, _) = run(&["policy", "explain", "--request", t, "--dir", d]);
    assert!(ok);
    assert!(
        out.contains("decision  deny\npolicy    forbid-raw-digest: no blind signing"),
        "{out}"
    );
    // A broken copy: check names the file and fails; a wrong expectation fails the test run.
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("policies");
    assert!(keyward::policy::install_defaults(&copy).expect("install"));
    let c = copy.to_str().expect("utf-8");
    let wrong = tmp.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        "[[case]]\nname = \"marketplace creates\"\nprincipal = \"spiffe://example.org/marketplace\"\naction = \"CreateAccount\"\nexpect = \"allow\"\n",
    )
    .expect("write");
    let (ok, out, _) = run(&["policy", "test", wrong.to_str().expect("utf-8"), "--dir", c]);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL") && out.contains("0 passed, 1 failed"), "{out}");
    std::fs::write(
        copy.join("bad.cedar"),
        "@id(\"bad\") permit (principal, action, resource) when { context.nope };",
    )
    .expect("write");
    let (ok, _, err) = run(&["policy", "check", "--dir", c]);
    assert!(!ok);
    assert!(err.contains("bad"), "{err}");
}

/// Waits (60 s at most) for a line containing `needle` (`ready`: that exact line).
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == needle || (needle != "ready" && l.contains(needle)) => return,
            Ok(_) => {}
            Err(_) => panic!("no line containing {needle:?}"),
        }
    }
}

/// `keyward dev` reloads its policies on a file change and on SIGHUP, and keeps
/// the current set when the new one is invalid.
#[test]
fn dev_daemon_reloads_on_file_change_and_sighup() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("home");
    // Starts `keyward dev`; its stdout and stderr lines arrive on the receiver.
    let start = || {
        let mut child = keyward_cmd()
            .env("RUST_LOG", "info")
            .arg("--home")
            .arg(&home)
            .args(["dev", "--listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn keyward dev");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        wait_line(&rx, "ready");
        (child, rx)
    };
    let signal = |child: &std::process::Child, sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    let create = || {
        keyward_cmd()
            .arg("--home")
            .arg(&home)
            .args([
                "account",
                "create",
                "--controller",
                "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826",
                "--json",
            ])
            .output()
            .expect("run")
    };
    let until = |want_ok: bool, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = create();
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if out.status.success() == want_ok && err.contains(needle) {
                return;
            }
            assert!(Instant::now() < deadline, "still {:?}: {err}", out.status);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let policies = home.join("policies");
    let freeze = "@id(\"freeze\") forbid (principal, action == Keyward::Action::\"CreateAccount\", resource);\n";

    let (mut child, _logs) = start();
    assert!(
        policies.join("schema.cedarschema").exists(),
        "dev installed the default set"
    );
    let out = create();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A file change is picked up by the watcher.
    std::fs::write(policies.join("freeze.cedar"), freeze).expect("write");
    until(false, "freeze");
    signal(&child, "-TERM");
    child.wait().expect("wait");

    // Without the watcher, SIGHUP reloads; an invalid set keeps the current one.
    let config = home.join("keyward.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("dir = \"policies\"", "dir = \"policies\"\nwatch_seconds = 0"),
    )
    .expect("write");
    let (mut child, logs) = start();
    until(false, "freeze");
    std::fs::write(policies.join("freeze.cedar"), "@id(\"freeze\") forbid (principal,").expect("write");
    signal(&child, "-HUP");
    wait_line(&logs, "policy reload refused");
    until(false, "freeze");
    std::fs::remove_file(policies.join("freeze.cedar")).expect("remove");
    signal(&child, "-HUP");
    wait_line(&logs, "policy set reloaded");
    assert!(create().status.success(), "the new set allows it again");
    signal(&child, "-TERM");
    child.wait().expect("wait");
}
