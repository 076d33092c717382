//! Raw operation costs, the denominators of the daemon's performance ratios:
//! k256 sign with recovery id, Ed25519 sign, EIP-712 parse + hash, recovery-id
//! derivation, and SoftHSM signing per custody mode (a real token in a temp
//! dir). Run: `cargo bench --bench crypto`.

use std::hint::black_box;

use criterion::Criterion;
use ed25519_dalek::Signer as _;
use keyward::crypto::eip712::{keccak256, TypedData};
use keyward::crypto::eth::to_recoverable;
use keyward::hsm::{Hsm, WrappedRef};
use keyward::testkit::SoftHsmToken;
use keyward::types::KeyAlg;

const MAIL: &str = include_str!("../tests/data/mail.json");

fn software(c: &mut Criterion) {
    let sk = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
    let digest = keccak256(b"bench");
    c.bench_function("k256 sign_prehash_recoverable", |b| {
        b.iter(|| sk.sign_prehash_recoverable(black_box(&digest)))
    });
    let (sig, _) = sk.sign_prehash_recoverable(&digest).expect("sign");
    let vk = *sk.verifying_key();
    // Signatures of both recovery ids (one recovery for id 0, two for id 1),
    // taken in turn: the mean is what a stream of HSM signatures costs.
    let signed: Vec<([u8; 32], k256::ecdsa::Signature)> = (0u8..16)
        .map(|i| {
            let d = keccak256(&[i]);
            (d, sk.sign_prehash_recoverable(&d).expect("sign").0)
        })
        .collect();
    let mut turn = 0;
    c.bench_function("recovery id: keyward (libsecp256k1), both ids in turn", |b| {
        b.iter(|| {
            turn = (turn + 1) % signed.len();
            let (d, s) = &signed[turn];
            to_recoverable(&vk, black_box(d), &s.to_bytes())
        })
    });
    c.bench_function("recovery id: k256 trial recovery", |b| {
        b.iter(|| k256::ecdsa::RecoveryId::trial_recovery_from_prehash(&vk, black_box(&digest), &sig))
    });
    let ed = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    c.bench_function("ed25519 sign (32 B)", |b| b.iter(|| ed.sign(black_box(&digest))));
    c.bench_function("eip712 parse + signing hash (Mail)", |b| {
        b.iter(|| TypedData::from_slice(black_box(MAIL.as_bytes())).map(|t| t.signing_hash()))
    });
}

fn hsm(c: &mut Criterion, hsm: &Hsm) {
    for alg in KeyAlg::ALL {
        let w = hsm.generate_wrapped(alg).expect("generate");
        let wref = WrappedRef {
            public_key: &w.public_key,
            wrapped: &w.wrapped,
            kek_version: w.kek_version,
        };
        let key = hsm.unwrap_for_signing(alg, &wref).expect("unwrap");
        let digest = keccak256(b"bench");
        c.bench_function(&format!("softhsm {alg} sign, handle held (custody hsm)"), |b| {
            b.iter(|| hsm.sign(&key, black_box(&digest)))
        });
        c.bench_function(&format!("softhsm {alg} unwrap + sign + destroy (no cache)"), |b| {
            b.iter(|| {
                let k = hsm.unwrap_for_signing(alg, &wref)?;
                hsm.sign(&k, &digest)
            })
        });
        c.bench_function(
            &format!("softhsm {alg} unwrap to host (custody host cache fill)"),
            |b| b.iter(|| hsm.unwrap_to_host(alg, &wref)),
        );
    }
}

fn main() {
    let token = SoftHsmToken::new().expect("SoftHSM token (install softhsm2)");
    // Before any thread exists: SoftHSM reads this at C_Initialize.
    std::env::set_var("SOFTHSM2_CONF", &token.conf_path);
    let mut c = Criterion::default().configure_from_args();
    software(&mut c);
    let h = Hsm::open(&token.hsm_config(1)).expect("open token");
    h.ensure_kek().expect("kek");
    hsm(&mut c, &h);
    c.final_summary();
}
