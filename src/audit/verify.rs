//! Verification: recomputes the chain and every checkpoint, checks the
//! checkpoint signatures against a JWKS, and names the first sequence
//! number where the log stops being what was signed. Works on the store
//! (the daemon may be stopped) and on an export file alike.

use serde::Serialize;

use super::chain::link;
use super::checkpoint::CheckpointClaims;
use super::event::Event;
use super::merkle;
use super::store::{Checkpoint, Head};
use super::{AuditError, CHECKPOINT_TYP};
use crate::jwks::history::KeyHistory;
use crate::store::Store;

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Events read.
    pub events: u64,
    /// First event read (0 if none).
    pub first_seq: u64,
    /// Last event read (0 if none).
    pub last_seq: u64,
    /// Checkpoints whose signature and root verified.
    pub checkpoints_verified: u64,
    /// The first sequence number where the log breaks, if it does.
    pub first_bad_seq: Option<u64>,
    /// What is wrong there.
    pub reason: Option<String>,
}

impl Report {
    /// Whether the log verified.
    pub fn ok(&self) -> bool {
        self.first_bad_seq.is_none()
    }
}

/// Checks events one by one, in the order read.
#[derive(Debug)]
pub struct Verifier {
    base_seq: u64,
    /// The last event that chained correctly (or the base). Not "the next expected
    /// sequence number": an export may end at `u64::MAX`, which has no successor.
    last: u64,
    prev: [u8; 32],
    hashes: Vec<[u8; 32]>,
    broken: bool,
    first_seq: u64,
    bad: Option<(u64, String)>,
}

impl Verifier {
    /// Starts after event `base_seq` whose hash is `base_hash` (0 and
    /// zeros for a log from the beginning).
    pub fn new(base_seq: u64, base_hash: [u8; 32]) -> Verifier {
        Verifier {
            base_seq,
            last: base_seq,
            prev: base_hash,
            hashes: Vec::new(),
            broken: false,
            first_seq: 0,
            bad: None,
        }
    }

    fn flag(&mut self, seq: u64, reason: String) {
        match &self.bad {
            Some((s, _)) if *s <= seq => {}
            _ => self.bad = Some((seq, reason)),
        }
    }

    /// Checks the next event.
    pub fn push(&mut self, e: &Event) {
        if self.first_seq == 0 {
            self.first_seq = e.seq;
        }
        if self.broken {
            return;
        }
        let expected = self.last.checked_add(1);
        if Some(e.seq) != expected {
            let (at, reason) = match expected {
                Some(x) if e.seq > x => (x, format!("event {x} is missing (next event read is {})", e.seq)),
                Some(x) => (e.seq, format!("event {} appears where event {x} belongs", e.seq)),
                None => (e.seq, format!("event {} appears after the last possible event", e.seq)),
            };
            self.flag(at, reason);
            self.broken = true;
            return;
        }
        if e.prev_hash != self.prev {
            self.flag(
                e.seq,
                format!("event {}: prev_hash does not match event {}", e.seq, e.seq - 1),
            );
            self.broken = true;
            return;
        }
        if link(&self.prev, e.seq, &e.body) != e.hash {
            self.flag(e.seq, format!("event {}: contents do not match its hash", e.seq));
            self.broken = true;
            return;
        }
        self.prev = e.hash;
        self.hashes.push(e.hash);
        self.last = e.seq;
    }

    /// The last event that chained correctly (or the base).
    fn last_good(&self) -> u64 {
        self.last
    }

