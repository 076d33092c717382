//! Delegated sessions end to end: a real daemon, a real SoftHSM token, real
//! mTLS, real stores; the controller wallet is a software secp256k1 key that
//! signs exactly the typed data the daemon returned.

mod common;

use std::sync::Arc;

use common::*;
use k256::ecdsa::Signature;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, GetSessionRequest, ListSessionsRequest, OpenSessionRequest,
    RevokeSessionRequest, SessionState, SignPaymentRequest, SignTypedDataRequest,
};
use keyward::clock::{Clock, ManualClock};
use keyward::config::Custody;
use keyward::crypto::eip712::TypedData;
use keyward::crypto::eth::recover_address;
use tonic::transport::Channel;
use tonic::Code;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const OTHER_MANIFEST: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const START: i64 = 1_800_000_000;

struct Story {
    env: Env,
    daemon: Daemon,
    clock: Arc<ManualClock>,
    wallet: Wallet,
    account_id: String,
    eth_address: String,
}

impl Story {
    async fn start(env: Env) -> Story {
        env.init().await;
        let clock = Arc::new(ManualClock::new(START));
        let daemon = env.start_with_clock(clock.clone()).await;
        let wallet = Wallet::new(0x42);
        let account = daemon
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: wallet.address().to_checksum(),
                label: "alice".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner();
        Story {
            env,
            daemon,
            clock,
            wallet,
            account_id: account.account_id,
            eth_address: account.eth_address,
        }
    }

    async fn sessions(&self, profile: &str) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.daemon.channel(&self.env, profile).await)
    }

    async fn challenge(&self, scopes: &[&str], cap: &str, ttl: u64) -> Result<(String, String), tonic::Status> {
        let r = self
            .sessions("wallet-gateway")
            .await
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: self.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                cap: cap.into(),
                ttl_seconds: ttl,
            })
            .await?
            .into_inner();
        Ok((r.challenge_id, r.typed_data_json))
    }

    async fn open(&self, challenge_id: &str, signature: Vec<u8>) -> Result<(String, String), tonic::Status> {
        let r = self
            .sessions("wallet-gateway")
            .await
            .open_session(OpenSessionRequest {
                challenge_id: challenge_id.into(),
                signature,
            })
            .await?
            .into_inner();
        let s = r.session.expect("session");
        Ok((s.session_id, r.token))
    }

    /// The story's default session: 0-100 per payment, one manifest, cap 1000, 30 minutes.
    async fn session(&self, cap: &str) -> (String, String) {
        let license = format!("license:manifest:{MANIFEST}");
        let (id, typed) = self
            .challenge(&["payments:0-100", &license], cap, 1800)
            .await
            .expect("challenge");
        self.open(&id, self.wallet.sign(&typed)).await.expect("open")
    }

    async fn pay(
        &self,
        profile: &str,
        token: &str,
        amount: &str,
        manifest: &str,
        request_id: &str,
    ) -> Result<keyward::api::pb::SignPaymentResponse, tonic::Status> {
        self.daemon
            .signing(&self.env, profile)
            .await
            .sign_payment(SignPaymentRequest {
                session_token: token.into(),
                amount: amount.into(),
                currency: "USDC".into(),
                manifest: manifest.into(),
                license_id: "lic-7".into(),
                payee: String::new(),
                request_id: request_id.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn remaining(&self, session_id: &str) -> (String, u64, i32) {
        let s = self
            .sessions("wallet-gateway")
            .await
            .get_session(GetSessionRequest {
                session_id: session_id.into(),
            })
            .await
            .expect("session")
            .into_inner();
        (s.remaining, s.uses, s.state)
    }
}

#[test]
fn full_story_payment_within_bounds_then_revoke() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (session_id, token) = st.session("1000").await;
        let r = st
            .pay("marketplace", &token, "40", MANIFEST, "")
            .await
            .expect("payment signed");
        assert_eq!(r.remaining, "960");
        assert_eq!(r.nonce, 1);
        // The signature is the account's, over the Payment document returned.
        let typed = TypedData::from_json_str(&r.typed_data_json).expect("payment document");
        assert_eq!(typed.primary_type(), "Payment");
        assert_eq!(typed.signing_hash().to_vec(), r.digest);
        let digest: [u8; 32] = r.digest.as_slice().try_into().expect("32");
        assert_eq!(
            recover_address(&digest, &r.signature).expect("recovers").to_checksum(),
            st.eth_address
        );
        if let Some(addr) = eth_account_recover(&r.typed_data_json, &format!("0x{}", hex::encode(&r.signature))) {
            assert_eq!(addr, st.eth_address);
        }
        assert_eq!(
            st.remaining(&session_id).await,
            ("960".to_string(), 1, SessionState::Active as i32)
        );

        let list = st
            .sessions("admin")
            .await
            .list_sessions(ListSessionsRequest {
                account_id: st.account_id.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.sessions.len(), 1);
        assert_eq!(list.sessions[0].session_id, session_id);

        // Revocation by the account's admin takes effect at once.
        let revoked = st
            .sessions("admin")
            .await
            .revoke_session(RevokeSessionRequest {
                session_id: session_id.clone(),
                controller_signature: vec![],
            })
            .await
            .expect("revoke")
            .into_inner();
        assert_eq!(revoked.state, SessionState::Revoked as i32);
        let err = st
            .pay("marketplace", &token, "1", MANIFEST, "")
            .await
            .expect_err("revoked");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        st.daemon.stop().await;
    });
}

