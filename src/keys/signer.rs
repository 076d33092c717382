//! One account's keys, unwrapped and proven to be the account's own, ready
//! to sign in the custody mode chosen at start-up.
//!
//! Host custody keeps only the 32 key bytes, in the locked arena (`locked.rs`), and builds what
//! a signature needs from them each time (a scalar parse for secp256k1, one SHA-512 for
//! Ed25519); callers scrub the stack after signing.

use std::sync::Arc;
use std::time::Instant;

use k256::ecdsa::hazmat::SignPrimitive as _;
use k256::ecdsa::VerifyingKey;
use zeroize::Zeroize as _;

use super::locked::{LockedKey, SecretArena};
use super::KeyError;
use crate::config::Custody;
use crate::crypto::eip712::keccak256;
use crate::crypto::eth::{self, Address};
use crate::hsm::{Hsm, HsmError, HsmKey, WrappedRef};
use crate::metrics::Metrics;
use crate::store::{AccountRecord, KeyRecord};
use crate::types::KeyAlg;

/// What the binding check signs: any fixed message will do, since only the
/// public key that verifies it matters.
const BINDING_MESSAGE: &[u8] = b"keyward: unwrapped key binding check";

enum Secp {
    Hsm(HsmKey),
    /// The big-endian scalar.
    Host(LockedKey),
}

enum Ed {
    Hsm(HsmKey),
    /// The seed.
    Host(LockedKey),
    /// Refused by the custody settings (`hsm.refuse_host_ed25519`): the reason.
    Refused(String),
}

/// secp256k1 over a 32-byte prehash from the scalar in `key` (RFC 6979, no extra data: the
/// signature `SigningKey::sign_prehash_recoverable` gives): low-s, and whether R's y is odd.
#[inline(never)] // its frame must lie below the caller's `scrub_stack`
fn secp_sign(key: &LockedKey, prehash: &[u8; 32]) -> Result<(k256::ecdsa::Signature, bool), KeyError> {
    key.with(|bytes| {
        let mut scalar = k256::NonZeroScalar::try_from(&bytes[..])
            .map_err(|_| KeyError::Internal("stored secp256k1 scalar is invalid"))?;
        let signed = scalar.try_sign_prehashed_rfc6979::<sha2::Sha256>(&(*prehash).into(), &[]);
        scalar.zeroize();
        match signed {
            Ok((sig, Some(recid))) => Ok((sig, recid.is_y_odd())),
            _ => Err(KeyError::Internal("secp256k1 signing failed")),
        }
    })
}

/// Ed25519 (RFC 8032) over `msg` from the seed in `key`.
#[inline(never)] // its frame must lie below the caller's `scrub_stack`
fn ed_sign(key: &LockedKey, public: &ed25519_dalek::VerifyingKey, msg: &[u8]) -> [u8; 64] {
    key.with(|seed| {
        // Zeroized when dropped (ed25519-dalek's `zeroize` feature).
        let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(seed);
        ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(&expanded, msg, public).to_bytes()
    })
}

/// An account with both keys usable. Dropping it destroys the HSM session
/// objects (custody `hsm`) or zeroizes the key bytes (custody `host`).
pub struct AccountKeys {
    /// Shared with every request that reads it (never cloned per request).
    record: Arc<AccountRecord>,
    eth_address: Address,
    /// `eth_address` in EIP-55 form, as every signing response names it.
    eth_checksum: String,
    secp_public: VerifyingKey,
    ed_public: ed25519_dalek::VerifyingKey,
    secp: Secp,
    ed: Ed,
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeys")
            .field("account", &self.record.id)
            .field("eth_address", &self.eth_address)
            .finish_non_exhaustive()
    }
}

fn key_record(record: &AccountRecord, alg: KeyAlg) -> Result<&KeyRecord, KeyError> {
    record
        .keys
        .iter()
        .filter(|k| k.alg == alg)
        .max_by_key(|k| k.key_version)
        .ok_or_else(|| KeyError::MissingKey {
            account: record.id.clone(),
            alg,
        })
}

