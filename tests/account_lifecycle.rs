//! The account lifecycle end to end (issue 13 §5): list, update, freeze and unfreeze, on two
//! daemons sharing one store (SQLite file or PostgreSQL schema) and one SoftHSM token, over
//! real mTLS, and through the `keyward` binary. A freeze made on one replica is enforced by
//! the other within the change feed's period, every refusal and change is in the audit log,
//! and the log verifies.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    Account, CreateAccountRequest, CreateSessionChallengeRequest, FreezeAccountRequest, GetAccountRequest,
    ListAccountsRequest, OpenSessionRequest, SignMessageRequest, SignPaymentRequest, SignatureAlgorithm,
    UnfreezeAccountRequest, UpdateAccountRequest,
};
use keyward::config::Custody;
use sha2::Digest as _;
use tonic::Code;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE_ID: &str = "spiffe://example.org/marketplace";

async fn sign(d: &Daemon, env: &Env, account: &str) -> Result<(), tonic::Status> {
    d.signing(env, "admin")
        .await
        .sign_message(SignMessageRequest {
            account_id: account.into(),
            alg: SignatureAlgorithm::Ed25519 as i32,
            data: b"hello".to_vec(),
        })
        .await
        .map(|_| ())
}

/// A session for the marketplace on `account`, opened through `d`.
async fn open_session(d: &Daemon, env: &Env, wallet: &Wallet, account: &str) -> Result<String, tonic::Status> {
    let mut s = SessionServiceClient::new(d.channel(env, "wallet-gateway").await);
    let c = s
        .create_session_challenge(CreateSessionChallengeRequest {
            account_id: account.into(),
            delegate: MARKETPLACE_ID.into(),
            scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
            cap: "1000".into(),
            ttl_seconds: 3000,
        })
        .await?
        .into_inner();
    Ok(s.open_session(OpenSessionRequest {
        challenge_id: c.challenge_id,
        signature: wallet.sign(&c.typed_data_json),
    })
    .await?
    .into_inner()
    .token)
}

async fn read_as_market(d: &Daemon, env: &Env, account: &str) -> Result<(), tonic::Status> {
    d.accounts(env, "marketplace")
        .await
        .get_account(GetAccountRequest {
            account_id: account.into(),
        })
        .await
        .map(|_| ())
}

/// The Ed25519 public key `d` signs `account`'s messages with now.
async fn ed_public(d: &Daemon, env: &Env, account: &str) -> Vec<u8> {
    d.signing(env, "admin")
        .await
        .sign_message(SignMessageRequest {
            account_id: account.into(),
            alg: SignatureAlgorithm::Ed25519 as i32,
            data: b"which key".to_vec(),
        })
        .await
        .expect("sign")
        .into_inner()
        .public_key
}

/// The account's controller as `d` answers.
async fn controller_on(d: &Daemon, env: &Env, account: &str) -> String {
    d.accounts(env, "admin")
        .await
        .get_account(GetAccountRequest {
            account_id: account.into(),
        })
        .await
        .expect("read")
        .into_inner()
        .controller
}

async fn pay(d: &Daemon, env: &Env, token: &str, request_id: &str) -> Result<(), tonic::Status> {
    d.signing(env, "marketplace")
        .await
        .sign_payment(SignPaymentRequest {
            session_token: token.into(),
            amount: "1".into(),
            currency: "USDC".into(),
            manifest: MANIFEST.into(),
            license_id: "lic-7".into(),
            payee: String::new(),
            request_id: request_id.into(),
        })
        .await
        .map(|_| ())
}

