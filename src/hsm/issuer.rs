//! Issuer keys: long-lived signing key pairs generated inside the token as *token* objects
//! (never extractable), used for session tokens, receipts, attestations and audit checkpoints.
//!
//! Each pair is labelled `keyward-issuer-<alg>-<kid>` (both objects) with CKA_ID = the kid's
//! bytes. The kid (an RFC 7638 thumbprint) is computed by the caller from the public key, since
//! this module has no JOSE code: [`Hsm::create_issuer_key`] generates the pair under a
//! provisional label, reads the public key, asks the caller's closure for the kid, then sets the
//! final label and id (and destroys the pair if any step fails). A crash in between leaves a
//! `keyward-issuer-pending-*` pair that [`Hsm::issuer_keys`] ignores.
//!
//! Handles are found with C_FindObjects only in [`Hsm::issuer_keys`] / [`Hsm::create_issuer_key`]
//! (startup, init, rotation) and cached per pool epoch; signing never searches the token, except
//! once after a pool re-initialisation or an invalid handle, when the cache is reloaded.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::error::{breakage, is_handle_invalid, map_err, settle, Breakage, Fail, HsmError};
use super::generate::{destroy_quietly, Curve, ED25519_PARAMS, ED25519_PARAMS_NAME, P256_PARAMS, SECP256K1_PARAMS};
use super::Hsm;

/// Label prefix of issuer key objects.
pub const ISSUER_LABEL_PREFIX: &str = "keyward-issuer-";
/// Longest kid accepted (a SHA-256 thumbprint is 43 characters).
const MAX_KID_LEN: usize = 64;

/// Algorithm of an issuer key (JOSE names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IssuerAlg {
    /// Ed25519 (`CKM_EDDSA`).
    EdDSA,
    /// ECDSA on P-256 with SHA-256 (`CKM_ECDSA` over the digest).
    ES256,
    /// ECDSA on secp256k1 with SHA-256 (`CKM_ECDSA` over the digest).
    ES256K,
}

impl IssuerAlg {
    /// Every issuer algorithm.
    pub const ALL: [IssuerAlg; 3] = [IssuerAlg::EdDSA, IssuerAlg::ES256, IssuerAlg::ES256K];

    /// The JOSE `alg` name: `EdDSA`, `ES256`, `ES256K`.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuerAlg::EdDSA => "EdDSA",
            IssuerAlg::ES256 => "ES256",
            IssuerAlg::ES256K => "ES256K",
        }
    }

    /// The curve of its private key.
    pub fn curve(self) -> Curve {
        match self {
            IssuerAlg::EdDSA => Curve::Ed25519,
            IssuerAlg::ES256 => Curve::P256,
            IssuerAlg::ES256K => Curve::Secp256k1,
        }
    }

    fn ec_params(self) -> &'static [u8] {
        match self {
            IssuerAlg::EdDSA => ED25519_PARAMS,
            IssuerAlg::ES256 => P256_PARAMS,
            IssuerAlg::ES256K => SECP256K1_PARAMS,
        }
    }

    fn params_match(self, params: &[u8]) -> bool {
        match self {
            IssuerAlg::EdDSA => params == ED25519_PARAMS || params == ED25519_PARAMS_NAME,
            other => params == other.ec_params(),
        }
    }

    fn mechanism(self) -> Mechanism<'static> {
        match self {
            IssuerAlg::EdDSA => Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            IssuerAlg::ES256 | IssuerAlg::ES256K => Mechanism::Ecdsa,
        }
    }

    fn keygen_mechanism(self) -> Mechanism<'static> {
        match self {
            IssuerAlg::EdDSA => Mechanism::EccEdwardsKeyPairGen,
            IssuerAlg::ES256 | IssuerAlg::ES256K => Mechanism::EccKeyPairGen,
        }
    }

    /// Ed25519: 32 bytes; EC: 65-byte uncompressed SEC1.
    fn public_key_len(self) -> usize {
        match self {
            IssuerAlg::EdDSA => 32,
            IssuerAlg::ES256 | IssuerAlg::ES256K => 65,
        }
    }

    /// Strip the DER OCTET STRING around CKA_EC_POINT (tolerates the raw form).
    fn decode_point(self, raw: &[u8]) -> Option<Vec<u8>> {
        let want = self.public_key_len();
        let inner = if raw.len() == want {
            raw
        } else {
            match raw {
                [0x04, len, rest @ ..] if (*len as usize) < 0x80 && *len as usize == rest.len() => rest,
                [0x04, 0x81, len, rest @ ..] if *len as usize == rest.len() => rest,
                _ => return None,
            }
        };
        if inner.len() != want || (self != IssuerAlg::EdDSA && inner.first() != Some(&0x04)) {
            return None;
        }
        Some(inner.to_vec())
    }
}

