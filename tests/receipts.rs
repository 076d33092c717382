//! Receipts, attestations and per-account JWKS end to end: a real daemon, a
//! real SoftHSM token, real mTLS, real stores. Signatures are checked by an
//! independent JOSE implementation (Python joserfc) against the issuer JWKS
//! (receipts) and the account JWKS fetched over HTTPS (attestations), and
//! by the real `keyward verify` binary.

mod common;

use std::process::Command;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use k256::ecdsa::SigningKey;
use keyward::api::pb::session_service_client::SessionServiceClient;
use keyward::api::pb::{
    CreateAccountRequest, CreateSessionChallengeRequest, GetAccountJwksRequest, OpenSessionRequest,
    SignAttestationRequest, SignAttestationResponse, SignReceiptRequest, SignReceiptResponse,
};
use keyward::clock::ManualClock;
use keyward::config::Custody;
use keyward::crypto::eth::Address;
use sha2::{Digest as _, Sha256};
use tonic::Code;

const MANIFEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const OTHER_MANIFEST: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const BUYER: &str = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp";
const START: i64 = 1_800_000_000;

struct Story {
    env: Env,
    daemon: Daemon,
    wallet: Wallet,
    account_id: String,
}

fn receipt_req(account_id: &str, amount: &str, manifest: &str, token: &str, request_id: &str) -> SignReceiptRequest {
    SignReceiptRequest {
        account_id: account_id.into(),
        buyer: BUYER.into(),
        amount: amount.into(),
        currency: "USDC".into(),
        manifest: manifest.into(),
        license_id: "lic-7".into(),
        session_token: token.into(),
        payment_signature_ref: String::new(),
        request_id: request_id.into(),
        payment_request_id: String::new(),
    }
}

fn attest_req(account_id: &str, alg: &str, dataset: &str, token: &str) -> SignAttestationRequest {
    SignAttestationRequest {
        account_id: account_id.into(),
        alg: alg.into(),
        dataset_id: dataset.into(),
        contribution_hash: format!("sha256:{MANIFEST}"),
        license: "CC-BY-4.0".into(),
        purpose: "training data contribution".into(),
        session_token: token.into(),
    }
}

fn header(token: &str) -> serde_json::Value {
    let h = token.split('.').next().expect("header");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).expect("b64")).expect("json")
}

impl Story {
    async fn start(env: Env) -> Story {
        env.init().await;
        let daemon = env.start_with_clock(Arc::new(ManualClock::new(START))).await;
        let wallet = Wallet(SigningKey::from_slice(&[0x42; 32]).expect("key"));
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
            wallet,
            account_id: account.account_id,
        }
    }

    async fn receipt(&self, profile: &str, r: SignReceiptRequest) -> Result<SignReceiptResponse, tonic::Status> {
        self.daemon
            .signing(&self.env, profile)
            .await
            .sign_receipt(r)
            .await
            .map(|r| r.into_inner())
    }

    async fn attest(&self, profile: &str, r: SignAttestationRequest) -> Result<SignAttestationResponse, tonic::Status> {
        self.daemon
            .signing(&self.env, profile)
            .await
            .sign_attestation(r)
            .await
            .map(|r| r.into_inner())
    }

    /// A session for the marketplace: payments 0-100, one manifest, one dataset.
    async fn session(&self) -> (String, String) {
        let mut s = SessionServiceClient::new(self.daemon.channel(&self.env, "wallet-gateway").await);
        let c = s
            .create_session_challenge(CreateSessionChallengeRequest {
                account_id: self.account_id.clone(),
                delegate: MARKETPLACE.into(),
                scopes: vec![
                    "payments:0-100".into(),
                    format!("license:manifest:{MANIFEST}"),
                    "attest:ds-1".into(),
                    "typed-data:1:0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC:unbounded".into(),
                ],
                cap: "1000".into(),
                ttl_seconds: 1800,
            })
            .await
            .expect("challenge")
            .into_inner();
        let r = s
            .open_session(OpenSessionRequest {
                challenge_id: c.challenge_id,
                signature: self.wallet.sign(&c.typed_data_json),
            })
            .await
            .expect("open")
            .into_inner();
        (r.session.expect("session").session_id, r.token)
    }

    /// The issuer JWKS as any verifier gets it: over HTTPS from the daemon's
    /// public endpoint, checked against the daemon's own view.
    async fn issuer_jwks(&self) -> String {
        let url = format!("https://{}/.well-known/jwks.json", self.daemon.https_addr);
        let (status, body) = keyward::cli::verify::https_get(&url, &self.env.pki.ca_cert, "localhost")
            .await
            .expect("HTTPS GET");
        assert_eq!(status, 200);
        let fetched: serde_json::Value = serde_json::from_str(&body).expect("JWKS JSON");
        let own = serde_json::to_value(self.daemon.state.sessions.issuer().jwks()).expect("jwks");
        assert_eq!(fetched, own, "the published JWKS is the issuer's");
        body
    }

    fn account_url(&self, id: &str) -> String {
        format!("https://{}/v1/accounts/{id}/jwks.json", self.daemon.https_addr)
    }

    async fn account_jwks_https(&self, id: &str) -> (u16, String) {
        keyward::cli::verify::https_get(&self.account_url(id), &self.env.pki.ca_cert, "localhost")
            .await
            .expect("HTTPS GET")
    }
}

