//! The issuer key history: every issuer public key keyward ever published, with its lifecycle
//! times, and verification against it.
//!
//! The JWKS holds the keys a verifier needs today (next, active, and retired keys within their
//! grace period). The history holds every key for as long as anything it signed exists: the
//! store's `issuer_key_history` table (kept by triggers on `issuer_keys`, never deleted), served
//! at [`HISTORY_PATH`] on the HTTPS side port and read by `keyward verify` and `keyward audit
//! verify`.
//!
//! A signature verifies against the history when its kid is there, the signature is good, and
//! the time it claims (`iat`) fits the key's life:
//! - not before the key was created (less [`SKEW`]);
//! - for a revoked key, strictly before the revocation: a signature made before a revocation
//!   still verifies, one claiming a later time does not, and one that claims no time does not.
//!
//! A retired key keeps verifying what it signed. What the history cannot tell is a signature
//! made with a stolen key that claims a time before the key's revocation; for checkpoints the
//! hash chain in the store is the further check, for receipts the audit event of each receipt.

use serde::{Deserialize, Serialize};

use crate::crypto::jwk::Jwk;
use crate::crypto::jws::{self, JwsError, Verified};
use crate::store::IssuerKeyHistoryRecord;

/// The history's path on the HTTPS side port.
pub const HISTORY_PATH: &str = "/.well-known/keyward/issuer-key-history.json";

/// How far a signature's `iat` may precede its key's creation (clock skew between replicas).
pub const SKEW: i64 = 300;

/// One issuer public key and its lifecycle times (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The RFC 7638 thumbprint (also the JWK's `kid`).
    pub kid: String,
    /// JOSE algorithm name.
    pub alg: String,
    /// The public key.
    pub jwk: Jwk,
    /// When the key was created; absent for a key known only from a JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    /// When it became active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<i64>,
    /// When it was retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// The issuer key history document: `{"keys":[entry, ...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHistory {
    /// Every key, by algorithm, then creation time.
    pub keys: Vec<HistoryEntry>,
}

/// Why a signature does not verify against the history, or the history does not load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The JWS itself does not verify (unknown kid, bad signature, malformed).
    #[error(transparent)]
    Jws(#[from] JwsError),
    /// The key was revoked before the time the signature claims (or it claims none).
    #[error("issuer key {kid} was revoked at {revoked_at}; the signature claims {}", claimed(*.iat))]
    Revoked {
        /// The key.
        kid: String,
        /// When it was revoked.
        revoked_at: i64,
        /// The signature's `iat`.
        iat: Option<i64>,
    },
    /// The signature claims a time before its key existed.
    #[error("issuer key {kid} was created at {created_at}; the signature claims iat {iat}")]
    BeforeCreated {
        /// The key.
        kid: String,
        /// When it was created.
        created_at: i64,
        /// The signature's `iat`.
        iat: i64,
    },
    /// A stored public key does not decode.
    #[error("issuer key {kid}: stored JWK does not decode: {reason}")]
    BadKey {
        /// The key.
        kid: String,
        /// What is wrong.
        reason: String,
    },
}

fn claimed(iat: Option<i64>) -> String {
    match iat {
        Some(t) => format!("iat {t}"),
        None => "no iat".into(),
    }
}