#[test]
fn opening_refusals_spend_nothing() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let license = format!("license:manifest:{MANIFEST}");
        let (id, typed) = st
            .challenge(&["payments:0-100", &license], "1000", 1800)
            .await
            .expect("challenge");

        // Another wallet's signature.
        let err = st
            .open(&id, Wallet::new(7).sign(&typed))
            .await
            .expect_err("wrong signer");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        // The controller's signature over altered typed data (a bigger cap).
        let altered = typed.replace("\"cap\":\"1000\"", "\"cap\":\"1000000\"");
        assert_ne!(altered, typed);
        let err = st.open(&id, st.wallet.sign(&altered)).await.expect_err("altered");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        // A malleable (high-s) form of the controller's own valid signature.
        let good = st.wallet.sign(&typed);
        let sig = Signature::from_slice(&good[..64]).expect("sig");
        let high = Signature::from_scalars(sig.r(), -*sig.s()).expect("high-s");
        let mut malleable = high.to_bytes().to_vec();
        malleable.push(if good[64] == 27 { 28 } else { 27 });
        let err = st.open(&id, malleable).await.expect_err("high-s");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        // Garbage.
        let err = st.open(&id, vec![1, 2, 3]).await.expect_err("short");
        assert_eq!(err.code(), Code::InvalidArgument);

        // None of that consumed the challenge: the right signature opens it.
        let (session_id, _) = st.open(&id, good.clone()).await.expect("opens after refusals");
        assert_eq!(st.remaining(&session_id).await.0, "1000");
        // Second open of the same challenge.
        let err = st.open(&id, good).await.expect_err("reused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

        // An expired challenge (default TTL 300 s).
        let (id, typed) = st
            .challenge(&["payments:0-100", &license], "1000", 1800)
            .await
            .expect("challenge");
        st.clock.advance(301);
        let err = st.open(&id, st.wallet.sign(&typed)).await.expect_err("expired");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        let err = st
            .sessions("wallet-gateway")
            .await
            .open_session(OpenSessionRequest {
                challenge_id: uuid::Uuid::new_v4().to_string(),
                signature: vec![0; 65],
            })
            .await
            .expect_err("unknown challenge");
        assert_eq!(err.code(), Code::NotFound);
        st.daemon.stop().await;
    });
}

