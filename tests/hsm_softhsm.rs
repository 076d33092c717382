//! keyward `hsm` module against a real SoftHSM2 token. Run with cargo-nextest (one process per
//! test: SoftHSM reads SOFTHSM2_CONF once per process).

use k256::ecdsa::signature::hazmat::PrehashVerifier;
use keyward::config::Custody;
use keyward::hsm::{Hsm, HsmConfig, HsmError, HsmKey, KekKind, WrappedKey, WrappedRef};
use keyward::testkit::SoftHsmToken;
use keyward::types::KeyAlg;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TEST_MESSAGE: &[u8] = b"keyward binding check";

fn token() -> Result<SoftHsmToken, Box<dyn std::error::Error>> {
    let tok = SoftHsmToken::new()?;
    // Safe in edition 2021; nextest runs each test in its own process.
    std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
    Ok(tok)
}

/// hsm custody: sealed KEK v1 (and, on SoftHSM, host KEK v2 for Ed25519 carriers).
fn setup(pool: usize) -> Result<(SoftHsmToken, Hsm), Box<dyn std::error::Error>> {
    let tok = token()?;
    let hsm = Hsm::open(&tok.hsm_config(pool))?;
    assert_eq!(hsm.ensure_kek()?, 1);
    Ok((tok, hsm))
}

/// host custody: host KEK v1.
fn setup_host(pool: usize) -> Result<(SoftHsmToken, Hsm), Box<dyn std::error::Error>> {
    let tok = token()?;
    let hsm = Hsm::open(&tok.hsm_config(pool).with_custody(Custody::Host))?;
    assert_eq!(hsm.ensure_kek()?, 1);
    Ok((tok, hsm))
}

/// The kind of the KEK a blob is under.
fn kind_of(hsm: &Hsm, w: &WrappedKey) -> Option<KekKind> {
    hsm.keks()
        .into_iter()
        .find(|(v, _, _)| *v == w.kek_version)
        .map(|(_, _, k)| k)
}

fn wref(w: &WrappedKey) -> WrappedRef<'_> {
    WrappedRef {
        public_key: &w.public_key,
        wrapped: &w.wrapped,
        kek_version: w.kek_version,
    }
}

fn prehash(msg: &[u8]) -> [u8; 32] {
    Sha256::digest(msg).into()
}

/// What the caller does before caching an `HsmKey`: verify a test signature against the
/// stored public key. Ok(false) means "does not verify".
fn verify(alg: KeyAlg, public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<bool, Box<dyn std::error::Error>> {
    match alg {
        KeyAlg::Secp256k1 => {
            let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(public_key)?;
            let sig = k256::ecdsa::Signature::from_slice(sig)?;
            let sig = sig.normalize_s().unwrap_or(sig);
            Ok(vk.verify_prehash(&prehash(msg), &sig).is_ok())
        }
        KeyAlg::Ed25519 => {
            let pk: [u8; 32] = public_key.try_into()?;
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk)?;
            let sig = ed25519_dalek::Signature::from_slice(sig)?;
            Ok(vk.verify_strict(msg, &sig).is_ok())
        }
    }
}

fn sign_msg(hsm: &Hsm, key: &HsmKey, alg: KeyAlg, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
    match alg {
        KeyAlg::Secp256k1 => hsm.sign(key, &prehash(msg)),
        KeyAlg::Ed25519 => hsm.sign(key, msg),
    }
}

/// The binding check a caller performs.
fn bound(hsm: &Hsm, alg: KeyAlg, key: &HsmKey, public_key: &[u8]) -> Result<bool, Box<dyn std::error::Error>> {
    let sig = sign_msg(hsm, key, alg, TEST_MESSAGE)?;
    assert_eq!(sig.len(), 64);
    verify(alg, public_key, TEST_MESSAGE, &sig)
}

fn host_public_key(alg: KeyAlg, secret: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    assert_eq!(secret.len(), 32);
    Ok(match alg {
        KeyAlg::Secp256k1 => {
            let sk = k256::ecdsa::SigningKey::from_slice(secret)?;
            sk.verifying_key().to_encoded_point(false).as_bytes().to_vec()
        }
        KeyAlg::Ed25519 => {
            let seed: [u8; 32] = secret.try_into()?;
            let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
            sk.verifying_key().to_bytes().to_vec()
        }
    })
}