/// Waits (at most 5 s) until `f` gives `want`; returns how long it took.
async fn until<F, Fut>(want: Option<Code>, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let started = Instant::now();
    loop {
        let got = f().await.err().map(|s| s.code());
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lifecycle(store: StoreKind) {
    let Some(env) = Env::new(Custody::Host, store) else {
        return;
    };
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str("[accounts]\ncontroller_change_delay_seconds = 2\n");
    std::fs::write(&env.config_path, config).expect("config");
    block_on(async {
        env.init().await;
        let d1 = env.start().await;
        let d2 = env.start().await;
        let wallet = Wallet::new(0x42);
        let create = |label: &str| CreateAccountRequest {
            controller: wallet.address().to_checksum(),
            label: label.into(),
            allow: vec![MARKETPLACE_ID.into()],
        };
        let mut admin1 = d1.accounts(&env, "admin").await;
        let mut admin2 = d2.accounts(&env, "admin").await;
        let a: Account = admin1.create_account(create("alice")).await.expect("a").into_inner();
        let b: Account = admin1.create_account(create("bob")).await.expect("b").into_inner();
        let (a_id, b_id) = (a.account_id.clone(), b.account_id.clone());
        assert!(!a.frozen);

        // Both replicas sign (and cache the account).
        sign(&d1, &env, &a_id).await.expect("d1 signs");
        sign(&d2, &env, &a_id).await.expect("d2 signs");
        let token = open_session(&d2, &env, &wallet, &a_id).await.expect("session");
        pay(&d2, &env, &token, "p-1").await.expect("pay");

        // Bad requests change nothing.
        let freeze = |id: &str, reason: &str| FreezeAccountRequest {
            account_id: id.into(),
            reason: reason.into(),
        };
        let e = admin1.freeze_account(freeze(&a_id, "  ")).await.expect_err("no reason");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = admin1
            .freeze_account(freeze("not-an-id", "x"))
            .await
            .expect_err("bad id");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let missing = "00000000-0000-4000-8000-000000000000";
        let e = admin1.freeze_account(freeze(missing, "x")).await.expect_err("missing");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let mut market = d1.accounts(&env, "marketplace").await;
        let e = market
            .freeze_account(freeze(&a_id, "x"))
            .await
            .expect_err("not an admin");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        sign(&d1, &env, &a_id).await.expect("still signs");

        // Freeze on replica 1: refused there at once, and on replica 2 once it reads the feed.
        let frozen = admin1
            .freeze_account(freeze(&a_id, "suspected key misuse, ticket 4711"))
            .await
            .expect("freeze")
            .into_inner();
        assert!(frozen.frozen);
        assert_eq!(frozen.frozen_reason, "suspected key misuse, ticket 4711");
        let e = sign(&d1, &env, &a_id).await.expect_err("frozen on d1");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("is frozen"), "{e:?}");
        let took = until(Some(Code::FailedPrecondition), || sign(&d2, &env, &a_id)).await;
        eprintln!("replica 2 refused the frozen account after {took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let e = pay(&d2, &env, &token, "p-2").await.expect_err("session payment");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = open_session(&d2, &env, &wallet, &a_id)
            .await
            .expect_err("no new session");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        // Reads still work; the other account still signs; freezing again keeps the first reason.
        let seen = admin2
            .get_account(GetAccountRequest {
                account_id: a_id.clone(),
            })
            .await
            .expect("read")
            .into_inner();
        assert!(seen.frozen && seen.frozen_at == frozen.frozen_at);
        sign(&d2, &env, &b_id).await.expect("bob signs");
        let again = admin2
            .freeze_account(freeze(&a_id, "other"))
            .await
            .expect("idempotent")
            .into_inner();
        assert_eq!(again.frozen_reason, frozen.frozen_reason);

        // Unfreeze on replica 2: both sign again; the session still pays, exactly once per id.
        let thawed = admin2
            .unfreeze_account(UnfreezeAccountRequest {
                account_id: a_id.clone(),
            })
            .await
            .expect("unfreeze")
            .into_inner();
        assert!(!thawed.frozen && thawed.frozen_reason.is_empty());
        sign(&d2, &env, &a_id).await.expect("d2 signs again");
        until(None, || sign(&d1, &env, &a_id)).await;
        pay(&d1, &env, &token, "p-3").await.expect("pay again");

        // Update: a new label, and the marketplace's grant taken away (on both replicas).
        let e = admin1
            .update_account(UpdateAccountRequest {
                account_id: a_id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("nothing to change");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = market
            .update_account(UpdateAccountRequest {
                account_id: a_id.clone(),
                set_allow: true,
                ..Default::default()
            })
            .await
            .expect_err("a listed client cannot change the grants");
        assert_eq!(e.code(), Code::PermissionDenied);
        read_as_market(&d2, &env, &a_id).await.expect("listed: reads");
        let updated = admin1
            .update_account(UpdateAccountRequest {
                account_id: a_id.clone(),
                label: Some("alice (closed)".into()),
                set_allow: true,
                allow: vec![],
            })
            .await
            .expect("update")
            .into_inner();
        assert_eq!(updated.label, "alice (closed)");
        assert!(updated.allowed.is_empty());
        let refused = read_as_market(&d1, &env, &a_id)
            .await
            .expect_err("grant gone on d1")
            .code();
        assert!(
            matches!(refused, Code::PermissionDenied | Code::NotFound),
            "{refused:?}"
        );
        until(Some(refused), || read_as_market(&d2, &env, &a_id)).await;

        // Rotation on replica 1: new keys sign on both replicas; the old public keys stay in
        // the account's JWKS.
        assert_eq!(
            ed_public(&d2, &env, &a_id).await,
            a.ed25519_public_key,
            "d2 caches version 1"
        );
        let e = admin1
            .rotate_account_keys(keyward::api::pb::RotateAccountKeysRequest {
                account_id: a_id.clone(),
                reason: String::new(),
            })
            .await
            .expect_err("no reason");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = market
            .rotate_account_keys(keyward::api::pb::RotateAccountKeysRequest {
                account_id: a_id.clone(),
                reason: "x".into(),
            })
            .await
            .expect_err("not an admin");
        assert_eq!(e.code(), Code::PermissionDenied);
        let rotated = admin1
            .rotate_account_keys(keyward::api::pb::RotateAccountKeysRequest {
                account_id: a_id.clone(),
                reason: "yearly rotation".into(),
            })
            .await
            .expect("rotate")
            .into_inner();
        assert_eq!((a.key_version, rotated.key_version), (1, 2));
        assert_ne!(rotated.eth_address, a.eth_address, "a new Ethereum address");
        assert_ne!(rotated.ed25519_public_key, a.ed25519_public_key);
        assert_eq!(ed_public(&d1, &env, &a_id).await, rotated.ed25519_public_key);
        let started = Instant::now();
        while ed_public(&d2, &env, &a_id).await != rotated.ed25519_public_key {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "replica 2 still signs with version 1"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let jwks = admin2
            .get_account_jwks(keyward::api::pb::GetAccountJwksRequest {
                account_id: a_id.clone(),
            })
            .await
            .expect("jwks")
            .into_inner();
        let jwks: keyward::crypto::jwk::Jwks = serde_json::from_str(&jwks.jwks_json).expect("JWKS");
        let xs: Vec<String> = jwks.keys.iter().map(|k| k.x.clone()).collect();
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        assert_eq!(jwks.keys.len(), 4, "two current keys, two retired: {xs:?}");
        assert_eq!(xs[0], b64(&rotated.ed25519_public_key), "the current Ed25519 key first");
        assert!(
            xs[2..].contains(&b64(&a.ed25519_public_key)),
            "the version 1 key stays: {xs:?}"
        );

        // Controller change, signed by the current controller and relayed by the wallet
        // gateway: pending for the deployment's delay (2 s here), then applied on every replica;
        // the sessions the old controller granted end with it.
        let wallet2 = Wallet::new(0x43);
        let change =
            |signature: Vec<u8>, valid_before: i64, prepare_only: bool| keyward::api::pb::ChangeControllerRequest {
                account_id: a_id.clone(),
                new_controller: wallet2.address().to_checksum(),
                valid_before,
                controller_signature: signature,
                prepare_only,
            };
        let mut gateway = d1.accounts(&env, "wallet-gateway").await;
        let valid_before = keyward::clock::unix_now() + 600;
        let prepared = gateway
            .change_controller(change(vec![], valid_before, true))
            .await
            .expect("prepare")
            .into_inner();
        assert_eq!(prepared.state, "unsigned");
        let e = gateway
            .change_controller(change(wallet2.sign(&prepared.typed_data_json), valid_before, false))
            .await
            .expect_err("signed by the new wallet, not the controller");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = gateway
            .change_controller(change(vec![], 0, false))
            .await
            .expect_err("the gateway cannot change a controller unsigned");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = gateway
            .change_controller(change(
                wallet.sign(&prepared.typed_data_json),
                keyward::clock::unix_now() - 1,
                false,
            ))
            .await
            .expect_err("expired");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let old_session = open_session(&d1, &env, &wallet, &a_id)
            .await
            .expect("session by the old controller");
        let pending = gateway
            .change_controller(change(wallet.sign(&prepared.typed_data_json), valid_before, false))
            .await
            .expect("signed change")
            .into_inner();
        assert_eq!((pending.state.as_str(), pending.controller_signed), ("pending", true));
        assert_eq!(pending.effective_at - pending.requested_at, 2);
        let e = admin1
            .change_controller(change(vec![], 0, false))
            .await
            .expect_err("one pending change at a time");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            controller_on(&d2, &env, &a_id).await,
            wallet.address().to_checksum(),
            "not yet"
        );
        let started = Instant::now();
        for d in [&d1, &d2] {
            while controller_on(d, &env, &a_id).await != wallet2.address().to_checksum() {
                assert!(started.elapsed() < Duration::from_secs(6), "the change was not applied");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let e = pay(&d2, &env, &old_session, "c-1")
            .await
            .expect_err("the old controller's session ended");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = open_session(&d2, &env, &wallet, &a_id)
            .await
            .expect_err("the old controller");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let new_session = open_session(&d2, &env, &wallet2, &a_id)
            .await
            .expect("the new controller");
        pay(&d1, &env, &new_session, "c-2").await.expect("pays");

        // An operator's change (no signature), cancelled before it takes effect.
        let e = market
            .change_controller(keyward::api::pb::ChangeControllerRequest {
                account_id: a_id.clone(),
                new_controller: wallet.address().to_checksum(),
                ..Default::default()
            })
            .await
            .expect_err("a listed client is no operator");
        assert!(matches!(e.code(), Code::PermissionDenied | Code::NotFound), "{e:?}");
        let by_operator = admin2
            .change_controller(keyward::api::pb::ChangeControllerRequest {
                account_id: a_id.clone(),
                new_controller: wallet.address().to_checksum(),
                ..Default::default()
            })
            .await
            .expect("operator change")
            .into_inner();
        assert_eq!(
            (by_operator.state.as_str(), by_operator.controller_signed),
            ("pending", false)
        );
        // The current controller (wallet2) objects: it signs the change's cancellation
        // document, and the wallet gateway relays it.
        let cancel = |signature: Vec<u8>, change_id: &str| keyward::api::pb::CancelControllerChangeRequest {
            account_id: a_id.clone(),
            change_id: change_id.into(),
            controller_signature: signature,
        };
        let doc = &by_operator.cancellation_typed_data_json;
        assert!(doc.contains("ControllerChangeCancellation"), "{doc}");
        let e = gateway
            .cancel_controller_change(cancel(vec![], ""))
            .await
            .expect_err("the gateway cannot cancel unsigned");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = gateway
            .cancel_controller_change(cancel(wallet.sign(doc), &by_operator.change_id))
            .await
            .expect_err("signed by the former controller");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let cancelled = gateway
            .cancel_controller_change(cancel(wallet2.sign(doc), &by_operator.change_id))
            .await
            .expect("the controller cancels")
            .into_inner();
        assert_eq!(
            (cancelled.state.as_str(), cancelled.change_id.as_str()),
            ("cancelled", by_operator.change_id.as_str())
        );
        // An operator cancels another operator's change; then nothing is pending.
        let again = admin2
            .change_controller(keyward::api::pb::ChangeControllerRequest {
                account_id: a_id.clone(),
                new_controller: wallet.address().to_checksum(),
                ..Default::default()
            })
            .await
            .expect("operator change")
            .into_inner();
        let e = gateway
            .cancel_controller_change(cancel(wallet2.sign(doc), &by_operator.change_id))
            .await
            .expect_err("a cancellation names its change: the old one does not cancel the new");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let cancelled = admin1
            .cancel_controller_change(cancel(vec![], ""))
            .await
            .expect("cancel")
            .into_inner();
        assert_eq!(cancelled.change_id, again.change_id);
        let e = admin1
            .cancel_controller_change(cancel(vec![], ""))
            .await
            .expect_err("nothing pending");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            controller_on(&d1, &env, &a_id).await,
            wallet2.address().to_checksum(),
            "the cancelled change never applies"
        );

        // List: filters, pages, and who may.
        let list = |req: ListAccountsRequest| {
            let mut c = admin2.clone();
            async move { c.list_accounts(req).await.map(|r| r.into_inner()) }
        };
        let by_label = list(ListAccountsRequest {
            label: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("list");
        assert_eq!(
            by_label
                .accounts
                .iter()
                .map(|a| a.account_id.clone())
                .collect::<Vec<_>>(),
            vec![b_id.clone()]
        );
        let by_controller = list(ListAccountsRequest {
            controller: wallet.address().to_checksum().to_lowercase(),
            ..Default::default()
        })
        .await
        .expect("list");
        assert_eq!(
            by_controller
                .accounts
                .iter()
                .map(|a| a.account_id.clone())
                .collect::<Vec<_>>(),
            vec![b_id.clone()],
            "alice has wallet2 now"
        );
        let first = list(ListAccountsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page 1");
        assert_eq!(first.accounts.len(), 1);
        assert!(!first.next_page_token.is_empty());
        let second = list(ListAccountsRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("page 2");
        let mut both = vec![
            first.accounts[0].account_id.clone(),
            second.accounts[0].account_id.clone(),
        ];
        both.sort();
        let mut want = vec![a_id.clone(), b_id.clone()];
        want.sort();
        assert_eq!(both, want);
        let third = list(ListAccountsRequest {
            page_size: 1,
            page_token: second.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("page 3");
        assert!(third.accounts.is_empty() && third.next_page_token.is_empty());
        let e = list(ListAccountsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("too big a page");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = market
            .list_accounts(ListAccountsRequest::default())
            .await
            .expect_err("not an admin");
        assert_eq!(e.code(), Code::PermissionDenied);

        // Through the binary, as an operator would.
        let (ok, out, err) = cli(
            &env,
            &d1,
            "admin",
            &["account", "freeze", &b_id, "--reason", "chargeback", "--json"],
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(
            (v["frozen"].as_bool(), v["frozen_reason"].as_str()),
            (Some(true), Some("chargeback"))
        );
        let (ok, out, err) = cli(&env, &d2, "admin", &["account", "list", "--label", "bob"]);
        assert!(ok, "{err}");
        assert!(out.contains(&b_id) && out.contains("frozen"), "{out}");
        let (ok, _, err) = cli(&env, &d2, "admin", &["account", "unfreeze", &b_id]);
        assert!(ok, "{err}");
        let (ok, _, err) = cli(&env, &d1, "marketplace", &["account", "freeze", &b_id, "--reason", "x"]);
        assert!(!ok && err.contains("PERMISSION_DENIED"), "{err}");

        // Delete bob: keys destroyed (crypto-shred), sessions revoked, only reads answer, on
        // both replicas; the row and the public keys stay.
        until(None, || sign(&d1, &env, &b_id)).await; // unfrozen on d2 above
        let bob_token = open_session(&d2, &env, &wallet, &b_id).await.expect("bob's session");
        pay(&d1, &env, &bob_token, "b-1").await.expect("bob pays");
        // A controller change is pending when bob is deleted: the deletion cancels it.
        admin1
            .change_controller(keyward::api::pb::ChangeControllerRequest {
                account_id: b_id.clone(),
                new_controller: wallet2.address().to_checksum(),
                ..Default::default()
            })
            .await
            .expect("pending change on bob");
        let (ok, _, err) = cli(&env, &d1, "admin", &["account", "delete", &b_id, "--reason", "closed"]);
        assert!(!ok && err.contains("--yes"), "{err}");
        let (ok, out, err) = cli(
            &env,
            &d2,
            "admin",
            &[
                "account",
                "delete",
                &b_id,
                "--reason",
                "customer closed the account",
                "--yes",
                "--json",
            ],
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert!(v["deleted_at"].as_i64().is_some(), "{v}");
        let e = sign(&d2, &env, &b_id).await.expect_err("deleted on d2");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("was deleted"), "{e:?}");
        until(Some(Code::NotFound), || sign(&d1, &env, &b_id)).await;
        let e = pay(&d1, &env, &bob_token, "b-2").await.expect_err("session revoked");
        assert!(
            matches!(
                e.code(),
                Code::FailedPrecondition | Code::NotFound | Code::PermissionDenied
            ),
            "{e:?}"
        );
        let e = open_session(&d1, &env, &wallet, &b_id)
            .await
            .expect_err("no new session");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let read = admin1
            .get_account(GetAccountRequest {
                account_id: b_id.clone(),
            })
            .await
            .expect("still readable")
            .into_inner();
        assert_eq!(read.ed25519_public_key, b.ed25519_public_key);
        assert!(read.deleted_at > 0);
        // Deleting again changes nothing; the list leaves it out unless asked.
        let again = admin1
            .delete_account(keyward::api::pb::DeleteAccountRequest {
                account_id: b_id.clone(),
                reason: "again".into(),
            })
            .await
            .expect("idempotent")
            .into_inner();
        assert_eq!(again.deleted_at, read.deleted_at);
        let listed = list(ListAccountsRequest::default()).await.expect("list");
        assert_eq!(
            listed.accounts.iter().map(|a| a.account_id.clone()).collect::<Vec<_>>(),
            vec![a_id.clone()]
        );
        let listed = list(ListAccountsRequest {
            include_deleted: true,
            ..Default::default()
        })
        .await
        .expect("list");
        assert_eq!(listed.accounts.len(), 2);
        // In the store: no wrapped key left, none counted under a KEK.
        let store = d1.state.keys.store().clone();
        let stored = store.get_account(&b_id).await.expect("read").expect("tombstone");
        let (pending, _) = store
            .cancel_controller_change_audited(&b_id, None, keyward::clock::unix_now(), None)
            .await
            .expect("store");
        assert_eq!(pending, None, "the deletion cancelled bob's pending controller change");
        assert!(stored.keys.iter().all(|k| k.wrapped.is_empty() && k.kek_version == 0));
        assert_eq!(stored.keys.len(), 2, "public keys stay");
        let counted: u64 = store.keys_per_kek().await.expect("count").iter().map(|(_, n)| n).sum();
        assert_eq!(counted, 4, "alice's two key versions only");

        // `keyward doctor` unwraps what is left (alice's current keys) and passes over bob.
        let config = env.config_path.to_str().expect("path").to_string();
        let (ok, out, err) = cli(&env, &d1, "admin", &["doctor", "--config", &config]);
        assert!(ok, "{out} {err}");
        assert!(
            out.contains("checked 1 accounts: 1 ok, 0 failed (1 deleted accounts have no keys to check)"),
            "{out}"
        );

        // The audit log: each change and each refusal, and it verifies.
        let events = store.audit().events_after(0, 10_000).await.expect("events");
        let of = |action: &str| -> Vec<&keyward::audit::event::Event> {
            events.iter().filter(|e| e.body.action == action).collect()
        };
        let freezes: Vec<_> = of("FreezeAccount")
            .into_iter()
            .filter(|e| e.body.decision == "allow")
            .collect();
        assert_eq!(
            freezes.len(),
            3,
            "alice (then again, changing nothing) and bob: {freezes:?}"
        );
        assert!(freezes.iter().all(|e| e.body.code == "OK"));
        let refusals: Vec<_> = events
            .iter()
            .filter(|e| e.body.code == "FAILED_PRECONDITION" && e.body.policies == vec!["account-frozen".to_string()])
            .collect();
        assert!(
            refusals.len() >= 4,
            "sign on d1, sign on d2, payment, session: {}",
            refusals.len()
        );
        assert!(refusals.iter().all(|e| e.body.account == a_id), "{refusals:#?}");
        assert_eq!(of("UnfreezeAccount").iter().filter(|e| e.body.code == "OK").count(), 2);
        assert!(of("UpdateAccount")
            .iter()
            .any(|e| e.body.code == "OK" && e.body.account == a_id));
        let rotations: Vec<_> = of("RotateAccountKeys")
            .into_iter()
            .filter(|e| e.body.code == "OK")
            .collect();
        assert_eq!(rotations.len(), 1);
        assert_eq!(
            rotations[0].body.digest,
            hex::encode(sha2::Sha256::digest(b"yearly rotation"))
        );
        assert_eq!(
            of("ChangeController").iter().filter(|e| e.body.code == "OK").count(),
            5,
            "prepared, signed, two operator changes on alice, one on bob"
        );
        let applied = of(keyward::audit::event::CONTROLLER_CHANGED);
        assert_eq!(applied.len(), 1, "{applied:?}");
        assert_eq!(applied[0].body.account, a_id);
        assert_eq!(
            of("CancelControllerChange")
                .iter()
                .filter(|e| e.body.code == "OK")
                .count(),
            2,
            "the controller's and an operator's"
        );
        let deletes: Vec<_> = of("DeleteAccount")
            .into_iter()
            .filter(|e| e.body.code == "OK")
            .collect();
        assert_eq!(deletes.len(), 2, "the deletion and its idempotent repeat");
        assert_eq!(
            deletes[0].body.digest,
            hex::encode(sha2::Sha256::digest(b"customer closed the account"))
        );
        let keys = keyward::audit::verify::store_keys(store.as_ref()).await.expect("keys");
        let report = keyward::audit::verify::verify_store(store.as_ref(), &keys)
            .await
            .expect("verify");
        assert!(report.ok(), "{report:?}");
        d2.stop().await;
        d1.stop().await;
    });
}

#[test]
fn lifecycle_sqlite() {
    lifecycle(StoreKind::Sqlite);
}

#[test]
fn lifecycle_postgres() {
    lifecycle(StoreKind::Postgres);
}

/// A key load that read the store before a change must not be cached after the eviction the
/// change caused (else the replica would serve the old record until the next change).
#[test]
fn a_load_older_than_an_eviction_is_not_cached() {
    let Some(env) = Env::new(Custody::Host, StoreKind::Sqlite) else {
        return;
    };
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let a = create_account(&d, &env, &[]).await;
        let keys = d.state.keys.account(&a.account_id).await.expect("keys");
        let cache = keyward::keys::KeyCache::new(4);
        // The load began (mark), then a change evicted the account, then the load finished.
        let mark = cache.mark();
        cache.remove(&a.account_id);
        let served = cache.insert_since(keys.clone(), Some(mark));
        assert!(
            std::sync::Arc::ptr_eq(&served, &keys),
            "the load still serves its request"
        );
        assert!(cache.get(&a.account_id).is_none(), "but is not cached");
        // A load with no removal since it began is cached.
        let mark = cache.mark();
        cache.insert_since(keys.clone(), Some(mark));
        assert!(cache.get(&a.account_id).is_some());
        d.stop().await;
    });
}

/// A secp256k1 key made by eth-account (a k256 key where eth-account is not installed, outside
/// CI): its 32 bytes in hex and its address as eth-account prints it.
fn foreign_secp256k1_key() -> (String, String) {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "from eth_account import Account\na = Account.create()\nprint(a.key.hex().removeprefix('0x'), a.address)",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let mut parts = text.split_whitespace();
            let key = parts.next().expect("key").to_string();
            let address = parts.next().expect("address").to_string();
            (key, address)
        }
        _ => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "eth-account is installed in CI"
            );
            eprintln!("SKIPPED eth-account key: python eth-account is not installed; using a k256 key");
            let key = k256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
            let address = keyward::crypto::eth::Address::from_public_key(key.verifying_key()).to_checksum();
            (hex::encode(key.to_bytes()), address)
        }
    }
}

/// Bring your own key, through the binary: the imported key is the account's (its address is
/// eth-account's, its signatures recover to it; an imported Ed25519 seed gives its public
/// key), a job serves once, a bad ciphertext is refused and uses the job up, and only
/// operators import.
fn import(custody: Custody, store: StoreKind) {
    let Some(env) = Env::new(custody, store) else { return };
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let (key_hex, address) = foreign_secp256k1_key();
        let key_file = env.dir.path().join("key.hex");
        std::fs::write(&key_file, &key_hex).expect("key file");
        let key_path = key_file.to_str().expect("path");
        let (ok, out, err) = cli(
            &env,
            &d,
            "admin",
            &[
                "account",
                "import",
                "--alg",
                "secp256k1",
                "--key-file",
                key_path,
                "--controller",
                CONTROLLER,
                "--label",
                "imported",
                "--json",
            ],
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(
            v["eth_address"],
            address.as_str(),
            "the account's address is the imported key's"
        );
        let account = v["account_id"].as_str().expect("id").to_string();
        let r = d
            .signing(&env, "admin")
            .await
            .sign_typed_data(keyward::api::pb::SignTypedDataRequest {
                account_id: account.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("signs")
            .into_inner();
        let digest: [u8; 32] = r.digest.as_slice().try_into().expect("digest");
        let signer = keyward::crypto::eth::recover_address(&digest, &r.signature).expect("recovers");
        assert_eq!(signer.to_checksum(), address);
        if let Some(recovered) = eth_account_recover(MAIL, &format!("0x{}", hex::encode(&r.signature))) {
            assert_eq!(recovered, address, "eth-account recovers the imported key's address");
        }

        // An Ed25519 seed.
        let seed = [0x5au8; 32];
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        std::fs::write(&key_file, hex::encode(seed)).expect("key file");
        let (ok, out, err) = cli(
            &env,
            &d,
            "admin",
            &[
                "account",
                "import",
                "--alg",
                "ed25519",
                "--key-file",
                key_path,
                "--controller",
                CONTROLLER,
                "--json",
            ],
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(v["ed25519_public_key"], format!("0x{}", hex::encode(public)));
        let ed_account = v["account_id"].as_str().expect("id").to_string();
        assert_eq!(
            ed_public(&d, &env, &ed_account).await,
            public.to_vec(),
            "it signs with the seed"
        );

        // A job serves once; a bad ciphertext uses it up; only operators import.
        let mut admin = d.accounts(&env, "admin").await;
        let job = admin
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await
            .expect("job")
            .into_inner();
        use rsa::pkcs8::DecodePublicKey as _;
        let transport = rsa::RsaPublicKey::from_public_key_der(&job.public_key_der).expect("RSA public key");
        let wrap = |bytes: &[u8]| {
            transport
                .encrypt(&mut rand::rngs::OsRng, rsa::Oaep::new::<sha1::Sha1>(), bytes)
                .expect("encrypt")
        };
        let request = |job_id: &str, wrapped_key: Vec<u8>| keyward::api::pb::ImportAccountRequest {
            job_id: job_id.into(),
            alg: "ed25519".into(),
            wrapped_key,
            controller: CONTROLLER.into(),
            ..Default::default()
        };
        admin
            .import_account(request(&job.job_id, wrap(&[7u8; 32])))
            .await
            .expect("import");
        let e = admin
            .import_account(request(&job.job_id, wrap(&[7u8; 32])))
            .await
            .expect_err("a job serves once");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("was used"), "{e:?}");
        let job = admin
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await
            .expect("job")
            .into_inner();
        let e = admin
            .import_account(request(&job.job_id, vec![0x42; 384]))
            .await
            .expect_err("not a ciphertext of this job");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = admin
            .import_account(request(&job.job_id, wrap(&[7u8; 32])))
            .await
            .expect_err("the job is used up");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = d
            .accounts(&env, "marketplace")
            .await
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await
            .expect_err("not an operator");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

        // Every import is in the audit log under its job and names its account.
        let store = d.state.keys.store().clone();
        let events = store.audit().events_after(0, 10_000).await.expect("events");
        let imports: Vec<_> = events
            .iter()
            .filter(|e| e.body.action == "ImportAccount" && e.body.code == "OK")
            .collect();
        assert_eq!(imports.len(), 3);
        assert!(imports.iter().any(|e| e.body.account == account));
        assert!(imports.iter().all(|e| e.body.signature_ref.starts_with("import-job:")));
        d.stop().await;
    });
}

#[test]
fn import_hsm_custody_sqlite() {
    import(Custody::Hsm, StoreKind::Sqlite);
}

#[test]
fn import_host_custody_postgres() {
    import(Custody::Host, StoreKind::Postgres);
}

/// An import job nobody uses leaves no transport key on the token past its expiry: the next
/// job this replica makes destroys it; the expired job is refused.
#[test]
fn abandoned_import_jobs_leave_no_transport_key() {
    let Some(env) = Env::new(Custody::Host, StoreKind::Sqlite) else {
        return;
    };
    block_on(async {
        env.init().await;
        let clock = std::sync::Arc::new(keyward::clock::ManualClock::new(keyward::clock::unix_now()));
        let d = env.start_with_clock(clock.clone()).await;
        let mut admin = d.accounts(&env, "admin").await;
        let on_token = || {
            let hsm = d.state.keys.hsm().clone();
            async move {
                tokio::task::spawn_blocking(move || hsm.transport_jobs())
                    .await
                    .expect("task")
                    .expect("transport jobs")
            }
        };
        let abandoned = admin
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await
            .expect("job")
            .into_inner();
        assert_eq!(on_token().await, vec![abandoned.job_id.clone()]);
        clock.advance(3601);
        let next = admin
            .create_import_job(keyward::api::pb::CreateImportJobRequest {})
            .await
            .expect("job")
            .into_inner();
        assert_eq!(
            on_token().await,
            vec![next.job_id.clone()],
            "the expired job's key is gone"
        );
        let e = admin
            .import_account(keyward::api::pb::ImportAccountRequest {
                job_id: abandoned.job_id.clone(),
                alg: "ed25519".into(),
                wrapped_key: vec![1; 384],
                controller: CONTROLLER.into(),
                ..Default::default()
            })
            .await
            .expect_err("expired");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("expired"), "{e:?}");
        d.stop().await;
    });
}
