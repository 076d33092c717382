//! What the custody modes promise, against a real SoftHSM token (issue 12, parts 5 and 6).
//!
//! hsm custody: whoever holds the PIN, talking PKCS#11 directly (a second cryptoki context in
//! this process, as an attacker with the PIN would), can neither read an unwrapped account key
//! nor unwrap a blob as extractable. Host custody: after eviction no copy of a key is left in
//! the process's memory. Run with cargo-nextest (one process per test: SoftHSM reads
//! SOFTHSM2_CONF once per process).

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use keyward::api::pb::{CreateAccountRequest, SignMessageRequest, SignatureAlgorithm};
use keyward::config::Custody;
use keyward::hsm::{Hsm, HsmError, KekKind, WrappedKey, WrappedRef};
use keyward::testkit::SoftHsmToken;
use keyward::types::KeyAlg;
use secrecy::SecretString;

fn token() -> SoftHsmToken {
    let tok = SoftHsmToken::new().expect("SoftHSM token (is softhsm2 installed?)");
    // Safe in edition 2021; nextest runs each test in its own process, before any thread.
    std::env::set_var("SOFTHSM2_CONF", &tok.conf_path);
    tok
}

fn wref(w: &WrappedKey) -> WrappedRef<'_> {
    WrappedRef {
        public_key: &w.public_key,
        wrapped: &w.wrapped,
        kek_version: w.kek_version,
    }
}

/// A PKCS#11 session of its own on the token, logged in with the user PIN: what anyone holding
/// the PIN can do, without keyward in the way. The context is never finalised (keyward's pool
/// shares the library in this process).
fn pin_holder(tok: &SoftHsmToken) -> (Pkcs11, Session) {
    let ctx = Pkcs11::new(SoftHsmToken::module_path()).expect("module");
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == tok.label)
                .unwrap_or(false)
        })
        .expect("the token's slot");
    let session = ctx.open_rw_session(slot).expect("session");
    match session.login(UserType::User, Some(&SecretString::from(tok.pin.clone()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    (ctx, session)
}

fn by_label(s: &Session, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .expect("find");
    assert_eq!(found.len(), 1, "{label}");
    found[0]
}

fn has_value(s: &Session, h: ObjectHandle) -> bool {
    match s.get_attributes(h, &[AttributeType::Value]) {
        Ok(attrs) => attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        Err(_) => false,
    }
}

/// A session AES key that may wrap anything extractable.
fn wrapping_key(s: &Session) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(false),
            Attribute::Wrap(true),
        ],
    )
    .expect("AES key")
}

#[test]
fn hsm_custody_keys_cannot_be_read_with_the_pin() {
    let tok = token();
    let hsm = Hsm::open(&tok.hsm_config(2)).expect("open");
    assert_eq!(hsm.ensure_kek().expect("KEKs"), 1);
    let secp = hsm.generate_wrapped(KeyAlg::Secp256k1).expect("secp256k1");
    let ed = hsm.generate_wrapped(KeyAlg::Ed25519).expect("ed25519");
    let _k1 = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&secp)).expect("unwrap");
    let _k2 = hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(&ed)).expect("unwrap");

    let (_ctx, s) = pin_holder(&tok);
    let keys = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Token(false)])
        .expect("find");
    assert_eq!(
        keys.len(),
        2,
        "both unwrapped account keys are visible to the PIN holder"
    );
    let wrapper = wrapping_key(&s);
    for h in keys {
        assert!(!has_value(&s, h), "CKA_VALUE of an unwrapped account key was readable");
        assert!(s.update_attributes(h, &[Attribute::Sensitive(false)]).is_err());
        assert!(s.update_attributes(h, &[Attribute::Extractable(true)]).is_err());
        assert!(
            s.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, h).is_err(),
            "wrapped out"
        );
        assert!(s.copy_object(h, &[Attribute::Sensitive(false)]).is_err());
    }
}