impl KeyHistory {
    /// The history from the store's rows.
    pub fn from_records(records: &[IssuerKeyHistoryRecord]) -> Result<KeyHistory, HistoryError> {
        let keys = records
            .iter()
            .map(|r| {
                let jwk: Jwk = serde_json::from_str(&r.jwk).map_err(|e| HistoryError::BadKey {
                    kid: r.kid.clone(),
                    reason: e.to_string(),
                })?;
                if jwk.kid != r.kid {
                    return Err(HistoryError::BadKey {
                        kid: r.kid.clone(),
                        reason: format!("the JWK's kid is {}", jwk.kid),
                    });
                }
                Ok(HistoryEntry {
                    kid: r.kid.clone(),
                    alg: r.alg.clone(),
                    jwk,
                    created_at: Some(r.created_at),
                    activated_at: r.activated_at,
                    retired_at: r.retired_at,
                    revoked_at: r.revoked_at,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeyHistory { keys })
    }

    /// A history of the keys of a JWKS alone (no times: a JWKS lists no revoked keys).
    pub fn from_jwks(jwks: &[Jwk]) -> KeyHistory {
        KeyHistory {
            keys: jwks
                .iter()
                .map(|k| HistoryEntry {
                    kid: k.kid.clone(),
                    alg: k.alg.as_str().to_string(),
                    jwk: k.clone(),
                    created_at: None,
                    activated_at: None,
                    retired_at: None,
                    revoked_at: None,
                })
                .collect(),
        }
    }

    /// Adds the keys of `other` whose kid this history does not hold.
    pub fn merge(&mut self, other: KeyHistory) {
        for e in other.keys {
            if !self.keys.iter().any(|k| k.kid == e.kid) {
                self.keys.push(e);
            }
        }
    }

    /// The entry for `kid`.
    pub fn get(&self, kid: &str) -> Option<&HistoryEntry> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Verifies a compact JWS against the history (see the module docs for the time rules).
    pub fn verify(&self, token: &str) -> Result<Verified, HistoryError> {
        let jwks: Vec<Jwk> = self.keys.iter().map(|e| e.jwk.clone()).collect();
        let verified = jws::verify_compact(token, &jwks)?;
        let kid = verified.header.kid.clone().unwrap_or_default();
        let Some(entry) = self.get(&kid) else {
            return Err(JwsError::UnknownKid { kid }.into());
        };
        let iat = verified.claims.get("iat").and_then(serde_json::Value::as_i64);
        if let (Some(created_at), Some(iat)) = (entry.created_at, iat) {
            if iat.saturating_add(SKEW) < created_at {
                return Err(HistoryError::BeforeCreated { kid, created_at, iat });
            }
        }
        if let Some(revoked_at) = entry.revoked_at {
            if iat.is_none_or(|t| t >= revoked_at) {
                return Err(HistoryError::Revoked { kid, revoked_at, iat });
            }
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::jws::JwsAlg;
    use ed25519_dalek::{Signer as _, SigningKey};

    fn key(seed: u8) -> (SigningKey, Jwk) {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        let jwk = Jwk::ed25519(sk.verifying_key().as_bytes()).expect("jwk");
        (sk, jwk)
    }

    fn sign(sk: &SigningKey, kid: &str, claims: &serde_json::Value) -> String {
        jws::sign_compact::<JwsError>(JwsAlg::EdDSA, kid, "JWT", claims, |input| {
            Ok(sk.sign(input).to_bytes().to_vec())
        })
        .expect("sign")
    }

    fn record(jwk: &Jwk, created: i64, revoked: Option<i64>) -> IssuerKeyHistoryRecord {
        IssuerKeyHistoryRecord {
            kid: jwk.kid.clone(),
            alg: "EdDSA".into(),
            jwk: serde_json::to_string(jwk).expect("jwk"),
            created_at: created,
            activated_at: Some(created),
            retired_at: revoked,
            revoked_at: revoked,
        }
    }

    #[test]
    fn a_revoked_key_verifies_what_it_signed_before_the_revocation_only() {
        let (sk, jwk) = key(7);
        let h = KeyHistory::from_records(&[record(&jwk, 1_000, Some(5_000))]).expect("history");
        let before = sign(&sk, &jwk.kid, &serde_json::json!({"iat": 4_999}));
        assert_eq!(h.verify(&before).expect("before").claims["iat"], 4_999);
        for late in [5_000, 9_000] {
            let t = sign(&sk, &jwk.kid, &serde_json::json!({ "iat": late }));
            assert!(
                matches!(h.verify(&t), Err(HistoryError::Revoked { iat: Some(i), .. }) if i == late),
                "{late}"
            );
        }
        let timeless = sign(&sk, &jwk.kid, &serde_json::json!({"iss": "x"}));
        assert!(matches!(
            h.verify(&timeless),
            Err(HistoryError::Revoked { iat: None, .. })
        ));
        // The same key, not revoked: every time after creation verifies.
        let h = KeyHistory::from_records(&[record(&jwk, 1_000, None)]).expect("history");
        assert!(h.verify(&timeless).is_ok());
        assert!(h
            .verify(&sign(&sk, &jwk.kid, &serde_json::json!({"iat": 9_000})))
            .is_ok());
    }

    #[test]
    fn a_signature_claiming_a_time_before_its_key_existed_is_refused() {
        let (sk, jwk) = key(8);
        let h = KeyHistory::from_records(&[record(&jwk, 10_000, None)]).expect("history");
        let skewed = sign(&sk, &jwk.kid, &serde_json::json!({ "iat": 10_000 - SKEW }));
        assert!(h.verify(&skewed).is_ok());
        let early = sign(&sk, &jwk.kid, &serde_json::json!({ "iat": 10_000 - SKEW - 1 }));
        assert!(matches!(h.verify(&early), Err(HistoryError::BeforeCreated { .. })));
    }

    #[test]
    fn unknown_keys_and_bad_signatures_are_refused() {
        let (sk, jwk) = key(9);
        let (other, other_jwk) = key(10);
        let h = KeyHistory::from_records(&[record(&jwk, 0, None)]).expect("history");
        let t = sign(&other, &other_jwk.kid, &serde_json::json!({"iat": 1}));
        assert!(matches!(
            h.verify(&t),
            Err(HistoryError::Jws(JwsError::UnknownKid { .. }))
        ));
        // Signed by another key under this key's kid.
        let forged = sign(&other, &jwk.kid, &serde_json::json!({"iat": 1}));
        assert!(matches!(h.verify(&forged), Err(HistoryError::Jws(_))));
        assert!(h.verify(&sign(&sk, &jwk.kid, &serde_json::json!({"iat": 1}))).is_ok());
        // A JWKS-only history has no times, and merging keeps the first entry of a kid.
        let mut merged = KeyHistory::from_records(&[record(&jwk, 0, Some(1))]).expect("history");
        merged.merge(KeyHistory::from_jwks(&[jwk.clone(), other_jwk.clone()]));
        assert_eq!(merged.keys.len(), 2);
        assert_eq!(merged.get(&jwk.kid).and_then(|e| e.revoked_at), Some(1));
        assert!(merged.verify(&t).is_ok());
    }

    #[test]
    fn a_stored_jwk_under_another_kid_is_refused() {
        let (_, jwk) = key(11);
        let mut r = record(&jwk, 0, None);
        r.kid = "someone-else".into();
        assert!(matches!(
            KeyHistory::from_records(&[r]),
            Err(HistoryError::BadKey { .. })
        ));
    }
}
