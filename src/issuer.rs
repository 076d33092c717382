//! The daemon's issuer key ring: the HSM issuer keys (EdDSA, ES256, ES256K) with their public
//! JWKs, the active key per algorithm, JWS signing through the HSM, and host-side verification
//! against the ring's own public keys.
//!
//! Kids are RFC 7638 thumbprints of the public JWK; the HSM stores them as CKA_ID and in the
//! label. Every key entering the ring is checked: its kid must equal the thumbprint of its public
//! key, and a probe JWS signed by the HSM must verify under that public key (so a mislabelled or
//! mismatched object pair is found when the key is loaded, not by a verifier).
//!
//! The daemon builds the ring from the store's lifecycle view ([`Issuer::from_records`],
//! [`Issuer::refresh`], driven by [`crate::jwks`]): the `active` key of an algorithm signs;
//! `next`, `active` and `retired` keys are published and verify; revoked or removed keys do
//! neither. A refresh swaps the whole ring atomically; signing never searches the token (the
//! token is searched only when a refresh meets a kid the ring does not hold yet).
//! [`Issuer::load`] / [`Issuer::ensure`] build a ring from the token alone (first key per
//! algorithm active, the others published), for `keyward init` and tools.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::jwk::{Jwk, JwkError, Jwks};
use crate::crypto::jws::{self, JwsAlg, JwsError};
use crate::hsm::{Curve, Hsm, HsmError, HsmKey, IssuerAlg, IssuerKeyInfo, WrappedKey, WrappedRef};
use crate::store::{IssuerKeyRecord, IssuerKeyState};

/// How many more times a refresh searches the token for a stored key it did
/// not find (0.1 s apart).
const TOKEN_LOOKS: usize = 5;

/// Issuer algorithms `keyward init` (and `dev`) create keys for.
pub const DEFAULT_ALGS: [IssuerAlg; 2] = [IssuerAlg::EdDSA, IssuerAlg::ES256];

/// Why the issuer ring cannot load or sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerError {
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// JWS encoding or verification failed.
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// The token holds no EdDSA issuer key.
    #[error("no EdDSA issuer key on the token: run `keyward init`")]
    NoEdDsaKey,
    /// No key of this algorithm is loaded.
    #[error("no active {alg} issuer key: run `keyward init`")]
    NoActiveKey {
        /// Algorithm asked for.
        alg: IssuerAlg,
    },
    /// The token's public key for this label is not a valid key.
    #[error("issuer key {label}: {source}")]
    BadPublicKey {
        /// Object label.
        label: String,
        /// What is wrong.
        source: JwkError,
    },
    /// The object's kid is not the RFC 7638 thumbprint of its public key.
    #[error("issuer key {label}: kid is not the thumbprint of its public key")]
    KidMismatch {
        /// Object label.
        label: String,
    },
    /// A probe signed by the HSM does not verify under the published public key.
    #[error("issuer key {label}: private and public key objects do not match ({source})")]
    BindingCheck {
        /// Object label.
        label: String,
        /// The verification failure.
        source: JwsError,
    },
    /// A stored issuer key does not decode or does not match its token object.
    #[error("issuer key {kid}: {reason}")]
    BadRecord {
        /// The kid.
        kid: String,
        /// What is wrong.
        reason: String,
    },
    /// A stored issuer key has no object on the token.
    #[error("issuer key {label} is in the store but not on the token")]
    MissingOnToken {
        /// Object label.
        label: String,
    },
}

/// One issuer key: the token object's description, its published JWK and its lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKey {
    /// The HSM's view (label, id, public key).
    pub info: IssuerKeyInfo,
    /// The public JWK (kid = thumbprint).
    pub jwk: Jwk,
    /// Lifecycle state (never `Revoked` inside a ring).
    pub state: IssuerKeyState,
}

/// A stored issuer key's blob, unwrapped into a session object of this process's token
/// sessions when first needed, and again after the pool re-initialises (its object is then
/// gone). The session object is destroyed when the last ring holding it is dropped.
struct WrappedSigner {
    curve: Curve,
    public_key: Vec<u8>,
    wrapped: Vec<u8>,
    kek_version: u32,
    key: Mutex<Option<Arc<HsmKey>>>,
}

