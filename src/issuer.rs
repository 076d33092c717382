//! The daemon's issuer key ring: the HSM issuer keys (EdDSA, ES256, ES256K) with their public
//! JWKs, the active key per algorithm, JWS signing through the HSM, and host-side verification
//! against the ring's own public keys.
//!
//! Kids are RFC 7638 thumbprints of the public JWK; the HSM stores them as CKA_ID and in the
//! label. At load every key is checked: its kid must equal the thumbprint of its public key, and
//! a probe JWS signed by the HSM must verify under that public key (so a mislabelled or
//! mismatched object pair is found at startup, not by a verifier).
//!
//! Rotation is later work: the ring already holds several keys per algorithm, but the active
//! one is simply the first by kid, and every key is published.

use std::collections::BTreeMap;

use crate::crypto::jwk::{Jwk, JwkError, Jwks};
use crate::crypto::jws::{self, JwsAlg, JwsError};
use crate::hsm::{Hsm, HsmError, IssuerAlg, IssuerKeyInfo};

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
}

/// One issuer key: the token object's description and its published JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKey {
    /// The HSM's view (label, id, public key).
    pub info: IssuerKeyInfo,
    /// The public JWK (kid = thumbprint).
    pub jwk: Jwk,
}

/// The issuer key ring. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Issuer {
    hsm: Hsm,
    keys: Vec<IssuerKey>,
    /// Index into `keys` of the signing key per algorithm.
    active: BTreeMap<IssuerAlg, usize>,
    /// The JWKs of `keys`, in the same order (verification without cloning).
    published: Vec<Jwk>,
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

impl Issuer {
    /// Load every issuer key from the token (one token search), build and check the JWKs and
    /// pick the active key per algorithm. Fails if there is no EdDSA key. Blocking.
    pub fn load(hsm: &Hsm) -> Result<Issuer, IssuerError> {
        let mut keys = Vec::new();
        for info in hsm.issuer_keys()? {
            let jwk = jwk_for(info.alg, &info.public_key).map_err(|source| IssuerError::BadPublicKey {
                label: info.label.clone(),
                source,
            })?;
            if jwk.kid.as_bytes() != info.id.as_slice() {
                return Err(IssuerError::KidMismatch { label: info.label });
            }
            keys.push(IssuerKey { info, jwk });
        }
        keys.sort_by(|a, b| (a.info.alg, &a.jwk.kid).cmp(&(b.info.alg, &b.jwk.kid)));
        let mut active: BTreeMap<IssuerAlg, usize> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            if let Some(first) = active.get(&k.info.alg) {
                tracing::warn!(alg = %k.info.alg, active = %keys[*first].jwk.kid, other = %k.jwk.kid,
                    "several issuer keys for one algorithm; all published, the first signs");
            } else {
                active.insert(k.info.alg, i);
            }
        }
        if !active.contains_key(&IssuerAlg::EdDSA) {
            return Err(IssuerError::NoEdDsaKey);
        }
        let issuer = Issuer {
            hsm: hsm.clone(),
            published: keys.iter().map(|k| k.jwk.clone()).collect(),
            keys,
            active,
        };
        for k in &issuer.keys {
            issuer.binding_check(k)?;
        }
        tracing::info!(keys = issuer.keys.len(), "issuer keys loaded");
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
            let kid_for = move |pk: &[u8]| jwk_for(alg, pk).map(|j| j.kid).map_err(|e| e.to_string());
            let info = hsm.create_issuer_key(alg, &kid_for)?;
            tracing::info!(alg = %alg, label = %info.label, "created issuer key");
        }
        Issuer::load(hsm)
    }

    /// Sign a probe with the HSM key and verify it under the JWK.
    fn binding_check(&self, key: &IssuerKey) -> Result<(), IssuerError> {
        let claims = serde_json::json!({ "probe": "keyward issuer binding check" });
        let token = self.sign_with(key, PROBE_TYP, &claims)?;
        jws::verify_compact(&token, std::slice::from_ref(&key.jwk)).map_err(|source| IssuerError::BindingCheck {
            label: key.info.label.clone(),
            source,
        })?;
        Ok(())
    }

    fn sign_with(&self, key: &IssuerKey, typ: &str, claims: &serde_json::Value) -> Result<String, IssuerError> {
        jws::sign_compact(jws_alg(key.info.alg), &key.jwk.kid, typ, claims, |data| {
            self.hsm.sign_issuer(&key.info.label, data).map_err(IssuerError::from)
        })
    }

    /// The active key of `alg`.
    pub fn active(&self, alg: IssuerAlg) -> Result<&IssuerKey, IssuerError> {
        self.active
            .get(&alg)
            .and_then(|&i| self.keys.get(i))
            .ok_or(IssuerError::NoActiveKey { alg })
    }

    /// Every key in the ring (sorted by algorithm, then kid).
    pub fn keys(&self) -> &[IssuerKey] {
        &self.keys
    }

    /// Sign `claims` (a JSON object) as a compact JWS with the active key of `alg`; header
    /// `{"alg","kid","typ"}`. Blocking HSM call: run it on a blocking thread.
    pub fn sign_jws(&self, alg: IssuerAlg, typ: &str, claims: &serde_json::Value) -> Result<String, IssuerError> {
        let key = self.active(alg)?;
        self.sign_with(key, typ, claims)
    }

    /// The published key set (every key of the ring).
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self.published.clone(),
        }
    }

    /// Verify a token against the ring's public keys, on the host (no HSM call).
    pub fn verify(&self, token: &str) -> Result<jws::Verified, IssuerError> {
        Ok(jws::verify_compact(token, &self.published)?)
    }
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