#[test]
fn the_sealed_kek_refuses_extractable_unwraps() {
    let tok = token();
    let hsm = Hsm::open(&tok.hsm_config(2)).expect("open");
    hsm.ensure_kek().expect("KEKs");
    assert!(hsm
        .keks()
        .iter()
        .any(|(v, l, k)| *v == 1 && l == "keyward-kek-v1" && *k == KekKind::Sealed));
    let w = hsm.generate_wrapped(KeyAlg::Secp256k1).expect("secp256k1");
    assert_eq!(w.kek_version, 1);

    let (_ctx, s) = pin_holder(&tok);
    let kek = by_label(&s, "keyward-kek-v1");
    let ec = |extra: &[Attribute]| {
        let mut t = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
        ];
        t.extend_from_slice(extra);
        t
    };
    let asks: Vec<Vec<Attribute>> = vec![
        ec(&[
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ]),
        ec(&[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
        ]),
        ec(&[
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(false),
        ]),
        ec(&[]),
        ec(&[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
        ]),
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ],
    ];
    for t in &asks {
        match s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &w.wrapped, t) {
            Err(_) => {}
            Ok(h) => {
                let readable = has_value(&s, h);
                let _ = s.destroy_object(h);
                panic!("unwrap with {t:?} succeeded (value readable: {readable})");
            }
        }
    }
    // Control: the blob and KEK do unwrap when the template is honoured, and stay unreadable.
    let h = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &w.wrapped,
            &ec(&[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(false),
                Attribute::Sign(true),
            ]),
        )
        .expect("a compliant unwrap works");
    assert!(!has_value(&s, h));
    // The KEK cannot be loosened (CKA_DECRYPT on would make it an AES decryption oracle) or copied.
    assert!(s.update_attributes(kek, &[Attribute::Decrypt(true)]).is_err());
    assert!(s.copy_object(kek, &[Attribute::Decrypt(true)]).is_err());
    assert!(s.copy_object(kek, &[]).is_err());

    // Host custody with the same PIN on the same token cannot take the key out either.
    let host = Hsm::open(&tok.hsm_config(1).with_custody(Custody::Host)).expect("open host");
    match host.unwrap_to_host(KeyAlg::Secp256k1, &wref(&w)) {
        Err(HsmError::CustodyRefused { reason }) => assert!(reason.contains("keyward-kek-v1"), "{reason}"),
        other => panic!("expected CustodyRefused, got {other:?}"),
    }
}

/// A KEK as keyward made them before they were sealed: no unwrap template, modifiable.
fn legacy_kek(s: &Session) {
    let mut id = b"kek".to_vec();
    id.extend_from_slice(&1u32.to_be_bytes());
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Label(b"keyward-kek-v1".to_vec()),
            Attribute::Id(id),
        ],
    )
    .expect("legacy KEK");
}

#[test]
fn an_unenforced_kek_stops_hsm_custody_unless_the_operator_opts_in() {
    let tok = token();
    let (_ctx, s) = pin_holder(&tok);
    legacy_kek(&s);

    match Hsm::open(&tok.hsm_config(1)) {
        Err(HsmError::CustodyRefused { reason }) => {
            assert!(reason.contains("keyward-kek-v1"), "{reason}");
            assert!(reason.contains("allow_unenforced_kek"), "says what to do: {reason}");
        }
        other => panic!("expected CustodyRefused, got {other:?}"),
    }

    // Host custody uses it as it is (a host KEK in all but name).
    let host = Hsm::open(&tok.hsm_config(1).with_custody(Custody::Host)).expect("host custody");
    assert_eq!(host.kek_version(), 1);
    let w = host.generate_wrapped(KeyAlg::Secp256k1).expect("wrap");
    assert_eq!(w.kek_version, 1);
    assert_eq!(
        host.unwrap_to_host(KeyAlg::Secp256k1, &wref(&w)).expect("unwrap").len(),
        32
    );
    drop(host);

    // Opted in: it runs, `keyward init` (ensure_kek) adds a sealed KEK for new keys, and the
    // old blob still signs in the token.
    let mut cfg = tok.hsm_config(1);
    cfg.custody.allow_unenforced_kek = true;
    let hsm = Hsm::open(&cfg).expect("opted in");
    assert_eq!(hsm.ensure_kek().expect("sealed KEK"), 2);
    assert!(hsm.keks().contains(&(2, "keyward-kek-v2".to_string(), KekKind::Sealed)));
    assert_eq!(hsm.generate_wrapped(KeyAlg::Secp256k1).expect("new key").kek_version, 2);
    hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(&w))
        .expect("old key still usable");
}

