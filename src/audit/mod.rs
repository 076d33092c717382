//! The tamper-evident audit log: one hash-chained event per decision
//! (allowed, denied or failed), signed Merkle checkpoints, verification,
//! export and retention. Nothing secret is ever written here: payloads are
//! recorded only as their SHA-256, signatures only as a reference.
//!
//! # Canonical encoding (version 1)
//!
//! Every event is hashed over a byte string an auditor can rebuild from an
//! exported line. `str(s)` is the big-endian `u32` length of the UTF-8
//! bytes of `s` followed by those bytes; integers are big-endian.
//!
//! ```text
//! canonical(e) = "keyward.audit.v1"            (16 ASCII bytes, no length)
//!             || u64(seq) || i64(time_ms)
//!             || str(identity) || str(action) || str(account)
//!             || str(session) || str(request_id) || str(decision)
//!             || u32(number of policies) || str(policy_1) || ...
//!             || str(code) || str(digest) || str(signature_ref)
//!             [ || str(trace_id) ]             (only when non-empty)
//! hash(e)      = SHA-256(prev_hash || canonical(e))
//! ```
//!
//! `trace_id` is the request's W3C trace id (see [`crate::telemetry`]). It
//! came after the first events were chained, so it is written only when an
//! event has one: an event without it encodes exactly as before, and an
//! empty trace id is never written (one encoding per event).
//!
//! `prev_hash` of the first event is 32 zero bytes; sequence numbers are
//! dense (1, 2, 3, ...), so a removed row leaves a gap. `digest` is the
//! lowercase hex SHA-256 of what was signed (empty when nothing was),
//! `decision` is `allow`, `deny` or `error`, `code` the gRPC status name.
//!
//! # One transaction with the state change
//!
//! A request that changes state appends its event inside the store
//! transaction of that change ([`context`]), so there is never a change,
//! or a signature, without its event: account creation, session opening,
//! receipts, issuer key revocation and forced rotation, and session spends.
//! A spend's event is appended with its reservation, before signing, with
//! the digest that will be signed and `signature_ref`
//! `spend:<session>/<request id>`; completion (storing the response with the
//! signature) appends nothing. If signing fails after the reservation, the
//! spend is released and a compensating `ReleaseSpend` event, with the
//! failure's decision (`deny` or `error`) and status code, is appended in the
//! releasing transaction: reading the log, a spend event followed by its
//! `ReleaseSpend` (same session and request id) means nothing was signed and
//! the amount went back to the session. The issuer key scheduler records
//! each change it makes the same way, as the daemon (identity `keyward`); the
//! actions are listed in [`event`].
//!
//! # Checkpoints
//!
//! A checkpoint covers the events `first_seq..=last_seq` since the previous
//! one: the RFC 6962 Merkle tree hash whose leaves are the events' `hash`
//! values (leaf = SHA-256(0x00 || hash), node = SHA-256(0x01 || left ||
//! right)), signed as a compact JWS (`typ` [`CHECKPOINT_TYP`]) by the active
//! EdDSA issuer key, with the claims `first_seq`, `last_seq`, `root` (hex),
//! `last_hash` (hex) and `iat`. A graceful shutdown writes a final
//! checkpoint over the events since the last one, once the appender has
//! written everything queued ([`Appender::finish`]).

pub mod appender;
pub mod bench;
pub mod chain;
pub mod checkpoint;
pub mod context;
pub mod event;
pub mod export;
pub mod merkle;
pub mod settings;
pub mod store;
pub mod verify;
pub mod writer;

pub use appender::{Appender, AppenderSettings, AppenderStats};
pub use chain::{canonical, link, GENESIS};
pub use event::{Decision, Event, NewEvent};
pub use settings::AuditConfig;
pub use store::{AuditStore, Checkpoint};

/// The JWS `typ` of a checkpoint.
pub const CHECKPOINT_TYP: &str = "keyward-audit-checkpoint+jwt";

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The log could not be written; the request's response is withheld.
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The appender is stopped (the daemon is shutting down).
    #[error("audit appender stopped")]
    Stopped,
    /// A checkpoint could not be signed.
    #[error("checkpoint signing failed: {0}")]
    Sign(String),
    /// An export or archive file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// A line of an export does not decode.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
    /// A request the log cannot satisfy (e.g. an unknown sequence number).
    #[error("{0}")]
    Invalid(String),
}
