//! The audit log end to end: a real daemon, real SoftHSM token, real mTLS,
//! real stores. Every RPC of every service (enumerated from the .proto
//! files) yields exactly one event per request, allowed and refused; the
//! `keyward audit` commands verify, export, prove and name tampered rows.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;
use keyward::api::pb::audit_service_client::AuditServiceClient;
use keyward::api::pb::jwks_service_client::JwksServiceClient;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::*;
use keyward::audit::Event;
use keyward::config::Custody;
use sha2::{Digest as _, Sha256};

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";

/// Every `rpc` name in proto/keyward/v1/*.proto.
fn proto_rpcs() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/keyward/v1");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("proto dir") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("proto");
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ") {
                let name = rest.split('(').next().expect("rpc name").trim();
                out.insert(name.to_string());
            }
        }
    }
    assert!(out.len() >= 17, "{out:?}");
    out
}

/// Appends `[audit]` settings to the test config.
fn audit_config(env: &Env, text: &str) {
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str("[audit]\n");
    config.push_str(text);
    std::fs::write(&env.config_path, config).expect("config");
}

struct Checker<'a> {
    d: &'a Daemon,
    seen: u64,
    exercised: BTreeSet<String>,
    /// The daemon's own events (identity `keyward`: issuer keys it
    /// created), since the last request event.
    daemon: Vec<Event>,
}

impl Checker<'_> {
    /// Exactly one new request event, for `action`, with this decision
    /// class; the daemon's own events since the last one go to `daemon`.
    async fn one(&mut self, action: &str, allowed: bool) -> Event {
        let events = self
            .d
            .state
            .keys
            .store()
            .audit()
            .events_after(self.seen, 100)
            .await
            .expect("events");
        let last = events.last().map(|e| e.seq).unwrap_or(self.seen);
        let (daemon, requests): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|e| e.body.identity == keyward::audit::event::DAEMON_IDENTITY);
        assert_eq!(requests.len(), 1, "{action}: {requests:#?}");
        let e = requests.into_iter().next().expect("one");
        assert!(e.seq > self.seen);
        self.daemon = daemon;
        assert_eq!(e.body.action, action);
        if allowed {
            assert_eq!(
                (e.body.decision.as_str(), e.body.code.as_str()),
                ("allow", "OK"),
                "{action}"
            );
        } else {
            assert_ne!(e.body.decision, "allow", "{action}");
            assert_ne!(e.body.code, "OK", "{action}");
        }
        self.seen = last;
        self.exercised.insert(action.to_string());
        e
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