impl std::fmt::Debug for WrappedSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedSigner")
            .field("curve", &self.curve)
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

impl WrappedSigner {
    fn of(alg: IssuerAlg, public_key: Vec<u8>, wrapped: &[u8], kek_version: u32) -> WrappedSigner {
        WrappedSigner {
            curve: alg.curve(),
            public_key,
            wrapped: wrapped.to_vec(),
            kek_version,
            key: Mutex::new(None),
        }
    }

    /// The unwrapped key, unwrapping the blob if this process holds no current one.
    fn key(&self, hsm: &Hsm, fresh: bool) -> Result<Arc<HsmKey>, HsmError> {
        let mut slot = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = slot.as_ref().filter(|k| !fresh && k.is_current()) {
            return Ok(k.clone());
        }
        let w = WrappedRef {
            public_key: &self.public_key,
            wrapped: &self.wrapped,
            kek_version: self.kek_version,
        };
        let k = Arc::new(hsm.unwrap_curve_for_signing(self.curve, &w)?);
        *slot = Some(k.clone());
        Ok(k)
    }

    /// Signs `data` (see [`Hsm::sign_issuer`] for what it is), unwrapping again once if the
    /// pool re-initialised since the key was unwrapped.
    fn sign(&self, hsm: &Hsm, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        match hsm.sign(&*self.key(hsm, false)?, data) {
            Err(HsmError::StaleKey) => hsm.sign(&*self.key(hsm, true)?, data),
            other => other,
        }
    }
}

/// One immutable view of the ring.
#[derive(Debug, Default)]
struct Ring {
    keys: Vec<IssuerKey>,
    /// Index into `keys` of the signing key per algorithm.
    active: BTreeMap<IssuerAlg, usize>,
    /// The JWKs of `keys`, in the same order (verification without cloning).
    published: Vec<Jwk>,
    /// Keys stored wrapped, by kid; a key not here signs with its token object (label).
    wrapped: BTreeMap<String, Arc<WrappedSigner>>,
}

impl Ring {
    fn new(keys: Vec<IssuerKey>) -> Ring {
        Ring::with_signers(keys, BTreeMap::new())
    }

    fn with_signers(mut keys: Vec<IssuerKey>, wrapped: BTreeMap<String, Arc<WrappedSigner>>) -> Ring {
        keys.sort_by(|a, b| (a.info.alg, &a.jwk.kid).cmp(&(b.info.alg, &b.jwk.kid)));
        let active = keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.state == IssuerKeyState::Active)
            .map(|(i, k)| (k.info.alg, i))
            .collect();
        Ring {
            published: keys.iter().map(|k| k.jwk.clone()).collect(),
            keys,
            active,
            wrapped,
        }
    }
}

/// The issuer key ring. Cheap to clone (clones share the ring); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Issuer {
    hsm: Hsm,
    ring: Arc<RwLock<Arc<Ring>>>,
}

/// The JWS algorithm of an issuer algorithm.
pub fn jws_alg(alg: IssuerAlg) -> JwsAlg {
    match alg {
        IssuerAlg::EdDSA => JwsAlg::EdDSA,
        IssuerAlg::ES256 => JwsAlg::ES256,
        IssuerAlg::ES256K => JwsAlg::ES256K,
    }
}

/// The public JWK of an issuer key's public key bytes (kid = thumbprint).
pub fn jwk_for(alg: IssuerAlg, public_key: &[u8]) -> Result<Jwk, JwkError> {
    match alg {
        IssuerAlg::EdDSA => Jwk::ed25519(public_key),
        IssuerAlg::ES256 => Jwk::ec_p256(public_key),
        IssuerAlg::ES256K => Jwk::ec_secp256k1(public_key),
    }
}

const PROBE_TYP: &str = "keyward-probe";