fn keks(hsm: &Hsm) -> Result<Vec<keyward::hsm::ObjectInfo>, HsmError> {
    Ok(hsm
        .inspect_private_keys()?
        .into_iter()
        .filter(|o| o.label.starts_with("keyward-kek-v"))
        .collect())
}

#[test]
fn open_and_ensure_kek_is_idempotent() -> TestResult {
    let (tok, hsm) = setup(2)?;
    assert_eq!(hsm.kek_version(), 1);
    assert_eq!(hsm.ensure_kek()?, 1);
    assert_eq!(keks(&hsm)?.len(), 1);
    assert_eq!(hsm.pool_size(), 2);
    assert_eq!(hsm.pool_in_use(), 0);
    drop(hsm);
    // A second open of the same token finds the existing KEK without creating one.
    let again = Hsm::open(&tok.hsm_config(1))?;
    assert_eq!(again.kek_version(), 1);
    assert_eq!(again.ensure_kek()?, 1);
    assert_eq!(keks(&again)?.len(), 1);
    Ok(())
}

#[test]
fn kek_attributes() -> TestResult {
    let (_tok, hsm) = setup(1)?;
    let k = keks(&hsm)?;
    assert_eq!(k.len(), 1, "{k:?}");
    let kek = &k[0];
    assert_eq!(kek.label, "keyward-kek-v1");
    assert_eq!(kek.class, "CKO_SECRET_KEY");
    assert_eq!(kek.key_type, "CKK_AES");
    assert!(kek.token);
    assert!(kek.sensitive);
    // Exportable for `keyward kek backup`, but only under a key the SO marked trusted.
    assert!(kek.extractable && kek.wrap_with_trusted, "{kek:?}");
    assert!(!kek.user_can_export());
    Ok(())
}

fn generate_unwrap_sign(alg: KeyAlg) -> TestResult {
    let (_tok, hsm) = setup(2)?;
    let w = hsm.generate_wrapped(alg)?;
    // secp256k1 under the sealed KEK; Ed25519 on SoftHSM 2.6.1 (no native EdDSA wrap) under
    // the host KEK, since its seed passes through host memory anyway.
    let (version, kind) = match alg {
        KeyAlg::Secp256k1 => (1, KekKind::Sealed),
        KeyAlg::Ed25519 => (2, KekKind::Host),
    };
    assert_eq!((w.kek_version, kind_of(&hsm, &w)), (version, Some(kind)));
    match alg {
        KeyAlg::Secp256k1 => {
            assert_eq!(w.public_key.len(), 65);
            assert_eq!(w.public_key[0], 0x04);
        }
        KeyAlg::Ed25519 => assert_eq!(w.public_key.len(), 32),
    }
    let key = hsm.unwrap_for_signing(alg, &wref(&w))?;
    assert!(bound(&hsm, alg, &key, &w.public_key)?);
    for i in 0..20u32 {
        let msg = format!("message {i}");
        let sig = sign_msg(&hsm, &key, alg, msg.as_bytes())?;
        assert!(verify(alg, &w.public_key, msg.as_bytes(), &sig)?);
        assert!(!verify(alg, &w.public_key, b"other", &sig)?);
    }
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

#[test]
fn secp256k1_generate_unwrap_sign_verifies() -> TestResult {
    generate_unwrap_sign(KeyAlg::Secp256k1)
}

#[test]
fn ed25519_generate_unwrap_sign_verifies() -> TestResult {
    generate_unwrap_sign(KeyAlg::Ed25519)
}

#[test]
fn secp256k1_signatures_are_raw_and_not_always_low_s() -> TestResult {
    let (_tok, hsm) = setup(1)?;
    let w = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))?;
    let mut high_s = 0;
    for i in 0..64u32 {
        let sig = hsm.sign(&key, &prehash(&i.to_be_bytes()))?;
        let sig = k256::ecdsa::Signature::from_slice(&sig)?;
        if sig.normalize_s().is_some() {
            high_s += 1;
        }
    }
    // Each signature is high-s with probability 1/2: caller must normalise.
    assert!(high_s > 0, "token never produced a high-s signature in 64 tries");
    // Wrong prehash length is refused, not passed to the token.
    assert!(matches!(hsm.sign(&key, b"short"), Err(HsmError::Unsupported { .. })));
    Ok(())
}

