//! Unwrapping: into a signing-only session object ("hsm" custody) or out to the host ("host").
//!
//! Which path a blob takes follows the kind of the KEK it is wrapped under (see `kek.rs`):
//!
//! * sealed KEK: C_UnwrapKey into a sensitive, non-extractable session key (the KEK's unwrap
//!   template would refuse anything else). Never to the host: such a key cannot leave the token.
//! * host (or unenforced) KEK: to the host, the blob is unwrapped as an extractable generic
//!   secret (its PKCS#8 bytes), moved out under a one-time transport key (`transport.rs`) and
//!   parsed here. For signing in the token, secp256k1 is refused in hsm custody (its key is
//!   readable by whoever holds the PIN) unless `allow_unenforced_kek`; Ed25519 is unwrapped
//!   natively where the token can, else its seed is taken from the PKCS#8 carrier as above and
//!   a sensitive, non-extractable Ed25519 session key is created from it (C_CreateObject): the
//!   seed passes through host memory (zeroized), which `refuse_host_ed25519` refuses.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use k256::pkcs8::DecodePrivateKey as _;
use zeroize::{Zeroize as _, Zeroizing};

use super::error::{rv_of, settle, Breakage, Fail, HsmError};
use super::generate::Curve;
use super::generate::{
    destroy_quietly, ec_params, ed25519_seed_from_pkcs8, key_type, params_match, public_key_len, refused_ed25519,
    scrub, wrap_mechanism,
};
use super::kek::{kek_label, Kek, KekKind, Purpose};
use super::pool::Origin;
use super::sign::HsmKey;
use super::transport::export;
use super::Hsm;
use crate::config::Custody;
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

/// A signing-only session key: what a sealed KEK's unwrap template demands.
fn private_template(alg: Curve) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(alg)),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Derive(false),
    ]
}

fn mismatch(alg: Curve, kek: &Kek) -> Fail {
    Fail::Hsm(HsmError::KeyMismatch {
        reason: format!("blob is not a {alg} key under KEK v{}", kek.version),
    })
}