/// The raw public key of a stored JWK (Ed25519: 32 bytes; EC: the uncompressed SEC1 point),
/// checked to give back the same JWK.
fn raw_public_key(alg: IssuerAlg, jwk: &Jwk) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let x = b64.decode(&jwk.x).ok()?;
    let raw = match &jwk.y {
        None => x,
        Some(y) => {
            let mut p = vec![0x04];
            p.extend_from_slice(&x);
            p.extend_from_slice(&b64.decode(y).ok()?);
            p
        }
    };
    let again = jwk_for(alg, &raw).ok()?;
    (again.kid == jwk.kid).then_some(raw)
}

fn token_key(info: IssuerKeyInfo) -> Result<(IssuerKeyInfo, Jwk), IssuerError> {
    let jwk = jwk_for(info.alg, &info.public_key).map_err(|source| IssuerError::BadPublicKey {
        label: info.label.clone(),
        source,
    })?;
    if jwk.kid.as_bytes() != info.id.as_slice() {
        return Err(IssuerError::KidMismatch { label: info.label });
    }
    Ok((info, jwk))
}

impl Issuer {
    fn with_ring(hsm: &Hsm, ring: Ring) -> Issuer {
        Issuer {
            hsm: hsm.clone(),
            ring: Arc::new(RwLock::new(Arc::new(ring))),
        }
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Load every issuer key from the token (one token search), build and check the JWKs and
    /// pick the active key per algorithm (the first by kid; the others are published). Fails if
    /// there is no EdDSA key. Blocking.
    pub fn load(hsm: &Hsm) -> Result<Issuer, IssuerError> {
        let mut keys = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut infos = hsm.issuer_keys()?;
        infos.sort_by(|a, b| (a.alg, &a.id).cmp(&(b.alg, &b.id)));
        for info in infos {
            let (info, jwk) = token_key(info)?;
            let state = if seen.insert(info.alg) {
                IssuerKeyState::Active
            } else {
                tracing::debug!(alg = %info.alg, other = %jwk.kid,
                    "several issuer keys for one algorithm; all published, the first signs (token-only view)");
                IssuerKeyState::Retired
            };
            keys.push(IssuerKey { info, jwk, state });
        }
        let ring = Ring::new(keys);
        if !ring.active.contains_key(&IssuerAlg::EdDSA) {
            return Err(IssuerError::NoEdDsaKey);
        }
        let issuer = Issuer::with_ring(hsm, ring);
        for k in &issuer.ring().keys {
            issuer.binding_check(k)?;
        }
        tracing::info!(keys = issuer.ring().keys.len(), "issuer keys loaded");
        Ok(issuer)
    }

    /// Create a token key for each algorithm in `algs` that has none yet, then [`Issuer::load`].
    /// For `keyward init` and dev mode. Blocking; a new token key costs a few milliseconds.
    pub fn ensure(hsm: &Hsm, algs: &[IssuerAlg]) -> Result<Issuer, IssuerError> {
        let present: Vec<IssuerAlg> = hsm.issuer_keys()?.into_iter().map(|k| k.alg).collect();
        for &alg in algs {
            if present.contains(&alg) {
                continue;
            }
            create_token_key(hsm, alg)?;
        }
        Issuer::load(hsm)
    }

    /// A ring with no key (fill it with [`Issuer::refresh`]).
    pub fn empty(hsm: &Hsm) -> Issuer {
        Issuer::with_ring(hsm, Ring::default())
    }

    /// The ring the store describes (see [`Issuer::refresh`]); fails without an active EdDSA
    /// key. Blocking.
    pub fn from_records(hsm: &Hsm, records: &[IssuerKeyRecord]) -> Result<Issuer, IssuerError> {
        let issuer = Issuer::with_ring(hsm, Ring::default());
        issuer.refresh(records)?;
        if !issuer.ring().active.contains_key(&IssuerAlg::EdDSA) {
            return Err(IssuerError::NoEdDsaKey);
        }
        Ok(issuer)
    }

    /// Replace the ring with the store's view: `next`, `active` and `retired` keys are
    /// published, the `active` one of each algorithm signs, anything else is dropped. Keys the
    /// ring already holds are reused; a new kid costs one token search and a binding check. On
    /// error the previous ring stays. Blocking.
    pub fn refresh(&self, records: &[IssuerKeyRecord]) -> Result<(), IssuerError> {
        let current = self.ring();
        let mut token: Option<Vec<IssuerKeyInfo>> = None;
        let mut keys = Vec::new();
        let mut wrapped = BTreeMap::new();
        for rec in records.iter().filter(|r| r.state.published()) {
            let bad = |reason: String| IssuerError::BadRecord {
                kid: rec.kid.clone(),
                reason,
            };
            let blob = rec.wrapped.as_deref().zip(rec.kek_version);
            if let Some(k) = current.keys.iter().find(|k| k.jwk.kid == rec.kid) {
                // A blob stays unwrapped for as long as the key may sign; one that failed to
                // unwrap before is tried again.
                if let Some((bytes, version)) = blob {
                    // Kept while the blob is the one it was made from (a rewrap gives a new
                    // blob under a new KEK, whose old version may be retired next).
                    let same = |w: &&Arc<WrappedSigner>| w.kek_version == version && w.wrapped == bytes;
                    match current.wrapped.get(&rec.kid).filter(same) {
                        Some(signer) => {
                            wrapped.insert(rec.kid.clone(), signer.clone());
                        }
                        None => {
                            if let Some(signer) = self.wrapped_signer(k, rec)? {
                                wrapped.insert(rec.kid.clone(), signer);
                            }
                        }
                    }
                }
                keys.push(IssuerKey {
                    state: rec.state,
                    ..k.clone()
                });
                continue;
            }
            let alg = IssuerAlg::from_str(&rec.alg).map_err(|e| bad(e.to_string()))?;
            let stored: Jwk = serde_json::from_str(&rec.jwk).map_err(|e| bad(format!("jwk: {e}")))?;
            if stored.thumbprint() != rec.kid {
                return Err(bad("kid is not the thumbprint of the stored JWK".into()));
            }
            // A stored key (it has, or had, a blob): never a token object to search for.
            if rec.kek_version.is_some() {
                if rec.state == IssuerKeyState::Active && blob.is_none() {
                    return Err(bad("an active stored key without its blob".into()));
                }
                let key = stored_key(alg, rec, stored)?;
                if let Some(signer) = self.wrapped_signer(&key, rec)? {
                    wrapped.insert(rec.kid.clone(), signer);
                }
                keys.push(key);
                continue;
            }
            if token.is_none() {
                token = Some(self.hsm.issuer_keys()?);
            }
            let find = |t: &Option<Vec<IssuerKeyInfo>>| {
                t.as_ref()
                    .and_then(|t| t.iter().find(|i| i.label == rec.label && i.alg == alg))
                    .cloned()
            };
            let mut info = find(&token);
            // A replica sharing the token makes a key before it stores the
            // row, but this process's view of the token folder can lag the
            // other's writes (SoftHSM re-reads object files as they change):
            // look again before calling the key missing.
            for _ in 0..TOKEN_LOOKS {
                if info.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                token = Some(self.hsm.issuer_keys()?);
                info = find(&token);
            }
            let Some(info) = info else {
                // A retired key whose token object is gone (a token restored from a KEK
                // backup does not hold issuer keys): it signs nothing any more, and still
                // verifies what it signed, from its stored public key.
                if rec.state == IssuerKeyState::Retired {
                    keys.push(stored_key(alg, rec, stored)?);
                    continue;
                }
                return Err(IssuerError::MissingOnToken {
                    label: rec.label.clone(),
                });
            };
            let (info, jwk) = token_key(info)?;
            if jwk.kid != rec.kid || jwk.x != stored.x || jwk.y != stored.y {
                return Err(bad("the token's public key differs from the stored JWK".into()));
            }
            let key = IssuerKey {
                info,
                jwk,
                state: rec.state,
            };
            self.binding_check(&key)?;
            keys.push(key);
        }
        let ring = Arc::new(Ring::with_signers(keys, wrapped));
        let changed = ring.keys != current.keys || ring.wrapped.len() != current.wrapped.len();
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = ring;
        if changed {
            tracing::info!(
                published = self.ring().keys.len(),
                "issuer key ring refreshed from the store"
            );
        }
        Ok(())
    }

    /// The signer of a stored blob, unwrapped and proven to sign under the key's JWK. An
    /// active key that cannot be unwrapped fails the refresh (the previous ring stays); a
    /// `next` key is published anyway, and its blob tried again at the next refresh.
    fn wrapped_signer(
        &self,
        key: &IssuerKey,
        rec: &IssuerKeyRecord,
    ) -> Result<Option<Arc<WrappedSigner>>, IssuerError> {
        let (Some(blob), Some(kek_version)) = (rec.wrapped.as_deref(), rec.kek_version) else {
            return Ok(None);
        };
        let signer = Arc::new(WrappedSigner::of(
            key.info.alg,
            key.info.public_key.clone(),
            blob,
            kek_version,
        ));
        match self.check_signer(key, &signer) {
            Ok(()) => Ok(Some(signer)),
            Err(e) if rec.state != IssuerKeyState::Active => {
                tracing::warn!(kid = %rec.kid, state = rec.state.as_str(), error = %e,
                    "issuer key blob does not unwrap here yet; published, retried at the next refresh");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn check_signer(&self, key: &IssuerKey, signer: &WrappedSigner) -> Result<(), IssuerError> {
        let claims = serde_json::json!({ "probe": "keyward issuer binding check" });
        let token = jws::sign_compact(jws_alg(key.info.alg), &key.jwk.kid, PROBE_TYP, &claims, |data| {
            signer.sign(&self.hsm, data).map_err(IssuerError::from)
        })?;
        self.verify_probe(key, &token)
    }

    /// Sign a probe with the HSM key and verify it under the JWK.
    fn binding_check(&self, key: &IssuerKey) -> Result<(), IssuerError> {
        let claims = serde_json::json!({ "probe": "keyward issuer binding check" });
        let token = self.sign_with(key, PROBE_TYP, &claims)?;
        self.verify_probe(key, &token)
    }

    fn verify_probe(&self, key: &IssuerKey, token: &str) -> Result<(), IssuerError> {
        jws::verify_compact(token, std::slice::from_ref(&key.jwk)).map_err(|source| IssuerError::BindingCheck {
            label: key.info.label.clone(),
            source,
        })?;
        Ok(())
    }

    fn sign_with(&self, key: &IssuerKey, typ: &str, claims: &serde_json::Value) -> Result<String, IssuerError> {
        let signer = self.ring().wrapped.get(&key.jwk.kid).cloned();
        jws::sign_compact(jws_alg(key.info.alg), &key.jwk.kid, typ, claims, |data| match &signer {
            Some(signer) => signer.sign(&self.hsm, data).map_err(IssuerError::from),
            None => self.hsm.sign_issuer(&key.info.label, data).map_err(IssuerError::from),
        })
    }

    /// Drops every unwrapped issuer key this process holds (their session objects go to the
    /// key reaper; [`crate::hsm::flush_key_destroys`] waits for them). For shutdown, after the
    /// last signature: a later one would unwrap its key again.
    pub fn release_keys(&self) {
        for signer in self.ring().wrapped.values() {
            let key = signer.key.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(key);
        }
    }

    /// Whether the key `kid` signs from a stored blob (false: a token object, or not held).
    pub fn is_wrapped(&self, kid: &str) -> bool {
        self.ring().wrapped.contains_key(kid)
    }

    /// `keyward doctor`: unwraps a stored issuer key's blob (nothing cached) and proves it
    /// signs under the key's stored JWK. Blocking.
    pub fn check_stored(hsm: &Hsm, rec: &IssuerKeyRecord) -> Result<(), IssuerError> {
        let bad = |reason: String| IssuerError::BadRecord {
            kid: rec.kid.clone(),
            reason,
        };
        let (Some(blob), Some(kek_version)) = (rec.wrapped.as_deref(), rec.kek_version) else {
            return Err(bad("no blob to check".into()));
        };
        let alg = IssuerAlg::from_str(&rec.alg).map_err(|e| bad(e.to_string()))?;
        let jwk: Jwk = serde_json::from_str(&rec.jwk).map_err(|e| bad(format!("jwk: {e}")))?;
        if jwk.thumbprint() != rec.kid {
            return Err(bad("kid is not the thumbprint of the stored JWK".into()));
        }
        let key = stored_key(alg, rec, jwk)?;
        let signer = WrappedSigner::of(alg, key.info.public_key.clone(), blob, kek_version);
        Issuer::empty(hsm).check_signer(&key, &signer)
    }

    /// The active key of `alg`.
    pub fn active(&self, alg: IssuerAlg) -> Result<IssuerKey, IssuerError> {
        let ring = self.ring();
        ring.active
            .get(&alg)
            .and_then(|&i| ring.keys.get(i))
            .cloned()
            .ok_or(IssuerError::NoActiveKey { alg })
    }

    /// Every key in the ring (sorted by algorithm, then kid).
    pub fn keys(&self) -> Vec<IssuerKey> {
        self.ring().keys.clone()
    }

    /// Sign `claims` (a JSON object) as a compact JWS with the active key of `alg`; header
    /// `{"alg","kid","typ"}`. Blocking HSM call: run it on a blocking thread.
    pub fn sign_jws(&self, alg: IssuerAlg, typ: &str, claims: &serde_json::Value) -> Result<String, IssuerError> {
        let key = self.active(alg)?;
        self.sign_with(&key, typ, claims)
    }

    /// The published key set (`next`, `active` and `retired` keys).
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self.ring().published.clone(),
        }
    }

    /// Verify a token against the published keys, on the host (no HSM call).
    pub fn verify(&self, token: &str) -> Result<jws::Verified, IssuerError> {
        Ok(jws::verify_compact(token, &self.ring().published)?)
    }
}

/// A ring entry from a stored row and its decoded JWK (public key taken from the JWK).
fn stored_key(alg: IssuerAlg, rec: &IssuerKeyRecord, jwk: Jwk) -> Result<IssuerKey, IssuerError> {
    let public_key = raw_public_key(alg, &jwk).ok_or_else(|| IssuerError::BadRecord {
        kid: rec.kid.clone(),
        reason: "stored JWK does not decode".into(),
    })?;
    Ok(IssuerKey {
        info: IssuerKeyInfo {
            alg,
            label: rec.label.clone(),
            id: rec.kid.as_bytes().to_vec(),
            public_key,
        },
        jwk,
        state: rec.state,
    })
}

/// Generate a new issuer key of `alg` wrapped under the current KEK (kid = thumbprint of its
/// JWK), to be stored: the private key exists on the token only as session objects, here
/// and wherever the blob is unwrapped. Blocking.
pub fn create_wrapped_key(hsm: &Hsm, alg: IssuerAlg) -> Result<(Jwk, WrappedKey), IssuerError> {
    let w = hsm.generate_wrapped_curve(alg.curve())?;
    let jwk = jwk_for(alg, &w.public_key).map_err(|source| IssuerError::BadPublicKey {
        label: format!("new {alg} key"),
        source,
    })?;
    Ok((jwk, w))
}

/// Generate a new token key of `alg` (kid = thumbprint). Blocking.
pub fn create_token_key(hsm: &Hsm, alg: IssuerAlg) -> Result<(IssuerKeyInfo, Jwk), IssuerError> {
    let kid_for = move |pk: &[u8]| jwk_for(alg, pk).map(|j| j.kid).map_err(|e| e.to_string());
    let info = hsm.create_issuer_key(alg, &kid_for)?;
    tracing::info!(alg = %alg, label = %info.label, "created issuer key");
    token_key(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn issuer_is_send_sync() {
        assert_send_sync::<Issuer>();
    }

    #[test]
    fn alg_mapping() {
        for alg in IssuerAlg::ALL {
            assert_eq!(jws_alg(alg).as_str(), alg.as_str());
        }
        assert!(jwk_for(IssuerAlg::ES256, &[0u8; 32]).is_err());
    }
}