/// In hsm custody on SoftHSM 2.6.1 Ed25519 keys pass through host memory; with
/// `hsm.refuse_host_ed25519` the daemon refuses them: account creation and Ed25519 signing
/// answer FAILED_PRECONDITION, while an existing account's secp256k1 key still signs.
#[test]
fn refuse_host_ed25519_is_failed_precondition() {
    let env = Env::new(Custody::Hsm, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        let account = create_account(&d, &env, &[]).await;
        d.stop().await;

        let text = std::fs::read_to_string(&env.config_path).expect("config");
        std::fs::write(
            &env.config_path,
            text.replace("[hsm]\n", "[hsm]\nrefuse_host_ed25519 = true\n"),
        )
        .expect("config");
        let d = env.start().await;
        // The stored EdDSA issuer keys were wrapped through host memory: this custody refuses
        // them, so they are retired and the signing key is made as a token object instead.
        let keys = d.state.jwks.list().await.expect("issuer keys");
        let eddsa: Vec<_> = keys.iter().filter(|k| k.alg == "EdDSA").collect();
        let active = eddsa
            .iter()
            .find(|k| k.state == keyward::store::IssuerKeyState::Active)
            .expect("an active EdDSA key");
        assert_eq!(
            active.kek_version, None,
            "a token object, not a host-path blob: {eddsa:?}"
        );
        assert_eq!(
            eddsa
                .iter()
                .filter(|k| k.state == keyward::store::IssuerKeyState::Retired && k.kek_version.is_some())
                .count(),
            2,
            "the stored active and next keys retired: {eddsa:?}"
        );
        let refused = d
            .accounts(&env, "admin")
            .await
            .create_account(CreateAccountRequest {
                controller: CONTROLLER.into(),
                label: "bob".into(),
                allow: vec![],
            })
            .await
            .expect_err("Ed25519 refused");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("refuse_host_ed25519"), "{refused:?}");

        let mut signing = d.signing(&env, "admin").await;
        let sign = |alg: SignatureAlgorithm| SignMessageRequest {
            account_id: account.account_id.clone(),
            alg: alg as i32,
            data: b"hello".to_vec(),
        };
        let e = signing
            .sign_message(sign(SignatureAlgorithm::Ed25519))
            .await
            .expect_err("Ed25519 refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        signing
            .sign_message(sign(SignatureAlgorithm::Secp256k1))
            .await
            .expect("secp256k1 still signs");
        d.stop().await;
    });
}

/// Where in this process's readable memory (every readable region of /proc/self/maps, read
/// through /proc/self/mem) any of the keys is. The keys are given bitwise negated and each
/// chunk read is negated before the search, so the search itself never holds a key.
fn find_in_memory(patterns: &[(&str, [u8; 32])]) -> Vec<String> {
    let maps = std::fs::File::open("/proc/self/maps").expect("maps");
    let mem = std::fs::File::open("/proc/self/mem").expect("mem");
    let finders: Vec<_> = patterns
        .iter()
        .map(|(name, negated)| (*name, memchr::memmem::Finder::new(negated).into_owned()))
        .collect();
    let mut hits = Vec::new();
    let mut scanned = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for line in BufReader::new(maps).lines() {
        let line = line.expect("maps line");
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        let mut at = start;
        while at < end {
            let len = usize::try_from((end - at).min(buf.len() as u64)).expect("len");
            let Ok(n) = mem.read_at(&mut buf[..len], at) else {
                break;
            };
            if n == 0 {
                break;
            }
            scanned += n as u64;
            for b in &mut buf[..n] {
                *b = !*b;
            }
            for (name, finder) in &finders {
                if finder.find(&buf[..n]).is_some() {
                    hits.push(format!("{name} in {line}"));
                }
            }
            buf[..n].fill(0);
            // Overlap chunks so a key across a boundary is seen.
            at += (n as u64).saturating_sub(31).max(1);
        }
    }
    assert!(scanned > 1 << 20, "scanned only {scanned} bytes");
    hits
}

fn negated(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = !*b;
    }
    out
}

