//! The audit event: what one request decided and what it signed.

use serde::{Deserialize, Serialize};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Authorized, and the operation completed.
    Allow,
    /// Refused by authorization, a session, a scope or a limit.
    Deny,
    /// Failed for another reason (bad input, unavailable backend, bug).
    Error,
}

impl Decision {
    /// `allow`, `deny` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// An event before the log assigns its sequence number and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NewEvent {
    /// When the decision was made, unix milliseconds UTC.
    pub time_ms: i64,
    /// The caller's mTLS identity (empty without one).
    pub identity: String,
    /// The RPC, e.g. `SignTypedData`.
    pub action: String,
    /// The account the request was about, if known.
    pub account: String,
    /// The delegated session, if any.
    pub session: String,
    /// The caller's request (idempotency) id, if any.
    pub request_id: String,
    /// `allow`, `deny` or `error`.
    pub decision: String,
    /// The policies or rules that decided (interim rules as `interim:<rule>`).
    pub policies: Vec<String>,
    /// The gRPC status name of the response.
    pub code: String,
    /// Hex SHA-256 of what was signed, or empty.
    pub digest: String,
    /// Reference to the result: `sig:<hex sha256 of the signature>`,
    /// `receipt:<id>`, `session:<id>`, ... or empty.
    pub signature_ref: String,
}

/// An event as stored: its sequence number and chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3, ... without gaps.
    pub seq: u64,
    /// The event's fields.
    #[serde(flatten)]
    pub body: NewEvent,
    /// The previous event's hash (32 zero bytes for the first).
    #[serde(with = "hex32")]
    pub prev_hash: [u8; 32],
    /// SHA-256(prev_hash || canonical encoding).
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

/// The signature reference of an issued JWS: `jws:<hex SHA-256 of the token>`.
pub fn jws_ref(token: &str) -> String {
    use sha2::Digest as _;
    format!("jws:{}", hex::encode(sha2::Sha256::digest(token.as_bytes())))
}

/// Serde helper: 32 bytes as lowercase hex.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as hex.
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Parses 64 hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}