/// Decodes an account's stored public keys.
pub fn public_keys(record: &AccountRecord) -> Result<(VerifyingKey, ed25519_dalek::VerifyingKey), KeyError> {
    let missing = |alg| KeyError::MissingKey {
        account: record.id.clone(),
        alg,
    };
    let secp = key_record(record, KeyAlg::Secp256k1)?;
    let secp = VerifyingKey::from_sec1_bytes(&secp.public_key).map_err(|_| missing(KeyAlg::Secp256k1))?;
    let ed = key_record(record, KeyAlg::Ed25519)?;
    let ed_bytes: [u8; 32] = ed
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| missing(KeyAlg::Ed25519))?;
    let ed = ed25519_dalek::VerifyingKey::from_bytes(&ed_bytes).map_err(|_| missing(KeyAlg::Ed25519))?;
    Ok((secp, ed))
}

fn wref(k: &KeyRecord) -> WrappedRef<'_> {
    WrappedRef {
        public_key: &k.public_key,
        wrapped: &k.wrapped,
        kek_version: k.kek_version,
    }
}

impl AccountKeys {
    /// Unwraps both keys of `record` (blocking HSM calls) and proves each is
    /// the key its stored public key names. Host custody puts the key bytes in
    /// `arena`; the caller scrubs its stack afterwards (not inlined, so that
    /// this frame lies in the scrubbed range).
    #[inline(never)]
    pub fn unwrap(
        hsm: &Hsm,
        custody: Custody,
        arena: &Arc<SecretArena>,
        record: AccountRecord,
    ) -> Result<AccountKeys, KeyError> {
        let (secp_public, ed_public) = public_keys(&record)?;
        let binding = |alg| KeyError::Binding {
            account: record.id.clone(),
            alg,
        };
        let secp_rec = key_record(&record, KeyAlg::Secp256k1)?;
        let ed_rec = key_record(&record, KeyAlg::Ed25519)?;
        let (secp, ed) = match custody {
            Custody::Hsm => {
                let secp_key = hsm.unwrap_for_signing(KeyAlg::Secp256k1, &wref(secp_rec))?;
                let digest = keccak256(BINDING_MESSAGE);
                let raw = hsm.sign(&secp_key, &digest)?;
                eth::to_recoverable(&secp_public, &digest, &raw).map_err(|_| binding(KeyAlg::Secp256k1))?;

                let ed = match hsm.unwrap_for_signing(KeyAlg::Ed25519, &wref(ed_rec)) {
                    Ok(ed_key) => {
                        let raw = hsm.sign(&ed_key, BINDING_MESSAGE)?;
                        let sig = ed25519_dalek::Signature::from_slice(&raw).map_err(|_| binding(KeyAlg::Ed25519))?;
                        ed_public
                            .verify_strict(BINDING_MESSAGE, &sig)
                            .map_err(|_| binding(KeyAlg::Ed25519))?;
                        Ed::Hsm(ed_key)
                    }
                    // The account's secp256k1 key still signs.
                    Err(HsmError::CustodyRefused { reason }) => Ed::Refused(reason),
                    Err(e) => return Err(e.into()),
                };
                (Secp::Hsm(secp_key), ed)
            }
            Custody::Host => {
                let scalar = hsm.unwrap_to_host(KeyAlg::Secp256k1, &wref(secp_rec))?;
                let secp = arena.store(&scalar)?;
                let derived = k256::SecretKey::from_slice(&scalar).map(|sk| sk.public_key());
                drop(scalar);
                if derived.ok().map(VerifyingKey::from) != Some(secp_public) {
                    return Err(binding(KeyAlg::Secp256k1));
                }
                let seed = hsm.unwrap_to_host(KeyAlg::Ed25519, &wref(ed_rec))?;
                let ed = arena.store(&seed)?;
                drop(seed);
                let derived = ed.with(|seed| ed25519_dalek::SigningKey::from_bytes(seed).verifying_key());
                if derived != ed_public {
                    return Err(binding(KeyAlg::Ed25519));
                }
                (Secp::Host(secp), Ed::Host(ed))
            }
        };
        let eth_address = Address::from_public_key(&secp_public);
        Ok(AccountKeys {
            eth_checksum: eth_address.to_checksum(),
            eth_address,
            record: Arc::new(record),
            secp_public,
            ed_public,
            secp,
            ed,
        })
    }