fn host_unwrap_matches(alg: KeyAlg) -> TestResult {
    let (_tok, hsm) = setup_host(1)?;
    for _ in 0..5 {
        let w = hsm.generate_wrapped(alg)?;
        let secret = hsm.unwrap_to_host(alg, &wref(&w))?;
        assert_eq!(host_public_key(alg, &secret)?, w.public_key);
    }
    // Nothing non-sensitive stays behind.
    let objs = hsm.inspect_private_keys()?;
    assert!(objs.iter().all(|o| o.token), "leftover session objects: {objs:?}");
    Ok(())
}

#[test]
fn host_unwrap_secp256k1_matches_public_key() -> TestResult {
    host_unwrap_matches(KeyAlg::Secp256k1)
}

#[test]
fn host_unwrap_ed25519_matches_public_key() -> TestResult {
    host_unwrap_matches(KeyAlg::Ed25519)
}

#[test]
fn swapped_blob_is_caught_by_binding_check() -> TestResult {
    let (_tok, hsm) = setup(2)?;
    for alg in KeyAlg::ALL {
        let a = hsm.generate_wrapped(alg)?;
        let b = hsm.generate_wrapped(alg)?;
        // Blob A presented with public key B: unwraps fine (same KEK), but the caller's check fails.
        let swapped = WrappedRef {
            public_key: &b.public_key,
            wrapped: &a.wrapped,
            kek_version: a.kek_version,
        };
        let key = hsm.unwrap_for_signing(alg, &swapped)?;
        assert!(!bound(&hsm, alg, &key, &b.public_key)?, "{alg}: swapped blob verified");
        assert!(bound(&hsm, alg, &key, &a.public_key)?);
        let good = hsm.unwrap_for_signing(alg, &wref(&b))?;
        assert!(bound(&hsm, alg, &good, &b.public_key)?);
    }
    // A blob of the other algorithm is refused by the module itself.
    let ed = hsm.generate_wrapped(KeyAlg::Ed25519)?;
    let k1 = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let cross = WrappedRef {
        public_key: &ed.public_key,
        wrapped: &k1.wrapped,
        kek_version: k1.kek_version,
    };
    let r = hsm.unwrap_for_signing(KeyAlg::Ed25519, &cross);
    assert!(matches!(r, Err(HsmError::KeyMismatch { .. })), "{r:?}");
    corrupted_and_unknown_blobs(&hsm, &k1)
}

#[test]
fn a_blob_of_the_other_algorithm_is_a_mismatch_in_host_custody() -> TestResult {
    let (_tok, host) = setup_host(1)?;
    let ed = host.generate_wrapped(KeyAlg::Ed25519)?;
    let k1h = host.generate_wrapped(KeyAlg::Secp256k1)?;
    let cross = WrappedRef {
        public_key: &k1h.public_key,
        wrapped: &ed.wrapped,
        kek_version: ed.kek_version,
    };
    let r = host.unwrap_to_host(KeyAlg::Secp256k1, &cross);
    assert!(matches!(r, Err(HsmError::KeyMismatch { .. })), "{r:?}");
    let r = host.unwrap_for_signing(KeyAlg::Secp256k1, &cross);
    assert!(matches!(r, Err(HsmError::KeyMismatch { .. })), "{r:?}");
    Ok(())
}

