//! Receipts and contribution attestations (issue 5, items 5–6), the
//! account DIDs and the per-account public JWKS.
//!
//! - A receipt is signed by the daemon's active issuer key (EdDSA) and
//!   recorded with its audit sequence number in one store transaction.
//! - An attestation is signed by the account's own key (EdDSA with the
//!   Ed25519 key, ES256K with the secp256k1 key); its header `kid` is the
//!   RFC 7638 thumbprint that the account's JWKS publishes.

pub mod did;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::crypto::eth::Address;
use crate::crypto::jwk::{b64, Jwk, Jwks};
use crate::crypto::jws::{self, JwsAlg};
use crate::keys::{public_keys, KeyError, KeyService};
use crate::store::AccountRecord;

/// JWS `typ` of a receipt.
pub const RECEIPT_TYP: &str = "keyward-receipt+jwt";
/// JWS `typ` of a contribution attestation.
pub const ATTESTATION_TYP: &str = "keyward-attestation+jwt";
/// The `typ` claim of a contribution attestation.
pub const ATTESTATION_CLAIM_TYP: &str = "contribution_attestation";

/// Longest purpose text, characters.
pub const MAX_PURPOSE_CHARS: usize = 512;

/// An account's public identity: its DIDs and its JWKs (kid = thumbprint).
#[derive(Debug, Clone)]
pub struct AccountPublic {
    /// `did:key` of the Ed25519 key.
    pub did_key: String,
    /// `did:pkh:eip155:<chainId>:<address>` of the secp256k1 key.
    pub did_pkh: String,
    /// The account's Ethereum address.
    pub eth_address: Address,
    /// Ed25519 JWK (alg EdDSA).
    pub ed25519: Jwk,
    /// secp256k1 JWK (alg ES256K).
    pub secp256k1: Jwk,
    /// The public keys of earlier key versions (after a rotation), newest first: they sign
    /// nothing any more, and verify what they signed.
    pub retired: Vec<Jwk>,
}

impl AccountPublic {
    /// From the stored record (no HSM call).
    pub fn of(record: &AccountRecord, chain_id: u64) -> Result<AccountPublic, KeyError> {
        let (secp, ed) = public_keys(record)?;
        let bad = |alg| KeyError::MissingKey {
            account: record.id.clone(),
            alg,
        };
        let ed25519 = Jwk::ed25519(ed.as_bytes()).map_err(|_| bad(crate::types::KeyAlg::Ed25519))?;
        let secp256k1 = Jwk::ec_secp256k1(secp.to_encoded_point(false).as_bytes())
            .map_err(|_| bad(crate::types::KeyAlg::Secp256k1))?;
        let eth_address = Address::from_public_key(&secp);
        let current = record.keys.iter().map(|k| k.key_version).max().unwrap_or(0);
        let mut older: Vec<&crate::store::KeyRecord> = record.keys.iter().filter(|k| k.key_version < current).collect();
        older.sort_by(|a, b| (b.key_version, a.alg.as_str()).cmp(&(a.key_version, b.alg.as_str())));
        let retired = older
            .into_iter()
            .filter_map(|k| match k.alg {
                crate::types::KeyAlg::Ed25519 => Jwk::ed25519(&k.public_key).ok(),
                crate::types::KeyAlg::Secp256k1 => k256::ecdsa::VerifyingKey::from_sec1_bytes(&k.public_key)
                    .ok()
                    .and_then(|v| Jwk::ec_secp256k1(v.to_encoded_point(false).as_bytes()).ok()),
            })
            .collect();
        Ok(AccountPublic {
            did_key: did::did_key_ed25519(&ed.to_bytes()),
            did_pkh: did::did_pkh_eip155(chain_id, &eth_address),
            eth_address,
            ed25519,
            secp256k1,
            retired,
        })
    }

    /// The account's JWKS: Ed25519 first, then secp256k1, then the keys of earlier versions.
    pub fn jwks(&self) -> Jwks {
        let mut keys = vec![self.ed25519.clone(), self.secp256k1.clone()];
        keys.extend(self.retired.iter().cloned());
        Jwks { keys }
    }

    /// The DID that names the key of `alg`.
    pub fn did(&self, alg: JwsAlg) -> &str {
        match alg {
            JwsAlg::ES256K => &self.did_pkh,
            _ => &self.did_key,
        }
    }

    /// The JWK of `alg`'s key.
    pub fn jwk(&self, alg: JwsAlg) -> &Jwk {
        match alg {
            JwsAlg::ES256K => &self.secp256k1,
            _ => &self.ed25519,
        }
    }
}

/// The seller of a receipt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Seller {
    /// The account id.
    pub account_id: String,
    /// The account's DID (`did:key`, Ed25519).
    pub did: String,
}

/// Receipt claims.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReceiptClaims {
    /// The receipt's id (UUID).
    pub receipt_id: String,
    /// The audit sequence number the store assigned.
    pub audit_seq: u64,
    /// Issue time, unix seconds.
    pub iat: i64,
    /// The buyer (a DID or an identity string).
    pub buyer: String,
    /// The seller account.
    pub seller: Seller,
    /// Amount in minor units, decimal (u128).
    pub amount: String,
    /// Currency code.
    pub currency: String,
    /// SHA-256 of the dataset manifest, 64 lowercase hex digits.
    pub manifest: String,
    /// License id.
    pub license_id: String,
    /// The session the receipt was issued under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Reference to the payment signature (e.g. a transaction or SignPayment request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_signature_ref: Option<String>,
    /// Inside a session: the payment's payee (EIP-55), taken from the payment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payee: Option<String>,
    /// Inside a session: the request id of the `SignPayment` this receipt is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_request_id: Option<String>,
    /// Inside a session: the payment's EIP-712 signing hash (`0x` + 64 hex digits), which its
    /// audit event records as its digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_digest: Option<String>,
}

