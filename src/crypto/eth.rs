//! Ethereum conventions: addresses (EIP-55), EIP-191 personal messages, and
//! turning a raw ECDSA r‖s into the low-s r‖s‖v form wallets recover from.

use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};

use super::eip712::keccak256;

/// Why an Ethereum value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EthError {
    /// Not 0x followed by 40 hex digits.
    #[error("not an address: expected 0x followed by 40 hex digits")]
    AddressFormat,
    /// Mixed case that does not match the EIP-55 checksum.
    #[error("address checksum (EIP-55) does not match")]
    AddressChecksum,
    /// The signature does not verify under the expected public key.
    #[error("signature does not verify under the account's public key")]
    SignatureMismatch,
    /// Bytes that are not an ECDSA signature.
    #[error("malformed ECDSA signature")]
    MalformedSignature,
}

/// A 20-byte Ethereum address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub [u8; 20]);

impl Address {
    /// The address of a secp256k1 public key.
    pub fn from_public_key(key: &VerifyingKey) -> Address {
        let point = key.to_encoded_point(false);
        let hash = keccak256(&point.as_bytes()[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&hash[12..]);
        Address(out)
    }

    /// Parses `0x` + 40 hex digits. All-lower and all-upper are accepted; mixed
    /// case must carry a valid EIP-55 checksum.
    pub fn parse(s: &str) -> Result<Address, EthError> {
        let hex_part = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .ok_or(EthError::AddressFormat)?;
        if hex_part.len() != 40 {
            return Err(EthError::AddressFormat);
        }
        let mut out = [0u8; 20];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| EthError::AddressFormat)?;
        let addr = Address(out);
        let has_lower = hex_part.chars().any(|c| c.is_ascii_lowercase());
        let has_upper = hex_part.chars().any(|c| c.is_ascii_uppercase());
        if has_lower && has_upper && addr.to_checksum() != format!("0x{hex_part}") {
            return Err(EthError::AddressChecksum);
        }
        Ok(addr)
    }

    /// EIP-55 mixed-case checksum form.
    pub fn to_checksum(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = keccak256(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                out.push(c.to_ascii_uppercase());
            } else {
                out.push(c);
            }
        }
        out
    }
}

impl std::fmt::Debug for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_checksum())
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_checksum())
    }
}

/// The EIP-191 `personal_sign` digest of a message.
pub fn personal_message_digest(data: &[u8]) -> [u8; 32] {
    let mut buf = Vec::with_capacity(data.len() + 32);
    buf.extend_from_slice(b"\x19Ethereum Signed Message:\n");
    buf.extend_from_slice(data.len().to_string().as_bytes());
    buf.extend_from_slice(data);
    keccak256(&buf)
}

/// Normalises a raw ECDSA signature to low-s (EIP-2) and finds its recovery
/// id by recovering the public key from the low-s signature with each id (0,
/// then 1) and comparing it with `key`. The id that gives back `key` proves
/// the signature verifies under it; if neither does, the signature is refused.
/// Returns r‖s‖v with v ∈ {27, 28}.
///
/// This is how a signature from an HSM, which gives r‖s with either s, gets
/// the form wallets recover from. Every input here is public (the signature,
/// the digest, the public key), so the recovery runs in libsecp256k1's
/// variable-time verifier: one recovery there costs about 0.4 of one k256
/// double-scalar multiplication, which is constant-time (README, Performance).
pub fn to_recoverable(key: &VerifyingKey, prehash: &[u8; 32], raw_rs: &[u8]) -> Result<[u8; 65], EthError> {
    use secp256k1::ecdsa::{RecoverableSignature, RecoveryId as SecpRecoveryId};
    // Refuses r or s of zero or at least the group order, as k256 does.
    let sig = Signature::from_slice(raw_rs).map_err(|_| EthError::MalformedSignature)?;
    let low = sig.normalize_s().unwrap_or(sig);
    let mut out = [0u8; 65];
    out[..64].copy_from_slice(&low.to_bytes());
    let want = key.to_encoded_point(false);
    let message = secp256k1::Message::from_digest(*prehash);
    for (id, v) in [(SecpRecoveryId::Zero, 27u8), (SecpRecoveryId::One, 28u8)] {
        let Ok(recoverable) = RecoverableSignature::from_compact(&out[..64], id) else {
            return Err(EthError::MalformedSignature);
        };
        // Ids 0 and 1 take R.x = r; an R.x at or above the group order
        // (ids 2 and 3, chance about 2^-128) cannot be expressed by an
        // Ethereum v (27/28), so such a signature is refused, not mislabelled.
        match recovery_context().recover_ecdsa(&message, &recoverable) {
            Ok(q) if q.serialize_uncompressed()[..] == *want.as_bytes() => {
                out[64] = v;
                return Ok(out);
            }
            _ => {}
        }
    }
    Err(EthError::SignatureMismatch)
}