fn corrupted_and_unknown_blobs(hsm: &Hsm, k1: &WrappedKey) -> TestResult {
    // A corrupted blob is a mismatch, not a crash.
    let mut bad = k1.wrapped.clone();
    bad[5] ^= 0xff;
    let r = hsm.unwrap_for_signing(
        KeyAlg::Secp256k1,
        &WrappedRef {
            public_key: &k1.public_key,
            wrapped: &bad,
            kek_version: 1,
        },
    );
    assert!(matches!(r, Err(HsmError::KeyMismatch { .. })), "{r:?}");
    // Unknown KEK version.
    let r = hsm.unwrap_to_host(
        KeyAlg::Secp256k1,
        &WrappedRef {
            public_key: &k1.public_key,
            wrapped: &k1.wrapped,
            kek_version: 9,
        },
    );
    assert!(matches!(r, Err(HsmError::KekMissing { version: 9 })), "{r:?}");
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

#[test]
fn wrong_pin_is_pin_incorrect() -> TestResult {
    let tok = token()?;
    let mut cfg = tok.hsm_config(2);
    cfg.pin = SecretString::from("definitely-wrong-pin".to_string());
    let err = Hsm::open(&cfg).err().ok_or("open with wrong PIN succeeded")?;
    assert!(
        matches!(err, HsmError::PinIncorrect { ref label } if *label == tok.label),
        "{err:?}"
    );
    let shown = format!("{err} {err:?} {cfg:?}");
    assert!(!shown.contains("definitely-wrong-pin"), "{shown}");
    assert!(!shown.contains(&tok.pin), "{shown}");
    // The right PIN still works in the same process.
    let hsm = Hsm::open(&tok.hsm_config(2))?;
    assert_eq!(hsm.ensure_kek()?, 1);
    Ok(())
}

#[test]
fn unknown_label_is_token_not_found() -> TestResult {
    let tok = token()?;
    let mut cfg = tok.hsm_config(1);
    cfg.token_label = "no-such-token".to_string();
    let err = Hsm::open(&cfg).err().ok_or("open of unknown label succeeded")?;
    assert!(
        matches!(err, HsmError::TokenNotFound { ref label } if label == "no-such-token"),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn bad_module_path_is_module_load() -> TestResult {
    let tok = token()?;
    let mut cfg: HsmConfig = tok.hsm_config(1);
    cfg.module = "/nonexistent/libnothing.so".into();
    let err = Hsm::open(&cfg).err().ok_or("open of missing module succeeded")?;
    assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
    cfg.pool_size = 0;
    cfg.module = SoftHsmToken::module_path();
    let err = Hsm::open(&cfg).err().ok_or("pool_size 0 accepted")?;
    assert!(matches!(err, HsmError::Unsupported { .. }), "{err:?}");
    Ok(())
}

#[test]
fn rotate_kek_new_keys_use_new_versions_old_blobs_still_unwrap() -> TestResult {
    // hsm custody on SoftHSM: v1 sealed, v2 host (Ed25519 carriers); rotation adds v3 and v4.
    let (_tok, hsm) = setup(2)?;
    let old: Vec<(KeyAlg, WrappedKey)> = KeyAlg::ALL
        .iter()
        .map(|a| hsm.generate_wrapped(*a).map(|w| (*a, w)))
        .collect::<Result<_, _>>()?;
    assert_eq!(hsm.rotate_kek()?, 3);
    assert_eq!(hsm.kek_version(), 3);
    assert_eq!(hsm.ensure_kek()?, 3);
    let k = keks(&hsm)?;
    assert_eq!(k.len(), 2, "two sealed KEKs: {k:?}");
    assert!(k.iter().all(|o| o.token && o.sensitive && !o.user_can_export()));
    for alg in KeyAlg::ALL {
        let w = hsm.generate_wrapped(alg)?;
        assert_eq!(w.kek_version, if alg == KeyAlg::Secp256k1 { 3 } else { 4 });
        let key = hsm.unwrap_for_signing(alg, &wref(&w))?;
        assert!(bound(&hsm, alg, &key, &w.public_key)?);
    }
    for (alg, w) in &old {
        let key = hsm.unwrap_for_signing(*alg, &wref(w))?;
        assert!(bound(&hsm, *alg, &key, &w.public_key)?);
        // A blob claimed to be under the KEK of the same kind one rotation later does not unwrap.
        let lie = WrappedRef {
            kek_version: w.kek_version + 2,
            ..wref(w)
        };
        let r = hsm.unwrap_for_signing(*alg, &lie);
        assert!(matches!(r, Err(HsmError::KeyMismatch { .. })), "{r:?}");
    }
    assert_eq!(hsm.rotate_kek()?, 5);
    Ok(())
}

#[test]
fn host_custody_rotation_keeps_old_blobs() -> TestResult {
    let (_tok, host) = setup_host(1)?;
    let w = host.generate_wrapped(KeyAlg::Secp256k1)?;
    assert_eq!(host.rotate_kek()?, 2);
    let secret = host.unwrap_to_host(KeyAlg::Secp256k1, &wref(&w))?;
    assert_eq!(host_public_key(KeyAlg::Secp256k1, &secret)?, w.public_key);
    Ok(())
}

#[test]
fn no_plain_private_keys_and_no_leftovers() -> TestResult {
    let (_tok, hsm) = setup(2)?;
    let mut keys = Vec::new();
    for alg in KeyAlg::ALL {
        let w = hsm.generate_wrapped(alg)?;
        if alg == KeyAlg::Ed25519 {
            // Under the host KEK on SoftHSM: its carrier object must not stay behind either.
            let _ = hsm.unwrap_to_host(alg, &wref(&w))?;
        }
        let key = hsm.unwrap_for_signing(alg, &wref(&w))?;
        assert!(bound(&hsm, alg, &key, &w.public_key)?);
        keys.push(key);
    }
    let objs = hsm.inspect_private_keys()?;
    assert!(
        !objs.iter().any(|o| o.extractable && !o.sensitive),
        "extractable non-sensitive key on token: {objs:?}"
    );
    let session_keys: Vec<_> = objs.iter().filter(|o| !o.token).collect();
    assert_eq!(session_keys.len(), 2, "{objs:?}");
    assert!(session_keys
        .iter()
        .all(|o| o.sensitive && !o.extractable && o.class == "CKO_PRIVATE_KEY"));
    assert_eq!(
        objs.iter().filter(|o| o.token).count(),
        2,
        "only the two KEKs persist: {objs:?}"
    );
    drop(keys);
    let objs = hsm.inspect_private_keys()?;
    assert!(objs.iter().all(|o| o.token), "leftover session objects: {objs:?}");
    assert_eq!(objs.len(), 2);
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
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

#[test]
fn token_dir_deleted_is_unavailable_then_recovers() -> TestResult {
    let (tok, hsm) = setup(2)?;
    let w = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))?;
    assert!(bound(&hsm, KeyAlg::Secp256k1, &key, &w.public_key)?);

    let backup = tok.dir.path().join("backup");
    copy_dir(&tok.token_dir(), &backup)?;
    std::fs::remove_dir_all(tok.token_dir())?;

    let r = hsm.generate_wrapped(KeyAlg::Ed25519);
    eprintln!("generate after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    let r = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w));
    eprintln!("unwrap after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    let r = hsm.ensure_kek();
    eprintln!("ensure_kek after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    let r = hsm.sign(&key, &prehash(b"y"));
    eprintln!("sign after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::StaleKey)), "{r:?}");
    let r = hsm.unwrap_to_host(KeyAlg::Secp256k1, &wref(&w));
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    assert_eq!(hsm.pool_in_use(), 0);

    // Token back: the next call works again, old handles are stale.
    copy_dir(&backup, &tok.token_dir())?;
    let w2 = hsm.generate_wrapped(KeyAlg::Ed25519)?;
    let k2 = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&w2))?;
    assert!(bound(&hsm, KeyAlg::Ed25519, &k2, &w2.public_key)?);
    let r = hsm.sign(&key, &prehash(b"x"));
    eprintln!("sign with pre-failure key: {r:?}");
    assert!(matches!(r, Err(HsmError::StaleKey)), "{r:?}");
    let k1 = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))?;
    assert!(bound(&hsm, KeyAlg::Secp256k1, &k1, &w.public_key)?);
    Ok(())
}

#[test]
fn concurrent_signing_4x200() -> TestResult {
    let (_tok, hsm) = setup(4)?;
    let mut prepared = Vec::new();
    for i in 0..4 {
        let alg = if i % 2 == 0 { KeyAlg::Secp256k1 } else { KeyAlg::Ed25519 };
        let w = hsm.generate_wrapped(alg)?;
        let key = hsm.unwrap_for_signing(alg, &wref(&w))?;
        assert!(bound(&hsm, alg, &key, &w.public_key)?);
        prepared.push((alg, w, key));
    }
    let results: Vec<Result<usize, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = prepared
            .iter()
            .enumerate()
            .map(|(t, (alg, w, key))| {
                let hsm = hsm.clone();
                scope.spawn(move || -> Result<usize, String> {
                    let mut ok = 0;
                    for i in 0..200u32 {
                        let msg = format!("thread {t} message {i}");
                        let sig = sign_msg(&hsm, key, *alg, msg.as_bytes()).map_err(|e| e.to_string())?;
                        if verify(*alg, &w.public_key, msg.as_bytes(), &sig).map_err(|e| e.to_string())? {
                            ok += 1;
                        }
                    }
                    Ok(ok)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".to_string())))
            .collect()
    });
    for r in results {
        assert_eq!(r?, 200);
    }
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

#[test]
#[ignore = "throughput print, not an assertion; run with --run-ignored"]
fn ecdsa_sign_throughput() -> TestResult {
    let (_tok, hsm) = setup(1)?;
    let w = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))?;
    let hash = prehash(b"throughput");
    let n = 3000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        hsm.sign(&key, &hash)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "CKM_ECDSA secp256k1 held handle: {n} signs in {secs:.3}s = {:.0}/s",
        f64::from(n) / secs
    );
    let w = hsm.generate_wrapped(KeyAlg::Ed25519)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&w))?;
    let start = std::time::Instant::now();
    for _ in 0..n {
        hsm.sign(&key, b"throughput")?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "CKM_EDDSA held handle: {n} signs in {secs:.3}s = {:.0}/s",
        f64::from(n) / secs
    );
    Ok(())
}