/// Contribution attestation claims.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttestationClaims {
    /// The account's DID.
    pub iss: String,
    /// The dataset id.
    pub sub: String,
    /// Always [`ATTESTATION_CLAIM_TYP`].
    pub typ: &'static str,
    /// Issue time, unix seconds.
    pub iat: i64,
    /// `sha256:<64 hex>`.
    pub contribution_hash: String,
    /// SPDX license identifier or expression.
    pub license: String,
    /// Free text, at most 512 characters.
    pub purpose: String,
}

/// A field that does not validate: (field, reason).
pub type FieldError = (&'static str, &'static str);

/// A dataset id: 1-128 of `[A-Za-z0-9._:-]` (the `attest:` scope grammar).
pub fn check_dataset_id(s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    ok.then_some(()).ok_or(("dataset_id", "1-128 of [A-Za-z0-9._:-]"))
}

/// `sha256:` and 64 lowercase hex digits.
pub fn check_contribution_hash(s: &str) -> Result<(), FieldError> {
    let ok = s
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    ok.then_some(())
        .ok_or(("contribution_hash", "expected sha256:<64 lowercase hex>"))
}

/// An SPDX license id or expression: 1-128 of `[A-Za-z0-9.+:()-]` and
/// single inner spaces (`MIT OR Apache-2.0`).
pub fn check_spdx(s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.contains("  ")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b".+:()- ".contains(&b));
    ok.then_some(()).ok_or((
        "license",
        "an SPDX identifier or expression: 1-128 of [A-Za-z0-9.+:()-] and spaces",
    ))
}

/// 1-512 characters, no control characters.
pub fn check_purpose(s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty() && s.chars().count() <= MAX_PURPOSE_CHARS && !s.chars().any(char::is_control);
    ok.then_some(())
        .ok_or(("purpose", "1-512 characters, no control characters"))
}

/// 1-256 printable characters (a DID or an identity string).
pub fn check_text(field: &'static str, s: &str, required: bool) -> Result<(), FieldError> {
    if s.is_empty() {
        return if required { Err((field, "is required")) } else { Ok(()) };
    }
    let ok = s.chars().count() <= 256 && !s.chars().any(char::is_control);
    ok.then_some(()).ok_or((field, "at most 256 printable characters"))
}

/// Why an attestation could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The key layer failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The claims could not be encoded or the signature did not verify.
    #[error("attestation: {0}")]
    Jws(#[from] jws::JwsError),
}

/// Signs `claims` as a compact JWS with the account's own key of `alg`
/// (EdDSA or ES256K), header `{"alg","kid","typ"}` with kid = the key's
/// thumbprint; the result is verified under the published JWK before it is
/// returned. Both custody modes.
pub async fn sign_attestation(
    keys: &KeyService,
    public: &AccountPublic,
    account_id: &str,
    alg: JwsAlg,
    claims: &AttestationClaims,
) -> Result<String, AttestError> {
    let jwk = public.jwk(alg);
    let header = serde_json::json!({ "alg": alg.as_str(), "kid": jwk.kid, "typ": ATTESTATION_TYP });
    let payload = serde_json::to_vec(claims).map_err(|_| jws::JwsError::Encode { reason: "claims" })?;
    let input = crate::crypto::message::JwsSigningInput::encode(header.to_string().as_bytes(), &payload);
    let mut token = input.as_str().to_string();
    let sig: Vec<u8> = match alg {
        JwsAlg::EdDSA => keys.sign_ed25519_jws(account_id, input).await?.1.to_vec(),
        JwsAlg::ES256K => {
            let prehash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            keys.sign_es256k_prehash(account_id, prehash).await?.1.to_vec()
        }
        JwsAlg::ES256 => {
            return Err(jws::JwsError::Encode {
                reason: "accounts have no P-256 key",
            }
            .into())
        }
    };
    token.push('.');
    token.push_str(&b64(&sig));
    jws::verify_compact(&token, std::slice::from_ref(jwk))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_checks() {
        assert!(check_dataset_id("ds-1.v2:a_b").is_ok());
        assert!(check_dataset_id("").is_err());
        assert!(check_dataset_id("a b").is_err());
        let h = format!("sha256:{}", "ab".repeat(32));
        assert!(check_contribution_hash(&h).is_ok());
        assert!(check_contribution_hash(&h.to_uppercase()).is_err());
        assert!(check_contribution_hash(&"ab".repeat(32)).is_err());
        for ok in [
            "MIT",
            "Apache-2.0",
            "CC-BY-4.0",
            "MIT OR Apache-2.0",
            "GPL-2.0+",
            "LicenseRef-x",
        ] {
            assert!(check_spdx(ok).is_ok(), "{ok}");
        }
        for bad in ["", "MIT\n", "<script>", " MIT", "MIT  OR X", "a\"b"] {
            assert!(check_spdx(bad).is_err(), "{bad:?}");
        }
        assert!(check_purpose(&"x".repeat(512)).is_ok());
        assert!(check_purpose(&"x".repeat(513)).is_err());
        assert!(check_purpose("a\u{7}").is_err());
        assert!(check_text("buyer", "", true).is_err());
        assert!(check_text("ref", "", false).is_ok());
    }
}