/// Host custody: the key bytes live in the locked arena while cached, and once the account
/// is evicted no copy is left anywhere in the process (heap, stacks, the arena, the library's
/// buffers): checked by searching every readable page for the key, which the scan first
/// finds in the arena while the key is cached.
#[test]
fn host_keys_leave_no_copy_in_memory_after_eviction() {
    let env = Env::new(Custody::Host, StoreKind::Sqlite).expect("env");
    block_on(async {
        env.init().await;
        let d = env.start().await;
        assert_eq!(
            rustix::process::dumpable_behavior().expect("prctl"),
            rustix::process::DumpableBehavior::NotDumpable,
            "host custody makes the process non-dumpable"
        );
        let account = create_account(&d, &env, &[]).await;
        let keys = d.state.keys.clone();
        let record = keys.record(&account.account_id).await.expect("record");

        // Learn the keys the way the daemon reads them, keeping only their negation.
        let hsm = keys.hsm().clone();
        let patterns = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for k in &record.keys {
                let secret = hsm
                    .unwrap_to_host(
                        k.alg,
                        &WrappedRef {
                            public_key: &k.public_key,
                            wrapped: &k.wrapped,
                            kek_version: k.kek_version,
                        },
                    )
                    .expect("unwrap");
                out.push((k.alg, negated(&secret)));
                if k.alg == KeyAlg::Secp256k1 {
                    // The scalar as little-endian limbs, as k256 holds it.
                    let reversed: Vec<u8> = secret.iter().rev().copied().collect();
                    out.push((k.alg, negated(&reversed)));
                    drop(zeroize::Zeroizing::new(reversed));
                }
            }
            keyward::keys::scrub_stack::<{ 128 * 1024 }>();
            out
        })
        .await
        .expect("task");
        let named: Vec<(&str, [u8; 32])> = patterns
            .iter()
            .map(|(alg, p)| {
                (
                    if *alg == KeyAlg::Secp256k1 {
                        "secp256k1"
                    } else {
                        "ed25519"
                    },
                    *p,
                )
            })
            .collect();
        assert_eq!(named.len(), 3);

        // Sign with both keys on the host (through the cache and the arena).
        let mut signing = d.signing(&env, "admin").await;
        for alg in [SignatureAlgorithm::Secp256k1, SignatureAlgorithm::Ed25519] {
            signing
                .sign_message(SignMessageRequest {
                    account_id: account.account_id.clone(),
                    alg: alg as i32,
                    data: b"hello".to_vec(),
                })
                .await
                .expect("signed on the host");
        }
        assert_eq!(keys.cached(), 1);
        assert_eq!(keys.arena().in_use(), 2);
        let before = find_in_memory(&named);
        assert!(
            before.iter().any(|h| h.starts_with("secp256k1")) && before.iter().any(|h| h.starts_with("ed25519")),
            "the scan finds the cached keys (in the arena): {before:?}"
        );

        keys.clear_cache();
        assert_eq!(keys.arena().in_use(), 0, "evicted keys give their slots back");
        let after = find_in_memory(&named);
        assert!(after.is_empty(), "key bytes left in memory after eviction: {after:?}");
        d.stop().await;
    });
}

/// `keyward dev` sets its token up through PKCS#11, with no PIN on any command line: it works
/// with no `softhsm2-util` reachable, and every secret file it writes is 0600.
#[test]
fn dev_sets_up_its_token_without_a_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).expect("dir");
    // No program can be found: a softhsm2-util call would fail.
    std::env::set_var("PATH", &empty);
    let home = dir.path().join("home");
    let dev = keyward::dev::prepare(&home, Custody::Hsm).expect("dev home");
    for file in ["hsm-pin", "hsm-so-pin", "pki/server-key.pem"] {
        let mode = std::fs::metadata(dev.home.join(file)).expect(file).permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let mut config = keyward::config::Config::load(&dev.config).expect("the dev config passes the mode checks");
    config.load_pin().expect("pin");
    let hsm = Hsm::open(&config.hsm_config().expect("hsm config")).expect("the token opens with the PIN dev wrote");
    hsm.ensure_kek().expect("KEKs");
    let report = hsm.custody_report().to_string();
    assert!(report.contains("passes through host memory"), "{report}");
}