impl fmt::Display for IssuerAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`IssuerAlg`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown issuer algorithm {0:?} (expected EdDSA, ES256 or ES256K)")]
pub struct UnknownIssuerAlg(pub String);

impl FromStr for IssuerAlg {
    type Err = UnknownIssuerAlg;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IssuerAlg::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownIssuerAlg(s.to_string()))
    }
}

/// Public description of one issuer key on the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKeyInfo {
    /// Algorithm.
    pub alg: IssuerAlg,
    /// CKA_LABEL, `keyward-issuer-<alg>-<kid>`.
    pub label: String,
    /// CKA_ID: the kid's bytes.
    pub id: Vec<u8>,
    /// Ed25519: 32 bytes; EC: 65-byte uncompressed SEC1 point.
    pub public_key: Vec<u8>,
}

impl IssuerKeyInfo {
    /// The kid (CKA_ID as text).
    pub fn kid(&self) -> &str {
        std::str::from_utf8(&self.id).unwrap_or("")
    }
}

/// The label of an issuer key.
pub fn issuer_label(alg: IssuerAlg, kid: &str) -> String {
    format!("{ISSUER_LABEL_PREFIX}{}-{kid}", alg.as_str())
}

/// (alg, kid) of a final issuer label; None for anything else (pending pairs, foreign objects).
fn parse_label(label: &str) -> Option<(IssuerAlg, &str)> {
    let rest = label.strip_prefix(ISSUER_LABEL_PREFIX)?;
    let (alg, kid) = rest.split_once('-')?;
    let alg = IssuerAlg::from_str(alg).ok()?;
    valid_kid(kid).then_some((alg, kid))
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    alg: IssuerAlg,
    private: ObjectHandle,
    public: ObjectHandle,
}

#[derive(Debug, Default)]
struct CacheState {
    /// Pool epoch the handles belong to (0: never loaded).
    epoch: u64,
    /// A handle was reported invalid: reload before the next use.
    dirty: bool,
    keys: BTreeMap<String, Entry>,
}

/// Cached issuer key handles (part of the `Hsm`'s shared state).
#[derive(Debug, Default)]
pub(crate) struct IssuerCache {
    state: Mutex<CacheState>,
}

impl IssuerCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The byte-valued attributes we read from issuer objects.
#[derive(Default)]
struct Attrs {
    label: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
    point: Option<Vec<u8>>,
    params: Option<Vec<u8>>,
}

fn attr_bytes(attrs: Vec<Attribute>) -> Attrs {
    let mut out = Attrs::default();
    for a in attrs {
        match a {
            Attribute::Label(v) => out.label = Some(v),
            Attribute::Id(v) => out.id = Some(v),
            Attribute::EcPoint(v) => out.point = Some(v),
            Attribute::EcParams(v) => out.params = Some(v),
            _ => {}
        }
    }
    out
}