/// Receipts and both attestation algorithms, verified by joserfc.
fn sign_and_verify(custody: Custody, store: StoreKind) {
    let Some(env) = Env::new(custody, store) else { return };
    block_on(async {
        let st = Story::start(env).await;
        // Receipt: issuer key, EdDSA; monotonically increasing seqs.
        let r1 = st
            .receipt("admin", receipt_req(&st.account_id, "40", MANIFEST, "", "req-1"))
            .await
            .expect("receipt");
        let r2 = st
            .receipt("admin", receipt_req(&st.account_id, "41", MANIFEST, "", "req-2"))
            .await
            .expect("receipt");
        assert!(r2.audit_seq > r1.audit_seq, "{} then {}", r1.audit_seq, r2.audit_seq);
        let h = header(&r1.receipt);
        assert_eq!(h["alg"], "EdDSA");
        assert_eq!(h["typ"], "keyward-receipt+jwt");
        let ours = st.daemon.state.sessions.issuer().verify(&r1.receipt).expect("verifies");
        let claims = jose_verify(&st.issuer_jwks().await, &r1.receipt).unwrap_or(ours.claims);
        assert_eq!(claims["receipt_id"], r1.receipt_id.as_str());
        assert_eq!(claims["audit_seq"].as_u64(), Some(r1.audit_seq));
        assert_eq!(claims["amount"], "40");
        assert_eq!(claims["currency"], "USDC");
        assert_eq!(claims["manifest"], MANIFEST);
        assert_eq!(claims["license_id"], "lic-7");
        assert_eq!(claims["buyer"], BUYER);
        assert_eq!(claims["iat"].as_i64(), Some(START));
        assert_eq!(claims["seller"]["account_id"], st.account_id.as_str());
        assert!(claims["seller"]["did"]
            .as_str()
            .unwrap_or("")
            .starts_with("did:key:z6Mk"));
        assert!(claims.get("session_id").is_none());

        // Per-account JWKS over HTTPS (no client certificate) and over gRPC.
        let (status, jwks) = st.account_jwks_https(&st.account_id).await;
        assert_eq!(status, 200, "{jwks}");
        let grpc = st
            .daemon
            .accounts(&st.env, "marketplace")
            .await
            .get_account_jwks(GetAccountJwksRequest {
                account_id: st.account_id.clone(),
            })
            .await
            .expect("GetAccountJwks")
            .into_inner();
        assert_eq!(grpc.jwks_json, jwks);
        let set: serde_json::Value = serde_json::from_str(&jwks).expect("json");
        let keys = set["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[0]["kty"].as_str(), keys[0]["alg"].as_str()),
            (Some("OKP"), Some("EdDSA"))
        );
        assert_eq!(
            (keys[1]["crv"].as_str(), keys[1]["alg"].as_str()),
            (Some("secp256k1"), Some("ES256K"))
        );
        assert!(keys.iter().all(|k| k.get("d").is_none()));

        for (alg, kid_index, iss_prefix) in [("EdDSA", 0, "did:key:z6Mk"), ("ES256K", 1, "did:pkh:eip155:")] {
            let a = st
                .attest("admin", attest_req(&st.account_id, alg, "ds-1", ""))
                .await
                .expect("attestation");
            let h = header(&a.attestation);
            assert_eq!(h["alg"], alg);
            assert_eq!(h["kid"], keys[kid_index]["kid"]);
            assert_eq!(a.kid, keys[kid_index]["kid"].as_str().unwrap_or_default());
            let claims = match jose_verify(&jwks, &a.attestation) {
                Some(c) => c,
                None => {
                    let parsed: keyward::crypto::jwk::Jwks = serde_json::from_str(&jwks).expect("jwks");
                    keyward::crypto::jws::verify_compact(&a.attestation, &parsed.keys)
                        .expect("verifies")
                        .claims
                }
            };
            assert!(claims["iss"].as_str().unwrap_or("").starts_with(iss_prefix), "{claims}");
            assert_eq!(claims["iss"], a.iss.as_str());
            assert_eq!(claims["sub"], "ds-1");
            assert_eq!(claims["typ"], "contribution_attestation");
            assert_eq!(claims["license"], "CC-BY-4.0");
            assert_eq!(claims["contribution_hash"], format!("sha256:{MANIFEST}"));
            assert_eq!(claims["iat"].as_i64(), Some(START));
        }
        assert_eq!(
            grpc.did_pkh,
            format!("did:pkh:eip155:1:{}", {
                let acct = st.daemon.state.keys.record(&st.account_id).await.expect("record");
                let (secp, _) = keyward::keys::public_keys(&acct).expect("keys");
                Address::from_public_key(&secp).to_checksum()
            })
        );

        // Unknown and malformed ids: 404.
        for id in ["00000000-0000-4000-8000-000000000000", "not-an-id", "..%2f"] {
            let (status, _) = st.account_jwks_https(id).await;
            assert_eq!(status, 404, "{id}");
        }
        st.daemon.stop().await;
    });
}