/// C_UnwrapKey errors that mean "these bytes are not what the template says" rather than
/// token trouble: the blob does not belong to this KEK/algorithm. SoftHSM 2.6.1 answers a
/// corrupted blob or a wrong KEK with CKR_GENERAL_ERROR, which also signals device failure, so
/// that code is disambiguated by probing the session and the KEK: both fine means a bad blob
/// (no pool re-initialisation, which would let one bad blob invalidate every cached key).
fn unwrap_err(s: &Session, e: CkError, alg: Curve, kek: &Kek) -> Fail {
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
fn check_alg(s: &Session, h: ObjectHandle, alg: Curve, kek: &Kek) -> Result<(), Fail> {
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
fn unwrap_native(s: &Session, alg: Curve, kek: &Kek, blob: &[u8]) -> Result<ObjectHandle, Fail> {
    let h = s
        .unwrap_key(&wrap_mechanism(), kek.handle, blob, &private_template(alg))
        .map_err(|e| unwrap_err(s, e, alg, kek))?;
    if let Err(f) = check_alg(s, h, alg, kek) {
        destroy_quietly(s, h, "mismatched unwrapped key");
        return Err(f);
    }
    Ok(h)
}

/// A private key as its PKCS#8 bytes: an extractable generic-secret session object (host
/// custody's transport, the Ed25519 carrier of `generate.rs`, and `keyward kek rewrap`).
pub(crate) const CARRIER_TEMPLATE: [Attribute; 6] = [
    Attribute::Class(ObjectClass::SECRET_KEY),
    Attribute::KeyType(KeyType::GENERIC_SECRET),
    Attribute::Token(false),
    Attribute::Private(true),
    Attribute::Sensitive(true),
    Attribute::Extractable(true),
];

/// Unwrap the blob as an extractable generic secret (its PKCS#8 bytes) and move those out of
/// the token encrypted (see `transport.rs`); the carrier object is destroyed.
fn unwrap_pkcs8(s: &Session, alg: Curve, kek: &Kek, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Fail> {
    let carrier = s
        .unwrap_key(&wrap_mechanism(), kek.handle, blob, &CARRIER_TEMPLATE)
        .map_err(|e| unwrap_err(s, e, alg, kek))?;
    let der = export(s, carrier);
    destroy_quietly(s, carrier, "PKCS#8 carrier");
    der
}

/// The 32-byte private key inside a PKCS#8 `PrivateKeyInfo` of `alg` (secp256k1: big-endian
/// scalar; Ed25519: seed), in zeroizing memory.
fn secret_from_pkcs8(alg: Curve, der: &[u8], kek: &Kek) -> Result<Zeroizing<Vec<u8>>, Fail> {
    match alg {
        Curve::Ed25519 => ed25519_seed_from_pkcs8(der).ok_or_else(|| mismatch(alg, kek)),
        // Issuer keys only: they are unwrapped into the token, never to the host.
        Curve::P256 => Err(mismatch(alg, kek)),
        Curve::Secp256k1 => {
            let sk = k256::SecretKey::from_pkcs8_der(der).map_err(|_| mismatch(alg, kek))?;
            let mut bytes: [u8; 32] = sk.to_bytes().into();
            let out = Zeroizing::new(bytes.to_vec());
            bytes.zeroize();
            Ok(out)
        }
    }
}

/// Ed25519 signing key from a seed (tokens without native EdDSA unwrap).
fn ed25519_key_from_seed(s: &Session, seed: &[u8]) -> Result<ObjectHandle, Fail> {
    let mut template = private_template(Curve::Ed25519);
    template.push(Attribute::EcParams(ec_params(Curve::Ed25519).to_vec()));
    template.push(Attribute::Value(seed.to_vec()));
    let h = s.create_object(&template);
    scrub(&mut template);
    Ok(h?)
}

fn check_public(alg: Curve, w: &WrappedRef<'_>) -> Result<(), HsmError> {
    let ok =
        w.public_key.len() == public_key_len(alg) && (alg == Curve::Ed25519 || w.public_key.first() == Some(&0x04));
    if ok {
        Ok(())
    } else {
        Err(HsmError::KeyMismatch {
            reason: format!("stored public key is not a {alg} public key"),
        })
    }
}

enum Unwrapped {
    Key(ObjectHandle, Origin),
    Secret(Zeroizing<Vec<u8>>),
}

/// Signing in the token or decrypting to the host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Token,
    Host,
}

impl Hsm {
    /// The custody rules for a blob of `alg` under `kek` (see the module docs).
    fn admit(&self, alg: Curve, kek: &Kek, target: Target) -> Result<(), HsmError> {
        let policy = self.inner.custody;
        let label = kek_label(&self.inner.kek_prefix, kek.version, kek.kind);
        match (target, kek.kind, alg) {
            (Target::Host, KekKind::Sealed, _) => Err(HsmError::CustodyRefused {
                reason: format!(
                    "this {alg} key is wrapped under {label}, a sealed KEK: it can only be unwrapped \
                     into the token (hsm custody), never to host memory"
                ),
            }),
            (Target::Host, _, _) | (Target::Token, KekKind::Sealed, _) => Ok(()),
            (Target::Token, _, Curve::Ed25519) if policy.mode == Custody::Hsm && policy.refuse_host_ed25519 => {
                Err(refused_ed25519())
            }
            (Target::Token, _, Curve::Ed25519) => Ok(()),
            (Target::Token, _, Curve::Secp256k1 | Curve::P256)
                if policy.mode == Custody::Hsm && !policy.allow_unenforced_kek =>
            {
                Err(HsmError::CustodyRefused {
                    reason: format!(
                        "this {alg} key is wrapped under {label}, which has no enforced unwrap \
                         template (it was made in host custody, or before KEKs were sealed): whoever \
                         holds the PIN can read it, so hsm custody refuses it (hsm.allow_unenforced_kek \
                         = true accepts it)"
                    ),
                })
            }
            (Target::Token, _, Curve::Secp256k1 | Curve::P256) => Ok(()),
        }
    }

    fn unwrap_inner(
        &self,
        op: &'static str,
        alg: Curve,
        w: &WrappedRef<'_>,
        target: Target,
    ) -> Result<Unwrapped, HsmError> {
        check_public(alg, w)?;
        let purpose = match target {
            Target::Token => Purpose::Sealed,
            Target::Host => Purpose::Host,
        };
        self.retry_on_kek(|| {
            let kek = self.kek(Some(w.kek_version), purpose)?;
            self.admit(alg, &kek, target)?;
            self.unwrap_once(op, alg, w, &kek, target)
        })
    }

    fn unwrap_once(
        &self,
        op: &'static str,
        alg: Curve,
        w: &WrappedRef<'_>,
        kek: &Kek,
        target: Target,
    ) -> Result<Unwrapped, HsmError> {
        let label = self.inner.pool.label.clone();
        let via_seed = alg == Curve::Ed25519 && self.ed25519_via_host();
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
            let r: Result<Unwrapped, Fail> = match target {
                Target::Host => unwrap_pkcs8(s, alg, kek, w.wrapped)
                    .and_then(|der| secret_from_pkcs8(alg, &der, kek))
                    .map(Unwrapped::Secret),
                Target::Token if via_seed && kek.kind != KekKind::Sealed => unwrap_pkcs8(s, alg, kek, w.wrapped)
                    .and_then(|der| secret_from_pkcs8(alg, &der, kek))
                    .and_then(|seed| ed25519_key_from_seed(s, &seed))
                    .map(|h| Unwrapped::Key(h, origin)),
                Target::Token => unwrap_native(s, alg, kek, w.wrapped).map(|h| Unwrapped::Key(h, origin)),
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

    /// Custody "hsm": unwrap into a sensitive, non-extractable, sign-only session object. A
    /// blob the custody rules do not admit (module docs) gives [`HsmError::CustodyRefused`].
    ///
    /// This does NOT prove that the blob belongs to `w.public_key`: the caller MUST sign a test
    /// message with the returned key and verify it against `w.public_key` before caching it.
    pub fn unwrap_for_signing(&self, alg: KeyAlg, w: &WrappedRef<'_>) -> Result<HsmKey, HsmError> {
        self.unwrap_curve_for_signing(alg.into(), w)
    }

    /// As [`Hsm::unwrap_for_signing`], for any [`Curve`] (issuer keys use P-256 too).
    pub fn unwrap_curve_for_signing(&self, alg: Curve, w: &WrappedRef<'_>) -> Result<HsmKey, HsmError> {
        match self.unwrap_inner("unwrap_for_signing", alg, w, Target::Token)? {
            Unwrapped::Key(handle, origin) => Ok(HsmKey::new(self.clone(), handle, alg, origin)),
            Unwrapped::Secret(_) => Err(HsmError::Internal {
                op: "unwrap_for_signing",
                rv: "unexpected unwrap result".to_string(),
            }),
        }
    }

    /// Custody "host": the private key (secp256k1: 32-byte big-endian scalar; ed25519: 32-byte
    /// seed) in zeroizing memory, taken from the blob's PKCS#8 without reading a secret
    /// attribute (module docs). A blob under a sealed KEK is refused ([`HsmError::CustodyRefused`]).
    /// Callers scrub their stack afterwards (`keys::scrub_stack`).
    pub fn unwrap_to_host(&self, alg: KeyAlg, w: &WrappedRef<'_>) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        match self.unwrap_inner("unwrap_to_host", alg.into(), w, Target::Host)? {
            Unwrapped::Secret(v) => Ok(v),
            Unwrapped::Key(..) => Err(HsmError::Internal {
                op: "unwrap_to_host",
                rv: "unexpected unwrap result".to_string(),
            }),
        }
    }
}

impl Hsm {
    /// Moves one blob from the host-kind KEK `from` to the current host KEK, inside the token:
    /// the blob is unwrapped as an extractable generic secret (its PKCS#8 bytes, never read
    /// out) and wrapped again, and the carrier destroyed. `None` when `from` is already
    /// current. A blob under a sealed KEK cannot move: every key that KEK unwraps is
    /// non-extractable by its template, even towards another KEK
    /// ([`HsmError::CustodyRefused`]).
    pub fn rewrap_host_blob(&self, wrapped: &[u8], from: u32) -> Result<Option<(Vec<u8>, u32)>, HsmError> {
        self.retry_on_kek(|| {
            let to = self.kek(None, Purpose::Host)?;
            if to.version == from {
                return Ok(None);
            }
            let old = self.kek(Some(from), Purpose::Host)?;
            if old.kind == KekKind::Sealed {
                return Err(HsmError::CustodyRefused {
                    reason: format!("KEK v{from} is sealed: its blobs cannot be rewrapped"),
                });
            }
            let label = self.inner.pool.label.clone();
            let mut kek_bad = false;
            let res = self.inner.pool.with_session("rewrap", |p| {
                if p.epoch != to.epoch || p.epoch != old.epoch {
                    kek_bad = true;
                    let e = HsmError::Unavailable {
                        op: "rewrap",
                        rv: "pool re-initialised during call".to_string(),
                    };
                    return (Err(e), Breakage::None);
                }
                let s = &p.session;
                let r: Result<Vec<u8>, Fail> = (|| {
                    let carrier = s.unwrap_key(&wrap_mechanism(), old.handle, wrapped, &CARRIER_TEMPLATE)?;
                    let out = s.wrap_key(&wrap_mechanism(), to.handle, carrier);
                    destroy_quietly(s, carrier, "rewrap carrier");
                    Ok(out?)
                })();
                if let Err(f) = &r {
                    kek_bad = f.kek_suspect();
                }
                settle(r, "rewrap", &label)
            });
            if kek_bad {
                self.kek_failed();
            }
            res.map(|blob| Some((blob, to.version)))
        })
    }
}
