//! Issuer keys on a real SoftHSM2 token: creation, attributes, idempotence, JWS signing for
//! EdDSA / ES256 / ES256K, verification by keyward and by an independent library (Python
//! joserfc). Run with cargo-nextest (one process per test: SoftHSM reads SOFTHSM2_CONF once).

mod common;

use std::path::Path;

use keyward::crypto::jwk::Jwks;
use keyward::crypto::jws::{self, JwsAlg, JwsError};
use keyward::hsm::{issuer_label, Hsm, HsmError, IssuerAlg};
use keyward::issuer::{jws_alg, Issuer, IssuerError};
use keyward::testkit::SoftHsmToken;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn setup() -> Result<(SoftHsmToken, Hsm), Box<dyn std::error::Error>> {
    let tok = SoftHsmToken::new()?;
    // Safe in edition 2021; nextest runs each test in its own process.
    std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
    let hsm = Hsm::open(&tok.hsm_config(2))?;
    Ok((tok, hsm))
}

fn issuer_objects(hsm: &Hsm) -> Result<Vec<keyward::hsm::ObjectInfo>, HsmError> {
    Ok(hsm
        .inspect_private_keys()?
        .into_iter()
        .filter(|o| o.label.starts_with("keyward-issuer-"))
        .collect())
}

fn claims(alg: IssuerAlg) -> serde_json::Value {
    json!({
        "iss": "keyward",
        "sub": "acct-7",
        "alg_used": alg.as_str(),
        "exp": 4102444800u64,
        "scopes": ["payments:0-100", "license:manifest:abc"],
        "nested": {"ok": true, "n": null},
    })
}

#[test]
fn ensure_creates_token_keys_once_with_the_right_attributes() -> TestResult {
    let (tok, hsm) = setup()?;
    assert!(issuer_objects(&hsm)?.is_empty());
    let issuer = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    assert_eq!(issuer.keys().len(), 3);
    let objects = issuer_objects(&hsm)?;
    assert_eq!(objects.len(), 3, "{objects:?}");
    for alg in IssuerAlg::ALL {
        let key = issuer.active(alg)?;
        assert_eq!(key.info.alg, alg);
        // kid = RFC 7638 thumbprint of the published JWK = CKA_ID = label suffix.
        assert_eq!(key.jwk.kid, key.jwk.thumbprint());
        assert_eq!(key.info.id, key.jwk.kid.as_bytes());
        assert_eq!(key.info.kid(), key.jwk.kid);
        assert_eq!(key.info.label, issuer_label(alg, &key.jwk.kid));
        assert_eq!(
            key.info.label,
            format!("keyward-issuer-{}-{}", alg.as_str(), key.jwk.kid)
        );
        assert_eq!(key.jwk.alg, jws_alg(alg));
        assert_eq!(key.info.public_key.len(), if alg == IssuerAlg::EdDSA { 32 } else { 65 });
        let obj = objects
            .iter()
            .find(|o| o.label == key.info.label)
            .ok_or("issuer private key not on the token")?;
        assert!(obj.token, "{obj:?}");
        assert!(obj.sensitive, "{obj:?}");
        assert!(!obj.extractable, "{obj:?}");
        assert_eq!(obj.class, "CKO_PRIVATE_KEY");
        assert_eq!(
            obj.key_type,
            if alg == IssuerAlg::EdDSA {
                "CKK_EC_EDWARDS"
            } else {
                "CKK_EC"
            },
            "{obj:?}"
        );
    }
    let kids: Vec<String> = issuer.jwks().keys.into_iter().map(|k| k.kid).collect();

    // Idempotent: a second ensure creates nothing.
    let again = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    assert_eq!(issuer_objects(&hsm)?.len(), 3);
    let kids2: Vec<String> = again.jwks().keys.into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, kids2);

    // A new Hsm on the same token loads the same kids.
    drop((issuer, again, hsm));
    let hsm = Hsm::open(&tok.hsm_config(1))?;
    let loaded = Issuer::load(&hsm)?;
    let kids3: Vec<String> = loaded.jwks().keys.into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, kids3);
    assert_eq!(issuer_objects(&hsm)?.len(), 3);
    Ok(())
}

