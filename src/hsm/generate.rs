//! Key generation and wrapping under the current KEK of the key's purpose (see `kek.rs`).
//!
//! secp256k1 (and Ed25519 on tokens that wrap EdDSA keys natively) is generated inside the token
//! and wrapped there: in hsm custody under a sealed KEK, so the private key never exists outside
//! the token. Ed25519 on tokens whose C_WrapKey refuses EdDSA keys (SoftHSM 2.6.1:
//! CKR_KEY_NOT_WRAPPABLE) passes through host memory whatever we do, so its 32-byte seed is drawn
//! here from the OS RNG (into zeroizing memory), framed as the RFC 8410 PKCS#8 `PrivateKeyInfo` a
//! native wrap would produce, loaded into a sensitive generic-secret session object and wrapped
//! from there under a *host* KEK: the blob format (AES-KWP of PKCS#8) is the same either way.
//! Nothing here reads a secret attribute back (see `transport.rs` for why).

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rand::RngCore as _;
use zeroize::{Zeroize, Zeroizing};

use super::error::{rv_of, settle, Breakage, Fail, HsmError};
use super::kek::{Kek, Purpose};
use super::Hsm;
use crate::config::Custody;
use crate::types::KeyAlg;

/// DER of the secp256k1 curve OID 1.3.132.0.10.
pub(crate) const SECP256K1_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];
/// DER of the Ed25519 OID 1.3.101.112.
pub(crate) const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER PrintableString "edwards25519" (SoftHSM 2.6 reports the curve this way).
pub(crate) const ED25519_PARAMS_NAME: &[u8] = b"\x13\x0cedwards25519";
/// RFC 8410 PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows.
pub(crate) const ED25519_PKCS8_PREFIX: &[u8] = &[
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// DER of the P-256 curve OID 1.2.840.10045.3.1.7.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The curve of a private key the token generates, wraps and unwraps: account keys use
/// secp256k1 and Ed25519 ([`KeyAlg`]); issuer keys (ES256) add P-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// secp256k1 (`CKK_EC`).
    Secp256k1,
    /// NIST P-256 (`CKK_EC`).
    P256,
    /// Ed25519 (`CKK_EC_EDWARDS`).
    Ed25519,
}

impl From<KeyAlg> for Curve {
    fn from(alg: KeyAlg) -> Curve {
        match alg {
            KeyAlg::Secp256k1 => Curve::Secp256k1,
            KeyAlg::Ed25519 => Curve::Ed25519,
        }
    }
}

impl std::fmt::Display for Curve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Curve::Secp256k1 => "secp256k1",
            Curve::P256 => "P-256",
            Curve::Ed25519 => "ed25519",
        })
    }
}

pub(crate) fn ec_params(alg: Curve) -> &'static [u8] {
    match alg {
        Curve::Secp256k1 => SECP256K1_PARAMS,
        Curve::P256 => P256_PARAMS,
        Curve::Ed25519 => ED25519_PARAMS,
    }
}

pub(crate) fn params_match(alg: Curve, params: &[u8]) -> bool {
    match alg {
        Curve::Ed25519 => params == ED25519_PARAMS || params == ED25519_PARAMS_NAME,
        other => params == ec_params(other),
    }
}

pub(crate) fn key_type(alg: Curve) -> KeyType {
    match alg {
        Curve::Secp256k1 | Curve::P256 => KeyType::EC,
        Curve::Ed25519 => KeyType::EC_EDWARDS,
    }
}

pub(crate) fn public_key_len(alg: Curve) -> usize {
    match alg {
        Curve::Secp256k1 | Curve::P256 => 65,
        Curve::Ed25519 => 32,
    }
}

/// The wrapping mechanism for account keys (`CKM_AES_KEY_WRAP_PAD`, RFC 5649).
pub(crate) fn wrap_mechanism() -> Mechanism<'static> {
    Mechanism::AesKeyWrapPad
}