/// Find every well-formed issuer pair on the token.
fn find_issuer_keys(s: &Session) -> Result<Vec<(IssuerKeyInfo, Entry)>, CkError> {
    let mut privates: BTreeMap<String, (IssuerAlg, Vec<u8>, ObjectHandle)> = BTreeMap::new();
    for h in s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Token(true)])? {
        let Attrs { label, id, .. } = attr_bytes(s.get_attributes(h, &[AttributeType::Label, AttributeType::Id])?);
        let Some(label) = label.and_then(|l| String::from_utf8(l).ok()) else {
            continue;
        };
        if !label.starts_with(ISSUER_LABEL_PREFIX) {
            continue;
        }
        let Some((alg, kid)) = parse_label(&label) else {
            tracing::warn!(label = %label, "issuer-like private key with a provisional or malformed label; ignored");
            continue;
        };
        let id = id.unwrap_or_default();
        if id != kid.as_bytes() {
            tracing::warn!(label = %label, "issuer private key whose CKA_ID differs from its kid; ignored");
            continue;
        }
        if privates.insert(label.clone(), (alg, id, h)).is_some() {
            tracing::warn!(label = %label, "two issuer private keys with the same label; using one");
        }
    }
    let mut out = Vec::new();
    let publics = s.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Token(true)])?;
    for h in publics {
        let attrs = s.get_attributes(
            h,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::EcPoint,
                AttributeType::EcParams,
            ],
        )?;
        let Attrs {
            label,
            id,
            point,
            params,
        } = attr_bytes(attrs);
        let Some(label) = label.and_then(|l| String::from_utf8(l).ok()) else {
            continue;
        };
        let Some((alg, id_want, private)) = privates.remove(&label) else {
            continue;
        };
        if id.as_deref() != Some(id_want.as_slice()) || !params.as_deref().is_some_and(|p| alg.params_match(p)) {
            tracing::warn!(label = %label, "issuer public key with a foreign CKA_ID or curve; ignored");
            continue;
        }
        let Some(public_key) = point.as_deref().and_then(|p| alg.decode_point(p)) else {
            tracing::warn!(label = %label, "issuer public key with an unexpected CKA_EC_POINT; ignored");
            continue;
        };
        let entry = Entry {
            alg,
            private,
            public: h,
        };
        out.push((
            IssuerKeyInfo {
                alg,
                label,
                id: id_want,
                public_key,
            },
            entry,
        ));
    }
    for label in privates.keys() {
        tracing::warn!(label = %label, "issuer private key without its public key object; ignored");
    }
    out.sort_by(|a, b| a.0.label.cmp(&b.0.label));
    Ok(out)
}

/// Generate a token pair, name it, and return its description; destroys the pair on failure.
fn create_pair(
    s: &Session,
    alg: IssuerAlg,
    kid_for: &dyn Fn(&[u8]) -> Result<String, String>,
) -> Result<(IssuerKeyInfo, Entry), Fail> {
    let pending = format!("{ISSUER_LABEL_PREFIX}pending-{}", uuid::Uuid::new_v4().simple());
    let public_t = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(alg.ec_params().to_vec()),
        Attribute::Label(pending.clone().into_bytes()),
    ];
    let private_t = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::Label(pending.into_bytes()),
    ];
    let (public, private) = s.generate_key_pair(&alg.keygen_mechanism(), &public_t, &private_t)?;
    let named = name_pair(s, alg, public, private, kid_for);
    if named.is_err() {
        destroy_quietly(s, private, "issuer private key");
        destroy_quietly(s, public, "issuer public key");
    }
    named
}

fn name_pair(
    s: &Session,
    alg: IssuerAlg,
    public: ObjectHandle,
    private: ObjectHandle,
    kid_for: &dyn Fn(&[u8]) -> Result<String, String>,
) -> Result<(IssuerKeyInfo, Entry), Fail> {
    let point = attr_bytes(s.get_attributes(public, &[AttributeType::EcPoint])?).point;
    let public_key = point.as_deref().and_then(|p| alg.decode_point(p)).ok_or_else(|| {
        Fail::Hsm(HsmError::Internal {
            op: "create_issuer_key",
            rv: "unexpected CKA_EC_POINT encoding".to_string(),
        })
    })?;
    let kid = kid_for(&public_key).map_err(|reason| HsmError::InvalidIssuerKid { reason })?;
    if !valid_kid(&kid) {
        return Err(Fail::Hsm(HsmError::InvalidIssuerKid {
            reason: format!("kid must be 1..={MAX_KID_LEN} base64url characters"),
        }));
    }
    let label = issuer_label(alg, &kid);
    let id = kid.into_bytes();
    let naming = [Attribute::Label(label.clone().into_bytes()), Attribute::Id(id.clone())];
    s.update_attributes(private, &naming)?;
    s.update_attributes(public, &naming)?;
    Ok((
        IssuerKeyInfo {
            alg,
            label,
            id,
            public_key,
        },
        Entry { alg, private, public },
    ))
}

impl Hsm {
    /// Every issuer key on the token (sorted by label). Searches the token (C_FindObjects): call
    /// at startup and rotation only. Refreshes the handle cache used by [`Hsm::sign_issuer`].
    pub fn issuer_keys(&self) -> Result<Vec<IssuerKeyInfo>, HsmError> {
        let mut cache = self.inner.issuer.lock();
        self.reload_issuer(&mut cache)
    }