#[test]
fn receipts_and_attestations_verify_independently_hsm_custody() {
    sign_and_verify(Custody::Hsm, StoreKind::Sqlite);
}

#[test]
fn receipts_and_attestations_verify_independently_host_custody() {
    sign_and_verify(Custody::Host, StoreKind::Sqlite);
}

#[test]
fn receipts_and_attestations_verify_independently_postgres() {
    sign_and_verify(Custody::Hsm, StoreKind::Postgres);
}

#[test]
fn receipt_idempotency_authorization_and_session_scopes() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let id = st.account_id.clone();
        // Idempotent retry; same id with another body is refused.
        let a = st
            .receipt("admin", receipt_req(&id, "40", MANIFEST, "", "r"))
            .await
            .expect("first");
        let b = st
            .receipt("admin", receipt_req(&id, "40", MANIFEST, "", "r"))
            .await
            .expect("retry");
        assert_eq!(
            (a.receipt_id.as_str(), a.audit_seq, a.receipt.as_str()),
            (b.receipt_id.as_str(), b.audit_seq, b.receipt.as_str())
        );
        let err = st
            .receipt("admin", receipt_req(&id, "41", MANIFEST, "", "r"))
            .await
            .expect_err("other body");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        // Without a session only the account's identities may have it sign.
        let err = st
            .receipt("marketplace", receipt_req(&id, "40", MANIFEST, "", ""))
            .await
            .expect_err("not allowed");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        let err = st
            .attest("marketplace", attest_req(&id, "EdDSA", "ds-1", ""))
            .await
            .expect_err("not allowed");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        // Malformed fields.
        let err = st
            .receipt("admin", receipt_req(&id, "4.0", MANIFEST, "", ""))
            .await
            .expect_err("amount");
        assert_eq!(err.code(), Code::InvalidArgument);
        let mut bad = attest_req(&id, "EdDSA", "ds-1", "");
        bad.license = "MIT<script>".into();
        assert_eq!(
            st.attest("admin", bad).await.expect_err("spdx").code(),
            Code::InvalidArgument
        );
        let mut bad = attest_req(&id, "EdDSA", "ds-1", "");
        bad.purpose = "x".repeat(513);
        assert_eq!(
            st.attest("admin", bad).await.expect_err("purpose").code(),
            Code::InvalidArgument
        );
        assert_eq!(
            st.attest("admin", attest_req(&id, "HS256", "ds-1", ""))
                .await
                .expect_err("alg")
                .code(),
            Code::InvalidArgument
        );

        // Inside a session a receipt is for a payment signed in it: its facts are the payment's.
        let (session_id, token) = st.session().await;
        let payee = "0x1111111111111111111111111111111111111111";
        let paid = st
            .daemon
            .signing(&st.env, "marketplace")
            .await
            .sign_payment(keyward::api::pb::SignPaymentRequest {
                session_token: token.clone(),
                amount: "40".into(),
                currency: "USDC".into(),
                manifest: MANIFEST.into(),
                license_id: "lic-7".into(),
                payee: payee.into(),
                request_id: "pay-1".into(),
            })
            .await
            .expect("payment")
            .into_inner();
        let for_payment = |payment: &str, amount: &str, manifest: &str| {
            let mut r = receipt_req(&id, amount, manifest, &token, "");
            r.currency.clear();
            r.license_id.clear();
            r.payment_request_id = payment.into();
            r
        };
        let r = st
            .receipt("marketplace", for_payment("pay-1", "", ""))
            .await
            .expect("the payment's receipt");
        assert!(r.audit_seq > b.audit_seq);
        let claims = st
            .daemon
            .state
            .sessions
            .issuer()
            .verify(&r.receipt)
            .expect("verifies")
            .claims;
        assert_eq!(claims["session_id"], session_id.as_str());
        assert_eq!(claims["amount"], "40");
        assert_eq!(claims["currency"], "USDC");
        assert_eq!(claims["manifest"], MANIFEST);
        assert_eq!(claims["license_id"], "lic-7");
        assert_eq!(
            claims["payee"],
            Address::parse(payee).expect("payee").to_checksum().as_str()
        );
        assert_eq!(claims["payment_request_id"], "pay-1");
        assert_eq!(
            claims["payment_digest"],
            format!("0x{}", hex::encode(&paid.digest)).as_str(),
            "joins the payment"
        );
        // At most one receipt per payment: asking again (facts given, equal) returns it.
        let again = st
            .receipt("marketplace", for_payment("pay-1", "40", MANIFEST))
            .await
            .expect("the same receipt");
        assert_eq!(
            (again.receipt_id.as_str(), again.audit_seq),
            (r.receipt_id.as_str(), r.audit_seq)
        );
        let mut other_buyer = for_payment("pay-1", "", "");
        other_buyer.buyer = "did:example:someone-else".into();
        let mut cases = vec![
            (
                "marketplace",
                for_payment("pay-1", "41", ""),
                Code::InvalidArgument,
                "an amount other than the payment's",
            ),
            (
                "marketplace",
                for_payment("pay-1", "", OTHER_MANIFEST),
                Code::InvalidArgument,
                "a manifest other than the payment's",
            ),
            (
                "marketplace",
                other_buyer,
                Code::InvalidArgument,
                "a second receipt for the payment",
            ),
            (
                "marketplace",
                for_payment("", "40", MANIFEST),
                Code::InvalidArgument,
                "no payment named",
            ),
            (
                "marketplace",
                for_payment("pay-nope", "", ""),
                Code::NotFound,
                "a payment the session does not have",
            ),
            (
                "wallet-gateway",
                for_payment("pay-1", "", ""),
                Code::PermissionDenied,
                "not the delegate",
            ),
            (
                "admin",
                for_payment("pay-1", "", ""),
                Code::PermissionDenied,
                "admin is not the delegate",
            ),
        ];
        let mut outside = receipt_req(&id, "40", MANIFEST, "", "");
        outside.payment_request_id = "pay-1".into();
        cases.push((
            "admin",
            outside,
            Code::InvalidArgument,
            "a payment named outside its session",
        ));
        for (profile, req, code, what) in cases {
            let err = st.receipt(profile, req).await.expect_err(what);
            assert_eq!(err.code(), code, "{what}: {}", err.message());
        }
        // A typed-data request of the session is a spend, not a payment.
        st.daemon
            .signing(&st.env, "marketplace")
            .await
            .sign_typed_data(keyward::api::pb::SignTypedDataRequest {
                account_id: id.clone(),
                typed_data_json: MAIL.into(),
                session_token: token.clone(),
                request_id: "td-1".into(),
            })
            .await
            .expect("typed data in its scope");
        let err = st
            .receipt("marketplace", for_payment("td-1", "", ""))
            .await
            .expect_err("not a payment");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("not a payment"), "{}", err.message());
        // Another session does not see this one's payments.
        let (_, other_token) = st.session().await;
        let err = st
            .receipt("marketplace", {
                let mut r = for_payment("pay-1", "", "");
                r.session_token = other_token;
                r
            })
            .await
            .expect_err("another session's payment");
        assert_eq!(
            err.code(),
            Code::NotFound,
            "payments belong to their session: {}",
            err.message()
        );
        let err = st
            .receipt("marketplace", receipt_req(&id, "5", MANIFEST, "not.a.token", ""))
            .await
            .expect_err("bad token");
        assert_eq!(err.code(), Code::Unauthenticated);
        // Attestations inside the session: only attest:<dataset> scopes.
        st.attest("marketplace", attest_req(&id, "ES256K", "ds-1", &token))
            .await
            .expect("attest scope");
        let err = st
            .attest("marketplace", attest_req(&id, "EdDSA", "ds-2", &token))
            .await
            .expect_err("other dataset");
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        st.daemon.stop().await;
    });
}