/// A freshly generated key: public key plus the private key wrapped under `kek_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// secp256k1: 65-byte uncompressed SEC1 point; ed25519: 32 bytes.
    pub public_key: Vec<u8>,
    /// The private key (PKCS#8 PrivateKeyInfo) under `CKM_AES_KEY_WRAP_PAD`.
    pub wrapped: Vec<u8>,
    /// KEK version used.
    pub kek_version: u32,
}

/// Strip the DER OCTET STRING that PKCS#11 v2.40+ puts around CKA_EC_POINT (tolerates raw).
pub(crate) fn decode_ec_point(alg: Curve, raw: &[u8]) -> Option<Vec<u8>> {
    let want = public_key_len(alg);
    let inner = if raw.len() == want {
        raw
    } else {
        match raw {
            [0x04, len, rest @ ..] if (*len as usize) < 0x80 && *len as usize == rest.len() => rest,
            [0x04, 0x81, len, rest @ ..] if *len as usize == rest.len() => rest,
            _ => return None,
        }
    };
    if inner.len() != want {
        return None;
    }
    if alg != Curve::Ed25519 && inner.first() != Some(&0x04) {
        return None;
    }
    Some(inner.to_vec())
}

/// Frame an Ed25519 seed as RFC 8410 PKCS#8.
pub(crate) fn ed25519_pkcs8(seed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if seed.len() != 32 {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(48));
    out.extend_from_slice(ED25519_PKCS8_PREFIX);
    out.extend_from_slice(seed);
    Some(out)
}

/// The seed inside an Ed25519 PKCS#8 `PrivateKeyInfo` (v1 or v2 with trailing public key).
pub(crate) fn ed25519_seed_from_pkcs8(der: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    // SEQUENCE { INTEGER version, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } .. }
    let alg_and_key: &[u8] = &ED25519_PKCS8_PREFIX[5..];
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&len, body) = rest.split_first()?;
    if len as usize != body.len() || len >= 0x80 {
        return None;
    }
    let body = match body {
        [0x02, 0x01, 0x00 | 0x01, b @ ..] => b,
        _ => return None,
    };
    let seed = body.strip_prefix(alg_and_key)?.get(..32)?;
    Some(Zeroizing::new(seed.to_vec()))
}

/// Best-effort destroy of a session object we created.
pub(crate) fn destroy_quietly(s: &Session, h: ObjectHandle, what: &str) {
    if let Err(e) = s.destroy_object(h) {
        tracing::debug!(object = what, error = %e, "C_DestroyObject failed");
    }
}

/// Zeroize the CKA_VALUE inside a template after use.
pub(crate) fn scrub(template: &mut [Attribute]) {
    for a in template.iter_mut() {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

fn generate_pair(s: &Session, alg: Curve, sensitive: bool) -> Result<(ObjectHandle, ObjectHandle), CkError> {
    let mech = match alg {
        Curve::Secp256k1 | Curve::P256 => Mechanism::EccKeyPairGen,
        Curve::Ed25519 => Mechanism::EccEdwardsKeyPairGen,
    };
    let public = [
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(ec_params(alg).to_vec()),
    ];
    let private = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(true),
        Attribute::Sign(true),
        Attribute::Derive(false),
    ];
    s.generate_key_pair(&mech, &public, &private)
}

fn read_point(s: &Session, public: ObjectHandle, alg: Curve) -> Result<Vec<u8>, Fail> {
    let point = s
        .get_attributes(public, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        });
    point.as_deref().and_then(|p| decode_ec_point(alg, p)).ok_or_else(|| {
        Fail::Hsm(HsmError::Internal {
            op: "generate_wrapped",
            rv: "unexpected CKA_EC_POINT encoding".to_string(),
        })
    })
}

/// Generate with a sensitive private key and wrap it directly (PKCS#8 inside the token).
fn generate_native(s: &Session, alg: Curve, kek: &Kek) -> Result<(Vec<u8>, Vec<u8>), Fail> {
    let (public, private) = generate_pair(s, alg, true)?;
    let point = read_point(s, public, alg);
    let wrapped = s.wrap_key(&wrap_mechanism(), kek.handle, private);
    destroy_quietly(s, private, "generated private key");
    destroy_quietly(s, public, "generated public key");
    Ok((point?, wrapped?))
}