#[test]
fn sign_jws_verifies_for_each_alg() -> TestResult {
    let (_tok, hsm) = setup()?;
    let issuer = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    // The published JWKS as a verifier gets it: JSON, parsed back.
    let text = serde_json::to_string(&issuer.jwks())?;
    let jwks: Jwks = serde_json::from_str(&text)?;
    for alg in IssuerAlg::ALL {
        // SoftHSM returns high-s about half the time: enough rounds to see both.
        for i in 0..12u32 {
            let mut c = claims(alg);
            c["i"] = json!(i);
            let token = issuer.sign_jws(alg, "keyward-session+jwt", &c)?;
            let v = jws::verify_compact(&token, &jwks.keys)?;
            assert_eq!(v.claims, c);
            assert_eq!(v.header.alg, jws_alg(alg));
            assert_eq!(v.header.kid.as_deref(), Some(issuer.active(alg)?.jwk.kid.as_str()));
            assert_eq!(v.header.typ.as_deref(), Some("keyward-session+jwt"));
            assert_eq!(issuer.verify(&token)?.claims, c);
        }
    }
    // Host-side verification refuses a token from another ring.
    let token = issuer.sign_jws(IssuerAlg::EdDSA, "t", &claims(IssuerAlg::EdDSA))?;
    let other = Jwks::default();
    assert!(matches!(
        jws::verify_compact(&token, &other.keys),
        Err(JwsError::UnknownKid { .. })
    ));
    assert!(matches!(
        issuer.sign_jws(IssuerAlg::ES256, "t", &json!("not an object")),
        Err(IssuerError::Jws(JwsError::Encode { .. }))
    ));
    Ok(())
}

#[test]
fn load_without_keys_asks_for_init() -> TestResult {
    let (_tok, hsm) = setup()?;
    assert!(matches!(Issuer::load(&hsm), Err(IssuerError::NoEdDsaKey)));
    // ensure without EdDSA creates the asked keys but still cannot load.
    assert!(matches!(
        Issuer::ensure(&hsm, &[IssuerAlg::ES256]),
        Err(IssuerError::NoEdDsaKey)
    ));
    assert_eq!(issuer_objects(&hsm)?.len(), 1);
    let issuer = Issuer::ensure(&hsm, &[IssuerAlg::EdDSA])?;
    assert_eq!(issuer.keys().len(), 2);
    assert!(matches!(
        issuer.sign_jws(IssuerAlg::ES256K, "t", &claims(IssuerAlg::ES256K)),
        Err(IssuerError::NoActiveKey { alg: IssuerAlg::ES256K })
    ));
    Ok(())
}