// ---------------------------------------------------------------------------
// `keyward verify`, the real binary.

fn verify_cmd(token: &str, jwks: &str, ca: Option<&std::path::Path>) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.arg("--json")
        .arg("verify")
        .arg(token)
        .arg("--jwks")
        .arg(jwks)
        .env("RUST_LOG", "warn");
    if let Some(ca) = ca {
        c.arg("--ca").arg(ca);
    }
    let out = c.output().expect("run keyward verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn keyward_verify_accepts_real_and_rejects_forgeries() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let r = st
            .receipt("admin", receipt_req(&st.account_id, "40", MANIFEST, "", ""))
            .await
            .expect("receipt");
        let jwks_path = st.env.dir.path().join("issuer-jwks.json");
        std::fs::write(&jwks_path, st.issuer_jwks().await).expect("write jwks");
        let jwks = jwks_path.to_str().expect("path");

        // The real one, as an argument and as a file.
        let (code, out, err) = verify_cmd(&r.receipt, jwks, None);
        assert_eq!(code, 0, "{out} {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(v["valid"], true);
        assert_eq!(v["claims"]["receipt_id"], r.receipt_id.as_str());
        let file = st.env.dir.path().join("receipt.jws");
        std::fs::write(&file, format!("{}\n", r.receipt)).expect("write");
        assert_eq!(verify_cmd(file.to_str().expect("path"), jwks, None).0, 0);

        let parts: Vec<&str> = r.receipt.split('.').collect();
        let hdr = header(&r.receipt);
        let kid = hdr["kid"].as_str().expect("kid").to_string();
        // Tampered payload: amount 40 → 4000.
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        claims["amount"] = "4000".into();
        let tampered = format!("{}.{}.{}", parts[0], b64(claims.to_string().as_bytes()), parts[2]);
        // Wrong kid: the ES256 issuer key's kid, then an unknown one.
        let issuer = st.daemon.state.sessions.issuer().jwks();
        let other_kid = issuer
            .keys
            .iter()
            .find(|k| k.alg == keyward::crypto::jws::JwsAlg::ES256)
            .map(|k| k.kid.clone())
            .expect("the ES256 issuer key");
        let rekid = |k: &str| {
            let h = serde_json::json!({"alg": "EdDSA", "kid": k, "typ": "keyward-receipt+jwt"});
            format!("{}.{}.{}", b64(h.to_string().as_bytes()), parts[1], parts[2])
        };
        // alg none, and HS256 keyed with the public key (x as published, and raw bytes).
        let none = format!(
            "{}.{}.",
            b64(serde_json::json!({"alg": "none", "kid": kid}).to_string().as_bytes()),
            parts[1]
        );
        let ed = issuer.keys.iter().find(|k| k.kid == kid).expect("key");
        let hs_head = b64(serde_json::json!({"alg": "HS256", "kid": kid, "typ": "JWT"})
            .to_string()
            .as_bytes());
        let input = format!("{hs_head}.{}", parts[1]);
        let raw_pk = URL_SAFE_NO_PAD.decode(&ed.x).expect("x");
        let jwk_json = serde_json::to_string(ed).expect("jwk");
        let forgeries = [
            ("tampered payload", tampered, "signature does not verify"),
            ("wrong kid (other key)", rekid(&other_kid), "not a EdDSA signing key"),
            ("unknown kid", rekid("no-such-kid"), "no key with kid"),
            ("alg none", none, "unsupported JWS alg"),
            (
                "HS256 with the raw public key",
                format!("{input}.{}", b64(&hmac_sha256(&raw_pk, input.as_bytes()))),
                "unsupported JWS alg",
            ),
            (
                "HS256 with the JWK as secret",
                format!("{input}.{}", b64(&hmac_sha256(jwk_json.as_bytes(), input.as_bytes()))),
                "unsupported JWS alg",
            ),
        ];
        for (what, token, reason) in forgeries {
            let (code, out, err) = verify_cmd(&token, jwks, None);
            assert_eq!(code, 1, "{what}: {out} {err}");
            assert!(err.contains(reason), "{what}: {err}");
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
            assert_eq!(v["valid"], false, "{what}");
        }

        // An attestation against the account JWKS fetched over HTTPS by the binary.
        let a = st
            .attest("admin", attest_req(&st.account_id, "ES256K", "ds-1", ""))
            .await
            .expect("attestation");
        let url = st.account_url(&st.account_id);
        let (code, out, err) = verify_cmd(&a.attestation, &url, Some(&st.env.pki.ca_cert));
        assert_eq!(code, 0, "{out} {err}");
        // The receipt is not signed by an account key.
        let (code, _, err) = verify_cmd(&r.receipt, &url, Some(&st.env.pki.ca_cert));
        assert_eq!(code, 1);
        assert!(err.contains("no key with kid"), "{err}");
        st.daemon.stop().await;
    });
}