/// Wrap an Ed25519 seed as PKCS#8 through a generic-secret carrier object.
pub(crate) fn wrap_ed25519_seed(s: &Session, seed: &[u8], kek: &Kek) -> Result<Vec<u8>, Fail> {
    let pkcs8 = ed25519_pkcs8(seed).ok_or_else(|| HsmError::Internal {
        op: "generate_wrapped",
        rv: "Ed25519 seed is not 32 bytes".to_string(),
    })?;
    let mut template = super::unwrap::CARRIER_TEMPLATE.to_vec();
    template.push(Attribute::Value(pkcs8.to_vec()));
    let carrier = s.create_object(&template);
    scrub(&mut template);
    let carrier = carrier?;
    let wrapped = s.wrap_key(&wrap_mechanism(), kek.handle, carrier);
    destroy_quietly(s, carrier, "PKCS#8 carrier");
    Ok(wrapped?)
}

/// Ed25519 on tokens that cannot wrap EdDSA keys (see module docs): seed from the OS RNG,
/// public key computed here, PKCS#8 carrier wrapped in the token.
fn generate_ed25519_on_host(s: &Session, kek: &Kek) -> Result<(Vec<u8>, Vec<u8>), Fail> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut seed[..]);
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes()
        .to_vec();
    let wrapped = wrap_ed25519_seed(s, &seed[..], kek)?;
    Ok((public, wrapped))
}

/// Errors meaning "this token cannot wrap/unwrap an EdDSA private key natively".
pub(crate) fn is_no_native_eddsa(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::KeyNotWrappable
                | RvError::MechanismInvalid
                | RvError::FunctionFailed
                | RvError::TemplateInconsistent
                | RvError::KeyTypeInconsistent
                | RvError::AttributeValueInvalid
                | RvError::FunctionNotSupported
        )
    )
}

/// A throwaway, sensitive AES-256 session key (for probes), with `extra` attributes.
pub(crate) fn session_aes_key(s: &Session, extra: &[Attribute]) -> Result<ObjectHandle, CkError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
    ];
    template.extend_from_slice(extra);
    s.generate_key(&Mechanism::AesKeyGen, &template)
}