#[test]
fn malformed_challenges_are_refused_up_front() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        for (scopes, cap, ttl) in [
            (vec!["payments:100-0"], "10", 60),
            (vec!["license:manifest:xyz"], "10", 60),
            (vec!["typed-data:1:0x12"], "10", 60),
            (vec!["admin:*"], "10", 60),
            (vec![], "10", 60),
            (vec!["payments:0-1"], "-5", 60),
            (vec!["payments:0-1"], "0", 60),
            (vec!["payments:0-1"], "340282366920938463463374607431768211456", 60),
            (vec!["payments:0-1"], "10", 0),
            (vec!["payments:0-1"], "10", 10 * 86_400),
        ] {
            let err = st.challenge(&scopes, cap, ttl).await.expect_err("malformed");
            assert_eq!(
                err.code(),
                Code::InvalidArgument,
                "{scopes:?} {cap} {ttl}: {}",
                err.message()
            );
        }
        // Identities not allowed on the account cannot ask for challenges.
        let err = st
            .sessions("marketplace")
            .await
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: st.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec!["payments:0-1".into()],
                cap: "1".into(),
                ttl_seconds: 60,
            })
            .await
            .expect_err("not a gateway");
        assert_eq!(err.code(), Code::PermissionDenied);
        st.daemon.stop().await;
    });
}

#[test]
fn scope_violations_are_refused_and_spend_nothing() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (session_id, token) = st.session("150").await;
        let cases = [
            (
                "marketplace",
                "101",
                MANIFEST,
                Code::PermissionDenied,
                "amount out of range",
            ),
            (
                "marketplace",
                "5",
                OTHER_MANIFEST,
                Code::PermissionDenied,
                "other manifest",
            ),
            ("admin", "5", MANIFEST, Code::PermissionDenied, "other delegate"),
            ("marketplace", "5.5", MANIFEST, Code::InvalidArgument, "not an integer"),
        ];
        for (profile, amount, manifest, code, what) in cases {
            let err = st.pay(profile, &token, amount, manifest, "").await.expect_err(what);
            assert_eq!(err.code(), code, "{what}: {}", err.message());
        }
        assert_eq!(st.remaining(&session_id).await.0, "150", "refusals spent nothing");
        // Cap exhausted.
        st.pay("marketplace", &token, "100", MANIFEST, "")
            .await
            .expect("100 of 150");
        let err = st
            .pay("marketplace", &token, "51", MANIFEST, "")
            .await
            .expect_err("cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        st.pay("marketplace", &token, "50", MANIFEST, "")
            .await
            .expect("exactly the rest");
        assert_eq!(st.remaining(&session_id).await.0, "0");
        // Expired.
        let (_, token2) = st.session("1000").await;
        st.clock.advance(1801);
        let err = st
            .pay("marketplace", &token2, "1", MANIFEST, "")
            .await
            .expect_err("expired");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        st.daemon.stop().await;
    });
}

/// A grant that names its currency and payees: a payment in another currency, or to another
/// payee (or to none), is refused naming the scope, and spends nothing; the SessionGrant the
/// wallet signs shows both. A grant without a currency still pays in any (sessions granted
/// before currencies were named keep working).
#[test]
fn currency_and_payee_scopes_bound_payments() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let payee = "0x1111111111111111111111111111111111111111";
        let license = format!("license:manifest:{MANIFEST}");
        let payee_scope = format!("payee:{payee}");
        let (id, typed) = st
            .challenge(&["payments:USDC:0-100", &payee_scope, &license], "150", 1800)
            .await
            .expect("challenge");
        let shown: serde_json::Value = serde_json::from_str(&typed).expect("typed data");
        assert_eq!(
            shown["message"]["scopes"],
            serde_json::json!(["payments:USDC:0-100", payee_scope, license]),
            "the wallet sees the currency and the payee it grants"
        );
        let (session_id, token) = st.open(&id, st.wallet.sign(&typed)).await.expect("open");
        let pay = |currency: &'static str, to: &'static str, amount: &'static str| {
            let (st, token) = (&st, token.clone());
            async move {
                st.daemon
                    .signing(&st.env, "marketplace")
                    .await
                    .sign_payment(SignPaymentRequest {
                        session_token: token,
                        amount: amount.into(),
                        currency: currency.into(),
                        manifest: MANIFEST.into(),
                        license_id: "lic-7".into(),
                        payee: to.into(),
                        request_id: String::new(),
                    })
                    .await
            }
        };
        for (currency, to, amount, needle, what) in [
            ("EUR", payee, "5", "spends in EUR are not granted", "another currency"),
            (
                "USDC",
                "0x2222222222222222222222222222222222222222",
                "5",
                "is not one of the session's payee scopes",
                "another payee",
            ),
            ("USDC", "", "5", "is not one of the session's payee scopes", "no payee"),
            (
                "USDC",
                payee,
                "101",
                "outside every payments scope",
                "above the currency's bound",
            ),
        ] {
            let err = pay(currency, to, amount).await.expect_err(what);
            assert_eq!(err.code(), Code::PermissionDenied, "{what}: {}", err.message());
            assert!(err.message().contains(needle), "{what}: {}", err.message());
        }
        assert_eq!(st.remaining(&session_id).await.0, "150", "refusals spent nothing");
        pay("USDC", payee, "100").await.expect("in currency, to the payee");
        assert_eq!(st.remaining(&session_id).await.0, "50");

        // The grant without a currency: any currency, any payee.
        let (_, legacy) = st.session("1000").await;
        st.daemon
            .signing(&st.env, "marketplace")
            .await
            .sign_payment(SignPaymentRequest {
                session_token: legacy,
                amount: "5".into(),
                currency: "EUR".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                payee: "0x2222222222222222222222222222222222222222".into(),
                request_id: String::new(),
            })
            .await
            .expect("an asset-less grant pays in any currency");
        st.daemon.stop().await;
    });
}