#[test]
fn keyward_sign_receipt_and_attestation_cli() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        let st = Story::start(env).await;
        let files = st.env.client_files("admin");
        let run = |args: &[&str]| -> serde_json::Value {
            let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
                .arg("--endpoint")
                .arg(&st.daemon.grpc)
                .arg("--ca")
                .arg(&files.ca)
                .arg("--cert")
                .arg(files.cert.as_ref().expect("cert"))
                .arg("--key")
                .arg(files.key.as_ref().expect("key"))
                .arg("--json")
                .args(args)
                .env("RUST_LOG", "warn")
                .output()
                .expect("run keyward");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice(&out.stdout).expect("one JSON object")
        };
        let acct = st.account_id.clone();
        let base = [
            "sign",
            "receipt",
            "--account",
            &acct,
            "--buyer",
            BUYER,
            "--amount",
            "40",
            "--currency",
            "USDC",
            "--manifest",
            MANIFEST,
            "--license",
            "lic-7",
        ];
        let r1 = run(&[&base[..], &["--request-id", "cli-1"]].concat());
        let r2 = run(&[&base[..], &["--request-id", "cli-1"]].concat());
        let r3 = run(&base);
        assert_eq!(r1, r2, "idempotent retry");
        assert!(r3["audit_seq"].as_u64() > r1["audit_seq"].as_u64());
        let receipt = r1["receipt"].as_str().expect("receipt");
        let claims = st
            .daemon
            .state
            .sessions
            .issuer()
            .verify(receipt)
            .expect("verifies")
            .claims;
        assert_eq!(claims["receipt_id"], r1["receipt_id"]);
        let a = run(&[
            "sign",
            "attestation",
            "--account",
            &acct,
            "--alg",
            "secp256k1",
            "--dataset",
            "ds-9",
            "--contribution-hash",
            &format!("sha256:{MANIFEST}"),
            "--license",
            "MIT",
            "--purpose",
            "fine-tuning",
        ]);
        assert_eq!(header(a["attestation"].as_str().expect("jws"))["kid"], a["kid"]);
        let (code, out, err) = verify_cmd(
            a["attestation"].as_str().expect("jws"),
            &st.account_url(&acct),
            Some(&st.env.pki.ca_cert),
        );
        assert_eq!(code, 0, "{out} {err}");
        st.daemon.stop().await;
    });
}
