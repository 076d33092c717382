//! What a caller can learn and what it owns, against a running daemon (real
//! SoftHSM token, real mTLS): a caller the policies refuse cannot tell an
//! existing account, session or challenge from a missing one (the same
//! status and the same bytes, for every RPC that looks one up), and receipt
//! idempotency keys belong to the caller that chose them.

mod common;

use common::*;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, GetAccountRequest, GetSessionRequest, ListSessionsRequest,
    OpenSessionRequest, RevokeSessionRequest, SignAttestationRequest, SignMessageRequest, SignReceiptRequest,
    SignTypedDataRequest, SignatureAlgorithm,
};
use keyward::config::Custody;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";

/// A policy that forbids signing for accounts labelled "frozen": its
/// refusal depends on the account, so naming it would tell a caller the
/// account exists.
const FROZEN: &str = r#"
@id("frozen-accounts-sign-nothing")
@reason("accounts labelled frozen sign nothing")
forbid (principal, action in Keyward::Action::"Sign", resource is Keyward::Account)
when { resource.label == "frozen" };
"#;

fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The same refusal, byte for byte.
fn same(existing: Result<impl std::fmt::Debug, Status>, missing: Result<impl std::fmt::Debug, Status>, what: &str) {
    let existing = existing.expect_err(what);
    let missing = missing.expect_err(what);
    assert_eq!(existing.code(), Code::PermissionDenied, "{what}: {existing:?}");
    // String equality is byte equality; shown as text when it fails.
    assert_eq!(
        (existing.code(), existing.message(), existing.details()),
        (missing.code(), missing.message(), missing.details()),
        "{what}: an existing resource is told from a missing one"
    );
}

struct World {
    env: Env,
    d: Daemon,
    wallet: Wallet,
    account: String,
    frozen: String,
}

impl World {
    async fn start() -> World {
        let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
        std::fs::write(env.dir.path().join("policies/frozen.cedar"), FROZEN).expect("policy");
        env.init().await;
        let d = env.start().await;
        let wallet = Wallet::new(0x42);
        let mut ids = Vec::new();
        for label in ["alice", "frozen"] {
            let a = d
                .accounts(&env, "admin")
                .await
                .create_account(CreateAccountRequest {
                    controller: wallet.address().to_checksum(),
                    label: label.into(),
                    allow: vec![],
                })
                .await
                .expect("account")
                .into_inner();
            ids.push(a.account_id);
        }
        let frozen = ids.pop().expect("frozen");
        let account = ids.pop().expect("alice");
        World {
            env,
            d,
            wallet,
            account,
            frozen,
        }
    }

    async fn sessions(&self, profile: &str) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.d.channel(&self.env, profile).await)
    }

    fn challenge_req(&self, account_id: &str, delegate: &str) -> CreateSessionChallengeRequest {
        CreateSessionChallengeRequest {
            account_id: account_id.into(),
            delegate: delegate.into(),
            scopes: vec!["payments:0-100".into(), format!("license:manifest:{MANIFEST}")],
            cap: "1000".into(),
            ttl_seconds: 1800,
        }
    }

    /// A challenge asked by the wallet gateway: its id and typed data.
    async fn challenge(&self, delegate: &str) -> (String, String) {
        let c = self
            .sessions("wallet-gateway")
            .await
            .create_session_challenge(self.challenge_req(&self.account, delegate))
            .await
            .expect("challenge")
            .into_inner();
        (c.challenge_id, c.typed_data_json)
    }

    /// A session of the account for `delegate`: its id and token.
    async fn session(&self, delegate: &str) -> (String, String) {
        let (id, typed) = self.challenge(delegate).await;
        let r = self
            .sessions("wallet-gateway")
            .await
            .open_session(OpenSessionRequest {
                challenge_id: id,
                signature: self.wallet.sign(&typed),
            })
            .await
            .expect("open")
            .into_inner();
        (r.session.expect("session").session_id, r.token)
    }
}

fn receipt_req(account_id: &str, token: &str, request_id: &str, payment: &str) -> SignReceiptRequest {
    SignReceiptRequest {
        account_id: account_id.into(),
        buyer: "did:example:buyer".into(),
        amount: "10".into(),
        currency: "USDC".into(),
        manifest: MANIFEST.into(),
        license_id: "lic-7".into(),
        session_token: token.into(),
        payment_signature_ref: String::new(),
        request_id: request_id.into(),
        payment_request_id: payment.into(),
    }
}

