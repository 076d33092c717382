//! End-to-end: a real daemon (in process), a real SoftHSM token, real mTLS,
//! a real SQLite file or PostgreSQL schema. Every signature is checked by an
//! independent verifier.

mod common;

use common::*;
use ed25519_dalek::Verifier as _;
use keyward::api::pb::{
    CreateAccountRequest, GetAccountRequest, SignMessageRequest, SignTypedDataRequest, SignatureAlgorithm,
};
use keyward::config::Custody;
use keyward::crypto::eth::{recover_address, Address};
use tonic::Code;

fn sign_mail_and_message(custody: Custody, store: StoreKind) {
    let Some(env) = Env::new(custody, store) else { return };
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        assert_eq!(account.controller, CONTROLLER);
        assert_eq!(account.secp256k1_public_key.len(), 33);
        assert_eq!(account.ed25519_public_key.len(), 32);
        let eth = Address::parse(&account.eth_address).expect("address");
        assert_eq!(eth.to_checksum(), account.eth_address, "EIP-55 checksummed");

        let mut signer = d.signing(&env, "admin").await;
        let r = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("typed data signed")
            .into_inner();
        assert_eq!(
            hex::encode(&r.digest),
            "be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2",
            "EIP-712 spec digest"
        );
        assert_eq!(r.signature.len(), 65);
        assert!(r.signature[64] == 27 || r.signature[64] == 28);
        let digest: [u8; 32] = r.digest.as_slice().try_into().expect("32 bytes");
        assert_eq!(recover_address(&digest, &r.signature).expect("low-s, recovers"), eth);
        assert_eq!(r.signer, account.eth_address);
        if let Some(addr) = eth_account_recover(MAIL, &format!("0x{}", hex::encode(&r.signature))) {
            assert_eq!(addr, account.eth_address, "eth-account recovers the account address");
        }

        // Several signatures: every one low-s and recovering (HSM output is
        // normalised; about half of raw HSM signatures are high-s).
        for i in 0..16u8 {
            let r = signer
                .sign_message(SignMessageRequest {
                    account_id: account.account_id.clone(),
                    alg: SignatureAlgorithm::Secp256k1 as i32,
                    data: vec![i; 5],
                })
                .await
                .expect("personal_sign")
                .into_inner();
            let digest = keyward::crypto::eth::personal_message_digest(&[i; 5]);
            assert_eq!(recover_address(&digest, &r.signature).expect("recovers"), eth);
        }

        let r = signer
            .sign_message(SignMessageRequest {
                account_id: account.account_id.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: b"hello".to_vec(),
            })
            .await
            .expect("ed25519 signed")
            .into_inner();
        let pk: [u8; 32] = account.ed25519_public_key.as_slice().try_into().expect("32");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("public key");
        let sig = ed25519_dalek::Signature::from_slice(&r.signature).expect("64 bytes");
        vk.verify(&keyward::crypto::message::ed25519_message(b"hello"), &sig)
            .expect("ed25519 verifies over the prefixed message");
        assert!(vk.verify(b"hello", &sig).is_err(), "never over the bare bytes");
        assert!(vk
            .verify(&keyward::crypto::message::ed25519_message(b"hellO"), &sig)
            .is_err());
        d.stop().await;
    });
}

#[test]
fn sign_hsm_custody_sqlite() {
    sign_mail_and_message(Custody::Hsm, StoreKind::Sqlite);
}

#[test]
fn sign_host_custody_sqlite() {
    sign_mail_and_message(Custody::Host, StoreKind::Sqlite);
}

#[test]
fn sign_hsm_custody_postgres() {
    sign_mail_and_message(Custody::Hsm, StoreKind::Postgres);
}

#[test]
fn sign_host_custody_postgres() {
    sign_mail_and_message(Custody::Host, StoreKind::Postgres);
}

