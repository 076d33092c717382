//! Domain separation for what an account's Ed25519 key signs. The same key
//! signs the account's attestations (JWS, EdDSA) and, through `SignMessage`,
//! messages of the caller's choosing; the two sets of signed bytes are made
//! disjoint by construction:
//!
//! - a raw message is signed only as [`ed25519_message`]: the fixed prefix
//!   [`ED25519_MESSAGE_PREFIX`] then the caller's bytes. The prefix holds a
//!   space, a colon and a newline, none of which is in the base64url alphabet;
//! - a JWS is signed only as a [`JwsSigningInput`], which can be built only
//!   by encoding a header and a payload, so it holds base64url characters
//!   and one `.`, nothing else.
//!
//! No prefixed message is a JWS signing input, so no `SignMessage` signature
//! verifies as an attestation (or any other JWS of the account's key).
//! Verifiers of `SignMessage` Ed25519 signatures check them over
//! `ED25519_MESSAGE_PREFIX || message`. (secp256k1 messages are EIP-191
//! prefixed the same way, and no path signs a caller's bare 32-byte digest.)

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// What `SignMessage` puts before a message an account's Ed25519 key signs.
pub const ED25519_MESSAGE_PREFIX: &[u8] = b"keyward signed message v1:\n";

/// The bytes an account's Ed25519 key signs for the raw message `data`.
pub fn ed25519_message(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ED25519_MESSAGE_PREFIX.len() + data.len());
    out.extend_from_slice(ED25519_MESSAGE_PREFIX);
    out.extend_from_slice(data);
    out
}

/// The bytes a JWS signature covers: `BASE64URL(header) "." BASE64URL(payload)`.
/// Only [`JwsSigningInput::encode`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwsSigningInput(String);

impl JwsSigningInput {
    /// Encodes a JWS's protected header (JSON bytes) and payload.
    pub fn encode(header_json: &[u8], payload: &[u8]) -> JwsSigningInput {
        let mut s = URL_SAFE_NO_PAD.encode(header_json);
        s.push('.');
        s.push_str(&URL_SAFE_NO_PAD.encode(payload));
        JwsSigningInput(s)
    }

    /// The signing input as text (what the compact JWS starts with).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The signing input's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_prefixed_message_is_a_signing_input() {
        let b64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        assert!(ED25519_MESSAGE_PREFIX.iter().any(|b| !b64url(*b)));
        let input = JwsSigningInput::encode(br#"{"alg":"EdDSA"}"#, br#"{"sub":"x"}"#);
        assert!(input.as_bytes().iter().all(|b| b64url(*b)));
        // Whatever a caller sends, its signed bytes start with the prefix.
        let forged = ed25519_message(input.as_bytes());
        assert!(forged.starts_with(ED25519_MESSAGE_PREFIX));
        assert_ne!(forged, input.as_bytes());
        assert!(forged.iter().any(|b| !b64url(*b)));
    }
}