    /// The stored account.
    pub fn record(&self) -> &AccountRecord {
        &self.record
    }

    /// The stored account, shared.
    pub fn shared_record(&self) -> Arc<AccountRecord> {
        self.record.clone()
    }

    /// The account's Ethereum address.
    pub fn eth_address(&self) -> Address {
        self.eth_address
    }

    /// The account's Ethereum address in EIP-55 checksum form.
    pub fn eth_checksum(&self) -> &str {
        &self.eth_checksum
    }

    /// secp256k1 public key, compressed SEC1.
    pub fn secp256k1_public_compressed(&self) -> Vec<u8> {
        self.secp_public.to_encoded_point(true).as_bytes().to_vec()
    }

    /// Ed25519 public key.
    pub fn ed25519_public(&self) -> [u8; 32] {
        self.ed_public.to_bytes()
    }

    /// Whether signing is cheap host work (no blocking HSM call).
    pub fn signs_on_host(&self) -> bool {
        matches!(self.secp, Secp::Host(_))
    }

    /// r‖s‖v over a 32-byte digest, low-s, v ∈ {27, 28}.
    pub fn sign_eth_digest(&self, hsm: &Hsm, metrics: &Metrics, digest: &[u8; 32]) -> Result<[u8; 65], KeyError> {
        match &self.secp {
            Secp::Host(key) => {
                let (sig, odd) = secp_sign(key, digest)?;
                let mut out = [0u8; 65];
                out[..64].copy_from_slice(&sig.to_bytes());
                out[64] = 27 + u8::from(odd);
                Ok(out)
            }
            Secp::Hsm(key) => {
                let started = Instant::now();
                let raw = hsm.sign(key, digest);
                metrics.observe_hsm("sign_ecdsa", started, raw.is_ok());
                let raw = raw?;
                // Normalises to low-s, finds v, and verifies under the stored key.
                eth::to_recoverable(&self.secp_public, digest, &raw).map_err(|_| KeyError::Binding {
                    account: self.record.id.clone(),
                    alg: KeyAlg::Secp256k1,
                })
            }
        }
    }

    /// An RFC 8032 Ed25519 signature over `msg`.
    pub fn sign_ed25519(&self, hsm: &Hsm, metrics: &Metrics, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        match &self.ed {
            Ed::Host(key) => Ok(ed_sign(key, &self.ed_public, msg)),
            Ed::Refused(reason) => Err(KeyError::Hsm(HsmError::CustodyRefused { reason: reason.clone() })),
            Ed::Hsm(key) => {
                let started = Instant::now();
                let raw = hsm.sign(key, msg);
                metrics.observe_hsm("sign_eddsa", started, raw.is_ok());
                let raw = raw?;
                raw.as_slice()
                    .try_into()
                    .map_err(|_| KeyError::Internal("token returned an Ed25519 signature of the wrong length"))
            }
        }
    }

    // ----- issue 5: ES256K (attestations) --------------------------------------

    /// An ES256K (RFC 8812) signature over a SHA-256 prehash with the
    /// account's secp256k1 key: raw r‖s, 64 bytes, low-s, checked against the
    /// stored public key.
    pub fn sign_es256k_prehash(&self, hsm: &Hsm, metrics: &Metrics, prehash: &[u8; 32]) -> Result<[u8; 64], KeyError> {
        use k256::ecdsa::signature::hazmat::PrehashVerifier as _;
        let binding = || KeyError::Binding {
            account: self.record.id.clone(),
            alg: KeyAlg::Secp256k1,
        };
        let sig: k256::ecdsa::Signature = match &self.secp {
            Secp::Host(key) => secp_sign(key, prehash)?.0,
            Secp::Hsm(key) => {
                let started = Instant::now();
                let raw = hsm.sign(key, prehash);
                metrics.observe_hsm("sign_ecdsa", started, raw.is_ok());
                k256::ecdsa::Signature::from_slice(&raw?).map_err(|_| binding())?
            }
        };
        let sig = sig.normalize_s().unwrap_or(sig);
        self.secp_public.verify_prehash(prehash, &sig).map_err(|_| binding())?;
        Ok(sig.to_bytes().into())
    }
}
