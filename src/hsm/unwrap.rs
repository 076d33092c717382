//! Unwrapping: into a signing-only session object ("hsm" custody) or out to the host ("host").
//!
//! Ed25519 on tokens without EdDSA support in C_UnwrapKey (SoftHSM 2.6.1 answers
//! CKR_FUNCTION_FAILED): the blob is unwrapped as a non-sensitive generic secret (the PKCS#8
//! bytes), the seed is taken from it, the carrier destroyed, and a sensitive, non-extractable
//! Ed25519 session key is created from the seed (C_CreateObject). The seed is only ever held in
//! zeroizing buffers. Tokens that unwrap EdDSA natively use the native path.

use std::sync::atomic::Ordering;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::error::{rv_of, settle, Breakage, Fail, HsmError};
use super::generate::{
    destroy_quietly, ec_params, ed25519_seed_from_pkcs8, is_no_native_eddsa, key_type, params_match, public_key_len,
    read_value, scrub, wrap_mechanism,
};
use super::kek::Kek;
use super::pool::Origin;
use super::sign::HsmKey;
use super::Hsm;
use crate::types::KeyAlg;

/// A stored wrapped key, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct WrappedRef<'a> {
    /// Public key as in [`super::WrappedKey::public_key`].
    pub public_key: &'a [u8],
    /// The wrapped private key.
    pub wrapped: &'a [u8],
    /// KEK version it was wrapped under.
    pub kek_version: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Custody {
    /// Sensitive, not extractable, may sign.
    Token,
    /// Not sensitive, extractable: CKA_VALUE is read and the object destroyed.
    Host,
}

fn private_template(alg: KeyAlg, custody: Custody) -> Vec<Attribute> {
    let hsm = custody == Custody::Token;
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(alg)),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(hsm),
        Attribute::Extractable(!hsm),
        Attribute::Sign(hsm),
        Attribute::Derive(false),
    ]
}

fn mismatch(alg: KeyAlg, kek: &Kek) -> Fail {
    Fail::Hsm(HsmError::KeyMismatch {
        reason: format!("blob is not a {alg} key under KEK v{}", kek.version),
    })
}

/// C_UnwrapKey errors that mean "these bytes are not what the template says" rather than
/// token trouble: the blob does not belong to this KEK/algorithm. SoftHSM 2.6.1 answers a
/// corrupted blob or a wrong KEK with CKR_GENERAL_ERROR, which also signals device failure, so
/// that code is disambiguated by probing the session and the KEK: both fine means a bad blob
/// (no pool re-initialisation, which would let one bad blob invalidate every cached key).
fn unwrap_err(s: &Session, e: CkError, alg: KeyAlg, kek: &Kek) -> Fail {
    match rv_of(&e) {
        Some(
            RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::FunctionFailed
            | RvError::TemplateInconsistent
            | RvError::AttributeValueInvalid
            | RvError::DomainParamsInvalid
            | RvError::CurveNotSupported,
        ) => mismatch(alg, kek),
        Some(RvError::GeneralError) => match probe(s, kek) {
            Ok(()) => mismatch(alg, kek),
            Err(probe_err) => {
                tracing::warn!(error = %super::error::describe(&probe_err), "health probe after CKR_GENERAL_ERROR failed");
                Fail::Ck(probe_err)
            }
        },
        _ => Fail::Ck(e),
    }
}

/// Is the session alive and the KEK still readable?
fn probe(s: &Session, kek: &Kek) -> Result<(), CkError> {
    s.get_session_info()?;
    s.get_attributes(kek.handle, &[AttributeType::Class])?;
    Ok(())
}