/// Can this token wrap and unwrap an Ed25519 private key itself? Probed once at open with
/// session objects only (a throwaway AES key and key pair), so it needs no KEK.
pub(crate) fn probe_eddsa_native(s: &Session) -> Result<bool, CkError> {
    let wrapping = session_aes_key(
        s,
        &[
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )?;
    let result = (|| {
        let (public, private) = generate_pair(s, Curve::Ed25519, true)?;
        let wrapped = s.wrap_key(&wrap_mechanism(), wrapping, private);
        destroy_quietly(s, private, "probe private key");
        destroy_quietly(s, public, "probe public key");
        let wrapped = match wrapped {
            Ok(w) => w,
            Err(e) if is_no_native_eddsa(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC_EDWARDS),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        match s.unwrap_key(&wrap_mechanism(), wrapping, &wrapped, &template) {
            Ok(h) => {
                destroy_quietly(s, h, "probe unwrapped key");
                Ok(true)
            }
            Err(e) if is_no_native_eddsa(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })();
    destroy_quietly(s, wrapping, "probe wrapping key");
    result
}

impl Hsm {
    /// Which KEK a new key of `alg` goes under in this custody, or why it is refused.
    fn purpose_for(&self, alg: Curve) -> Result<Purpose, HsmError> {
        let policy = self.inner.custody;
        match (policy.mode, alg) {
            (Custody::Host, _) => Ok(Purpose::Host),
            (Custody::Hsm, Curve::Secp256k1 | Curve::P256) => Ok(Purpose::Sealed),
            (Custody::Hsm, Curve::Ed25519) if !self.ed25519_via_host() => Ok(Purpose::Sealed),
            (Custody::Hsm, Curve::Ed25519) if policy.refuse_host_ed25519 => Err(refused_ed25519()),
            (Custody::Hsm, Curve::Ed25519) => Ok(Purpose::Host),
        }
    }

    /// Generate a key of `alg` and wrap it under the current KEK of its purpose (see module
    /// docs): returns the public key and the blob; every session object is destroyed, also on
    /// error. hsm custody with `refuse_host_ed25519` on a token without native EdDSA wrapping
    /// refuses Ed25519 with [`HsmError::CustodyRefused`].
    pub fn generate_wrapped(&self, alg: KeyAlg) -> Result<WrappedKey, HsmError> {
        self.generate_wrapped_curve(alg.into())
    }

    /// As [`Hsm::generate_wrapped`], for any [`Curve`] (issuer keys use P-256 too).
    pub fn generate_wrapped_curve(&self, alg: Curve) -> Result<WrappedKey, HsmError> {
        let purpose = self.purpose_for(alg)?;
        self.retry_on_kek(|| self.generate_wrapped_once(alg, purpose))
    }

    fn generate_wrapped_once(&self, alg: Curve, purpose: Purpose) -> Result<WrappedKey, HsmError> {
        const OP: &str = "generate_wrapped";
        let kek = self.kek(None, purpose)?;
        let label = self.inner.pool.label.clone();
        let on_host = alg == Curve::Ed25519 && self.ed25519_via_host();
        let mut kek_bad = false;
        let res = self.inner.pool.with_session(OP, |p| {
            if p.epoch != kek.epoch {
                // KEK handles are from before a re-initialisation: reload them and retry.
                kek_bad = true;
                let e = HsmError::Unavailable {
                    op: OP,
                    rv: "pool re-initialised during call".to_string(),
                };
                return (Err(e), Breakage::None);
            }
            let s = &p.session;
            let r = if on_host {
                generate_ed25519_on_host(s, &kek)
            } else {
                generate_native(s, alg, &kek)
            };
            if let Err(f) = &r {
                kek_bad = f.kek_suspect();
            }
            let r = r.map(|(public_key, wrapped)| WrappedKey {
                public_key,
                wrapped,
                kek_version: kek.version,
            });
            settle(r, OP, &label)
        });
        if kek_bad {
            self.kek_failed();
        }
        res
    }
}

/// An imported private key of `alg` (its 32 bytes, which this function does not keep) wrapped
/// under `kek` the way a generated one is: as a token object made from the bytes (session,
/// sensitive, extractable only under a wrap) wrapped at once, or for Ed25519 on tokens that
/// cannot wrap EdDSA keys, through the PKCS#8 carrier. Returns the public key and the blob.
fn wrap_imported(
    s: &Session,
    alg: KeyAlg,
    secret: &[u8],
    on_host: bool,
    kek: &Kek,
) -> Result<(Vec<u8>, Vec<u8>), Fail> {
    let bad = |what: &str| {
        Fail::Hsm(HsmError::ImportRefused {
            reason: what.to_string(),
        })
    };
    let bytes: [u8; 32] = secret.try_into().map_err(|_| bad("an imported key is 32 bytes"))?;
    let public = match alg {
        KeyAlg::Secp256k1 => {
            let key = k256::SecretKey::from_slice(&bytes).map_err(|_| bad("not a secp256k1 private key"))?;
            k256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public_key(), false)
                .as_bytes()
                .to_vec()
        }
        KeyAlg::Ed25519 => ed25519_dalek::SigningKey::from_bytes(&bytes)
            .verifying_key()
            .to_bytes()
            .to_vec(),
    };
    let mut bytes = Zeroizing::new(bytes);
    if alg == KeyAlg::Ed25519 && on_host {
        let wrapped = wrap_ed25519_seed(s, &bytes[..], kek)?;
        return Ok((public, wrapped));
    }
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(alg.into())),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::EcParams(ec_params(alg.into()).to_vec()),
        Attribute::Value(bytes.to_vec()),
    ];
    bytes.zeroize();
    let object = s.create_object(&template);
    scrub(&mut template);
    let object = object?;
    let wrapped = s.wrap_key(&wrap_mechanism(), kek.handle, object);
    destroy_quietly(s, object, "imported private key");
    Ok((public, wrapped?))
}

/// The label of an import job's transport key.
pub(crate) fn transport_label(job: &str) -> String {
    format!("keyward-import-{job}")
}

/// RSA-OAEP (SHA-1, MGF1-SHA-1, no label): how a key travels to an import job. SHA-1, not
/// SHA-256: SoftHSM 2.6 decrypts OAEP with SHA-1 only (AWS KMS offers both for imports; OAEP's
/// security does not rest on SHA-1's collision resistance).
fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(cryptoki::mechanism::rsa::PkcsOaepParams::new(
        cryptoki::mechanism::MechanismType::SHA1,
        cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA1,
        cryptoki::mechanism::rsa::PkcsOaepSource::empty(),
    ))
}