/// A client refused on an account, a session or a challenge gets the same
/// bytes whether it exists or not, on every RPC that looks one up before
/// deciding; a refusal that depends on the account (a forbid on its label)
/// is answered as a missing account's would be. Callers who may know the
/// resource still get the precise answer.
#[test]
fn a_refused_caller_cannot_tell_existing_from_missing() {
    block_on(async {
        let w = World::start().await;
        let (session_id, _) = w.session("spiffe://example.org/elsewhere").await;
        let (unopened, typed) = w.challenge("spiffe://example.org/elsewhere").await;
        let (a, ghost) = (w.account.as_str(), random_id());
        let m = "marketplace";

        let mut accounts = w.d.accounts(&w.env, m).await;
        let get = |id: &str| GetAccountRequest { account_id: id.into() };
        same(
            accounts.get_account(get(a)).await,
            accounts.get_account(get(&ghost)).await,
            "GetAccount",
        );

        let mut sessions = w.sessions(m).await;
        let list = |id: &str| ListSessionsRequest {
            account_id: id.into(),
            ..Default::default()
        };
        same(
            sessions.list_sessions(list(a)).await,
            sessions.list_sessions(list(&ghost)).await,
            "ListSessions",
        );
        same(
            sessions.create_session_challenge(w.challenge_req(a, MARKETPLACE)).await,
            sessions
                .create_session_challenge(w.challenge_req(&ghost, MARKETPLACE))
                .await,
            "CreateSessionChallenge",
        );
        let open = |id: &str| OpenSessionRequest {
            challenge_id: id.into(),
            signature: w.wallet.sign(&typed),
        };
        same(
            sessions.open_session(open(&unopened)).await,
            sessions.open_session(open(&random_id())).await,
            "OpenSession",
        );
        let get_session = |id: &str| GetSessionRequest { session_id: id.into() };
        same(
            sessions.get_session(get_session(&session_id)).await,
            sessions.get_session(get_session(&random_id())).await,
            "GetSession",
        );
        let revoke = |id: &str| RevokeSessionRequest {
            session_id: id.into(),
            controller_signature: Vec::new(),
        };
        same(
            sessions.revoke_session(revoke(&session_id)).await,
            sessions.revoke_session(revoke(&random_id())).await,
            "RevokeSession",
        );

        let mut signing = w.d.signing(&w.env, m).await;
        let message = |id: &str| SignMessageRequest {
            account_id: id.into(),
            data: b"hello".to_vec(),
            alg: SignatureAlgorithm::Ed25519 as i32,
        };
        same(
            signing.sign_message(message(a)).await,
            signing.sign_message(message(&ghost)).await,
            "SignMessage",
        );
        // A refusal that depends on the account is answered as a missing one's.
        same(
            signing.sign_message(message(&w.frozen)).await,
            signing.sign_message(message(&ghost)).await,
            "SignMessage on a frozen account",
        );
        let typed_req = |id: &str| SignTypedDataRequest {
            account_id: id.into(),
            typed_data_json: MAIL.into(),
            ..Default::default()
        };
        same(
            signing.sign_typed_data(typed_req(a)).await,
            signing.sign_typed_data(typed_req(&ghost)).await,
            "SignTypedData",
        );
        same(
            signing.sign_receipt(receipt_req(a, "", "r-1", "")).await,
            signing.sign_receipt(receipt_req(&ghost, "", "r-1", "")).await,
            "SignReceipt",
        );
        let attest = |id: &str| SignAttestationRequest {
            account_id: id.into(),
            alg: "EdDSA".into(),
            dataset_id: "ds-1".into(),
            contribution_hash: format!("sha256:{MANIFEST}"),
            license: "CC-BY-4.0".into(),
            purpose: "training data contribution".into(),
            session_token: String::new(),
        };
        same(
            signing.sign_attestation(attest(a)).await,
            signing.sign_attestation(attest(&ghost)).await,
            "SignAttestation",
        );

        // Those who may know: the creator hears which policy refused, and
        // that a missing account is missing.
        let mut admin = w.d.signing(&w.env, "admin").await;
        let precise = admin.sign_message(message(&w.frozen)).await.expect_err("frozen");
        assert_eq!(precise.code(), Code::PermissionDenied);
        assert!(
            precise.message().contains("frozen-accounts-sign-nothing"),
            "{precise:?}"
        );
        let missing =
            w.d.accounts(&w.env, "admin")
                .await
                .get_account(get(&ghost))
                .await
                .expect_err("missing");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        let missing = w
            .sessions("wallet-gateway")
            .await
            .get_session(get_session(&random_id()))
            .await
            .expect_err("missing");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        w.d.stop().await;
    });
}

/// Two callers using one idempotency key on one account each get a receipt
/// of their own; each retry gets its own caller's receipt back.
#[test]
fn receipt_idempotency_keys_belong_to_their_caller() {
    block_on(async {
        let w = World::start().await;
        let (_, token) = w.session(MARKETPLACE).await;
        // Inside its session the marketplace's receipt is for a payment it signed there.
        w.d.signing(&w.env, "marketplace")
            .await
            .sign_payment(keyward::api::pb::SignPaymentRequest {
                session_token: token.clone(),
                amount: "10".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                payee: String::new(),
                request_id: "order-42".into(),
            })
            .await
            .expect("payment");
        // The admin signs directly, the marketplace in its session.
        let callers = [("admin", String::new()), ("marketplace", token)];
        let receipt = |profile: &'static str, token: String| {
            let w = &w;
            async move {
                let payment = if token.is_empty() { "" } else { "order-42" };
                w.d.signing(&w.env, profile)
                    .await
                    .sign_receipt(receipt_req(&w.account, &token, "order-42", payment))
                    .await
                    .unwrap_or_else(|e| panic!("{profile}'s receipt: the key is its own: {e:?}"))
                    .into_inner()
            }
        };
        let mut first = Vec::new();
        for (profile, token) in &callers {
            first.push(receipt(profile, token.clone()).await);
        }
        assert_ne!(first[0].receipt_id, first[1].receipt_id);
        assert_ne!(first[0].audit_seq, first[1].audit_seq);
        for ((profile, token), first) in callers.iter().zip(&first) {
            assert_eq!(&receipt(profile, token.clone()).await, first, "{profile}'s retry");
        }
        w.d.stop().await;
    });
}