    /// Lock order: issuer cache, then a pool session.
    fn reload_issuer(&self, cache: &mut CacheState) -> Result<Vec<IssuerKeyInfo>, HsmError> {
        const OP: &str = "issuer_keys";
        let label = self.inner.pool.label.clone();
        let (found, epoch) = self.inner.pool.with_session(OP, |p| {
            // Another process sharing the token (a replica rotating) can
            // destroy or rewrite an object between C_FindObjects and
            // C_GetAttributeValue: search again, a few times.
            let mut found = find_issuer_keys(&p.session);
            for _ in 0..3 {
                match &found {
                    Err(e) if is_handle_invalid(e) => {
                        found = find_issuer_keys(&p.session);
                    }
                    _ => break,
                }
            }
            match found {
                Ok(found) => (Ok((found, p.epoch)), Breakage::None),
                Err(e) => (Err(map_err(OP, &e, &label)), breakage(&e)),
            }
        })?;
        cache.keys = found.iter().map(|(i, e)| (i.label.clone(), *e)).collect();
        cache.epoch = epoch;
        cache.dirty = false;
        Ok(found.into_iter().map(|(i, _)| i).collect())
    }

    /// Generate a new issuer key pair of `alg` as token objects (private: token, private,
    /// sensitive, not extractable, sign only). `kid_for` receives the public key (Ed25519: 32
    /// bytes; EC: 65-byte SEC1) and returns the kid (1..=64 base64url characters); the pair is
    /// then labelled `keyward-issuer-<alg>-<kid>` with CKA_ID = kid. If `kid_for` or any step
    /// fails, the pair is destroyed. Slow (token objects are written to storage).
    pub fn create_issuer_key(
        &self,
        alg: IssuerAlg,
        kid_for: &dyn Fn(&[u8]) -> Result<String, String>,
    ) -> Result<IssuerKeyInfo, HsmError> {
        const OP: &str = "create_issuer_key";
        let mut cache = self.inner.issuer.lock();
        let label = self.inner.pool.label.clone();
        let (info, entry, epoch) = self.inner.pool.with_session(OP, |p| {
            let r = create_pair(&p.session, alg, kid_for).map(|(i, e)| (i, e, p.epoch));
            settle(r, OP, &label)
        })?;
        if cache.epoch == epoch && !cache.dirty {
            cache.keys.insert(info.label.clone(), entry);
        } else {
            self.reload_issuer(&mut cache)?;
        }
        tracing::info!(label = %info.label, "created issuer key");
        Ok(info)
    }

    /// The cached entry for `label`, reloading the cache first if it was never loaded, the pool
    /// was re-initialised, or a handle failed.
    fn issuer_entry(&self, label: &str) -> Result<Entry, HsmError> {
        let mut cache = self.inner.issuer.lock();
        if cache.epoch != self.inner.pool.epoch() || cache.dirty {
            self.reload_issuer(&mut cache)?;
        }
        cache
            .keys
            .get(label)
            .copied()
            .ok_or_else(|| HsmError::IssuerKeyNotFound {
                label: label.to_string(),
            })
    }

    fn issuer_handle_failed(&self) {
        self.inner.issuer.lock().dirty = true;
    }

    /// Sign with the issuer key `label`. EdDSA: `CKM_EDDSA` over `data`. ES256/ES256K:
    /// `CKM_ECDSA` over `data`, which must be the caller's 32-byte SHA-256 digest; the result is
    /// the raw `r‖s` the token gives (NOT low-s normalised). Always 64 bytes. No token search
    /// (handles are cached); a handle found invalid is reloaded and the sign retried once.
    pub fn sign_issuer(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        const OP: &str = "sign_issuer";
        let entry = self.issuer_entry(label)?;
        if entry.alg != IssuerAlg::EdDSA && data.len() != 32 {
            return Err(HsmError::Unsupported {
                what: format!("{} signing takes a 32-byte digest, got {} bytes", entry.alg, data.len()),
            });
        }
        let sig = match self.sign_issuer_once(entry, data) {
            Err(Retry::HandleInvalid) => {
                tracing::warn!(
                    label,
                    "issuer key handle invalid; reloading issuer keys and retrying once"
                );
                self.issuer_handle_failed();
                let entry = self.issuer_entry(label)?;
                match self.sign_issuer_once(entry, data) {
                    Ok(sig) => sig,
                    Err(Retry::HandleInvalid) => {
                        self.issuer_handle_failed();
                        return Err(HsmError::Unavailable {
                            op: OP,
                            rv: "CKR_KEY_HANDLE_INVALID".to_string(),
                        });
                    }
                    Err(Retry::Other(e)) => return Err(e),
                }
            }
            Err(Retry::Other(e)) => return Err(e),
            Ok(sig) => sig,
        };
        if sig.len() != 64 {
            return Err(HsmError::Internal {
                op: OP,
                rv: format!("signature of {} bytes", sig.len()),
            });
        }
        Ok(sig)
    }