#[test]
fn authorization_is_deny_by_default() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        // A known client that is not an admin cannot create accounts.
        let err = d
            .accounts(&env, "marketplace")
            .await
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: String::new(),
                allow: vec![],
            })
            .await
            .expect_err("not an admin");
        assert_eq!(err.code(), Code::PermissionDenied);

        let account = create_account(&d, &env, &["spiffe://example.org/marketplace"]).await;
        let sign = |profile: &'static str| {
            let id = account.account_id.clone();
            let d = &d;
            let env = &env;
            async move {
                d.signing(env, profile)
                    .await
                    .sign_message(SignMessageRequest {
                        account_id: id,
                        alg: SignatureAlgorithm::Ed25519 as i32,
                        data: b"x".to_vec(),
                    })
                    .await
            }
        };
        assert!(sign("admin").await.is_ok(), "creator (an operator) may sign");
        // Listed, but a marketplace client signs only inside a session (default policy set).
        let err = sign("marketplace").await.expect_err("outside a session");
        assert_eq!(err.code(), Code::PermissionDenied);
        // Listed clients still read the account.
        d.accounts(&env, "marketplace")
            .await
            .get_account(GetAccountRequest {
                account_id: account.account_id.clone(),
            })
            .await
            .expect("listed identity reads the account");
        assert_eq!(
            sign("wallet-gateway").await.expect_err("not listed").code(),
            Code::PermissionDenied
        );
        let err = d
            .accounts(&env, "wallet-gateway")
            .await
            .get_account(GetAccountRequest {
                account_id: account.account_id.clone(),
            })
            .await
            .expect_err("not listed");
        assert_eq!(err.code(), Code::PermissionDenied);
        // Unknown account: NOT_FOUND; malformed id: INVALID_ARGUMENT.
        let err = d
            .accounts(&env, "admin")
            .await
            .get_account(GetAccountRequest {
                account_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .expect_err("no such account");
        assert_eq!(err.code(), Code::NotFound);
        let err = d
            .accounts(&env, "admin")
            .await
            .get_account(GetAccountRequest {
                account_id: "../etc".into(),
            })
            .await
            .expect_err("bad id");
        assert_eq!(err.code(), Code::InvalidArgument);
        d.stop().await;
    });
}

#[test]
fn malformed_requests_are_invalid_argument_and_daemon_keeps_serving() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        let mail: serde_json::Value = serde_json::from_str(MAIL).expect("json");
        let mut unknown_type = mail.clone();
        unknown_type["types"]["Mail"][0]["type"] = "Persona".into();
        let mut missing_field = mail.clone();
        missing_field["message"]
            .as_object_mut()
            .expect("object")
            .remove("contents");
        let mut uint8 = mail.clone();
        uint8["types"]["Mail"]
            .as_array_mut()
            .expect("array")
            .push(serde_json::json!({"name": "n", "type": "uint8"}));
        uint8["message"]["n"] = 256.into();
        let mut bad_address = mail.clone();
        bad_address["message"]["to"]["wallet"] = "0x1234".into();
        let mut cyclic = mail.clone();
        cyclic["types"]["Person"]
            .as_array_mut()
            .expect("array")
            .push(serde_json::json!({"name": "mail", "type": "Mail"}));
        // Over the 256 KiB document cap, under the 1 MiB message cap.
        let huge = format!("{{\"types\":{{}},\"pad\":\"{}\"}}", "a".repeat(300 * 1024));
        let cases: Vec<(String, &str)> = vec![
            (unknown_type.to_string(), "typed_data_json"),
            (missing_field.to_string(), "contents"),
            (uint8.to_string(), "message.n"),
            (bad_address.to_string(), "message.to.wallet"),
            (cyclic.to_string(), "typed_data_json"),
            (huge, "typed_data_json"),
            ("not json".into(), "typed_data_json"),
        ];
        let mut signer = d.signing(&env, "admin").await;
        for (doc, field) in cases {
            let err = signer
                .sign_typed_data(SignTypedDataRequest {
                    account_id: account.account_id.clone(),
                    typed_data_json: doc,
                    ..Default::default()
                })
                .await
                .expect_err("malformed");
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
            assert!(
                err.message().contains(field),
                "message {:?} names {field}",
                err.message()
            );
        }
        // Unspecified algorithm and oversized message.
        for (alg, data) in [
            (SignatureAlgorithm::Unspecified, vec![1u8]),
            (SignatureAlgorithm::Ed25519, vec![0u8; 70 * 1024]),
        ] {
            let err = signer
                .sign_message(SignMessageRequest {
                    account_id: account.account_id.clone(),
                    alg: alg as i32,
                    data,
                })
                .await
                .expect_err("invalid");
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        // Bad controller address.
        let err = d
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD827".into(),
                label: String::new(),
                allow: vec![],
            })
            .await
            .expect_err("bad checksum");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("controller"));
        // Still serving.
        signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("still serving");
        d.stop().await;
    });
}

fn restart_keeps_accounts(store: StoreKind, custody: Custody) {
    let Some(env) = Env::new(custody, store) else { return };
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        d.stop().await;
        let d = env.start().await;
        let r = d
            .signing(&env, "admin")
            .await
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("signs after restart")
            .into_inner();
        let digest: [u8; 32] = r.digest.as_slice().try_into().expect("32");
        assert_eq!(
            recover_address(&digest, &r.signature).expect("recovers").to_checksum(),
            account.eth_address
        );
        d.stop().await;
    });
}

