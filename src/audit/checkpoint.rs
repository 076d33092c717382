//! Signed Merkle checkpoints and inclusion proofs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::event::{hex32, Event};
use super::merkle;
use super::store::Checkpoint;
use super::{AuditError, CHECKPOINT_TYP};
use crate::hsm::IssuerAlg;
use crate::issuer::Issuer;
use crate::store::Store;

/// The claims a checkpoint JWS signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointClaims {
    /// First event covered.
    pub first_seq: u64,
    /// Last event covered.
    pub last_seq: u64,
    /// Merkle tree hash, hex.
    #[serde(with = "hex32")]
    pub root: [u8; 32],
    /// Hash of the last covered event, hex.
    #[serde(with = "hex32")]
    pub last_hash: [u8; 32],
    /// Signing time, unix seconds.
    pub iat: i64,
}

/// Reads the events `first..=last` (fewer if some are missing).
pub async fn read_range(store: &dyn Store, first: u64, last: u64) -> Result<Vec<Event>, AuditError> {
    let mut out = Vec::new();
    let mut after = first.saturating_sub(1);
    while after < last {
        let page = store.audit().events_after(after, 1000).await?;
        let Some(end) = page.last().map(|e| e.seq) else {
            break;
        };
        out.extend(page.into_iter().filter(|e| e.seq <= last));
        after = end;
    }
    Ok(out)
}