#[test]
fn token_dir_deleted_unwrap_first_is_unavailable() -> TestResult {
    let (tok, hsm) = setup_host(1)?;
    let blobs = KeyAlg::ALL
        .iter()
        .map(|a| hsm.generate_wrapped(*a).map(|w| (*a, w)))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::remove_dir_all(tok.token_dir())?;
    for (alg, w) in &blobs {
        let r = hsm.unwrap_to_host(*alg, &wref(w));
        eprintln!("{alg} host unwrap after token dir removal: {r:?}");
        assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    }
    let r = hsm.generate_wrapped(KeyAlg::Secp256k1);
    eprintln!("generate after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    let r = hsm.inspect_private_keys();
    eprintln!("inspect after token dir removal: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

#[test]
fn logged_out_behind_our_back_recovers() -> TestResult {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let (tok, hsm) = setup(2)?;
    let w = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))?;
    // Another handle on the same (already initialised) library logs the application out.
    let ctx = Pkcs11::new(SoftHsmToken::module_path())?;
    let init = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    assert!(init.is_err(), "library should already be initialised in this process");
    let mut slot = None;
    for s in ctx.get_slots_with_token()? {
        if ctx.get_token_info(s)?.label() == tok.label {
            slot = Some(s);
        }
    }
    let other = ctx.open_ro_session(slot.ok_or("token slot not found")?)?;
    other.logout()?;
    drop(other);

    // The pool notices it is no longer logged in, logs in again and retries: no error.
    let w2 = hsm.generate_wrapped(KeyAlg::Secp256k1)?;
    let k2 = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w2))?;
    assert!(bound(&hsm, KeyAlg::Secp256k1, &k2, &w2.public_key)?);
    // Recovered by logging in again, not by re-initialising the library.
    assert!(key.is_current());
    let r = hsm.sign(&key, &prehash(b"old key"));
    // SoftHSM drops private session objects at C_Logout: the old handle is reported stale.
    assert!(matches!(r, Err(HsmError::StaleKey)), "{r:?}");
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}