#[test]
fn altered_tokens_are_unauthenticated() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (_, token) = st.session("1000").await;
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).expect("b64")).expect("json");
        claims["cap"] = "1000000".into();
        let forged_claims = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
        let mut sig = b64.decode(parts[2]).expect("b64");
        sig[0] ^= 1;
        let forged_sig = format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig));
        let none_alg = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"keyward-session+jwt"}"#),
            parts[1]
        );
        for (what, t) in [
            ("claims", forged_claims),
            ("signature", forged_sig),
            ("alg none", none_alg),
            ("garbage", "x.y.z".to_string()),
        ] {
            let err = st.pay("marketplace", &t, "1", MANIFEST, "").await.expect_err(what);
            assert_eq!(err.code(), Code::Unauthenticated, "{what}: {}", err.message());
        }
        st.pay("marketplace", &token, "1", MANIFEST, "")
            .await
            .expect("the real token works");
        st.daemon.stop().await;
    });
}

#[test]
fn idempotent_retry_returns_the_same_result_and_spends_once() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (session_id, token) = st.session("1000").await;
        let first = st
            .pay("marketplace", &token, "40", MANIFEST, "order-1")
            .await
            .expect("first");
        let again = st
            .pay("marketplace", &token, "40", MANIFEST, "order-1")
            .await
            .expect("retry");
        assert_eq!(first, again, "same response, byte for byte");
        assert_eq!(
            st.remaining(&session_id).await,
            ("960".to_string(), 1, SessionState::Active as i32)
        );
        let err = st
            .pay("marketplace", &token, "41", MANIFEST, "order-1")
            .await
            .expect_err("other body");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert_eq!(st.remaining(&session_id).await.0, "960");
        st.daemon.stop().await;
    });
}

fn cap_race(store: StoreKind) {
    let Some(env) = Env::new(Custody::Host, store) else {
        return;
    };
    block_on(async {
        let st = Arc::new(Story::start(env).await);
        let (session_id, token) = st.session("1000").await;
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(st.daemon.signing(&st.env, "marketplace").await);
        }
        let mut tasks = Vec::new();
        for i in 0..200usize {
            let mut c = clients[i % clients.len()].clone();
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                c.sign_payment(SignPaymentRequest {
                    session_token: token,
                    amount: "7".into(),
                    currency: "USDC".into(),
                    manifest: MANIFEST.into(),
                    license_id: "lic".into(),
                    payee: String::new(),
                    request_id: format!("race-{i}"),
                })
                .await
            }));
        }
        let (mut ok, mut exhausted) = (0, 0);
        let mut nonces = std::collections::BTreeSet::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(r) => {
                    ok += 1;
                    assert!(nonces.insert(r.into_inner().nonce), "nonces are unique");
                }
                Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!((ok, exhausted), (142, 58), "floor(1000 / 7) succeed, never more");
        assert_eq!(
            st.remaining(&session_id).await,
            ("6".to_string(), 142, SessionState::Active as i32)
        );
        // Stopped, not dropped at exit: the HSM's threads end before the process does.
        match Arc::try_unwrap(st) {
            Ok(st) => st.daemon.stop().await,
            Err(_) => panic!("the daemon is still shared"),
        }
    });
}