#[test]
fn hsm_issuer_api_edges() -> TestResult {
    let (_tok, hsm) = setup()?;
    // A refused kid destroys the new pair: nothing (not even a pending pair) is left.
    let refuse = |_: &[u8]| Err::<String, String>("no".to_string());
    assert!(matches!(
        hsm.create_issuer_key(IssuerAlg::ES256, &refuse),
        Err(HsmError::InvalidIssuerKid { .. })
    ));
    let bad_kid = |_: &[u8]| Ok::<String, String>("a.b".to_string());
    assert!(matches!(
        hsm.create_issuer_key(IssuerAlg::EdDSA, &bad_kid),
        Err(HsmError::InvalidIssuerKid { .. })
    ));
    assert!(issuer_objects(&hsm)?.is_empty());
    assert!(hsm.issuer_keys()?.is_empty());

    let issuer = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    let es256k = issuer.active(IssuerAlg::ES256K)?.info.label.clone();
    let ed = issuer.active(IssuerAlg::EdDSA)?.info.label.clone();
    // ECDSA takes a 32-byte digest; EdDSA any message.
    assert!(matches!(
        hsm.sign_issuer(&es256k, b"too short"),
        Err(HsmError::Unsupported { .. })
    ));
    assert_eq!(hsm.sign_issuer(&es256k, &[7u8; 32])?.len(), 64);
    assert_eq!(hsm.sign_issuer(&ed, b"any length message")?.len(), 64);
    assert!(matches!(
        hsm.sign_issuer("keyward-issuer-EdDSA-nope", b"x"),
        Err(HsmError::IssuerKeyNotFound { .. })
    ));

    // Destroy (for rotation): gone from the token, the cache and the next load.
    hsm.destroy_issuer_key(&es256k)?;
    assert_eq!(issuer_objects(&hsm)?.len(), 2);
    assert!(matches!(
        hsm.sign_issuer(&es256k, &[7u8; 32]),
        Err(HsmError::IssuerKeyNotFound { .. })
    ));
    assert!(matches!(
        hsm.destroy_issuer_key(&es256k),
        Err(HsmError::IssuerKeyNotFound { .. })
    ));
    let reloaded = Issuer::load(&hsm)?;
    assert!(reloaded.active(IssuerAlg::ES256K).is_err());
    // ensure creates a new ES256K key with a new kid.
    let fresh = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    assert_ne!(fresh.active(IssuerAlg::ES256K)?.info.label, es256k);
    assert_eq!(issuer_objects(&hsm)?.len(), 3);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

/// Cached issuer handles survive a pool re-initialisation: after the token comes back, the
/// cache is reloaded (epoch changed) and signing works again with the same kids.
#[test]
fn issuer_signing_recovers_after_pool_reinit() -> TestResult {
    let (tok, hsm) = setup()?;
    assert_eq!(hsm.ensure_kek()?, 1);
    let issuer = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    let kids: Vec<String> = issuer.jwks().keys.into_iter().map(|k| k.kid).collect();
    issuer.sign_jws(IssuerAlg::ES256, "t", &claims(IssuerAlg::ES256))?;

    let backup = tok.dir.path().join("backup");
    copy_dir(&tok.token_dir(), &backup)?;
    std::fs::remove_dir_all(tok.token_dir())?;
    // The KEK reload notices the token's storage vanished and schedules a re-initialisation.
    let r = hsm.ensure_kek();
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    let r = issuer.sign_jws(IssuerAlg::EdDSA, "t", &claims(IssuerAlg::EdDSA));
    eprintln!("issuer sign while the token is gone: {r:?}");
    assert!(
        matches!(r, Err(IssuerError::Hsm(HsmError::Unavailable { .. }))),
        "{r:?}"
    );
    assert_eq!(hsm.pool_in_use(), 0);

    copy_dir(&backup, &tok.token_dir())?;
    for alg in IssuerAlg::ALL {
        let token = issuer.sign_jws(alg, "t", &claims(alg))?;
        assert_eq!(issuer.verify(&token)?.claims, claims(alg));
    }
    let reloaded = Issuer::load(&hsm)?;
    let kids2: Vec<String> = reloaded.jwks().keys.into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, kids2);
    Ok(())
}

#[test]
fn joserfc_verifies_hsm_issuer_tokens() -> TestResult {
    let (tok, hsm) = setup()?;
    let issuer = Issuer::ensure(&hsm, &IssuerAlg::ALL)?;
    let jwks_path = tok.dir.path().join("jwks.json");
    std::fs::write(&jwks_path, serde_json::to_vec(&issuer.jwks())?)?;
    for alg in IssuerAlg::ALL {
        for i in 0..4u32 {
            let mut c = claims(alg);
            c["i"] = json!(i);
            let token = issuer.sign_jws(alg, "keyward-receipt+jws", &c)?;
            let Some(back) = common::joserfc_verify(&jwks_path, &token) else {
                return Ok(());
            };
            assert_eq!(back, c, "{alg}");
        }
    }
    // And joserfc refuses a tampered token.
    let token = issuer.sign_jws(IssuerAlg::ES256, "t", &claims(IssuerAlg::ES256))?;
    let (head, rest) = token.split_once('.').ok_or("token")?;
    let (_, sig) = rest.split_once('.').ok_or("token")?;
    let forged = format!("{head}.{}.{sig}", base64_url(br#"{"sub":"mallory"}"#));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/jose_verify.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&jwks_path)
        .arg(&forged)
        .output()?;
    assert!(!out.status.success());
    Ok(())
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn jws_alg_names_match_issuer_algs() {
    for alg in IssuerAlg::ALL {
        assert_eq!(JwsAlg::parse(alg.as_str()), Some(jws_alg(alg)));
    }
}
