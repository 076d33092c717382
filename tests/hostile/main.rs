//! The hostile suite: what a caller with a valid client certificate tries
//! against keyward's promises, each tried for real against a running daemon
//! (real SoftHSM token, real mTLS). See README › Security for the threat model
//! this suite proves; client-identity attacks (a SPIFFE id as CN or DNS SAN,
//! two URI SANs, a revoked certificate) are in `src/tls/tests.rs`.
//!
//! - `main.rs`: purpose binding of account keys, oversized session tokens.
//! - `net.rs`: idle-socket floods, slow headers, pathological documents and
//!   one client's share of the daemon (availability).

#[path = "../common/mod.rs"]
mod common;
mod net;

use std::process::{Command, Stdio};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use keyward::api::pb::{SignAttestationRequest, SignMessageRequest, SignatureAlgorithm};
use keyward::config::Custody;

/// Purpose binding: a caller allowed to `SignMessage` with the account's
/// Ed25519 key asks it to sign the signing input of an attestation it forged
/// (any claims, any `iat`). The signature it gets never verifies as that
/// attestation: not with keyward's verifier, not with `keyward verify`, not
/// with an independent JOSE library, against the account's published JWKS.
/// A real attestation of the same key does verify (the check can fail).
fn forged_attestation_never_verifies(custody: Custody) {
    let env = Env::new(custody, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        let url = format!("https://{}/v1/accounts/{}/jwks.json", d.https_addr, account.account_id);
        let (status, jwks) = keyward::cli::verify::https_get(&url, &env.pki.ca_cert, "localhost")
            .await
            .expect("account JWKS");
        assert_eq!(status, 200);
        let set: keyward::crypto::jwk::Jwks = serde_json::from_str(&jwks).expect("jwks");
        let ed_kid = set
            .keys
            .iter()
            .find(|k| k.alg == keyward::crypto::jws::JwsAlg::EdDSA)
            .map(|k| k.kid.clone())
            .expect("an EdDSA key");

        // The forgery: an attestation header and claims of the attacker's choosing.
        let header = serde_json::json!({"alg": "EdDSA", "kid": ed_kid, "typ": keyward::receipt::ATTESTATION_TYP});
        let claims = serde_json::json!({
            "iss": "did:key:forged", "sub": "dataset-the-attacker-wants",
            "typ": "contribution_attestation", "iat": 1_000_000_000,
            "contribution_hash": "sha256:00", "license": "CC0-1.0", "purpose": "training",
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signed = d
            .signing(&env, "admin")
            .await
            .sign_message(SignMessageRequest {
                account_id: account.account_id.clone(),
                alg: SignatureAlgorithm::Ed25519 as i32,
                data: input.clone().into_bytes(),
            })
            .await
            .expect("SignMessage signs the caller's bytes")
            .into_inner();
        let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signed.signature));

        // What was signed is the prefixed message, and only that.
        let vk = ed25519_dalek::VerifyingKey::from_bytes(
            &<[u8; 32]>::try_from(signed.public_key.as_slice()).expect("32 bytes"),
        )
        .expect("public key");
        let sig = ed25519_dalek::Signature::from_slice(&signed.signature).expect("64 bytes");
        vk.verify_strict(&keyward::crypto::message::ed25519_message(input.as_bytes()), &sig)
            .expect("the prefixed message verifies");
        assert!(vk.verify_strict(input.as_bytes(), &sig).is_err());

        // keyward's verifier, the `keyward verify` binary, joserfc.
        assert!(keyward::crypto::jws::verify_compact(&forged, &set.keys).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks_path = dir.path().join("account-jwks.json");
        std::fs::write(&jwks_path, &jwks).expect("write jwks");
        let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["verify", &forged, "--jwks"])
            .arg(&jwks_path)
            .env("RUST_LOG", "warn")
            .output()
            .expect("keyward verify");
        assert!(!out.status.success(), "keyward verify accepted a forged attestation");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/jose_verify.py");
        let jose = |token: &str| {
            Command::new("python3")
                .arg(&script)
                .arg(&jwks_path)
                .arg(token)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .expect("python3")
        };
        let out = jose(&forged);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("No module named"), "joserfc is required: {stderr}");
        assert!(!out.status.success(), "joserfc accepted a forged attestation");

        // Control: a real attestation of the same key verifies everywhere.
        let real = d
            .signing(&env, "admin")
            .await
            .sign_attestation(SignAttestationRequest {
                account_id: account.account_id.clone(),
                alg: "EdDSA".into(),
                dataset_id: "ds-1".into(),
                contribution_hash: format!("sha256:{}", "ab".repeat(32)),
                license: "CC-BY-4.0".into(),
                purpose: "training".into(),
                session_token: String::new(),
            })
            .await
            .expect("attestation")
            .into_inner();
        keyward::crypto::jws::verify_compact(&real.attestation, &set.keys).expect("a real attestation verifies");
        assert!(
            jose(&real.attestation).status.success(),
            "joserfc verifies a real attestation"
        );
        d.stop().await;
    });
}

#[test]
fn message_signature_never_verifies_as_an_attestation_host_custody() {
    forged_attestation_never_verifies(Custody::Host);
}

#[test]
fn message_signature_never_verifies_as_an_attestation_hsm_custody() {
    forged_attestation_never_verifies(Custody::Hsm);
}

/// Work before authorization: a caller sends session tokens far larger than
/// any real one. A token over the gRPC message cap (1 MiB by default) is
/// refused before it is decoded (OUT_OF_RANGE, tonic's answer for an
/// oversized message); one under the cap but over the token cap (16 KiB) is
/// refused as UNAUTHENTICATED before it is base64-decoded or parsed. The
/// daemon keeps serving.
#[test]
fn oversized_session_tokens_are_refused_before_they_are_parsed() {
    use keyward::api::pb::SignTypedDataRequest;
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[MARKETPLACE_ID]).await;
        let mut market = d.signing(&env, "marketplace").await;
        let request = |token: String| SignTypedDataRequest {
            account_id: account.account_id.clone(),
            typed_data_json: MAIL.into(),
            session_token: token,
            request_id: "r".into(),
        };
        // A syntactically plausible token: header.payload.signature, all base64url.
        let plausible = |len: usize| format!("eyJhbGciOiJFZERTQSJ9.{}.AAAA", "A".repeat(len));

        let over_message = market
            .sign_typed_data(request(plausible(2 * 1024 * 1024)))
            .await
            .expect_err("over the message cap");
        assert_eq!(over_message.code(), tonic::Code::OutOfRange, "{over_message:?}");

        let over_token = market
            .sign_typed_data(request(plausible(512 * 1024)))
            .await
            .expect_err("over the token cap");
        assert_eq!(over_token.code(), tonic::Code::Unauthenticated, "{over_token:?}");
        assert!(
            over_token
                .message()
                .contains(&keyward::session::MAX_TOKEN_BYTES.to_string()),
            "{}",
            over_token.message()
        );

        // The same caller, and the daemon, go on working.
        d.signing(&env, "admin")
            .await
            .sign_typed_data(SignTypedDataRequest {
                account_id: account.account_id.clone(),
                typed_data_json: MAIL.into(),
                ..Default::default()
            })
            .await
            .expect("still signs");
        d.stop().await;
    });
}

const MARKETPLACE_ID: &str = "spiffe://example.org/marketplace";