/// Checks that the unwrapped object is a key of `alg`.
fn check_alg(s: &Session, h: ObjectHandle, alg: KeyAlg, kek: &Kek) -> Result<(), Fail> {
    let attrs = s.get_attributes(h, &[AttributeType::KeyType, AttributeType::EcParams])?;
    let mut ok_type = false;
    let mut ok_params = false;
    for a in attrs {
        match a {
            Attribute::KeyType(t) => ok_type = t == key_type(alg),
            Attribute::EcParams(p) => ok_params = params_match(alg, &p),
            _ => {}
        }
    }
    if ok_type && ok_params {
        Ok(())
    } else {
        Err(mismatch(alg, kek))
    }
}

/// Native C_UnwrapKey into a private key object of `alg`, checked.
fn unwrap_native(s: &Session, alg: KeyAlg, kek: &Kek, blob: &[u8], custody: Custody) -> Result<ObjectHandle, Fail> {
    let h = s
        .unwrap_key(&wrap_mechanism(), kek.handle, blob, &private_template(alg, custody))
        .map_err(|e| unwrap_err(s, e, alg, kek))?;
    if let Err(f) = check_alg(s, h, alg, kek) {
        destroy_quietly(s, h, "mismatched unwrapped key");
        return Err(f);
    }
    Ok(h)
}