#[test]
fn cap_race_sqlite() {
    cap_race(StoreKind::Sqlite);
}

#[test]
fn cap_race_postgres() {
    cap_race(StoreKind::Postgres);
}

#[test]
fn controller_revokes_with_its_own_signature() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (session_id, token) = st.session("1000").await;
        let s = st
            .sessions("wallet-gateway")
            .await
            .get_session(GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        let doc = s.revocation_typed_data_json;
        assert!(doc.contains("SessionRevocation"));
        // Without a signature the gateway may not revoke; with a stranger's it is refused.
        let mut c = st.sessions("wallet-gateway").await;
        let err = c
            .revoke_session(RevokeSessionRequest {
                session_id: session_id.clone(),
                controller_signature: vec![],
            })
            .await
            .expect_err("no signature");
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = c
            .revoke_session(RevokeSessionRequest {
                session_id: session_id.clone(),
                controller_signature: Wallet::new(9).sign(&doc),
            })
            .await
            .expect_err("stranger");
        assert_eq!(err.code(), Code::PermissionDenied);
        st.pay("marketplace", &token, "1", MANIFEST, "")
            .await
            .expect("still active");
        let r = c
            .revoke_session(RevokeSessionRequest {
                session_id: session_id.clone(),
                controller_signature: st.wallet.sign(&doc),
            })
            .await
            .expect("controller revokes")
            .into_inner();
        assert_eq!(r.state, SessionState::Revoked as i32);
        assert!(r.revoked_by.starts_with("controller:"));
        let err = st
            .pay("marketplace", &token, "1", MANIFEST, "")
            .await
            .expect_err("revoked");
        assert_eq!(err.code(), Code::FailedPrecondition);
        st.daemon.stop().await;
    });
}

#[test]
fn typed_data_inside_a_session_needs_a_domain_scope() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (id, typed) = st
            .challenge(
                &["typed-data:1:0xcccccccccccccccccccccccccccccccccccccccc:unbounded"],
                "1",
                600,
            )
            .await
            .expect("challenge");
        let (session_id, token) = st.open(&id, st.wallet.sign(&typed)).await.expect("open");
        let mut signer = st.daemon.signing(&st.env, "marketplace").await;
        let r = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: st.account_id.clone(),
                typed_data_json: MAIL.into(),
                session_token: token.clone(),
                request_id: "mail-1".into(),
            })
            .await
            .expect("Mail's domain is covered")
            .into_inner();
        let digest: [u8; 32] = r.digest.as_slice().try_into().expect("32");
        assert_eq!(
            recover_address(&digest, &r.signature).expect("recovers").to_checksum(),
            st.eth_address
        );
        let other = MAIL.replace("\"chainId\": 1", "\"chainId\": 5");
        assert_ne!(other, MAIL);
        let err = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: st.account_id.clone(),
                typed_data_json: other,
                session_token: token.clone(),
                request_id: String::new(),
            })
            .await
            .expect_err("other chain");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        // Without the session, the marketplace may not have the account sign at all.
        let err = signer
            .sign_typed_data(SignTypedDataRequest {
                account_id: st.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect_err("no session");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(st.remaining(&session_id).await.1, 1, "one recorded use");
        st.daemon.stop().await;
    });
}

#[test]
fn session_token_verifies_with_an_independent_jose_library() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (session_id, token) = st.session("1000").await;
        let jwks = serde_json::to_string(&st.daemon.state.sessions.issuer().jwks()).expect("jwks");
        let claims = jose_verify(&jwks, &token).expect("independent JOSE verification");
        assert_eq!(claims["sid"], session_id.as_str());
        assert_eq!(claims["sub"], st.account_id.as_str());
        assert_eq!(claims["aud"], MARKETPLACE);
        assert_eq!(claims["cap"], "1000");
        assert_eq!(claims["exp"], START + 1800);
        assert_eq!(claims["iat"], st.clock.now());
        st.daemon.stop().await;
    });
}