/// An import job's RSA public key: modulus and public exponent, big-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportKey {
    /// The modulus.
    pub modulus: Vec<u8>,
    /// The public exponent.
    pub exponent: Vec<u8>,
}

impl Hsm {
    /// Creates an import job's one-time RSA-3072 transport key on the token: its private half a
    /// token object (private, sensitive, never extractable, decrypt only) labelled for `job`.
    pub fn create_transport_key(&self, job: &str) -> Result<TransportKey, HsmError> {
        const OP: &str = "create_transport_key";
        let label = self.inner.pool.label.clone();
        let name = transport_label(job);
        self.inner.pool.with_session(OP, |p| {
            let s = &p.session;
            let r = (|| -> Result<TransportKey, Fail> {
                let public = [
                    Attribute::Token(false),
                    Attribute::Private(false),
                    Attribute::Encrypt(true),
                    Attribute::ModulusBits(3072u64.into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ];
                let private = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Decrypt(true),
                    Attribute::Sign(false),
                    Attribute::Unwrap(false),
                    Attribute::Label(name.as_bytes().to_vec()),
                ];
                let (pubh, privh) = s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
                let attrs = s.get_attributes(pubh, &[AttributeType::Modulus, AttributeType::PublicExponent]);
                destroy_quietly(s, pubh, "transport public key");
                let mut key = TransportKey {
                    modulus: Vec::new(),
                    exponent: Vec::new(),
                };
                for a in attrs? {
                    match a {
                        Attribute::Modulus(m) => key.modulus = m,
                        Attribute::PublicExponent(e) => key.exponent = e,
                        _ => {}
                    }
                }
                if key.modulus.is_empty() || key.exponent.is_empty() {
                    destroy_quietly(s, privh, "transport private key");
                    return Err(Fail::Hsm(HsmError::Internal {
                        op: OP,
                        rv: "the token gave no RSA public key".into(),
                    }));
                }
                Ok(key)
            })();
            settle(r, OP, &label)
        })
    }