#[test]
fn restart_keeps_accounts_sqlite() {
    restart_keeps_accounts(StoreKind::Sqlite, Custody::Hsm);
}

#[test]
fn restart_keeps_accounts_postgres() {
    restart_keeps_accounts(StoreKind::Postgres, Custody::Host);
}

fn swapped_blob_never_signs(custody: Custody) {
    let env = Env::new(custody, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let a = create_account(&d, &env, &[]).await;
        let b = create_account(&d, &env, &[]).await;
        d.stop().await;
        // Move b's wrapped keys into a's rows, straight in the SQLite file.
        let pool = sqlx::SqlitePool::connect(&env.store_url).await.expect("sqlite");
        for alg in ["secp256k1", "ed25519"] {
            let blob: Vec<u8> = sqlx::query_scalar("SELECT wrapped FROM account_keys WHERE account_id = ? AND alg = ?")
                .bind(&b.account_id)
                .bind(alg)
                .fetch_one(&pool)
                .await
                .expect("b's blob");
            sqlx::query("UPDATE account_keys SET wrapped = ? WHERE account_id = ? AND alg = ?")
                .bind(blob)
                .bind(&a.account_id)
                .bind(alg)
                .execute(&pool)
                .await
                .expect("swap");
        }
        pool.close().await;
        let d = env.start().await;
        let mut signer = d.signing(&env, "admin").await;
        for alg in [SignatureAlgorithm::Secp256k1, SignatureAlgorithm::Ed25519] {
            let err = signer
                .sign_message(SignMessageRequest {
                    account_id: a.account_id.clone(),
                    alg: alg as i32,
                    data: b"x".to_vec(),
                })
                .await
                .expect_err("swapped blob must not sign");
            assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
            assert!(err.message().contains("does not match"), "{}", err.message());
        }
        // b itself still signs.
        signer
            .sign_message(SignMessageRequest {
                account_id: b.account_id.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: b"x".to_vec(),
            })
            .await
            .expect("b signs");
        d.stop().await;
    });
}

#[test]
fn swapped_blob_never_signs_hsm() {
    swapped_blob_never_signs(Custody::Hsm);
}

#[test]
fn swapped_blob_never_signs_host() {
    swapped_blob_never_signs(Custody::Host);
}

#[test]
fn token_holds_no_extractable_plain_private_key() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let a = create_account(&d, &env, &[]).await;
        let mut signer = d.signing(&env, "admin").await;
        for alg in [SignatureAlgorithm::Secp256k1, SignatureAlgorithm::Ed25519] {
            signer
                .sign_message(SignMessageRequest {
                    account_id: a.account_id.clone(),
                    alg: alg as i32,
                    data: b"x".to_vec(),
                })
                .await
                .expect("signs");
        }
        // Inspect through PKCS#11 from a second session of this process.
        let hsm = keyward::server::open_hsm(&env.config()).await.expect("hsm");
        let objects = tokio::task::spawn_blocking(move || hsm.inspect_private_keys())
            .await
            .expect("task")
            .expect("inspect");
        assert!(
            objects
                .iter()
                .any(|o| o.label.starts_with("keyward-kek") && o.sensitive && !o.user_can_export()),
            "the KEK is there, sensitive, and exportable only under a trusted key: {objects:?}"
        );
        for o in &objects {
            assert!(
                o.sensitive || !o.extractable,
                "key object {o:?} is extractable and not sensitive"
            );
            if o.token {
                assert!(
                    o.label.starts_with("keyward-kek") || o.label.starts_with("keyward-issuer-"),
                    "only KEKs and issuer keys are token objects, never account keys: {o:?}"
                );
            }
        }
        d.stop().await;
    });
}

#[test]
fn hsm_failure_mid_run_is_unavailable_not_a_crash() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        create_account(&d, &env, &[]).await;
        // Pull the token out from under the daemon.
        std::fs::remove_dir_all(env.token.dir.path().join("tokens")).expect("remove token");
        let err = d
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: String::new(),
                allow: vec![],
            })
            .await
            .expect_err("token is gone");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        // The daemon still answers health checks and other RPCs.
        let err = d
            .accounts(&env, "admin")
            .await
            .get_account(GetAccountRequest {
                account_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), Code::NotFound);
        d.stop().await;
    });
}