/// Makes checkpoints every `every_events` events or `every` time.
pub struct Checkpointer {
    store: Arc<dyn Store>,
    issuer: Arc<Issuer>,
    /// The daemon's clock: a checkpoint's `iat` (its signing key's life is on the same clock).
    clock: Arc<dyn crate::clock::Clock>,
    every_events: u64,
    every: Duration,
    /// When this process last signed, and the last event known to be covered.
    last: Mutex<(Instant, u64)>,
    /// `last.1`, readable without the lock: the appender asks
    /// [`Checkpointer::may_be_due`] after every group it commits, and only
    /// then reads the store.
    covered: std::sync::atomic::AtomicU64,
    /// Unix seconds of the last checkpoint this process stored (0: none yet).
    last_stored: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("every_events", &self.every_events)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// A checkpointer signing with `issuer`'s active EdDSA key, dating checkpoints by `clock`.
    pub fn new(
        store: Arc<dyn Store>,
        issuer: Arc<Issuer>,
        clock: Arc<dyn crate::clock::Clock>,
        every_events: u64,
        every: Duration,
    ) -> Checkpointer {
        Checkpointer {
            store,
            issuer,
            clock,
            every_events: every_events.max(1),
            every: every.max(Duration::from_secs(1)),
            last: Mutex::new((Instant::now(), 0)),
            covered: std::sync::atomic::AtomicU64::new(0),
            last_stored: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Unix seconds of the last checkpoint this process signed and stored,
    /// 0 until its first (for the metric; other replicas sign too).
    pub fn last_stored(&self) -> i64 {
        self.last_stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the event rule may call for a checkpoint once the log ends at
    /// `committed`: `every_events` or more past the last event this process
    /// knows to be covered. False means a check would find nothing due by
    /// count (the time rule is checked every [`Checkpointer::period`]).
    pub fn may_be_due(&self, committed: u64) -> bool {
        let covered = self.covered.load(std::sync::atomic::Ordering::Relaxed);
        committed.saturating_sub(covered) >= self.every_events
    }

    /// How often the time rule is checked.
    pub fn period(&self) -> Duration {
        self.every
    }

    /// Signs a checkpoint over the events since the previous one if there
    /// are at least `every_events` of them, or any and `every` has passed
    /// (or `force`). Without `force`, a call while another is signing does
    /// nothing (`None`): that one, or the next call, covers the events; with
    /// `force` it waits for it.
    pub async fn maybe_checkpoint(&self, force: bool) -> Result<Option<Checkpoint>, AuditError> {
        let mut last = if force {
            self.last.lock().await
        } else {
            match self.last.try_lock() {
                Ok(last) => last,
                Err(_) => return Ok(None),
            }
        };
        // Cheap test first (the head only), against the end of the last
        // checkpoint this process saw; the store is read in full only when
        // a checkpoint may be due.
        let head = self.store.audit().audit_head().await?;
        let due = |covered: u64, at: Instant| {
            force || head.seq.saturating_sub(covered) >= self.every_events || at.elapsed() >= self.every
        };
        if !due(last.1, last.0) {
            return Ok(None);
        }
        let Some(claims) = pending_claims(self.store.as_ref(), self.clock.now()).await? else {
            return Ok(None);
        };
        last.1 = claims.first_seq - 1;
        self.covered.store(last.1, std::sync::atomic::Ordering::Relaxed);
        if !due(last.1, last.0) {
            return Ok(None);
        }
        let value = serde_json::to_value(&claims).map_err(|e| AuditError::Sign(e.to_string()))?;
        let issuer = self.issuer.clone();
        let jws = tokio::task::spawn_blocking(move || issuer.sign_jws(IssuerAlg::EdDSA, CHECKPOINT_TYP, &value))
            .await
            .map_err(|_| AuditError::Sign("signing task failed".into()))?
            .map_err(|e| AuditError::Sign(e.to_string()))?;
        *last = (Instant::now(), claims.last_seq);
        self.covered
            .store(claims.last_seq, std::sync::atomic::Ordering::Relaxed);
        let stored = store_checkpoint(self.store.as_ref(), &claims, jws).await?;
        if let Some(cp) = &stored {
            self.last_stored
                .store(cp.created_at, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(stored)
    }
}

/// The claims of a checkpoint over every event since the previous
/// checkpoint (or the last archived event), dated `now` (unix seconds), or
/// `None` if there is none.
pub async fn pending_claims(store: &dyn Store, now: i64) -> Result<Option<CheckpointClaims>, AuditError> {
    let audit = store.audit();
    let head = audit.audit_head().await?;
    let first = audit
        .last_checkpoint()
        .await?
        .map_or(head.base_seq, |c| c.last_seq.max(head.base_seq))
        + 1;
    if head.seq < first {
        return Ok(None);
    }
    // The hashes only, a page at a time: a checkpoint needs no other column.
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    let mut next = first;
    while next <= head.seq {
        let last = head.seq.min(next.saturating_add(HASH_PAGE - 1));
        let page = hash_page(store, next, last).await?;
        let expected = next;
        for (i, (seq, hash)) in page.iter().enumerate() {
            if *seq != expected + i as u64 {
                break;
            }
            hashes.push(*hash);
        }
        if page.len() as u64 != last - next + 1 || hashes.len() as u64 != last - first + 1 {
            return Err(AuditError::Invalid(format!(
                "audit events {first}..={} are not all in the store",
                head.seq
            )));
        }
        next = last + 1;
    }
    Ok(Some(CheckpointClaims {
        first_seq: first,
        last_seq: head.seq,
        root: merkle::root(&hashes),
        last_hash: head.hash,
        iat: now,
    }))
}

/// The hashes of events `first..=last`: on the embedded store read with a
/// connection of the call's own, on a blocking thread (see
/// [`super::writer::event_hashes`]); on a server database, through the pool.
async fn hash_page(store: &dyn Store, first: u64, last: u64) -> Result<Vec<(u64, [u8; 32])>, AuditError> {
    match store.direct_audit() {
        Some(target) => tokio::task::spawn_blocking(move || super::writer::event_hashes(&target.path, first, last))
            .await
            .map_err(|_| AuditError::Unavailable("audit hash read task failed".into()))?,
        None => Ok(store.audit().event_hashes(first, last).await?),
    }
}

/// Event hashes read per query when a checkpoint is made.
const HASH_PAGE: u64 = 10_000;

/// Stores a checkpoint signed as `jws`; `None` if another writer stored one
/// starting at the same event first.
pub async fn store_checkpoint(
    store: &dyn Store,
    claims: &CheckpointClaims,
    jws: String,
) -> Result<Option<Checkpoint>, AuditError> {
    let cp = Checkpoint {
        first_seq: claims.first_seq,
        last_seq: claims.last_seq,
        root: claims.root,
        created_at: claims.iat,
        jws,
    };
    Ok(store.audit().add_checkpoint(&cp).await?.then_some(cp))
}

/// An inclusion proof of one event in a signed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The event.
    pub event: Event,
    /// Its 0-based index among the checkpoint's leaves.
    pub index: u64,
    /// How many leaves the checkpoint covers.
    pub tree_size: u64,
    /// The audit path, leaf upwards, hex.
    pub path: Vec<String>,
    /// The checkpoint (its `jws` signs the root).
    pub checkpoint: Checkpoint,
}

/// The inclusion proof of event `seq` in the checkpoint that covers it.
pub async fn prove(store: &dyn Store, seq: u64) -> Result<InclusionProof, AuditError> {
    let cps = store.audit().checkpoints().await?;
    let Some(cp) = cps.into_iter().find(|c| c.first_seq <= seq && seq <= c.last_seq) else {
        return Err(AuditError::Invalid(format!("no checkpoint covers event {seq} yet")));
    };
    let events = read_range(store, cp.first_seq, cp.last_seq).await?;
    let hashes: Vec<[u8; 32]> = events.iter().map(|e| e.hash).collect();
    let index = seq - cp.first_seq;
    let i = usize::try_from(index).map_err(|_| AuditError::Invalid("index out of range".into()))?;
    let Some(event) = events.get(i).filter(|e| e.seq == seq).cloned() else {
        return Err(AuditError::Invalid(format!("event {seq} is not in the store")));
    };
    let path = merkle::inclusion_proof(i, &hashes).iter().map(hex::encode).collect();
    Ok(InclusionProof {
        event,
        index,
        tree_size: hashes.len() as u64,
        path,
        checkpoint: cp,
    })
}