/// libsecp256k1's verification context: its tables are static, so making
/// it allocates and precomputes nothing; it is made once all the same.
fn recovery_context() -> &'static secp256k1::Secp256k1<secp256k1::VerifyOnly> {
    static CONTEXT: std::sync::OnceLock<secp256k1::Secp256k1<secp256k1::VerifyOnly>> = std::sync::OnceLock::new();
    CONTEXT.get_or_init(secp256k1::Secp256k1::verification_only)
}

/// Signs a 32-byte digest with a software key: r‖s‖v, low-s, v ∈ {27, 28}
/// (what `eth_sign`-family wallets produce).
pub fn sign_digest(key: &k256::ecdsa::SigningKey, digest: &[u8; 32]) -> Result<[u8; 65], EthError> {
    let (sig, recid) = key
        .sign_prehash_recoverable(digest)
        .map_err(|_| EthError::MalformedSignature)?;
    let (sig, odd) = match sig.normalize_s() {
        Some(low) => (low, !recid.is_y_odd()),
        None => (sig, recid.is_y_odd()),
    };
    let mut out = [0u8; 65];
    out[..64].copy_from_slice(&sig.to_bytes());
    out[64] = 27 + u8::from(odd);
    Ok(out)
}

/// Recovers the address that signed `prehash`, from r‖s‖v (v ∈ {0,1,27,28}).
/// High-s signatures are refused (EIP-2), as wallets and contracts do.
pub fn recover_address(prehash: &[u8; 32], sig65: &[u8]) -> Result<Address, EthError> {
    if sig65.len() != 65 {
        return Err(EthError::MalformedSignature);
    }
    let sig = Signature::from_slice(&sig65[..64]).map_err(|_| EthError::MalformedSignature)?;
    if sig.normalize_s().is_some() {
        return Err(EthError::MalformedSignature);
    }
    let v = match sig65[64] {
        0 | 27 => 0u8,
        1 | 28 => 1u8,
        _ => return Err(EthError::MalformedSignature),
    };
    let recid = RecoveryId::from_byte(v).ok_or(EthError::MalformedSignature)?;
    let key = VerifyingKey::recover_from_prehash(prehash, &sig, recid).map_err(|_| EthError::SignatureMismatch)?;
    Ok(Address::from_public_key(&key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;

    #[test]
    fn eip55_vectors() {
        // From the EIP-55 specification.
        for a in [
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            let parsed = Address::parse(a).expect("valid vector");
            assert_eq!(parsed.to_checksum(), a);
        }
        assert_eq!(
            Address::parse("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"),
            Err(EthError::AddressChecksum)
        );
        assert!(Address::parse("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed").is_ok());
        assert_eq!(Address::parse("0x1234"), Err(EthError::AddressFormat));
        assert_eq!(
            Address::parse("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"),
            Err(EthError::AddressFormat)
        );
    }

    #[test]
    fn recoverable_matches_trial_recovery_for_high_and_low_s() {
        let mut high_seen = 0;
        for i in 0u8..64 {
            let sk = SigningKey::from_slice(&[i.wrapping_add(1); 32]).expect("key");
            let vk = *sk.verifying_key();
            let digest = keccak256(&[i]);
            let (sig, _) = sk.sign_prehash_recoverable(&digest).expect("sign");
            // Produce both s and n - s, as an HSM may return either.
            let low = sig.normalize_s().unwrap_or(sig);
            let high = Signature::from_scalars(low.r(), -*low.s()).expect("high-s");
            for raw in [low, high] {
                if raw.normalize_s().is_some() {
                    high_seen += 1;
                }
                let out = to_recoverable(&vk, &digest, &raw.to_bytes()).expect("recoverable");
                let addr = recover_address(&digest, &out).expect("recovers");
                assert_eq!(addr, Address::from_public_key(&vk));
                assert!(out[64] == 27 || out[64] == 28);
            }
        }
        assert_eq!(high_seen, 64);
    }

    #[test]
    fn wrong_key_is_a_mismatch() {
        let a = SigningKey::from_slice(&[1u8; 32]).expect("key");
        let b = SigningKey::from_slice(&[2u8; 32]).expect("key");
        let digest = keccak256(b"x");
        let (sig, _) = a.sign_prehash_recoverable(&digest).expect("sign");
        assert_eq!(
            to_recoverable(b.verifying_key(), &digest, &sig.to_bytes()),
            Err(EthError::SignatureMismatch)
        );
    }

    #[test]
    fn personal_digest_matches_known_value() {
        // keccak256("\x19Ethereum Signed Message:\n5hello"), as computed by
        // ethers' hashMessage("hello").
        assert_eq!(
            hex::encode(personal_message_digest(b"hello")),
            "50b2c43fd39106bafbba0da34fc430e1f91e3c96ea2acee2bc34119f92b37750"
        );
    }
}
