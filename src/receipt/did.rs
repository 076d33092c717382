//! Decentralised identifiers for accounts: `did:key` for an Ed25519 key
//! (multicodec 0xed01 + base58btc, multibase prefix `z`) and
//! `did:pkh:eip155:<chainId>:<EIP-55 address>` for a secp256k1 key.
//!
//! The base58btc encoder is our own (Bitcoin alphabet, leading zero bytes as
//! `1`), so no crate is added for twenty lines.

use crate::crypto::eth::Address;

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// base58btc (Bitcoin alphabet) of `bytes`.
pub fn base58btc(bytes: &[u8]) -> String {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    // Base-58 digits, least significant first.
    let mut digits: Vec<u8> = Vec::with_capacity(bytes.len() * 138 / 100 + 1);
    for &byte in &bytes[zeros..] {
        let mut carry = u32::from(byte);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(digits.iter().rev().map(|&d| char::from(ALPHABET[usize::from(d)])));
    out
}

/// `did:key:z6Mk...` of an Ed25519 public key.
pub fn did_key_ed25519(public_key: &[u8; 32]) -> String {
    let mut bytes = Vec::with_capacity(34);
    bytes.extend_from_slice(&[0xed, 0x01]);
    bytes.extend_from_slice(public_key);
    format!("did:key:z{}", base58btc(&bytes))
}

/// `did:pkh:eip155:<chainId>:<EIP-55 address>`.
pub fn did_pkh_eip155(chain_id: u64, address: &Address) -> String {
    format!("did:pkh:eip155:{chain_id}:{}", address.to_checksum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(h: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out).expect("hex");
        out
    }

    #[test]
    fn base58_basics() {
        assert_eq!(base58btc(b""), "");
        assert_eq!(base58btc(&[0]), "1");
        assert_eq!(base58btc(&[0, 0, 1]), "112");
        assert_eq!(base58btc(b"hello world"), "StV1DL6CwTryKyV");
        assert_eq!(base58btc(&[0xff; 4]), "7YXq9G");
    }

    /// Published did:key Ed25519 vectors (the did:key method's test vector, and
    /// two DID documents whose publicKeyBase58 is the raw key).
    #[test]
    fn did_key_vectors() {
        // did:key spec: publicKeyJwk x = O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik
        assert_eq!(
            did_key_ed25519(&pk("3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29")),
            "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"
        );
        // publicKeyBase58 3Dn1SJNPaCXcvvJvSbsFWP2xaCjMom3can8CQNhWrTRx
        let k = pk("20fd3bd58fcc1bea2f34f3092168fbe58caf803f23d2d0bbe043007ef4485a87");
        assert_eq!(base58btc(&k), "3Dn1SJNPaCXcvvJvSbsFWP2xaCjMom3can8CQNhWrTRx");
        assert_eq!(
            did_key_ed25519(&k),
            "did:key:z6Mkgg342Ycpuk263R9d8Aq6MUaxPn1DDeHyGo38EefXmgDL"
        );
        // publicKeyBase58 8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQqEB3nS7Zfu7K
        assert_eq!(
            did_key_ed25519(&pk("6c2d48b1605684ef94363dc6158eeb6577466e1a36a740f2fc624617edb7712e")),
            "did:key:z6MkmjY8GnV5i9YTDtPETC2uUAW6ejw3nk5mXF5yci5ab7th"
        );
    }

    #[test]
    fn did_pkh() {
        let a = Address::parse("0x52908400098527886e0f7030069857d2e4169ee7").expect("address");
        assert_eq!(
            did_pkh_eip155(8453, &a),
            "did:pkh:eip155:8453:0x52908400098527886E0F7030069857D2E4169EE7"
        );
    }
}