#[test]
fn library_finalized_behind_our_back_reinitialises() -> TestResult {
    use cryptoki::context::Pkcs11;
    let (_tok, hsm) = setup(2)?;
    let w = hsm.generate_wrapped(KeyAlg::Ed25519)?;
    let key = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&w))?;
    assert!(bound(&hsm, KeyAlg::Ed25519, &key, &w.public_key)?);
    // C_Finalize through another handle on the same library: every call now fails with
    // CKR_CRYPTOKI_NOT_INITIALIZED.
    Pkcs11::new(SoftHsmToken::module_path())?.finalize()?;

    let r = hsm.sign(&key, b"after finalize");
    eprintln!("sign after external C_Finalize: {r:?}");
    assert!(matches!(r, Err(HsmError::Unavailable { .. })), "{r:?}");
    // The pool re-initialises on the next call; old handles are stale from then on.
    let w2 = hsm.generate_wrapped(KeyAlg::Ed25519)?;
    assert!(!key.is_current());
    assert!(matches!(hsm.sign(&key, b"x"), Err(HsmError::StaleKey)));
    let k2 = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&w2))?;
    assert!(bound(&hsm, KeyAlg::Ed25519, &k2, &w2.public_key)?);
    let k1 = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&w))?;
    assert!(bound(&hsm, KeyAlg::Ed25519, &k1, &w.public_key)?);
    assert_eq!(hsm.kek_version(), 1);
    drop((key, k1, k2));
    let objs = hsm.inspect_private_keys()?;
    assert!(objs.iter().all(|o| o.token), "leftover session objects: {objs:?}");
    assert_eq!(hsm.pool_in_use(), 0);
    Ok(())
}