/// ListSessions pages with an opaque cursor (sessions opened in the same
/// second are ordered by id), refuses a cursor of another listing, and
/// `keyward session list` follows every page.
#[test]
fn session_list_pages_and_the_cli_follows_every_page() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let mut opened = Vec::new();
        for _ in 0..5 {
            opened.push(st.session("1000").await.0);
        }
        opened.sort();
        let list = |page_size: u32, page_token: String| {
            let st = &st;
            async move {
                st.sessions("admin")
                    .await
                    .list_sessions(ListSessionsRequest {
                        account_id: st.account_id.clone(),
                        page_size,
                        page_token,
                    })
                    .await
                    .map(|r| r.into_inner())
            }
        };
        let mut ids = Vec::new();
        let mut sizes = Vec::new();
        let mut token = String::new();
        loop {
            let page = list(2, token.clone()).await.expect("page");
            sizes.push(page.sessions.len());
            ids.extend(page.sessions.into_iter().map(|s| s.session_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(ids, opened, "same issue time: by id");
        let all = list(0, String::new()).await.expect("default page");
        assert_eq!(all.sessions.len(), 5);
        assert!(all.next_page_token.is_empty());

        // A cursor of another account's listing, or not one at all.
        let page = list(2, String::new()).await.expect("page");
        let other = st
            .daemon
            .accounts(&st.env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: st.wallet.address().to_checksum(),
                label: "bob".into(),
                allow: vec![],
            })
            .await
            .expect("account")
            .into_inner();
        let mut sessions = st.sessions("admin").await;
        for (account_id, page_token) in [
            (other.account_id.clone(), page.next_page_token.clone()),
            (st.account_id.clone(), "not-a-token".into()),
            (st.account_id.clone(), "x".repeat(300)),
        ] {
            let err = sessions
                .list_sessions(ListSessionsRequest {
                    account_id,
                    page_size: 2,
                    page_token,
                })
                .await
                .expect_err("foreign or malformed cursor");
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(err.message().starts_with("page_token"), "{err:?}");
        }

        // The command line follows the pages.
        let admin = st.env.client_files("admin");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("--home")
            .arg(st.env.dir.path())
            .args(["--endpoint", &st.daemon.grpc, "--domain", "localhost", "--json"])
            .arg("--ca")
            .arg(&admin.ca)
            .arg("--cert")
            .arg(admin.cert.as_ref().expect("cert"))
            .arg("--key")
            .arg(admin.key.as_ref().expect("key"))
            .args(["session", "list", "--account", &st.account_id, "--page-size", "2"])
            .output()
            .expect("keyward session list");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let cli_ids: Vec<&str> = listed["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["session_id"].as_str().expect("id"))
            .collect();
        assert_eq!(cli_ids, opened);
        st.daemon.stop().await;
    });
}

/// Retention: a session that ended more than `sessions.retention_days` ago
/// (default 30) is deleted by the prune, with its challenge; one that ended
/// since is kept.
#[test]
fn ended_sessions_are_pruned_after_the_retention() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let (old, _) = st.session("1000").await;
        let day = 86_400;
        st.clock.advance(10 * day);
        let (recent, _) = st.session("1000").await;
        let prune = || st.daemon.state.sessions.prune_ended();
        // 30 days after the first one expired (30 minutes after it opened): kept.
        st.clock.advance(20 * day);
        assert_eq!(prune().await.expect("prune").sessions, 0);
        st.clock.advance(day);
        let pruned = prune().await.expect("prune");
        assert_eq!((pruned.sessions, pruned.challenges), (1, 1));
        let mut admin = st.sessions("admin").await;
        let get = |id: &str| GetSessionRequest { session_id: id.into() };
        let gone = admin.get_session(get(&old)).await.expect_err("pruned");
        assert_eq!(gone.code(), Code::NotFound);
        let kept = admin.get_session(get(&recent)).await.expect("kept").into_inner();
        assert_eq!(kept.state, SessionState::Expired as i32);
        st.daemon.stop().await;
    });
}