    fn sign_issuer_once(&self, entry: Entry, data: &[u8]) -> Result<Vec<u8>, Retry> {
        const OP: &str = "sign_issuer";
        let pool = &self.inner.pool;
        let label = pool.label.clone();
        let mech = entry.alg.mechanism();
        let mut invalid = false;
        let res = pool.with_session(OP, |p| {
            invalid = false;
            match p.session.sign(&mech, entry.private, data) {
                Ok(sig) => (Ok(sig), Breakage::None),
                Err(e) => {
                    invalid = is_handle_invalid(&e);
                    (Err(map_err(OP, &e, &label)), breakage(&e))
                }
            }
        });
        match res {
            Ok(sig) => Ok(sig),
            Err(_) if invalid => Err(Retry::HandleInvalid),
            Err(e) => {
                if matches!(e, HsmError::Unavailable { .. }) {
                    // The pool may re-initialise: handles are then reloaded (epoch check).
                    self.issuer_handle_failed();
                }
                Err(Retry::Other(e))
            }
        }
    }

    /// Destroy both objects of the issuer key `label` (for rotation: retire before destroying).
    pub fn destroy_issuer_key(&self, label: &str) -> Result<(), HsmError> {
        const OP: &str = "destroy_issuer_key";
        let entry = self.issuer_entry(label)?;
        let mut cache = self.inner.issuer.lock();
        let tok = self.inner.pool.label.clone();
        let res = self.inner.pool.with_session(OP, |p| {
            let r = p
                .session
                .destroy_object(entry.private)
                .and_then(|()| p.session.destroy_object(entry.public));
            match r {
                Ok(()) => (Ok(()), Breakage::None),
                Err(e) => (Err(map_err(OP, &e, &tok)), breakage(&e)),
            }
        });
        match res {
            Ok(()) => {
                cache.keys.remove(label);
                tracing::info!(label, "destroyed issuer key");
                Ok(())
            }
            Err(e) => {
                cache.dirty = true;
                Err(e)
            }
        }
    }
}

enum Retry {
    HandleInvalid,
    Other(HsmError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_names_round_trip() {
        for a in IssuerAlg::ALL {
            assert_eq!(IssuerAlg::from_str(a.as_str()), Ok(a));
            assert_eq!(a.to_string(), a.as_str());
        }
        assert!(IssuerAlg::from_str("es256").is_err());
        assert!(IssuerAlg::from_str("none").is_err());
    }

    #[test]
    fn labels() {
        let l = issuer_label(IssuerAlg::ES256K, "ab-_Z9");
        assert_eq!(l, "keyward-issuer-ES256K-ab-_Z9");
        assert_eq!(parse_label(&l), Some((IssuerAlg::ES256K, "ab-_Z9")));
        assert_eq!(parse_label("keyward-issuer-pending-0123"), None);
        assert_eq!(parse_label("keyward-issuer-EdDSA-"), None);
        assert_eq!(parse_label("keyward-issuer-EdDSA-a.b"), None);
        assert_eq!(parse_label("keyward-kek-v1"), None);
    }

    #[test]
    fn point_decoding() {
        let mut der = vec![0x04, 0x41, 0x04];
        der.extend_from_slice(&[7u8; 64]);
        assert_eq!(IssuerAlg::ES256.decode_point(&der).map(|p| p.len()), Some(65));
        let mut ed = vec![0x04, 0x20];
        ed.extend_from_slice(&[9u8; 32]);
        assert_eq!(IssuerAlg::EdDSA.decode_point(&ed), Some(vec![9u8; 32]));
        assert_eq!(IssuerAlg::ES256K.decode_point(&ed), None);
        let mut compressed = vec![0x04, 0x41, 0x02];
        compressed.extend_from_slice(&[7u8; 64]);
        assert_eq!(IssuerAlg::ES256.decode_point(&compressed), None);
    }
}
