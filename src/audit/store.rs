//! What the audit log needs from the store, implemented by both backends
//! (`sqlite.rs`, `postgres.rs` in this module). The chain head lives in a
//! one-row table that every append locks inside its transaction, so several
//! replicas on one PostgreSQL database append to a single dense chain.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::chain::link;
use super::event::{hex32, Event, NewEvent};
use crate::store::StoreError;

/// The chain's ends as the store records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The last pruned (archived) event, 0 if none was pruned.
    pub base_seq: u64,
    /// Its hash (the `prev_hash` of the first stored event).
    pub base_hash: [u8; 32],
    /// The last appended event, 0 if none.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

/// A signed checkpoint over `first_seq..=last_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// First event covered.
    pub first_seq: u64,
    /// Last event covered.
    pub last_seq: u64,
    /// RFC 6962 Merkle tree hash over the covered events' hashes.
    #[serde(with = "hex32")]
    pub root: [u8; 32],
    /// When it was made, unix seconds.
    pub created_at: i64,
    /// The compact JWS over the checkpoint claims.
    pub jws: String,
}

/// Audit persistence.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + fmt::Debug {
    /// Appends `events` in one transaction (one commit, one fsync), under
    /// the head lock; returns them with their sequence numbers and hashes.
    async fn append_events(&self, events: &[NewEvent]) -> Result<Vec<Event>, StoreError>;

    /// Up to `limit` events with `seq > after`, ascending.
    async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError>;

    /// The recorded chain ends.
    async fn audit_head(&self) -> Result<Head, StoreError>;

    /// Every stored checkpoint, by `first_seq`.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;

    /// Stores a checkpoint; false (nothing written) if one already starts at
    /// its `first_seq` (another replica was first).
    async fn add_checkpoint(&self, c: &Checkpoint) -> Result<bool, StoreError>;

    /// Deletes the events `<= through` and the checkpoints ending `<= through`,
    /// and records event `through` as the new base; returns how many events
    /// were deleted.
    async fn prune_events(&self, through: u64) -> Result<u64, StoreError>;
}

/// Chains `events` onto `(seq, hash)`.
pub(crate) fn chain_onto(mut seq: u64, mut hash: [u8; 32], events: &[NewEvent]) -> Vec<Event> {
    events
        .iter()
        .map(|e| {
            seq += 1;
            let prev = hash;
            hash = link(&prev, seq, e);
            Event {
                seq,
                body: e.clone(),
                prev_hash: prev,
                hash,
            }
        })
        .collect()
}

/// One `audit_events` row as read.
pub(crate) struct RawEvent {
    pub seq: i64,
    pub time_ms: i64,
    pub identity: String,
    pub action: String,
    pub account: String,
    pub session: String,
    pub request_id: String,
    pub decision: String,
    pub policies: String,
    pub code: String,
    pub digest: String,
    pub signature_ref: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The columns of an `audit_events` row, in [`RawEvent`] order.
pub(crate) const EVENT_COLUMNS: &str = "seq, time_ms, identity, action, account, session, request_id, decision, \
     policies, code, digest, signature_ref, prev_hash, hash";

pub(crate) fn hash32(what: &str, b: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(b).map_err(|_| StoreError::Corrupt {
        what: format!("{what}: hash is {} bytes, not 32", b.len()),
    })
}

pub(crate) fn seq_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        what: format!("audit seq {v} is negative"),
    })
}

pub(crate) fn seq_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt {
        what: format!("audit seq {v} out of range"),
    })
}

pub(crate) fn encode_policies(p: &[String]) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "[]".into())
}

impl RawEvent {
    /// Decodes a row; a row that does not decode is reported as corrupt.
    pub(crate) fn decode(self) -> Result<Event, StoreError> {
        let what = format!("audit event {}", self.seq);
        let policies: Vec<String> = serde_json::from_str(&self.policies).map_err(|e| StoreError::Corrupt {
            what: format!("{what}: policies: {e}"),
        })?;
        Ok(Event {
            seq: seq_u64(self.seq)?,
            prev_hash: hash32(&what, &self.prev_hash)?,
            hash: hash32(&what, &self.hash)?,
            body: NewEvent {
                time_ms: self.time_ms,
                identity: self.identity,
                action: self.action,
                account: self.account,
                session: self.session,
                request_id: self.request_id,
                decision: self.decision,
                policies,
                code: self.code,
                digest: self.digest,
                signature_ref: self.signature_ref,
            },
        })
    }
}