    /// Imports a key of `alg` sent to `job` (RSA-OAEP ciphertext of its 32 bytes): the job's
    /// transport key decrypts it in the token and is destroyed (also when the ciphertext is
    /// bad: a job serves once); the key is wrapped under the current KEK of its purpose, as a
    /// generated one. The 32 bytes pass through host memory here (zeroized), as Ed25519 seeds
    /// do on tokens that cannot wrap them.
    pub fn import_wrapped(&self, job: &str, alg: KeyAlg, ciphertext: &[u8]) -> Result<WrappedKey, HsmError> {
        const OP: &str = "import_wrapped";
        let purpose = self.purpose_for(alg.into())?;
        let kek = self.kek(None, purpose)?;
        let label = self.inner.pool.label.clone();
        let on_host = alg == KeyAlg::Ed25519 && self.ed25519_via_host();
        let name = transport_label(job);
        self.inner.pool.with_session(OP, |p| {
            let s = &p.session;
            let r = (|| -> Result<WrappedKey, Fail> {
                let found = s.find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Token(true),
                    Attribute::Label(name.as_bytes().to_vec()),
                ])?;
                let Some(&transport) = found.first() else {
                    return Err(Fail::Hsm(HsmError::TransportKeyNotFound { job: job.to_string() }));
                };
                let plain = s.decrypt(&oaep(), transport, ciphertext).map(Zeroizing::new);
                for h in &found {
                    destroy_quietly(s, *h, "transport private key");
                }
                let plain = plain.map_err(|_| {
                    Fail::Hsm(HsmError::ImportRefused {
                        reason: "the wrapped key does not decrypt under the job's transport key (RSA-OAEP, SHA-1)"
                            .into(),
                    })
                })?;
                let (public_key, wrapped) = wrap_imported(s, alg, &plain, on_host, &kek)?;
                Ok(WrappedKey {
                    public_key,
                    wrapped,
                    kek_version: kek.version,
                })
            })();
            settle(r, OP, &label)
        })
    }

    /// The import jobs whose transport keys are on this token.
    pub fn transport_jobs(&self) -> Result<Vec<String>, HsmError> {
        const OP: &str = "transport_jobs";
        let label = self.inner.pool.label.clone();
        self.inner.pool.with_session(OP, |p| {
            let s = &p.session;
            let r = (|| -> Result<Vec<String>, Fail> {
                let mut jobs = Vec::new();
                for h in s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Token(true)])? {
                    for a in s.get_attributes(h, &[AttributeType::Label])? {
                        if let Attribute::Label(l) = a {
                            if let Some(job) = String::from_utf8(l)
                                .ok()
                                .and_then(|l| l.strip_prefix(&transport_label("")).map(str::to_string))
                            {
                                jobs.push(job);
                            }
                        }
                    }
                }
                Ok(jobs)
            })();
            settle(r, OP, &label)
        })
    }

    /// Destroys an import job's transport key if it is still on the token.
    pub fn destroy_transport_key(&self, job: &str) -> Result<(), HsmError> {
        const OP: &str = "destroy_transport_key";
        let label = self.inner.pool.label.clone();
        let name = transport_label(job);
        self.inner.pool.with_session(OP, |p| {
            let s = &p.session;
            let r = (|| -> Result<(), Fail> {
                for h in s.find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Token(true),
                    Attribute::Label(name.as_bytes().to_vec()),
                ])? {
                    destroy_quietly(s, h, "transport private key");
                }
                Ok(())
            })();
            settle(r, OP, &label)
        })
    }
}

/// Ed25519 through host memory, refused by `hsm.refuse_host_ed25519`.
pub(crate) fn refused_ed25519() -> HsmError {
    HsmError::CustodyRefused {
        reason: "this token cannot wrap or unwrap Ed25519 keys natively (SoftHSM 2.6.1), so an \
                 Ed25519 key would pass through host memory, and hsm.refuse_host_ed25519 = true \
                 refuses that"
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_decoding() {
        let mut der = vec![0x04, 0x41, 0x04];
        der.extend_from_slice(&[7u8; 64]);
        let p = decode_ec_point(Curve::Secp256k1, &der);
        assert_eq!(p.as_ref().map(|v| v.len()), Some(65));
        let mut ed = vec![0x04, 0x20];
        ed.extend_from_slice(&[9u8; 32]);
        assert_eq!(decode_ec_point(Curve::Ed25519, &ed), Some(vec![9u8; 32]));
        assert_eq!(decode_ec_point(Curve::Ed25519, &[0x04, 0x02, 1, 2]), None);
        assert_eq!(decode_ec_point(Curve::Secp256k1, &[0x04, 0x41]), None);
    }

    #[test]
    fn ed25519_pkcs8_roundtrip() {
        let seed = [5u8; 32];
        let der = ed25519_pkcs8(&seed).map(|d| d.to_vec()).unwrap_or_default();
        assert_eq!(der.len(), 48);
        let back = ed25519_seed_from_pkcs8(&der).map(|s| s.to_vec());
        assert_eq!(back, Some(seed.to_vec()));
        assert!(ed25519_seed_from_pkcs8(&der[..40]).is_none());
        assert!(ed25519_pkcs8(&[1u8; 31]).is_none());
        let mut other = der.clone();
        other[11] = 0x71; // Ed448 OID
        assert!(ed25519_seed_from_pkcs8(&other).is_none());
    }
}
