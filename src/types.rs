//! Small domain types shared by every layer: key algorithms and custody modes.

use std::fmt;
use std::str::FromStr;

/// The algorithm of an account key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyAlg {
    /// ECDSA over secp256k1 (Ethereum).
    Secp256k1,
    /// EdDSA over edwards25519 (RFC 8032).
    Ed25519,
}

impl KeyAlg {
    /// Every algorithm an account holds, in a stable order.
    pub const ALL: [KeyAlg; 2] = [KeyAlg::Secp256k1, KeyAlg::Ed25519];

    /// The stable name used in the store, on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Secp256k1 => "secp256k1",
            KeyAlg::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no known key algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key algorithm {0:?} (expected secp256k1 or ed25519)")]
pub struct UnknownKeyAlg(pub String);

impl FromStr for KeyAlg {
    type Err = UnknownKeyAlg;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "secp256k1" => Ok(KeyAlg::Secp256k1),
            "ed25519" => Ok(KeyAlg::Ed25519),
            other => Err(UnknownKeyAlg(other.to_string())),
        }
    }
}
