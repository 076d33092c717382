//! The audit event: what one request decided and what it signed.
//!
//! # Actions
//!
//! An RPC's event carries the RPC's name as its action (`SignPayment`,
//! `RotateIssuerKey`, ...), the caller's mTLS identity, and is appended in
//! the store transaction of the state change it records when there is one:
//! `CreateAccount` with the account row, `OpenSession` with the session,
//! `SignReceipt` with the receipt, `RevokeIssuerKey` and `RotateIssuerKey`
//! with the key state change (a rotation of several algorithms is one
//! event whose `signature_ref` is `kid:` and the new active kids,
//! comma-separated), and the session spends `SignPayment` and
//! `SignTypedData` (in a session) with the reservation, before anything is
//! signed: `digest` is what will be signed, `signature_ref`
//! `spend:<session id>/<request id>` (the signature is in the stored
//! response). A replayed spend (same request id and body, already
//! completed) reserves nothing and gets an ordinary event for the replay.
//!
//! Events the daemon records without a request, identity
//! [`DAEMON_IDENTITY`]:
//!
//! | action | recorded when (same transaction) | decision, code | `signature_ref` |
//! |---|---|---|---|
//! | [`RELEASE_SPEND`] | a reserved spend is released because signing failed after its event was recorded; the compensating event names the session and request id of the spend | `deny` or `error` and the code of the failure | `spend:<session id>/<request id>` |
//! | [`ISSUER_KEY_PUBLISHED`] | the daemon creates an issuer key (or adopts one the token holds and the store does not know): on first start, when the scheduler publishes a `next` key (or an `active` one when an algorithm has none), and after a rotation or revocation made by a request (the request's own event is separate; this one carries the daemon's identity) | `allow`, `OK` | `kid:<kid>` |
//! | [`SCHEDULED_ROTATION`] | the scheduler promotes the `next` key to `active` | `allow`, `OK` | `kid:<new active kid>` |
//! | [`ISSUER_KEY_RETIRED`] | the same promotion retires the previous active key | `allow`, `OK` | `kid:<retired kid>` |
//! | [`ISSUER_KEY_REMOVED`] | the scheduler removes a retired key after its grace period | `allow`, `OK` | `kid:<kid>` |
//!
//! A `ReleaseSpend` event keeps the identity of the request it compensates
//! (the spend's caller); a reader pairs it with the spend's event by session
//! and request id: the spend was reserved, nothing was signed, and the
//! amount went back to the session.

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

/// The identity of the events the daemon records on its own (no request).
pub const DAEMON_IDENTITY: &str = "keyward";
/// A reserved spend released after signing failed (compensating event).
pub const RELEASE_SPEND: &str = "ReleaseSpend";
/// The scheduler created an issuer key.
pub const ISSUER_KEY_PUBLISHED: &str = "IssuerKeyPublished";
/// The scheduler promoted an issuer key to active.
pub const SCHEDULED_ROTATION: &str = "ScheduledRotation";
/// A scheduled promotion retired the previous active key.
pub const ISSUER_KEY_RETIRED: &str = "IssuerKeyRetired";
/// The scheduler removed a retired key after its grace period.
pub const ISSUER_KEY_REMOVED: &str = "IssuerKeyRemoved";
/// A pending controller change took effect (`controller:<new address>`).
pub const CONTROLLER_CHANGED: &str = "ControllerChanged";

/// Now, unix milliseconds UTC (0 before 1970).
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An allowed event the daemon records on its own, now.
pub fn daemon_event(action: &str, signature_ref: String) -> NewEvent {
    NewEvent {
        time_ms: now_ms(),
        identity: DAEMON_IDENTITY.into(),
        action: action.into(),
        decision: Decision::Allow.as_str().into(),
        code: "OK".into(),
        signature_ref,
        ..NewEvent::default()
    }
}

/// The signature reference of a session spend: `spend:<session>/<request>`.
pub fn spend_ref(session_id: &str, request_id: &str) -> String {
    format!("spend:{session_id}/{request_id}")
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
    /// `receipt:<id>`, `jws:<hex sha256>`, `kid:<kid>[,<kid>...]`,
    /// `spend:<session>/<request>`, ... or empty.
    pub signature_ref: String,
    /// The W3C trace id of the request (32 lowercase hex digits): its span's
    /// when traces are exported, else the caller's `traceparent`; empty when
    /// neither. Hashed only when present, so events without one keep the
    /// encoding they were chained with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
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