/// Unwrap the blob as raw bytes (generic secret carrier) and take the Ed25519 seed from it.
fn unwrap_ed25519_seed(s: &Session, kek: &Kek, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Fail> {
    let alg = KeyAlg::Ed25519;
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let carrier = s
        .unwrap_key(&wrap_mechanism(), kek.handle, blob, &template)
        .map_err(|e| unwrap_err(s, e, alg, kek))?;
    let value = read_value(s, carrier);
    destroy_quietly(s, carrier, "PKCS#8 carrier");
    let value = value?.ok_or_else(|| mismatch(alg, kek))?;
    ed25519_seed_from_pkcs8(&value).ok_or_else(|| mismatch(alg, kek))
}

/// Ed25519 signing key from a seed (tokens without native EdDSA unwrap).
fn ed25519_key_from_seed(s: &Session, seed: &[u8]) -> Result<ObjectHandle, Fail> {
    let mut template = private_template(KeyAlg::Ed25519, Custody::Token);
    template.push(Attribute::EcParams(ec_params(KeyAlg::Ed25519).to_vec()));
    template.push(Attribute::Value(seed.to_vec()));
    let h = s.create_object(&template);
    scrub(&mut template);
    Ok(h?)
}

fn check_public(alg: KeyAlg, w: &WrappedRef<'_>) -> Result<(), HsmError> {
    let ok =
        w.public_key.len() == public_key_len(alg) && (alg != KeyAlg::Secp256k1 || w.public_key.first() == Some(&0x04));
    if ok {
        Ok(())
    } else {
        Err(HsmError::KeyMismatch {
            reason: format!("stored public key is not a {alg} public key"),
        })
    }
}

/// secp256k1 CKA_VALUE is a big-endian scalar that may be shorter than 32 bytes.
fn scalar32(v: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if v.is_empty() || v.len() > 32 {
        return None;
    }
    let mut out = Zeroizing::new(vec![0u8; 32]);
    out[32 - v.len()..].copy_from_slice(v);
    Some(out)
}

enum Unwrapped {
    Key(ObjectHandle, Origin),
    Secret(Zeroizing<Vec<u8>>),
}

impl Hsm {
    fn unwrap_inner(
        &self,
        op: &'static str,
        alg: KeyAlg,
        w: &WrappedRef<'_>,
        custody: Custody,
    ) -> Result<Unwrapped, HsmError> {
        self.retry_on_kek(|| self.unwrap_once(op, alg, w, custody))
    }

    fn unwrap_once(
        &self,
        op: &'static str,
        alg: KeyAlg,
        w: &WrappedRef<'_>,
        custody: Custody,
    ) -> Result<Unwrapped, HsmError> {
        check_public(alg, w)?;
        let kek = self.kek(Some(w.kek_version))?;
        let label = self.inner.pool.label.clone();
        let native_flag = &self.inner.ed25519_native;
        let mut kek_bad = false;
        let res = self.inner.pool.with_session(op, |p| {
            if p.epoch != kek.epoch {
                // KEK handles are from before a re-initialisation: reload them and retry.
                kek_bad = true;
                let e = HsmError::Unavailable {
                    op,
                    rv: "pool re-initialised during call".to_string(),
                };
                return (Err(e), Breakage::None);
            }
            let s = &p.session;
            let origin = Origin {
                epoch: p.epoch,
                index: p.index,
                gen: p.gen,
            };
            let r: Result<Unwrapped, Fail> = match (alg, custody) {
                (KeyAlg::Secp256k1, Custody::Token) => {
                    unwrap_native(s, alg, &kek, w.wrapped, custody).map(|h| Unwrapped::Key(h, origin))
                }
                (KeyAlg::Secp256k1, Custody::Host) => unwrap_native(s, alg, &kek, w.wrapped, custody).and_then(|h| {
                    let v = read_value(s, h);
                    destroy_quietly(s, h, "host-unwrapped key");
                    let v = v?.ok_or_else(|| mismatch(alg, &kek))?;
                    scalar32(&v).map(Unwrapped::Secret).ok_or_else(|| mismatch(alg, &kek))
                }),
                (KeyAlg::Ed25519, Custody::Host) => unwrap_ed25519_seed(s, &kek, w.wrapped).map(Unwrapped::Secret),
                (KeyAlg::Ed25519, Custody::Token) => {
                    let native = if native_flag.load(Ordering::Relaxed) {
                        match unwrap_native(s, alg, &kek, w.wrapped, custody) {
                            Err(f) if is_no_native_eddsa(&f) || matches!(f, Fail::Hsm(_)) => None,
                            other => Some(other),
                        }
                    } else {
                        None
                    };
                    match native {
                        Some(r) => r.map(|h| Unwrapped::Key(h, origin)),
                        None => {
                            let seed = unwrap_ed25519_seed(s, &kek, w.wrapped);
                            if seed.is_ok() && native_flag.swap(false, Ordering::Relaxed) {
                                tracing::info!("token cannot unwrap Ed25519 keys natively; using PKCS#8 carrier");
                            }
                            seed.and_then(|seed| ed25519_key_from_seed(s, &seed))
                                .map(|h| Unwrapped::Key(h, origin))
                        }
                    }
                }
            };
            if let Err(f) = &r {
                kek_bad = f.kek_suspect();
            }
            settle(r, op, &label)
        });
        if kek_bad {
            self.kek_failed();
        }
        res
    }

    /// Custody "hsm": unwrap into a sensitive, non-extractable, sign-only session object.
    ///
    /// This does NOT prove that the blob belongs to `w.public_key`: the caller MUST sign a test
    /// message with the returned key and verify it against `w.public_key` before caching it.
    pub fn unwrap_for_signing(&self, alg: KeyAlg, w: &WrappedRef<'_>) -> Result<HsmKey, HsmError> {
        match self.unwrap_inner("unwrap_for_signing", alg, w, Custody::Token)? {
            Unwrapped::Key(handle, origin) => Ok(HsmKey::new(self.clone(), handle, alg, origin)),
            Unwrapped::Secret(_) => Err(HsmError::Internal {
                op: "unwrap_for_signing",
                rv: "unexpected unwrap result".to_string(),
            }),
        }
    }

    /// Custody "host": unwrap as a non-sensitive session object, read the private key
    /// (secp256k1: 32-byte big-endian scalar; ed25519: 32-byte seed), destroy the object.
    pub fn unwrap_to_host(&self, alg: KeyAlg, w: &WrappedRef<'_>) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        match self.unwrap_inner("unwrap_to_host", alg, w, Custody::Host)? {
            Unwrapped::Secret(v) => Ok(v),
            Unwrapped::Key(..) => Err(HsmError::Internal {
                op: "unwrap_to_host",
                rv: "unexpected unwrap result".to_string(),
            }),
        }
    }
}