async fn enumeration(env: Env) {
    env.init().await;
    let clock = std::sync::Arc::new(keyward::clock::ManualClock::new(keyward::clock::unix_now()));
    let d = env.start_with_clock(clock.clone()).await;
    let wallet = Wallet::new(0x42);
    let mut c = Checker {
        d: &d,
        seen: 0,
        exercised: BTreeSet::new(),
        daemon: Vec::new(),
    };
    let mut accounts = d.accounts(&env, "admin").await;
    // AccountService
    let a = accounts
        .create_account(CreateAccountRequest {
            controller: wallet.address().to_checksum(),
            label: "a".into(),
            allow: vec![MARKETPLACE.into()],
        })
        .await
        .expect("create")
        .into_inner();
    let e = c.one("CreateAccount", true).await;
    assert_eq!(e.body.account, a.account_id);
    assert_eq!(e.body.identity, "spiffe://example.org/admin");
    let b = accounts
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: "b".into(),
            allow: vec![],
        })
        .await
        .expect("create")
        .into_inner();
    c.one("CreateAccount", true).await;
    let mut market_accounts = d.accounts(&env, "marketplace").await;
    let denied = market_accounts
        .create_account(CreateAccountRequest {
            controller: CONTROLLER.into(),
            label: String::new(),
            allow: vec![],
        })
        .await
        .expect_err("marketplace may not create");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let e = c.one("CreateAccount", false).await;
    assert_eq!(e.body.decision, "deny");
    assert_eq!(e.body.policies, vec!["default-deny".to_string()]);

    accounts
        .get_account(GetAccountRequest {
            account_id: a.account_id.clone(),
        })
        .await
        .expect("get");
    c.one("GetAccount", true).await;
    let mut gw_accounts = d.accounts(&env, "wallet-gateway").await;
    gw_accounts
        .get_account(GetAccountRequest {
            account_id: a.account_id.clone(),
        })
        .await
        .expect_err("gateway not listed");
    c.one("GetAccount", false).await;
    accounts
        .get_account_jwks(GetAccountJwksRequest {
            account_id: a.account_id.clone(),
        })
        .await
        .expect("jwks");
    c.one("GetAccountJwks", true).await;
    accounts
        .get_account_jwks(GetAccountJwksRequest {
            account_id: "not-a-uuid".into(),
        })
        .await
        .expect_err("bad id");
    let e = c.one("GetAccountJwks", false).await;
    assert_eq!(
        (e.body.decision.as_str(), e.body.code.as_str()),
        ("error", "INVALID_ARGUMENT")
    );

    // The account lifecycle: each change's event is appended in its transaction.
    accounts
        .list_accounts(keyward::api::pb::ListAccountsRequest::default())
        .await
        .expect("list");
    c.one("ListAccounts", true).await;
    accounts
        .update_account(keyward::api::pb::UpdateAccountRequest {
            account_id: b.account_id.clone(),
            label: Some("b2".into()),
            ..Default::default()
        })
        .await
        .expect("update");
    assert_eq!(c.one("UpdateAccount", true).await.body.account, b.account_id);
    accounts
        .freeze_account(keyward::api::pb::FreezeAccountRequest {
            account_id: b.account_id.clone(),
            reason: "drill".into(),
        })
        .await
        .expect("freeze");
    let e = c.one("FreezeAccount", true).await;
    assert_eq!(
        e.body.digest,
        hex::encode(sha2::Sha256::digest(b"drill")),
        "the reason, by hash"
    );
    accounts
        .unfreeze_account(keyward::api::pb::UnfreezeAccountRequest {
            account_id: b.account_id.clone(),
        })
        .await
        .expect("unfreeze");
    c.one("UnfreezeAccount", true).await;
    let change = accounts
        .change_controller(keyward::api::pb::ChangeControllerRequest {
            account_id: b.account_id.clone(),
            new_controller: wallet.address().to_checksum(),
            ..Default::default()
        })
        .await
        .expect("operator's controller change")
        .into_inner();
    let e = c.one("ChangeController", true).await;
    assert_eq!(e.body.signature_ref, format!("controller-change:{}", change.change_id));
    accounts
        .cancel_controller_change(keyward::api::pb::CancelControllerChangeRequest {
            account_id: b.account_id.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    c.one("CancelControllerChange", true).await;
    let job = accounts
        .create_import_job(keyward::api::pb::CreateImportJobRequest {})
        .await
        .expect("import job")
        .into_inner();
    let e = c.one("CreateImportJob", true).await;
    assert_eq!(e.body.signature_ref, format!("import-job:{}", job.job_id));
    let e = accounts
        .import_account(keyward::api::pb::ImportAccountRequest {
            job_id: job.job_id.clone(),
            alg: "ed25519".into(),
            wrapped_key: vec![1; 384],
            controller: CONTROLLER.into(),
            ..Default::default()
        })
        .await
        .expect_err("not a ciphertext of the job");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c.one("ImportAccount", false).await;
    assert_eq!(e.body.signature_ref, format!("import-job:{}", job.job_id));
    let rotated = accounts
        .rotate_account_keys(keyward::api::pb::RotateAccountKeysRequest {
            account_id: b.account_id.clone(),
            reason: "drill".into(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.key_version, 2);
    c.one("RotateAccountKeys", true).await;
    let e = accounts
        .delete_account(keyward::api::pb::DeleteAccountRequest {
            account_id: b.account_id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("no reason");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    c.one("DeleteAccount", false).await;

    // SigningService without sessions
    // The operator (admin) signs directly; the marketplace only inside a session.
    let mut op = d.signing(&env, "admin").await;
    let mut market = d.signing(&env, "marketplace").await;
    let mut gw = d.signing(&env, "wallet-gateway").await;
    let typed = op
        .sign_typed_data(SignTypedDataRequest {
            account_id: a.account_id.clone(),
            typed_data_json: MAIL.into(),
            session_token: String::new(),
            request_id: String::new(),
        })
        .await
        .expect("typed")
        .into_inner();
    let e = c.one("SignTypedData", true).await;
    assert_eq!(e.body.digest, hex::encode(&typed.digest));
    assert_eq!(e.body.signature_ref, format!("sig:{}", sha256_hex(&typed.signature)));
    assert_eq!(e.body.account, a.account_id);
    gw.sign_typed_data(SignTypedDataRequest {
        account_id: a.account_id.clone(),
        typed_data_json: MAIL.into(),
        session_token: String::new(),
        request_id: String::new(),
    })
    .await
    .expect_err("gateway may not sign");
    let e = c.one("SignTypedData", false).await;
    assert_eq!(e.body.decision, "deny");
    assert_eq!(e.body.signature_ref, "");
    let msg = op
        .sign_message(SignMessageRequest {
            account_id: a.account_id.clone(),
            alg: SignatureAlgorithm::Ed25519 as i32,
            data: b"hello".to_vec(),
        })
        .await
        .expect("msg")
        .into_inner();
    let e = c.one("SignMessage", true).await;
    assert_eq!(e.body.digest, sha256_hex(b"hello"));
    assert_eq!(e.body.signature_ref, format!("sig:{}", sha256_hex(&msg.signature)));
    market
        .sign_message(SignMessageRequest {
            account_id: b.account_id.clone(),
            alg: SignatureAlgorithm::Ed25519 as i32,
            data: b"hello".to_vec(),
        })
        .await
        .expect_err("not in a session");
    c.one("SignMessage", false).await;

    // Receipts: the event is appended in the recording transaction and its
    // seq is the receipt's audit_seq.
    let receipt = op
        .sign_receipt(SignReceiptRequest {
            account_id: a.account_id.clone(),
            buyer: "did:example:buyer".into(),
            amount: "5".into(),
            currency: "USDC".into(),
            manifest: MANIFEST.into(),
            license_id: "lic".into(),
            session_token: String::new(),
            payment_signature_ref: String::new(),
            request_id: "rcpt-1".into(),
            payment_request_id: String::new(),
        })
        .await
        .expect("receipt")
        .into_inner();
    let e = c.one("SignReceipt", true).await;
    assert_eq!(receipt.audit_seq, e.seq);
    assert_eq!(e.body.signature_ref, format!("receipt:{}", receipt.receipt_id));
    assert_eq!(e.body.request_id, "rcpt-1");
    market
        .sign_receipt(SignReceiptRequest {
            account_id: b.account_id.clone(),
            buyer: "did:example:buyer".into(),
            amount: "5".into(),
            currency: "USDC".into(),
            manifest: MANIFEST.into(),
            license_id: "lic".into(),
            session_token: String::new(),
            payment_signature_ref: String::new(),
            request_id: "rcpt-2".into(),
            payment_request_id: String::new(),
        })
        .await
        .expect_err("not in a session");
    c.one("SignReceipt", false).await;
    let attestation = |account_id: &str| SignAttestationRequest {
        account_id: account_id.into(),
        alg: "EdDSA".into(),
        dataset_id: "ds-1".into(),
        contribution_hash: format!("sha256:{MANIFEST}"),
        license: "CC-BY-4.0".into(),
        purpose: "training".into(),
        session_token: String::new(),
    };
    op.sign_attestation(attestation(&a.account_id)).await.expect("attest");
    c.one("SignAttestation", true).await;
    market
        .sign_attestation(attestation(&b.account_id))
        .await
        .expect_err("not in a session");
    c.one("SignAttestation", false).await;
    let transaction = |account_id: &str| SignTransactionRequest {
        account_id: account_id.into(),
        chain_id: 1,
        gas_limit: 21_000,
        max_fee_per_gas: "30000000000".into(),
        max_priority_fee_per_gas: "1000000000".into(),
        to: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".into(),
        value: "1".into(),
        ..Default::default()
    };
    let signed = op
        .sign_transaction(transaction(&a.account_id))
        .await
        .expect("transaction")
        .into_inner();
    let e = c.one("SignTransaction", true).await;
    assert_eq!(e.body.digest, hex::encode(&signed.signing_hash));
    assert_eq!(
        e.body.signature_ref,
        format!("tx:0x{}", hex::encode(&signed.transaction_hash))
    );
    market
        .sign_transaction(transaction(&b.account_id))
        .await
        .expect_err("not in a session");
    c.one("SignTransaction", false).await;

    // SessionService
    let mut sessions = SessionServiceClient::new(d.channel(&env, "wallet-gateway").await);
    let challenge = |account_id: &str| CreateSessionChallengeRequest {
        account_id: account_id.into(),
        delegate: MARKETPLACE.into(),
        scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
        cap: "1000".into(),
        ttl_seconds: 1800,
    };
    let ch = sessions
        .create_session_challenge(challenge(&a.account_id))
        .await
        .expect("challenge")
        .into_inner();
    c.one("CreateSessionChallenge", true).await;
    let mut market_sessions = SessionServiceClient::new(d.channel(&env, "marketplace").await);
    market_sessions
        .create_session_challenge(challenge(&b.account_id))
        .await
        .expect_err("not listed on b");
    c.one("CreateSessionChallenge", false).await;
    let ch2 = sessions
        .create_session_challenge(challenge(&a.account_id))
        .await
        .expect("challenge")
        .into_inner();
    c.one("CreateSessionChallenge", true).await;
    sessions
        .open_session(OpenSessionRequest {
            challenge_id: ch2.challenge_id.clone(),
            signature: Wallet::new(0x43).sign(&ch2.typed_data_json),
        })
        .await
        .expect_err("wrong signer");
    let e = c.one("OpenSession", false).await;
    assert_eq!(e.body.decision, "deny");
    let opened = sessions
        .open_session(OpenSessionRequest {
            challenge_id: ch.challenge_id.clone(),
            signature: wallet.sign(&ch.typed_data_json),
        })
        .await
        .expect("open")
        .into_inner();
    let session_id = opened.session.as_ref().expect("session").session_id.clone();
    let e = c.one("OpenSession", true).await;
    assert_eq!(
        (e.body.session.as_str(), e.body.account.as_str()),
        (session_id.as_str(), a.account_id.as_str())
    );
    sessions
        .get_session(GetSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .expect("get");
    c.one("GetSession", true).await;
    sessions
        .get_session(GetSessionRequest {
            session_id: "nope".into(),
        })
        .await
        .expect_err("bad id");
    c.one("GetSession", false).await;
    sessions
        .list_sessions(ListSessionsRequest {
            account_id: a.account_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list");
    c.one("ListSessions", true).await;
    market_sessions
        .list_sessions(ListSessionsRequest {
            account_id: b.account_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not listed on b");
    c.one("ListSessions", false).await;
    let pay = |token: &str, request_id: &str| SignPaymentRequest {
        session_token: token.into(),
        amount: "7".into(),
        currency: "USDC".into(),
        manifest: MANIFEST.into(),
        license_id: "lic-7".into(),
        payee: String::new(),
        request_id: request_id.into(),
    };
    let paid = market
        .sign_payment(pay(&opened.token, "p1"))
        .await
        .expect("pay")
        .into_inner();
    // The spend's event is appended with its reservation, before signing:
    // the digest of what is signed, a reference to the stored response.
    let e = c.one("SignPayment", true).await;
    assert_eq!(e.body.session, session_id);
    assert_eq!(e.body.request_id, "p1");
    assert_eq!(e.body.account, a.account_id);
    assert_eq!(e.body.digest, hex::encode(&paid.digest));
    assert_eq!(e.body.signature_ref, format!("spend:{session_id}/p1"));
    // A replay reserves nothing: one event for it, naming the stored signature.
    let replayed = market
        .sign_payment(pay(&opened.token, "p1"))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replayed.signature, paid.signature);
    let e = c.one("SignPayment", true).await;
    assert_eq!(e.body.request_id, "p1");
    assert_eq!(e.body.signature_ref, format!("sig:{}", sha256_hex(&paid.signature)));
    gw.sign_payment(pay(&opened.token, "p2"))
        .await
        .expect_err("not the delegate");
    let e = c.one("SignPayment", false).await;
    assert_eq!(
        (e.body.decision.as_str(), e.body.session.as_str()),
        ("deny", session_id.as_str())
    );
    market_sessions
        .revoke_session(RevokeSessionRequest {
            session_id: session_id.clone(),
            controller_signature: Vec::new(),
        })
        .await
        .expect_err("marketplace did not create the account");
    c.one("RevokeSession", false).await;
    let mut admin_sessions = SessionServiceClient::new(d.channel(&env, "admin").await);
    admin_sessions
        .revoke_session(RevokeSessionRequest {
            session_id: session_id.clone(),
            controller_signature: Vec::new(),
        })
        .await
        .expect("revoke");
    c.one("RevokeSession", true).await;

    // JwksService
    let mut jwks = JwksServiceClient::new(d.channel(&env, "admin").await);
    let mut market_jwks = JwksServiceClient::new(d.channel(&env, "marketplace").await);
    market_jwks.get_jwks(GetJwksRequest {}).await.expect("jwks");
    c.one("GetJwks", true).await;
    let keys = jwks
        .list_issuer_keys(ListIssuerKeysRequest {})
        .await
        .expect("list")
        .into_inner();
    c.one("ListIssuerKeys", true).await;
    market_jwks
        .list_issuer_keys(ListIssuerKeysRequest {})
        .await
        .expect_err("admin only");
    c.one("ListIssuerKeys", false).await;
    // The next key must have been published for max-age before it signs.
    clock.advance(3601);
    let rotated = jwks
        .rotate_issuer_key(RotateIssuerKeyRequest { alg: "EdDSA".into() })
        .await
        .expect("rotate")
        .into_inner();
    let e = c.one("RotateIssuerKey", true).await;
    assert_eq!(
        e.body.signature_ref,
        format!("kid:{}", rotated.rotations[0].activated_kid)
    );
    // The fresh next key the rotation created has the daemon's own event.
    let published = |c: &Checker<'_>| -> Vec<String> {
        c.daemon
            .iter()
            .filter(|e| e.body.action == keyward::audit::event::ISSUER_KEY_PUBLISHED)
            .map(|e| e.body.signature_ref.clone())
            .collect()
    };
    assert!(!rotated.rotations[0].next_kid.is_empty());
    assert_eq!(published(&c), [format!("kid:{}", rotated.rotations[0].next_kid)]);
    market_jwks
        .rotate_issuer_key(RotateIssuerKeyRequest { alg: "EdDSA".into() })
        .await
        .expect_err("admin only");
    c.one("RotateIssuerKey", false).await;
    let es256_next = keys
        .keys
        .iter()
        .find(|k| k.alg == "ES256" && k.state == "next")
        .map(|k| k.kid.clone())
        .expect("an ES256 next key");
    market_jwks
        .revoke_issuer_key(RevokeIssuerKeyRequest {
            kid: es256_next.clone(),
        })
        .await
        .expect_err("admin only");
    c.one("RevokeIssuerKey", false).await;
    jwks.revoke_issuer_key(RevokeIssuerKeyRequest {
        kid: es256_next.clone(),
    })
    .await
    .expect("revoke");
    let e = c.one("RevokeIssuerKey", true).await;
    assert_eq!(e.body.signature_ref, format!("kid:{es256_next}"));
    // Revoking the next key made the daemon publish a new one, with its event.
    let replaced = published(&c);
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_ne!(replaced[0], format!("kid:{es256_next}"));

    // AuditService: history, then a live event, over one stream.
    let mut audit = AuditServiceClient::new(d.channel(&env, "admin").await);
    let mut stream = audit
        .stream_events(StreamEventsRequest { since_seq: 0 })
        .await
        .expect("stream")
        .into_inner();
    let e = c.one("StreamEvents", true).await;
    let mut got = Vec::new();
    while got.len() < e.seq as usize {
        got.push(stream.message().await.expect("stream").expect("event"));
    }
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=e.seq).collect::<Vec<_>>()
    );
    let mut market_audit = AuditServiceClient::new(d.channel(&env, "marketplace").await);
    let refused = market_audit
        .stream_events(StreamEventsRequest { since_seq: 0 })
        .await
        .expect_err("admin only");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let e = c.one("StreamEvents", false).await;
    assert_eq!(e.body.policies, vec!["default-deny".to_string()]);
    let live = stream.message().await.expect("stream").expect("live event");
    assert_eq!((live.seq, live.action.as_str()), (e.seq, "StreamEvents"));
    assert_eq!(live.hash, hex::encode(e.hash));
    drop(stream);

    assert_eq!(c.exercised, proto_rpcs(), "every RPC of every service was exercised");
    let store = d.state.keys.store().clone();
    let keys = keyward::audit::verify::store_keys(store.as_ref()).await.expect("keys");
    let report = keyward::audit::verify::verify_store(store.as_ref(), &keys)
        .await
        .expect("verify");
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.last_seq, c.seen);
    d.stop().await;
}

#[test]
fn every_rpc_yields_exactly_one_event_sqlite() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(enumeration(env));
}

#[test]
fn every_rpc_yields_exactly_one_event_postgres() {
    let Some(env) = Env::new(Custody::Host, StoreKind::Postgres) else {
        return;
    };
    block_on(enumeration(env));
}

fn keyward(env: &Env) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--home").arg(env.dir.path()).env("RUST_LOG", "warn");
    c
}

fn audit_cmd(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = keyward(env)
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(&env.config_path)
        .output()
        .expect("run keyward audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Independent RFC 6962 / RFC 9162 inclusion check, written from the RFC
/// for this test: recompute the root from the leaf and its audit path.
fn rfc_root_from_path(leaf: &[u8], index: u64, size: u64, path: &[Vec<u8>]) -> Vec<u8> {
    fn h(parts: &[&[u8]]) -> Vec<u8> {
        let mut s = Sha256::new();
        for p in parts {
            s.update(p);
        }
        s.finalize().to_vec()
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = h(&[&[0u8], leaf]);
    for p in path {
        assert!(snode != 0, "path too long");
        if fnode % 2 == 1 || fnode == snode {
            r = h(&[&[1u8], p, &r]);
            if fnode % 2 == 0 {
                while fnode % 2 == 0 && fnode != 0 {
                    fnode /= 2;
                    snode /= 2;
                }
            }
        } else {
            r = h(&[&[1u8], &r, p]);
        }
        fnode /= 2;
        snode /= 2;
    }
    assert_eq!(snode, 0, "path too short");
    r
}

/// Offline commands on a stopped daemon's store: verify, export, prove
/// (checked independently), then tampering named by `keyward audit verify`.
fn offline_commands(store: StoreKind) {
    let env = Env::new(Custody::Host, store).expect("env");
    audit_config(&env, "checkpoint_every_events = 5\n");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let a = create_account(&d, &env, &[MARKETPLACE]).await;
        let mut op = d.signing(&env, "admin").await;
        for i in 0..11u8 {
            op.sign_message(SignMessageRequest {
                account_id: a.account_id.clone(),
                alg: SignatureAlgorithm::Secp256k1 as i32,
                data: vec![i; 10],
            })
            .await
            .expect("sign");
        }
        d.stop().await;
    });
    // 12 request events after the daemon's own (the issuer keys it created
    // at first start); checkpoints after each commit once 5 are pending.
    let (code, out, err) = audit_cmd(&env, &["verify", "--json"]);
    assert_eq!(code, 0, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["ok"], true);
    let total = v["report"]["last_seq"].as_u64().expect("last_seq");
    assert!(v["report"]["checkpoints_verified"].as_u64().expect("n") >= 2, "{v}");

    // Export from seq 3: lines 4..=total, each an event.
    let (code, out, err) = audit_cmd(&env, &["export", "--since", "3", "--format", "jsonl"]);
    assert_eq!(code, 0, "{err}");
    let events: Vec<Event> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("event line"))
        .collect();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (4..=total).collect::<Vec<_>>()
    );
    let (code, out, _) = audit_cmd(&env, &["export", "--format", "jsonl"]);
    assert_eq!(code, 0);
    let all: Vec<Event> = out.lines().map(|l| serde_json::from_str(l).expect("event")).collect();
    let (daemon, requests): (Vec<&Event>, Vec<&Event>) = all
        .iter()
        .partition(|e| e.body.identity == keyward::audit::event::DAEMON_IDENTITY);
    assert_eq!(requests.len(), 12);
    assert!(!daemon.is_empty(), "first start publishes issuer keys");
    assert!(daemon
        .iter()
        .all(|e| e.body.action == keyward::audit::event::ISSUER_KEY_PUBLISHED && e.seq <= daemon.len() as u64));
    // A whole export verifies on its own, with the JWKS given as a file.
    let file = env.dir.path().join("export.jsonl");
    let (code, _, err) = audit_cmd(&env, &["export", "--out", file.to_str().expect("path")]);
    assert_eq!(code, 0, "{err}");
    let jwks_file = env.dir.path().join("jwks.json");
    let store_keys = block_on(async {
        let s = keyward::store::open(&env.store_url).await.expect("store");
        let history = keyward::audit::verify::store_keys(s.as_ref()).await.expect("keys");
        history.keys.into_iter().map(|e| e.jwk).collect::<Vec<_>>()
    });
    std::fs::write(&jwks_file, serde_json::json!({ "keys": store_keys }).to_string()).expect("jwks");
    let out = keyward(&env)
        .args(["audit", "verify", "--from-export"])
        .arg(&file)
        .arg("--jwks")
        .arg(&jwks_file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Prove event 7, and check the proof independently.
    let (code, out, err) = audit_cmd(&env, &["prove", "7", "--json"]);
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let leaf = hex::decode(p["event"]["hash"].as_str().expect("hash")).expect("hex");
    let path: Vec<Vec<u8>> = p["path"]
        .as_array()
        .expect("path")
        .iter()
        .map(|h| hex::decode(h.as_str().expect("hex")).expect("hex"))
        .collect();
    let root = rfc_root_from_path(
        &leaf,
        p["index"].as_u64().expect("index"),
        p["tree_size"].as_u64().expect("size"),
        &path,
    );
    // The root must be the one the checkpoint JWS signs; the signature is
    // checked with an independent JOSE library when installed, else ours.
    let jws = p["checkpoint"]["jws"].as_str().expect("jws");
    let jwks_json = serde_json::json!({ "keys": store_keys }).to_string();
    let claims = match jose_verify(&jwks_json, jws) {
        Some(v) => v.get("claims").cloned().unwrap_or(v),
        None => {
            keyward::crypto::jws::verify_compact(jws, &store_keys)
                .expect("verifies")
                .claims
        }
    };
    assert_eq!(claims["root"].as_str().expect("root"), hex::encode(&root));
    // The event's own hash: recompute from the canonical encoding.
    let event: Event = serde_json::from_value(p["event"].clone()).expect("event");
    assert_eq!(
        keyward::audit::link(&event.prev_hash, event.seq, &event.body),
        event.hash
    );

    // Retention through the binary: archive the first checkpoint's events;
    // the archive verifies on its own and the store still verifies.
    let (code, out, err) = audit_cmd(&env, &["prove", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let through = p["checkpoint"]["last_seq"].as_u64().expect("last_seq");
    assert!(through < total - 3, "the first checkpoint ends at {through}");
    let archive = env.dir.path().join("archive.jsonl");
    let (code, out, err) = audit_cmd(
        &env,
        &[
            "archive",
            "--through",
            &through.to_string(),
            "--out",
            archive.to_str().expect("path"),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out} {err}");
    let out = keyward(&env)
        .args(["audit", "verify", "--json", "--from-export"])
        .arg(&archive)
        .arg("--jwks")
        .arg(&jwks_file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["report"]["first_seq"].as_u64(), v["report"]["last_seq"].as_u64()),
        (Some(1), Some(through))
    );
    assert_eq!(v["report"]["checkpoints_verified"], 1);
    let (code, out, _) = audit_cmd(&env, &["verify", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["report"]["first_seq"].as_u64(), Some(through + 1));
    let (code, out, _) = audit_cmd(&env, &["export", "--format", "jsonl"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().count() as u64,
        total - through,
        "archived events are pruned"
    );

    // Tampering, through the binary: exit 1 and the seq named.
    let target = total - 2;
    block_on(async {
        let url = &env.store_url;
        let sql = format!("UPDATE audit_events SET digest = 'x' WHERE seq = {target}");
        let sql = sql.as_str();
        if url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(url).await.expect("db");
            sqlx::query(sql).execute(&pool).await.expect("tamper");
        } else {
            let pool = sqlx::PgPool::connect(url).await.expect("db");
            sqlx::query(sql).execute(&pool).await.expect("tamper");
        }
    });
    let (code, out, _) = audit_cmd(&env, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("FAILED at seq {target}")), "{out}");
}

#[test]
fn offline_verify_export_prove_tamper_sqlite() {
    offline_commands(StoreKind::Sqlite);
}

#[test]
fn offline_verify_export_prove_tamper_postgres() {
    if keyward::store::testing::postgres_url_for_tests().is_none() {
        return;
    }
    offline_commands(StoreKind::Postgres);
}

fn dev_channel(home: &Path, profile: &str) -> (String, keyward::tls::ClientTlsFiles) {
    let f = keyward::dev::read_client_file(home).expect("client file");
    let p = f.profiles.get(profile).expect("profile");
    (
        f.endpoint.clone(),
        keyward::tls::ClientTlsFiles {
            ca: f.ca.clone(),
            cert: Some(p.cert.clone()),
            key: Some(p.key.clone()),
            domain: f.domain.clone(),
        },
    )
}

/// SIGKILL under concurrent signing load: after a restart, every signature
/// a client received has its event (same digest and signature reference),
/// and `keyward audit verify` passes.
#[test]
fn sigkill_under_load_loses_no_event() {
    use keyward::api::pb::signing_service_client::SigningServiceClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let mut child = start_dev(&home, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args([
            "account",
            "create",
            "--controller",
            CONTROLLER,
            "--allow",
            MARKETPLACE,
            "--json",
        ])
        .output()
        .expect("account create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let account: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let account_id = account["account_id"].as_str().expect("id").to_string();
    let (endpoint, files) = dev_channel(&home, "admin");
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Vec<u8>, Vec<u8>)>::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let workers: Vec<_> = (0..6u8)
        .map(|w| {
            let (endpoint, files, account_id, received) =
                (endpoint.clone(), files.clone(), account_id.clone(), received.clone());
            rt.spawn(async move {
                let ch = keyward::tls::connect(&endpoint, &files).await.expect("connect");
                let mut c = SigningServiceClient::new(ch);
                for i in 0u32.. {
                    let data = format!("worker {w} message {i}").into_bytes();
                    let r = c
                        .sign_message(SignMessageRequest {
                            account_id: account_id.clone(),
                            alg: SignatureAlgorithm::Ed25519 as i32,
                            data: data.clone(),
                        })
                        .await;
                    match r {
                        Ok(r) => received.lock().expect("lock").push((data, r.into_inner().signature)),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Let the load run until a good number of signatures arrived, then kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while received.lock().expect("lock").len() < 300 {
        assert!(std::time::Instant::now() < deadline, "load did not get going");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    signal(&mut child, "-KILL");
    for w in workers {
        rt.block_on(w).expect("worker");
    }
    let received = received.lock().expect("lock").clone();
    assert!(received.len() >= 300);

    // Restart: the daemon comes back and appends after the recovered head.
    let mut child = start_dev(&home, &[]);
    let (endpoint, files) = dev_channel(&home, "admin");
    rt.block_on(async {
        let ch = keyward::tls::connect(&endpoint, &files).await.expect("connect");
        SigningServiceClient::new(ch)
            .sign_message(SignMessageRequest {
                account_id: account_id.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: b"after restart".to_vec(),
            })
            .await
            .expect("sign after restart");
    });
    // `keyward audit tail --json` replays from the start over the live stream.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["audit", "tail", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tail");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(tail.stdout.take().expect("stdout")));
    for seq in 1..=3u64 {
        let line = lines.next().expect("a line").expect("read");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(v["seq"].as_u64(), Some(seq), "{line}");
    }
    signal(&mut tail, "-TERM");
    signal(&mut child, "-TERM");

    let store_url = format!("sqlite://{}", home.join("keyward.db").display());
    let events = rt.block_on(async {
        let s = keyward::store::open(&store_url).await.expect("store");
        all_events(s.as_ref()).await
    });
    let by_ref: std::collections::HashMap<&str, &Event> =
        events.iter().map(|e| (e.body.signature_ref.as_str(), e)).collect();
    for (data, sig) in &received {
        let e = by_ref
            .get(format!("sig:{}", sha256_hex(sig)).as_str())
            .unwrap_or_else(|| panic!("no event for a signature the client received"));
        assert_eq!(e.body.digest, sha256_hex(data));
        assert_eq!(e.body.action, "SignMessage");
    }
    // After the restart: the signature, then the tail's own StreamEvents.
    let n = events.len();
    assert!(n >= 2);
    assert_eq!(
        (events[n - 2].body.action.as_str(), events[n - 2].body.digest.as_str()),
        ("SignMessage", sha256_hex(b"after restart").as_str())
    );
    assert_eq!(events[n - 1].body.action, "StreamEvents");
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["audit", "verify", "--json"])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

const DAY: i64 = 86_400;

/// Every event in the store, in order.
async fn all_events(store: &dyn keyward::store::Store) -> Vec<Event> {
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

/// Polls the log (with a deadline) until `done` holds for the events with `action`.
async fn wait_for(d: &Daemon, action: &str, done: impl Fn(&[&Event]) -> bool) -> Vec<Event> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let events = all_events(d.state.keys.store().as_ref()).await;
        let matching: Vec<&Event> = events.iter().filter(|e| e.body.action == action).collect();
        if done(&matching) {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler did not record {action}: {events:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The kids of `alg` in `state`.
async fn kids_in(d: &Daemon, alg: &str, state: keyward::store::IssuerKeyState) -> Vec<String> {
    d.state
        .keys
        .store()
        .list_issuer_keys()
        .await
        .expect("keys")
        .into_iter()
        .filter(|k| k.alg == alg && k.state == state)
        .map(|k| k.kid)
        .collect()
}

/// The scheduler's own changes (publish, promote, retire, remove), driven
/// by the daemon's clock, each get their event (identity `keyward`) and the
/// chain verifies; a graceful stop then leaves a checkpoint over the last
/// event, which `keyward audit verify` accepts.
async fn scheduled_rotation_and_shutdown(env: Env) {
    use keyward::store::IssuerKeyState::{Active, Next};
    // No checkpoint before the shutdown's own; the scheduler runs every second.
    audit_config(
        &env,
        "checkpoint_every_events = 100000\ncheckpoint_every_seconds = 3600\n[jwks]\ntick_seconds = 1\nmax_age_seconds = 60\n",
    );
    env.init().await;
    let clock = std::sync::Arc::new(keyward::clock::ManualClock::new(keyward::clock::unix_now()));
    let d = env.start_with_clock(clock.clone()).await;
    create_account(&d, &env, &[]).await;
    let algs = ["EdDSA", "ES256"];
    let mut first_active = Vec::new();
    let mut first_next = Vec::new();
    for alg in algs {
        first_active.extend(kids_in(&d, alg, Active).await);
        first_next.extend(kids_in(&d, alg, Next).await);
    }
    assert_eq!((first_active.len(), first_next.len()), (2, 2));

    // The rotation is due: each next key becomes active, each active key retires.
    clock.advance(30 * DAY);
    let events = wait_for(&d, "ScheduledRotation", |e| e.len() == 2).await;
    let refs = |action: &str| -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| e.body.action == action)
            .map(|e| e.body.signature_ref.clone())
            .collect()
    };
    let kid_refs = |kids: &[String]| -> BTreeSet<String> { kids.iter().map(|k| format!("kid:{k}")).collect() };
    assert_eq!(refs("ScheduledRotation"), kid_refs(&first_next));
    assert_eq!(refs("IssuerKeyRetired"), kid_refs(&first_active));
    for e in events.iter().filter(|e| e.body.identity == "keyward") {
        assert_eq!(
            (e.body.decision.as_str(), e.body.code.as_str()),
            ("allow", "OK"),
            "{e:?}"
        );
    }
    // First start published the first keys; the rotation is two events an algorithm.
    let mut first = first_active.clone();
    first.extend(first_next.iter().cloned());
    assert_eq!(refs("IssuerKeyPublished"), kid_refs(&first));
    assert_eq!(
        events.iter().filter(|e| e.body.identity == "keyward").count(),
        4 + 4,
        "{events:#?}"
    );

    // Within the pre-publication window of the next rotation: a next key each.
    clock.advance(29 * DAY);
    let events = wait_for(&d, "IssuerKeyPublished", |e| e.len() == 4 + 2).await;
    let mut published = Vec::new();
    for alg in algs {
        published.extend(kids_in(&d, alg, Next).await);
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| e.body.action == "IssuerKeyPublished")
            .map(|e| e.body.signature_ref.clone())
            .filter(|r| !kid_refs(&first).contains(r))
            .collect::<BTreeSet<_>>(),
        kid_refs(&published)
    );

    // 90 days after they retired, the first keys are removed.
    clock.advance(61 * DAY);
    let events = wait_for(&d, "IssuerKeyRemoved", |e| e.len() == 2).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.body.action == "IssuerKeyRemoved")
            .map(|e| e.body.signature_ref.clone())
            .collect::<BTreeSet<_>>(),
        kid_refs(&first_active)
    );
    let store = d.state.keys.store().clone();
    let keys = keyward::audit::verify::store_keys(store.as_ref()).await.expect("keys");
    let report = keyward::audit::verify::verify_store(store.as_ref(), &keys)
        .await
        .expect("verify");
    assert!(report.ok(), "{report:?}");
    assert!(store.audit().checkpoints().await.expect("checkpoints").is_empty());

    // A graceful stop: a final checkpoint over everything since the last one.
    d.stop().await;
    let head = store.audit().audit_head().await.expect("head").seq;
    let checkpoints = store.audit().checkpoints().await.expect("checkpoints");
    let last = checkpoints.last().expect("a checkpoint written at shutdown");
    assert_eq!((last.first_seq, last.last_seq), (1, head));
    let (code, out, err) = audit_cmd(&env, &["verify", "--json"]);
    assert_eq!(code, 0, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["report"]["last_seq"].as_u64(), Some(head));
    assert_eq!(v["report"]["checkpoints_verified"], 1);
}

#[test]
fn scheduled_rotation_events_and_shutdown_checkpoint_sqlite() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(scheduled_rotation_and_shutdown(env));
}

#[test]
fn scheduled_rotation_events_and_shutdown_checkpoint_postgres() {
    let Some(env) = Env::new(Custody::Host, StoreKind::Postgres) else {
        return;
    };
    block_on(scheduled_rotation_and_shutdown(env));
}

/// SIGTERM to a real `keyward dev` process: the final checkpoint covers the
/// last event (the time and count rules would not have made one yet).
#[test]
fn sigterm_writes_a_final_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let mut child = start_dev(&home, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["account", "create", "--controller", CONTROLLER, "--json"])
        .output()
        .expect("account create");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    signal(&mut child, "-TERM");
    let store_url = format!("sqlite://{}", home.join("keyward.db").display());
    let (head, checkpoints) = block_on(async {
        let s = keyward::store::open(&store_url).await.expect("store");
        let head = s.audit().audit_head().await.expect("head").seq;
        let cps = s.audit().checkpoints().await.expect("checkpoints");
        s.close().await;
        (head, cps)
    });
    assert!(head >= 1);
    assert_eq!(checkpoints.last().map(|c| c.last_seq), Some(head), "{checkpoints:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("--home")
        .arg(&home)
        .args(["audit", "verify", "--json"])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["report"]["last_seq"].as_u64(), Some(head));
    assert!(v["report"]["checkpoints_verified"].as_u64() >= Some(1), "{v}");
}

/// A spend whose signing fails after its reservation (here: over the
/// account's daily cap, checked after the session's cap) keeps its event and
/// gets a compensating `ReleaseSpend` event, in the releasing transaction:
/// two events for the request, the second naming the failure.
#[test]
fn failed_spend_is_compensated_by_release_spend() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    std::fs::write(
        env.dir.path().join("policies/limits.toml"),
        "[[daily_spend]]\nname = \"usdc-day\"\ncurrency = \"USDC\"\ncap = \"10\"\n",
    )
    .expect("limits");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let wallet = Wallet::new(0x42);
        let account = d
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: wallet.address().to_checksum(),
                label: String::new(),
                allow: vec![MARKETPLACE.into()],
            })
            .await
            .expect("account")
            .into_inner();
        let mut sessions = SessionServiceClient::new(d.channel(&env, "wallet-gateway").await);
        let ch = sessions
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: account.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
                cap: "1000".into(),
                ttl_seconds: 1800,
            })
            .await
            .expect("challenge")
            .into_inner();
        let opened = sessions
            .open_session(OpenSessionRequest {
                challenge_id: ch.challenge_id,
                signature: wallet.sign(&ch.typed_data_json),
            })
            .await
            .expect("open")
            .into_inner();
        let session_id = opened.session.expect("session").session_id;
        let err = d
            .signing(&env, "marketplace")
            .await
            .sign_payment(SignPaymentRequest {
                session_token: opened.token,
                amount: "50".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                payee: String::new(),
                request_id: "over-the-day".into(),
            })
            .await
            .expect_err("over the daily cap");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{}", err.message());
        let store = d.state.keys.store().clone();
        let events = all_events(store.as_ref()).await;
        let n = events.len();
        let (spend, release) = (&events[n - 2].body, &events[n - 1].body);
        let spend_ref = format!("spend:{session_id}/over-the-day");
        assert_eq!(
            (
                spend.action.as_str(),
                spend.decision.as_str(),
                spend.signature_ref.as_str()
            ),
            ("SignPayment", "allow", spend_ref.as_str())
        );
        assert_eq!(
            (
                release.action.as_str(),
                release.decision.as_str(),
                release.code.as_str(),
                release.signature_ref.as_str()
            ),
            ("ReleaseSpend", "deny", "RESOURCE_EXHAUSTED", spend_ref.as_str())
        );
        assert_eq!(
            (
                release.session.as_str(),
                release.request_id.as_str(),
                release.account.as_str(),
                release.identity.as_str()
            ),
            (
                session_id.as_str(),
                "over-the-day",
                account.account_id.as_str(),
                MARKETPLACE
            )
        );
        assert!(release.policies.iter().any(|p| p == "limit:usdc-day"), "{release:?}");
        // The session got its amount back.
        let s = store.get_session(&session_id).await.expect("session").expect("exists");
        assert_eq!(s.remaining, 1000);
        let keys = keyward::audit::verify::store_keys(store.as_ref()).await.expect("keys");
        let report = keyward::audit::verify::verify_store(store.as_ref(), &keys)
            .await
            .expect("verify");
        assert!(report.ok(), "{report:?}");
        d.stop().await;
    });
}