    /// Finishes with the recorded head (if known), the checkpoints and the
    /// keys that may have signed them.
    pub fn finish(mut self, head: Option<(u64, [u8; 32])>, checkpoints: &[Checkpoint], keys: &KeyHistory) -> Report {
        let last = self.last_good();
        if let Some((head_seq, head_hash)) = head {
            if !self.broken && head_seq > last {
                self.flag(
                    last + 1,
                    format!("event {} is missing: the head records {head_seq} events", last + 1),
                );
            } else if !self.broken && head_seq == last && head_seq > self.base_seq && head_hash != self.prev {
                self.flag(
                    head_seq,
                    format!("event {head_seq}: hash differs from the recorded head"),
                );
            }
        }
        let mut verified = 0;
        for cp in checkpoints {
            if cp.last_seq <= self.base_seq {
                continue;
            }
            match self.check_checkpoint(cp, keys) {
                Ok(()) => verified += 1,
                Err((seq, reason)) => self.flag(seq, reason),
            }
        }
        let (first_bad_seq, reason) = match self.bad {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        Report {
            events: self.hashes.len() as u64,
            first_seq: self.first_seq,
            last_seq: last,
            checkpoints_verified: verified,
            first_bad_seq,
            reason,
        }
    }

    fn check_checkpoint(&self, cp: &Checkpoint, keys: &KeyHistory) -> Result<(), (u64, String)> {
        let what = format!("checkpoint {}..={}", cp.first_seq, cp.last_seq);
        let verified = keys
            .verify(&cp.jws)
            .map_err(|e| (cp.first_seq, format!("{what}: signature: {e}")))?;
        if verified.header.typ.as_deref() != Some(CHECKPOINT_TYP) {
            return Err((cp.first_seq, format!("{what}: not a checkpoint token")));
        }
        let claims: CheckpointClaims =
            serde_json::from_value(verified.claims).map_err(|e| (cp.first_seq, format!("{what}: claims: {e}")))?;
        if claims.first_seq != cp.first_seq || claims.last_seq != cp.last_seq || claims.root != cp.root {
            return Err((cp.first_seq, format!("{what}: row differs from its signed claims")));
        }
        if cp.first_seq <= self.base_seq {
            return Err((cp.first_seq, format!("{what}: starts before the first event read")));
        }
        let last = self.last_good();
        if cp.last_seq > last {
            return Err((last + 1, format!("{what}: event {} is missing or broken", last + 1)));
        }
        let from = usize::try_from(cp.first_seq - self.base_seq - 1).unwrap_or(usize::MAX);
        let to = usize::try_from(cp.last_seq - self.base_seq).unwrap_or(usize::MAX);
        let Some(range) = self.hashes.get(from..to) else {
            return Err((cp.first_seq, format!("{what}: events not read")));
        };
        if merkle::root(range) != claims.root {
            return Err((cp.first_seq, format!("{what}: Merkle root does not match the events")));
        }
        if range.last() != Some(&claims.last_hash) {
            return Err((
                cp.last_seq,
                format!("{what}: last event hash differs from the signed one"),
            ));
        }
        Ok(())
    }
}

/// The store's issuer key history: every issuer key that may have signed
/// checkpoints, with its lifecycle times (a revoked key verifies only what it
/// signed before its revocation).
pub async fn store_keys(store: &dyn Store) -> Result<KeyHistory, AuditError> {
    let records = store.issuer_key_history().await?;
    KeyHistory::from_records(&records).map_err(|e| AuditError::Invalid(e.to_string()))
}

/// Verifies the log in the store against `keys`.
pub async fn verify_store(store: &dyn Store, keys: &KeyHistory) -> Result<Report, AuditError> {
    let audit = store.audit();
    let head: Head = audit.audit_head().await?;
    let mut v = Verifier::new(head.base_seq, head.base_hash);
    let mut after = head.base_seq;
    loop {
        let page = audit.events_after(after, 1000).await?;
        let Some(end) = page.last().map(|e| e.seq) else {
            break;
        };
        for e in &page {
            v.push(e);
        }
        after = end;
    }
    let checkpoints = audit.checkpoints().await?;
    Ok(v.finish(Some((head.seq, head.hash)), &checkpoints, keys))
}

/// Verifies exported events (in file order) and checkpoints. The first
/// event's `prev_hash` anchors the chain (zeros for an export from event 1).
pub fn verify_export(events: &[Event], checkpoints: &[Checkpoint], keys: &KeyHistory) -> Report {
    let (base_seq, base_hash) = match events.first() {
        Some(e) => (e.seq.saturating_sub(1), e.prev_hash),
        None => (0, super::GENESIS),
    };
    let mut v = Verifier::new(base_seq, base_hash);
    for e in events {
        v.push(e);
    }
    v.finish(None, checkpoints, keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::NewEvent;

    fn chain(seqs: &[u64]) -> Vec<Event> {
        let mut prev = [3u8; 32];
        seqs.iter()
            .map(|&seq| {
                let body = NewEvent {
                    action: format!("A{seq}"),
                    ..NewEvent::default()
                };
                let hash = link(&prev, seq, &body);
                let e = Event {
                    seq,
                    body,
                    prev_hash: prev,
                    hash,
                };
                prev = hash;
                e
            })
            .collect()
    }

    /// An export ending at the largest sequence number verifies, and one more event after
    /// it is reported, not an overflow (seen while writing the `audit` fuzz target, whose
    /// relink mode reaches it; before, `keyward audit verify --file` panicked on such a file).
    #[test]
    fn an_export_ending_at_u64_max_verifies_without_overflow() {
        let events = chain(&[u64::MAX - 1, u64::MAX]);
        let report = verify_export(&events, &[], &KeyHistory::default());
        assert!(report.ok(), "{report:?}");
        assert_eq!(
            (report.events, report.first_seq, report.last_seq),
            (2, u64::MAX - 1, u64::MAX)
        );

        let events = chain(&[u64::MAX - 1, u64::MAX, 5]);
        let report = verify_export(&events, &[], &KeyHistory::default());
        assert_eq!(report.first_bad_seq, Some(5), "{report:?}");
        assert_eq!(report.last_seq, u64::MAX);
    }
}
